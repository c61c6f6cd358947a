"""The sampling dynamics of the trainer: one unit per kind, one signature, so that the sampler
and the update stay one program for every model family.

A `Dynamics` turns the model's prediction into each step's Gaussian transition and scores
stored steps again:

* `DDIMDynamics` (`sample.sampler="ddim"`): DDIM with eta > 0 on a noise-predicting model (SD
  1.x / 2.x, SDXL, the digits model), `diffusion.sample_trajectory` / `diffusion.step_log_prob`
  (docs/algorithms.md §1). DDPO's sampler, unchanged.
* `FlowDynamics` (`sample.sampler="sde"` or `"cps"`): Flow-GRPO's SDE or coefficients-
  preserving sampling on a velocity-predicting model (SD3 / SD3.5, FLUX.1),
  `flow.flow_chain` / `flow.step_log_prob` (docs/algorithms.md §6.3); with
  `sample.sampler="dpm2"` DiffusionNFT's deterministic multistep DPM-Solver of the flow ODE
  (`dpm2_chain`, no log-probabilities: train.algorithm 'nft' only, docs/algorithms.md §6.6).

Both return a `diffusion.Trajectory`; its per-step `times` / `next_times` are the dynamics' time
(`denoiser.Denoiser`'s convention): DDIM's integer timesteps t and prev_t, or the flow's float32
sigma and sigma_next.
`make_dynamics(policy, config)` picks the kind from `config.sample.sampler` and refuses a
sampler the model's prediction type cannot take, naming both.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ddpo_jax.numerics import diffusion, flow

# sampler -> the `denoiser.Denoiser.prediction` it moves
SAMPLERS = {"ddim": "eps", "sde": "velocity", "cps": "velocity", "ode": "velocity",
            "dpm2": "velocity"}
# Samplers without step log-probabilities (deterministic): DiffusionNFT only.
DETERMINISTIC_SAMPLERS = ("ode", "dpm2")


def dpm2_chain(velocity_fn, params: Any, x_init: jax.Array, context: Any, uncond_context: Any,
               *, sigmas, guidance_scale: float) -> tuple[jax.Array, jax.Array]:
  """DiffusionNFT's deterministic sampler (`run_sampling(..., solver="dpm2",
  determistic=True)`, flow_grpo/diffusers_patch/solver.py `dpm_step` with order 2): the
  multistep DPM-Solver++(2M) in x0 = x − σ v on the flow schedule, alpha = 1 − σ,
  λ = log(alpha / σ):

      step 0 and the last step:  the Euler step (its `ddim_update` with eta 0)
      step i otherwise:          h = λ_{i+1} − λ_i,  r = (λ_i − λ_{i−1}) / h,
                                 D = m_i + (m_i − m_{i−1}) / (2 r)        (m_i = x0 at step i)
                                 x_{i+1} = (σ_{i+1} / σ_i) x_i − alpha_{i+1} (e^{−h} − 1) D

  (at σ_{i−1} = 1, λ_{i−1} = −inf: r = inf, the first-order DPM-Solver step, as the reference's
  arithmetic gives). Step coefficients in float64 on the host, x in float32.

  Args:
    velocity_fn, params, context, uncond_context, guidance_scale: as `flow.sample_ode`.
    x_init: (B, ...) noise at sigmas[0].
    sigmas: (T + 1,) ending in 0 (`FlowSchedule.sigmas`), T >= 1.

  Returns:
    (latents (T, B, ...): x_i at each step, next_latents (T, B, ...): x_{i+1}), float32.
  """
  sig = np.asarray(sigmas, np.float64)
  n = len(sig) - 1
  if sig.ndim != 1 or n < 1:
    raise ValueError(f"sigmas {sig.shape} must be (T + 1,) with T >= 1")
  # per step: x_{i+1} = a_i x_i + b_i m_i + c_i m_{i-1}
  a, b, c = np.zeros(n), np.zeros(n), np.zeros(n)
  with np.errstate(divide="ignore"):
    lam = np.log(1.0 - sig) - np.log(sig)  # -inf at sigma 1, +inf at sigma 0
  for i in range(n):
    if i == 0 or i == n - 1:  # Euler: x + (s' - s) v with v = (x - m) / s
      a[i], b[i] = sig[i + 1] / sig[i], 1.0 - sig[i + 1] / sig[i]
      continue
    h = lam[i + 1] - lam[i]
    phi = -(1.0 - sig[i + 1]) * np.expm1(-h)  # - alpha_{i+1} (e^{-h} - 1)
    inv_r = 0.0 if np.isinf(lam[i - 1]) else h / (lam[i] - lam[i - 1])
    a[i], b[i], c[i] = sig[i + 1] / sig[i], phi * (1.0 + 0.5 * inv_r), -phi * 0.5 * inv_r
  sig32 = jnp.asarray(sig, jnp.float32)
  coefs = tuple(jnp.asarray(v, jnp.float32) for v in (a, b, c))

  def step(carry, inputs):
    x, m_prev = carry
    sigma, ai, bi, ci = inputs
    v = diffusion.guided_eps(velocity_fn, params, x, jnp.full((x.shape[0],), sigma), context,
                             uncond_context, guidance_scale).astype(jnp.float32)
    m = x - sigma * v
    x_next = ai * x + bi * m + ci * m_prev
    return (x_next, m), (x, x_next)

  x0 = x_init.astype(jnp.float32)
  _, (latents, next_latents) = jax.lax.scan(
      step, (x0, jnp.zeros_like(x0)),
      (sig32[:-1],) + coefs)
  return latents, next_latents


@dataclasses.dataclass(frozen=True)
class DDIMDynamics:
  """DDIM with eta > 0 on the policy's noise schedule (`NoiseSchedule.from_config`)."""
  schedule: diffusion.NoiseSchedule
  timesteps: np.ndarray  # (T,) int32
  prev_timesteps: np.ndarray  # (T,) int32
  eta: float


  def sample(self, denoiser, params, key, context, uncond, *, guidance_scale,
             class_labels=None, reference_params=None, kl_reduction="sum",
             sde_steps=None) -> diffusion.Trajectory:
    """`diffusion.sample_trajectory` of `denoiser` (an "eps" `denoiser.Denoiser`, its
    latent shape and null labels) under `params`."""
    if sde_steps is not None:
      raise ValueError("DDIM dynamics: every step is stochastic (no SDE window)")
    return diffusion.sample_trajectory(
        denoiser, params, key, context, uncond, alphas_cumprod=self.schedule.alphas_cumprod,
        timesteps=self.timesteps, prev_timesteps=self.prev_timesteps,
        latent_shape=denoiser.latent_shape, eta=self.eta, guidance_scale=guidance_scale,
        class_labels=class_labels, uncond_class_labels=denoiser.null_labels,
        final_alpha_cumprod=self.schedule.final_alpha_cumprod,
        reference_params=reference_params, kl_reduction=kl_reduction)

  def step_log_prob(self, denoiser, params, batch, uncond, *, guidance_scale):
    """(log_prob (B,), mean, std) of the stored steps `batch` ("latents", "next_latents",
    "times", "next_times" (B,), "context", "class_labels") under `params`."""
    return diffusion.step_log_prob(
        denoiser, params, batch["latents"], batch["times"], batch["next_times"],
        batch["next_latents"], batch["context"], uncond, guidance_scale=guidance_scale,
        class_labels=batch["class_labels"], uncond_class_labels=denoiser.null_labels,
        alphas_cumprod=self.schedule.alphas_cumprod, eta=self.eta,
        final_alpha_cumprod=self.schedule.final_alpha_cumprod)


@dataclasses.dataclass(frozen=True)
class FlowDynamics:
  """Flow-GRPO's SDE or CPS (`flow.SDE_TYPES`) on the flow schedule `sigmas` (T + 1,)."""
  sigmas: np.ndarray  # (T + 1,) float32, ending in 0
  sde_type: str
  noise_level: float
  noise_group_size: int = 1  # > 1: consecutive groups of this many samples share x_init


  def __post_init__(self):
    if self.sde_type != "dpm2":
      flow.check_sde(self.sde_type, self.noise_level)

  @property
  def sigma_max(self):
    """Flow-GRPO's stand-in for sigma = 1 in the SDE's 1 - sigma (`flow.flow_chain`)."""
    return self.sigmas[1] if len(self.sigmas) > 2 else self.sigmas[0]

  def sample(self, denoiser, params, key, context, uncond, *, guidance_scale,
             class_labels=None, reference_params=None, kl_reduction="sum",
             sde_steps=None) -> diffusion.Trajectory:
    """`flow.flow_chain` from N(0, I) noise (shared by each group of `noise_group_size`
    consecutive samples when > 1: Flow-GRPO-Fast's one ODE trajectory per prompt that branches
    at the SDE steps). `sde_steps`: (B, T) bool, the SDE window of each sample (None: every
    step); the trajectory's `trained_steps` is it."""
    if class_labels is not None:
      raise ValueError("flow dynamics: class labels are not supported")
    b = jax.tree.leaves(context)[0].shape[0]
    g = self.noise_group_size
    if b % g:
      raise ValueError(f"flow dynamics: batch {b} is not a multiple of the noise group {g}")
    k_init, k_steps = jax.random.split(key)
    x = jax.random.normal(k_init, (b // g,) + denoiser.latent_shape, jnp.float32)
    x = jnp.repeat(x, g, axis=0) if g > 1 else x
    n = len(self.sigmas) - 1
    sig = jnp.asarray(self.sigmas, jnp.float32)
    if self.sde_type == "dpm2":  # deterministic: no log-probabilities (0), no KL
      if sde_steps is not None or reference_params is not None:
        raise ValueError("sample.sampler='dpm2' is deterministic: no SDE window, no KL")
      latents, next_latents = dpm2_chain(denoiser, params, x, context, uncond,
                                         sigmas=self.sigmas, guidance_scale=guidance_scale)
      return diffusion.Trajectory(
          latents=jnp.swapaxes(latents, 0, 1), next_latents=jnp.swapaxes(next_latents, 0, 1),
          log_probs=jnp.zeros((b, n), jnp.float32),
          times=jnp.broadcast_to(sig[None, :-1], (b, n)),
          next_times=jnp.broadcast_to(sig[None, 1:], (b, n)), context=context,
          trained_steps=None, kl=None, reference_means=None)
    _, out = flow.flow_chain(denoiser, params, x, jax.random.split(k_steps, n), context, uncond,
                             sigmas=self.sigmas, guidance_scale=guidance_scale, sde_type=self.sde_type,
                             noise_level=self.noise_level,
                             sde_steps=None if sde_steps is None else jnp.swapaxes(sde_steps, 0, 1),
                             reference_params=reference_params, kl_reduction=kl_reduction)
    with_kl = reference_params is not None
    return diffusion.Trajectory(
        latents=jnp.swapaxes(out["latents"], 0, 1),
        next_latents=jnp.swapaxes(out["next_latents"], 0, 1),
        log_probs=jnp.swapaxes(out["log_probs"], 0, 1),
        times=jnp.broadcast_to(sig[None, :-1], (b, n)),
        next_times=jnp.broadcast_to(sig[None, 1:], (b, n)), context=context,
        trained_steps=None if sde_steps is None else jnp.asarray(sde_steps, bool),
        kl=jnp.swapaxes(out["kl"], 0, 1) if with_kl else None,
        reference_means=jnp.swapaxes(out["reference_means"], 0, 1) if with_kl else None)

  def step_log_prob(self, denoiser, params, batch, uncond, *, guidance_scale):
    """(log_prob (B,), mean, std) of the stored steps `batch` ("latents", "next_latents",
    sigma "times" and sigma_next "next_times" (B,), "context") under `params`; 0 on a
    deterministic step (CPS's last), as the sampler recorded it."""
    if self.sde_type == "dpm2":
      raise ValueError("sample.sampler='dpm2' has no step log-probabilities")
    return flow.step_log_prob(
        denoiser, params, batch["latents"], batch["times"], batch["next_times"],
        batch["next_latents"], batch["context"], uncond, guidance_scale=guidance_scale,
        sde_type=self.sde_type, noise_level=self.noise_level, sigma_max=self.sigma_max)


Dynamics = Any  # DDIMDynamics | FlowDynamics


def check_sde_window(sample_config) -> None:
  """Raises ValueError for an SDE window (`sample.sde_window_*`) that cannot be drawn: on DDIM,
  larger than the steps, a range outside them or too short for the window, a shift period
  < 1 (before anything compiles)."""
  s = sample_config
  w, n = int(s.sde_window_size), int(s.num_steps)
  if w == 0:
    return
  if s.sampler == "ddim":
    raise ValueError(f"sample.sde_window_size={w}: SDE windows are the flow samplers' ('sde', "
                     "'cps'); DDIM's steps are all stochastic")
  if not 0 < w <= n:
    raise ValueError(f"sample.sde_window_size={w} must lie in [0, sample.num_steps={n}]")
  if s.sde_window_schedule == "sliding":
    flow.mixgrpo_window_start(0, n, w, int(s.sde_window_shift_every),
                              window_range=_window_range(s, sliding=True))
  else:
    flow.random_window_start(np.random.default_rng(0), n, w, _window_range(s))


def _window_range(s, sliding: bool = False) -> tuple[int, int] | None:
  """(lo, hi) of `sample.sde_window_range`; () is every step for the random window and
  MixGRPO's [0, T - 2) for the sliding one (None: `flow.mixgrpo_window_start`'s default)."""
  if len(s.sde_window_range) not in (0, 2):
    raise ValueError(f"sample.sde_window_range={tuple(s.sde_window_range)} must be (lo, hi) or ()")
  given = tuple(int(v) for v in s.sde_window_range)
  if sliding:
    return given or None
  return given or (0, int(s.num_steps))


def sde_window_steps(sample_config, seed: int, epoch: int, batch: int) -> np.ndarray | None:
  """(T,) bool, the SDE steps of sampling call `batch` of `epoch` (`flow.sde_window`): MixGRPO's
  sliding window (one per epoch, rolling back to its start: `flow.mixgrpo_window_start`) or Flow-GRPO-Fast's random one (drawn from (seed, epoch, batch): the same on
  every process and on resume); None without a window (`sample.sde_window_size` 0)."""
  s = sample_config
  w, n = int(s.sde_window_size), int(s.num_steps)
  if w == 0:
    return None
  if s.sde_window_schedule == "sliding":
    start = flow.mixgrpo_window_start(epoch, n, w, int(s.sde_window_shift_every),
                                      window_range=_window_range(s, sliding=True))
  else:
    rng = np.random.default_rng([seed, epoch, batch, 0x5DE])
    start = flow.random_window_start(rng, n, w, _window_range(s))
  return flow.sde_window(n, start, w)


def trained_steps_per_sample(sample_config, timestep_fraction: float) -> int:
  """K, the steps of each trajectory one update trains on: int(T · fraction) of the T steps,
  or of the W window steps when there is an SDE window."""
  w = int(sample_config.sde_window_size)
  return int((w or int(sample_config.num_steps)) * timestep_fraction)


def make_dynamics(denoiser, sample_config) -> Dynamics:
  """The dynamics of `sample_config.sampler` (`config.sample`) for `denoiser`
  (`denoiser.Denoiser`: its `prediction` picks DDIM or the flow chains, its `scheduler_config`
  or `flow_sigmas` the schedule).

  Raises:
    ValueError: an unknown sampler, or one the model's prediction cannot take (DDPO's DDIM on
      a velocity model, a flow SDE on a noise-predicting model).
  """
  s = sample_config
  sampler = s.sampler
  if sampler not in SAMPLERS:
    raise ValueError(f"sample.sampler={sampler!r}; choose from {', '.join(SAMPLERS)}")
  prediction = denoiser.prediction
  if SAMPLERS[sampler] != prediction:
    fits = [k for k, v in SAMPLERS.items() if v == prediction]
    raise ValueError(f"sample.sampler={sampler!r} needs a {SAMPLERS[sampler]!r}-predicting "
                     f"model; this one predicts {prediction!r} (use sample.sampler in {fits})")
  if sampler == "ddim":
    sched = diffusion.NoiseSchedule.from_config(denoiser.scheduler_config)
    ts, prev = sched.ddim_timesteps(s.num_steps)
    return DDIMDynamics(sched, ts, prev, float(s.eta))
  return FlowDynamics(np.asarray(denoiser.flow_sigmas(int(s.num_steps)), np.float32),
                      sampler, float(s.noise_level),
                      int(s.group_size) if s.same_noise_per_group else 1)
