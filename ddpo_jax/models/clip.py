"""CLIP text encoder and CLIP vision tower in Flax, loaded from transformers-format checkpoints.

Ports of transformers' `CLIPTextModel` (the Stable Diffusion text encoder),
`CLIPTextModelWithProjection` (SDXL's second text encoder, OpenCLIP ViT-bigG: the same tower
plus `text_projection`; `CLIPTextConfig.with_projection`) and `CLIPVisionModelWithProjection`
(the image tower used by CLIP-based rewards, e.g. the LAION aesthetic predictor on top of
ViT-L/14 image embeddings).

Flax submodules carry the names of the PyTorch modules they port, so the generic mapping of
`ddpo_jax.models.weights` converts state dicts in both directions; the only `ModuleList` is
`encoder.layers` (Flax: `encoder/layers_I`).

Text-encoder key prefix: transformers v5's `CLIPTextModel` has no `text_model` wrapper any more
(its `state_dict()` and `save_pretrained` files use `embeddings.*`, `encoder.*`,
`final_layer_norm.*`), while v4 and all Hub checkpoints (e.g. SD's `text_encoder/`) use
`text_model.embeddings.*`. `clip_text_from_torch` accepts both; `clip_text_to_torch` writes
either (default: whatever the installed transformers uses). The vision tower keeps its
`vision_model.` prefix in both versions.

Parameter trees (the inner dict, `module.apply({'params': params}, ...)`):

  text:   {'embeddings': {'token_embedding', 'position_embedding'},
           'encoder': {'layers_0', ...}, 'final_layer_norm'[, 'text_projection']}
  vision: {'vision_model': {'embeddings': {'class_embedding', 'patch_embedding',
                                            'position_embedding'},
                            'pre_layrnorm', 'encoder': {'layers_0', ...}, 'post_layernorm'},
           'visual_projection'}

Numerics follow transformers v5 (`modeling_clip.py`): pre-LayerNorm encoder layers, attention
scale `head_dim ** -0.5`, causal mask for text, softmax in float32, `quick_gelu`
(x * sigmoid(1.702 x), OpenAI CLIP / SD 1.x) or exact erf `gelu` (OpenCLIP / SD 2.x).

Matmul precision: on GPU/TPU, JAX's default fp32 matmul precision is reduced (TF32 / bf16
passes); wrap calls in `jax.default_matmul_precision("highest")` for bit-faithful fp32 parity.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from ddpo_jax.models.conv import conv_general_dilated
from ddpo_jax.models.weights import WeightLoadingError, flax_to_torch, torch_to_flax

Params = Any
Dtype = Any

LIST_NAMES = frozenset({"layers"})
# `position_ids` is a non-persistent buffer in transformers >= 4.31 (and v5) but is present in
# older checkpoints (e.g. the SD 1.x `text_encoder/model.safetensors`): accept it, never require it.
_BUFFERS = (r"(^|\.)position_ids$",)
# Keys of a full `CLIPModel` checkpoint that the vision tower does not use.
_CLIP_MODEL_TEXT_KEYS = (r"^text_model\.", r"^text_projection\.weight$", r"^logit_scale$")
_CLIP_MODEL_VISION_KEYS = (r"^vision_model\.", r"^visual_projection\.weight$", r"^logit_scale$")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------


def _quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


_ACTIVATIONS: dict[str, Callable] = {
    "quick_gelu": _quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


def _check_common(cls_name: str, hidden_act: str, hidden_size: int, num_heads: int):
  if hidden_act not in _ACTIVATIONS:
    raise ValueError(f"{cls_name}: unsupported hidden_act {hidden_act!r}; "
                     f"supported: {sorted(_ACTIVATIONS)}")
  if hidden_size % num_heads:
    raise ValueError(f"{cls_name}: hidden_size {hidden_size} is not a multiple of "
                     f"num_attention_heads {num_heads}")


def _pick_fields(cls, d: Mapping[str, Any]) -> dict:
  names = {f.name for f in dataclasses.fields(cls)}
  return {k: v for k, v in d.items() if k in names}


def _sub_config(d: Mapping[str, Any], name: str) -> dict:
  """`d[name]` of a `CLIPModel` config, overridden by the legacy `name + '_dict'`."""
  sub = dict(d.get(name) or {})
  sub.update(d.get(name + "_dict") or {})
  return sub


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """Architecture of a CLIP text tower (fields and defaults of transformers' `CLIPTextConfig`).

  The defaults are transformers' (the ViT-B/32 text tower); the SD 1.x text encoder (ViT-L/14)
  has hidden_size 768, intermediate_size 3072, num_attention_heads 12, projection_dim 768. The
  SD 2.x "penultimate layer" choice is expressed by `num_hidden_layers` (diffusers' SD 2
  `text_encoder/config.json` already has 23 of OpenCLIP ViT-H's 24 layers).

  `with_projection` is not a transformers field: it says which class the checkpoint is
  (`architectures: ["CLIPTextModelWithProjection"]`, SDXL's `text_encoder_2`), i.e. whether the
  tower ends in `text_projection` (hidden_size -> projection_dim, no bias).
  """
  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  projection_dim: int = 512
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  pad_token_id: int = 1
  bos_token_id: int = 49406
  eos_token_id: int = 49407
  with_projection: bool = False

  def __post_init__(self):
    _check_common("CLIPTextConfig", self.hidden_act, self.hidden_size, self.num_attention_heads)
    if not isinstance(self.eos_token_id, int):
      raise ValueError(f"CLIPTextConfig: eos_token_id must be one int, got {self.eos_token_id!r}")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "CLIPTextConfig":
    """From a transformers `config.json` dict of a `CLIPTextModel` (or a full `CLIPModel`, whose
    `text_config` is used). Bookkeeping keys (architectures, torch_dtype, dropout, ...) are ignored.

    Raises:
      ValueError: unsupported `hidden_act`, a vision config, or inconsistent sizes.
    """
    d = dict(d)
    if "text_config" in d or d.get("model_type") == "clip":
      d = _sub_config(d, "text_config")
    model_type = d.get("model_type", "clip_text_model")
    if model_type != "clip_text_model":
      raise ValueError(f"CLIPTextConfig.from_dict: model_type {model_type!r} is not "
                       "'clip_text_model'")
    eos = d.get("eos_token_id", cls.eos_token_id)
    if isinstance(eos, (list, tuple)) and len(eos) == 1:
      d["eos_token_id"] = eos[0]
    d["with_projection"] = "CLIPTextModelWithProjection" in (d.get("architectures") or ())
    return cls(**_pick_fields(cls, d))

  def to_dict(self) -> dict:
    """A `config.json` dict that `transformers.CLIPTextModel.from_pretrained` (or
    `CLIPTextModelWithProjection`'s, with `with_projection`) loads."""
    fields = dataclasses.asdict(self)
    del fields["with_projection"]
    architecture = "CLIPTextModelWithProjection" if self.with_projection else "CLIPTextModel"
    return {"architectures": [architecture], "model_type": "clip_text_model", **fields}


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """Architecture of a CLIP vision tower with projection (transformers' `CLIPVisionConfig`).

  Defaults are transformers' (ViT-B/32). ViT-L/14: hidden_size 1024, intermediate_size 4096,
  num_hidden_layers 24, num_attention_heads 16, patch_size 14, projection_dim 768.
  """
  image_size: int = 224
  patch_size: int = 32
  num_channels: int = 3
  hidden_size: int = 768
  intermediate_size: int = 3072
  projection_dim: int = 512
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5

  def __post_init__(self):
    _check_common("CLIPVisionConfig", self.hidden_act, self.hidden_size, self.num_attention_heads)
    for name in ("image_size", "patch_size"):
      if not isinstance(getattr(self, name), int):
        raise ValueError(f"CLIPVisionConfig: {name} must be an int (square), "
                         f"got {getattr(self, name)!r}")
    if self.image_size % self.patch_size:
      raise ValueError(f"CLIPVisionConfig: image_size {self.image_size} is not a multiple of "
                       f"patch_size {self.patch_size}")

  @property
  def num_positions(self) -> int:
    """Number of tokens: patches + the class token."""
    return (self.image_size // self.patch_size) ** 2 + 1

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "CLIPVisionConfig":
    """From a transformers `config.json` dict of a `CLIPVisionModelWithProjection` or of a full
    `CLIPModel` (then `vision_config` is used, overridden by the legacy `vision_config_dict`,
    and `projection_dim` is the top-level one, which sizes `CLIPModel.visual_projection`).
    """
    d = dict(d)
    if "vision_config" in d or d.get("model_type") == "clip":
      projection_dim = d.get("projection_dim", 512)
      d = _sub_config(d, "vision_config")
      d["projection_dim"] = projection_dim
    model_type = d.get("model_type", "clip_vision_model")
    if model_type != "clip_vision_model":
      raise ValueError(f"CLIPVisionConfig.from_dict: model_type {model_type!r} is not "
                       "'clip_vision_model'")
    for name in ("image_size", "patch_size"):
      value = d.get(name)
      if isinstance(value, (list, tuple)) and len(set(value)) == 1:
        d[name] = value[0]
    return cls(**_pick_fields(cls, d))

  def to_dict(self) -> dict:
    """A `config.json` dict loadable by `transformers.CLIPVisionModelWithProjection`."""
    return {"architectures": ["CLIPVisionModelWithProjection"], "model_type": "clip_vision_model",
            **dataclasses.asdict(self)}


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------


class CLIPAttention(nn.Module):
  """Multi-head self-attention: (B, L, D) -> (B, L, D); `mask` (L, L) bool, True = attend."""
  hidden_size: int
  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None):
    b, l, d = x.shape
    head_dim = d // self.num_heads
    dense = lambda name: nn.Dense(self.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                                  name=name)
    split = lambda t: t.reshape(b, l, self.num_heads, head_dim)
    q = split(dense("q_proj")(x))
    k = split(dense("k_proj")(x))
    v = split(dense("v_proj")(x))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * head_dim**-0.5
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, l, d)
    return dense("out_proj")(out)


class CLIPMLP(nn.Module):
  """fc1 -> activation -> fc2: (B, L, D) -> (B, L, D)."""
  hidden_size: int
  intermediate_size: int
  hidden_act: str
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.intermediate_size, dtype=self.dtype, param_dtype=self.param_dtype,
                 name="fc1")(x)
    x = _ACTIVATIONS[self.hidden_act](x)
    return nn.Dense(self.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                    name="fc2")(x)


class CLIPEncoderLayer(nn.Module):
  """Pre-LayerNorm transformer block: x + attn(ln1(x)); x + mlp(ln2(x))."""
  config: Any  # CLIPTextConfig | CLIPVisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None):
    c = self.config
    ln = lambda name: nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype,
                                   param_dtype=self.param_dtype, name=name)
    x = x + CLIPAttention(c.hidden_size, c.num_attention_heads, self.dtype, self.param_dtype,
                          name="self_attn")(ln("layer_norm1")(x), mask)
    x = x + CLIPMLP(c.hidden_size, c.intermediate_size, c.hidden_act, self.dtype,
                    self.param_dtype, name="mlp")(ln("layer_norm2")(x))
    return x


class CLIPEncoder(nn.Module):
  """`num_hidden_layers` encoder layers named `layers_I`: (B, L, D) -> (B, L, D)."""
  config: Any
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None):
    """Returns the output of the last layer and the tuple of hidden states (the input, then
    every layer's output: num_hidden_layers + 1 entries, as transformers' `hidden_states`)."""
    states = (x,)
    for i in range(self.config.num_hidden_layers):
      x = CLIPEncoderLayer(self.config, self.dtype, self.param_dtype, name=f"layers_{i}")(x, mask)
      states += (x,)
    return x, states


