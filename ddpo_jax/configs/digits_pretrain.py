r"""Pre-trains the class-conditional digits model only (what the default run does first).

Writes the EMA parameters to `model.pretrained_dir` (default: the cache directory,
~/.cache/ddpo_jax/digits_pretrained_<hash>, or $DDPO_JAX_CACHE) and stops. ~1-2 min on 2 CPU cores.

  python -m ddpo_jax.main --config=digits_pretrain --workdir=/tmp/digits_pretrain

Variant: `:runlocal` (the tiny model of the runlocal tests).
"""
from ddpo_jax import config_base
from ddpo_jax.config_schema import new_config


def get_config(arg=None):
  config = new_config("pretrain", "digits")
  return config_base.apply_variants(config, arg, config_base.DIGITS_VARIANTS,
                                    "digits pre-training")
