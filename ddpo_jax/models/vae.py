"""Stable-Diffusion-compatible KL autoencoder (diffusers `AutoencoderKL`) in Flax, NHWC.

`AutoencoderKL.encode` returns the posterior (mean, logvar) in the RAW latent space and `decode`
takes raw latents: the `scaling_factor` (0.18215 for SD) is applied by the caller (see
`pipeline.Pipeline.vae_encode` / `vae_decode`, which work in the diffusion latent space).

Legacy checkpoints (diffusers < 0.14 conversions found on the Hub) name the mid-block attention
`query` / `key` / `value` / `proj_attn` and may store them as 1x1 convolutions; both load.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddpo_jax.models import weights
from ddpo_jax.models.config_io import config_from_dict, config_to_dict
from ddpo_jax.models.unet import (Downsample2D, ResnetBlock2D, Upsample2D, _conv, _group_norm,
                                  _tuple, attention_projections)

Dtype = Any

VAE_LIST_NAMES = frozenset({"down_blocks", "up_blocks", "resnets", "attentions", "downsamplers",
                            "upsamplers", "to_out"})

# Legacy attention names (diffusers' deprecated `AttentionBlock`) -> current names.
VAE_LEGACY_RENAMES = (
    (r"\.query\.", ".to_q."),
    (r"\.key\.", ".to_k."),
    (r"\.value\.", ".to_v."),
    (r"\.proj_attn\.", ".to_out.0."),
)



@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """diffusers `AutoencoderKL` configuration (the field names of its config.json)."""
  in_channels: int = 3
  out_channels: int = 3
  down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
  up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
  block_out_channels: tuple[int, ...] = (64,)
  layers_per_block: int = 1
  act_fn: str = "silu"
  latent_channels: int = 4
  norm_num_groups: int = 32
  sample_size: int | tuple[int, int] = 32
  scaling_factor: float = 0.18215
  shift_factor: float | None = None
  latents_mean: tuple[float, ...] | None = None
  latents_std: tuple[float, ...] | None = None
  force_upcast: bool = True
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True

  def __post_init__(self):
    for f in dataclasses.fields(self):
      object.__setattr__(self, f.name, _tuple(getattr(self, f.name)))
    for i, t in enumerate(self.down_block_types):
      if t != "DownEncoderBlock2D":
        raise ValueError(f"VAE config: unknown block type down_block_types[{i}]={t!r} "
                         "(supported: DownEncoderBlock2D)")
    for i, t in enumerate(self.up_block_types):
      if t != "UpDecoderBlock2D":
        raise ValueError(f"VAE config: unknown block type up_block_types[{i}]={t!r} "
                         "(supported: UpDecoderBlock2D)")
    n = len(self.block_out_channels)
    if len(self.down_block_types) != n or len(self.up_block_types) != n:
      raise ValueError("VAE config: down_block_types, up_block_types and block_out_channels "
                       "must have the same length")
    if self.act_fn not in ("silu", "swish"):
      raise ValueError(f"VAE config: unsupported act_fn={self.act_fn!r} (only 'silu')")
    if self.latents_mean is not None or self.latents_std is not None:
      raise ValueError("VAE config: unsupported latents_mean/latents_std (only None)")

  @classmethod
  def from_dict(cls, d: dict) -> "VAEConfig":
    """From a diffusers config.json dict; bookkeeping keys ignored, unknown keys warned about."""
    return config_from_dict(cls, d, "AutoencoderKL", "VAE")

  def to_dict(self) -> dict:
    return config_to_dict(self, "AutoencoderKL")

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)


class VAEAttention(nn.Module):
  """diffusers `Attention` as used by the VAE mid block: GroupNorm, single-head self-attention
  over H*W with biased q/k/v, residual connection. (B,H,W,C) -> (B,H,W,C)."""
  groups: int
  eps: float = 1e-6
  attention_implementation: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, h, w, c = x.shape
    y = _group_norm(self.groups, self.eps, "group_norm", **kw)(x).reshape(b, h * w, c)
    out = attention_projections(y, y, 1, c, True, self.attention_implementation, **kw)
    return x + out.reshape(b, h, w, c)


class VAEMidBlock(nn.Module):
  """diffusers `UNetMidBlock2D` (no time embedding): resnet, attention, resnet."""
  channels: int
  groups: int
  add_attention: bool = True
  attention_implementation: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    rkw = dict(groups=self.groups, eps=1e-6, use_temb=False, **kw)
    x = ResnetBlock2D(self.channels, name="resnets_0", **rkw)(x)
    if self.add_attention:
      x = VAEAttention(self.groups, attention_implementation=self.attention_implementation,
                       name="attentions_0", **kw)(x)
    return ResnetBlock2D(self.channels, name="resnets_1", **rkw)(x)


class Encoder(nn.Module):
  """diffusers VAE `Encoder`: images (B,H,W,in) -> (B,H/f,W/f,2*latent) moments."""
  config: VAEConfig
  attention_implementation: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    rkw = dict(groups=cfg.norm_num_groups, eps=1e-6, use_temb=False, **kw)
    n = len(cfg.block_out_channels)
    x = _conv(cfg.block_out_channels[0], "conv_in", **kw)(x)
    for i, ch in enumerate(cfg.block_out_channels):
      block = DownEncoderBlock2D(ch, cfg.layers_per_block, i < n - 1, rkw, name=f"down_blocks_{i}")
      x = block(x)
    x = VAEMidBlock(cfg.block_out_channels[-1], cfg.norm_num_groups,
                    add_attention=cfg.mid_block_add_attention,
                    attention_implementation=self.attention_implementation, name="mid_block",
                    **kw)(x)
    x = nn.silu(_group_norm(cfg.norm_num_groups, 1e-6, "conv_norm_out", **kw)(x))
    return _conv(2 * cfg.latent_channels, "conv_out", **kw)(x)


class DownEncoderBlock2D(nn.Module):
  out_channels: int
  num_layers: int
  add_downsample: bool
  resnet_kwargs: Any

  @nn.compact
  def __call__(self, x):
    rkw = dict(self.resnet_kwargs)
    for i in range(self.num_layers):
      x = ResnetBlock2D(self.out_channels, name=f"resnets_{i}", **rkw)(x)
    if self.add_downsample:
      x = Downsample2D(self.out_channels, padding=0, dtype=rkw["dtype"],
                       param_dtype=rkw["param_dtype"], name="downsamplers_0")(x)
    return x


class UpDecoderBlock2D(nn.Module):
  out_channels: int
  num_layers: int
  add_upsample: bool
  resnet_kwargs: Any

  @nn.compact
  def __call__(self, x):
    rkw = dict(self.resnet_kwargs)
    for i in range(self.num_layers):
      x = ResnetBlock2D(self.out_channels, name=f"resnets_{i}", **rkw)(x)
    if self.add_upsample:
      x = Upsample2D(self.out_channels, dtype=rkw["dtype"], param_dtype=rkw["param_dtype"],
                     name="upsamplers_0")(x)
    return x


class Decoder(nn.Module):
  """diffusers VAE `Decoder`: raw latents (B,h,w,latent) -> images (B,h*f,w*f,out)."""
  config: VAEConfig
  attention_implementation: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    rkw = dict(groups=cfg.norm_num_groups, eps=1e-6, use_temb=False, **kw)
    n = len(cfg.block_out_channels)
    x = _conv(cfg.block_out_channels[-1], "conv_in", **kw)(z)
    x = VAEMidBlock(cfg.block_out_channels[-1], cfg.norm_num_groups,
                    add_attention=cfg.mid_block_add_attention,
                    attention_implementation=self.attention_implementation, name="mid_block",
                    **kw)(x)
    for i, ch in enumerate(reversed(cfg.block_out_channels)):
      x = UpDecoderBlock2D(ch, cfg.layers_per_block + 1, i < n - 1, rkw,
                           name=f"up_blocks_{i}")(x)
    x = nn.silu(_group_norm(cfg.norm_num_groups, 1e-6, "conv_norm_out", **kw)(x))
    return _conv(cfg.out_channels, "conv_out", **kw)(x)


class AutoencoderKL(nn.Module):
  """Flax port of diffusers' `AutoencoderKL`, NHWC.

  Methods (use `module.apply({'params': p}, x, method=AutoencoderKL.encode)`):
    encode(images (B,H,W,in_channels) in [-1, 1]) -> (mean, logvar), each
      (B, H/f, W/f, latent_channels) in the raw latent space (no scaling_factor); logvar is
      clipped to [-30, 20] like diffusers' `DiagonalGaussianDistribution`.
    decode(latents (B,h,w,latent_channels), raw) -> images (B, h*f, w*f, out_channels), nominally
      in [-1, 1] (not clipped).
  f = 2 ** (len(block_out_channels) - 1). `__call__` encodes and decodes the mean (for init).
  """
  config: VAEConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_implementation: str = "auto"

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    cfg = self.config
    self.encoder = Encoder(cfg, self.attention_implementation, **kw)
    self.decoder = Decoder(cfg, self.attention_implementation, **kw)
    if cfg.use_quant_conv:
      self.quant_conv = _conv(2 * cfg.latent_channels, None, kernel=1, padding=0, **kw)
    if cfg.use_post_quant_conv:
      self.post_quant_conv = _conv(cfg.latent_channels, None, kernel=1, padding=0, **kw)

  def encode(self, images):
    moments = self.encoder(images.astype(self.dtype))
    if self.config.use_quant_conv:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, latents):
    z = latents.astype(self.dtype)
    if self.config.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def __call__(self, images):
    mean, _ = self.encode(images)
    return self.decode(mean)


# ================================================================================================
# Parameters.
# ================================================================================================
def _dummy_images(config: VAEConfig):
  size = config.downsample_factor
  return jnp.zeros((1, size, size, config.in_channels), jnp.float32)


def abstract_vae_params(config: VAEConfig, dtype: Dtype = jnp.float32) -> dict:
  """The parameter tree as `jax.ShapeDtypeStruct`s (no allocation, no compilation)."""
  model = AutoencoderKL(config, param_dtype=dtype)
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)  # not PRNGKey(0): that would run (compile) ops
  return jax.eval_shape(lambda k: model.init(k, _dummy_images(config)), key)["params"]


def init_vae_params(config: VAEConfig, key: jax.Array, dtype: Dtype = jnp.float32) -> dict:
  """Randomly initialised parameters in `dtype` (Flax default initialiser distributions, drawn
  on the host by `weights.host_random_params`: no compilation)."""
  return weights.host_random_params(abstract_vae_params(config), key, dtype)


def vae_from_torch(state_dict, config: VAEConfig, source: str = "<state dict>",
                   dtype: Dtype = jnp.float32, placement=None) -> dict:
  """diffusers AutoencoderKL state dict (NumPy arrays) -> Flax params in `dtype`.

  Accepts the legacy attention names (query/key/value/proj_attn) and 1x1-conv-shaped attention
  weights.

  Raises:
    weights.WeightLoadingError: missing/unexpected keys or shape mismatch (names `source`).
  """
  return weights.torch_to_flax(state_dict, abstract_vae_params(config), VAE_LIST_NAMES,
                               renames=VAE_LEGACY_RENAMES, source=source, dtype=dtype, placement=placement)


def vae_to_torch(params, config: VAEConfig | None = None) -> dict[str, np.ndarray]:
  """Flax params -> diffusers AutoencoderKL state dict (float32 NumPy, current key names)."""
  del config
  return weights.flax_to_torch(params, VAE_LIST_NAMES)
