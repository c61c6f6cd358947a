"""Weight EMA, DiffusionNFT's old policy and KL term, flow_grpo's KL term (train.kl_beta) and its
zero-advantage filter, each against a NumPy computation written from the reference code
(flow_grpo's scripts/train_sd3.py and flow_grpo/ema.py; DiffusionNFT's
scripts/train_nft_sd3.py), not from ddpo_jax's."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import load_config, one_update

from ddpo_jax import algorithms, config_schema
from ddpo_jax.algorithms import train, StepModel
from ddpo_jax.algorithms.base import flow_grpo_kl
from ddpo_jax.numerics import diffusion, flow, parallel, rl


# ------------------------------------------------------------------------------- weight EMA
class _NumpyEMAModuleWrapper:
  """flow_grpo/ema.py's EMAModuleWrapper, in NumPy (float64)."""

  def __init__(self, params, decay, update_step_interval):
    self.ema = [np.array(p, np.float64) for p in params]
    self.decay, self.interval = decay, update_step_interval

  def step(self, params, optimization_step):
    one_minus_decay = 1 - min((1 + optimization_step) / (10 + optimization_step), self.decay)
    if (optimization_step + 1) % self.interval == 0:
      for e, p in zip(self.ema, params):
        e += one_minus_decay * (p - e)


@pytest.mark.parametrize("accum,interval", [(1, 1), (2, 8), (3, 2)])
def test_ema_update_is_flow_grpo_train_loop(accum, interval):
  """`train.ema_update` once per optimizer step, with calls = gradient_accumulation_steps, gives
  the EMA of flow_grpo's train loop: `ema.step(params, global_step)` after every minibatch,
  global_step counting the optimizer steps (one per `accum` minibatches). Float32 against
  float64: 1e-6 absolute."""
  rng = np.random.default_rng(0)
  n_steps = 40
  thetas = [rng.normal(size=(3, 2))]  # theta_s: the params after s optimizer steps
  for _ in range(n_steps):
    thetas.append(thetas[-1] + rng.normal(size=(3, 2)))
  ref = _NumpyEMAModuleWrapper([thetas[0]], 0.9, interval)
  global_step = 0
  for i in range(accum * n_steps + accum - 1):  # the last step's calls all made
    if (i + 1) % accum == 0:  # accelerate's sync: an optimizer step
      global_step += 1
    ref.step([thetas[global_step]], global_step)
  ema = jnp.asarray(thetas[0], jnp.float32)
  for s in range(1, n_steps + 1):
    ema = train.ema_update(ema, jnp.asarray(thetas[s], jnp.float32), jnp.int32(s), 0.9, interval,
                           accum)
  np.testing.assert_allclose(np.asarray(ema), ref.ema[0], atol=1e-6 * np.abs(ref.ema[0]).max())
  # one call per step (DiffusionNFT's loop) differs once accum > 1
  if accum > 1:
    once = jnp.asarray(thetas[0], jnp.float32)
    for s in range(1, n_steps + 1):
      once = train.ema_update(once, jnp.asarray(thetas[s], jnp.float32), jnp.int32(s), 0.9,
                              interval, 1)
    assert np.abs(np.asarray(once) - ref.ema[0]).max() > 1e-3


@pytest.mark.slow  # 32 s in CI (cold cache); ema_update's formula stays fast
def test_update_program_applies_the_ema(digits_cache):
  """One update call (one optimizer step of 2 accumulated minibatches) leaves ema = theta_1 +
  d^2 (theta_0 - theta_1), d = min(2 / 11, 0.9): flow_grpo's two `ema.step` calls at
  global_step 1 (update_interval 1). Float32: 1e-6 relative to the params' scale."""
  config = load_config("default", "runlocal", **{"train.ema.enabled": True,
                                                  "train.ema.update_interval": 1,
                                                  "train.gradient_accumulation_steps": 2})
  n = config.sample.batch_size
  config.train.batch_size = n // 2
  policy, _, state, _ = one_update(config, lr=1e-2)
  assert int(state.step) == 1
  d = min(2 / 11, 0.9) ** 2
  theta0 = jax.tree.map(np.asarray, policy.params["unet"])
  expected = jax.tree.map(lambda t1, t0: t1 + d * (t0 - t1),
                          jax.tree.map(np.asarray, state.params), theta0)
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), theta0,
                       jax.tree.map(np.asarray, state.params))
  assert max(jax.tree.leaves(moved)) > 1e-4  # the step moved the params
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=0,
                                                       atol=1e-6 * max(1.0, np.abs(b).max())),
               state.ema_params, expected)


