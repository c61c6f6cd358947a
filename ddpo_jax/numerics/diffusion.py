"""DDIM sampling with per-step log-probabilities, the core of DDPO (docs/algorithms.md §1).

A denoising trajectory x_T -> x_{T-1} -> ... -> x_0 of DDIM with eta > 0 is a Markov chain of
Gaussian steps, so every step has a log-probability under the current denoiser. This module
provides, all as pure `jax.numpy` functions that can be jitted and sharded on a data axis:

* `NoiseSchedule`: alphas_cumprod of a diffusers scheduler config (Stable Diffusion's default).
* `ddim_timesteps`: diffusers' DDIM "leading" timestep spacing.
* `ddim_step_mean_std`, `gaussian_log_prob`, `ddim_step_with_logprob`: one DDIM step.
* `ddim_chain`: the T guided DDIM steps in one `lax.scan` (forward, or differentiated with
  truncation and remat: CTRL's backprop solver); `Trajectory`, `sample_trajectory`: DDPO's
  sampler on it, recording every step with its log-probability.
* `step_log_prob`: re-scores one stored step under (new) parameters (the PPO update).
* `gaussian_kl_shared_std`: KL between two Gaussian steps with the same std (CTRL's penalty).
* `denoising_loss_terms`: the ordinary epsilon-prediction loss (pre-training, RWR).

Conventions: latents are channels-last (B, H, W, C); a timestep `t` is an integer in
[0, num_train_timesteps); `prev_t < 0` marks the last step, whose alpha_prev is the schedule's
"final" alpha_cumprod (alphas_cumprod[0] for Stable Diffusion, `set_alpha_to_one=False`).
All step arithmetic is done in float32 (or wider, if the inputs are wider) whatever the dtype
of the denoiser output.

`eps_fn` everywhere has the signature
`eps_fn(params, x (N,H,W,C), t (N,) int32, context (N,L,D), class_labels (N,) int32 | None)
-> eps (N,H,W,C)`.

The prompt conditioning `context` is an array (N, L, D) or any pytree of arrays with the batch
on axis 0 (SDXL's {"context": (N,L,D), "text_embeds": (N,P)}); this module only batches it
(broadcast, concatenate, keep), leaf by leaf, and passes it to `eps_fn`.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

Array = jax.Array
EpsFn = Callable[..., Array]

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
_MIN_STD = 1e-6


# ----------------------------------------------------------------------------- noise schedule


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
  """Betas of the "squaredcos_cap_v2" (Glide cosine) schedule, float64 (N,)."""

  def alpha_bar(t):
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

  n = num_train_timesteps
  return np.array([min(1.0 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta)
                   for i in range(n)], dtype=np.float64)


@struct.dataclass
class NoiseSchedule:
  """Discrete-time variance-preserving noise schedule (diffusers DDPM/DDIM conventions).

  Attributes:
    alphas_cumprod: (num_train_timesteps,) float32, alpha_bar_t = prod_{s<=t} (1 - beta_s).
    num_train_timesteps: number of training timesteps (static).
    steps_offset: offset added to the DDIM inference timesteps (static; 1 for SD).
    set_alpha_to_one: if True the last DDIM step uses alpha_prev = 1, else alphas_cumprod[0]
      (static; False for SD).
    prediction_type: what the denoiser predicts; only "epsilon" is supported (static).
  """
  alphas_cumprod: Array
  num_train_timesteps: int = struct.field(pytree_node=False, default=1000)
  steps_offset: int = struct.field(pytree_node=False, default=1)
  set_alpha_to_one: bool = struct.field(pytree_node=False, default=False)
  prediction_type: str = struct.field(pytree_node=False, default="epsilon")

  @classmethod
  def from_config(cls, scheduler_config: Mapping[str, Any]) -> "NoiseSchedule":
    """Builds the schedule from a diffusers scheduler config (e.g. `scheduler_config.json`).

    Reads `beta_schedule` ("scaled_linear" | "linear" | "squaredcos_cap_v2"), `beta_start`,
    `beta_end`, `num_train_timesteps`, `trained_betas`, `steps_offset`, `set_alpha_to_one` and
    `prediction_type`; missing keys take `diffusers.DDIMScheduler`'s defaults. Betas and their
    cumulative product are computed in float64 and stored as float32.

    Raises:
      ValueError: unsupported `beta_schedule`, `prediction_type` other than "epsilon",
        `timestep_spacing` other than "leading", or `rescale_betas_zero_snr` / `thresholding`.
    """
    cfg = dict(scheduler_config)
    prediction_type = cfg.get("prediction_type", "epsilon")
    if prediction_type != "epsilon":
      raise ValueError(
          f"prediction_type={prediction_type!r} is not supported: ddpo_jax's DDIM step with "
          "log-probabilities only implements epsilon prediction.")
    spacing = cfg.get("timestep_spacing", "leading")
    if spacing != "leading":
      raise ValueError(f"timestep_spacing={spacing!r} is not supported (only 'leading').")
    for flag in ("rescale_betas_zero_snr", "thresholding"):
      if cfg.get(flag, False):
        raise ValueError(f"scheduler option {flag}=True is not supported.")
    n = int(cfg.get("num_train_timesteps", 1000))
    trained = cfg.get("trained_betas", None)
    if trained is not None:
      betas = np.asarray(trained, dtype=np.float64)
      if betas.shape != (n,):
        raise ValueError(f"trained_betas has shape {betas.shape}, expected ({n},).")
    else:
      schedule = cfg.get("beta_schedule", "linear")
      b0 = float(cfg.get("beta_start", 0.0001))
      b1 = float(cfg.get("beta_end", 0.02))
      if schedule == "linear":
        betas = np.linspace(b0, b1, n, dtype=np.float64)
      elif schedule == "scaled_linear":
        betas = np.linspace(b0 ** 0.5, b1 ** 0.5, n, dtype=np.float64) ** 2
      elif schedule == "squaredcos_cap_v2":
        betas = _cosine_betas(n)
      else:
        raise ValueError(
            f"beta_schedule={schedule!r} is not supported; use 'scaled_linear', 'linear' or "
            "'squaredcos_cap_v2'.")
    alphas_cumprod = np.cumprod(1.0 - betas)
    return cls(alphas_cumprod=jnp.asarray(alphas_cumprod, dtype=jnp.float32),
               num_train_timesteps=n,
               steps_offset=int(cfg.get("steps_offset", 0)),
               set_alpha_to_one=bool(cfg.get("set_alpha_to_one", True)),
               prediction_type=prediction_type)

  @classmethod
  def sd(cls) -> "NoiseSchedule":
    """Stable Diffusion v1's schedule: scaled_linear 0.00085 -> 0.012, 1000 steps,
    steps_offset 1, set_alpha_to_one False, epsilon prediction."""
    return cls.from_config({"beta_schedule": "scaled_linear", "beta_start": 0.00085,
                            "beta_end": 0.012, "num_train_timesteps": 1000,
                            "steps_offset": 1, "set_alpha_to_one": False,
                            "prediction_type": "epsilon"})

  @property
  def final_alpha_cumprod(self) -> Array:
    """alpha_prev of the last DDIM step (prev_t < 0): 1.0 or alphas_cumprod[0], float32 ()."""
    if self.set_alpha_to_one:
      return jnp.ones((), self.alphas_cumprod.dtype)
    return self.alphas_cumprod[0]

  def ddim_timesteps(self, num_inference_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, prev_timesteps), both int32 NumPy (num_inference_steps,), for this schedule."""
    ts = ddim_timesteps(num_inference_steps, self.num_train_timesteps, self.steps_offset)
    return ts, ddim_prev_timesteps(ts, num_inference_steps, self.num_train_timesteps)


