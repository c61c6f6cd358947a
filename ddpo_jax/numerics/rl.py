"""Advantages and policy-gradient losses of DDPO (docs/algorithms.md §2–§3).

* `advantages`: the epoch's advantages, the one entry point of the trainers: group-relative
  (GRPO), per-prompt (`PerPromptStatTracker`) or whole-batch (`normalize_advantages`), as
  `AdvantageSettings` says.
* `PerPromptStatTracker`: per-prompt reward normalisation (host-side NumPy, checkpointable).
* `normalize_advantages`: whole-batch normalisation (no tracking).
* `group_relative_advantages`: each sample against its group of one prompt (GRPO).
* `kl_penalised_advantages`: per-step advantages of a return with a per-step KL penalty.
* `ppo_clipped_loss` (DDPO-IS), `score_function_loss` (DDPO-SF): pure `jax.numpy`, per chosen
  timestep, on (B,) arrays.
* `rwr_weights`, `rwr_sparse_weights`: reward-weighted-regression baselines' sample weights,
  to multiply `diffusion.denoising_loss_terms`.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


class PerPromptStatTracker:
  """Normalises rewards with running per-prompt statistics (kvablack/ddpo-pytorch semantics).

  For each unique prompt of a batch its rewards are appended (in batch order) to a deque of the
  last `buffer_size` rewards of that prompt. If the deque then holds fewer than `min_count`
  rewards the prompt's advantages use the WHOLE BATCH's mean/std, otherwise the deque's:
  A = (r - mean) / (std + 1e-6), std being the population std (`np.std`, ddof=0).

  In a multi-host run call `update` with the globally gathered prompts and rewards (same on
  every host) so that every host keeps the same state.

  Rewards are stored as Python floats (float64), so `state_dict` / `load_state_dict` round-trip
  exactly and advantages are computed in float64.
  """

  def __init__(self, buffer_size: int, min_count: int):
    if buffer_size < 1 or min_count < 0:
      raise ValueError(f"buffer_size={buffer_size} must be >= 1 and min_count={min_count} >= 0.")
    self.buffer_size = int(buffer_size)
    self.min_count = int(min_count)
    self.stats: dict[str, collections.deque] = {}

  def update(self, prompts: Sequence[str], rewards: np.ndarray, return_scale: bool = False):
    """Adds a batch of rewards and returns its advantages.

    Args:
      prompts: B prompt strings (keys are `str(prompt)`).
      rewards: (B,) rewards.
      return_scale: also return each sample's normalisation factor 1 / (std + 1e-6).

    Returns:
      (B,) float64 advantages, or (advantages, scales), both (B,) float64.
    """
    prompts = np.asarray([str(p) for p in prompts])
    rewards = np.asarray(rewards, dtype=np.float64)
    if rewards.ndim != 1 or rewards.shape[0] != prompts.shape[0]:
      raise ValueError(f"rewards {rewards.shape} must be (B,) with B = {len(prompts)} prompts.")
    advantages = np.empty_like(rewards)
    scales = np.empty_like(rewards)
    batch_mean, batch_std = np.mean(rewards), np.std(rewards)
    for prompt in np.unique(prompts):
      mask = prompts == prompt
      buf = self.stats.setdefault(str(prompt), collections.deque(maxlen=self.buffer_size))
      buf.extend(float(r) for r in rewards[mask])
      if len(buf) < self.min_count:
        mean, std = batch_mean, batch_std
      else:
        values = np.asarray(buf, dtype=np.float64)
        mean, std = np.mean(values), np.std(values)
      scales[mask] = 1.0 / (std + 1e-6)
      advantages[mask] = (rewards[mask] - mean) / (std + 1e-6)
    return (advantages, scales) if return_scale else advantages

  def get_stats(self) -> dict[str, dict[str, float]]:
    """{prompt: {"mean", "std", "count"}} of each prompt's buffer."""
    out = {}
    for k, v in self.stats.items():
      values = np.asarray(v, dtype=np.float64)
      out[k] = {"mean": float(np.mean(values)), "std": float(np.std(values)),
                "count": len(values)}
    return out

  def clear(self) -> None:
    self.stats = {}

  def state_dict(self) -> dict[str, Any]:
    """JSON-serialisable state: {"buffer_size", "min_count", "stats": {prompt: [floats]}}."""
    return {"buffer_size": self.buffer_size, "min_count": self.min_count,
            "stats": {k: [float(x) for x in v] for k, v in self.stats.items()}}

  def load_state_dict(self, state: Mapping[str, Any]) -> None:
    """Restores `state_dict()`'s output. The buffers keep this tracker's `buffer_size` (if the
    saved buffers are longer, their most recent `buffer_size` rewards are kept)."""
    self.stats = {}
    for k, v in state["stats"].items():
      self.stats[str(k)] = collections.deque((float(x) for x in v), maxlen=self.buffer_size)


