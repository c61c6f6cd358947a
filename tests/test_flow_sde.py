"""The stochastic flow samplers (`flow.step_mean_std`, `flow.flow_chain`): Flow-GRPO's SDE and
CPS against an independent float64 NumPy computation of the papers' formulas, the chain's
log-probabilities recomputed from its own trajectory, and a known-answer test: driven by the
exact velocity field of Gaussian data, the samplers' samples follow their exact (linear
Gaussian) law, and the SDE's law is the data's and the ODE's marginals along the way."""
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # tiny_models builds the diffusers pipeline

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import tiny_models as tm  # noqa: E402
from ddpo_jax.models import load_pipeline  # noqa: E402
from ddpo_jax.numerics import diffusion, flow  # noqa: E402
from ddpo_jax.pipelines import sd  # noqa: E402

A = 0.7  # Flow-GRPO's default noise level


def _numpy_step(x, v, sigma, sigma_next, sde_type, a, sigma_max):
  """The transition written as in the papers, in float64. Flow-GRPO:
  x' = x + [v + s^2/(2 t) (x + (1 - t) v)] dt + s sqrt(|dt|) z, s = a sqrt(t / (1 - t)) (t = 1
  taken as sigma_max in 1 - t). CPS: x' = (1 - t') x0 + sqrt(t'^2 - c^2) eps + c z, c = t' sin(a
  pi / 2), x0 = x - t v, eps = x + (1 - t) v."""
  x, v = np.float64(x), np.float64(v)
  dt = sigma_next - sigma
  if sde_type == "sde":
    s = a * math.sqrt(sigma / (1 - (sigma_max if sigma == 1 else sigma)))
    return x + (v + s ** 2 / (2 * sigma) * (x + (1 - sigma) * v)) * dt, s * math.sqrt(-dt)
  c = sigma_next * math.sin(a * math.pi / 2)
  x0, eps = x - sigma * v, x + (1 - sigma) * v
  return (1 - sigma_next) * x0 + math.sqrt(sigma_next ** 2 - c ** 2) * eps, c


def _numpy_log_prob(x_next, mean, std, sde_type="sde"):
  """The reference's step log-prob per sample, mean over the latent dims, float64: the Gaussian
  log-density for "sde"; for "cps" -(x' - mean)^2 (flow_grpo's sde_step_with_logprob, sde_type
  'cps': "remove all constants")."""
  if sde_type == "cps":
    lp = -((x_next - mean) ** 2)
  else:
    lp = -((x_next - mean) ** 2) / (2 * std ** 2) - math.log(std) - 0.5 * math.log(2 * math.pi)
  return lp.reshape(lp.shape[0], -1).mean(axis=1)


