"""Parity of the Flax Wan2.1 transformer with diffusers' WanTransformer3DModel (tiny random
models, CPU, float32), its 3-D rotary tables, weight conversion both ways and the named
Wan2.1 architectures."""
import functools
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed  # noqa: E402

from ddpo_jax.models import wan as W  # noqa: E402
from ddpo_jax.models.unet import count_params  # noqa: E402
from ddpo_jax.models.weights import WeightLoadingError  # noqa: E402

TOL = 1e-4  # max abs error, float32
FAST_COMPILE = {"xla_backend_optimization_level": 0}  # tests only: halves CPU compile times
# Parameter counts of diffusers' WanTransformer3DModel for the named configs (meta device).
WAN21_T2V_1_3B_PARAMS = 1_418_996_800
WAN21_T2V_14B_PARAMS = 14_288_491_584

TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
            out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2,
            cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
            rope_max_seq_len=32)


@functools.lru_cache(maxsize=None)
def _models(cross_attn_norm=True):
  """(diffusers model, WanConfig, Flax params) of a tiny random Wan transformer. Weights
  ~ N(0, 0.1^2) (norm weights and modulation tables included): the timestep sinusoids have
  arguments up to ~900 rad, where 1-ulp differences of exp() between XLA and PyTorch are
  amplified by large weights (see test_flux)."""
  torch.manual_seed(0)
  model = diffusers.WanTransformer3DModel(**{**TINY, "cross_attn_norm": cross_attn_norm}).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn_like(p) * 0.1)
  config = W.WanConfig.from_dict(dict(model.config))
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  return model, config, W.wan_from_torch(state, config, source="tiny-wan")


def _inputs(seed=0, frames=3, side=8):
  """Latents (B=2, F=3, H=W=8, C=4) channels-last, timesteps 1000 * sigma, 5 text tokens."""
  rng = np.random.default_rng(seed)
  latents = rng.standard_normal((2, frames, side, side, 4)).astype(np.float32)
  context = rng.standard_normal((2, 5, 16)).astype(np.float32)
  return latents, np.array([312.5, 941.0], np.float32), context


def _torch_velocity(model, latents, t, context):
  with torch.no_grad():
    out = model(torch.from_numpy(latents.transpose(0, 4, 1, 2, 3).copy()), torch.from_numpy(t),
                torch.from_numpy(context)).sample
  return out.numpy().transpose(0, 2, 3, 4, 1)


def test_rope_tables_match_diffusers():
  config = W.WanConfig(**TINY)
  assert config.rope_axes_dims == (8, 4, 4)
  cos, sin = WanRotaryPosEmbed(16, (1, 2, 2), 32)(torch.zeros(1, 4, 3, 8, 10))
  ours = W.wan_rope_tables(config, 3, 4, 5)
  np.testing.assert_array_equal(ours[0], cos.numpy()[0, :, 0])
  np.testing.assert_array_equal(ours[1], sin.numpy()[0, :, 0])
  with pytest.raises(ValueError, match="exceeds rope_max_seq_len 32"):
    W.wan_rope_tables(config, 33, 1, 1)


@pytest.mark.parametrize("cross_attn_norm", [True, False])
def test_wan_parity_with_diffusers(cross_attn_norm):
  model, config, params = _models(cross_attn_norm)
  inputs = _inputs()
  ref = _torch_velocity(model, *inputs)
  apply = jax.jit(W.WanTransformer3DModel(config, attention_implementation="xla").apply,
                  compiler_options=FAST_COMPILE)
  out = apply({"params": params}, *inputs)
  err = float(np.abs(np.asarray(out) - ref).max())
  print(f"cross_attn_norm={cross_attn_norm}: max abs error {err:.3g} "
        f"(|v| max {np.abs(ref).max():.3g})")
  assert out.shape == ref.shape == (2, 3, 8, 8, 4) and out.dtype == np.float32
  assert err <= TOL


def test_remat_and_temporal_patch_parity():
  """A (2, 2, 2) patch (temporal patching: frames packed into tokens and unpacked again) and
  `remat`, against diffusers."""
  torch.manual_seed(1)
  kwargs = {**TINY, "patch_size": (2, 2, 2), "num_layers": 1}
  model = diffusers.WanTransformer3DModel(**kwargs).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn_like(p) * 0.1)
  config = W.WanConfig.from_dict(dict(model.config))
  params = W.wan_from_torch({k: v.numpy() for k, v in model.state_dict().items()}, config)
  inputs = _inputs(seed=2, frames=4)
  ref = _torch_velocity(model, *inputs)
  apply = jax.jit(W.WanTransformer3DModel(config, remat=True).apply,
                  compiler_options=FAST_COMPILE)
  err = float(np.abs(np.asarray(apply({"params": params}, *inputs)) - ref).max())
  print(f"patch (2, 2, 2), remat: max abs error {err:.3g}")
  assert err <= TOL


