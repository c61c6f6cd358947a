"""Parity of the Flax T5 encoder with transformers' T5EncoderModel (tiny random models, CPU)."""
import functools
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from ddpo_jax.models import t5 as T  # noqa: E402
from ddpo_jax.models.unet import count_params  # noqa: E402
from ddpo_jax.models.weights import WeightLoadingError  # noqa: E402

TOL = 1e-4  # max abs error, float32
T5_XXL_ENCODER_PARAMS = 4_762_310_656  # google/t5-v1_1-xxl encoder (SD3's text_encoder_3, FLUX's)


def _torch_config(feed_forward_proj):
  # 8 buckets over a max distance of 20, and 30-token inputs: exact, logarithmic and clamped
  # buckets all occur.
  return transformers.T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=24, num_layers=3,
                               num_heads=3, feed_forward_proj=feed_forward_proj,
                               relative_attention_num_buckets=8,
                               relative_attention_max_distance=20)


@functools.lru_cache(maxsize=None)
def _models(feed_forward_proj):
  torch.manual_seed(0)
  model = transformers.T5EncoderModel(_torch_config(feed_forward_proj)).eval()
  with torch.no_grad():
    for p in model.parameters():  # norm weights are ones at init: make everything random
      p.copy_(torch.randn_like(p) * 0.3)
  config = T.T5Config.from_dict(model.config.to_dict())
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  return model, config, T.t5_from_torch(state, config, source=feed_forward_proj)


def _ids(seed=0):
  return np.random.default_rng(seed).integers(0, 50, (2, 30))


@pytest.mark.parametrize("feed_forward_proj", ["gated-gelu", "relu"])
def test_t5_encoder_parity_with_transformers(feed_forward_proj):
  model, config, params = _models(feed_forward_proj)
  assert config.gated == (feed_forward_proj == "gated-gelu")
  ids = _ids()
  with torch.no_grad():
    ref = model(torch.from_numpy(ids)).last_hidden_state.numpy()
  out = jax.jit(T.T5EncoderModel(config).apply)({"params": params}, ids)
  err = float(np.abs(np.asarray(out) - ref).max())
  print(f"T5 {feed_forward_proj}: max abs error {err:.3g} (|h| max {np.abs(ref).max():.3g})")
  assert out.shape == (2, 30, 16) and err <= TOL


def test_relative_position_buckets_match_transformers():
  rel = np.arange(-40, 41)[None, :]
  ours = T.relative_position_bucket(rel, 32, 128)
  ref = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
      torch.from_numpy(rel), bidirectional=True, num_buckets=32, max_distance=128).numpy()
  np.testing.assert_array_equal(ours, ref)


def test_round_trip_into_transformers(tmp_path):
  model, config, params = _models("gated-gelu")
  back = T.t5_to_torch(params)
  fresh = transformers.T5EncoderModel(_torch_config("gated-gelu")).eval()
  fresh.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in back.items()}, strict=True)
  (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
  save_file({k: v for k, v in back.items() if k != T.TIED_KEY}, tmp_path / "model.safetensors")
  loaded = transformers.T5EncoderModel.from_pretrained(tmp_path).eval()
  ids = _ids(1)
  with torch.no_grad():
    a = loaded(torch.from_numpy(ids)).last_hidden_state.numpy()
    b = model(torch.from_numpy(ids)).last_hidden_state.numpy()
  np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
  assert T.T5Config.from_dict(config.to_dict()) == config


def test_bad_configs_and_weights():
  with pytest.raises(ValueError, match="feed_forward_proj='gated-silu'"):
    T.T5Config(feed_forward_proj="gated-silu")
  with pytest.raises(ValueError, match="model_type 'bert'"):
    T.T5Config.from_dict({"model_type": "bert"})
  model, config, _ = _models("relu")
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  tied = dict(state)
  tied[T.TIED_KEY] = state["shared.weight"] + 1.0
  with pytest.raises(WeightLoadingError, match="embed_tokens.weight differs from shared.weight"):
    T.t5_from_torch(tied, config, source="t5.safetensors")
  missing = {k: v for k, v in state.items()
             if not k.endswith("relative_attention_bias.weight")}
  with pytest.raises(WeightLoadingError, match="relative_attention_bias"):
    T.t5_from_torch(missing, config)


def test_t5_xxl_encoder_param_count():
  tconfig = transformers.T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240,
                                  num_layers=24, num_heads=64, feed_forward_proj="gated-gelu")
  with torch.device("meta"):
    ref = transformers.T5EncoderModel(tconfig)
  # transformers counts the tied embedding once.
  assert sum(p.numel() for p in ref.parameters()) == T5_XXL_ENCODER_PARAMS
  config = T.T5Config.from_dict(tconfig.to_dict())
  assert count_params(T.abstract_t5_params(config)) == T5_XXL_ENCODER_PARAMS
