"""A user's own reward from Python (`@ddpo_jax.rewards.reward`, host or device) trained through
the notebook API (`ddpo_jax.get_config`, `ddpo_jax.train`), and the clear errors for a reward
that returns the wrong thing: another shape, a non-array, a non-dict info (`check_result`,
called for host rewards on the trainer's pool and for device rewards while the sampling program
is traced), NaN (the epoch's gather, before the update)."""
import json
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from conftest import REPO
from helpers import load_config

import ddpo_jax
from ddpo_jax import api, rewards
from ddpo_jax.trainer import checkpoints, loop

HOST, DEVICE = "test_user_brightness", "test_user_darkness"
NO_TASK = types.SimpleNamespace(rewards={})  # a policy without rewards of its own


def brightness(images, prompts, metadata):
  """Host reward: mean uint8 pixel / 255 of each image; info: the brightest pixel."""
  assert images.dtype == np.uint8 and isinstance(prompts, list) and len(prompts) == len(images)
  x = images.astype(np.float32) / 255.0
  return x.mean(axis=(1, 2, 3)), {"max": x.max(axis=(1, 2, 3))}


def darkness(images, prompt_ids, metadata):
  """Device reward (traced): 1 - the mean of the float32 [0, 1] images."""
  assert images.dtype == jnp.float32 and prompt_ids.dtype == jnp.int32
  return 1.0 - images.mean(axis=(1, 2, 3)), {}


@pytest.fixture
def registry():
  """Unregisters, after the test, every reward name the test registered."""
  before = set(rewards.names())
  yield rewards
  for name in set(rewards.names()) - before:
    rewards.unregister(name)


def _runlocal(weights, epochs=1):
  config = ddpo_jax.get_config("default:runlocal")
  config.num_epochs = epochs
  config.reward.weights = weights
  config.reward.metrics = ()
  return config


# --------------------------------------------------------------------------- the notebook API
def _cli_config(spec):
  """The config `python -m ddpo_jax.main --config=SPEC` trains with (its config flag)."""
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=values, lock_config=True)
  values(["main", f"--config={spec}"])
  return values.config


@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # config_flags' own
def test_get_config_is_what_the_cli_loads():
  configs = os.path.join(REPO, "ddpo_jax", "configs")
  for name, spec in [("default", "default.py"), ("default:runlocal", "default.py:runlocal"),
                     ("sd3_pickscore:full", "sd3_pickscore.py:full")]:
    assert ddpo_jax.get_config(name).to_dict() == \
        _cli_config(os.path.join(configs, spec)).to_dict(), name
  small = ddpo_jax.get_config(os.path.join(configs, "default.py:runlocal"))  # a path
  assert small.to_dict() == load_config("default", "runlocal").to_dict()
  small.reward.weights = {"jpeg_compressibility": 1.0}  # locked as the CLI's: keys can be set
  with pytest.raises(AttributeError):
    small.no_such_key = 1  # ... not added
  with pytest.raises(FileNotFoundError,
                     match=r"no config 'defualt' in .*configs; known: .*default"):
    ddpo_jax.get_config("defualt")
  with pytest.raises(FileNotFoundError, match="config file 'nowhere.py'"):
    ddpo_jax.get_config("nowhere.py")
  with pytest.raises(ValueError, match="unknown digits config variant 'runlocl'"):
    ddpo_jax.get_config("default:runlocl")


def test_the_package_stays_cheap_and_serves_the_api_lazily():
  """`import ddpo_jax` loads neither JAX nor any module of the package; the API names do."""
  probe = ("import sys, ddpo_jax; print(sorted(m for m in sys.modules if m.split('.')[0] in "
           "('jax', 'flax', 'ddpo_jax')))")
  out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0 and out.stdout.strip() == "['ddpo_jax']", out.stdout + out.stderr
  assert ddpo_jax.rewards is rewards and callable(ddpo_jax.train)
  assert ddpo_jax.get_config is api.get_config and ddpo_jax.train is api.train
  assert {"get_config", "train", "rewards"} <= set(dir(ddpo_jax))
  with pytest.raises(AttributeError, match="no attribute 'nope'"):
    ddpo_jax.nope  # noqa: B018


