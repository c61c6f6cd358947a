"""Prompt sets of the DDPO paper tasks, and user prompt files / lists.

A prompt function is `fn(rng: np.random.Generator, n: int) -> list[str]`: `n` prompts drawn
independently and uniformly (with replacement) from a fixed set, as `random.choice` in
kvablack/ddpo-pytorch's `prompts.py`. The sets are read from text files whose paths are given
as arguments (the project does not ship copies; the reference files are `imagenet_classes.txt`,
`simple_animals.txt` and `activities.txt`):

  imagenet_animals           the first 398 lines of `imagenet_classes.txt` (the ImageNet animal
                             classes, e.g. "tench, Tinca tinca"; lines used whole, as the
                             reference), for the compressibility tasks;
  simple_animals             every line of `simple_animals.txt` (45 animals), for aesthetics;
  simple_animals_activities  "a(n) ANIMAL ACTIVITY", animal from `simple_animals.txt` and
                             activity from `activities.txt` drawn independently ("an" before a
                             vowel letter), for prompt alignment (45 x 3 prompts);
  from_file                  every non-blank line of any text file (one prompt per line);
  list                       a Python list of prompts.

Lines are stripped of surrounding whitespace; blank lines are skipped. Each returned function
is a `PromptFn`, whose `prompts` attribute lists the whole set (in file order).

The training loop draws with replacement by default (DDPO's recipes); `sample.prompt_sampling
= "epoch_unique"` draws each epoch's prompts without replacement instead (`epoch_unique_prompts`:
flow_grpo's sampler; the flow / GRPO recipes).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Sequence

import numpy as np

IMAGENET_FILE = "imagenet_classes.txt"
SIMPLE_ANIMALS_FILE = "simple_animals.txt"
ACTIVITIES_FILE = "activities.txt"
IMAGENET_ANIMALS = 398  # ImageNet classes 0..397 are animals
# Environment variable naming a directory with the files above, used when `path` is None.
ASSETS_ENV = "DDPO_JAX_ASSETS"

NAMES = ("imagenet_animals", "simple_animals", "simple_animals_activities", "from_file", "list")
# How the training loop draws each sampling call's prompts (`sample.prompt_sampling`).
PROMPT_SAMPLING = ("with_replacement", "epoch_unique")


def load_lines(path: str | os.PathLike) -> list[str]:
  """The stripped, non-blank lines of a UTF-8 text file.

  Raises:
    FileNotFoundError: `path` does not exist or is not a file.
    ValueError: the file has no non-blank line.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"prompt file {path}: no such file")
  with open(path, encoding="utf-8") as f:
    lines = [line.strip() for line in f]
  lines = [line for line in lines if line]
  if not lines:
    raise ValueError(f"prompt file {path} is empty (no non-blank line)")
  return lines


def with_article(noun: str) -> str:
  """'an' + noun if it starts with a vowel letter (a, e, i, o, u), else 'a' + noun.

  A spelling rule, not inflect's pronunciation rules ("a unicorn", "an hour" differ); it is
  exact for the 45 simple animals.
  """
  return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


@dataclasses.dataclass(frozen=True)
class PromptFn:
  """Draws `n` prompts uniformly with replacement from `prompts` with a NumPy Generator."""
  name: str
  prompts: tuple[str, ...]

  def __post_init__(self):
    if not self.prompts:
      raise ValueError(f"prompt set {self.name!r} is empty")

  def __call__(self, rng: np.random.Generator, n: int) -> list[str]:
    if n < 0:
      raise ValueError(f"prompt set {self.name!r}: n must be >= 0, got {n}")
    idx = rng.integers(0, len(self.prompts), size=n)
    return [self.prompts[i] for i in idx]

  def __len__(self) -> int:
    return len(self.prompts)


@dataclasses.dataclass(frozen=True)
class ProductPromptFn(PromptFn):
  """Prompts `template.format(article_noun, activity)`: noun and activity drawn independently
  (as the reference's `nouns_activities`); `prompts` lists all noun x activity combinations."""
  nouns: tuple[str, ...] = ()
  activities: tuple[str, ...] = ()

  def __call__(self, rng: np.random.Generator, n: int) -> list[str]:
    if n < 0:
      raise ValueError(f"prompt set {self.name!r}: n must be >= 0, got {n}")
    ni = rng.integers(0, len(self.nouns), size=n)
    ai = rng.integers(0, len(self.activities), size=n)
    return [_activity_prompt(self.nouns[i], self.activities[j]) for i, j in zip(ni, ai)]


def _activity_prompt(noun: str, activity: str) -> str:
  return f"{with_article(noun)} {activity}"


def _asset(path: str | os.PathLike | None, default_name: str, set_name: str) -> str:
  """`path` itself if a file, `path/default_name` if a directory; None -> $DDPO_JAX_ASSETS."""
  if path is None:
    path = os.environ.get(ASSETS_ENV)
    if not path:
      raise ValueError(f"prompt set {set_name!r} needs `path`: the file {default_name} or a "
                       f"directory holding it (or set ${ASSETS_ENV} to that directory)")
  path = os.fspath(path)
  if os.path.isdir(path):
    return os.path.join(path, default_name)
  return path


def imagenet_animals(path: str | os.PathLike | None = None) -> PromptFn:
  """The first 398 lines (animal classes) of `imagenet_classes.txt` (a file or its directory)."""
  file = _asset(path, IMAGENET_FILE, "imagenet_animals")
  lines = load_lines(file)
  if len(lines) < IMAGENET_ANIMALS:
    raise ValueError(f"{file}: has {len(lines)} non-blank lines, expected the 1000 ImageNet "
                     f"classes (at least {IMAGENET_ANIMALS})")
  return PromptFn("imagenet_animals", tuple(lines[:IMAGENET_ANIMALS]))


