r"""Stable Diffusion DDPO, JPEG incompressibility (paper §6.1; the torch port's
`incompressibility`).

As configs/sd_compressibility.py with reward +JPEG size in kB.

  DDPO_JAX_ASSETS=/path/to/assets python -m ddpo_jax.main \
      --config=configs/sd_incompressibility.py --workdir=/tmp/sd_incompressibility

Variants: `:full`, `:runlocal` (see configs/sd_compressibility.py).
"""

from ddpo_jax import recipes


def get_config(arg=None):
  return recipes.sd_task_config("incompressibility", arg)
