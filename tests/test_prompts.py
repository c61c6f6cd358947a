"""Prompt sets: the paper's files (shared assets, skipped if absent), user files and lists."""
import os

import numpy as np
import pytest

from conftest import SHARED_DATA as ASSETS
from ddpo_jax import prompts as P

needs_assets = pytest.mark.skipif(not os.path.isdir(ASSETS), reason=f"{ASSETS} not present")


@needs_assets
def test_imagenet_animals():
  fn = P.make_prompt_fn("imagenet_animals", ASSETS)
  assert len(fn.prompts) == 398
  assert fn.prompts[0] == "tench, Tinca tinca"
  with open(os.path.join(ASSETS, "imagenet_classes.txt")) as f:
    lines = [line.strip() for line in f]
  assert fn.prompts == tuple(lines[:398])
  assert lines[398] not in fn.prompts  # class 398 ("abacus") is not an animal
  # The file path itself works as well as its directory.
  assert P.make_prompt_fn("imagenet_animals", os.path.join(ASSETS, "imagenet_classes.txt"))\
      .prompts == fn.prompts
  drawn = fn(np.random.default_rng(0), 1000)
  assert len(drawn) == 1000 and set(drawn) <= set(fn.prompts)
  assert len(set(drawn)) > 300  # uniform over 398


@needs_assets
def test_simple_animals():
  fn = P.make_prompt_fn("simple_animals", ASSETS)
  assert len(fn.prompts) == 45 and fn.prompts[:3] == ("cat", "dog", "horse")
  a = fn(np.random.default_rng(1), 16)
  assert a == fn(np.random.default_rng(1), 16)  # deterministic given the generator
  assert a != fn(np.random.default_rng(2), 16)
  assert fn(np.random.default_rng(0), 0) == []


@needs_assets
def test_simple_animals_activities():
  fn = P.make_prompt_fn("simple_animals_activities", ASSETS)
  assert len(fn.prompts) == 45 * 3
  assert "a cat washing the dishes" in fn.prompts
  assert "an ant riding a bike" in fn.prompts
  drawn = fn(np.random.default_rng(0), 2000)
  assert set(drawn) <= set(fn.prompts)
  assert len(set(drawn)) > 120  # animal and activity drawn independently
  # animals file + explicit activities file
  fn2 = P.make_prompt_fn("simple_animals_activities", os.path.join(ASSETS, "simple_animals.txt"),
                         activities_path=os.path.join(ASSETS, "activities.txt"))
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
