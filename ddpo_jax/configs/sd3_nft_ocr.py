r"""DiffusionNFT on Stable Diffusion 3.5 Medium, OCR reward: NVlabs/DiffusionNFT's config/nft.py
`sd3_ocr` (`_get_config`, 8 GPUs; trained by scripts/train_nft_sd3.py) at global batch sizes. The
values the three NFT configs share (the dpm2 sampler without CFG, groups of 24 in 16 sampling calls
of 72, KL beta 1e-4, the weight EMA; each with its source) are `ddpo_jax.config_base.sd3_nft_base`;
this task's own are below.

  python -m ddpo_jax.main --config=sd3_nft_ocr --workdir=/tmp/sd3_nft_ocr \
      --config.prompt_fn_kwargs.path=PROMPTS.txt --config.reward.server_url=URL

Variants: `:full` (full transformer fine-tuning), `:runlocal` (seconds on a CPU; add
--config.model.pretrained_path=TINY_SD3_PIPELINE_DIR).
"""

import ml_collections

from ddpo_jax import config_base


def get_config(arg=None):
  config = config_base.sd3_nft_base()
  # the OCR scorer behind the reward server (`reward.server_url`, a
  # `python -m ddpo_jax.rewards.server --scorer=ocr`)
  config.reward.weights = ml_collections.ConfigDict({"remote": 1.0})
  t = config.train
  # `sd3_ocr`: optimizer steps of 72 x 8 accumulated, 2 per epoch
  t.gradient_accumulation_steps = 8
  # NFT's beta 0.1 and the old policy's decay_type 2
  t.nft_beta = 0.1
  t.nft_decay_type = 2
  return config_base.apply_variants(config, arg, config_base.FLOW_VARIANTS, "SD3 DiffusionNFT")
