"""Wan2.1 text-to-video denoiser (diffusers `WanTransformer3DModel`) in Flax, channels-last.

The video latents (B, F, H, W, C) are cut into `patch_size` = (t, h, w) patches (diffusers'
strided `Conv3d`, here an exact reshape + Dense) giving F/t * H/h * W/w tokens in (frame, row,
column) order. The conditioning (`condition_embedder`) is the sinusoidal embedding of the
timestep (1000 * sigma) through an MLP (`temb`), projected to 6 modulation vectors per block
(`time_proj`), and the text tokens (UMT5) through a tanh-GELU MLP (`text_embedder`). Each of
the `num_layers` blocks is: adaLN self-attention (modulation = the block's `scale_shift_table`
+ the projected timestep), with RMS-normalised queries and keys across all heads and a 3-D
rotary embedding; cross-attention to the text (optionally LayerNorm-ed input, no modulation);
an adaLN tanh-GELU feed-forward. The output is LayerNorm-ed, modulated by the top-level
`scale_shift_table` + temb, projected and unpatchified: the flow-matching velocity.

The 3-D rotary embedding (diffusers' `WanRotaryPosEmbed`) splits each head's
`attention_head_dim` = d channels into frames (d - 4 * (d // 6)), rows and columns
(2 * (d // 6) each); each axis rotates interleaved channel pairs by position * theta^(-2i/n)
(theta 10000, positions < `rope_max_seq_len`).

Precision follows diffusers: the time MLP, the modulation tables, the LayerNorms and the
gated residual updates run in float32 whatever `dtype` (its `_keep_in_fp32_modules`).

Submodules carry diffusers' names (`blocks_0/attn1/to_q`, `ffn/net_0/proj`), so
`weights.torch_to_flax` maps the state dict with `WAN_LIST_NAMES`; the only reshaped weight is
`patch_embedding.weight` (Conv3d (D, C, t, h, w) <-> Dense kernel (t * h * w * C, D)).
Text-to-video only: the I2V image embedder (`image_dim`, `added_kv_proj_dim`) is refused.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddpo_jax.models import weights
from ddpo_jax.models.attention import dot_product_attention
from ddpo_jax.models.config_io import config_from_dict, config_to_dict
from ddpo_jax.models.flux import apply_rope, rope_tables
from ddpo_jax.models.norms import RMSNorm
from ddpo_jax.models.unet import TimestepEmbedding, timestep_embedding

Dtype = Any

WAN_LIST_NAMES = frozenset({"blocks", "to_out", "net"})
PATCH_KEY = "patch_embedding.weight"  # diffusers' Conv3d weight (D, C, t, h, w)
ROPE_THETA = 10000.0
QK_NORMS = ("rms_norm_across_heads",)

# Named architectures: the transformer/config.json values of the diffusers checkpoints
# Wan-AI/Wan2.1-T2V-1.3B-Diffusers and Wan-AI/Wan2.1-T2V-14B-Diffusers, as written by diffusers'
# own conversion script (huggingface/diffusers scripts/convert_wan_to_diffusers.py,
# `get_transformer_config("Wan-T2V-1.3B" / "Wan-T2V-14B")`); the keys it leaves out take
# `WanTransformer3DModel`'s defaults (rope_max_seq_len 1024, no image embedder).
WAN21_T2V_1_3B = {
    "_class_name": "WanTransformer3DModel",
    "patch_size": [1, 2, 2], "num_attention_heads": 12, "attention_head_dim": 128,
    "in_channels": 16, "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "ffn_dim": 8960,
    "num_layers": 30, "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-06,
    "image_dim": None, "added_kv_proj_dim": None, "rope_max_seq_len": 1024,
    "pos_embed_seq_len": None,
}
WAN21_T2V_14B = {
    **WAN21_T2V_1_3B, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40,
}


@dataclasses.dataclass(frozen=True)
class WanConfig:
  """diffusers `WanTransformer3DModel` configuration (the field names of its config.json)."""
  patch_size: tuple[int, int, int] = (1, 2, 2)
  num_attention_heads: int = 40
  attention_head_dim: int = 128
  in_channels: int = 16
  out_channels: int | None = 16
  text_dim: int = 4096
  freq_dim: int = 256
  ffn_dim: int = 13824
  num_layers: int = 40
  cross_attn_norm: bool = True
  qk_norm: str | None = "rms_norm_across_heads"
  eps: float = 1e-6
  image_dim: int | None = None
  added_kv_proj_dim: int | None = None
  rope_max_seq_len: int = 1024
  pos_embed_seq_len: int | None = None

  def __post_init__(self):
    object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
    if len(self.patch_size) != 3 or min(self.patch_size) < 1:
      raise ValueError(f"Wan config: patch_size={list(self.patch_size)} must be 3 positive "
                       "integers (frames, height, width)")
    i2v = {k: getattr(self, k) for k in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len")
           if getattr(self, k) is not None}
    if i2v:
      raise ValueError(f"Wan config: {', '.join(f'{k}={v}' for k, v in i2v.items())} configures "
                       "the image-to-video branch (CLIP image embedder, added K/V "
                       "projections), which this port does not support: text-to-video "
                       "transformers only (image_dim, added_kv_proj_dim and "
                       "pos_embed_seq_len must be null)")
    if self.qk_norm not in QK_NORMS:
      raise ValueError(f"Wan config: unsupported qk_norm={self.qk_norm!r} (supported: "
                       f"{', '.join(repr(q) for q in QK_NORMS)}; diffusers' WanAttention always "
                       "applies RMS norms across heads)")
    if self.attention_head_dim % 2:
      raise ValueError(f"Wan config: attention_head_dim={self.attention_head_dim} must be even "
                       "(the rotary embedding rotates channel pairs)")
    if self.rope_max_seq_len < 1:
      raise ValueError(f"Wan config: rope_max_seq_len={self.rope_max_seq_len} must be positive")

  @property
  def inner_dim(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  @property
  def output_channels(self) -> int:
    return self.out_channels or self.in_channels

  @property
  def rope_axes_dims(self) -> tuple[int, int, int]:
    """Channels of each head rotated by the frame, row and column positions (diffusers'
    `WanRotaryPosEmbed` t_dim, h_dim, w_dim)."""
    hw = 2 * (self.attention_head_dim // 6)
    return (self.attention_head_dim - 2 * hw, hw, hw)

  @classmethod
  def from_dict(cls, d: dict) -> "WanConfig":
    """From a diffusers transformer/config.json dict (bookkeeping keys ignored, unknown keys
    ignored with a warning)."""
    return config_from_dict(cls, d, "WanTransformer3DModel", "Wan")

  def to_dict(self) -> dict:
    return config_to_dict(self, "WanTransformer3DModel")


def wan_rope_tables(config: WanConfig, frames: int, height: int,
                    width: int) -> tuple[np.ndarray, np.ndarray]:
  """(cos, sin), each (frames * height * width, attention_head_dim) float32, of the tokens of a
  frames x height x width patch grid in (frame, row, column) order (diffusers'
  `WanRotaryPosEmbed` output, squeezed)."""
  if max(frames, height, width) > config.rope_max_seq_len:
    raise ValueError(f"Wan: patch grid {frames}x{height}x{width} exceeds rope_max_seq_len "
                     f"{config.rope_max_seq_len}")
  f, h, w = np.meshgrid(np.arange(frames), np.arange(height), np.arange(width), indexing="ij")
  ids = np.stack([f.ravel(), h.ravel(), w.ravel()], axis=1)
  return rope_tables(ids, config.rope_axes_dims, ROPE_THETA)


def _layer_norm(eps: float, affine: bool = False, param_dtype: Dtype = jnp.float32, name=None):
  """diffusers `FP32LayerNorm`: statistics and affine in float32 (the caller casts back)."""
  return nn.LayerNorm(epsilon=eps, use_bias=affine, use_scale=affine, use_fast_variance=False,
                      dtype=jnp.float32, param_dtype=param_dtype, name=name)


# ------------------------------------------------------------------------------------- blocks
class WanAttention(nn.Module):
  """diffusers `WanAttention` + `WanAttnProcessor` (no added K/V): q from `x`, k and v from
  `context` (cross-attention) or `x`; q and k RMS-normalised over all heads together
  (`norm_q`, `norm_k` of width heads * dim_head), the rotary embedding on q and k if `rope`."""
  heads: int
  dim_head: int
  eps: float = 1e-6
  attention_implementation: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context=None, rope=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    inner = self.heads * self.dim_head
    kv_in = x if context is None else context
    q = nn.Dense(inner, name="to_q", **kw)(x)
    k = nn.Dense(inner, name="to_k", **kw)(kv_in)
    v = nn.Dense(inner, name="to_v", **kw)(kv_in)
    q = RMSNorm(self.eps, name="norm_q", param_dtype=self.param_dtype)(q)
    k = RMSNorm(self.eps, name="norm_k", param_dtype=self.param_dtype)(k)
    split = lambda a: a.reshape(a.shape[:2] + (self.heads, self.dim_head))  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    if rope is not None:
      cos, sin = rope
      q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    out = dot_product_attention(q, k, v, implementation=self.attention_implementation)
    out = out.reshape(out.shape[:2] + (inner,))
    return nn.Dense(x.shape[-1], name="to_out_0", **kw)(out)


class WanFeedForward(nn.Module):
  """diffusers `FeedForward(dim, inner_dim=ffn_dim, activation_fn="gelu-approximate")`:
  net.0.proj, tanh GELU, net.2."""
  dim: int
  inner_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = _Proj(self.inner_dim, name="net_0", **kw)(x)
    return nn.Dense(self.dim, name="net_2", **kw)(nn.gelu(h, approximate=True))


class _Proj(nn.Module):
  """A Dense under `NAME/proj` (diffusers' `GELU.proj`)."""
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.features, name="proj", dtype=self.dtype, param_dtype=self.param_dtype)(x)


