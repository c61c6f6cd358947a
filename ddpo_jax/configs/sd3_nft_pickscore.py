r"""DiffusionNFT on Stable Diffusion 3.5 Medium, PickScore reward: NVlabs/DiffusionNFT's
config/nft.py `sd3_pickscore` (`_get_config`, 8 GPUs; trained by scripts/train_nft_sd3.py) at
global batch sizes. The values the three NFT configs share (the dpm2 sampler without CFG, groups of
24 in 16 sampling calls of 72, KL beta 1e-4, the weight EMA; each with its source) are
`ddpo_jax.config_base.sd3_nft_base`; this task's own are below.

  python -m ddpo_jax.main --config=sd3_nft_pickscore --workdir=/tmp/sd3_nft_pickscore \
      --config.prompt_fn_kwargs.path=PROMPTS.txt --config.reward.pickscore_path=DIR

Variants: `:full` (full transformer fine-tuning), `:runlocal` (seconds on a CPU; add
--config.model.pretrained_path=TINY_SD3_PIPELINE_DIR).
"""

import ml_collections

from ddpo_jax import config_base


def get_config(arg=None):
  config = config_base.sd3_nft_base()
  # PickScore on device (`reward.pickscore_path`)
  config.reward.weights = ml_collections.ConfigDict({"pickscore": 1.0})
  t = config.train
  # `sd3_pickscore`: optimizer steps of 72 x 16 accumulated, 1 per epoch
  t.gradient_accumulation_steps = 16
  # NFT's beta 1 and the old policy's decay_type 1
  t.nft_beta = 1.0
  t.nft_decay_type = 1
  return config_base.apply_variants(config, arg, config_base.FLOW_VARIANTS, "SD3 DiffusionNFT")
