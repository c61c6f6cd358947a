"""Wan 2.1's video VAE (diffusers `AutoencoderKLWan`) in Flax, channels-last video (B, F, H, W, C).

Encoding maps F = 4k+1 frames in [-1, 1] to F' = 1 + (F-1)/4 latent frames of H/8 x W/8 (the
default Wan 2.1 configuration); decoding maps F' latent frames back to 1 + 4(F'-1) frames.

Causality and diffusers' chunked feature cache. diffusers encodes the first frame alone, then
chunks of 4 frames, and decodes one latent frame at a time, carrying for every causal
convolution the last 2 frames of its input across chunks (`feat_cache`). Here each layer runs
once over the full sequence, which gives the same numbers:
  * `WanCausalConv3d` (time kernel 3, 2 zero frames in front): the cache holds exactly the 2
    input frames a full-sequence causal convolution would see before the chunk (1 real frame
    and 1 zero frame after a 1-frame first chunk), so chunked == full sequence.
  * encoder "downsample3d": the first chunk (1 frame) is passed through without the temporal
    convolution; every later chunk (2 or 4 frames, always even) is convolved (kernel 3,
    stride 2, no padding) together with the previous chunk's last frame. Over the full sequence
    that is: frame 0 unchanged, then the stride-2 valid convolution of frames 0.. (windows
    [0,1,2], [2,3,4], ...).
  * decoder "upsample3d": the first chunk (latent frame 0) is passed through (the cache becomes
    "Rep"), the second gets zero padding, later ones the cached frames: frame 0 unchanged, then
    a causal convolution (2 zero frames in front) over frames 1.. only, each output frame split
    into 2 frames (channels [0:C] then [C:2C]).
  * norms (RMS over channels) and attention (per frame, over H*W) act frame by frame.
The parity tests (tests/test_wan_vae.py) compare with diffusers' chunked encode/decode.

Latent normalisation: the Wan pipelines decode `latents * latents_std + latents_mean`
(`denormalize_latents`) and encode videos to `(mean - latents_mean) / latents_std`
(`normalize_latents`); `encode`/`decode` themselves work in the raw latent space.

Inference only: `dropout` is accepted and not applied (diffusers in eval mode). Wan 2.2's
residual VAE (`is_residual`), patchified inputs (`patch_size`), encoder attention
(`attn_scales`, which diffusers 0.42's encoder cannot run either) and temporal patterns other
than exactly 2 downsamplings are refused.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ddpo_jax.models import weights
from ddpo_jax.models.config_io import config_from_dict, config_to_dict
from ddpo_jax.models.conv import conv_general_dilated
from ddpo_jax.models.unet import _tuple

Dtype = Any

WAN_VAE_LIST_NAMES = frozenset({"down_blocks", "up_blocks", "resnets", "attentions",
                                "upsamplers", "resample"})

_WAN21_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                       0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
_WAN21_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                      3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


@dataclasses.dataclass(frozen=True)
class WanVAEConfig:
  """diffusers `AutoencoderKLWan` configuration (the field names of its config.json)."""
  base_dim: int = 96
  decoder_base_dim: int | None = None
  z_dim: int = 16
  dim_mult: tuple[int, ...] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  attn_scales: tuple[float, ...] = ()
  temperal_downsample: tuple[bool, ...] = (False, True, True)
  dropout: float = 0.0
  latents_mean: tuple[float, ...] = _WAN21_LATENTS_MEAN
  latents_std: tuple[float, ...] = _WAN21_LATENTS_STD
  is_residual: bool = False
  in_channels: int = 3
  out_channels: int = 3
  patch_size: int | None = None
  scale_factor_temporal: int | None = 4
  scale_factor_spatial: int | None = 8

  def __post_init__(self):
    for f in dataclasses.fields(self):
      object.__setattr__(self, f.name, _tuple(getattr(self, f.name)))
    object.__setattr__(self, "temperal_downsample",
                       tuple(bool(t) for t in self.temperal_downsample))
    object.__setattr__(self, "attn_scales", tuple(float(s) for s in self.attn_scales))
    if self.is_residual:
      raise ValueError("Wan VAE config: unsupported is_residual=True (Wan 2.2's residual VAE); "
                       "only the Wan 2.1 VAE (is_residual=False) is implemented")
    if self.patch_size is not None:
      raise ValueError(f"Wan VAE config: unsupported patch_size={self.patch_size!r} (only None)")
    if not self.dim_mult:
      raise ValueError("Wan VAE config: dim_mult must not be empty")
    if len(self.temperal_downsample) != len(self.dim_mult) - 1:
      raise ValueError(
          f"Wan VAE config: temperal_downsample has {len(self.temperal_downsample)} entries, "
          f"expected len(dim_mult) - 1 = {len(self.dim_mult) - 1} (one per downsampling level)")
    if sum(self.temperal_downsample) != 2:
      raise ValueError(
          f"Wan VAE config: unsupported temperal_downsample={list(self.temperal_downsample)}: "
          "exactly 2 temporal downsamplings are supported (diffusers encodes chunks of 4 frames)")
    if self.attn_scales:
      raise ValueError(f"Wan VAE config: unsupported attn_scales={list(self.attn_scales)} (only []; "
                       "diffusers' encoder cannot run attention in its down blocks either)")
    if self.num_res_blocks < 1:
      raise ValueError(f"Wan VAE config: num_res_blocks={self.num_res_blocks} must be >= 1")
    for name in ("latents_mean", "latents_std"):
      value = getattr(self, name)
      if value is None or len(value) != self.z_dim:
        raise ValueError(f"Wan VAE config: {name} must have z_dim={self.z_dim} entries, got "
                         f"{None if value is None else len(value)}")

  @classmethod
  def from_dict(cls, d: dict) -> "WanVAEConfig":
    """From a diffusers config.json dict; bookkeeping keys ignored, unknown keys warned about."""
    return config_from_dict(cls, d, "AutoencoderKLWan", "Wan VAE")

  def to_dict(self) -> dict:
    return config_to_dict(self, "AutoencoderKLWan")

  @property
  def spatial_factor(self) -> int:
    return 2 ** (len(self.dim_mult) - 1)

  @property
  def temporal_factor(self) -> int:
    return 2 ** sum(self.temperal_downsample)

  def latent_frames(self, frames: int) -> int:
    """Latent frames of a `frames`-frame video (ValueError unless frames = 4k+1)."""
    t = self.temporal_factor
    if frames < 1 or (frames - 1) % t:
      raise ValueError(f"Wan VAE: a video must have {t}k+1 frames (1, {1 + t}, {1 + 2 * t}, ...), "
                       f"got {frames}")
    return 1 + (frames - 1) // t


# ================================================================================================
# Layers.
# ================================================================================================
class CausalConv3d(nn.Module):
  """diffusers `WanCausalConv3d` over a full sequence, (B, F, H, W, Cin) -> (B, F', H, W, out).

  Zero padding: 2*pad_t frames in front (none behind), pad_s pixels on every spatial side.
  Kernel (kt, kh, kw, Cin, out)."""
  features: int
  kernel: tuple[int, int, int] = (3, 3, 3)
  pad: tuple[int, int] = (1, 1)  # (time, space) as diffusers' `padding`
  stride_t: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    cin = x.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (*self.kernel, cin, self.features), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
    x = x.astype(self.dtype)
    kernel = kernel.astype(self.dtype)
    pt, ps = self.pad
    if self.kernel == (1, 1, 1):
      y = jnp.einsum("bfhwc,co->bfhwo", x, kernel[0, 0, 0])
    elif self.kernel[1:] == (1, 1):  # temporal only: a 2-D convolution over (F, H*W)
      b, f, h, w, _ = x.shape
      y = conv_general_dilated(x.reshape(b, f, h * w, cin), kernel[:, 0],
                               (self.stride_t, 1), ((2 * pt, 0), (0, 0)),
                               dimension_numbers=("NHWC", "HWIO", "NHWC"))
      y = y.reshape(b, y.shape[1], h, w, self.features)
    else:
      y = lax.conv_general_dilated(x, kernel, (self.stride_t, 1, 1),
                                   ((2 * pt, 0), (ps, ps), (ps, ps)),
                                   dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    return y + bias.astype(self.dtype)


class WanRMSNorm(nn.Module):
  """diffusers `WanRMS_norm` (no bias): x / max(||x||_2, 1e-12) * sqrt(C) * gamma over the
  channel axis (last), in float32, returned in `dtype`. Parameter `gamma` (C,)."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    gamma = self.param("gamma", nn.initializers.ones, (c,), self.param_dtype)
    x32 = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True))
    y = x32 / jnp.maximum(norm, 1e-12) * np.float32(c ** 0.5) * gamma.astype(jnp.float32)
    return y.astype(self.dtype)


