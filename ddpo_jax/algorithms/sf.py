"""DDPO-SF: the score-function (REINFORCE) gradient, one optimizer step per data collection
(docs/algorithms.md §3.3)."""
from __future__ import annotations

import jax.numpy as jnp

from ddpo_jax.algorithms.base import PolicyGradient
from ddpo_jax.numerics import rl


class ScoreFunction(PolicyGradient):
  """`train.algorithm = "sf"`: `rl.score_function_loss`. Its gradient is the policy gradient at
  the sampling params only, so the whole epoch's samples make one optimizer step."""

  name = "sf"

  def validate(self, config, samples_per_epoch, samples_per_step):
    inner = int(config.train.num_inner_epochs)
    if samples_per_epoch != samples_per_step or inner != 1:
      # A second step on the same samples would be off-policy without an importance weight
      # (that is DDPO-IS).
      raise ValueError(
          f"train.algorithm='sf' takes one optimizer step per data collection (DDPO-SF, Black "
          f"et al. 2023, section 4.2): set train.batch_size*train.gradient_accumulation_steps="
          f"{samples_per_step} equal to the samples per epoch (sample.batch_size*"
          f"sample.num_batches_per_epoch={samples_per_epoch}) and train.num_inner_epochs=1 "
          f"(got {inner})")

  def surrogate(self, log_prob, batch, hp):
    loss = rl.score_function_loss(log_prob, batch["advantages"], hp.adv_clip_max,
                                  batch.get("sample_weights"))
    diff = log_prob - batch["log_probs"]  # 0 up to float error: SF is on-policy
    return loss, {"approx_kl": 0.5 * jnp.mean(diff ** 2), "clipfrac": jnp.zeros(())}