def ddim_timesteps(num_inference_steps: int, num_train_timesteps: int = 1000,
                   steps_offset: int = 1) -> np.ndarray:
  """DDIM inference timesteps with diffusers' "leading" spacing, descending.

  t_i = (num_inference_steps - 1 - i) * (num_train_timesteps // num_inference_steps)
  + steps_offset; for SD (1000, offset 1) and 50 steps: 981, 961, ..., 21, 1.

  Returns:
    int32 NumPy array (num_inference_steps,).
  """
  if not 1 <= num_inference_steps <= num_train_timesteps:
    raise ValueError(f"num_inference_steps={num_inference_steps} must lie in "
                     f"[1, num_train_timesteps={num_train_timesteps}].")
  step_ratio = num_train_timesteps // num_inference_steps
  ts = (np.arange(num_inference_steps) * step_ratio).round()[::-1] + steps_offset
  if ts.max() >= num_train_timesteps:
    raise ValueError(f"steps_offset={steps_offset} pushes timestep {int(ts.max())} past "
                     f"num_train_timesteps={num_train_timesteps}.")
  return ts.astype(np.int32)


def ddim_prev_timesteps(timesteps: np.ndarray, num_inference_steps: int,
                        num_train_timesteps: int = 1000) -> np.ndarray:
  """prev_t = t - num_train_timesteps // num_inference_steps (negative on the last step).

  Returns:
    int32 NumPy array with the shape of `timesteps`.
  """
  step = num_train_timesteps // num_inference_steps
  return (np.asarray(timesteps) - step).astype(np.int32)


