"""What several ddpo_jax/configs/*.py share: the variant parser (`apply_variants`: `--config=FILE.py:V1,V2`),
the variants of more than one config (`runlocal` for every run kind and model family, `full`),
the LoRA targets of SD3 and FLUX, and the values that the configs of one reference family share
(SD3.5-Medium Flow-GRPO, Flow-GRPO-Fast and DiffusionNFT; the digits and the Stable Diffusion
CTRL set-ups). Each config sets its own task's values on top.

Every config starts from `config_schema.new_config(mode, model)` (the keys and their defaults:
docs/config.md) and only overrides keys.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable

import ml_collections

from ddpo_jax.config_schema import new_config

__all__ = ["Variant", "apply_variants", "runlocal", "full_finetuning", "DIGITS_VARIANTS",
           "SD_VARIANTS", "SD3_LORA_TARGETS", "FLUX_LORA_TARGETS", "flow_runlocal",
           "FLOW_VARIANTS", "sd3_flow_grpo_base", "FAST_VARIANTS", "sd3_flow_grpo_fast_base",
           "sd3_nft_base", "ctrl_digits_base", "CTRL_VARIANTS", "ctrl_sd_base",
           "ctrl_sd_variants"]


@dataclasses.dataclass(frozen=True)
class Variant:
  """A named change of a config. `name` "nN" stands for every "n<integer>" (e.g. a label
  budget "n100"); `apply` then also takes the integer."""
  name: str
  apply: Callable
  doc: str = ""


def apply_variants(config: ml_collections.ConfigDict, arg, variants: tuple[Variant, ...],
                   config_name: str) -> ml_collections.ConfigDict:
  """Applies the comma-separated variants named in `arg` ("runlocal,full"; blanks dropped) in
  the order of `variants` (not of `arg`: e.g. `runlocal` comes last and shrinks what the others
  set).

  Raises:
    ValueError: a variant `variants` lacks (a typo such as "runlocl"), naming the config and
      the known ones, never the full config silently.
  """
  chosen = [v.strip() for v in (arg or "").split(",") if v.strip()]

  def matches(variant, name):
    if variant.name == "nN":
      return re.fullmatch(r"n\d+", name) is not None
    return variant.name == name
  for name in chosen:
    if not any(matches(v, name) for v in variants):
      known = ", ".join(v.name for v in variants)
      raise ValueError(f"unknown {config_name} config variant {name!r}; known: {known}")
  for variant in variants:
    for name in chosen:
      if matches(variant, name):
        if variant.name == "nN":
          variant.apply(config, int(name[1:]))
        else:
          variant.apply(config)
  return config


def _use_tiny_digits_model(model_config) -> None:
  """The tiny digits model of every digits `runlocal` (DDPO and CTRL share it, so they share
  its pre-training cache)."""
  model_config.channels = (8, 16)
  model_config.attention_heads = 2
  model_config.context_dim = 8
  model_config.norm_num_groups = 4
  model_config.pretrain.steps = 20
  model_config.pretrain.batch_size = 16


def runlocal(config: ml_collections.ConfigDict) -> None:
  """Seconds on a CPU, for tests: 2 epochs of few steps with the family's tiny model (digits:
  channels (8, 16), 20 pre-training steps; SD: the tiny pipeline that
  --config.model.pretrained_path=DIR names, 16x16 images, float32, LoRA rank 2)."""
  config.num_epochs = 2
  config.save_freq = 1
  config.progress = False
  config.per_prompt_stat_tracking.min_count = 2
  config.sample.num_steps = 4
  config.train.timestep_fraction = 1.0
  ctrl = config.mode == "ctrl"
  if config.model.kind == "digits":
    _use_tiny_digits_model(config.model)
    config.sample.batch_size = 8
    config.train.batch_size = 4
    if not ctrl:
      config.log_image_freq = 1
      config.sample.guidance_scale = 2.0  # exercise the CFG path
  else:
    config.model.pretrained_path = ""
    config.model.resolution = 16
    config.model.compute_dtype = "float32"
    config.model.lora.rank = 2
    config.model.lora.alpha = 2.0
    config.keep_checkpoints = 0
    config.log_image_freq = 1
    config.sample.batch_size = 4
    config.sample.num_batches_per_epoch = 1
    config.train.batch_size = 2
    config.train.gradient_accumulation_steps = 2
    config.per_prompt_stat_tracking.buffer_size = 4
  if not ctrl:
    return
  c = config.ctrl
  c.batch_size = 8
  c.steps_per_epoch = 2
  c.noisy_classifier_steps = 20
  c.eval_num_samples = 60  # >= 2 per label combination of the digits multi config
  for name in c.controls:
    c.conditions[name].classifier.steps = 30
  if config.model.kind == "sd":  # 2 DDIM steps, 16 sampled images per offline dataset
    config.model.remat = False
    config.log_image_freq = 0
    config.sample.num_steps = 2
    config.sample.batch_size = 8
    c.batch_size = 4
    c.gradient_accumulation_steps = 1
    for name in c.controls:
      cond = c.conditions[name]
      cond.data.num_images = 16
      cond.data.batch_size = 8
      cond.classifier.steps = 20
      cond.classifier.input_size = 0


def full_finetuning(config) -> None:
  """Full UNet fine-tuning as the JAX original: lr 1e-5, fp32 master weights, bf16 compute,
  Adam's first moment in bfloat16, fewer kept checkpoints."""
  config.model.lora.enabled = False
  config.train.learning_rate = 1e-5
  config.train.adam_mu_dtype = "bfloat16"
  config.save_freq = 10
  config.keep_checkpoints = 3


