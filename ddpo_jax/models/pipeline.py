"""Stable Diffusion (1.x / 2.x) and SDXL pipelines in diffusers format: load, save, random init.

A `Pipeline` bundles the parameters of the networks, their configs, the scheduler config,
the tokenizer(s) and pure, jit-able functions (closures over the Flax modules; parameters are
always passed explicitly):

  unet_apply(params_unet, latents (B,h,w,4), timesteps (B,) or scalar, context (B,L,D),
             class_labels=None, added_time_emb=None, text_embeds=None, time_ids=None)
      -> eps (B,h,w,4) float32; SDXL UNets also take the pooled `text_embeds` (B,P) and
      `time_ids` (B,6) (default: `sdxl_time_ids` of the latents' pixel size, no crop)
  vae_encode(params_vae, images (B,H,W,3) in [-1,1]) -> DIFFUSION latents (B,H/8,W/8,4) float32
      = posterior mean * scaling_factor (minus shift_factor first, if the VAE has one)
  vae_decode(params_vae, latents (B,h,w,4)) -> images (B,8h,8w,3) float32, nominally in [-1,1]
      (not clipped); takes DIFFUSION latents, i.e. divides by scaling_factor first
  encode_prompt(params, input_ids) -> (context (B,L,D), pooled (B,P)) float32, reading the
      text encoders' entries of the pipeline's `params` dict:
      SD: input_ids (B,L) int32; context = the last hidden state, pooled = CLIP's pooled output.
      SDXL: input_ids (B,2,L) int32 (`tokenize`: both tokenizers' ids); context = the two
      encoders' penultimate hidden states concatenated (D = D1 + D2), pooled = the second
      encoder's projected `text_embeds`, as diffusers' `StableDiffusionXLPipeline.encode_prompt`.

Directory layout (what `diffusers.StableDiffusionPipeline.save_pretrained` writes):

  model_index.json
  unet/config.json, unet/diffusion_pytorch_model.safetensors   (or .fp16 / sharded index)
  vae/config.json, vae/diffusion_pytorch_model.safetensors
  text_encoder/config.json, text_encoder/model.safetensors
  tokenizer/ (vocab.json + merges.txt or tokenizer.json, tokenizer_config.json)   optional
  scheduler/scheduler_config.json

and for `StableDiffusionXLPipeline` also text_encoder_2/ (`CLIPTextModelWithProjection`) and
tokenizer_2/. model_index.json's `_class_name` says which; other pipeline classes are refused.

Only safetensors weights are read (no pickle). Every error about the directory (not a pipeline,
a missing component, an unsupported config, a key or shape mismatch) is raised while loading,
before anything is compiled: `jax.eval_shape` gives the expected parameter shapes without
allocating or compiling.

Dtype policy: `dtype` is the parameter dtype (float32, or bfloat16 to halve memory);
`compute_dtype` (default: `dtype`) is the activation dtype of the modules, e.g. bfloat16 mixed
precision with float32 master weights. The bundle functions return float32.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ddpo_jax.models import adapters
from ddpo_jax.models import clip as clip_lib
from ddpo_jax.models import flow_pipeline, pipeline_io
from ddpo_jax.models.pipeline_io import PipelineLoadError, write_json
from ddpo_jax.models.unet import (UNet2DConditionModel, UNetConfig, abstract_unet_params,
                                  init_unet_params, unet_from_torch, unet_to_torch)
from ddpo_jax.models.vae import (AutoencoderKL, VAEConfig, abstract_vae_params, init_vae_params,
                                 vae_from_torch, vae_to_torch)

Dtype = Any

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
              "scheduler")
_CLASSES = {
    "unet": ("diffusers", "UNet2DConditionModel"),
    "vae": ("diffusers", "AutoencoderKL"),
    "text_encoder": ("transformers", "CLIPTextModel"),
    "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
    "tokenizer": ("transformers", "CLIPTokenizer"),
    "tokenizer_2": ("transformers", "CLIPTokenizer"),
}
_TOKENIZER_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast")
_ACCEPTED_CLASSES = {"unet": ("UNet2DConditionModel",), "vae": ("AutoencoderKL",),
                     "text_encoder": ("CLIPTextModel",),
                     "text_encoder_2": ("CLIPTextModelWithProjection",),
                     "tokenizer": _TOKENIZER_CLASSES, "tokenizer_2": _TOKENIZER_CLASSES}
_WEIGHT_BASENAMES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model",
                     "text_encoder": "model", "text_encoder_2": "model"}

# SD's DDIM configuration (the sampler DDPO uses).
SD_DDIM_SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False,
    "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "epsilon",
    "timestep_spacing": "leading", "trained_betas": None,
}


# ================================================================================================
# The bundle.
# ================================================================================================
@dataclasses.dataclass(eq=False)
class Pipeline:
  """A Stable Diffusion or SDXL pipeline: params, configs, tokenizers and pure functions.

  Attributes:
    params: {"unet": ..., "vae": ..., "text_encoder": ...[, "text_encoder_2": ...]} parameter
      trees (`dtype` arrays).
    unet_config / vae_config / text_config: the architectures.
    scheduler_config: scheduler/scheduler_config.json as a dict.
    tokenizer: a `transformers.CLIPTokenizer`, or None.
    abstract: params are `jax.ShapeDtypeStruct`s (`load_pipeline(..., abstract=True)`): the
      pipeline can be traced and compiled, not run; `tokenize` gives placeholder ids (zeros)
      of the right shape.
    dtype: parameter dtype. compute_dtype: activation dtype (None: `dtype`).
    attention_implementation: "auto" | "xla" | "cudnn". remat: gradient checkpointing of the
      UNet blocks.
    model_index: the model_index.json dict it was loaded from (kept on save), or None.
    text_config_2 / tokenizer_2: SDXL's second text encoder (`CLIPTextConfig` with
      `with_projection`) and its tokenizer; None for SD 1.x / 2.x. An SDXL UNet
      (`addition_embed_type="text_time"`) needs them, and only it takes them.

  The functions `unet_apply`, `vae_encode`, `vae_decode`, `encode_prompt` (see the module
  docstring) are built from the configs; `dataclasses.replace(pipe, params=new)` keeps them valid.
  """
  params: dict
  unet_config: UNetConfig
  vae_config: VAEConfig
  text_config: Any  # clip.CLIPTextConfig
  scheduler_config: dict
  tokenizer: Any = None
  dtype: Dtype = jnp.float32
  compute_dtype: Dtype = None
  attention_implementation: str = "auto"
  remat: bool = False
  model_index: dict | None = None
  text_config_2: Any = None  # clip.CLIPTextConfig with with_projection
  tokenizer_2: Any = None
  abstract: bool = False

  unet: UNet2DConditionModel = dataclasses.field(init=False, repr=False)
  vae: AutoencoderKL = dataclasses.field(init=False, repr=False)
  text_encoder: Any = dataclasses.field(init=False, repr=False)
  text_encoder_2: Any = dataclasses.field(init=False, repr=False)
  unet_apply: Callable = dataclasses.field(init=False, repr=False)
  vae_encode: Callable = dataclasses.field(init=False, repr=False)
  vae_decode: Callable = dataclasses.field(init=False, repr=False)
  encode_prompt: Callable = dataclasses.field(init=False, repr=False)

  def __post_init__(self):
    if self.is_sdxl != (self.unet_config.addition_embed_type == "text_time"):
      raise ValueError(
          "Pipeline: an SDXL UNet (addition_embed_type='text_time') needs the second text "
          f"encoder (text_config_2), and only it takes one; got addition_embed_type="
          f"{self.unet_config.addition_embed_type!r} with text_config_2="
          f"{'set' if self.is_sdxl else None}")
    if self.is_sdxl and not self.text_config_2.with_projection:
      raise ValueError("Pipeline: SDXL's text_config_2 must be a CLIPTextModelWithProjection "
                       "config (with_projection=True)")
    compute = self.compute_dtype or self.dtype
    self.unet = UNet2DConditionModel(self.unet_config, dtype=compute, param_dtype=self.dtype,
                                     attention_implementation=self.attention_implementation,
                                     remat=self.remat)
    self.vae = AutoencoderKL(self.vae_config, dtype=compute, param_dtype=self.dtype,
                             attention_implementation=self.attention_implementation)
    self.text_encoder = clip_lib.CLIPTextModel(self.text_config, dtype=compute,
                                               param_dtype=self.dtype)
    self.text_encoder_2 = None
    if self.is_sdxl:
      self.text_encoder_2 = clip_lib.CLIPTextModel(self.text_config_2, dtype=compute,
                                                   param_dtype=self.dtype)
    (self.unet_apply, self.vae_encode, self.vae_decode,
     self.encode_prompt) = _make_functions(self)

  # The interface every pipeline family offers (`flow_pipeline` module docstring).
  prediction_type = "epsilon"
  denoiser = "unet"

  @property
  def is_sdxl(self) -> bool:
    """Whether this is an SDXL pipeline (two text encoders, the UNet's text_time embedding)."""
    return self.text_config_2 is not None

  @property
  def default_resolution(self) -> int:
    """Image side in pixels the diffusers pipeline samples at by default: the UNet's
    sample_size x vae_scale_factor (512 for SD 1.x, 768 for SD 2.x-v, 1024 for SDXL)."""
    size = self.unet_config.sample_size
    if size is None:
      raise ValueError("this UNet config has no sample_size: give the resolution")
    return int(size if isinstance(size, int) else size[0]) * self.vae_scale_factor

  guidance_kind = "cfg"  # classifier-free guidance with the negative prompt (`uncond`)

  @property
  def default_sampling(self) -> tuple[int, float]:
    """(num_inference_steps, guidance_scale) of the diffusers pipeline's `__call__`: 50 steps,
    CFG 7.5 (SD) or 5.0 (SDXL)."""
    return (50, 5.0) if self.is_sdxl else (50, 7.5)

  def latent_shape(self, resolution: int) -> tuple[int, int, int]:
    """(H/f, W/f, latent_channels) of a square image of side `resolution`.

    Raises:
      ValueError: `resolution` not a multiple of the VAE factor f, or the latent side not a
        multiple of the UNet's total downsampling.
    """
    vae_factor = self.vae_scale_factor
    unet_factor = 2 ** (len(self.unet_config.block_out_channels) - 1)
    if resolution <= 0 or resolution % (vae_factor * unet_factor):
      raise ValueError(
          f"resolution={resolution} must be a positive multiple of {vae_factor * unet_factor} "
          f"(the VAE downsamples by {vae_factor}, the UNet by a further {unet_factor})")
    side = resolution // vae_factor
    return (side, side, int(self.vae_config.latent_channels))

  def encode(self, params: dict, ids):
    """`tokenize`'s ids -> the UNet's conditioning: context (B,L,D) float32 for SD; for SDXL
    {"context": (B,L,D1+D2), "text_embeds": (B,P)}. `params` is the whole dict."""
    context, pooled = self.encode_prompt(params, ids)
    return {"context": context, "text_embeds": pooled} if self.is_sdxl else context

  def uncond(self, params: dict):
    """The unconditional conditioning of classifier-free guidance, batch 1: the empty prompt's,
    or for SDXL with `force_zeros_for_empty_prompt` (the base model's setting, and diffusers'
    default) zeros of its shapes."""
    cond = self.encode(params, jnp.asarray(self.tokenize([""])))
    if self.is_sdxl and (self.model_index or {}).get("force_zeros_for_empty_prompt", True):
      return jax.tree.map(jnp.zeros_like, cond)
    return cond

  def denoise(self, params_unet, latents, timesteps, cond, added_time_emb=None):
    """eps (B,h,w,C) float32 of latents (B,h,w,C) at timesteps (B,) under `cond` (`encode`);
    `added_time_emb` (B, time_embed_dim) is added to the time embedding (CTRL's controls)."""
    if self.is_sdxl:
      return self.unet_apply(params_unet, latents, timesteps, cond["context"],
                             added_time_emb=added_time_emb, text_embeds=cond["text_embeds"])
    return self.unet_apply(params_unet, latents, timesteps, cond, added_time_emb=added_time_emb)

  @property
  def vae_scale_factor(self) -> int:
    """Pixels per latent cell along each axis (8 for SD and SDXL)."""
    return 2 ** (len(self.vae_config.block_out_channels) - 1)

  @property
  def max_length(self) -> int:
    """Token sequence length fed to the text encoder(s)."""
    length = self.text_config.max_position_embeddings
    if self.is_sdxl:
      length = min(length, self.text_config_2.max_position_embeddings)
    for tokenizer in (self.tokenizer, self.tokenizer_2):
      if tokenizer is not None:
        length = min(length, int(tokenizer.model_max_length))
    return length

  def tokenize(self, prompts: str | list[str]) -> np.ndarray:
    """Prompts -> int32 ids, padded and truncated like diffusers: (B, max_length), or for SDXL
    (B, 2, max_length), the ids of `tokenizer` and of `tokenizer_2`."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if self.abstract:  # shapes only: placeholder ids
      return np.zeros((len(prompts),) + ((2,) if self.is_sdxl else ()) + (self.max_length,),
                      np.int32)
    if self.tokenizer is None or (self.is_sdxl and self.tokenizer_2 is None):
      raise ValueError("this pipeline has no tokenizer" + ("_2" if self.tokenizer else ""))
    tokenizers = (self.tokenizer, self.tokenizer_2) if self.is_sdxl else (self.tokenizer,)
    ids = [np.asarray(t(prompts, padding="max_length", max_length=self.max_length,
                        truncation=True, return_tensors="np").input_ids, np.int32)
           for t in tokenizers]
    return np.stack(ids, axis=1) if self.is_sdxl else ids[0]


def sdxl_time_ids(height: int, width: int, batch: int, crop_top_left=(0, 0),
                  original_size=None) -> jax.Array:
  """SDXL's micro-conditioning, (batch, 6) float32: original (height, width), crop (top, left),
  target (height, width), in pixels, as `StableDiffusionXLPipeline._get_add_time_ids` (default
  original size = target size, no crop)."""
  original = tuple(original_size or (height, width))
  ids = jnp.asarray(original + tuple(crop_top_left) + (height, width), jnp.float32)
  return jnp.broadcast_to(ids, (batch, 6))


def _make_functions(pipe: Pipeline):
  unet, vae, vae_config = pipe.unet, pipe.vae, pipe.vae_config
  scale = float(vae_config.scaling_factor)
  shift = float(vae_config.shift_factor or 0.0)
  factor = pipe.vae_scale_factor

  def unet_apply(params_unet, latents, timesteps, context, class_labels=None,
                 added_time_emb=None, text_embeds=None, time_ids=None):
    """eps (B,h,w,C) float32 from latents (B,h,w,C), timesteps (B,) / scalar, context (B,L,D);
    optional `added_time_emb` (B, time_embed_dim) is added to the time embedding. SDXL:
    `text_embeds` (B,P) the pooled prompt embedding (required), `time_ids` (B,6) (default
    `sdxl_time_ids` of the pixel size h*8 x w*8)."""
    if pipe.is_sdxl and time_ids is None:
      b, h, w = latents.shape[:3]
      time_ids = sdxl_time_ids(h * factor, w * factor, b)
    out = adapters.apply(unet, params_unet, latents, timesteps, context, class_labels,
                         added_time_emb, text_embeds, time_ids)
    return out.astype(jnp.float32)

  def vae_encode(params_vae, images):
    """images (B,H,W,3) in [-1,1] -> diffusion latents (mean - shift) * scaling_factor."""
    mean, _ = vae.apply({"params": params_vae}, images, method=AutoencoderKL.encode)
    return ((mean.astype(jnp.float32) - shift) * scale)

  def vae_decode(params_vae, latents):
    """diffusion latents -> images (B,H,W,3) float32, nominally in [-1,1] (not clipped)."""
    z = latents.astype(jnp.float32) / scale + shift
    out = vae.apply({"params": params_vae}, z, method=AutoencoderKL.decode)
    return out.astype(jnp.float32)

  def encode_prompt(params, input_ids):
    """(context (B,L,D), pooled (B,P)) float32 from `tokenize`'s ids (module docstring)."""
    if not pipe.is_sdxl:
      hidden, pooled = pipe.text_encoder.apply({"params": params["text_encoder"]}, input_ids)
      return hidden.astype(jnp.float32), pooled.astype(jnp.float32)
    if input_ids.ndim != 3 or input_ids.shape[1] != 2:
      raise ValueError(f"SDXL encode_prompt: input_ids of shape {input_ids.shape}; expected "
                       "(B, 2, L), the ids of both tokenizers (Pipeline.tokenize)")
    _, _, states = pipe.text_encoder.apply({"params": params["text_encoder"]},
                                           input_ids[:, 0], output_hidden_states=True)
    _, pooled, states_2 = pipe.text_encoder_2.apply({"params": params["text_encoder_2"]},
                                                    input_ids[:, 1], output_hidden_states=True)
    context = jnp.concatenate([states[-2], states_2[-2]], axis=-1)
    return context.astype(jnp.float32), pooled.astype(jnp.float32)

  return unet_apply, vae_encode, vae_decode, encode_prompt


# ================================================================================================
# Configs of SD 1.5 and the SDXL UNet (for param counting / benchmarks without weights).
# ================================================================================================
SD15_UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"],
}
SD15_VAE_CONFIG = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
    "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SD15_TEXT_CONFIG = {
    "architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
    "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2,
    "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0,
    "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77, "num_attention_heads": 12, "num_hidden_layers": 12,
    "pad_token_id": 1, "projection_dim": 768, "vocab_size": 49408,
}

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the non-default keys).
SDXL_UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "in_channels": 4, "layers_per_block": 2, "norm_eps": 1e-05, "norm_num_groups": 32,
    "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None, "use_linear_projection": True,
}


