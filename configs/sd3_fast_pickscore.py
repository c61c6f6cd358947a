r"""Flow-GRPO-Fast on Stable Diffusion 3.5 Medium, pickscore reward (flow_grpo's
`pickscore_sd3_fast_nocfg` at global batch sizes; `ddpo_jax.recipes.sd3_flow_grpo_fast_config` lists the
hyperparameters and their source).

  python -m ddpo_jax.main --config=configs/sd3_fast_pickscore.py --workdir=/tmp/sd3_fast_pickscore \
      --config.prompt_fn_kwargs.path=PROMPTS.txt --config.reward.pickscore_path=DIR

Variants: `:full` (full transformer fine-tuning), `:runlocal` (seconds on a CPU; add
--config.model.pretrained_path=TINY_SD3_PIPELINE_DIR).
"""

from ddpo_jax import recipes


def get_config(arg=None):
  return recipes.sd3_flow_grpo_fast_config("pickscore", arg)