# ----------------------------------------------------------------------------- one DDIM step


def _check_eta(eta) -> None:
  if isinstance(eta, (int, float)) and not isinstance(eta, bool) and eta <= 0:
    raise ValueError(
        f"eta={eta}: the DDIM step is deterministic for eta <= 0, so its log-probability is "
        "undefined; DDPO needs a stochastic sampler (eta > 0, the paper uses 1.0).")


def _compute_dtype(*xs) -> jnp.dtype:
  return jnp.result_type(jnp.float32, *[x.dtype for x in xs])


def _batch_view(v: Array, ndim: int) -> Array:
  """(B,) -> (B, 1, ..., 1) with `ndim` dims in total."""
  return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def _alpha_prev(alphas_cumprod: Array, prev_t: Array, final_alpha_cumprod) -> Array:
  final = alphas_cumprod[0] if final_alpha_cumprod is None else final_alpha_cumprod
  final = jnp.asarray(final, alphas_cumprod.dtype)
  return jnp.where(prev_t >= 0, alphas_cumprod[jnp.clip(prev_t, 0, None)], final)


def ddim_step_mean_std(alphas_cumprod: Array, eps: Array, t: Array, prev_t: Array, x_t: Array,
                       eta, *, final_alpha_cumprod=None) -> tuple[Array, Array]:
  """Mean and std of the Gaussian DDIM step p(x_prev | x_t) (docs/algorithms.md §1.2).

      x0_hat = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)                        (no clipping)
      std    = eta sqrt((1 - a_prev) / (1 - a_t) (1 - a_t / a_prev))
      mean   = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - std^2) eps

  Args:
    alphas_cumprod: (N_train,) float32.
    eps: (B, H, W, C) predicted noise (any float dtype; promoted to >= float32).
    t: (B,) int, current timesteps in [0, N_train).
    prev_t: (B,) int, previous timesteps; prev_t < 0 means the last step, where
      a_prev = `final_alpha_cumprod` (default alphas_cumprod[0], i.e. set_alpha_to_one=False).
    x_t: (B, H, W, C) current latents.
    eta: DDIM stochasticity (Python float or scalar array); eta = 0 gives std = 0.
    final_alpha_cumprod: optional scalar alpha_prev of the last step (1.0 for
      set_alpha_to_one=True schedules; see `NoiseSchedule.final_alpha_cumprod`).

  Returns:
    mean: (B, H, W, C) float32; std: (B, 1, 1, 1) float32 (unclipped).
  """
  dtype = _compute_dtype(x_t, eps, alphas_cumprod)
  ac = alphas_cumprod.astype(dtype)
  t = jnp.asarray(t)
  prev_t = jnp.asarray(prev_t)
  a_t = _batch_view(ac[t], x_t.ndim)
  a_prev = _batch_view(_alpha_prev(ac, prev_t, final_alpha_cumprod), x_t.ndim)
  x_t = x_t.astype(dtype)
  eps = eps.astype(dtype)
  # (1 - a_t / a_prev) written as (a_prev - a_t) / a_prev: both differences are exact in
  # floating point (Sterbenz), whereas 1 - a_t / a_prev loses ~4 digits near t = 0 in float32.
  variance = (1.0 - a_prev) / (1.0 - a_t) * ((a_prev - a_t) / a_prev)
  std = jnp.asarray(eta, dtype) * jnp.sqrt(variance)
  # mean = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - std^2) eps, with
  # x0_hat = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t), folded into per-sample coefficients
  # (fewer elementwise roundings: the mean is compared with std ~ 0.01 near t = 0).
  # 1 - a_prev - std^2 >= 0 mathematically for eta <= 1; the maximum guards rounding.
  c_x = jnp.sqrt(a_prev / a_t)
  c_eps = (jnp.sqrt(jnp.maximum(1.0 - a_prev - std ** 2, 0.0))
           - jnp.sqrt(a_prev * (1.0 - a_t) / a_t))
  mean = c_x * x_t + c_eps * eps
  return mean, std


def per_sample_std(std: Array, shape) -> Array:
  """(B,) the std of each sample of a step whose std broadcasts to `shape` (B, ...): a scalar,
  (B, 1, ..., 1) or a per-sample mask's 0 (all dims of a sample share one std)."""
  return jnp.broadcast_to(std, shape).reshape(shape[0], -1)[:, 0]