class WanResidualBlock(nn.Module):
  """diffusers `WanResidualBlock`: RMS norm, SiLU, causal 3x3x3 conv, twice; 1x1x1 shortcut when
  the channel count changes."""
  out_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if x.shape[-1] != self.out_dim:
      h = CausalConv3d(self.out_dim, (1, 1, 1), (0, 0), name="conv_shortcut", **kw)(x)
    else:
      h = x.astype(self.dtype)
    x = nn.silu(WanRMSNorm(name="norm1", **kw)(x))
    x = CausalConv3d(self.out_dim, name="conv1", **kw)(x)
    x = nn.silu(WanRMSNorm(name="norm2", **kw)(x))
    x = CausalConv3d(self.out_dim, name="conv2", **kw)(x)
    return x + h


class WanAttentionBlock(nn.Module):
  """diffusers `WanAttentionBlock`: per-frame single-head self-attention over H*W (RMS norm,
  1x1 conv to q/k/v, 1x1 conv projection, residual)."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, f, h, w, c = x.shape
    y = WanRMSNorm(name="norm", **kw)(x.reshape(b * f, h, w, c))
    qkv = nn.Conv(3 * c, (1, 1), name="to_qkv", **kw)(y).reshape(b * f, h * w, 3 * c)
    q, k, v = jnp.split(qkv, 3, axis=-1)
    logits = jnp.einsum("nqc,nkc->nqk", q, k).astype(jnp.float32) / np.float32(c ** 0.5)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("nqk,nkc->nqc", probs, v).reshape(b * f, h, w, c)
    out = nn.Conv(c, (1, 1), name="proj", **kw)(out)
    return x.astype(self.dtype) + out.reshape(b, f, h, w, c)


def _per_frame_conv(x, conv):
  b, f = x.shape[:2]
  y = conv(x.reshape(b * f, *x.shape[2:]))
  return y.reshape(b, f, *y.shape[1:])


class WanResample(nn.Module):
  """diffusers `WanResample` over a full sequence (see the module docstring for the time axis).

  Parameters: `resample_1` (the 2-D 3x3 convolution), `time_conv` (3d modes)."""
  dim: int
  mode: str
  upsample_out_dim: int | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, f, h, w, c = x.shape
    if self.mode == "upsample3d":
      y = CausalConv3d(2 * self.dim, (3, 1, 1), (1, 0), name="time_conv", **kw)(x[:, 1:]) \
          if f > 1 else None
      x = x[:, :1].astype(self.dtype)
      if y is not None:  # (B, F-1, H, W, 2C): channels [0:C] the first frame, [C:2C] the second
        y = y.reshape(b, f - 1, h, w, 2, c).transpose(0, 1, 4, 2, 3, 5)
        x = jnp.concatenate([x, y.reshape(b, 2 * (f - 1), h, w, c)], axis=1)
    if self.mode in ("upsample2d", "upsample3d"):
      out = self.upsample_out_dim or self.dim // 2
      x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)  # nearest(-exact), factor 2
      conv = nn.Conv(out, (3, 3), padding=((1, 1), (1, 1)), name="resample_1",
                     conv_general_dilated=conv_general_dilated, **kw)
      return _per_frame_conv(x.astype(self.dtype), conv)
    if self.mode in ("downsample2d", "downsample3d"):
      conv = nn.Conv(self.dim, (3, 3), strides=(2, 2), padding=((0, 1), (0, 1)),
                     name="resample_1", conv_general_dilated=conv_general_dilated, **kw)
      x = _per_frame_conv(x.astype(self.dtype), conv)
      if self.mode == "downsample3d":
        time_conv = CausalConv3d(self.dim, (3, 1, 1), (0, 0), stride_t=2, name="time_conv", **kw)
        if x.shape[1] >= 3:
          x = jnp.concatenate([x[:, :1], time_conv(x)], axis=1)
        elif self.is_initializing():
          time_conv(jnp.zeros((b, 3, *x.shape[2:]), x.dtype))
      return x
    raise ValueError(f"WanResample: unknown mode {self.mode!r}")


class WanMidBlock(nn.Module):
  """diffusers `WanMidBlock` (one layer): residual, attention, residual."""
  dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = WanResidualBlock(self.dim, name="resnets_0", **kw)(x)
    x = WanAttentionBlock(name="attentions_0", **kw)(x)
    return WanResidualBlock(self.dim, name="resnets_1", **kw)(x)


class WanEncoder3d(nn.Module):
  """diffusers `WanEncoder3d`: video (B, F, H, W, in) -> moments (B, F', H/s, W/s, 2*z_dim)."""
  config: WanVAEConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    dims = [cfg.base_dim * u for u in (1,) + cfg.dim_mult]
    x = CausalConv3d(dims[0], name="conv_in", **kw)(x)
    j = 0  # diffusers' down_blocks is one flat list of residual blocks and resamplers
    for i, out_dim in enumerate(dims[1:]):
      for _ in range(cfg.num_res_blocks):
        x = WanResidualBlock(out_dim, name=f"down_blocks_{j}", **kw)(x)
        j += 1
      if i != len(cfg.dim_mult) - 1:
        mode = "downsample3d" if cfg.temperal_downsample[i] else "downsample2d"
        x = WanResample(out_dim, mode, name=f"down_blocks_{j}", **kw)(x)
        j += 1
    x = WanMidBlock(dims[-1], name="mid_block", **kw)(x)
    x = nn.silu(WanRMSNorm(name="norm_out", **kw)(x))
    return CausalConv3d(2 * cfg.z_dim, name="conv_out", **kw)(x)


class WanUpBlock(nn.Module):
  """diffusers `WanUpBlock`: num_res_blocks + 1 residual blocks, then an optional upsampler."""
  out_dim: int
  num_res_blocks: int
  upsample_mode: str | None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for i in range(self.num_res_blocks + 1):
      x = WanResidualBlock(self.out_dim, name=f"resnets_{i}", **kw)(x)
    if self.upsample_mode is not None:
      x = WanResample(self.out_dim, self.upsample_mode, name="upsamplers_0", **kw)(x)
    return x


class WanDecoder3d(nn.Module):
  """diffusers `WanDecoder3d`: latents (B, F', h, w, z_dim) -> (B, 1+4(F'-1), h*s, w*s, out)
  (unclamped)."""
  config: WanVAEConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    base = cfg.decoder_base_dim or cfg.base_dim
    dims = [base * u for u in (cfg.dim_mult[-1],) + cfg.dim_mult[::-1]]
    temperal_upsample = cfg.temperal_downsample[::-1]
    x = CausalConv3d(dims[0], name="conv_in", **kw)(x)
    x = WanMidBlock(dims[0], name="mid_block", **kw)(x)
    for i, out_dim in enumerate(dims[1:]):
      mode = None
      if i != len(cfg.dim_mult) - 1:
        mode = "upsample3d" if temperal_upsample[i] else "upsample2d"
      x = WanUpBlock(out_dim, cfg.num_res_blocks, mode, name=f"up_blocks_{i}", **kw)(x)
    x = nn.silu(WanRMSNorm(name="norm_out", **kw)(x))
    return CausalConv3d(cfg.out_channels, name="conv_out", **kw)(x)


class AutoencoderKLWan(nn.Module):
  """Flax port of diffusers' `AutoencoderKLWan` (Wan 2.1), channels-last video.

  Methods (use `module.apply({'params': p}, x, method=AutoencoderKLWan.encode)`):
    encode(video (B, F, H, W, in_channels) in [-1, 1], F = 4k+1) -> (mean, logvar), each
      (B, 1 + (F-1)/4, H/8, W/8, z_dim), raw latent space; logvar clipped to [-30, 20] like
      diffusers' `DiagonalGaussianDistribution`. ValueError for other F.
    decode(latents (B, F', h, w, z_dim), raw) -> video (B, 1 + 4(F'-1), 8h, 8w, out_channels),
      clamped to [-1, 1] like diffusers.
  (8 = 2 ** (len(dim_mult) - 1), 4 = 2 ** 2.) `__call__` encodes and decodes the mean.
  """
  config: WanVAEConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    z = self.config.z_dim
    self.encoder = WanEncoder3d(self.config, **kw)
    self.quant_conv = CausalConv3d(2 * z, (1, 1, 1), (0, 0), **kw)
    self.post_quant_conv = CausalConv3d(z, (1, 1, 1), (0, 0), **kw)
    self.decoder = WanDecoder3d(self.config, **kw)

  def encode(self, video):
    if video.ndim != 5:
      raise ValueError(f"Wan VAE encode: expected video (B, F, H, W, C), got shape {video.shape}")
    self.config.latent_frames(video.shape[1])
    s = self.config.spatial_factor
    if video.shape[2] % s or video.shape[3] % s:
      raise ValueError(f"Wan VAE encode: height and width must be multiples of {s}, "
                       f"got {video.shape[2:4]}")
    moments = self.quant_conv(self.encoder(video.astype(self.dtype)))
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, latents):
    if latents.ndim != 5:
      raise ValueError(f"Wan VAE decode: expected latents (B, F, h, w, z), got {latents.shape}")
    out = self.decoder(self.post_quant_conv(latents.astype(self.dtype)))
    return jnp.clip(out, -1.0, 1.0)

  def __call__(self, video):
    mean, _ = self.encode(video)
    return self.decode(mean)