# --------------------------------------------------------------------- DiffusionNFT's old policy
def _return_decay(step, decay_type):
  """DiffusionNFT's return_decay (scripts/train_nft_sd3.py)."""
  flat, uprate, uphold = {0: (0, 0.0, 0.0), 1: (0, 0.001, 0.5), 2: (75, 0.0075, 0.999)}[decay_type]
  return 0.0 if step < flat else min((step - flat) * uprate, uphold)


@pytest.mark.parametrize("decay_type", [0, 1, 2])
def test_nft_old_decay_is_return_decay(decay_type):
  for step in (0, 1, 7, 74, 75, 76, 100, 300, 499, 500, 501, 2000):
    np.testing.assert_allclose(float(train.nft_old_decay(jnp.int32(step), decay_type)),
                               _return_decay(step, decay_type), rtol=1e-6, atol=1e-7)


def _nft_reference_loss(v, v_old, v_ref, x0, eps, t, adv, beta, c, kl_beta):
  """train_nft_sd3.py's loss of one micro-batch at one timestep each, float64 (NumPy)."""
  t = t[:, None, None, None]
  xt = (1 - t) * x0 + t * eps
  r = np.clip(np.clip(adv, -c, c) / c / 2.0 + 0.5, 0, 1)
  positive_prediction = beta * v + (1 - beta) * v_old
  implicit_negative_prediction = (1.0 + beta) * v_old - beta * v
  x0_prediction = xt - t * positive_prediction
  weight_factor = np.maximum(np.abs(x0_prediction - x0).mean(axis=(1, 2, 3), keepdims=True), 1e-5)
  positive_loss = ((x0_prediction - x0) ** 2 / weight_factor).mean(axis=(1, 2, 3))
  negative_x0_prediction = xt - t * implicit_negative_prediction
  negative_weight_factor = np.maximum(
      np.abs(negative_x0_prediction - x0).mean(axis=(1, 2, 3), keepdims=True), 1e-5)
  negative_loss = ((negative_x0_prediction - x0) ** 2 / negative_weight_factor).mean(axis=(1, 2, 3))
  ori_policy_loss = r * positive_loss / beta + (1.0 - r) * negative_loss / beta
  policy_loss = (ori_policy_loss * c).mean()
  kl_div_loss = ((v - v_ref) ** 2).mean(axis=(1, 2, 3))
  return policy_loss + kl_beta * kl_div_loss.mean()


