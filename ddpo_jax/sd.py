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
  the LoRA factors (`ddpo_jax.lora`), the base UNet sits frozen in `params["base_unet"]` (in
  `model.dtype`), and `Policy.assemble_unet(lora, frozen)` pairs them
  (`models.adapters.LoraAdapted`): sampling and the update both run each adapted layer as
  x W + s (x A) B, unmerged, the adapter branch in float32 (no merged copy of the kernels). At
  init the adapted UNet equals the base one exactly. `export` merges the factors.

Config (`config.model`, docs/config.md): pretrained_path, resolution, dtype,
compute_dtype, attention_implementation, remat, lora.{enabled, rank, alpha, targets, init_std,
seed}. Prompts: `config.prompt_fn` (a `ddpo_jax.prompts` set name) with
`config.prompt_fn_kwargs.{path, prompts, activities_path}` ("" / () = unset).
"""
from __future__ import annotations

import functools
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ddpo_jax import lora as lora_lib
from ddpo_jax import prompts as prompts_lib
from ddpo_jax.policy import Policy
from ddpo_jax.models.pipeline import load_pipeline


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


def _dtype(name: str):
  try:
    return jnp.dtype(name)
  except TypeError as e:
    raise ValueError(f"unknown dtype {name!r} (use 'float32' or 'bfloat16')") from e


@functools.lru_cache(maxsize=2)
def _load(path: str, stamp, dtype: str, compute_dtype: str, attention: str, remat: bool):
  """Loads (and caches) a pipeline: the sample CLI and the exporter build policies repeatedly.
  `stamp` (model_index.json's mtime for a directory) makes a rewritten directory load again."""
  del stamp
  return load_pipeline(path, _dtype(dtype), compute_dtype=_dtype(compute_dtype),
                       attention_implementation=attention, remat=remat)


def pretrained_directory(model_config) -> str:
  """The local directory `model.pretrained_path` loads from: the directory itself, or a Hub
  id's snapshot in the local Hugging Face cache (no download: the model loads first)."""
  path = os.path.expanduser(model_config.pretrained_path)
  if os.path.isdir(path):
    return os.path.abspath(path)
  from huggingface_hub import snapshot_download
  return snapshot_download(path, local_files_only=True)


def load_model_pipeline(model_config):
  """The `Pipeline` of `config.model` (raises `PipelineLoadError` for a bad path)."""
  path = model_config.pretrained_path
  if not path:
    raise ValueError("config.model.pretrained_path is empty: give a diffusers Stable Diffusion "
                     "directory or a Hub id (e.g. --config.model.pretrained_path=DIR)")
  path = os.path.expanduser(path)
  stamp = None
  if os.path.isdir(path):
    path = os.path.abspath(path)
    index = os.path.join(path, "model_index.json")
    stamp = os.path.getmtime(index) if os.path.exists(index) else None
  return _load(path, stamp, model_config.dtype, model_config.compute_dtype,
               model_config.attention_implementation, bool(model_config.remat))


def make_policy(config) -> Policy:
  """The SD policy of `config` (see the module docstring). Errors are raised here, before any
  compilation: bad prompt set / file, bad model path, resolution, LoRA targets."""
  mc = config.model
  prompt_fn = make_prompt_fn(config)  # cheap checks first
  pipe = load_model_pipeline(mc)
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

  def eps_fn(p_unet, x, t, cond, class_labels=None, added_time_emb=None):
    """The denoiser's prediction (N,H,W,C) float32 of latents x at timesteps t (N,) under
    `cond` (`pipe.encode`): eps (SD, SDXL) or the flow velocity (SD3 / FLUX, t = 1000 sigma).
    `added_time_emb` (N, time_embed_dim) is CTRL's control embedding (UNets only)."""
    del class_labels  # SD has no class conditioning
    if embedded is not None:  # FLUX.1-dev: the guidance scale is a transformer input
      return pipe.denoise(p_unet, x, t, cond, guidance=embedded)
    if added_time_emb is None:
      return pipe.denoise(p_unet, x, t, cond)
    return pipe.denoise(p_unet, x, t, cond, added_time_emb=added_time_emb)

  def decode(p, x0):
    """Diffusion latents (N,h,w,4) -> images (N,H,W,3) float32 in [0, 1]."""
    return jnp.clip(pipe.vae_decode(p["vae"], x0) / 2.0 + 0.5, 0.0, 1.0)

  def encode_images(p, images):
    """Images (N,H,W,3) float32 in [0, 1] -> diffusion latents (N,h,w,4) (VAE posterior mean)."""
    return pipe.vae_encode(p["vae"], images * 2.0 - 1.0)

  def tokenize(prompts: Sequence[str]) -> np.ndarray:
    """Prompts -> (N, model_max_length) int32 ids, padded and truncated (SDXL: (N, 2, L))."""
    return pipe.tokenize(list(prompts))

  return Policy(params=params, eps_fn=eps_fn, tokenize=tokenize, encode_prompts=pipe.encode,
                decode=decode, encode_images=encode_images, latent_shape=shape,
                scheduler_config=dict(pipe.scheduler_config), prompt_fn=prompt_fn,
                prompt_metadata=prompt_metadata, pipeline=pipe, assemble_unet=assemble,
                time_embed_dim=getattr(getattr(pipe, "unet_config", None), "time_embed_dim", 0),
                uncond_fn=pipe.uncond, prediction_type=pipe.prediction_type,
                flow_sigmas=(functools.partial(pipe.sigmas, height=shape[0], width=shape[1])
                             if pipe.prediction_type == "flow" else None))


def prompt_metadata(prompts: Sequence[str]) -> dict[str, np.ndarray]:
  """SD rewards read images and prompt strings only: no metadata."""
  del prompts
  return {}