def sd15_configs():
  """(UNetConfig, VAEConfig, CLIPTextConfig) of Stable Diffusion 1.5 (runwayml/...-v1-5)."""
  return (UNetConfig.from_dict(SD15_UNET_CONFIG), VAEConfig.from_dict(SD15_VAE_CONFIG),
          clip_lib.CLIPTextConfig.from_dict(SD15_TEXT_CONFIG))


def abstract_pipeline_params(unet_config, vae_config, text_config, dtype=jnp.float32) -> dict:
  """{"unet","vae","text_encoder"} parameter trees of `jax.ShapeDtypeStruct` (no allocation)."""
  return {"unet": abstract_unet_params(unet_config, dtype),
          "vae": abstract_vae_params(vae_config, dtype),
          "text_encoder": clip_lib.abstract_clip_text_params(text_config, dtype)}


def init_pipeline(unet_config: UNetConfig, vae_config: VAEConfig, text_config, key: jax.Array,
                  dtype: Dtype = jnp.float32, tokenizer=None, scheduler_config: dict | None = None,
                  *, compute_dtype: Dtype = None, attention_implementation: str = "auto",
                  remat: bool = False) -> Pipeline:
  """A randomly initialised pipeline (no files), e.g. to benchmark full-size architectures.

  UNet and VAE parameters are drawn on the host (`weights.host_random_params`, no compilation);
  the text encoder uses `clip.init_clip_text_params` under jit.
  """
  ku, kv, kt = jax.random.split(key, 3)
  params = {"unet": init_unet_params(unet_config, ku, dtype),
            "vae": init_vae_params(vae_config, kv, dtype),
            "text_encoder": jax.jit(clip_lib.init_clip_text_params, static_argnums=(0, 2))(
                text_config, kt, dtype)}
  return Pipeline(params=params, unet_config=unet_config, vae_config=vae_config,
                  text_config=text_config,
                  scheduler_config=dict(scheduler_config or SD_DDIM_SCHEDULER_CONFIG),
                  tokenizer=tokenizer, dtype=dtype, compute_dtype=compute_dtype,
                  attention_implementation=attention_implementation, remat=remat)