def test_nft_loss_with_an_ema_old_policy_over_two_inner_epochs():
  """DiffusionNFT's loss on a linear velocity model v = a x + b t over two inner epochs: the old
  policy is the EMA old <- d old + (1 - d) theta of an earlier epoch (d from return_decay) and
  stays v_old in both inner epochs while theta moves; with its KL term to the pre-trained
  model (kl_beta 1e-2). Against train_nft_sd3.py's loss in float64 NumPy (same noise), 1e-5
  relative."""
  rng = np.random.default_rng(1)
  x0 = rng.uniform(-1, 1, (4, 2, 2, 1)).astype(np.float32)
  sigma = np.array([1.0, 0.6, 0.3, 0.1], np.float32)
  adv = np.array([2.0, -1.0, 7.0, 0.0], np.float32)
  config = load_config("digits_flow", "nft,runlocal", **{"train.nft_beta": 0.5,
                                                          "train.kl_beta": 1e-2})
  c = config.train.adv_clip_max

  def velocity(p, x, s, context):
    return p["a"] * x + p["b"] * s[:, None, None, None]
  base = {"a": 0.8, "b": -0.2}
  theta_prev = {"a": 1.0, "b": 0.1}  # the trained params at the end of the previous epoch
  d = _return_decay(600, 1)  # 0.5: decay_type 1 after 600 optimizer steps
  old = {k: d * base[k] + (1 - d) * theta_prev[k] for k in base}  # old started at base
  state = train.TrainState(step=jnp.int32(600), params={k: jnp.float32(v) for k, v in
                                                        theta_prev.items()},
                           opt_state=None, rng=None,
                           old_params={k: jnp.float32(v) for k, v in base.items()})
  state = jax.jit(lambda s: s.replace(old_params=jax.tree.map(
      lambda o, p: o * train.nft_old_decay(s.step, 1) + p * (1 - train.nft_old_decay(s.step, 1)),
      s.old_params, s.params)))(state)
  for k in old:
    np.testing.assert_allclose(float(state.old_params[k]), old[k], rtol=1e-6)
  nft = algorithms.get("nft")
  batch = {"x0": jnp.asarray(x0), "times": jnp.asarray(sigma), "context": None,
           "optimality": nft.batch_fields(
               type("T", (), {"times": jnp.zeros((4, 3)),
                              "next_latents": jnp.broadcast_to(jnp.asarray(x0)[:, None],
                                                               (4, 3, 2, 2, 1))}),
               jnp.asarray(adv), None, None, nft.hyperparameters(config))[1]["optimality"]}
  model = StepModel(None, None, velocity, train.sampling_params(state),
                    {k: jnp.float32(v) for k, v in base.items()})
  assert train.sampling_params(state) is state.old_params
  for inner, theta in enumerate(({"a": 1.0, "b": 0.1}, {"a": 1.3, "b": 0.25})):
    key = jax.random.PRNGKey(10 + inner)
    params = {k: jnp.float32(v) for k, v in theta.items()}
    loss, metrics = nft.loss(model, params, batch, key, nft.hyperparameters(config))
    eps = np.asarray(jax.random.normal(key, x0.shape, jnp.float32), np.float64)
    t = sigma.astype(np.float64)
    x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * eps

    def v_of(p):
      return p["a"] * x_t + p["b"] * t[:, None, None, None]
    expected = _nft_reference_loss(v_of(theta), v_of(old), v_of(base), x0.astype(np.float64),
                                   eps, t, adv.astype(np.float64), 0.5, c, 1e-2)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["kl_div"]),
                               ((v_of(theta) - v_of(base)) ** 2).mean(), rtol=1e-5)


@pytest.mark.slow  # 16 s in CI; NFT's loss against NumPy stays fast
def test_nft_inner_epochs_keep_the_sampling_policy_as_v_old(digits_cache):
  """digits_flow:nft with two inner epochs of one optimizer step each: the second inner epoch's
  v_old is still the sampling (old) policy, so v_theta - v_old is nonzero from its first
  micro-step (refreshing v_old per inner epoch would make it exactly 0 there); the old policy
  is unchanged by the update program and moves once, after the epoch, to d old + (1 - d) theta
  with d = return_decay(2, 1) = 0.002 (float32, 1e-6 relative)."""
  config = load_config("digits_flow", "nft,runlocal", **{"train.num_inner_epochs": 2,
                                                          "train.gradient_accumulation_steps": 1})
  n = config.sample.batch_size * config.sample.num_batches_per_epoch
  config.train.batch_size = config.sample.batch_size
  config.train.gradient_accumulation_steps = config.sample.num_batches_per_epoch
  assert n == config.train.batch_size * config.train.gradient_accumulation_steps
  from ddpo_jax.trainer.families import build_policy
  mesh = parallel.make_mesh()
  policy = build_policy(config, "")
  opt = train.make_optimizer(config.train)
  update_fn = train.make_update_fn(policy, config, opt, mesh)
  old_fn = train.make_old_policy_fn(config, opt, policy, mesh)
  frozen = train.frozen_params(policy, config)
  prompts = policy.prompt_fn(np.random.default_rng(0), n)
  metadata = {k: jnp.asarray(v) for k, v in policy.prompt_metadata(prompts).items()}
  config.sample.batch_size = n  # one sampling call of the whole epoch
  sample_fn = train.make_sample_fn(policy, config, [], mesh)
  trainable = jax.tree.map(jnp.copy, policy.params["unet"])
  state = train.new_train_state(config, trainable, opt.init(trainable), jax.random.PRNGKey(0))
  traj, _, _ = sample_fn(train.sampling_params(state), frozen, jax.random.PRNGKey(0),
                         jnp.asarray(policy.tokenize(prompts)), metadata)
  adv, scales = (jnp.asarray(a, jnp.float32) for a in
                 rl.normalize_advantages(np.arange(n, dtype=np.float32), return_scale=True))
  old0 = jax.tree.map(np.asarray, state.old_params)
  rewards = jnp.arange(n, dtype=jnp.float32)
  state, m1 = update_fn(state, frozen, traj, adv, scales, rewards, jax.random.PRNGKey(1))
  state, m2 = update_fn(state, frozen, traj, adv, scales, rewards, jax.random.PRNGKey(2))
  assert int(state.step) == 2
  assert float(m1["nft_old_deviation"]) == 0.0  # theta_0 = the old policy in the first
  assert float(m2["nft_old_deviation"]) > 0.0
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.old_params), old0)
  theta = jax.tree.map(np.asarray, state.params)
  state = old_fn(state)
  d = _return_decay(2, 1)
  jax.tree.map(lambda new, o, p: np.testing.assert_allclose(
      np.asarray(new), d * o.astype(np.float64) + (1 - d) * p.astype(np.float64), rtol=1e-6,
      atol=1e-7), state.old_params, old0, theta)


