r"""Trains with DDPO: `python -m ddpo_jax.main --config=configs/NAME.py --workdir=DIR [--config.key=value]`.

With no --config it uses configs/default.py (digits prompt alignment). Re-running the same
command resumes from the latest checkpoint in DIR/checkpoints.
"""
import os

from absl import app, flags, logging
from ml_collections import config_flags

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(_REPO, "configs", "default.py"), "ml_collections config file.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/default", "Run directory (checkpoints, metrics).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  logging.set_verbosity(logging.WARNING)
  if config.mode == "pretrain":
    from ddpo_jax import digits
    if config.model.kind != "digits":
      raise ValueError("mode='pretrain' exists for the built-in digits model only")
    digits.load_or_pretrain(config.model, config.model.pretrain.seed)
    return
  if config.mode != "ddpo":
    raise ValueError(f"config.mode={config.mode!r}; use 'ddpo' or 'pretrain'")
  from ddpo_jax import train
  train.train_and_evaluate(config, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
