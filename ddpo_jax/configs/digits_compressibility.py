r"""Digits with the JPEG compressibility reward (−JPEG size in kB, PIL quality 95); otherwise the
sampling and update of ddpo_jax/configs/default.py, without per-prompt stat tracking.

  python -m ddpo_jax.main --config=digits_compressibility --workdir=/tmp/ddpo_digits_jpeg

Variant: `:runlocal` (seconds, for tests).
"""
from ddpo_jax import config_base
from ddpo_jax.config_schema import new_config


def get_config(arg=None):
  config = new_config("ddpo", "digits")
  config.num_epochs = 40
  config.save_freq = 5
  config.log_image_freq = 5
  config.sample.num_steps = 20
  config.sample.guidance_scale = 1.0
  config.sample.batch_size = 256
  config.sample.num_batches_per_epoch = 1
  config.train.batch_size = 32  # 8 optimizer steps per epoch
  config.train.timestep_fraction = 0.5
  config.train.clip_range = 0.2  # not the reference's 1e-4: ddpo_jax/configs/default.py says why
  config.reward.weights = {"jpeg_compressibility": 1.0}
  config.reward.metrics = ()
  config.per_prompt_stat_tracking.enabled = False
  return config_base.apply_variants(config, arg, config_base.DIGITS_VARIANTS, "digits")