def _modulation_table(module: nn.Module, n: int, dim: int, param_dtype: Dtype) -> jax.Array:
  """The `scale_shift_table` parameter (1, n, dim), initialised N(0, 1/dim) as diffusers."""
  return module.param("scale_shift_table", nn.initializers.normal(stddev=dim ** -0.5),
                      (1, n, dim), param_dtype)


class WanTransformerBlock(nn.Module):
  """diffusers `WanTransformerBlock`: (x (B, N, D), context (B, L, D), temb_proj (B, 6, D),
  rope) -> x."""
  dim: int
  ffn_dim: int
  heads: int
  cross_attn_norm: bool = True
  eps: float = 1e-6
  attention_implementation: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context, temb_proj, rope):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    akw = dict(heads=self.heads, dim_head=self.dim // self.heads, eps=self.eps,
               attention_implementation=self.attention_implementation, **kw)
    f32 = jnp.float32
    table = _modulation_table(self, 6, self.dim, self.param_dtype)
    mod = table.astype(f32) + temb_proj.astype(f32)  # (B, 6, D)
    shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = (
        mod[:, i:i + 1] for i in range(6))

    # 1. self-attention
    h = (_layer_norm(self.eps, name="norm1")(x.astype(f32)) * (1 + scale_msa)
         + shift_msa).astype(x.dtype)
    attn = WanAttention(name="attn1", **akw)(h, rope=rope)
    x = (x.astype(f32) + attn.astype(f32) * gate_msa).astype(x.dtype)

    # 2. cross-attention to the text
    if self.cross_attn_norm:
      h = _layer_norm(self.eps, affine=True, param_dtype=self.param_dtype,
                      name="norm2")(x.astype(f32)).astype(x.dtype)
    else:
      h = x
    x = x + WanAttention(name="attn2", **akw)(h, context=context).astype(x.dtype)

    # 3. feed-forward
    h = (_layer_norm(self.eps, name="norm3")(x.astype(f32)) * (1 + c_scale_msa)
         + c_shift_msa).astype(x.dtype)
    ff = WanFeedForward(self.dim, self.ffn_dim, name="ffn", **kw)(h)
    return (x.astype(f32) + ff.astype(f32) * c_gate_msa).astype(x.dtype)


