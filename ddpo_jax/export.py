r"""Exports a fine-tuned Stable Diffusion run: a LoRA run as a diffusers LoRA file, a full
fine-tune (or a LoRA run with --merged) as a diffusers pipeline directory.

  python -m ddpo_jax.export --workdir=DIR --out=OUT_DIR [--step=N] [--merged] [--overwrite]

Reads the run's config and the trained params of checkpoint `--step` (default: the latest; 0 is
the pre-trained model, or a LoRA run's initial adapter).

A LoRA run (`model.lora.enabled`) writes, by default, only its factors
(`models.lora_io.save_lora`): OUT_DIR/pytorch_lora_weights.safetensors in the diffusers / PEFT
format (`unet.*` keys for SD 1.x / 2.x / SDXL, `transformer.*` for SD3 / FLUX.1; the scale
alpha / rank folded into lora_B), which `pipe.load_lora_weights(OUT_DIR)` loads into the
diffusers pipeline of the run's base model (`model.pretrained_path`) and `model.lora.init_path`
reads back, and OUT_DIR/ddpo_jax_lora.json (base model, family, rank, alpha, targets, step).

With --merged, and always for a full fine-tune, it assembles the denoiser
(`Policy.assemble_denoiser`, then `models.adapters.merged`: a LoRA run's factors are merged into
the base kernels) and writes the whole pipeline (denoiser, VAE, text encoders, tokenizers,
scheduler) with `save_pipeline`: float32 safetensors in the diffusers layout, loadable by the
diffusers pipeline class's `from_pretrained(OUT_DIR)`.

Either way OUT_DIR is written atomically (a temporary directory renamed at the end), with
`ddpo_jax_pipeline.json` listing every file written (size and SHA-256). It must be new or
empty, or an export written before; never the run's WORKDIR, a directory inside it or one
holding it. --overwrite replaces an earlier export only while it holds nothing but the files its
`ddpo_jax_pipeline.json` lists, unchanged: a file or directory added to it, an exported file
edited since, or an export from before exports listed their files is refused (naming them),
and nothing is replaced.
"""
from __future__ import annotations

import dataclasses
import os

from absl import app, flags
import jax
import numpy as np

from ddpo_jax.algorithms import train
from ddpo_jax.models import adapters, lora_io
from ddpo_jax.models.pipeline import save_pipeline
from ddpo_jax.models.pipeline_io import check_output_dir
from ddpo_jax.trainer.runs import restore_run


def export_pipeline(workdir: str, out: str, step: int | None = None,
                    overwrite: bool = False, merged: bool = False) -> str:
  """Writes checkpoint `step` (default latest) of the SD run in `workdir` to `out` in diffusers
  format (see the module docstring): a LoRA run's factors as a LoRA file unless `merged`, else
  the whole pipeline. Returns `out`.

  Raises:
    ValueError: the run is not a Stable Diffusion run (`config.model.kind != "sd"`), or `out`
      is the WORKDIR, inside it or above it.
    FileExistsError: `out` holds something that is not replaced
      (`models.pipeline_io.check_output_dir`): a pipeline exported before needs `overwrite`,
      and is replaced only while it holds just the files it was exported with, unchanged.
  """
  run, target = os.path.realpath(workdir), os.path.realpath(out)
  if os.path.commonpath([run, target]) in (run, target):
    raise ValueError(f"--out={out} is the run's WORKDIR {workdir}, inside it or above it: "
                     "exporting there would replace the run's checkpoints; choose another directory")
  check_output_dir(target, overwrite)  # before the (long) restore, not only when writing
  config, policy, trainable, restored_step = restore_run(workdir, step)
  if config.model.kind != "sd" or policy.pipeline is None:
    raise ValueError(f"{workdir}: model.kind={config.model.kind!r}; only Stable Diffusion runs "
                     "(model.kind='sd') export to a diffusers pipeline")
  frozen = train.frozen_params(policy, config)
  lora = config.model.get("lora")
  if lora is not None and lora.enabled and not merged:
    adapted = policy.assemble_denoiser(trainable, frozen)
    if not isinstance(adapted, adapters.LoraAdapted):
      raise ValueError(f"{workdir}: this LoRA run's denoiser is not a plain LoRA adapter "
                       f"({type(adapted).__name__}); export it merged (--merged)")
    factors = jax.tree.map(lambda x: np.asarray(x, np.float32), adapted.factors)
    return lora_io.save_lora(
        out, factors, adapted.base, rank=int(lora.rank), alpha=float(lora.alpha),
        targets=tuple(lora.targets), base_model=str(config.model.pretrained_path),
        extra_info={"step": int(restored_step), "workdir": run}, overwrite=overwrite)
  unet = jax.jit(lambda t, f: adapters.merged(policy.assemble_denoiser(t, f)))(trainable, frozen)
  unet = jax.tree.map(lambda x: np.asarray(x, np.float32), unet)
  pipe = policy.pipeline
  out_pipe = dataclasses.replace(pipe, params={**pipe.params, pipe.denoiser: unet})  # frozen: as loaded
  return save_pipeline(out_pipe, out, overwrite=overwrite)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  path = export_pipeline(f.workdir, f.out, f.step, overwrite=f.overwrite, merged=f.merged)
  what = ("a diffusers LoRA (pipe.load_lora_weights)"
          if os.path.isfile(os.path.join(path, lora_io.LORA_WEIGHT_NAME)) else "a diffusers pipeline")
  print(f"wrote {what} to {path}")


def _define_flags():
  # Defined only when run as a program: importing this module next to ddpo_jax.trainer.sample (which
  # defines flags of the same names) must not raise DuplicateFlagError.
  flags.DEFINE_string("workdir", None, "Run directory written by ddpo_jax.main.", required=True)
  flags.DEFINE_string("out", None, "Output directory: a LoRA run's diffusers LoRA file, or "
                      "(--merged, a full fine-tune) a diffusers pipeline.", required=True)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest; 0 = pre-trained).")
  flags.DEFINE_bool("overwrite", False, "Replace --out if it holds a pipeline exported before "
                    "and nothing else (no file added or edited since).")
  flags.DEFINE_bool("merged", False, "A LoRA run: merge the factors into the base model and "
                    "write the whole pipeline (a full fine-tune always writes the pipeline).")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
