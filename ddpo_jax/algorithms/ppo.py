"""DDPO-IS: the PPO-clipped importance-sampling surrogate (docs/algorithms.md §3.2)."""
from __future__ import annotations

from ddpo_jax.algorithms.base import PolicyGradient
from ddpo_jax.numerics import rl


class PPO(PolicyGradient):
  """`train.algorithm = "ppo"`: `rl.ppo_clipped_loss` with `train.clip_range` and
  `train.adv_clip_max`; several optimizer steps per data collection are allowed."""

  name = "ppo"

  def surrogate(self, log_prob, batch, hp):
    loss, info = rl.ppo_clipped_loss(log_prob, batch["log_probs"], batch["advantages"],
                                     hp.clip_range, hp.adv_clip_max,
                                     batch.get("sample_weights"))
    return loss, {"approx_kl": info["approx_kl"], "clipfrac": info["clipfrac"]}