# ================================================================================================
# Loading.
# ================================================================================================
# Every pipeline class `load_pipeline` reads: its family module's loader, and the components
# each must have.
PIPELINE_CLASSES = {
    "StableDiffusionPipeline": ("unet", "vae", "text_encoder", "scheduler"),
    "StableDiffusionXLPipeline": ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler"),
    **flow_pipeline.PIPELINE_CLASSES,
}
_HUB_PATTERNS = pipeline_io.hub_patterns(
    {**_WEIGHT_BASENAMES, **flow_pipeline.WEIGHT_BASENAMES})


def load_pipeline(path, dtype: Dtype = jnp.float32, *, attention_implementation: str = "auto",
                  remat: bool = False, compute_dtype: Dtype = None, placement=None,
                  abstract: bool = False):
  """Loads a diffusers-format pipeline (local directory or Hub id) of any supported family.

  model_index.json's `_class_name` picks the family: `StableDiffusionPipeline` and
  `StableDiffusionXLPipeline` give a `Pipeline` (a UNet predicting noise),
  `StableDiffusion3Pipeline` and `FluxPipeline` a `flow_pipeline.FlowPipeline` (a transformer
  predicting the flow's velocity). Both offer the same interface to the trainer (module
  docstring of `flow_pipeline`, and docs/models.md).

  Args:
    path: a local directory written by the pipelines' `save_pretrained` (or `save_pipeline`),
      or a Hugging Face Hub id (downloaded with `snapshot_download`, only the files needed, if
      `path` is not an existing directory).
    dtype: parameter dtype (float32 or bfloat16); fp16 / bf16 checkpoints are cast.
    attention_implementation: "auto" | "xla" | "cudnn".
    remat: gradient checkpointing of the denoiser's blocks.
    compute_dtype: activation dtype (default `dtype`).
    placement: (component name, Flax path tuple, shape) -> a `jax.sharding.Sharding` (or None:
      the default device) for every parameter, which is then read and placed one tensor at a
      time (each device receives only its shard; the host never holds a component twice).
    abstract: read the configs only (every check above runs); the params are
      `jax.ShapeDtypeStruct`s of the shapes and `dtype` the weights would have, tokenizers are
      not read (`Pipeline.abstract`): for compiling the programs without weights
      (`ddpo_jax.plan`).

  Raises:
    PipelineLoadError: not a directory / no model_index.json / a pipeline class other than
      `PIPELINE_CLASSES` / a missing component or one of another class / an unsupported or
      inconsistent config, or a config value of the wrong type (the message names the file
      and the key).
    WeightLoadingError: missing/unexpected weight keys or shape mismatches (names file and keys);
      a truncated safetensors file (names it and the first incomplete tensor); a file of a
      pipeline `save_pipeline` wrote whose SHA-256 changed since.
  """
  root = pipeline_io.resolve(path, _HUB_PATTERNS)
  pipeline_io.verify_written_files(root)
  index_path, model_index = pipeline_io.read_model_index(root, PIPELINE_CLASSES)
  pipeline_class = model_index.get("_class_name", "StableDiffusionPipeline")
  options = dict(dtype=dtype, attention_implementation=attention_implementation, remat=remat,
                 compute_dtype=compute_dtype, placement=placement, abstract=abstract)
  if pipeline_class in flow_pipeline.PIPELINE_CLASSES:
    return flow_pipeline.load_flow_pipeline(root, model_index, **options)
  return _load_unet_pipeline(root, index_path, model_index, **options)


