"""Stable Diffusion 3 / 3.5 MMDiT (diffusers `SD3Transformer2DModel`) in Flax, NHWC.

The denoiser of SD3-Medium, SD3.5-Medium and SD3.5-Large: the latents are cut into
`patch_size` x `patch_size` patches (a strided convolution) plus a fixed 2-D sin-cos position
embedding cropped from a `pos_embed_max_size` grid; the text tokens are projected by
`context_embedder`; `num_layers` joint blocks attend over the concatenation of image and text
tokens, each stream with its own projections and adaLN-Zero modulation from
`temb = timestep embedding + MLP(pooled text)`; the last block updates only the image stream.
SD3.5 adds RMS-normalised queries and keys (`qk_norm="rms_norm"`) and, in the Medium model,
a second image-only attention in the first `dual_attention_layers` blocks (SD3.5's
`SD35AdaLayerNormZeroX`). The output is the flow-matching velocity, unpatchified to
(B, H, W, out_channels).

Submodules carry diffusers' names (`transformer_blocks_0/attn/add_q_proj`, `ff/net_0/proj`),
so `weights.torch_to_flax` maps a diffusers state dict with `MMDIT_LIST_NAMES`. The position
embedding is diffusers' persistent buffer `pos_embed.pos_embed`; here it is computed
(`sincos_pos_embed`, not a parameter), checked against the checkpoint's on load and written on
save.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddpo_jax.models import weights
from ddpo_jax.models.attention import dot_product_attention
from ddpo_jax.models.config_io import config_from_dict, config_to_dict
from ddpo_jax.models.conv import conv_general_dilated
from ddpo_jax.models.norms import RMSNorm, plain_layer_norm
from ddpo_jax.models.unet import TimestepEmbedding, timestep_embedding

Dtype = Any

MMDIT_LIST_NAMES = frozenset({"transformer_blocks", "to_out", "net"})
POS_EMBED_KEY = "pos_embed.pos_embed"  # diffusers' persistent buffer
QK_NORMS = (None, "rms_norm")


@dataclasses.dataclass(frozen=True)
class MMDiTConfig:
  """diffusers `SD3Transformer2DModel` configuration (the field names of its config.json)."""
  sample_size: int = 128
  patch_size: int = 2
  in_channels: int = 16
  num_layers: int = 18
  attention_head_dim: int = 64
  num_attention_heads: int = 18
  joint_attention_dim: int = 4096
  caption_projection_dim: int = 1152
  pooled_projection_dim: int = 2048
  out_channels: int = 16
  pos_embed_max_size: int = 96
  dual_attention_layers: tuple[int, ...] = ()
  qk_norm: str | None = None

  def __post_init__(self):
    object.__setattr__(self, "dual_attention_layers", tuple(self.dual_attention_layers))
    if self.qk_norm not in QK_NORMS:
      raise ValueError(f"MMDiT config: unsupported qk_norm={self.qk_norm!r} (supported: "
                       f"{', '.join(repr(q) for q in QK_NORMS)})")
    if self.caption_projection_dim != self.inner_dim:
      raise ValueError(f"MMDiT config: caption_projection_dim={self.caption_projection_dim} must "
                       f"equal num_attention_heads x attention_head_dim = {self.inner_dim} (the "
                       "text stream joins the image stream's attention)")
    bad = [i for i in self.dual_attention_layers if not 0 <= i < self.num_layers]
    if bad:
      raise ValueError(f"MMDiT config: dual_attention_layers {bad} outside the "
                       f"{self.num_layers} layers")

  @property
  def inner_dim(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  @classmethod
  def from_dict(cls, d: dict) -> "MMDiTConfig":
    """From a diffusers transformer/config.json dict (bookkeeping keys ignored, unknown keys
    ignored with a warning)."""
    return config_from_dict(cls, d, "SD3Transformer2DModel", "MMDiT")

  def to_dict(self) -> dict:
    return config_to_dict(self, "SD3Transformer2DModel")


def sincos_pos_embed(embed_dim: int, grid_size: int, base_size: int,
                     interpolation_scale: float = 1.0, rows: slice = slice(None),
                     cols: slice = slice(None)) -> np.ndarray:
  """diffusers `get_2d_sincos_pos_embed` of a grid_size x grid_size grid, or of its window
  `rows` x `cols`: (h, w, embed_dim) float32; the first half of the features encodes the column
  (w), the second the row (h), each as sin then cos (computed in float64, as diffusers)."""
  if embed_dim % 4:
    raise ValueError(f"sin-cos position embedding: embed_dim {embed_dim} is not a multiple of 4")
  coords = np.arange(grid_size, dtype=np.float32) / (grid_size / base_size) / interpolation_scale
  omega = 1.0 / 10000 ** (np.arange(embed_dim // 4, dtype=np.float64) / (embed_dim / 4.0))

  def one_axis(pos):  # (n,) -> (n, embed_dim / 2)
    out = np.outer(pos.astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1).astype(np.float32)

  emb_w, emb_h = one_axis(coords[cols]), one_axis(coords[rows])
  h, w = len(emb_h), len(emb_w)
  return np.concatenate([np.broadcast_to(emb_w[None], (h, w, embed_dim // 2)),
                         np.broadcast_to(emb_h[:, None], (h, w, embed_dim // 2))], axis=-1)


class FeedForward(nn.Module):
  """diffusers `FeedForward(activation_fn="gelu-approximate")`: net.0.proj, tanh GELU, net.2."""
  dim: int
  mult: int = 4
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.gelu(_Proj(self.dim * self.mult, name="net_0", **kw)(x), approximate=True)
    return nn.Dense(self.dim, name="net_2", **kw)(h)


class _Proj(nn.Module):
  """A Dense under `NAME/proj` (diffusers' `GELU.proj`, `FeedForward.net.0.proj`)."""
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.features, name="proj", dtype=self.dtype, param_dtype=self.param_dtype)(x)


