"""Makes (or checks) the sampled offline datasets of a CTRL config before training:

    python -m ddpo_jax.ctrl.make_sampled_data --config=ctrl_sd_compressibility \
        --workdir=/tmp/ctrl_sd

Each control whose data source is sampled from the pre-trained model (`ctrl.sampled_data`) gets
its npz in WORKDIR/offline_data/ (or its `data.path`); a multi-process run needs them made once
by a single process first.
"""
import sys

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from ddpo_jax import configs
from ddpo_jax.ctrl import sampled_data
from ddpo_jax.ctrl.controls import controls_from_config
from ddpo_jax.trainer.families import build_base_policy


def main(argv):
  del argv
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  base = None
  for c in controls_from_config(config):
    cond = config.ctrl.conditions[c.name]
    if sampled_data.is_sampled_source(cond.data.source):
      base = base or build_base_policy(config)
      _, cuts = sampled_data.load_or_sample(cond.data, config, workdir, c.num_classes, base)
      print(f"{c.name}: {sampled_data.offline_data_path(cond.data, workdir)} (cuts "
            f"{np.round(cuts, 4).tolist()})")


if __name__ == "__main__":  # flags defined here only: importing this module defines none
  config_flags.DEFINE_config_file("config", None, "A CTRL config file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "The run directory (offline_data/ is written there).",
                      required=True)
  sys.argv[:] = configs.resolve_argv(sys.argv)  # --config=NAME: the shipped file
  app.run(main)
