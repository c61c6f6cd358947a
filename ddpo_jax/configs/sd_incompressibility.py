r"""Stable Diffusion DDPO, JPEG incompressibility (paper §6.1; the torch port's
`incompressibility`).

As ddpo_jax/configs/sd_compressibility.py with reward +JPEG size in kB.

  DDPO_JAX_ASSETS=/path/to/assets python -m ddpo_jax.main \
      --config=sd_incompressibility --workdir=/tmp/sd_incompressibility

Variants: `:full`, `:runlocal` (see ddpo_jax/configs/sd_compressibility.py).
"""

import ml_collections

from ddpo_jax import config_base
from ddpo_jax.config_schema import new_config


def get_config(arg=None):
  config = new_config("ddpo", "sd")  # LoRA rank 4, lr 3e-4, 50 DDIM steps, eta 1, CFG 5
  config.prompt_fn = "imagenet_animals"
  config.reward.weights = ml_collections.ConfigDict({"jpeg_incompressibility": 1.0})
  config.save_freq = 1  # a checkpoint every epoch (LoRA checkpoints are small)
  # 100 epochs (the schema's default) x 256 samples: 32 per sampling call x 8
  config.sample.batch_size = 32
  config.sample.num_batches_per_epoch = 8
  # optimizer steps of 64 samples: 8 x 8 accumulated (the torch port's 8 GPUs x 4 x 2), 4 per
  # epoch; stat tracking buffer 16, min 16 (the schema's defaults)
  config.train.batch_size = 8
  config.train.gradient_accumulation_steps = 8
  return config_base.apply_variants(config, arg, config_base.SD_VARIANTS, "Stable Diffusion")