class JointAttention(nn.Module):
  """diffusers `Attention` with `JointAttnProcessor2_0`: image queries/keys/values (`to_q`...)
  and, given `context`, text ones (`add_q_proj`...), attended jointly; returns (image out,
  text out or None). `context_pre_only`: no text output projection (the last block)."""
  heads: int
  dim_head: int
  qk_norm: str | None = None
  context_pre_only: bool = False
  attention_implementation: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    inner = self.heads * self.dim_head
    project = functools.partial(qkv_projections, heads=self.heads, dim_head=self.dim_head,
                                rms_norm=self.qk_norm == "rms_norm", **kw)
    q, k, v = project(x, ("to_q", "to_k", "to_v"), ("norm_q", "norm_k"))
    n_img = x.shape[1]
    if context is not None:
      cq, ck, cv = project(context, ("add_q_proj", "add_k_proj", "add_v_proj"),
                           ("norm_added_q", "norm_added_k"))
      q, k, v = (jnp.concatenate(pair, axis=1) for pair in ((q, cq), (k, ck), (v, cv)))
    out = dot_product_attention(q, k, v, implementation=self.attention_implementation)
    out = out.reshape(out.shape[0], out.shape[1], inner)
    img, txt = out[:, :n_img], out[:, n_img:]
    img = nn.Dense(x.shape[-1], name="to_out_0", **kw)(img)
    if context is None:
      return img, None
    if self.context_pre_only:
      return img, txt
    return img, nn.Dense(context.shape[-1], name="to_add_out", **kw)(txt)