@pytest.mark.parametrize("sde_type", ["sde", "cps"])
def test_step_and_log_prob_match_numpy(sde_type):
  """Every step of a shift-3 schedule (the first from sigma = 1), float32 against float64:
  mean and std to 2e-6 relative, log-probs to 1e-4 absolute."""
  rng = np.random.default_rng(0)
  sigmas, _ = flow.FlowSchedule(shift=3.0).sigmas(10)
  sigmas = sigmas.astype(np.float64)
  for i in range(10):
    x = rng.standard_normal((3, 4, 4, 2)).astype(np.float32)
    v = rng.standard_normal(x.shape).astype(np.float32)
    mean, std = flow.step_mean_std(jnp.asarray(v), jnp.asarray(x), sigmas[i], sigmas[i + 1],
                                   sde_type=sde_type, noise_level=A, sigma_max=sigmas[1])
    ref_mean, ref_std = _numpy_step(x, v, sigmas[i], sigmas[i + 1], sde_type, A, sigmas[1])
    np.testing.assert_allclose(np.asarray(mean), ref_mean, rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(float(np.asarray(std)), ref_std, rtol=2e-6, atol=1e-12)
    if ref_std == 0:  # CPS's last step (sigma_next = 0) is deterministic
      continue
    x_next = ref_mean + ref_std * rng.standard_normal(x.shape)
    lp = flow.transition_log_prob(jnp.asarray(x_next, jnp.float32), mean, std, sde_type)
    np.testing.assert_allclose(np.asarray(lp), _numpy_log_prob(x_next, ref_mean, ref_std,
                                                               sde_type), rtol=0, atol=1e-4)


def _chain(velocity_fn, x, sde_type, sigmas, key, sde_steps=None, a=A):
  keys = jax.random.split(key, len(sigmas) - 1)
  return flow.flow_chain(velocity_fn, None, x, keys, None, None, sigmas=sigmas,
                         guidance_scale=1.0, sde_type=sde_type, noise_level=a,
                         sde_steps=sde_steps)


def _toy_velocity(params, x, sigma, context, labels=None):
  """A nonlinear stand-in for a network, called at sigma (B,) as a velocity Denoiser is."""
  return jnp.tanh(x) * sigma[:, None, None, None] - 0.3 * x


@pytest.mark.parametrize("sde_type", ["sde", "cps"])
def test_chain_log_probs_recompute_exactly_from_the_trajectory(sde_type):
  """The update recomputes each step's log-prob from (x_i, x_{i+1}) with `step_mean_std`: at the
  sampling params it equals the sampler's (approx_kl = mean((lp - lp')^2) / 2 < 1e-10); ODE steps
  (outside `sde_steps`) are the Euler steps (to 1e-6), with log-prob 0 and std 0, and so is
  CPS's last step (std = sigma_next sin(.) = 0)."""
  sigmas, _ = flow.FlowSchedule(shift=3.0).sigmas(6)
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 4, 4, 2))
  window = np.array([False, True, True, False, False, True])
  x0, out = jax.jit(lambda x, k: _chain(_toy_velocity, x, sde_type, sigmas, k, window)
                    )(x, jax.random.PRNGKey(2))
  np.testing.assert_array_equal(np.asarray(out["next_latents"][-1]), np.asarray(x0))
  for i in range(6):
    xi, xn = out["latents"][i], out["next_latents"][i]
    v = _toy_velocity(None, xi, jnp.full((4,), sigmas[i]), None)
    if not window[i]:
      # (to float32 rounding: the chain is one compiled program, this is eager)
      np.testing.assert_allclose(np.asarray(xn), np.asarray(
          flow.euler_step(xi, v, sigmas[i], sigmas[i + 1])), rtol=0, atol=1e-6)
      assert float(out["log_probs"][i].max()) == 0.0 and float(out["std"][i]) == 0.0
      continue
    mean, std = flow.step_mean_std(v, xi, sigmas[i], sigmas[i + 1], sde_type=sde_type,
                                   noise_level=A, sigma_max=sigmas[1])
    if sde_type == "cps" and i == 5:  # sigma_next = 0: CPS's last step is deterministic
      assert float(std) == 0.0 and float(out["log_probs"][i].max()) == 0.0
      np.testing.assert_allclose(np.asarray(xn), np.asarray(mean), rtol=0, atol=1e-6)
      continue
    lp = flow.transition_log_prob(xn, mean, std, sde_type)
    approx_kl = float(jnp.mean((lp - out["log_probs"][i]) ** 2) / 2)
    assert approx_kl < 1e-10, approx_kl
    assert float(std) > 0 and float(jnp.abs(xn - mean).max()) > 0


def test_ode_chain_is_sample_ode():
  sigmas, _ = flow.FlowSchedule(shift=3.0).sigmas(5)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 4, 2))
  x0, out = _chain(_toy_velocity, x, "ode", sigmas, jax.random.PRNGKey(0))
  ref = flow.sample_ode(_toy_velocity, None, x, None, None, sigmas=sigmas, guidance_scale=1.0)
  np.testing.assert_allclose(np.asarray(x0), np.asarray(ref), rtol=0, atol=1e-6)
  assert float(jnp.abs(out["log_probs"]).max()) == 0.0


