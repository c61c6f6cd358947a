"""FLUX.1 transformer (diffusers `FluxTransformer2DModel`, dev and schnell) in Flax.

FLUX works on packed latents: `pack_latents` turns the VAE's (B, H, W, C) latents into
(B, H/2 * W/2, 4C) tokens (2 x 2 patches, channels-major inside a patch, as diffusers'
`FluxPipeline._pack_latents`) and `unpack_latents` reverses it. Every token has 3 position ids
(`image_ids`: (0, row, col); text tokens: zeros), and attention applies a 3-axis rotary
embedding (`axes_dims_rope`, theta 10000). `num_layers` double-stream blocks (separate weights
for the text and the image tokens, joint attention over [text; image], adaLN-Zero from
`temb = timestep MLP [+ guidance MLP for dev] + MLP(pooled CLIP)`) are followed by
`num_single_layers` single-stream blocks over the concatenated tokens (attention and MLP in
parallel, one output projection). The output is the flow-matching velocity per image token.

Submodules carry diffusers' names, so `weights.torch_to_flax` maps the state dict with
`FLUX_LIST_NAMES`. Timesteps and guidance are given in [0, 1] (sigma) and scaled by 1000
inside, as diffusers'.
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
from ddpo_jax.models.mmdit import (FeedForward, ModulationLinear, TimeTextEmbedding,
                                   qkv_projections)
from ddpo_jax.models.norms import plain_layer_norm

Dtype = Any

FLUX_LIST_NAMES = frozenset({"transformer_blocks", "single_transformer_blocks", "to_out", "net"})
ROPE_THETA = 10000.0


@dataclasses.dataclass(frozen=True)
class FluxConfig:
  """diffusers `FluxTransformer2DModel` configuration (the field names of its config.json)."""
  patch_size: int = 1
  in_channels: int = 64
  out_channels: int | None = None
  num_layers: int = 19
  num_single_layers: int = 38
  attention_head_dim: int = 128
  num_attention_heads: int = 24
  joint_attention_dim: int = 4096
  pooled_projection_dim: int = 768
  guidance_embeds: bool = False
  axes_dims_rope: tuple[int, int, int] = (16, 56, 56)

  def __post_init__(self):
    object.__setattr__(self, "axes_dims_rope", tuple(self.axes_dims_rope))
    if self.patch_size != 1:
      raise ValueError(f"FLUX config: unsupported patch_size={self.patch_size} (FLUX.1 packs 2x2 "
                       "patches outside the transformer and uses patch_size 1)")
    if sum(self.axes_dims_rope) != self.attention_head_dim or any(d % 2 for d in
                                                                  self.axes_dims_rope):
      raise ValueError(f"FLUX config: axes_dims_rope={list(self.axes_dims_rope)} must be even "
                       f"and sum to attention_head_dim={self.attention_head_dim}")

  @property
  def inner_dim(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  @property
  def output_channels(self) -> int:
    return self.out_channels or self.in_channels

  @classmethod
  def from_dict(cls, d: dict) -> "FluxConfig":
    return config_from_dict(cls, d, "FluxTransformer2DModel", "FLUX")

  def to_dict(self) -> dict:
    return config_to_dict(self, "FluxTransformer2DModel")


# ------------------------------------------------------------------------------- latents, ids
def pack_latents(latents: jax.Array) -> jax.Array:
  """(B, H, W, C) -> (B, H/2 * W/2, 4C): 2 x 2 patches, row-major over patches, (C, 2, 2)
  inside each token (diffusers' `_pack_latents`)."""
  b, h, w, c = latents.shape
  if h % 2 or w % 2:
    raise ValueError(f"FLUX: latent size {h}x{w} must be even (2x2 packing)")
  x = latents.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4)
  return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: jax.Array, height: int, width: int) -> jax.Array:
  """Inverse of `pack_latents`: (B, H/2 * W/2, 4C) -> (B, H, W, C) for latent size H x W."""
  b, n, c4 = tokens.shape
  c = c4 // 4
  x = tokens.reshape(b, height // 2, width // 2, c, 2, 2).transpose(0, 1, 4, 2, 5, 3)
  return x.reshape(b, height, width, c)


def image_ids(height: int, width: int) -> np.ndarray:
  """(H/2 * W/2, 3) float32 position ids of the packed tokens of an H x W latent: (0, row,
  col) (diffusers' `_prepare_latent_image_ids`)."""
  ids = np.zeros((height // 2, width // 2, 3), np.float32)
  ids[..., 1] = np.arange(height // 2)[:, None]
  ids[..., 2] = np.arange(width // 2)[None, :]
  return ids.reshape(-1, 3)


def rope_tables(ids: np.ndarray, axes_dims: tuple[int, ...],
                theta: float = ROPE_THETA) -> tuple[np.ndarray, np.ndarray]:
  """(cos, sin), each (S, sum(axes_dims)) float32, of positions `ids` (S, n_axes): per axis,
  frequencies theta^(-2i/d) (float64, as diffusers), each repeated twice (interleaved pairs)."""
  ids = np.asarray(ids, np.float64)
  cos, sin = [], []
  for axis, dim in enumerate(axes_dims):
    freqs = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    angles = np.outer(ids[:, axis], freqs)
    cos.append(np.repeat(np.cos(angles), 2, axis=1))
    sin.append(np.repeat(np.sin(angles), 2, axis=1))
  return (np.concatenate(cos, axis=1).astype(np.float32),
          np.concatenate(sin, axis=1).astype(np.float32))


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates interleaved pairs of x (B, S, H, D) by the angles of (cos, sin) (S, D), in float32
  (diffusers' `apply_rotary_emb`, use_real_unbind_dim=-1)."""
  x32 = x.astype(jnp.float32)
  pairs = x32.reshape(x.shape[:-1] + (-1, 2))
  rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
  return (x32 * cos[None, :, None] + rotated * sin[None, :, None]).astype(x.dtype)


# ------------------------------------------------------------------------------------- blocks
class FluxAttention(nn.Module):
  """diffusers `FluxAttention` + `FluxAttnProcessor`: RMS-normalised q/k, the text projections
  (`add_*_proj`) first in the joint sequence, rotary embedding on q and k. With `context`
  returns (image out, text out); without (the single blocks, `pre_only`) the attention output
  before any projection."""
  heads: int
  dim_head: int
  pre_only: bool = False
  attention_implementation: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, rope, context=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    inner = self.heads * self.dim_head
    project = functools.partial(qkv_projections, heads=self.heads, dim_head=self.dim_head,
                                rms_norm=True, **kw)

    q, k, v = project(x, ("to_q", "to_k", "to_v"), ("norm_q", "norm_k"))
    n_txt = 0
    if context is not None:
      n_txt = context.shape[1]
      cq, ck, cv = project(context, ("add_q_proj", "add_k_proj", "add_v_proj"),
                           ("norm_added_q", "norm_added_k"))
      q, k, v = (jnp.concatenate(pair, axis=1) for pair in ((cq, q), (ck, k), (cv, v)))
    cos, sin = rope
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    out = dot_product_attention(q, k, v, implementation=self.attention_implementation)
    out = out.reshape(out.shape[0], out.shape[1], inner)
    if context is None:
      return out
    txt, img = out[:, :n_txt], out[:, n_txt:]
    return (nn.Dense(x.shape[-1], name="to_out_0", **kw)(img),
            nn.Dense(context.shape[-1], name="to_add_out", **kw)(txt))


class FluxTransformerBlock(nn.Module):
  """Double-stream block: (image (B,N,D), text (B,M,D), temb, rope) -> (image, text)."""
  dim: int
  heads: int
  dim_head: int
  attention_implementation: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context, temb, rope):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    act = nn.silu(temb)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(
        ModulationLinear(6 * self.dim, name="norm1", **kw)(act), 6, axis=-1)
    (c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp,
     c_gate_mlp) = jnp.split(ModulationLinear(6 * self.dim, name="norm1_context", **kw)(act), 6,
                             axis=-1)
    h = plain_layer_norm()(x) * (1 + scale_msa[:, None]) + shift_msa[:, None]
    c_h = plain_layer_norm()(context) * (1 + c_scale_msa[:, None]) + c_shift_msa[:, None]
    attn, c_attn = FluxAttention(self.heads, self.dim_head,
                                 attention_implementation=self.attention_implementation,
                                 name="attn", **kw)(h, rope, c_h)
    x = x + gate_msa[:, None] * attn
    h = plain_layer_norm()(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    x = x + gate_mlp[:, None] * FeedForward(self.dim, name="ff", **kw)(h)
    context = context + c_gate_msa[:, None] * c_attn
    c_h = plain_layer_norm()(context) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
    context = context + c_gate_mlp[:, None] * FeedForward(self.dim, name="ff_context", **kw)(c_h)
    return x, context


class FluxSingleTransformerBlock(nn.Module):
  """Single-stream block over [text; image] (B, M+N, D): x + gate * proj_out([attn(h); mlp(h)])
  with h = adaLN(x) (`AdaLayerNormZeroSingle`)."""
  dim: int
  heads: int
  dim_head: int
  mlp_ratio: float = 4.0
  attention_implementation: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb, rope):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    shift, scale, gate = jnp.split(ModulationLinear(3 * self.dim, name="norm", **kw)(
        nn.silu(temb)), 3, axis=-1)
    h = plain_layer_norm()(x) * (1 + scale[:, None]) + shift[:, None]
    mlp = nn.gelu(nn.Dense(int(self.dim * self.mlp_ratio), name="proj_mlp", **kw)(h),
                  approximate=True)
    attn = FluxAttention(self.heads, self.dim_head, pre_only=True,
                         attention_implementation=self.attention_implementation, name="attn",
                         **kw)(h, rope)
    out = nn.Dense(self.dim, name="proj_out", **kw)(jnp.concatenate([attn, mlp], axis=-1))
    return x + gate[:, None] * out


class FluxTransformer2DModel(nn.Module):
  """Flax port of diffusers' `FluxTransformer2DModel`.

  Attributes:
    config: the architecture.
    dtype: compute dtype (activations); param_dtype: dtype of freshly initialised params.
    attention_implementation: "auto" | "xla" | "cudnn" (`attention.dot_product_attention`).
    remat: wrap each block in `nn.remat` (gradient checkpointing).
  """
  config: FluxConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_implementation: str = "auto"
  remat: bool = False

  @nn.compact
  def __call__(self, tokens, encoder_hidden_states, pooled_projections, timesteps, img_ids,
               txt_ids, guidance=None):
    """The velocity of every image token.

    Args:
      tokens: (B, N, in_channels) packed latents (`pack_latents`).
      encoder_hidden_states: (B, M, joint_attention_dim) T5 tokens.
      pooled_projections: (B, pooled_projection_dim) pooled CLIP-L embedding.
      timesteps: (B,) or scalar, in [0, 1] (the scheduler's sigma); scaled by 1000 here.
      img_ids: (N, 3) and txt_ids: (M, 3) position ids, concrete NumPy arrays (they depend only
        on the resolution and the text length: `image_ids`, zeros).
      guidance: (B,) guidance scale, required iff `config.guidance_embeds` (FLUX.1-dev).

    Returns:
      (B, N, out_channels) in `dtype`.
    """
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b = tokens.shape[0]
    if cfg.guidance_embeds and guidance is None:
      raise ValueError("FLUX: this transformer has guidance_embeds (FLUX.1-dev); pass guidance")
    if not cfg.guidance_embeds and guidance is not None:
      raise ValueError("FLUX: guidance given to a transformer without guidance_embeds")
    img_ids, txt_ids = np.asarray(img_ids), np.asarray(txt_ids)
    if img_ids.shape != (tokens.shape[1], 3) or txt_ids.shape != (encoder_hidden_states.shape[1],
                                                                  3):
      raise ValueError(f"FLUX: img_ids {img_ids.shape} / txt_ids {txt_ids.shape} must be "
                       f"({tokens.shape[1]}, 3) / ({encoder_hidden_states.shape[1]}, 3)")
    cos, sin = rope_tables(np.concatenate([txt_ids, img_ids]), cfg.axes_dims_rope)
    rope = (jnp.asarray(cos), jnp.asarray(sin))

    x = nn.Dense(cfg.inner_dim, name="x_embedder", **kw)(tokens.astype(self.dtype))
    t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32) * 1000.0, (b,))
    g = None if guidance is None else jnp.broadcast_to(
        jnp.asarray(guidance, jnp.float32) * 1000.0, (b,))
    temb = TimeTextEmbedding(cfg.inner_dim, cfg.guidance_embeds, name="time_text_embed",
                                  **kw)(t, g, pooled_projections.astype(self.dtype))
    context = nn.Dense(cfg.inner_dim, name="context_embedder", **kw)(
        encoder_hidden_states.astype(self.dtype))

    wrap = nn.remat if self.remat else (lambda c: c)
    bkw = dict(attention_implementation=self.attention_implementation, **kw)
    for i in range(cfg.num_layers):
      x, context = wrap(FluxTransformerBlock)(
          cfg.inner_dim, cfg.num_attention_heads, cfg.attention_head_dim,
          name=f"transformer_blocks_{i}", **bkw)(x, context, temb, rope)
    n_txt = context.shape[1]
    joint = jnp.concatenate([context, x], axis=1)
    for i in range(cfg.num_single_layers):
      joint = wrap(FluxSingleTransformerBlock)(
          cfg.inner_dim, cfg.num_attention_heads, cfg.attention_head_dim,
          name=f"single_transformer_blocks_{i}", **bkw)(joint, temb, rope)
    x = joint[:, n_txt:]
    out_mod = ModulationLinear(2 * cfg.inner_dim, name="norm_out", **kw)(nn.silu(temb))
    scale, shift = jnp.split(out_mod, 2, axis=-1)
    x = plain_layer_norm()(x) * (1 + scale[:, None]) + shift[:, None]
    return nn.Dense(cfg.output_channels, name="proj_out", **kw)(x)


# ================================================================================================
# Parameters.
# ================================================================================================
def abstract_flux_params(config: FluxConfig, dtype: Dtype = jnp.float32) -> dict:
  """The parameter tree as `jax.ShapeDtypeStruct`s (no allocation, no compilation)."""
  model = FluxTransformer2DModel(config, param_dtype=dtype)
  inputs = (np.zeros((1, 1, config.in_channels), np.float32),
            np.zeros((1, 1, config.joint_attention_dim), np.float32),
            np.zeros((1, config.pooled_projection_dim), np.float32), np.zeros((1,), np.float32),
            np.zeros((1, 3), np.float32), np.zeros((1, 3), np.float32),
            np.zeros((1,), np.float32) if config.guidance_embeds else None)
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)
  return jax.eval_shape(lambda k: model.init(k, *inputs), key)["params"]


def init_flux_params(config: FluxConfig, key: jax.Array, dtype: Dtype = jnp.float32) -> dict:
  """Randomly initialised parameters (drawn on the host by `weights.host_random_params`)."""
  return weights.host_random_params(abstract_flux_params(config), key, dtype)


def flux_from_torch(state_dict, config: FluxConfig, source: str = "<state dict>",
                    dtype: Dtype = jnp.float32, placement=None) -> dict:
  """diffusers FluxTransformer2DModel state dict (NumPy arrays) -> Flax params in `dtype`.

  Raises:
    weights.WeightLoadingError: missing/unexpected keys or a shape mismatch (names `source`).
  """
  return weights.torch_to_flax(state_dict, abstract_flux_params(config), FLUX_LIST_NAMES,
                               source=source, dtype=dtype, placement=placement)


def flux_to_torch(params) -> dict[str, np.ndarray]:
  """Flax params -> diffusers state dict (float32 NumPy arrays, PyTorch layout)."""
  return weights.flax_to_torch(params, FLUX_LIST_NAMES)