_embed_init = nn.initializers.normal(stddev=0.02)


class CLIPTextEmbeddings(nn.Module):
  """Token + absolute position embeddings: (B, L) int -> (B, L, D)."""
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids):
    c = self.config
    tokens = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                      embedding_init=_embed_init, name="token_embedding")(input_ids)
    positions = nn.Embed(c.max_position_embeddings, c.hidden_size, dtype=self.dtype,
                         param_dtype=self.param_dtype, embedding_init=_embed_init,
                         name="position_embedding")(jnp.arange(input_ids.shape[-1]))
    return tokens + positions[None]


class CLIPTextModel(nn.Module):
  """CLIP text encoder (port of transformers' `CLIPTextModel`, and of
  `CLIPTextModelWithProjection` when `config.with_projection`).

  Submodules `embeddings`, `encoder`, `final_layer_norm`, as transformers v5's `CLIPTextModel`
  (v4 and Hub checkpoints nest them in `text_model`; the converters accept both), and
  `text_projection` with `config.with_projection`.

  Attributes:
    config: the architecture.
    dtype: computation dtype (softmax and LayerNorm statistics stay in float32).
    param_dtype: parameter dtype at `init`.

  Call:
    input_ids: (B, L) int32 token ids, L <= max_position_embeddings (77 for SD).
    output_hidden_states: also return every layer's hidden states.

  Returns:
    last_hidden_state: (B, L, hidden_size) `dtype`, after `final_layer_norm` (the SD UNet's
      `encoder_hidden_states`).
    pooled: `last_hidden_state` at the EOS token (argmax of the ids when `eos_token_id == 2`,
      the legacy convention; else the first `eos_token_id`): (B, hidden_size) `dtype`; with
      `config.with_projection` it is projected, (B, projection_dim) (transformers'
      `text_embeds`).
    hidden_states (only with `output_hidden_states`): tuple of num_hidden_layers + 1 arrays
      (B, L, hidden_size), the embeddings and then each layer's output, without the final
      LayerNorm (transformers' `hidden_states`; SDXL takes `[-2]`).
  """
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids, output_hidden_states: bool = False):
    c = self.config
    input_ids = jnp.asarray(input_ids, jnp.int32)
    b, l = input_ids.shape
    if l > c.max_position_embeddings:
      raise ValueError(f"CLIPTextModel: sequence length {l} > max_position_embeddings "
                       f"{c.max_position_embeddings}")
    x = CLIPTextEmbeddings(c, self.dtype, self.param_dtype, name="embeddings")(input_ids)
    causal = jnp.tril(jnp.ones((l, l), dtype=bool))
    x, states = CLIPEncoder(c, self.dtype, self.param_dtype, name="encoder")(x, causal)
    x = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="final_layer_norm")(x)
    if c.eos_token_id == 2:
      # Legacy configs (before transformers PR #24773, e.g. SD 1.x): the EOS token has the
      # highest id in the vocabulary, so take the (first) argmax of the ids.
      eos_index = jnp.argmax(input_ids, axis=-1)
    else:
      # First position equal to eos_token_id (pad may equal eos).
      eos_index = jnp.argmax((input_ids == c.eos_token_id).astype(jnp.int32), axis=-1)
    pooled = x[jnp.arange(b), eos_index]
    if c.with_projection:
      pooled = nn.Dense(c.projection_dim, use_bias=False, dtype=self.dtype,
                        param_dtype=self.param_dtype, name="text_projection")(pooled)
    return (x, pooled, states) if output_hidden_states else (x, pooled)


