r"""Exports a fine-tuned Stable Diffusion run as a diffusers pipeline directory.

  python -m ddpo_jax.export --workdir=DIR --out=OUT_DIR [--step=N]

Reads the run's config and the trained params of checkpoint `--step` (default: the latest; 0 is
the pre-trained model), assembles the UNet (`Policy.assemble_denoiser`, then
`models.adapters.merged`: a LoRA run's factors are merged into the base kernels) and writes the
whole pipeline (UNet, VAE, text encoder, tokenizer, scheduler) with `save_pipeline`: float32 safetensors in the diffusers layout, loadable by
`diffusers.StableDiffusionPipeline.from_pretrained(OUT_DIR)`. OUT_DIR is written atomically (a
temporary directory renamed at the end), with `ddpo_jax_pipeline.json` listing every file written
(size and SHA-256). It must be new or empty, or a pipeline exported before; never the run's
WORKDIR, a directory inside it or one holding it. --overwrite replaces an earlier export only
while it holds nothing but the files its `ddpo_jax_pipeline.json` lists, unchanged: a file or
directory added to it, an exported file edited since, or an export from before exports listed
their files is refused (naming them), and nothing is replaced.
"""
from __future__ import annotations

import dataclasses
import os

from absl import app, flags
import jax
import numpy as np

from ddpo_jax.algorithms import train
from ddpo_jax.models import adapters
from ddpo_jax.models.pipeline import save_pipeline
from ddpo_jax.models.pipeline_io import check_output_dir
from ddpo_jax.trainer.runs import restore_run


def export_pipeline(workdir: str, out: str, step: int | None = None,
                    overwrite: bool = False) -> str:
  """Writes checkpoint `step` (default latest) of the SD run in `workdir` to `out` in diffusers
  format (see the module docstring). Returns `out`.

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
  config, policy, trainable, _ = restore_run(workdir, step)
  if config.model.kind != "sd" or policy.pipeline is None:
    raise ValueError(f"{workdir}: model.kind={config.model.kind!r}; only Stable Diffusion runs "
                     "(model.kind='sd') export to a diffusers pipeline")
  frozen = train.frozen_params(policy, config)
  unet = jax.jit(lambda t, f: adapters.merged(policy.assemble_denoiser(t, f)))(trainable, frozen)
  unet = jax.tree.map(lambda x: np.asarray(x, np.float32), unet)
  pipe = policy.pipeline
  out_pipe = dataclasses.replace(pipe, params={**pipe.params, pipe.denoiser: unet})  # frozen: as loaded
  return save_pipeline(out_pipe, out, overwrite=overwrite)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  path = export_pipeline(f.workdir, f.out, f.step, overwrite=f.overwrite)
  print(f"wrote a diffusers pipeline to {path}")


def _define_flags():
  # Defined only when run as a program: importing this module next to ddpo_jax.trainer.sample (which
  # defines flags of the same names) must not raise DuplicateFlagError.
  flags.DEFINE_string("workdir", None, "Run directory written by ddpo_jax.main.", required=True)
  flags.DEFINE_string("out", None, "Output diffusers pipeline directory.", required=True)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest; 0 = pre-trained).")
  flags.DEFINE_bool("overwrite", False, "Replace --out if it holds a pipeline exported before "
                    "and nothing else (no file added or edited since).")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
