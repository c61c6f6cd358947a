"""The reward names a config may use (`config.reward.weights` / `metrics`), each with the
factory that builds its `Reward` term: `reward`, `register`, `unregister`, `names`, `get`.

Two decorators fill the one registry, both with `unregister` to undo them:
- `reward(name, on_device=)` registers a plain reward FUNCTION, (images, prompts, metadata) ->
  (rewards (B,), info dict), that needs nothing from the config (a user's reward in a notebook
  or script, docs/rewards.md "Your own reward in Python"); its factory is made for it;
- `register(name, on_device=, needs=)` registers a FACTORY, (config, log) -> `Reward`, for a
  reward that reads the config (paths, seeds), loads weights once, or adds prompt metadata
  (`Reward.prompt_metadata`). Each built-in reward module registers its names so, e.g.
  ddpo_jax/rewards/jpeg.py:

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
    fn: the plain reward function of a name registered with `reward` (`make` wraps it in a
      `Reward`); None for a factory registered with `register`.
  """
  name: str
  make: Callable[..., Reward]
  on_device: bool
  needs: tuple[str, ...] = ()
  fn: Callable[..., tuple] | None = None


_REGISTRY: dict[str, RegisteredReward] = {}


def _check_name(name: str, taken_ok: bool = False) -> None:
  """Refuses a name that is not a non-empty str, is taken (unless `taken_ok`), or is a remote
  term's."""
  if not isinstance(name, str):
    raise ValueError(f"reward name {name!r} must be a str, the key of config.reward.weights "
                     "(decorate with @reward('NAME') / @register('NAME', ...))")
  if not name or (name in _REGISTRY and not taken_ok):
    raise ValueError(f"reward name {name!r} is empty or already registered ({names()})")
  if is_remote(name):
    raise ValueError(f"reward name {name!r} is a reward-server term's ('remote' or "
                     "'remote_NAME', built from config.reward.server_url(s)): choose another")


def register(name: str, *, on_device: bool, needs: tuple[str, ...] = ()):
  """Decorator: makes the factory `make(config, log) -> Reward` available as reward `name`;
  returns `make`. For a plain reward function that needs nothing from the config, use `reward`.

  Raises:
    ValueError: the name is not a str, is empty, taken or a remote term's ("remote",
      "remote_NAME"); `needs` is not a tuple of non-empty keys.
  """
  _check_name(name)
  if isinstance(needs, str) or not all(isinstance(k, str) and k for k in needs):
    raise ValueError(f"reward {name!r}: needs={needs!r} must be a tuple of config keys such as "
                     "'reward.pickscore_path'")

  def decorator(make: Callable[..., Reward]) -> Callable[..., Reward]:
    _REGISTRY[name] = RegisteredReward(name, make, bool(on_device), tuple(needs))
    return make
  return decorator


def reward(name: str, *, on_device: bool = False):
  """Decorator: makes the plain reward function `fn` available as reward `name` (then
  `config.reward.weights = {name: weight}` trains on it, `config.reward.metrics` logs it);
  returns `fn` unchanged. `unregister(name)` removes it; registering the same function again
  (same module and qualified name: a notebook cell run again) replaces it.

  `fn(images, prompts, metadata) -> (rewards, info)`, `rewards` an array of shape (B,) (one
  number per image) and `info` a dict (possibly empty) of arrays logged as NAME_KEY_mean:
  - on_device=False (a host reward): `images` uint8 NumPy (B, H, W, C), `prompts` a list of B
    str, `metadata` a dict of NumPy arrays; it runs on the trainer's thread pool;
  - on_device=True (a device reward): a JAX-traceable function of `images` float32 (B, H, W, C)
    in [0, 1], the prompt token ids (B, L) int32 and a dict of (B, ...) arrays; it is compiled
    into the sampling program (its shapes are checked when that is traced).
  The trainer stops, naming the reward, on another shape, a non-array, a non-dict info or a
  NaN/inf reward (`ddpo_jax.rewards.check_result`). A reward that reads the config, loads
  weights once or adds prompt metadata is a factory instead: `register`.

  Raises:
    ValueError: the name is not a str, is empty, taken or a remote term's; `fn` is not
      callable.
  """
  _check_name(name, taken_ok=True)
  on_device = bool(on_device)

  def decorator(fn: Callable[..., tuple]) -> Callable[..., tuple]:
    if not callable(fn):
      raise ValueError(f"reward {name!r}: @reward decorates a function (images, prompts, "
                       f"metadata) -> (rewards, info), not {fn!r}")
    old = _REGISTRY.get(name)
    _check_name(name, taken_ok=old is not None and old.fn is not None and
                _where(old.fn) == _where(fn))

    def make(config, log) -> Reward:
      del config, log
      return Reward(name, fn, on_device=on_device)
    make.__module__ = getattr(fn, "__module__", make.__module__)
    make.__qualname__ = f"reward({getattr(fn, '__qualname__', repr(fn))})"
    _REGISTRY[name] = RegisteredReward(name, make, on_device, (), fn)
    return fn
  return decorator


def _where(fn) -> tuple:
  return getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)


def unregister(name: str) -> None:
  """Removes a registered reward (e.g. one a test added), registered with `reward` or
  `register`."""
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
