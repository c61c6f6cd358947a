"""The diffusion policy that DDPO fine-tunes: a denoiser, a frozen prompt encoder, a decoder.

A `Policy` hides which model family is underneath (the built-in digits model, a Stable
Diffusion pipeline) behind pure functions, so the sampler, the update and the CLIs are written
once. Only `params["unet"]` is trained; every other entry of `params` is frozen.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ddpo_jax.pipelines.denoiser import Denoiser


@dataclasses.dataclass(frozen=True)
class Policy:
  """A conditional diffusion model seen as a policy over denoising trajectories.

  Attributes:
    params: {"unet": trainable denoiser params, ...frozen params ("text_encoder", "vae")}.
    denoiser: the family's `denoiser.Denoiser` (what it predicts, its time convention, latent
      shape, noise schedule and label conditioning); called with the params that
      `assemble_denoiser` gives.
    tokenize: host function, prompts (list of str) -> token ids (N, L) int32 NumPy.
    encode_prompts: (params, ids (N,L) int32) -> context (N,L',D); `params` is the whole dict.
      The context may also be a pytree of arrays with the batch on axis 0 (SDXL:
      {"context": (N,L',D), "text_embeds": (N,P)}); the denoiser receives it as it is returned.
    decode: (params, x0 (N, *latent_shape)) -> images (N,h,w,c) float32 in [0, 1].
    prompt_fn: host function, (np.random.Generator, n) -> n training prompts (list of str).
    prompt_metadata: host function, prompts -> dict of (n,) NumPy arrays that rewards read
      (e.g. the digit class a prompt asks for); the same for drawn and user-given prompts.
    rewards: rewards the task itself defines, {name: `rewards.Reward`} (CTRL's log-likelihood
      and judge accuracies); `rewards.make_rewards` looks names up here first.
    pipeline: the diffusers-format pipeline a Stable Diffusion policy was loaded from
      (`models.pipeline.Pipeline`; `export` writes the trained weights back into it); None
      for other families.
    ctrl: `ctrl.controls.ControlledModel` when the policy is CTRL's augmented model (or one
      of its baselines): the controls, their data and classifiers, the base policy; None
      otherwise. The one place CTRL's additions live: nothing probes dict keys.
    assemble_denoiser: (trainable, frozen) -> the params `denoiser` takes, from the trained
      tree (`params["unet"]`, e.g. LoRA factors) and the frozen dict (`params` without
      "unet", e.g. holding the base network). Default: the trainable tree itself. The trainer
      calls it (inside its compiled programs) wherever it passes trainable params to the
      denoiser.
    encode_images: (params, images (N,h,w,c) float32 in [0, 1]) -> diffusion variable
      (N, *latent_shape) float32, the inverse of `decode` (pixels scaled to [-1, 1], or VAE
      latents); used by methods that train on offline images (CTRL's baselines).
    learning_rates: {top-level key of `params["unet"]`: learning rate} for subtrees trained at
      their own rate (CTRL's control tables, `train.control_learning_rate`); every other
      subtree is trained at `train.learning_rate` (`train.make_optimizer`).
    uncond_fn: (params) -> the conditioning of the unconditional half of classifier-free
      guidance, batch 1 (SDXL: zeros, diffusers' `force_zeros_for_empty_prompt`); None: the
      encoding of the empty prompt. Read it through `encode_uncond`.
  """
  params: dict
  denoiser: Denoiser
  tokenize: Callable[[Sequence[str]], np.ndarray]
  encode_prompts: Callable[[dict, jax.Array], jax.Array]
  decode: Callable[[dict, jax.Array], jax.Array]
  prompt_fn: Callable[[np.random.Generator, int], list[str]]
  prompt_metadata: Callable[[Sequence[str]], dict[str, np.ndarray]]
  rewards: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  pipeline: Any = None
  ctrl: Any = None
  assemble_denoiser: Callable[[Any, dict], Any] = lambda trainable, frozen: trainable
  encode_images: Callable[[dict, jax.Array], jax.Array] | None = None
  learning_rates: Mapping[str, float] = dataclasses.field(default_factory=dict)
  uncond_fn: Callable[[dict], Any] | None = None

  def encode_uncond(self, params: dict):
    """The unconditional half's conditioning for classifier-free guidance, batch 1: `uncond_fn`,
    or `encode_prompts` of the empty prompt. `params` is the whole dict (traceable)."""
    if self.uncond_fn is not None:
      return self.uncond_fn(params)
    return self.encode_prompts(params, jnp.asarray(self.tokenize([""])))