class JointTransformerBlock(nn.Module):
  """diffusers `JointTransformerBlock`: (image (B,N,D), text (B,M,D), temb (B,D)) ->
  (image, text or None when `context_pre_only`)."""
  dim: int
  heads: int
  dim_head: int
  context_pre_only: bool = False
  qk_norm: str | None = None
  dual_attention: bool = False
  attention_implementation: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context, temb):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    akw = dict(heads=self.heads, dim_head=self.dim_head, qk_norm=self.qk_norm,
               attention_implementation=self.attention_implementation, **kw)
    act = nn.silu(temb)
    # norm1: adaLN-Zero of the image stream (SD3.5's X variant: 9 chunks, a second modulation
    # of the same normalised input for attn2).
    n_mod = 9 if self.dual_attention else 6
    mod = jnp.split(ModulationLinear(n_mod * self.dim, name="norm1", **kw)(act), n_mod, axis=-1)
    normed = plain_layer_norm()(x)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod[:6]
    h = normed * (1 + scale_msa[:, None]) + shift_msa[:, None]
    if self.context_pre_only:  # AdaLayerNormContinuous: (scale, shift)
      c_mod = ModulationLinear(2 * self.dim, name="norm1_context", **kw)(act)
      c_scale, c_shift = jnp.split(c_mod, 2, axis=-1)
      c_h = plain_layer_norm()(context) * (1 + c_scale[:, None]) + c_shift[:, None]
    else:
      c_mod = jnp.split(ModulationLinear(6 * self.dim, name="norm1_context", **kw)(act), 6, axis=-1)
      c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = c_mod
      c_h = plain_layer_norm()(context) * (1 + c_scale_msa[:, None]) + c_shift_msa[:, None]

    attn, c_attn = JointAttention(context_pre_only=self.context_pre_only, name="attn", **akw)(
        h, c_h)
    x = x + gate_msa[:, None] * attn
    if self.dual_attention:
      shift_msa2, scale_msa2, gate_msa2 = mod[6:]
      h2 = normed * (1 + scale_msa2[:, None]) + shift_msa2[:, None]
      attn2, _ = JointAttention(name="attn2", **akw)(h2)
      x = x + gate_msa2[:, None] * attn2
    h = plain_layer_norm()(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    x = x + gate_mlp[:, None] * FeedForward(self.dim, name="ff", **kw)(h)
    if self.context_pre_only:
      return x, None
    context = context + c_gate_msa[:, None] * c_attn
    c_h = plain_layer_norm()(context) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
    context = context + c_gate_mlp[:, None] * FeedForward(self.dim, name="ff_context", **kw)(c_h)
    return x, context


class ModulationLinear(nn.Module):
  """A Dense under `NAME/linear` (diffusers' AdaLayerNorm*.linear)."""
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.features, name="linear", dtype=self.dtype,
                    param_dtype=self.param_dtype)(x)


class SD3Transformer2DModel(nn.Module):
  """Flax port of diffusers' `SD3Transformer2DModel` (SD3 / SD3.5), NHWC.

  Attributes:
    config: the architecture.
    dtype: compute dtype (activations); param_dtype: dtype of freshly initialised params.
    attention_implementation: "auto" | "xla" | "cudnn" (`attention.dot_product_attention`).
    remat: wrap each joint block in `nn.remat` (gradient checkpointing).
  """
  config: MMDiTConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_implementation: str = "auto"
  remat: bool = False

  @nn.compact
  def __call__(self, sample, timesteps, encoder_hidden_states, pooled_projections):
    """The velocity of the flow.

    Args:
      sample: (B, H, W, in_channels) latents; H, W multiples of patch_size, at most
        patch_size * pos_embed_max_size.
      timesteps: (B,) or scalar float, the scheduler's timesteps (sigma * 1000).
      encoder_hidden_states: (B, M, joint_attention_dim) text tokens (CLIP-L/G + T5).
      pooled_projections: (B, pooled_projection_dim) pooled CLIP embeddings.

    Returns:
      (B, H, W, out_channels) in `dtype`.
    """
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, hgt, wid, _ = sample.shape
    p = cfg.patch_size
    if hgt % p or wid % p:
      raise ValueError(f"MMDiT: sample size {hgt}x{wid} must be divisible by patch_size {p}")
    gh, gw = hgt // p, wid // p
    if max(gh, gw) > cfg.pos_embed_max_size:
      raise ValueError(f"MMDiT: sample size {hgt}x{wid} needs a {gh}x{gw} patch grid; "
                       f"pos_embed_max_size is {cfg.pos_embed_max_size}")

    # 1. patches + cropped position embedding
    x = _PatchConv(cfg.inner_dim, p, name="pos_embed", **kw)(sample.astype(self.dtype))
    x = x.reshape(b, gh * gw, cfg.inner_dim)
    top, left = (cfg.pos_embed_max_size - gh) // 2, (cfg.pos_embed_max_size - gw) // 2
    pos = sincos_pos_embed(cfg.inner_dim, cfg.pos_embed_max_size, base_size=cfg.sample_size // p,
                           rows=slice(top, top + gh), cols=slice(left, left + gw))  # the crop
    x = x + jnp.asarray(pos.reshape(1, gh * gw, cfg.inner_dim), self.dtype)

    # 2. conditioning: temb = timestep MLP + pooled-text MLP
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (b,))
    temb = TimeTextEmbedding(cfg.inner_dim, name="time_text_embed", **kw)(
        timesteps, None, pooled_projections.astype(self.dtype))
    context = nn.Dense(cfg.caption_projection_dim, name="context_embedder", **kw)(
        encoder_hidden_states.astype(self.dtype))

    # 3. joint blocks
    block = nn.remat(JointTransformerBlock) if self.remat else JointTransformerBlock
    for i in range(cfg.num_layers):
      x, context = block(
          cfg.inner_dim, cfg.num_attention_heads, cfg.attention_head_dim,
          context_pre_only=i == cfg.num_layers - 1, qk_norm=cfg.qk_norm,
          dual_attention=i in cfg.dual_attention_layers,
          attention_implementation=self.attention_implementation,
          name=f"transformer_blocks_{i}", **kw)(x, context, temb)

    # 4. out: AdaLayerNormContinuous, projection, unpatchify
    out_mod = ModulationLinear(2 * cfg.inner_dim, name="norm_out", **kw)(nn.silu(temb))
    scale, shift = jnp.split(out_mod, 2, axis=-1)
    x = plain_layer_norm()(x) * (1 + scale[:, None]) + shift[:, None]
    x = nn.Dense(p * p * cfg.out_channels, name="proj_out", **kw)(x)
    x = x.reshape(b, gh, gw, p, p, cfg.out_channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, hgt, wid, cfg.out_channels)


