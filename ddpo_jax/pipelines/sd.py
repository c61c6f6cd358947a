"""Stable Diffusion (1.x / 2.x, SDXL) text-to-image as a DDPO policy (`config.model.kind = "sd"`).

The pipeline (a diffusers-format directory or a Hugging Face Hub id, `load_pipeline`) gives
the UNet (trained), the CLIP text encoder(s) and the VAE (frozen). Prompts are tokenised with the
pipeline's CLIPTokenizer (padded to `model_max_length`, truncated), encoded by the text encoder
(last hidden state, (N, 77, 768) for SD 1.x); classifier-free guidance uses the empty prompt.
SDXL: the conditioning is {"context": (N, 77, 2048), "text_embeds": (N, 1280)}
(`Pipeline.encode_prompt`), the UNet's time ids are the image size with no crop, and the
unconditional half of guidance is zeros (`force_zeros_for_empty_prompt`, as diffusers); CTRL
on SDXL is not supported yet.
The diffusion variable is the VAE latent, (H/f, W/f, 4) for `model.resolution` H = W and the
VAE's downsampling factor f = 2^(number of VAE blocks − 1) (8 for SD); images are
`vae_decode(latents)` mapped to [0, 1] by (x/2 + 0.5).clip(0, 1).

Two fine-tuning modes:
- full UNet (`model.lora.enabled = False`): `params["unet"]` is the UNet, parameters in
  `model.dtype` (float32 master weights), activations in `model.compute_dtype` (bfloat16);
  optionally Adam's first moment in bfloat16 (`train.adam_mu_dtype`), as the JAX original.
- LoRA (`model.lora.enabled = True`, the PyTorch port's default): `params["unet"]` holds only
  the LoRA factors (`ddpo_jax.models.lora`), the base UNet sits frozen in `params["base_unet"]` (in
  `model.dtype`), and `Policy.assemble_denoiser(lora, frozen)` pairs them
  (`models.adapters.LoraAdapted`): sampling and the update both run each adapted layer as
  x W + s (x A) B, unmerged, the adapter branch in float32 (no merged copy of the kernels). At
  init the adapted UNet equals the base one exactly. `export` merges the factors.

Config (`config.model`, docs/config.md): pretrained_path, resolution, dtype,
compute_dtype, attention_implementation, remat, lora.{enabled, rank, alpha, targets, init_std,
seed}. Prompts: `config.prompt_fn` (a `ddpo_jax.tasks.prompts` set name) with
`config.prompt_fn_kwargs.{path, prompts, activities_path}` ("" / () = unset).
"""
from __future__ import annotations

import functools
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ddpo_jax.models import lora as lora_lib, published_configs
from ddpo_jax.models.pipeline import load_pipeline
from ddpo_jax.pipelines.denoiser import Denoiser
from ddpo_jax.pipelines.policy import Policy
from ddpo_jax.tasks import prompts as prompts_lib


def make_prompt_fn(config):
  """The training prompt function of `config.prompt_fn` / `config.prompt_fn_kwargs`.

  Raises (before anything is compiled): ValueError for an unknown set or an empty file/list,
  FileNotFoundError for a missing file.
  """
  kwargs = config.prompt_fn_kwargs
  path = kwargs.path or None
  prompts = tuple(kwargs.prompts) or None
  activities = kwargs.activities_path or None
  return prompts_lib.make_prompt_fn(config.prompt_fn, path=path, prompts=prompts,
                                    activities_path=activities)


def _no_prompts(rng, n: int) -> list[str]:
  """An abstract policy's prompt function: n empty prompts (only the ids' shape matters)."""
  del rng
  return [""] * n


def _dtype(name: str):
  try:
    return jnp.dtype(name)
  except TypeError as e:
    raise ValueError(f"unknown dtype {name!r} (use 'float32' or 'bfloat16')") from e


