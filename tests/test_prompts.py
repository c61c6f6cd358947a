"""Prompt sets: the paper's files (shared assets, skipped if absent) and synthetic files in their
format (always), user files and lists."""
import collections
import os

import numpy as np
import pytest

from conftest import SHARED_DATA, SYNTHETIC_ACTIVITIES, SYNTHETIC_ANIMALS, SYNTHETIC_IMAGENET
from ddpo_jax.tasks import prompts as P

# What each source's files hold: the first ImageNet class, two "a(n) ANIMAL ACTIVITY" prompts.
EXPECTED = {
    "synthetic": {"first_class": SYNTHETIC_IMAGENET[0],
                  "activity_prompts": (f"a cat {SYNTHETIC_ACTIVITIES[0]}",
                                       f"an ant {SYNTHETIC_ACTIVITIES[1]}")},
    "paper": {"first_class": "tench, Tinca tinca",
              "activity_prompts": ("a cat washing the dishes", "an ant riding a bike")},
}


@pytest.fixture(params=["synthetic", "paper"])
def assets(request):
  """(source, directory): synthetic files made for the test, or the paper's (skipped if absent)."""
  if request.param == "paper":
    if not os.path.isdir(SHARED_DATA):
      pytest.skip(f"the paper's prompt files: {SHARED_DATA} not present")
    return request.param, SHARED_DATA
  return request.param, request.getfixturevalue("prompt_assets")


def test_imagenet_animals(assets):
  source, path = assets
  fn = P.make_prompt_fn("imagenet_animals", path)
  assert len(fn.prompts) == 398
  assert fn.prompts[0] == EXPECTED[source]["first_class"]
  with open(os.path.join(path, "imagenet_classes.txt")) as f:
    lines = [line.strip() for line in f if line.strip()]
  assert len(lines) == 1000
  assert fn.prompts == tuple(lines[:398])
  assert lines[398] not in fn.prompts  # class 398 ("abacus") is not an animal
  if source == "synthetic":  # padded lines stripped, the blank line skipped
    assert lines == list(SYNTHETIC_IMAGENET)
  # The file path itself works as well as its directory.
  assert P.make_prompt_fn("imagenet_animals", os.path.join(path, "imagenet_classes.txt"))\
      .prompts == fn.prompts
  drawn = fn(np.random.default_rng(0), 1000)
  assert len(drawn) == 1000 and set(drawn) <= set(fn.prompts)
  assert len(set(drawn)) > 300  # uniform over 398


def test_simple_animals(assets):
  source, path = assets
  fn = P.make_prompt_fn("simple_animals", path)
  assert len(fn.prompts) == 45 and fn.prompts[:3] == ("cat", "dog", "horse")
  if source == "synthetic":
    assert fn.prompts == SYNTHETIC_ANIMALS
  a = fn(np.random.default_rng(1), 16)
  assert a == fn(np.random.default_rng(1), 16)  # deterministic given the generator
  assert a != fn(np.random.default_rng(2), 16)
  assert fn(np.random.default_rng(0), 0) == []


def test_simple_animals_activities(assets):
  source, path = assets
  fn = P.make_prompt_fn("simple_animals_activities", path)
  assert len(fn.prompts) == 45 * 3
  for prompt in EXPECTED[source]["activity_prompts"]:
    assert prompt in fn.prompts
  drawn = fn(np.random.default_rng(0), 2000)
  assert set(drawn) <= set(fn.prompts)
  assert len(set(drawn)) > 120  # animal and activity drawn independently
  # animals file + explicit activities file
  fn2 = P.make_prompt_fn("simple_animals_activities", os.path.join(path, "simple_animals.txt"),
                         activities_path=os.path.join(path, "activities.txt"))
  assert fn2.prompts == fn.prompts


def test_articles():
  assert P.with_article("ant") == "an ant"
  assert P.with_article("Elephant") == "an Elephant"
  assert P.with_article("cat") == "a cat"


def test_from_file_and_list(tmp_path):
  f = tmp_path / "p.txt"
  f.write_text("  a photo of a cat \n\n a red car\n")
  fn = P.make_prompt_fn("from_file", str(f))
  assert fn.prompts == ("a photo of a cat", "a red car")
  assert set(fn(np.random.default_rng(0), 20)) == set(fn.prompts)
  fl = P.make_prompt_fn("list", prompts=["x", "y"])
  assert fl.prompts == ("x", "y") and len(fl(np.random.default_rng(0), 5)) == 5


