#!/usr/bin/env python
r"""ddpo_jax vs TRL's `DDPOTrainer`: one DDPO epoch (sampling + reward + PPO update), same work.

  pip install -e '.[bench]'
  python benchmarks/vs_trl.py --size=tiny      # CPU, tiny random SD-1-style pipeline, LoRA
  python benchmarks/vs_trl.py --size=tiny --style=sd2 --full   # CPU, SD-2-style, full UNet
  python benchmarks/vs_trl.py --size=tiny --rows=all           # CPU, sd1/sd2 x LoRA/full: 4 rows
  python benchmarks/vs_trl.py --size=sd15      # GPU, SD-1.5 architecture at 512 px, random weights

Pipelines (`--style`, tiny only; sd15 is SD-1 style). Both tiny styles make 32 px images through
the tests' 2-level VAE (tests/tiny_models.py `vae_kwargs`, downsampling factor 2: 16x16x4
latents) and a 2-layer CLIP text encoder with SD's 77 positions, whose hidden size is the UNet's
cross_attention_dim:
  sd1: `unet_sd1_kwargs` at 8 heads: cross-attention down block + plain down block (2 resnets
       each), conv 1x1 projections, one head count; text encoder 32 wide, quick_gelu.
  sd2: `unet_sd2_kwargs` as the tests build it: three levels (32/64/64 channels, 1 resnet each,
       cross-attention in the top two), linear projections, per-level head counts (2, 4, 8),
       upcast_attention; text encoder 24 wide (= cross_attention_dim), gelu (SD-2's OpenCLIP).
       Epsilon prediction and SD's DDIM schedule, as for sd1.
Work per epoch (`SIZES` / `SD2_SIZES`, every knob overridable):
  tiny sd1: 16 prompts in 2 sampling calls of 8, 20 DDIM steps, CFG 5, minibatch 4, all
            timesteps, 4 AdamW steps (the settings of the earlier measurements in docs/benchmarks.md,
            kept so that they stay comparable).
  tiny sd2: the issue's reference measurement: 32 prompts in 4 sampling calls of 8, 20 DDIM
            steps, CFG 5, minibatch 8, all timesteps, 4 AdamW steps (grad_accum 1).
  sd15:     16 prompts in 2 calls of 8, 50 DDIM steps, CFG 5, minibatch 4 x 2 accumulated.
`--rows=all` runs every (style, LoRA / full) row of the size (tiny: 4 rows) one after another,
each in a fresh process (`python vs_trl.py --style=... [--full]` with the other flags passed
on), then prints one table: per row, TRL and ddpo_jax s/epoch, the ratio, and each library's
sampling / reward / update seconds per epoch.

Both sides load ONE diffusers-format pipeline directory, created once with random weights and
cached (`$DDPO_JAX_CACHE/bench/`, default ~/.cache/ddpo_jax/bench/): ddpo_jax through
`config.model.pretrained_path` (`ddpo_jax.pipelines.sd`), TRL through `DefaultDDPOStableDiffusionPipeline`.
Both then run the same work per epoch: N prompts (drawn from one list) in sampling calls of B,
T DDIM steps with eta 1 and classifier-free guidance (one batched UNet call per step), the JPEG
compressibility reward (`ddpo_jax.rewards.jpeg.jpeg_compressibility`, PIL quality 95, on the host),
advantages normalised over the batch (no per-prompt tracking on either side), then
`inner_epochs` passes of PPO-clip over minibatches of `train_batch_size`, K = int(T ·
timestep_fraction) timesteps per sample, gradients accumulated over K × `grad_accum`
minibatches per AdamW step (lr 3e-4, global-norm clip 1), LoRA rank 4 / alpha 4 on
to_q/to_k/to_v/to_out.0 (or the full UNet with --full).

Precision: tiny = float32 on both sides. sd15 = ddpo_jax float32 master weights with bfloat16
compute and cuDNN flash attention (attention "auto": cuDNN wherever it takes the head size, XLA
otherwise, e.g. the VAE's 512-wide head); TRL `mixed_precision="bf16"` (frozen UNet/VAE/text encoder cast to
bf16, LoRA params float32, diffusers' SDPA attention) — `--trl_precision=fp16` for TRL's default.

Timing: each side first runs `--warmup_epochs` epochs (setup + XLA compilation for ddpo_jax;
setup + first-call allocation for TRL), reported separately, then `--epochs` timed epochs.
ddpo_jax's epochs are `ddpo_jax.trainer.loop.train_and_evaluate` epochs (`samples_per_s` in
metrics.jsonl: sampling, host reward, advantages, update); TRL's are `DDPOTrainer.step` calls,
with CUDA synchronised around each, and its phases are its own methods timed from the outside
(synchronised): `_generate_samples` (sampling), `compute_rewards` (reward),
`_train_batched_samples` (update; the shuffling before it is in the epoch only). Afterwards
ddpo_jax's compiled sampling and update programs (`make_sample_fn` / `make_update_fn`,
compilation served from this run's persistent cache) are timed phase by phase with
`block_until_ready` (its sampling / reward / update split), and their model FLOPs (XLA
`jit(...).lower(...).compile().cost_analysis()` of the text encoder, one guided DDIM step, the VAE
decoder and one PPO micro-step gradient, times how often each runs: XLA counts a `scan` body
once, so the whole programs' own counts are not used) give the model FLOP utilisation against
the device's peak (printed, with the assumption on a CPU).

On a CPU shared with other work, `--threads=1` (one thread per side) keeps PyTorch's OpenMP
workers from thrashing on oversubscribed cores, which otherwise slows TRL by up to two orders of
magnitude and makes the ratio meaningless; the 1-minute load average is printed per epoch.

The LAST printed line is `ratio=R`: ddpo_jax samples/s ÷ TRL samples/s over whole epochs
(`--rows=all`: each row's `ratio[ROW]=R` above it, and the LAST line is the minimum over rows).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))  # tiny_models: the tests' tiny pipeline parts
if REPO not in sys.path:
  sys.path.insert(0, REPO)

PROMPTS = ("cat", "dog", "horse", "monkey", "rabbit", "zebra", "spider", "bird", "sheep", "deer",
           "cow", "goat", "lion", "tiger", "bear", "raccoon", "fox", "wolf", "lizard", "beetle",
           "ant", "butterfly", "fish", "shark", "whale", "dolphin", "squirrel", "mouse", "rat",
           "snake", "turtle", "frog")

# Per size: the work of one epoch and how many epochs to time.
SIZES = {
    # 16 prompts (2 sampling calls of 8), 20 DDIM steps; 4 AdamW steps of 4 samples.
    "tiny": dict(num_prompts=16, sample_batch_size=8, steps=20, guidance_scale=5.0,
                 train_batch_size=4, grad_accum=1, timestep_fraction=1.0, inner_epochs=1,
                 epochs=3, warmup_epochs=1, resolution=32),
    # 16 prompts (2 calls of 8), 50 DDIM steps, CFG 5; 2 AdamW steps of 8 samples (4 × 2).
    "sd15": dict(num_prompts=16, sample_batch_size=8, steps=50, guidance_scale=5.0,
                 train_batch_size=4, grad_accum=2, timestep_fraction=1.0, inner_epochs=1,
                 epochs=2, warmup_epochs=1, resolution=512),
}
# The SD-2-style pipeline (tiny only): the reference measurement.
SD2_SIZES = {
    # 32 prompts (4 sampling calls of 8), 20 DDIM steps, CFG 5; 4 AdamW steps of 8 samples.
    "tiny": dict(num_prompts=32, sample_batch_size=8, steps=20, guidance_scale=5.0,
                 train_batch_size=8, grad_accum=1, timestep_fraction=1.0, inner_epochs=1,
                 epochs=3, warmup_epochs=1, resolution=32),
}
STYLE_SIZES = {"sd1": SIZES, "sd2": SD2_SIZES}
LORA_RANK = 4  # TRL's DefaultDDPOStableDiffusionPipeline hard-codes r=4, alpha=4
LEARNING_RATE = 3e-4
PIPELINE_VERSION = 1  # bump when the generated pipelines change
SD_MAX_LENGTH = 77  # CLIP's text length in SD


def log(*args):
  print(*args, flush=True)


def machine() -> str:
  """CPU model and usable cores (from /proc/cpuinfo where there is one)."""
  name = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      name = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), name)
  except OSError:
    pass
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return f"{name}, {cores} cores"


def load_avg() -> str:
  """The 1/5/15-minute load averages (other processes on the machine skew CPU timings)."""
  try:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())
  except OSError:
    return "n/a"


# ================================================================================================
# The pipeline directory (random weights, diffusers format, created once).
# ================================================================================================
def _no_class(d: dict) -> dict:
  return {k: v for k, v in d.items() if not k.startswith("_")}


def pipeline_components(size: str, resolution: int, tokenizer, style: str = "sd1"):
  """(unet kwargs, vae kwargs, CLIPTextConfig kwargs) of the benchmark pipeline."""
  if size == "tiny" and style == "sd2":
    # The tests' tiny SD-2 layout: three levels, linear projections, per-level head counts,
    # upcast attention; the same 2-level VAE (factor 2); a gelu CLIP text encoder as wide as the
    # UNet's cross-attention (SD-2's OpenCLIP text encoder is gelu, 1024 = cross_attention_dim).
    from tiny_models import text_config_kwargs, unet_sd2_kwargs, vae_kwargs
    unet = unet_sd2_kwargs(sample_size=resolution // 2)
    vae = vae_kwargs(sample_size=resolution)
    width = unet["cross_attention_dim"]
    text = text_config_kwargs(vocab_size=len(tokenizer), max_position_embeddings=SD_MAX_LENGTH,
                              hidden_size=width, intermediate_size=2 * width, projection_dim=width,
                              hidden_act="gelu")
    return unet, vae, text
  if style != "sd1":
    raise ValueError(f"style {style!r} exists for size 'tiny' only")
  if size == "tiny":
    # The tests' tiny SD-1 layout (tests/tiny_models.py) at 8 heads: cross-attention down block
    # + plain down block (2 resnets each), conv projections; a 2-level VAE (factor 2), a 2-layer
    # CLIP text encoder with SD's 77 positions.
    from tiny_models import text_config_kwargs, unet_sd1_kwargs, vae_kwargs
    unet = unet_sd1_kwargs(sample_size=resolution // 2, attention_head_dim=8)
    vae = vae_kwargs(sample_size=resolution)
    text = text_config_kwargs(vocab_size=len(tokenizer), max_position_embeddings=SD_MAX_LENGTH)
    return unet, vae, text
  from ddpo_jax.models.pipeline import SD15_TEXT_CONFIG, SD15_UNET_CONFIG, SD15_VAE_CONFIG
  unet = {**_no_class(SD15_UNET_CONFIG), "sample_size": resolution // 8}
  vae = {**_no_class(SD15_VAE_CONFIG), "sample_size": resolution}
  text = {k: v for k, v in SD15_TEXT_CONFIG.items() if k not in ("architectures", "model_type")}
  return unet, vae, text


def pipeline_dir_name(size: str, style: str, resolution: int) -> str:
  return f"{size}-{style}_{resolution}px_v{PIPELINE_VERSION}"


def ensure_pipeline(size: str, resolution: int, cache_dir: str, style: str = "sd1") -> str:
  """The cached pipeline directory for (size, style, resolution); created on first use (random
  weights: torch.manual_seed(0) and the diffusers / transformers default initialisers)."""
  path = os.path.join(cache_dir, pipeline_dir_name(size, style, resolution))
  if os.path.exists(os.path.join(path, ".complete")):
    return path
  import torch
  from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
  from transformers import CLIPTextConfig, CLIPTextModel
  from ddpo_jax.models.pipeline import SD_DDIM_SCHEDULER_CONFIG
  t0 = time.time()
  scratch = tempfile.mkdtemp(prefix="ddpo_bench_")
  from tiny_models import make_tiny_tokenizer
  # TRL pads prompts to the tokenizer's model_max_length: SD's 77 on both sides.
  tokenizer = make_tiny_tokenizer(os.path.join(scratch, "tok"), max_length=SD_MAX_LENGTH)
  unet_kw, vae_kw, text_kw = pipeline_components(size, resolution, tokenizer, style)
  torch.manual_seed(0)
  pipe = StableDiffusionPipeline(
      vae=AutoencoderKL(**vae_kw).eval(), text_encoder=CLIPTextModel(CLIPTextConfig(**text_kw)).eval(),
      tokenizer=tokenizer, unet=UNet2DConditionModel(**unet_kw).eval(),
      scheduler=DDIMScheduler(**_no_class(SD_DDIM_SCHEDULER_CONFIG)), safety_checker=None,
      feature_extractor=None, requires_safety_checker=False)
  tmp_path = path + f".tmp{os.getpid()}"
  shutil.rmtree(tmp_path, ignore_errors=True)
  pipe.save_pretrained(tmp_path, safe_serialization=True)
  open(os.path.join(tmp_path, ".complete"), "w").close()
  shutil.rmtree(path, ignore_errors=True)
  os.replace(tmp_path, path)
  shutil.rmtree(scratch, ignore_errors=True)
  n_unet = sum(p.numel() for p in pipe.unet.parameters())
  log(f"[setup] wrote {size} {style} pipeline ({n_unet:,} UNet params, {resolution}px) to {path} "
      f"in {time.time() - t0:.1f} s")
  del pipe
  gc.collect()
  return path


# ================================================================================================
# Settings shared by both sides.
# ================================================================================================
def resolve_settings(args) -> dict:
  style = getattr(args, "style", None) or "sd1"
  table = STYLE_SIZES[style]
  if args.size not in table:
    raise SystemExit(f"--style={style} exists for --size={'/'.join(sorted(table))} only")
  s = dict(table[args.size])
  for k in s:
    v = getattr(args, k, None)
    if v is not None:
      s[k] = v
  s["lora"] = not args.full
  s["style"] = style
  n, b = s["num_prompts"], s["sample_batch_size"]
  if n % b:
    raise SystemExit(f"--num_prompts={n} must be a multiple of --sample_batch_size={b}")
  s["num_batches"] = n // b
  group = s["train_batch_size"] * s["grad_accum"]
  if n % group or b % s["train_batch_size"]:
    raise SystemExit(f"num_prompts ({n}) must be a multiple of train_batch_size*grad_accum "
                     f"({group}) and sample_batch_size ({b}) of train_batch_size (TRL's rule)")
  s["K"] = int(s["steps"] * s["timestep_fraction"])
  if s["K"] < 1:
    raise SystemExit("steps * timestep_fraction must be at least 1")
  s["optimizer_steps"] = s["inner_epochs"] * n // group
  return s


def describe(s: dict) -> str:
  return (f"{s.get('style', 'sd1')} pipeline; N={s['num_prompts']} prompts ({s['num_batches']} "
          f"sampling calls of {s['sample_batch_size']}), T={s['steps']} DDIM steps, eta 1, "
          f"CFG {s['guidance_scale']}, {s['resolution']}px; PPO: {s['inner_epochs']} inner "
          f"epoch(s), minibatch {s['train_batch_size']} x {s['grad_accum']} accumulated, "
          f"K={s['K']} timesteps/sample "
          f"-> {s['optimizer_steps']} AdamW steps/epoch; "
          f"{'LoRA rank 4' if s['lora'] else 'full UNet'}; reward: JPEG compressibility")


def jpeg_reward_np(images_uint8):
  from ddpo_jax.rewards.jpeg import jpeg_compressibility
  return jpeg_compressibility(images_uint8, None, None)


# ================================================================================================
# TRL
# ================================================================================================
class TrlSide:
  """TRL's DDPOTrainer on the pipeline directory; `epoch(e)` is one `DDPOTrainer.step`."""

  def __init__(self, s: dict, pipe_dir: str, args):
    import torch
    from accelerate import PartialState
    from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline
    from ddpo_jax.rewards import to_uint8

    self.s, self.torch = s, torch
    self.cuda = torch.cuda.is_available()
    self.precision = args.trl_precision if args.size == "sd15" else "no"
    t0 = time.perf_counter()
    PartialState()  # DDPOTrainer's logging needs accelerate's state to exist first
    self.workdir = tempfile.mkdtemp(prefix="trl_bench_")
    config = DDPOConfig(
        exp_name="vs_trl", num_epochs=s["warmup_epochs"] + s["epochs"], save_freq=10 ** 9,
        mixed_precision=self.precision, allow_tf32=True, seed=args.seed, log_with=None,
        project_kwargs={"project_dir": self.workdir},
        sample_num_steps=s["steps"], sample_eta=1.0, sample_guidance_scale=s["guidance_scale"],
        sample_batch_size=s["sample_batch_size"], sample_num_batches_per_epoch=s["num_batches"],
        train_batch_size=s["train_batch_size"], train_gradient_accumulation_steps=s["grad_accum"],
        train_learning_rate=LEARNING_RATE if s["lora"] else 1e-5,
        train_num_inner_epochs=s["inner_epochs"], train_timestep_fraction=s["timestep_fraction"],
        train_cfg=True, train_adv_clip_max=5.0, train_clip_range=1e-4, train_max_grad_norm=1.0,
        per_prompt_stat_tracking=False, async_reward_computation=False)
    rng = random.Random(args.seed)

    def prompt_fn():
      return rng.choice(PROMPTS), {}

    def reward_fn(images, prompts, metadata):
      # images: (B, 3, H, W) float in [0, 1] -> uint8 NHWC, then the same JPEG reward.
      x = images.detach().float().cpu().numpy().transpose(0, 2, 3, 1)
      r, info = jpeg_reward_np(to_uint8(x))
      return torch.as_tensor(r), info

    quiet = contextlib.redirect_stderr(open(os.devnull, "w")) if not args.verbose else contextlib.nullcontext()
    with quiet:
      self.pipeline = DefaultDDPOStableDiffusionPipeline(pipe_dir, use_lora=s["lora"])
      self.pipeline.sd_pipeline.set_progress_bar_config(disable=True)
      self.trainer = DDPOTrainer(config, reward_fn, prompt_fn, self.pipeline)
    self.trainer.sd_pipeline.set_progress_bar_config(disable=True)
    if self.cuda:
      # SDPA (flash / memory-efficient) attention: diffusers' default processor on torch 2.
      from diffusers.models.attention_processor import AttnProcessor2_0
      self.trainer.sd_pipeline.unet.set_attn_processor(AttnProcessor2_0())
    self.setup_s = time.perf_counter() - t0
    self.phases = {"sample": 0.0, "reward": 0.0, "train": 0.0}
    tr = self.trainer
    tr._generate_samples = self._timed("sample", tr._generate_samples)
    tr.compute_rewards = self._timed("reward", tr.compute_rewards)
    tr._train_batched_samples = self._timed("train", tr._train_batched_samples)
    self.global_step = 0
    self.rows = []

  def sync(self):
    if self.cuda:
      self.torch.cuda.synchronize()

  def _timed(self, name, fn):
    def wrapper(*a, **k):
      self.sync()
      t = time.perf_counter()
      out = fn(*a, **k)
      self.sync()
      self.phases[name] += time.perf_counter() - t
      return out
    return wrapper

  def epoch(self, e: int, warmup: bool) -> float:
    for k in self.phases:
      self.phases[k] = 0.0
    self.sync()
    t = time.perf_counter()
    self.global_step = self.trainer.step(e, self.global_step)
    self.sync()
    dt = time.perf_counter() - t
    if self.cuda:  # hand cached blocks back so XLA (same device, other epochs) can use them
      self.torch.cuda.empty_cache()
    ph = dict(self.phases)
    self.rows.append(dict(epoch=e, time=dt, warmup=warmup, load=load_avg(), **ph))
    log(f"[trl] epoch {e}: {dt:.2f} s (sample {ph['sample']:.2f}, reward {ph['reward']:.3f}, "
        f"train {ph['train']:.2f}), load {load_avg()}{'  [warm-up]' if warmup else ''}")
    return dt

  def close(self) -> dict:
    s = self.s
    peak_mem = self.torch.cuda.max_memory_allocated() / 2 ** 30 if self.cuda else None
    del self.trainer, self.pipeline
    gc.collect()
    if self.cuda:
      self.torch.cuda.empty_cache()
    shutil.rmtree(self.workdir, ignore_errors=True)
    timed = [r for r in self.rows if not r["warmup"]]
    med = lambda key: statistics.median(r[key] for r in timed)
    n = s["num_prompts"]
    return dict(setup_s=self.setup_s, warmup_epoch_s=sum(r["time"] for r in self.rows if r["warmup"]),
                epoch_s=med("time"), epoch_times=[r["time"] for r in timed],
                samples_per_s=n / med("time"), sample_s=med("sample"), reward_s=med("reward"),
                train_s=med("train"), images_per_s=n / med("sample"),
                train_samples_per_s=n * s["inner_epochs"] / med("train"),
                precision=self.precision, torch=self.torch.__version__, peak_mem_gib=peak_mem)


