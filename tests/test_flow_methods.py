"""The flow-matching methods beside Flow-GRPO: per-sample SDE windows (MixGRPO,
Flow-GRPO-Fast), the shared noise of Fast's groups, DiffusionNFT's loss against NumPy, the
rectified-flow digits MMDiT, and ddpo_jax/configs/digits_flow.py with its variants through the one
training core, plus the bad combinations refused before anything compiles."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpo_jax import algorithms
from ddpo_jax.algorithms import train
from ddpo_jax.algorithms.base import StepModel
from ddpo_jax.numerics import flow, parallel
from ddpo_jax.pipelines import digits
from ddpo_jax.tasks import dynamics
from ddpo_jax.trainer import loop
from ddpo_jax.trainer.sample import sample_from_checkpoint
from helpers import load_config, one_update
from test_flow_sde import A, _toy_velocity  # noise level 0.7, a nonlinear stand-in velocity


def test_per_sample_sde_masks_equal_one_chain_per_sample():
  """A (T, B) mask runs each sample with its own window: sample b's latents, log-probs and
  stds are those of the same batch run with sample b's mask as a (T,) mask for all (same keys,
  so the same noise rows), to float32 rounding; its log-probs are nonzero exactly on its
  window."""
  sigmas, _ = flow.FlowSchedule(shift=3.0).sigmas(5)
  x = jax.random.normal(jax.random.PRNGKey(1), (3, 4, 4, 1))
  masks = np.array([[1, 1, 0, 0, 0], [0, 0, 1, 1, 0], [1, 1, 1, 1, 1]], bool)  # (B, T)
  keys = jax.random.split(jax.random.PRNGKey(2), 5)

  def chain(x, mask):
    return flow.flow_chain(_toy_velocity, None, x, keys, None, None, sigmas=sigmas,
                           guidance_scale=1.0, sde_type="sde", noise_level=A, sde_steps=mask)
  _, out = chain(x, masks.T)
  assert out["std"].shape == (5, 3, 1, 1, 1)
  for b in range(3):
    _, alone = chain(x, masks[b])
    for name in ("latents", "next_latents", "log_probs"):
      np.testing.assert_allclose(np.asarray(out[name][:, b]), np.asarray(alone[name][:, b]),
                                 rtol=0, atol=1e-6, err_msg=f"{name} of sample {b}")
    np.testing.assert_allclose(np.asarray(out["std"][:, b, 0, 0, 0]),
                               np.asarray(alone["std"]).reshape(5),
                               rtol=0, atol=1e-7)
    assert np.all((np.asarray(out["log_probs"][:, b]) != 0) == masks[b])
  with pytest.raises(ValueError, match=r"or \(T, B\) = \(5, 3\)"):
    chain(x, masks)  # (B, T): transposed


def test_chain_kl_to_a_reference_model():
  """With reference params the chain's KL_t is ||mean − mean_ref||² / (2 std²) of the two
  models' steps at the sampled x_t (mean over the latent dims), recomputed here with
  `flow.step_mean_std` (1e-5 relative); 0 on the ODE steps outside the window."""
  sigmas, _ = flow.FlowSchedule(shift=3.0).sigmas(5)
  x = jax.random.normal(jax.random.PRNGKey(1), (3, 4, 4, 1))
  window = np.array([1, 1, 1, 0, 0], bool)

  def velocity(p, x, t, context, labels=None):
    return p * _toy_velocity(None, x, t, context)
  _, out = flow.flow_chain(velocity, 1.0, x, jax.random.split(jax.random.PRNGKey(2), 5), None,
                           None, sigmas=sigmas, guidance_scale=1.0,
                           sde_type="sde", noise_level=A, sde_steps=window,
                           reference_params=0.8)
  for i in range(5):
    xi = out["latents"][i]
    t = jnp.full((3,), sigmas[i])
    means = [flow.step_mean_std(velocity(p, xi, t, None), xi, sigmas[i], sigmas[i + 1],
                                sde_type="sde", noise_level=A, sigma_max=sigmas[1]) for p in (1.0, 0.8)]
    if not window[i]:
      assert float(jnp.abs(out["kl"][i]).max()) == 0.0
      continue
    (m, std), (m_ref, _) = means
    expected = np.mean(np.asarray((m - m_ref) ** 2 / (2 * std ** 2)), axis=(1, 2, 3))
    np.testing.assert_allclose(np.asarray(out["kl"][i]), expected, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out["reference_means"][i]), np.asarray(m_ref),
                               rtol=0, atol=1e-6)
    assert expected.min() > 0


def test_flow_grpo_kl_penalty_at_init():
  """train.kl_coef > 0 on the flow SDE: the sampler runs the pre-trained model too; at the
  sampling params the policy is the reference, so the KL is 0 and the ratio 1 (to float error:
  the sampler and the update are two programs)."""
  config = load_config("digits_flow", "runlocal", **{"train.kl_coef": 0.1})
  _, frozen, _, metrics = one_update(config, lr=0.0)
  assert "reference_unet" in frozen
  assert metrics["approx_kl"] < 1e-10 and metrics["kl_to_pretrained"] < 1e-10, metrics
  assert metrics["path_kl"] < 1e-10


def _sample_config(**changes):
  config = load_config("digits_flow", "runlocal")
  for k, v in changes.items():
    config.sample[k] = v
  return config.sample


def test_window_schedules():
  """MixGRPO's window moves one step every `sde_window_shift_every` epochs from step 0 inside
  [0, T - 2) and then rolls back;
  Fast's is drawn per (seed, epoch, batch) inside `sde_window_range`, the same on every call."""
  s = _sample_config(num_steps=6, sde_window_size=2, sde_window_schedule="sliding",
                     sde_window_shift_every=2)
  starts = [int(np.argmax(dynamics.sde_window_steps(s, 0, e, 0))) for e in range(12)]
  assert starts == [0, 0, 1, 1, 2, 2, 0, 0, 1, 1, 2, 2]
  assert all(dynamics.sde_window_steps(s, 0, e, 0).sum() == 2 for e in range(12))
  s = _sample_config(num_steps=10, sde_window_size=2, sde_window_schedule="random",
                     sde_window_range=(0, 6))
  drawn = {int(np.argmax(dynamics.sde_window_steps(s, 3, e, b))) for e in range(40) for b in range(2)}
  assert drawn == {0, 1, 2, 3, 4}
  np.testing.assert_array_equal(dynamics.sde_window_steps(s, 3, 7, 1),
                                dynamics.sde_window_steps(s, 3, 7, 1))
  assert dynamics.sde_window_steps(_sample_config(), 0, 0, 0) is None
  assert dynamics.trained_steps_per_sample(s, 1.0) == 2
  assert dynamics.trained_steps_per_sample(_sample_config(num_steps=10), 0.5) == 5