def encode_video(params, config: WanVAEConfig, video, dtype: Dtype = jnp.float32):
  """Posterior mean (B, F', H/8, W/8, z_dim), raw latent space, of `video` (B, F, H, W, 3)."""
  model = AutoencoderKLWan(config, dtype=dtype)
  return model.apply({"params": params}, video, method=AutoencoderKLWan.encode)[0]


def decode_latents(params, config: WanVAEConfig, latents, dtype: Dtype = jnp.float32):
  """Video (B, F, H, W, 3) in [-1, 1] of raw latents (B, F', h, w, z_dim)."""
  model = AutoencoderKLWan(config, dtype=dtype)
  return model.apply({"params": params}, latents, method=AutoencoderKLWan.decode)


def normalize_latents(config: WanVAEConfig, raw):
  """Raw latents -> the diffusion model's latent space: (raw - latents_mean) / latents_std."""
  mean = jnp.asarray(config.latents_mean, jnp.float32)
  std = jnp.asarray(config.latents_std, jnp.float32)
  return ((raw.astype(jnp.float32) - mean) / std).astype(raw.dtype)


def denormalize_latents(config: WanVAEConfig, latents):
  """The diffusion model's latents -> raw latents for `decode`: latents * std + mean (as the
  diffusers Wan pipelines do before `vae.decode`)."""
  mean = jnp.asarray(config.latents_mean, jnp.float32)
  std = jnp.asarray(config.latents_std, jnp.float32)
  return (latents.astype(jnp.float32) * std + mean).astype(latents.dtype)