def _load_unet_pipeline(root, index_path, model_index, *, dtype, attention_implementation,
                        remat, compute_dtype, placement, abstract) -> Pipeline:
  pipeline_class = model_index.get("_class_name", "StableDiffusionPipeline")
  required = PIPELINE_CLASSES[pipeline_class]
  sdxl = "text_encoder_2" in required
  accepted = {name: _ACCEPTED_CLASSES.get(name, ()) for name in COMPONENTS
              if (sdxl or not name.endswith("_2"))
              and not (abstract and name.startswith("tokenizer"))}
  dirs = pipeline_io.component_dirs(root, model_index, accepted, required)

  # 1. All configs (cheap, catches unsupported architectures before reading weights).
  unet_config = pipeline_io.parse_config(dirs["unet"], "unet", UNetConfig.from_dict)
  vae_config = pipeline_io.parse_config(dirs["vae"], "vae", VAEConfig.from_dict)
  text_config = pipeline_io.parse_config(dirs["text_encoder"], "text_encoder",
                                         clip_lib.CLIPTextConfig.from_dict)
  text_config_2 = (pipeline_io.parse_config(dirs["text_encoder_2"], "text_encoder_2",
                                            clip_lib.CLIPTextConfig.from_dict) if sdxl else None)
  scheduler_config = pipeline_io.read_json(
      os.path.join(dirs["scheduler"], "scheduler_config.json"), "scheduler config")
  unet_file = os.path.join(dirs["unet"], "config.json")
  widths = [text_config.hidden_size] + ([text_config_2.hidden_size] if sdxl else [])
  if unet_config.context_dim != sum(widths):
    raise PipelineLoadError(
        f"{unet_file}: cross_attention_dim={unet_config.context_dim} does not match the text "
        f"encoder{'s' if sdxl else ''}' hidden_size={' + '.join(map(str, widths))}")
  if sdxl != (unet_config.addition_embed_type == "text_time"):
    raise PipelineLoadError(
        f"{unet_file}: addition_embed_type={unet_config.addition_embed_type!r} in a "
        f"{pipeline_class} (SDXL's UNet has 'text_time', SD's has none)")
  if sdxl:
    if not text_config_2.with_projection:
      raise PipelineLoadError(f"{os.path.join(dirs['text_encoder_2'], 'config.json')}: not a "
                              "CLIPTextModelWithProjection (architectures)")
    width = text_config_2.projection_dim + 6 * unet_config.addition_time_embed_dim
    if unet_config.projection_class_embeddings_input_dim != width:
      raise PipelineLoadError(
          f"{unet_file}: projection_class_embeddings_input_dim="
          f"{unet_config.projection_class_embeddings_input_dim} does not match text_encoder_2's "
          f"projection_dim {text_config_2.projection_dim} + 6 time ids x "
          f"addition_time_embed_dim {unet_config.addition_time_embed_dim} = {width}")
  if unet_config.in_channels != vae_config.latent_channels:
    raise PipelineLoadError(
        f"{unet_file}: in_channels={unet_config.in_channels} "
        f"does not match the VAE's latent_channels={vae_config.latent_channels}")

  # 2. Weights, converted one component at a time (keys and shapes checked), or their shapes.
  converters = {"unet": (unet_from_torch, unet_config), "vae": (vae_from_torch, vae_config),
                "text_encoder": (clip_lib.clip_text_from_torch, text_config)}
  if sdxl:
    converters["text_encoder_2"] = (clip_lib.clip_text_from_torch, text_config_2)
  if abstract:
    shapes = {"unet": abstract_unet_params, "vae": abstract_vae_params,
              "text_encoder": clip_lib.abstract_clip_text_params,
              "text_encoder_2": clip_lib.abstract_clip_text_params}
    params = {name: shapes[name](config, dtype) for name, (_, config) in converters.items()}
  else:
    params = pipeline_io.load_components(dirs, converters, _WEIGHT_BASENAMES, dtype, placement)

  # 3. Tokenizers (optional).
  tokenizers = {name: pipeline_io.load_tokenizer(dirs[name], "CLIPTokenizer")
                for name in ("tokenizer", "tokenizer_2") if name in dirs}
  return Pipeline(params=params, unet_config=unet_config, vae_config=vae_config,
                  text_config=text_config, scheduler_config=scheduler_config,
                  tokenizer=tokenizers.get("tokenizer"), dtype=dtype,
                  compute_dtype=compute_dtype, attention_implementation=attention_implementation,
                  remat=remat, model_index=model_index, text_config_2=text_config_2,
                  tokenizer_2=tokenizers.get("tokenizer_2"), abstract=abstract)