# ================================================================================================
# ddpo_jax
# ================================================================================================
def ddpo_jax_config(s: dict, pipe_dir: str, args):
  from ddpo_jax.config_schema import new_config
  gpu = args.size == "sd15"
  config = new_config("ddpo", "sd")  # LoRA rank 4, lr 3e-4, 50 DDIM steps, eta 1, CFG 5
  config.prompt_fn = "list"
  config.reward.weights = {"jpeg_compressibility": 1.0}
  config.prompt_fn_kwargs.prompts = PROMPTS
  config.seed = args.seed
  config.num_epochs = s["warmup_epochs"] + s["epochs"]
  config.save_freq = 10 ** 6  # checkpoints only at the start and after the last epoch
  config.keep_checkpoints = 1
  config.log_image_freq = 0
  config.progress = False
  m = config.model
  m.pretrained_path = pipe_dir
  m.resolution = s["resolution"]
  m.dtype = "float32"
  m.compute_dtype = "bfloat16" if gpu else "float32"
  # "auto": cuDNN flash attention wherever cuDNN takes the shape (forcing "cudnn" would fail
  # on the VAE's single 512-wide head), XLA's einsum attention elsewhere.
  m.attention_implementation = args.attention or ("auto" if gpu else "xla")
  m.remat = False
  m.lora.enabled = s["lora"]
  m.lora.rank = LORA_RANK
  m.lora.alpha = float(LORA_RANK)
  sc, tc = config.sample, config.train
  sc.num_steps = s["steps"]
  sc.eta = 1.0
  sc.guidance_scale = s["guidance_scale"]
  sc.batch_size = s["sample_batch_size"]
  sc.num_batches_per_epoch = s["num_batches"]
  tc.batch_size = s["train_batch_size"]
  tc.gradient_accumulation_steps = s["grad_accum"]
  tc.timestep_fraction = s["timestep_fraction"]
  tc.num_inner_epochs = s["inner_epochs"]
  tc.cfg = True
  tc.learning_rate = LEARNING_RATE if s["lora"] else 1e-5
  tc.clip_range = 1e-4
  tc.adv_clip_max = 5.0
  tc.max_grad_norm = 1.0
  config.per_prompt_stat_tracking.enabled = False
  return config


