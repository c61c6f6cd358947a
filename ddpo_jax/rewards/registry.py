"""The reward names a config may use (`config.reward.weights` / `metrics`), each with the
factory that builds its `Reward` term: `register`, `unregister`, `names`, `get`.

Each reward module registers its own names where it defines them, e.g. ddpo_jax/rewards/jpeg.py:

  @register("jpeg_compressibility", on_device=False)
  def make_jpeg_compressibility(config, log) -> Reward:
    return Reward("jpeg_compressibility", jpeg_compressibility, on_device=False)

and `ddpo_jax/rewards/__init__.py` imports the built-in modules so that their names are
registered. A task's own rewards (`Policy.rewards`, CTRL's) are not registered: `make_rewards`
looks them up first. "remote" and "remote_NAME" are reward-server terms (`is_remote`), built
from `config.reward.server_url(s)`, and cannot be registered.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from ddpo_jax.rewards.base import Reward

REMOTE = "remote"  # the term on `reward.server_url`
REMOTE_PREFIX = "remote_"  # "remote_NAME": the term on `reward.server_urls.NAME`


def is_remote(name: str) -> bool:
  """Whether reward term `name` is scored by a reward server ("remote" or "remote_NAME")."""
  return name == REMOTE or name.startswith(REMOTE_PREFIX)


@dataclasses.dataclass(frozen=True)
class RegisteredReward:
  """A registered reward name.

  Attributes:
    name: the key of `config.reward.weights` / `metrics` that selects it.
    make: (config, log) -> the `Reward` named `name`; `config` the whole run config (it reads
      its own `config.reward.*` keys), `log` a print-like function for progress messages
      (e.g. training a classifier the first time).
    on_device: whether the built `Reward` is a device reward (`Reward.on_device`).
    needs: dotted config keys (e.g. "reward.pickscore_path") that must be non-empty strings
      for `make` to work; `check_terms` refuses a config that uses `name` without them, before
      anything is loaded.
  """
  name: str
  make: Callable[..., Reward]
  on_device: bool
  needs: tuple[str, ...] = ()


_REGISTRY: dict[str, RegisteredReward] = {}


def register(name: str, *, on_device: bool, needs: tuple[str, ...] = ()):
  """Decorator: makes `make(config, log) -> Reward` available as reward `name`; returns `make`.

  Raises:
    ValueError: the name is empty, taken or a remote term's ("remote", "remote_NAME").
  """
  if not name or name in _REGISTRY:
    raise ValueError(f"reward name {name!r} is empty or already registered ({names()})")
  if is_remote(name):
    raise ValueError(f"reward name {name!r} is a reward-server term's ('remote' or "
                     "'remote_NAME', built from config.reward.server_url(s)): choose another")
  if isinstance(needs, str) or not all(isinstance(k, str) and k for k in needs):
    raise ValueError(f"reward {name!r}: needs={needs!r} must be a tuple of config keys such as "
                     "'reward.pickscore_path'")

  def decorator(make: Callable[..., Reward]) -> Callable[..., Reward]:
    _REGISTRY[name] = RegisteredReward(name, make, bool(on_device), tuple(needs))
    return make
  return decorator


def unregister(name: str) -> None:
  """Removes a registered reward (e.g. one a test added)."""
  _REGISTRY.pop(name)


def names() -> tuple[str, ...]:
  """The registered reward names, in registration order."""
  return tuple(_REGISTRY)


def get(name: str) -> RegisteredReward:
  """The registration of reward `name`.

  Raises:
    ValueError: an unregistered name, listing the registered ones.
  """
  if name not in _REGISTRY:
    raise ValueError(f"unknown reward {name!r}; registered: {', '.join(names())}")
  return _REGISTRY[name]