class WanConditionEmbedder(nn.Module):
  """diffusers `WanTimeTextImageEmbedding` without the image embedder: (timesteps (B,),
  text (B, L, text_dim)) -> (temb (B, D), temb_proj (B, 6D), text (B, L, D)). The time MLP runs
  in float32 (diffusers keeps `time_embedder` in fp32), temb is then cast to `dtype`."""
  dim: int
  freq_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, timesteps, text):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    sinusoids = timestep_embedding(timesteps, self.freq_dim, flip_sin_to_cos=True, freq_shift=0)
    temb = TimestepEmbedding(self.dim, name="time_embedder", dtype=jnp.float32,
                             param_dtype=self.param_dtype)(sinusoids).astype(self.dtype)
    temb_proj = nn.Dense(6 * self.dim, name="time_proj", **kw)(nn.silu(temb))
    text = TextEmbedder(self.dim, name="text_embedder", **kw)(text)
    return temb, temb_proj, text


class TextEmbedder(nn.Module):
  """diffusers `PixArtAlphaTextProjection(act_fn="gelu_tanh")`: linear_1, tanh GELU, linear_2."""
  dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.gelu(nn.Dense(self.dim, name="linear_1", **kw)(x), approximate=True)
    return nn.Dense(self.dim, name="linear_2", **kw)(h)