# --------------------------------------------------------------------- flow_grpo's KL (kl_beta)
def _gaussian_kl_by_quadrature(mu_p, mu_q, std):
  """KL(N(mu_p, std^2) || N(mu_q, std^2)) of one dimension by numerical integration of
  p log(p / q) (trapezoid rule on +- 12 std around both means)."""
  lo, hi = min(mu_p, mu_q) - 12 * std, max(mu_p, mu_q) + 12 * std
  x = np.linspace(lo, hi, 200001)
  log_p = -0.5 * ((x - mu_p) / std) ** 2 - np.log(std * np.sqrt(2 * np.pi))
  log_q = -0.5 * ((x - mu_q) / std) ** 2 - np.log(std * np.sqrt(2 * np.pi))
  return np.trapezoid(np.exp(log_p) * (log_p - log_q), x)


@pytest.mark.parametrize("sampler", ["sde", "cps"])
def test_flow_grpo_kl_is_the_step_kl_in_its_units(sampler):
  """flow_grpo's KL term mean_d (mu - mu_ref)^2 / (2 std_dev_t^2), std_dev_t as its
  sde_step_with_logprob returns it (sde: s = a sqrt(sigma / (1 - sigma)); cps: sigma_next
  sin(a pi / 2)), equals (-dt) x the per-dimension KL of the two Gaussian steps for 'sde' and the
  per-dimension KL for 'cps': against the KL by quadrature (1e-5 relative), and the same
  conversion to `diffusion.gaussian_kl_shared_std` (the kl_coef penalty's KL_t, 'mean' and
  'sum' reductions, D = 8 dims)."""
  rng = np.random.default_rng(2)
  a = 0.7
  sigma = np.array([0.9, 0.5, 0.2], np.float32)
  sigma_next = np.array([0.7, 0.3, 0.1], np.float32)
  x = rng.normal(size=(3, 2, 2, 2)).astype(np.float32)
  v, v_ref = (rng.normal(size=(3, 2, 2, 2)).astype(np.float32) for _ in range(2))
  mean, std = flow.step_mean_std(jnp.asarray(v), jnp.asarray(x), jnp.asarray(sigma),
                                 jnp.asarray(sigma_next), sde_type=sampler, noise_level=a)
  mean_ref, _ = flow.step_mean_std(jnp.asarray(v_ref), jnp.asarray(x), jnp.asarray(sigma),
                                   jnp.asarray(sigma_next), sde_type=sampler, noise_level=a)
  got = np.asarray(flow_grpo_kl(mean, mean_ref, std, jnp.asarray(sigma), jnp.asarray(sigma_next),
                                sampler))
  s64, sn64 = sigma.astype(np.float64), sigma_next.astype(np.float64)
  if sampler == "sde":
    std_dev_t = a * np.sqrt(s64 / (1 - s64))
    step_std, factor = std_dev_t * np.sqrt(s64 - sn64), s64 - sn64
  else:
    std_dev_t = sn64 * math.sin(a * math.pi / 2)
    step_std, factor = std_dev_t, np.ones(3)
  mu, mu_r = np.asarray(mean, np.float64), np.asarray(mean_ref, np.float64)
  flow_grpo = ((mu - mu_r) ** 2).mean(axis=(1, 2, 3)) / (2 * std_dev_t ** 2)
  np.testing.assert_allclose(got, flow_grpo, rtol=1e-5)
  per_dim_kl = np.array([np.mean([_gaussian_kl_by_quadrature(p, q, step_std[i])
                                  for p, q in zip(mu[i].ravel(), mu_r[i].ravel())])
                         for i in range(3)])
  np.testing.assert_allclose(got, factor * per_dim_kl, rtol=1e-5)
  for reduction, dims in (("mean", 1), ("sum", 8)):
    kl_t = np.asarray(diffusion.gaussian_kl_shared_std(mean, mean_ref, std, reduction=reduction))
    np.testing.assert_allclose(got, factor * kl_t / dims, rtol=1e-5)


