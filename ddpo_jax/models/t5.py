"""T5 encoder (transformers `T5EncoderModel`) in Flax: the text encoder of SD3 and FLUX (T5 v1.1
XXL), loaded from transformers-format checkpoints.

Numerics follow transformers (`modeling_t5.py`): pre-norm blocks with T5's RMS "LayerNorm"
(`norms.RMSNorm`: no mean, no bias; statistics in float32), unscaled dot-product attention plus
a learned bucketed relative position bias (computed by the first block's attention, shared by all
blocks), a feed-forward that is gated GELU (tanh approximation) for v1.1 (`feed_forward_proj =
"gated-gelu"`) or ReLU for the original T5, and a final RMS norm. No attention mask: SD3 and
FLUX encode max-length padded ids without one, as diffusers' pipelines do.

Parameter tree (Flax names = transformers module names, lists `block_I` / `layer_I`):

  {'shared': {'embedding'},
   'encoder': {'block_0': {'layer_0': {'SelfAttention': {'q','k','v','o',
                                                         'relative_attention_bias' (block 0)},
                                       'layer_norm'},
                           'layer_1': {'DenseReluDense': {'wi_0','wi_1','wo'} or {'wi','wo'},
                                       'layer_norm'}}, ...,
               'final_layer_norm'}}

`encoder.embed_tokens.weight` is tied to `shared.weight` in transformers (checkpoints often
store only the latter); it is accepted if equal and written back on save.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddpo_jax.models import weights
from ddpo_jax.models.norms import RMSNorm

Dtype = Any

T5_LIST_NAMES = frozenset({"block", "layer"})
TIED_KEY = "encoder.embed_tokens.weight"
FEED_FORWARD = ("gated-gelu", "relu")


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Architecture of a T5 encoder (fields and defaults of transformers' `T5Config`; the defaults
  are t5-small's)."""
  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 2048
  num_layers: int = 6
  num_heads: int = 8
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "relu"

  def __post_init__(self):
    if self.feed_forward_proj not in FEED_FORWARD:
      raise ValueError(f"T5Config: unsupported feed_forward_proj={self.feed_forward_proj!r} "
                       f"(supported: {', '.join(FEED_FORWARD)})")

  @property
  def gated(self) -> bool:
    return self.feed_forward_proj == "gated-gelu"

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "T5Config":
    """From a transformers config.json dict of a T5 / T5EncoderModel (other keys ignored).

    Raises:
      ValueError: not a T5 config (`model_type`), or an unsupported feed-forward.
    """
    model_type = d.get("model_type", "t5")
    if model_type not in ("t5", "umt5"):
      raise ValueError(f"T5Config.from_dict: model_type {model_type!r} is not 't5'")
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})

  def to_dict(self) -> dict:
    """A config.json dict that `transformers.T5EncoderModel.from_pretrained` loads."""
    return {"architectures": ["T5EncoderModel"], "model_type": "t5",
            "is_encoder_decoder": True, **dataclasses.asdict(self)}


def relative_position_bucket(relative_position: np.ndarray, num_buckets: int,
                             max_distance: int) -> np.ndarray:
  """transformers' bidirectional `_relative_position_bucket`: int array of the same shape, in
  [0, num_buckets): half the buckets per sign, exact below num_buckets / 4, logarithmic up to
  `max_distance`."""
  num_buckets //= 2
  buckets = (relative_position > 0).astype(np.int64) * num_buckets
  distance = np.abs(relative_position)
  max_exact = num_buckets // 2
  with np.errstate(divide="ignore"):
    large = max_exact + (np.log(np.maximum(distance, 1).astype(np.float32) / max_exact)
                         / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).astype(np.int64)
  large = np.minimum(large, num_buckets - 1)
  return buckets + np.where(distance < max_exact, distance, large)


class T5SelfAttention(nn.Module):
  """Unscaled multi-head self-attention with an additive (1, H, L, L) position bias; the block
  that owns `relative_attention_bias` computes the bias and returns it for the others."""
  config: T5Config
  has_relative_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, position_bias=None):
    c = self.config
    kw = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
    b, n, _ = x.shape
    inner = c.num_heads * c.d_kv
    q, k, v = (nn.Dense(inner, name=name, **kw)(x).reshape(b, n, c.num_heads, c.d_kv)
               for name in ("q", "k", "v"))
    if self.has_relative_bias:
      position = np.arange(n)
      buckets = relative_position_bucket(position[None, :] - position[:, None],
                                         c.relative_attention_num_buckets,
                                         c.relative_attention_max_distance)
      table = nn.Embed(c.relative_attention_num_buckets, c.num_heads,
                       name="relative_attention_bias", param_dtype=self.param_dtype)
      position_bias = jnp.transpose(table(jnp.asarray(buckets)), (2, 0, 1))[None]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
    weights_ = jax.nn.softmax(scores + position_bias.astype(jnp.float32), axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights_.astype(v.dtype), v).reshape(b, n, inner)
    return nn.Dense(c.d_model, name="o", **kw)(out), position_bias


