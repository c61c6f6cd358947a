"""The digits task's rewards (the task: ddpo_jax/pipelines/digits.py), both reading the prompted class
`metadata["class_label"]` (B,) int32 that `digits.prompt_metadata` provides:

  "digit_class_logprob"      device reward log p̂(prompted class | image) under the digits
                             reward classifier (a small CNN, `digits.reward_classifier`, seed
                             `config.reward.classifier_seed`), info "classifier_accuracy";
  "digits_heldout_accuracy"  host metric: 1 where an SVC trained on the held-out split only
                             (`digits.heldout_accuracy_metric`) predicts the prompted class.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from ddpo_jax.pipelines import digits
from ddpo_jax.rewards.base import Reward
from ddpo_jax.rewards.registry import register


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


@register("digit_class_logprob", on_device=True)
def make_digit_class_logprob(config, log) -> Reward:
  clf = digits.reward_classifier(config.reward.classifier_seed, log)
  return Reward("digit_class_logprob", classifier_log_prob_reward(clf.log_probs, "class_label"),
                on_device=True)


@register("digits_heldout_accuracy", on_device=False)
def make_digits_heldout_accuracy(config, log) -> Reward:
  del config, log
  return Reward("digits_heldout_accuracy", digits.heldout_accuracy_metric(), on_device=False)