def test_policy_gradient_adds_beta_times_flow_grpo_kl():
  """PPO's micro-step loss with train.kl_beta = beta is the loss without it plus beta x the
  batch mean of flow_grpo's KL term (float64 NumPy from the step means, 1e-5 relative); its
  gradient in the model's parameter is the NumPy term's (central differences, 1e-3)."""
  config = load_config("digits_flow", "runlocal", **{"train.kl_beta": 0.04})
  a = float(config.sample.noise_level)
  rng = np.random.default_rng(3)
  x = rng.normal(size=(4, 2, 2, 1)).astype(np.float32)
  v_ref = rng.normal(size=(4, 2, 2, 1)).astype(np.float32)
  sigma = np.array([0.9, 0.8, 0.5, 0.3], np.float32)
  sigma_next = np.array([0.8, 0.5, 0.3, 0.1], np.float32)

  def step(v):
    return flow.step_mean_std(v, jnp.asarray(x), jnp.asarray(sigma), jnp.asarray(sigma_next),
                              sde_type="sde", noise_level=a)
  ref_mean, _ = step(jnp.asarray(v_ref))

  def step_log_prob(p, batch):
    mean, std = step(p["w"] * batch["latents"])
    return flow.transition_log_prob(batch["next_latents"], mean, std, "sde"), mean, std
  model = StepModel(step_log_prob, None)
  mean0, std0 = step(0.5 * jnp.asarray(x))
  batch = {"latents": jnp.asarray(x), "next_latents": mean0 + std0 * 0.3,
           "times": jnp.asarray(sigma), "next_times": jnp.asarray(sigma_next),
           "log_probs": jnp.zeros(4), "advantages": jnp.asarray([1.0, -1.0, 0.5, 2.0]),
           "reference_means": ref_mean}
  ppo = algorithms.get("ppo")
  without = config.copy_and_resolve_references()
  without.train.kl_beta = 0.0

  def numpy_term(w):
    s64, sn64 = sigma.astype(np.float64), sigma_next.astype(np.float64)
    std_dev_t = a * np.sqrt(s64 / (1 - s64))
    t = s64[:, None, None, None]
    dt = (sn64 - s64)[:, None, None, None]
    xx = x.astype(np.float64)
    sdt = std_dev_t[:, None, None, None]

    def mu(v):  # flow_grpo's prev_sample_mean
      return xx * (1 + sdt ** 2 / (2 * t) * dt) + v * (1 + sdt ** 2 * (1 - t) / (2 * t)) * dt
    kl = ((mu(w * xx) - mu(v_ref.astype(np.float64))) ** 2).mean(axis=(1, 2, 3)) / (2 * std_dev_t ** 2)
    return kl.mean()

  p = {"w": jnp.float32(0.7)}
  with_kl, metrics = ppo.loss(model, p, batch, None, ppo.hyperparameters(config))
  plain, _ = ppo.loss(model, p, batch, None, ppo.hyperparameters(without))
  np.testing.assert_allclose(float(with_kl) - float(plain), 0.04 * numpy_term(0.7), rtol=1e-4)
  np.testing.assert_allclose(float(metrics["kl_loss"]), numpy_term(0.7), rtol=1e-5)
  g = jax.grad(lambda q: ppo.loss(model, q, batch, None, ppo.hyperparameters(config))[0] -
               ppo.loss(model, q, batch, None, ppo.hyperparameters(without))[0])(p)
  h = 1e-4
  fd = 0.04 * (numpy_term(0.7 + h) - numpy_term(0.7 - h)) / (2 * h)
  np.testing.assert_allclose(float(g["w"]), fd, rtol=1e-3)


