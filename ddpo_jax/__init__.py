"""ddpo_jax: reinforcement-learning fine-tuning of diffusion models (DDPO, CTRL) in JAX/Flax.

For notebooks and scripts (ddpo_jax/api.py; docs/rewards.md, "Your own reward in Python"):

  import ddpo_jax
  config = ddpo_jax.get_config("default")     # as --config=default; "NAME:VARIANTS"
  metrics = ddpo_jax.train(config, "workdirs/mine")   # the last epoch's metrics row

`ddpo_jax.rewards.reward` registers a reward function, `ddpo_jax.algorithms.register` an
algorithm. `import ddpo_jax` itself stays cheap: these names load their modules (and JAX) on
first use.
"""
import importlib

__version__ = "0.1.0"

# name -> the module that defines it, imported on first access (PEP 562)
_LAZY = {"get_config": "ddpo_jax.api", "train": "ddpo_jax.api"}
_SUBPACKAGES = ("rewards", "algorithms")


def __getattr__(name):
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  if name in _SUBPACKAGES:
    return importlib.import_module(f"{__name__}.{name}")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + list(_LAZY) + list(_SUBPACKAGES))


__all__ = ["__version__", "get_config", "train"]
