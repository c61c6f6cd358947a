r"""Samples images from a training run's checkpoint or from a diffusers-format pipeline.

  python -m ddpo_jax.sample --workdir=DIR [--step=S] --num=K --out=FILE.npz
  python -m ddpo_jax.sample --pipeline=DIR_OR_HUB_ID --prompts="a cat,a dog" --num=K \
      [--steps=N] [--guidance=W] [--resolution=PX] --out=FILE.npz
  python -m ddpo_jax.sample ... --prompts_file=PROMPTS.txt --grid=GRID.png --png_dir=DIR

Prompts: `--prompts` splits on commas ("a cat,a dog" is two prompts); `--prompts_file` reads one
prompt per line (blank lines skipped), for prompts that contain commas. Either is cycled over
--num.

`--workdir`: loads the run's config from its checkpoint, the params of `--step` (default: the
latest; step 0 is the pre-trained model before fine-tuning) and samples with the run's own
sampler. `--pipeline`: any family `models.load_pipeline` reads (SD 1.x/2.x, SDXL, SD3/3.5,
FLUX.1) sampled with its standard sampler (`pipeline_sampler`): deterministic DDIM for the UNet
families, the Euler flow ODE for SD3 / FLUX (FLUX.1-dev with its embedded guidance), with the
diffusers pipelines' default steps, guidance and resolution unless given.

Writes `images` (uint8, NHWC) and `prompts` to the npz; with --png_dir also one PNG per image,
named by its index and prompt (`0003_a-photo-of-a-cat.png`: `png_name`), and with --grid one PNG
of all of them in a grid (row-major, as sampled). Deterministic for a given --seed.
"""
import dataclasses
import os
import re

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from ddpo_jax.algorithms import train
from ddpo_jax.ctrl.controls import format_context, parse_context, parse_label_spec
from ddpo_jax.models import adapters, load_pipeline
from ddpo_jax.numerics import diffusion, flow, parallel
from ddpo_jax.pipelines import sd
from ddpo_jax.rewards import to_uint8
from ddpo_jax.trainer.loop import image_grid
from ddpo_jax.trainer.runs import restore_run


def sample_from_checkpoint(workdir: str, num: int, step=None, prompts=None, seed: int = 0,
                           batch_size: int = 64, labels=None, num_steps: int | None = None,
                           guidance_scale: float | None = None, merge_lora: bool = False):
  """Returns (images uint8 (num,H,W,C), prompts list[str], step) from a run's checkpoint `step`
  (default: the latest; 0 = the pre-trained model). See `sample_images` for the arguments."""
  config, policy, params, step = restore_run(workdir, step)
  images, prompts = sample_images(config, policy, params, num, prompts, seed, batch_size, labels,
                                  num_steps=num_steps, guidance_scale=guidance_scale,
                                  merge_lora=merge_lora)
  return images, prompts, step