class CLIPVisionEmbeddings(nn.Module):
  """Class token + patch embeddings (conv, no bias) + positions: (B, H, W, C) -> (B, N + 1, D)."""
  config: CLIPVisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixel_values):
    c = self.config
    b = pixel_values.shape[0]
    class_embedding = self.param("class_embedding", nn.initializers.normal(c.hidden_size**-0.5),
                                 (c.hidden_size,), self.param_dtype)
    patches = nn.Conv(c.hidden_size, (c.patch_size, c.patch_size),
                      strides=(c.patch_size, c.patch_size), padding="VALID", use_bias=False,
                      dtype=self.dtype, param_dtype=self.param_dtype,
                      name="patch_embedding",
                      conv_general_dilated=conv_general_dilated)(pixel_values.astype(self.dtype))
    patches = patches.reshape(b, -1, c.hidden_size)  # row-major (h, w), as torch's flatten(2)
    cls = jnp.broadcast_to(class_embedding.astype(self.dtype), (b, 1, c.hidden_size))
    positions = nn.Embed(c.num_positions, c.hidden_size, dtype=self.dtype,
                         param_dtype=self.param_dtype, embedding_init=_embed_init,
                         name="position_embedding")(jnp.arange(c.num_positions))
    return jnp.concatenate([cls, patches], axis=1) + positions[None]


