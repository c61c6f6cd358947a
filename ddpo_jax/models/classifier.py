"""Small image classifiers trained offline (digit rewards, CTRL's p̂(y | x), evaluation).

Images are NHWC float32 in [0, 1]. The classifier is a small CNN; it is trained with Adam on
cross-entropy and calibrated by temperature scaling on a validation split. With `input_size`
set, the CNN first resizes its input to input_size × input_size (bilinear, antialiased), so one
model serves 8×8 digits and 64–512 px images alike; the default (None) uses the input as is.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ddpo_jax.models.conv import conv_general_dilated
from ddpo_jax.models.weights import host_init


def resize_images(images: jax.Array, size: int | None) -> jax.Array:
  """(B, H, W, C) -> (B, size, size, C) by antialiased bilinear resizing; identity when `size` is
  None or the images already have that size. Works on NumPy or JAX arrays, inside jit too."""
  if size is None or tuple(images.shape[1:3]) == (size, size):
    return images
  return jax.image.resize(images, (images.shape[0], size, size, images.shape[3]), "bilinear",
                          antialias=True)


def random_shift(key: jax.Array, images: jax.Array, max_shift: int, fill=0.0) -> jax.Array:
  """Translates each image (B, H, W, C) by its own random offset of up to `max_shift` pixels
  along each axis (uniform in [-max_shift, max_shift]); the uncovered border takes the value
  `fill` (a scalar or (C,) per channel; 0 = black for images in [0, 1]): the "pad and random
  crop" augmentation (torchvision's RandomCrop with padding and fill). Identity for 0."""
  if max_shift <= 0:
    return images
  b, h, w, c = images.shape
  pad = ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0))
  frame = jnp.pad(jnp.ones((1, h, w, 1), images.dtype), pad)  # 1 inside, 0 on the border
  padded = jnp.pad(images, pad) + (1 - frame) * jnp.asarray(fill, images.dtype)
  offsets = jax.random.randint(key, (b, 2), 0, 2 * max_shift + 1)
  return jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c)))(
      padded, offsets)


