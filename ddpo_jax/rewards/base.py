"""The reward term type every reward module returns (`ddpo_jax.rewards` documents `fn`'s two
calling conventions: device rewards and host rewards), and the check every reward's result
passes before the trainer uses it (`call_reward`, `check_result`)."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Reward:
  """A named reward term. See the `ddpo_jax.rewards` docstring for `fn`'s two calling
  conventions.

  `prompt_metadata`: optional host function, prompts -> dict of (n, ...) NumPy arrays the
  trainer merges into the sampled batch's metadata (e.g. a CLIP reward's own token ids,
  "clip_ids"), for a device reward whose text tokenizer is not the policy's.
  """
  name: str
  fn: Callable[..., tuple[Any, dict]]
  on_device: bool
  prompt_metadata: Callable[[Sequence[str]], dict] | None = None


def _described(x) -> str:
  """What a reward returned, in a few words, for an error message."""
  if hasattr(x, "shape") and hasattr(x, "dtype"):
    return f"{type(x).__name__} of shape {tuple(x.shape)}, dtype {x.dtype}"
  text = repr(x)
  return f"{type(x).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def check_result(name: str, result, batch: int) -> tuple[Any, dict]:
  """The (rewards, info) that reward `name` returned for `batch` images, checked: `rewards` an
  array (NumPy, JAX or a JAX tracer: device rewards are checked while the sampling program is
  traced) of shape (batch,) and not of strings, `info` a dict. Returns `result`.

  Raises:
    ValueError: naming the reward and what it returned (NaN/inf rewards are the trainer's
      check, `DDPOEpoch.gather_rewards`, as their values are only known after sampling).
  """
  expected = (f"expected (rewards, info): rewards an array of shape ({batch},), one number per "
              "image, and info a dict (possibly empty) of values to log")
  if not isinstance(result, tuple) or len(result) != 2:
    raise ValueError(f"reward {name!r} returned {_described(result)}, not a pair; {expected}")
  rewards, info = result
  if not (hasattr(rewards, "shape") and hasattr(rewards, "dtype")):
    hint = " (wrap it in np.asarray)" if isinstance(rewards, (list, tuple)) else ""
    raise ValueError(f"reward {name!r} returned rewards that are not an array: "
                     f"{_described(rewards)}{hint}; {expected}")
  if tuple(rewards.shape) != (batch,) or np.dtype(rewards.dtype).kind in "SU":
    raise ValueError(f"reward {name!r} returned rewards that are not one number per image: "
                     f"{_described(rewards)}; {expected}")
  if not isinstance(info, dict):
    raise ValueError(f"reward {name!r} returned info that is not a dict: {_described(info)}; "
                     f"{expected}")
  return rewards, info


def call_reward(reward: Reward, images, prompts, metadata) -> tuple[Any, dict]:
  """`reward.fn(images, prompts, metadata)` checked by `check_result` (B = len(images)); an
  error inside `fn` gets a note naming the reward. The trainer calls every reward through this:
  host rewards on its thread pool, device rewards in the sampling program while it is traced."""
  try:
    result = reward.fn(images, prompts, metadata)
  except Exception as e:
    e.add_note(f"(raised by reward {reward.name!r}, {'device' if reward.on_device else 'host'}"
               " reward)")
    raise
  return check_result(reward.name, result, int(images.shape[0]))
