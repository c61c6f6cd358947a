"""Rewards: plain functions of (images, prompts, metadata) -> (rewards (B,), info dict).

Two kinds, both with that signature:
- device rewards (`Reward.on_device=True`) are JAX functions of images (B,H,W,C) float32 in
  [0, 1], prompt token ids (B, L) int32 and metadata (dict of (B,) arrays); they are compiled
  into the same program as sampling and decoding, with no host round trip;
- host rewards (`on_device=False`) take uint8 NumPy images (B,H,W,C), a list of prompt strings
  and NumPy metadata; the trainer runs them on a thread pool so they overlap with sampling.

A training reward is a weighted sum of named terms (`config.reward.weights`); terms named in
`config.reward.metrics` are computed and logged only. `make_rewards` builds them by name, looking
each up in this order:
- the task's own rewards (`Policy.rewards`, e.g. CTRL's log-likelihood and judge accuracies);
- the registry (`reward`, `register`, `names`, `get`: ddpo_jax/rewards/registry.py): `reward`
  registers a plain function (a user's reward, docs/rewards.md "Your own reward in Python"),
  `register` a factory reading the config; each built-in reward module registers its names,
  and this package imports them:
    jpeg.py             "jpeg_compressibility", "jpeg_incompressibility"   (host)
    digit_classifier.py "digit_class_logprob" (device), "digits_heldout_accuracy" (host)
    aesthetic.py        "aesthetic"                                        (device)
    clip_score.py       "pickscore", "clipscore"                           (device)
- remote terms (host rewards scored by a `python -m ddpo_jax.rewards.server` over HTTP, each its
  own `RewardClient`): "remote" asks `config.reward.server_url`; "remote_NAME" asks
  `config.reward.server_urls.NAME`, so one config can weight scorers hosted on several servers
  (e.g. "remote_ocr" and "remote_geneval"). `remote_url` finds a term's URL and refuses a term
  without one.
The trainer calls every reward through `call_reward`, which stops naming the reward when it
returns anything but (an array of shape (B,), a dict) (`check_result`; device rewards when the
sampling program is traced); NaN/inf rewards stop the epoch before the update.
`check_terms` refuses a config whose terms cannot be built (an unknown name, an empty path key a
reward needs, a remote term without a URL) before anything is loaded; docs/rewards.md, "Adding
a reward", shows how to add one.
"""
from __future__ import annotations

import numpy as np

# The built-in reward modules, imported for their registrations (in this order in `names()`).
from ddpo_jax.rewards import jpeg, digit_classifier, aesthetic, clip_score  # noqa: F401
from ddpo_jax.rewards.base import Reward, call_reward, check_result
from ddpo_jax.rewards.client import remote_reward
from ddpo_jax.rewards.registry import (REMOTE, REMOTE_PREFIX, RegisteredReward, get, is_remote,
                                       names, register, reward, unregister)


def to_uint8(images) -> np.ndarray:
  """Float images in [0, 1] -> uint8 with rounding and clamping (before any image reward)."""
  return np.clip(np.round(np.asarray(images, np.float32) * 255.0), 0, 255).astype(np.uint8)


def remote_url(name: str, reward_config) -> str:
  """The reward server URL of remote term `name` ("remote": `reward_config.server_url`;
  "remote_NAME": `reward_config.server_urls.NAME`).

  Raises:
    ValueError: "remote_" without a NAME, a named term whose NAME `server_urls` lacks (or maps
      to ''), or a URL that is not http(s); the message names the term and the key to set.
  """
  if name == REMOTE:
    key, url = "config.reward.server_url", reward_config.server_url
  else:
    server = name[len(REMOTE_PREFIX):]
    if not name.startswith(REMOTE_PREFIX) or not server:
      raise ValueError(f"reward term {name!r} is not a remote term: name one 'remote' (its server "
                       "at config.reward.server_url) or 'remote_NAME' (its server at "
                       "config.reward.server_urls.NAME)")
    urls = dict(reward_config.get("server_urls", {}))
    key, url = f"config.reward.server_urls.{server}", urls.get(server, "")
    flag = f"--{key}=http://HOST:PORT"
    if server not in urls:
      raise ValueError(
          f"reward term {name!r} has no reward server: config.reward.server_urls lacks "
          f"{server!r} (it names {sorted(urls)}). Add it in the config file, "
          f"reward.server_urls = {{{server!r}: 'http://HOST:PORT'}} (a mapping may only be "
          f"extended there, not on the command line, which can then set {flag})")
    if not url:
      raise ValueError(f"reward term {name!r} has no reward server: {key} is {url!r}; set it to "
                       f"the URL of the reward server scoring it, e.g. {flag}")
  if not isinstance(url, str) or not url.startswith(("http://", "https://")):
    raise ValueError(f"reward term {name!r}: {key}={url!r} must be a URL starting with http:// "
                     "or https://")
  return url