# Gaussian data x0 ~ N(MU, COV) in 2-D, x_sigma = (1 - sigma) x0 + sigma eps. The exact velocity
# E[eps - x0 | x_sigma] is linear in x: with C = (1 - sigma)^2 COV + sigma^2 I and
# r = x - (1 - sigma) MU, E[x0 | x] = MU + (1 - sigma) COV C^-1 r and E[eps | x] = sigma C^-1 r,
# so v = K x + k with K = (sigma I - (1 - sigma) COV) C^-1, k = -MU - (1 - sigma) K MU.
MU = np.array([1.5, -0.5])
COV = np.array([[0.16, 0.06], [0.06, 0.09]])


def _exact_velocity(params, x, sigma, context, labels=None):
  sigma = sigma[0]
  c = (1 - sigma) ** 2 * jnp.asarray(COV, jnp.float32) + sigma ** 2 * jnp.eye(2)
  r = x - (1 - sigma) * jnp.asarray(MU, jnp.float32)
  c_inv_r = jnp.linalg.solve(c, r.T).T
  x0 = jnp.asarray(MU, jnp.float32) + (1 - sigma) * c_inv_r @ jnp.asarray(COV, jnp.float32)
  return sigma * c_inv_r - x0


def _exact_moments(sigmas, sde_type, a):
  """The law of the sampler driven by the exact velocity, in float64 NumPy: every step is
  x' = A x + b + c z (linear Gaussian), so mean and covariance propagate exactly,
  m' = A m + b, P' = A P A^T + c^2 I, from N(0, I). A, b, c from the papers' formulas
  (`_numpy_step`'s) with v = K x + k. Returns [(mean, cov)] after each step."""
  eye = np.eye(2)
  m, p, out = np.zeros(2), eye.copy(), []
  for i in range(len(sigmas) - 1):
    sig, nxt = float(sigmas[i]), float(sigmas[i + 1])
    c_mat = (1 - sig) ** 2 * COV + sig ** 2 * eye
    k_mat = (sig * eye - (1 - sig) * COV) @ np.linalg.inv(c_mat)
    k_vec = -MU - (1 - sig) * k_mat @ MU
    dt = nxt - sig
    if sde_type == "ode":
      a_mat, b, c = eye + dt * k_mat, dt * k_vec, 0.0
    elif sde_type == "sde":
      s2 = a ** 2 * sig / (1 - (float(sigmas[1]) if sig == 1 else sig))
      alpha, beta = s2 / (2 * sig) * dt, (1 + s2 * (1 - sig) / (2 * sig)) * dt
      a_mat, b, c = (1 + alpha) * eye + beta * k_mat, beta * k_vec, math.sqrt(s2 * -dt)
    else:  # cps: mean = (1 - nxt)(x - sig v) + g (x + (1 - sig) v)
      c = nxt * math.sin(a * math.pi / 2)
      g = math.sqrt(nxt ** 2 - c ** 2)
      a_mat = (1 - nxt) * (eye - sig * k_mat) + g * (eye + (1 - sig) * k_mat)
      b = (-(1 - nxt) * sig + g * (1 - sig)) * k_vec
    m, p = a_mat @ m + b, a_mat @ p @ a_mat.T + c ** 2 * eye
    out.append((m, p))
  return out


def _close(samples, mean, cov, n):
  """Sample mean within 5 standard errors of `mean`, sample covariance within 5 standard
  errors of `cov` entrywise."""
  samples = np.asarray(samples, np.float64)
  ok_mean = np.all(np.abs(samples.mean(0) - mean) < 5 * np.sqrt(np.diag(cov) / n))
  se_cov = np.sqrt((cov ** 2 + np.outer(np.diag(cov), np.diag(cov))) / n)
  return bool(ok_mean and np.all(np.abs(np.cov(samples.T) - cov) < 5 * se_cov))


