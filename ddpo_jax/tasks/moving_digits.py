"""Moving digits: the offline video task. Short clips of scikit-learn's 8×8 handwritten digits
moving along straight lines on a black canvas, and a held-out judge for them. Pure NumPy (and
scikit-learn for the data and the judge); no downloads.

A clip is (frames, size, size, 1) float32 in [0, 1] (pixel value / 16, as the digits task's
images), default 8 frames of 16×16. Each digit's whole 8×8 box is pasted on the black canvas and
moved `speed` whole pixels per frame in its direction; its start is drawn uniformly (from the
caller's `rng`) among the positions that keep the box inside the canvas in every frame. Rows grow
downwards, so "up" is decreasing row, "left" decreasing column.

Prompts are "a handwritten 3 moving left" (`prompt` / `parse_prompt`).

The judge (`class_judge` / `judge`) is independent of anything trained on the training split:
it is built on the held-out split only (`load_digits_split("heldout")`, the same split as
`ddpo_jax.pipelines.digits.load_digits_split`, which this layer may not import):

* direction: `direction_of` / `directions_of`, from the displacement of the intensity centre of
  mass between the first and the last frame (its larger axis), "none" when it is shorter than
  `min_shift` pixels or a frame is blank;
* class: a per-frame scikit-learn SVC on the 10×10 window centred on the frame's (rounded)
  centre of mass, trained on held-out digits placed at random positions on the canvas, each
  window also taken shifted by ±1 pixel (9 shifts). The window makes the classifier
  translation-invariant (an integer shift of the digit shifts its centre of mass by the same
  amount), so it judges a digit wherever it is on the canvas; the shifts make it tolerate a
  centre of mass that sits differently in the digit than in the training digits (per-frame
  accuracy on training-split digits 97.1%, against 95.1% without them).
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Sequence

import numpy as np

from ddpo_jax.tasks import digits_data

NUM_CLASSES = 10
DIGIT_SIZE = 8
DIRECTIONS = ("left", "right", "up", "down")
# Unit step (d_row, d_col) of each direction, rows growing downwards.
STEPS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
NONE = "none"
# Side of the window around the centre of mass that the class judge sees, and the training
# shifts of that window (±JITTER pixels on each axis).
CROP = 10
JITTER = 1
_PROMPT_RE = re.compile(r"a handwritten ([0-9]) moving (left|right|up|down)")


def load_digits_split(split: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(images (N, 8, 8) float32 in [0, 1], labels (N,) int32): `digits_data.load_digits_split`,
  the one split every digits task shares, without its channel axis."""
  images, labels = digits_data.load_digits_split(split, seed)
  return images[..., 0], labels


