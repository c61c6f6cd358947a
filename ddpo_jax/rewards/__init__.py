"""Rewards: plain functions of (images, prompts, metadata) -> (rewards (B,), info dict).

Two kinds, both with that signature:
- device rewards (`Reward.on_device=True`) are JAX functions of images (B,H,W,C) float32 in
  [0, 1], prompt token ids (B, L) int32 and metadata (dict of (B,) arrays); they are compiled
  into the same program as sampling and decoding, with no host round trip;
- host rewards (`on_device=False`) take uint8 NumPy images (B,H,W,C), a list of prompt strings
  and NumPy metadata; the trainer runs them on a thread pool so they overlap with sampling.

A training reward is a weighted sum of named terms (`config.reward.weights`); terms named in
`config.reward.metrics` are computed and logged only. `make_rewards` builds them by name.

Remote terms (host rewards scored by a `python -m ddpo_jax.rewards.server` over HTTP, each its
own `RewardClient`): "remote" asks `config.reward.server_url`; "remote_NAME" asks
`config.reward.server_urls.NAME`, so one config can weight scorers hosted on several servers
(e.g. "remote_ocr" and "remote_geneval"). `remote_url` finds a term's URL and refuses a term
without one.
"""
from __future__ import annotations

import io
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from ddpo_jax import digits
from ddpo_jax.rewards.aesthetic import make_aesthetic_reward
from ddpo_jax.rewards.base import Reward
from ddpo_jax.rewards.clip_score import make_clipscore_reward, make_pickscore_reward
from ddpo_jax.rewards.client import remote_reward


def to_uint8(images) -> np.ndarray:
  """Float images in [0, 1] -> uint8 with rounding and clamping (before any image reward)."""
  return np.clip(np.round(np.asarray(images, np.float32) * 255.0), 0, 255).astype(np.uint8)


def jpeg_size_kb(images_uint8: np.ndarray, quality: int = 95) -> np.ndarray:
  """JPEG file size in kB (1000 bytes) of each uint8 image (B,H,W,C), PIL at `quality`."""
  sizes = []
  for img in images_uint8:
    pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", quality=quality)
    sizes.append(buf.tell() / 1000.0)
  return np.asarray(sizes, np.float32)


def jpeg_compressibility(images, prompts, metadata):
  """Reward = −JPEG size in kB (PIL quality 95). Host reward."""
  size = jpeg_size_kb(images)
  return -size, {"jpeg_kb": size}


def jpeg_incompressibility(images, prompts, metadata):
  """Reward = +JPEG size in kB (PIL quality 95). Host reward."""
  size = jpeg_size_kb(images)
  return size, {"jpeg_kb": size}


def classifier_log_prob_reward(log_prob_fn: Callable[[jax.Array], jax.Array], label_key: str):
  """Device reward log p̂(y | x) of the label `metadata[label_key]` under a classifier.

  Args:
    log_prob_fn: images (B,H,W,C) float32 in [0,1] -> (B, K) log-probabilities.
    label_key: the metadata entry holding the wanted label (B,) int32.
  """
  def fn(images, prompt_ids, metadata):
    log_probs = log_prob_fn(images)
    labels = metadata[label_key]
    reward = jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
    accuracy = (jnp.argmax(log_probs, -1) == labels).astype(jnp.float32)
    return reward, {"classifier_accuracy": accuracy}
  return fn


REMOTE = "remote"  # the term on `reward.server_url`
REMOTE_PREFIX = "remote_"  # "remote_NAME": the term on `reward.server_urls.NAME`


def is_remote(name: str) -> bool:
  """Whether reward term `name` is scored by a reward server ("remote" or "remote_NAME")."""
  return name == REMOTE or name.startswith(REMOTE_PREFIX)


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


def _term_names(config) -> dict[str, float]:
  names = dict(config.reward.weights)
  for name in config.reward.metrics:
    names.setdefault(name, 0.0)
  return names


def check_remote_terms(config, task_rewards=()) -> dict[str, str]:
  """{term: URL} of every remote term of `config.reward` (weights and metrics), without
  contacting any server; names in `task_rewards` (a task's own rewards) are not remote.
  Raises the ValueError of `remote_url` for a term without a URL: call it before building or
  compiling anything (`make_rewards` calls it before building its terms)."""
  return {name: remote_url(name, config.reward) for name in _term_names(config)
          if is_remote(name) and name not in task_rewards}


def make_rewards(config, policy) -> list[tuple[float, Reward]]:
  """Builds the (weight, Reward) terms of `config.reward`: training terms then metrics (weight 0).
  Each remote term is its own `RewardClient` (its own batching and retries) on its own URL."""
  names = _term_names(config)
  if not any(w != 0 for w in names.values()):
    raise ValueError("config.reward.weights must give at least one term a non-zero weight")
  check_remote_terms(config, policy.rewards)  # every URL before any term is built
  terms = []
  for name, weight in names.items():
    terms.append((float(weight), _build(name, config, policy)))
  return terms


def _build(name: str, config, policy) -> Reward:
  task_rewards = policy.rewards  # rewards a task defines (e.g. CTRL's)
  if name in task_rewards:
    return task_rewards[name]
  if name == "jpeg_compressibility":
    return Reward(name, jpeg_compressibility, on_device=False)
  if name == "jpeg_incompressibility":
    return Reward(name, jpeg_incompressibility, on_device=False)
  if name in ("digit_class_logprob", "digits_heldout_accuracy"):
    if name == "digit_class_logprob":
      clf = digits.reward_classifier(config.reward.classifier_seed)
      return Reward(name, classifier_log_prob_reward(clf.log_probs, "class_label"), True)
    return Reward(name, digits.heldout_accuracy_metric(), on_device=False)
  if name == "aesthetic":
    return Reward(name, make_aesthetic_reward(config.reward.clip_path,
                                              config.reward.aesthetic_mlp_path), on_device=True)
  if name == "pickscore":
    return make_pickscore_reward(config.reward.pickscore_path, name=name,
                                 tokenizer_path=config.reward.clip_tokenizer_path or None)
  if name == "clipscore":
    return make_clipscore_reward(config.reward.clipscore_path, name=name,
                                 tokenizer_path=config.reward.clip_tokenizer_path or None)
  if is_remote(name):
    # server_timeout_s: one POST; server_deadline_s: a whole call (all batches and tries).
    return Reward(name, remote_reward(
        remote_url(name, config.reward), batch_size=16,
        timeout=float(config.reward.server_timeout_s), retries=3, backoff=1.0,
        deadline_s=float(config.reward.server_deadline_s)), on_device=False)
  known = ", ".join(KNOWN_REWARDS + tuple(task_rewards))
  raise ValueError(f"unknown reward {name!r}; known: {known}")


KNOWN_REWARDS = ("jpeg_compressibility", "jpeg_incompressibility", "digit_class_logprob",
                 "digits_heldout_accuracy", "aesthetic", "pickscore", "clipscore", "remote",
                 "remote_NAME")  # remote_NAME: any NAME with a URL in reward.server_urls
