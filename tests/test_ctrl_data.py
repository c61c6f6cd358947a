"""CTRL offline data (ddpo_jax/ctrl/data.py) and classifiers (ddpo_jax/ctrl/classifiers.py)."""
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from ddpo_jax.config_schema import new_config
from ddpo_jax.ctrl import classifiers, data
from ddpo_jax.models import classifier as clf_lib
from ddpo_jax.numerics import diffusion
from ddpo_jax.pipelines import digits


def _arrays(n=30, k=3, size=8, seed=0):
  """Unique uint8 images (n, size, size) (pixel 0 encodes the index) and labels i % k."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
  images[:, 0, 0] = np.arange(n)
  return images, np.arange(n) % k


# ----------------------------------------------------------------------------- arrays / npz


def test_from_arrays_formats():
  images, labels = _arrays()
  ds = data.from_arrays(images, labels)
  assert ds.images.shape == (30, 8, 8, 1) and ds.images.dtype == np.float32
  np.testing.assert_allclose(ds.images[..., 0], images / 255.0, rtol=1e-6)
  assert ds.labels.dtype == np.int32 and ds.num_classes == 3 and len(ds) == 30
  ds = data.from_arrays(images[..., None] / 255.0, labels.astype(np.float64), num_classes=5)
  assert ds.num_classes == 5 and ds.images.shape == (30, 8, 8, 1)
  rgb = data.from_arrays(np.zeros((4, 6, 6, 3), np.uint8), [0, 1, 0, 1], name="rgb")
  assert rgb.image_shape == (6, 6, 3) and rgb.name == "rgb"


@pytest.mark.parametrize("images, labels, kw, match", [
    (np.zeros((4, 8, 8)), [0, 1, 2], {}, "4 images but 3 labels"),
    (np.zeros((3, 8, 8)), None, {}, "labels are missing"),
    (np.zeros((3, 8, 8)), [0.0, np.nan, 1.0], {}, r"missing labels \(NaN/inf\) at indices \[1\]"),
    (np.zeros((3, 8, 8)), np.array([0, None, 1], object), {}, r"missing labels \(None/NaN\)"),
    (np.zeros((3, 8, 8)), [0, -1, 1], {}, r"negative labels .* indices \[1\]"),
    (np.zeros((3, 8, 8)), [0, 1.5, 1], {}, "labels must be integers"),
    (np.zeros((3, 8, 8)), [0, 1, 3], {"num_classes": 3},
     r"labels \[3\] at indices \[2\] are ≥ num_classes=3"),
    (np.zeros((0, 8, 8)), np.zeros((0,)), {}, "empty data"),
    (np.zeros((3, 8)), [0, 1, 2], {}, "ndim 2"),
    (np.zeros((3, 2, 8, 8, 1)), [0, 1, 2], {}, "ndim 5"),
    (np.array([np.zeros((8, 8)), np.full((8, 8), np.inf), np.zeros((8, 8))]), [0, 1, 2], {},
     r"non-finite pixels .* indices \[1\]"),
    (np.full((3, 8, 8), 200.0), [0, 1, 2], {}, "divide by 255"),
    (np.zeros((3, 8, 8)), [[0, 1], [1, 0], [0, 0]], {}, "one integer per image"),
])
def test_from_arrays_errors(images, labels, kw, match):
  with pytest.raises(ValueError, match=match):
    data.from_arrays(images, labels, **kw)


def test_from_npz(tmp_path):
  images, labels = _arrays()
  path = str(tmp_path / "pairs.npz")
  np.savez(path, x=images, y=labels)
  ds = data.from_npz(path, image_key="x", label_key="y")
  assert len(ds) == 30 and ds.name == "pairs" and ds.num_classes == 3
  with pytest.raises(ValueError, match=r"no array\(s\) \['images'\].*holds \['x', 'y'\]"):
    data.from_npz(path, label_key="y")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    data.from_npz(str(tmp_path / "nope.npz"))


# ----------------------------------------------------------------------------- image folders


def _write_folder(root, n=6, size=(8, 8), mode="L", header=True):
  os.makedirs(root, exist_ok=True)
  rng = np.random.default_rng(0)
  arrays = {}
  rows = ["filename,label"] if header else []
  for i in range(n):
    shape = size if mode == "L" else size + (3,)
    a = rng.integers(0, 256, shape, dtype=np.uint8)
    fn = f"img_{i:02d}.png"
    Image.fromarray(a, mode=mode).save(os.path.join(root, fn))
    arrays[fn] = a
    rows.append(f"{fn},{i % 3}")
  with open(os.path.join(root, "labels.csv"), "w") as f:
    f.write("\n".join(rows) + "\n")
  return arrays


def test_from_folder(tmp_path):
  arrays = _write_folder(str(tmp_path / "gray"))
  ds = data.from_folder(str(tmp_path / "gray"))
  assert ds.images.shape == (6, 8, 8, 1) and ds.num_classes == 3 and ds.name == "gray"
  np.testing.assert_allclose(ds.images[2, ..., 0], arrays["img_02.png"] / 255.0, rtol=1e-6)
  np.testing.assert_array_equal(ds.labels, [0, 1, 2, 0, 1, 2])
  _write_folder(str(tmp_path / "rgb"), mode="RGB", header=False)
  ds = data.from_folder(str(tmp_path / "rgb"), num_classes=4)
  assert ds.images.shape == (6, 8, 8, 3) and ds.num_classes == 4
  # Different sizes are resized when image_size is given.
  Image.fromarray(np.zeros((16, 12, 3), np.uint8)).save(str(tmp_path / "rgb" / "big.png"))
  with open(tmp_path / "rgb" / "labels.csv", "a") as f:
    f.write("big.png,1\n")
  ds = data.from_folder(str(tmp_path / "rgb"), image_size=4)
  assert ds.images.shape == (7, 4, 4, 3)


def test_from_folder_errors(tmp_path):
  root = tmp_path / "d"
  _write_folder(str(root))
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(str(root / "extra.png"))
  with pytest.raises(ValueError, match=r"images with no label row in labels.csv: \['extra.png'\]"):
    data.from_folder(str(root))
  os.remove(root / "extra.png")
  os.remove(root / "img_03.png")
  with pytest.raises(ValueError, match=r"label rows whose image file is missing.*\['img_03.png'\]"):
    data.from_folder(str(root))
  _write_folder(str(root))
  (root / "img_04.png").write_bytes(b"not a png at all")
  with pytest.raises(ValueError, match=r"unreadable images: \['img_04.png"):
    data.from_folder(str(root))
  _write_folder(str(root))
  Image.fromarray(np.zeros((10, 8), np.uint8)).save(str(root / "img_05.png"))
  with pytest.raises(ValueError, match=r"different sizes.*10x8: \['img_05.png'\].*image_size"):
    data.from_folder(str(root))
  _write_folder(str(root))
  with open(root / "labels.csv", "a") as f:
    f.write("img_00.png,2\n")
  with pytest.raises(ValueError, match=r"listed more than once: \['img_00.png'\]"):
    data.from_folder(str(root))
  _write_folder(str(root))
  with open(root / "labels.csv", "w") as f:
    f.write("filename,label\n"
            + "".join(f"img_{i:02d}.png,{'' if i == 1 else 0}\n" for i in range(6)))
  with pytest.raises(ValueError, match=r"missing labels.*\['img_01.png'\]"):
    data.from_folder(str(root))
  with pytest.raises(FileNotFoundError, match="labels file"):
    data.from_folder(str(root), labels_file="nope.csv")


# ----------------------------------------------------------------------------- tensorflow-datasets


def test_from_tfds_mock(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=12):
    ds = data.from_tfds("mnist", data_dir=str(tmp_path))
    small = data.from_tfds("mnist", data_dir=str(tmp_path), split="test", image_size=14)
  assert ds.images.shape == (12, 28, 28, 1) and ds.num_classes == 10  # from the ClassLabel
  assert ds.labels.dtype == np.int32 and ds.labels.max() < 10
  assert small.images.shape == (12, 14, 14, 1)
  with tfds.testing.mock_data(num_examples=3):
    with pytest.raises(ValueError, match=r"no feature\(s\) \['img'\]"):
      data.from_tfds("mnist", data_dir=str(tmp_path), image_key="img")
  with pytest.raises(FileNotFoundError, match="not prepared in data_dir"):
    data.from_tfds("mnist", data_dir=str(tmp_path))


def test_from_tfds_prepared_array_record(tmp_path):
  """A real, unregistered data set prepared as array_record in data_dir, read without TF."""
  tfds = pytest.importorskip("tensorflow_datasets")

  class TinyLabelled(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "pixels": tfds.features.Tensor(shape=(6, 6, 1), dtype=np.uint8),
          "grade": tfds.features.ClassLabel(num_classes=4)}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(9)}

    def _generate_examples(self, n):
      for i in range(n):
        yield i, {"pixels": np.full((6, 6, 1), 10 * i, np.uint8), "grade": i % 4}

  TinyLabelled(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  ds = data.from_tfds("tiny_labelled", data_dir=str(tmp_path), image_key="pixels",
                      label_key="grade")
  assert ds.images.shape == (9, 6, 6, 1) and ds.num_classes == 4
  order = np.argsort(ds.images[:, 0, 0, 0])
  np.testing.assert_allclose(ds.images[order, 0, 0, 0], np.arange(9) * 10 / 255.0, rtol=1e-6)
  np.testing.assert_array_equal(ds.labels[order], np.arange(9) % 4)
  half = data.from_tfds("tiny_labelled", data_dir=str(tmp_path), split="train[:50%]",
                        image_key="pixels", label_key="grade", num_classes=6)
  assert len(half) == 4 and half.num_classes == 6
  with pytest.raises(ValueError, match="bad split 'validation'"):
    data.from_tfds("tiny_labelled", data_dir=str(tmp_path), split="validation",
                   image_key="pixels", label_key="grade")
  # A TFRecord-stored data set needs TensorFlow: a clear error when it is not installed.
  info_path = tmp_path / "tiny_labelled" / "1.0.0" / "dataset_info.json"
  info = json.loads(info_path.read_text())
  info_path.write_text(json.dumps({**info, "fileFormat": "tfrecord"}))
  if importlib.util.find_spec("tensorflow") is None:
    with pytest.raises(ValueError, match="not stored as array_record.*needs TensorFlow"):
      data.from_tfds("tiny_labelled", data_dir=str(tmp_path), image_key="pixels",
                     label_key="grade")


# ----------------------------------------------------------------------------- subset / split


def test_subset_stratified_and_deterministic():
  full = data.digits_class("train")
  for n in (10, 37, 100):
    sub = full.subset(n, seed=3)
    assert len(sub) == n and (sub.class_counts() >= 1).all()
    assert sub.class_counts().max() - sub.class_counts().min() <= 1 + n // 10 * 0.2 + 1
  np.testing.assert_array_equal(full.subset(10, 0).class_counts(), np.ones(10))
  a, b, c = full.subset(50, 1), full.subset(50, 1), full.subset(50, 2)
  np.testing.assert_array_equal(a.images, b.images)
  assert not np.array_equal(a.images, c.images)
  small = data.from_arrays(*_arrays(n=30, k=3))
  for seed in range(5):  # without replacement: pixel (0, 0) is each image's index
    idx = np.round(small.subset(20, seed).images[:, 0, 0, 0] * 255).astype(int)
    assert len(set(idx.tolist())) == 20
  two = small.subset(2, 0)
  assert len(two) == 2 and len(set(two.labels.tolist())) == 2
  assert small.subset(None, 0) is small and small.subset("all", 0) is small
  assert len(small.subset(500, 0)) == 30
  with pytest.raises(ValueError, match="label budget"):
    small.subset(-3, 0)
  # Imbalanced classes: counts proportional to the class frequencies, every class present.
  imb = data.from_arrays(np.zeros((100, 2, 2)), [0] * 80 + [1] * 15 + [2] * 5)
  np.testing.assert_array_equal(imb.subset(20, 0).class_counts(), [16, 3, 1])


def test_split_keeps_every_class_in_training():
  ds = data.digits_class("train").subset(12, seed=0)  # 10 classes, two with 2 examples
  rest, held = ds.split(0.2, seed=0)
  assert len(held) == 2 and (rest.class_counts() >= 1).all()
  full = data.digits_class("train").subset(300, seed=0)
  rest, held = full.split(0.2, seed=1)
  assert len(held) == 60 and len(rest) == 240 and (held.class_counts() >= 5).all()
  both = np.concatenate([rest.images, held.images]).reshape(300, -1)
  assert len(np.unique(both, axis=0)) == len(np.unique(full.images.reshape(300, -1), axis=0))


# ----------------------------------------------------------------------------- digits sources


def test_thickness_rule_matches_independent_numpy():
  from sklearn.datasets import load_digits
  raw = load_digits().images  # (1797, 8, 8) float64 on 0..16
  v = raw.reshape(len(raw), -1).mean(-1)
  c1, c2 = np.percentile(v, [33, 67])
  expected = np.where(v < c1, 0, np.where(v < c2, 1, 2))
  assert data.thickness_cuts() == pytest.approx((c1, c2), abs=1e-12)
  images = (raw / 16.0).astype(np.float32)[..., None]
  np.testing.assert_array_equal(data.thickness_level(images), expected)
  np.testing.assert_array_equal(np.asarray(jax.jit(data.thickness_level_jax)(images)), expected)
  ds = data.digits_thickness("all")
  np.testing.assert_array_equal(ds.labels, expected)
  assert ds.num_classes == 3 and np.all(np.abs(ds.class_counts() / len(ds) - 1 / 3) < 0.03)
  heldout = data.digits_thickness("heldout")
  np.testing.assert_array_equal(heldout.labels, data.thickness_level(heldout.images))
  assert len(data.digits_class("heldout")) == len(heldout) == 359


def test_load_dataset(tmp_path):
  cfg = ml_collections.ConfigDict({"source": "digits_class", "split": "train",
                                   "num_labelled": 40, "seed": 1})
  ds = data.load_dataset(cfg)
  assert len(ds) == 40 and ds.num_classes == 10
  assert len(data.load_dataset({"source": "digits_thickness", "split": "heldout"})) == 359
  images, labels = _arrays()
  np.savez(str(tmp_path / "p.npz"), images=images, labels=labels)
  ds = data.load_dataset({"source": "npz", "path": str(tmp_path / "p.npz"), "num_labelled": "all",
                          "num_classes": 4})
  assert len(ds) == 30 and ds.num_classes == 4
  _write_folder(str(tmp_path / "f"))
  assert len(data.load_dataset({"source": "folder", "path": str(tmp_path / "f"),
                                "num_labelled": 0})) == 6
  with pytest.raises(ValueError, match="unknown data source 'csv'"):
    data.load_dataset({"source": "csv"})
  with pytest.raises(ValueError, match="source='npz'.*needs the field 'path'"):
    data.load_dataset({"source": "npz"})
  with pytest.raises(ValueError, match="needs the field 'data_dir'"):
    data.load_dataset({"source": "tfds", "name": "mnist"})


# ----------------------------------------------------------------------------- classifiers


@pytest.fixture(scope="module")
def digits_300():
  ds = data.digits_class("train").subset(300, seed=0)
  clf, report = classifiers.train_offline_classifier(ds, seed=0, steps=300)
  return ds, clf, report


def test_offline_classifier_accuracy_and_calibration(digits_300):
  ds, clf, report = digits_300
  held = data.digits_class("heldout")
  assert classifiers.evaluate_classifier(clf, held.images, held.labels)["accuracy"] >= 0.85
  assert report["num_train"] == 240 and report["num_val"] == 60 and report["num_classes"] == 10
  assert report["nll_val_after"] <= report["nll_val_before"] + 1e-9
  assert report["temperature"] == clf.temperature > 0
  assert set(report) >= {"accuracy_val", "ece_val_before", "ece_val_after", "nll_val_before",
                         "nll_val_after", "temperature", "num_train", "num_val", "num_classes"}
  lp = jax.jit(clf.log_probs)(held.images[:4])
  assert lp.shape == (4, 10) and np.allclose(np.exp(lp).sum(-1), 1, atol=1e-5)


def test_random_shift_is_a_padded_translation():
  """Each output image is its input translated by an integer (dy, dx) in [-s, s]², the
  uncovered border filled with the per-channel fill value (np.pad as the reference); over many
  images every offset occurs; s = 0 is the identity."""
  s, n, fill = 2, 400, np.array([-1.0, 0.5], np.float32)
  images = np.random.default_rng(0).random((n, 6, 5, 2)).astype(np.float32)
  out = np.asarray(clf_lib.random_shift(jax.random.PRNGKey(0), jnp.asarray(images), s, fill))
  padded = np.stack([np.pad(images[..., ch], ((0, 0), (s, s), (s, s)), constant_values=fill[ch])
                     for ch in range(2)], -1)
  seen = set()
  for i in range(n):
    matches = [(dy, dx) for dy in range(2 * s + 1) for dx in range(2 * s + 1)
               if np.array_equal(out[i], padded[i, dy:dy + 6, dx:dx + 5])]
    assert len(matches) == 1, i
    seen.add(matches[0])
  assert len(seen) == (2 * s + 1) ** 2
  same = clf_lib.random_shift(jax.random.PRNGKey(0), jnp.asarray(images), 0)
  np.testing.assert_array_equal(np.asarray(same), images)


def test_fit_temperature_against_scipy_and_on_a_separable_set():
  """Temperature scaling minimises the validation NLL (checked against scipy's bounded scalar
  minimiser on log T, to the grid's spacing); on a validation set with every label the argmax
  the NLL has no minimiser (it falls as T -> 0) and T stays 1."""
  from scipy.optimize import minimize_scalar
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 10, 200)
  for scale, wrong in ((8.0, 0.3), (0.5, 0.1)):  # over-confident with errors; under-confident
    logits = rng.normal(size=(200, 10))
    flip = rng.random(200) < wrong
    logits[np.arange(200), np.where(flip, (labels + 1) % 10, labels)] += 3.0
    logits *= scale
    t = clf_lib.fit_temperature(logits, labels)
    ref = np.exp(minimize_scalar(lambda lt: clf_lib.nll(logits / np.exp(lt), labels),
                                 bounds=(np.log(0.05), np.log(20.0)), method="bounded",
                                 options={"xatol": 1e-8}).x)
    assert abs(np.log(t) - np.log(ref)) < np.log(400) / 399, (t, ref)  # one grid step
    assert (t > 1) if scale > 1 else (t < 1)
  separable = np.eye(10)[labels] * 5.0 + 0.1 * rng.normal(size=(200, 10))
  assert np.all(separable.argmax(-1) == labels)
  assert clf_lib.fit_temperature(separable, labels) == 1.0
  assert clf_lib.nll(separable / 0.05, labels) < clf_lib.nll(separable, labels)  # no minimiser


def test_save_load_round_trip(digits_300, tmp_path, monkeypatch):
  ds, clf, report = digits_300
  path = str(tmp_path / "clf")
  classifiers.save_classifier(path, clf, report)
  loaded, rep = classifiers.load_classifier(path)
  x = data.digits_class("heldout").images[:32]
  np.testing.assert_array_equal(np.asarray(loaded.log_probs(x)), np.asarray(clf.log_probs(x)))
  assert rep["temperature"] == loaded.temperature == clf.temperature
  assert loaded.module == clf.module
  # load_or_train loads what is there, and refuses a dataset with another number of classes.
  again, rep2 = classifiers.load_or_train_classifier(path, ds, steps=1)
  np.testing.assert_array_equal(np.asarray(again.log_probs(x)), np.asarray(clf.log_probs(x)))
  with pytest.raises(ValueError, match="has 10 classes but dataset .* has 3"):
    classifiers.load_or_train_classifier(path, data.digits_thickness("heldout"), steps=1)
  # A crash mid-save leaves the previous classifier in place and nothing half-written.
  def boom(*a, **k):
    raise RuntimeError("crash")
  monkeypatch.setattr(classifiers, "_write_json", boom)
  with pytest.raises(RuntimeError):
    classifiers.save_classifier(path, loaded, {"other": 1})
  with pytest.raises(RuntimeError):
    classifiers.save_classifier(str(tmp_path / "new"), loaded, {})
  monkeypatch.undo()
  assert sorted(os.listdir(tmp_path)) == ["clf"]
  assert json.load(open(os.path.join(path, "classifier.json")))["report"] == report | {}
  with pytest.raises(FileNotFoundError, match="no saved classifier"):
    classifiers.load_classifier(str(tmp_path / "new"))


def test_load_or_train_trains_once_then_loads(digits_300, tmp_path, monkeypatch):
  ds, clf, report = digits_300
  calls = []

  def fake_train(dataset, **kw):  # the trained fixture stands in for training (no compile)
    calls.append((dataset.name, kw))
    return clf, report
  monkeypatch.setattr(classifiers, "train_offline_classifier", fake_train)
  path = str(tmp_path / "t")
  first, rep = classifiers.load_or_train_classifier(path, ds, steps=7)
  assert calls == [(ds.name, {"steps": 7})] and rep["input_shape"] == [8, 8, 1]
  second, rep2 = classifiers.load_or_train_classifier(path, ds, steps=7)
  assert len(calls) == 1 and rep2 == rep and second.temperature == clf.temperature
  np.testing.assert_array_equal(np.asarray(second.log_probs(ds.images[:16])),
                                np.asarray(clf.log_probs(ds.images[:16])))
  rgb = data.from_arrays(np.zeros((10, 8, 8, 3)), np.arange(10))
  with pytest.raises(ValueError, match="takes 1-channel images but dataset .* has 3"):
    classifiers.load_or_train_classifier(path, rgb)
  with pytest.raises(ValueError, match="input_size=None but input_size=32 was asked for"):
    classifiers.load_or_train_classifier(path, ds, input_size=32)


def test_input_size_resizes_large_images():
  rng = np.random.default_rng(0)
  images = rng.random((8, 32, 32, 3)).astype(np.float32)
  small = np.asarray(classifiers.resize_images(images, 8))
  assert small.shape == (8, 8, 8, 3)
  const = np.asarray(classifiers.resize_images(np.full((1, 32, 32, 3), 0.3, np.float32), 8))
  np.testing.assert_allclose(const, 0.3, atol=1e-6)
  clf = classifiers.clf_lib.train_classifier(images, np.arange(8) % 2, 2, steps=2,
                                             batch_size=8, input_size=8)
  assert clf.module.input_size == 8 and clf.params["Dense_0"]["kernel"].shape[0] == 4 * 4 * 64
  np.testing.assert_allclose(clf.log_probs(images), clf.log_probs(small), atol=1e-5)


def test_noisy_classifier(tmp_path):
  alphas = np.asarray(diffusion.NoiseSchedule.from_config(
      digits.scheduler_config(new_config("ddpo", "digits").model)).alphas_cumprod)
  train, held = data.digits_class("train"), data.digits_class("heldout")
  model = classifiers.train_noisy_classifier(train.images * 2 - 1, train.labels, 10, alphas,
                                             seed=0, steps=150, batch_size=128)
  acc = classifiers.noisy_accuracy(model, held.images * 2 - 1, held.labels, alphas, (0, 50))
  assert acc >= 0.8
  x_t = jnp.asarray(held.images[:8] * 2 - 1)
  t = jnp.full((8,), 30, jnp.int32)
  lp = jax.jit(model.log_probs)(x_t, t)
  assert lp.shape == (8, 10)

  def objective(x, params):
    return jnp.take_along_axis(model.log_probs(x, t, params=params),
                               jnp.asarray(held.labels[:8])[:, None], -1).sum()
  grad = jax.jit(jax.grad(objective))(x_t, {"nested": model.params}["nested"])
  assert grad.shape == x_t.shape and bool(jnp.all(jnp.isfinite(grad)))
  assert float(jnp.abs(grad).sum()) > 0
  leaves = jax.tree.leaves(model)  # a pytree: params are its leaves
  assert len(leaves) == len(jax.tree.leaves(model.params))
  # The raw module works the way a policy calls it: module.apply({"params": p}, x_t, t).
  np.testing.assert_allclose(model.module.apply({"params": model.params}, x_t, t),
                             model.logits(x_t, t), rtol=1e-6)
  path = str(tmp_path / "noisy")
  classifiers.save_classifier(path, model, {"acc_t0_50": acc})
  loaded = classifiers.load_noisy_classifier(path)
  np.testing.assert_array_equal(np.asarray(loaded.log_probs(x_t, t)),
                                np.asarray(model.log_probs(x_t, t)))
  assert loaded.num_train_timesteps == 1000
