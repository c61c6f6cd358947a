"""Defaults of CTRL runs (`config.mode = "ctrl"`); configs/ctrl_*.py override them.

`config.ctrl` holds the method, the solver and its weights; `config.ctrl.conditions.NAME` one
control each (its labelled data, number of classes, reward weight and classifier training);
`config.ctrl.controls` their order (the order of labels in "3:2"). The DDPO sections
(`sample`, `train`, `reward`, `per_prompt_stat_tracking`) are reused: `sample` by every
method, the rest by the "ddpo" solver, `train`'s optimizer fields by all.
"""
import ml_collections

from ddpo_jax.config_defaults import ddpo_base, split_variants


def condition(source: str, num_classes: int, weight: float = 1.0, **data) -> ml_collections.ConfigDict:
  """One control: labelled data from `source` (see `ddpo_jax.ctrl.data.load_dataset`)."""
  c = ml_collections.ConfigDict()
  c.num_classes = num_classes
  c.weight = weight  # w_i in the reward Σ_i w_i log p̂_i(y_i | x_0)
  c.data = ml_collections.ConfigDict({"source": source, "num_labelled": 0, "seed": 0, **data})
  c.classifier = ml_collections.ConfigDict(dict(
      steps=600, seed=0, val_fraction=0.2, augment_noise=0.05,
      # random translation by up to this many pixels (of the input_size image) of the offline
      # p̂'s training images; 0: none. On the digits 1 gives better held-out classifiers but
      # not better CTRL runs (README, digits results)
      augment_shift=0,
      input_size=0))  # input_size: resize images to this side first (0 = as they are)
  return c


def ctrl_base() -> ml_collections.ConfigDict:
  config = ddpo_base()
  config.mode = "ctrl"
  c = config.ctrl = ml_collections.ConfigDict()
  c.method = "ctrl"  # "ctrl", or the baselines "cfg" / "classifier_guidance"
  c.solver = "backprop"  # "backprop" (direct, the reference's) or "ddpo" (PPO, ddpo_jax.train)
  c.controls = ()
  c.conditions = ml_collections.ConfigDict()
  c.prompts = ()  # fixed prompts c to draw from; () = the model task's prompt distribution
  c.train_base = True  # also train the base model's trainable tree (LoRA factors / full UNet)
  c.reward_weight = 1.0
  c.kl_weight = 1.0  # α = kl_weight / reward_weight
  c.kl_reduction = "sum"  # "sum" over latent dims: the exact KL; "mean": the reference code's
  c.control_min_timestep = 0  # > 0: the control embedding acts only at timesteps t >= this
  c.truncation = "random"  # "random" (reference), "fixed" (last truncation_steps), "none"
  c.truncation_steps = 1
  c.batch_size = 64  # chains per micro-batch (global)
  c.gradient_accumulation_steps = 1
  c.steps_per_epoch = 20  # optimizer steps per epoch
  c.label_dropout = 0.1  # cfg baseline: probability of training on the null label
  c.label_guidance_scale = 2.0  # cfg baseline: guidance weight on the labels at sampling
  c.noisy_classifier_steps = 1500  # classifier_guidance baseline: training steps
  c.classifier_guidance_scale = 1.0  # classifier_guidance baseline: weight of ∇ log p(y | x_t)
  c.eval_num_samples = 300  # after training: samples for WORKDIR/eval.json (0: skip)
  config.train.control_learning_rate = 1e-2  # the control-embedding tables
  config.train.learning_rate = 1e-4  # the base model's trainable tree
  config.train.max_grad_norm = 5.0
  config.train.adam_weight_decay = 0.0
  config.reward.weights = ml_collections.ConfigDict({"ctrl_log_likelihood": 1.0})
  config.per_prompt_stat_tracking.enabled = False
  return config