def _nft_numpy(v, v_old, x0, eps, sigma, r, beta, c, fixed_weights=None):
  """(loss, the adaptive weights (w+, w-)); `fixed_weights` holds them at given values (the
  gradient treats them as constants)."""
  t = sigma[:, None, None, None]
  x_t = (1 - t) * x0 + t * eps
  total, weights = 0.0, []
  for i, (vi, weight) in enumerate(((beta * v + (1 - beta) * v_old, r),
                                    ((1 + beta) * v_old - beta * v, 1 - r))):
    x0_hat = x_t - t * vi
    w = np.maximum(np.abs(x0_hat - x0).mean(axis=(1, 2, 3)), 1e-5)
    w = w if fixed_weights is None else fixed_weights[i]
    weights.append(w)
    total = total + weight * ((x0_hat - x0) ** 2).mean(axis=(1, 2, 3)) / w
  return c * total.mean() / beta, weights


def test_nft_loss_matches_numpy():
  """DiffusionNFT's loss on a linear velocity model v = a x + b sigma against a float64 NumPy
  computation of docs/algorithms.md §6.6 (same noise), to 1e-5 relative; its gradient in a is
  that of the NumPy loss (central differences, 1e-3 relative)."""
  rng = np.random.default_rng(0)
  x0 = rng.uniform(-1, 1, (4, 2, 2, 1)).astype(np.float32)
  sigma = np.array([0.9, 0.6, 0.3, 0.1], np.float32)
  adv = np.array([2.0, -1.0, 7.0, 0.0], np.float32)
  config = load_config("digits_flow", "nft,runlocal", **{"train.nft_beta": 0.5})
  c = config.train.adv_clip_max
  r = np.clip(np.clip(adv, -c, c) / c / 2 + 0.5, 0, 1)

  def velocity(p, x, s, context):
    return p["a"] * x + p["b"] * s[:, None, None, None]
  old = {"a": jnp.float32(0.8), "b": jnp.float32(-0.2)}
  params = {"a": jnp.float32(1.1), "b": jnp.float32(0.3)}
  model = StepModel(None, None, velocity, old)
  nft = algorithms.get("nft")
  key = jax.random.PRNGKey(5)
  batch = {"x0": jnp.asarray(x0), "times": jnp.asarray(sigma), "context": None,
           "optimality": jnp.asarray(r)}
  loss, metrics = nft.loss(model, params, batch, key, nft.hyperparameters(config))
  eps = np.asarray(jax.random.normal(key, x0.shape, jnp.float32), np.float64)

  def ref(a, b, fixed_weights=None):
    t = sigma.astype(np.float64)[:, None, None, None]
    x_t = (1 - t) * x0 + t * eps
    return _nft_numpy(a * x_t + b * t, 0.8 * x_t - 0.2 * t, x0.astype(np.float64), eps,
                      sigma.astype(np.float64), r, 0.5, c, fixed_weights)
  value, weights = ref(1.1, 0.3)
  np.testing.assert_allclose(float(loss), value, rtol=1e-5)
  assert float(metrics["loss"]) == float(loss)
  grad = jax.grad(lambda p: nft.loss(model, p, batch, key, nft.hyperparameters(config))[0])(
      params)
  h = 1e-4  # the adaptive weights are constants of the gradient (stop-gradient)
  fd = (ref(1.1 + h, 0.3, weights)[0] - ref(1.1 - h, 0.3, weights)[0]) / (2 * h)
  np.testing.assert_allclose(float(grad["a"]), fd, rtol=1e-3)
  fd_b = (ref(1.1, 0.3 + h, weights)[0] - ref(1.1, 0.3 - h, weights)[0]) / (2 * h)
  np.testing.assert_allclose(float(grad["b"]), fd_b, rtol=1e-3)
  # r from the advantages, as batch_fields computes it
  per_step, per_sample, _ = nft.batch_fields(
      type("T", (), {"times": jnp.zeros((4, 3)), "next_latents": jnp.zeros((4, 3, 2, 2, 1))}),
      jnp.asarray(adv), None, None, nft.hyperparameters(config))
  np.testing.assert_allclose(np.asarray(per_sample["optimality"]), r, rtol=1e-6)


