r"""Flow-GRPO on Stable Diffusion 3.5 Medium, PickScore reward: flow_grpo's config/grpo.py
`pickscore_sd3` at global batch sizes. The values the three SD3 Flow-GRPO configs share (sampler,
groups, batches, LoRA, weight EMA; each with its source) are
`ddpo_jax.config_base.sd3_flow_grpo_base`; this task's own are below.

  python -m ddpo_jax.main --config=sd3_pickscore --workdir=/tmp/sd3_pickscore \
      --config.prompt_fn_kwargs.path=PROMPTS.txt --config.reward.pickscore_path=DIR

Variants: `:full` (full transformer fine-tuning), `:runlocal` (seconds on a CPU; add
--config.model.pretrained_path=TINY_SD3_PIPELINE_DIR).
"""

import ml_collections

from ddpo_jax import config_base


def get_config(arg=None):
  config = config_base.sd3_flow_grpo_base()
  # PickScore on device (`reward.pickscore_path`)
  config.reward.weights = ml_collections.ConfigDict({"pickscore": 1.0})
  # flow_grpo's KL weight `train.beta` of `pickscore_sd3`, in its units
  config.train.kl_beta = 0.01
  return config_base.apply_variants(config, arg, config_base.FLOW_VARIANTS, "SD3 Flow-GRPO")