DIGITS_VARIANTS = (Variant("runlocal", runlocal, "seconds, for tests"),)
SD_VARIANTS = (Variant("full", full_finetuning, "full UNet fine-tuning"),
               Variant("runlocal", runlocal, "seconds on a CPU against a tiny pipeline"))

# The joint-attention projections of SD3's MMDiT that flow_grpo's LoRA adapts (image and text
# streams: to_q/k/v/out, add_q/k/v_proj, to_add_out).
SD3_LORA_TARGETS = (r"(^|/)attn/(to_q|to_k|to_v|to_out_0|add_q_proj|add_k_proj|add_v_proj|"
                    r"to_add_out)$",)
# flow_grpo's FLUX LoRA (scripts/train_flux.py `main`): the same attention projections plus the
# feed-forward layers of both streams of the double-stream blocks (ff.net.0.proj, ff.net.2,
# ff_context.net.0.proj, ff_context.net.2; the single-stream blocks have no `ff`).
FLUX_LORA_TARGETS = SD3_LORA_TARGETS + (r"(^|/)(ff|ff_context)/(net_0/proj|net_2)$",)


def flow_runlocal(config) -> None:
  """`runlocal` for the flow configs: the SD one (a tiny pipeline that
  --config.model.pretrained_path=DIR names, 16x16 images) with groups of 2 in batches of 4;
  the weight EMA (when the config keeps one) updated every step, so that its few steps move it."""
  runlocal(config)
  config.sample.group_size = 2
  config.model.lora.targets = SD3_LORA_TARGETS
  config.train.ema.update_interval = 1


FLOW_VARIANTS = (Variant("full", full_finetuning, "full transformer fine-tuning"),
                 Variant("runlocal", flow_runlocal, "seconds on a CPU against a tiny pipeline"))


