"""The full DDPO config with the PyTorch reference's names and defaults; configs/ override it.

Names follow kvablack/ddpo-pytorch so configs carry over. Differences: batch sizes are GLOBAL
(all devices together), and `per_prompt_stat_tracking.enabled` switches tracking on/off.
"""
import ml_collections


def ddpo_base() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.mode = "ddpo"  # "ddpo": fine-tune; "pretrain": only (re)build the pre-trained model
  config.seed = 42
  config.num_epochs = 100
  config.save_freq = 20  # epochs between checkpoints (the last epoch is always saved)
  config.keep_checkpoints = 0  # keep step 0 and this many latest steps; 0 keeps all
  config.log_image_freq = 5  # epochs between image grids in WORKDIR/samples and TensorBoard
  config.progress = True  # tqdm progress bars
  # Persistent XLA compilation cache shared by runs ("" = off), e.g. "~/.cache/ddpo_jax/xla".
  config.compilation_cache_dir = ""
  # CPU devices per process (`jax_num_cpu_devices`, set by ddpo_jax.main before JAX starts;
  # 0 = JAX's own: one, or XLA_FLAGS' --xla_force_host_platform_device_count). N > 0 makes the
  # CPU backend N devices that split each batch over the mesh's data axis, which uses a
  # multi-core CPU better than one device does; accelerators are unaffected.
  config.cpu_devices = 0

  # Device mesh (data, fsdp) over all devices of all processes; batches are split over both
  # axes jointly. fsdp > 1 also splits parameters and optimizer state of at least
  # fsdp_min_size elements over the fsdp axis (see ddpo_jax/parallel.py: PARAM_RULES).
  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1  # -1: all devices not used by fsdp
  config.mesh.fsdp = 1
  config.mesh.fsdp_min_size = 2 ** 18

  config.model = ml_collections.ConfigDict()
  config.model.kind = "digits"

  sample = config.sample = ml_collections.ConfigDict()
  sample.num_steps = 50
  sample.eta = 1.0
  sample.guidance_scale = 5.0
  sample.batch_size = 8
  sample.num_batches_per_epoch = 2

  train = config.train = ml_collections.ConfigDict()
  # "ppo" (DDPO-IS), "sf" (DDPO-SF: one optimizer step per data collection, i.e.
  # train.batch_size * gradient_accumulation_steps = the samples per epoch), "rwr", "rwr_sparse"
  train.algorithm = "ppo"
  train.batch_size = 4
  train.learning_rate = 3e-4
  train.adam_beta1 = 0.9
  train.adam_beta2 = 0.999
  train.adam_weight_decay = 1e-4
  train.adam_epsilon = 1e-8
  train.adam_mu_dtype = ""  # Adam's first moment dtype: "" = the params' dtype, or "bfloat16"
  train.max_grad_norm = 1.0
  train.gradient_accumulation_steps = 1
  train.num_inner_epochs = 1
  train.cfg = True
  train.adv_clip_max = 5.0
  train.clip_range = 1e-4
  train.timestep_fraction = 1.0
  # α > 0 (ppo / sf): maximise E[r] − α E[Σ_t KL_t], KL_t = ||mean_θ − mean_pre||² / (2 std²)
  # at the sampled x_t (docs/algorithms.md §3.5); the sampler then also runs the pre-trained
  # UNet per step
  train.kl_coef = 0.0
  train.kl_reduction = "mean"  # over latent dims: "mean" (like the log-prob) or "sum" (exact KL)
  train.rwr_beta = 5.0  # RWR weights ∝ exp(reward / beta) (the original's temperature 1/5)
  train.rwr_quantile = 0.9  # RWR-sparse trains on samples with reward ≥ this batch quantile

  tracking = config.per_prompt_stat_tracking = ml_collections.ConfigDict()
  tracking.enabled = True
  tracking.buffer_size = 16
  tracking.min_count = 16

  reward = config.reward = ml_collections.ConfigDict()
  reward.weights = ml_collections.ConfigDict({"jpeg_compressibility": 1.0})
  reward.metrics = ()  # reward terms computed and logged but not trained on
  reward.classifier_seed = 0  # digits: seed of the reward classifier
  reward.clip_path = "openai/clip-vit-large-patch14"  # aesthetic: CLIP vision dir or hub id
  reward.aesthetic_mlp_path = ""  # aesthetic: sac+logos+ava1-l14-linearMSE.pth
  reward.server_url = "http://127.0.0.1:8000"  # remote: a `python -m ddpo_jax.rewards.server`
  return config



def split_variants(arg, known: tuple[str, ...], config_name: str,
                   label_budget: bool = False) -> list[str]:
  """The comma-separated variants of a config's `get_config(arg)` ("file.py:runlocal,full"),
  blanks dropped, each checked against `known` (and, with `label_budget`, the CTRL label
  budgets "nN", e.g. n100). An unknown variant (a typo such as "runlocl") is an error naming
  the config and the known variants, never the full config silently.

  Raises:
    ValueError: an unknown variant.
  """
  variants = [v.strip() for v in (arg or "").split(",") if v.strip()]
  for v in variants:
    budget = label_budget and v.startswith("n") and v[1:].isdigit()
    if v not in known and not budget:
      names = ", ".join(known + (("nN",) if label_budget else ()))
      raise ValueError(f"unknown {config_name} config variant {v!r}; known: {names}")
  return variants