def gaussian_log_prob(x: Array, mean: Array, std: Array) -> Array:
  """Per-sample log-density of x under N(mean, std^2 I), MEAN-reduced over non-batch dims.

      log p = mean_{h,w,c} [ -(sg(x) - mean)^2 / (2 std^2) - log std - log sqrt(2 pi) ]

  `std` is clipped to >= 1e-6 and `x` is wrapped in `stop_gradient` (gradients flow only
  through `mean` and `std`), as in the DDPO reference code.

  Args:
    x: (B, ...) sample. mean: (B, ...). std: broadcastable to mean, e.g. (B, 1, 1, 1).

  Returns:
    (B,) float32 (or wider if the inputs are).
  """
  dtype = _compute_dtype(x, mean, std)
  x = jax.lax.stop_gradient(x).astype(dtype)
  mean = mean.astype(dtype)
  std = jnp.maximum(jnp.asarray(std, dtype), _MIN_STD)
  lp = -((x - mean) ** 2) / (2.0 * std ** 2) - jnp.log(std) - _LOG_SQRT_2PI
  return jnp.mean(lp, axis=tuple(range(1, lp.ndim)))


def gaussian_kl_shared_std(mean_p: Array, mean_q: Array, std: Array,
                           reduction: str = "mean") -> Array:
  """KL(N(mean_p, std^2) || N(mean_q, std^2)) per sample = ||mean_p - mean_q||^2 / (2 std^2).

  Gradients flow through both means. `std` is clipped to >= 1e-6 like in `gaussian_log_prob`.

  Args:
    mean_p, mean_q: (B, ...). std: broadcastable, e.g. (B, 1, 1, 1).
    reduction: "mean" over non-batch dims (the reference code's, consistent with
      `gaussian_log_prob`) or "sum" (the exact KL of the whole step).

  Returns:
    (B,) float32.
  """
  dtype = _compute_dtype(mean_p, mean_q, std)
  std = jnp.maximum(jnp.asarray(std, dtype), _MIN_STD)
  kl = (mean_p.astype(dtype) - mean_q.astype(dtype)) ** 2 / (2.0 * std ** 2)
  axes = tuple(range(1, kl.ndim))
  if reduction == "mean":
    return jnp.mean(kl, axis=axes)
  if reduction == "sum":
    return jnp.sum(kl, axis=axes)
  raise ValueError(f"reduction={reduction!r}, expected 'mean' or 'sum'.")


def ddim_step_with_logprob(alphas_cumprod: Array, eps: Array, t: Array, prev_t: Array,
                           x_t: Array, eta, key: Optional[Array] = None,
                           prev_sample: Optional[Array] = None, *,
                           final_alpha_cumprod=None) -> tuple[Array, Array]:
  """One stochastic DDIM step and the log-probability of its output.

  With `prev_sample=None` draws x_prev = mean + std * z with z = jax.random.normal(key,
  x_t.shape, float32); otherwise scores the given `prev_sample` (and returns it unchanged).

  Args:
    alphas_cumprod: (N_train,) float32.
    eps: (B, H, W, C) predicted noise.
    t, prev_t: (B,) int; prev_t < 0 means the last step (see `ddim_step_mean_std`).
    x_t: (B, H, W, C).
    eta: > 0 (a Python float <= 0 raises ValueError: the log-prob is undefined).
    key: PRNG key, required when `prev_sample` is None.
    prev_sample: optional (B, H, W, C) sample to score.
    final_alpha_cumprod: optional alpha_prev of the last step (default alphas_cumprod[0]).

  Returns:
    prev_sample: (B, H, W, C) float32; log_prob: (B,) float32, mean-reduced over H, W, C
    (`gaussian_log_prob`: std clipped >= 1e-6, stop_gradient on prev_sample).
  """
  _check_eta(eta)
  mean, std = ddim_step_mean_std(alphas_cumprod, eps, t, prev_t, x_t, eta,
                                 final_alpha_cumprod=final_alpha_cumprod)
  if prev_sample is None:
    if key is None:
      raise ValueError("ddim_step_with_logprob needs `key` to sample, or `prev_sample` to score.")
    z = jax.random.normal(key, x_t.shape, jnp.float32).astype(mean.dtype)
    prev_sample = mean + std * z
  else:
    prev_sample = prev_sample.astype(mean.dtype)
  return prev_sample, gaussian_log_prob(prev_sample, mean, std)


# ----------------------------------------------------------------------------- guided eps


