"""Tests of ddpo_jax.numerics.rl on hand-computed cases (docs/algorithms.md §2–§3)."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpo_jax.numerics import rl

# ----------------------------------------------------------------------------- stat tracker


def test_stat_tracker_hand_computed():
  tr = rl.PerPromptStatTracker(buffer_size=3, min_count=2)
  # Batch 1: "a" has 2 rewards (>= min_count: its own stats, mean 2, std 1);
  # "b" has 1 (< min_count: whole-batch stats, mean 3, std sqrt(8/3)).
  adv = tr.update(["a", "a", "b"], np.array([1.0, 3.0, 5.0]))
  np.testing.assert_allclose(adv, [-1 / (1 + 1e-6), 1 / (1 + 1e-6),
                                   2 / (math.sqrt(8 / 3) + 1e-6)], rtol=1e-12)
  # Batch 2: b = [5, 7] -> mean 6, std 1; a = [1, 3, 9] -> mean 13/3, std sqrt(312/27).
  adv = tr.update(["b", "a"], np.array([7.0, 9.0]))
  np.testing.assert_allclose(adv, [1 / (1 + 1e-6), (9 - 13 / 3) / (math.sqrt(312 / 27) + 1e-6)],
                             rtol=1e-12)
  # Batch 3: eviction at buffer_size 3: a = [3, 9, 0] -> mean 4, std sqrt(14).
  adv = tr.update(["a"], np.array([0.0]))
  np.testing.assert_allclose(adv, [-4 / (math.sqrt(14) + 1e-6)], rtol=1e-12)
  assert list(tr.stats["a"]) == [3.0, 9.0, 0.0]
  stats = tr.get_stats()
  assert stats["a"] == {"mean": 4.0, "std": pytest.approx(math.sqrt(14)), "count": 3}
  assert stats["b"]["count"] == 2 and stats["b"]["mean"] == 6.0


def test_stat_tracker_batch_stats_until_min_count():
  tr = rl.PerPromptStatTracker(buffer_size=16, min_count=16)
  prompts = ["x", "y", "x", "z"]
  r = np.array([1.0, 2.0, 4.0, 9.0], np.float32)
  adv = tr.update(prompts, r)
  # All buffers below min_count: every advantage uses the batch's mean 4, std sqrt(9.5).
  np.testing.assert_allclose(adv, (r.astype(np.float64) - 4.0) / (math.sqrt(9.5) + 1e-6),
                             rtol=1e-12)
  assert adv.dtype == np.float64
  # return_scale: the same advantages and each sample's factor 1 / (std + 1e-6); the tracker
  # is fed the batch again, so the buffers ("x" now 4 rewards) still sit below min_count.
  adv2, scales = tr.update(prompts, r, return_scale=True)
  np.testing.assert_array_equal(adv2, adv)
  np.testing.assert_allclose(scales, 1.0 / (math.sqrt(9.5) + 1e-6), rtol=1e-12)


def test_kl_penalised_advantages_against_a_loop():
  """A_i = A − α · scale · Σ_{j>i} KL_j, checked against a plain Python loop."""
  rng = np.random.default_rng(1)
  adv, scales, kl = rng.standard_normal(3), rng.uniform(0.5, 2, 3), rng.uniform(0, 1, (3, 5))
  expected = np.array([[adv[b] - 0.7 * scales[b] * sum(kl[b, j] for j in range(i + 1, 5))
                        for i in range(5)] for b in range(3)])
  out = rl.kl_penalised_advantages(jnp.asarray(adv), jnp.asarray(scales), jnp.asarray(kl), 0.7)
  assert out.shape == (3, 5) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out[:, -1], adv, rtol=1e-6)  # nothing follows the last step


def test_stat_tracker_state_dict_round_trip():
  rng = np.random.default_rng(0)
  prompts = ["cat", "dog", "a cat", "dog"]
  tr = rl.PerPromptStatTracker(buffer_size=5, min_count=3)
  for _ in range(3):
    tr.update(prompts, rng.standard_normal(4).astype(np.float32))
  state = json.loads(json.dumps(tr.state_dict()))
  tr2 = rl.PerPromptStatTracker(buffer_size=5, min_count=3)
  tr2.load_state_dict(state)
  assert tr2.state_dict() == tr.state_dict()
  assert tr2.get_stats() == tr.get_stats()
  for _ in range(3):
    r = rng.standard_normal(4).astype(np.float32)
    np.testing.assert_array_equal(tr.update(prompts, r), tr2.update(prompts, r))
  assert tr2.state_dict() == tr.state_dict()


def test_normalize_advantages():
  r = np.array([1.0, 2.0, 3.0, 4.0])
  expected = (r - 2.5) / (math.sqrt(1.25) + 1e-8)
  np.testing.assert_allclose(rl.normalize_advantages(r), expected, rtol=1e-12)
  np.testing.assert_allclose(rl.normalize_advantages(jnp.asarray(r, jnp.float32)), expected,
                             rtol=1e-6)
  adv, scales = rl.normalize_advantages(r, return_scale=True)
  np.testing.assert_array_equal(adv, rl.normalize_advantages(r))
  np.testing.assert_allclose(scales, np.full(4, 1.0 / (math.sqrt(1.25) + 1e-8)), rtol=1e-12)


# ----------------------------------------------------------------------------- losses

# ratios and advantages of six hand-computed cases (clip_range 0.2, adv_clip_max 2)
RATIOS = np.array([1.1, 1.5, 1.5, 0.5, 0.5, 0.9])
ADVS = np.array([1.0, 1.0, -1.0, -1.0, 3.0, -5.0])
# per-sample max(-A_c r, -A_c clip(r, 0.8, 1.2)):
#  1.1, A 1:  max(-1.1, -1.1) = -1.1   (inside the clip range)
#  1.5, A 1:  max(-1.5, -1.2) = -1.2   (clipped, positive advantage)
#  1.5, A -1: max( 1.5,  1.2) =  1.5   (ratio above range, negative advantage: not clipped)
#  0.5, A -1: max( 0.5,  0.8) =  0.8   (clipped, negative advantage)
#  0.5, A 3 -> 2: max(-1.0, -1.6) = -1.0 (ratio below range, positive adv: not clipped)
#  0.9, A -5 -> -2: max(1.8, 1.8) = 1.8 (advantage clipping)
PER_SAMPLE = np.array([-1.1, -1.2, 1.5, 0.8, -1.0, 1.8])
# d(per-sample)/d(log_prob) = -A_c * ratio where the unclipped branch is active, else 0
GRAD = np.array([-1.1, 0.0, 1.5, 0.0, -1.0, 1.8]) / 6


def test_ppo_clipped_loss_hand_computed():
  old = jnp.asarray([-1.0, -2.0, 0.5, -0.3, 1.0, -4.0], jnp.float32)
  lp = old + jnp.log(jnp.asarray(RATIOS, jnp.float32))
  loss, info = rl.ppo_clipped_loss(lp, old, jnp.asarray(ADVS, jnp.float32), 0.2, 2.0)
  assert loss.shape == ()
  np.testing.assert_allclose(loss, PER_SAMPLE.mean(), rtol=1e-5)
  np.testing.assert_allclose(info["clipfrac"], 4 / 6, rtol=1e-6)
  np.testing.assert_allclose(info["approx_kl"], 0.5 * np.mean(np.log(RATIOS) ** 2), rtol=1e-5)
  np.testing.assert_allclose(info["ratio"], RATIOS.mean(), rtol=1e-5)
  g = jax.grad(lambda l: rl.ppo_clipped_loss(l, old, jnp.asarray(ADVS), 0.2, 2.0)[0])(lp)
  np.testing.assert_allclose(g, GRAD, rtol=1e-5, atol=1e-7)


def test_ppo_loss_at_ratio_one_is_minus_mean_advantage():
  lp = jnp.array([0.1, -0.2, 0.3])
  adv = jnp.array([1.0, -20.0, 0.5])
  loss, info = rl.ppo_clipped_loss(lp, lp, adv, 1e-4, 5.0)
  np.testing.assert_allclose(loss, -(1.0 - 5.0 + 0.5) / 3, rtol=1e-6)
  assert float(info["approx_kl"]) == 0.0 and float(info["clipfrac"]) == 0.0
  # the gradient at ratio 1 is the score-function gradient -A_c / B
  g = jax.grad(lambda l: rl.ppo_clipped_loss(l, lp, adv, 1e-4, 5.0)[0])(lp)
  np.testing.assert_allclose(g, -np.array([1.0, -5.0, 0.5]) / 3, rtol=1e-5)


def test_score_function_loss():
  lp = jnp.array([-1.0, 2.0, 0.5, 3.0])
  adv = jnp.array([1.0, -2.0, 12.0, -0.5])
  a_c = np.array([1.0, -2.0, 10.0, -0.5])
  loss = rl.score_function_loss(lp, adv, 10.0)
  np.testing.assert_allclose(loss, -np.mean(a_c * np.asarray(lp)), rtol=1e-6)
  g = jax.grad(lambda l: rl.score_function_loss(l, adv, 10.0))(lp)
  np.testing.assert_allclose(g, -a_c / 4, rtol=1e-6)


def test_rwr_weights():
  r = jnp.array([0.0, 1.0, 2.0])
  w = rl.rwr_weights(r, 0.5)
  e = np.exp(np.array([0.0, 2.0, 4.0]))
  np.testing.assert_allclose(w, 3 * e / e.sum(), rtol=1e-6)
  np.testing.assert_allclose(float(w.sum()), 3.0, rtol=1e-6)
  # numerically stable for large rewards
  w = rl.rwr_weights(jnp.array([1000.0, 1000.0, 990.0]), 1.0)
  assert np.isfinite(np.asarray(w)).all()
  np.testing.assert_allclose(w[0], w[1], rtol=1e-6)


def test_rwr_sparse_weights():
  """Kept samples weigh B / k (the mean over the kept samples, as the original's filtered
  dataset): the weights average to 1 whatever fraction is kept."""
  r = jnp.array([5.0, 1.0, 4.0, 2.0, 3.0])
  np.testing.assert_allclose(rl.rwr_sparse_weights(r, 0.6), [2.5, 0, 2.5, 0, 0], rtol=1e-6)  # q = 3.4
  np.testing.assert_allclose(rl.rwr_sparse_weights(r, 0.5), [5 / 3, 0, 5 / 3, 0, 5 / 3], rtol=1e-6)
  np.testing.assert_allclose(rl.rwr_sparse_weights(r, 0.0), [1, 1, 1, 1, 1], rtol=1e-6)
  np.testing.assert_allclose(rl.rwr_sparse_weights(r, 1.0), [5, 0, 0, 0, 0], rtol=1e-6)


def _prompt_linear_policy():
  """A denoiser whose eps depends on the prompt: eps = a·x + b·mean(context), context a
  per-prompt constant (prompt i -> i + 1, "" -> 0), 2x2x1 latents."""
  from ddpo_jax.pipelines.denoiser import Denoiser
  from ddpo_jax.pipelines.policy import Policy
  scheduler = {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
               "num_train_timesteps": 1000, "steps_offset": 1, "set_alpha_to_one": False,
               "prediction_type": "epsilon"}
  prompts = ["", "p1", "p2"]

  def network(p, x, t, context, labels, added_time_emb):
    return p["a"] * x + p["b"] * jnp.mean(context, axis=(1, 2))[:, None, None, None]

  return Policy(
      params={"unet": {"a": jnp.float32(0.3), "b": jnp.float32(0.7)}},
      denoiser=Denoiser(prediction="eps", network=network, latent_shape=(2, 2, 1),
                        scheduler_config=scheduler),
      tokenize=lambda ps: np.asarray([[prompts.index(q)] for q in ps], np.int32),
      encode_prompts=lambda p, ids: ids[..., None].astype(jnp.float32),
      decode=lambda p, x0: jnp.clip(x0 / 2 + 0.5, 0, 1),
      prompt_fn=lambda rng, n: [prompts[1 + int(i)] for i in rng.integers(0, 2, n)],
      prompt_metadata=lambda ps: {})


@pytest.mark.parametrize("algorithm", ["rwr", "rwr_sparse"])
def test_rwr_regresses_the_guided_eps_with_train_cfg(algorithm):
  """With train.cfg (the original's `train_cfg`) RWR's denoising target is the guided eps:
  its loss equals that of train.cfg=False on a policy whose eps IS the guided one (same keys,
  so the same noise), and differs from the unguided loss."""
  import dataclasses
  from ddpo_jax.algorithms import train
  from ddpo_jax.numerics import diffusion, parallel
  from helpers import load_config
  policy = _prompt_linear_policy()
  w = 5.0

  def guided(p, x, t, context, labels, added_time_emb):
    uncond = jnp.zeros((1,) + context.shape[1:])
    return diffusion.guided_eps(policy.denoiser, p, x, t, context, uncond, w, labels)

  losses = {}
  for name, pol, cfg in (("cfg", policy, True), ("guided_eps", dataclasses.replace(policy, denoiser=policy.denoiser.wrap(guided)), False),
                         ("unguided", policy, False)):
    config = load_config("default", "runlocal", **{
        "train.algorithm": algorithm, "train.cfg": cfg, "sample.guidance_scale": w,
        "sample.batch_size": 8, "train.batch_size": 8, "train.learning_rate": 0.0})
    mesh = parallel.make_mesh()
    opt = train.make_optimizer(config.train)
    frozen = train.frozen_params(pol, config)
    ids = jnp.asarray(pol.tokenize(pol.prompt_fn(np.random.default_rng(0), 8)))
    traj, _, _ = train.make_sample_fn(policy, config, [], mesh)(
        policy.params["unet"], frozen, jax.random.PRNGKey(0), ids, {})
    state = train.TrainState(step=jnp.zeros((), jnp.int32), params=jax.tree.map(jnp.copy, pol.params["unet"]),
                             opt_state=opt.init(pol.params["unet"]), rng=jax.random.PRNGKey(0))
    rewards = jnp.arange(8, dtype=jnp.float32)
    _, metrics = train.make_update_fn(pol, config, opt, mesh)(
        state, frozen, traj, jnp.zeros(8), jnp.ones(8), rewards, jax.random.PRNGKey(1))
    losses[name] = float(metrics["loss"])
  np.testing.assert_allclose(losses["cfg"], losses["guided_eps"], rtol=1e-5)
  assert abs(losses["cfg"] - losses["unguided"]) > 1e-2 * abs(losses["unguided"]), losses


def test_ppo_clipfrac_with_ddpo_clip_range():
  ratios = np.array([1.00005, 1.0002, 0.9998, 0.99995, 1.0, 1.3])
  old = jnp.zeros(6)
  _, info = rl.ppo_clipped_loss(jnp.log(jnp.asarray(ratios, jnp.float32)), old, jnp.ones(6),
                                1e-4, 5.0)
  np.testing.assert_allclose(info["clipfrac"], 3 / 6, rtol=1e-6)
  np.testing.assert_allclose(info["ratio"], ratios.mean(), rtol=1e-6)


# ----------------------------------------------------------------------------- GRPO groups


def test_group_relative_advantages_hand_computed():
  """Two groups of 3: [1, 2, 6] (mean 3, population std sqrt(14/3)) and [4, 4, 4] (std 0:
  advantages 0, not NaN); global std over all six rewards; NumPy and jitted JAX agree."""
  r = np.array([1.0, 2.0, 6.0, 4.0, 4.0, 4.0])
  adv = rl.group_relative_advantages(r, 3)
  s = math.sqrt(14 / 3)
  np.testing.assert_allclose(adv, [-2 / (s + 1e-4), -1 / (s + 1e-4), 3 / (s + 1e-4), 0, 0, 0],
                             rtol=1e-12)
  g = float(np.std(r))
  np.testing.assert_allclose(rl.group_relative_advantages(r, 3, std="global"),
                             [-2 / (g + 1e-4), -1 / (g + 1e-4), 3 / (g + 1e-4), 0, 0, 0],
                             rtol=1e-12)
  jitted = jax.jit(lambda x: rl.group_relative_advantages(x, 3))(jnp.asarray(r, jnp.float32))
  np.testing.assert_allclose(np.asarray(jitted), adv, rtol=1e-6, atol=1e-6)


def test_advantages_is_the_one_entry_point_of_the_three_normalisations():
  """`rl.advantages`: group-relative with group_size > 1, the tracker's with per_prompt, else
  whole-batch; each exactly the function it dispatches to, (advantages, scales) float64."""
  r = np.array([1.0, 2.0, 6.0, 4.0, 4.0, 3.0], np.float32)
  prompts = ["a", "a", "a", "b", "b", "b"]
  grouped = rl.advantages(r, prompts, rl.AdvantageSettings(group_size=3, group_std="global"))
  for got, want in zip(grouped, rl.group_relative_advantages(r, 3, std="global",
                                                             return_scale=True)):
    np.testing.assert_array_equal(got, want)
  tracker, same = rl.PerPromptStatTracker(4, 2), rl.PerPromptStatTracker(4, 2)
  tracked = rl.advantages(r, prompts, rl.AdvantageSettings(per_prompt=True), tracker)
  for got, want in zip(tracked, same.update(prompts, r, return_scale=True)):
    np.testing.assert_array_equal(got, want)
  assert tracker.state_dict() == same.state_dict()
  whole = rl.advantages(r, None, rl.AdvantageSettings())
  for got, want in zip(whole, rl.normalize_advantages(r, return_scale=True)):
    np.testing.assert_array_equal(got, want)
    assert got.dtype == np.float64
  with pytest.raises(ValueError, match="need the run's PerPromptStatTracker"):
    rl.advantages(r, prompts, rl.AdvantageSettings(per_prompt=True))


def test_group_relative_advantages_bad_input():
  with pytest.raises(ValueError, match=r"multiple of group_size=4"):
    rl.group_relative_advantages(np.zeros(6), 4)
  with pytest.raises(ValueError, match="group_size=1"):
    rl.group_relative_advantages(np.zeros(6), 1)
  with pytest.raises(ValueError, match="std='batch'"):
    rl.group_relative_advantages(np.zeros(6), 3, std="batch")