# ================================================================================================
# Parameters.
# ================================================================================================
def _dummy_video(config: WanVAEConfig):
  s = config.spatial_factor
  return jnp.zeros((1, 1 + config.temporal_factor, s, s, config.in_channels), jnp.float32)


def abstract_wan_vae_params(config: WanVAEConfig, dtype: Dtype = jnp.float32) -> dict:
  """The parameter tree as `jax.ShapeDtypeStruct`s (no allocation, no compilation)."""
  model = AutoencoderKLWan(config, param_dtype=dtype)
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)
  return jax.eval_shape(lambda k: model.init(k, _dummy_video(config)), key)["params"]


def init_wan_vae_params(config: WanVAEConfig, key: jax.Array, dtype: Dtype = jnp.float32) -> dict:
  """Randomly initialised parameters (`weights.host_random_params`, no compilation). The RMS
  norms' `gamma` start at 0 there (not a `scale`); use for shapes/smoke tests only."""
  return weights.host_random_params(abstract_wan_vae_params(config), key, dtype)


def _is_attention_gamma(key: str) -> bool:
  return key.endswith(".norm.gamma")  # WanAttentionBlock's norm (3-D in diffusers)


class _TorchLayoutView(Mapping):
  """A read-on-access view of a diffusers state dict with the Wan-specific layouts made
  generic: 5-D Conv3d weights (O, I, kt, kh, kw) -> (kt, kh, kw, I, O), norm gammas (C,1,1[,1])
  -> (C,). Anything else (and a gamma with non-unit trailing dims) is passed through so that
  `weights.torch_to_flax` reports it."""

  def __init__(self, state_dict):
    self._sd = state_dict

  def __getitem__(self, key):
    value = np.asarray(self._sd[key])
    if key.endswith(".weight") and value.ndim == 5:
      return value.transpose(2, 3, 4, 1, 0)
    if key.endswith(".gamma") and value.ndim > 1 and all(d == 1 for d in value.shape[1:]):
      return value.reshape(value.shape[0])
    return value

  def __iter__(self):
    return iter(self._sd.keys())

  def __len__(self):
    return len(self._sd)

  def keys(self):
    return self._sd.keys()


