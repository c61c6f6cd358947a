"""What an RL algorithm of DDPO's update is: the fields it reads of the sampled trajectories and
its loss at one trained step (docs/algorithms.md §3). `train.make_update_fn` runs any of them
the same way and knows none by name.

The update (one compiled program per inner epoch) does, for every algorithm:
  1. `algorithm.batch_fields(traj, advantages, adv_scales, rewards, config)` -> (per_step,
     per_sample, metrics): arrays (N, T, ...) read at the trained timesteps and arrays (N, ...)
     shared by a sample's steps; the trainer adds the conditioning (`context`, `class_labels`).
  2. shuffles the samples, picks K = int(T · train.timestep_fraction) timesteps per sample
     (DDIM: K at random; flow samplers: the first K, as flow_grpo), cuts minibatches of
     `train.batch_size`;
  3. differentiates `algorithm.loss(model, params, batch, key, config)` per micro-step (one
     timestep per sample of a minibatch) and takes one optimizer step per
     `gradient_accumulation_steps` minibatches × K timesteps.

Adding an algorithm is one file: a subclass of `Algorithm` (or of `PolicyGradient`, for a new
surrogate of the step log-prob), registered in `ddpo_jax.algorithms`.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from ddpo_jax import diffusion, rl

Array = jax.Array
Metrics = dict[str, Array]


class StepModel(NamedTuple):
  """The denoiser's computations at one trained step, bound by the trainer to the policy, its
  guidance in the update (`train.cfg`) and the noise schedule.

  step_log_prob(params, batch) -> (log_prob (mb,), mean (mb, *latent), std (mb, 1, ...)):
    the DDIM step's Gaussian log-prob of `batch["next_latents"]` given `batch["latents"]` at
    `batch["timesteps"]` -> `batch["prev_timesteps"]` (`diffusion.step_log_prob`, mean-reduced
    over the latent dims, docs/algorithms.md §1.2–§1.3), and the step's mean and std.
  denoising_loss_terms(params, batch, key) -> (mb,): the per-sample eps-regression loss of the
    clean latents `batch["x0"]` at one random timestep each (`diffusion.denoising_loss_terms`).
  velocity(params, x (mb, *latent), sigma (mb,), context) -> (mb, *latent): a flow model's
    velocity at sigma (called at t = 1000 sigma) with the update's guidance.
  sampling_params: the denoiser params the epoch's samples were drawn with (the params at the
    start of the update, not differentiated), for algorithms with `needs_sampling_params`;
    None otherwise.
  """
  step_log_prob: Callable[[Any, dict], tuple[Array, Array, Array]]
  denoising_loss_terms: Callable[[Any, dict, Array], Array]
  velocity: Callable[[Any, Array, Array, Any], Array] | None = None
  sampling_params: Any = None


class Algorithm:
  """One RL algorithm of the update. Subclasses set `name` and implement the two methods."""

  name: str = ""
  # Whether `train.kl_coef` > 0 (the KL-to-pre-trained penalty, docs/algorithms.md §3.5) applies.
  supports_kl_penalty: bool = False
  # Whether `loss` calls `StepModel.denoising_loss_terms` (eps regression: DDIM dynamics only).
  uses_denoising_loss: bool = False
  # Whether the sampled steps' log-probabilities are used (a deterministic sampler, the flow
  # ODE, has none).
  needs_log_probs: bool = True
  # Whether `loss` reads `StepModel.sampling_params` (the trainer then passes them).
  needs_sampling_params: bool = False

  def validate(self, config, samples_per_epoch: int, samples_per_step: int) -> None:
    """Raises ValueError for a config the algorithm cannot run (before anything compiles).
    `samples_per_step` = train.batch_size × train.gradient_accumulation_steps."""

  def batch_fields(self, traj: diffusion.Trajectory, advantages: Array, adv_scales: Array,
                   rewards: Array, config) -> tuple[dict, dict, Metrics]:
    """(per_step {name: (N, T, ...)}, per_sample {name: (N, ...)}, metrics of the epoch).

    advantages, adv_scales, rewards: (N,) float32 (see `train.make_update_fn`)."""
    raise NotImplementedError

  def loss(self, model: StepModel, params, batch: dict, key: Array, config) -> tuple[Array, Metrics]:
    """(scalar loss, scalar metrics incl. "loss") of one micro-batch: every per-step field at one
    trained timestep per sample, (mb, ...); every per-sample field, (mb, ...)."""
    raise NotImplementedError


STEP_FIELDS = ("latents", "next_latents", "timesteps", "prev_timesteps", "log_probs")


class PolicyGradient(Algorithm):
  """DDPO's policy-gradient family (docs/algorithms.md §3.1–§3.5): a surrogate of the step
  log-prob recomputed under the current params against the one sampled, with the optional
  KL-to-pre-trained penalty. Subclasses implement `surrogate`."""

  supports_kl_penalty = True

  def surrogate(self, log_prob: Array, batch: dict, train_config) -> tuple[Array, Metrics]:
    """(loss, metrics) from the recomputed log-probs (mb,) and the batch (`log_probs` as sampled,
    `advantages`: (mb,) terminal or per-step KL-penalised)."""
    raise NotImplementedError

  def batch_fields(self, traj, advantages, adv_scales, rewards, config):
    tc = config.train
    per_step = {k: getattr(traj, k) for k in STEP_FIELDS}
    per_sample, metrics = {}, {}
    if tc.kl_coef > 0:  # per-step advantages of r − α Σ KL, and the direct term's weight
      per_step["reference_means"] = traj.reference_means
      per_step["advantages"] = rl.kl_penalised_advantages(advantages, adv_scales, traj.kl,
                                                          tc.kl_coef)
      # `gaussian_log_prob` is mean-reduced over the D latent dims (DDPO's convention), so the
      # score-function part is 1/D of the exact one; the direct part gets the same 1/D.
      latent_dims = math.prod(traj.latents.shape[2:])
      per_sample["kl_weights"] = tc.kl_coef * adv_scales / latent_dims
      metrics["path_kl"] = jnp.mean(jnp.sum(traj.kl, axis=1))
    else:
      per_sample["advantages"] = advantages
    return per_step, per_sample, metrics

  def loss(self, model, params, batch, key, config):
    tc = config.train
    log_prob, mean, std = model.step_log_prob(params, batch)
    loss, metrics = self.surrogate(log_prob, batch, tc)
    if tc.kl_coef > 0:  # the reference's step mean at this x_t, as the sampler computed it
      kl = diffusion.gaussian_kl_shared_std(mean, batch["reference_means"], std,
                                            reduction=tc.kl_reduction)
      # a deterministic step (CPS's last): no KL
      kl = jnp.where(diffusion.per_sample_std(std, mean.shape) > 0, kl, 0.0)
      metrics["kl_to_pretrained"] = jnp.mean(kl)
      loss = loss + jnp.mean(batch["kl_weights"] * kl)
    metrics["loss"] = loss
    return loss, metrics