class WanTransformer3DModel(nn.Module):
  """Flax port of diffusers' `WanTransformer3DModel` (Wan2.1 text-to-video), channels-last.

  Attributes:
    config: the architecture.
    dtype: compute dtype (activations); param_dtype: dtype of freshly initialised params.
    attention_implementation: "auto" | "xla" | "cudnn" (`attention.dot_product_attention`).
    remat: wrap each block in `nn.remat` (gradient checkpointing).
  """
  config: WanConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_implementation: str = "auto"
  remat: bool = False

  @nn.compact
  def __call__(self, latents, timesteps, encoder_hidden_states):
    """The velocity of the flow.

    Args:
      latents: (B, F, H, W, in_channels) video latents; F, H, W multiples of patch_size and
        the patch grid at most rope_max_seq_len along each axis.
      timesteps: (B,) or scalar float, the scheduler's timesteps (1000 * sigma; diffusers'
        `timestep`).
      encoder_hidden_states: (B, L, text_dim) text tokens (UMT5-XXL for Wan2.1).

    Returns:
      (B, F, H, W, out_channels) float32 (diffusers' (B, C, F, H, W) output, channels-last).
    """
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if latents.ndim != 5 or latents.shape[-1] != cfg.in_channels:
      raise ValueError(f"Wan: latents {latents.shape} must be (B, F, H, W, "
                       f"{cfg.in_channels}) (channels-last)")
    b, f, hgt, wid, c = latents.shape
    pt, ph, pw = cfg.patch_size
    if f % pt or hgt % ph or wid % pw:
      raise ValueError(f"Wan: latent size {f}x{hgt}x{wid} (frames x height x width) must be "
                       f"divisible by patch_size {list(cfg.patch_size)}")
    gf, gh, gw = f // pt, hgt // ph, wid // pw
    cos, sin = wan_rope_tables(cfg, gf, gh, gw)
    rope = (jnp.asarray(cos), jnp.asarray(sin))

    # 1. patches: (B, gf, gh, gw, pt * ph * pw * C), channels minor
    x = latents.astype(self.dtype).reshape(b, gf, pt, gh, ph, gw, pw, c)
    x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7).reshape(b, gf * gh * gw, pt * ph * pw * c)
    x = nn.Dense(cfg.inner_dim, name="patch_embedding", **kw)(x)

    # 2. conditioning
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (b,))
    temb, temb_proj, context = WanConditionEmbedder(
        cfg.inner_dim, cfg.freq_dim, name="condition_embedder", **kw)(
            timesteps, encoder_hidden_states.astype(self.dtype))
    temb_proj = temb_proj.reshape(b, 6, cfg.inner_dim)

    # 3. blocks
    block = nn.remat(WanTransformerBlock) if self.remat else WanTransformerBlock
    for i in range(cfg.num_layers):
      x = block(cfg.inner_dim, cfg.ffn_dim, cfg.num_attention_heads,
                cross_attn_norm=cfg.cross_attn_norm, eps=cfg.eps,
                attention_implementation=self.attention_implementation,
                name=f"blocks_{i}", **kw)(x, context, temb_proj, rope)

    # 4. output norm (shift, scale), projection, unpatchify
    table = _modulation_table(self, 2, cfg.inner_dim, self.param_dtype)
    mod = table.astype(jnp.float32) + temb.astype(jnp.float32)[:, None]
    shift, scale = mod[:, 0:1], mod[:, 1:2]
    x = (_layer_norm(cfg.eps, name="norm_out")(x.astype(jnp.float32)) * (1 + scale)
         + shift).astype(self.dtype)
    x = nn.Dense(pt * ph * pw * cfg.output_channels, name="proj_out", **kw)(x)
    x = x.reshape(b, gf, gh, gw, pt, ph, pw, cfg.output_channels)
    x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, f, hgt, wid, cfg.output_channels)
    return x.astype(jnp.float32)


