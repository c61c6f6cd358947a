"""Flow-matching schedules and the Euler ODE step (diffusers `FlowMatchEulerDiscreteScheduler`),
the sampler of SD3 / SD3.5 and FLUX.1 (docs/algorithms.md §6).

A rectified-flow model predicts the velocity v = eps - x0 of x_sigma = (1 - sigma) x0 +
sigma eps; sampling integrates dx/dsigma = v from sigma = 1 (noise) to 0 with Euler steps
x_next = x + (sigma_next - sigma) v. The model is called at timestep t = 1000 sigma.

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
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ddpo_jax import diffusion

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


def sample_ode(velocity_fn, params: Any, x_init: Array, context: Any, uncond_context: Any, *,
               sigmas, timesteps, guidance_scale: float) -> Array:
  """Integrates the flow ODE with Euler steps from `x_init` (at sigmas[0]) to sigmas[-1].

  Args:
    velocity_fn: (params, x (B,...), t (B,) float32 = 1000 sigma, context, class_labels=None)
      -> velocity (B,...); `context` is any pytree with the batch on axis 0.
    x_init: (B, ...) noise.
    context / uncond_context: the conditioning and the unconditional one (batch 1 or B; used
      when guidance_scale != 1), as `diffusion.guided_eps` takes them.
    sigmas: (T + 1,) and timesteps: (T,), from `FlowSchedule.sigmas`.
    guidance_scale: classifier-free guidance weight (static).

  Returns:
    x at sigmas[-1], (B, ...) float32.
  """
  sigmas = jnp.asarray(sigmas, jnp.float32)
  timesteps = jnp.asarray(timesteps, jnp.float32)

  def step(x, inputs):
    sigma, sigma_next, t = inputs
    v = diffusion.guided_eps(velocity_fn, params, x, jnp.full((x.shape[0],), t), context,
                             uncond_context, guidance_scale)
    return euler_step(x, v, sigma, sigma_next), None

  x, _ = jax.lax.scan(step, x_init.astype(jnp.float32), (sigmas[:-1], sigmas[1:], timesteps))
  return x
