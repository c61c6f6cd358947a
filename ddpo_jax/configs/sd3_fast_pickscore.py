r"""Flow-GRPO-Fast on Stable Diffusion 3.5 Medium, PickScore reward: flow_grpo's config/grpo.py
`pickscore_sd3_fast_nocfg` (trained by scripts/train_sd3_fast.py) at global batch sizes. The values
the two Fast configs share (CPS in a random window of 3 of the 10 steps, no CFG, PPO clip 1e-5, KL
beta 0; each with its source) are `ddpo_jax.config_base.sd3_flow_grpo_fast_base`; this task's own
are below.

  python -m ddpo_jax.main --config=sd3_fast_pickscore --workdir=/tmp/sd3_fast_pickscore \
      --config.prompt_fn_kwargs.path=PROMPTS.txt --config.reward.pickscore_path=DIR

Variants: `:full` (full transformer fine-tuning), `:runlocal` (seconds on a CPU; add
--config.model.pretrained_path=TINY_SD3_PIPELINE_DIR).
"""

import ml_collections

from ddpo_jax import config_base


def get_config(arg=None):
  config = config_base.sd3_flow_grpo_fast_base()
  # PickScore on device (`reward.pickscore_path`)
  config.reward.weights = ml_collections.ConfigDict({"pickscore": 1.0})
  # `pickscore_sd3_fast_nocfg`: 18 images per prompt, 64 prompts per epoch
  config.sample.group_size = 18
  return config_base.apply_variants(config, arg, config_base.FAST_VARIANTS,
                                    "SD3 Flow-GRPO-Fast")