def check_geometry(frames: int, size: int, speed: int) -> int:
  """Returns the free travel (size - 8 - speed (frames - 1)) ≥ 0 of a digit moving `speed`
  pixels per frame over `frames` frames on a size×size canvas; ValueError naming the numbers
  when the 8×8 digit cannot stay inside the canvas."""
  for name, v in (("frames", frames), ("size", size), ("speed", speed)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
      raise ValueError(f"{name}={v!r} must be a whole number")
  if frames < 1:
    raise ValueError(f"frames={frames} must be at least 1")
  if speed < 0:
    raise ValueError(f"speed={speed} must be ≥ 0 pixels per frame")
  travel = speed * (frames - 1)
  free = size - DIGIT_SIZE - travel
  if free < 0:
    raise ValueError(
        f"an {DIGIT_SIZE}×{DIGIT_SIZE} digit moving speed={speed} px/frame for frames={frames} "
        f"travels {travel} px, which does not fit in a size={size} canvas: need size ≥ "
        f"{DIGIT_SIZE} + speed × (frames − 1) = {DIGIT_SIZE + travel}")
  return free


def _direction_names(directions, n: int) -> list[str]:
  """Direction names from names or indices into `DIRECTIONS` (one, or one per clip)."""
  if isinstance(directions, (str, int, np.integer)):
    directions = [directions] * n
  out = []
  for d in directions:
    if isinstance(d, (int, np.integer)) and not isinstance(d, bool):
      if not 0 <= d < len(DIRECTIONS):
        raise ValueError(f"direction index {d} is not in 0..{len(DIRECTIONS) - 1} {DIRECTIONS}")
      d = DIRECTIONS[d]
    if d not in STEPS:
      raise ValueError(f"unknown direction {d!r}; use one of {DIRECTIONS}")
    out.append(str(d))
  if len(out) != n:
    raise ValueError(f"{len(out)} directions for {n} digits")
  return out


def make_clips(digit_images, labels, directions, *, frames: int = 8, size: int = 16,
               speed: int = 1, rng=None) -> tuple[np.ndarray, dict]:
  """Clips of the digits moving in straight lines.

  digit_images: (N, 8, 8) or (N, 8, 8, 1) in [0, 1]; labels: (N,) ints 0..9; directions: one
  name / index into `DIRECTIONS`, or one per digit; speed: whole pixels per frame (0: still
  clips); rng: a `np.random.Generator` or an int seed (the same seed gives the same clips).
  Returns (clips (N, frames, size, size, 1) float32 in [0, 1], metadata) with metadata
  {"labels": (N,) int32, "directions": (N,) str, "direction_ids": (N,) int32 into DIRECTIONS,
  "start": (N, 2) int32 (row, col) of the box's top-left corner in frame 0, "prompts": list}.
  """
  free = check_geometry(frames, size, speed)
  images = np.asarray(digit_images, np.float32)
  if images.ndim == 4 and images.shape[-1] == 1:
    images = images[..., 0]
  if images.ndim != 3 or images.shape[1:] != (DIGIT_SIZE, DIGIT_SIZE):
    raise ValueError(f"digit_images has shape {np.shape(digit_images)}; expected (N, 8, 8) "
                     "or (N, 8, 8, 1)")
  n = len(images)
  labels = np.asarray(labels, np.int32).reshape(-1)
  if labels.shape != (n,):
    raise ValueError(f"{labels.shape[0]} labels for {n} digit images")
  if n and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
    raise ValueError(f"labels must be in 0..{NUM_CLASSES - 1}; got {labels.min()}..{labels.max()}")
  names = _direction_names(directions, n)
  rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
  images = np.clip(images, 0.0, 1.0)
  travel = speed * (frames - 1)
  steps = np.asarray([STEPS[d] for d in names], np.int64).reshape(n, 2)
  # Along the motion axis the box starts within `free` of the edge it moves away from; across
  # it anywhere in 0..size-8. Moving towards decreasing coordinates starts `travel` further in.
  across = rng.integers(0, size - DIGIT_SIZE + 1, size=n)
  along = rng.integers(0, free + 1, size=n)
  start = np.zeros((n, 2), np.int64)
  for axis in (0, 1):
    moving = steps[:, axis] != 0
    start[:, axis] = np.where(moving, along + np.where(steps[:, axis] < 0, travel, 0), across)
  clips = np.zeros((n, frames, size, size, 1), np.float32)
  for i in range(n):
    for f in range(frames):
      r, c = start[i] + f * speed * steps[i]
      clips[i, f, r:r + DIGIT_SIZE, c:c + DIGIT_SIZE, 0] = images[i]
  meta = {"labels": labels, "directions": np.asarray(names, dtype=object),
          "direction_ids": np.asarray([DIRECTIONS.index(d) for d in names], np.int32),
          "start": start.astype(np.int32),
          "prompts": [prompt(int(l), d) for l, d in zip(labels, names)]}
  return clips, meta


def prompt(label: int, direction: str) -> str:
  """"a handwritten {label} moving {direction}"."""
  if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or \
     not 0 <= label < NUM_CLASSES:
    raise ValueError(f"label {label!r} is not a digit 0..{NUM_CLASSES - 1}")
  if direction not in STEPS:
    raise ValueError(f"unknown direction {direction!r}; use one of {DIRECTIONS}")
  return f"a handwritten {int(label)} moving {direction}"


def parse_prompt(text: str) -> tuple[int, str]:
  """(label, direction) of a prompt made by `prompt`; ValueError on anything else."""
  m = _PROMPT_RE.fullmatch(text) if isinstance(text, str) else None
  if m is None:
    raise ValueError(f"not a moving-digits prompt: {text!r}; expected e.g. "
                     f"{prompt(3, 'left')!r} (a digit 0-9, a direction of {DIRECTIONS})")
  return int(m.group(1)), m.group(2)


def _frames_array(clips, ndim: int) -> np.ndarray:
  """`clips` as float32 without the trailing channel axis, checked to have `ndim` axes."""
  x = np.asarray(clips, np.float32)
  if x.ndim == ndim + 1 and x.shape[-1] == 1:
    x = x[..., 0]
  if x.ndim != ndim:
    raise ValueError(f"expected {ndim} axes (+ an optional channel axis of 1); got shape "
                     f"{np.shape(clips)}")
  return x


def centres_of_mass(frames) -> np.ndarray:
  """(..., 2) float64 (row, col) intensity centres of mass of frames (..., H, W[, 1]) (values
  clipped to [0, 1]); NaN for a blank frame."""
  x = np.clip(np.asarray(frames, np.float64), 0.0, 1.0)
  if x.shape[-1] == 1 and x.ndim >= 3:
    x = x[..., 0]
  h, w = x.shape[-2:]
  mass = x.sum(axis=(-2, -1))
  with np.errstate(invalid="ignore", divide="ignore"):
    r = (x.sum(axis=-1) * np.arange(h)).sum(axis=-1) / mass
    c = (x.sum(axis=-2) * np.arange(w)).sum(axis=-1) / mass
  blank = mass <= 1e-6
  return np.stack([np.where(blank, np.nan, r), np.where(blank, np.nan, c)], axis=-1)


def directions_of(clips, min_shift: float = 2.0) -> np.ndarray:
  """(N,) str: the motion direction of each clip (N, F, H, W[, 1]) in `DIRECTIONS`, from the
  displacement of the intensity centre of mass from the first to the last frame (the axis
  that moved most; its sign), or "none" when it moved less than `min_shift` pixels or the
  first or last frame is blank."""
  x = _frames_array(clips, 4)
  com = centres_of_mass(x[:, [0, -1]])
  d = com[:, 1] - com[:, 0]  # (N, 2) (d_row, d_col)
  out = np.full(len(x), NONE, dtype=object)
  ok = np.isfinite(d).all(axis=1) & (np.hypot(d[:, 0], d[:, 1]) >= min_shift)
  vertical = np.abs(d[:, 0]) > np.abs(d[:, 1])
  out[ok & vertical & (d[:, 0] < 0)] = "up"
  out[ok & vertical & (d[:, 0] > 0)] = "down"
  out[ok & ~vertical & (d[:, 1] < 0)] = "left"
  out[ok & ~vertical & (d[:, 1] > 0)] = "right"
  return out


def direction_of(clip, min_shift: float = 2.0) -> str:
  """The motion direction of one clip (F, H, W[, 1]): see `directions_of`."""
  return str(directions_of(_frames_array(clip, 3)[None], min_shift)[0])


def centred_crops(frames, crop: int = CROP) -> np.ndarray:
  """(M, crop, crop) windows of frames (M, H, W[, 1]) centred on each frame's rounded centre of
  mass (zero outside the frame; a blank frame gives its centre window)."""
  x = np.clip(_frames_array(frames, 3), 0.0, 1.0)
  m, h, w = x.shape
  com = centres_of_mass(x)
  com = np.where(np.isfinite(com), com, [(h - 1) / 2, (w - 1) / 2])
  centre = np.floor(com + 0.5).astype(np.int64)
  half = crop // 2
  padded = np.pad(x, ((0, 0), (crop, crop), (crop, crop)))
  out = np.empty((m, crop, crop), np.float32)
  for i, (r, c) in enumerate(centre + crop - half):
    out[i] = padded[i, r:r + crop, c:c + crop]
  return out


@dataclasses.dataclass(frozen=True)
class ClipJudge:
  """The held-out judge of moving-digit clips: a per-frame digit classifier (`predict_frames`)
  and the motion direction (`directions_of`). Call it on (clips, prompts)."""
  classifier: object
  size: int
  min_shift: float = 2.0

  def predict_frames(self, frames) -> np.ndarray:
    """(M,) int32 predicted digit of each frame (M, H, W[, 1])."""
    crops = centred_crops(frames)
    return self.classifier.predict(crops.reshape(len(crops), -1)).astype(np.int32)

  def __call__(self, clips, prompts: Sequence[str]) -> dict[str, np.ndarray]:
    """Judges clips (N, F, H, W[, 1]) against their prompts. Returns
    {"class_accuracy": (N,) float32 fraction of frames classified as the prompted digit,
     "direction_correct": (N,) float32 1 where the judged direction is the prompted one,
     "frame_classes": (N, F) int32, "directions": (N,) str (judged, maybe "none")}."""
    x = _frames_array(clips, 4)
    if len(prompts) != len(x):
      raise ValueError(f"{len(prompts)} prompts for {len(x)} clips")
    parsed = [parse_prompt(p) for p in prompts]
    want_class = np.asarray([l for l, _ in parsed], np.int32)
    want_dir = np.asarray([d for _, d in parsed], dtype=object)
    n, f = x.shape[:2]
    classes = self.predict_frames(x.reshape((n * f,) + x.shape[2:])).reshape(n, f)
    dirs = directions_of(x, self.min_shift)
    return {"class_accuracy": (classes == want_class[:, None]).mean(axis=1).astype(np.float32),
            "direction_correct": (dirs == want_dir).astype(np.float32),
            "frame_classes": classes, "directions": dirs}


@functools.lru_cache(maxsize=4)
def class_judge(size: int = 16, seed: int = 0) -> ClipJudge:
  """The held-out judge: an SVC (C=10, gamma "scale") on the centred 10×10 windows of the
  held-out split's digits, each pasted at a random position of a size×size canvas (positions
  from `seed`), every window also shifted by up to ±1 pixel per axis (9 samples per digit).
  Trained on the held-out split only (359 digits; about 0.5 s)."""
  from sklearn.svm import SVC
  check_geometry(1, size, 0)
  images, labels = load_digits_split("heldout")
  rng = np.random.default_rng(seed)
  canvases = np.zeros((len(images), size, size), np.float32)
  pos = rng.integers(0, size - DIGIT_SIZE + 1, size=(len(canvases), 2))
  for i, (r, c) in enumerate(pos):
    canvases[i, r:r + DIGIT_SIZE, c:c + DIGIT_SIZE] = images[i]
  wide = centred_crops(canvases, CROP + 2 * JITTER)
  shifts = range(2 * JITTER + 1)
  x = np.concatenate([wide[:, r:r + CROP, c:c + CROP].reshape(len(wide), -1)
                      for r in shifts for c in shifts])
  clf = SVC(C=10.0, gamma="scale").fit(x, np.tile(labels, len(shifts) ** 2))
  return ClipJudge(classifier=clf, size=size)


def judge(clips, prompts: Sequence[str], seed: int = 0) -> dict[str, np.ndarray]:
  """`class_judge(size, seed)(clips, prompts)`, size from the clips: see `ClipJudge`."""
  x = _frames_array(clips, 4)
  return class_judge(int(x.shape[-1]), seed)(x, prompts)
