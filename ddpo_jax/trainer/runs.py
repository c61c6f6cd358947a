"""A run in WORKDIR read back from its checkpoints: the one way sample, export and evaluation
restore a run (training resumes through `checkpoints.RunCheckpoints` with its own shardings).

`restore_run(workdir, step)` -> (config, policy, trainable params, step): the config saved with
checkpoint `step` (default: the latest; step 0 is the pre-trained starting point), the policy
that config builds, and the checkpoint's trainable params on the default device: its weight EMA
when the run kept one (`train.ema.enabled`), as flow_grpo's evaluation and saved checkpoints
use the EMA weights.
"""
from __future__ import annotations

import json
import os

import jax
import ml_collections
import orbax.checkpoint as ocp

from ddpo_jax import config_schema
from ddpo_jax.algorithms import train
from ddpo_jax.pipelines.policy import Policy
from ddpo_jax.trainer import checkpoints, workdir as workdir_lib
from ddpo_jax.trainer.families import base_weights, build_policy


def _checked_step(mngr: ocp.CheckpointManager, workdir: str, step: int | None) -> int:
  """`step`, or the latest step when None, after checking that it is a complete saved step.

  Raises:
    FileNotFoundError: WORKDIR/checkpoints holds no complete checkpoint.
    ValueError: `step` is not one of the saved steps (the message lists them).
  """
  steps = mngr.all_steps()
  if not steps:
    raise FileNotFoundError(f"{checkpoints.checkpoint_dir(workdir)} holds no complete checkpoint")
  step = max(steps) if step is None else int(step)
  if step not in steps:
    raise ValueError(f"no checkpoint step {step} in {workdir}; available: {sorted(steps)}")
  return step


def restore_run(workdir: str, step: int | None = None, log=print
                ) -> tuple[ml_collections.ConfigDict, Policy, dict, int]:
  """(config, policy, trainable params, step) of checkpoint `step` (default: the newest intact
  one; a damaged newer step is skipped and said through `log`).

  The policy is built from the checkpoint's config; the trainable params are `params["unet"]`
  of its layout (LoRA factors for a LoRA run, plus CTRL's control tables), float32 as saved,
  verified against the checksums saved with them; with `train.ema.enabled` they are the
  state's `ema_params` (flow_grpo's `eval` and `save_ckpt` swap the EMA weights in).

  Raises:
    ValueError: `workdir` is empty.
    FileNotFoundError: no checkpoint directory, or no complete checkpoint in it.
    ValueError: `step` is not a saved step, or the checkpoint does not fit the policy.
    checkpoints.BaseWeightsChangedError: the base weights at the config's path differ from
      those the checkpoint was trained from (the message names the files).
    checkpoints.DamagedCheckpointError: the given step (or, with none given, every step) is
      damaged.
  """
  workdir = workdir_lib.resolve(workdir)
  if not os.path.isdir(checkpoints.checkpoint_dir(workdir)):
    raise FileNotFoundError(f"no checkpoints in {checkpoints.checkpoint_dir(workdir)}")
  mngr = checkpoints.manager(workdir, read_only=True)
  try:
    first = _checked_step(mngr, workdir, step)
    candidates = [first] if step is not None else sorted(mngr.all_steps(), reverse=True)
    errors = []
    for s in candidates:
      try:
        meta = checkpoints.read_meta(mngr, s)
        config = config_schema.complete(json.loads(meta["config"]))  # older runs: new keys at defaults
        policy = build_policy(config, workdir)
        checkpoints.check_base_weights(s, meta, base_weights(config), str(mngr.directory))
        params = policy.params["unet"]
        optimizer = train.make_optimizer(config.train, policy.learning_rates)
        template = train.new_train_state(config, params, jax.jit(optimizer.init)(params),
                                         jax.random.PRNGKey(0))
        state, _ = checkpoints.restore(mngr, s, template, meta)
        return config, policy, (state.ema_params if state.ema_params is not None
                                else state.params), s
      except checkpoints.DamagedCheckpointError as e:
        if step is not None:
          raise
        log(f"skipping {e}")
        errors.append(str(e))
    raise checkpoints.DamagedCheckpointError("every checkpoint is damaged:\n" + "\n".join(errors))
  finally:
    mngr.close()