# ================================================================================================
# Saving.
# ================================================================================================
def save_pipeline(pipe, path, overwrite: bool = False) -> str:
  """Writes `pipe` (a `Pipeline` or a `flow_pipeline.FlowPipeline`) in diffusers format,
  loadable by its diffusers pipeline class's `from_pretrained`.

  Weights are written as float32 safetensors (PyTorch layout). Only the components this
  library models are written: other model_index.json components (e.g. SD 1.5's
  safety_checker, feature_extractor) are set to null. The output is assembled in a temporary
  directory next to `path` and renamed into place at the end, so `path` never holds a
  half-written pipeline. `path` must be missing or empty, or (with `overwrite`) a pipeline
  written here before that holds only the files listed in its `ddpo_jax_pipeline.json`,
  unchanged (`pipeline_io.check_output_dir`): nothing else is ever replaced.

  Returns:
    `path`.

  Raises:
    FileExistsError: `path` holds something that is not replaced (`pipeline_io.check_output_dir`).
  """
  fill = (functools.partial(flow_pipeline.write_flow_pipeline, pipe)
          if isinstance(pipe, flow_pipeline.FlowPipeline)
          else functools.partial(_write_unet_pipeline, pipe))
  return pipeline_io.save_directory(path, overwrite, fill,
                                    "ddpo_jax.models.pipeline.save_pipeline")


