"""What an RL algorithm of DDPO's update is: the fields it reads of the sampled trajectories and
its loss at one trained step (docs/algorithms.md §3). `train.make_update_fn` runs any of them
the same way and knows none by name.

The trainer builds the algorithm's typed settings once, outside jit:
`hp = algorithm.hyperparameters(config)`, a frozen dataclass of exactly what `batch_fields` and
`loss` read (the whole config never enters the compiled program). The update (one compiled
program per inner epoch) does, for every algorithm:
  1. `algorithm.batch_fields(traj, advantages, adv_scales, rewards, hp)` -> (per_step,
     per_sample, metrics): arrays (N, T, ...) read at the trained timesteps and arrays (N, ...)
     shared by a sample's steps; the trainer adds the conditioning (`context`, `class_labels`).
  2. shuffles the samples, picks K = int(T · train.timestep_fraction) timesteps per sample
     (DDIM: K at random; flow samplers: the first K, as flow_grpo), cuts minibatches of
     `train.batch_size`;
  3. differentiates `algorithm.loss(model, params, batch, key, hp)` per micro-step (one
     timestep per sample of a minibatch) and takes one optimizer step per
     `gradient_accumulation_steps` minibatches × K timesteps.

Adding an algorithm is one file: a subclass of `Algorithm` (its hyperparameters dataclass, its
`hyperparameters`, `batch_fields` and `loss`; or of `PolicyGradient`, for a new surrogate of the
step log-prob), registered in `ddpo_jax.algorithms`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from ddpo_jax.numerics import diffusion, rl

Array = jax.Array
Metrics = dict[str, Array]


class StepModel(NamedTuple):
  """The denoiser's computations at one trained step, bound by the trainer to the policy, its
  guidance in the update (`train.cfg`) and the noise schedule.

  step_log_prob(params, batch) -> (log_prob (mb,), mean (mb, *latent), std (mb, 1, ...)):
    the DDIM step's Gaussian log-prob of `batch["next_latents"]` given `batch["latents"]` at
    `batch["times"]` -> `batch["next_times"]` (`diffusion.step_log_prob`, mean-reduced
    over the latent dims, docs/algorithms.md §1.2–§1.3), and the step's mean and std.
  denoising_loss_terms(params, batch, key) -> (mb,): the per-sample eps-regression loss of the
    clean latents `batch["x0"]` at one random timestep each (`diffusion.denoising_loss_terms`).
  velocity(params, x (mb, *latent), sigma (mb,), context) -> (mb, *latent): a flow model's
    velocity at sigma (the `denoiser.Denoiser` converts sigma to the network's own timestep)
    with the update's guidance.
  sampling_params: the denoiser params the epoch's samples were drawn with (the old policy
    for algorithms with `keeps_old_params`, else the params at the start of the update; not
    differentiated), for algorithms with `needs_sampling_params`; None otherwise.
  reference_params: the pre-trained denoiser (assembled), for algorithms whose
    `needs_reference_params(config)`; None otherwise.
  """
  step_log_prob: Callable[[Any, dict], tuple[Array, Array, Array]]
  denoising_loss_terms: Callable[[Any, dict, Array], Array]
  velocity: Callable[[Any, Array, Array, Any], Array] | None = None
  sampling_params: Any = None
  reference_params: Any = None


class Algorithm:
  """One RL algorithm of the update. Subclasses set `name` and implement `hyperparameters`,
  `batch_fields` and `loss`."""

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
  # Whether the train state keeps an old policy (`TrainState.old_params`) that samples and is
  # `sampling_params`, refreshed once per epoch (`train.make_old_policy_fn`).
  keeps_old_params: bool = False
  # Flow samplers: train each sample's first K steps in order (flow_grpo), else K at random.
  flow_timesteps_in_order: bool = True

  def needs_reference_params(self, config) -> bool:
    """Whether `loss` reads `StepModel.reference_params` (the pre-trained model)."""
    return False

  def ema_calls_per_step(self, config) -> int:
    """How many `EMAModuleWrapper.step` calls the reference makes per optimizer step (the
    weight EMA, `train.ema_update`): flow_grpo's train_sd3.py calls it once per minibatch."""
    return int(config.train.gradient_accumulation_steps)

  def validate(self, config, samples_per_epoch: int, samples_per_step: int) -> None:
    """Raises ValueError for a config the algorithm cannot run (before anything compiles).
    `samples_per_step` = train.batch_size × train.gradient_accumulation_steps."""

  def hyperparameters(self, config) -> Any:
    """The settings `batch_fields` and `loss` read: a frozen (hashable) dataclass built from
    the config once, outside jit."""
    raise NotImplementedError

  def batch_fields(self, traj: diffusion.Trajectory, advantages: Array, adv_scales: Array,
                   rewards: Array, hp) -> tuple[dict, dict, Metrics]:
    """(per_step {name: (N, T, ...)}, per_sample {name: (N, ...)}, metrics of the epoch).

    advantages, adv_scales, rewards: (N,) float32 (see `train.make_update_fn`); hp:
    `self.hyperparameters(config)`."""
    raise NotImplementedError

  def loss(self, model: StepModel, params, batch: dict, key: Array, hp) -> tuple[Array, Metrics]:
    """(scalar loss, scalar metrics incl. "loss") of one micro-batch: every per-step field at one
    trained timestep per sample, (mb, ...); every per-sample field, (mb, ...). hp:
    `self.hyperparameters(config)`."""
    raise NotImplementedError