@pytest.mark.parametrize("sde_type,a", [("sde", 0.7), ("sde", 0.3), ("cps", 0.7), ("ode", 0.0)])
def test_samplers_driven_by_the_exact_velocity_reproduce_gaussian_data(sde_type, a):
  """40 000 chains of 200 steps (shift-3 schedule) from N(0, I), driven by the exact velocity:

  * the samples' mean and covariance, at the end and halfway (step 100), equal the sampler's
    exact law (`_exact_moments`, float64) within 5 standard errors: the implementation is the
    formulas;
  * SDE and ODE: that law is the data's N(MU, COV) at the end and the ODE's marginal
    N((1 - sigma) MU, (1 - sigma)^2 COV + sigma^2 I) halfway, within 4% of the largest variance
    (measured at most 3.3%), and that gap is Euler's discretisation error: it shrinks more than
    2.5x at 800 steps -- the SDE keeps the flow's marginals;
  * CPS keeps the data mean (to 1e-3) but not the covariance: with the posterior mean E[x0 | x]
    in place of x0 and a per-step noise sigma_next sin(a pi / 2) that does not shrink with the
    step, every step loses Var(x0 | x)'s share (at a = 0.7 the final std is 0.83x the data's at
    200 steps and 0.84x at 800; 0.95x at a = 0.3); asserted as measured, a property of the
    sampler, not a discretisation error (it does not shrink with the steps);
  * a velocity 5% too large fails the data check (SDE at a = 0.7)."""
  n, steps = 40_000, 200
  sigmas, _ = flow.FlowSchedule(shift=3.0).sigmas(steps)
  x = jax.random.normal(jax.random.PRNGKey(0), (n, 2))
  run = jax.jit(lambda x, k: _chain(_exact_velocity, x, sde_type, sigmas, k, a=a))
  x0, out = run(x, jax.random.PRNGKey(1))
  law = _exact_moments(sigmas, sde_type, a)
  assert _close(x0, *law[-1], n)
  assert _close(out["next_latents"][99], *law[99], n)
  half = float(sigmas[100])
  marginal = ((1 - half) * MU, (1 - half) ** 2 * COV + half ** 2 * np.eye(2))
  for (m, p), (m_ref, p_ref) in ((law[-1], (MU, COV)), (law[99], marginal)):
    if sde_type in ("sde", "ode"):
      assert np.abs(m - m_ref).max() < 0.01 and np.abs(p - p_ref).max() < 0.04 * p_ref.max(), (
          m, p, m_ref, p_ref)
  # ... and that gap is Euler's: 4x the steps shrink it more than 2.5x (first order); CPS's
  # covariance gap does not shrink
  fine = _exact_moments(flow.FlowSchedule(shift=3.0).sigmas(4 * steps)[0], sde_type, a)[-1][1]
  gap, fine_gap = np.abs(law[-1][1] - COV).max(), np.abs(fine - COV).max()
  if sde_type in ("sde", "ode"):
    assert fine_gap < gap / 2.5, (gap, fine_gap)
  else:
    assert fine_gap > 0.8 * gap, (gap, fine_gap)
  if sde_type == "cps":
    m, p = law[-1]
    assert np.abs(m - MU).max() < 1e-3, m
    ratio = np.sqrt(np.diag(p) / np.diag(COV))
    assert np.all((0.75 < ratio) & (ratio < 0.9)), ratio
  if sde_type == "sde" and a == 0.7:
    wrong = lambda p, x, t, c, y=None: 1.05 * _exact_velocity(p, x, t, c)  # noqa: E731
    x0_wrong, _ = _chain(wrong, x, sde_type, sigmas, jax.random.PRNGKey(1))
    assert not _close(x0_wrong, MU, COV, n)


