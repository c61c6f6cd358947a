"""Parity of the Flax UMT5 encoder (t5.py with a per-layer relative bias) with transformers'
UMT5EncoderModel, Wan2.1's text encoder, incl. the attention mask and WanPipeline's zeroing
(tiny random models, CPU)."""
import functools
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from ddpo_jax.models import t5 as T  # noqa: E402
from ddpo_jax.models.unet import count_params  # noqa: E402
from ddpo_jax.models.weights import WeightLoadingError  # noqa: E402

TOL = 1e-5  # max abs error, float32
VOCAB, LEN = 100, 30
LENGTHS = (30, 17, 5)  # real prompt lengths of the masked batch (30: no padding)
UMT5_XXL_ENCODER_PARAMS = 5_680_910_336  # transformers counts the tied embedding once


def _torch_config(attn_implementation="sdpa"):
  # 8 buckets over a max distance of 20, and 30-token inputs: exact, logarithmic and clamped
  # buckets all occur.
  config = transformers.UMT5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=3,
                                   num_heads=4, feed_forward_proj="gated-gelu",
                                   relative_attention_num_buckets=8,
                                   relative_attention_max_distance=20)
  config._attn_implementation = attn_implementation
  return config


def _randomize(model):
  with torch.no_grad():
    for p in model.parameters():  # norm weights are ones at init: make everything random
      p.copy_(torch.randn_like(p) * 0.3)
  return model.eval()


@functools.lru_cache(maxsize=None)
def _models(attn_implementation="sdpa"):
  torch.manual_seed(0)
  model = _randomize(transformers.UMT5EncoderModel(_torch_config(attn_implementation)))
  config = T.T5Config.from_dict(model.config.to_dict())
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  return model, config, T.umt5_from_torch(state, config, source="umt5.safetensors")


def _ids(seed=0):
  return np.random.default_rng(seed).integers(2, VOCAB, (len(LENGTHS), LEN))


def _padded(seed=0):
  """Right-padded ids (pad id 0) and their 0/1 mask, as WanPipeline's tokenizer gives."""
  mask = (np.arange(LEN)[None, :] < np.array(LENGTHS)[:, None]).astype(np.int64)
  return np.where(mask == 1, _ids(seed), 0), mask


def _torch_wan_embeds(model, ids, mask):
  """`WanPipeline._get_t5_prompt_embeds` after tokenization (diffusers 0.42.1, verbatim logic)."""
  text_input_ids, mask = torch.from_numpy(ids), torch.from_numpy(mask)
  seq_lens = mask.gt(0).sum(dim=1).long()
  with torch.no_grad():
    prompt_embeds = model(text_input_ids, mask).last_hidden_state
  prompt_embeds = [u[:v] for u, v in zip(prompt_embeds, seq_lens)]
  return torch.stack([torch.cat([u, u.new_zeros(LEN - u.size(0), u.size(1))])
                      for u in prompt_embeds], dim=0).numpy()


def _err(a, b):
  return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def test_config_from_transformers():
  model, config, _ = _models()
  assert config.relative_attention_bias_per_layer and config.gated
  assert (config.vocab_size, config.d_model, config.num_layers) == (VOCAB, 32, 3)
  assert T.T5Config.from_dict(config.to_dict()) == config
  assert config.to_dict()["model_type"] == "umt5"
  # A bare umt5 config.json takes UMT5Config's defaults, not T5Config's.
  bare = T.T5Config.from_dict({"model_type": "umt5", "d_model": 4096})
  ref = transformers.UMT5Config(d_model=4096)
  assert (bare.vocab_size, bare.d_ff, bare.num_layers, bare.num_heads, bare.feed_forward_proj) \
      == (ref.vocab_size, ref.d_ff, ref.num_layers, ref.num_heads, ref.feed_forward_proj)
  assert not T.T5Config.from_dict({"model_type": "t5"}).relative_attention_bias_per_layer


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_umt5_parity_with_transformers(attn_implementation):
  model, config, params = _models(attn_implementation)
  apply = jax.jit(T.T5EncoderModel(config).apply)
  ids = _ids()
  with torch.no_grad():
    ref = model(torch.from_numpy(ids)).last_hidden_state.numpy()
  err = _err(apply({"params": params}, ids), ref)
  print(f"UMT5 ({attn_implementation}) no mask: max abs error {err:.3g} "
        f"(|h| max {np.abs(ref).max():.3g})")
  assert err <= TOL

  ids, mask = _padded()
  with torch.no_grad():
    ref = model(torch.from_numpy(ids), torch.from_numpy(mask)).last_hidden_state.numpy()
  out = apply({"params": params}, ids, mask)
  err = _err(out, ref)  # every position, padded ones included
  print(f"UMT5 ({attn_implementation}) mask: max abs error {err:.3g}")
  assert out.shape == (len(LENGTHS), LEN, 32) and err <= TOL
  # The mask matters: without it the padded rows' states would differ.
  assert _err(apply({"params": params}, ids), ref) > 1e-2

  ref_wan = _torch_wan_embeds(model, ids, mask)
  wan = T.zero_past_length(out, mask)
  err = _err(wan, ref_wan)
  print(f"UMT5 ({attn_implementation}) WanPipeline prompt embeds: max abs error {err:.3g}")
  assert err <= TOL
  for b, n in enumerate(LENGTHS):
    assert not np.any(np.asarray(wan)[b, n:]) and np.all(np.any(np.asarray(wan)[b, :n], -1))


