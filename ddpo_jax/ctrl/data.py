"""Offline labelled data for CTRL: (image, label) pairs for a new control y
(docs/algorithms.md §4.3).

Every source returns a `LabelledDataset`: images (N, H, W, C) float32 in [0, 1] (NHWC) and
labels (N,) int32 in [0, num_classes). Sources:
- `from_arrays` / `from_npz`: NumPy arrays (uint8 0–255 or float in [0, 1], NHWC or NHW);
- `from_folder`: a folder of PNG/JPEG images plus a CSV `filename,label`;
- `from_tfds`: a tensorflow-datasets data set already prepared in a local `data_dir` (read
  offline; array_record data sets need no TensorFlow, TFRecord ones do);
- the built-in digits sources (scikit-learn, no downloads): the digit class (10 classes) and the
  stroke-thickness level (3 classes, `thickness_level`).
`load_dataset(data_cfg)` picks one from a config and applies the label budget
(`num_labelled`, drawn by `LabelledDataset.subset`). Bad input raises `ValueError` (or
`FileNotFoundError`) naming the problem before anything trains.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import os
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from ddpo_jax.pipelines.digits import NUM_CLASSES, load_digits_split

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
SOURCES = ("digits_class", "digits_thickness", "npz", "folder", "tfds")
_MAX_LISTED = 10  # how many offending items an error message names


def _listing(items: Sequence[Any]) -> str:
  items = list(items)
  shown = ", ".join(repr(i) if isinstance(i, str) else str(i) for i in items[:_MAX_LISTED])
  more = f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
  return f"[{shown}]{more}"


# ----------------------------------------------------------------------------- the dataset


def _allocate(weights: np.ndarray, total: int, lo: np.ndarray, hi: np.ndarray,
              rng: np.random.Generator) -> np.ndarray:
  """Integer counts (K,) with lo ≤ counts ≤ hi summing to `total` (clipped to what the bounds
  allow), as close as possible to `total * weights / weights.sum()` (largest remainder; ties
  broken at random by `rng`)."""
  lo, hi = lo.astype(np.int64), hi.astype(np.int64)
  total = int(np.clip(total, lo.sum(), hi.sum()))
  ideal = total * weights / max(weights.sum(), 1e-12)
  counts = np.clip(np.floor(ideal).astype(np.int64), lo, hi)
  jitter = rng.random(len(weights)) * 1e-6
  while counts.sum() < total:
    room = counts < hi
    counts[np.argmax(np.where(room, ideal - counts + jitter, -np.inf))] += 1
  while counts.sum() > total:
    room = counts > lo
    counts[np.argmin(np.where(room, ideal - counts + jitter, np.inf))] -= 1
  return counts


@dataclasses.dataclass(frozen=True, eq=False)
class LabelledDataset:
  """Offline (image, label) pairs.

  Attributes:
    images: (N, H, W, C) float32 in [0, 1], NHWC.
    labels: (N,) int32 in [0, num_classes).
    num_classes: number of label values K (some may have no examples).
    name: a human-readable name (used in logs and errors).
  """
  images: np.ndarray
  labels: np.ndarray
  num_classes: int
  name: str = "dataset"

  def __post_init__(self):
    if self.images.ndim != 4 or self.images.dtype != np.float32:
      raise ValueError(f"{self.name}: images must be (N,H,W,C) float32, got {self.images.shape} "
                       f"{self.images.dtype}; build datasets with from_arrays()")
    if self.labels.shape != (len(self.images),) or self.labels.dtype != np.int32:
      raise ValueError(f"{self.name}: labels must be ({len(self.images)},) int32, got "
                       f"{self.labels.shape} {self.labels.dtype}; build datasets with "
                       f"from_arrays()")

  def __len__(self) -> int:
    return len(self.labels)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of one image."""
    return tuple(self.images.shape[1:])

  def class_counts(self) -> np.ndarray:
    """(num_classes,) int64: examples per class."""
    return np.bincount(self.labels, minlength=self.num_classes)

  def take(self, indices: np.ndarray, name: str | None = None) -> "LabelledDataset":
    """The examples at `indices` (int array), in that order."""
    indices = np.asarray(indices, np.int64)
    return LabelledDataset(self.images[indices], self.labels[indices], self.num_classes,
                           self.name if name is None else name)

  def _stratified_indices(self, n: int, rng: np.random.Generator, lo: np.ndarray,
                          hi: np.ndarray) -> np.ndarray:
    """n indices drawn without replacement, per-class counts from `_allocate` (sorted)."""
    counts = self.class_counts()
    take = _allocate(counts.astype(np.float64), n, lo, hi, rng)
    chosen = [rng.permutation(np.flatnonzero(self.labels == k))[:take[k]]
              for k in range(self.num_classes) if take[k] > 0]
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros((0,), np.int64)

  def subset(self, n: int | str | None, seed: int = 0) -> "LabelledDataset":
    """A label budget: n examples drawn without replacement, stratified by class.

    Every class that has examples appears when n ≥ the number of such classes; the per-class
    counts are otherwise proportional to the class frequencies. With n < that number, n
    distinct classes (chosen at random) get one example each. `None`, "all", or n ≥ len(self)
    returns the whole dataset. The same (n, seed) always gives the same subset; examples keep
    the dataset's order.
    """
    if n is None or (isinstance(n, str) and n.lower() == "all"):
      return self
    if isinstance(n, str) or int(n) != n or n < 1:
      raise ValueError(f"{self.name}: label budget must be a positive integer, None or 'all'; "
                       f"got {n!r}")
    n = int(n)
    if n >= len(self):
      return self
    rng = np.random.default_rng(seed)
    counts = self.class_counts()
    present = counts > 0
    if n >= present.sum():
      idx = self._stratified_indices(n, rng, present.astype(np.int64), counts)
    else:
      classes = rng.choice(np.flatnonzero(present), size=n, replace=False)
      idx = np.sort([rng.choice(np.flatnonzero(self.labels == k)) for k in classes])
    return self.take(idx, f"{self.name}[{n} labels, seed {seed}]")

  def split(self, fraction: float, seed: int = 0) -> tuple["LabelledDataset", "LabelledDataset"]:
    """(rest, held): about `fraction` of the examples held out (e.g. for validation), stratified.

    Each class keeps at least one example in `rest`; each class with ≥ 2 examples gets at least
    one in `held` when the held-out size allows it. Deterministic in `seed`.
    """
    if not 0.0 <= fraction < 1.0:
      raise ValueError(f"{self.name}: split fraction must lie in [0, 1); got {fraction}")
    rng = np.random.default_rng(seed)
    counts = self.class_counts()
    hi = np.maximum(counts - 1, 0)
    n_held = int(round(fraction * len(self)))
    lo = (counts >= 2).astype(np.int64)
    if n_held < lo.sum() or n_held == 0:
      lo = np.zeros_like(lo)
    held = self._stratified_indices(n_held, rng, lo, hi)
    mask = np.ones(len(self), bool)
    mask[held] = False
    rest = self.take(np.flatnonzero(mask), f"{self.name}[rest]")
    return rest, self.take(held, f"{self.name}[held]")


