r"""Flow-GRPO on FLUX.1-dev, PickScore reward (flow_grpo's `pickscore_flux` at global batch sizes;
`ddpo_jax.recipes.flux_flow_grpo_config` lists the hyperparameters and their source).

  python -m ddpo_jax.main --config=configs/flux_pickscore.py --workdir=/tmp/flux_pickscore \
      --config.prompt_fn_kwargs.path=PROMPTS.txt --config.reward.pickscore_path=DIR

Variants: `:full` (full transformer fine-tuning), `:runlocal` (seconds on a CPU; add
--config.model.pretrained_path=TINY_FLUX_PIPELINE_DIR).
"""

from ddpo_jax import recipes


def get_config(arg=None):
  return recipes.flux_flow_grpo_config("pickscore", arg)
