"""T5 encoder (transformers `T5EncoderModel`) in Flax: the text encoder of SD3 and FLUX (T5 v1.1
XXL), and UMT5 (transformers `UMT5EncoderModel`), the text encoder of Wan2.1 (umt5-xxl), loaded
from transformers-format checkpoints.

Numerics follow transformers (`modeling_t5.py`): pre-norm blocks with T5's RMS "LayerNorm"
(`norms.RMSNorm`: no mean, no bias; statistics in float32), unscaled dot-product attention plus
a learned bucketed relative position bias (computed by the first block's attention, shared by all
blocks), a feed-forward that is gated GELU (tanh approximation) for v1.1 (`feed_forward_proj =
"gated-gelu"`) or ReLU for the original T5, and a final RMS norm. Optional key-padding
`attention_mask` (B, L): SD3 and FLUX encode max-length padded ids without one (None: no mask),
as diffusers' pipelines do; Wan passes the prompt's mask (then masked keys get the float32
minimum as the score, like transformers' SDPA path) and zeroes the states past each prompt's
length (`zero_past_length`, as `WanPipeline._get_t5_prompt_embeds`).

UMT5 (`T5Config.relative_attention_bias_per_layer`, set by `from_dict` for model_type "umt5") is
T5 v1.1 except that EVERY block's self-attention owns a `relative_attention_bias` table and
computes its own position bias (T5 computes it in block 0 and shares it); everything else
(unscaled attention, RMS norms, gated GELU-tanh, no embedding scale, tied embedding, final norm;
dropout is inactive at inference) is the same, so the parameter keys are too.

Parameter tree (Flax names = transformers module names, lists `block_I` / `layer_I`):

  {'shared': {'embedding'},
   'encoder': {'block_0': {'layer_0': {'SelfAttention': {'q','k','v','o',
                                                         'relative_attention_bias' (block 0;
                                                          every block for UMT5)},
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
# transformers' `UMT5Config` defaults where they differ from `T5Config`'s (used by `from_dict` for
# model_type "umt5" keys a config.json leaves out).
UMT5_DEFAULTS = {"vocab_size": 250112, "d_ff": 1024, "num_layers": 8, "num_heads": 6,
                 "feed_forward_proj": "gated-gelu"}


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
  # UMT5: every block has its own relative_attention_bias (T5: block 0's, shared).
  relative_attention_bias_per_layer: bool = False

  def __post_init__(self):
    if self.feed_forward_proj not in FEED_FORWARD:
      raise ValueError(f"T5Config: unsupported feed_forward_proj={self.feed_forward_proj!r} "
                       f"(supported: {', '.join(FEED_FORWARD)})")

  @property
  def gated(self) -> bool:
    return self.feed_forward_proj == "gated-gelu"

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "T5Config":
    """From a transformers config.json dict of a T5 / T5EncoderModel, or of a UMT5 /
    UMT5EncoderModel (model_type "umt5": per-layer relative bias, `UMT5_DEFAULTS` for missing
    keys). Other keys are ignored.

    Raises:
      ValueError: not a T5 / UMT5 config (`model_type`), or an unsupported feed-forward.
    """
    model_type = d.get("model_type", "t5")
    if model_type not in ("t5", "umt5"):
      raise ValueError(f"T5Config.from_dict: model_type {model_type!r} is not 't5' or 'umt5'")
    names = {f.name for f in dataclasses.fields(cls)} - {"relative_attention_bias_per_layer"}
    umt5 = model_type == "umt5"
    fields = {**(UMT5_DEFAULTS if umt5 else {}), **{k: v for k, v in d.items() if k in names}}
    return cls(**fields, relative_attention_bias_per_layer=umt5)

  def to_dict(self) -> dict:
    """A config.json dict that `transformers.T5EncoderModel.from_pretrained` (or
    `UMT5EncoderModel`'s, for a per-layer-bias config) loads."""
    fields = dataclasses.asdict(self)
    umt5 = fields.pop("relative_attention_bias_per_layer")
    return {"architectures": ["UMT5EncoderModel" if umt5 else "T5EncoderModel"],
            "model_type": "umt5" if umt5 else "t5", "is_encoder_decoder": True, **fields}


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
  that owns `relative_attention_bias` computes the bias and returns it for the others (T5), or
  every block owns one (UMT5). `mask`: None or a bool (B, 1, 1, L) key mask."""
  config: T5Config
  has_relative_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, position_bias=None, mask=None):
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
    scores = (jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
              + position_bias.astype(jnp.float32))
    if mask is not None:
      scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    weights_ = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights_.astype(v.dtype), v).reshape(b, n, inner)
    return nn.Dense(c.d_model, name="o", **kw)(out), position_bias


class T5Block(nn.Module):
  """layer_0: x + SelfAttention(norm(x)); layer_1: x + DenseReluDense(norm(x))."""
  config: T5Config
  has_relative_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, position_bias=None, mask=None):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attn_out, position_bias = _AttentionLayer(c, self.has_relative_bias, name="layer_0", **kw)(
        x, position_bias, mask)
    x = x + attn_out
    return x + _FeedForwardLayer(c, name="layer_1", **kw)(x), position_bias


class _AttentionLayer(nn.Module):
  config: T5Config
  has_relative_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, position_bias, mask=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = RMSNorm(self.config.layer_norm_epsilon, self.param_dtype, name="layer_norm")(x)
    return T5SelfAttention(self.config, self.has_relative_bias, name="SelfAttention", **kw)(
        h, position_bias, mask)


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
  """Port of transformers' `T5EncoderModel` (and `UMT5EncoderModel`, per the config).

  Call: input_ids (B, L) int32, optional attention_mask (B, L) (nonzero = real token; None = all
  keys attended, unchanged T5 behaviour) -> last_hidden_state (B, L, d_model) in `dtype` (after
  the final norm: SD3's and FLUX's T5 conditioning; Wan's after `zero_past_length`).
  """
  config: T5Config
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, input_ids, attention_mask=None):
    c = self.config
    x = nn.Embed(c.vocab_size, c.d_model, name="shared", dtype=self.dtype,
                 param_dtype=self.param_dtype)(jnp.asarray(input_ids, jnp.int32))
    mask = None
    if attention_mask is not None:
      attention_mask = jnp.asarray(attention_mask)
      if attention_mask.shape != x.shape[:2]:
        raise ValueError(f"T5EncoderModel: attention_mask shape {attention_mask.shape} != "
                         f"input_ids shape {x.shape[:2]}")
      mask = (attention_mask != 0)[:, None, None, :]
    return _Encoder(c, self.dtype, self.param_dtype, self.remat, name="encoder")(x, mask)


class _Encoder(nn.Module):
  config: T5Config
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x, mask=None):
    c = self.config
    block = nn.remat(T5Block) if self.remat else T5Block
    position_bias = None
    for i in range(c.num_layers):
      own_bias = c.relative_attention_bias_per_layer or i == 0
      x, position_bias = block(c, own_bias, self.dtype, self.param_dtype, name=f"block_{i}")(
          x, position_bias, mask)
    return RMSNorm(c.layer_norm_epsilon, self.param_dtype, name="final_layer_norm")(x)


def zero_past_length(hidden_states, attention_mask):
  """`WanPipeline._get_t5_prompt_embeds`' post-processing: per prompt, keep the first
  `sum(attention_mask)` positions of `hidden_states` (B, L, D) and zero the rest (the tokenizer
  pads on the right, so this is every padded position)."""
  lengths = jnp.sum(jnp.asarray(attention_mask) != 0, axis=-1)
  keep = jnp.arange(hidden_states.shape[1])[None, :] < lengths[:, None]
  return jnp.where(keep[..., None], hidden_states, jnp.zeros((), hidden_states.dtype))


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
  """Flax params -> a `T5EncoderModel.state_dict()` (float32 NumPy arrays, tied key included);
  for UMT5 params, a `UMT5EncoderModel.state_dict()`."""
  out = weights.flax_to_torch(params, T5_LIST_NAMES)
  out[TIED_KEY] = out["shared.weight"]
  return out


def umt5_from_torch(state_dict: Mapping[str, Any], config: T5Config,
                    source: str = "<state dict>", dtype: Dtype = jnp.float32,
                    placement=None) -> dict:
  """transformers `UMT5EncoderModel` state dict -> Flax params (`t5_from_torch`; the keys are
  T5's with `encoder.block.I.layer.0.SelfAttention.relative_attention_bias.weight` in every
  block).

  Raises:
    ValueError: `config` is not a UMT5 one (`relative_attention_bias_per_layer`).
    weights.WeightLoadingError: as `t5_from_torch` (e.g. a block's missing bias, by key).
  """
  if not config.relative_attention_bias_per_layer:
    raise ValueError("umt5_from_torch: config is not a UMT5 config "
                     "(relative_attention_bias_per_layer=False); use T5Config.from_dict on a "
                     "model_type 'umt5' config")
  return t5_from_torch(state_dict, config, source, dtype, placement)


umt5_to_torch = t5_to_torch