@pytest.mark.parametrize("name,variant,overrides,message", [
    ("default", "runlocal", {"train.kl_beta": 0.1}, "divides by the flow SDE's std"),
    ("default", "runlocal", {"train.kl_beta": 0.1, "train.algorithm": "rwr"},
     "the direct KL term is flow_grpo's"),
    ("digits_flow", "runlocal", {"train.kl_beta": 0.1, "train.cfg": False,
                                 "sample.guidance_scale": 3.0}, "the KL term compares"),
    ("digits_flow", "nft,runlocal", {"train.drop_zero_advantage": True},
     "drop_zero_advantage is flow_grpo's"),
    ("digits_flow", "nft,runlocal", {"train.nft_decay_type": 3}, "nft_decay_type=3 is outside"),
    ("default", "runlocal", {"train.ema.decay": 1.0}, "train.ema.decay=1.0 is outside"),
    ("default", "runlocal", {"train.ema.update_interval": 0}, "update_interval=0 is outside"),
])
def test_bad_combinations_are_refused_before_compiling(name, variant, overrides, message):
  config = load_config(name, variant, **overrides)
  with pytest.raises(ValueError, match=message):
    train.validate_config(config, parallel.make_mesh())


def test_ctrl_refuses_the_ddpo_only_keys():
  config = config_schema.new_config("ctrl", "digits")
  config.train.ema.enabled = True
  with pytest.raises(ValueError, match="are DDPO's"):
    train.validate_shared_config(config)


# ----------------------------------------------------------------- zero-advantage filter
def test_drop_zero_advantage_is_the_mean_over_the_kept_samples():
  """train.drop_zero_advantage: the PPO loss over a batch with zero-advantage samples (a group
  of equal rewards) equals flow_grpo's loss over the batch with those samples removed
  (`samples = {k: v[mask]}`, mask = advantages != 0), to float32's absolute error; off, it is
  the mean over all samples."""
  rewards = np.array([1.0, 1.0, 1.0, 1.0, 0.2, 0.9, 0.5, 0.1], np.float32)  # group 0: all equal
  adv = rl.group_relative_advantages(rewards, 4).astype(np.float32)
  assert np.all(adv[:4] == 0) and np.all(adv[4:] != 0)
  config = load_config("digits_flow", "runlocal", **{"train.drop_zero_advantage": True})
  n, T = 8, 3
  traj = type("T", (), {k: jnp.zeros((n, T) + ((2, 2, 1) if "lat" in k else ()))
                        for k in ("latents", "next_latents", "times", "next_times",
                                  "log_probs")})
  ppo = algorithms.get("ppo")
  _, per_sample, metrics = ppo.batch_fields(traj, jnp.asarray(adv), jnp.ones(n), None,
                                            ppo.hyperparameters(config))
  assert float(metrics["kept_fraction"]) == 0.5
  rng = np.random.default_rng(4)
  log_prob = rng.normal(scale=1e-4, size=n).astype(np.float32)
  old = np.zeros(n, np.float32)
  c, eps = config.train.adv_clip_max, config.train.clip_range

  def reference(lp, lp_old, a):  # train_sd3.py's policy_loss on the kept samples
    a = np.clip(a, -c, c)
    ratio = np.exp(lp.astype(np.float64) - lp_old)
    return np.mean(np.maximum(-a * ratio, -a * np.clip(ratio, 1 - eps, 1 + eps)))
  mask = adv != 0
  loss, _ = rl.ppo_clipped_loss(jnp.asarray(log_prob), jnp.asarray(old), jnp.asarray(adv), eps,
                                c, per_sample["sample_weights"])
  # the group-centred terms nearly cancel (|loss| ~ 2e-5 from terms ~ 1): float32 absolute error
  np.testing.assert_allclose(float(loss), reference(log_prob[mask], old[mask], adv[mask]),
                             rtol=0, atol=1e-7)
  unweighted, _ = rl.ppo_clipped_loss(jnp.asarray(log_prob), jnp.asarray(old), jnp.asarray(adv),
                                      eps, c)
  np.testing.assert_allclose(float(unweighted), reference(log_prob, old, adv), rtol=0, atol=1e-7)
  assert abs(float(loss) - float(unweighted)) > 1e-6
  sf = rl.score_function_loss(jnp.asarray(log_prob), jnp.asarray(adv), c,
                              per_sample["sample_weights"])
  np.testing.assert_allclose(float(sf), -np.mean(adv[mask] * log_prob[mask].astype(np.float64)),
                             rtol=0, atol=1e-9)


