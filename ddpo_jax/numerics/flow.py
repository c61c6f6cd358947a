"""Flow-matching schedules and the Euler ODE step (diffusers `FlowMatchEulerDiscreteScheduler`),
the sampler of SD3 / SD3.5 and FLUX.1 (docs/algorithms.md §6).

A rectified-flow model predicts the velocity v = eps - x0 of x_sigma = (1 - sigma) x0 +
sigma eps; sampling integrates dx/dsigma = v from sigma = 1 (noise) to 0 with Euler steps
x_next = x + (sigma_next - sigma) v. Every function here calls the velocity model at sigma
(`denoiser.Denoiser` converts it to the network's own timestep, 1000 sigma for diffusers).

`FlowSchedule.sigmas` reproduces diffusers' `set_timesteps` for the two ways the pipelines use
it, including its quirks (the static shift is applied to the grid's end point twice, as
diffusers does, and everything is rounded to float32 where diffusers rounds):

* SD3 / SD3.5 (`shift`, e.g. 3.0): a linear grid of timesteps from sigma_max to sigma_min of
  the shifted training schedule, then shifted, sigma' = shift sigma / (1 + (shift - 1) sigma).
* FLUX.1 (`use_dynamic_shifting`): the pipeline's grid linspace(1, 1/n, n) shifted by
  exp(mu) / (exp(mu) + (1/sigma - 1)), mu = `calculate_shift(image tokens)` (resolution
  dependent).

`sample_ode` runs the guided Euler chain in one `lax.scan`, with classifier-free guidance as
`diffusion.guided_eps` does it for DDIM (one batched call on [uncond; cond]).

The stochastic samplers of the RL methods (docs/algorithms.md §6.3): `step_mean_std` gives
one step's Gaussian transition N(mean, std^2 I) from the velocity for each `SDE_TYPES` kind,
the same signature as DDIM's `diffusion.ddim_step_mean_std`; `flow_chain` runs T such steps
in one `lax.scan` with per-step log-probabilities, SDE steps where `sde_steps` says and ODE
steps elsewhere (MixGRPO's window, Flow-GRPO-Fast's branching).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ddpo_jax.numerics import diffusion

Array = jax.Array

# Keys of a FlowMatchEulerDiscreteScheduler config this module implements; the others must be
# at their defaults (checked by `FlowSchedule.from_config`).
_UNSUPPORTED_UNLESS = {"invert_sigmas": (False,), "shift_terminal": (None,),
                       "use_karras_sigmas": (False,), "use_exponential_sigmas": (False,),
                       "use_beta_sigmas": (False,), "time_shift_type": ("exponential",),
                       "stochastic_sampling": (False,)}


@dataclasses.dataclass(frozen=True)
class FlowSchedule:
  """A FlowMatchEulerDiscreteScheduler configuration (SD3: shift 3.0; FLUX.1: dynamic)."""
  num_train_timesteps: int = 1000
  shift: float = 1.0
  use_dynamic_shifting: bool = False
  base_shift: float = 0.5
  max_shift: float = 1.15
  base_image_seq_len: int = 256
  max_image_seq_len: int = 4096

  @classmethod
  def from_config(cls, config: Mapping[str, Any]) -> "FlowSchedule":
    """From a diffusers scheduler_config.json dict.

    Raises:
      ValueError: another scheduler class, or a feature this module does not implement
        (Karras / exponential / beta sigmas, terminal shift, inverted sigmas, stochastic
        sampling, linear time shift), naming the key.
    """
    name = config.get("_class_name", "FlowMatchEulerDiscreteScheduler")
    if name != "FlowMatchEulerDiscreteScheduler":
      raise ValueError(f"flow schedule: scheduler _class_name={name!r} is not "
                       "'FlowMatchEulerDiscreteScheduler'")
    for key, allowed in _UNSUPPORTED_UNLESS.items():
      if config.get(key, allowed[0]) not in allowed:
        raise ValueError(f"flow schedule: unsupported {key}={config[key]!r} (supported: "
                         f"{allowed[0]!r})")
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in config.items() if k in names and v is not None})

  def calculate_shift(self, image_seq_len: int) -> float:
    """FLUX's mu: linear in the number of image tokens, base_shift at base_image_seq_len and
    max_shift at max_image_seq_len (diffusers' `calculate_shift`)."""
    m = (self.max_shift - self.base_shift) / (self.max_image_seq_len - self.base_image_seq_len)
    return image_seq_len * m + self.base_shift - m * self.base_image_seq_len

  def sigmas(self, num_steps: int, image_seq_len: int | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """(sigmas (num_steps + 1,) ending in 0, timesteps (num_steps,) = 1000 sigma), float32, as
    the SD3 pipeline (static shift) or the FLUX pipeline (dynamic shift: `image_seq_len`, the
    number of packed image tokens, is required) set them."""
    if num_steps < 1:
      raise ValueError(f"num_steps={num_steps} must be >= 1")
    n_train = self.num_train_timesteps
    if self.use_dynamic_shifting:
      if image_seq_len is None:
        raise ValueError("a dynamically shifted schedule (FLUX) needs image_seq_len")
      grid = np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32)
      mu = self.calculate_shift(image_seq_len)
      sigmas = math.exp(mu) / (math.exp(mu) + (1.0 / grid - 1.0))
    else:
      train = np.linspace(1, n_train, n_train, dtype=np.float32)[::-1] / np.float32(n_train)
      train = self.shift * train / (1 + (self.shift - 1) * train)  # float32, as in __init__
      sigma_max, sigma_min = float(train[0]), float(train[-1])
      grid = np.linspace(sigma_max * n_train, sigma_min * n_train, num_steps) / n_train
      sigmas = self.shift * grid / (1 + (self.shift - 1) * grid)
    sigmas = np.asarray(sigmas, np.float32)
    timesteps = sigmas * np.float32(n_train)
    return np.concatenate([sigmas, np.zeros(1, np.float32)]), timesteps


def euler_step(x: Array, velocity: Array, sigma, sigma_next) -> Array:
  """One Euler step of the flow ODE, x + (sigma_next - sigma) v, in float32 (or wider)."""
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  return x.astype(dtype) + (jnp.asarray(sigma_next, dtype) - jnp.asarray(sigma, dtype)) * \
      velocity.astype(dtype)


SDE_TYPES = ("sde", "cps", "ode")


def check_sde(sde_type: str, noise_level) -> None:
  """Raises ValueError for an unknown `sde_type` or a noise level outside its range (static
  Python numbers only; traced values are not checked)."""
  if sde_type not in SDE_TYPES:
    raise ValueError(f"sde_type={sde_type!r}; choose from {', '.join(SDE_TYPES)}")
  if sde_type == "ode" or not isinstance(noise_level, (int, float)):
    return
  if sde_type == "sde" and not noise_level > 0:
    raise ValueError(f"noise_level={noise_level}: the flow SDE needs noise_level > 0 (Flow-GRPO "
                     "uses 0.7)")
  if sde_type == "cps" and not 0 < noise_level <= 1:
    raise ValueError(f"noise_level={noise_level}: CPS needs 0 < noise_level <= 1 (its step std "
                     "is sigma_next sin(noise_level pi / 2))")


def step_mean_std(velocity: Array, x: Array, sigma, sigma_next, *, sde_type: str,
                  noise_level, sigma_max=None) -> tuple[Array, Array]:
  """Mean and std of one sampling step x_next ~ N(mean, std^2 I) from sigma to sigma_next.

  With dt = sigma_next - sigma < 0, v the (guided) velocity, a = noise_level
  (docs/algorithms.md §6.3):

  * "sde" (Flow-GRPO): the reverse SDE with the ODE's marginals, Euler-Maruyama:
        s    = a sqrt(sigma / (1 - sigma))   (sigma = 1 replaced by `sigma_max` in 1 - sigma)
        mean = x + [v + s^2 / (2 sigma) (x + (1 - sigma) v)] dt,   std = s sqrt(-dt)
  * "cps" (coefficients-preserving sampling): with x0 = x - sigma v and eps = x + (1 - sigma) v,
        std  = sigma_next sin(a pi / 2)
        mean = (1 - sigma_next) x0 + sqrt(sigma_next^2 - std^2) eps
    so mean + std z keeps the coefficients (1 - sigma_next, sigma_next) of x0 and noise.
  * "ode": the Euler step, mean = x + dt v, std = 0.

  Args:
    velocity, x: (B, ...) (promoted to >= float32).
    sigma, sigma_next: scalars or (B,) arrays, sigma_next < sigma.
    sde_type: one of SDE_TYPES (static). noise_level: a (Python float or scalar array).
    sigma_max: "sde" only: the value used for sigma = 1 in the denominator (Flow-GRPO: the
      schedule's second sigma, `sigmas[1]`); required when a step starts at sigma = 1.

  Returns:
    mean (B, ...) and std broadcastable to it ((B, 1, ..., 1) or scalar), float32.
  """
  check_sde(sde_type, noise_level)
  dtype = jnp.promote_types(jnp.promote_types(x.dtype, velocity.dtype), jnp.float32)
  x = x.astype(dtype)
  v = velocity.astype(dtype)

  def view(a):
    a = jnp.asarray(a, dtype)
    return a.reshape(a.shape + (1,) * (x.ndim - a.ndim)) if a.ndim else a

  sigma, sigma_next = view(sigma), view(sigma_next)
  dt = sigma_next - sigma
  if sde_type == "ode":
    return x + dt * v, jnp.zeros_like(dt)
  a = jnp.asarray(noise_level, dtype)
  if sde_type == "sde":
    if sigma_max is None:
      denominator = 1.0 - sigma
    else:
      denominator = 1.0 - jnp.where(sigma == 1.0, jnp.asarray(sigma_max, dtype), sigma)
    s2 = a ** 2 * sigma / denominator
    mean = x * (1.0 + s2 / (2.0 * sigma) * dt) + v * (1.0 + s2 * (1.0 - sigma) / (2.0 * sigma)) * dt
    return mean, jnp.sqrt(s2 * -dt)
  std = sigma_next * jnp.sin(a * (math.pi / 2))
  x0 = x - sigma * v
  eps = x + (1.0 - sigma) * v
  mean = (1.0 - sigma_next) * x0 + jnp.sqrt(jnp.maximum(sigma_next ** 2 - std ** 2, 0.0)) * eps
  return mean, std


def sde_window(num_steps: int, start: int, size: int) -> np.ndarray:
  """(num_steps,) bool, True on the SDE steps start .. start + size - 1 (the rest are ODE
  steps): the `sde_steps` mask of `flow_chain` for MixGRPO's and Flow-GRPO-Fast's windows.

  Raises:
    ValueError: size < 1, or a window that does not lie inside 0 .. num_steps - 1.
  """
  if size < 1 or start < 0 or start + size > num_steps:
    raise ValueError(f"SDE window [{start}, {start + size}) (size {size}) must lie inside the "
                     f"{num_steps} sampling steps [0, {num_steps})")
  mask = np.zeros(num_steps, bool)
  mask[start:start + size] = True
  return mask


def mixgrpo_window_start(epoch: int, num_steps: int, size: int, shift_every: int,
                         stride: int = 1, window_range: tuple[int, int] | None = None) -> int:
  """MixGRPO's sliding window (`GRPOTrainingStates.update_iteration`, "progressive" with
  `prog_overlap` and `roll_back`, in Tencent-Hunyuan/MixGRPO's fastvideo/utils/grpo_states.py):
  the start is lo at epoch 0 and moves `stride` steps later every `shift_every` epochs; once a
  move would carry the window past hi it rolls back to lo, so the schedule is periodic.

  window_range = [lo, hi) bounds the window's steps; None is the reference's
  [0, num_steps - 2) (fastvideo/train_grpo_flux.py builds the states with
  `max_timesteps=sampling_steps - 2` and `get_current_timesteps` cuts the window there, so the
  last two steps are never SDE steps).

  Returns the start s = lo + stride * ((epoch // shift_every) mod P), P = (hi - lo - size) //
  stride + 1 the number of full windows in [lo, hi). The reference goes on past the last full
  window with windows cut short at hi (size - 1, ..., 1 steps) and one empty one (a start of
  exactly hi, whose update has no step to train) before it rolls back; ours rolls back after
  the last full window, because the update trains a fixed number of steps per compiled program
  (`dynamics.trained_steps_per_sample`). The two agree at every epoch before the first
  shortened window (epochs < P * shift_every), and the period differs by those positions.

  Raises:
    ValueError: shift_every or stride < 1, size < 1, or a range outside the steps or shorter
      than the window.
  """
  if shift_every < 1 or stride < 1:
    raise ValueError(f"shift_every={shift_every} and stride={stride} must be >= 1")
  sde_window(num_steps, 0, size)  # checks the size
  lo, hi = (0, num_steps - 2) if window_range is None else window_range
  if not 0 <= lo < hi <= num_steps or hi - lo < size:
    raise ValueError(f"sde_window_range={(lo, hi)} must hold a window of {size} steps inside "
                     f"[0, {num_steps}) (the sliding window's default range is MixGRPO's "
                     f"[0, num_steps - 2))")
  positions = (hi - lo - size) // stride + 1
  return lo + stride * ((epoch // shift_every) % positions)


def random_window_start(rng: np.random.Generator, num_steps: int, size: int,
                        window_range: tuple[int, int]) -> int:
  """Flow-GRPO-Fast: a window of `size` SDE steps at a uniformly drawn start such that it lies
  in window_range = [lo, hi) of the step indices (flow_grpo's `sde_window_range`)."""
  lo, hi = window_range
  if not 0 <= lo < hi <= num_steps or hi - lo < size:
    raise ValueError(f"sde_window_range={tuple(window_range)} must hold a window of {size} "
                     f"steps inside [0, {num_steps})")
  return int(rng.integers(lo, hi - size + 1))


def transition_log_prob(x_next: Array, mean: Array, std: Array, sde_type: str) -> Array:
  """Per-sample log-probability of a stochastic step x_next ~ N(mean, std^2 I), as the
  reference (flow_grpo's `sde_step_with_logprob`) scores it, MEAN-reduced over non-batch dims:

  * "sde": the normalised Gaussian, -(x' - mean)^2 / (2 std^2) - log std - log sqrt(2 pi)
    (`diffusion.gaussian_log_prob`);
  * "cps": -(x' - mean)^2, with the 1 / (2 std^2) and the constants removed on purpose (the
    reference's "remove all constants"): PPO's ratio exp(lp - lp_old) is then taken on squared
    distances, so the clip range means what it means in flow_grpo's CPS runs (docs/algorithms.md
    §6.3).

  x_next is not differentiated (`stop_gradient`). Args: x_next, mean (B, ...); std broadcastable
  to mean (used by "sde" only). Returns (B,) float32.
  """
  if sde_type == "cps":
    d = jax.lax.stop_gradient(x_next).astype(jnp.float32) - mean.astype(jnp.float32)
    return -jnp.mean(d * d, axis=tuple(range(1, d.ndim)))
  return diffusion.gaussian_log_prob(x_next, mean, std)


def flow_chain(velocity_fn, params: Any, x_init: Array, step_keys: Array, context: Any,
               uncond_context: Any, *, sigmas, guidance_scale: float,
               sde_type: str, noise_level, sde_steps=None, reference_params: Any = None,
               kl_reduction: str = "mean") -> tuple[Array, dict]:
  """T guided flow steps in one `lax.scan`, with each step's log-probability.

  Step i: v = the guided velocity at x (`diffusion.guided_eps`), (mean, std) =
  `step_mean_std(v, x, sigmas[i], sigmas[i + 1])`, x_next = mean + std z, z ~ N(0, I) from
  `step_keys[i]`. Where `sde_steps[i]` is False the step is the ODE's (x_next = mean, std 0,
  log-prob 0): MixGRPO's window and Flow-GRPO-Fast's branch points are such masks.

  Args:
    velocity_fn, params, context, uncond_context, guidance_scale: as `sample_ode`.
    x_init: (B, ...) x at sigmas[0] (noise).
    step_keys: (T, 2) uint32 PRNG keys.
    sigmas (T + 1,): `FlowSchedule.sigmas`, ending in 0 (Flow-GRPO's sigma_max is sigmas[1]).
    sde_type, noise_level: as `step_mean_std` (static sde_type).
    sde_steps: optional (T,) bool (one mask for the batch) or (T, B) (one per sample); None =
      every step stochastic.
    reference_params: optional params of a reference velocity model (the pre-trained one) run
      at the same x: each step's KL_t = KL(step under params || step under reference_params)
      (`diffusion.gaussian_kl_shared_std`, `kl_reduction` "mean" or "sum" over the latent
      dims; 0 on a deterministic step) and the reference step mean are returned too.

  Returns:
    (x at sigmas[-1] (B, ...) float32, per-step outputs on a leading T axis: "latents" x_i,
    "next_latents", "log_probs" (T, B) (`transition_log_prob`, mean over the latent dims; 0 on
    ODE steps), "std" (T,), or (T, B, 1, ..., 1) with per-sample masks; with
    `reference_params` also "kl" (T, B) and "reference_means" (T, B, ...)).
  """
  check_sde(sde_type, noise_level)
  sigmas = jnp.asarray(sigmas, jnp.float32)
  if sigmas.ndim != 1 or sigmas.shape[0] < 2:
    raise ValueError(f"sigmas {sigmas.shape} must be (T + 1,) with T >= 1")
  n = sigmas.shape[0] - 1
  mask = jnp.ones((n,), bool) if sde_steps is None else jnp.asarray(sde_steps, bool)
  if mask.shape not in ((n,), (n, x_init.shape[0])):
    raise ValueError(f"sde_steps {mask.shape} must be (T,) = ({n},) or (T, B) = "
                     f"({n}, {x_init.shape[0]})")
  sigma_max = sigmas[1] if n > 1 else sigmas[0]

  def step(p, x, sigma, sigma_next, per_sample):
    """(mean, std) of one step under params `p`."""
    v = diffusion.guided_eps(velocity_fn, p, x, jnp.full((x.shape[0],), sigma), context,
                             uncond_context, guidance_scale)
    mean, std = step_mean_std(v, x, sigma, sigma_next, sde_type=sde_type,
                              noise_level=noise_level, sigma_max=sigma_max)
    std = jnp.where(per_sample, std, 0.0)
    if sde_type != "ode":
      mean = jnp.where(per_sample, mean, euler_step(x, v, sigma, sigma_next))
    return mean, std

  def body(x, inputs):
    sigma, sigma_next, key, stochastic = inputs
    per_sample = stochastic.reshape(stochastic.shape + (1,) * (x.ndim - 1)) if stochastic.ndim \
        else stochastic  # (B, 1, ..., 1) for per-sample masks
    mean, std = step(params, x, sigma, sigma_next, per_sample)
    x_next = mean + std * jax.random.normal(key, x.shape, mean.dtype)
    std_b = diffusion.per_sample_std(std, x.shape)
    log_prob = jnp.where(std_b > 0, transition_log_prob(x_next, mean, std, sde_type), 0.0)
    out = {"latents": x, "next_latents": x_next, "log_probs": log_prob, "std": std}
    if reference_params is not None:
      ref_mean, _ = step(reference_params, x, sigma, sigma_next, per_sample)
      kl = diffusion.gaussian_kl_shared_std(mean, ref_mean, std, reduction=kl_reduction)
      out["kl"] = jnp.where(std_b > 0, kl, 0.0)
      out["reference_means"] = ref_mean
    return x_next, out

  return jax.lax.scan(body, x_init.astype(jnp.float32),
                      (sigmas[:-1], sigmas[1:], step_keys, mask))


def step_log_prob(velocity_fn, params: Any, latents: Array, sigma: Array, sigma_next: Array,
                  next_latents: Array, context: Any, uncond_context: Any, *,
                  guidance_scale: float, sde_type: str, noise_level,
                  sigma_max=None) -> tuple[Array, Array, Array]:
  """Re-scores one step of stored flow trajectories under `params` (the GRPO update).

  The same guided velocity and `step_mean_std` as `flow_chain`, with one (sigma, sigma_next)
  per sample, so with the sampling params it reproduces the chain's log-probs.

  Args:
    latents: (B, ...) x at sigma. sigma, sigma_next: (B,) float32 (the steps drawn for each
      sample). next_latents: (B, ...) the stored x_next (not differentiated).
    context / uncond_context, guidance_scale: as `flow_chain`.
    sde_type, noise_level, sigma_max: as `step_mean_std` (`flow_chain` uses sigmas[1]).

  Returns:
    log_prob (B,) float32 (`transition_log_prob`: for "cps" -mean((x' - mean)^2); 0 on a
    deterministic step, std = 0: CPS's last, as `flow_chain` records it), mean (B, ...)
    float32, std (B, 1, ..., 1) float32.
  """
  sigma = jnp.asarray(sigma, jnp.float32)
  v = diffusion.guided_eps(velocity_fn, params, latents, sigma, context,
                           uncond_context, guidance_scale)
  mean, std = step_mean_std(v, latents, sigma, sigma_next, sde_type=sde_type,
                            noise_level=noise_level, sigma_max=sigma_max)
  log_prob = transition_log_prob(next_latents, mean, std, sde_type)
  return jnp.where(diffusion.per_sample_std(std, mean.shape) > 0, log_prob, 0.0), mean, std


def flow_matching_loss_terms(velocity_fn, params: Any, key: Array, x0: Array, context: Any,
                             class_labels=None) -> Array:
  """Per-sample rectified-flow (conditional flow matching) loss, the flow models' pre-training.

  sigma ~ U(0, 1), eps ~ N(0, I), x = (1 - sigma) x0 + sigma eps, target velocity eps - x0:
  loss = mean_{h,w,c} (velocity_fn(params, x, sigma, context, class_labels) - (eps - x0))^2.

  Args:
    key: PRNG key. x0: (B, H, W, C) clean samples. context: the conditioning (batch on axis 0).

  Returns:
    (B,) float32.
  """
  k_t, k_eps = jax.random.split(key)
  x0 = x0.astype(jnp.float32)
  sigma = jax.random.uniform(k_t, (x0.shape[0],), jnp.float32)
  eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
  s = sigma.reshape((-1,) + (1,) * (x0.ndim - 1))
  v = velocity_fn(params, (1.0 - s) * x0 + s * eps, sigma, context, class_labels)
  return jnp.mean((v.astype(jnp.float32) - (eps - x0)) ** 2, axis=tuple(range(1, x0.ndim)))


def sample_ode(velocity_fn, params: Any, x_init: Array, context: Any, uncond_context: Any, *,
               sigmas, guidance_scale: float) -> Array:
  """Integrates the flow ODE with Euler steps from `x_init` (at sigmas[0]) to sigmas[-1].

  Args:
    velocity_fn: (params, x (B,...), sigma (B,) float32, context, class_labels=None)
      -> velocity (B,...) (a velocity `denoiser.Denoiser`); `context` is any pytree with the
      batch on axis 0.
    x_init: (B, ...) noise.
    context / uncond_context: the conditioning and the unconditional one (batch 1 or B; used
      when guidance_scale != 1), as `diffusion.guided_eps` takes them.
    sigmas: (T + 1,), from `FlowSchedule.sigmas`.
    guidance_scale: classifier-free guidance weight (static).

  Returns:
    x at sigmas[-1], (B, ...) float32.
  """
  sigmas = jnp.asarray(sigmas, jnp.float32)

  def step(x, inputs):
    sigma, sigma_next = inputs
    v = diffusion.guided_eps(velocity_fn, params, x, jnp.full((x.shape[0],), sigma), context,
                             uncond_context, guidance_scale)
    return euler_step(x, v, sigma, sigma_next), None

  x, _ = jax.lax.scan(step, x_init.astype(jnp.float32), (sigmas[:-1], sigmas[1:]))
  return x