def normalize_advantages(rewards, return_scale: bool = False):
  """Whole-batch normalisation without per-prompt tracking: (r - mean) / (std + 1e-8).

  Population std. NumPy in -> float64 NumPy out; a jax.Array in -> jax.Array out (jittable).

  Args:
    rewards: (B,).
    return_scale: also return the normalisation factor 1 / (std + 1e-8), broadcast to (B,).

  Returns:
    (B,) advantages, or (advantages, scales), both (B,).
  """
  xp = jnp if isinstance(rewards, jax.Array) else np
  if xp is jnp:
    r = rewards.astype(jnp.result_type(rewards.dtype, jnp.float32))
  else:
    r = np.asarray(rewards, dtype=np.float64)
  std = xp.std(r) + 1e-8
  advantages = (r - xp.mean(r)) / std
  return (advantages, xp.full_like(r, 1.0 / std)) if return_scale else advantages


def group_relative_advantages(rewards, group_size: int, *, std: str = "group",
                              eps: float = 1e-4, return_scale: bool = False):
  """GRPO's advantages (Flow-GRPO, DanceGRPO): each sample's reward against its group's, the G
  samples drawn for one prompt in this batch, laid out contiguously (rows g G .. g G + G - 1):

      A_i = (r_i - mean_group(r)) / (std + eps)

  with std the group's population std (`std="group"`) or the whole batch's (`"global"`,
  flow_grpo's `global_std`). NumPy in -> float64 NumPy out; a jax.Array in -> jax.Array out
  (jittable).

  Args:
    rewards: (B,) with B = num_groups * group_size.
    group_size: G >= 2 (static).
    return_scale: also return each sample's factor 1 / (std + eps), (B,).

  Raises:
    ValueError: group_size < 2, B not a multiple of group_size, or an unknown `std`.
  """
  if std not in ("group", "global"):
    raise ValueError(f"std={std!r}; choose 'group' or 'global'")
  if group_size < 2:
    raise ValueError(f"group_size={group_size}: a group needs >= 2 samples of its prompt")
  xp = jnp if isinstance(rewards, jax.Array) else np
  if xp is jnp:
    r = rewards.astype(jnp.result_type(rewards.dtype, jnp.float32))
  else:
    r = np.asarray(rewards, dtype=np.float64)
  if r.ndim != 1 or r.shape[0] % group_size:
    raise ValueError(f"rewards of shape {tuple(r.shape)}: the batch must be a multiple of "
                     f"group_size={group_size} (whole groups of one prompt each)")
  groups = r.reshape(-1, group_size)
  centred = groups - groups.mean(axis=1, keepdims=True)
  scale = groups.std(axis=1, keepdims=True) if std == "group" else xp.std(r)
  factor = xp.broadcast_to(1.0 / (scale + eps), groups.shape)
  advantages = (centred * factor).reshape(-1)
  return (advantages, factor.reshape(-1)) if return_scale else advantages