def test_bad_sampler_settings():
  x = jnp.zeros((1, 2))
  with pytest.raises(ValueError, match="sde_type='ddim'"):
    flow.step_mean_std(x, x, 0.5, 0.4, sde_type="ddim", noise_level=0.7)
  with pytest.raises(ValueError, match="noise_level=0: the flow SDE needs"):
    flow.step_mean_std(x, x, 0.5, 0.4, sde_type="sde", noise_level=0)
  with pytest.raises(ValueError, match="noise_level=1.5: CPS needs"):
    flow.step_mean_std(x, x, 0.5, 0.4, sde_type="cps", noise_level=1.5)
  sigmas, _ = flow.FlowSchedule().sigmas(4)
  with pytest.raises(ValueError, match=r"sde_steps \(3,\) must be \(T,\) = \(4,\)"):
    _chain(_toy_velocity, jnp.zeros((1, 2, 2, 1)), "sde", sigmas,
           jax.random.PRNGKey(0), sde_steps=np.ones(3, bool))


def test_sde_windows():
  """MixGRPO's window slides from step 0 by `stride` every `shift_every` epochs inside
  [0, T - 2) and rolls back; Flow-GRPO-Fast's start is uniform over the starts that keep it in
  its range."""
  np.testing.assert_array_equal(flow.sde_window(6, 2, 3), [0, 0, 1, 1, 1, 0])
  starts = [flow.mixgrpo_window_start(e, 10, 4, shift_every=2, stride=3) for e in range(10)]
  assert starts == [0, 0, 3, 3, 0, 0, 3, 3, 0, 0]  # full windows of 4 in [0, 8): starts 0, 3
  starts = [flow.mixgrpo_window_start(e, 10, 4, 1, window_range=(2, 10)) for e in range(7)]
  assert starts == [2, 3, 4, 5, 6, 2, 3]
  rng = np.random.default_rng(0)
  drawn = {flow.random_window_start(rng, 10, 2, (1, 5)) for _ in range(200)}
  assert drawn == {1, 2, 3}
  with pytest.raises(ValueError, match=r"SDE window \[5, 8\) \(size 3\) must lie inside the 6"):
    flow.sde_window(6, 5, 3)
  with pytest.raises(ValueError, match="size 0"):
    flow.mixgrpo_window_start(0, 6, 0, shift_every=1)
  with pytest.raises(ValueError, match=r"sde_window_range=\(0, 4\) must hold a window of 5"):
    flow.mixgrpo_window_start(0, 6, 5, shift_every=1)
  with pytest.raises(ValueError, match=r"sde_window_range=\(3, 4\) must hold a window of 2"):
    flow.random_window_start(rng, 10, 2, (3, 4))
  with pytest.raises(ValueError, match=r"sde_window_range=\(0, 12\)"):
    flow.random_window_start(rng, 10, 2, (0, 12))


def _mixgrpo_reference_windows(iterations, sampling_steps, group_size, iters_per_group,
                               prog_overlap_step):
  """The windows of MixGRPO's training loop, written from its code (Tencent-Hunyuan/MixGRPO,
  fastvideo/train_grpo_flux.py `main` and fastvideo/utils/grpo_states.py `GRPOTrainingStates`,
  sample_strategy "progressive", prog_overlap and roll_back on, as its published
  finetune_flux_grpo_MixGRPO.sh): before each iteration the trained steps are
  range(cur, min(cur + group_size, max_timesteps)), max_timesteps = sampling_steps - 2; then
  the iteration counter advances, every iters_per_group iterations cur += prog_overlap_step,
  and cur > max_timesteps rolls cur back to 0."""
  max_timesteps = sampling_steps - 2
  cur, it_in_group, windows = 0, 0, []
  for _ in range(iterations):
    windows.append(list(range(cur, min(cur + group_size, max_timesteps))))
    it_in_group += 1
    if it_in_group >= iters_per_group:
      it_in_group = 0
      cur += prog_overlap_step
    if cur > max_timesteps:
      cur, it_in_group = 0, 0
  return windows