class T5Block(nn.Module):
  """layer_0: x + SelfAttention(norm(x)); layer_1: x + DenseReluDense(norm(x))."""
  config: T5Config
  has_relative_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, position_bias=None):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attn_out, position_bias = _AttentionLayer(c, self.has_relative_bias, name="layer_0", **kw)(
        x, position_bias)
    x = x + attn_out
    return x + _FeedForwardLayer(c, name="layer_1", **kw)(x), position_bias


class _AttentionLayer(nn.Module):
  config: T5Config
  has_relative_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, position_bias):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = RMSNorm(self.config.layer_norm_epsilon, self.param_dtype, name="layer_norm")(x)
    return T5SelfAttention(self.config, self.has_relative_bias, name="SelfAttention", **kw)(
        h, position_bias)


class _FeedForwardLayer(nn.Module):
  config: T5Config
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = RMSNorm(c.layer_norm_epsilon, self.param_dtype, name="layer_norm")(x)
    return _DenseReluDense(c, name="DenseReluDense", **kw)(h)


class _DenseReluDense(nn.Module):
  """transformers `T5DenseGatedActDense` (gelu_new(wi_0 x) * wi_1 x -> wo) or
  `T5DenseActDense` (relu(wi x) -> wo); no biases."""
  config: T5Config
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.config
    kw = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
    if c.gated:
      h = (nn.gelu(nn.Dense(c.d_ff, name="wi_0", **kw)(x), approximate=True)
           * nn.Dense(c.d_ff, name="wi_1", **kw)(x))
    else:
      h = nn.relu(nn.Dense(c.d_ff, name="wi", **kw)(x))
    return nn.Dense(c.d_model, name="wo", **kw)(h)


class T5EncoderModel(nn.Module):
  """Port of transformers' `T5EncoderModel`.

  Call: input_ids (B, L) int32 -> last_hidden_state (B, L, d_model) in `dtype` (after the final
  norm: SD3's and FLUX's T5 conditioning).
  """
  config: T5Config
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, input_ids):
    c = self.config
    x = nn.Embed(c.vocab_size, c.d_model, name="shared", dtype=self.dtype,
                 param_dtype=self.param_dtype)(jnp.asarray(input_ids, jnp.int32))
    return _Encoder(c, self.dtype, self.param_dtype, self.remat, name="encoder")(x)


class _Encoder(nn.Module):
  config: T5Config
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x):
    c = self.config
    block = nn.remat(T5Block) if self.remat else T5Block
    position_bias = None
    for i in range(c.num_layers):
      x, position_bias = block(c, i == 0, self.dtype, self.param_dtype, name=f"block_{i}")(
          x, position_bias)
    return RMSNorm(c.layer_norm_epsilon, self.param_dtype, name="final_layer_norm")(x)


# ================================================================================================
# Parameters.
# ================================================================================================
def abstract_t5_params(config: T5Config, dtype: Dtype = jnp.float32) -> dict:
  """The parameter tree as `jax.ShapeDtypeStruct`s (no allocation, no compilation)."""
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)
  model = T5EncoderModel(config, param_dtype=dtype)
  return jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 2), jnp.int32)), key)["params"]


def t5_from_torch(state_dict: Mapping[str, Any], config: T5Config, source: str = "<state dict>",
                  dtype: Dtype = jnp.float32, placement=None) -> dict:
  """transformers `T5EncoderModel` state dict (NumPy arrays) -> Flax params in `dtype`.

  Raises:
    weights.WeightLoadingError: missing/unexpected keys, a shape mismatch, or a tied
      `encoder.embed_tokens.weight` that differs from `shared.weight` (names `source`).
  """
  if TIED_KEY in state_dict and "shared.weight" in state_dict:
    tied, shared = np.asarray(state_dict[TIED_KEY]), np.asarray(state_dict["shared.weight"])
    if not np.array_equal(tied, shared):
      raise weights.WeightLoadingError(f"{source}: {TIED_KEY} differs from shared.weight (they "
                                       "are tied in T5EncoderModel)")
  return weights.torch_to_flax(state_dict, abstract_t5_params(config), T5_LIST_NAMES,
                               ignore=(r"^encoder\.embed_tokens\.weight$",), source=source,
                               dtype=dtype, placement=placement)


def t5_to_torch(params) -> dict[str, np.ndarray]:
  """Flax params -> a `T5EncoderModel.state_dict()` (float32 NumPy arrays, tied key included)."""
  out = weights.flax_to_torch(params, T5_LIST_NAMES)
  out[TIED_KEY] = out["shared.weight"]
  return out