def test_mask_all_ones_equals_no_mask_and_remat():
  _, config, params = _models()
  ids = _ids(2)
  plain = T.T5EncoderModel(config).apply({"params": params}, ids)
  ones = T.T5EncoderModel(config).apply({"params": params}, ids, np.ones_like(ids))
  np.testing.assert_array_equal(np.asarray(plain), np.asarray(ones))
  ids, mask = _padded(2)
  a = T.T5EncoderModel(config).apply({"params": params}, ids, mask)
  b = jax.jit(T.T5EncoderModel(config, remat=True).apply)({"params": params}, ids, mask)
  assert _err(a, b) <= 1e-6
  with pytest.raises(ValueError, match="attention_mask shape"):
    T.T5EncoderModel(config).apply({"params": params}, ids, mask[:, :-1])


def test_t5_v1_1_with_mask_parity():
  """The mask is general: T5 v1.1 (shared block-0 bias) with a mask matches transformers too."""
  torch.manual_seed(1)
  tconfig = transformers.T5Config(vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=24, num_layers=3,
                                  num_heads=3, feed_forward_proj="gated-gelu",
                                  relative_attention_num_buckets=8,
                                  relative_attention_max_distance=20)
  model = _randomize(transformers.T5EncoderModel(tconfig))
  config = T.T5Config.from_dict(model.config.to_dict())
  assert not config.relative_attention_bias_per_layer
  params = T.t5_from_torch({k: v.numpy() for k, v in model.state_dict().items()}, config)
  assert set(params["encoder"]["block_1"]["layer_0"]["SelfAttention"]) == {"q", "k", "v", "o"}
  ids, mask = _padded(3)
  with torch.no_grad():
    ref = model(torch.from_numpy(ids), torch.from_numpy(mask)).last_hidden_state.numpy()
  err = _err(T.T5EncoderModel(config).apply({"params": params}, ids, mask), ref)
  print(f"T5 v1.1 mask: max abs error {err:.3g}")
  assert err <= TOL


def test_abstract_params_match_loaded_tree():
  _, config, params = _models()
  abstract = T.abstract_t5_params(config)
  assert jax.tree_util.tree_structure(abstract) == jax.tree_util.tree_structure(params)
  for a, p in zip(jax.tree_util.tree_leaves(abstract), jax.tree_util.tree_leaves(params)):
    assert a.shape == p.shape and a.dtype == p.dtype
  for i in range(config.num_layers):
    assert params["encoder"][f"block_{i}"]["layer_0"]["SelfAttention"][
        "relative_attention_bias"]["embedding"].shape == (8, 4)
  # bf16 loading keeps the tree.
  bf16 = T.abstract_t5_params(config, jnp.bfloat16)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(bf16))


def test_round_trip_into_transformers(tmp_path):
  model, config, params = _models()
  back = T.umt5_to_torch(params)
  assert set(back) == set(model.state_dict())
  fresh = transformers.UMT5EncoderModel(_torch_config()).eval()
  fresh.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in back.items()}, strict=True)
  (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
  save_file({k: v for k, v in back.items() if k != T.TIED_KEY}, tmp_path / "model.safetensors")
  loaded = transformers.UMT5EncoderModel.from_pretrained(tmp_path).eval()
  ids, mask = _padded(1)
  with torch.no_grad():
    a = loaded(torch.from_numpy(ids), torch.from_numpy(mask)).last_hidden_state.numpy()
    b = model(torch.from_numpy(ids), torch.from_numpy(mask)).last_hidden_state.numpy()
    c = fresh(torch.from_numpy(ids), torch.from_numpy(mask)).last_hidden_state.numpy()
  np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
  np.testing.assert_array_equal(b, c)
  again = T.umt5_from_torch(back, config)
  for x, y in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(again)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_bad_weights_and_configs():
  model, config, _ = _models()
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  key = "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"
  missing = {k: v for k, v in state.items() if k != key}
  with pytest.raises(WeightLoadingError, match=key.replace(".", r"\.")):
    T.umt5_from_torch(missing, config, source="umt5.safetensors")
  # A T5-shaped (shared bias) config rejects UMT5 weights: the extra biases are named.
  t5_config = T.T5Config.from_dict({**config.to_dict(), "model_type": "t5"})
  with pytest.raises(WeightLoadingError, match=r"block\.2\.layer\.0\.SelfAttention"):
    T.t5_from_torch(state, t5_config)
  with pytest.raises(ValueError, match="not a UMT5 config"):
    T.umt5_from_torch(state, t5_config)
  tied = dict(state)
  tied[T.TIED_KEY] = state["shared.weight"] + 1.0
  with pytest.raises(WeightLoadingError, match="embed_tokens.weight differs from shared.weight"):
    T.umt5_from_torch(tied, config)


def test_umt5_xxl_encoder_param_count():
  """umt5-xxl encoder sizes (Wan2.1's text_encoder; vocab 256384 as in google/umt5-xxl)."""
  tconfig = transformers.UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240,
                                    num_layers=24, num_heads=64, feed_forward_proj="gated-gelu")
  with torch.device("meta"):
    ref = transformers.UMT5EncoderModel(tconfig)
  assert sum(p.numel() for p in ref.parameters()) == UMT5_XXL_ENCODER_PARAMS
  config = T.T5Config.from_dict(tconfig.to_dict())
  assert count_params(T.abstract_t5_params(config)) == UMT5_XXL_ENCODER_PARAMS
