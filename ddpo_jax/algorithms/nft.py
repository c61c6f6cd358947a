"""DiffusionNFT: negative-aware fine-tuning on the forward process (Zheng et al. 2025, arXiv
2509.16117; docs/algorithms.md §6.6).

A flow-matching regression on the sampled images' clean latents x0, not a policy gradient: no
step log-probabilities are used, so any sampler works (the flow ODE included). With the
old policy's velocity v_old (`TrainState.old_params`, held fixed) and the trained one v_θ at
x_t = (1 − t) x0 + t ε, t a sampling step's sigma (K of them per sample, drawn as a per-sample
permutation's first K),

    v⁺ = β v_θ + (1 − β) v_old            (the implicit positive policy)
    v⁻ = (1 + β) v_old − β v_θ            (the implicit negative policy)
    x̂0± = x_t − t v±,   w± = sg(mean |x̂0± − x0|)   (adaptive weights, at least 1e-5)
    L = c · E[ r mean (x̂0⁺ − x0)² / w⁺ + (1 − r) mean (x̂0⁻ − x0)² / w⁻ ] / β
        + β_KL · E[ mean (v_θ − v_ref)² ]

with r = clip(A / c / 2 + 1/2, 0, 1) the optimality probability from the clipped advantage A
(c = `train.adv_clip_max`), v_ref the pre-trained model's velocity (β_KL = `train.kl_beta`;
the reference's `train.beta`, 1e-4 in its configs). Pulling v⁺ towards high-reward samples and
v⁻ towards low-reward ones moves v_θ away from the low-reward ones.

The old policy samples the epoch and gives v_old; after the epoch (all inner epochs) it moves
towards the trained params, old ← d old + (1 − d) θ, d = DiffusionNFT's `return_decay(step,
decay_type)` (`train.nft_decay_type`, `train.make_old_policy_fn`; type 0: the current policy).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ddpo_jax.algorithms.base import Algorithm


@dataclasses.dataclass(frozen=True)
class NFTHyperparameters:
  """What DiffusionNFT's `batch_fields` and `loss` read.

  beta: β of the implicit policies (`train.nft_beta`).
  adv_clip_max: c, the advantage clip and the loss's scale (`train.adv_clip_max`).
  kl_beta: β_KL of the regression to the pre-trained velocity (`train.kl_beta`; 0: off).
  """
  beta: float
  adv_clip_max: float
  kl_beta: float


class NFT(Algorithm):
  """`train.algorithm = "nft"` on a flow model (`sample.sampler` 'sde', 'cps', 'ode' or
  'dpm2', the reference's);
  `train.nft_beta` is β. Trains CFG-free (`train.cfg` False or guidance 1)."""

  name = "nft"
  needs_log_probs = False
  needs_sampling_params = True
  keeps_old_params = True
  flow_timesteps_in_order = False  # train_nft_sd3.py: a per-sample permutation of the steps

  def needs_reference_params(self, config):
    return config.train.kl_beta > 0

  def ema_calls_per_step(self, config):
    return 1  # train_nft_sd3.py steps its EMAModuleWrapper once per optimizer step

  def validate(self, config, samples_per_epoch, samples_per_step):
    s, t = config.sample, config.train
    if s.sampler == "ddim":
      raise ValueError("train.algorithm='nft' trains a flow (velocity) model: sample.sampler "
                       "must be 'sde', 'cps', 'ode' or 'dpm2', not 'ddim'")
    if t.cfg and float(s.guidance_scale) != 1.0:
      raise ValueError(f"train.algorithm='nft' is CFG-free: set train.cfg=False (sampling may "
                       f"still use sample.guidance_scale={s.guidance_scale}) or guidance 1")

  def hyperparameters(self, config) -> NFTHyperparameters:
    t = config.train
    return NFTHyperparameters(beta=t.nft_beta, adv_clip_max=t.adv_clip_max, kl_beta=t.kl_beta)

  def batch_fields(self, traj, advantages, adv_scales, rewards, hp):
    c = hp.adv_clip_max
    r = jnp.clip(jnp.clip(advantages, -c, c) / c / 2.0 + 0.5, 0.0, 1.0)
    return ({"times": traj.times}, {"x0": traj.next_latents[:, -1], "optimality": r},
            {"nft_optimality_mean": jnp.mean(r)})

  def loss(self, model, params, batch, key, hp):
    beta, c = hp.beta, hp.adv_clip_max
    x0 = batch["x0"].astype(jnp.float32)
    sigma = batch["times"].astype(jnp.float32)  # (mb,) the sampling step's sigma
    t = sigma.reshape((-1,) + (1,) * (x0.ndim - 1))
    eps = jax.random.normal(key, x0.shape, jnp.float32)
    x_t = (1.0 - t) * x0 + t * eps
    v = model.velocity(params, x_t, sigma, batch["context"]).astype(jnp.float32)
    v_old = jax.lax.stop_gradient(
        model.velocity(model.sampling_params, x_t, sigma, batch["context"]).astype(jnp.float32))
    dims = tuple(range(1, x0.ndim))

    def weighted_error(v_implicit):
      x0_hat = x_t - t * v_implicit
      w = jax.lax.stop_gradient(jnp.maximum(jnp.mean(jnp.abs(x0_hat - x0), axis=dims), 1e-5))
      return jnp.mean((x0_hat - x0) ** 2, axis=dims) / w

    r = batch["optimality"]
    positive = weighted_error(beta * v + (1.0 - beta) * v_old)
    negative = weighted_error((1.0 + beta) * v_old - beta * v)
    loss = c * jnp.mean(r * positive + (1.0 - r) * negative) / beta
    metrics = {"nft_old_deviation": jnp.mean((v - v_old) ** 2)}
    kl_beta = hp.kl_beta
    if kl_beta > 0:  # train_nft_sd3.py's kl_div_loss against the pre-trained model
      v_ref = jax.lax.stop_gradient(
          model.velocity(model.reference_params, x_t, sigma, batch["context"]).astype(jnp.float32))
      kl = jnp.mean(jnp.mean((v - v_ref) ** 2, axis=dims))
      metrics["kl_div"] = kl
      loss = loss + kl_beta * kl
    metrics["loss"] = loss
    return loss, metrics