class CLIPVisionTransformer(nn.Module):
  """transformers' `CLIPVisionModel` (the `vision_model` of the projection model).

  Returns (last_hidden_state (B, N + 1, D), pooled (B, D) = post_layernorm(CLS token)).
  """
  config: CLIPVisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixel_values):
    c = self.config
    ln = lambda name: nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype,
                                   param_dtype=self.param_dtype, name=name)
    x = CLIPVisionEmbeddings(c, self.dtype, self.param_dtype, name="embeddings")(pixel_values)
    x = ln("pre_layrnorm")(x)  # sic, transformers' spelling
    x, _ = CLIPEncoder(c, self.dtype, self.param_dtype, name="encoder")(x)
    return x, ln("post_layernorm")(x[:, 0])


class CLIPVisionModelWithProjection(nn.Module):
  """CLIP image tower with projection (port of transformers' `CLIPVisionModelWithProjection`).

  Input: `pixel_values` (B, H, W, C) float, already CLIP-normalised (see `clip_preprocess`),
  NHWC, H == W == config.image_size.

  `__call__` returns `image_embeds` (B, projection_dim) `dtype` (not L2-normalised, as
  transformers). `encode` returns `(last_hidden_state (B, N + 1, hidden_size),
  pooled (B, hidden_size), image_embeds (B, projection_dim))`, e.g.
  `model.apply({'params': p}, x, method=model.encode)`.
  """
  config: CLIPVisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    self.vision_model = CLIPVisionTransformer(self.config, self.dtype, self.param_dtype)
    self.visual_projection = nn.Dense(self.config.projection_dim, use_bias=False,
                                      dtype=self.dtype, param_dtype=self.param_dtype)

  def encode(self, pixel_values):
    c = self.config
    if pixel_values.ndim != 4 or pixel_values.shape[1:] != (c.image_size, c.image_size,
                                                            c.num_channels):
      raise ValueError(f"CLIPVisionModelWithProjection: expected pixel_values (B, {c.image_size}, "
                       f"{c.image_size}, {c.num_channels}) NHWC, got {pixel_values.shape}")
    last_hidden_state, pooled = self.vision_model(pixel_values)
    return last_hidden_state, pooled, self.visual_projection(pooled)

  def __call__(self, pixel_values):
    return self.encode(pixel_values)[2]


