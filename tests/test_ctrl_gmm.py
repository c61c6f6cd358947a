"""CTRL on a 2-D Gaussian mixture, where p(y | x) is exact (checks with known answers,
docs/algorithms.md §4.6).

The pre-trained model is the mixture's exact noise prediction; the augmented model adds a
control-embedding table feeding a small MLP whose last layer starts at zero, so at init it IS
the pre-trained model. With α = 1 (exact, summed KL) and reward log p(y | x_0), CTRL's soft
optimum is p_pre(x) p(y | x) / Z: the pre-trained sampler's output reweighted by p(y | x).
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ddpo_jax.algorithms import train
from ddpo_jax.config_schema import new_config
from ddpo_jax.ctrl import controls as ctrl_controls, policy as ctrl_policy
from ddpo_jax.numerics import diffusion, parallel, rl
from ddpo_jax.pipelines.denoiser import Denoiser
from ddpo_jax.pipelines.policy import Policy
from ddpo_jax.trainer import ctrl as trainer
from helpers import compile_optimized

MEANS = np.asarray([[-1.0, 0.0], [1.0, 0.5]], np.float32)
STDS = np.asarray([0.5, 0.7], np.float32)
WEIGHTS = np.asarray([0.6, 0.4], np.float32)
SCHEDULER = {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
             "num_train_timesteps": 1000, "steps_offset": 1, "set_alpha_to_one": False,
             "prediction_type": "epsilon"}
ALPHAS = diffusion.NoiseSchedule.from_config(SCHEDULER).alphas_cumprod
CONTROLS = [ctrl_controls.Control("component", 2, 1.0)]


def log_posterior(x):
  """log p(y | x) (N, 2) of the mixture's component y, for x (N, 2)."""
  d2 = ((x[:, None, :] - MEANS[None]) ** 2).sum(-1)
  log_joint = jnp.log(WEIGHTS) - d2 / (2 * STDS ** 2) - 2 * jnp.log(STDS)
  return jax.nn.log_softmax(log_joint, -1)


def exact_eps(x, t):
  """The mixture's exact noise prediction at x_t (N, 2), t (N,): −sqrt(1−ā) ∇ log p_t(x)."""
  a = ALPHAS[t][:, None, None]
  mean = jnp.sqrt(a) * MEANS[None]  # (N, K, 2)
  var = a * STDS[None, :, None] ** 2 + 1 - a  # (N, K, 1)
  log_comp = jnp.log(WEIGHTS) - (((x[:, None] - mean) ** 2) / (2 * var)).sum(-1) - jnp.log(var[..., 0])
  r = jax.nn.softmax(log_comp, -1)[..., None]
  score = (r * -(x[:, None] - mean) / var).sum(1)
  return -jnp.sqrt(1 - ALPHAS[t])[:, None] * score


class Correction(nn.Module):
  """g(x, t, e): the trainable part; zero output at init (last layer zero-initialised)."""
  @nn.compact
  def __call__(self, x, t, e):
    f = jnp.concatenate([x, jnp.sin(t[:, None] / 1000.0 * jnp.arange(1, 5) * np.pi),
                         jnp.cos(t[:, None] / 1000.0 * jnp.arange(1, 5) * np.pi), e], -1)
    h = nn.silu(nn.Dense(128)(f))
    h = nn.silu(nn.Dense(128)(h))
    return nn.Dense(2, kernel_init=nn.initializers.zeros)(h)


def gmm_policy(dim=8):
  corr = Correction()
  params = corr.init(jax.random.PRNGKey(1), jnp.zeros((1, 2)), jnp.zeros((1,)), jnp.zeros((1, dim)))

  def network(p, x, t, context, labels, added_time_emb):
    emb = ctrl_policy.control_embedding(p["control"], labels, CONTROLS)
    flat = x.reshape(x.shape[0], 2)
    return (exact_eps(flat, t) + corr.apply(p["net"], flat, t.astype(jnp.float32), emb)).reshape(x.shape)

  def decode(p, x0):
    return x0  # the "image" is the 2-D point itself, (N, 1, 1, 2)

  trainable = {"control": ctrl_policy.init_control_tables(CONTROLS, dim), "net": params}
  denoiser = Denoiser(prediction="eps", network=network, latent_shape=(1, 1, 2),
                      scheduler_config=SCHEDULER, time_embed_dim=dim, labels_key="control_label")
  return Policy(params={"unet": trainable}, denoiser=denoiser,
                tokenize=lambda c: np.zeros((len(c), 1), np.int32),
                encode_prompts=lambda p, ids: jnp.zeros(ids.shape + (1,)), decode=decode,
                prompt_fn=None, prompt_metadata=None)


