"""Orbax checkpoints in WORKDIR/checkpoints: everything needed to continue a run, verified.

Each step N (= number of completed epochs; step 0 is the pre-trained starting point) holds
- `state`: the `TrainState` pytree (trainable params, optimizer state, step counter, RNG key);
- `meta`: JSON with the epoch, the loop's own state (DDPO's per-prompt stat tracker), the run's
  config, and a checksum of every array of `state` (`state_checksums`).
Orbax writes each step into a temporary directory and renames it when complete, so a process
killed during a save leaves the previous step as the latest one.

Integrity: restoring a step recomputes the checksums of the arrays it read and compares them
with those saved beside them, so a flipped bit or a truncated file is found and named instead
of training on. A training run (`RunCheckpoints.start`) resumes from the newest step that reads
back intact; each damaged newer step is moved, never deleted, to WORKDIR/damaged_checkpoints/
with a note saying why. A failed save stops the run (`CheckpointSaveError`), and resuming with
another config than the one saved fails naming the keys (`ConfigChangedError`) unless they are
allowed (`CHANGEABLE_ON_RESUME`, or the user's `allow_config_change`).

Multi-host: every process calls these functions with the same global arrays; Orbax writes
each process's shards and process 0 the metadata, so WORKDIR must be a directory all hosts
share. A restore reshards onto the shardings of the given state (another mesh or host count);
the processes agree on whether a step is intact before any of them moves it.
"""
from __future__ import annotations

import datetime
import fnmatch
import hashlib
import json
import logging
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from ddpo_jax import config_schema
from ddpo_jax.numerics import parallel
from ddpo_jax.numerics.checksums import checksum_mismatches, state_checksums

DAMAGED_DIR = "damaged_checkpoints"

# Config keys that may differ between a run's saved config and the one it resumes with, without
# being allowed explicitly: how long the run goes on, how often it saves and logs, where its
# caches and reward server are, and the device layout (a restore reshards onto any mesh). None
# of them changes what an epoch already trained would have computed.
CHANGEABLE_ON_RESUME = ("num_epochs", "save_freq", "keep_checkpoints", "log_image_freq",
                        "progress", "logging.*", "compilation_cache_dir", "cpu_devices", "mesh.*",
                        "reward.server_url", "reward.server_urls.*", "reward.server_timeout_s",
                        "reward.server_deadline_s", "ctrl.eval_*")


class DamagedCheckpointError(ValueError):
  """A saved step whose files cannot be read back, or whose arrays fail their checksums."""


class ConfigChangedError(ValueError):
  """The config given to resume a run differs from the one its checkpoint was written with."""


class BaseWeightsChangedError(ValueError):
  """The pre-trained weights a run starts from differ from those its checkpoint was written
  with (`families.base_weights`)."""


def check_base_weights(step: int, meta: dict, current: dict | None, directory: str,
                       allowed: Sequence[str] = ()) -> list[str]:
  """The files that differ between the base weights saved with checkpoint `step` (`meta`) and
  `current` (a moved directory with the same files is the same base). [] when either side has
  none (a checkpoint from before fingerprints).

  Raises:
    BaseWeightsChangedError: files differ and "base_weights" is not in `allowed` (the message
      names the files, sizes and digests).
  """
  saved = meta.get("base_weights")
  if not saved or current is None:
    return []
  old, new = saved["files"], current["files"]
  differ = []
  for rel in sorted(set(old) | set(new)):
    if rel not in new:
      differ.append(f"{rel} (missing now)")
    elif rel not in old:
      differ.append(f"{rel} (new)")
    elif list(old[rel]) != list(new[rel]):
      differ.append(f"{rel} ({old[rel][0]} bytes sha256 {old[rel][1][:12]}... -> "
                    f"{new[rel][0]} bytes sha256 {new[rel][1][:12]}...)")
  if differ and not _allowed("base_weights", allowed):
    raise BaseWeightsChangedError(
        f"checkpoint step {step} in {directory} was trained from other base weights than those "
        f"at {current['path']} (saved from {saved['path']}): {'; '.join(differ[:5])}"
        f"{' ...' if len(differ) > 5 else ''}. Point the config at the original weights, or "
        "accept the change with --allow_config_change=base_weights")
  return differ