def test_round_trip_into_diffusers():
  model, config, params = _models()
  back = W.wan_to_torch(params, config)
  ref = {k: v.numpy() for k, v in model.state_dict().items()}
  assert set(back) == set(ref)
  for key in ref:
    assert back[key].shape == ref[key].shape, key
    np.testing.assert_array_equal(back[key], ref[key], err_msg=key)
  rebuilt = diffusers.WanTransformer3DModel.from_config(config.to_dict()).eval()
  rebuilt.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in back.items()}, strict=True)
  inputs = _inputs(seed=1)
  np.testing.assert_array_equal(_torch_velocity(rebuilt, *inputs),
                                _torch_velocity(model, *inputs))
  assert W.WanConfig.from_dict(config.to_dict()) == config


def test_abstract_params_match_the_loaded_tree():
  _, config, params = _models()
  abstract = W.abstract_wan_params(config)
  shapes = lambda tree: jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), tree)  # noqa
  assert shapes(abstract) == shapes(params)
  assert jax.tree.structure(abstract) == jax.tree.structure(params)


def test_named_configs_build_and_match_diffusers_param_counts():
  for named, expected in ((W.WAN21_T2V_1_3B, WAN21_T2V_1_3B_PARAMS),
                          (W.WAN21_T2V_14B, WAN21_T2V_14B_PARAMS)):
    config = W.WanConfig.from_dict(named)
    assert config.inner_dim == 128 * named["num_attention_heads"]
    with torch.device("meta"):
      ref = diffusers.WanTransformer3DModel.from_config(named)
    assert sum(p.numel() for p in ref.parameters()) == expected
    assert count_params(W.abstract_wan_params(config)) == expected


def test_bad_configs_inputs_and_weights():
  with pytest.raises(ValueError, match="image_dim=1280, added_kv_proj_dim=5120 configures the "
                                       "image-to-video branch"):
    W.WanConfig.from_dict({**W.WAN21_T2V_14B, "image_dim": 1280, "added_kv_proj_dim": 5120,
                           "in_channels": 36})
  with pytest.raises(ValueError, match="image_dim=8"):
    W.WanConfig(**{**TINY, "image_dim": 8})
  with pytest.raises(ValueError, match="unsupported qk_norm='rms_norm'"):
    W.WanConfig(**{**TINY, "qk_norm": "rms_norm"})
  with pytest.raises(ValueError, match="attention_head_dim=15 must be even"):
    W.WanConfig(**{**TINY, "attention_head_dim": 15})
  with pytest.raises(ValueError, match="patch_size=\\[1, 2\\] must be 3"):
    W.WanConfig(**{**TINY, "patch_size": (1, 2)})
  with pytest.raises(ValueError, match="_class_name"):
    W.WanConfig.from_dict({**TINY, "_class_name": "SD3Transformer2DModel"})
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    W.WanConfig.from_dict({**TINY, "window_size": [-1, -1]})
  assert any("ignoring unknown key window_size" in str(w.message) for w in caught)

  model, config, params = _models()
  latents, t, context = _inputs()
  module = W.WanTransformer3DModel(config)
  with pytest.raises(ValueError, match="must be divisible by patch_size"):
    jax.eval_shape(lambda p: module.apply({"params": p}, latents[:, :, :7, :7], t, context),
                   params)
  with pytest.raises(ValueError, match=r"must be \(B, F, H, W, 4\)"):
    jax.eval_shape(lambda p: module.apply({"params": p}, latents[..., :3], t, context), params)

  state = {k: v.numpy() for k, v in model.state_dict().items()}
  missing = {k: v for k, v in state.items() if not k.startswith("blocks.1.attn2.norm_k")}
  with pytest.raises(WeightLoadingError, match=r"tiny\.safetensors.*blocks\.1\.attn2\.norm_k"):
    W.wan_from_torch(missing, config, source="tiny.safetensors")
  i2v = {**state, "blocks.0.attn2.add_k_proj.weight": np.zeros((32, 8), np.float32)}
  with pytest.raises(WeightLoadingError, match="unexpected keys.*add_k_proj"):
    W.wan_from_torch(i2v, config, source="i2v.safetensors")
  wrong_patch = {**state, W.PATCH_KEY: np.zeros((32, 4, 1, 1, 1), np.float32)}
  with pytest.raises(WeightLoadingError, match=r"patch_embedding\.weight: checkpoint "
                                               r"\(32, 4, 1, 1, 1\), model expects "
                                               r"\(32, 4, 1, 2, 2\)"):
    W.wan_from_torch(wrong_patch, config, source="p.safetensors")
