"""Small image classifiers trained offline (digit rewards, CTRL's p̂(y | x), evaluation).

Images are NHWC float32 in [0, 1]. The classifier is a small CNN; it is trained with Adam on
cross-entropy and calibrated by temperature scaling on a validation split.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax


class SmallCNN(nn.Module):
  """Conv(32) -> Conv(64, stride 2) -> Dense(128) -> Dense(num_classes). Input (B,H,W,C) in [0,1]."""
  num_classes: int
  features: Sequence[int] = (32, 64)
  hidden: int = 128

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    x = images * 2.0 - 1.0
    for i, f in enumerate(self.features):
      x = nn.silu(nn.Conv(f, (3, 3), strides=(1, 1) if i == 0 else (2, 2))(x))
    x = x.reshape(x.shape[0], -1)
    x = nn.silu(nn.Dense(self.hidden)(x))
    return nn.Dense(self.num_classes)(x)


@dataclasses.dataclass(frozen=True)
class Classifier:
  """A trained classifier: `log_probs(images) -> (B, num_classes)` log p̂(y | x), jit-able."""
  module: SmallCNN
  params: dict
  temperature: float = 1.0

  def logits(self, images: jax.Array, params: dict | None = None) -> jax.Array:
    p = self.params if params is None else params
    return self.module.apply({"params": p}, images) / self.temperature

  def log_probs(self, images: jax.Array) -> jax.Array:
    return jax.nn.log_softmax(self.logits(images), axis=-1)


def train_classifier(images: np.ndarray, labels: np.ndarray, num_classes: int, *,
                     seed: int = 0, steps: int = 600, batch_size: int = 128,
                     learning_rate: float = 2e-3, weight_decay: float = 1e-4,
                     augment_noise: float = 0.0) -> Classifier:
  """Trains a `SmallCNN` by cross-entropy (AdamW, cosine decay); returns a `Classifier`.

  Args:
    images: (N, H, W, C) float32 in [0, 1].
    labels: (N,) int in [0, num_classes).
    augment_noise: std of Gaussian pixel noise added during training (robustness to the
      slightly noisy images a diffusion model produces).
  """
  images = np.asarray(images, np.float32)
  labels = np.asarray(labels, np.int32)
  if images.ndim != 4 or len(images) != len(labels):
    raise ValueError(f"images must be (N,H,W,C) with one label each; got {images.shape} and "
                     f"{labels.shape}")
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f"labels must lie in [0, {num_classes}); got [{labels.min()}, {labels.max()}]")
  module = SmallCNN(num_classes=num_classes)
  key = jax.random.PRNGKey(seed)
  params = module.init(key, jnp.zeros((1,) + images.shape[1:]))["params"]
  tx = optax.adamw(optax.cosine_decay_schedule(learning_rate, steps), weight_decay=weight_decay)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, key):
    k_idx, k_noise = jax.random.split(key)
    idx = jax.random.randint(k_idx, (batch_size,), 0, len(images))
    x, y = jnp.asarray(images)[idx], jnp.asarray(labels)[idx]
    x = x + augment_noise * jax.random.normal(k_noise, x.shape)

    def loss_fn(p):
      logits = module.apply({"params": p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  for i in range(steps):
    params, opt_state, _ = step(params, opt_state, jax.random.fold_in(key, i))
  return Classifier(module=module, params=params)


def calibrate_temperature(classifier: Classifier, images: np.ndarray, labels: np.ndarray) -> Classifier:
  """Temperature scaling: picks T minimising validation NLL (grid search over log T)."""
  logits = np.asarray(classifier.module.apply({"params": classifier.params}, jnp.asarray(images)))
  labels = np.asarray(labels)
  best_t, best_nll = 1.0, np.inf
  for t in np.exp(np.linspace(np.log(0.05), np.log(20.0), 400)):
    z = logits / t
    z = z - z.max(-1, keepdims=True)
    nll = -(z[np.arange(len(labels)), labels] - np.log(np.exp(z).sum(-1))).mean()
    if nll < best_nll:
      best_t, best_nll = float(t), nll
  return dataclasses.replace(classifier, temperature=best_t)


def accuracy(classifier: Classifier, images: np.ndarray, labels: np.ndarray) -> float:
  pred = np.asarray(jnp.argmax(classifier.logits(jnp.asarray(images, jnp.float32)), -1))
  return float((pred == np.asarray(labels)).mean())


def expected_calibration_error(classifier: Classifier, images: np.ndarray, labels: np.ndarray,
                               num_bins: int = 10) -> float:
  """ECE with equal-width confidence bins."""
  probs = np.asarray(jnp.exp(classifier.log_probs(jnp.asarray(images, jnp.float32))))
  conf, pred = probs.max(-1), probs.argmax(-1)
  correct = pred == np.asarray(labels)
  bins = np.minimum((conf * num_bins).astype(int), num_bins - 1)
  ece = 0.0
  for b in range(num_bins):
    m = bins == b
    if m.any():
      ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
  return float(ece)