@functools.lru_cache(maxsize=2)
def _load(path: str, stamp, dtype: str, compute_dtype: str, attention: str, remat: bool,
          abstract: bool):
  """Loads (and caches) a pipeline: the sample CLI and the exporter build policies repeatedly.
  `stamp` (model_index.json's mtime for a directory) makes a rewritten directory load again."""
  del stamp
  return load_pipeline(path, _dtype(dtype), compute_dtype=_dtype(compute_dtype),
                       attention_implementation=attention, remat=remat, abstract=abstract)


def pretrained_directory(model_config) -> str:
  """The local directory `model.pretrained_path` loads from: the directory itself, or a Hub
  id's snapshot in the local Hugging Face cache (no download: the model loads first)."""
  path = os.path.expanduser(model_config.pretrained_path)
  if os.path.isdir(path):
    return os.path.abspath(path)
  from huggingface_hub import snapshot_download
  return snapshot_download(path, local_files_only=True)


# The files of a diffusers directory that a run's weights fingerprint covers (weights, configs,
# tokenizers).
_WEIGHT_SUFFIXES = (".safetensors", ".json", ".txt", ".model")


def weight_files(model_config) -> tuple[str, list[str]]:
  """(directory, relative paths) of every weight, config and tokenizer file of the pipeline
  `model.pretrained_path` loads (a Hub id: its local snapshot); `families.base_weights`
  fingerprints them."""
  directory = pretrained_directory(model_config)
  files = []
  for root, dirs, names in os.walk(directory, followlinks=True):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    files += [os.path.relpath(os.path.join(root, n), directory) for n in names
              if n.endswith(_WEIGHT_SUFFIXES) and not n.startswith(".")]
  return directory, files


def load_model_pipeline(model_config, abstract: bool = False):
  """The `Pipeline` of `config.model` (raises `PipelineLoadError` for a bad path).

  `abstract`: parameter shapes from the configs only (`load_pipeline(..., abstract=True)`); a
  Hub id that is not a local directory reads the configs shipped with the package
  (`published_configs`), so nothing is downloaded."""
  path = model_config.pretrained_path
  if not path:
    raise ValueError("config.model.pretrained_path is empty: give a diffusers Stable Diffusion "
                     "directory or a Hub id (e.g. --config.model.pretrained_path=DIR)")
  path = os.path.expanduser(path)
  stamp = None
  if abstract and not os.path.isdir(path):
    path = published_configs.directory(path)
  if os.path.isdir(path):
    path = os.path.abspath(path)
    index = os.path.join(path, "model_index.json")
    stamp = os.path.getmtime(index) if os.path.exists(index) else None
  return _load(path, stamp, model_config.dtype, model_config.compute_dtype,
               model_config.attention_implementation, bool(model_config.remat), abstract)


def make_denoiser(pipe, latent_shape, embedded_guidance: float | None = None) -> Denoiser:
  """The `Denoiser` of a loaded pipeline's UNet or transformer at `latent_shape` (h, w, C):
  "eps" on the UNet's DDPM schedule (SD 1.x/2.x, SDXL; it takes CTRL's added time
  embedding), "velocity" on the flow schedule at that resolution (SD3 / 3.5, FLUX.1; called
  at 1000 sigma). `embedded_guidance`: FLUX.1-dev's guidance input (None: none)."""

  def network(p_unet, x, t, cond, labels, added_time_emb):
    """The network's prediction (N,h,w,C) float32 of latents x at its own timesteps t (N,)
    (integer for SD / SDXL; 1000 sigma for SD3 / FLUX) under `cond` (`pipe.encode`)."""
    if labels is not None:
      raise ValueError("a diffusers pipeline's denoiser takes no class labels")
    if embedded_guidance is not None:  # FLUX.1-dev: the guidance scale is a transformer input
      return pipe.denoise(p_unet, x, t, cond, guidance=embedded_guidance)
    if added_time_emb is None:
      return pipe.denoise(p_unet, x, t, cond)
    return pipe.denoise(p_unet, x, t, cond, added_time_emb=added_time_emb)

  h, w = latent_shape[0], latent_shape[1]
  if pipe.prediction_type == "flow":
    return Denoiser(prediction="velocity", network=network, latent_shape=latent_shape,
                    scheduler_config=dict(pipe.scheduler_config),
                    flow_sigmas=lambda n: pipe.sigmas(n, height=h, width=w)[0])
  return Denoiser(prediction="eps", network=network, latent_shape=latent_shape,
                  scheduler_config=dict(pipe.scheduler_config),
                  time_embed_dim=getattr(getattr(pipe, "unet_config", None), "time_embed_dim", 0))


