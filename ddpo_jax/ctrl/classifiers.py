"""CTRL's classifiers (docs/algorithms.md §4.3): the offline p̂(y | x) and the noisy classifier
of the classifier-guidance baseline, with Orbax save/load.

- `train_offline_classifier`: a `SmallCNN` (ddpo_jax/models/classifier.py) trained by cross-entropy on
  a `LabelledDataset`, temperature-calibrated on a stratified validation part; returns the
  calibrated `Classifier` (log p̂(y | x) on images (B, H, W, C) in [0, 1]) and a report.
- `NoisyClassifier` / `train_noisy_classifier`: p̂(y | x_t, t) on the diffusion variable x_t
  (e.g. digits pixels scaled to [-1, 1]) for classifier guidance.
- `save_classifier` / `load_classifier`: a directory holding `params/` (Orbax
  StandardCheckpointer) and `classifier.json` (module hyper-parameters, input shape,
  temperature, report). Written into a temporary sibling directory and renamed into place, so
  an interrupted save leaves nothing that loads.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from typing import Any, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ddpo_jax.ctrl.data import LabelledDataset
from ddpo_jax.models import classifier as clf_lib
from ddpo_jax.models.classifier import Classifier, SmallCNN, resize_images
from ddpo_jax.models.conv import conv_general_dilated
from ddpo_jax.models.weights import host_init

FORMAT_VERSION = 1
META_FILE = "classifier.json"
PARAMS_DIR = "params"


# ----------------------------------------------------------------------------- offline p̂(y | x)


def evaluate_classifier(classifier: Classifier, images: np.ndarray, labels: np.ndarray
                        ) -> dict[str, float]:
  """{"accuracy", "ece", "nll"} of `classifier` (with its temperature) on images (N, H, W, C)
  in [0, 1] and labels (N,); NaN for N = 0. nll in nats per example."""
  if len(labels) == 0:
    return {"accuracy": math.nan, "ece": math.nan, "nll": math.nan}
  logits = clf_lib.predict_logits(classifier, images)
  return {"accuracy": float((logits.argmax(-1) == labels).mean()),
          "ece": clf_lib.expected_calibration_error(classifier, images, labels),
          "nll": clf_lib.nll(logits, labels)}


def train_offline_classifier(dataset: LabelledDataset, *, seed: int = 0, steps: int = 600,
                             val_fraction: float = 0.2, augment_noise: float = 0.05,
                             augment_shift: int = 0, input_size: int | None = None,
                             batch_size: int = 128,
                             learning_rate: float = 2e-3) -> tuple[Classifier, dict]:
  """Trains and calibrates p̂(y | x) on `dataset`.

  A stratified `val_fraction` of the data is held out (`LabelledDataset.split`: every class
  keeps ≥ 1 training example); the `SmallCNN` is trained on the rest by cross-entropy
  (`ddpo_jax.models.classifier.train_classifier`), then temperature-scaled on the held-out part.

  Args:
    dataset: images (N, H, W, C) float32 in [0, 1], labels (N,) int32.
    seed: seeds the split and the training.
    steps / batch_size / learning_rate: AdamW steps (cosine decay) and their batch and peak lr.
    augment_noise: std of Gaussian pixel noise added to training images.
    augment_shift: translate each training image by up to this many pixels per axis
      (`ddpo_jax.models.classifier.random_shift`; 0: none).
    input_size: resize images to input_size × input_size inside the CNN (None: as they are).

  Returns:
    (classifier, report): the calibrated `Classifier` and {"accuracy_val", "ece_val_before",
    "ece_val_after", "nll_val_before", "nll_val_after", "temperature", "num_train", "num_val",
    "num_classes", "dataset", "input_shape"} (validation metrics NaN and temperature 1 when
    val_fraction leaves no validation example).
  """
  if len(dataset) == 0:
    raise ValueError(f"{dataset.name}: no examples to train a classifier on")
  train, val = dataset.split(val_fraction, seed)
  clf = clf_lib.train_classifier(train.images, train.labels, dataset.num_classes, seed=seed,
                                 steps=steps, batch_size=batch_size, learning_rate=learning_rate,
                                 augment_noise=augment_noise, augment_shift=augment_shift,
                                 input_size=input_size)
  before = evaluate_classifier(clf, val.images, val.labels)
  if len(val):
    clf = clf_lib.calibrate_temperature(clf, val.images, val.labels)
  after = evaluate_classifier(clf, val.images, val.labels)
  report = {"accuracy_val": before["accuracy"], "ece_val_before": before["ece"],
            "ece_val_after": after["ece"], "nll_val_before": before["nll"],
            "nll_val_after": after["nll"], "temperature": float(clf.temperature),
            "num_train": len(train), "num_val": len(val), "num_classes": dataset.num_classes,
            "dataset": dataset.name, "input_shape": list(dataset.image_shape)}
  return clf, report


# ----------------------------------------------------------------------------- noisy classifier


def timestep_embedding(timesteps: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding: timesteps (B,) int/float -> (B, dim) float32 [cos | sin]."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(timesteps, jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class NoisyClassifier(nn.Module):
  """p̂(y | x_t, t): a SmallCNN-like trunk with a timestep embedding added to its features.

  Conv(32) -> Conv(64, stride 2) -> Dense(hidden) -> Dense(num_classes), each hidden layer's
  pre-activation plus a projection of MLP(sinusoidal(t)).

  Inputs: x_t (B, H, W, C) float in the diffusion variable's space (e.g. digits pixels in
  [-1, 1], or SD latents); timesteps (B,) int in [0, num_train_timesteps) (a scalar is
  broadcast). Output: logits (B, num_classes) float32. `input_size`: resize x_t to
  input_size × input_size first (None: as is).
  """
  num_classes: int
  features: Sequence[int] = (32, 64)
  hidden: int = 128
  time_dim: int = 64
  input_size: int | None = None

  @nn.compact
  def __call__(self, x_t: jax.Array, timesteps: jax.Array) -> jax.Array:
    x = resize_images(x_t.astype(jnp.float32), self.input_size)
    t = jnp.broadcast_to(jnp.asarray(timesteps), (x.shape[0],))
    temb = timestep_embedding(t, self.time_dim)
    temb = nn.Dense(self.hidden, name="time_1")(temb)
    temb = nn.Dense(self.hidden, name="time_2")(nn.silu(temb))
    temb = nn.silu(temb)
    for i, f in enumerate(self.features):
      x = nn.Conv(f, (3, 3), strides=(1, 1) if i == 0 else (2, 2), name=f"conv_{i}",
                  conv_general_dilated=conv_general_dilated)(x)
      x = nn.silu(x + nn.Dense(f, name=f"time_proj_{i}")(temb)[:, None, None, :])
    x = x.reshape(x.shape[0], -1)
    x = nn.Dense(self.hidden, name="dense")(x)
    x = nn.silu(x + nn.Dense(self.hidden, name="time_proj")(temb))
    return nn.Dense(self.num_classes, name="head")(x)


@flax.struct.dataclass
class NoisyClassifierModel:
  """A trained `NoisyClassifier` (a pytree: `params` are leaves, the module is static).

  `log_probs(x_t, t)` -> (B, K) log p̂(y | x_t, t); jit-able and differentiable w.r.t. x_t.
  `params` can be moved into another params dict and passed back as `params=`.
  """
  module: NoisyClassifier = flax.struct.field(pytree_node=False)
  params: Any
  num_train_timesteps: int = flax.struct.field(pytree_node=False, default=1000)
  input_shape: tuple[int, int, int] | None = flax.struct.field(pytree_node=False, default=None)

  def logits(self, x_t: jax.Array, t: jax.Array, params: Any = None) -> jax.Array:
    """x_t (B, H, W, C), t (B,) int -> logits (B, K) float32."""
    return self.module.apply({"params": self.params if params is None else params}, x_t, t)

  def log_probs(self, x_t: jax.Array, t: jax.Array, params: Any = None) -> jax.Array:
    """x_t (B, H, W, C), t (B,) int -> log p̂(y | x_t, t) (B, K) float32."""
    return jax.nn.log_softmax(self.logits(x_t, t, params), axis=-1)


def noisy_accuracy(model: NoisyClassifierModel, x0: np.ndarray, labels: np.ndarray,
                   alphas_cumprod: np.ndarray, t_range: tuple[int, int], seed: int = 0,
                   batch_size: int = 512) -> float:
  """Accuracy on x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, t uniform in [t_range[0], t_range[1]]
  (inclusive). x0 (N, H, W, C) in the diffusion variable's space, labels (N,)."""
  a = jnp.asarray(alphas_cumprod, jnp.float32)

  @jax.jit
  def predict(params, x0, key):
    k_t, k_eps = jax.random.split(key)
    t = jax.random.randint(k_t, (x0.shape[0],), t_range[0], t_range[1] + 1)
    ab = a[t].reshape((-1,) + (1,) * (x0.ndim - 1))
    x_t = jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * jax.random.normal(k_eps, x0.shape)
    return jnp.argmax(model.logits(x_t, t, params), -1)

  key = jax.random.PRNGKey(seed)
  x0 = np.asarray(x0, np.float32)
  preds = [np.asarray(predict(model.params, x0[i:i + batch_size], jax.random.fold_in(key, i)))
           for i in range(0, len(x0), batch_size)]
  return float((np.concatenate(preds) == np.asarray(labels)).mean())