# ----------------------------------------------------------------------------- arrays and npz


def _check_labels(labels: Any, n_images: int, num_classes: int | None, name: str
                  ) -> tuple[np.ndarray, int]:
  """Validated labels (N,) int32 and num_classes; ValueError naming the problem otherwise."""
  if labels is None:
    raise ValueError(f"{name}: labels are missing (got None)")
  try:
    raw = np.asarray(labels)
  except Exception as e:  # ragged lists and the like
    raise ValueError(f"{name}: labels could not be read as an array: {e}") from e
  if raw.ndim == 2 and raw.shape[1] == 1:
    raw = raw[:, 0]
  if raw.ndim != 1:
    raise ValueError(f"{name}: labels must be one integer per image, shape (N,); got shape "
                     f"{raw.shape}")
  if len(raw) != n_images:
    raise ValueError(f"{name}: {n_images} images but {len(raw)} labels (lengths must match)")
  if raw.dtype == object:
    missing = [i for i, v in enumerate(raw) if v is None or (isinstance(v, float) and np.isnan(v))]
    if missing:
      raise ValueError(f"{name}: missing labels (None/NaN) at indices {_listing(missing)}")
    try:
      raw = raw.astype(np.float64)
    except (TypeError, ValueError) as e:
      raise ValueError(f"{name}: labels must be integers; got non-numeric values ({e})") from e
  if raw.dtype.kind == "b" or raw.dtype.kind not in "iuf":
    raise ValueError(f"{name}: labels must be integers; got dtype {raw.dtype}")
  if raw.dtype.kind == "f":
    missing = np.flatnonzero(~np.isfinite(raw))
    if len(missing):
      raise ValueError(f"{name}: missing labels (NaN/inf) at indices {_listing(missing.tolist())}")
    frac = np.flatnonzero(raw != np.round(raw))
    if len(frac):
      raise ValueError(f"{name}: labels must be integers; non-integer values "
                       f"{_listing(raw[frac].tolist())} at indices {_listing(frac.tolist())}")
  negative = np.flatnonzero(raw < 0)
  if len(negative):
    raise ValueError(f"{name}: negative labels (missing-label markers?) at indices "
                     f"{_listing(negative.tolist())}; labels must lie in [0, num_classes)")
  if len(raw) and raw.max() > np.iinfo(np.int32).max:
    raise ValueError(f"{name}: label {raw.max()} is too large")
  labels = raw.astype(np.int32)
  if num_classes is None:
    num_classes = int(labels.max()) + 1 if len(labels) else 0
  elif int(num_classes) != num_classes or num_classes < 1:
    raise ValueError(f"{name}: num_classes must be a positive integer; got {num_classes!r}")
  num_classes = int(num_classes)
  too_big = np.flatnonzero(labels >= num_classes)
  if len(too_big):
    raise ValueError(f"{name}: labels {_listing(sorted(set(labels[too_big].tolist())))} at "
                     f"indices {_listing(too_big.tolist())} are ≥ num_classes={num_classes}")
  return labels, num_classes