def sd3_flow_grpo_base() -> ml_collections.ConfigDict:
  """Flow-GRPO on SD3.5-Medium: what flow_grpo's config/grpo.py `pickscore_sd3`,
  `general_ocr_sd3` and `geneval_sd3` (32 GPUs) share, translated to GLOBAL batch sizes. The
  configs ddpo_jax/configs/sd3_{pickscore,ocr,geneval}.py add the reward and flow_grpo's KL weight beta
  (`train.kl_beta`, in its units: beta · KL, mean over latent dims, added to a loss in advantage
  units; ddpo_jax's own `train.kl_coef`, in reward units, docs/algorithms.md §3.5, stays 0);
  the Fast, DiffusionNFT and FLUX configs start from it too.
  """
  config = new_config("ddpo", "sd")
  config.model.pretrained_path = "stabilityai/stable-diffusion-3.5-medium"
  config.model.resolution = 512
  # LoRA rank 32, alpha 64 on the joint-attention projections
  config.model.lora.rank = 32
  config.model.lora.alpha = 64.0
  config.model.lora.targets = SD3_LORA_TARGETS
  config.prompt_fn = "from_file"  # flow_grpo's dataset/{pickscore,ocr,geneval}/train.txt
  # 48 distinct prompts per epoch: flow_grpo's DistributedKRepeatSampler (flow_grpo/sampler.py)
  config.sample.prompt_sampling = "epoch_unique"
  config.num_epochs = 10000
  config.save_freq = 20
  config.keep_checkpoints = 5
  s = config.sample
  # the SDE sampler at noise level 0.7 with 10 steps and CFG 4.5, in sampling and in the update
  # (flow_grpo evaluates with 40 steps: `python -m ddpo_jax.sample --pipeline`)
  s.sampler = "sde"
  s.noise_level = 0.7
  s.num_steps = 10
  s.guidance_scale = 4.5
  # groups of 24 images per prompt, 48 prompts per epoch: 1152 samples = 4 sampling calls of
  # 288 (flow_grpo's 9 per GPU x 32 GPUs); advantages relative to the group's mean over the
  # whole batch's std (flow_grpo's `global_std=True`)
  s.group_size = 24
  s.group_std = "global"
  s.batch_size = 288
  s.num_batches_per_epoch = 4
  t = config.train
  # optimizer steps of 576 samples (288 x 2 accumulated), i.e. 2 per epoch; PPO clip 1e-4,
  # lr 3e-4, timestep fraction 0.99; advantages clipped to 5, AdamW as DDPO's and grad-norm
  # clip 1 are the schema's defaults
  t.batch_size = 288
  t.gradient_accumulation_steps = 2
  t.timestep_fraction = 0.99
  t.clip_range = 1e-4
  t.learning_rate = 3e-4
  t.drop_zero_advantage = True  # train_sd3.py drops the samples whose advantage is 0
  # the EMA of the trained weights that sampling / export read (flow_grpo/ema.py
  # `EMAModuleWrapper`, decay 0.9, every 8 steps)
  t.ema.enabled = True
  t.ema.decay = 0.9
  t.ema.update_interval = 8
  config.per_prompt_stat_tracking.enabled = False
  return config


def _fast_runlocal(config) -> None:
  """`runlocal` for the Fast configs: `flow_runlocal` with a window of 2 CPS steps in the first
  3 of its 4 steps."""
  flow_runlocal(config)
  config.sample.sde_window_size = 2
  config.sample.sde_window_range = (0, 3)


FAST_VARIANTS = (Variant("full", full_finetuning, "full transformer fine-tuning"),
                 Variant("runlocal", _fast_runlocal, "seconds on a CPU against a tiny pipeline"))


def sd3_flow_grpo_fast_base() -> ml_collections.ConfigDict:
  """Flow-GRPO-Fast on SD3.5-Medium: what flow_grpo's `pickscore_sd3_fast_nocfg` and
  `geneval_sd3_fast_nocfg` (config/grpo.py, 32 GPUs, trained by scripts/train_sd3_fast.py)
  share, at GLOBAL batch sizes, on top of `sd3_flow_grpo_base` (its 10 steps, 4 sampling calls
  of 288 (9 per GPU) per epoch, optimizer steps of 288 x 2 accumulated, 2 per epoch, advantages
  (r - group mean) / std of the whole batch). The configs ddpo_jax/configs/sd3_fast_{pickscore,geneval}.py
  add the reward and the group size.

  Ours, not the reference's: the window is drawn per global sampling call from (seed, epoch,
  call) (`dynamics.sde_window_steps`), the same for all its samples; flow_grpo draws it with
  Python's `random`, seeded per process, i.e. one window per GPU per call. The weight EMA and
  the zero-advantage filter as `sd3_flow_grpo_base` (train_sd3_fast.py keeps both).
  """
  config = sd3_flow_grpo_base()
  s, t = config.sample, config.train
  # CPS (`sde_type="cps"`) at noise level 0.8, only inside a window of 3 consecutive steps
  # whose start is drawn per sampling call from [0, 2] (`sde_window_size` 3, `sde_window_range`
  # (0, num_steps // 2) = (0, 5)); ODE (Euler) steps elsewhere
  s.sampler = "cps"
  s.noise_level = 0.8
  s.guidance_scale = 1.0  # no CFG: guidance 1 in sampling and `train.cfg` False
  s.sde_window_size = 3
  s.sde_window_schedule = "random"
  s.sde_window_range = (0, 5)
  # the initial noise is NOT shared within a group: these configs leave `sample.same_latent`
  # at its False (config/base.py)
  s.same_noise_per_group = False
  t.cfg = False
  t.clip_range = 1e-5
  # the update trains every window step (train_sd3_fast.py: `num_train_timesteps =
  # sde_window_size`)
  t.timestep_fraction = 1.0
  t.kl_beta = 0.0
  return config