def train_noisy_classifier(x0: np.ndarray, labels: np.ndarray, num_classes: int,
                           alphas_cumprod: np.ndarray, *, seed: int = 0, steps: int = 2000,
                           batch_size: int = 128, learning_rate: float = 2e-3,
                           weight_decay: float = 1e-4, input_size: int | None = None,
                           features: Sequence[int] = (32, 64), hidden: int = 128,
                           time_dim: int = 64) -> NoisyClassifierModel:
  """Trains a `NoisyClassifier` by cross-entropy on noised data.

  Each step draws t uniformly in [0, T) (T = len(alphas_cumprod)) and
  x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, eps ~ N(0, I).

  Args:
    x0: (N, H, W, C) float, clean data in the diffusion variable's space (digits: pixels in
      [-1, 1]; SD: VAE latents).
    labels: (N,) int in [0, num_classes).
    alphas_cumprod: (T,) the noise schedule's cumulative alphas.
    seed / steps / batch_size / learning_rate / weight_decay: AdamW with cosine decay.
  """
  x0 = np.asarray(x0, np.float32)
  labels = np.asarray(labels, np.int32)
  if x0.ndim != 4 or len(x0) != len(labels) or len(x0) == 0:
    raise ValueError(f"x0 must be (N,H,W,C) with N ≥ 1 and one label each; got {x0.shape} and "
                     f"{labels.shape}")
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f"labels must lie in [0, {num_classes}); got [{labels.min()}, {labels.max()}]")
  if not np.isfinite(x0).all():
    raise ValueError("x0 has non-finite values")
  a = jnp.asarray(alphas_cumprod, jnp.float32)
  module = NoisyClassifier(num_classes=num_classes, features=tuple(features), hidden=hidden,
                           time_dim=time_dim, input_size=input_size)
  key = jax.random.PRNGKey(seed)
  params = host_init(module, key, jnp.zeros((1,) + x0.shape[1:]), jnp.zeros((1,), jnp.int32))
  tx = optax.adamw(optax.cosine_decay_schedule(learning_rate, steps), weight_decay=weight_decay)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, key, x_all, y_all):
    k_idx, k_t, k_eps = jax.random.split(key, 3)
    idx = jax.random.randint(k_idx, (batch_size,), 0, x_all.shape[0])
    x, y = x_all[idx], y_all[idx]
    t = jax.random.randint(k_t, (batch_size,), 0, a.shape[0])
    ab = a[t][:, None, None, None]
    x_t = jnp.sqrt(ab) * x + jnp.sqrt(1.0 - ab) * jax.random.normal(k_eps, x.shape)

    def loss_fn(p):
      logits = module.apply({"params": p}, x_t, t)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  x_d, y_d = jnp.asarray(x0), jnp.asarray(labels)
  for i in range(steps):
    params, opt_state, _ = step(params, opt_state, jax.random.fold_in(key, i), x_d, y_d)
  return NoisyClassifierModel(module=module, params=params, num_train_timesteps=int(a.shape[0]),
                              input_shape=tuple(int(s) for s in x0.shape[1:]))


