"""Stable Diffusion text-to-image as a DDPO policy (`config.model.kind = "sd"`).

The pipeline (a diffusers-format directory or a Hugging Face Hub id, `load_pipeline`) gives
the UNet (trained), the CLIP text encoder and the VAE (frozen). Prompts are tokenised with the
pipeline's CLIPTokenizer (padded to `model_max_length`, truncated), encoded by the text encoder
(last hidden state, (N, 77, 768) for SD 1.x); classifier-free guidance uses the empty prompt.
The diffusion variable is the VAE latent, (H/f, W/f, 4) for `model.resolution` H = W and the
VAE's downsampling factor f = 2^(number of VAE blocks − 1) (8 for SD); images are
`vae_decode(latents)` mapped to [0, 1] by (x/2 + 0.5).clip(0, 1).

Two fine-tuning modes:
- full UNet (`model.lora.enabled = False`): `params["unet"]` is the UNet, parameters in
  `model.dtype` (float32 master weights), activations in `model.compute_dtype` (bfloat16);
  optionally Adam's first moment in bfloat16 (`train.adam_mu_dtype`), as the JAX original.
- LoRA (`model.lora.enabled = True`, the PyTorch port's default): `params["unet"]` holds only
  the LoRA factors (`ddpo_jax.lora`), the base UNet sits frozen in `params["base_unet"]`, and
  `Policy.assemble_unet(lora, frozen)` merges them inside the compiled sampling and update
  programs (once per call, not per denoising step; only the adapted kernels are copied). At init
  the merged UNet equals the base one exactly.

Config (`config.model`, see `model_config_defaults`): pretrained_path, resolution, dtype,
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
import ml_collections
import numpy as np

from ddpo_jax import lora as lora_lib
from ddpo_jax import prompts as prompts_lib
from ddpo_jax.config_defaults import split_variants
from ddpo_jax.policy import Policy

DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"  # the DDPO paper's base model


def model_config_defaults() -> ml_collections.ConfigDict:
  """Defaults of `config.model` for Stable Diffusion (used by the configs/sd_*.py files)."""
  m = ml_collections.ConfigDict()
  m.kind = "sd"
  m.pretrained_path = DEFAULT_MODEL  # a diffusers pipeline directory or a Hub id
  m.resolution = 512  # image side in pixels (latents are resolution / 8 for SD)
  m.dtype = "float32"  # parameter dtype (master weights)
  m.compute_dtype = "bfloat16"  # activation dtype of the UNet, VAE and text encoder
  m.attention_implementation = "auto"  # "auto" | "xla" | "cudnn"
  m.remat = False  # gradient checkpointing of the UNet blocks (less memory, ~30% slower)
  m.lora = ml_collections.ConfigDict()
  m.lora.enabled = True
  m.lora.rank = 4
  m.lora.alpha = 4.0  # scale alpha / rank = 1, as diffusers' LoRAAttnProcessor
  m.lora.targets = lora_lib.DEFAULT_TARGETS  # regexes searched in UNet module paths
  m.lora.init_std = 0.0  # std of A at init; 0 = 1 / rank
  m.lora.seed = 0
  return m


def prompt_config_defaults(config: ml_collections.ConfigDict, name: str) -> None:
  """Sets `config.prompt_fn = name` and an empty `config.prompt_fn_kwargs` (path, prompts,
  activities_path; "" / () mean unset: the named sets then read $DDPO_JAX_ASSETS)."""
  config.prompt_fn = name
  config.prompt_fn_kwargs = ml_collections.ConfigDict()
  config.prompt_fn_kwargs.path = ""
  config.prompt_fn_kwargs.prompts = ()
  config.prompt_fn_kwargs.activities_path = ""


def make_prompt_fn(config):
  """The training prompt function of `config.prompt_fn` / `config.prompt_fn_kwargs`.

  Raises (before anything is compiled): ValueError for an unknown set or an empty file/list,
  FileNotFoundError for a missing file.
  """
  kwargs = config.get("prompt_fn_kwargs") or ml_collections.ConfigDict()
  path = kwargs.get("path", "") or None
  prompts = tuple(kwargs.get("prompts", ()) or ()) or None
  activities = kwargs.get("activities_path", "") or None
  return prompts_lib.make_prompt_fn(config.prompt_fn, path=path, prompts=prompts,
                                    activities_path=activities)


def _dtype(name: str):
  try:
    return jnp.dtype(name)
  except TypeError as e:
    raise ValueError(f"unknown dtype {name!r} (use 'float32' or 'bfloat16')") from e


def latent_shape(pipe, resolution: int) -> tuple[int, int, int]:
  """(H/f, W/f, latent_channels) of a square image of side `resolution`.

  Raises:
    ValueError: `resolution` not a multiple of the VAE factor f, or the latent side not a
      multiple of the UNet's total downsampling.
  """
  vae_factor = 2 ** (len(pipe.vae_config.block_out_channels) - 1)
  unet_factor = 2 ** (len(pipe.unet_config.block_out_channels) - 1)
  if resolution <= 0 or resolution % (vae_factor * unet_factor):
    raise ValueError(
        f"model.resolution={resolution} must be a positive multiple of {vae_factor * unet_factor} "
        f"(the VAE downsamples by {vae_factor}, the UNet by a further {unet_factor})")
  side = resolution // vae_factor
  return (side, side, int(pipe.vae_config.latent_channels))


@functools.lru_cache(maxsize=2)
def _load(path: str, stamp, dtype: str, compute_dtype: str, attention: str, remat: bool):
  """Loads (and caches) a pipeline: the sample CLI and the exporter build policies repeatedly.
  `stamp` (model_index.json's mtime for a directory) makes a rewritten directory load again."""
  del stamp
  from ddpo_jax.models.pipeline import load_pipeline
  return load_pipeline(path, _dtype(dtype), compute_dtype=_dtype(compute_dtype),
                       attention_implementation=attention, remat=remat)


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
  if pipe.tokenizer is None:
    raise ValueError(f"{mc.pretrained_path}: the pipeline has no tokenizer/ directory")
  shape = latent_shape(pipe, int(mc.resolution))

  params = {"unet": pipe.params["unet"], "vae": pipe.params["vae"],
            "text_encoder": pipe.params["text_encoder"]}
  lora_cfg = None
  assemble = _identity_unet
  if mc.lora.enabled:
    lora_cfg = lora_lib.LoraConfig.from_config(mc.lora)
    lora_params = lora_lib.init_lora(pipe.params["unet"], lora_cfg,
                                     jax.random.PRNGKey(int(mc.lora.seed)))
    params = {**params, "unet": lora_params, "base_unet": pipe.params["unet"]}
    assemble = functools.partial(_merge_lora_into_base, scale=lora_cfg.scale)

  def eps_fn(p_unet, x, t, context, class_labels=None, added_time_emb=None):
    """eps (N,H,W,4) float32 of latents x (N,H,W,4) at timesteps t (N,), context (N,L,D);
    `added_time_emb` (N, time_embed_dim) is CTRL's control embedding."""
    del class_labels  # SD has no class conditioning
    return pipe.unet_apply(p_unet, x, t, context, added_time_emb=added_time_emb)

  def encode_prompts(p, ids):
    """ids (N,L) int32 -> CLIP last hidden state (N,L,D) float32."""
    return pipe.encode_prompt(p["text_encoder"], ids)

  def decode(p, x0):
    """Diffusion latents (N,h,w,4) -> images (N,H,W,3) float32 in [0, 1]."""
    return jnp.clip(pipe.vae_decode(p["vae"], x0) / 2.0 + 0.5, 0.0, 1.0)

  def encode_images(p, images):
    """Images (N,H,W,3) float32 in [0, 1] -> diffusion latents (N,h,w,4) (VAE posterior mean)."""
    return pipe.vae_encode(p["vae"], images * 2.0 - 1.0)

  def tokenize(prompts: Sequence[str]) -> np.ndarray:
    """Prompts -> (N, model_max_length) int32 ids, padded and truncated."""
    return pipe.tokenize(list(prompts))

  return Policy(params=params, eps_fn=eps_fn, tokenize=tokenize, encode_prompts=encode_prompts,
                decode=decode, encode_images=encode_images, latent_shape=shape, scheduler_config=dict(pipe.scheduler_config),
                prompt_fn=prompt_fn, prompt_metadata=prompt_metadata,
                pipeline=pipe, assemble_unet=assemble,
                time_embed_dim=pipe.unet_config.time_embed_dim)


def _identity_unet(trainable, frozen):
  del frozen
  return trainable


def _merge_lora_into_base(trainable, frozen, scale: float):
  """`Policy.assemble_unet` of a LoRA run: the base UNet (frozen["base_unet"]) with the LoRA
  factors merged into its kernels."""
  return lora_lib.merge_lora(frozen["base_unet"], trainable, scale)


def prompt_metadata(prompts: Sequence[str]) -> dict[str, np.ndarray]:
  """SD rewards read images and prompt strings only: no metadata."""
  del prompts
  return {}


def sd_config(prompt_fn: str, reward_weights: dict) -> ml_collections.ConfigDict:
  """The common part of configs/sd_*.py: `ddpo_base()` with the SD model, the PyTorch port's
  LoRA optimisation (lr 3e-4) and sampling (50 DDIM steps, eta 1, CFG 5)."""
  from ddpo_jax.config_defaults import ddpo_base
  config = ddpo_base()
  config.model = model_config_defaults()
  prompt_config_defaults(config, prompt_fn)
  config.save_freq = 1  # LoRA checkpoints are small (the torch port saved every epoch)
  config.log_image_freq = 5
  config.sample.num_steps = 50
  config.sample.eta = 1.0
  config.sample.guidance_scale = 5.0
  config.train.learning_rate = 3e-4
  config.train.timestep_fraction = 1.0
  config.train.num_inner_epochs = 1
  config.train.cfg = True
  config.train.adv_clip_max = 5.0
  config.train.clip_range = 1e-4
  config.reward.weights = ml_collections.ConfigDict(dict(reward_weights))
  config.reward.metrics = ()
  return config


TASKS = ("compressibility", "incompressibility", "aesthetic", "alignment")


def task_config(task: str, arg=None) -> ml_collections.ConfigDict:
  """The paper task configs (what configs/sd_TASK.py return), with the PyTorch port's
  hyperparameters translated to GLOBAL batch sizes; `arg` selects variants (`apply_variants`).

  - compressibility / incompressibility: ±JPEG kB, 398 ImageNet animals, 100 epochs × 256
    samples (32 per sampling call × 8), optimizer steps of 64 samples (8 × 8 accumulated; the
    port's 8 GPUs × 4 × 2), 4 per epoch; stat tracking buffer 16, min 16.
  - aesthetic: LAION aesthetic score, 45 simple animals, 200 epochs × 256, steps of 128 samples
    (8 × 16; the port's 8 × 4 × 4), 2 per epoch; buffer 32, min 16.
  - alignment: reward server ("remote"), "a(n) ANIMAL ACTIVITY", 200 epochs × 288 (32 × 9), steps
    of 144 samples (8 × 18; the port's 6 GPUs × 4 × 6), 2 per epoch; buffer 32, min 16.
  All: LoRA rank 4 on the attention projections, lr 3e-4, 50 DDIM steps, eta 1, CFG 5.
  """
  if task not in TASKS:
    raise ValueError(f"unknown SD task {task!r}; known: {TASKS}")
  prompt_set = {"aesthetic": "simple_animals",
                "alignment": "simple_animals_activities"}.get(task, "imagenet_animals")
  reward = {"compressibility": "jpeg_compressibility",
            "incompressibility": "jpeg_incompressibility",
            "aesthetic": "aesthetic", "alignment": "remote"}[task]
  config = sd_config(prompt_set, {reward: 1.0})
  config.num_epochs = 100
  config.sample.batch_size = 32
  config.sample.num_batches_per_epoch = 8
  config.train.batch_size = 8
  config.train.gradient_accumulation_steps = 8
  config.per_prompt_stat_tracking.enabled = True
  config.per_prompt_stat_tracking.buffer_size = 16
  config.per_prompt_stat_tracking.min_count = 16
  if task == "aesthetic":
    config.num_epochs = 200
    config.train.gradient_accumulation_steps = 16
    config.per_prompt_stat_tracking.buffer_size = 32
  if task == "alignment":
    config.num_epochs = 200
    config.sample.num_batches_per_epoch = 9
    config.train.gradient_accumulation_steps = 18
    config.per_prompt_stat_tracking.buffer_size = 32
  return apply_variants(config, arg)


def apply_variants(config: ml_collections.ConfigDict, arg) -> ml_collections.ConfigDict:
  """Applies the comma-separated variants of `get_config(arg)`: "full" (full UNet fine-tuning
  as the JAX original: lr 1e-5, Adam first moment in bfloat16, fewer kept checkpoints) and
  "runlocal" (seconds on a CPU against a tiny pipeline given by model.pretrained_path)."""
  variants = split_variants(arg, ("full", "runlocal"), "Stable Diffusion")
  if "full" in variants:
    config.model.lora.enabled = False
    config.train.learning_rate = 1e-5
    config.train.adam_mu_dtype = "bfloat16"
    config.save_freq = 10
    config.keep_checkpoints = 3
  if "runlocal" in variants:
    runlocal(config)
  return config


def runlocal(config: ml_collections.ConfigDict) -> None:
  """Tiny settings: 2 epochs of 4 samples, 4 DDIM steps, 16×16 images, float32 on CPU.
  `model.pretrained_path` must name a (tiny) pipeline directory."""
  config.model.pretrained_path = ""
  config.model.resolution = 16
  config.model.compute_dtype = "float32"
  config.model.lora.rank = 2
  config.model.lora.alpha = 2.0
  config.num_epochs = 2
  config.save_freq = 1
  config.keep_checkpoints = 0
  config.log_image_freq = 1
  config.progress = False
  config.sample.num_steps = 4
  config.sample.batch_size = 4
  config.sample.num_batches_per_epoch = 1
  config.train.batch_size = 2
  config.train.gradient_accumulation_steps = 2
  config.per_prompt_stat_tracking.buffer_size = 4
  config.per_prompt_stat_tracking.min_count = 2
