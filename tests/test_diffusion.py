"""Tests of ddpo_jax.numerics.diffusion against NumPy float64 formulas (docs/algorithms.md §1) and
diffusers."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpo_jax.numerics import diffusion

SD_CONFIG = {
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False,
    "prediction_type": "epsilon",
}


# ----------------------------------------------------------------------------- NumPy oracle


def np_alphas_cumprod_sd():
  betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
  return np.cumprod(1.0 - betas)


def np_step(ac, eps, t, prev_t, x, eta):
  """float64 reference of docs/algorithms.md §1.2: returns mean (B,...), std (B,)."""
  ac = np.asarray(ac, np.float64)
  eps = np.asarray(eps, np.float64)
  x = np.asarray(x, np.float64)
  a_t = ac[t]
  a_prev = np.where(prev_t >= 0, ac[np.maximum(prev_t, 0)], ac[0])
  std = eta * np.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
  shp = (-1,) + (1,) * (x.ndim - 1)
  a_t_, a_prev_, std_ = a_t.reshape(shp), a_prev.reshape(shp), std.reshape(shp)
  x0 = (x - np.sqrt(1 - a_t_) * eps) / np.sqrt(a_t_)
  mean = np.sqrt(a_prev_) * x0 + np.sqrt(1 - a_prev_ - std_ ** 2) * eps
  return mean, std


def np_log_prob(x_prev, mean, std):
  std = np.maximum(std, 1e-6).reshape((-1,) + (1,) * (mean.ndim - 1))
  lp = (-(np.asarray(x_prev, np.float64) - mean) ** 2 / (2 * std ** 2) - np.log(std)
        - np.log(np.sqrt(2 * np.pi)))
  return lp.reshape(lp.shape[0], -1).mean(axis=1)


def rel_err(a, b):
  """Normwise relative error max|a - b| / max|b| (elementwise relative error is meaningless for
  float32 entries that happen to be near 0)."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-12))