def digits_ctrl_defaults(config) -> None:
  """What the digits CTRL configs share: the DDPO default's pre-trained digits model, 10 DDIM
  steps (eta 1, no prompt guidance; 10 rather than 20 halves the cost of backpropagating
  through the chain on a CPU), 6 epochs × 50 optimizer steps of 32 chains; baselines: CFG
  fine-tuned for 300 steps of 64 labelled images, noisy classifiers for 1500 steps.

  CTRL trains the control tables (lr 0.1) and the full UNet (lr 1e-4, `ctrl.train_base`),
  with the reward backpropagated through every step (`ctrl.truncation="none"`) and the
  reference code's KL reduction: MEAN over the 64 pixels, weight 1 per unit reward, i.e.
  α = 1 / 64 in the theory's terms (judge accuracy 0.977 on the class task; with the
  reference's weight 0.1: 0.893, less diverse; the tables alone: 0.65 at weight 0.1). The
  exact summed KL (α = 1) learns the class far less on this chain (judge 0.12 with the tables
  alone; 0.40 with the UNet and `ctrl.control_min_timestep=200`): the eta = 1 step from
  t = 101 to t = 1 has std 0.015, so a change of eps there costs 271 nats per unit squared
  change per pixel (0.6-2.3 at the other steps), and a table added to the time embedding
  shifts eps at every step (README, digits)."""
  from ddpo_jax import digits
  config.model = digits.model_config_defaults()
  # two CPU devices, the batch split between them: on a 2-core host an epoch takes 0.72x the
  # time of one device (24.7 s vs 34.5 s for 10 steps, same metrics to 4 digits)
  config.cpu_devices = 2
  config.num_epochs = 6
  config.save_freq = 2
  config.log_image_freq = 0
  config.sample.num_steps = 10
  config.sample.eta = 1.0
  config.sample.guidance_scale = 1.0
  config.ctrl.batch_size = 32
  config.ctrl.steps_per_epoch = 50
  config.ctrl.train_base = True
  config.ctrl.truncation = "none"
  config.ctrl.kl_reduction = "mean"
  config.ctrl.kl_weight = 1.0
  config.train.control_learning_rate = 1e-1
  config.train.learning_rate = 1e-4  # the UNet


def apply_variants(config, arg) -> ml_collections.ConfigDict:
  """`arg` = comma-separated variants of a CTRL config:
  - `n100`, `n300`, ... : label budget (labelled examples per control; default all);
  - `cfg`, `cg`: the classifier-free-guidance / classifier-guidance baselines;
  - `ddpo`: the DDPO (PPO) solver instead of direct backpropagation;
  - `runlocal`: a tiny model and a few steps (seconds on a CPU, for tests)."""
  variants = split_variants(arg, ("cfg", "cg", "ddpo", "runlocal"), "CTRL", label_budget=True)
  # runlocal last: it shrinks whatever the other variants set
  for v in sorted(variants, key=lambda v: v == "runlocal"):
    if v.startswith("n") and v[1:].isdigit():
      for name in config.ctrl.controls:
        config.ctrl.conditions[name].data.num_labelled = int(v[1:])
    elif v == "cfg":
      config.ctrl.method = "cfg"
      config.train.learning_rate = 3e-4
      config.ctrl.batch_size = 64
      config.ctrl.steps_per_epoch = 50
    elif v == "cg":
      config.ctrl.method = "classifier_guidance"
    elif v == "ddpo":
      use_ddpo_solver(config)
    elif v == "runlocal":
      runlocal(config)
  return config


def use_ddpo_solver(config) -> None:
  """The PPO route: contexts (c, y), terminal reward log p̂(y | x_0), per-step penalty
  −α·KL_t (see `ddpo_solver_config` and `train.make_update_fn`), stat tracking per (c, y)."""
  c = config.ctrl
  c.solver = "ddpo"
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


# The DDPO keys the "ddpo" solver derives from `ctrl`: (section, key, derivation, source).
_DERIVED_DDPO_KEYS = (
    ("train", "kl_coef", lambda c: float(c.kl_weight), "ctrl.kl_weight"),
    ("train", "kl_reduction", lambda c: c.kl_reduction, "ctrl.kl_reduction"),
    ("reward", "weights", lambda c: {"ctrl_log_likelihood": float(c.reward_weight)},
     "ctrl.reward_weight"),
)


def _plain(value):
  return value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value


def ddpo_solver_config(config) -> ml_collections.ConfigDict:
  """The config the "ddpo" solver trains with: a copy of `config` whose `train.kl_coef`,
  `train.kl_reduction` and `reward.weights` are derived from `ctrl.kl_weight`,
  `ctrl.kl_reduction` and `ctrl.reward_weight`, at run time (after command-line overrides), so
  the `ctrl` keys are the one place to set them and the saved config shows what the run used.

  Raises:
    ValueError: one of the derived keys was set to another value than both its default (in
      `ctrl_base`) and the derived one (set the `ctrl` key instead).
  """
  out = ml_collections.ConfigDict(config.to_dict())
  base = ctrl_base()
  for section, name, derive, source in _DERIVED_DDPO_KEYS:
    value, default, wanted = _plain(out[section][name]), _plain(base[section][name]), derive(out.ctrl)
    if value not in (default, wanted):
      raise ValueError(f"{section}.{name}={value!r}: the ddpo solver derives it from {source} "
                       f"(here {wanted!r}); set {source} instead")
    out[section][name] = ml_collections.ConfigDict(wanted) if isinstance(wanted, dict) else wanted
  return out


