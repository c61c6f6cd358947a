"""Model families: the one place that maps a config to its `Policy`.

`FAMILIES` is the registry, `config.model.kind` -> `Family`: the built-in digits model
(`ddpo_jax.pipelines.digits`: a UNet or an MMDiT) and the diffusers pipelines (`ddpo_jax.pipelines.sd`: SD 1.x/2.x,
SDXL, SD3/3.5, FLUX.1). Each family module provides the two functions of its entry: the policy
(with its `denoiser.Denoiser`) and the files of the pre-trained weights a run starts from.
`build_base_policy(config)` builds the family of `config.model.kind`; `build_policy(config,
workdir)` wraps it in CTRL's augmented model when `config.mode` is "ctrl".
`base_weights(config)` fingerprints the pre-trained weights (saved with every checkpoint,
checked on resume, sample and export). The training loops, sampling, export and evaluation
build policies only through here, so a new family is its module plus one line in `FAMILIES`.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable

from ddpo_jax.ctrl import policy as ctrl_policy
from ddpo_jax.models import lora_io, pipeline_io
from ddpo_jax.pipelines import digits, sd
from ddpo_jax.pipelines.policy import Policy


@dataclasses.dataclass(frozen=True)
class Family:
  """A model family's entry in `FAMILIES`.

  Attributes:
    make_policy: (config, abstract=False) -> `Policy` (raises ValueError / FileNotFoundError
      for bad settings before anything is compiled); `abstract=True`: parameter shapes only.
    weight_files: config.model -> (directory, [paths relative to it]) of the pre-trained
      weights, configs and tokenizers a run starts from (the directory exists once the model
      has been loaded or pre-trained).
  """
  make_policy: Callable[..., Policy]
  weight_files: Callable[..., tuple[str, list[str]]]


FAMILIES: dict[str, Family] = {
    "digits": Family(digits.make_policy, digits.weight_files),
    "sd": Family(sd.make_policy, sd.weight_files),
}


def family(config) -> Family:
  """The `Family` of `config.model.kind` (ValueError naming the known kinds otherwise)."""
  kind = config.model.kind
  if kind not in FAMILIES:
    raise ValueError(f"config.model.kind={kind!r} is not a known model family; known: "
                     f"{', '.join(repr(k) for k in FAMILIES)}")
  return FAMILIES[kind]


def build_base_policy(config, abstract: bool = False) -> Policy:
  """The policy of the model family `config.model.kind` alone; `abstract`: its params are
  `jax.ShapeDtypeStruct`s from the model's configs alone (no weights read, nothing
  pre-trained), for compiling its programs (`ddpo_jax.plan`)."""
  return family(config).make_policy(config, abstract=abstract)


def build_policy(config, workdir: str, log=print) -> Policy:
  """Builds the policy of `config`: the model family of `config.model.kind`, wrapped in CTRL's
  augmented model when `config.mode` is "ctrl" (its data, classifiers and judges made first
  where needed, in `workdir`)."""
  base = build_base_policy(config)
  if config.mode == "ctrl":
    return ctrl_policy.make_policy(config, workdir, base, log=log)
  return base


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
  `config` starts from (`Family.weight_files`), and "lora_init": {"path", file: [size,
  SHA-256]} of the LoRA file it starts from when `model.lora.init_path` is set. Call after the
  model has been loaded or pre-trained once."""
  directory, files = family(config).weight_files(config.model)
  weights = {"path": directory, "files": fingerprint_files(directory, files)}
  lora = config.model.get("lora")
  if lora is not None and lora.enabled and lora.get("init_path"):  # the adapter it starts from
    path = os.path.realpath(lora_io.find_lora_file(os.path.expanduser(lora.init_path)))
    weights["lora_init"] = {"path": path, **fingerprint_files(os.path.dirname(path),
                                                              [os.path.basename(path)])}
  return weights