def lp_err(a, b):
  """Elementwise relative error of (B,) log-probs, |a - b| / max(|b|, 1)."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1.0)))


# ----------------------------------------------------------------------------- schedule


def _diffusers_ddim(config):
  diffusers = pytest.importorskip("diffusers")
  return diffusers.DDIMScheduler.from_config(config)


def test_alphas_cumprod_match_numpy_and_diffusers():
  sched = diffusion.NoiseSchedule.sd()
  ac = np.asarray(sched.alphas_cumprod)
  assert ac.shape == (1000,) and ac.dtype == np.float32
  np.testing.assert_allclose(ac, np_alphas_cumprod_sd(), rtol=1e-6)
  ref = _diffusers_ddim(SD_CONFIG).alphas_cumprod.numpy()
  np.testing.assert_allclose(ac, ref, rtol=2e-6)
  assert sched.steps_offset == 1 and not sched.set_alpha_to_one
  assert float(sched.final_alpha_cumprod) == float(ac[0])


@pytest.mark.parametrize("cfg", [
    {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02},
    {"beta_schedule": "squaredcos_cap_v2"},
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
     "num_train_timesteps": 500},
])
def test_other_schedules_match_diffusers(cfg):
  ours = diffusion.NoiseSchedule.from_config(cfg)
  ref = _diffusers_ddim(cfg)
  np.testing.assert_allclose(np.asarray(ours.alphas_cumprod), ref.alphas_cumprod.numpy(),
                             rtol=2e-5)
  assert ours.num_train_timesteps == ref.config.num_train_timesteps
  # diffusers' DDIMScheduler defaults for missing keys.
  assert ours.set_alpha_to_one and ours.steps_offset == 0
  assert float(ours.final_alpha_cumprod) == 1.0


def test_from_config_rejects_unsupported():
  with pytest.raises(ValueError, match="prediction_type"):
    diffusion.NoiseSchedule.from_config(dict(SD_CONFIG, prediction_type="v_prediction"))
  with pytest.raises(ValueError, match="beta_schedule"):
    diffusion.NoiseSchedule.from_config(dict(SD_CONFIG, beta_schedule="sigmoid"))


@pytest.mark.parametrize("n", [50, 20, 7, 1])
def test_ddim_timesteps_match_diffusers(n):
  ref = _diffusers_ddim(SD_CONFIG)
  ref.set_timesteps(n)
  ts = diffusion.ddim_timesteps(n)
  assert ts.dtype == np.int32
  np.testing.assert_array_equal(ts, ref.timesteps.numpy())
  ts2, prev = diffusion.NoiseSchedule.sd().ddim_timesteps(n)
  np.testing.assert_array_equal(ts2, ts)
  np.testing.assert_array_equal(prev, ts - 1000 // n)


def test_ddim_timesteps_sd_50():
  ts = diffusion.ddim_timesteps(50)
  assert ts[0] == 981 and ts[1] == 961 and ts[-1] == 1 and len(ts) == 50
  prev = diffusion.ddim_prev_timesteps(ts, 50)
  assert prev[0] == 961 and prev[-1] == -19


# ----------------------------------------------------------------------------- one step


def _inputs(seed=0, b=4, shape=(6, 5, 3)):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((b,) + shape).astype(np.float32)
  eps = rng.standard_normal((b,) + shape).astype(np.float32)
  return x, eps


STEP_CASES = np.array([981, 501, 21, 1], np.int32)


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_step_mean_std_and_log_prob_vs_numpy(eta):
  ac = diffusion.NoiseSchedule.sd().alphas_cumprod
  x, eps = _inputs()
  t = STEP_CASES
  prev_t = t - 20  # the last entry is -19: final step, alpha_prev = alphas_cumprod[0]
  assert prev_t[-1] < 0
  mean, std = diffusion.ddim_step_mean_std(ac, jnp.asarray(eps), t, prev_t, jnp.asarray(x), eta)
  ref_mean, ref_std = np_step(np.asarray(ac), eps, t, prev_t, x, eta)
  assert std.shape == (4, 1, 1, 1)
  assert rel_err(mean, ref_mean) < 1e-5
  assert rel_err(std.reshape(-1), ref_std) < 1e-5
  # score a sample near the mean and one far from it
  rng = np.random.default_rng(1)
  for scale in (1.0, 3.0):
    x_prev = (ref_mean + scale * ref_std.reshape(-1, 1, 1, 1)
              * rng.standard_normal(x.shape)).astype(np.float32)
    out, lp = diffusion.ddim_step_with_logprob(ac, jnp.asarray(eps), t, prev_t, jnp.asarray(x),
                                               eta, prev_sample=jnp.asarray(x_prev))
    np.testing.assert_array_equal(np.asarray(out), x_prev)
    assert lp.shape == (4,) and lp.dtype == jnp.float32
    assert lp_err(lp, np_log_prob(x_prev, ref_mean, ref_std)) < 1e-5


def test_sampling_path_draws_mean_plus_std_z():
  ac = diffusion.NoiseSchedule.sd().alphas_cumprod
  x, eps = _inputs(2)
  t = STEP_CASES
  prev_t = t - 20
  key = jax.random.PRNGKey(3)
  x_prev, lp = diffusion.ddim_step_with_logprob(ac, jnp.asarray(eps), t, prev_t, jnp.asarray(x),
                                                1.0, key=key)
  z = np.asarray(jax.random.normal(key, x.shape, jnp.float32), np.float64)
  ref_mean, ref_std = np_step(np.asarray(ac), eps, t, prev_t, x, 1.0)
  np.testing.assert_allclose(np.asarray(x_prev), ref_mean + ref_std.reshape(-1, 1, 1, 1) * z,
                             rtol=1e-5, atol=1e-5)
  # Gaussian log-density of x_prev = mean + std z is mean(-z^2/2) - log std - log sqrt(2 pi).
  ref_lp = (-0.5 * z ** 2).reshape(4, -1).mean(1) - np.log(ref_std) - 0.5 * np.log(2 * np.pi)
  assert lp_err(lp, ref_lp) < 1e-5


def test_log_prob_gradient_treats_sample_as_constant():
  """stop_gradient on prev_sample: the sampling path's gradient w.r.t. eps equals the scoring
  path's with the drawn sample held fixed (without it the quadratic term's gradient is 0)."""
  ac = diffusion.NoiseSchedule.sd().alphas_cumprod
  x, eps = _inputs(4)
  t = STEP_CASES
  prev_t = t - 20
  key = jax.random.PRNGKey(0)

  def sampled(e):
    return diffusion.ddim_step_with_logprob(ac, e, t, prev_t, jnp.asarray(x), 1.0, key=key)[1].sum()

  x_prev = diffusion.ddim_step_with_logprob(ac, jnp.asarray(eps), t, prev_t, jnp.asarray(x),
                                            1.0, key=key)[0]

  def scored(e):
    return diffusion.ddim_step_with_logprob(ac, e, t, prev_t, jnp.asarray(x), 1.0,
                                            prev_sample=x_prev)[1].sum()

  g1 = np.asarray(jax.grad(sampled)(jnp.asarray(eps)))
  g2 = np.asarray(jax.grad(scored)(jnp.asarray(eps)))
  assert np.abs(g1).max() > 1e-3
  np.testing.assert_allclose(g1, g2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("t", [981, 481, 21, 1])
def test_step_matches_diffusers_ddim_step(t):
  torch = pytest.importorskip("torch")
  sched = _diffusers_ddim(SD_CONFIG)
  sched.set_timesteps(50)
  x, eps = _inputs(5, b=2, shape=(4, 8, 8))  # NCHW for torch
  z = np.random.default_rng(6).standard_normal(x.shape).astype(np.float32)
  eta = 1.0
  ref = sched.step(torch.from_numpy(eps), t, torch.from_numpy(x), eta=eta,
                   variance_noise=torch.from_numpy(z)).prev_sample.numpy()
  ac = diffusion.NoiseSchedule.sd().alphas_cumprod
  tt = np.full((2,), t, np.int32)
  to_nhwc = lambda a: jnp.asarray(a.transpose(0, 2, 3, 1))
  mean, std = diffusion.ddim_step_mean_std(ac, to_nhwc(eps), tt, tt - 20, to_nhwc(x), eta)
  ours = np.asarray(mean + std * to_nhwc(z)).transpose(0, 3, 1, 2)
  err = float(np.max(np.abs(ours - ref)))
  assert err < 1e-5 * max(1.0, float(np.max(np.abs(ref)))), err


def test_eta_must_be_positive():
  ac = diffusion.NoiseSchedule.sd().alphas_cumprod
  x, eps = _inputs()
  with pytest.raises(ValueError, match="eta"):
    diffusion.ddim_step_with_logprob(ac, jnp.asarray(eps), STEP_CASES, STEP_CASES - 20,
                                     jnp.asarray(x), 0.0, key=jax.random.PRNGKey(0))


def test_kl_shared_std():
  rng = np.random.default_rng(0)
  m1, m2 = rng.standard_normal((2, 3, 4, 4, 2)).astype(np.float32)
  std = np.array([0.5, 1.0, 2.0], np.float32).reshape(3, 1, 1, 1)
  ref = ((m1 - m2) ** 2 / (2 * std ** 2)).reshape(3, -1)
  np.testing.assert_allclose(diffusion.gaussian_kl_shared_std(m1, m2, std), ref.mean(1),
                             rtol=1e-5)
  np.testing.assert_allclose(diffusion.gaussian_kl_shared_std(m1, m2, std, "sum"), ref.sum(1),
                             rtol=1e-5)


# ----------------------------------------------------------------------------- trajectories

B, H, W, C, L, D = 3, 8, 8, 2, 2, 3


def _make_eps_fn(calls):
  def eps_fn(params, x, t, context, class_labels):
    calls.append((x.shape[0], context.shape[0], None if class_labels is None
                  else class_labels.shape[0]))
    bias = context.mean(axis=(1, 2))[:, None, None, None]
    lab = 0.0 if class_labels is None else 0.01 * class_labels[:, None, None, None]
    return params * x + bias + lab + 1e-4 * t[:, None, None, None]
  return eps_fn


def np_eps(w, x, t, ctx, labels):
  bias = ctx.mean(axis=(1, 2))[:, None, None, None]
  lab = 0.0 if labels is None else 0.01 * labels[:, None, None, None]
  return w * x + bias + lab + 1e-4 * t


def _traj_setup(seed=0):
  rng = np.random.default_rng(seed)
  context = rng.standard_normal((B, L, D)).astype(np.float32)
  uncond = rng.standard_normal((1, L, D)).astype(np.float32)
  labels = np.array([0, 3, 7], np.int32)
  return jnp.asarray(context), jnp.asarray(uncond), jnp.asarray(labels)


@pytest.mark.parametrize("guidance_scale", [1.0, 5.0])
def test_sample_trajectory_log_probs_and_cfg(guidance_scale):
  sched = diffusion.NoiseSchedule.sd()
  ac = sched.alphas_cumprod
  ts, prev = sched.ddim_timesteps(5)
  context, uncond, labels = _traj_setup()
  calls = []
  eps_fn = _make_eps_fn(calls)
  kw = dict(alphas_cumprod=ac, timesteps=ts, prev_timesteps=prev, latent_shape=(H, W, C),
            eta=1.0, guidance_scale=guidance_scale)
  sample = jax.jit(functools.partial(diffusion.sample_trajectory, eps_fn, **kw))
  params = jnp.float32(0.1)
  traj = sample(params, jax.random.PRNGKey(0), context, uncond, class_labels=labels)
  n = 2 * B if guidance_scale != 1.0 else B
  assert calls == [(n, n, n)]  # one eps_fn call per step (traced once inside the scan)
  traj2 = sample(params, jax.random.PRNGKey(1), context, uncond, class_labels=labels)
  assert len(calls) == 1  # compiled once
  assert not np.allclose(traj.next_latents, traj2.next_latents)

  T = len(ts)
  assert traj.latents.shape == (B, T, H, W, C) and traj.next_latents.shape == (B, T, H, W, C)
  assert traj.log_probs.shape == (B, T) and traj.log_probs.dtype == jnp.float32
  assert traj.times.shape == (B, T) and traj.times.dtype == jnp.int32
  np.testing.assert_array_equal(traj.times[1], ts)
  np.testing.assert_array_equal(traj.next_times[2], prev)
  np.testing.assert_array_equal(traj.latents[:, 1:], traj.next_latents[:, :-1])
  np.testing.assert_array_equal(traj.class_labels, labels)

  # Independent NumPy float64 recomputation of every step (CFG combination included).
  ac64 = np.asarray(ac, np.float64)
  lab = np.asarray(labels)
  for i in range(T):
    x = np.asarray(traj.latents[:, i], np.float64)
    tt = np.full((B,), ts[i])
    e_c = np_eps(0.1, x, tt[:, None, None, None], np.asarray(context), lab)
    if guidance_scale != 1.0:
      e_u = np_eps(0.1, x, tt[:, None, None, None], np.broadcast_to(uncond, context.shape), lab)
      e = e_u + guidance_scale * (e_c - e_u)
    else:
      e = e_c
    mean, std = np_step(ac64, e, tt, np.full((B,), prev[i]), x, 1.0)
    ref_lp = np_log_prob(traj.next_latents[:, i], mean, std)
    assert lp_err(traj.log_probs[:, i], ref_lp) < 1e-5
    # and the shared re-scoring path used by the update
    lp, m, s = diffusion.step_log_prob(
        eps_fn, params, traj.latents[:, i], traj.times[:, i], traj.next_times[:, i],
        traj.next_latents[:, i], traj.context, uncond, alphas_cumprod=ac, eta=1.0,
        guidance_scale=guidance_scale, class_labels=traj.class_labels)
    assert lp_err(lp, traj.log_probs[:, i]) < 1e-5
    assert rel_err(m, mean) < 1e-5 and s.shape == (B, 1, 1, 1)


def test_guided_eps_unconditional_half_takes_the_null_labels():
  """CTRL's guidance (its reference code): eps(∅, null) + w (eps(c, y) − eps(∅, null)), each
  eps computed by its own call; without uncond labels both halves take y (the old rule)."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(3, 2, 2, 1)), jnp.float32)
  t = jnp.asarray([10, 500, 900], jnp.int32)
  ctx = jnp.asarray(rng.normal(size=(3, 1, 4)), jnp.float32)
  uncond = jnp.zeros((1, 1, 4), jnp.float32)
  y = jnp.asarray([[0, 2], [1, 0], [2, 1]], jnp.int32)  # two controls, 3 classes each
  nulls = np.asarray([3, 3], np.int32)
  table = jnp.asarray(rng.normal(size=(2, 4)), jnp.float32)

  def eps_fn(p, x, t, context, labels):  # depends on the prompt, both labels and t
    label_term = jnp.sum(labels.astype(jnp.float32) * table[:, 0][None], axis=1)
    return jnp.tanh(x * p + jnp.mean(context, axis=(1, 2))[:, None, None, None]
                    + label_term[:, None, None, None] + t[:, None, None, None] / 1000.0)

  w, p = 5.0, 0.8
  u_null = eps_fn(p, x, t, jnp.broadcast_to(uncond, ctx.shape), jnp.broadcast_to(nulls, y.shape))
  u_y = eps_fn(p, x, t, jnp.broadcast_to(uncond, ctx.shape), y)
  c_y = eps_fn(p, x, t, ctx, y)
  got = diffusion.guided_eps(eps_fn, p, x, t, ctx, uncond, w, y, nulls)
  np.testing.assert_allclose(got, u_null + w * (c_y - u_null), rtol=1e-5, atol=1e-6)
  old = diffusion.guided_eps(eps_fn, p, x, t, ctx, uncond, w, y)
  np.testing.assert_allclose(old, u_y + w * (c_y - u_y), rtol=1e-5, atol=1e-6)
  assert np.abs(np.asarray(got) - np.asarray(old)).max() > 1e-2


