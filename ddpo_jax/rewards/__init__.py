"""Rewards: plain functions of (images, prompts, metadata) -> (rewards (B,), info dict).

Two kinds, both with that signature:
- device rewards (`Reward.on_device=True`) are JAX functions of images (B,H,W,C) float32 in
  [0, 1], prompt token ids (B, L) int32 and metadata (dict of (B,) arrays); they are compiled
  into the same program as sampling and decoding, with no host round trip;
- host rewards (`on_device=False`) take uint8 NumPy images (B,H,W,C), a list of prompt strings
  and NumPy metadata; the trainer runs them on a thread pool so they overlap with sampling.

A training reward is a weighted sum of named terms (`config.reward.weights`); terms named in
`config.reward.metrics` are computed and logged only. `make_rewards` builds them by name.
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


def make_rewards(config, policy) -> list[tuple[float, Reward]]:
  """Builds the (weight, Reward) terms of `config.reward`: training terms then metrics (weight 0)."""
  names = dict(config.reward.weights)
  for name in config.reward.metrics:
    names.setdefault(name, 0.0)
  if not any(w != 0 for w in names.values()):
    raise ValueError("config.reward.weights must give at least one term a non-zero weight")
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
  if name == "remote":
    return Reward(name, remote_reward(config.reward.server_url, batch_size=16, timeout=120.0,
                                      retries=3, backoff=1.0), on_device=False)
  known = ", ".join(KNOWN_REWARDS + tuple(task_rewards))
  raise ValueError(f"unknown reward {name!r}; known: {known}")


KNOWN_REWARDS = ("jpeg_compressibility", "jpeg_incompressibility", "digit_class_logprob",
                 "digits_heldout_accuracy", "aesthetic", "pickscore", "clipscore", "remote")