class SmallCNN(nn.Module):
  """Conv(32) -> Conv(64, stride 2) -> Dense(128) -> Dense(num_classes).

  Input (B, H, W, C) float in [0, 1]; output logits (B, num_classes) float32. `input_size`: if
  set, images are first resized to (input_size, input_size) (see `resize_images`), which keeps
  the Dense layer small for large images; None (the default) keeps the input size.
  """
  num_classes: int
  features: Sequence[int] = (32, 64)
  hidden: int = 128
  input_size: int | None = None

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    x = resize_images(images, self.input_size) * 2.0 - 1.0
    for i, f in enumerate(self.features):
      x = nn.silu(nn.Conv(f, (3, 3), strides=(1, 1) if i == 0 else (2, 2),
                          conv_general_dilated=conv_general_dilated)(x))
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
                     augment_noise: float = 0.0, augment_shift: int = 0,
                     input_size: int | None = None) -> Classifier:
  """Trains a `SmallCNN` by cross-entropy (AdamW, cosine decay); returns a `Classifier`.

  Args:
    images: (N, H, W, C) float32 in [0, 1].
    labels: (N,) int in [0, num_classes).
    augment_noise: std of Gaussian pixel noise added during training (robustness to the
      slightly noisy images a diffusion model produces).
    augment_shift: random translation of each training image by up to this many pixels of
      the (resized) input per axis (`random_shift`); 0: none.
    input_size: the `SmallCNN.input_size` (None: the images' own size). The training images
      are resized once up front, so training runs at input_size whatever the data's size.
  """
  images = np.asarray(images, np.float32)
  labels = np.asarray(labels, np.int32)
  if images.ndim != 4 or len(images) != len(labels):
    raise ValueError(f"images must be (N,H,W,C) with one label each; got {images.shape} and "
                     f"{labels.shape}")
  if len(labels) == 0:
    raise ValueError("no training examples")
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f"labels must lie in [0, {num_classes}); got [{labels.min()}, {labels.max()}]")
  module = SmallCNN(num_classes=num_classes, input_size=input_size)
  if input_size is not None:
    images = np.concatenate([np.asarray(resize_images(images[i:i + 256], input_size))
                             for i in range(0, len(images), 256)])
  key = jax.random.PRNGKey(seed)
  params = host_init(module, key, jnp.zeros((1,) + images.shape[1:]))
  tx = optax.adamw(optax.cosine_decay_schedule(learning_rate, steps), weight_decay=weight_decay)
  opt_state = jax.jit(tx.init)(params)  # one program, not one eager zeros per leaf
  images_d, labels_d = jnp.asarray(images), jnp.asarray(labels)

  @jax.jit
  def step(params, opt_state, key, images, labels):
    k_idx, k_noise = jax.random.split(key)
    k_shift = jax.random.fold_in(key, 1)  # folded: k_idx / k_noise stay as without a shift
    idx = jax.random.randint(k_idx, (batch_size,), 0, len(images))
    x, y = random_shift(k_shift, images[idx], augment_shift), labels[idx]
    x = x + augment_noise * jax.random.normal(k_noise, x.shape)

    def loss_fn(p):
      logits = module.apply({"params": p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  for i in range(steps):
    params, opt_state, _ = step(params, opt_state, jax.random.fold_in(key, i), images_d, labels_d)
  return Classifier(module=module, params=params)


@functools.partial(jax.jit, static_argnums=0)
def _apply(module: nn.Module, params: dict, images: jax.Array) -> jax.Array:
  return module.apply({"params": params}, images)


def predict_logits(classifier: Classifier, images: np.ndarray, temperature: bool = True,
                   batch_size: int = 512) -> np.ndarray:
  """Logits (N, num_classes) float32 on the host, computed `batch_size` images at a time.

  Args:
    images: (N, H, W, C) float in [0, 1].
    temperature: divide by the classifier's temperature (False: the raw network logits).
  """
  images = np.asarray(images, np.float32)
  out = [np.asarray(_apply(classifier.module, classifier.params, images[i:i + batch_size]))
         for i in range(0, len(images), batch_size)]
  logits = np.concatenate(out) if out else np.zeros((0, classifier.module.num_classes), np.float32)
  return logits / classifier.temperature if temperature else logits


def nll(logits: np.ndarray, labels: np.ndarray) -> float:
  """Mean negative log-likelihood (nats) of integer `labels` (N,) under `logits` (N, K)."""
  z = np.asarray(logits, np.float64)
  z = z - z.max(-1, keepdims=True)
  labels = np.asarray(labels)
  return float(-(z[np.arange(len(labels)), labels] - np.log(np.exp(z).sum(-1))).mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
  """The temperature T > 0 minimising the NLL of `labels` (N,) under `logits` (N, K) / T:
  a grid search over log T in [0.05, 20], plus T = 1, so the NLL never rises.

  If every example's label is the argmax of its logits, the NLL falls monotonically as T -> 0
  (d log p_y / d(1/T) = z_y - E_p[z] >= 0 when z_y is the largest logit): there is no
  minimiser, and the search would return its lower edge, an arbitrarily sharp classifier
  (seen on a 20-image validation split, T = 0.05, whose log-probs then dominated a CTRL
  reward). Such a validation set says nothing about the right sharpness, so T = 1 is kept.
  """
  logits, labels = np.asarray(logits, np.float64), np.asarray(labels)
  if len(labels) == 0 or np.all(logits.argmax(-1) == labels):
    return 1.0
  best_t, best_nll = 1.0, nll(logits, labels)
  for t in np.exp(np.linspace(np.log(0.05), np.log(20.0), 400)):
    value = nll(logits / t, labels)
    if value < best_nll:
      best_t, best_nll = float(t), value
  return best_t


def calibrate_temperature(classifier: Classifier, images: np.ndarray, labels: np.ndarray) -> Classifier:
  """Temperature scaling on a validation set (`fit_temperature` of the raw logits)."""
  logits = predict_logits(classifier, images, temperature=False)
  return dataclasses.replace(classifier, temperature=fit_temperature(logits, labels))


def accuracy(classifier: Classifier, images: np.ndarray, labels: np.ndarray) -> float:
  """Top-1 accuracy (fraction in [0, 1]) on images (N, H, W, C) in [0, 1], labels (N,)."""
  pred = predict_logits(classifier, images).argmax(-1)
  return float((pred == np.asarray(labels)).mean())


def expected_calibration_error(classifier: Classifier, images: np.ndarray, labels: np.ndarray,
                               num_bins: int = 10) -> float:
  """ECE with equal-width confidence bins (a fraction in [0, 1])."""
  z = predict_logits(classifier, images).astype(np.float64)
  probs = np.exp(z - z.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  conf, pred = probs.max(-1), probs.argmax(-1)
  correct = pred == np.asarray(labels)
  bins = np.minimum((conf * num_bins).astype(int), num_bins - 1)
  ece = 0.0
  for b in range(num_bins):
    m = bins == b
    if m.any():
      ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
  return float(ece)