def test_sample_trajectory_reference_means_and_kl():
  """With reference params (CFG on), each step also carries the reference model's step mean at
  the sampled x_t and the KL to it; both against NumPy float64 (the update reuses the means)."""
  sched = diffusion.NoiseSchedule.sd()
  ac, ac64 = sched.alphas_cumprod, np.asarray(sched.alphas_cumprod, np.float64)
  ts, prev = sched.ddim_timesteps(4)
  context, uncond, labels = _traj_setup()
  eps_fn, g, w_ref = _make_eps_fn([]), 3.0, 0.4
  traj = jax.jit(functools.partial(
      diffusion.sample_trajectory, eps_fn, alphas_cumprod=ac, timesteps=ts, prev_timesteps=prev,
      latent_shape=(H, W, C), eta=1.0, guidance_scale=g, kl_reduction="sum"))(
          jnp.float32(0.1), jax.random.PRNGKey(0), context, uncond, class_labels=labels,
          reference_params=jnp.float32(w_ref))
  assert traj.reference_means.shape == traj.latents.shape and traj.kl.shape == (B, len(ts))
  lab, ctx, unc = np.asarray(labels), np.asarray(context), np.broadcast_to(uncond, context.shape)

  def np_mean_std(w, x, tt, i):
    e_u, e_c = np_eps(w, x, tt, unc, lab), np_eps(w, x, tt, ctx, lab)
    return np_step(ac64, e_u + g * (e_c - e_u), tt.reshape(-1), np.full((B,), prev[i]), x, 1.0)

  for i in range(len(ts)):
    x, tt = np.asarray(traj.latents[:, i], np.float64), np.full((B, 1, 1, 1), ts[i])
    mean, std = np_mean_std(0.1, x, tt, i)
    ref_mean, _ = np_mean_std(w_ref, x, tt, i)
    assert rel_err(traj.reference_means[:, i], ref_mean) < 1e-5
    kl = ((mean - ref_mean) ** 2 / (2 * std.reshape(B, 1, 1, 1) ** 2)).reshape(B, -1).sum(1)
    np.testing.assert_allclose(traj.kl[:, i], kl, rtol=1e-4)
    assert kl.min() > 0


