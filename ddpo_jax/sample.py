r"""Samples from a checkpoint: `python -m ddpo_jax.sample --workdir=DIR --num=K --out=FILE.npz`.

Loads the run's config from its checkpoint, the params of `--step` (default: the latest; step 0
is the pre-trained model before fine-tuning) and writes `images` (uint8, NHWC) and `prompts` to
the npz (and PNGs to --png_dir if given). Deterministic for a given --seed.
"""
import os

from absl import app, flags
import jax
import numpy as np

from ddpo_jax import parallel, train
from ddpo_jax.ctrl.controls import format_context, parse_context, parse_label_spec
from ddpo_jax.rewards import to_uint8
from ddpo_jax.runs import restore_run


def sample_from_checkpoint(workdir: str, num: int, step=None, prompts=None, seed: int = 0,
                           batch_size: int = 64, labels=None):
  """Returns (images uint8 (num,H,W,C), prompts list[str], step) from a run's checkpoint `step`
  (default: the latest; 0 = the pre-trained model). See `sample_images` for the arguments."""
  config, policy, params, step = restore_run(workdir, step)
  images, prompts = sample_images(config, policy, params, num, prompts, seed, batch_size, labels)
  return images, prompts, step


def sample_images(config, policy, params, num: int, prompts=None, seed: int = 0,
                  batch_size: int = 64, labels=None):
  """Returns (images uint8 (num,H,W,C), prompts list[str]) sampled from `params` (the
  trainable params of `policy`, e.g. from `runs.restore_run`) with the run's `config`.

  `prompts` are cycled over the samples (default: drawn by the task, seeded by `seed`). For
  CTRL runs the returned prompts are contexts "PROMPT||y=LABELS"
  (`ddpo_jax.ctrl.controls.parse_context` splits them); `labels` (label specs like "3" or "3:2")
  are cycled over the samples, otherwise labels are drawn uniformly. `batch_size`: images per
  compiled call, rounded to a multiple of the device count.
  """
  config = config.copy_and_resolve_references()
  config.train.kl_coef = 0.0  # only images are wanted: no KL to the pre-trained model
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


def _define_flags():
  """The CLI's flags (defined only when run as a program, so importing this module from
  another absl program does not clash with its flags)."""
  global _WORKDIR, _STEP, _NUM, _OUT, _PROMPTS, _SEED, _BATCH, _PNG_DIR, _LABELS
  _WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by ddpo_jax.main.", required=True)
  _STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest; 0 = pre-trained).")
  _NUM = flags.DEFINE_integer("num", 16, "Number of images.")
  _OUT = flags.DEFINE_string("out", "samples.npz", "Output .npz path.")
  _PROMPTS = flags.DEFINE_list("prompts", None, "Prompts, cycled over --num (default: drawn by the task).")
  _SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
  _BATCH = flags.DEFINE_integer("batch_size", 64, "Images per compiled sampling call.")
  _PNG_DIR = flags.DEFINE_string("png_dir", None, "Also write one PNG per image here.")
  _LABELS = flags.DEFINE_list(
      "labels", None, "CTRL runs: control labels cycled over --num, one per control joined by ':' "
      "(e.g. 3 or 3:2; 'null' for a control's null label). Default: drawn uniformly.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  images, prompts, step = sample_from_checkpoint(_WORKDIR.value, _NUM.value, _STEP.value,
                                                 _PROMPTS.value, _SEED.value, _BATCH.value,
                                                 _LABELS.value)
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  extra = {}
  if prompts and "||y=" in prompts[0]:  # a CTRL run: split contexts into prompts and labels
    pairs = [parse_context(p) for p in prompts]
    prompts = [p for p, _ in pairs]
    extra["labels"] = np.asarray([l for _, l in pairs], np.int32)
  np.savez(_OUT.value, images=images, prompts=np.asarray(prompts), step=step, **extra)
  if _PNG_DIR.value:
    from PIL import Image
    os.makedirs(_PNG_DIR.value, exist_ok=True)
    for i, img in enumerate(images):
      Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(
          os.path.join(_PNG_DIR.value, f"{i:05d}.png"))
  print(f"wrote {len(images)} images from step {step} to {_OUT.value}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