def gmm_config(num_steps):
  config = new_config("ctrl", "digits")
  config.sample.num_steps = num_steps
  config.sample.eta = 1.0
  config.sample.guidance_scale = 1.0
  config.ctrl.kl_weight = 1.0
  config.ctrl.reward_weight = 1.0
  config.ctrl.kl_reduction = "sum"
  config.ctrl.truncation = "none"
  return config


def reward_fn(images, ids, metadata):
  lp = log_posterior(images.reshape(images.shape[0], 2))
  return jnp.take_along_axis(lp, metadata["control_label"][:, :1], -1)[:, 0], {}


def sample(policy, params, key, labels, num_steps):
  sched = diffusion.NoiseSchedule.from_config(SCHEDULER)
  ts, prev = sched.ddim_timesteps(num_steps)

  def final(params, key, labels):
    ctx = jnp.zeros((len(labels), 1, 1))
    return diffusion.sample_trajectory(
        policy.denoiser, params, key, ctx, None, alphas_cumprod=ALPHAS, timesteps=ts,
        prev_timesteps=prev, latent_shape=(1, 1, 2), eta=1.0, guidance_scale=1.0,
        class_labels=labels, final_alpha_cumprod=sched.final_alpha_cumprod).final_latents

  return np.asarray(compile_optimized(final, params, key, labels)(params, key, labels)).reshape(-1, 2)


def test_init_is_pretrained_and_kl_zero():
  """At init: KL exactly 0 and samples identical to the pre-trained sampler for the same key."""
  policy, T = gmm_policy(), 10
  p0 = policy.params["unet"]
  labels = jnp.asarray(np.random.default_rng(0).integers(0, 2, (64, 1)), jnp.int32)
  pre = dataclasses.replace(policy, denoiser=policy.denoiser.wrap(
      lambda p, x, t, c, y, added_time_emb: exact_eps(x.reshape(-1, 2), t).reshape(x.shape)))
  key = jax.random.PRNGKey(3)
  np.testing.assert_array_equal(sample(policy, p0, key, labels, T), sample(pre, p0, key, labels, T))
  loss_fn = trainer.make_backprop_loss(policy, gmm_config(T), reward_fn)
  _, metrics = loss_fn(p0, {"reference_unet": p0}, key, jnp.zeros((64, 1), jnp.int32), labels)
  assert float(metrics["kl_to_pretrained"]) == 0.0


@pytest.mark.slow  # 1500 optimizer steps and 40k reference chains; CTRL's fast checks on the
# mixture: test_init_is_pretrained_and_kl_zero (and the digits runs in tests/test_ctrl.py)
@pytest.mark.parametrize("num_steps", [25])
def test_alpha_one_matches_reweighted_pretrained_sampler(num_steps):
  """α = 1: per-component mean and std of CTRL samples match the pre-trained sampler's samples
  reweighted by p(y | x), within 0.1 (means) and 12% (stds), for both components."""
  policy = gmm_policy()
  config = gmm_config(num_steps)
  p0 = policy.params["unet"]
  loss_fn = trainer.make_backprop_loss(policy, config, reward_fn)
  config.train.control_learning_rate = 3e-2
  config.train.learning_rate = 3e-3
  config.train.max_grad_norm = 5.0
  opt = train.make_optimizer(config.train, {"control": config.train.control_learning_rate})
  frozen = {"reference_unet": p0}
  B = 256

  def step_fn(params, opt_state, key):
    k_lab, k = jax.random.split(key)
    labels = jax.random.randint(k_lab, (B, 1), 0, 2)
    grads, m = jax.grad(loss_fn, has_aux=True)(params, frozen, k, jnp.zeros((B, 1), jnp.int32), labels)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, m

  params, opt_state = p0, opt.init(p0)
  step = compile_optimized(step_fn, params, opt_state, jax.random.PRNGKey(0))  # runs 1500 times
  for i in range(1500):
    params, opt_state, m = step(params, opt_state, jax.random.PRNGKey(100 + i))
  # Reference: the pre-trained DDIM sampler (same T), importance-weighted by p(y | x).
  n = 40000
  pre_x = sample(policy, p0, jax.random.PRNGKey(7), jnp.zeros((n, 1), jnp.int32), num_steps)
  post = np.exp(np.asarray(log_posterior(jnp.asarray(pre_x))))
  for y in range(2):
    w = post[:, y] / post[:, y].sum()
    ref_mean = (w[:, None] * pre_x).sum(0)
    ref_std = np.sqrt((w[:, None] * (pre_x - ref_mean) ** 2).sum(0))
    x = sample(policy, params, jax.random.PRNGKey(11 + y), jnp.full((8000, 1), y, jnp.int32), num_steps)
    print(f"y={y}: CTRL mean {x.mean(0)} std {x.std(0)}; reference mean {ref_mean} std {ref_std}")
    np.testing.assert_allclose(x.mean(0), ref_mean, atol=0.1)
    np.testing.assert_allclose(x.std(0), ref_std, rtol=0.12)