def test_sample_trajectory_initial_latents_and_no_labels():
  sched = diffusion.NoiseSchedule.sd()
  ts, prev = sched.ddim_timesteps(3)
  context, uncond, _ = _traj_setup(1)
  calls = []
  x_T = jax.random.normal(jax.random.PRNGKey(9), (B, H, W, C))
  traj = diffusion.sample_trajectory(
      _make_eps_fn(calls), jnp.float32(0.0), jax.random.PRNGKey(0), context, uncond,
      alphas_cumprod=sched.alphas_cumprod, timesteps=ts, prev_timesteps=prev,
      latent_shape=(H, W, C), eta=1.0, guidance_scale=3.0, initial_latents=x_T)
  np.testing.assert_array_equal(traj.latents[:, 0], x_T)
  assert traj.class_labels is None and calls == [(2 * B, 2 * B, None)]
  assert np.isfinite(np.asarray(traj.log_probs)).all()
  with pytest.raises(ValueError, match="eta"):
    diffusion.sample_trajectory(
        _make_eps_fn([]), jnp.float32(0.0), jax.random.PRNGKey(0), context, uncond,
        alphas_cumprod=sched.alphas_cumprod, timesteps=ts, prev_timesteps=prev,
        latent_shape=(H, W, C), eta=0.0, guidance_scale=3.0)