def make_policy(config, abstract: bool = False) -> Policy:
  """The SD policy of `config` (see the module docstring). Errors are raised here, before any
  compilation: bad prompt set / file, bad model path, resolution, LoRA targets. `abstract`:
  its params are `jax.ShapeDtypeStruct`s read from the configs alone (`load_model_pipeline`),
  for compiling, not running."""
  mc = config.model
  # cheap checks first; an abstract policy draws no prompts (its token ids are placeholders)
  prompt_fn = _no_prompts if abstract else make_prompt_fn(config)
  pipe = load_model_pipeline(mc, abstract)
  try:
    pipe.tokenize([""])
  except ValueError as e:
    raise ValueError(f"{mc.pretrained_path}: {e}") from e
  if config.mode == "ctrl" and (pipe.prediction_type != "epsilon" or pipe.is_sdxl):
    raise ValueError(f"{mc.pretrained_path}: CTRL on SDXL and the flow models is not "
                     "supported yet, only on SD 1.x / 2.x (its controls use SD's single "
                     "context array and the UNet's time embedding); DDPO is")
  if pipe.guidance_kind != "cfg" and float(config.sample.guidance_scale) != 1.0:
    what = ("embeds its guidance scale (FLUX.1-dev: model.embedded_guidance)"
            if pipe.guidance_kind == "embedded" else "is sampled without guidance (FLUX.1-schnell)")
    raise ValueError(f"{mc.pretrained_path}: this transformer {what}; set "
                     f"sample.guidance_scale=1 (no classifier-free guidance; got "
                     f"{config.sample.guidance_scale})")
  embedded = float(mc.embedded_guidance) if pipe.guidance_kind == "embedded" else None
  try:
    shape = pipe.latent_shape(int(mc.resolution))
  except ValueError as e:
    raise ValueError(f"model.{e}") from e

  # The trained denoiser is params["unet"] whatever the family (a UNet or a transformer);
  # the rest (vae, text encoders) is frozen.
  params = {("unet" if k == pipe.denoiser else k): v for k, v in pipe.params.items()}
  params, assemble = lora_lib.adapted_policy_params(params, mc)

  denoiser = make_denoiser(pipe, shape, embedded)

  def decode(p, x0):
    """Diffusion latents (N,h,w,4) -> images (N,H,W,3) float32 in [0, 1]."""
    return jnp.clip(pipe.vae_decode(p["vae"], x0) / 2.0 + 0.5, 0.0, 1.0)

  def encode_images(p, images):
    """Images (N,H,W,3) float32 in [0, 1] -> diffusion latents (N,h,w,4) (VAE posterior mean)."""
    return pipe.vae_encode(p["vae"], images * 2.0 - 1.0)

  def tokenize(prompts: Sequence[str]) -> np.ndarray:
    """Prompts -> (N, model_max_length) int32 ids, padded and truncated (SDXL: (N, 2, L))."""
    return pipe.tokenize(list(prompts))

  return Policy(params=params, denoiser=denoiser, tokenize=tokenize,
                encode_prompts=pipe.encode, decode=decode, encode_images=encode_images,
                prompt_fn=prompt_fn, prompt_metadata=prompt_metadata, pipeline=pipe,
                assemble_denoiser=assemble, uncond_fn=pipe.uncond)


def prompt_metadata(prompts: Sequence[str]) -> dict[str, np.ndarray]:
  """SD rewards read images and prompt strings only: no metadata."""
  del prompts
  return {}