def _flops(compiled, missing: float = float("nan")) -> float:
  """XLA's FLOP count of a compiled program; `missing` where its cost analysis has none (a
  program that only passes its inputs through reports no "flops" entry)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float((cost or {}).get("flops", missing))


def _compile(fn, *args):
  """(compiled, seconds): jit(fn).lower(*args).compile()."""
  import jax
  t = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  return compiled, time.perf_counter() - t


def model_flops(policy, config, s, frozen, lora_or_unet):
  """Model FLOPs of one epoch: {"sample": ..., "train": ...} from XLA's cost analysis of the
  component programs (abstract inputs: nothing is allocated), times how often each runs."""
  import jax
  import jax.numpy as jnp
  from ddpo_jax.numerics import diffusion, rl
  from ddpo_jax.tasks import dynamics
  # The trainer's own DDIM dynamics of this config (its noise schedule and eta).
  dyn = dynamics.make_dynamics(policy.denoiser, config.sample)
  sched = dyn.schedule
  B, mb, T, K = s["sample_batch_size"], s["train_batch_size"], s["steps"], s["K"]
  g = float(config.sample.guidance_scale)
  step_kw = dict(alphas_cumprod=sched.alphas_cumprod, final_alpha_cumprod=sched.final_alpha_cumprod,
                 eta=dyn.eta, guidance_scale=g)
  abstract = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  ids = jax.ShapeDtypeStruct((B, policy.tokenize(["x"]).shape[1]), jnp.int32)
  params_a, frozen_a, trainable_a = abstract(policy.params), abstract(frozen), abstract(lora_or_unet)
  ctx_a = jax.eval_shape(policy.encode_prompts, params_a, ids)
  unc_a = jax.ShapeDtypeStruct((1,) + ctx_a.shape[1:], ctx_a.dtype)
  assembled_a = jax.eval_shape(policy.assemble_denoiser, trainable_a, frozen_a)

  def lat(n):
    return jax.ShapeDtypeStruct((n,) + tuple(policy.denoiser.latent_shape), jnp.float32)

  def vec(n, dtype=jnp.int32):
    return jax.ShapeDtypeStruct((n,), dtype)

  def guided_step(p, x, t, pt, nx, ctx, unc):
    return diffusion.step_log_prob(policy.denoiser, p, x, t, pt, nx, ctx, unc, **step_kw)

  def ctx_of(n):
    return jax.ShapeDtypeStruct((n,) + ctx_a.shape[1:], ctx_a.dtype)

  def loss(trainable, fz, x, t, pt, nx, ctx, unc, old_lp, adv):
    p = policy.assemble_denoiser(trainable, fz)
    lp, _, _ = diffusion.step_log_prob(policy.denoiser, p, x, t, pt, nx, ctx, unc, **step_kw)
    return rl.ppo_clipped_loss(lp, old_lp, adv, 1e-4, 5.0)[0]

  parts, secs = {}, 0.0
  for name, fn, fargs in [
      ("encode", policy.encode_prompts, (params_a, ids)),
      ("encode1", policy.encode_prompts,
       (params_a, jax.ShapeDtypeStruct((1, ids.shape[1]), jnp.int32))),
      ("assemble", policy.assemble_denoiser, (trainable_a, frozen_a)),
      ("step", guided_step, (assembled_a, lat(B), vec(B), vec(B), lat(B), ctx_of(B), unc_a)),
      ("decode", policy.decode, (params_a, lat(B))),
      ("grad", jax.grad(loss), (trainable_a, frozen_a, lat(mb), vec(mb), vec(mb), lat(mb),
                                ctx_of(mb), unc_a, vec(mb, jnp.float32), vec(mb, jnp.float32))),
  ]:
    compiled, dt = _compile(fn, *fargs)
    # Assembling the denoiser's params is a pass-through (full fine-tuning: the trained tree;
    # LoRA: the factors beside the frozen base, applied unmerged): no arithmetic, 0 FLOPs.
    parts[name] = _flops(compiled, missing=0.0 if name == "assemble" else float("nan"))
    secs += dt
  nb, ie, n = s["num_batches"], s["inner_epochs"], s["num_prompts"]
  sample = nb * (parts["encode"] + parts["encode1"] + parts["assemble"] + T * parts["step"]
                 + parts["decode"])
  train_f = ie * ((n // mb) * K * parts["grad"] + parts["encode1"])
  return {"sample": sample, "train": train_f, "parts": parts, "compile_s": secs}


def device_peak_flops(compute_dtype: str, threads: int = 0):
  """(peak FLOP/s or None, description) of device 0 for `compute_dtype` (on a CPU, of
  `threads` cores if > 0, else of all usable cores)."""
  import jax
  dev = jax.devices()[0]
  kind = getattr(dev, "device_kind", "") or ""
  bf16 = compute_dtype == "bfloat16"
  if dev.platform == "gpu":
    table = [("H200", 989e12, 494e12), ("H100 PCIe", 756e12, 378e12), ("H100", 989e12, 494e12),
             ("A100", 312e12, 156e12), ("L4", 121e12, 60e12)]
    for key, p16, p32 in table:
      if key in kind:
        return (p16 if bf16 else p32), (f"{kind}: {(p16 if bf16 else p32) / 1e12:.0f} TFLOP/s "
                                        f"dense {'bf16' if bf16 else 'tf32'} (datasheet)")
    return None, f"{kind}: peak unknown"
  if dev.platform == "tpu":
    table = [("v6", 918e12), ("v5p", 459e12), ("v5", 197e12), ("v4", 275e12), ("v3", 123e12)]
    for key, p in table:
      if key in kind.lower():
        return p, f"{kind}: {p / 1e12:.0f} TFLOP/s bf16 (datasheet)"
    return None, f"{kind}: peak unknown"
  # CPU: cores x clock x FLOP/cycle from /proc/cpuinfo (an assumption, not a measurement).
  try:
    info = open("/proc/cpuinfo").read()
  except OSError:
    return None, "CPU: peak unknown"
  mhz = [float(l.split(":")[1]) for l in info.splitlines() if l.startswith("cpu MHz")]
  flags = next((l for l in info.splitlines() if l.startswith("flags")), "")
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  cores = min(cores, threads) if threads > 0 else cores
  per_cycle = 64 if " avx512f" in flags else (32 if " avx2" in flags else 16)
  if not mhz or compute_dtype != "float32":
    return None, "CPU: peak n/a"
  peak = cores * mhz[0] * 1e6 * per_cycle
  return peak, (f"CPU: ASSUMED peak {peak / 1e9:.0f} GFLOP/s fp32 = {cores} cores x "
                f"{mhz[0] / 1e3:.2f} GHz x {per_cycle} FLOP/cycle "
                f"({'2 AVX-512' if per_cycle == 64 else '2 AVX2' if per_cycle == 32 else 'SSE'} FMA units)")


class JaxSide:
  """ddpo_jax on the pipeline directory. `epoch(e)` is one epoch of `train_and_evaluate`'s loop
  (the same compiled programs, host reward on a thread pool overlapping sampling, advantages,
  update calls, the finiteness check), without the checkpoint / metrics writing that follows
  the timed part of an epoch there."""

  def __init__(self, s: dict, pipe_dir: str, args):
    import concurrent.futures
    import jax
    import jax.numpy as jnp
    from ddpo_jax.algorithms import train
    from ddpo_jax.numerics import parallel
    from ddpo_jax.rewards import make_rewards
    from ddpo_jax.trainer.families import build_policy

    self.s, self.args, self.jax = s, args, jax
    self.config = config = ddpo_jax_config(s, pipe_dir, args)
    self.workdir = tempfile.mkdtemp(prefix="ddpo_jax_bench_")
    # A fresh persistent compilation cache: the programs are compiled for real once (timed
    # below), and the train_and_evaluate cross-check reads them back instead of compiling again.
    jax.config.update("jax_compilation_cache_dir", os.path.join(self.workdir, "xla_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    t0 = time.perf_counter()
    self.mesh = mesh = parallel.make_mesh()
    self.repl, self.data = parallel.replicated(mesh), parallel.data_sharding(mesh)
    self.policy = policy = build_policy(config, self.workdir)
    terms = make_rewards(config, policy)
    if len(terms) != 1 or terms[0][1].on_device:
      raise RuntimeError(f"expected one host reward, got {terms}")
    self.reward = terms[0][1]
    optimizer = train.make_optimizer(config.train)
    self.frozen = jax.device_put(train.frozen_params(policy, config), self.repl)
    trainable = jax.device_put(jax.tree.map(jnp.copy, policy.params["unet"]), self.repl)
    self.state = jax.device_put(train.TrainState(
        step=jnp.zeros((), jnp.int32), params=trainable,
        opt_state=jax.jit(optimizer.init, out_shardings=self.repl)(trainable),
        rng=jax.random.PRNGKey(config.seed)), self.repl)
    self.setup_s = time.perf_counter() - t0
    self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)

    # Compile both programs ahead of time (what the first epoch of train_and_evaluate pays).
    B = s["sample_batch_size"]
    t = time.perf_counter()
    ids = jax.device_put(policy.tokenize(PROMPTS[:B]), self.data)
    meta = jax.device_put({}, self.data)
    lowered = train.make_sample_fn(policy, config, [], mesh).lower(
        self.state.params, self.frozen, self.state.rng, ids, meta)
    self.sample_fn = lowered.compile()
    self.compile_sample_s = time.perf_counter() - t
    traj_a = lowered.out_info[0]
    n = s["num_prompts"]
    traj_a = jax.tree.map(lambda x: jax.ShapeDtypeStruct((n,) + x.shape[1:], x.dtype,
                                                         sharding=self.data), traj_a)
    vec = jax.ShapeDtypeStruct((n,), jnp.float32, sharding=self.data)
    t = time.perf_counter()
    self.update_fn = train.make_update_fn(policy, config, optimizer, mesh).lower(
        self.state, self.frozen, traj_a, vec, vec, vec, self.state.rng).compile()
    self.compile_update_s = time.perf_counter() - t
    self.rows = []

  def epoch(self, e: int, warmup: bool) -> float:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from ddpo_jax.algorithms import train
    from ddpo_jax.numerics import rl
    from ddpo_jax.rewards import to_uint8
    s, policy, config = self.s, self.policy, self.config
    B, nb = s["sample_batch_size"], s["num_batches"]
    t0 = time.perf_counter()
    epoch_key = jax.random.fold_in(self.state.rng, e)
    trajs, futures = [], []
    for b in range(nb):
      prompts = policy.prompt_fn(np.random.default_rng([config.seed, e, b]), B)
      meta = policy.prompt_metadata(prompts)
      ids = jax.device_put(policy.tokenize(prompts), self.data)
      meta_dev = jax.device_put({k: np.asarray(v) for k, v in meta.items()}, self.data)
      traj, images, _ = self.sample_fn(self.state.params, self.frozen,
                                       jax.random.fold_in(epoch_key, b), ids, meta_dev)
      futures.append(self.pool.submit(
          lambda im, p, m: self.reward.fn(to_uint8(im), p, m)[0], images, prompts, meta))
      trajs.append(traj)
    traj = jax.tree.map(lambda *xs: jnp.concatenate(xs), *trajs)
    # Each phase is timed synchronised inside the epoch, as TRL's are: sampling until the last
    # trajectory is on the device; reward: the wait for the host rewards after that (they ran
    # on the pool, overlapping the sampling of later batches); update until its metrics are
    # back. The three add up to the epoch but for the finiteness check ("rest").
    jax.block_until_ready(traj)
    t_sample = time.perf_counter() - t0
    rewards = np.concatenate([np.asarray(f.result(), np.float32) for f in futures])
    adv, scales = (jax.device_put(a.astype(np.float32), self.data)
                   for a in rl.advantages(rewards, None, rl.AdvantageSettings()))
    rew = jax.device_put(rewards, self.data)
    t1 = time.perf_counter()
    for inner in range(s["inner_epochs"]):
      key = jax.random.fold_in(jax.random.fold_in(epoch_key, 10_000), inner)
      self.state, metrics = self.update_fn(self.state, self.frozen, traj, adv, scales, rew, key)
    metrics = jax.device_get(metrics)
    t2 = time.perf_counter()
    finite = all(np.isfinite(v) for v in metrics.values()) and train.params_finite(self.state.params)
    dt = time.perf_counter() - t0
    if not finite:  # random weights: timings stay valid, train_and_evaluate would stop here
      log(f"[ddpo_jax] WARNING epoch {e}: non-finite loss or params ({metrics})")
    ph = dict(sample=t_sample, reward=t1 - t0 - t_sample, train=t2 - t1)
    self.rows.append(dict(epoch=e, time=dt, warmup=warmup, load=load_avg(), **ph))
    log(f"[ddpo_jax] epoch {e}: {dt:.2f} s (sample {ph['sample']:.2f}, reward {ph['reward']:.3f}, "
        f"train {ph['train']:.2f}; loss {float(metrics['loss']):.3g}, reward "
        f"{rewards.mean():.3f}), load {load_avg()}{'  [warm-up]' if warmup else ''}")
    return dt

  def train_and_evaluate_check(self) -> dict:
    """`train_and_evaluate` itself for 1 + `epochs` epochs (epoch 0 loads the programs from
    the persistent cache and is dropped): samples/s from its metrics.jsonl."""
    from ddpo_jax.trainer import loop
    config = self.config.copy_and_resolve_references()
    config.num_epochs = 1 + self.s["epochs"]
    workdir = os.path.join(self.workdir, "run")
    loop.train_and_evaluate(config, workdir, log=lambda *a: None)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      rows = [json.loads(l) for l in f if l.strip()][1:]
    n = self.s["num_prompts"]
    times = [n / r["samples_per_s"] for r in rows]
    log("[ddpo_jax] train_and_evaluate epochs: " + ", ".join(f"{t:.2f} s" for t in times)
        + f" (metrics.jsonl samples_per_s), load {load_avg()}")
    return dict(tae_epoch_s=statistics.median(times), tae_samples_per_s=n / statistics.median(times))

  def close(self) -> dict:
    import jax
    from ddpo_jax.models import lora as lora_lib
    s, config = self.s, self.config
    timed = [r for r in self.rows if not r["warmup"]]
    n = s["num_prompts"]
    epoch_s = statistics.median(r["time"] for r in timed)
    out = dict(setup_s=self.setup_s, compile_s=self.compile_sample_s + self.compile_update_s,
               compile_sample_s=self.compile_sample_s, compile_update_s=self.compile_update_s,
               warmup_epoch_s=sum(r["time"] for r in self.rows if r["warmup"]),
               epoch_s=epoch_s, epoch_times=[r["time"] for r in timed], samples_per_s=n / epoch_s)
    med = lambda key: statistics.median(r[key] for r in timed)
    out.update(sample_s=med("sample"), reward_s=med("reward"), train_s=med("train"))
    out["images_per_s"] = n / out["sample_s"]
    out["train_samples_per_s"] = n * s["inner_epochs"] / out["train_s"]
    out["rest_s"] = statistics.median(r["time"] - r["sample"] - r["reward"] - r["train"]
                                      for r in timed)
    out.update(trainable_params=lora_lib.num_params(self.policy.params["unet"]),
               compute_dtype=config.model.compute_dtype,
               attention=config.model.attention_implementation, backend=jax.default_backend(),
               devices=len(jax.devices()), jax=jax.__version__)
    if not self.args.no_flops:
      fl = model_flops(self.policy, config, s, self.frozen, self.policy.params["unet"])
      peak, peak_desc = device_peak_flops(config.model.compute_dtype, self.args.threads)
      out.update(flops_sample=fl["sample"], flops_train=fl["train"], flops_parts=fl["parts"],
                 flops_compile_s=fl["compile_s"], peak_flops=peak, peak_desc=peak_desc)
      if peak:
        out["mfu_sample"] = fl["sample"] / out["sample_s"] / peak
        out["mfu_train"] = fl["train"] / out["train_s"] / peak
        out["mfu_epoch"] = (fl["sample"] + fl["train"]) / epoch_s / peak
    if not self.args.skip_train_and_evaluate:
      try:
        out.update(self.train_and_evaluate_check())
      except FloatingPointError as err:  # random weights can give NaN in low precision
        log(f"[ddpo_jax] train_and_evaluate cross-check stopped: {err}")
    try:
      stats = jax.devices()[0].memory_stats() or {}
      if "peak_bytes_in_use" in stats:
        out["peak_mem_gib"] = stats["peak_bytes_in_use"] / 2 ** 30
    except Exception:  # noqa: BLE001  (CPU backends may not report)
      pass
    self.pool.shutdown()
    shutil.rmtree(self.workdir, ignore_errors=True)
    return out


# ================================================================================================
# Reporting
# ================================================================================================
def _fmt_mfu(r, key):
  v = r.get(key)
  return "n/a" if v is None else f"{100 * v:.2f}%"


OVERRIDES = [("num_prompts", int), ("sample_batch_size", int), ("steps", int),
             ("guidance_scale", float), ("train_batch_size", int), ("grad_accum", int),
             ("timestep_fraction", float), ("inner_epochs", int), ("epochs", int),
             ("warmup_epochs", int), ("resolution", int)]


def all_rows(size: str) -> list[tuple[str, bool]]:
  """(style, full) of every row of `--rows=all` for `size`: each style it has, LoRA then full."""
  return [(style, full) for style, table in STYLE_SIZES.items() if size in table
          for full in (False, True)]


def row_label(style: str, full: bool) -> str:
  return f"{style}-{'full' if full else 'lora'}"


def row_argv(args, style: str, full: bool, json_out: str) -> list[str]:
  """The command-line flags of one row's own run: `args` as given, less --rows / --json_out,
  with the row's --style and --full."""
  argv = [f"--size={args.size}", f"--style={style}", f"--only={args.only}",
          f"--trl_precision={args.trl_precision}", f"--threads={args.threads}",
          f"--seed={args.seed}", f"--json_out={json_out}"]
  argv += [f"--{k}={getattr(args, k)}" for k, _ in OVERRIDES if getattr(args, k) is not None]
  argv += [f"--{k}={getattr(args, k)}" for k in ("attention", "cache_dir")
           if getattr(args, k) is not None]
  argv += [f"--{k}" for k in ("no_flops", "skip_train_and_evaluate", "verbose") if getattr(args, k)]
  return argv + (["--full"] if full else [])