def _flat(tree):
  return jnp.concatenate([x.ravel() for x in jax.tree.leaves(tree)])


@pytest.mark.slow  # 131k chains per side; the KL penalty is checked fast in tests/test_rl.py
# (test_kl_penalised_advantages_against_a_loop) and tests/test_diffusion.py (test_kl_shared_std)
def test_ppo_route_gradient_is_the_exact_kl_regularised_gradient():
  """The DDPO (PPO) solver's KL penalty is exact: at the sampling params, the update's
  gradient × T · D / scale equals the gradient of E[log p(y | x_0)] − α E[Σ_t KL_t] (α = 1,
  summed KL) obtained by backpropagating through the whole chain (`make_backprop_loss`), within
  2% relative L2 over all params (Monte Carlo: 131k chains per side; measured 0.3%). Without
  the later steps' KL in each step's return (the direct term alone) it is off by > 5%
  (measured 7.3%), so the check tells the two apart."""
  T, n, reps = 10, 65536, 2
  policy = gmm_policy()
  p0 = policy.params["unet"]
  k_net, k_tab = jax.random.split(jax.random.PRNGKey(5))
  theta = jax.tree.map(jnp.copy, p0)  # a policy away from the pre-trained one
  layers = theta["net"]["params"]
  last = sorted(layers)[-1]  # the zero-initialised output layer
  layers[last]["kernel"] = 0.05 * jax.random.normal(k_net, layers[last]["kernel"].shape)
  theta["control"] = jax.tree.map(lambda x: x + 0.5 * jax.random.normal(k_tab, x.shape),
                                  theta["control"])
  config = gmm_config(T)
  ids = jnp.zeros((n, 1), jnp.int32)

  def labels(key):
    return jax.random.randint(jax.random.fold_in(key, 1), (n, 1), 0, 2)

  grad_bp = jax.jit(jax.grad(trainer.make_backprop_loss(policy, config, reward_fn), has_aux=True))
  exact = sum(_flat(grad_bp(theta, {"reference_unet": p0}, k, ids, labels(k))[0])
              for k in jax.random.split(jax.random.PRNGKey(1000), reps)) / reps

  tc = config.train
  tc.algorithm, tc.kl_coef, tc.kl_reduction = "ppo", 1.0, "sum"
  tc.timestep_fraction, tc.adv_clip_max, tc.clip_range, tc.cfg = 1.0, 1e9, 0.2, False
  config.sample.batch_size = tc.batch_size = n
  mesh = parallel.make_mesh()
  sample_fn = train.make_sample_fn(policy, config, [], mesh)
  sgd = optax.sgd(1.0)  # new params = params − gradient
  update_fn = train.make_update_fn(policy, config, sgd, mesh)
  frozen = train.frozen_params(policy, config)
  dims = int(np.prod(policy.denoiser.latent_shape))

  def ppo_gradient(key, kl_in_return):
    metadata = {"control_label": labels(key)}
    traj, images, _ = sample_fn(theta, frozen, key, ids, metadata)
    if not kl_in_return:
      traj = traj.replace(kl=jnp.zeros_like(traj.kl))
    r = np.asarray(reward_fn(images, ids, metadata)[0])
    adv, scales = (jnp.asarray(a, jnp.float32) for a in rl.normalize_advantages(r, return_scale=True))
    state = train.TrainState(step=jnp.zeros((), jnp.int32), params=jax.tree.map(jnp.copy, theta),
                             opt_state=sgd.init(theta), rng=key)
    new, _ = update_fn(state, frozen, traj, adv, scales, jnp.asarray(r), jax.random.fold_in(key, 2))
    return (_flat(theta) - _flat(new.params)) * T * dims / scales[0]

  keys = jax.random.split(jax.random.PRNGKey(50), reps)
  errors = {}
  for kl_in_return in (True, False):
    estimate = sum(ppo_gradient(k, kl_in_return) for k in keys) / reps
    errors[kl_in_return] = float(jnp.linalg.norm(estimate - exact) / jnp.linalg.norm(exact))
  print(f"relative L2 error: exact estimator {errors[True]:.4f}, direct KL term only {errors[False]:.4f}")
  assert errors[True] < 0.02
  assert errors[False] > 0.05
