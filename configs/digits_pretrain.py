r"""Pre-trains the class-conditional digits model only (what the default run does first).

Writes the EMA parameters to `model.pretrained_dir` (default: the cache directory,
~/.cache/ddpo_jax/digits_pretrained_<hash>, or $DDPO_JAX_CACHE) and stops. ~1-2 min on 2 CPU cores.

  python -m ddpo_jax.main --config=configs/digits_pretrain.py --workdir=/tmp/digits_pretrain
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import default  # noqa: E402


def get_config(arg=None):
  config = default.get_config(arg)
  config.mode = "pretrain"
  return config