def test_an_nft_checkpoint_without_an_old_policy_restores_with_old_equal_params(tmp_path):
  """A DiffusionNFT checkpoint written before the train state kept an old policy (old_params
  None) restores into a template that has one, with old = the saved params (what it sampled
  with), bit for bit; one that has it restores it as saved."""
  from ddpo_jax.trainer import checkpoints
  params = {"w": jnp.arange(6, dtype=jnp.float32).reshape(2, 3)}
  opt = train.make_optimizer(load_config("digits_flow", "nft,runlocal").train)
  old_style = train.TrainState(step=jnp.int32(3), params=params, opt_state=opt.init(params),
                               rng=jax.random.PRNGKey(0))
  mngr = checkpoints.manager(str(tmp_path / "a"))
  checkpoints.save(mngr, 3, old_style, {"epoch": 3, "config": "{}"})
  mngr.wait_until_finished()
  template = old_style.replace(params=jax.tree.map(jnp.zeros_like, params),
                               old_params=jax.tree.map(jnp.zeros_like, params))
  state, _ = checkpoints.restore(mngr, 3, template)
  np.testing.assert_array_equal(np.asarray(state.old_params["w"]), np.asarray(params["w"]))
  np.testing.assert_array_equal(np.asarray(state.params["w"]), np.asarray(params["w"]))
  mngr.close()
  new_style = old_style.replace(old_params={"w": params["w"] * 0.5})
  mngr = checkpoints.manager(str(tmp_path / "b"))
  checkpoints.save(mngr, 3, new_style, {"epoch": 3, "config": "{}"})
  mngr.wait_until_finished()
  state, _ = checkpoints.restore(mngr, 3, template)
  np.testing.assert_array_equal(np.asarray(state.old_params["w"]), np.asarray(params["w"]) * 0.5)
  mngr.close()