# ----------------------------------------------------------------------------------------------
# Parameters: init and PyTorch <-> Flax conversion
# ----------------------------------------------------------------------------------------------


def _cast(params, dtype):
  return jax.tree_util.tree_map(lambda x: x.astype(dtype), params)


def init_clip_text_params(config: CLIPTextConfig, key: jax.Array,
                          dtype: Dtype = jnp.float32) -> Params:
  """Random text-encoder "params" tree of `dtype` arrays; works under `jax.eval_shape`."""
  model = CLIPTextModel(config, param_dtype=dtype)
  ids = jnp.zeros((1, config.max_position_embeddings), jnp.int32)
  return model.init(key, ids)["params"]


def abstract_clip_text_params(config: CLIPTextConfig, dtype: Dtype = jnp.float32) -> Params:
  """The text encoder's "params" tree as `jax.ShapeDtypeStruct`s (no allocation)."""
  return jax.eval_shape(lambda k: init_clip_text_params(config, k, dtype),
                        jax.ShapeDtypeStruct((2,), jnp.uint32))


def init_clip_vision_params(config: CLIPVisionConfig, key: jax.Array,
                            dtype: Dtype = jnp.float32) -> Params:
  """Random vision-tower "params" tree of `dtype` arrays; works under `jax.eval_shape`."""
  model = CLIPVisionModelWithProjection(config, param_dtype=dtype)
  x = jnp.zeros((1, config.image_size, config.image_size, config.num_channels), jnp.float32)
  return model.init(key, x)["params"]


def _abstract_text(config):
  return jax.eval_shape(lambda: init_clip_text_params(config, jax.random.PRNGKey(0)))


def _abstract_vision(config):
  return jax.eval_shape(lambda: init_clip_vision_params(config, jax.random.PRNGKey(0)))


def clip_text_from_torch(state_dict: Mapping[str, Any], config: CLIPTextConfig,
                         source: str = "<state dict>", dtype: Dtype = jnp.float32, placement=None) -> Params:
  """Converts a transformers `CLIPTextModel` state dict to Flax params.

  Keys may carry the `text_model.` prefix (transformers v4, Hub checkpoints) or not
  (transformers v5). A `position_ids` buffer (persistent before transformers 4.31, so present
  in e.g. SD 1.x checkpoints) is accepted and dropped.

  Raises:
    WeightLoadingError: missing/unexpected keys or a shape mismatch (message names `source`).
  """
  return torch_to_flax(state_dict, _abstract_text(config), LIST_NAMES,
                       renames=[(r"^text_model\.", "")], ignore=_BUFFERS, source=source,
                       dtype=dtype, placement=placement)


