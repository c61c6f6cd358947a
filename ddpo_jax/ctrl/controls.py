"""CTRL's controls and contexts: which labels a run controls, and how a (prompt, labels) pair is
written as one string ("PROMPT||y=3:2") that flows through the prompt pipeline.

Control i has K_i classes; label K_i is its "null" label (no request). Everything here is plain
Python/NumPy: the sampler, the evaluation and the CLIs read labels through it without loading a
model.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Sequence

import numpy as np

_CONTEXT_RE = re.compile(r"^(?P<prompt>.*)\|\|y=(?P<labels>-?\d+(?::-?\d+)*)$", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class Control:
  """One control y_i: its name, K classes (label K is the null label) and reward weight w_i."""
  name: str
  num_classes: int
  weight: float

  @property
  def null_label(self) -> int:
    return self.num_classes


def controls_from_config(config) -> list[Control]:
  """The run's controls in the order labels are written ("3:2" = first:second)."""
  names = tuple(config.ctrl.controls)
  if not names:
    raise ValueError("config.ctrl.controls is empty: name at least one control")
  out = []
  for name in names:
    if name not in config.ctrl.conditions:
      raise ValueError(f"config.ctrl.controls names {name!r} but config.ctrl.conditions has "
                       f"only {sorted(config.ctrl.conditions.keys())}")
    cond = config.ctrl.conditions[name]
    if int(cond.num_classes) < 2:
      raise ValueError(f"control {name!r}: num_classes={cond.num_classes} must be ≥ 2")
    out.append(Control(name, int(cond.num_classes), float(cond.weight)))
  return out


# ----------------------------------------------------------------------------- contexts


def format_context(prompt: str, labels: Sequence[int]) -> str:
  """(prompt, labels) -> "PROMPT||y=3:2", the string key of a CTRL context."""
  return f"{prompt}||y=" + ":".join(str(int(l)) for l in labels)


def parse_context(context: str) -> tuple[str, tuple[int, ...]]:
  """Inverse of `format_context`; raises ValueError on a string without labels."""
  m = _CONTEXT_RE.match(context)
  if m is None:
    raise ValueError(f"{context!r} is not a CTRL context 'PROMPT||y=LABEL[:LABEL...]'")
  return m.group("prompt"), tuple(int(l) for l in m.group("labels").split(":"))


def parse_label_spec(spec: str, controls: Sequence[Control], allow_null: bool = True) -> tuple[int, ...]:
  """A command-line label "3" or "3:2" (one per control, "null"/"-" for the null label)."""
  parts = str(spec).strip().split(":")
  if len(parts) != len(controls):
    names = ":".join(c.name for c in controls)
    raise ValueError(f"label {spec!r} has {len(parts)} part(s); this run has {len(controls)} "
                     f"control(s), write labels as {names}")
  labels = []
  for part, c in zip(parts, controls):
    if part in ("null", "-"):
      labels.append(c.null_label)
      continue
    try:
      labels.append(int(part))
    except ValueError:
      raise ValueError(f"label {spec!r}: {part!r} is not an integer label of control {c.name!r}")
  check_labels(np.asarray([labels]), controls, allow_null=allow_null)
  return tuple(labels)


def check_labels(labels: np.ndarray, controls: Sequence[Control], allow_null: bool = True) -> None:
  """Raises ValueError unless labels (N, M) index the controls' tables."""
  labels = np.asarray(labels)
  if labels.ndim != 2 or labels.shape[1] != len(controls):
    raise ValueError(f"labels must be (N, {len(controls)}) (one per control); got {labels.shape}")
  for i, c in enumerate(controls):
    hi = c.num_classes + (1 if allow_null else 0)
    bad = (labels[:, i] < 0) | (labels[:, i] >= hi)
    if bad.any():
      raise ValueError(f"control {c.name!r} has labels 0..{c.num_classes - 1}"
                       f"{f' (and {c.null_label} = null)' if allow_null else ''}; got "
                       f"{sorted(set(labels[bad, i].tolist()))}")


@dataclasses.dataclass(frozen=True)
class ControlledModel:
  """What CTRL adds to the pre-trained policy it wraps (`Policy.ctrl`).

  Attributes:
    method: "ctrl", "cfg" or "classifier_guidance" (`ctrl.policy.METHODS`).
    controls: the run's controls, in the order labels are written.
    datasets: {control name: `ctrl.data.LabelledDataset`}, its offline labelled data.
    classifiers: {control name: the calibrated classifier p̂ (`ctrl.classifiers`)}.
    base_policy: the pre-trained model's `Policy`.
    conditional_eps: (params, x, t, context, labels (N, M) int32) -> eps of the augmented
      model without any guidance (CTRL and the CFG baseline; None for classifier guidance).
    noisy_classifier_modules: {control name: the classifier-guidance baseline's noise-
      conditional classifier module} (None for the other methods).
  """
  method: str
  controls: tuple[Control, ...]
  datasets: dict[str, Any]
  classifiers: dict[str, Any]
  base_policy: Any
  conditional_eps: Callable[..., Any] | None = None
  noisy_classifier_modules: dict[str, Any] | None = None
