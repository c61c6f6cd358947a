"""Model families: the one place that maps a config to its `Policy`.

`build_base_policy(config)` builds the family of `config.model.kind` (`FAMILIES`: the built-in
digits model, Stable Diffusion 1.x/2.x); `build_policy(config, workdir)` wraps it in CTRL's
augmented model when the config has a `ctrl` section. The training loops, sampling, export and
evaluation build policies only through here, so a new family is one entry in `FAMILIES`.
"""
from __future__ import annotations

from typing import Callable

from ddpo_jax import digits, sd
from ddpo_jax.ctrl import policy as ctrl_policy
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