def guided_eps(eps_fn: EpsFn, params: Any, x: Array, t: Array, context: Array,
               uncond_context: Optional[Array], guidance_scale: float,
               class_labels: Optional[Array] = None,
               uncond_class_labels: Optional[Array] = None) -> Array:
  """Noise prediction with classifier-free guidance on the prompt.

  If `guidance_scale == 1.0` (a static Python float) calls `eps_fn(params, x, t, context,
  class_labels)`. Otherwise calls `eps_fn` ONCE on the 2B batch of interleaved pairs
  (uncond_0, cond_0, uncond_1, ...: a batch split over devices stays on its devices) and returns
  eps_u + w (eps_c - eps_u): eps_c = eps(c, y) with `class_labels`, eps_u = eps(∅, y_u) with
  `uncond_class_labels` (None: the same labels as eps_c). CTRL passes its null labels as y_u,
  as its reference code does, so w scales the control's effect as it scales the prompt's:
  eps(∅, null) + w (eps(c, y) − eps(∅, null)) (docs/algorithms.md §5.2).

  Args:
    x: (B, H, W, C). t: (B,) int32. context: (B, L, D). uncond_context: (1, L, D) or (B, L, D)
      (unused when guidance_scale == 1); or pytrees of such leaves, of the same structure.
      class_labels: (B,) or (B, M) int32, or None.
    uncond_class_labels: labels of the unconditional half, broadcastable to `class_labels`
      (e.g. (M,) null labels), or None.

  Returns:
    (B, H, W, C) float32 (or the dtype of `x` if wider).
  """
  dtype = _compute_dtype(x)
  if guidance_scale == 1.0:
    return eps_fn(params, x, t, context, class_labels).astype(dtype)
  if uncond_context is None:
    raise ValueError("guidance_scale != 1 needs an uncond_context.")
  b = x.shape[0]

  def pair(u, c):  # rows u_0, c_0, u_1, c_1, ...: (B, ...) x 2 -> (2B, ...)
    u = jnp.broadcast_to(u.astype(c.dtype), c.shape)
    return jnp.stack([u, c], axis=1).reshape((2 * b,) + tuple(c.shape[1:]))
  # Interleaved, not [uncond; cond]: with the batch split over devices, each device's rows of
  # the 2B batch are the pairs of its own B rows, so no device needs another's (concatenating
  # the halves made XLA all-gather the latents and contexts at every sampling step).
  x2, t2 = pair(x, x), pair(t, t)
  c2 = jax.tree.map(pair, uncond_context, context)
  if class_labels is None:
    y2 = None
  else:
    y_u = class_labels if uncond_class_labels is None else jnp.broadcast_to(
        jnp.asarray(uncond_class_labels, class_labels.dtype), class_labels.shape)
    y2 = pair(y_u, class_labels)
  eps = eps_fn(params, x2, t2, c2, y2).astype(dtype)
  eps = eps.reshape((b, 2) + tuple(eps.shape[1:]))
  eps_u, eps_c = eps[:, 0], eps[:, 1]
  return eps_u + guidance_scale * (eps_c - eps_u)


# ----------------------------------------------------------------------------- trajectories


@struct.dataclass
class Trajectory:
  """A batch of denoising trajectories, batch-major (axis 0 = sample; shards on a data axis).

  Attributes:
    latents: (B, T, H, W, C) float32, the input x_t of each step (x_T, ..., x_1).
    next_latents: (B, T, H, W, C) float32, the output of each step; next_latents[:, -1] is x_0.
    log_probs: (B, T) float32, log p(next_latents | latents) under the sampling params.
    times: (B, T), the dynamics' time of each step (`denoiser.Denoiser`): DDIM's int32 t, or
      the flow's float32 sigma.
    next_times: (B, T), the time each step moves to: DDIM's prev_t (< 0 on the last one), or
      the flow's sigma_next.
    context: (B, L, D) prompt embedding (or a pytree of (B, ...) leaves, see the module
      docstring).
    class_labels: (B,) int32 or None.
    kl: (B, T) float32 or None: KL_t of each step's Gaussian to the reference model's at the
      same x_t (`gaussian_kl_shared_std`), when the sampler was given reference params.
    reference_means: (B, T, H, W, C) or None (with `kl`): the reference model's step mean at
      each x_t, in the sampler's compute dtype; the KL-penalised update reuses it rather than
      running the reference model again.
    trained_steps: (B, T) bool or None: the steps the update may train on (the flow sampler's
      SDE window, MixGRPO / Flow-GRPO-Fast: the other steps were deterministic ODE steps
      without a log-probability); None: every step.
  """
  latents: Array
  next_latents: Array
  log_probs: Array
  times: Array
  next_times: Array
  context: Any
  class_labels: Optional[Array] = None
  kl: Optional[Array] = None
  reference_means: Optional[Array] = None
  trained_steps: Optional[Array] = None

  @property
  def num_steps(self) -> int:
    return self.log_probs.shape[1]

  @property
  def final_latents(self) -> Array:
    """x_0, (B, H, W, C)."""
    return self.next_latents[:, -1]


