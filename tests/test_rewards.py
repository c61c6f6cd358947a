"""The reward registry (ddpo_jax/rewards/registry.py) and how `make_rewards` / `check_terms` /
config validation (`train.validate_shared_config`) look names up: the built-in names and the
modules registering them, a reward registered by a test usable by name until unregistered, the
refusals (unknown names listing the known ones, an empty path key a reward needs, bad
registrations, a builder returning another reward than it registered), a task's own rewards
first, and CTRL's names left to `make_rewards` until its policy is built.

Remote terms ("remote", "remote_NAME") and their URL errors: tests/test_reward_server.py.
"""
import types

import numpy as np
import pytest

from ddpo_jax import config_schema, rewards
from ddpo_jax.algorithms import train
from ddpo_jax.rewards import jpeg

NO_TASK = types.SimpleNamespace(rewards={})
TEST_NAME = "test_mean_pixel"


def _config(weights, mode="ddpo", model="digits", metrics=(), **reward):
  config = config_schema.new_config(mode, model)
  config.reward.weights = weights
  config.reward.metrics = metrics
  for key, value in reward.items():
    config.reward[key] = value
  config_schema.validate(config)
  return config


def mean_pixel(images, prompts, metadata):
  """Host reward: mean uint8 value of each image (B,) float32."""
  del prompts, metadata
  return np.asarray(images, np.float32).mean(axis=(1, 2, 3)), {}


@pytest.fixture
def registered():
  """Registers `TEST_NAME` (a host reward) for one test; yields a list to pass as
  `make_rewards`'s `log`, which then holds the builder's messages."""
  said = []

  @rewards.register(TEST_NAME, on_device=False)
  def make_mean_pixel(config, log):
    log(f"building {TEST_NAME} (classifier_seed {config.reward.classifier_seed})")
    return rewards.Reward(TEST_NAME, mean_pixel, on_device=False)
  yield said
  if TEST_NAME in rewards.names():
    rewards.unregister(TEST_NAME)


def test_the_built_in_rewards_are_registered_by_their_own_modules():
  where = {name: (rewards.get(name).make.__module__, rewards.get(name).on_device)
           for name in rewards.names()}
  assert where == {
      "jpeg_compressibility": ("ddpo_jax.rewards.jpeg", False),
      "jpeg_incompressibility": ("ddpo_jax.rewards.jpeg", False),
      "digit_class_logprob": ("ddpo_jax.rewards.digit_classifier", True),
      "digits_heldout_accuracy": ("ddpo_jax.rewards.digit_classifier", False),
      "aesthetic": ("ddpo_jax.rewards.aesthetic", True),
      "pickscore": ("ddpo_jax.rewards.clip_score", True),
      "clipscore": ("ddpo_jax.rewards.clip_score", True),
  }
  assert rewards.get("aesthetic").needs == ("reward.clip_path", "reward.aesthetic_mlp_path")
  assert rewards.get("pickscore").needs == ("reward.pickscore_path",)


def test_jpeg_terms_by_name():
  config = _config({"jpeg_compressibility": 1.0}, metrics=("jpeg_incompressibility",))
  terms = rewards.make_rewards(config, NO_TASK)
  assert [(w, r.name, r.on_device) for w, r in terms] == [
      (1.0, "jpeg_compressibility", False), (0.0, "jpeg_incompressibility", False)]
  images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
  kb = jpeg.jpeg_size_kb(images)
  (down, info), (up, _) = [r.fn(images, ["a"] * 3, {}) for _, r in terms]
  np.testing.assert_array_equal(down, -kb)
  np.testing.assert_array_equal(up, kb)
  np.testing.assert_array_equal(info["jpeg_kb"], kb)


def test_a_reward_registered_in_a_test_is_usable_by_name_until_unregistered(registered):
  config = _config({TEST_NAME: 2.0}, metrics=("jpeg_compressibility",))
  assert TEST_NAME in rewards.names()
  train.validate_shared_config(config)  # config validation knows the name
  rewards.check_terms(config, task_rewards=())
  terms = rewards.make_rewards(config, NO_TASK, log=registered.append)
  assert [(w, r.name) for w, r in terms] == [(2.0, TEST_NAME), (0.0, "jpeg_compressibility")]
  assert registered == [f"building {TEST_NAME} (classifier_seed 0)"]
  images = np.stack([np.full((4, 4, 1), v, np.uint8) for v in (0, 10, 255)])
  values, info = terms[0][1].fn(images, ["a", "b", "c"], {})
  np.testing.assert_array_equal(values, [0.0, 10.0, 255.0])

  rewards.unregister(TEST_NAME)
  assert TEST_NAME not in rewards.names()
  unknown = (rf"unknown reward '{TEST_NAME}' \(config.reward.weights / metrics\); known: "
             r"jpeg_compressibility, jpeg_incompressibility, digit_class_logprob, "
             r"digits_heldout_accuracy, aesthetic, pickscore, clipscore, remote, remote_NAME ")
  with pytest.raises(ValueError, match=unknown):
    train.validate_shared_config(config)
  with pytest.raises(ValueError, match=unknown):
    rewards.make_rewards(config, NO_TASK)
  with pytest.raises(ValueError, match=rf"unknown reward '{TEST_NAME}'; registered: "):
    rewards.get(TEST_NAME)