# ----------------------------------------------------------------------------- save / load


def _module_spec(model) -> tuple[str, dict]:
  if isinstance(model, Classifier):
    m = model.module
    return "SmallCNN", {"num_classes": m.num_classes, "features": list(m.features),
                        "hidden": m.hidden, "input_size": m.input_size}
  if isinstance(model, NoisyClassifierModel):
    m = model.module
    return "NoisyClassifier", {"num_classes": m.num_classes, "features": list(m.features),
                               "hidden": m.hidden, "time_dim": m.time_dim,
                               "input_size": m.input_size}
  raise TypeError(f"cannot save a {type(model).__name__}; expected a Classifier or a "
                  f"NoisyClassifierModel")


def _to_jsonable(value: Any) -> Any:
  if isinstance(value, dict):
    return {str(k): _to_jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_to_jsonable(v) for v in value]
  if isinstance(value, (np.generic,)):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def save_classifier(path: str, classifier: Classifier | NoisyClassifierModel,
                    report: dict | None = None, input_shape: Sequence[int] | None = None) -> str:
  """Saves a `Classifier` or `NoisyClassifierModel` (and its report) to the directory `path`.

  `path/params` holds the params (Orbax StandardCheckpointer), `path/classifier.json` the
  module kind and hyper-parameters, the (H, W, C) input shape the params were built for
  (`input_shape`, else `report["input_shape"]`, else inferred from the params), num_classes,
  temperature and report. Everything is written to a temporary sibling directory first and
  renamed into place; an existing `path` is replaced. Returns the absolute path.
  """
  import orbax.checkpoint as ocp
  path = os.path.abspath(os.path.expanduser(path))
  kind, spec = _module_spec(classifier)
  report = dict(report or {})
  shape = (input_shape or report.get("input_shape") or getattr(classifier, "input_shape", None)
           or _infer_input_shape(classifier, kind))
  meta = {"format_version": FORMAT_VERSION, "kind": kind, "module": spec,
          "num_classes": spec["num_classes"], "input_shape": [int(s) for s in shape],
          "temperature": float(getattr(classifier, "temperature", 1.0)),
          "num_train_timesteps": getattr(classifier, "num_train_timesteps", None),
          "report": _to_jsonable(report)}
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
  try:
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.join(tmp, PARAMS_DIR), classifier.params)
    ckptr.wait_until_finished()
    ckptr.close()
    _write_json(os.path.join(tmp, META_FILE), meta)
    old = None
    if os.path.exists(path):
      old = os.path.join(parent, f".{os.path.basename(path)}.old-{uuid.uuid4().hex[:8]}")
      os.rename(path, old)
    os.rename(tmp, path)
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
  return path


