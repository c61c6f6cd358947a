"""Parity of the Flax AutoencoderKL with diffusers' (tiny random models, CPU)."""
import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import tiny_models as tm  # noqa: E402
from ddpo_jax.models import vae as V  # noqa: E402
from ddpo_jax.models.weights import WeightLoadingError  # noqa: E402

TOL = 1e-4
SD15_VAE_PARAMS = 83_653_863
FAST_COMPILE = {"xla_backend_optimization_level": 0}  # tests only: halves CPU compile times


def _state_dict(model):
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


@functools.lru_cache(maxsize=None)
def _models(**overrides):
  model = tm.make_torch_vae(tm.vae_kwargs(**overrides))
  config = V.VAEConfig.from_dict(dict(model.config))
  return model, config, V.vae_from_torch(_state_dict(model), config, source="tiny vae")


def _images(seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)


def _latents(seed=1):
  return np.random.default_rng(seed).standard_normal((2, 8, 8, 4)).astype(np.float32)


def _check_parity(model, config, params, label=""):
  x, z = _images(), _latents()
  with torch.no_grad():
    posterior = model.encode(tm.to_nchw(x)).latent_dist
    decoded = model.decode(tm.to_nchw(z)).sample
  flax_model = V.AutoencoderKL(config)
  encode = jax.jit(lambda p, x: flax_model.apply({"params": p}, x, method=V.AutoencoderKL.encode),
                   compiler_options=FAST_COMPILE)
  decode = jax.jit(lambda p, z: flax_model.apply({"params": p}, z, method=V.AutoencoderKL.decode),
                   compiler_options=FAST_COMPILE)
  mean, logvar = encode(params, x)
  images = decode(params, z)
  errs = {"mean": np.abs(np.asarray(mean) - tm.to_nhwc(posterior.mean)).max(),
          "logvar": np.abs(np.asarray(logvar) - tm.to_nhwc(posterior.logvar)).max(),
          "decode": np.abs(np.asarray(images) - tm.to_nhwc(decoded)).max()}
  print(label, {k: f"{v:.3g}" for k, v in errs.items()})
  assert mean.shape == (2, 8, 8, 4) and images.shape == (2, 16, 16, 3)
  assert max(errs.values()) <= TOL, errs


def test_vae_encode_decode_parity():
  _check_parity(*_models(), label="vae")


def test_vae_without_quant_convs_or_mid_attention():
  _check_parity(*_models(use_quant_conv=False, use_post_quant_conv=False,
                         mid_block_add_attention=False), label="vae (no quant conv / attn)")


def test_legacy_attention_keys_and_conv_shaped_weights():
  model, config, params = _models()
  legacy = {}
  for key, value in _state_dict(model).items():
    for new, old in ((".to_q.", ".query."), (".to_k.", ".key."), (".to_v.", ".value."),
                     (".to_out.0.", ".proj_attn.")):
      if new in key:
        key = key.replace(new, old)
        if key.endswith(".weight"):
          value = value[:, :, None, None]  # stored as a 1x1 convolution
    legacy[key] = value
  assert "encoder.mid_block.attentions.0.query.weight" in legacy
  assert legacy["encoder.mid_block.attentions.0.query.weight"].ndim == 4
  loaded = V.vae_from_torch(legacy, config, source="legacy.safetensors")
  for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(params)):
    np.testing.assert_array_equal(a, b)


def test_to_torch_round_trip_and_config():
  from diffusers import AutoencoderKL as TorchVAE
  model, config, params = _models()
  back = V.vae_to_torch(params, config)
  ref = _state_dict(model)
  assert set(back) == set(ref)
  for key in ref:
    np.testing.assert_array_equal(back[key], ref[key], err_msg=key)
  rebuilt = TorchVAE.from_config(config.to_dict())
  rebuilt.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in back.items()}, strict=True)
  assert V.VAEConfig.from_dict(config.to_dict()) == config
  assert config.scaling_factor == 0.18215


def test_init_and_errors():
  model, config, _ = _models()
  init = V.init_vae_params(config, jax.random.PRNGKey(0))
  assert (jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), init)
          == jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), V.abstract_vae_params(config)))
  bad = _state_dict(model)
  bad["decoder.conv_in.weight"] = bad["decoder.conv_in.weight"][:, :2]
  with pytest.raises(WeightLoadingError, match=r"bad\.safetensors.*decoder\.conv_in\.weight"):
    V.vae_from_torch(bad, config, source="bad.safetensors")
  raw = dict(model.config)
  with pytest.raises(ValueError, match=r"down_block_types\[0\]='AttnDownEncoderBlock2D'"):
    V.VAEConfig.from_dict({**raw, "down_block_types": ["AttnDownEncoderBlock2D",
                                                       "DownEncoderBlock2D"]})
  with pytest.raises(ValueError, match="latents_mean"):
    V.VAEConfig.from_dict({**raw, "latents_mean": [0.0] * 4, "latents_std": [1.0] * 4})


def test_sd15_param_count_matches_diffusers():
  from diffusers import AutoencoderKL as TorchVAE
  from ddpo_jax.models.pipeline import SD15_VAE_CONFIG, sd15_configs
  abstract = V.abstract_vae_params(sd15_configs()[1])
  with torch.device("meta"):
    ref = TorchVAE.from_config(SD15_VAE_CONFIG)
  ours = int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(abstract)))
  assert ours == SD15_VAE_PARAMS == sum(p.numel() for p in ref.parameters())


def test_bf16_compute_runs():
  _, config, params = _models()
  model = V.AutoencoderKL(config, dtype=jnp.bfloat16)
  z = _latents()
  out = jax.jit(lambda p, z: model.apply({"params": p}, z, method=V.AutoencoderKL.decode),
                compiler_options=FAST_COMPILE)(params, z)
  ref = V.AutoencoderKL(config).apply({"params": params}, z, method=V.AutoencoderKL.decode)
  assert out.dtype == jnp.bfloat16
  rel = np.abs(np.asarray(out, np.float32) - np.asarray(ref)).max() / np.abs(ref).max()
  assert rel < 0.1, rel
