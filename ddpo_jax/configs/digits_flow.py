r"""Flow-GRPO on the built-in digits task with a flow-matching transformer: offline, CPU.

The digits model as SD3's MMDiT (2x2 patches, the prompt embedding as its text), pre-trained by
rectified flow matching on scikit-learn's digits (first run only; cached), then fine-tuned with
Flow-GRPO (the SDE sampler, groups of 8 per prompt, group-relative advantages, PPO clip) on the
digits alignment reward log p(prompted class | image); the held-out SVC judge is logged.

  python -m ddpo_jax.main --config=digits_flow --workdir=/tmp/digits_flow

Variants (comma-separated, e.g. `:lora,bf16`): `:cps` (coefficients-preserving sampling),
`:mixgrpo` (a sliding SDE window), `:fast` (Flow-GRPO-Fast), `:nft` (DiffusionNFT), `:lora`
(LoRA factors beside the frozen MMDiT), `:bf16` (bfloat16 weights and activations),
`:runlocal` (seconds, for tests).
"""
from ddpo_jax.config_base import Variant, apply_variants
from ddpo_jax.config_schema import new_config


def _cps(config) -> None:
  """Coefficients-preserving sampling (CPS) in place of Flow-GRPO's SDE."""
  config.sample.sampler = "cps"


def _mixgrpo(config) -> None:
  """MixGRPO: SDE steps only in a window of 4 of the 10 steps that starts at the first step and
  moves one step later every 5 epochs inside steps [0, 8) (MixGRPO's [0, T - 2)), back to the
  first step after the start 4 (`flow.mixgrpo_window_start`); ODE elsewhere; the update trains
  the window's steps. Window 4 and one step per move are MixGRPO's published values; 5 epochs
  per move (its 25 iterations) and 10 steps (its 25) are ours, for a short digits run."""
  s = config.sample
  s.sde_window_size = 4
  s.sde_window_schedule = "sliding"
  s.sde_window_shift_every = 5
  config.train.timestep_fraction = 1.0


def _fast(config) -> None:
  """Flow-GRPO-Fast's window on the digits model: SDE steps only at 2 consecutive steps drawn
  per sampling call from the first 6 of the 10; the update trains those 2. The window size 2 is
  flow_grpo's config/base.py default; the range (0, 6) is ours (flow_grpo's Fast configs use 3
  CPS steps in (0, num_steps // 2): `ddpo_jax.config_base.sd3_flow_grpo_fast_base`). Also ours:
  a group shares its initial noise and ODE steps up to the window
  (`sample.same_noise_per_group`; flow_grpo's Fast configs do not share it), so its members
  differ only by the window's noise."""
  s = config.sample
  s.same_noise_per_group = True
  s.sde_window_size = 2
  s.sde_window_schedule = "random"
  s.sde_window_range = (0, 6)
  config.train.timestep_fraction = 1.0


def _nft(config) -> None:
  """DiffusionNFT: the flow ODE as the sampler (no log-probs needed), the negative-aware
  forward-process loss at the sampling steps' sigmas, CFG-free."""
  config.sample.sampler = "ode"
  config.train.algorithm = "nft"
  config.train.cfg = False
  config.train.nft_beta = 1.0


def _lora(config) -> None:
  """LoRA on the digits MMDiT's attention projections (rank 8, alpha 16: flow_grpo's alpha /
  rank = 2), the frozen base beside it; the learning rate stays 3e-4 (flow_grpo's LoRA one)."""
  lora = config.model.lora
  lora.enabled = True
  lora.rank = 8
  lora.alpha = 16.0


def _bf16(config) -> None:
  """The denoiser's weights (with LoRA: the frozen base) and activations in bfloat16; LoRA
  factors, optimizer state and the losses stay float32."""
  config.model.dtype = "bfloat16"
  config.model.compute_dtype = "bfloat16"


def _runlocal(config) -> None:
  """Seconds on a CPU: a 1-block MMDiT (20 pre-training steps), 2 epochs, 4 steps, groups of 2."""
  config.num_epochs = 2
  config.save_freq = 1
  config.progress = False
  config.log_image_freq = 1
  m = config.model
  m.attention_heads = 2
  m.mmdit_head_dim = 8
  m.mmdit_layers = 1
  m.context_dim = 8
  m.pretrain.steps = 20
  m.pretrain.batch_size = 16
  s = config.sample
  s.num_steps = 4
  s.batch_size = 8
  s.group_size = 2
  if s.sde_window_size:
    s.sde_window_size = 2
    s.sde_window_range = (0, 3) if s.sde_window_range else ()
  config.train.batch_size = 4


VARIANTS = (  # applied in this order, whatever the order of the names in `:V1,V2`
    Variant("cps", _cps, "coefficients-preserving sampling instead of the SDE"),
    Variant("mixgrpo", _mixgrpo, "MixGRPO's sliding SDE window"),
    Variant("fast", _fast, "Flow-GRPO-Fast: shared noise, 2 random SDE steps"),
    Variant("nft", _nft, "DiffusionNFT on ODE samples"),
    Variant("lora", _lora, "LoRA factors (rank 8) beside the frozen MMDiT"),
    Variant("bf16", _bf16, "bfloat16 weights and activations"),
    Variant("runlocal", _runlocal, "seconds, for tests"))


def get_config(arg=None):
  """The rectified-flow digits model (`model.denoiser='mmdit'`), the digits alignment reward,
  groups of 8 samples per prompt and 32 prompts per epoch, 10 SDE steps (noise level 0.7)
  without guidance, group-relative advantages; `VARIANTS` switch the method."""
  config = new_config("ddpo", "digits")
  config.model.denoiser = "mmdit"
  config.num_epochs = 30
  config.save_freq = 5
  config.log_image_freq = 5
  config.reward.weights = {"digit_class_logprob": 1.0}
  config.reward.metrics = ("digits_heldout_accuracy",)
  config.per_prompt_stat_tracking.enabled = False
  s = config.sample
  s.sampler = "sde"
  s.noise_level = 0.7
  s.num_steps = 10
  s.guidance_scale = 1.0
  s.group_size = 8
  s.batch_size = 256
  s.num_batches_per_epoch = 1
  t = config.train
  t.batch_size = 32
  t.timestep_fraction = 0.5
  t.clip_range = 0.2
  t.learning_rate = 3e-4
  return apply_variants(config, arg, VARIANTS, "digits flow")
