r"""Stable Diffusion DDPO, JPEG compressibility (paper §6.1; the PyTorch port's `compressibility`).

Reward −JPEG size in kB (PIL quality 95) of 512×512 samples; prompts: the 398 ImageNet animal
classes (`imagenet_classes.txt`, read from $DDPO_JAX_ASSETS or --config.prompt_fn_kwargs.path).
LoRA (rank 4) on the UNet's attention projections, lr 3e-4; 100 epochs × 256 samples (32 per
sampling call × 8 calls), 50 DDIM steps, eta 1, CFG 5; optimizer steps of 64 samples
(train.batch_size 8 × 8 accumulated minibatches, as the torch port's 8 GPUs × 4 × 2), i.e. 4
per epoch; per-prompt stat tracking (buffer 16, min 16). Batch sizes are global.

  DDPO_JAX_ASSETS=/path/to/assets python -m ddpo_jax.main \
      --config=sd_compressibility --workdir=/tmp/sd_compressibility

Variants: `--config=sd_compressibility:full` (full UNet, lr 1e-5, fp32 master
weights, bf16 compute, Adam first moment in bf16: the JAX original), `:runlocal` (seconds on a
CPU; add --config.model.pretrained_path=TINY_PIPELINE_DIR). Export the fine-tuned model:
`python -m ddpo_jax.export --workdir=/tmp/sd_compressibility --out=/tmp/sd_compressed`.
"""

import ml_collections

from ddpo_jax import config_base
from ddpo_jax.config_schema import new_config


def get_config(arg=None):
  config = new_config("ddpo", "sd")  # LoRA rank 4, lr 3e-4, 50 DDIM steps, eta 1, CFG 5
  config.prompt_fn = "imagenet_animals"
  config.reward.weights = ml_collections.ConfigDict({"jpeg_compressibility": 1.0})
  config.save_freq = 1  # a checkpoint every epoch (LoRA checkpoints are small)
  # 100 epochs (the schema's default) x 256 samples: 32 per sampling call x 8
  config.sample.batch_size = 32
  config.sample.num_batches_per_epoch = 8
  # optimizer steps of 64 samples: 8 x 8 accumulated (the torch port's 8 GPUs x 4 x 2), 4 per
  # epoch; stat tracking buffer 16, min 16 (the schema's defaults)
  config.train.batch_size = 8
  config.train.gradient_accumulation_steps = 8
  return config_base.apply_variants(config, arg, config_base.SD_VARIANTS, "Stable Diffusion")