class _PatchConv(nn.Module):
  """diffusers `PatchEmbed.proj`: a patch x patch convolution of stride patch, under
  `pos_embed/proj`. (B,H,W,C) -> (B,H/p,W/p,D)."""
  features: int
  patch: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return nn.Conv(self.features, (self.patch, self.patch), strides=(self.patch, self.patch),
                   padding="VALID", name="proj", dtype=self.dtype, param_dtype=self.param_dtype,
                   conv_general_dilated=conv_general_dilated)(x)


class TimeTextEmbedding(nn.Module):
  """diffusers `CombinedTimestepTextProjEmbeddings` (SD3) and, with `guidance`,
  `CombinedTimestepGuidanceTextProjEmbeddings` (FLUX.1-dev): timestep_embedder(sinusoids(t))
  [+ guidance_embedder(sinusoids(g))] + text_embedder(pooled). `timesteps`, `guidance`: (B,)
  float, already scaled to the model's 0..1000 range."""
  dim: int
  guidance: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, timesteps, guidance, pooled):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    sinusoids = lambda t: timestep_embedding(t, 256, flip_sin_to_cos=True,  # noqa: E731
                                             freq_shift=0).astype(self.dtype)
    temb = TimestepEmbedding(self.dim, name="timestep_embedder", **kw)(sinusoids(timesteps))
    if self.guidance:
      temb = temb + TimestepEmbedding(self.dim, name="guidance_embedder", **kw)(
          sinusoids(guidance))
    return temb + TextProjection(self.dim, name="text_embedder", **kw)(pooled)


def qkv_projections(inputs, names, norm_names, heads: int, dim_head: int, rms_norm: bool, **kw):
  """The q, k, v Denses `names` of `inputs` (B, N, D), each reshaped to (B, N, heads,
  dim_head), with RMS-normalised q and k (`norm_names`) if `rms_norm`; created in the CALLING
  module's scope, so both the MMDiT's and FLUX's attention keep diffusers' flat names. `kw`:
  dtype / param_dtype."""
  b, n, _ = inputs.shape
  q, k, v = (nn.Dense(heads * dim_head, name=name, **kw)(inputs).reshape(b, n, heads, dim_head)
             for name in names)
  if rms_norm:
    q = RMSNorm(name=norm_names[0], param_dtype=kw["param_dtype"])(q)
    k = RMSNorm(name=norm_names[1], param_dtype=kw["param_dtype"])(k)
  return q, k, v