class CheckpointSaveError(RuntimeError):
  """Writing a checkpoint failed: the run stops (the last committed step is kept)."""


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


class _OrbaxInfoFilter(logging.Filter):
  """Drops Orbax's INFO/DEBUG records (dozens per save or restore) from absl's logger, and its
  two warnings that a read-only manager (how every restore here opens one) is read-only."""

  def filter(self, record: logging.LogRecord) -> bool:
    if f"{os.sep}orbax{os.sep}" not in (record.pathname or ""):
      return True
    if record.levelno < logging.WARNING:
      return False
    try:
      message = record.getMessage()
    except Exception:  # noqa: BLE001  (a bad format is the record's own problem: keep it)
      return True
    return not ("read_only=True, setting save_interval_steps" in message
                or "Given directory is read only" in message)


def quiet_orbax() -> None:
  """Orbax logs through absl at INFO, which an absl `app.run` program (the sample and export
  CLIs) prints: this hides Orbax's records below WARNING (others' are kept), unless the
  command line set absl's --verbosity / -v itself. Idempotent."""
  try:
    from absl import flags
    if flags.FLAGS.is_parsed() and flags.FLAGS["verbosity"].present:
      return
  except (ImportError, KeyError):
    pass
  absl_logger = logging.getLogger("absl")
  if not any(isinstance(f, _OrbaxInfoFilter) for f in absl_logger.filters):
    absl_logger.addFilter(_OrbaxInfoFilter())


def manager(workdir: str, keep: int = 0, read_only: bool = False) -> ocp.CheckpointManager:
  """The run's CheckpointManager; keeps step 0 and the `keep` latest steps (0: keep all)."""
  quiet_orbax()
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


# ----------------------------------------------------------------------------- config changes
def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict) and v:
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


_MISSING = "<absent>"


def config_changes(saved_config_json: str, config) -> dict[str, tuple[Any, Any]]:
  """{dotted key: (saved value, new value)} of every key that differs between a checkpoint's
  config (its JSON) and `config` (an ml_collections ConfigDict); absent keys show as
  '<absent>'. A schema key that a checkpoint of an older version lacks counts at its default
  (`config_schema.complete`): a key added since is a change only if this run sets it otherwise."""
  old = _flatten(json.loads(config_schema.complete(json.loads(saved_config_json)).to_json()))
  new = _flatten(json.loads(config.to_json()))
  return {k: (old.get(k, _MISSING), new.get(k, _MISSING)) for k in sorted(set(old) | set(new))
          if old.get(k, _MISSING) != new.get(k, _MISSING)}


def _allowed(key: str, patterns: Sequence[str]) -> bool:
  return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def _refuse_config_changes(step: int, meta: dict, config, allowed: Sequence[str],
                           directory: str) -> dict[str, tuple[Any, Any]]:
  """The config changes against checkpoint `step`'s `meta` (all allowed).

  Raises:
    ConfigChangedError: a changed key is not in `allowed` (the message names each).
  """
  changes = config_changes(meta["config"], config)
  refused = {k: v for k, v in changes.items() if not _allowed(k, allowed)}
  if refused:
    listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
    raise ConfigChangedError(
        f"checkpoint step {step} in {directory} was written with another config: {listed}. "
        f"Resume with the saved config, or allow these changes with "
        f"--allow_config_change={','.join(refused)} (train_and_evaluate's "
        "allow_config_change)")
  return changes


