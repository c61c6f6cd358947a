"""Plug-ins named "MODULE:ATTR": the reward server's `--scorer` and the OCR / GenEval scorers'
`engine` (docs/rewards.md, "The plug-in contract").

`load_plugin("pkg.mod:Name.attr")` imports `pkg.mod` and follows the dotted attribute path;
with `kwargs` (a dict, possibly empty) the object found is a factory and is called with them.
"""
from __future__ import annotations

import importlib
from typing import Any


def load_plugin(spec: str, kwargs: dict | None = None, what: str = "plug-in") -> Any:
  """The callable named by `spec` ("MODULE:ATTR"), or `factory(**kwargs)` when kwargs is given.

  Args:
    spec: "MODULE:ATTR", ATTR a dotted path ("mod:Class.method").
    kwargs: None: `spec` names the callable itself; a dict: `spec` names a factory of it.
    what: the word the error messages start with ("scorer", "OCR engine", ...).

  Raises:
    ValueError: `spec` is not "MODULE:ATTR", or what it names (or builds) is not callable.
    ImportError / AttributeError: naming `spec`.
  """
  if not isinstance(spec, str) or ":" not in spec or spec.startswith(":") or \
      spec.endswith(":"):
    raise ValueError(f"{what} {spec!r}: expected MODULE:ATTR (e.g. 'my_pkg.my_mod:my_fn')")
  module_name, attr = spec.split(":", 1)
  try:
    obj = importlib.import_module(module_name)
  except ImportError as e:
    raise ImportError(f"{what} {spec!r}: cannot import {module_name!r} ({e})") from e
  for part in attr.split("."):
    if not hasattr(obj, part):
      raise AttributeError(f"{what} {spec!r}: {module_name} has no attribute {attr!r}")
    obj = getattr(obj, part)
  if kwargs is not None:
    if not isinstance(kwargs, dict):
      raise ValueError(f"{what} {spec!r}: its keyword arguments must be a dict, got "
                       f"{type(kwargs).__name__}")
    obj = obj(**kwargs)
  if not callable(obj):
    raise ValueError(f"{what} {spec!r} is not callable")
  return obj