def _check_images(images: Any, name: str) -> np.ndarray:
  """Validated images (N, H, W, C) float32 in [0, 1]; ValueError naming the problem otherwise."""
  if images is None:
    raise ValueError(f"{name}: images are missing (got None)")
  try:
    x = np.asarray(images)
  except Exception as e:
    raise ValueError(f"{name}: images could not be read as an array (different sizes?): {e}") from e
  if x.dtype == object:
    raise ValueError(f"{name}: images could not be stacked into one array (different sizes "
                     f"or missing images?)")
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4:
    raise ValueError(f"{name}: images must be (N,H,W,C) or (N,H,W); got ndim {x.ndim} (shape "
                     f"{x.shape})")
  if x.shape[0] == 0:
    raise ValueError(f"{name}: empty data: no images")
  if min(x.shape[1:]) == 0:
    raise ValueError(f"{name}: images have an empty dimension: shape {x.shape}")
  if x.dtype.kind == "b":
    return x.astype(np.float32)
  if x.dtype.kind in "iu":
    lo, hi = x.min(), x.max()
    if lo < 0 or hi > 255:
      raise ValueError(f"{name}: integer images must lie in 0–255 (uint8 scale); got values in "
                       f"[{lo}, {hi}]")
    return (x.astype(np.float32) / 255.0)
  if x.dtype.kind != "f":
    raise ValueError(f"{name}: images must be uint8 (0–255) or float in [0, 1]; got dtype "
                     f"{x.dtype}")
  finite = np.isfinite(x).reshape(len(x), -1).all(-1)
  if not finite.all():
    raise ValueError(f"{name}: non-finite pixels (NaN/inf) in images at indices "
                     f"{_listing(np.flatnonzero(~finite).tolist())}")
  lo, hi = float(x.min()), float(x.max())
  if lo < -1e-6 or hi > 1.0 + 1e-6:
    hint = " (0–255 values stored as float? divide by 255)" if hi > 1.0 else ""
    raise ValueError(f"{name}: float images must lie in [0, 1]; got values in [{lo:g}, {hi:g}]"
                     f"{hint}")
  return np.clip(x, 0.0, 1.0).astype(np.float32)