STEP_FIELDS = ("latents", "next_latents", "times", "next_times", "log_probs")


def flow_grpo_kl(mean: Array, reference_mean: Array, std: Array, sigma: Array,
                 sigma_next: Array, sampler: str) -> Array:
  """flow_grpo's KL term of one step (train_sd3.py: `((prev_sample_mean - prev_sample_mean_ref)
  ** 2).mean(dims) / (2 * std_dev_t ** 2)`), per sample, (mb,) float32.

  std_dev_t is what its `sde_step_with_logprob` returns: the SDE's s = std / sqrt(-dt) for
  'sde' (dt = sigma_next - sigma < 0), the step std sigma_next sin(a pi / 2) itself for 'cps'.
  So for 'sde' the term is (-dt) times the per-dimension Gaussian KL of the step
  (docs/algorithms.md §3.5), for 'cps' that KL itself. 0 where the step is deterministic.

  Args: mean, reference_mean (mb, *latent); std broadcastable to mean (the step's std);
  sigma, sigma_next (mb,); sampler 'sde' or 'cps' (static).
  """
  d = mean.astype(jnp.float32) - reference_mean.astype(jnp.float32)
  sq = jnp.mean(d * d, axis=tuple(range(1, d.ndim)))
  step_std = diffusion.per_sample_std(std, mean.shape).astype(jnp.float32)
  if sampler == "sde":
    s2 = step_std ** 2 / (sigma - sigma_next).astype(jnp.float32)
  elif sampler == "cps":
    s2 = step_std ** 2
  else:
    raise ValueError(f"sampler={sampler!r}: flow_grpo's KL term is the 'sde' / 'cps' samplers'")
  positive = step_std > 0
  return jnp.where(positive, sq / (2.0 * jnp.where(positive, s2, 1.0)), 0.0)


@dataclasses.dataclass(frozen=True)
class PolicyGradientHyperparameters:
  """What the policy-gradient family's `batch_fields` and `loss` read (`train.*` unless said).

  clip_range: PPO's ratio clip epsilon (the surrogates that clip read it).
  adv_clip_max: advantages are clipped to ±adv_clip_max.
  kl_coef: α of the KL-to-pre-trained penalty (0: off), per unit of reward.
  kl_reduction: "mean" or "sum" over the latent dims of that penalty's KL.
  kl_beta: β of flow_grpo's KL term (0: off).
  drop_zero_advantage: flow_grpo's zero-advantage sample filter.
  sampler: `sample.sampler` (flow_grpo's KL term differs between 'sde' and 'cps').
  """
  clip_range: float
  adv_clip_max: float
  kl_coef: float
  kl_reduction: str
  kl_beta: float
  drop_zero_advantage: bool
  sampler: str