def row_ratio(results: dict | None):
  """ddpo_jax samples/s / TRL samples/s of one row's results, or None."""
  if not results or "trl" not in results or "ddpo_jax" not in results:
    return None
  return results["ddpo_jax"]["samples_per_s"] / results["trl"]["samples_per_s"]


def summary_table(rows: list[dict]) -> list[str]:
  """Markdown table lines, one row per {"label", "results" (or None), "error"}: s/epoch per side,
  the ratio, and each side's sampling / reward / update seconds per epoch (median epochs; TRL:
  its own methods timed within its epochs, ddpo_jax: its phases synchronised within its epochs)."""
  def secs(r, key, digits=2):
    return f"{r[key]:.{digits}f}" if r and r.get(key) is not None else "n/a"

  def phases(r):
    return (f"{secs(r, 'sample_s')} / {secs(r, 'reward_s', 3)} / {secs(r, 'train_s')}"
            if r else "n/a")

  lines = ["| row | work per epoch | TRL s/epoch | ddpo_jax s/epoch | ratio | TRL sampling / "
           "reward / update s | ddpo_jax sampling / reward / update s |",
           "|---|---|---|---|---|---|---|"]
  for row in rows:
    res = row.get("results")
    if not res:
      lines.append(f"| {row['label']} | {row.get('error') or 'failed'} | | | | | |")
      continue
    s = res["settings"]
    work = (f"N={s['num_prompts']} (calls of {s['sample_batch_size']}), T={s['steps']}, "
            f"CFG {s['guidance_scale']:g}, mb {s['train_batch_size']}x{s['grad_accum']}, "
            f"K={s['K']}, {s['optimizer_steps']} AdamW steps")
    trl, jx, ratio = res.get("trl"), res.get("ddpo_jax"), row_ratio(res)
    lines.append(f"| {row['label']} | {work} | {secs(trl, 'epoch_s')} | {secs(jx, 'epoch_s')} | "
                 f"{'n/a' if ratio is None else f'{ratio:.2f}'} | {phases(trl)} | {phases(jx)} |")
  return lines