def from_arrays(images: Any, labels: Any, num_classes: int | None = None,
                name: str = "arrays") -> LabelledDataset:
  """A `LabelledDataset` from arrays.

  Args:
    images: (N, H, W, C) or (N, H, W) (C = 1 is added); uint8 (or other integers) on the
      0–255 scale, bool, or float in [0, 1].
    labels: (N,) (or (N, 1)) integers in [0, num_classes); float arrays holding whole numbers
      are accepted.
    num_classes: K; None takes max(label) + 1.
    name: the dataset's name (in logs and errors).

  Raises:
    ValueError: mismatched lengths, missing labels (None / NaN / negative), non-integer
      labels, labels ≥ num_classes, empty data, wrong ndim, non-finite or out-of-range pixels.
  """
  x = _check_images(images, name)
  y, k = _check_labels(labels, len(x), num_classes, name)
  return LabelledDataset(images=x, labels=y, num_classes=k, name=name)


def from_npz(path: str, image_key: str = "images", label_key: str = "labels",
             num_classes: int | None = None, name: str | None = None) -> LabelledDataset:
  """A `LabelledDataset` from a .npz file holding `image_key` and `label_key` arrays (see
  `from_arrays` for their formats). Pickled object arrays are refused."""
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"npz file {path!r} does not exist")
  name = name or os.path.splitext(os.path.basename(path))[0]
  try:
    with np.load(path, allow_pickle=False) as f:
      missing = [k for k in (image_key, label_key) if k not in f.files]
      if missing:
        raise ValueError(f"{path}: no array(s) {missing} in the npz; it holds {sorted(f.files)} "
                         f"(set image_key / label_key)")
      images, labels = f[image_key], f[label_key]
  except ValueError as e:
    if "allow_pickle" in str(e) or "Object arrays" in str(e):
      raise ValueError(f"{path}: holds pickled object arrays (missing values?); store numeric "
                       f"arrays only") from e
    raise
  return from_arrays(images, labels, num_classes=num_classes, name=name)


# ----------------------------------------------------------------------------- image folders


def _image_size_hw(image_size: int | Sequence[int] | None) -> tuple[int, int] | None:
  if image_size is None or (not isinstance(image_size, (tuple, list)) and not image_size):
    return None
  if isinstance(image_size, (tuple, list)):
    if len(image_size) != 2:
      raise ValueError(f"image_size must be an int or (height, width); got {image_size!r}")
    return int(image_size[0]), int(image_size[1])
  return int(image_size), int(image_size)


def _pil_to_array(img, size_hw: tuple[int, int] | None, channels: int) -> np.ndarray:
  """A PIL image -> (H, W, channels) float32 in [0, 1], resized to size_hw (LANCZOS) if given."""
  from PIL import Image
  if img.mode in ("I;16", "I;16B", "I;16L", "I"):
    img = Image.fromarray((np.asarray(img, np.float64) / 65535.0 * 255.0).round()
                          .clip(0, 255).astype(np.uint8))
  img = img.convert("L" if channels == 1 else "RGB")
  if size_hw is not None and img.size != (size_hw[1], size_hw[0]):
    img = img.resize((size_hw[1], size_hw[0]), Image.Resampling.LANCZOS)
  x = np.asarray(img, np.float32) / 255.0
  return x[..., None] if x.ndim == 2 else x


def _read_labels_csv(csv_path: str) -> dict[str, str]:
  """{filename: label string} from a `filename,label` CSV (header optional)."""
  rows: dict[str, str] = {}
  duplicates = []
  first = True
  with open(csv_path, newline="", encoding="utf-8-sig") as f:
    for lineno, row in enumerate(csv.reader(f), start=1):
      row = [c.strip() for c in row]
      if not row or all(not c for c in row) or row[0].startswith("#"):
        continue
      if len(row) < 2:
        raise ValueError(f"{csv_path} line {lineno}: expected 'filename,label', got {row!r} "
                         f"(missing label?)")
      filename, label = row[0], row[1]
      if first:
        first = False
        if os.path.splitext(filename)[1].lower() not in IMAGE_EXTENSIONS:
          try:
            float(label)
          except ValueError:
            continue  # a header row such as "filename,label"
      key = os.path.normpath(filename).replace(os.sep, "/")
      if key in rows:
        duplicates.append(filename)
      rows[key] = label
  if duplicates:
    raise ValueError(f"{csv_path}: files listed more than once: {_listing(duplicates)}")
  return rows