def test_digits_mmdit_is_a_flow_model():
  """The digits MMDiT: a velocity model on the rectified-flow schedule (sigmas from 1 to 0)."""
  config = load_config("digits_flow", "runlocal")
  policy = digits.make_policy(config)
  assert policy.denoiser.prediction == "velocity"
  sigmas = policy.denoiser.flow_sigmas(4)
  np.testing.assert_allclose(sigmas, [1.0, 0.667, 0.334, 0.001, 0.0], atol=1e-3)
  x = jnp.zeros((2,) + digits.IMAGE_SHAPE)
  ctx = policy.encode_prompts(policy.params, jnp.asarray(policy.tokenize(["", "a handwritten 3"])))
  # the denoiser takes sigma and calls the MMDiT at its own timestep 1000 sigma
  v = policy.denoiser(policy.params["unet"], x, jnp.full((2,), 0.5), ctx)
  assert v.shape == x.shape
  np.testing.assert_array_equal(
      v, policy.denoiser.network(policy.params["unet"], x, jnp.full((2,), 500.0), ctx, None, None))


@pytest.mark.parametrize("variant", ["mixgrpo", "fast", "nft"])
def test_update_at_init_for_each_method(variant):
  """At learning rate 0 the update reproduces the sampler's log-probs on the window's steps
  (approx_kl < 1e-10; an ODE step outside the window re-scored as an SDE step would give a
  log-prob far from the stored 0), Fast's groups share their initial noise, and NFT's
  loss is finite with the trained velocity equal to the sampler's (deviation 0)."""
  config = load_config("digits_flow", f"{variant},runlocal")
  policy, frozen, state, metrics = one_update(config, lr=0.0)
  assert np.isfinite(metrics["loss"]), metrics
  if variant == "nft":
    assert metrics["nft_old_deviation"] == 0.0
  else:
    assert metrics["approx_kl"] < 1e-10 and metrics["clipfrac"] == 0.0, metrics


