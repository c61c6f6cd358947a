r"""Stable Diffusion DDPO, prompt-image alignment (paper §6.1; the torch port's
`prompt_image_alignment`).

Prompts "a(n) ANIMAL ACTIVITY" (45 simple animals × the activities of `activities.txt`); reward
from a reward server (`python -m ddpo_jax.rewards.server --scorer=llava_bertscore ...`, LLaVA's
answer to "what is going on in this image?" scored by BERTScore recall against "The image
contains PROMPT") at `reward.server_url`, queried by a thread pool while the device keeps
sampling. 200 epochs × 288 samples (32 × 9); optimizer steps of 144 samples (8 × 18
accumulated, as the torch port's 6 GPUs × 4 × 6), 2 per epoch; stat tracking buffer 32, min 16.

  python -m ddpo_jax.rewards.server --scorer=llava_bertscore --port=8000 \
      --scorer_kwargs='{"model": "llava-hf/llava-1.5-7b-hf"}' &   # on a GPU host (docs/rewards.md)
  DDPO_JAX_ASSETS=/path/to/assets python -m ddpo_jax.main \
      --config=sd_alignment --workdir=/tmp/sd_alignment \
      --config.reward.server_url=http://127.0.0.1:8000

Variants: `:full`, `:runlocal` (the tests run the latter against a `--scorer=brightness` server).
"""

import ml_collections

from ddpo_jax import config_base
from ddpo_jax.config_schema import new_config


def get_config(arg=None):
  config = new_config("ddpo", "sd")  # LoRA rank 4, lr 3e-4, 50 DDIM steps, eta 1, CFG 5
  config.prompt_fn = "simple_animals_activities"
  config.reward.weights = ml_collections.ConfigDict({"remote": 1.0})
  config.save_freq = 1  # a checkpoint every epoch (LoRA checkpoints are small)
  config.num_epochs = 200
  # 288 samples per epoch: 32 per sampling call x 9
  config.sample.batch_size = 32
  config.sample.num_batches_per_epoch = 9
  # optimizer steps of 144 samples: 8 x 18 accumulated (the torch port's 6 GPUs x 4 x 6), 2 per
  # epoch
  config.train.batch_size = 8
  config.train.gradient_accumulation_steps = 18
  config.per_prompt_stat_tracking.buffer_size = 32  # min 16 (the schema's default)
  return config_base.apply_variants(config, arg, config_base.SD_VARIANTS, "Stable Diffusion")