def from_folder(path: str, labels_file: str = "labels.csv",
                image_size: int | Sequence[int] | None = None,
                num_classes: int | None = None, name: str | None = None) -> LabelledDataset:
  """A `LabelledDataset` from a folder of images plus a CSV of `filename,label` rows.

  Args:
    path: the folder; images are the .png/.jpg/.jpeg files in it and its subfolders (CSV
      filenames are relative to it, e.g. `a.png` or `cats/a.png`).
    labels_file: the CSV, relative to `path` (or absolute); a header row is optional; lines
      starting with '#' are skipped.
    image_size: None requires every image to have the same size; an int (square) or
      (height, width) resizes every image to it (LANCZOS).
    num_classes: K; None takes max(label) + 1.
  Images are read with PIL, as grayscale (C = 1) if they all are, RGB (C = 3) otherwise;
  examples are sorted by filename.

  Raises:
    FileNotFoundError: no such folder or labels file.
    ValueError: images with no label row, label rows whose file is missing, unreadable
      images, images of different sizes (image_size None), bad labels. Each names the files.
  """
  from PIL import Image, UnidentifiedImageError
  root = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(root):
    raise FileNotFoundError(f"image folder {path!r} does not exist")
  csv_path = labels_file if os.path.isabs(labels_file) else os.path.join(root, labels_file)
  if not os.path.isfile(csv_path):
    raise FileNotFoundError(f"labels file {csv_path!r} does not exist (expected a CSV of "
                            f"'filename,label' rows)")
  name = name or os.path.basename(root.rstrip("/"))
  rows = _read_labels_csv(csv_path)
  files = set()
  for dirpath, _, filenames in os.walk(root):
    for fn in filenames:
      if os.path.splitext(fn)[1].lower() in IMAGE_EXTENSIONS:
        files.add(os.path.relpath(os.path.join(dirpath, fn), root).replace(os.sep, "/"))
  unlabelled = sorted(files - set(rows))
  if unlabelled:
    raise ValueError(f"{root}: images with no label row in {os.path.basename(csv_path)}: "
                     f"{_listing(unlabelled)}")
  missing = sorted(set(rows) - files)
  if missing:
    raise ValueError(f"{csv_path}: label rows whose image file is missing (or not "
                     f"{'/'.join(IMAGE_EXTENSIONS)}): {_listing(missing)}")
  if not rows:
    raise ValueError(f"{root}: empty data: no images and no label rows in {csv_path}")
  names = sorted(rows)
  empty = [fn for fn in names if rows[fn] == "" or rows[fn].lower() in ("nan", "none", "null")]
  if empty:
    raise ValueError(f"{csv_path}: missing labels (empty/NaN) for {_listing(empty)}")
  bad_labels = []
  labels = []
  for fn in names:
    try:
      v = float(rows[fn])
    except ValueError:
      bad_labels.append(f"{fn}: {rows[fn]!r}")
      continue
    labels.append(v)
  if bad_labels:
    raise ValueError(f"{csv_path}: labels must be integers; got {_listing(bad_labels)}")
  size_hw = _image_size_hw(image_size)
  opened, unreadable, sizes, gray = [], [], {}, True
  for fn in names:
    try:
      img = Image.open(os.path.join(root, fn))
      img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
      unreadable.append(f"{fn} ({type(e).__name__})")
      continue
    opened.append(img)
    sizes.setdefault((img.height, img.width), []).append(fn)
    gray &= img.mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
  if unreadable:
    raise ValueError(f"{root}: unreadable images: {_listing(unreadable)}")
  if size_hw is None and len(sizes) > 1:
    desc = "; ".join(f"{h}x{w}: {_listing(fns[:3])}" for (h, w), fns in sorted(sizes.items()))
    raise ValueError(f"{root}: images of different sizes (H x W) — {desc}; pass image_size "
                     f"to resize them")
  channels = 1 if gray else 3
  images = np.stack([_pil_to_array(img, size_hw, channels) for img in opened])
  y, k = _check_labels(np.asarray(labels), len(images), num_classes, f"{csv_path}")
  return LabelledDataset(images=_check_images(images, name), labels=y, num_classes=k, name=name)