def run_all_rows(args) -> dict:
  """`--rows=all`: every row of the size in a fresh process of this script (its output
  prefixed with the row), then one summary table; the last line is the minimum ratio."""
  import subprocess
  rows = []
  scratch = tempfile.mkdtemp(prefix="vs_trl_rows_")
  log(f"[rows] size={args.size}: {', '.join(row_label(*r) for r in all_rows(args.size))}; "
      f"{machine()}, load {load_avg()}")
  for style, full in all_rows(args.size):
    label = row_label(style, full)
    out = os.path.join(scratch, f"{label}.json")
    cmd = [sys.executable, os.path.abspath(__file__)] + row_argv(args, style, full, out)
    log(f"[rows] {label}: {' '.join(cmd[1:])}")
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, bufsize=1)
    for line in proc.stdout:
      log(f"[{label}] {line.rstrip()}")
    rc = proc.wait()
    row = dict(label=label, style=style, full=full, rc=rc, wall_s=time.perf_counter() - t)
    if rc == 0 and os.path.exists(out):
      with open(out) as f:
        row["results"] = json.load(f)
    else:
      row["results"], row["error"] = None, f"failed (exit status {rc})"
    row["ratio"] = row_ratio(row["results"])
    rows.append(row)
  shutil.rmtree(scratch, ignore_errors=True)
  ratios = [r["ratio"] for r in rows if r["ratio"] is not None]
  results = {"size": args.size, "rows": rows, "min_ratio": min(ratios) if ratios else None}
  log("")
  log(f"== {args.size}, all rows ({machine()}, threads {args.threads or 'default'}, load "
      f"{load_avg()}); ratio = ddpo_jax samples/s / TRL samples/s; phases in s per epoch")
  for line in summary_table(rows):
    log(line)
  if args.json_out:
    with open(args.json_out, "w") as f:
      json.dump(results, f, indent=1, default=float)
  for r in rows:
    log(f"ratio[{r['label']}]=" + ("n/a" if r["ratio"] is None else f"{r['ratio']:.2f}"))
  log("ratio=n/a" if not ratios else f"ratio={min(ratios):.2f}")
  if any(r["rc"] for r in rows):
    raise SystemExit(1)
  return results


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="The last line printed is ratio=R: ddpo_jax samples/s / TRL samples/s over whole "
             "epochs (sampling + reward + update), warm-up excluded; with --rows=all each "
             "row's ratio[ROW]=R comes above it and R is the minimum over the rows.")
  p.add_argument("--size", choices=sorted(SIZES), default="tiny",
                 help="tiny: toy SD-architecture pipeline on CPU; sd15: SD-1.5 at 512px on a GPU")
  p.add_argument("--style", choices=sorted(STYLE_SIZES), default="sd1",
                 help="tiny pipeline layout: sd1 (conv projections, one head count, 2 levels) or "
                      "sd2 (linear projections, per-level head counts, 3 levels)")
  for k, typ in OVERRIDES:
    p.add_argument(f"--{k}", type=typ, default=None, help=f"override the size's {k}")
  p.add_argument("--full", action="store_true", help="full UNet fine-tuning instead of LoRA")
  p.add_argument("--rows", choices=("one", "all"), default="one",
                 help="one: the row of --style / --full; all: every style x {LoRA, full} of the "
                      "size (tiny: 4 rows), each in its own process, then one summary table")
  p.add_argument("--only", choices=("both", "ddpo_jax", "trl"), default="both")
  p.add_argument("--trl_precision", choices=("bf16", "fp16", "no"), default="bf16",
                 help="TRL's accelerate mixed_precision for --size=sd15 (tiny: always 'no')")
  p.add_argument("--attention", choices=("xla", "cudnn", "auto"), default=None,
                 help="ddpo_jax attention (default: auto = cuDNN where it applies, for sd15; "
                      "xla for tiny)")
  p.add_argument("--no_flops", action="store_true", help="skip the FLOP count / MFU")
  p.add_argument("--skip_train_and_evaluate", action="store_true",
                 help="skip the cross-check that times train_and_evaluate's own epochs")
  p.add_argument("--threads", type=int, default=0,
                 help="CPU threads for both sides (torch.set_num_threads; 1 also makes XLA:CPU "
                      "single-threaded); 0 = each library's default (all cores)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--cache_dir", default=None,
                 help="where the random pipeline is kept (default $DDPO_JAX_CACHE/bench or "
                      "~/.cache/ddpo_jax/bench)")
  p.add_argument("--json_out", default=None, help="also write the results as JSON here")
  p.add_argument("--verbose", action="store_true")
  return p