def test_errors(tmp_path, monkeypatch):
  missing = tmp_path / "nope.txt"
  with pytest.raises(FileNotFoundError, match="nope.txt"):
    P.make_prompt_fn("from_file", str(missing))
  empty = tmp_path / "empty.txt"
  empty.write_text("\n  \n")
  with pytest.raises(ValueError, match="empty.txt.*empty"):
    P.make_prompt_fn("from_file", str(empty))
  with pytest.raises(FileNotFoundError, match="imagenet_classes.txt"):
    P.make_prompt_fn("imagenet_animals", str(tmp_path))  # a directory without the file
  short = tmp_path / "imagenet_classes.txt"
  short.write_text("a\nb\n")
  with pytest.raises(ValueError, match="398"):
    P.make_prompt_fn("imagenet_animals", str(tmp_path))
  (tmp_path / "simple_animals.txt").write_text("cat\n")
  with pytest.raises(FileNotFoundError, match="activities.txt"):
    P.make_prompt_fn("simple_animals_activities", str(tmp_path))
  monkeypatch.delenv(P.ASSETS_ENV, raising=False)
  with pytest.raises(ValueError, match="needs `path`"):
    P.make_prompt_fn("simple_animals")
  monkeypatch.setenv(P.ASSETS_ENV, str(tmp_path))
  assert P.make_prompt_fn("simple_animals").prompts == ("cat",)
  with pytest.raises(ValueError, match="needs `path`"):
    P.make_prompt_fn("from_file")
  with pytest.raises(ValueError, match="empty"):
    P.make_prompt_fn("list", prompts=[])
  with pytest.raises(ValueError, match="list of strings"):
    P.make_prompt_fn("list", prompts="a cat")
  with pytest.raises(TypeError, match="str"):
    P.make_prompt_fn("list", prompts=["a", 3])
  with pytest.raises(ValueError, match="unknown prompt set 'foo'"):
    P.make_prompt_fn("foo")
  with pytest.raises(ValueError, match="n must be"):
    P.make_prompt_fn("list", prompts=["a"])(np.random.default_rng(0), -1)


def _k_repeat_epoch(num_prompts, m, k, rng):
  """flow_grpo's DistributedKRepeatSampler (flow_grpo/sampler.py `__iter__`), one epoch, as
  index lists: m distinct indices from a permutation of the set, each repeated k times."""
  indices = rng.permutation(num_prompts)[:m]
  return [i for i in indices for _ in range(k)]


@pytest.mark.parametrize("num_batches,per_call,group", [(4, 3, 2), (1, 5, 4), (3, 4, 1)])
def test_epoch_unique_prompts_are_the_k_repeat_sampler(num_batches, per_call, group):
  """Every epoch, the calls' prompts repeated `group` times hold m = num_batches * per_call
  distinct prompts exactly `group` times each, as the reference's repeated indices do; the
  draw depends on (seed, epoch) only, differs between epochs and covers the whole set."""
  fn = P.from_list([f"p{i}" for i in range(20)])
  m = num_batches * per_call
  ref_counts = sorted(collections.Counter(
      _k_repeat_epoch(len(fn), m, group, np.random.default_rng(0))).values())
  seen, epochs = set(), []
  for epoch in range(30):
    calls = [P.epoch_unique_prompts(fn, 7, epoch, b, num_batches, per_call)
             for b in range(num_batches)]
    assert all(len(c) == per_call for c in calls)
    drawn = [p for c in calls for p in c]
    assert len(set(drawn)) == m
    repeated = [p for p in drawn for _ in range(group)]  # the loop's np.repeat
    assert sorted(collections.Counter(repeated).values()) == ref_counts == [group] * m
    assert calls == [P.epoch_unique_prompts(fn, 7, epoch, b, num_batches, per_call)
                     for b in range(num_batches)]
    seen.update(drawn)
    epochs.append(tuple(drawn))
  assert len(set(epochs)) > 1 and seen == set(fn.prompts)


def test_with_replacement_repeats_prompts_within_an_epoch():
  """DDPO's default (`PromptFn.__call__`, ddpo-pytorch's random.choice) draws with replacement:
  10 draws from 20 prompts hold a repeat here; epoch_unique refuses an epoch larger than the
  set."""
  assert len(set(P.from_list([f"p{i}" for i in range(20)])(np.random.default_rng(0), 10))) < 10
  fn = P.from_list(["a", "b", "c", "d", "e"])
  with pytest.raises(ValueError, match="an epoch draws 6 distinct prompts"):
    P.epoch_unique_prompts(fn, 0, 0, 0, 2, 3)
  with pytest.raises(ValueError, match="needs a prompt set"):
    P.epoch_unique_prompts(lambda rng, n: ["a"] * n, 0, 0, 0, 1, 1)