def sd3_nft_base() -> ml_collections.ConfigDict:
  """DiffusionNFT on SD3.5-Medium: what NVlabs/DiffusionNFT's config/nft.py `sd3_pickscore`,
  `sd3_ocr` and `sd3_geneval` (`_get_config`, 8 GPUs; trained by scripts/train_nft_sd3.py)
  share, at GLOBAL batch sizes, on top of `sd3_flow_grpo_base` (its 512 px, 10 steps, LoRA rank
  32, alpha 64 on the joint-attention projections, lr 3e-4, advantages (r - group mean) / std
  of the whole batch, clipped to 5). The configs ddpo_jax/configs/sd3_nft_{pickscore,ocr,geneval}.py add
  the reward, the accumulation, NFT's beta and the old policy's decay type.
  """
  config = sd3_flow_grpo_base()
  s, t = config.sample, config.train
  # its sampler, the deterministic 2nd-order DPM solver (config/nft.py `solver="dpm2"`),
  # without CFG (guidance 1, `train.cfg` False)
  s.sampler = "dpm2"
  s.guidance_scale = 1.0
  # groups of 24, 48 prompts (1152 images) per epoch in 16 sampling calls of 72 (9 per GPU)
  s.group_size = 24
  s.batch_size = 72
  s.num_batches_per_epoch = 16
  t.algorithm = "nft"
  t.cfg = False
  t.batch_size = 72
  t.kl_beta = 1e-4  # the KL beta of `_get_config`
  t.timestep_fraction = 0.99
  t.drop_zero_advantage = False  # no zero-advantage filter (the reference has none)
  # the EMA of the trained weights for evaluation (train_nft_sd3.py: decay 0.9, every step),
  # beside NFT's own old policy
  t.ema.update_interval = 1
  return config


def ctrl_digits_base() -> ml_collections.ConfigDict:
  """What the digits CTRL configs (ddpo_jax/configs/ctrl_digits_*.py) share: the DDPO default's
  pre-trained digits model, 10 DDIM steps (eta 1, no prompt guidance; 10 rather than 20 halves
  the cost of backpropagating through the chain on a CPU), 6 epochs × 50 optimizer steps of 32
  chains; baselines: CFG fine-tuned for 300 steps of 64 labelled images, noisy classifiers for
  1500 steps.

  CTRL trains the control tables (lr 0.1) and the full UNet (lr 1e-4, `ctrl.train_base`),
  with the reward backpropagated through every step (`ctrl.truncation="none"`) and the
  reference code's KL reduction: MEAN over the 64 pixels, weight 1 per unit reward, i.e.
  α = 1 / 64 in the theory's terms (judge accuracy 0.977 on the class task; with the
  reference's weight 0.1: 0.893, less diverse; the tables alone: 0.65 at weight 0.1). The
  exact summed KL (α = 1) learns the class far less on this chain (judge 0.12 with the tables
  alone; 0.40 with the UNet and `ctrl.control_min_timestep=200`): the eta = 1 step from
  t = 101 to t = 1 has std 0.015, so a change of eps there costs 271 nats per unit squared
  change per pixel (0.6-2.3 at the other steps), and a table added to the time embedding
  shifts eps at every step (docs/results.md, digits)."""
  config = new_config("ctrl", "digits")
  # two CPU devices, the batch split between them: on a 2-core host an epoch takes 0.72x the
  # time of one device (24.7 s vs 34.5 s for 10 steps, same metrics to 4 digits)
  config.cpu_devices = 2
  config.num_epochs = 6
  config.save_freq = 2
  config.log_image_freq = 0
  config.sample.num_steps = 10
  config.sample.guidance_scale = 1.0
  c = config.ctrl
  c.batch_size = 32
  c.steps_per_epoch = 50
  c.truncation = "none"
  c.kl_reduction = "mean"
  config.train.control_learning_rate = 1e-1
  return config


