"""Orbax checkpoints in WORKDIR/checkpoints: everything needed to continue a run.

Each step N (= number of completed epochs; step 0 is the pre-trained starting point) holds
- `state`: the `TrainState` pytree (trainable params, optimizer state, step counter, RNG key);
- `meta`: JSON with the epoch, the per-prompt stat tracker, and the run's config.
Orbax writes each step into a temporary directory and renames it when complete, so a process
killed during a save leaves the previous step as the latest one.

Multi-host: every process calls `save` / `restore` with the same global arrays; Orbax writes
each process's shards and process 0 the metadata, so WORKDIR must be a directory all hosts
share. `restore` reshards onto the shardings of the given state (another mesh or host count).
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def manager(workdir: str, keep: int = 0, read_only: bool = False) -> ocp.CheckpointManager:
  """The run's CheckpointManager; keeps step 0 and the `keep` latest steps (0: keep all)."""
  policy = None
  if keep > 0:
    policy = checkpoint_managers.AnyPreservationPolicy(
        [checkpoint_managers.LatestN(n=keep), checkpoint_managers.CustomSteps([0])])
  options = ocp.CheckpointManagerOptions(
      create=not read_only, read_only=read_only, preservation_policy=policy,
      cleanup_tmp_directories=not read_only, enable_async_checkpointing=True)
  return ocp.CheckpointManager(
      checkpoint_dir(workdir), options=options,
      item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          meta=ocp.args.JsonSave(meta)))


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: Any) -> tuple[Any, dict]:
  """Restores (state, meta) of `step` into the shapes/shardings of `abstract_state`.

  Raises:
    ValueError: if the checkpoint does not fit `abstract_state` (another model or config).
  """
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"checkpoint step {step} in {mngr.directory} does not match this model/config "
                     f"(was it written by a different config?): {e}") from e
  return restored["state"], restored["meta"]


def read_state(workdir: str, step: int | None = None) -> tuple[int, Any, dict]:
  """Reads (step, state, meta) of a run onto the first local device, whatever topology wrote it.

  For inspection and export: training resumes through `restore` with the run's own shardings.
  The state comes back as a nested dict of arrays (the `TrainState` fields as keys).
  """
  mngr = manager(workdir, read_only=True)
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"{checkpoint_dir(workdir)} holds no complete checkpoint")
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        mngr.item_metadata(step)["state"])
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
  mngr.close()
  return step, restored["state"], restored["meta"]