def main(argv=None):
  args = build_parser().parse_args(argv)
  if args.rows == "all":
    return run_all_rows(args)

  # TRL (torch) and ddpo_jax (XLA) share one process and, on a GPU, one device: TRL runs first
  # and frees its cache; XLA then allocates on demand instead of grabbing 75% up front.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  if args.size == "tiny":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  if args.threads == 1:  # read when XLA's CPU client starts: before anything touches jax
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen="
                               "false intra_op_parallelism_threads=1").strip()
  if args.threads:
    import torch
    torch.set_num_threads(args.threads)
  import warnings
  warnings.filterwarnings("ignore")

  s = resolve_settings(args)
  cache = args.cache_dir or os.path.join(
      os.environ.get("DDPO_JAX_CACHE", os.path.expanduser("~/.cache/ddpo_jax")), "bench")
  os.makedirs(cache, exist_ok=True)
  log(f"[setup] size={args.size} style={args.style}: {describe(s)}")
  log(f"[setup] {machine()}, python {platform.python_version()}, load {load_avg()}")
  pipe_dir = ensure_pipeline(args.size, s["resolution"], cache, args.style)

  results = {"size": args.size, "style": args.style, "settings": s}
  # Setup and warm-up: TRL first (on a GPU it then shares the device with XLA, which allocates
  # on demand), then ddpo_jax (XLA compilation, timed apart).
  trl = TrlSide(s, pipe_dir, args) if args.only in ("both", "trl") else None
  jx = JaxSide(s, pipe_dir, args) if args.only in ("both", "ddpo_jax") else None
  sides = [x for x in (trl, jx) if x is not None]
  for e in range(s["warmup_epochs"]):
    for side in sides:
      side.epoch(e, warmup=True)
  # Timed epochs, interleaved (alternating which side goes first) so that both see the same
  # machine: other processes on a shared CPU would otherwise skew one side only.
  for i in range(s["epochs"]):
    e = s["warmup_epochs"] + i
    for side in (sides if i % 2 == 0 else sides[::-1]):
      side.epoch(e, warmup=False)
  if trl is not None:
    results["trl"] = trl.close()
  if jx is not None:
    results["ddpo_jax"] = jx.close()

  log("")
  log(f"== {args.size} {row_label(args.style, args.full)}: {describe(s)}")
  if "trl" in results:
    r = results["trl"]
    log(f"TRL 0.23.1 DDPOTrainer (torch {r['torch']}, mixed_precision={r['precision']}): "
        f"warm-up {r['setup_s']:.1f} s setup + {r['warmup_epoch_s']:.1f} s first epoch(s); "
        f"epoch {r['epoch_s']:.2f} s = {r['samples_per_s']:.2f} samples/s")
    log(f"TRL phases: sampling {r['sample_s']:.2f} s = {r['images_per_s']:.2f} images/s; reward "
        f"{r['reward_s']:.3f} s; training {r['train_s']:.2f} s = {r['train_samples_per_s']:.2f} "
        f"samples/s" + (f"; peak GPU memory {r['peak_mem_gib']:.1f} GiB" if r.get("peak_mem_gib") else ""))
  if "ddpo_jax" in results:
    r = results["ddpo_jax"]
    log(f"ddpo_jax (jax {r['jax']}, {r['backend']} x{r['devices']}, compute {r['compute_dtype']}, "
        f"attention {r['attention']}, {r['trainable_params']:,} trainable params): warm-up "
        f"{r['setup_s']:.1f} s setup + {r['compile_s']:.1f} s XLA compile (sampling "
        f"{r['compile_sample_s']:.1f}, update {r['compile_update_s']:.1f}) + "
        f"{r['warmup_epoch_s']:.1f} s first epoch(s); epoch {r['epoch_s']:.2f} s = "
        f"{r['samples_per_s']:.2f} samples/s")
    if "tae_samples_per_s" in r:
      log(f"ddpo_jax train_and_evaluate epochs (cross-check, metrics.jsonl): {r['tae_epoch_s']:.2f} s"
          f" = {r['tae_samples_per_s']:.2f} samples/s")
    log(f"ddpo_jax phases (synchronised within the timed epochs): sampling {r['sample_s']:.2f} s "
        f"= {r['images_per_s']:.2f} images/s; reward (the wait after sampling) "
        f"{r['reward_s']:.3f} s; training {r['train_s']:.2f} s = "
        f"{r['train_samples_per_s']:.2f} samples/s; rest (finiteness check) {r['rest_s']:.3f} s")
    if "flops_sample" in r:
      log(f"ddpo_jax model FLOPs per epoch (XLA cost analysis): sampling "
          f"{r['flops_sample'] / 1e9:.2f} GFLOP, training {r['flops_train'] / 1e9:.2f} GFLOP; "
          f"{r['peak_desc']}")
      log(f"ddpo_jax MFU: sampling {_fmt_mfu(r, 'mfu_sample')}, training "
          f"{_fmt_mfu(r, 'mfu_train')}, whole epoch {_fmt_mfu(r, 'mfu_epoch')}")
    if r.get("peak_mem_gib"):
      log(f"ddpo_jax peak device memory {r['peak_mem_gib']:.1f} GiB")
  for line in summary_table([dict(label=row_label(args.style, args.full), results=results)]):
    log(line)
  if args.json_out:
    with open(args.json_out, "w") as f:
      json.dump(results, f, indent=1, default=float)
  ratio = row_ratio(results)
  log("ratio=n/a" if ratio is None else f"ratio={ratio:.2f}")
  return results


if __name__ == "__main__":
  main()