def ddim_chain(eps_fn: EpsFn, params: Any, x_init: Array, step_keys: Array, context: Array,
               uncond_context: Optional[Array], *, alphas_cumprod: Array, timesteps,
               prev_timesteps, eta, guidance_scale: float,
               class_labels: Optional[Array] = None, final_alpha_cumprod=None,
               uncond_class_labels: Optional[Array] = None, reference_params: Any = None,
               kl_reduction: str = "sum", keep_gradient: Optional[Array] = None,
               remat: bool = False) -> tuple[Array, dict]:
  """The DDIM chain every sampler and solver runs: T guided steps in one `lax.scan`.

  Step i: eps = `guided_eps` at x (under `params`, and under `reference_params` if given),
  (mean, std) = `ddim_step_mean_std`, x_next = mean + std · z with z ~ N(0, I) drawn from
  `step_keys[i]`. Gradients flow through the chain (the reparameterised sampler that CTRL's
  backprop solver differentiates); the sampler for DDPO uses it forward only.

  Args:
    eps_fn, params, context, uncond_context, alphas_cumprod, eta, guidance_scale,
      class_labels, final_alpha_cumprod, uncond_class_labels: as in `sample_trajectory`.
    x_init: (B, H, W, C) x_T.
    step_keys: (T, 2) uint32 PRNG keys, one per step.
    timesteps, prev_timesteps: int arrays (T,).
    reference_params: optional params of a reference denoiser run at the same x_t (same
      guidance): the outputs then hold each step's KL (`gaussian_kl_shared_std`, reduced by
      `kl_reduction`) and the reference step mean.
    keep_gradient: optional (T,) bool; a step where it is False runs both denoisers under
      `stop_gradient` inside a `lax.cond` (the backward pass then skips their backward
      passes: CTRL's truncation). None: every step keeps its gradient, no `cond`.
    remat: `jax.checkpoint` each step (the backward pass recomputes its activations).

  Returns:
    (x_0 (B, H, W, C), per-step outputs stacked on a leading T axis: "latents" x_t,
    "next_latents", "log_probs" (T, B), and with `reference_params` "kl" (T, B) and
    "reference_means"). Outputs the caller does not use are removed by XLA.
  """
  _check_eta(eta)
  b = x_init.shape[0]
  ts = jnp.asarray(timesteps, jnp.int32)
  pts = jnp.asarray(prev_timesteps, jnp.int32)
  if ts.ndim != 1 or ts.shape != pts.shape:
    raise ValueError(f"timesteps {ts.shape} and prev_timesteps {pts.shape} must be (T,).")
  use_ref = reference_params is not None

  def eps_pair(x, t):
    """(eps under params, eps under reference_params or None) at x."""
    def one(p):
      return guided_eps(eps_fn, p, x, t, context, uncond_context, guidance_scale, class_labels,
                        uncond_class_labels)
    return one(params), (one(reference_params) if use_ref else None)

  def body(x, inp):
    t_i, pt_i, k_step, keep_i = inp
    t = jnp.full((b,), t_i, jnp.int32)
    prev_t = jnp.full((b,), pt_i, jnp.int32)
    if keep_i is None:
      eps, ref_eps = eps_pair(x, t)
    else:
      eps, ref_eps = jax.lax.cond(keep_i, lambda x: eps_pair(x, t),
                                  lambda x: jax.lax.stop_gradient(eps_pair(x, t)), x)
    def step(e):
      return ddim_step_mean_std(alphas_cumprod, e, t, prev_t, x, eta,
                                final_alpha_cumprod=final_alpha_cumprod)
    mean, std = step(eps)
    z = jax.random.normal(k_step, x.shape, jnp.float32).astype(mean.dtype)
    x_next = mean + std * z
    out = {"latents": x, "next_latents": x_next,
           "log_probs": gaussian_log_prob(x_next, mean, std)}
    if use_ref:
      ref_mean, _ = step(ref_eps)
      out["kl"] = gaussian_kl_shared_std(mean, ref_mean, std, reduction=kl_reduction)
      out["reference_means"] = ref_mean
    return x_next, out

  keep = None if keep_gradient is None else jnp.asarray(keep_gradient)  # None: no scan input
  return jax.lax.scan(jax.checkpoint(body) if remat else body, x_init,
                      (ts, pts, step_keys, keep))