# --------------------------------------------------------------------------- the registry
def test_reward_registers_a_function_by_name(registry):
  config = _runlocal({HOST: 1.0})
  with pytest.raises(ValueError, match=f"unknown reward '{HOST}'.*@ddpo_jax.rewards.reward"):
    rewards.check_terms(config, task_rewards=())
  assert rewards.reward(HOST)(brightness) is brightness  # returns the function unchanged
  rewards.check_terms(config, task_rewards=())
  registered = rewards.get(HOST)
  assert (registered.fn, registered.on_device, registered.make.__module__) == \
      (brightness, False, __name__)
  [(w, built)] = rewards.make_rewards(config, NO_TASK)
  assert (w, built.name, built.fn, built.on_device) == (1.0, HOST, brightness, False)

  rewards.reward(DEVICE, on_device=True)(darkness)
  assert rewards.get(DEVICE).on_device
  rewards.reward(DEVICE, on_device=True)(darkness)  # the same function again (a re-run cell)
  with pytest.raises(ValueError, match=f"reward name '{DEVICE}' is empty or already registered"):
    rewards.reward(DEVICE, on_device=True)(brightness)  # another function: refused
  with pytest.raises(ValueError, match="must be a str.*@reward\\('NAME'\\)"):
    rewards.reward(brightness)  # @reward without a name
  with pytest.raises(ValueError, match="reward-server term"):
    rewards.reward("remote_mine")
  with pytest.raises(ValueError, match="decorates a function"):
    rewards.reward("test_user_not_callable")(3.0)

  rewards.unregister(HOST)
  with pytest.raises(ValueError, match=f"unknown reward '{HOST}'"):
    rewards.check_terms(config, task_rewards=())


# --------------------------------------------------------------------------- bad returns
B = 4
GOOD = np.zeros(B, np.float32)


@pytest.mark.parametrize("result, says", [
    ((np.zeros((B, 1), np.float32), {}),
     r"rewards that are not one number per image: ndarray of shape \(4, 1\), dtype float32"),
    ((np.zeros(B + 1, np.float32), {}),
     r"rewards that are not one number per image: ndarray of shape \(5,\)"),
    ((0.5, {}), "rewards that are not an array: float 0.5"),
    (([0.1] * B, {}), r"rewards that are not an array: list \[0.1, .*\(wrap it in np.asarray\)"),
    ((np.array(["a"] * B), {}),
     r"rewards that are not one number per image: ndarray of shape \(4,\), dtype <U1"),
    ((GOOD, [1.0]), r"info that is not a dict: list \[1.0\]"),
    ((GOOD, None), "info that is not a dict: NoneType None"),
    (GOOD, r"ndarray of shape \(4,\), dtype float32, not a pair"),
])
def test_a_bad_return_is_named(result, says):
  with pytest.raises(ValueError, match=rf"^reward 'mine' returned {says}[^;]*; expected \(rewards, "
                                       r"info\): rewards an array of shape \(4,\), one number"):
    rewards.check_result("mine", result, B)


def test_good_returns_pass_unchanged():
  for result in [(GOOD, {}), (jnp.zeros(B), {"x": jnp.ones(B)}), (np.zeros(B, bool), {})]:
    assert rewards.check_result("mine", result, B) is not None


def test_a_host_reward_is_checked_on_the_pool_and_its_errors_name_it():
  images = jnp.full((B, 8, 8, 1), 0.5, jnp.float32)
  prompts = ["a handwritten 1"] * B
  flat = rewards.Reward("flat", lambda im, p, m: (np.zeros((len(im), 1)), {}), on_device=False)
  with pytest.raises(ValueError, match=r"reward 'flat' returned rewards that are not one number "
                                       r"per image: ndarray of shape \(4, 1\)"):
    loop._host_reward(flat, images, prompts, {})
  ok = rewards.Reward(HOST, brightness, on_device=False)
  values, info = loop._host_reward(ok, images, prompts, {})
  np.testing.assert_allclose(values, 128 / 255)
  assert set(info) == {"max"}

  broken = rewards.Reward("broken", lambda im, p, m: 1 / 0, on_device=False)
  with pytest.raises(ZeroDivisionError) as e:
    loop._host_reward(broken, images, prompts, {})
  assert "(raised by reward 'broken', host reward)" in e.value.__notes__