class TextProjection(nn.Module):
  dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.Dense(self.dim, name="linear_1", **kw)(x)
    return nn.Dense(self.dim, name="linear_2", **kw)(nn.silu(x))


# ================================================================================================
# Parameters.
# ================================================================================================
def abstract_mmdit_params(config: MMDiTConfig, dtype: Dtype = jnp.float32) -> dict:
  """The parameter tree as `jax.ShapeDtypeStruct`s (no allocation, no compilation)."""
  model = SD3Transformer2DModel(config, param_dtype=dtype)
  p = config.patch_size
  inputs = (np.zeros((1, p, p, config.in_channels), np.float32), np.zeros((1,), np.float32),
            np.zeros((1, 1, config.joint_attention_dim), np.float32),
            np.zeros((1, config.pooled_projection_dim), np.float32))
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)
  return jax.eval_shape(lambda k: model.init(k, *inputs), key)["params"]


def init_mmdit_params(config: MMDiTConfig, key: jax.Array, dtype: Dtype = jnp.float32) -> dict:
  """Randomly initialised parameters (Flax default initialiser distributions, drawn on the host
  by `weights.host_random_params`; RMSNorm scales are ones)."""
  return weights.host_random_params(abstract_mmdit_params(config), key, dtype)


# Max abs difference accepted between a checkpoint's pos_embed buffer (values in [-1, 1]) and
# the computed one: half a bfloat16 ulp at 1 (float16 checkpoints round by <= 2^-11).
POS_EMBED_TOLERANCE = 2.0 ** -8


def _pos_embed_buffer(config: MMDiTConfig) -> np.ndarray:
  """diffusers' `pos_embed.pos_embed` buffer: (1, pos_embed_max_size**2, inner_dim) float32."""
  grid = sincos_pos_embed(config.inner_dim, config.pos_embed_max_size,
                          base_size=config.sample_size // config.patch_size)
  return grid.reshape(1, -1, config.inner_dim)


def mmdit_from_torch(state_dict, config: MMDiTConfig, source: str = "<state dict>",
                     dtype: Dtype = jnp.float32, placement=None) -> dict:
  """diffusers SD3Transformer2DModel state dict (NumPy arrays) -> Flax params in `dtype`.

  The position-embedding buffer, if present, must equal `sincos_pos_embed` of the config to
  POS_EMBED_TOLERANCE (the rounding of a bfloat16 / float16 checkpoint, or of a cast on read;
  an embedding of another size or base differs by O(1)): it is not a parameter here.

  Raises:
    weights.WeightLoadingError: missing/unexpected keys, a shape mismatch, or a position
      embedding that differs from the config's (names `source`).
  """
  if POS_EMBED_KEY in state_dict:
    buffer = np.asarray(state_dict[POS_EMBED_KEY], np.float32)
    want = _pos_embed_buffer(config)
    if buffer.shape != want.shape or float(np.abs(buffer - want).max()) > POS_EMBED_TOLERANCE:
      raise weights.WeightLoadingError(
          f"{source}: {POS_EMBED_KEY} {buffer.shape} is not the sin-cos embedding of the config "
          f"(pos_embed_max_size {config.pos_embed_max_size}, base size "
          f"{config.sample_size // config.patch_size}): this port computes it and cannot load "
          "a different one")
  return weights.torch_to_flax(state_dict, abstract_mmdit_params(config), MMDIT_LIST_NAMES,
                               ignore=(r"^pos_embed\.pos_embed$",), source=source, dtype=dtype, placement=placement)


def mmdit_to_torch(params, config: MMDiTConfig) -> dict[str, np.ndarray]:
  """Flax params -> diffusers state dict (float32 NumPy arrays, PyTorch layout), with the
  position-embedding buffer."""
  out = weights.flax_to_torch(params, MMDIT_LIST_NAMES)
  out[POS_EMBED_KEY] = _pos_embed_buffer(config)
  return out

