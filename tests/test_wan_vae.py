"""Parity of the Flax Wan 2.1 video VAE with diffusers' `AutoencoderKLWan` (tiny random model,
float32, CPU): diffusers encodes in chunks (first frame, then 4 at a time) and decodes frame by
frame with its causal feature cache; the Flax port runs each layer over the full sequence."""
import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from ddpo_jax.models import wan_vae as W  # noqa: E402
from ddpo_jax.models.weights import WeightLoadingError  # noqa: E402

TOL = 1e-4
FAST_COMPILE = {"xla_backend_optimization_level": 0}  # tests only: halves CPU compile times
Z = 4


def _kwargs(**overrides):
  kw = dict(base_dim=8, z_dim=Z, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
            temperal_downsample=[False, True, True], dropout=0.0,
            latents_mean=[0.1, -0.2, 0.3, -0.4], latents_std=[1.5, 2.0, 0.5, 1.0])
  kw.update(overrides)
  return kw


def _state_dict(model):
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


@functools.lru_cache(maxsize=None)
def _models(**overrides):
  from diffusers import AutoencoderKLWan
  torch.manual_seed(0)
  model = AutoencoderKLWan(**_kwargs(**overrides))
  g = torch.Generator().manual_seed(0)
  with torch.no_grad():  # every parameter random (norm gains around 1), so no branch is trivial
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g) * 0.2
      p.copy_(1.0 + noise if name.endswith("gamma") else noise)
    model.decoder.conv_out.weight.mul_(0.1)  # keep most of the decoded video inside the clamp
  model.eval()
  config = W.WanVAEConfig.from_dict(dict(model.config))
  return model, config, W.wan_vae_from_torch(_state_dict(model), config, source="tiny wan vae")


def _to_torch_video(x):  # (B, F, H, W, C) -> (B, C, F, H, W)
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 4, 1, 2, 3)))


def _from_torch_video(t):
  return t.detach().numpy().transpose(0, 2, 3, 4, 1)


@functools.lru_cache(maxsize=None)
def _jitted(config):
  model = W.AutoencoderKLWan(config)
  encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=W.AutoencoderKLWan.encode),
                   compiler_options=FAST_COMPILE)
  decode = jax.jit(lambda p, z: model.apply({"params": p}, z, method=W.AutoencoderKLWan.decode),
                   compiler_options=FAST_COMPILE)
  return encode, decode


def _check_parity(frames, latent_frames, label, **overrides):
  model, config, params = _models(**overrides)
  rng = np.random.default_rng(frames)
  x = rng.uniform(-1, 1, (2, frames, 16, 16, 3)).astype(np.float32)
  z = rng.standard_normal((2, latent_frames, 2, 2, Z)).astype(np.float32)
  with torch.no_grad():
    posterior = model.encode(_to_torch_video(x)).latent_dist
    decoded = model.decode(_to_torch_video(z)).sample
  encode, decode = _jitted(config)
  mean, logvar = encode(params, x)
  video = decode(params, z)
  assert mean.shape == (2, 1 + (frames - 1) // 4, 2, 2, Z)
  assert video.shape == (2, 1 + 4 * (latent_frames - 1), 16, 16, 3)
  errs = {"mean": np.abs(np.asarray(mean) - _from_torch_video(posterior.mean)).max(),
          "logvar": np.abs(np.asarray(logvar) - _from_torch_video(posterior.logvar)).max(),
          "decode": np.abs(np.asarray(video) - _from_torch_video(decoded)).max()}
  clamped = np.mean(np.abs(_from_torch_video(decoded)) >= 1.0)
  print(label, {k: f"{v:.3g}" for k, v in errs.items()},
        f"ref mean max |.| {np.abs(_from_torch_video(posterior.mean)).max():.3g}, "
        f"decoded max |.| {np.abs(_from_torch_video(decoded)).max():.3g}, clamped {clamped:.0%}")
  assert clamped < 0.25
  assert max(errs.values()) <= TOL, errs


def test_wan_vae_parity_5_frames():
  _check_parity(5, 2, "wan vae F=5 / F'=2")


def test_wan_vae_parity_9_frames():
  _check_parity(9, 3, "wan vae F=9 / F'=3")


def test_wan_vae_parity_other_temporal_pattern():
  _check_parity(5, 3, "wan vae temporal (T,T,F)", temperal_downsample=(True, True, False))


def test_frames_must_be_4k_plus_1():
  _, config, params = _models()
  encode, _ = _jitted(config)
  with pytest.raises(ValueError, match=r"4k\+1 frames.*got 4"):
    encode(params, np.zeros((1, 4, 16, 16, 3), np.float32))
  assert config.latent_frames(9) == 3


def test_abstract_params_and_round_trip():
  from diffusers import AutoencoderKLWan
  model, config, params = _models()
  shapes = lambda t: jax.tree_util.tree_map(lambda a: (a.shape, jnp.dtype(a.dtype)), t)  # noqa: E731
  assert shapes(W.abstract_wan_vae_params(config)) == shapes(params)
  ours = int(sum(np.prod(a.shape) for a in jax.tree_util.tree_leaves(params)))
  assert ours == sum(p.numel() for p in model.parameters())
  back = W.wan_vae_to_torch(params, config)
  ref = _state_dict(model)
  assert set(back) == set(ref)
  for key in ref:
    np.testing.assert_array_equal(back[key], ref[key], err_msg=key)
  rebuilt = AutoencoderKLWan.from_config(config.to_dict())
  rebuilt.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in back.items()}, strict=True)
  assert W.WanVAEConfig.from_dict(config.to_dict()) == config