def check_saved_config(workdir: str, config, allow_config_change: Sequence[str] = ()
                       ) -> int | None:
  """Before anything is built: the config check of a resume (`RunCheckpoints.start` repeats it
  for the step it restores), against the newest step whose meta reads back intact (damaged
  steps are left for `start` to set aside). Returns that step's epoch (the first epoch a
  resume would run), None when WORKDIR has no checkpoint.

  Raises:
    ConfigChangedError: as `RunCheckpoints.start`, naming every refused key.
  """
  if not os.path.isdir(checkpoint_dir(workdir)):
    return None
  mngr = manager(workdir, read_only=True)
  try:
    for step in sorted(mngr.all_steps(), reverse=True):
      try:
        meta = read_meta(mngr, step)
      except DamagedCheckpointError:
        continue
      _refuse_config_changes(step, meta, config,
                             tuple(CHANGEABLE_ON_RESUME) + tuple(allow_config_change),
                             str(mngr.directory))
      return int(meta["epoch"])
    return None
  finally:
    mngr.close()


# ----------------------------------------------------------------------------- save / restore
def _meta_checksum(meta: dict) -> str:
  """SHA-256 of `meta` without its own checksum, as canonical JSON (sorted keys)."""
  body = {k: v for k, v in meta.items() if k != "meta_checksum"}
  return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
  """Starts the asynchronous save of `state` and `meta` (+ the state's checksums, + the
  SHA-256 of the whole meta JSON) as `step`."""
  meta = {**meta, "checksums": state_checksums(state)}
  meta["meta_checksum"] = _meta_checksum(meta)
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          meta=ocp.args.JsonSave(meta)))


def _damaged(step: int, mngr: ocp.CheckpointManager, what: str, e: BaseException | None = None):
  detail = "" if e is None else f": {type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
  return DamagedCheckpointError(f"checkpoint step {step} in {mngr.directory} is damaged "
                                f"({what}){detail}")


def read_meta(mngr: ocp.CheckpointManager, step: int) -> dict:
  """The `meta` JSON of `step`. Raises DamagedCheckpointError if it cannot be read."""
  try:
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  except Exception as e:  # noqa: BLE001  (any failure to read it back is damage)
    raise _damaged(step, mngr, "its meta JSON cannot be read", e) from e
  if not isinstance(meta, dict) or "epoch" not in meta or "config" not in meta:
    raise _damaged(step, mngr, "its meta JSON lacks the epoch or the config")
  # Steps written before the meta checksum existed have none and are read unverified.
  if "meta_checksum" in meta and meta["meta_checksum"] != _meta_checksum(meta):
    raise _damaged(step, mngr, "its meta JSON (epoch, loop state, config, array checksums) "
                   "differs from the SHA-256 saved with it")
  return meta


def _leaf_signature(tree) -> list[tuple[tuple[int, ...], str]]:
  return sorted((tuple(int(d) for d in x.shape), str(np.dtype(x.dtype)))
                for x in jax.tree.leaves(tree))


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: Any,
            meta: dict | None = None) -> tuple[Any, dict]:
  """Restores (state, meta) of `step` into the shapes/shardings of `abstract_state`, verified
  against the checksums saved with it.

  Raises:
    ValueError: the step holds other arrays than `abstract_state` (another model or config).
    DamagedCheckpointError: its files cannot be read, or arrays differ from their checksums
      (the message names them).
  """
  meta = read_meta(mngr, step) if meta is None else meta  # `meta`: already read by the caller
  try:
    saved = mngr.item_metadata(step)["state"]
  except Exception as e:  # noqa: BLE001
    raise _damaged(step, mngr, "its array metadata cannot be read", e) from e
  # A DiffusionNFT run saved before the train state kept an old policy sampled with its trained
  # params: its old policy is a copy of them (`train.TrainState.old_params`, decay type 0).
  fill_old = (getattr(abstract_state, "old_params", None) is not None
              and not _saved_field(saved, "old_params"))
  if fill_old:
    abstract_state = abstract_state.replace(old_params=None)
  have, want = _leaf_signature(saved), _leaf_signature(abstract_state)
  if have != want:
    extra = [s for s in have if s not in want][:3]
    raise ValueError(
        f"checkpoint step {step} in {mngr.directory} does not match this model/config (was it "
        f"written by a different config?): it holds {len(have)} arrays, this model "
        f"{len(want)}; e.g. saved (shape, dtype) {extra} are not in this model")
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
  try:
    state = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))["state"]
  except Exception as e:  # noqa: BLE001
    raise _damaged(step, mngr, "its array data cannot be read", e) from e
  expected = meta.get("checksums")
  if expected is not None:
    bad = checksum_mismatches(expected, state)
    if bad:
      raise _damaged(step, mngr, f"{len(bad)} of {len(expected)} arrays differ from the "
                     f"checksums saved with them: {', '.join(bad[:5])}"
                     f"{' ...' if len(bad) > 5 else ''}")
  if fill_old:
    state = state.replace(old_params=jax.tree.map(lambda x: x.copy(), state.params))
  return state, meta