def ctrl_sd_base(prompt_set: str) -> ml_collections.ConfigDict:
  """What ddpo_jax/configs/ctrl_sd_*.py share: Stable Diffusion (LoRA rank 4 on the attention
  projections, gradient checkpointing) and the reference's direct-backprop recipe
  (docs/algorithms.md §4.4): AdamW with LoRA lr 1e-3 and control-table lr 1e-2, weight decay
  0.1, grad-norm clip 5, reward weight 0.1, KL weight 0.01 MEAN-reduced over latent dims,
  random truncation; 50 DDIM steps, eta 1, CFG 5 (as the SD DDPO configs); chains of 4 × 8
  accumulated per step; prompts from the set `prompt_set` (ddpo_jax/tasks/prompts.py)."""
  config = new_config("ctrl", "sd")
  config.model.remat = True  # the backprop solver keeps one UNet step's activations at a time
  config.prompt_fn = prompt_set
  config.num_epochs = 20
  config.save_freq = 2
  config.log_image_freq = 0
  config.sample.batch_size = 32  # also the batch of the offline-data sampler
  config.train.learning_rate = 1e-3  # LoRA (the reference's other setting: 3e-4)
  config.train.adam_weight_decay = 0.1
  c = config.ctrl
  c.reward_weight = 0.1
  c.kl_weight = 0.01
  c.kl_reduction = "mean"
  c.batch_size = 4
  c.gradient_accumulation_steps = 8
  c.steps_per_epoch = 10
  c.eval_num_samples = 256
  return config


def _label_budget(config, n: int) -> None:
  for name in config.ctrl.controls:
    config.ctrl.conditions[name].data.num_labelled = n


def _cfg_baseline(config) -> None:
  config.ctrl.method = "cfg"
  config.train.learning_rate = 3e-4
  config.ctrl.batch_size = 64
  config.ctrl.steps_per_epoch = 50


def _cg_baseline(config) -> None:
  config.ctrl.method = "classifier_guidance"


def _ddpo_solver(config) -> None:
  """The PPO route: contexts (c, y), terminal reward log p̂(y | x_0), per-step penalty
  −α·KL_t (the train.* keys derived from ctrl.* at run time: trainer.ctrl), stat tracking per
  (c, y)."""
  config.ctrl.solver = "ddpo"
  config.train.clip_range = 0.2
  config.train.learning_rate = 3e-4
  config.train.timestep_fraction = 0.5
  config.sample.batch_size = 256
  config.sample.num_batches_per_epoch = 1
  config.train.batch_size = 32
  config.num_epochs = 14
  config.per_prompt_stat_tracking.enabled = True
  config.per_prompt_stat_tracking.buffer_size = 32
  config.per_prompt_stat_tracking.min_count = 16


CTRL_VARIANTS = (
    Variant("nN", _label_budget, "label budget: N labelled examples per control (default all)"),
    Variant("cfg", _cfg_baseline, "the classifier-free-guidance baseline"),
    Variant("cg", _cg_baseline, "the classifier-guidance baseline"),
    Variant("ddpo", _ddpo_solver, "the DDPO (PPO) solver instead of direct backpropagation"),
    Variant("runlocal", runlocal, "a tiny model and a few steps (seconds on a CPU, for tests)"),
)


def ctrl_sd_variants(runlocal_eval_samples: int) -> tuple[Variant, ...]:
  """`CTRL_VARIANTS` with Stable Diffusion's sizes: the `cfg` baseline's denoising fine-tune (50
  steps per epoch of 32 labelled images, 8 × 4 accumulated), the `ddpo` solver's layout (the SD
  DDPO configs': 8 sampling calls of 32 per epoch, optimizer steps of 8 × 8 samples, 100
  epochs), and `runlocal_eval_samples` evaluation samples in `runlocal`."""
  def cfg(config):
    _cfg_baseline(config)
    config.ctrl.batch_size = 8
    config.ctrl.gradient_accumulation_steps = 4

  def ddpo(config):
    _ddpo_solver(config)
    config.num_epochs = 100
    config.sample.batch_size = 32
    config.sample.num_batches_per_epoch = 8
    config.train.batch_size = 8
    config.train.gradient_accumulation_steps = 8

  def local(config):
    runlocal(config)
    config.ctrl.eval_num_samples = runlocal_eval_samples
  replaced = {"cfg": cfg, "ddpo": ddpo, "runlocal": local}
  return tuple(dataclasses.replace(v, apply=replaced.get(v.name, v.apply)) for v in CTRL_VARIANTS)