def test_load_errors_and_config_errors():
  model, config, _ = _models()
  bad = _state_dict(model)
  bad["decoder.conv_in.weight"] = bad["decoder.conv_in.weight"][:, :2]
  with pytest.raises(WeightLoadingError, match=r"bad\.safetensors.*decoder\.conv_in\.weight"):
    W.wan_vae_from_torch(bad, config, source="bad.safetensors")
  missing = _state_dict(model)
  del missing["encoder.mid_block.attentions.0.norm.gamma"]
  with pytest.raises(WeightLoadingError, match=r"1 missing keys.*attentions\.0\.norm\.gamma"):
    W.wan_vae_from_torch(missing, config, source="missing.safetensors")
  raw = dict(model.config)
  with pytest.raises(ValueError, match="is_residual"):
    W.WanVAEConfig.from_dict({**raw, "is_residual": True})
  with pytest.raises(ValueError, match="patch_size"):
    W.WanVAEConfig.from_dict({**raw, "patch_size": 2})
  with pytest.raises(ValueError, match="temperal_downsample"):
    W.WanVAEConfig.from_dict({**raw, "temperal_downsample": [True, True, True]})
  with pytest.raises(ValueError, match="temperal_downsample"):
    W.WanVAEConfig.from_dict({**raw, "temperal_downsample": [False, True]})
  with pytest.raises(ValueError, match="attn_scales"):
    W.WanVAEConfig.from_dict({**raw, "attn_scales": [0.5]})
  with pytest.raises(ValueError, match="latents_mean"):
    W.WanVAEConfig.from_dict({**raw, "latents_mean": [0.0] * 3})
  with pytest.raises(ValueError, match="_class_name"):
    W.WanVAEConfig.from_dict({**raw, "_class_name": "AutoencoderKL"})


def test_latent_normalisation_matches_pipeline():
  _, config, _ = _models()
  raw = np.random.default_rng(3).standard_normal((1, 2, 2, 2, Z)).astype(np.float32)
  # diffusers' WanPipeline: latents / (1 / std) + mean before vae.decode.
  mean = np.asarray(config.latents_mean, np.float32)
  inv_std = 1.0 / np.asarray(config.latents_std, np.float32)
  z = W.normalize_latents(config, jnp.asarray(raw))
  np.testing.assert_allclose(np.asarray(W.denormalize_latents(config, z)), raw, atol=1e-6)
  np.testing.assert_allclose(np.asarray(z) / inv_std + mean, raw, atol=1e-6)


def test_default_config_is_wan21():
  from diffusers import AutoencoderKLWan
  config = W.WanVAEConfig()
  with torch.device("meta"):
    ref = AutoencoderKLWan()
  assert W.WanVAEConfig.from_dict(dict(ref.config)) == config
  assert (config.spatial_factor, config.temporal_factor) == (8, 4)
  ours = int(sum(np.prod(a.shape) for a in jax.tree_util.tree_leaves(
      W.abstract_wan_vae_params(config))))
  assert ours == sum(p.numel() for p in ref.parameters())