# ------------------------------------------------------------ DiffusionNFT's sampler ("dpm2")
def _reference_dpm2(v_pred_fn, z, sigmas):
  """run_sampling(v_pred_fn, z, sigmas, solver="dpm2", determistic=True) of DiffusionNFT's
  flow_grpo/diffusers_patch/solver.py, in float64 NumPy: DPMState(order=2), dpm_step with
  convert_model_output, ddim_update (eta 0), dpm_solver_first_order_update and
  multistep_dpm_solver_second_order_update. Returns all latents [z_0, ..., z_T]."""
  order, model_outputs, lower_order_nums = 2, [None, None], 0
  timesteps = sigmas[:-1]
  all_latents = [z]
  for i in range(len(sigmas) - 1):
    sigma = sigmas[i]
    pred = v_pred_fn(z, sigma)
    lower_order_final = i == len(timesteps) - 1
    model_output = z - sigmas[i] * pred  # convert_model_output: x0_pred
    model_outputs = [model_outputs[1], model_output]
    if order == 1 or lower_order_nums < 1 or lower_order_final:
      if i == 0 or lower_order_final:
        t, s = sigmas[i + 1], sigmas[i]
        noise_pred = (z - (1 - s) * model_output) / s
        z = (1 - t) * model_output + np.sqrt(t ** 2) * noise_pred
      else:
        st, ss = sigmas[i + 1], sigmas[i]
        h = (np.log(1 - st) - np.log(st)) - (np.log(1 - ss) - np.log(ss))
        z = (st / ss) * z - ((1 - st) * (np.exp(-h) - 1.0)) * model_output
    else:
      st, s0, s1 = sigmas[i + 1], sigmas[i], sigmas[i - 1]
      with np.errstate(divide="ignore"):
        lt, l0, l1 = (np.log(1 - v) - np.log(v) for v in (st, s0, s1))
      m0, m1 = model_outputs[-1], model_outputs[-2]
      h, h_0 = lt - l0, l0 - l1
      r0 = h_0 / h
      d0, d1 = m0, (1.0 / r0) * (m0 - m1)
      z = ((st / s0) * z - ((1 - st) * (np.exp(-h) - 1.0)) * d0
           - 0.5 * ((1 - st) * (np.exp(-h) - 1.0)) * d1)
    if lower_order_nums < order:
      lower_order_nums += 1
    all_latents.append(z)
  return all_latents


@pytest.mark.parametrize("num_steps", [1, 2, 3, 10])
def test_dpm2_chain_is_diffusion_nft_solver(num_steps):
  """`dynamics.dpm2_chain` on a nonlinear velocity model against DiffusionNFT's dpm2 solver in
  float64 NumPy, every step's latents to 1e-5 (float32); with 10 steps it differs from the
  Euler ODE (a second-order method)."""
  from ddpo_jax.tasks import dynamics
  sigmas = np.linspace(1.0, 0.0, num_steps + 1)
  sigmas = 3 * sigmas / (1 + 2 * sigmas)  # SD3's shift 3
  rng = np.random.default_rng(5)
  z0 = rng.normal(size=(2, 3, 3, 1))
  target = rng.normal(size=(2, 3, 3, 1))

  def v_np(x, sigma):
    return np.tanh(x) - target + 0.3 * sigma * x

  def v_jax(p, x, sigma, context, class_labels=None):
    return jnp.tanh(x) - p + 0.3 * sigma[:, None, None, None] * x
  ref = _reference_dpm2(v_np, z0, sigmas)
  latents, next_latents = dynamics.dpm2_chain(
      v_jax, jnp.asarray(target, jnp.float32), jnp.asarray(z0, jnp.float32), None, None,
      sigmas=sigmas.astype(np.float32), guidance_scale=1.0)
  for i in range(num_steps):
    np.testing.assert_allclose(np.asarray(latents[i]), ref[i], atol=1e-5)
    np.testing.assert_allclose(np.asarray(next_latents[i]), ref[i + 1], atol=1e-5)
  if num_steps == 10:
    euler = z0
    for i in range(num_steps):
      euler = euler + (sigmas[i + 1] - sigmas[i]) * v_np(euler, sigmas[i])
    assert np.abs(euler - ref[-1]).max() > 1e-3


def test_dpm2_sampler_is_nft_only(digits_cache):
  """'dpm2' (no log-probabilities) is refused for PPO before compiling and runs with NFT."""
  config = load_config("digits_flow", "runlocal", **{"sample.sampler": "dpm2"})
  with pytest.raises(ValueError, match="'dpm2' has no step log-probabilities"):
    train.validate_config(config, parallel.make_mesh())
  config = load_config("digits_flow", "nft,runlocal", **{"sample.sampler": "dpm2"})
  train.validate_config(config, parallel.make_mesh())
  _, _, state, metrics = one_update(config, lr=0.0)  # samples with it and trains on them
  assert np.isfinite(metrics["loss"]) and metrics["nft_old_deviation"] == 0.0