def test_fast_groups_share_noise_and_branch_at_the_window():
  config = load_config("digits_flow", "fast,runlocal")
  policy = digits.make_policy(config)
  dyn = dynamics.make_dynamics(policy.denoiser, config.sample)
  assert dyn.noise_group_size == 2
  window = dynamics.sde_window_steps(config.sample, config.seed, 0, 0)
  n = config.sample.batch_size
  prompts = list(np.repeat(policy.prompt_fn(np.random.default_rng(0), n // 2), 2))
  ctx = policy.encode_prompts(policy.params, jnp.asarray(policy.tokenize(prompts)))
  traj = dyn.sample(policy.denoiser, policy.params["unet"], jax.random.PRNGKey(0), ctx,
                    policy.encode_uncond(policy.params), guidance_scale=1.0,
                    sde_steps=jnp.broadcast_to(jnp.asarray(window), (n,) + window.shape))
  first = int(np.argmax(window))
  lat = np.asarray(traj.latents)
  # the pair of a group is identical up to its first SDE step, different after it
  np.testing.assert_array_equal(lat[0::2, :first + 1], lat[1::2, :first + 1])
  assert np.abs(lat[0::2, first + 1:] - lat[1::2, first + 1:]).min() > 0
  np.testing.assert_array_equal(np.asarray(traj.trained_steps[0]), window)


BAD = [
    ({"sample.sampler": "ddim"}, "needs a 'eps'-predicting model; this one predicts 'velocity'"),
    ({"sample.sampler": "ode"}, "sample.sampler='ode' has no step log-probabilities"),
    ({"sample.sde_window_size": 9}, r"sample.sde_window_size=9 must lie in \[0, "),
    ({"sample.sde_window_size": 2, "sample.sde_window_range": (2, 3)},
     r"sde_window_range=\(2, 3\) must hold a window of 2"),
    ({"sample.sde_window_size": 2, "sample.sde_window_schedule": "sliding",
      "sample.sde_window_shift_every": 0}, "shift_every=0"),
    ({"sample.group_size": 3}, "sample.group_size=3 must divide"),
    ({"train.algorithm": "nft", "sample.guidance_scale": 2.0},
     "train.algorithm='nft' is CFG-free"),
    ({"train.algorithm": "nft", "train.nft_beta": 0.0}, r"train.nft_beta=0.0 is outside its valid range"),
    ({"train.algorithm": "nft", "train.kl_coef": 0.1}, "the KL penalty needs kl_coef >= 0 and"),
    ({"train.algorithm": "rwr"}, "'rwr' is an eps regression, written for DDIM"),
    ({"reward.weights": {"remote_ocr": 1.0}},
     "reward term 'remote_ocr' has no reward server: config.reward.server_urls lacks 'ocr'"),
]


@pytest.mark.parametrize("overrides,message", BAD)
def test_bad_digits_flow_configs_are_refused(overrides, message):
  config = load_config("digits_flow", "runlocal", **overrides)
  mesh = parallel.make_mesh(config.mesh)
  with pytest.raises(ValueError, match=message):
    train.validate_config(config, mesh)
    dynamics.make_dynamics(digits.make_policy(config).denoiser, config.sample)


def test_window_on_ddim_and_same_noise_without_groups_are_refused():
  config = load_config("default", "runlocal", **{"sample.sde_window_size": 2})
  with pytest.raises(ValueError, match="SDE windows are the flow samplers'"):
    train.validate_config(config, parallel.make_mesh(config.mesh))
  config = load_config("digits_flow", "runlocal", **{"sample.same_noise_per_group": True,
                                                     "sample.group_size": 1})
  with pytest.raises(ValueError, match="same_noise_per_group needs"):
    train.validate_config(config, parallel.make_mesh(config.mesh))


DYING_SCORER = '''
import os
_calls = [0]

def make_scorer(die_on_call):
  """Brightness per image; the server process exits at call `die_on_call` (mid-epoch)."""
  def scorer(images, prompts, metadata):
    _calls[0] += 1
    if _calls[0] == die_on_call:
      os._exit(3)
    return [float(im.mean()) / 255.0 for im in images], {}
  return scorer
'''


@pytest.mark.slow  # 27 s in CI; every flow method's update stays fast
def test_a_reward_server_dying_mid_epoch_stops_the_run_cleanly(tmp_path, monkeypatch):
  """ddpo_jax/configs/digits_flow.py:runlocal (the digits MMDiT, Flow-GRPO) on a remote reward whose
  server process exits during epoch 1: the run raises the client's error naming the server,
  the checkpoint directory holds only the committed steps (0 and 1, nothing half-written),
  metrics.jsonl only epoch 0 (with the held-out judge logged); with a new server (another URL:
  allowed on resume) the run resumes at epoch 1 and finishes, and `sample.sample_from_checkpoint`
  draws from it (on the flow ODE)."""
  from test_reward_server import _start_server, _stop
  from ddpo_jax.rewards.client import RewardServerError
  (tmp_path / "dying_scorer.py").write_text(DYING_SCORER)
  monkeypatch.setenv("PYTHONPATH", str(tmp_path))
  proc, url = _start_server(tmp_path / "server.log", "--scorer=dying_scorer:make_scorer",
                            '--scorer_kwargs={"die_on_call": 2}')
  workdir = str(tmp_path / "run")
  config = load_config("digits_flow", "runlocal", **{
      "reward.weights": {"remote": 1.0}, "reward.server_url": url, "num_epochs": 3})
  try:
    with pytest.raises(RewardServerError, match=url):
      loop.train_and_evaluate(config, workdir)
  finally:
    _stop(proc)
  assert proc.returncode == 3
  entries = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  assert [e for e in entries if e.isdigit()] == ["0", "1"], entries
  assert not [e for e in entries if "tmp" in e], entries
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    assert [json.loads(line)["epoch"] for line in f] == [0]
  proc, url2 = _start_server(tmp_path / "server2.log", "--scorer=dying_scorer:make_scorer",
                             '--scorer_kwargs={"die_on_call": 0}')
  try:
    config.reward.server_url = url2
    last = loop.train_and_evaluate(config, workdir)
  finally:
    _stop(proc)
  assert np.isfinite(last["reward_mean"]) and "digits_heldout_accuracy_mean" in last
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    assert [json.loads(line)["epoch"] for line in f] == [0, 1, 2]
  images, prompts, step = sample_from_checkpoint(workdir, 4)
  assert images.shape == (4,) + digits.IMAGE_SHAPE and images.dtype == np.uint8 and step == 3
  assert all(p in digits.PROMPTS for p in prompts)
  more_steps, _, _ = sample_from_checkpoint(workdir, 4, num_steps=8)  # trained 4, evaluated 8
  assert more_steps.shape == images.shape and np.any(more_steps != images)


def test_trained_steps_are_the_first_of_the_window_for_flows_and_random_for_ddim():
  """flow_grpo's train_sd3.py trains `for j in range(int(T * timestep_fraction))` (in a
  window: its first steps); ddpo-pytorch draws K random steps per sample. Checked against those
  two rules written in NumPy."""
  from ddpo_jax.algorithms import train
  T, K = 10, 9
  windows = np.ones((6, T), bool)
  windows[3:] = False
  for row, start in zip(range(3, 6), (0, 4, 7)):
    windows[row, start:start + 3] = True
  got = np.asarray(train.trained_step_indices(jax.random.PRNGKey(0), jnp.asarray(windows[:3]),
                                              K, in_order=True))
  np.testing.assert_array_equal(got, np.tile(np.arange(K), (3, 1)))  # never step T - 1
  got = np.asarray(train.trained_step_indices(jax.random.PRNGKey(0), jnp.asarray(windows[3:]),
                                              2, in_order=True))
  np.testing.assert_array_equal(got, [np.flatnonzero(w)[:2] for w in windows[3:]])
  draws = np.asarray(train.trained_step_indices(jax.random.PRNGKey(1), jnp.ones((200, T), bool),
                                                K, in_order=False))
  assert all(len(set(row)) == K for row in draws)
  assert (draws == T - 1).any(axis=1).mean() > 0.8  # the last step is trained about 9 in 10
  inside = np.asarray(train.trained_step_indices(jax.random.PRNGKey(2), jnp.asarray(windows[3:]),
                                                 2, in_order=False))
  assert all(set(row) <= set(np.flatnonzero(w)) for row, w in zip(inside, windows[3:]))


def test_ctrl_on_the_digits_flow_model_is_refused():
  """CTRL's controls add to a UNet's time embedding: on the digits MMDiT the policy refuses
  before anything is compiled (the README's support matrix marks it unsupported)."""
  config = load_config("ctrl_digits_class", "runlocal", **{"model.denoiser": "mmdit"})
  with pytest.raises(ValueError, match="model.denoiser='mmdit': CTRL's control embedding is the "
                                       "UNet's"):
    digits.make_policy(config)