def term_names(config) -> dict[str, float]:
  """{term name: weight} of `config.reward.weights`, then each `config.reward.metrics` name not
  already there at weight 0."""
  terms = dict(config.reward.weights)
  for name in config.reward.metrics:
    terms.setdefault(name, 0.0)
  return terms


def check_remote_terms(config, task_rewards=()) -> dict[str, str]:
  """{term: URL} of every remote term of `config.reward` (weights and metrics), without
  contacting any server; names in `task_rewards` (a task's own rewards) are not remote.
  Raises the ValueError of `remote_url` for a term without a URL (`check_terms` calls it)."""
  return {name: remote_url(name, config.reward) for name in term_names(config)
          if is_remote(name) and name not in task_rewards}




def _config_value(config, key: str):
  """The value of dotted key `key` ("reward.pickscore_path") in `config`, None if absent."""
  node = config
  for part in key.split("."):
    if not hasattr(node, "keys") or part not in node:
      return None
    node = node[part]
  return node


def check_terms(config, task_rewards=None) -> None:
  """Refuses, before anything is loaded or compiled, a `config.reward` whose terms (weights and
  metrics) cannot all be built.

  Args:
    config: the run config.
    task_rewards: the names of the task's own rewards (`Policy.rewards`), or None while they are
      not known yet (CTRL's, before its policy is built): then a name that is neither registered
      nor remote is left to `make_rewards`.

  Raises:
    ValueError: no term has a non-zero weight; a name that is neither the task's, registered
      (`names()`) nor remote (the message lists the known ones); a registered term whose `needs`
      key is not a non-empty string (naming the key); a remote term without a URL
      (`remote_url`'s message).
  """
  terms = term_names(config)
  if not any(w != 0 for w in terms.values()):
    raise ValueError("config.reward.weights must give at least one term a non-zero weight")
  own = () if task_rewards is None else tuple(task_rewards)
  for name in terms:
    if name in own or is_remote(name):
      continue
    if name not in names():
      if task_rewards is None:
        continue
      known = ", ".join(names() + (REMOTE, REMOTE_PREFIX + "NAME") + own)
      raise ValueError(f"unknown reward {name!r} (config.reward.weights / metrics); known: "
                       f"{known} (remote_NAME: any NAME with a URL in "
                       "config.reward.server_urls; a new reward registers its name with "
                       "@ddpo_jax.rewards.reward (a function) or ddpo_jax.rewards.register (a "
                       "factory), docs/rewards.md)")
    for key in get(name).needs:
      value = _config_value(config, key)
      if not isinstance(value, str) or not value:
        raise ValueError(f"reward {name!r} needs config.{key}, which is {value!r}; set it, "
                         f"e.g. --config.{key}=PATH")
  check_remote_terms(config, own)


def make_rewards(config, policy, log=print) -> list[tuple[float, Reward]]:
  """Builds the (weight, Reward) terms of `config.reward`: training terms then metrics (weight 0),
  each looked up in `policy.rewards` (the task's own), then the registry, then as a remote term
  (its own `RewardClient` on its own URL). Every term is checked (`check_terms`) before any is
  built; `log` receives the builders' progress messages.

  Raises:
    ValueError: `check_terms`'s, or a registered builder that returned a `Reward` of another
      name or kind than it registered.
  """
  task_rewards = policy.rewards  # rewards a task defines (e.g. CTRL's)
  check_terms(config, task_rewards)
  return [(float(weight), build_term(name, config, task_rewards, log))
          for name, weight in term_names(config).items()]


def build_term(name: str, config, task_rewards, log=print) -> Reward:
  """The `Reward` of term `name` of `config.reward` (`make_rewards` builds each term here)."""
  if name in task_rewards:
    return task_rewards[name]
  if is_remote(name):
    # server_timeout_s: one POST; server_deadline_s: a whole call (all batches and tries).
    return Reward(name, remote_reward(
        remote_url(name, config.reward), batch_size=16,
        timeout=float(config.reward.server_timeout_s), retries=3, backoff=1.0,
        deadline_s=float(config.reward.server_deadline_s)), on_device=False)
  registered = get(name)
  built = registered.make(config, log)
  if not isinstance(built, Reward) or built.name != name or \
      built.on_device != registered.on_device:
    raise ValueError(f"reward {name!r}: its registered builder {registered.make.__qualname__} "
                     f"returned {built!r}; expected a Reward named {name!r} with on_device="
                     f"{registered.on_device} (as registered)")
  return built


__all__ = ["REMOTE", "REMOTE_PREFIX", "RegisteredReward", "Reward", "build_term", "call_reward",
           "check_remote_terms", "check_result", "check_terms", "get", "is_remote",
           "make_rewards", "names", "register", "remote_url", "reward", "term_names",
           "to_uint8", "unregister"]