def sample_images(config, policy, params, num: int, prompts=None, seed: int = 0,
                  batch_size: int = 64, labels=None, num_steps: int | None = None,
                  guidance_scale: float | None = None, merge_lora: bool = False):
  """Returns (images uint8 (num,H,W,C), prompts list[str]) sampled from `params` (the
  trainable params of `policy`, e.g. from `runs.restore_run`) with the run's `config` (its
  sampler; a flow model's with the deterministic flow ODE, the training SDE's noise-free
  limit, as flow_grpo evaluates).

  `prompts` are cycled over the samples (default: drawn by the task, seeded by `seed`). For
  CTRL runs the returned prompts are contexts "PROMPT||y=LABELS"
  (`ddpo_jax.ctrl.controls.parse_context` splits them); `labels` (label specs like "3" or "3:2")
  are cycled over the samples, otherwise labels are drawn uniformly. `batch_size`: images per
  compiled call, rounded to a multiple of the device count. `num_steps` / `guidance_scale`:
  other sampling steps / guidance than the run's (e.g. flow_grpo trains 10 steps and
  evaluates 40). `merge_lora`: sample a LoRA run with its factors merged into the kernels
  (`models.adapters.merged`, once per compiled call) instead of beside them, as trained: one
  matmul per adapted layer instead of three; with bfloat16 weights the merged kernels are
  rounded to bfloat16 (docs/models.md gives the measured image difference).
  """
  config = config.copy_and_resolve_references()
  if num_steps is not None:
    config.sample.num_steps = int(num_steps)
  if guidance_scale is not None:
    config.sample.guidance_scale = float(guidance_scale)
  config.train.kl_coef = 0.0  # only images are wanted: no KL to the pre-trained model
  if merge_lora:
    if not config.model.get("lora") or not config.model.lora.enabled:
      raise ValueError("merge_lora: the run trains no LoRA (model.lora.enabled is False)")
    adapted = policy.assemble_denoiser
    policy = dataclasses.replace(policy, assemble_denoiser=lambda trainable, frozen: (
        adapters.merged(adapted(trainable, frozen))))
  if policy.denoiser.prediction == "velocity":  # evaluated on the ODE, as flow_grpo's
    config.sample.sampler = "ode"
    config.sample.sde_window_size = 0
    config.sample.same_noise_per_group = False
  label_tuples = None
  if labels:
    if policy.ctrl is None:
      raise ValueError("--labels: the run is not a CTRL run (it has no controls)")
    label_tuples = [parse_label_spec(l, policy.ctrl.controls) for l in labels]
  mesh = parallel.make_mesh()
  frozen = train.frozen_params(policy, config)
  n_dev = len(jax.devices())
  bs = max(n_dev, min(batch_size, num) // n_dev * n_dev)  # a multiple of the device count
  sample_fn = train.make_sample_fn(policy, config, [], mesh)
  data = parallel.data_sharding(mesh)
  out_images, out_prompts = [], []
  rng = np.random.default_rng(seed)
  for b in range(-(-num // bs)):
    if prompts:
      batch_prompts = [prompts[(b * bs + i) % len(prompts)] for i in range(bs)]
    else:
      batch_prompts = policy.prompt_fn(rng, bs)
    if policy.ctrl is not None:  # CTRL: contexts "PROMPT||y=LABELS"
      batch_prompts = _ctrl_contexts(batch_prompts, label_tuples, b * bs, policy, rng)
    meta_b = policy.prompt_metadata(batch_prompts)
    ids = jax.device_put(policy.tokenize(batch_prompts), data)
    meta_dev = jax.device_put({k: np.asarray(v) for k, v in meta_b.items()}, data)
    _, images, _ = sample_fn(params, frozen, jax.random.fold_in(jax.random.PRNGKey(seed), b),
                             ids, meta_dev)
    out_images.append(to_uint8(jax.device_get(images)))
    out_prompts += batch_prompts
  return np.concatenate(out_images)[:num], out_prompts[:num]


def pipeline_sampler(pipe, *, num_steps: int, guidance_scale: float, resolution: int):
  """The family's standard text-to-image sampler, as one pure function to compile.

  * an "eps" denoiser (`sd.make_denoiser`; SD 1.x/2.x, SDXL): deterministic DDIM
    (`diffusion.ddim_sample`) on the pipeline's noise schedule (diffusers' `DDIMScheduler.from_config` of its scheduler
    config, eta 0), classifier-free guidance with `pipe.uncond`.
  * a "velocity" denoiser (SD3 / 3.5, FLUX.1): Euler steps of the flow ODE
    (`flow.sample_ode`) on `pipe.sigmas`.
  * `guidance_scale` as `pipe.guidance_kind` says: "cfg" classifier-free guidance with
    `pipe.uncond` (SD, SDXL, SD3), "embedded" the transformer's guidance input (FLUX.1-dev),
    "none" ignored (FLUX.1-schnell), as the diffusers pipelines do by default.

  Returns:
    (sample, latent_shape): sample(params, ids (B, L...) int32 from `pipe.tokenize`,
    x_init (B, h, w, C) float32 noise) -> (latents (B, h, w, C) float32, images (B, H, W, 3)
    float32 in [0, 1]); latent_shape (h, w, C) of `resolution`.

  Raises:
    ValueError: a resolution the model cannot take, num_steps < 1, an unsupported schedule or
      prediction type (each naming the value), before anything is traced.
  """
  if num_steps < 1:
    raise ValueError(f"num_steps={num_steps} must be >= 1")
  h, w, c = pipe.latent_shape(int(resolution))
  if pipe.guidance_kind not in ("cfg", "embedded", "none"):
    raise ValueError(f"guidance_kind={pipe.guidance_kind!r}: no standard sampler")
  cfg = float(guidance_scale) if pipe.guidance_kind == "cfg" else 1.0
  guidance = float(guidance_scale) if pipe.guidance_kind == "embedded" else None
  denoiser = sd.make_denoiser(pipe, (h, w, c), guidance)
  if denoiser.prediction == "eps":
    schedule = diffusion.NoiseSchedule.from_config(denoiser.scheduler_config)
    ts, prev_ts = schedule.ddim_timesteps(num_steps)

    def chain(params, x, cond, uncond):
      return diffusion.ddim_sample(
          denoiser, params[pipe.denoiser], x, cond, uncond,
          alphas_cumprod=schedule.alphas_cumprod, timesteps=ts, prev_timesteps=prev_ts,
          guidance_scale=cfg, final_alpha_cumprod=schedule.final_alpha_cumprod)
  else:
    def chain(params, x, cond, uncond):
      return flow.sample_ode(denoiser, params[pipe.denoiser], x, cond, uncond,
                             sigmas=denoiser.flow_sigmas(num_steps), guidance_scale=cfg)

  def sample(params, ids, x_init):
    cond = pipe.encode(params, ids)
    uncond = None if cfg == 1.0 else pipe.uncond(params)
    latents = chain(params, x_init, cond, uncond)
    images = jnp.clip(pipe.vae_decode(params["vae"], latents) / 2.0 + 0.5, 0.0, 1.0)
    return latents, images

  return sample, (h, w, c)


def sample_pipeline(pipe, prompts, num: int | None = None, *, num_steps: int | None = None,
                    guidance_scale: float | None = None, resolution: int | None = None,
                    seed: int = 0, batch_size: int = 8, latents=None):
  """Samples `num` images (default: one per prompt) from a loaded pipeline (`pipeline_sampler`).

  Args:
    pipe: a `models.Pipeline` or `models.FlowPipeline` (`models.load_pipeline`).
    prompts: list of str, cycled over the samples.
    num_steps / guidance_scale / resolution: default `pipe.default_sampling` and
      `pipe.default_resolution` (the diffusers pipelines' defaults).
    seed: the initial noise of batch b is N(0, I) from fold_in(PRNGKey(seed), b).
    batch_size: images per compiled call, rounded to a multiple of the device count (the
      batch is split over all devices, `parallel.data_sharding`).
    latents: optional (num, h, w, C) initial noise instead of the seeded draws (NHWC; e.g. to
      reproduce another implementation's samples).

  Returns:
    (images uint8 (num, H, W, 3), latents float32 (num, h, w, C), prompts list[str]).
  """
  prompts = [prompts] if isinstance(prompts, str) else list(prompts)
  if not prompts:
    raise ValueError("sample_pipeline: no prompts")
  num = len(prompts) if num is None else int(num)
  steps, guidance = pipe.default_sampling
  sample, shape = pipeline_sampler(
      pipe, num_steps=steps if num_steps is None else num_steps,
      guidance_scale=guidance if guidance_scale is None else guidance_scale,
      resolution=pipe.default_resolution if resolution is None else resolution)
  if latents is not None and tuple(np.shape(latents)) != (num,) + shape:
    raise ValueError(f"latents of shape {tuple(np.shape(latents))}; expected {(num,) + shape}")
  mesh = parallel.make_mesh()
  data, rep = parallel.data_sharding(mesh), parallel.replicated(mesh)
  n_dev = len(jax.devices())
  bs = max(n_dev, -(-min(batch_size, num) // n_dev) * n_dev)
  params = jax.device_put(pipe.params, rep)
  fn = jax.jit(sample, in_shardings=(rep, data, data), out_shardings=(data, data))
  out_images, out_latents, out_prompts = [], [], []
  for b in range(-(-num // bs)):
    batch_prompts = [prompts[(b * bs + i) % len(prompts)] for i in range(bs)]
    if latents is None:
      x = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(seed), b), (bs,) + shape)
    else:
      x = np.zeros((bs,) + shape, np.float32)
      part = np.asarray(latents[b * bs:(b + 1) * bs], np.float32)
      x[:len(part)] = part
    lat, images = fn(params, pipe.tokenize(batch_prompts), x)
    out_images.append(to_uint8(jax.device_get(images)))
    out_latents.append(np.asarray(jax.device_get(lat)))
    out_prompts += batch_prompts
  return (np.concatenate(out_images)[:num], np.concatenate(out_latents)[:num],
          out_prompts[:num])


def _ctrl_contexts(prompts, label_tuples, offset, policy, rng):
  """CTRL contexts for `prompts` (bare prompts or contexts): the given labels cycled from
  `offset`, or (without labels) the context's own labels / uniformly drawn ones."""
  out = []
  for i, p in enumerate(prompts):
    prompt, own = parse_context(p) if "||y=" in p else (p, None)
    if label_tuples:
      labels = label_tuples[(offset + i) % len(label_tuples)]
    elif own is not None:
      labels = own
    else:
      labels = [int(rng.integers(0, c.num_classes)) for c in policy.ctrl.controls]
    out.append(format_context(prompt, labels))
  return out


def read_prompts_file(path: str) -> list[str]:
  """The prompts of a text file, one per line (surrounding whitespace and blank lines dropped).

  Raises:
    ValueError: the file has no prompt.
  """
  with open(path, encoding="utf-8") as f:
    prompts = [line.strip() for line in f if line.strip()]
  if not prompts:
    raise ValueError(f"{path}: no prompts (one per line)")
  return prompts


def slug(prompt: str, max_len: int = 60) -> str:
  """`prompt` as a file-name part: lower case, each run of characters other than letters and
  digits one '-', at most `max_len` characters, cut at a word boundary where there is one
  ("A photo of a cat, sleeping!" -> "a-photo-of-a-cat-sleeping"); "prompt" if nothing is left."""
  s = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
  if len(s) > max_len:
    cut = s[:max_len + 1].rfind("-")
    s = s[:cut if cut > max_len // 2 else max_len].strip("-")
  return s or "prompt"


def png_name(index: int, prompt: str, num: int) -> str:
  """The --png_dir file of image `index` of `num`: "0003_a-photo-of-a-cat.png" (the index
  zero-padded to at least 4 digits, so the names sort in sampling order)."""
  return f"{index:0{max(4, len(str(num - 1)))}d}_{slug(prompt)}.png"


def write_pngs(images: np.ndarray, prompts, png_dir: str | None = None,
               grid: str | None = None) -> None:
  """(N,H,W,C) uint8 `images` to one PNG each in `png_dir` (`png_name`) and / or all of them to
  one grid PNG `grid` (`loop.image_grid`: ceil(sqrt(N)) columns, row-major)."""
  from PIL import Image

  def save(img, path):
    Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(path)

  if png_dir:
    os.makedirs(png_dir, exist_ok=True)
    for i, (img, prompt) in enumerate(zip(images, prompts)):
      save(img, os.path.join(png_dir, png_name(i, str(prompt), len(images))))
  if grid:
    os.makedirs(os.path.dirname(os.path.abspath(grid)), exist_ok=True)
    save(image_grid(np.asarray(images)), grid)


def _define_flags():
  """The CLI's flags (defined only when run as a program, so importing this module from
  another absl program does not clash with its flags)."""
  global _WORKDIR, _STEP, _NUM, _OUT, _PROMPTS, _PROMPTS_FILE, _SEED, _BATCH, _PNG_DIR, _GRID
  global _LABELS
  global _PIPELINE, _STEPS, _GUIDANCE, _RESOLUTION, _DTYPE, _MERGE_LORA
  _WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by ddpo_jax.main "
                                 "(or give --pipeline).")
  _PIPELINE = flags.DEFINE_string(
      "pipeline", None, "A diffusers-format pipeline directory or Hub id (SD, SDXL, SD3, FLUX.1), "
      "sampled with its standard sampler (instead of --workdir).")
  _STEPS = flags.DEFINE_integer("steps", None, "Sampling steps (default: --workdir the run's, "
                                "--pipeline the diffusers pipeline's, e.g. 50 for SD, 28 for "
                                "SD3 / FLUX).")
  _GUIDANCE = flags.DEFINE_float("guidance", None, "Guidance scale (default: --workdir the "
                                 "run's, --pipeline the diffusers pipeline's; FLUX.1-dev: the "
                                 "embedded guidance).")
  _RESOLUTION = flags.DEFINE_integer("resolution", None, "--pipeline: image side in pixels "
                                     "(default: the model's).")
  _DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"],
                             "--pipeline: parameter dtype.")
  _STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest; 0 = pre-trained).")
  _NUM = flags.DEFINE_integer("num", 16, "Number of images.")
  _OUT = flags.DEFINE_string("out", "samples.npz", "Output .npz path.")
  _PROMPTS = flags.DEFINE_list("prompts", None, "Comma-separated prompts, cycled over --num "
                               "(default: drawn by the task; prompts with commas: --prompts_file).")
  _PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "A text file of prompts, one per line "
                                      "(instead of --prompts), cycled over --num.")
  _SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
  _BATCH = flags.DEFINE_integer("batch_size", None, "Images per compiled sampling call "
                                "(default: 64 with --workdir, 8 with --pipeline).")
  _PNG_DIR = flags.DEFINE_string("png_dir", None, "Also write one PNG per image here, named by "
                                 "index and prompt (0003_a-photo-of-a-cat.png).")
  _GRID = flags.DEFINE_string("grid", None, "Also write all images as one grid PNG to this file.")
  _MERGE_LORA = flags.DEFINE_bool("merge_lora", False, "--workdir LoRA runs: sample with the "
                                  "factors merged into the kernels (faster; with bfloat16 "
                                  "weights not exactly the trained model: docs/models.md).")
  _LABELS = flags.DEFINE_list(
      "labels", None, "CTRL runs: control labels cycled over --num, one per control joined by ':' "
      "(e.g. 3 or 3:2; 'null' for a control's null label). Default: drawn uniformly.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if (_WORKDIR.value is None) == (_PIPELINE.value is None):
    raise app.UsageError("give exactly one of --workdir (a training run) and --pipeline")
  if _PROMPTS.value and _PROMPTS_FILE.value:
    raise app.UsageError("give at most one of --prompts and --prompts_file")
  given = read_prompts_file(_PROMPTS_FILE.value) if _PROMPTS_FILE.value else _PROMPTS.value
  extra = {}
  if _PIPELINE.value is not None:
    if _STEP.value is not None or _LABELS.value:
      raise app.UsageError("--step and --labels belong to --workdir runs")
    if not given:
      raise app.UsageError("--pipeline needs --prompts or --prompts_file")
    pipe = load_pipeline(_PIPELINE.value, dtype=jnp.dtype(_DTYPE.value))
    images, _, prompts = sample_pipeline(
        pipe, given, _NUM.value, num_steps=_STEPS.value,
        guidance_scale=_GUIDANCE.value, resolution=_RESOLUTION.value, seed=_SEED.value,
        batch_size=_BATCH.value or 8)
    source = _PIPELINE.value
    extra["pipeline"] = source
  else:
    if _RESOLUTION.value is not None:
      raise app.UsageError("--resolution belongs to --pipeline (a run samples at its config's)")
    images, prompts, step = sample_from_checkpoint(_WORKDIR.value, _NUM.value, _STEP.value,
                                                   given, _SEED.value,
                                                   _BATCH.value or 64, _LABELS.value,
                                                   num_steps=_STEPS.value,
                                                   guidance_scale=_GUIDANCE.value,
                                                   merge_lora=_MERGE_LORA.value)
    source = f"step {step}"
    extra["step"] = step
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  if prompts and "||y=" in prompts[0]:  # a CTRL run: split contexts into prompts and labels
    pairs = [parse_context(p) for p in prompts]
    prompts = [p for p, _ in pairs]
    extra["labels"] = np.asarray([l for _, l in pairs], np.int32)
  np.savez(_OUT.value, images=images, prompts=np.asarray(prompts), **extra)
  write_pngs(images, prompts, _PNG_DIR.value, _GRID.value)
  print(f"wrote {len(images)} images from {source} to {_OUT.value}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
