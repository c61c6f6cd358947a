"""Reading and writing diffusers `config.json` dicts for the frozen config dataclasses."""
from __future__ import annotations

import dataclasses
import warnings

# Bookkeeping keys of diffusers config.json files that carry no architecture information.
BOOKKEEPING = frozenset({"_class_name", "_diffusers_version", "_name_or_path",
                         "_use_default_values", "addition_embed_type_num_heads"})


def config_from_dict(cls, d: dict, class_name: str, what: str):
  """Builds dataclass `cls` from a diffusers config.json dict.

  Raises ValueError if `_class_name` is not `class_name`; bookkeeping keys are ignored and an
  unknown key is ignored with a warning (`what` names the model in messages).
  """
  found = d.get("_class_name", class_name)
  if found != class_name:
    raise ValueError(f"{what} config: unsupported _class_name={found!r} (expected {class_name!r})")
  names = {f.name for f in dataclasses.fields(cls)}
  kwargs = {}
  for key, value in d.items():
    if key in names:
      kwargs[key] = value
    elif key not in BOOKKEEPING and not key.startswith("_"):
      warnings.warn(f"{what} config: ignoring unknown key {key}={value!r}")
  return cls(**kwargs)


def config_to_dict(config, class_name: str) -> dict:
  """A diffusers-loadable config.json dict of a config dataclass (tuples become lists)."""
  d = {"_class_name": class_name, "_diffusers_version": "0.30.0"}
  for f in dataclasses.fields(config):
    value = getattr(config, f.name)
    d[f.name] = list(value) if isinstance(value, tuple) else value
  return d