@dataclasses.dataclass(frozen=True)
class AdvantageSettings:
  """How the epoch's rewards become advantages (`advantages`).

  group_size: G > 1: group-relative advantages (GRPO; `sample.group_size`), rows g G .. g G +
    G - 1 one prompt's group; 1: none.
  group_std: "group" or "global", the std of the group-relative advantages
    (`sample.group_std`).
  per_prompt: with group_size 1, per-prompt statistics (`per_prompt_stat_tracking.enabled`,
    the caller's `PerPromptStatTracker`); else whole-batch normalisation.
  """
  group_size: int = 1
  group_std: str = "group"
  per_prompt: bool = False

  @classmethod
  def from_config(cls, config) -> "AdvantageSettings":
    """From DDPO's config (`sample.group_size`, `sample.group_std`,
    `per_prompt_stat_tracking.enabled`)."""
    return cls(group_size=int(config.sample.group_size), group_std=str(config.sample.group_std),
               per_prompt=bool(config.per_prompt_stat_tracking.enabled))


def advantages(rewards: np.ndarray, prompts: Sequence[str] | None, settings: AdvantageSettings,
               tracker: PerPromptStatTracker | None = None) -> tuple[np.ndarray, np.ndarray]:
  """The epoch's advantages and each sample's scale (the factor its reward was multiplied by),
  one of three normalisations (docs/algorithms.md §2):

    settings.group_size > 1: `group_relative_advantages` (GRPO), prompts unused;
    settings.per_prompt: `tracker.update(prompts, rewards)` (the tracker's state moves on);
    else: `normalize_advantages` over the whole batch, prompts unused.

  Every process of a multi-host run calls it with the same (gathered) rewards and prompts.

  Args:
    rewards: (N,) the epoch's rewards (host NumPy).
    prompts: N prompt strings (read only with per-prompt tracking; else may be None).
    settings: `AdvantageSettings` (e.g. `AdvantageSettings.from_config(config)`).
    tracker: the run's `PerPromptStatTracker` (needed with `settings.per_prompt`).

  Returns:
    (advantages, scales), both (N,) float64.

  Raises:
    ValueError: per-prompt tracking without a tracker.
  """
  if settings.group_size > 1:
    return group_relative_advantages(rewards, settings.group_size, std=settings.group_std,
                                     return_scale=True)
  if settings.per_prompt:
    if tracker is None:
      raise ValueError("per-prompt advantages (per_prompt_stat_tracking.enabled) need the run's "
                       "PerPromptStatTracker")
    return tracker.update(prompts, rewards, return_scale=True)
  return normalize_advantages(np.asarray(rewards), return_scale=True)


def kl_penalised_advantages(advantages: Array, scales: Array, kl: Array, alpha: float) -> Array:
  """Per-step advantages of the return r(x_0) − α Σ_t KL_t (a per-step penalty,
  docs/algorithms.md §3.5).

  The action of step i (sampling x_{i+1} from x_i, steps in sampling order) changes the states
  of the later steps only, so its return is r − α Σ_{j>i} KL_j; KL_i itself, a function of the
  params at the already given x_i, enters the loss directly (`algorithms.PolicyGradient.loss`, weighted
  α · scale / D there, D = latent dims, matching the mean-reduced log-prob). Here the return is
  put on the advantages' scale: A_i = A − α · scale · Σ_{j>i} KL_j. Subtracting the reward's
  baseline keeps the estimator unbiased.

  Args:
    advantages: (B,) normalised terminal advantages (r − baseline) · scale.
    scales: (B,) the factor each sample's reward was scaled by (1 / std).
    kl: (B, T) KL_t of each step, as sampled.
    alpha: KL weight per unit of reward.

  Returns:
    (B, T) float32 advantages.
  """
  kl = jax.lax.stop_gradient(kl.astype(jnp.float32))
  later = jnp.cumsum(kl[:, ::-1], axis=1)[:, ::-1] - kl  # Σ_{j>i} KL_j
  return advantages[:, None] - alpha * scales[:, None] * later