def _write_json(path: str, obj: dict) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())


def _infer_input_shape(model, kind: str) -> tuple[int, int, int]:
  """(H, W, C) consistent with the params: C from the first conv kernel, H = W from the first
  Dense's fan-in (after the stride-2 convs), or the module's input_size."""
  m = model.module
  conv0 = model.params["conv_0" if kind == "NoisyClassifier" else "Conv_0"]["kernel"]
  c = int(conv0.shape[2])
  if m.input_size is not None:
    return (m.input_size, m.input_size, c)
  dense = model.params["dense" if kind == "NoisyClassifier" else "Dense_0"]["kernel"]
  spatial = int(round(math.sqrt(dense.shape[0] / m.features[-1])))
  for _ in m.features[1:]:
    spatial *= 2
  return (spatial, spatial, c)


def read_meta(path: str) -> dict:
  """The `classifier.json` of a saved classifier directory (FileNotFoundError if incomplete)."""
  path = os.path.abspath(os.path.expanduser(path))
  meta_path = os.path.join(path, META_FILE)
  if not (os.path.isfile(meta_path) and os.path.isdir(os.path.join(path, PARAMS_DIR))):
    raise FileNotFoundError(f"no saved classifier at {path} (expected {META_FILE} and "
                            f"{PARAMS_DIR}/)")
  with open(meta_path) as f:
    return json.load(f)