def wan_vae_from_torch(state_dict, config: WanVAEConfig, source: str = "<state dict>",
                       dtype: Dtype = jnp.float32, placement=None) -> dict:
  """diffusers AutoencoderKLWan state dict (NumPy arrays) -> Flax params in `dtype`.

  Shapes of Conv3d weights are reported in the Flax layout (kt, kh, kw, in, out).

  Raises:
    weights.WeightLoadingError: missing/unexpected keys or shape mismatch (names `source`).
  """
  return weights.torch_to_flax(_TorchLayoutView(state_dict), abstract_wan_vae_params(config),
                               WAN_VAE_LIST_NAMES, source=source, dtype=dtype,
                               placement=placement)


def wan_vae_to_torch(params, config: WanVAEConfig | None = None) -> dict[str, np.ndarray]:
  """Flax params -> diffusers AutoencoderKLWan state dict (float32 NumPy)."""
  del config
  out = weights.flax_to_torch(params, WAN_VAE_LIST_NAMES)
  for key, value in out.items():
    if key.endswith(".weight") and value.ndim == 5:
      out[key] = np.ascontiguousarray(value.transpose(4, 3, 0, 1, 2))
    elif key.endswith(".gamma"):
      out[key] = value.reshape(value.shape[0], *((1, 1) if _is_attention_gamma(key) else (1, 1, 1)))
  return out
