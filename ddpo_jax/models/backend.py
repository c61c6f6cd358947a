"""The platform the programs being traced will run on: `jax.default_backend()`, unless a
compile for another target is under way (`compiling_for`).

Some modules choose their implementation by platform: `conv.conv_general_dilated` writes its
gradient in XLA:CPU's canonical form on CPU only, `attention.dot_product_attention` picks cuDNN
on GPUs. `python -m ddpo_jax.plan` traces on a CPU host for a TPU or GPU target; under
`compiling_for(platform)` those choices follow the target, so the programs it compiles are the
ones the target itself would build.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import jax

_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("ddpo_jax_target_platform",
                                                                     default=None)
PLATFORMS = ("cpu", "gpu", "tpu")


def target_platform() -> str:
  """"cpu", "gpu" or "tpu": the platform of the programs traced now."""
  return _TARGET.get() or jax.default_backend()


@contextlib.contextmanager
def compiling_for(platform: str) -> Iterator[None]:
  """Within the block, `target_platform()` is `platform` ("cpu", "gpu" or "tpu")."""
  if platform not in PLATFORMS:
    raise ValueError(f"platform {platform!r}; one of {PLATFORMS}")
  token = _TARGET.set(platform)
  try:
    yield
  finally:
    _TARGET.reset(token)