# ----------------------------------------------------------------------------- tensorflow-datasets


def _tfds():
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise ImportError("the 'tfds' source needs tensorflow-datasets: pip install "
                      "'ddpo_jax[tfds]'") from e
  return tfds


def _tfds_examples(tfds, builder, name: str, split: str, data_dir: str) -> Any:
  """A random-access sequence of examples (dicts of NumPy values), read offline."""
  def not_prepared(e):
    return FileNotFoundError(f"tfds data set {name!r} is not prepared in data_dir {data_dir!r} "
                             f"(nothing is downloaded: prepare it there first, e.g. `tfds build "
                             f"{name} --data_dir={data_dir} --file_format=array_record`): {e}")
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except (AssertionError, FileNotFoundError) as e:
    raise not_prepared(e) from e
  except (NotImplementedError, ValueError) as e:
    if not builder.is_prepared():
      raise not_prepared(e) from e
    if "split" in str(e).lower() and "random access" not in str(e).lower():
      raise ValueError(f"tfds:{name}: bad split {split!r}: {e}") from e
    # Data sets stored as TFRecord (the default of `tfds build` with TensorFlow) have no
    # random-access source; read them through tf.data, which needs TensorFlow.
    msg = str(e).lower()
    if "array_record" not in msg and "file format" not in msg and "random access" not in msg:
      raise
    import importlib.util
    if importlib.util.find_spec("tensorflow") is None:
      raise ValueError(f"tfds data set {name!r} in {data_dir!r} is not stored as array_record, "
                       f"and reading other formats needs TensorFlow (pip install "
                       f"tensorflow-cpu), or re-prepare it with file_format='array_record'") from e
    ds = tfds.load(name, split=split, data_dir=data_dir, download=False)
    return list(tfds.as_numpy(ds))


def from_tfds(name: str, data_dir: str, split: str = "train", image_key: str = "image",
              label_key: str = "label", image_size: int | Sequence[int] | None = None,
              num_classes: int | None = None) -> LabelledDataset:
  """A `LabelledDataset` from a tensorflow-datasets data set prepared in a local `data_dir`.

  Read offline (`download=False`) through `tfds.data_source`, which needs no TensorFlow for
  data sets stored as array_record; TFRecord-stored ones are read with `tfds.load` if
  TensorFlow is installed. Works for registered data sets ("mnist") and for any prepared data
  set directory under data_dir (`name` may carry a config/version, "my_ds/1.0.0").

  Args:
    name: the tfds name.
    data_dir: the local tfds data directory (it must exist).
    split: a tfds split spec ("train", "test[:50%]", ...).
    image_key / label_key: the feature names of the image (H, W, C) uint8 or float in [0, 1]
      and of the integer label.
    image_size: None requires one size; an int or (height, width) resizes (LANCZOS).
    num_classes: K; None takes the label feature's ClassLabel.num_classes when it is one,
      else max(label) + 1.
  """
  tfds = _tfds()
  data_dir = os.path.abspath(os.path.expanduser(data_dir))
  if not os.path.isdir(data_dir):
    raise FileNotFoundError(f"tfds data_dir {data_dir!r} does not exist")
  label = f"tfds:{name}[{split}]"
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # tfds raises its own DatasetNotFoundError and friends
    raise FileNotFoundError(f"tfds data set {name!r} not found (neither registered nor prepared "
                            f"in {data_dir!r}): {e}") from e
  features = builder.info.features
  keys = list(features.keys()) if hasattr(features, "keys") else []
  missing = [k for k in (image_key, label_key) if k not in keys]
  if missing:
    raise ValueError(f"{label}: no feature(s) {missing}; the data set has {keys} (set "
                     f"image_key / label_key)")
  if num_classes is None:
    num_classes = getattr(features[label_key], "num_classes", None)
  examples = _tfds_examples(tfds, builder, name, split, data_dir)
  n = len(examples)
  if n == 0:
    raise ValueError(f"{label}: empty data: the split has no examples")
  size_hw = _image_size_hw(image_size)
  images, labels = [], []
  for i in range(n):
    ex = examples[i]
    images.append(np.asarray(ex[image_key]))
    labels.append(np.asarray(ex[label_key]).reshape(()))
  if size_hw is not None:
    from PIL import Image
    resized = []
    for x in images:
      if x.ndim == 3 and x.shape[-1] == 1:
        x = x[..., 0]
      if x.dtype != np.uint8:
        x = (np.clip(np.asarray(x, np.float32), 0, 1) * 255).round().astype(np.uint8)
      img = Image.fromarray(x)
      c = 1 if img.mode == "L" else 3
      resized.append(_pil_to_array(img, size_hw, c))
    images = resized
  else:
    shapes = {}
    for i, x in enumerate(images):
      shapes.setdefault(x.shape, []).append(i)
    if len(shapes) > 1:
      desc = "; ".join(f"{s}: indices {_listing(ix[:3])}" for s, ix in shapes.items())
      raise ValueError(f"{label}: images of different sizes — {desc}; pass image_size to "
                       f"resize them")
  return from_arrays(np.stack(images), np.stack(labels), num_classes=num_classes, name=label)


