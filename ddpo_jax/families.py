"""Model families: the one place that maps a config to its `Policy`.

`build_base_policy(config)` builds the family of `config.model.kind` (`FAMILIES`: the built-in
digits model, Stable Diffusion 1.x/2.x); `build_policy(config, workdir)` wraps it in CTRL's
augmented model when the config has a `ctrl` section. `base_weights(config)` identifies the
pre-trained weights a run starts from (saved with every checkpoint, checked on resume, sample
and export). The training loops, sampling, export and
evaluation build policies only through here, so a new family is one entry in `FAMILIES`.
"""
from __future__ import annotations

import os
from typing import Callable

from ddpo_jax import digits, sd
from ddpo_jax.ctrl import policy as ctrl_policy
from ddpo_jax.models import pipeline_io
from ddpo_jax.policy import Policy

# config.model.kind -> make_policy(config) -> Policy
FAMILIES: dict[str, Callable[..., Policy]] = {"digits": digits.make_policy, "sd": sd.make_policy}


def build_base_policy(config) -> Policy:
  """The policy of the model family `config.model.kind` alone."""
  kind = config.model.kind
  if kind not in FAMILIES:
    raise ValueError(f"config.model.kind={kind!r} is not a known model family; known: "
                     f"{', '.join(repr(k) for k in FAMILIES)}")
  return FAMILIES[kind](config)


def build_policy(config, workdir: str, log=print) -> Policy:
  """Builds the policy of `config`: the model family of `config.model.kind`, wrapped in CTRL's
  augmented model when `config.mode` is "ctrl" (its data, classifiers and judges made first
  where needed, in `workdir`)."""
  base = build_base_policy(config)
  if config.mode == "ctrl":
    return ctrl_policy.make_policy(config, workdir, base, log=log)
  return base


# The files of a diffusers directory that the loaders read (weights, configs, tokenizers).
_WEIGHT_SUFFIXES = (".safetensors", ".json", ".txt", ".model")


def fingerprint_files(directory: str, relpaths) -> dict[str, list]:
  """{relative path: [size in bytes, SHA-256 hex]} of `relpaths` under `directory` (hashed once
  per process while a file stays unchanged: `pipeline_io.file_sha256`)."""
  out = {}
  for rel in sorted(relpaths):
    path = os.path.realpath(os.path.join(directory, rel))
    out[rel] = [os.path.getsize(path), pipeline_io.file_sha256(path)]
  return out


def base_weights(config) -> dict:
  """{"path": directory, "files": {relative path: [size, SHA-256]}} of the pre-trained weights
  `config` starts from: every weight, config and tokenizer file of an SD-family pipeline
  directory (a Hub id: its local snapshot), or the digits model's checksums.json (its params
  are verified against it when loaded). Its directory must exist (call after the model has
  been loaded or pre-trained once)."""
  if config.model.kind == "digits":
    directory = digits.pretrained_path(config.model, config.model.pretrain.seed)
    return {"path": directory, "files": fingerprint_files(directory, ["checksums.json"])}
  directory = sd.pretrained_directory(config.model)
  files = []
  for root, dirs, names in os.walk(directory, followlinks=True):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    files += [os.path.relpath(os.path.join(root, n), directory) for n in names
              if n.endswith(_WEIGHT_SUFFIXES) and not n.startswith(".")]
  return {"path": directory, "files": fingerprint_files(directory, files)}