def _saved_field(saved, name: str) -> bool:
  """Whether the saved state's metadata holds arrays under its field `name`."""
  try:
    return name in saved.keys() and bool(jax.tree.leaves(saved[name]))
  except (AttributeError, KeyError, TypeError):
    return False


def _agreed(ok: bool) -> bool:
  """Whether `ok` holds on every process (a collective when there are several)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.asarray([ok]))))


def _try_restore(mngr, step, abstract_state, check_meta=None):
  """(state, meta, None) or (None, None, the DamagedCheckpointError), agreed by all processes."""
  error = None
  try:
    meta = read_meta(mngr, step)
    if check_meta is not None:
      check_meta(step, meta)
    state, meta = restore(mngr, step, abstract_state, meta)
  except DamagedCheckpointError as e:
    error, state, meta = e, None, None
  if not _agreed(error is None):
    error = error or _damaged(step, mngr, "another process could not read it back")
    return None, None, error
  return state, meta, None


def read_state(workdir: str, step: int | None = None) -> tuple[int, Any, dict]:
  """Reads (step, state, meta) of a run onto the first local device, whatever topology wrote it,
  verified against the saved checksums.

  For inspection and export: training resumes through `RunCheckpoints` with the run's own
  shardings. The state comes back as a nested dict of arrays (the `TrainState` fields as keys).
  """
  mngr = manager(workdir, read_only=True)
  try:
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{checkpoint_dir(workdir)} holds no complete checkpoint")
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    try:
      saved = mngr.item_metadata(step)["state"]
    except Exception as e:  # noqa: BLE001
      raise _damaged(step, mngr, "its array metadata cannot be read", e) from e
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved)
    state, meta = restore(mngr, step, target)
  finally:
    mngr.close()
  return step, state, meta


# ----------------------------------------------------------------------------- a training run
class RunCheckpoints:
  """The checkpoints of a training run, as its loop uses them.

  `start` resumes from the newest intact step (moving damaged newer ones aside) or, in a new
  run, saves the starting point as step 0; `save` writes a step once the previous save has
  committed; `wait` raises `CheckpointSaveError` if a save failed; `close` waits and closes;
  `abort` (after an error) closes without raising and returns the last committed step.

  Args:
    workdir: the run's directory.
    config: the run's config; saved with every step, compared with the saved one on resume.
    allow_config_change: config keys (or fnmatch patterns) that may differ from the saved
      config on resume, beyond CHANGEABLE_ON_RESUME; each change is logged ("base_weights":
      other base weights than the saved ones).
    log: where messages go (process 0 prints them).
    base_weights: the run's `families.base_weights`, saved with every step and compared with
      the saved one on resume (None: not recorded).
  """

  def __init__(self, workdir: str, config, allow_config_change: Sequence[str] = (),
               log: Callable[[str], Any] = print, base_weights: dict | None = None):
    self.workdir = os.path.abspath(workdir)
    self.config = config
    self.base_weights = base_weights
    self.allowed = tuple(CHANGEABLE_ON_RESUME) + tuple(allow_config_change)
    self.log = log
    self.mngr = manager(workdir, keep=int(config.keep_checkpoints))
    self.fresh = False  # set by `start`: True when the run had no step and saved step 0

  def _check_config(self, step: int, meta: dict) -> None:
    for k, (a, b) in _refuse_config_changes(step, meta, self.config, self.allowed,
                                            str(self.mngr.directory)).items():
      self.log(f"config change on resume: {k}: {a!r} -> {b!r}")
    for change in check_base_weights(step, meta, self.base_weights, str(self.mngr.directory),
                                     self.allowed):
      self.log(f"base weights changed on resume (allowed): {change}")

  def _set_aside(self, step: int, error: DamagedCheckpointError) -> str:
    """Moves the step's directory to WORKDIR/damaged_checkpoints/ with a note; its new path."""
    target = os.path.join(self.workdir, DAMAGED_DIR, f"step_{step}")
    if parallel.is_main_process():
      os.makedirs(os.path.dirname(target), exist_ok=True)
      stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
      if os.path.lexists(target):
        target = f"{target}.{stamp}"
      os.replace(os.path.join(str(self.mngr.directory), str(step)), target)
      with open(target + ".why.txt", "w") as f:
        f.write(f"{stamp}: {error}\n")
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"ddpo_jax set aside checkpoint {step}")
    self.mngr.reload()
    return target

  def start(self, state: Any, meta: dict) -> tuple[Any, dict]:
    """(state, meta) of the newest intact step, or (`state`, `meta`) saved as step 0 if the run
    has no step yet.

    Raises:
      ConfigChangedError: the saved config differs in keys that are not allowed.
      BaseWeightsChangedError: the base weights differ from the saved ones (not allowed).
      ValueError: the saved arrays do not fit `state` (another model).
      DamagedCheckpointError: steps exist but none is intact (they have been moved aside; a
        new start then begins the run afresh).
    """
    moved = []
    for step in sorted(self.mngr.all_steps(), reverse=True):
      restored, saved, error = _try_restore(self.mngr, step, state, self._check_config)
      if error is None:
        if moved:
          self.log(f"resuming from step {step}, the newest intact one (damaged steps moved "
                   f"aside: {', '.join(moved)})")
        self.log(f"resuming from checkpoint step {step} (epoch {int(saved['epoch'])})")
        return restored, saved
      where = self._set_aside(step, error)
      self.log(f"{error}; moved it to {where}")
      moved.append(where)
    if moved:
      raise DamagedCheckpointError(
          f"no intact checkpoint in {self.mngr.directory}: every step was damaged and has been "
          f"moved aside ({', '.join(moved)}); running again starts the run afresh")
    self.save(0, state, meta)
    self.fresh = True
    self.log(f"saved the starting point as step 0 in {self.mngr.directory}")
    return state, meta

  def wait(self) -> None:
    """Blocks until the last save has committed. Raises CheckpointSaveError if it failed."""
    try:
      self.mngr.wait_until_finished()
      self.mngr.check_for_errors()
    except Exception as e:  # noqa: BLE001
      raise CheckpointSaveError(f"saving a checkpoint to {self.mngr.directory} failed: "
                                f"{type(e).__name__}: {e}") from e

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Saves `step` (asynchronously) after the previous save has committed."""
    self.wait()
    try:
      extra = {} if self.base_weights is None else {"base_weights": self.base_weights}
      save(self.mngr, step, state, {**meta, "config": self.config.to_json(), **extra})
    except Exception as e:  # noqa: BLE001
      raise CheckpointSaveError(f"saving checkpoint step {step} to {self.mngr.directory} "
                                f"failed: {type(e).__name__}: {e}") from e

  def close(self) -> None:
    self.wait()
    self.mngr.close()

  def abort(self) -> int | None:
    """After an error: waits for a save in flight without raising, closes, and returns the last
    committed step (None if none)."""
    try:
      self.mngr.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      self.log(f"the last checkpoint save failed: {type(e).__name__}: {e}")
    try:
      self.mngr.reload()
    except Exception:  # noqa: BLE001  (the directory itself may be what failed)
      pass
    latest = self.mngr.latest_step()
    try:
      self.mngr.close()
    except Exception:  # noqa: BLE001
      pass
    return latest
