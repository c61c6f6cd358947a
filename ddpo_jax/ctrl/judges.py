"""Judges of CTRL controls: independent checks of whether an image carries a label, never the
training classifier.

A judge maps images uint8 (N, H, W, C) to labels (N,) int32: digits class -> an SVC trained on
the held-out split only (`digits.heldout_classifier`); digits stroke thickness -> the pixel rule
itself (`ctrl.data.thickness_level`); levels sampled from the pre-trained model (JPEG size,
aesthetic score) -> the image's real measurement bucketed by the data's stored cut points
(`ctrl.sampled_data.make_judge`). Other data sources register a factory in `JUDGES`.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from ddpo_jax.ctrl import data, sampled_data
from ddpo_jax.pipelines import digits
from ddpo_jax.rewards import Reward


def _digits_class_judge(data_cfg, config, workdir=None):
  svc = digits.heldout_classifier()

  def judge(images_uint8: np.ndarray) -> np.ndarray:
    x = images_uint8.reshape(len(images_uint8), -1).astype(np.float32) / 255.0
    return svc.predict(x).astype(np.int32)
  return judge


def _digits_thickness_judge(data_cfg, config, workdir=None):
  def judge(images_uint8: np.ndarray) -> np.ndarray:
    return np.asarray(data.thickness_level(images_uint8.astype(np.float32) / 255.0), np.int32)
  return judge


def _sampled_levels_judge(data_cfg, config, workdir=None):
  """Data sampled from the pre-trained model and labelled by a measurement (JPEG size,
  aesthetic score): the real measurement of the image, bucketed by the data's stored cut
  points (`ctrl.sampled_data`)."""
  return sampled_data.make_judge(data_cfg, config, workdir)


# data source -> factory(data_cfg, config, workdir) -> judge(images uint8 (N,H,W,C)) -> labels
# (N,) int32; `workdir` is the run directory (where e.g. sampled data and its cut points live)
JUDGES: dict[str, Callable] = {
    "digits_class": _digits_class_judge,
    "digits_thickness": _digits_thickness_judge,
    "sampled_jpeg_levels": _sampled_levels_judge,
    "sampled_aesthetic_levels": _sampled_levels_judge,
}


def make_judge(data_cfg, config, workdir: str | None = None):
  """The independent judge of a control whose labelled data comes from `data_cfg.source`, or
  None when the source has no ground-truth rule or held-out judge. `workdir`: the run's
  directory (needed by judges whose data lives there)."""
  factory = JUDGES.get(data_cfg.source)
  return None if factory is None else factory(data_cfg, config, workdir)


def judge_accuracy_reward(judge, column: int, name: str) -> Reward:
  """Host metric: 1 where the judge's label equals the requested label of control `column`."""
  def fn(images_uint8, prompts, metadata):
    correct = judge(images_uint8) == np.asarray(metadata["control_label"])[:, column]
    return correct.astype(np.float32), {}
  return Reward(name, fn, on_device=False)