def simple_animals(path: str | os.PathLike | None = None) -> PromptFn:
  """Every line of `simple_animals.txt` (a file or its directory)."""
  return PromptFn("simple_animals", tuple(load_lines(_asset(path, SIMPLE_ANIMALS_FILE,
                                                              "simple_animals"))))


def simple_animals_activities(path: str | os.PathLike | None = None,
                              activities_path: str | os.PathLike | None = None) -> PromptFn:
  """"a(n) ANIMAL ACTIVITY" prompts.

  Args:
    path: a directory holding `simple_animals.txt` and `activities.txt`, or the animals file.
    activities_path: the activities file; default `activities.txt` in `path`'s directory.
  """
  animals_file = _asset(path, SIMPLE_ANIMALS_FILE, "simple_animals_activities")
  if activities_path is None:
    activities_path = os.path.join(os.path.dirname(animals_file), ACTIVITIES_FILE)
  nouns = tuple(load_lines(animals_file))
  activities = tuple(load_lines(activities_path))
  every = tuple(_activity_prompt(n, a) for n in nouns for a in activities)
  return ProductPromptFn("simple_animals_activities", every, nouns, activities)


def from_file(path: str | os.PathLike) -> PromptFn:
  """Every non-blank line of a text file, one prompt per line."""
  if path is None:
    raise ValueError("prompt set 'from_file' needs `path`, a text file with one prompt per line")
  return PromptFn(f"from_file:{os.fspath(path)}", tuple(load_lines(path)))


def from_list(prompts: Sequence[str]) -> PromptFn:
  """A fixed list of prompt strings."""
  if prompts is None or isinstance(prompts, str):
    raise ValueError("prompt set 'list' needs `prompts`, a list of strings (not one string)")
  prompts = tuple(prompts)
  bad = [p for p in prompts if not isinstance(p, str)]
  if bad:
    raise TypeError(f"prompt set 'list': every prompt must be a str, got {bad[:3]!r}")
  if not prompts:
    raise ValueError("prompt set 'list': `prompts` is empty")
  return PromptFn("list", prompts)


def epoch_unique_prompts(prompt_fn, seed: int, epoch: int, batch: int, num_batches: int,
                         n: int) -> list[str]:
  """The `n` distinct prompts of sampling call `batch` of `epoch` when an epoch draws its
  num_batches * n prompts WITHOUT replacement from the whole set: a permutation of the set drawn
  from (seed, epoch), its first num_batches * n entries cut into num_batches consecutive blocks.
  The training loop repeats each of them `sample.group_size` times (the group).

  This is flow_grpo's `DistributedKRepeatSampler` (flow_grpo/sampler.py, used by
  scripts/train_flux.py; train_sd3_fast.py's copy draws per call): per epoch
  `torch.randperm(len(dataset))[:m]` unique prompts, each repeated k times. Ours, not the
  reference's: a group stays in one sampling call (the reference shuffles the m * k repeats
  over calls and processes).

  Args:
    prompt_fn: a `PromptFn` (its `prompts` attribute is the set).
    seed, epoch, batch: the run's seed, the epoch and the call (0 <= batch < num_batches).
    n: prompts per call (sample.batch_size / sample.group_size).

  Returns:
    A list of n str.

  Raises:
    ValueError: a prompt function without a `prompts` set, or a set smaller than
      num_batches * n (an epoch's prompts could not all differ).
  """
  pool = getattr(prompt_fn, "prompts", None)
  if pool is None:
    raise ValueError("sample.prompt_sampling='epoch_unique' needs a prompt set (ddpo_jax/"
                     "prompts.py); this model's prompt function has none")
  m = num_batches * n
  if m > len(pool):
    raise ValueError(f"sample.prompt_sampling='epoch_unique': an epoch draws {m} distinct "
                     f"prompts (sample.num_batches_per_epoch {num_batches} x {n} per call), "
                     f"more than the {len(pool)} of the prompt set")
  if not 0 <= batch < num_batches:
    raise ValueError(f"batch={batch} must lie in [0, num_batches={num_batches})")
  chosen = np.random.default_rng([seed, epoch, 0xE90C]).permutation(len(pool))[:m]
  return [pool[i] for i in chosen[batch * n:(batch + 1) * n]]


def make_prompt_fn(name: str, path: str | os.PathLike | None = None,
                   prompts: Sequence[str] | None = None, *,
                   activities_path: str | os.PathLike | None = None
                   ) -> Callable[[np.random.Generator, int], list[str]]:
  """A prompt function `(rng, n) -> list of n str` by name.

  Args:
    name: one of "imagenet_animals", "simple_animals", "simple_animals_activities",
      "from_file", "list".
    path: for the named sets, the data file or a directory holding the reference file names
      (None: the directory in $DDPO_JAX_ASSETS); for "from_file", the prompt file.
    prompts: for "list", the prompts.
    activities_path: for "simple_animals_activities", the activities file (default: next to
      the animals file).

  Raises:
    ValueError: unknown name, missing argument, empty file or list.
    FileNotFoundError: a missing file (the message names it).
  """
  if name == "imagenet_animals":
    return imagenet_animals(path)
  if name == "simple_animals":
    return simple_animals(path)
  if name == "simple_animals_activities":
    return simple_animals_activities(path, activities_path)
  if name == "from_file":
    return from_file(path)
  if name == "list":
    return from_list(prompts)
  raise ValueError(f"unknown prompt set {name!r}; known: {', '.join(NAMES)}")