# ----------------------------------------------------------------------------- digits sources


def digits_class(split: str = "train") -> LabelledDataset:
  """scikit-learn digits with the digit class (10 classes); split "train" / "heldout" / "all"
  as in `ddpo_jax.pipelines.digits.load_digits_split`. Images (N, 8, 8, 1) float32 = pixel / 16."""
  images, labels = load_digits_split(split)
  return LabelledDataset(images, labels.astype(np.int32), NUM_CLASSES, f"digits_class[{split}]")


THICKNESS_LEVELS = 3
THICKNESS_PERCENTILES = (33.0, 67.0)


@functools.lru_cache(maxsize=1)
def thickness_cuts() -> tuple[float, float]:
  """(c1, c2): the 33rd and 67th percentiles (NumPy's default linear interpolation) of the mean
  intensity on the 0–16 scale over all 1797 scikit-learn digits."""
  images, _ = load_digits_split("all")
  v = (images.astype(np.float64) * 16.0).reshape(len(images), -1).mean(-1)
  c1, c2 = np.percentile(v, THICKNESS_PERCENTILES)
  return float(c1), float(c2)


def thickness_level(images: np.ndarray) -> np.ndarray:
  """Stroke-thickness level of images (N, H, W, C) or (N, H, W) float in [0, 1] -> (N,) int32
  in {0, 1, 2}: v = mean(image * 16) (the digits' 0–16 scale); 0 if v < c1, 1 if c1 ≤ v < c2,
  2 otherwise, with (c1, c2) = `thickness_cuts()`."""
  x = np.asarray(images, np.float64)
  v = (x * 16.0).reshape(len(x), -1).mean(-1)
  c1, c2 = thickness_cuts()
  return ((v >= c1).astype(np.int32) + (v >= c2).astype(np.int32)).astype(np.int32)


def thickness_level_jax(images: jnp.ndarray) -> jnp.ndarray:
  """`thickness_level` in JAX (jit-able; the same levels up to float32 rounding at the cuts):
  images (N, ...) float in [0, 1] -> (N,) int32."""
  c1, c2 = thickness_cuts()
  v = jnp.mean(images.reshape(images.shape[0], -1).astype(jnp.float32) * 16.0, axis=-1)
  return (v >= c1).astype(jnp.int32) + (v >= c2).astype(jnp.int32)


def digits_thickness(split: str = "train") -> LabelledDataset:
  """scikit-learn digits labelled with `thickness_level` (3 classes: thin, medium, thick)."""
  images, _ = load_digits_split(split)
  return LabelledDataset(images, thickness_level(images), THICKNESS_LEVELS,
                         f"digits_thickness[{split}]")


