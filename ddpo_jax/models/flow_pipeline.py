"""Stable Diffusion 3 / 3.5 and FLUX.1 pipelines in diffusers format: load, save, encode, denoise.

The flow-matching families: a transformer predicts the velocity v = eps - x0 of
x_sigma = (1 - sigma) x0 + sigma eps (`ddpo_jax.numerics.flow`), in the latent space of a 16-channel VAE
with `scaling_factor` and `shift_factor`.

A `FlowPipeline` offers the interface every pipeline of this package offers the trainer and
the samplers (the UNet families' `pipeline.Pipeline` has the same members), so that code
written against it never asks which family it holds:

  prediction_type                  "flow" (velocity); the UNet families say "epsilon"
  denoiser                         the params entry of the network that is fine-tuned
                                   ("transformer"; the UNet families: "unet")
  tokenize(prompts)                host: list of str -> (B, L) int32, every tokenizer's ids
                                   side by side along L (`token_segments` says where)
  encode(params, ids)              -> conditioning {"context": (B, M, D), "pooled": (B, P)}
                                   float32; prompts are encoded once, the encoders are frozen
  uncond(params)                   the conditioning of the empty prompt, batch 1 (the
                                   negative prompt of classifier-free guidance)
  denoise(p, latents, t, cond)     latents (B, h, w, C) NHWC, t (B,) float32 = 1000 sigma
                                   -> the velocity (B, h, w, C) float32
  vae_encode / vae_decode          images (B, H, W, 3) in [-1, 1] <-> diffusion latents
  latent_shape(resolution)         (h, w, C) of a square image, or a ValueError naming it
  default_resolution / default_sampling   the diffusers pipeline's default image side and
                                   (steps, guidance scale)
  guidance_kind                    "cfg" | "embedded" (FLUX.1-dev) | "none" (schnell): what
                                   the guidance scale means for the sampler
  scheduler_config / schedule      the FlowMatchEulerDiscreteScheduler config, as a
                                   `flow.FlowSchedule`; `image_seq_len(h, w)` for FLUX's
                                   resolution-dependent shift

Conditioning, as diffusers' pipelines build it (`StableDiffusion3Pipeline.encode_prompt`,
`FluxPipeline.encode_prompt`):

* SD3 / SD3.5: CLIP-L (`text_encoder`) and OpenCLIP bigG (`text_encoder_2`), both
  `CLIPTextModelWithProjection`: their penultimate hidden states concatenated along the
  features (768 + 1280), zero-padded to the T5 width (joint_attention_dim, 4096), then
  concatenated with the T5-XXL tokens (`text_encoder_3`, 256 tokens) along the sequence:
  context (B, 77 + 256, 4096). pooled = both projected text embeddings, (B, 768 + 1280). The
  T5 encoder may be absent (model_index.json null): its tokens are then zeros.
* FLUX.1: context = the T5-XXL tokens (`text_encoder_2`, 512 tokens), pooled = CLIP-L's
  (`text_encoder`, `CLIPTextModel`) pooled output (B, 768). FLUX.1-dev embeds the guidance
  scale in the transformer (`guidance_embedded`): `denoise(..., guidance=...)` takes it and
  sampling uses no classifier-free guidance; schnell has neither.

The FLUX transformer works on 2 x 2-packed tokens; `denoise` packs and unpacks, so the
diffusion variable of both families is the NHWC latent.

Directory layout: model_index.json, transformer/, vae/, text_encoder*/ and tokenizer*/
(see `FAMILIES`), scheduler/. Loading checks everything (classes, configs against each other,
tokenizers for every encoder, the scheduler) before any weight is read, and raises
`PipelineLoadError` / `WeightLoadingError` naming the file, key or value.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ddpo_jax.models import (adapters, clip as clip_lib, flux as flux_lib, mmdit as mmdit_lib,
                             pipeline_io, t5 as t5_lib)
from ddpo_jax.models.pipeline_io import PipelineLoadError
from ddpo_jax.models.vae import (AutoencoderKL, VAEConfig, abstract_vae_params, vae_from_torch,
                                 vae_to_torch)
from ddpo_jax.numerics import flow

Dtype = Any


@dataclasses.dataclass(frozen=True)
class TextEncoderSpec:
  """One text encoder of a family: its component, tokenizer component and kind ("clip",
  "clip_projection" or "t5"), and whether the pipeline may lack it."""
  component: str
  tokenizer: str
  kind: str
  optional: bool = False

  @property
  def class_name(self) -> str:
    return {"clip": "CLIPTextModel", "clip_projection": "CLIPTextModelWithProjection",
            "t5": "T5EncoderModel"}[self.kind]


@dataclasses.dataclass(frozen=True)
class FamilySpec:
  """A flow-matching pipeline class: its transformer, text encoders, T5 length."""
  transformer_class: str
  encoders: tuple[TextEncoderSpec, ...]
  max_sequence_length: int  # T5 tokens (diffusers' pipeline default)


FAMILIES = {
    "StableDiffusion3Pipeline": FamilySpec(
        "SD3Transformer2DModel",
        (TextEncoderSpec("text_encoder", "tokenizer", "clip_projection"),
         TextEncoderSpec("text_encoder_2", "tokenizer_2", "clip_projection"),
         TextEncoderSpec("text_encoder_3", "tokenizer_3", "t5", optional=True)), 256),
    "FluxPipeline": FamilySpec(
        "FluxTransformer2DModel",
        (TextEncoderSpec("text_encoder", "tokenizer", "clip"),
         TextEncoderSpec("text_encoder_2", "tokenizer_2", "t5")), 512),
}
# model_index.json `_class_name` -> the components it must have.
PIPELINE_CLASSES = {
    name: ("transformer", "vae", "scheduler")
          + tuple(e.component for e in spec.encoders if not e.optional)
    for name, spec in FAMILIES.items()}
WEIGHT_BASENAMES = {"transformer": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model",
                    "text_encoder": "model", "text_encoder_2": "model", "text_encoder_3": "model"}
_TOKENIZER_CLASSES = {"clip": ("CLIPTokenizer", "CLIPTokenizerFast"),
                      "t5": ("T5Tokenizer", "T5TokenizerFast")}
_CONFIGS = {"clip": clip_lib.CLIPTextConfig, "clip_projection": clip_lib.CLIPTextConfig,
            "t5": t5_lib.T5Config}


@dataclasses.dataclass(eq=False)
class FlowPipeline:
  """An SD3 / SD3.5 or FLUX.1 pipeline: params, configs, tokenizers and pure functions.

  Attributes:
    params: {"transformer", "vae", and each present text encoder component} parameter trees
      (`dtype` arrays).
    pipeline_class: "StableDiffusion3Pipeline" or "FluxPipeline" (a key of `FAMILIES`).
    transformer_config: `mmdit.MMDiTConfig` (SD3) or `flux.FluxConfig` (FLUX).
    vae_config: the 16-channel `VAEConfig` (scaling_factor and shift_factor).
    text_configs: {encoder component: `CLIPTextConfig` or `T5Config`} of the present encoders.
    tokenizers: {tokenizer component: transformers tokenizer} of the present encoders.
    scheduler_config: scheduler/scheduler_config.json (FlowMatchEulerDiscreteScheduler).
    dtype / compute_dtype / attention_implementation / remat: as `pipeline.Pipeline`.
    model_index: the model_index.json it was loaded from (kept on save), or None.
    max_sequence_length: T5 tokens (default: the family's, 256 for SD3, 512 for FLUX).
    abstract: params are `jax.ShapeDtypeStruct`s and there are no tokenizers (`load_pipeline(
      ..., abstract=True)`): traced and compiled, not run; `tokenize` gives placeholder ids.
  """
  params: dict
  pipeline_class: str
  transformer_config: Any
  vae_config: VAEConfig
  text_configs: dict
  tokenizers: dict
  scheduler_config: dict
  dtype: Dtype = jnp.float32
  compute_dtype: Dtype = None
  attention_implementation: str = "auto"
  remat: bool = False
  model_index: dict | None = None
  max_sequence_length: int | None = None
  abstract: bool = False

  prediction_type = "flow"
  denoiser = "transformer"

  transformer: Any = dataclasses.field(init=False, repr=False)
  vae: AutoencoderKL = dataclasses.field(init=False, repr=False)
  text_encoders: dict = dataclasses.field(init=False, repr=False)
  schedule: flow.FlowSchedule = dataclasses.field(init=False, repr=False)
  vae_encode: Callable = dataclasses.field(init=False, repr=False)
  vae_decode: Callable = dataclasses.field(init=False, repr=False)

  def __post_init__(self):
    if self.pipeline_class not in FAMILIES:
      raise ValueError(f"FlowPipeline: pipeline_class={self.pipeline_class!r}; supported: "
                       f"{', '.join(FAMILIES)}")
    if self.max_sequence_length is None:
      self.max_sequence_length = self.spec.max_sequence_length
    compute = self.compute_dtype or self.dtype
    kw = dict(dtype=compute, param_dtype=self.dtype)
    module = (mmdit_lib.SD3Transformer2DModel if self.is_sd3 else flux_lib.FluxTransformer2DModel)
    self.transformer = module(self.transformer_config, attention_implementation=(
        self.attention_implementation), remat=self.remat, **kw)
    self.vae = AutoencoderKL(self.vae_config, attention_implementation=(
        self.attention_implementation), **kw)
    self.text_encoders = {}
    for enc in self.present_encoders:
      config = self.text_configs[enc.component]
      self.text_encoders[enc.component] = (
          t5_lib.T5EncoderModel(config, **kw) if enc.kind == "t5"
          else clip_lib.CLIPTextModel(config, **kw))
    self.schedule = flow.FlowSchedule.from_config(self.scheduler_config)
    self.vae_encode, self.vae_decode = _vae_functions(self.vae, self.vae_config)

  # ------------------------------------------------------------------------------ description
  @property
  def spec(self) -> FamilySpec:
    return FAMILIES[self.pipeline_class]

  @property
  def is_sd3(self) -> bool:
    return self.pipeline_class == "StableDiffusion3Pipeline"

  @property
  def present_encoders(self) -> tuple[TextEncoderSpec, ...]:
    return tuple(e for e in self.spec.encoders if e.component in self.text_configs)

  @property
  def guidance_embedded(self) -> bool:
    """FLUX.1-dev: the guidance scale is a transformer input, not classifier-free guidance."""
    return bool(getattr(self.transformer_config, "guidance_embeds", False))

  @property
  def guidance_kind(self) -> str:
    """How the diffusers pipeline applies its `guidance_scale`: "cfg" (SD3: classifier-free
    guidance with the negative prompt), "embedded" (FLUX.1-dev: a transformer input), "none"
    (FLUX.1-schnell; FLUX's true CFG is off by default)."""
    if self.is_sd3:
      return "cfg"
    return "embedded" if self.guidance_embedded else "none"

  @property
  def vae_scale_factor(self) -> int:
    return 2 ** (len(self.vae_config.block_out_channels) - 1)

  @property
  def patch_size(self) -> int:
    """Latent cells per transformer token along each axis (2: SD3's patches, FLUX's packing)."""
    return self.transformer_config.patch_size if self.is_sd3 else 2

  @property
  def default_resolution(self) -> int:
    """Image side in pixels the diffusers pipeline samples at by default (its
    `default_sample_size` x vae_scale_factor: SD3's transformer sample_size, FLUX's 128)."""
    size = self.transformer_config.sample_size if self.is_sd3 else 128
    return int(size) * self.vae_scale_factor

  @property
  def default_sampling(self) -> tuple[int, float]:
    """(num_inference_steps, guidance_scale) of the diffusers pipeline's `__call__`: SD3 28
    steps, CFG 7.0; FLUX 28 steps, embedded guidance 3.5 (schnell ignores it)."""
    return (28, 7.0) if self.is_sd3 else (28, 3.5)

  def latent_shape(self, resolution: int) -> tuple[int, int, int]:
    """(h, w, C) of a square image of side `resolution` pixels.

    Raises:
      ValueError: `resolution` not a positive multiple of vae_scale_factor x patch_size, or
        (SD3) a patch grid larger than the position embedding's.
    """
    step = self.vae_scale_factor * self.patch_size
    if resolution <= 0 or resolution % step:
      raise ValueError(f"resolution={resolution} must be a positive multiple of {step} (the VAE "
                       f"downsamples by {self.vae_scale_factor}, the transformer takes "
                       f"{self.patch_size}x{self.patch_size} latent patches)")
    side = resolution // self.vae_scale_factor
    if self.is_sd3 and side // self.patch_size > self.transformer_config.pos_embed_max_size:
      raise ValueError(
          f"resolution={resolution}: a {side // self.patch_size}-patch side exceeds the "
          f"transformer's pos_embed_max_size={self.transformer_config.pos_embed_max_size} "
          f"(at most {self.transformer_config.pos_embed_max_size * step} pixels)")
    return (side, side, int(self.vae_config.latent_channels))

  def image_seq_len(self, height: int, width: int) -> int:
    """Transformer image tokens of an h x w latent (FLUX's dynamic shift depends on it)."""
    return (height // self.patch_size) * (width // self.patch_size)

  def sigmas(self, num_steps: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(sigmas (T+1,), timesteps (T,)) of the pipeline's Euler schedule for an h x w latent."""
    return self.schedule.sigmas(num_steps, self.image_seq_len(height, width)
                                if self.schedule.use_dynamic_shifting else None)

  # ------------------------------------------------------------------------------- prompts
  def clip_length(self, enc: TextEncoderSpec) -> int:
    length = int(self.text_configs[enc.component].max_position_embeddings)
    tokenizer = self.tokenizers.get(enc.tokenizer)
    return length if tokenizer is None else min(length, int(tokenizer.model_max_length))

  @property
  def token_segments(self) -> dict[str, tuple[int, int]]:
    """{encoder component: (start, stop)} of its ids in `tokenize`'s output."""
    out, start = {}, 0
    for enc in self.present_encoders:
      length = self.max_sequence_length if enc.kind == "t5" else self.clip_length(enc)
      out[enc.component] = (start, start + length)
      start += length
    return out

  def tokenize(self, prompts: str | list[str]) -> np.ndarray:
    """Prompts -> (B, L) int32: each present encoder's tokenizer's ids (padded to its length,
    truncated, as diffusers), side by side in `FAMILIES` order."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if self.abstract:  # shapes only: placeholder ids
      return np.zeros((len(prompts), max(stop for _, stop in self.token_segments.values())),
                      np.int32)
    ids = []
    for enc in self.present_encoders:
      start, stop = self.token_segments[enc.component]
      out = self.tokenizers[enc.tokenizer](prompts, padding="max_length", max_length=stop - start,
                                           truncation=True, return_tensors="np")
      ids.append(np.asarray(out.input_ids, np.int32))
    return np.concatenate(ids, axis=1)

  def encode(self, params: dict, ids: jax.Array) -> dict:
    """`tokenize`'s ids (B, L) -> {"context": (B, M, D), "pooled": (B, P)} float32 (module
    docstring); `params` is the whole dict (the text encoders' entries are read)."""
    segments = self.token_segments
    total = max(stop for _, stop in segments.values())
    if ids.ndim != 2 or ids.shape[1] != total:
      raise ValueError(f"{self.pipeline_class} encode: ids of shape {tuple(ids.shape)}; "
                       f"expected (B, {total}) from tokenize")
    outputs = {}
    for enc in self.present_encoders:
      start, stop = segments[enc.component]
      module = self.text_encoders[enc.component]
      p = {"params": params[enc.component]}
      if enc.kind == "t5":
        outputs[enc.component] = module.apply(p, ids[:, start:stop]).astype(jnp.float32)
      else:
        _, pooled, states = module.apply(p, ids[:, start:stop], output_hidden_states=True)
        outputs[enc.component] = (states[-2].astype(jnp.float32), pooled.astype(jnp.float32))
    b = ids.shape[0]
    width = self.transformer_config.joint_attention_dim
    if self.is_sd3:
      (h1, p1), (h2, p2) = outputs["text_encoder"], outputs["text_encoder_2"]
      clip = jnp.concatenate([h1, h2], axis=-1)
      clip = jnp.pad(clip, ((0, 0), (0, 0), (0, width - clip.shape[-1])))
      t5 = outputs.get("text_encoder_3")
      if t5 is None:  # no T5 in the pipeline: zeros, as diffusers
        t5 = jnp.zeros((b, self.max_sequence_length, width), jnp.float32)
      return {"context": jnp.concatenate([clip, t5], axis=1),
              "pooled": jnp.concatenate([p1, p2], axis=-1)}
    return {"context": outputs["text_encoder_2"], "pooled": outputs["text_encoder"][1]}

  def uncond(self, params: dict) -> dict:
    """The conditioning of the empty prompt, batch 1 (SD3's default negative prompt; FLUX
    samples without classifier-free guidance)."""
    return self.encode(params, jnp.asarray(self.tokenize([""])))

  # ------------------------------------------------------------------------------- denoiser
  def denoise(self, params_transformer, latents, timesteps, cond: dict, guidance=None):
    """The velocity (B, h, w, C) float32 of latents (B, h, w, C) at timesteps (B,) or scalar
    float = 1000 sigma, under `cond` (`encode`). FLUX.1-dev: `guidance` (B,) or scalar, the
    embedded guidance scale (required); other models take none."""
    b, h, w, _ = latents.shape
    t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32), (b,))
    if self.is_sd3:
      if guidance is not None:
        raise ValueError("SD3 transformers take no embedded guidance (use classifier-free "
                         "guidance)")
      out = adapters.apply(self.transformer, params_transformer, latents, t, cond["context"],
                           cond["pooled"])
      return out.astype(jnp.float32)
    if self.guidance_embedded != (guidance is not None):
      raise ValueError("FLUX: " + ("this transformer embeds the guidance scale (FLUX.1-dev): "
                                   "pass guidance" if self.guidance_embedded else
                                   "this transformer has no guidance embedding (schnell)"))
    if guidance is not None:
      guidance = jnp.broadcast_to(jnp.asarray(guidance, jnp.float32), (b,))
    text_ids = np.zeros((cond["context"].shape[1], 3), np.float32)
    out = adapters.apply(self.transformer, params_transformer, flux_lib.pack_latents(latents),
                         cond["context"], cond["pooled"], t / 1000.0, flux_lib.image_ids(h, w),
                         text_ids, guidance)
    return flux_lib.unpack_latents(out.astype(jnp.float32), h, w)


def _vae_functions(vae: AutoencoderKL, config: VAEConfig):
  scale, shift = float(config.scaling_factor), float(config.shift_factor or 0.0)

  def vae_encode(params_vae, images):
    """images (B,H,W,3) in [-1,1] -> diffusion latents (mean - shift) * scaling_factor."""
    mean, _ = vae.apply({"params": params_vae}, images, method=AutoencoderKL.encode)
    return (mean.astype(jnp.float32) - shift) * scale

  def vae_decode(params_vae, latents):
    """diffusion latents -> images (B,H,W,3) float32, nominally in [-1,1] (not clipped)."""
    z = latents.astype(jnp.float32) / scale + shift
    return vae.apply({"params": params_vae}, z, method=AutoencoderKL.decode).astype(jnp.float32)

  return vae_encode, vae_decode


# ================================================================================================
# Loading and saving.
# ================================================================================================
def load_flow_pipeline(root: str, model_index: dict, *, dtype=jnp.float32,
                       attention_implementation: str = "auto", remat: bool = False,
                       compute_dtype=None, placement=None, abstract: bool = False
                       ) -> FlowPipeline:
  """Loads an SD3 / FLUX.1 pipeline directory (`pipeline.load_pipeline` dispatches here);
  `abstract`: configs only, parameter shapes instead of weights, no tokenizers.

  Raises:
    PipelineLoadError: a missing or unsupported component, an encoder without its tokenizer,
      configs that do not fit together, an unsupported scheduler (naming file and key).
    WeightLoadingError: missing/unexpected keys or shape mismatches (naming file and keys).
  """
  pipeline_class = model_index["_class_name"]
  spec = FAMILIES[pipeline_class]
  accepted = {"transformer": (spec.transformer_class,), "vae": ("AutoencoderKL",),
              "scheduler": ()}
  for enc in spec.encoders:
    accepted[enc.component] = (enc.class_name,)
    if not abstract:
      accepted[enc.tokenizer] = _TOKENIZER_CLASSES["t5" if enc.kind == "t5" else "clip"]
  dirs = pipeline_io.component_dirs(root, model_index, accepted, PIPELINE_CLASSES[pipeline_class])
  encoders = [e for e in spec.encoders if e.component in dirs]
  for enc in encoders:
    if enc.tokenizer not in dirs and not abstract:
      raise PipelineLoadError(
          f"{root}: component '{enc.component}' ({enc.class_name}) has no tokenizer: "
          f"'{enc.tokenizer}' is missing from model_index.json or has no directory "
          f"{os.path.join(root, enc.tokenizer)}")

  # 1. Configs, checked against each other before any weight is read.
  transformer_cls = mmdit_lib.MMDiTConfig if spec.transformer_class.startswith("SD3") \
      else flux_lib.FluxConfig
  transformer_config = pipeline_io.parse_config(dirs["transformer"], "transformer",
                                                transformer_cls.from_dict)
  vae_config = pipeline_io.parse_config(dirs["vae"], "vae", VAEConfig.from_dict)
  text_configs = {e.component: pipeline_io.parse_config(dirs[e.component], e.component,
                                                        _CONFIGS[e.kind].from_dict)
                  for e in encoders}
  scheduler_file = os.path.join(dirs["scheduler"], "scheduler_config.json")
  scheduler_config = pipeline_io.read_json(scheduler_file, "scheduler config")
  try:
    flow.FlowSchedule.from_config(scheduler_config)
  except ValueError as e:
    raise PipelineLoadError(f"{scheduler_file}: {e}") from e
  _check_configs(root, spec, transformer_config, vae_config, text_configs, encoders)

  # 2. Weights, one component (and with a lazy reader, one tensor) at a time.
  convert_transformer = (mmdit_lib.mmdit_from_torch if transformer_cls is mmdit_lib.MMDiTConfig
                         else flux_lib.flux_from_torch)
  converters = {"transformer": (convert_transformer, transformer_config),
                "vae": (vae_from_torch, vae_config)}
  for enc in encoders:
    convert = t5_lib.t5_from_torch if enc.kind == "t5" else clip_lib.clip_text_from_torch
    converters[enc.component] = (convert, text_configs[enc.component])
  if abstract:
    shapes = {mmdit_lib.mmdit_from_torch: mmdit_lib.abstract_mmdit_params,
              flux_lib.flux_from_torch: flux_lib.abstract_flux_params,
              vae_from_torch: abstract_vae_params, t5_lib.t5_from_torch: t5_lib.abstract_t5_params,
              clip_lib.clip_text_from_torch: clip_lib.abstract_clip_text_params}
    params = {name: shapes[convert](config, dtype)
              for name, (convert, config) in converters.items()}
  else:
    params = pipeline_io.load_components(dirs, converters, WEIGHT_BASENAMES, dtype, placement)

  # 3. Tokenizers (one per present encoder).
  tokenizers = {} if abstract else {e.tokenizer: pipeline_io.load_tokenizer(
      dirs[e.tokenizer], "T5TokenizerFast" if e.kind == "t5" else "CLIPTokenizer")
      for e in encoders}
  return FlowPipeline(params=params, pipeline_class=pipeline_class,
                      transformer_config=transformer_config, vae_config=vae_config,
                      text_configs=text_configs, tokenizers=tokenizers,
                      scheduler_config=scheduler_config, dtype=dtype, compute_dtype=compute_dtype,
                      attention_implementation=attention_implementation, remat=remat,
                      model_index=model_index, abstract=abstract)


def _check_configs(root, spec: FamilySpec, transformer_config, vae_config, text_configs,
                   encoders) -> None:
  """The configs fit together (widths, channels, projections), or a PipelineLoadError naming
  the transformer's config.json and the keys."""
  file = os.path.join(root, "transformer", "config.json")
  by_kind = {}
  for enc in encoders:
    by_kind.setdefault(enc.kind, []).append(text_configs[enc.component])
    with_projection = text_configs[enc.component].with_projection if enc.kind != "t5" else None
    if enc.kind != "t5" and with_projection != (enc.kind == "clip_projection"):
      raise PipelineLoadError(
          f"{os.path.join(root, enc.component, 'config.json')}: expected a {enc.class_name} "
          "(architectures)")
  width = transformer_config.joint_attention_dim
  for t5 in by_kind.get("t5", []):
    if t5.d_model != width:
      raise PipelineLoadError(f"{file}: joint_attention_dim={width} does not match the T5 "
                              f"encoder's d_model={t5.d_model}")
  channels = vae_config.latent_channels
  if spec.transformer_class == "SD3Transformer2DModel":
    clips = by_kind["clip_projection"]
    if sum(c.hidden_size for c in clips) > width:
      raise PipelineLoadError(
          f"{file}: joint_attention_dim={width} is narrower than the CLIP encoders' hidden "
          f"sizes {' + '.join(str(c.hidden_size) for c in clips)}")
    pooled = sum(c.projection_dim for c in clips)
    if transformer_config.pooled_projection_dim != pooled:
      raise PipelineLoadError(
          f"{file}: pooled_projection_dim={transformer_config.pooled_projection_dim} does not "
          f"match the CLIP encoders' projection_dim "
          f"{' + '.join(str(c.projection_dim) for c in clips)}")
    if transformer_config.in_channels != channels:
      raise PipelineLoadError(f"{file}: in_channels={transformer_config.in_channels} does not "
                              f"match the VAE's latent_channels={channels}")
  else:
    clip = by_kind["clip"][0]
    if transformer_config.pooled_projection_dim != clip.hidden_size:
      raise PipelineLoadError(
          f"{file}: pooled_projection_dim={transformer_config.pooled_projection_dim} does not "
          f"match the CLIP encoder's hidden_size={clip.hidden_size}")
    if transformer_config.in_channels != 4 * channels:
      raise PipelineLoadError(
          f"{file}: in_channels={transformer_config.in_channels} must be 4 x the VAE's "
          f"latent_channels={channels} (FLUX packs 2x2 latent cells into a token)")


def write_flow_pipeline(pipe: FlowPipeline, tmp: str) -> None:
  """Writes `pipe`'s components into the directory `tmp` (`pipeline.save_pipeline` makes it
  atomic): what `StableDiffusion3Pipeline` / `FluxPipeline.from_pretrained` loads."""
  spec = pipe.spec
  index = dict(pipe.model_index or {"_class_name": pipe.pipeline_class,
                                    "_diffusers_version": "0.30.0"})
  for name, value in list(index.items()):  # components not modelled here (image encoder, ...)
    if not name.startswith("_") and isinstance(value, list) and len(value) == 2:
      index[name] = [None, None]
  index["transformer"] = ["diffusers", spec.transformer_class]
  index["vae"] = ["diffusers", "AutoencoderKL"]
  for enc in pipe.present_encoders:
    index[enc.component] = ["transformers", enc.class_name]
    index[enc.tokenizer] = ["transformers", "T5TokenizerFast" if enc.kind == "t5"
                            else "CLIPTokenizer"]
  index["scheduler"] = ["diffusers", pipe.scheduler_config.get(
      "_class_name", "FlowMatchEulerDiscreteScheduler")]
  pipeline_io.write_json(index, os.path.join(tmp, "model_index.json"))

  transformer = (mmdit_lib.mmdit_to_torch(pipe.params["transformer"], pipe.transformer_config)
                 if pipe.is_sd3 else flux_lib.flux_to_torch(pipe.params["transformer"]))
  components = {"transformer": (pipe.transformer_config.to_dict(), transformer),
                "vae": (pipe.vae_config.to_dict(), vae_to_torch(pipe.params["vae"]))}
  for enc in pipe.present_encoders:
    config = pipe.text_configs[enc.component]
    state = (t5_lib.t5_to_torch(pipe.params[enc.component]) if enc.kind == "t5"
             else clip_lib.clip_text_to_torch(pipe.params[enc.component], config))
    components[enc.component] = (config.to_dict(), state)
  for name, (config, state) in components.items():
    pipeline_io.write_component(tmp, name, config, state, WEIGHT_BASENAMES[name])
    del state
  os.makedirs(os.path.join(tmp, "scheduler"))
  pipeline_io.write_json(dict(pipe.scheduler_config),
                         os.path.join(tmp, "scheduler", "scheduler_config.json"))
  for enc in pipe.present_encoders:
    pipe.tokenizers[enc.tokenizer].save_pretrained(os.path.join(tmp, enc.tokenizer))