class PolicyGradient(Algorithm):
  """DDPO's policy-gradient family (docs/algorithms.md §3.1–§3.5): a surrogate of the step
  log-prob recomputed under the current params against the one sampled, with the optional
  KL-to-pre-trained penalty (`train.kl_coef`), flow_grpo's KL term (`train.kl_beta`) and
  flow_grpo's zero-advantage filter (`train.drop_zero_advantage`). Subclasses implement
  `surrogate`."""

  supports_kl_penalty = True

  def hyperparameters(self, config) -> PolicyGradientHyperparameters:
    t = config.train
    return PolicyGradientHyperparameters(
        clip_range=t.clip_range, adv_clip_max=t.adv_clip_max, kl_coef=t.kl_coef,
        kl_reduction=t.kl_reduction, kl_beta=t.kl_beta,
        drop_zero_advantage=bool(t.drop_zero_advantage), sampler=config.sample.sampler)

  def surrogate(self, log_prob: Array, batch: dict,
                hp: PolicyGradientHyperparameters) -> tuple[Array, Metrics]:
    """(loss, metrics) from the recomputed log-probs (mb,) and the batch (`log_probs` as sampled,
    `advantages`: (mb,) terminal or per-step KL-penalised; `sample_weights` (mb,) when
    `train.drop_zero_advantage`: each sample's term is weighted, a mean over the batch)."""
    raise NotImplementedError

  def batch_fields(self, traj, advantages, adv_scales, rewards, hp):
    per_step = {k: getattr(traj, k) for k in STEP_FIELDS}
    per_sample, metrics = {}, {}
    if hp.drop_zero_advantage:
      # flow_grpo's train_sd3.py drops the samples whose advantages are all 0 (a group of equal
      # rewards) before the update; with static shapes they get weight 0 and the others
      # N / n_kept, so a mean over the N samples is the mean over the kept ones.
      keep = (advantages != 0).astype(jnp.float32)
      kept = jnp.sum(keep)
      per_sample["sample_weights"] = keep * (keep.shape[0] / jnp.maximum(kept, 1.0))
      metrics["kept_fraction"] = kept / keep.shape[0]
    if hp.kl_beta > 0:
      per_step["reference_means"] = traj.reference_means
    if hp.kl_coef > 0:  # per-step advantages of r − α Σ KL, and the direct term's weight
      per_step["reference_means"] = traj.reference_means
      per_step["advantages"] = rl.kl_penalised_advantages(advantages, adv_scales, traj.kl,
                                                          hp.kl_coef)
      # `gaussian_log_prob` is mean-reduced over the D latent dims (DDPO's convention), so the
      # score-function part is 1/D of the exact one; the direct part gets the same 1/D.
      latent_dims = math.prod(traj.latents.shape[2:])
      per_sample["kl_weights"] = hp.kl_coef * adv_scales / latent_dims
      metrics["path_kl"] = jnp.mean(jnp.sum(traj.kl, axis=1))
    else:
      per_sample["advantages"] = advantages
    return per_step, per_sample, metrics

  def loss(self, model, params, batch, key, hp):
    log_prob, mean, std = model.step_log_prob(params, batch)
    loss, metrics = self.surrogate(log_prob, batch, hp)
    weights = batch.get("sample_weights")
    w = 1.0 if weights is None else weights
    if hp.kl_coef > 0:  # the reference's step mean at this x_t, as the sampler computed it
      kl = diffusion.gaussian_kl_shared_std(mean, batch["reference_means"], std,
                                            reduction=hp.kl_reduction)
      # a deterministic step (CPS's last): no KL
      kl = jnp.where(diffusion.per_sample_std(std, mean.shape) > 0, kl, 0.0)
      metrics["kl_to_pretrained"] = jnp.mean(kl)
      loss = loss + jnp.mean(w * batch["kl_weights"] * kl)
    if hp.kl_beta > 0:  # flow_grpo's direct term, beta * its KL (docs/algorithms.md §3.5)
      kl_beta = flow_grpo_kl(mean, batch["reference_means"], std, batch["times"],
                             batch["next_times"], hp.sampler)
      metrics["kl_loss"] = jnp.mean(kl_beta)
      loss = loss + hp.kl_beta * jnp.mean(w * kl_beta)
    metrics["loss"] = loss
    return loss, metrics