def test_a_device_reward_is_checked_while_traced():
  images = jax.ShapeDtypeStruct((B, 8, 8, 1), jnp.float32)
  ids = jax.ShapeDtypeStruct((B, 3), jnp.int32)
  scalar = rewards.Reward("scalar", lambda im, p, m: (im.mean(), {}), on_device=True)
  with pytest.raises(ValueError, match=r"reward 'scalar' returned rewards that are not one "
                                       r"number per image: .* of shape \(\)"):
    jax.eval_shape(lambda im, p: rewards.call_reward(scalar, im, p, {}), images, ids)
  constant = rewards.Reward("constant", lambda im, p, m: (1.0, {}), on_device=True)
  with pytest.raises(ValueError, match="reward 'constant' returned rewards that are not an array"):
    jax.eval_shape(lambda im, p: rewards.call_reward(constant, im, p, {}), images, ids)
  good = rewards.Reward(DEVICE, darkness, on_device=True)
  out = jax.eval_shape(lambda im, p: rewards.call_reward(good, im, p, {}), images, ids)
  assert out[0].shape == (B,)


# --------------------------------------------------------------------------- end to end
def test_a_digits_run_trains_on_rewards_registered_in_python(digits_cache, tmp_path, registry):
  """One epoch of the digits runlocal run on a host reward (brightness) plus a device reward
  (darkness, half weight), both registered from Python, through get_config + train: each term
  has its metric, and they saw the same images (brightness + darkness = 1 up to uint8
  rounding)."""
  ddpo_jax.rewards.reward(HOST)(brightness)
  ddpo_jax.rewards.reward(DEVICE, on_device=True)(darkness)
  workdir = str(tmp_path / "run")
  row = ddpo_jax.train(_runlocal({HOST: 1.0, DEVICE: 0.5}), workdir)
  for key in (f"{HOST}_mean", f"{HOST}_max_mean", f"{DEVICE}_mean", "reward_mean", "loss"):
    assert np.isfinite(row[key]), key
  assert 0 < row[f"{HOST}_mean"] < 1
  assert abs(row[f"{HOST}_mean"] + row[f"{DEVICE}_mean"] - 1) < 2e-3
  np.testing.assert_allclose(row["reward_mean"],
                             row[f"{HOST}_mean"] + 0.5 * row[f"{DEVICE}_mean"], rtol=1e-5)
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["epoch"] for r in rows] == [0] and rows[0][f"{HOST}_mean"] == row[f"{HOST}_mean"]


def test_a_device_reward_of_another_shape_stops_the_run_when_traced(digits_cache, tmp_path,
                                                                    registry):
  @ddpo_jax.rewards.reward("test_user_columns", on_device=True)
  def columns(images, prompt_ids, metadata):
    return images.mean(axis=(1, 3)), {}  # (B, W), not (B,)

  workdir = str(tmp_path / "run")
  with pytest.raises(ValueError, match=r"reward 'test_user_columns' returned rewards that are "
                                       r"not one number per image: .* of shape \(8, 8\)"):
    ddpo_jax.train(_runlocal({"test_user_columns": 1.0}), workdir)
  assert not os.path.exists(os.path.join(workdir, "metrics.jsonl")) or \
      not open(os.path.join(workdir, "metrics.jsonl")).read()


def test_a_nan_host_reward_stops_the_run_before_the_update(digits_cache, tmp_path, registry):
  @ddpo_jax.rewards.reward("test_user_nan")
  def nan(images, prompts, metadata):
    return np.full(len(images), np.nan, np.float32), {}
  ddpo_jax.rewards.reward(DEVICE, on_device=True)(darkness)  # the sampling program of the run above

  workdir = str(tmp_path / "run")
  with pytest.raises(FloatingPointError, match="reward 'test_user_nan' returned NaN/inf"):
    ddpo_jax.train(_runlocal({"test_user_nan": 1.0, DEVICE: 0.5}), workdir)
  assert checkpoints.manager(workdir, read_only=True).all_steps() == [0]