# ================================================================================================
# Parameters.
# ================================================================================================
def abstract_wan_params(config: WanConfig, dtype: Dtype = jnp.float32) -> dict:
  """The parameter tree as `jax.ShapeDtypeStruct`s (no allocation, no compilation)."""
  model = WanTransformer3DModel(config, param_dtype=dtype)
  inputs = (np.zeros((1,) + config.patch_size + (config.in_channels,), np.float32),
            np.zeros((1,), np.float32), np.zeros((1, 1, config.text_dim), np.float32))
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)
  return jax.eval_shape(lambda k: model.init(k, *inputs), key)["params"]


def init_wan_params(config: WanConfig, key: jax.Array, dtype: Dtype = jnp.float32) -> dict:
  """Randomly initialised parameters (drawn on the host by `weights.host_random_params`; the
  modulation tables come out zero there, RMS/LayerNorm scales one)."""
  return weights.host_random_params(abstract_wan_params(config), key, dtype)


def _patch_weight_shape(config: WanConfig) -> tuple[int, ...]:
  return (config.inner_dim, config.in_channels) + config.patch_size


class _PatchWeightAsDense(Mapping):
  """A read-only view of a state dict in which `patch_embedding.weight` (Conv3d, (D, C, t, h,
  w)) reads as a Linear weight (D, t * h * w * C) (the other tensors pass through, still read
  one at a time from a lazy state dict)."""

  def __init__(self, state_dict, config: WanConfig, source: str):
    self._state, self._config, self._source = state_dict, config, source

  def __getitem__(self, key):
    value = self._state[key]
    if key != PATCH_KEY:
      return value
    value = np.asarray(value)
    want = _patch_weight_shape(self._config)
    if value.shape != want:
      raise weights.WeightLoadingError(
          f"{self._source}: shape mismatch for 1 keys: {PATCH_KEY}: checkpoint "
          f"{tuple(value.shape)}, model expects {want} (PyTorch Conv3d layout)")
    return value.transpose(0, 2, 3, 4, 1).reshape(want[0], -1)

  def __iter__(self) -> Iterator[str]:
    return iter(self._state.keys())

  def __len__(self) -> int:
    return len(self._state)


def wan_from_torch(state_dict, config: WanConfig, source: str = "<state dict>",
                   dtype: Dtype = jnp.float32, placement=None) -> dict:
  """diffusers WanTransformer3DModel state dict (NumPy arrays) -> Flax params in `dtype`.

  Raises:
    weights.WeightLoadingError: missing/unexpected keys (an I2V checkpoint's `add_k_proj`,
      `image_embedder` among them) or a shape mismatch (names `source`).
  """
  return weights.torch_to_flax(_PatchWeightAsDense(state_dict, config, source),
                               abstract_wan_params(config), WAN_LIST_NAMES, source=source,
                               dtype=dtype, placement=placement)


def wan_to_torch(params, config: WanConfig) -> dict[str, np.ndarray]:
  """Flax params -> diffusers state dict (float32 NumPy arrays, PyTorch layout)."""
  out = weights.flax_to_torch(params, WAN_LIST_NAMES)
  d, c, pt, ph, pw = _patch_weight_shape(config)
  out[PATCH_KEY] = np.ascontiguousarray(
      out[PATCH_KEY].reshape(d, pt, ph, pw, c).transpose(0, 4, 1, 2, 3))
  return out