def test_ddim_chain_truncation_and_remat_gradients():
  """`ddim_chain`'s gradient w.r.t. the denoiser params (CTRL's backprop solver): the same with
  every step kept, with no mask and with remat; zero with no step kept; with only the last
  step kept, the gradient of that one step at the chain's x_t (earlier steps constant)."""
  sched = diffusion.NoiseSchedule.sd()
  ac = sched.alphas_cumprod
  ts, prev = sched.ddim_timesteps(4)
  T = len(ts)
  context, uncond, labels = _traj_setup()
  eps_fn = _make_eps_fn([])
  x_init = jax.random.normal(jax.random.PRNGKey(3), (B, H, W, C))
  keys = jax.random.split(jax.random.PRNGKey(4), T)
  kw = dict(alphas_cumprod=ac, timesteps=ts, prev_timesteps=prev, eta=1.0, guidance_scale=3.0,
            class_labels=labels)

  def chain(w, keep=None, remat=False):
    return diffusion.ddim_chain(eps_fn, w, x_init, keys, context, uncond, keep_gradient=keep,
                                remat=remat, **kw)

  def grad(keep=None, remat=False):
    return float(jax.grad(lambda w: jnp.sum(chain(w, keep, remat)[0]))(jnp.float32(0.1)))

  g = grad()
  assert abs(g) > 1e-3
  np.testing.assert_allclose(grad(jnp.ones(T, bool)), g, rtol=1e-6)
  np.testing.assert_allclose(grad(jnp.ones(T, bool), remat=True), g, rtol=1e-6)
  assert grad(jnp.zeros(T, bool)) == 0.0
  _, steps = chain(jnp.float32(0.1))
  x_last, z_keys = steps["latents"][-1], keys[-1]

  def last_step(w):
    t, pt = jnp.full((B,), ts[-1]), jnp.full((B,), prev[-1])
    e = diffusion.guided_eps(eps_fn, w, x_last, t, context, uncond, 3.0, labels)
    mean, std = diffusion.ddim_step_mean_std(ac, e, t, pt, x_last, 1.0)
    return jnp.sum(mean + std * jax.random.normal(z_keys, x_last.shape))

  only_last = jnp.arange(T) == T - 1
  np.testing.assert_allclose(grad(only_last), float(jax.grad(last_step)(jnp.float32(0.1))),
                             rtol=1e-5)


# ----------------------------------------------------------------------------- denoising loss


def test_denoising_loss_terms():
  ac = diffusion.NoiseSchedule.sd().alphas_cumprod
  x0 = jax.random.normal(jax.random.PRNGKey(1), (64, H, W, C))
  context = jnp.zeros((64, L, D))
  seen = {}

  def oracle(params, x_t, t, ctx, labels):  # recovers eps exactly if t matches x_t's noise
    seen["t"] = t
    a = ac[t][:, None, None, None]
    return (x_t - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)

  loss = diffusion.denoising_loss_terms(oracle, None, jax.random.PRNGKey(2), x0, context, None, ac)
  assert loss.shape == (64,)
  assert float(loss.max()) < 1e-6
  t = np.asarray(seen["t"])
  assert t.min() >= 0 and t.max() < 1000 and len(np.unique(t)) > 30
  zero = lambda p, x, t, c, y: jnp.zeros_like(x)
  loss0 = diffusion.denoising_loss_terms(zero, None, jax.random.PRNGKey(2), x0, context, None, ac)
  assert abs(float(loss0.mean()) - 1.0) < 0.1  # E[eps^2] = 1