# ----------------------------------------------------------------------------- from a config


def _field(data_cfg, key: str, default: Any = None, required: bool = False) -> Any:
  value = data_cfg.get(key, None) if hasattr(data_cfg, "get") else getattr(data_cfg, key, None)
  if required and (value is None or value == ""):
    raise ValueError(f"data config with source={data_cfg.get('source')!r} needs the field "
                     f"{key!r}")
  return default if value is None or value == "" else value


def _optional_int(value: Any) -> int | None:
  """None / "" / 0 / -1 / "all" -> None; otherwise int."""
  if value is None or value == "" or (isinstance(value, str) and value.lower() in ("all", "none")):
    return None
  if isinstance(value, (tuple, list)):
    return value
  return None if int(value) <= 0 else int(value)


def load_dataset(data_cfg) -> LabelledDataset:
  """The labelled dataset a config describes, with its label budget applied.

  `data_cfg` (an ml_collections ConfigDict or a dict) has `source` in `SOURCES` and:
  - "digits_class" / "digits_thickness": `split` ("train", "heldout", "all"; default "train");
  - "npz": `path`, optional `image_key` ("images"), `label_key` ("labels"), `name`;
  - "folder": `path`, optional `labels_file` ("labels.csv"), `image_size`, `name`;
  - "tfds": `name`, `data_dir`, optional `split` ("train"), `image_key` ("image"),
    `label_key` ("label"), `image_size`;
  and optional `num_classes` (None/0: inferred), `num_parts` / `part` (keep only part `part` of
  `num_parts` disjoint, fixed (seed 0) shares of the examples, e.g. two controls labelled on
  different images), `num_labelled` (the label budget, drawn from that part; None, 0 or
  "all": every example) and `seed` (of the budget draw; default 0).
  Raises ValueError for an unknown source or a missing field.
  """
  if isinstance(data_cfg, dict):
    import ml_collections
    data_cfg = ml_collections.ConfigDict(data_cfg)
  source = _field(data_cfg, "source", required=True)
  if source not in SOURCES:
    raise ValueError(f"unknown data source {source!r}; choose one of {SOURCES}")
  num_classes = _optional_int(_field(data_cfg, "num_classes"))
  image_size = _optional_int(_field(data_cfg, "image_size"))
  if source in ("digits_class", "digits_thickness"):
    split = _field(data_cfg, "split", "train")
    ds = digits_class(split) if source == "digits_class" else digits_thickness(split)
    if num_classes is not None and num_classes != ds.num_classes:
      raise ValueError(f"data source {source!r} has {ds.num_classes} classes, config says "
                       f"num_classes={num_classes}")
  elif source == "npz":
    ds = from_npz(_field(data_cfg, "path", required=True),
                  image_key=_field(data_cfg, "image_key", "images"),
                  label_key=_field(data_cfg, "label_key", "labels"),
                  num_classes=num_classes, name=_field(data_cfg, "name"))
  elif source == "folder":
    ds = from_folder(_field(data_cfg, "path", required=True),
                     labels_file=_field(data_cfg, "labels_file", "labels.csv"),
                     image_size=image_size, num_classes=num_classes,
                     name=_field(data_cfg, "name"))
  else:
    ds = from_tfds(_field(data_cfg, "name", required=True),
                   _field(data_cfg, "data_dir", required=True),
                   split=_field(data_cfg, "split", "train"),
                   image_key=_field(data_cfg, "image_key", "image"),
                   label_key=_field(data_cfg, "label_key", "label"),
                   image_size=image_size, num_classes=num_classes)
  num_parts = int(_field(data_cfg, "num_parts", 1))
  if num_parts > 1:
    part = int(_field(data_cfg, "part", 0))
    if not 0 <= part < num_parts:
      raise ValueError(f"data config: part={part} must lie in [0, num_parts={num_parts})")
    order = np.random.default_rng(0).permutation(len(ds))
    ds = ds.take(np.sort(order[part::num_parts]), name=f"{ds.name}[part {part}/{num_parts}]")
  return ds.subset(_optional_int(_field(data_cfg, "num_labelled")),
                   int(_field(data_cfg, "seed", 0)))