def test_every_name_is_checked_before_any_term_is_built(registered):
  """A typo among the metrics is refused before the (slow) terms before it are built."""
  config = _config({TEST_NAME: 1.0}, metrics=("jpeg_compresibility",))
  with pytest.raises(ValueError, match="unknown reward 'jpeg_compresibility'"):
    rewards.make_rewards(config, NO_TASK, log=registered.append)
  assert registered == []


def test_an_empty_path_a_reward_needs_is_refused_naming_the_key():
  config = _config({"aesthetic": 1.0}, model="sd")  # reward.aesthetic_mlp_path: '' by default
  message = (r"reward 'aesthetic' needs config.reward.aesthetic_mlp_path, which is ''; set it, "
             r"e.g. --config.reward.aesthetic_mlp_path=PATH")
  with pytest.raises(ValueError, match=message):
    train.validate_shared_config(config)
  with pytest.raises(ValueError, match=message):
    rewards.make_rewards(config, NO_TASK)
  config = _config({"jpeg_compressibility": 1.0}, model="sd", metrics=("pickscore",),
                   pickscore_path="")
  with pytest.raises(ValueError, match=r"reward 'pickscore' needs config.reward.pickscore_path"):
    rewards.check_terms(config, task_rewards=())

  @rewards.register("test_needs_a_key", on_device=False, needs=("reward.no_such_key",))
  def make(config, log):
    raise AssertionError("not built")
  try:
    with pytest.raises(ValueError, match=r"needs config.reward.no_such_key, which is None"):
      rewards.check_terms(_config({"test_needs_a_key": 1.0}), task_rewards=())
  finally:
    rewards.unregister("test_needs_a_key")


def test_a_config_without_a_non_zero_weight_is_refused():
  config = _config({"jpeg_compressibility": 0.0}, metrics=("jpeg_incompressibility",))
  for check in (train.validate_shared_config, lambda c: rewards.make_rewards(c, NO_TASK)):
    with pytest.raises(ValueError, match="must give at least one term a non-zero weight"):
      check(config)


@pytest.mark.parametrize("name, kwargs, message", [
    ("jpeg_compressibility", {}, r"'jpeg_compressibility' is empty or already registered \("),
    ("", {}, "'' is empty or already registered"),
    ("remote", {}, "'remote' is a reward-server term's"),
    ("remote_ocr", {}, "'remote_ocr' is a reward-server term's"),
    ("test_bad_needs", {"needs": "reward.pickscore_path"}, "must be a tuple of config keys"),
])
def test_bad_registrations_are_refused(name, kwargs, message):
  before = {n: rewards.get(n) for n in rewards.names()}
  with pytest.raises(ValueError, match=message):
    rewards.register(name, on_device=False, **kwargs)
  assert {n: rewards.get(n) for n in rewards.names()} == before


def test_a_builder_returning_another_reward_than_registered_is_refused():
  @rewards.register("test_says_device", on_device=True)
  def make(config, log):
    return rewards.Reward("test_says_device", mean_pixel, on_device=False)
  try:
    with pytest.raises(ValueError, match=r"reward 'test_says_device': its registered builder "
                       r".*expected a Reward named 'test_says_device' with on_device=True"):
      rewards.make_rewards(_config({"test_says_device": 1.0}), NO_TASK)
  finally:
    rewards.unregister("test_says_device")


def test_a_tasks_own_rewards_come_first_and_are_known_once_its_policy_is():
  own = rewards.Reward("jpeg_compressibility", mean_pixel, on_device=False)
  task = types.SimpleNamespace(rewards={"jpeg_compressibility": own, "task_score": own})
  config = _config({"jpeg_compressibility": 1.0, "task_score": 0.5})
  assert [r for _, r in rewards.make_rewards(config, task)] == [own, own]
  # CTRL's own names (its policy's) are not known to config validation: left to make_rewards,
  # which lists them among the known ones.
  config = _config({"ctrl_log_likelihood": 1.0}, mode="ctrl", metrics=("typo_judge_accuracy",))
  train.validate_shared_config(config)
  ctrl = types.SimpleNamespace(rewards={"ctrl_log_likelihood": own,
                                        "jpeg_judge_accuracy": own})
  with pytest.raises(ValueError, match=r"unknown reward 'typo_judge_accuracy' .*, remote_NAME, "
                     r"ctrl_log_likelihood, jpeg_judge_accuracy \(remote_NAME: any NAME"):
    rewards.make_rewards(config, ctrl)
  # In DDPO runs no policy defines rewards: config validation refuses an unknown name at once.
  with pytest.raises(ValueError, match="unknown reward 'task_score'"):
    train.validate_shared_config(_config({"task_score": 1.0}))