def ppo_clipped_loss(log_prob: Array, old_log_prob: Array, advantages: Array,
                     clip_range: float, adv_clip_max: float,
                     weights: Array | None = None) -> tuple[Array, dict[str, Array]]:
  """DDPO-IS clipped surrogate for one chosen timestep per sample (docs/algorithms.md §3.2).

      A_c   = clip(A, -adv_clip_max, adv_clip_max)
      ratio = exp(log_prob - old_log_prob)
      L     = mean(max(-A_c * ratio, -A_c * clip(ratio, 1 - clip_range, 1 + clip_range)))

  Args:
    log_prob: (B,) log-probs under the current params (differentiable).
    old_log_prob: (B,) log-probs stored at sampling time (treated as constants).
    advantages: (B,) advantages (treated as constants).
    clip_range: epsilon (1e-4 in DDPO).
    adv_clip_max: advantage clip (5 torch port / 10 JAX original).
    weights: optional (B,) per-sample weights (constants): L = mean(w * max(...)).

  Returns:
    loss: float32 scalar; info: {"approx_kl": 0.5 mean((lp - old)^2), "clipfrac":
    mean(|ratio - 1| > clip_range), "ratio": mean(ratio)}, float32 scalars without gradient.
  """
  old_log_prob = jax.lax.stop_gradient(old_log_prob)
  adv = jnp.clip(jax.lax.stop_gradient(advantages), -adv_clip_max, adv_clip_max)
  diff = log_prob - old_log_prob
  ratio = jnp.exp(diff)
  unclipped = -adv * ratio
  clipped = -adv * jnp.clip(ratio, 1.0 - clip_range, 1.0 + clip_range)
  terms = jnp.maximum(unclipped, clipped)
  if weights is not None:
    terms = jax.lax.stop_gradient(weights) * terms
  loss = jnp.mean(terms)
  info = jax.lax.stop_gradient({
      "approx_kl": 0.5 * jnp.mean(diff ** 2),
      "clipfrac": jnp.mean((jnp.abs(ratio - 1.0) > clip_range).astype(jnp.float32)),
      "ratio": jnp.mean(ratio),
  })
  return loss, info


def score_function_loss(log_prob: Array, advantages: Array, adv_clip_max: float,
                        weights: Array | None = None) -> Array:
  """DDPO-SF (REINFORCE) loss: -mean(w * clip(A, -adv_clip_max, adv_clip_max) * log_prob).

  Args:
    log_prob: (B,) differentiable log-probs. advantages: (B,) (constants).
    weights: optional (B,) per-sample weights w (constants); None: 1.

  Returns:
    float32 scalar.
  """
  adv = jnp.clip(jax.lax.stop_gradient(advantages), -adv_clip_max, adv_clip_max)
  if weights is not None:
    adv = jax.lax.stop_gradient(weights) * adv
  return -jnp.mean(adv * log_prob)


def rwr_weights(rewards: Array, beta: float) -> Array:
  """Reward-weighted-regression weights: w_i = B * exp(r_i / beta) / sum_j exp(r_j / beta).

  Normalised over the batch (a softmax, numerically stable) and scaled by the batch size B so
  that the weights average to 1: `mean(w * denoising_loss_terms)` equals the reference's
  `sum(softmax(r / beta) * loss)`.

  Args:
    rewards: (B,). beta: temperature > 0.

  Returns:
    (B,) float32 weights (constants: no gradient).
  """
  r = jax.lax.stop_gradient(jnp.asarray(rewards, jnp.float32))
  return r.shape[0] * jax.nn.softmax(r / beta)


def rwr_sparse_weights(rewards: Array, quantile: float) -> Array:
  """Sparse RWR / filtered fine-tuning weights: B / k where r >= the batch's `quantile` (linear
  interpolation, `jnp.quantile`'s default; k samples kept), else 0.

  The original (Black et al.'s JAX code) trains with unit weights on a dataset of the kept
  samples only, so its loss is the mean over the kept samples. Weights that average to 1 over
  the batch give `mean(w * denoising_loss_terms)` = that mean, whatever fraction is kept (0/1
  weights would scale the gradient by k / B).

  Args:
    rewards: (B,). quantile: in [0, 1] (e.g. 0.9 keeps roughly the top 10%).

  Returns:
    (B,) float32 weights in {0, B / k}.
  """
  r = jax.lax.stop_gradient(jnp.asarray(rewards, jnp.float32))
  keep = (r >= jnp.quantile(r, quantile)).astype(jnp.float32)  # k >= 1: the maximum is kept
  return keep * (r.shape[0] / jnp.sum(keep))
