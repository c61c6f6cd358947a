"""Stable-Diffusion-compatible conditional UNet (diffusers `UNet2DConditionModel`) in Flax.

Layout is NHWC throughout. Submodules carry the names of the diffusers PyTorch modules
(`down_blocks_0/attentions_1/transformer_blocks_0/attn2/to_k`), so `weights.torch_to_flax`
maps a diffusers state dict with the list names in `UNET_LIST_NAMES`.

Supported diffusers configuration: the SD 1.x / SD 2.x and SDXL families (`CrossAttnDownBlock2D`,
`DownBlock2D`, `UNetMidBlock2DCrossAttn`, `UpBlock2D`, `CrossAttnUpBlock2D`), conv-1x1 or linear
transformer projections, per-block head counts, `only_cross_attention`,
`transformer_layers_per_block` as an int, one int per block or one list per block (one int per
layer; then `reverse_transformer_layers_per_block` gives the up blocks' lists, as diffusers
requires), `num_class_embeds` class conditioning, and SDXL's `addition_embed_type="text_time"`
(the pooled text embedding and the six micro-conditioning time ids, `addition_time_embed_dim`
sinusoids each, through `add_embedding` into the time embedding). Anything else
(`class_embed_type`, `resnet_time_scale_shift="scale_shift"`, ...) is rejected by
`UNetConfig.from_dict` with a `ValueError` naming the key.

Dropout (diffusers' `dropout` config key) is not implemented: the model is deterministic, as
diffusers' is in eval mode and in every SD checkpoint (dropout 0).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddpo_jax.models import weights
from ddpo_jax.models.attention import dot_product_attention
from ddpo_jax.models.config_io import config_from_dict, config_to_dict
from ddpo_jax.models.conv import conv_general_dilated
from ddpo_jax.models.group_norm import GroupNorm

Dtype = Any

# diffusers `ModuleList` attribute names; Flax submodule `NAME_I` <-> PyTorch `NAME.I`.
UNET_LIST_NAMES = frozenset({
    "down_blocks", "up_blocks", "resnets", "attentions", "transformer_blocks", "downsamplers",
    "upsamplers", "to_out", "net",
})

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", None)

# diffusers features this port does not implement: key -> allowed value(s).
_UNSUPPORTED_UNLESS = {
    "class_embed_type": (None,),
    "addition_embed_type": (None, "text_time"),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "class_embeddings_concat": (False,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0, 1),
    "cross_attention_norm": (None,),
    "attention_type": ("default",),
    "num_attention_heads": (None,),
    "dual_cross_attention": (False,),
    "act_fn": ("silu", "swish"),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
}


def _tuple(x):
  """Lists (from JSON), nested ones too -> tuples, so that a config is hashable."""
  return tuple(_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """diffusers `UNet2DConditionModel` configuration (the field names of its config.json).

  Note diffusers' naming quirk, replicated here: when `num_attention_heads` is None (always, in
  diffusers <= 0.42 configs), `attention_head_dim` is the NUMBER OF HEADS of every transformer of
  a block (an int or one value per down block); the head dimension is channels // heads.
  """
  sample_size: int | tuple[int, int] | None = None
  in_channels: int = 4
  out_channels: int = 4
  center_input_sample: bool = False
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                       "CrossAttnDownBlock2D", "DownBlock2D")
  mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
  up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                     "CrossAttnUpBlock2D")
  only_cross_attention: bool | tuple[bool, ...] = False
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  layers_per_block: int | tuple[int, ...] = 2
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  dropout: float = 0.0
  act_fn: str = "silu"
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  cross_attention_dim: int | tuple[int, ...] = 1280
  transformer_layers_per_block: int | tuple[int, ...] = 1
  attention_head_dim: int | tuple[int, ...] = 8
  num_attention_heads: int | tuple[int, ...] | None = None
  dual_cross_attention: bool = False
  use_linear_projection: bool = False
  class_embed_type: str | None = None
  addition_embed_type: str | None = None
  addition_time_embed_dim: int | None = None
  num_class_embeds: int | None = None
  upcast_attention: bool = False
  resnet_time_scale_shift: str = "default"
  resnet_skip_time_act: bool = False
  resnet_out_scale_factor: float = 1.0
  time_embedding_type: str = "positional"
  time_embedding_dim: int | None = None
  time_embedding_act_fn: str | None = None
  timestep_post_act: str | None = None
  time_cond_proj_dim: int | None = None
  conv_in_kernel: int = 3
  conv_out_kernel: int = 3
  projection_class_embeddings_input_dim: int | None = None
  attention_type: str = "default"
  class_embeddings_concat: bool = False
  mid_block_only_cross_attention: bool | None = None
  cross_attention_norm: str | None = None
  encoder_hid_dim: int | None = None
  encoder_hid_dim_type: str | None = None
  reverse_transformer_layers_per_block: tuple[tuple[int, ...], ...] | None = None

  def __post_init__(self):
    for f in dataclasses.fields(self):  # lists (from JSON) -> tuples, so the config is hashable
      object.__setattr__(self, f.name, _tuple(getattr(self, f.name)))
    self.validate()

  # ----------------------------------------------------------------------------------------
  def validate(self):
    """Raises ValueError naming the key for unknown block types / unsupported features."""
    for key, allowed in _UNSUPPORTED_UNLESS.items():
      value = getattr(self, key)
      if value not in allowed:
        raise ValueError(f"UNet config: unsupported {key}={value!r} (this port supports only "
                         f"{' or '.join(repr(a) for a in allowed)})")
    for i, t in enumerate(self.down_block_types):
      if t not in DOWN_BLOCK_TYPES:
        raise ValueError(f"UNet config: unknown block type down_block_types[{i}]={t!r} "
                         f"(supported: {', '.join(DOWN_BLOCK_TYPES)})")
    for i, t in enumerate(self.up_block_types):
      if t not in UP_BLOCK_TYPES:
        raise ValueError(f"UNet config: unknown block type up_block_types[{i}]={t!r} "
                         f"(supported: {', '.join(UP_BLOCK_TYPES)})")
    if self.mid_block_type not in MID_BLOCK_TYPES:
      raise ValueError(f"UNet config: unknown block type mid_block_type={self.mid_block_type!r} "
                       f"(supported: 'UNetMidBlock2DCrossAttn' or null)")
    n = len(self.down_block_types)
    if len(self.up_block_types) != n or len(self.block_out_channels) != n:
      raise ValueError("UNet config: down_block_types, up_block_types and block_out_channels "
                       f"must have the same length, got {self.down_block_types}, "
                       f"{self.up_block_types}, {self.block_out_channels}")
    for key in ("only_cross_attention", "attention_head_dim", "cross_attention_dim",
                "layers_per_block", "transformer_layers_per_block"):
      value = getattr(self, key)
      if isinstance(value, tuple) and len(value) != n:
        raise ValueError(f"UNet config: {key}={list(value)} must have one entry per down block "
                         f"({n})")
    down_layers = _as_tuple(self.layers_per_block, n)
    for i, entry in enumerate(_as_tuple(self.transformer_layers_per_block, n)):
      if isinstance(entry, tuple) and len(entry) != down_layers[i]:
        raise ValueError(f"UNet config: transformer_layers_per_block[{i}]={list(entry)} must "
                         f"have one entry per layer of down block {i} ({down_layers[i]})")
    nested = any(isinstance(v, tuple) for v in _as_tuple(self.transformer_layers_per_block, n))
    if nested and self.reverse_transformer_layers_per_block is None:
      raise ValueError("UNet config: transformer_layers_per_block="
                       f"{list(self.transformer_layers_per_block)} has one list per block; "
                       "reverse_transformer_layers_per_block must then give the up blocks' "
                       "lists (diffusers requires it too)")
    reverse = self.reverse_transformer_layers_per_block
    if reverse is not None:
      up_layers = tuple(reversed(_as_tuple(self.layers_per_block, n)))
      if len(reverse) != n:
        raise ValueError(f"UNet config: reverse_transformer_layers_per_block={reverse!r} must "
                         f"have one entry per up block ({n})")
      for i, (entry, num) in enumerate(zip(reverse, up_layers)):
        if isinstance(entry, tuple) and len(entry) != num + 1:
          raise ValueError(f"UNet config: reverse_transformer_layers_per_block[{i}]={entry!r} "
                           f"must have one entry per layer of up block {i} ({num + 1})")
    if self.addition_embed_type == "text_time":
      for key in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
        if getattr(self, key) is None:
          raise ValueError(f"UNet config: addition_embed_type='text_time' needs {key}")
    elif self.projection_class_embeddings_input_dim is not None:
      raise ValueError("UNet config: unsupported projection_class_embeddings_input_dim="
                       f"{self.projection_class_embeddings_input_dim} without "
                       "addition_embed_type='text_time'")
    if self.norm_num_groups is None:
      raise ValueError("UNet config: unsupported norm_num_groups=None")
    if len(set(_as_tuple(self.cross_attention_dim, n))) != 1:
      raise ValueError("UNet config: per-block cross_attention_dim with different values "
                       f"{self.cross_attention_dim!r} is not supported")
    for c, heads in zip(self.block_out_channels, self.heads_per_block):
      if heads is None or heads <= 0 or c % heads:
        raise ValueError(f"UNet config: {c} channels are not divisible into {heads} attention "
                         f"heads (attention_head_dim={self.attention_head_dim!r})")

  # Resolved per-block quantities (diffusers semantics). -------------------------------------
  @property
  def heads_per_block(self) -> tuple[int, ...]:
    """Number of attention heads of each down block (diffusers: num_attention_heads or
    attention_head_dim)."""
    heads = self.num_attention_heads or self.attention_head_dim
    return _as_tuple(heads, len(self.down_block_types))

  @property
  def time_embed_dim(self) -> int:
    return self.time_embedding_dim or self.block_out_channels[0] * 4

  @property
  def context_dim(self) -> int:
    return _as_tuple(self.cross_attention_dim, len(self.down_block_types))[0]

  @property
  def num_upsamplers(self) -> int:
    return len(self.block_out_channels) - 1

  # (De)serialisation. ------------------------------------------------------------------------
  @classmethod
  def from_dict(cls, d: dict) -> "UNetConfig":
    """Builds a config from a diffusers config.json dict.

    Bookkeeping keys (`_class_name`, `_diffusers_version`, ...) are ignored; an unknown key is
    ignored with a warning; unknown block types and unsupported non-default features raise
    ValueError naming the key and value.
    """
    return config_from_dict(cls, d, "UNet2DConditionModel", "UNet")

  def to_dict(self) -> dict:
    """A diffusers-loadable config.json dict."""
    return config_to_dict(self, "UNet2DConditionModel")


def _as_tuple(value, n):
  return tuple(value) if isinstance(value, (list, tuple)) else (value,) * n


# ================================================================================================
# Building blocks (shared with the VAE).
# ================================================================================================
def _conv(features, name, dtype, param_dtype, kernel=3, stride=1, padding=1):
  pad = ((padding, padding), (padding, padding)) if isinstance(padding, int) else padding
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=pad,
                 dtype=dtype, param_dtype=param_dtype, name=name,
                 conv_general_dilated=conv_general_dilated)


def _group_norm(groups, eps, name, dtype, param_dtype):
  return GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name)


class ResnetBlock2D(nn.Module):
  """diffusers `ResnetBlock2D` (pre-norm, "default" time embedding), NHWC.

  `__call__(x (B,H,W,Cin), temb (B,T) or None) -> (B,H,W,out_channels)`.
  """
  out_channels: int
  groups: int = 32
  eps: float = 1e-6
  output_scale_factor: float = 1.0
  use_temb: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = _group_norm(self.groups, self.eps, "norm1", **kw)(x)
    h = nn.silu(h)
    h = _conv(self.out_channels, "conv1", **kw)(h)
    if self.use_temb:
      t = nn.Dense(self.out_channels, name="time_emb_proj", **kw)(nn.silu(temb))
      h = h + t[:, None, None, :]
    h = _group_norm(self.groups, self.eps, "norm2", **kw)(h)
    h = nn.silu(h)
    h = _conv(self.out_channels, "conv2", **kw)(h)
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, "conv_shortcut", kernel=1, padding=0, **kw)(x)
    out = x + h
    if self.output_scale_factor != 1.0:
      out = out / self.output_scale_factor
    return out


class Downsample2D(nn.Module):
  """diffusers `Downsample2D(use_conv=True)`: 3x3 conv, stride 2. padding=0 pads (0,1) on H and W
  first (the VAE encoder). (B,H,W,C) -> (B,H/2,W/2,out_channels)."""
  out_channels: int
  padding: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    pad = self.padding if self.padding else ((0, 1), (0, 1))
    return _conv(self.out_channels, "conv", self.dtype, self.param_dtype, stride=2, padding=pad)(x)


def upsample_nearest2x(x):
  """Nearest-neighbour x2 upsampling, (B,H,W,C) -> (B,2H,2W,C)."""
  b, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
  return x.reshape(b, 2 * h, 2 * w, c)


class Upsample2D(nn.Module):
  """diffusers `Upsample2D(use_conv=True)`: nearest x2 then 3x3 conv."""
  out_channels: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return _conv(self.out_channels, "conv", self.dtype, self.param_dtype)(upsample_nearest2x(x))


class Attention(nn.Module):
  """diffusers `Attention` (q/k/v projections, multi-head SDPA, `to_out.0`).

  `__call__(x (B,Lq,query_dim), context (B,Lk,Dc) or None) -> (B,Lq,query_dim)`; with `context`
  None it is self-attention.
  """
  heads: int
  dim_head: int
  qkv_bias: bool = False
  attention_implementation: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context=None):
    return attention_projections(x, x if context is None else context, self.heads, self.dim_head,
                                 self.qkv_bias, self.attention_implementation,
                                 dtype=self.dtype, param_dtype=self.param_dtype)


def attention_projections(x, context, heads: int, dim_head: int, qkv_bias: bool,
                          attention_implementation: str, **kw):
  """q/k/v projections, multi-head attention and `to_out.0`, created in the CALLING module's
  scope (so the UNet's and the VAE's attention keep diffusers' flat parameter names).

  x: (B, Lq, Dq); context: (B, Lk, Dc) -> (B, Lq, Dq). `kw`: dtype / param_dtype of the Denses.
  """
  inner = heads * dim_head
  b, lq, _ = x.shape
  lk = context.shape[1]
  q = nn.Dense(inner, use_bias=qkv_bias, name="to_q", **kw)(x).reshape(b, lq, heads, dim_head)
  k = nn.Dense(inner, use_bias=qkv_bias, name="to_k", **kw)(context).reshape(b, lk, heads, dim_head)
  v = nn.Dense(inner, use_bias=qkv_bias, name="to_v", **kw)(context).reshape(b, lk, heads, dim_head)
  out = dot_product_attention(q, k, v, implementation=attention_implementation)
  return nn.Dense(x.shape[-1], name="to_out_0", **kw)(out.reshape(b, lq, inner))


class FeedForward(nn.Module):
  """diffusers `FeedForward(activation_fn="geglu")`: net.0 = GEGLU(dim, 4 dim), net.2 = Linear."""
  dim: int
  mult: int = 4
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    inner = self.dim * self.mult
    h = GEGLU(inner, name="net_0", **kw)(x)
    return nn.Dense(self.dim, name="net_2", **kw)(h)


class GEGLU(nn.Module):
  """diffusers `GEGLU`: proj to 2*inner, `hidden * gelu(gate)` (exact erf GELU)."""
  inner: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(2 * self.inner, name="proj", dtype=self.dtype, param_dtype=self.param_dtype)(x)
    h, gate = jnp.split(h, 2, axis=-1)
    return h * nn.gelu(gate, approximate=False)


class BasicTransformerBlock(nn.Module):
  """diffusers `BasicTransformerBlock` (layer_norm, GEGLU). (B,L,dim) -> (B,L,dim)."""
  dim: int
  heads: int
  dim_head: int
  only_cross_attention: bool = False
  attention_implementation: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    akw = dict(heads=self.heads, dim_head=self.dim_head,
               attention_implementation=self.attention_implementation, **kw)
    ln = lambda name: nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name=name, **kw)
    h = ln("norm1")(x)
    x = x + Attention(name="attn1", **akw)(h, context if self.only_cross_attention else None)
    h = ln("norm2")(x)
    x = x + Attention(name="attn2", **akw)(h, context)
    h = ln("norm3")(x)
    return x + FeedForward(self.dim, name="ff", **kw)(h)


class Transformer2DModel(nn.Module):
  """diffusers `Transformer2DModel` (continuous input). (B,H,W,C) -> (B,H,W,C)."""
  heads: int
  dim_head: int
  num_layers: int = 1
  groups: int = 32
  use_linear_projection: bool = False
  only_cross_attention: bool = False
  attention_implementation: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, hgt, wid, c = x.shape
    inner = self.heads * self.dim_head
    residual = x
    h = _group_norm(self.groups, 1e-6, "norm", **kw)(x)
    if self.use_linear_projection:
      h = nn.Dense(inner, name="proj_in", **kw)(h.reshape(b, hgt * wid, c))
    else:
      h = _conv(inner, "proj_in", kernel=1, padding=0, **kw)(h).reshape(b, hgt * wid, inner)
    for i in range(self.num_layers):
      h = BasicTransformerBlock(
          inner, self.heads, self.dim_head, only_cross_attention=self.only_cross_attention,
          attention_implementation=self.attention_implementation, name=f"transformer_blocks_{i}",
          **kw)(h, context)
    if self.use_linear_projection:
      h = nn.Dense(c, name="proj_out", **kw)(h).reshape(b, hgt, wid, c)
    else:
      h = _conv(c, "proj_out", kernel=1, padding=0, **kw)(h.reshape(b, hgt, wid, inner))
    return h + residual


# ================================================================================================
# UNet blocks.
# ================================================================================================
class _BlockBase(nn.Module):
  config: UNetConfig
  out_channels: int
  num_layers: int
  heads: int = 1
  transformer_layers: int | tuple[int, ...] = 1  # per block, or one value per layer
  only_cross_attention: bool = False
  add_sampler: bool = True
  attention_implementation: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _resnet(self, name, out_channels=None):
    cfg = self.config
    return ResnetBlock2D(out_channels or self.out_channels, groups=cfg.norm_num_groups,
                         eps=cfg.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                         name=name)

  def _transformer(self, name, layer: int):
    """The Transformer2DModel of layer `layer` of this block."""
    cfg = self.config
    depth = self.transformer_layers
    return Transformer2DModel(
        self.heads, self.out_channels // self.heads,
        num_layers=depth[layer] if isinstance(depth, tuple) else depth,
        groups=cfg.norm_num_groups, use_linear_projection=cfg.use_linear_projection,
        only_cross_attention=self.only_cross_attention,
        attention_implementation=self.attention_implementation, dtype=self.dtype,
        param_dtype=self.param_dtype, name=name)


class CrossAttnDownBlock2D(_BlockBase):
  """`__call__(x, temb, context) -> (x, skip states tuple)`."""

  @nn.compact
  def __call__(self, x, temb, context):
    states = ()
    for i in range(self.num_layers):
      x = self._resnet(f"resnets_{i}")(x, temb)
      x = self._transformer(f"attentions_{i}", i)(x, context)
      states += (x,)
    if self.add_sampler:
      x = Downsample2D(self.out_channels, padding=self.config.downsample_padding,
                       dtype=self.dtype, param_dtype=self.param_dtype, name="downsamplers_0")(x)
      states += (x,)
    return x, states


class DownBlock2D(_BlockBase):
  """`__call__(x, temb) -> (x, skip states tuple)`."""

  @nn.compact
  def __call__(self, x, temb):
    states = ()
    for i in range(self.num_layers):
      x = self._resnet(f"resnets_{i}")(x, temb)
      states += (x,)
    if self.add_sampler:
      x = Downsample2D(self.out_channels, padding=self.config.downsample_padding,
                       dtype=self.dtype, param_dtype=self.param_dtype, name="downsamplers_0")(x)
      states += (x,)
    return x, states


class UNetMidBlock2DCrossAttn(_BlockBase):
  """resnet, then (transformer, resnet) x num_layers. `__call__(x, temb, context) -> x`."""

  @nn.compact
  def __call__(self, x, temb, context):
    cfg = self.config
    mk = lambda name: ResnetBlock2D(
        self.out_channels, groups=cfg.norm_num_groups, eps=cfg.norm_eps,
        output_scale_factor=cfg.mid_block_scale_factor, dtype=self.dtype,
        param_dtype=self.param_dtype, name=name)
    x = mk("resnets_0")(x, temb)
    for i in range(self.num_layers):
      x = self._transformer(f"attentions_{i}", i)(x, context)
      x = mk(f"resnets_{i + 1}")(x, temb)
    return x


class CrossAttnUpBlock2D(_BlockBase):
  """`__call__(x, skips, temb, context) -> x`; pops `skips` from the end."""

  @nn.compact
  def __call__(self, x, skips, temb, context):
    for i in range(self.num_layers):
      x = jnp.concatenate([x, skips[-1 - i]], axis=-1)
      x = self._resnet(f"resnets_{i}")(x, temb)
      x = self._transformer(f"attentions_{i}", i)(x, context)
    if self.add_sampler:
      x = Upsample2D(self.out_channels, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="upsamplers_0")(x)
    return x


class UpBlock2D(_BlockBase):
  """`__call__(x, skips, temb) -> x`."""

  @nn.compact
  def __call__(self, x, skips, temb):
    for i in range(self.num_layers):
      x = jnp.concatenate([x, skips[-1 - i]], axis=-1)
      x = self._resnet(f"resnets_{i}")(x, temb)
    if self.add_sampler:
      x = Upsample2D(self.out_channels, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="upsamplers_0")(x)
    return x


def timestep_embedding(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool,
                       freq_shift: float, max_period: float = 10000.0) -> jax.Array:
  """diffusers `get_timestep_embedding`: (B,) -> (B, dim) float32 sinusoids."""
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  emb = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  sin, cos = jnp.sin(emb), jnp.cos(emb)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedding(nn.Module):
  """linear_1 -> silu -> linear_2."""
  dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.Dense(self.dim, name="linear_1", **kw)(x)
    return nn.Dense(self.dim, name="linear_2", **kw)(nn.silu(x))


# ================================================================================================
# The UNet.
# ================================================================================================
class UNet2DConditionModel(nn.Module):
  """Flax port of diffusers' `UNet2DConditionModel` (SD 1.x / 2.x and SDXL families), NHWC.

  Attributes:
    config: the architecture.
    dtype: compute dtype (activations), e.g. jnp.bfloat16 for mixed precision.
    param_dtype: dtype of freshly initialised parameters.
    attention_implementation: "auto" | "xla" | "cudnn" (see `attention.dot_product_attention`).
    remat: wrap each down/mid/up block in `nn.remat` (gradient checkpointing).
  """
  config: UNetConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_implementation: str = "auto"
  remat: bool = False

  @nn.compact
  def __call__(self, sample, timesteps, encoder_hidden_states, class_labels=None,
               added_time_emb=None, text_embeds=None, time_ids=None):
    """Predicts the noise.

    Args:
      sample: (B, H, W, in_channels) float; H and W divisible by 2**(num blocks - 1).
      timesteps: (B,) or scalar, int or float.
      encoder_hidden_states: (B, L, cross_attention_dim).
      class_labels: (B,) int, required iff `config.num_class_embeds` is set.
      added_time_emb: optional (B, time_embed_dim) float added to the time embedding after
        the class and SDXL embeddings (CTRL's control embedding, `ddpo_jax.ctrl`); zeros = no
        effect.
      text_embeds: (B, D_pooled) float, the pooled text embedding; required iff
        `config.addition_embed_type == "text_time"` (SDXL: the second text encoder's projection).
      time_ids: (B, K) float, SDXL's micro-conditioning (original height, width, crop top,
        left, target height, width: K = 6, in pixels); required with `text_embeds`.
        D_pooled + K * addition_time_embed_dim must be projection_class_embeddings_input_dim.

    Returns:
      (B, H, W, out_channels) in `dtype`.
    """
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    n = len(cfg.block_out_channels)
    b, hgt, wid, _ = sample.shape
    factor = 2 ** cfg.num_upsamplers
    if hgt % factor or wid % factor:
      raise ValueError(f"UNet: sample size {hgt}x{wid} must be divisible by {factor}")

    sample = sample.astype(self.dtype)
    context = encoder_hidden_states.astype(self.dtype)
    if cfg.center_input_sample:
      sample = 2 * sample - 1.0

    # 1. time (+ class) embedding
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (b,))
    t_emb = timestep_embedding(timesteps, cfg.block_out_channels[0], cfg.flip_sin_to_cos,
                               cfg.freq_shift).astype(self.dtype)
    emb = TimestepEmbedding(cfg.time_embed_dim, name="time_embedding", **kw)(t_emb)
    if cfg.num_class_embeds is not None:
      if class_labels is None:
        raise ValueError("UNet: class_labels are required when num_class_embeds is set")
      class_emb = nn.Embed(cfg.num_class_embeds, cfg.time_embed_dim, name="class_embedding",
                           **kw)(jnp.asarray(class_labels).astype(jnp.int32))
      emb = emb + class_emb.astype(self.dtype)
    if cfg.addition_embed_type == "text_time":
      emb = emb + self._text_time_embedding(text_embeds, time_ids, b)
    elif text_embeds is not None or time_ids is not None:
      raise ValueError("UNet: text_embeds / time_ids are given but the config has "
                       f"addition_embed_type={cfg.addition_embed_type!r}")
    if added_time_emb is not None:
      if added_time_emb.shape != emb.shape:
        raise ValueError(f"UNet: added_time_emb has shape {added_time_emb.shape}; expected "
                         f"{emb.shape} (batch, time_embed_dim)")
      emb = emb + added_time_emb.astype(self.dtype)

    # 2. down
    heads = cfg.heads_per_block
    layers = _as_tuple(cfg.layers_per_block, n)
    t_layers = _as_tuple(cfg.transformer_layers_per_block, n)
    up_t_layers = (cfg.reverse_transformer_layers_per_block
                   or tuple(reversed(t_layers)))
    only_cross = _as_tuple(cfg.only_cross_attention, n)
    bkw = dict(config=cfg, attention_implementation=self.attention_implementation, **kw)
    wrap = nn.remat if self.remat else (lambda c: c)

    x = _conv(cfg.block_out_channels[0], "conv_in", **kw)(sample)
    skips = (x,)
    for i, block_type in enumerate(cfg.down_block_types):
      common = dict(out_channels=cfg.block_out_channels[i], num_layers=layers[i],
                    add_sampler=i < n - 1, name=f"down_blocks_{i}", **bkw)
      if block_type == "CrossAttnDownBlock2D":
        x, states = wrap(CrossAttnDownBlock2D)(
            heads=heads[i], transformer_layers=t_layers[i], only_cross_attention=only_cross[i],
            **common)(x, emb, context)
      else:
        x, states = wrap(DownBlock2D)(**common)(x, emb)
      skips += states

    # 3. mid
    if cfg.mid_block_type == "UNetMidBlock2DCrossAttn":
      x = wrap(UNetMidBlock2DCrossAttn)(
          out_channels=cfg.block_out_channels[-1], num_layers=1, heads=heads[-1],
          transformer_layers=t_layers[-1], name="mid_block", **bkw)(x, emb, context)

    # 4. up
    rev_ch = list(reversed(cfg.block_out_channels))
    for i, block_type in enumerate(cfg.up_block_types):
      num = list(reversed(layers))[i] + 1
      block_skips, skips = skips[-num:], skips[:-num]
      common = dict(out_channels=rev_ch[i], num_layers=num, add_sampler=i < n - 1,
                    name=f"up_blocks_{i}", **bkw)
      if block_type == "CrossAttnUpBlock2D":
        x = wrap(CrossAttnUpBlock2D)(
            heads=list(reversed(heads))[i], transformer_layers=up_t_layers[i],
            only_cross_attention=list(reversed(only_cross))[i], **common)(
                x, block_skips, emb, context)
      else:
        x = wrap(UpBlock2D)(**common)(x, block_skips, emb)

    # 5. out
    x = _group_norm(cfg.norm_num_groups, cfg.norm_eps, "conv_norm_out", **kw)(x)
    x = nn.silu(x)
    return _conv(cfg.out_channels, "conv_out", **kw)(x)

  def _text_time_embedding(self, text_embeds, time_ids, batch):
    """SDXL's `add_embedding(concat(text_embeds, sinusoids(time_ids)))`: (B, time_embed_dim)."""
    cfg = self.config
    if text_embeds is None or time_ids is None:
      raise ValueError("UNet: addition_embed_type='text_time' needs text_embeds (the pooled "
                       "text embedding) and time_ids (SDXL's size and crop conditioning)")
    text_embeds, time_ids = jnp.asarray(text_embeds), jnp.asarray(time_ids)
    width = text_embeds.shape[-1] + time_ids.shape[-1] * cfg.addition_time_embed_dim
    if (text_embeds.shape[0] != batch or time_ids.shape[0] != batch
        or width != cfg.projection_class_embeddings_input_dim):
      raise ValueError(
          f"UNet: text_embeds {text_embeds.shape} and time_ids {time_ids.shape} give "
          f"{width} features per sample ({text_embeds.shape[-1]} + {time_ids.shape[-1]} x "
          f"addition_time_embed_dim {cfg.addition_time_embed_dim}); the config's "
          f"projection_class_embeddings_input_dim is "
          f"{cfg.projection_class_embeddings_input_dim} (batch {batch})")
    time_embeds = timestep_embedding(time_ids.reshape(-1), cfg.addition_time_embed_dim,
                                     cfg.flip_sin_to_cos, cfg.freq_shift).reshape(batch, -1)
    features = jnp.concatenate([text_embeds.astype(jnp.float32), time_embeds], axis=-1)
    return TimestepEmbedding(cfg.time_embed_dim, name="add_embedding", dtype=self.dtype,
                             param_dtype=self.param_dtype)(features.astype(self.dtype))


# ================================================================================================
# Parameters.
# ================================================================================================
def _dummy_inputs(config: UNetConfig, batch: int = 1):
  """Inputs of the smallest shapes, for `init` / `eval_shape`: (sample, t, context, labels,
  None, text_embeds, time_ids). The SDXL inputs only need the right total width."""
  size = 2 ** config.num_upsamplers
  sample = jnp.zeros((batch, size, size, config.in_channels), jnp.float32)
  t = jnp.zeros((batch,), jnp.int32)
  context = jnp.zeros((batch, 1, config.context_dim), jnp.float32)
  labels = jnp.zeros((batch,), jnp.int32) if config.num_class_embeds is not None else None
  text_embeds = time_ids = None
  if config.addition_embed_type == "text_time":
    width = config.projection_class_embeddings_input_dim - config.addition_time_embed_dim
    text_embeds = jnp.zeros((batch, width), jnp.float32)
    time_ids = jnp.zeros((batch, 1), jnp.float32)
  return sample, t, context, labels, None, text_embeds, time_ids


def abstract_unet_params(config: UNetConfig, dtype: Dtype = jnp.float32) -> dict:
  """The parameter tree as `jax.ShapeDtypeStruct`s (no allocation, no compilation)."""
  model = UNet2DConditionModel(config, param_dtype=dtype)
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)  # not PRNGKey(0): that would run (compile) ops
  return jax.eval_shape(lambda k: model.init(k, *_dummy_inputs(config)), key)["params"]


def init_unet_params(config: UNetConfig, key: jax.Array, dtype: Dtype = jnp.float32) -> dict:
  """Randomly initialised parameters in `dtype` (Flax default initialiser distributions, drawn
  on the host by `host_random_params`: no compilation)."""
  return weights.host_random_params(abstract_unet_params(config), key, dtype)


def unet_from_torch(state_dict, config: UNetConfig, source: str = "<state dict>",
                    dtype: Dtype = jnp.float32, placement=None) -> dict:
  """diffusers UNet2DConditionModel state dict (NumPy arrays) -> Flax params in `dtype`.

  Raises:
    weights.WeightLoadingError: missing/unexpected keys or shape mismatch (names `source`).
  """
  return weights.torch_to_flax(state_dict, abstract_unet_params(config), UNET_LIST_NAMES,
                               source=source, dtype=dtype, placement=placement)


def unet_to_torch(params, config: UNetConfig | None = None) -> dict[str, np.ndarray]:
  """Flax params -> diffusers state dict (float32 NumPy arrays, PyTorch layout)."""
  del config  # the mapping only needs the list names
  return weights.flax_to_torch(params, UNET_LIST_NAMES)


def count_params(params) -> int:
  """Number of scalars in a parameter tree (arrays or ShapeDtypeStructs)."""
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))