def _write_unet_pipeline(pipe: Pipeline, tmp: str) -> None:
  if pipe.model_index:
    index = dict(pipe.model_index)
  elif pipe.is_sdxl:
    index = {"_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.30.0",
             "force_zeros_for_empty_prompt": True}
  else:
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
             "feature_extractor": [None, None], "safety_checker": [None, None]}
  for name, value in list(index.items()):  # components not written (safety checker, ...)
    if (not name.startswith("_") and isinstance(value, list) and len(value) == 2
        and name not in COMPONENTS):
      index[name] = [None, None]
  if not pipe.is_sdxl:
    index["requires_safety_checker"] = False
  for name, cls in _CLASSES.items():
    if pipe.is_sdxl or not name.endswith("_2"):
      index[name] = list(cls)
  for name in ("tokenizer", "tokenizer_2"):
    if getattr(pipe, name) is None and name in index:
      index[name] = [None, None]
  scheduler_config = dict(pipe.scheduler_config)
  scheduler_config.setdefault("_class_name", "DDIMScheduler")
  index["scheduler"] = ["diffusers", scheduler_config["_class_name"]]
  write_json(index, os.path.join(tmp, "model_index.json"))

  components = {
      "unet": (pipe.unet_config.to_dict(), unet_to_torch(pipe.params["unet"], pipe.unet_config)),
      "vae": (pipe.vae_config.to_dict(), vae_to_torch(pipe.params["vae"], pipe.vae_config)),
      "text_encoder": (pipe.text_config.to_dict(),
                       clip_lib.clip_text_to_torch(pipe.params["text_encoder"],
                                                   pipe.text_config)),
  }
  if pipe.is_sdxl:
    components["text_encoder_2"] = (
        pipe.text_config_2.to_dict(),
        clip_lib.clip_text_to_torch(pipe.params["text_encoder_2"], pipe.text_config_2))
  for name, (config, state_dict) in components.items():
    pipeline_io.write_component(tmp, name, config, state_dict, _WEIGHT_BASENAMES[name])
  os.makedirs(os.path.join(tmp, "scheduler"))
  write_json(scheduler_config, os.path.join(tmp, "scheduler", "scheduler_config.json"))
  for name in ("tokenizer", "tokenizer_2"):
    if getattr(pipe, name) is not None:
      getattr(pipe, name).save_pretrained(os.path.join(tmp, name))
