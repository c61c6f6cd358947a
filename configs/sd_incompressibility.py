r"""Stable Diffusion DDPO, JPEG incompressibility (paper §6.1; the torch port's `incompressibility`).

As configs/sd_compressibility.py with reward +JPEG size in kB.

  DDPO_JAX_ASSETS=/path/to/assets python -m ddpo_jax.main \
      --config=configs/sd_incompressibility.py --workdir=/tmp/sd_incompressibility

Variants: `:full`, `:runlocal` (see configs/sd_compressibility.py).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import sd_compressibility  # noqa: E402

from ddpo_jax import sd  # noqa: E402


def get_config(arg=None):
  config = sd_compressibility.get_config()
  config.reward.weights = {"jpeg_incompressibility": 1.0}
  return sd.apply_variants(config, arg)