def clip_vision_from_torch(state_dict: Mapping[str, Any], config: CLIPVisionConfig,
                           source: str = "<state dict>", dtype: Dtype = jnp.float32,
                           *, from_clip_model: bool = False) -> Params:
  """Converts a transformers `CLIPVisionModelWithProjection` state dict (`vision_model.*`,
  `visual_projection.weight`) to Flax params.

  Args:
    from_clip_model: the state dict is a full `CLIPModel`'s; its text keys (`text_model.*`,
      `text_projection.weight`, `logit_scale`) are dropped.

  Raises:
    WeightLoadingError: missing/unexpected keys or a shape mismatch (message names `source`).
  """
  ignore = _BUFFERS + (_CLIP_MODEL_TEXT_KEYS if from_clip_model else ())
  return torch_to_flax(state_dict, _abstract_vision(config), LIST_NAMES, ignore=ignore,
                       source=source, dtype=dtype)


def _check_tree(params, abstract, what):
  flat = traverse_util.flatten_dict(params.unfreeze() if hasattr(params, "unfreeze") else params)
  want = traverse_util.flatten_dict(abstract)
  got_shapes = {"/".join(k): tuple(np.shape(v)) for k, v in flat.items()}
  want_shapes = {"/".join(k): tuple(v.shape) for k, v in want.items()}
  if got_shapes != want_shapes:
    diff = sorted(set(got_shapes.items()) ^ set(want_shapes.items()))
    raise WeightLoadingError(f"{what}: params do not match the config: {diff[:8]}")


def _installed_text_prefix() -> str:
  try:
    import transformers
    major = int(transformers.__version__.split(".")[0])
  except Exception:  # no transformers: write the Hub layout
    return "text_model."
  return "" if major >= 5 else "text_model."


def clip_text_to_torch(params: Params, config: CLIPTextConfig, *, prefix: str | None = None,
                       include_position_ids: bool = False) -> dict[str, np.ndarray]:
  """Flax text params -> a transformers `CLIPTextModel` (or, with `config.with_projection`,
  `CLIPTextModelWithProjection`) state dict (float32 NumPy arrays).

  Args:
    prefix: key prefix of the tower; None = that of the installed transformers'
      `state_dict()`: for `CLIPTextModel` "" in v5 (e.g. `embeddings.token_embedding.weight`),
      "text_model." in v4 and the Hub layout (e.g.
      `text_model.encoder.layers.0.self_attn.q_proj.weight`); v5 loads both with
      `from_pretrained`, but `load_state_dict(strict=True)` needs the exact one.
      `CLIPTextModelWithProjection` uses "text_model." in both versions, and its
      `text_projection.weight` never has a prefix.
    include_position_ids: also write the `embeddings.position_ids` buffer (int64,
      (1, max_position_embeddings)), persistent only in transformers < 4.31; later versions
      reject it in a strict `load_state_dict`.
  """
  _check_tree(params, _abstract_text(config), "clip_text_to_torch")
  if prefix is None:
    prefix = "text_model." if config.with_projection else _installed_text_prefix()
  out = {(k if k.startswith("text_projection.") else prefix + k): v
         for k, v in flax_to_torch(params, LIST_NAMES).items()}
  if include_position_ids:
    out[prefix + "embeddings.position_ids"] = np.arange(
        config.max_position_embeddings, dtype=np.int64)[None]
  return out


def clip_vision_to_torch(params: Params, config: CLIPVisionConfig) -> dict[str, np.ndarray]:
  """Flax vision params -> transformers `CLIPVisionModelWithProjection.state_dict()` (float32)."""
  _check_tree(params, _abstract_vision(config), "clip_vision_to_torch")
  return flax_to_torch(params, LIST_NAMES)


# ----------------------------------------------------------------------------------------------
# Loading transformers-format directories
# ----------------------------------------------------------------------------------------------