def runlocal(config) -> None:
  """Seconds on a CPU: the tiny digits model of configs/default.py:runlocal, few steps."""
  config.num_epochs = 2
  config.save_freq = 1
  config.progress = False
  if config.model.kind == "digits":
    from ddpo_jax import digits
    digits.use_tiny_model(config.model)
  config.sample.num_steps = 4
  config.sample.batch_size = 8
  config.train.batch_size = 4
  config.train.timestep_fraction = 1.0
  config.per_prompt_stat_tracking.min_count = 2
  config.ctrl.batch_size = 8
  config.ctrl.steps_per_epoch = 2
  config.ctrl.noisy_classifier_steps = 20
  config.ctrl.eval_num_samples = 60  # ≥ 2 per label combination of the multi config
  for name in config.ctrl.controls:
    config.ctrl.conditions[name].classifier.steps = 30


def sd_ctrl_config(prompt_set: str):
  """What configs/ctrl_sd_*.py share: `ctrl_base()` with Stable Diffusion (LoRA rank 4 on the
  attention projections, gradient checkpointing) and the reference's direct-backprop recipe
  (docs/algorithms.md §4.4): AdamW with LoRA lr 1e-3 and control-table lr 1e-2, weight decay
  0.1, grad-norm clip 5, reward weight 0.1, KL weight 0.01 MEAN-reduced over latent dims,
  random truncation; 50 DDIM steps, eta 1, CFG 5 (as the SD DDPO tasks); chains of 4 × 8
  accumulated per step."""
  from ddpo_jax import sd
  config = ctrl_base()
  config.model = sd.model_config_defaults()
  config.model.remat = True  # the backprop solver keeps one UNet step's activations at a time
  sd.prompt_config_defaults(config, prompt_set)
  config.num_epochs = 20
  config.save_freq = 2
  config.keep_checkpoints = 0
  config.log_image_freq = 0
  config.sample.num_steps = 50
  config.sample.eta = 1.0
  config.sample.guidance_scale = 5.0
  config.sample.batch_size = 32  # also the batch of the offline-data sampler
  config.train.learning_rate = 1e-3  # LoRA (the reference's other setting: 3e-4)
  config.train.control_learning_rate = 1e-2
  config.train.adam_weight_decay = 0.1
  config.train.max_grad_norm = 5.0
  c = config.ctrl
  c.solver = "backprop"
  c.truncation = "random"
  c.train_base = True
  c.reward_weight = 0.1
  c.kl_weight = 0.01
  c.kl_reduction = "mean"
  c.batch_size = 4
  c.gradient_accumulation_steps = 8
  c.steps_per_epoch = 10
  c.eval_num_samples = 256
  return config


def apply_sd_variants(config, arg, runlocal_eval_samples: int):
  """`apply_variants` (nN, cfg, cg, ddpo, runlocal), then the SD sizes of
  the `cfg` baseline (denoising fine-tune: 50 steps per epoch of 32 labelled images, 8 × 4
  accumulated) and of the `ddpo` solver (the SD DDPO tasks' layout: 8 sampling calls of 32
  per epoch, optimizer steps of 8 × 8 samples, 100 epochs), and `sd_ctrl_runlocal` last."""
  variants = split_variants(arg, ("cfg", "cg", "ddpo", "runlocal"), "CTRL", label_budget=True)
  config = apply_variants(config, ",".join(variants))
  if "cfg" in variants:
    config.ctrl.batch_size = 8
    config.ctrl.gradient_accumulation_steps = 4
    config.ctrl.steps_per_epoch = 50
  if "ddpo" in variants:
    config.num_epochs = 100
    config.sample.batch_size = 32
    config.sample.num_batches_per_epoch = 8
    config.train.batch_size = 8
    config.train.gradient_accumulation_steps = 8
  if "runlocal" in variants:
    sd_ctrl_runlocal(config, runlocal_eval_samples)
  return config


def sd_ctrl_runlocal(config, eval_num_samples: int) -> None:
  """Seconds on a CPU after `runlocal`: a tiny pipeline (give
  --config.model.pretrained_path=DIR), 16×16 images, 2 DDIM steps, 16 sampled images per
  offline dataset, 20 classifier steps, 2 epochs × 2 steps of 4 chains."""
  from ddpo_jax import sd
  sd.runlocal(config)  # tiny resolution, float32 compute, LoRA rank 2, 2 epochs
  config.model.remat = False
  config.log_image_freq = 0
  config.sample.num_steps = 2
  config.sample.batch_size = 8
  config.ctrl.batch_size = 4
  config.ctrl.gradient_accumulation_steps = 1
  config.ctrl.steps_per_epoch = 2
  config.ctrl.eval_num_samples = eval_num_samples
  for name in config.ctrl.controls:
    cond = config.ctrl.conditions[name]
    cond.data.num_images = 16
    cond.data.batch_size = 8
    cond.classifier.steps = 20
    cond.classifier.input_size = 0