def ddim_sample(eps_fn: EpsFn, params: Any, x_init: Array, context: Any,
                uncond_context: Any, *, alphas_cumprod: Array, timesteps, prev_timesteps,
                guidance_scale: float, final_alpha_cumprod=None) -> Array:
  """Deterministic DDIM (eta = 0, diffusers' `DDIMScheduler` default): the standard sampler of
  the UNet families, without log-probabilities (DDPO's stochastic chain is `ddim_chain`).

  Step i: eps = `guided_eps` at x, x <- the mean of `ddim_step_mean_std` with eta = 0, i.e.
  sqrt(a_prev) x0_hat + sqrt(1 - a_prev) eps; one `lax.scan` over the T steps.

  Args:
    eps_fn, params, context, uncond_context, guidance_scale: as in `guided_eps` (the
      conditioning may be any pytree with the batch on axis 0).
    x_init: (B, H, W, C) x_T (diffusers' init_noise_sigma is 1 for DDIM).
    alphas_cumprod: (N_train,) float32. timesteps, prev_timesteps: int (T,)
      (`NoiseSchedule.ddim_timesteps`). final_alpha_cumprod: as in `ddim_step_mean_std`.

  Returns:
    x_0, (B, H, W, C) float32.
  """
  ts = jnp.asarray(timesteps, jnp.int32)
  pts = jnp.asarray(prev_timesteps, jnp.int32)
  if ts.ndim != 1 or ts.shape != pts.shape:
    raise ValueError(f"timesteps {ts.shape} and prev_timesteps {pts.shape} must be (T,).")
  b = x_init.shape[0]

  def body(x, inp):
    t = jnp.full((b,), inp[0], jnp.int32)
    prev_t = jnp.full((b,), inp[1], jnp.int32)
    eps = guided_eps(eps_fn, params, x, t, context, uncond_context, guidance_scale)
    mean, _ = ddim_step_mean_std(alphas_cumprod, eps, t, prev_t, x, 0.0,
                                 final_alpha_cumprod=final_alpha_cumprod)
    return mean, None

  x, _ = jax.lax.scan(body, x_init.astype(_compute_dtype(x_init)), (ts, pts))
  return x


def sample_trajectory(eps_fn: EpsFn, params: Any, key: Array, context: Array,
                      uncond_context: Optional[Array], *, alphas_cumprod: Array,
                      timesteps, prev_timesteps, latent_shape: tuple[int, int, int], eta,
                      guidance_scale: float, class_labels: Optional[Array] = None,
                      initial_latents: Optional[Array] = None,
                      final_alpha_cumprod=None, reference_params: Any = None,
                      kl_reduction: str = "sum",
                      uncond_class_labels: Optional[Array] = None) -> Trajectory:
  """Samples B trajectories of DDIM (eta > 0) with log-probabilities (`ddim_chain`).

  Keys: `key` is split into (init, steps); x_T ~ N(0, I) from `init` (unless
  `initial_latents` is given); step i's noise key is the second half of the i-th split of a
  chain started at `steps` (k, k_i = split(k)).

  Args:
    eps_fn: (params, x (N,H,W,C), t (N,), context (N,L,D), class_labels (N,)|None) -> eps.
    params: denoiser params passed to eps_fn.
    key: PRNG key.
    context: (B, L, D) prompt embeddings.
    uncond_context: (1, L, D) or (B, L, D) embedding of "" (needed iff guidance_scale != 1).
    alphas_cumprod: (N_train,) float32.
    timesteps, prev_timesteps: int arrays (T,) (e.g. from `NoiseSchedule.ddim_timesteps`).
    latent_shape: (H, W, C).
    eta: > 0.
    guidance_scale: static Python float; CFG is applied iff != 1.0.
    class_labels: optional (B,) or (B, M) int32, passed to eps_fn (the conditional CFG half,
      and the unconditional one unless `uncond_class_labels` is given; see `guided_eps`).
    initial_latents: optional (B, H, W, C) x_T.
    final_alpha_cumprod: optional alpha_prev of the last step (default alphas_cumprod[0]).
    reference_params: optional params of a reference denoiser (e.g. the pre-trained one); if
      given, each step also runs it at the same x_t (same guidance) and the trajectory carries
      KL_t = KL(step under params || step under reference_params), reduced over the latent
      dims by `kl_reduction` ("sum": the exact KL; "mean"), and the reference step means
      (`Trajectory.reference_means`, as much memory as `latents`). Costs one more denoiser
      call per step.
    uncond_class_labels: labels of the unconditional CFG half (`guided_eps`), or None.

  Returns:
    A `Trajectory` with T steps.
  """
  b = jax.tree.leaves(context)[0].shape[0]
  key_init, key_steps = jax.random.split(key)
  if initial_latents is None:
    x_init = jax.random.normal(key_init, (b,) + tuple(latent_shape), jnp.float32)
  else:
    x_init = initial_latents.astype(_compute_dtype(initial_latents))
  ts = jnp.asarray(timesteps, jnp.int32)
  pts = jnp.asarray(prev_timesteps, jnp.int32)

  def next_key(k, _):
    k, k_step = jax.random.split(k)
    return k, k_step

  _, step_keys = jax.lax.scan(next_key, key_steps, None, length=ts.shape[0])
  _, out = ddim_chain(
      eps_fn, params, x_init, step_keys, context, uncond_context,
      alphas_cumprod=alphas_cumprod, timesteps=ts, prev_timesteps=pts, eta=eta,
      guidance_scale=guidance_scale, class_labels=class_labels,
      final_alpha_cumprod=final_alpha_cumprod, uncond_class_labels=uncond_class_labels,
      reference_params=reference_params, kl_reduction=kl_reduction)
  batch_major = lambda name: (jnp.swapaxes(out[name], 0, 1) if name in out else None)  # noqa: E731
  n_steps = ts.shape[0]
  return Trajectory(
      latents=batch_major("latents"),
      next_latents=batch_major("next_latents"),
      log_probs=batch_major("log_probs"),
      times=jnp.broadcast_to(ts[None], (b, n_steps)),
      next_times=jnp.broadcast_to(pts[None], (b, n_steps)),
      context=context,
      class_labels=class_labels,
      kl=batch_major("kl"),
      reference_means=batch_major("reference_means"),
  )