def load_classifier(path: str) -> tuple[Classifier | NoisyClassifierModel, dict]:
  """Loads what `save_classifier` wrote: (Classifier or NoisyClassifierModel, report)."""
  import orbax.checkpoint as ocp
  path = os.path.abspath(os.path.expanduser(path))
  meta = read_meta(path)
  if meta.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{path}: classifier format {meta.get('format_version')} is not "
                     f"{FORMAT_VERSION}")
  spec = dict(meta["module"])
  spec["features"] = tuple(spec["features"])
  shape = (1,) + tuple(meta["input_shape"])
  if meta["kind"] == "SmallCNN":
    module = SmallCNN(**spec)
    abstract = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros(shape)))
  elif meta["kind"] == "NoisyClassifier":
    module = NoisyClassifier(**spec)
    abstract = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros(shape),
                                                  jnp.zeros((1,), jnp.int32)))
  else:
    raise ValueError(f"{path}: unknown classifier kind {meta['kind']!r}")
  ckptr = ocp.StandardCheckpointer()
  try:
    params = ckptr.restore(os.path.join(path, PARAMS_DIR), abstract["params"])
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{path}: params do not match the saved module spec {meta['module']}: "
                     f"{e}") from e
  finally:
    ckptr.close()
  report = meta.get("report") or {}
  if meta["kind"] == "SmallCNN":
    return Classifier(module=module, params=params, temperature=float(meta["temperature"])), report
  return NoisyClassifierModel(module=module, params=params,
                              num_train_timesteps=int(meta.get("num_train_timesteps") or 1000),
                              input_shape=tuple(meta["input_shape"])), report


def load_noisy_classifier(path: str) -> NoisyClassifierModel:
  """`load_classifier` for a saved `NoisyClassifierModel` (ValueError for another kind)."""
  model, _ = load_classifier(path)
  if not isinstance(model, NoisyClassifierModel):
    raise ValueError(f"{path} holds a {type(model).__name__}, not a NoisyClassifierModel")
  return model


def load_or_train_classifier(path: str, dataset: LabelledDataset, **kw
                             ) -> tuple[Classifier, dict]:
  """Loads the classifier saved at `path`, or trains one on `dataset`
  (`train_offline_classifier(dataset, **kw)`) and saves it there.

  Raises:
    ValueError: the saved classifier has another number of classes, or expects another
      number of image channels, than `dataset`.
  """
  path = os.path.abspath(os.path.expanduser(path))
  try:
    meta = read_meta(path)
  except FileNotFoundError:
    meta = None
  if meta is not None:
    if meta.get("kind") != "SmallCNN":
      raise ValueError(f"{path} holds a {meta.get('kind')}, not an offline SmallCNN classifier")
    if meta["num_classes"] != dataset.num_classes:
      raise ValueError(f"the classifier saved at {path} has {meta['num_classes']} classes but "
                       f"dataset {dataset.name!r} has {dataset.num_classes}; delete {path} to "
                       f"retrain")
    saved_size, wanted = meta["module"].get("input_size"), kw.get("input_size")
    if "input_size" in kw and saved_size != wanted:
      raise ValueError(f"the classifier saved at {path} has input_size={saved_size} but "
                       f"input_size={wanted} was asked for; delete {path} to retrain")
    saved_c, data_c = meta["input_shape"][-1], dataset.image_shape[-1]
    if saved_c != data_c:
      raise ValueError(f"the classifier saved at {path} takes {saved_c}-channel images but "
                       f"dataset {dataset.name!r} has {data_c}; delete {path} to retrain")
    clf, report = load_classifier(path)
    return clf, report
  clf, report = train_offline_classifier(dataset, **kw)
  report = {**report, "input_shape": list(dataset.image_shape)}
  save_classifier(path, clf, report, input_shape=dataset.image_shape)
  return clf, report
