"""Flow-matching schedules and the Euler ODE step against diffusers'
FlowMatchEulerDiscreteScheduler, and a known-answer test with the exact velocity field of
Gaussian data."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from diffusers.pipelines.flux.pipeline_flux import calculate_shift  # noqa: E402

from ddpo_jax.numerics import flow  # noqa: E402


@pytest.mark.parametrize("num_steps", [1, 10, 28, 40])
def test_sd3_schedule_equals_diffusers(num_steps):
  scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)  # SD3 / SD3.5
  ours = flow.FlowSchedule.from_config(dict(scheduler.config))
  scheduler.set_timesteps(num_steps)
  sigmas, timesteps = ours.sigmas(num_steps)
  np.testing.assert_array_equal(sigmas, scheduler.sigmas.numpy())
  np.testing.assert_array_equal(timesteps, scheduler.timesteps.numpy())


@pytest.mark.parametrize("num_steps,image_seq_len", [(4, 1024), (28, 4096), (50, 64)])
def test_flux_dynamic_schedule_equals_diffusers(num_steps, image_seq_len):
  scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
      shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
      base_image_seq_len=256, max_image_seq_len=4096)  # FLUX.1-dev's scheduler config
  ours = flow.FlowSchedule.from_config(dict(scheduler.config))
  mu = calculate_shift(image_seq_len, 256, 4096, 0.5, 1.15)
  assert ours.calculate_shift(image_seq_len) == pytest.approx(mu, rel=1e-12)
  # What FluxPipeline passes: sigmas = linspace(1, 1/n, n) and mu.
  scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
  sigmas, timesteps = ours.sigmas(num_steps, image_seq_len=image_seq_len)
  np.testing.assert_array_equal(sigmas, scheduler.sigmas.numpy())
  np.testing.assert_array_equal(timesteps, scheduler.timesteps.numpy())


def test_euler_step_equals_scheduler_step():
  scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
  scheduler.set_timesteps(10)
  sigmas, _ = flow.FlowSchedule.from_config(dict(scheduler.config)).sigmas(10)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 4, 3, 3)).astype(np.float32)
  for i in range(10):
    v = rng.standard_normal(x.shape).astype(np.float32)
    ref = scheduler.step(torch.from_numpy(v), scheduler.timesteps[i], torch.from_numpy(x),
                         return_dict=False)[0].numpy()
    x_next = np.asarray(flow.euler_step(jnp.asarray(x), jnp.asarray(v), sigmas[i], sigmas[i + 1]))
    np.testing.assert_allclose(x_next, ref, rtol=0, atol=1e-6)
    x = ref


def test_euler_ode_with_the_exact_velocity_reproduces_gaussian_data():
  """x0 ~ N(m, s^2), x_sigma = (1 - sigma) x0 + sigma eps: the exact velocity is
  E[eps - x0 | x_sigma], linear in x. Integrated from noise with the SD3 schedule's Euler steps,
  the samples have the data's mean and standard deviation (within 4 standard errors of the
  mean; 3% on the std, far above its 0.5% sampling error and the Euler error at 200 steps)."""
  m, s, n = 1.5, 0.4, 20000

  def velocity(x, sigma):
    mean = (1 - sigma) * m
    var = (1 - sigma) ** 2 * s ** 2 + sigma ** 2
    x0 = m + (1 - sigma) * s ** 2 / var * (x - mean)
    eps = sigma / var * (x - mean)
    return eps - x0

  sigmas, _ = flow.FlowSchedule(shift=3.0).sigmas(200)
  x = jax.random.normal(jax.random.PRNGKey(0), (n,), jnp.float32)
  for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
    x = flow.euler_step(x, velocity(x, float(sigma)), sigma, sigma_next)
  x = np.asarray(x, np.float64)
  assert abs(x.mean() - m) < 4 * s / np.sqrt(n), x.mean()
  assert abs(x.std() / s - 1) < 0.03, x.std()


def test_bad_schedules():
  with pytest.raises(ValueError, match="use_karras_sigmas=True"):
    flow.FlowSchedule.from_config({"use_karras_sigmas": True})
  with pytest.raises(ValueError, match="'DDIMScheduler' is not"):
    flow.FlowSchedule.from_config({"_class_name": "DDIMScheduler"})
  with pytest.raises(ValueError, match="needs image_seq_len"):
    flow.FlowSchedule(use_dynamic_shifting=True).sigmas(4)
  with pytest.raises(ValueError, match="num_steps=0"):
    flow.FlowSchedule().sigmas(0)
