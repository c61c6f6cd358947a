r"""Flow-GRPO on FLUX.1-dev, PickScore reward: flow_grpo's config/grpo.py `pickscore_flux` (32 GPUs)
at global batch sizes, on top of what it shares with the SD3 Flow-GRPO configs
(`ddpo_jax.config_base.sd3_flow_grpo_base`: 512 px, groups of 24, 48 prompts per epoch, global
std, timestep fraction 0.99, PPO clip 1e-4, lr 3e-4, the weight EMA and the zero-advantage
filter); FLUX's own values are below.

  python -m ddpo_jax.main --config=flux_pickscore --workdir=/tmp/flux_pickscore \
      --config.prompt_fn_kwargs.path=PROMPTS.txt --config.reward.pickscore_path=DIR

Variants: `:full` (full transformer fine-tuning), `:runlocal` (seconds on a CPU; add
--config.model.pretrained_path=TINY_FLUX_PIPELINE_DIR).
"""

import ml_collections

from ddpo_jax import config_base


def _flux_runlocal(config) -> None:
  """`runlocal` for FLUX: `config_base.flow_runlocal` on a tiny FLUX pipeline."""
  config_base.flow_runlocal(config)
  config.model.lora.targets = config_base.FLUX_LORA_TARGETS
  config.sample.guidance_scale = 1.0  # FLUX: no CFG (runlocal's SD default is 2)


VARIANTS = (
    config_base.Variant("full", config_base.full_finetuning, "full transformer fine-tuning"),
    config_base.Variant("runlocal", _flux_runlocal, "seconds on a CPU against a tiny pipeline"))


def get_config(arg=None):
  config = config_base.sd3_flow_grpo_base()
  config.reward.weights = ml_collections.ConfigDict({"pickscore": 1.0})  # PickScore on device
  m = config.model
  m.pretrained_path = "black-forest-labs/FLUX.1-dev"
  # FLUX.1-dev is guidance-distilled: the embedded guidance 3.5 and no classifier-free guidance
  m.embedded_guidance = 3.5
  config.sample.guidance_scale = 1.0
  # LoRA as flow_grpo's scripts/train_flux.py: rank 64, alpha 128 on the attention projections
  # of the double- and single-stream blocks and the feed-forward layers of the double-stream ones
  m.lora.rank = 64
  m.lora.alpha = 128.0
  m.lora.targets = config_base.FLUX_LORA_TARGETS
  config.train.kl_beta = 0.0  # flow_grpo's beta is 0 here
  s, t = config.sample, config.train
  # the SDE sampler at noise level 0.9 with 6 steps
  s.num_steps = 6
  s.noise_level = 0.9
  # 48 prompts x 24 = 1152 images per epoch in 12 sampling calls of 96 (3 per GPU); optimizer
  # steps of 576 (96 x 6 accumulated), 2 per epoch
  s.batch_size = 96
  s.num_batches_per_epoch = 12
  t.batch_size = 96
  t.gradient_accumulation_steps = 6
  return config_base.apply_variants(config, arg, VARIANTS, "FLUX Flow-GRPO")