def step_log_prob(eps_fn: EpsFn, params: Any, latents: Array, timesteps: Array,
                  prev_timesteps: Array, next_latents: Array, context: Array,
                  uncond_context: Optional[Array], *, alphas_cumprod: Array, eta,
                  guidance_scale: float, class_labels: Optional[Array] = None,
                  final_alpha_cumprod=None,
                  uncond_class_labels: Optional[Array] = None) -> tuple[Array, Array, Array]:
  """Re-scores one step of stored trajectories under `params` (the PPO / SF update).

  Same guided eps and DDIM step as `sample_trajectory`, so with the sampling params it
  reproduces `Trajectory.log_probs`.

  Args:
    latents: (B, H, W, C) x_t. timesteps, prev_timesteps: (B,) int32.
    next_latents: (B, H, W, C) stored x_prev (not differentiated).
    context: (B, L, D). uncond_context: (1|B, L, D) or None. class_labels: (B,) or None.
    eta, guidance_scale, alphas_cumprod, final_alpha_cumprod, uncond_class_labels: as in
      `sample_trajectory`.

  Returns:
    log_prob (B,) float32, mean (B, H, W, C) float32, std (B, 1, 1, 1) float32 (unclipped).
  """
  _check_eta(eta)
  t, prev_t = jnp.asarray(timesteps, jnp.int32), jnp.asarray(prev_timesteps, jnp.int32)
  eps = guided_eps(eps_fn, params, latents, t, context, uncond_context, guidance_scale,
                   class_labels, uncond_class_labels)
  mean, std = ddim_step_mean_std(alphas_cumprod, eps, t, prev_t, latents, eta,
                                 final_alpha_cumprod=final_alpha_cumprod)
  return gaussian_log_prob(next_latents, mean, std), mean, std


# ----------------------------------------------------------------------------- training loss


def denoising_loss_terms(eps_fn: EpsFn, params: Any, key: Array, x0: Array, context: Array,
                         class_labels: Optional[Array], alphas_cumprod: Array) -> Array:
  """Per-sample epsilon-prediction loss (pre-training, reward-weighted regression).

  t ~ Uniform{0, ..., N_train - 1}, eps ~ N(0, I), x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps,
  loss = mean_{h,w,c} (eps_fn(params, x_t, t, context, class_labels) - eps)^2.

  Args:
    key: PRNG key (split into a timestep key and a noise key).
    x0: (B, H, W, C) clean samples. context: (B, L, D). class_labels: (B,) int32 or None.
    alphas_cumprod: (N_train,) float32.

  Returns:
    (B,) float32 MSE (weight and average it as the method requires).
  """
  b = x0.shape[0]
  k_t, k_eps = jax.random.split(key)
  dtype = _compute_dtype(x0)
  t = jax.random.randint(k_t, (b,), 0, alphas_cumprod.shape[0], jnp.int32)
  noise = jax.random.normal(k_eps, x0.shape, dtype)
  a_t = _batch_view(alphas_cumprod.astype(dtype)[t], x0.ndim)
  x_t = jnp.sqrt(a_t) * x0.astype(dtype) + jnp.sqrt(1.0 - a_t) * noise
  pred = eps_fn(params, x_t, t, context, class_labels).astype(dtype)
  return jnp.mean((pred - noise) ** 2, axis=tuple(range(1, x0.ndim)))
