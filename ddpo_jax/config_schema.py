"""The one config schema: every key of every run kind, its default and a one-line meaning.

`new_config(mode, model)` builds a complete config from the tables below; the configs
(ddpo_jax/configs/*.py; what several of them share: ddpo_jax/config_base.py) override it; `validate`
checks a config against it (no unknown or missing key, enumerated values among their choices)
before anything is built or compiled; `complete` fills a saved config of an older version up
to the current keys. docs/config.md is `markdown()` (a test keeps them equal).

Run kinds (`config.mode`, the one switch): "ddpo" fine-tunes with an RL algorithm
(`train.algorithm`); "ctrl" adds a control (the `ctrl` section, docs/algorithms.md §4);
"pretrain" only builds the digits model. Model families (`config.model.kind`): "digits" (the
built-in one, no downloads) and "sd" (Stable Diffusion from a diffusers checkpoint).

Names follow kvablack/ddpo-pytorch so configs carry over. Differences: batch sizes are GLOBAL
(all devices together), and `per_prompt_stat_tracking.enabled` switches tracking on/off.
Four keys hold open mappings whose keys are names: `reward.weights` (reward name -> weight),
`reward.server_urls` (a remote term's NAME -> its server's URL), `ctrl.conditions` (control
name -> a `condition` section) and a condition's `data` (the keys of its source, see
`ddpo_jax.ctrl.data.load_dataset`).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import ml_collections

RUN_KINDS = ("ddpo", "ctrl", "pretrain")
MODEL_KINDS = ("digits", "sd")
CTRL_METHODS = ("ctrl", "cfg", "classifier_guidance")
CTRL_SOLVERS = ("backprop", "ddpo")
CTRL_TRUNCATIONS = ("random", "fixed", "none")
KL_REDUCTIONS = ("mean", "sum")
# Regexes searched in UNet module paths: the q/k/v/out projections of every attention layer.
LORA_DEFAULT_TARGETS = (r"(^|/)to_q$", r"(^|/)to_k$", r"(^|/)to_v$", r"(^|/)to_out_0$")


@dataclasses.dataclass(frozen=True)
class Range:
  """The valid values of a numeric key: lo <= v <= hi (an open end excludes its bound; an
  infinite bound is always open, so inf and nan never pass), integers only if `integer`, plus
  the listed `special` values (e.g. mesh.data's -1). A tuple value is checked element-wise."""
  lo: float = -math.inf
  hi: float = math.inf
  lo_open: bool = False
  hi_open: bool = False
  integer: bool = False
  special: tuple = ()

  def contains(self, value) -> bool:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
      return False
    if value in self.special:
      return True
    if self.integer and not isinstance(value, numbers.Integral):
      return False
    v = float(value)
    if not math.isfinite(v):
      return False
    above = v > self.lo if self.lo_open else v >= self.lo
    below = v < self.hi if self.hi_open else v <= self.hi
    return above and below

  def __str__(self) -> str:
    lo = "(" if self.lo_open or math.isinf(self.lo) else "["
    hi = ")" if self.hi_open or math.isinf(self.hi) else "]"
    def num(x):
      return ("inf" if x > 0 else "-inf") if math.isinf(x) else f"{x:g}"
    text = f"{lo}{num(self.lo)}, {num(self.hi)}{hi}"
    if self.integer:
      text = "an integer in " + text
    if self.special:
      text += " or " + " or ".join(repr(v) for v in self.special)
    return text


def _range(spec: str) -> Range:
  """A `Range` from its written form: 'int [1, inf)', '(0, 1]', 'int [1, inf) | -1'."""
  spec, *special = [part.strip() for part in spec.split("|")]
  integer = spec.startswith("int ")
  spec = spec[4:].strip() if integer else spec
  lo, hi = (x.strip() for x in spec[1:-1].split(","))
  return Range(float(lo), float(hi), spec[0] == "(", spec[-1] == ")", integer,
               tuple(int(v) for v in special))


@dataclasses.dataclass(frozen=True)
class Key:
  """One config key: dotted `path`, `default`, one-line `meaning`, allowed `choices` (() = any
  value of the default's type), and for a numeric key its valid `range` (from `RANGES`)."""
  path: str
  default: Any
  meaning: str
  choices: tuple = ()
  range: "Range | None" = None


def _is_numeric(value) -> bool:
  """A number (not a bool), or a non-empty tuple of numbers."""
  if isinstance(value, (tuple, list)):
    return bool(value) and all(_is_numeric(v) for v in value)
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


# Every numeric key's valid values (a test checks that each numeric key has one and each entry
# names a key). Written as `_range` reads them: 'int' for integers, ( ) open and [ ] closed ends.
RANGES = {path: _range(spec) for path, spec in {
    "seed": "int [0, 4294967296)",
    "num_epochs": "int [1, inf)",
    "save_freq": "int [1, inf)",
    "keep_checkpoints": "int [0, inf)",
    "log_image_freq": "int [0, inf)",
    "cpu_devices": "int [0, inf)",
    "mesh.data": "int [1, inf) | -1",
    "mesh.fsdp": "int [1, inf)",
    "mesh.fsdp_min_size": "int [0, inf)",
    "sample.num_steps": "int [1, inf)",
    # DDIM's step std is eta times the DDPM posterior's; above 1 it can exceed the remaining
    # noise and the direction term's square root turns NaN.
    "sample.eta": "[0, 1]",
    # Flow-GRPO uses 0.7; 'cps' further needs <= 1 (checked with the sampler).
    "sample.noise_level": "(0, 2]",
    "sample.group_size": "int [1, inf)",
    "sample.sde_window_size": "int [0, inf)",
    "sample.sde_window_range": "int [0, inf)",
    "sample.sde_window_shift_every": "int [1, inf)",
    "sample.guidance_scale": "[0, inf)",
    "sample.batch_size": "int [1, inf)",
    "sample.num_batches_per_epoch": "int [1, inf)",
    "train.batch_size": "int [1, inf)",
    "train.learning_rate": "[0, inf)",
    "train.adam_beta1": "[0, 1)",
    "train.adam_beta2": "[0, 1)",
    "train.adam_weight_decay": "[0, inf)",
    "train.adam_epsilon": "(0, inf)",
    "train.max_grad_norm": "(0, inf)",
    "train.gradient_accumulation_steps": "int [1, inf)",
    "train.num_inner_epochs": "int [1, inf)",
    "train.adv_clip_max": "(0, inf)",
    "train.clip_range": "(0, inf)",
    "train.timestep_fraction": "(0, 1]",
    "train.kl_coef": "[0, inf)",
    "train.nft_beta": "(0, inf)",
    "train.nft_decay_type": "int [0, 2]",
    "train.kl_beta": "[0, inf)",
    "train.ema.decay": "[0, 1)",
    "train.ema.update_interval": "int [1, inf)",
    "train.rwr_beta": "(0, inf)",
    "train.rwr_quantile": "[0, 1]",
    "train.control_learning_rate": "[0, inf)",
    "per_prompt_stat_tracking.buffer_size": "int [1, inf)",
    "per_prompt_stat_tracking.min_count": "int [1, inf)",
    "reward.classifier_seed": "int [0, inf)",
    "reward.server_timeout_s": "(0, inf)",
    "reward.server_deadline_s": "(0, inf)",
    "model.channels": "int [1, inf)",
    "model.layers_per_block": "int [1, inf)",
    "model.attention_heads": "int [1, inf)",
    "model.mmdit_layers": "int [1, inf)",
    "model.mmdit_head_dim": "int [1, inf)",
    "model.context_dim": "int [1, inf)",
    "model.norm_num_groups": "int [1, inf)",
    "model.pretrain.seed": "int [0, inf)",
    "model.pretrain.steps": "int [1, inf)",
    "model.pretrain.batch_size": "int [1, inf)",
    "model.pretrain.label_noise": "[0, 1]",
    "model.pretrain.learning_rate": "(0, inf)",
    "model.pretrain.uncond_prob": "[0, 1)",
    "model.pretrain.ema_decay": "[0, 1)",
    "model.resolution": "int [8, inf)",
    "model.embedded_guidance": "[0, inf)",
    "model.lora.rank": "int [1, inf)",
    "model.lora.alpha": "(0, inf)",
    "model.lora.init_std": "[0, inf)",
    "model.lora.seed": "int [0, inf)",
    "ctrl.reward_weight": "[0, inf)",
    "ctrl.kl_weight": "[0, inf)",
    "ctrl.control_min_timestep": "int [0, inf)",
    "ctrl.truncation_steps": "int [1, inf)",
    "ctrl.batch_size": "int [1, inf)",
    "ctrl.gradient_accumulation_steps": "int [1, inf)",
    "ctrl.steps_per_epoch": "int [1, inf)",
    "ctrl.label_dropout": "[0, 1)",
    "ctrl.label_guidance_scale": "[0, inf)",
    "ctrl.noisy_classifier_steps": "int [1, inf)",
    "ctrl.classifier_guidance_scale": "[0, inf)",
    "ctrl.eval_num_samples": "int [0, inf)",
    # a control's section (ctrl.conditions.NAME.*)
    "num_classes": "int [0, inf)",
    "weight": "[0, inf)",
    "data.num_labelled": "int [0, inf)",
    "data.seed": "int [0, inf)",
    "classifier.steps": "int [1, inf)",
    "classifier.seed": "int [0, inf)",
    "classifier.val_fraction": "(0, 1)",
    "classifier.augment_noise": "[0, inf)",
    "classifier.augment_shift": "int [0, inf)",
    "classifier.input_size": "int [0, inf)",
}.items()}


def _keys(*rows) -> tuple[Key, ...]:
  keys = tuple(Key(*row) for row in rows)
  return tuple(dataclasses.replace(k, range=RANGES[k.path]) if k.path in RANGES else k
               for k in keys)


COMMON = _keys(
    ("mode", "ddpo", "the run kind: 'ddpo' (RL fine-tuning), 'ctrl' (add a control), 'pretrain' "
     "(only build the digits model)", RUN_KINDS),
    ("seed", 42, "seed of the run (sampling noise, minibatch order, parameter init)"),
    ("num_epochs", 100, "epochs (DDPO: one data collection and its updates each)"),
    ("save_freq", 20, "epochs between checkpoints (the last epoch is always saved)"),
    ("keep_checkpoints", 0, "keep step 0 and this many latest steps; 0 keeps all"),
    ("log_image_freq", 5, "epochs between captioned image grids (prompt and reward under each "
     "image) in WORKDIR/samples, TensorBoard and wandb (0: never; else the last epoch too)"),
    ("progress", True, "tqdm progress bars (process 0): epochs (ETA, latest reward) and each "
     "epoch's sampling batches"),
    ("logging.wandb", "", "Weights & Biases: '' off, 'online' or 'offline' (files in "
     "WORKDIR/wandb; `pip install wandb`); process 0 logs the metrics rows, the captioned grids "
     "and the config", ("", "online", "offline")),
    ("logging.wandb_project", "ddpo_jax", "wandb project"),
    ("logging.wandb_entity", "", "wandb entity (team or user; '' = your default)"),
    ("logging.wandb_run_name", "", "wandb run name ('' = WORKDIR's base name)"),
    ("logging.wandb_run_id", "", "wandb run id ('' = a new one, kept in WORKDIR/wandb/run_id "
     "and continued when the run resumes)"),
    ("compilation_cache_dir", "", "persistent XLA compilation cache shared by runs ('' = off), e.g. "
     "~/.cache/ddpo_jax/xla"),
    ("cpu_devices", 0, "CPU devices per process (jax_num_cpu_devices; 0 = JAX's own): N > 0 splits "
     "each batch over N CPU devices; accelerators are unaffected"),
    ("mesh.data", -1, "devices on the mesh's data axis; -1: all devices not used by fsdp"),
    ("mesh.fsdp", 1, "devices on the fsdp axis: > 1 also splits parameters and optimizer state "
     "(ddpo_jax/numerics/parallel.py: PARAM_RULES)"),
    ("mesh.fsdp_min_size", 2 ** 18, "fsdp splits only arrays of at least this many elements"),
    ("model.kind", "digits", "the model family", MODEL_KINDS),
    ("sample.sampler", "ddim", "the sampling dynamics (ddpo_jax/tasks/dynamics.py): 'ddim' (DDPO's, "
     "noise-predicting models) or the flow models' 'sde' (Flow-GRPO) / 'cps' / 'ode' / 'dpm2' "
     "(DiffusionNFT's DPM-Solver; 'ode' and 'dpm2' have no log-probs: train.algorithm 'nft' "
     "only)", ("ddim", "sde", "cps", "ode", "dpm2")),
    ("sample.num_steps", 50, "sampling steps per sample"),
    ("sample.eta", 1.0, "DDIM eta (the step noise; DDPO needs > 0)"),
    ("sample.noise_level", 0.7, "'sde' / 'cps': the noise level a (docs/algorithms.md §6.3)"),
    ("sample.group_size", 1, "samples per prompt in each batch (GRPO's group, advantages "
     "relative to the group); 1: every sample its own prompt draw"),
    ("sample.group_std", "group", "group_size > 1: advantages (r - group mean) / std over the "
     "group or the whole epoch's samples (flow_grpo's global_std)", ("group", "global")),
    ("sample.same_noise_per_group", False, "group_size > 1: a group's samples start from the "
     "same noise, so they differ only by the SDE steps (Flow-GRPO-Fast's branching)"),
    ("sample.sde_window_size", 0, "'sde' / 'cps': only this many consecutive steps are SDE steps, "
     "the rest ODE steps, and only they are trained on (MixGRPO, Flow-GRPO-Fast); 0: every step"),
    ("sample.sde_window_schedule", "random", "where the window lies: 'random' (a fresh start per "
     "sampling call inside sde_window_range: Flow-GRPO-Fast) or 'sliding' (from the range's "
     "first step, one step later every sde_window_shift_every epochs, back to the first after "
     "the last: MixGRPO)", ("random", "sliding")),
    ("sample.sde_window_range", (), "(lo, hi): the window lies inside steps [lo, hi); (): every "
     "step ('random'), [0, num_steps - 2) ('sliding', MixGRPO's)"),
    ("sample.prompt_sampling", "with_replacement", "how each sampling call's prompts are drawn: "
     "'with_replacement' (DDPO's) or 'epoch_unique' (no prompt twice in an epoch: flow_grpo's "
     "DistributedKRepeatSampler; ddpo_jax/tasks/prompts.py)", ("with_replacement", "epoch_unique")),
    ("sample.sde_window_shift_every", 1, "'sliding': epochs between moves of the window"),
    ("sample.guidance_scale", 5.0, "classifier-free guidance weight of the prompt (1: none)"),
    ("sample.batch_size", 8, "samples per sampling call (global)"),
    ("sample.num_batches_per_epoch", 2, "sampling calls per epoch"),
    ("train.algorithm", "ppo", "'ppo' (DDPO-IS), 'sf' (DDPO-SF: one optimizer step per data "
     "collection), 'rwr', 'rwr_sparse', or a registered one (ddpo_jax/algorithms)"),
    ("train.batch_size", 4, "samples per micro-step (global)"),
    ("train.learning_rate", 3e-4, "AdamW learning rate of the trainable tree"),
    ("train.adam_beta1", 0.9, "AdamW beta1"),
    ("train.adam_beta2", 0.999, "AdamW beta2"),
    ("train.adam_weight_decay", 1e-4, "AdamW weight decay"),
    ("train.adam_epsilon", 1e-8, "AdamW epsilon"),
    ("train.adam_mu_dtype", "", "dtype of Adam's first moment: '' = the params' dtype",
     ("", "bfloat16", "float32")),
    ("train.max_grad_norm", 1.0, "global-norm gradient clip"),
    ("train.gradient_accumulation_steps", 1, "micro-steps accumulated per optimizer step"),
    ("train.num_inner_epochs", 1, "passes over each epoch's samples"),
    ("train.cfg", True, "the update recomputes the guided eps (as the sampler did)"),
    ("train.adv_clip_max", 5.0, "advantages clipped to [-adv_clip_max, adv_clip_max]"),
    ("train.clip_range", 1e-4, "PPO ratio clip range"),
    ("train.timestep_fraction", 1.0, "fraction of each trajectory's steps trained on"),
    ("train.kl_coef", 0.0, "alpha > 0 (ppo / sf): maximise E[r] - alpha E[sum_t KL_t] to the "
     "pre-trained model (docs/algorithms.md §3.5); the sampler then also runs it"),
    ("train.kl_reduction", "mean", "KL_t over latent dims: 'mean' (like the log-prob) or 'sum' "
     "(the exact KL)", KL_REDUCTIONS),
    ("train.nft_beta", 1.0, "nft: beta, the step from the sampling policy to the implicit "
     "positive one (docs/algorithms.md §6.6)"),
    ("train.nft_decay_type", 1, "nft: the old (sampling) policy's EMA schedule, DiffusionNFT's "
     "decay_type: 0 = the current policy, 1 = min(0.001 step, 0.5), 2 = 0 below step 75, then "
     "min(0.0075 (step - 75), 0.999) (docs/algorithms.md §6.6)"),
    ("train.kl_beta", 0.0, "beta > 0: flow_grpo's / DiffusionNFT's direct KL term to the "
     "pre-trained model in their units (ppo / sf on 'sde' / 'cps'; nft: velocity MSE), "
     "docs/algorithms.md §3.5"),
    ("train.drop_zero_advantage", False, "drop the samples whose advantage is 0 (flow_grpo: "
     "groups whose rewards are all equal) from the update's loss"),
    ("train.ema.enabled", False, "keep an EMA of the trained params; sample / export / "
     "evaluation read it (docs/algorithms.md §3.6)"),
    ("train.ema.decay", 0.9, "EMA decay (capped by (1 + step) / (10 + step))"),
    ("train.ema.update_interval", 8, "optimizer steps between EMA updates"),
    ("train.rwr_beta", 5.0, "RWR weights proportional to exp(reward / beta)"),
    ("train.rwr_quantile", 0.9, "RWR-sparse trains on samples with reward >= this batch quantile"),
    ("per_prompt_stat_tracking.enabled", True, "advantages normalised per prompt (else per batch)"),
    ("per_prompt_stat_tracking.buffer_size", 16, "rewards kept per prompt"),
    ("per_prompt_stat_tracking.min_count", 16, "below this many, the batch's statistics are used"),
    ("reward.weights", {"jpeg_compressibility": 1.0}, "reward name -> weight of the trained reward "
     "(ddpo_jax/rewards; 'remote' and 'remote_NAME' are reward-server terms)"),
    ("reward.metrics", (), "reward terms computed and logged but not trained on"),
    ("reward.classifier_seed", 0, "digits: seed of the reward classifier"),
    ("reward.clip_path", "openai/clip-vit-large-patch14", "aesthetic: CLIP vision dir or hub id"),
    ("reward.aesthetic_mlp_path", "", "aesthetic: the LAION MLP (sac+logos+ava1-l14-linearMSE.pth)"),
    ("reward.pickscore_path", "yuvalkirstain/PickScore_v1",
     "pickscore: a transformers CLIPModel dir or hub id (CLIP ViT-H/14)"),
    ("reward.clipscore_path", "openai/clip-vit-large-patch14",
     "clipscore: a transformers CLIPModel dir or hub id (2.5 max(cos, 0))"),
    ("reward.clip_tokenizer_path", "", "pickscore / clipscore: the tokenizer's dir if not the "
     "model's (PickScore's: laion/CLIP-ViT-H-14-laion2B-s32B-b79K)"),
    ("reward.server_url", "http://127.0.0.1:8000", "remote: a `python -m ddpo_jax.rewards.server`"),
    ("reward.server_urls", {}, "remote_NAME terms: NAME -> the URL of its reward server (one "
     "client per term; a term whose NAME is absent or '' here is refused, naming this key)"),
    ("reward.server_timeout_s", 120.0, "remote terms: seconds for one POST to a reward server "
     "(a slower one is a failed try, retried)"),
    ("reward.server_deadline_s", 600.0, "remote terms: seconds for one reward call (all its "
     "batches, tries and backoffs); past it the run stops naming the server"),
    ("prompt_fn", "", "named prompt set (ddpo_jax/tasks/prompts.py); '' = the model family's own "
     "(digits: the ten class names; SD needs a set)"),
    ("prompt_fn_kwargs.path", "", "prompt file ('' = the set's file under $DDPO_JAX_ASSETS)"),
    ("prompt_fn_kwargs.prompts", (), "an explicit prompt list (overrides the file)"),
    ("prompt_fn_kwargs.activities_path", "", "activities file of the *_activities sets"),
)

def _lora_keys(enabled: bool) -> tuple[tuple, ...]:
  """The `model.lora.*` rows (the adapter is applied unmerged: `ddpo_jax.models.adapters`)."""
  return (
      ("model.lora.enabled", enabled, "train LoRA factors beside the frozen denoiser (else "
       "the whole denoiser)"),
      ("model.lora.rank", 4, "LoRA rank"),
      ("model.lora.alpha", 4.0, "LoRA scale alpha / rank (4 / 4 = 1, as diffusers')"),
      ("model.lora.targets", LORA_DEFAULT_TARGETS, "regexes searched in the denoiser's module "
       "paths"),
      ("model.lora.init_std", 0.0, "std of A at init; 0 = 1 / rank"),
      ("model.lora.seed", 0, "seed of the LoRA init"),
      ("model.lora.init_path", "", "a diffusers / PEFT LoRA file (or a directory holding "
       "pytorch_lora_weights.safetensors, e.g. an export) to start the factors from; '' = "
       "the random init"),
  )


MODELS = {
    "digits": _keys(
        ("model.kind", "digits", "the model family", MODEL_KINDS),
        ("model.denoiser", "unet", "'unet' (noise-predicting, DDPM) or 'mmdit' (SD3's transformer, "
         "velocity-predicting, rectified flow)", ("unet", "mmdit")),
        ("model.channels", (16, 32), "UNet channels per level"),
        ("model.layers_per_block", 1, "ResNet blocks per level"),
        ("model.attention_heads", 4, "attention heads"),
        ("model.mmdit_layers", 4, "'mmdit': joint transformer blocks"),
        ("model.mmdit_head_dim", 16, "'mmdit': width of an attention head"),
        ("model.context_dim", 32, "width of the class-prompt embedding"),
        ("model.norm_num_groups", 8, "group-norm groups"),
        ("model.pretrained_dir", "", "pre-trained params; '' = a cache dir keyed by the model config"),
        ("model.pretrain.seed", 0, "pre-training seed"),
        ("model.pretrain.steps", 1500, "pre-training AdamW steps"),
        ("model.pretrain.batch_size", 64, "pre-training batch"),
        ("model.pretrain.label_noise", 0.3, "fraction of pre-training labels replaced at random"),
        ("model.pretrain.learning_rate", 2e-3, "pre-training learning rate"),
        ("model.pretrain.uncond_prob", 0.1, "probability of the null prompt (for CFG)"),
        ("model.pretrain.ema_decay", 0.995, "EMA decay of the saved params"),
        ("model.dtype", "float32", "dtype of the fine-tuned denoiser's weights (with LoRA: of "
         "the frozen base)", ("float32", "bfloat16")),
        ("model.compute_dtype", "float32", "activation dtype of the denoiser",
         ("float32", "bfloat16")),
        *_lora_keys(False),
    ),
    "sd": _keys(
        ("model.kind", "sd", "the model family", MODEL_KINDS),
        ("model.pretrained_path", "CompVis/stable-diffusion-v1-4", "a diffusers SD 1.x / 2.x "
         "or SDXL pipeline directory or a Hub id (default: the DDPO paper's base model)"),
        ("model.resolution", 512, "image side in pixels (latents: resolution / 8)"),
        ("model.dtype", "float32", "parameter dtype (master weights)", ("float32", "bfloat16")),
        ("model.compute_dtype", "bfloat16", "activation dtype of the UNet, VAE and text encoder",
         ("float32", "bfloat16")),
        ("model.attention_implementation", "auto", "attention kernel", ("auto", "xla", "cudnn")),
        ("model.remat", False, "gradient checkpointing of the UNet blocks (less memory, ~30% slower)"),
        ("model.embedded_guidance", 3.5, "FLUX.1-dev-style transformers: the guidance scale fed "
         "to the transformer in sampling and the update (their CFG, sample.guidance_scale, is 1)"),
        *_lora_keys(True),
    ),
}

CTRL = _keys(
    ("ctrl.method", "ctrl", "'ctrl', or the baselines 'cfg' / 'classifier_guidance'", CTRL_METHODS),
    ("ctrl.solver", "backprop", "'backprop' (direct, the reference's) or 'ddpo' (PPO)",
     CTRL_SOLVERS),
    ("ctrl.controls", (), "the controls' names, in the order of labels in '3:2'"),
    ("ctrl.conditions", {}, "control name -> its section (`config_schema.condition`)"),
    ("ctrl.prompts", (), "fixed prompts c to draw from; () = the model's prompt distribution"),
    ("ctrl.train_base", True, "also train the base model's trainable tree (LoRA / full UNet)"),
    ("ctrl.reward_weight", 1.0, "weight of sum_i w_i log p_i(y_i | x_0)"),
    ("ctrl.kl_weight", 1.0, "weight of the KL to the pre-trained model (alpha = kl / reward)"),
    ("ctrl.kl_reduction", "sum", "over latent dims: 'sum' (the exact KL), 'mean' (the reference "
     "code's)", KL_REDUCTIONS),
    ("ctrl.control_min_timestep", 0, "> 0: the control embedding acts only at t >= this"),
    ("ctrl.truncation", "random", "backprop through 'random' (reference), 'fixed' (the last "
     "truncation_steps) or 'none' (all) steps", CTRL_TRUNCATIONS),
    ("ctrl.truncation_steps", 1, "steps backpropagated with 'fixed'"),
    ("ctrl.batch_size", 64, "chains per micro-batch (global)"),
    ("ctrl.gradient_accumulation_steps", 1, "micro-batches per optimizer step"),
    ("ctrl.steps_per_epoch", 20, "optimizer steps per epoch"),
    ("ctrl.label_dropout", 0.1, "cfg baseline: probability of training on the null label"),
    ("ctrl.label_guidance_scale", 2.0, "cfg baseline: guidance weight on the labels"),
    ("ctrl.noisy_classifier_steps", 1500, "classifier_guidance baseline: training steps"),
    ("ctrl.classifier_guidance_scale", 1.0, "classifier_guidance baseline: weight of "
     "grad log p(y | x_t)"),
    ("ctrl.eval_num_samples", 300, "after training: samples for WORKDIR/eval.json (0: skip)"),
    ("train.control_learning_rate", 1e-2, "the control-embedding tables' learning rate (0: "
     "train.learning_rate)"),
)
# CTRL's defaults of keys it shares with DDPO (the reference's optimiser; its own reward).
CTRL_DEFAULTS = {
    "train.learning_rate": 1e-4,
    "train.max_grad_norm": 5.0,
    "train.adam_weight_decay": 0.0,
    "reward.weights": {"ctrl_log_likelihood": 1.0},
    "per_prompt_stat_tracking.enabled": False,
}

# One control's section (`ctrl.conditions.NAME`); `data` also takes its source's own keys.
CONDITION = _keys(
    ("num_classes", 0, "the control's number of classes"),
    ("weight", 1.0, "w_i in the reward sum_i w_i log p_i(y_i | x_0)"),
    ("data.source", "", "labelled data source (ddpo_jax/ctrl/data.py: SOURCES)"),
    ("data.num_labelled", 0, "label budget (0: every example)"),
    ("data.seed", 0, "seed of the budget draw"),
    ("classifier.steps", 600, "training steps of the offline classifier p(y | x_0)"),
    ("classifier.seed", 0, "its seed"),
    ("classifier.val_fraction", 0.2, "held out for its temperature calibration"),
    ("classifier.augment_noise", 0.05, "pixel noise std of its training images"),
    ("classifier.augment_shift", 0, "random translation by up to this many pixels (0: none)"),
    ("classifier.input_size", 0, "resize images to this side first (0: as they are)"),
)

_OPEN = ("reward.weights", "reward.server_urls", "ctrl.conditions")  # mappings keyed by names


def keys_of(mode: str, model: str) -> tuple[Key, ...]:
  """The keys of a run kind with a model family, each once, with its default for that kind."""
  if mode not in RUN_KINDS:
    raise ValueError(f"config.mode={mode!r}; choose one of {RUN_KINDS}")
  if model not in MODEL_KINDS:
    raise ValueError(f"config.model.kind={model!r}; choose one of {MODEL_KINDS}")
  rows = [k for k in COMMON if not k.path.startswith("model.")]
  at = next(i for i, k in enumerate(rows) if k.path.startswith("sample."))
  rows[at:at] = MODELS[model]
  if mode == "ctrl":
    rows = [dataclasses.replace(k, default=CTRL_DEFAULTS[k.path]) if k.path in CTRL_DEFAULTS
            else k for k in rows] + list(CTRL)
  return tuple(dataclasses.replace(k, default=mode) if k.path == "mode" else k for k in rows)


def _build(rows) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  for k in rows:
    *parents, leaf = k.path.split(".")
    node = config
    for p in parents:
      if p not in node:
        node[p] = ml_collections.ConfigDict()
      node = node[p]
    node[leaf] = ml_collections.ConfigDict(dict(k.default)) if isinstance(k.default, dict) else k.default
  return config


def new_config(mode: str = "ddpo", model: str = "digits") -> ml_collections.ConfigDict:
  """A complete config of run kind `mode` with the `model` family, every key at its default."""
  return _build(keys_of(mode, model))


def condition(source: str, num_classes: int, weight: float = 1.0, **data) -> ml_collections.ConfigDict:
  """One control's section: labelled data from `source` with its source-specific `data` keys
  (`ddpo_jax.ctrl.data.load_dataset`), the rest at the defaults of `CONDITION`."""
  c = _build(CONDITION)
  c.num_classes = num_classes
  c.weight = weight
  c.data.source = source
  for name, value in data.items():
    c.data[name] = value
  return c


def default(path: str, mode: str = "ddpo", model: str = "digits"):
  """The default of key `path` for run kind `mode` with the `model` family."""
  for k in keys_of(mode, model):
    if k.path == path:
      return k.default
  raise KeyError(path)


def _leaves(node, prefix=""):
  for name, value in node.items():
    path = f"{prefix}{name}"
    if isinstance(value, (ml_collections.ConfigDict, dict)) and path not in _OPEN:
      yield from _leaves(value, path + ".")
    else:
      yield path, value


def _check(node, rows, where: str) -> None:
  expected = {k.path: k for k in rows}
  found = dict(_leaves(node))
  unknown = sorted(set(found) - set(expected))
  missing = sorted(set(expected) - set(found))
  if unknown:
    raise ValueError(f"unknown config key {where}{unknown[0]} (all unknown: "
                     f"{[where + u for u in unknown]}); the schema is ddpo_jax/config_schema.py "
                     "(docs/config.md)")
  if missing:
    raise ValueError(f"config lacks key {where}{missing[0]} (build configs with "
                     "config_schema.new_config, or `complete` a saved one)")
  for path, k in expected.items():
    if k.choices and found[path] not in k.choices:
      raise ValueError(f"{where}{path}={found[path]!r}; choose one of {k.choices}")
    if k.range is not None:
      value = found[path]
      several = isinstance(value, (tuple, list))
      if not all(k.range.contains(v) for v in (value if several else (value,))):
        raise ValueError(f"{where}{path}={value!r} is outside its valid range: "
                         f"{'each element ' if several else ''}must be {k.range}")


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError, naming the key, for a key the schema of `config.mode` and
  `config.model.kind` lacks, one it has that `config` lacks, or a value outside its choices.
  Every trainer calls it before building anything."""
  mode, model = config.get("mode"), config.get("model", {}).get("kind")
  rows = keys_of(mode, model)
  _check(config, rows, "")
  if mode == "ctrl":
    for name, cond in config.ctrl.conditions.items():
      if not isinstance(cond, ml_collections.ConfigDict):
        raise ValueError(f"ctrl.conditions.{name} must be a condition section "
                         "(config_schema.condition)")
      data = cond.get("data", {})
      own = {k.path for k in CONDITION if k.path.startswith("data.")}
      extra = tuple(Key(f"data.{n}", None, "") for n in data if f"data.{n}" not in own)
      _check(cond, CONDITION + extra, f"ctrl.conditions.{name}.")
    unknown = sorted(set(config.ctrl.controls) - set(config.ctrl.conditions))
    if unknown:
      raise ValueError(f"ctrl.controls names {unknown[0]!r}, which ctrl.conditions lacks")
  for name, weight in config.reward.weights.items():
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
      raise ValueError(f"reward.weights.{name}={weight!r} must be a finite number")
  if model == "digits" and config.prompt_fn:
    raise ValueError(f"prompt_fn={config.prompt_fn!r}: the digits model has its own prompts "
                     "(the ten class names); leave prompt_fn ''")


def complete(saved: dict) -> ml_collections.ConfigDict:
  """A saved config (a run's config.json, maybe of an older version) with the keys it lacks at
  their defaults."""
  config = new_config(saved.get("mode", "ddpo"), saved.get("model", {}).get("kind", "digits"))

  def merge(node, values, prefix):
    for name, value in values.items():
      path = prefix + name
      if isinstance(value, dict) and path not in _OPEN and name in node:
        merge(node[name], value, path + ".")
      elif isinstance(value, dict):
        node[name] = ml_collections.ConfigDict(value)
      else:
        node[name] = value
  merge(config, saved, "")
  return config


def markdown() -> str:
  """docs/config.md: the tables of every run kind and model family."""
  def table(rows, title):
    lines = [f"## {title}", "", "| key | default | meaning |", "|---|---|---|"]
    for k in rows:
      meaning = k.meaning + (f" (one of: {', '.join(repr(c) for c in k.choices)})"
                             if k.choices else "") + (f"; valid: {k.range}" if k.range else "")
      lines.append(f"| `{k.path}` | `{k.default!r}` | {meaning.replace('|', '/')} |")
    return lines + [""]
  out = ["# Config keys", "",
         "Generated from `ddpo_jax/config_schema.py` (`python -c \"from ddpo_jax import "
         "config_schema; print(config_schema.markdown(), end='')\" > docs/config.md`). Every "
         "config is "
         "`config_schema.new_config(mode, model)` overridden by the `get_config(arg)` of a file in "
         "`ddpo_jax/configs/` (what several configs share: `ddpo_jax/config_base.py`) and by the "
         "command line (`--config.KEY=VALUE`); `validate` rejects a key not listed here. A "
         "config's variants follow its name or path, comma-separated: `--config=NAME:V1,V2` or "
         "`--config=path/to/FILE.py:V1,V2` (e.g. "
         "`:runlocal`, `:full,runlocal`, `:lora,bf16`); they apply in the order of the config's "
         "variant table whatever their order there, and an unknown name is an error listing "
         "the known ones (each config's docstring lists its variants).", ""]
  out += table(COMMON, "Every run kind")
  for name, rows in MODELS.items():
    out += table([k for k in rows if k.path != "model.kind"], f"`model.kind = {name!r}`")
  out += table(CTRL, "`mode = 'ctrl'`")
  out += ["CTRL's defaults of shared keys: " + ", ".join(
      f"`{p}` = `{v!r}`" for p, v in CTRL_DEFAULTS.items()) + ".", ""]
  out += table(CONDITION, "A control: `ctrl.conditions.NAME`")
  return "\n".join(out).rstrip() + "\n"