def resolve_model_directory(path: str | os.PathLike) -> str:
  """A local directory for `path`: itself, or a Hugging Face Hub snapshot of a repo id."""
  path = os.fspath(path)
  if os.path.isdir(path):
    return path
  if os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") > 1:
    raise FileNotFoundError(f"{path}: not a directory (expected a transformers-format directory "
                            "with config.json and model.safetensors, or a Hub repo id)")
  try:
    from huggingface_hub import snapshot_download
    return snapshot_download(path, allow_patterns=["*.json", "*.safetensors"])
  except Exception as e:  # offline, unknown repo, no huggingface_hub, ...
    raise OSError(f"{path!r} is not a local directory and could not be downloaded from the "
                  f"Hugging Face Hub ({type(e).__name__}: {e}). Pass a local directory with "
                  "config.json and model.safetensors.") from e


def read_model_config(directory: str) -> dict:
  config_path = os.path.join(directory, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{config_path}: no config.json (expected a transformers-format "
                            "directory written by save_pretrained)")
  with open(config_path) as f:
    return json.load(f)


def model_safetensors_files(directory: str) -> list[str]:
  single = os.path.join(directory, "model.safetensors")
  if os.path.isfile(single):
    return [single]
  index = os.path.join(directory, "model.safetensors.index.json")
  if os.path.isfile(index):
    with open(index) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    files = [os.path.join(directory, s) for s in shards]
    for file in files:
      if not os.path.isfile(file):
        raise FileNotFoundError(f"{file}: shard listed in {index} is missing")
    return files
  others = [n for n in os.listdir(directory) if n.endswith((".bin", ".pt", ".msgpack", ".h5"))]
  hint = f" (found {others}: only safetensors are supported; re-save with " \
         "save_pretrained(safe_serialization=True))" if others else ""
  raise FileNotFoundError(f"{single}: no model.safetensors or model.safetensors.index.json in "
                          f"{directory}{hint}")


def read_safetensors_state_dict(files: list[str], skip: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
  """Reads safetensors files as NumPy arrays, skipping keys matching the regexes in `skip`."""
  from safetensors import safe_open
  skip = [re.compile(p) for p in skip]
  out = {}
  for file in files:
    try:
      with safe_open(file, framework="numpy") as f:
        for key in f.keys():
          if not any(p.search(key) for p in skip):
            out[key] = f.get_tensor(key)
    except Exception as e:
      raise WeightLoadingError(f"{file}: cannot read safetensors ({e})") from e
  return out


@dataclasses.dataclass(frozen=True, eq=False)
class ClipVision:
  """A loaded CLIP image tower: config, params, and pure functions.

  `apply(params, pixel_values (B, S, S, 3) CLIP-normalised) -> image_embeds (B, projection_dim)`
  is pure (jit/grad-able); `preprocess(images (B, H, W, 3) uint8) -> pixel_values` uses
  `config.image_size`; `embed(images_uint8)` = apply(self.params, preprocess(images)).
  """
  config: CLIPVisionConfig
  params: Params
  dtype: Dtype = jnp.float32

  @property
  def module(self) -> CLIPVisionModelWithProjection:
    return CLIPVisionModelWithProjection(self.config, dtype=self.dtype, param_dtype=self.dtype)

  def apply(self, params: Params, pixel_values: jax.Array) -> jax.Array:
    return self.module.apply({"params": params}, pixel_values)

  def encode(self, params: Params, pixel_values: jax.Array):
    """(last_hidden_state, pooled, image_embeds); see `CLIPVisionModelWithProjection`."""
    module = self.module
    return module.apply({"params": params}, pixel_values, method=module.encode)

  def preprocess(self, images: jax.Array) -> jax.Array:
    return clip_preprocess(images, size=self.config.image_size)

  def embed(self, images: jax.Array) -> jax.Array:
    return self.apply(self.params, self.preprocess(images))


def load_clip_vision(path: str | os.PathLike, dtype: Dtype = jnp.float32) -> ClipVision:
  """Loads a CLIP image tower from a transformers-format directory or a Hub repo id.

  Args:
    path: a directory (config.json + model.safetensors or a sharded index) written by
      `CLIPVisionModelWithProjection.save_pretrained` or `CLIPModel.save_pretrained` (e.g.
      `openai/clip-vit-large-patch14`; its text tower is not read), or a Hub id (downloaded
      with `huggingface_hub.snapshot_download`).
    dtype: parameter and computation dtype.

  Raises:
    FileNotFoundError: no directory / config.json / safetensors.
    OSError: a Hub id that cannot be downloaded (e.g. offline).
    WeightLoadingError: keys or shapes do not match the config (names the file and the keys).
    ValueError: an unsupported config (e.g. hidden_act).
  """
  directory = resolve_model_directory(path)
  raw = read_model_config(directory)
  is_clip_model = "vision_config" in raw or raw.get("model_type") == "clip"
  config = CLIPVisionConfig.from_dict(raw)
  files = model_safetensors_files(directory)
  state_dict = read_safetensors_state_dict(files, skip=_CLIP_MODEL_TEXT_KEYS if is_clip_model else ())
  params = clip_vision_from_torch(state_dict, config, source=", ".join(files), dtype=dtype,
                                  from_clip_model=is_clip_model)
  return ClipVision(config, params, dtype)


def load_clip_text(path: str | os.PathLike,
                   dtype: Dtype = jnp.float32) -> tuple[CLIPTextConfig, Params]:
  """Loads a CLIP text encoder (`CLIPTextModel` directory, e.g. SD's `text_encoder/`, or a full
  `CLIPModel` directory, whose vision keys are skipped) -> (config, params)."""
  directory = resolve_model_directory(path)
  raw = read_model_config(directory)
  is_clip_model = "text_config" in raw or raw.get("model_type") == "clip"
  config = CLIPTextConfig.from_dict(raw)
  files = model_safetensors_files(directory)
  skip = _CLIP_MODEL_VISION_KEYS + (r"^text_projection\.weight$",) if is_clip_model else ()
  state_dict = read_safetensors_state_dict(files, skip=skip)
  return config, clip_text_from_torch(state_dict, config, source=", ".join(files), dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Preprocessing
# ----------------------------------------------------------------------------------------------


def clip_preprocess(images: jax.Array, size: int = 224, mean=CLIP_MEAN, std=CLIP_STD, *,
                    round_like_pil: bool = False) -> jax.Array:
  """CLIP image preprocessing in JAX (jit-able; differentiable unless `round_like_pil`).

  As `CLIPImageProcessor`: resize the shortest side to `size` (the long side to
  `int(size * long / short)`, as transformers) with antialiased bicubic, centre-crop
  `size` x `size` (offset `(dim - size) // 2`), scale by 1/255, normalise with the CLIP
  mean/std. The resize mimics PIL's two-pass uint8 resampler: a horizontal pass, then a
  vertical one (each `jax.image.resize(..., method="bicubic", antialias=True)`, the same Keys
  a = -0.5 kernel as PIL), clipping to [0, 255] after each pass (PIL stores the intermediate
  image as uint8; bicubic overshoot is clipped). PIL also rounds after each pass; without
  `round_like_pil` this function does not (keeps gradients), so the resized pixels differ from
  PIL's by <= ~1.1 grey levels (<= ~0.017 in normalised units); with it, by 1-2 levels on
  ~0.1% of pixels (rounding ties). A single 2-D resize would differ by up to ~21 levels on
  noise images (intermediate clipping). Measured numbers: tests/test_clip.py.

  Args:
    images: (B, H, W, 3) uint8 (or float in [0, 255]).
    size: output side, `config.image_size` (224 for ViT-L/14).
    round_like_pil: round to integers after each resize pass, as PIL (no gradient).

  Returns:
    (B, size, size, 3) float32 pixel values for `CLIPVisionModelWithProjection`.
  """
  images = jnp.asarray(images)
  b, h, w, c = images.shape
  if h <= w:
    nh, nw = size, int(size * w / h)
  else:
    nh, nw = int(size * h / w), size
  top, left = (nh - size) // 2, (nw - size) // 2

  def settle(x):
    return jnp.clip(jnp.round(x) if round_like_pil else x, 0.0, 255.0)

  x = images.astype(jnp.float32)
  if nw != w:  # horizontal pass first, as PIL
    x = settle(jax.image.resize(x, (b, h, nw, c), method="bicubic", antialias=True))
  x = x[:, :, left:left + size]  # the vertical pass is per column: crop first
  if nh != h:
    x = settle(jax.image.resize(x, (b, nh, size, c), method="bicubic", antialias=True))
  x = x[:, top:top + size] / 255.0
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
