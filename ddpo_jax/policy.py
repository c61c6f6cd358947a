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


@dataclasses.dataclass(frozen=True)
class Policy:
  """A conditional diffusion model seen as a policy over denoising trajectories.

  Attributes:
    params: {"unet": trainable denoiser params, ...frozen params ("text_encoder", "vae")}.
    eps_fn: (params_unet, x (N,H,W,C), t (N,) int32, context (N,L,D), class_labels (N,)|None,
      added_time_emb (N, time_embed_dim)|None = None) -> predicted noise (N,H,W,C) float32.
      `added_time_emb` is added to the UNet's time embedding (CTRL's control embedding).
    tokenize: host function, prompts (list of str) -> token ids (N, L) int32 NumPy.
    encode_prompts: (params, ids (N,L) int32) -> context (N,L',D); `params` is the whole dict.
      The context may also be a pytree of arrays with the batch on axis 0 (SDXL:
      {"context": (N,L',D), "text_embeds": (N,P)}); `eps_fn` receives it as it is returned.
    decode: (params, x0 (N,H,W,C)) -> images (N,h,w,c) float32 in [0, 1].
    latent_shape: (H, W, C) of the diffusion variable.
    scheduler_config: diffusers-style scheduler config (beta schedule etc.).
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
    assemble_unet: (trainable, frozen) -> the denoiser params `eps_fn` takes, from the trained
      tree (`params["unet"]`, e.g. LoRA factors) and the frozen dict (`params` without "unet",
      e.g. holding the base UNet). Default: the trainable tree itself. The trainer calls it
      (inside its compiled programs) wherever it passes trainable params to `eps_fn`.
    time_embed_dim: width of the denoiser's time embedding (the size of `added_time_emb`).
    encode_images: (params, images (N,h,w,c) float32 in [0, 1]) -> diffusion variable
      (N,H,W,C) float32, the inverse of `decode` (pixels scaled to [-1, 1], or VAE latents);
      used by methods that train on offline images (CTRL's baselines).
    null_class_labels: (M,) int32 labels for the unconditional half of prompt guidance
      (`diffusion.guided_eps`): CTRL's null labels, so that guidance gives
      eps(∅, null) + w (eps(c, y) − eps(∅, null)); None: the same labels in both halves.
    class_label_key: the `prompt_metadata` entry the sampler passes to `eps_fn` as
      `class_labels` ((N,) or (N, M) int32; CTRL's "control_label"); None: no labels.
    learning_rates: {top-level key of `params["unet"]`: learning rate} for subtrees trained at
      their own rate (CTRL's control tables, `train.control_learning_rate`); every other
      subtree is trained at `train.learning_rate` (`train.make_optimizer`).
    uncond_fn: (params) -> the conditioning of the unconditional half of classifier-free
      guidance, batch 1 (SDXL: zeros, diffusers' `force_zeros_for_empty_prompt`); None: the
      encoding of the empty prompt. Read it through `encode_uncond`.
    prediction_type: what `eps_fn` predicts: "epsilon" (noise; it is then called at integer
      timesteps) or "flow" (the velocity of a flow-matching model, called at t = 1000 sigma;
      `eps_fn` is then that velocity function). `dynamics.make_dynamics` reads it.
    flow_sigmas: "flow" only: num_steps -> (sigmas (T + 1,), timesteps (T,)) float32 of the
      model's flow schedule at `latent_shape` (`FlowPipeline.sigmas`).
  """
  params: dict
  eps_fn: Callable[..., jax.Array]
  tokenize: Callable[[Sequence[str]], np.ndarray]
  encode_prompts: Callable[[dict, jax.Array], jax.Array]
  decode: Callable[[dict, jax.Array], jax.Array]
  latent_shape: tuple[int, int, int]
  scheduler_config: dict
  prompt_fn: Callable[[np.random.Generator, int], list[str]]
  prompt_metadata: Callable[[Sequence[str]], dict[str, np.ndarray]]
  rewards: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  pipeline: Any = None
  ctrl: Any = None
  assemble_unet: Callable[[Any, dict], Any] = lambda trainable, frozen: trainable
  time_embed_dim: int = 0
  encode_images: Callable[[dict, jax.Array], jax.Array] | None = None
  null_class_labels: np.ndarray | None = None
  class_label_key: str | None = None
  learning_rates: Mapping[str, float] = dataclasses.field(default_factory=dict)
  uncond_fn: Callable[[dict], Any] | None = None
  prediction_type: str = "epsilon"
  flow_sigmas: Callable[[int], tuple[np.ndarray, np.ndarray]] | None = None

  def encode_uncond(self, params: dict):
    """The unconditional half's conditioning for classifier-free guidance, batch 1: `uncond_fn`,
    or `encode_prompts` of the empty prompt. `params` is the whole dict (traceable)."""
    if self.uncond_fn is not None:
      return self.uncond_fn(params)
    return self.encode_prompts(params, jnp.asarray(self.tokenize([""])))

  def __post_init__(self):
    # The denoiser as one jitted function: every call with the same input types inside a
    # traced program (the policy's and the reference's eps in CTRL's chain, both branches of
    # its truncation `cond`, `eval_shape` then the real call) reuses one trace and one lowered
    # function instead of re-tracing the UNet each time. XLA inlines it: the same program.
    if not hasattr(self.eps_fn, "lower"):
      object.__setattr__(self, "eps_fn", jax.jit(self.eps_fn))
