"""Reward-weighted regression baselines: RWR and RWR-sparse (docs/algorithms.md §3.4).

The denoising (eps-regression) loss of the sampled images' clean latents, weighted per sample
by a function of the rewards; the trajectories' log-probs are not used.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from ddpo_jax.algorithms.base import Algorithm
from ddpo_jax.numerics import rl


@dataclasses.dataclass(frozen=True)
class RWRHyperparameters:
  """beta: the softmax temperature of the reward weights (`train.rwr_beta`)."""
  beta: float


@dataclasses.dataclass(frozen=True)
class SparseRWRHyperparameters:
  """quantile: the batch's reward quantile a sample must reach to be kept
  (`train.rwr_quantile`, in [0, 1])."""
  quantile: float


class RewardWeightedRegression(Algorithm):
  """`train.algorithm = "rwr"`: weights `rl.rwr_weights(rewards, train.rwr_beta)`.

  With `train.cfg` the regression target is the guided eps, as in the original's RWR
  (`train_cfg`: eps_u + w (eps_c − eps_u) against the noise)."""

  name = "rwr"
  uses_denoising_loss = True

  def hyperparameters(self, config) -> RWRHyperparameters:
    return RWRHyperparameters(beta=config.train.rwr_beta)

  def weights(self, rewards, hp):
    """(N,) float32 sample weights of the rewards (N,)."""
    return rl.rwr_weights(rewards, hp.beta)

  def batch_fields(self, traj, advantages, adv_scales, rewards, hp):
    per_sample = {"x0": traj.next_latents[:, -1], "weights": self.weights(rewards, hp)}
    return {}, per_sample, {}

  def loss(self, model, params, batch, key, hp):
    loss = jnp.mean(batch["weights"] * model.denoising_loss_terms(params, batch, key))
    return loss, {"loss": loss}


class SparseRewardWeightedRegression(RewardWeightedRegression):
  """`train.algorithm = "rwr_sparse"`: unit weight (normalised) on the samples with reward ≥
  the batch's `train.rwr_quantile`, zero elsewhere (`rl.rwr_sparse_weights`)."""

  name = "rwr_sparse"

  def hyperparameters(self, config) -> SparseRWRHyperparameters:
    return SparseRWRHyperparameters(quantile=config.train.rwr_quantile)

  def weights(self, rewards, hp):
    return rl.rwr_sparse_weights(rewards, hp.quantile)
