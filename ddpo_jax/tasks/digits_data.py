"""scikit-learn's 8×8 handwritten digits (shipped with the package: no download), split once
for every task that uses them: the digits image task (`ddpo_jax.pipelines.digits`), CTRL's
digits controls and the moving-digits clips (`ddpo_jax.tasks.moving_digits`)."""
from __future__ import annotations

import numpy as np

HELD_OUT_FRACTION = 0.2


def load_digits_split(split: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Returns (images (N,8,8,1) float32 in [0,1], labels (N,) int32) of a fixed split.

  `split` is "train" (80%, used for pre-training and the reward classifier), "heldout" (20%,
  used only for evaluation classifiers) or "all": a `np.random.default_rng(seed)` permutation
  of all 1797 images, the first round(0.2 N) held out.
  """
  from sklearn.datasets import load_digits
  data = load_digits()
  images = (data.images / 16.0).astype(np.float32)[..., None]
  labels = data.target.astype(np.int32)
  if split == "all":
    return images, labels
  perm = np.random.default_rng(seed).permutation(len(labels))
  n_held = int(round(HELD_OUT_FRACTION * len(labels)))
  idx = {"heldout": perm[:n_held], "train": perm[n_held:]}.get(split)
  if idx is None:
    raise ValueError(f"unknown digits split {split!r}; use 'train', 'heldout' or 'all'")
  return images[idx], labels[idx]
