r"""Exports a fine-tuned Stable Diffusion run as a diffusers pipeline directory.

  python -m ddpo_jax.export --workdir=DIR --out=OUT_DIR [--step=N]

Reads the run's config and the trained params of checkpoint `--step` (default: the latest; 0 is
the pre-trained model), assembles the UNet (`Policy.assemble_unet`: a LoRA run's factors are
merged into the base kernels) and writes the whole pipeline (UNet, VAE, text encoder, tokenizer,
scheduler) with `save_pipeline`: float32 safetensors in the diffusers layout, loadable by
`diffusers.StableDiffusionPipeline.from_pretrained(OUT_DIR)`. OUT_DIR is written atomically (a
temporary directory renamed at the end) and replaced if it exists.
"""
from __future__ import annotations

import dataclasses
import json
import os

from absl import app, flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np


def restore_run(workdir: str, step: int | None = None):
  """(config, policy, trainable params, step) of a run's checkpoint `step` (default latest).

  Raises:
    FileNotFoundError: no (complete) checkpoint in WORKDIR/checkpoints.
    ValueError: `step` is not one of the saved steps.
  """
  import orbax.checkpoint as ocp

  from ddpo_jax import checkpoints, train
  from ddpo_jax.policy import build_policy

  if not os.path.isdir(checkpoints.checkpoint_dir(workdir)):
    raise FileNotFoundError(f"no checkpoints in {checkpoints.checkpoint_dir(workdir)}")
  mngr = checkpoints.manager(workdir, read_only=True)
  try:
    steps = mngr.all_steps()
    if not steps:
      raise FileNotFoundError(f"{checkpoints.checkpoint_dir(workdir)} holds no complete checkpoint")
    step = max(steps) if step is None else int(step)
    if step not in steps:
      raise ValueError(f"no checkpoint step {step} in {workdir}; available: {sorted(steps)}")
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    config = ml_collections.ConfigDict(json.loads(meta["config"]))
    policy = build_policy(config, workdir)
    optimizer = train.make_optimizer(config.train)
    template = train.TrainState(step=jnp.zeros((), jnp.int32), params=policy.params["unet"],
                                opt_state=optimizer.init(policy.params["unet"]),
                                rng=jax.random.PRNGKey(0))
    state, _ = checkpoints.restore(mngr, step, template)
  finally:
    mngr.close()
  return config, policy, state.params, step


def export_pipeline(workdir: str, out: str, step: int | None = None) -> str:
  """Writes checkpoint `step` (default latest) of the SD run in `workdir` to `out` in diffusers
  format (see the module docstring). Returns `out`.

  Raises:
    ValueError: the run is not a Stable Diffusion run (`config.model.kind != "sd"`).
  """
  from ddpo_jax import train
  from ddpo_jax.models.pipeline import save_pipeline

  config, policy, trainable, _ = restore_run(workdir, step)
  if config.model.kind != "sd" or "pipeline" not in policy.metadata:
    raise ValueError(f"{workdir}: model.kind={config.model.kind!r}; only Stable Diffusion runs "
                     "(model.kind='sd') export to a diffusers pipeline")
  frozen = train.frozen_params(policy, config)
  unet = jax.jit(policy.assemble_unet)(trainable, frozen)
  unet = jax.tree.map(lambda x: np.asarray(x, np.float32), unet)
  pipe = policy.metadata["pipeline"]
  out_pipe = dataclasses.replace(pipe, params={"unet": unet, "vae": policy.params["vae"],
                                               "text_encoder": policy.params["text_encoder"]})
  return save_pipeline(out_pipe, out)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  path = export_pipeline(f.workdir, f.out, f.step)
  print(f"wrote a diffusers pipeline to {path}")


def _define_flags():
  # Defined only when run as a program: importing this module next to ddpo_jax.sample (which
  # defines flags of the same names) must not raise DuplicateFlagError.
  flags.DEFINE_string("workdir", None, "Run directory written by ddpo_jax.main.", required=True)
  flags.DEFINE_string("out", None, "Output diffusers pipeline directory.", required=True)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest; 0 = pre-trained).")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
