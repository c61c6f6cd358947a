r"""Stable Diffusion DDPO, LAION aesthetic score (paper §6.1; the torch port's `aesthetic`).

Reward: the LAION aesthetic MLP (`sac+logos+ava1-l14-linearMSE.pth`) on the L2-normalised CLIP
ViT-L/14 image embedding, computed on the device in the sampling program; prompts: the 45
simple animals (`simple_animals.txt`). 200 epochs × 256 samples; optimizer steps of 128 samples
(8 × 16 accumulated, as the torch port's 8 GPUs × 4 × 4), 2 per epoch; stat tracking buffer 32,
min 16. Otherwise as ddpo_jax/configs/sd_compressibility.py (LoRA rank 4, lr 3e-4, 50 steps, CFG 5).

  DDPO_JAX_ASSETS=/path/to/assets python -m ddpo_jax.main \
      --config=sd_aesthetic --workdir=/tmp/sd_aesthetic \
      --config.reward.aesthetic_mlp_path=/path/to/sac+logos+ava1-l14-linearMSE.pth

(`reward.clip_path` defaults to the Hub id openai/clip-vit-large-patch14; a local directory
works too.) Variants: `:full`, `:runlocal` (the latter also needs --config.reward.clip_path=DIR
of a CLIP vision tower with projection_dim 768).
"""

import ml_collections

from ddpo_jax import config_base
from ddpo_jax.config_schema import new_config


def get_config(arg=None):
  config = new_config("ddpo", "sd")  # LoRA rank 4, lr 3e-4, 50 DDIM steps, eta 1, CFG 5
  config.prompt_fn = "simple_animals"
  config.reward.weights = ml_collections.ConfigDict({"aesthetic": 1.0})
  config.save_freq = 1  # a checkpoint every epoch (LoRA checkpoints are small)
  config.num_epochs = 200
  # 256 samples per epoch: 32 per sampling call x 8
  config.sample.batch_size = 32
  config.sample.num_batches_per_epoch = 8
  # optimizer steps of 128 samples: 8 x 16 accumulated (the torch port's 8 GPUs x 4 x 4), 2 per
  # epoch
  config.train.batch_size = 8
  config.train.gradient_accumulation_steps = 16
  config.per_prompt_stat_tracking.buffer_size = 32  # min 16 (the schema's default)
  return config_base.apply_variants(config, arg, config_base.SD_VARIANTS, "Stable Diffusion")