@pytest.mark.parametrize("steps,size,shift", [(25, 4, 25), (10, 4, 3), (8, 2, 1)])
def test_mixgrpo_window_over_two_sweeps_matches_the_reference(steps, size, shift):
  """Every epoch of two full sweeps (and more): the reference's full-size windows, in order,
  are ours, epoch for epoch until its first shortened window; its shortened and empty windows
  (starts past T - 2 - size) are the only ones we skip (docs/algorithms.md, MixGRPO)."""
  ref = _mixgrpo_reference_windows(3 * (steps - 1) * shift, steps, size, shift, 1)
  ours = [list(np.flatnonzero(flow.sde_window(
      steps, flow.mixgrpo_window_start(e, steps, size, shift), size))) for e in range(len(ref))]
  assert all(len(w) == size for w in ours)
  first_short = next(i for i, w in enumerate(ref) if len(w) < size)
  assert first_short == (steps - 2 - size + 1) * shift
  assert ours[:first_short] == ref[:first_short]
  full = [w for w in ref if len(w) == size]
  assert ours[:len(full)] == full
  sweep = (steps - 2 - size + 1) * shift  # our period: every full window, shift epochs each
  assert ours[sweep:2 * sweep] == ours[:sweep] and ours[0] == list(range(size))
  assert sorted({w[0] for w in ours}) == list(range(steps - 2 - size + 1))
  assert max(w[-1] for w in ours) == steps - 3  # the last two steps are never SDE steps


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
  return load_pipeline(tm.save_tiny_flow_pipeline(str(tmp_path_factory.mktemp("sd3") / "sd3"),
                                                  "sd3"))


# CPS on the transformer is slow-tier (the two cases took 152 s on the loaded 2-core CPU); its
# step and log-prob are checked fast above against NumPy (the [cps] cases).
@pytest.mark.parametrize("sde_type", ["sde", pytest.param("cps", marks=pytest.mark.slow)])
@pytest.mark.slow  # 19 s in CI; the chain/re-score agreement stays fast on the toy velocity
def test_sampler_and_update_log_probs_agree_on_a_tiny_sd3_transformer(sde_type, tiny_sd3):
  """What Flow-GRPO's ratio needs: the tiny SD3.5-style pipeline's transformer (QK norm, dual
  attention), CFG 4.5, 4 SDE / CPS steps of the chain (`flow_chain`, one compiled program),
  then every step re-scored as the update does it (`flow.step_log_prob`, another program, one
  sigma per sample): approx_kl = mean((lp - lp')^2) / 2 < 1e-10 in float32 at the sampling
  params, and 0 log-prob on CPS's deterministic last step."""
  pipe = tiny_sd3
  params = pipe.params["transformer"]
  cond = pipe.encode(pipe.params, jnp.asarray(pipe.tokenize(["a cat", "the red dog"])))
  uncond = pipe.uncond(pipe.params)
  velocity = sd.make_denoiser(pipe, (8, 8, 16))
  sigmas = velocity.flow_sigmas(4)
  kw = dict(guidance_scale=4.5, sde_type=sde_type, noise_level=A)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 16))
  _, out = jax.jit(lambda p, x, k: flow.flow_chain(
      velocity, p, x, jax.random.split(k, 4), cond, uncond, sigmas=sigmas, **kw))(params, x, jax.random.PRNGKey(1))
  rescore = jax.jit(lambda p, x, s, s_next, x_next: flow.step_log_prob(
      velocity, p, x, s, s_next, x_next, cond, uncond, sigma_max=sigmas[1], **kw)[0])
  for i in range(4):
    lp = rescore(params, out["latents"][i], jnp.full((2,), sigmas[i]),
                 jnp.full((2,), sigmas[i + 1]), out["next_latents"][i])
    if sde_type == "cps" and i == 3:
      assert float(jnp.abs(out["log_probs"][i]).max()) == 0.0
      continue
    approx_kl = float(jnp.mean((lp - out["log_probs"][i]) ** 2) / 2)
    assert approx_kl < 1e-10, (i, approx_kl)
    assert float(jnp.abs(out["log_probs"][i]).min()) > 0
