"""The training loop every trainer runs, and DDPO's epoch: sample, reward, update.

`training_run` / `TrainingRun.run_epochs` is the one epoch/resume/record/checkpoint loop:
resume from the newest intact checkpoint (`checkpoints.RunCheckpoints`: the saved-config check,
damaged steps set aside), one finiteness check of each epoch's metrics and parameters, a
metrics row (WORKDIR/metrics.jsonl and TensorBoard, `MetricsWriter`, process 0 only) written
once the saves before it have committed, image grids every `log_image_freq` epochs, a
checkpoint every `save_freq` epochs; on any error, saves are stopped and metrics.jsonl is cut
back to the last committed step. DDPO (`train_and_evaluate` below) and CTRL's solvers and
baselines (`ddpo_jax.trainer.ctrl`) give it their epoch function.

DDPO's epoch (`DDPOEpoch.run_epoch`) = `sample.num_batches_per_epoch` calls of the compiled
sampling program (`train.make_sample_fn`), host rewards on a thread pool overlapping with
sampling, advantages (`rl.advantages`: group-relative, per-prompt or whole-batch), then
`train.num_inner_epochs` calls of the compiled update program (`train.make_update_fn`). Both
programs are compiled ahead of time before the first epoch.

Multi-host: every process draws the same global prompts, samples and rewards its own rows
(`parallel.process_rows`) and gathers all rewards, so the stat tracker and advantages are the
same everywhere; the update is one program over all devices; checkpoints are written by Orbax
from all processes; process 0 writes metrics, image grids and the log.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import errno
import json
import os
import time
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from ddpo_jax.numerics import parallel, rl
from ddpo_jax.rewards import Reward, call_reward, make_rewards, to_uint8
from ddpo_jax.tasks import dynamics, prompts as prompts_lib
from ddpo_jax.trainer import checkpoints, logging_sinks, workdir as workdir_lib
from ddpo_jax.trainer.families import base_weights, build_policy
from ddpo_jax.algorithms.train import (TrainState, frozen_params, keeps_old_params, make_old_policy_fn,
                            make_optimizer, make_sample_fn, make_update_fn, model_shardings,
                            params_finite, sampling_params, validate_config)


def _wandb_mode(config) -> str:
  return str((config.get("logging") or {}).get("wandb", "") or "") if config is not None else ""


class MetricsWriter:
  """WORKDIR/metrics.jsonl (one object per epoch) plus TensorBoard summaries (grouped tags,
  `logging_sinks.tag_of`; the learning rate; hparams with the final metrics), captioned sample
  grids (WORKDIR/samples/epoch_N.png, TensorBoard "samples/grid") and, with
  `config.logging.wandb`, a wandb run (`logging_sinks.WandbRun`).

  Opening it drops the rows of epochs from `resume_epoch` on (they are recomputed). A new run
  (`fresh`: the workdir had no checkpoint) never drops an old file's rows: a metrics.jsonl with
  rows is moved aside to metrics.jsonl.before-TIMESTAMP, and said."""

  def __init__(self, workdir: str, resume_epoch: int, log=print, fresh: bool = False,
               config: ml_collections.ConfigDict | None = None):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.log = log
    self.config = config
    self.wandb = (logging_sinks.WandbRun(config, workdir, fresh, log) if _wandb_mode(config)
                  else None)
    if os.path.exists(self.path):
      if fresh and self._rows():
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = f"{self.path}.before-{stamp}"
        os.replace(self.path, aside)
        log(f"{self.path} held the rows of an earlier run but WORKDIR has no checkpoint of it: "
            f"kept them as {aside}; this run starts a new metrics.jsonl")
      else:
        self.keep_epochs_before(resume_epoch)
    # TensorBoard's writer is made on a thread: importing tensorboardX imports PyTorch when it
    # is installed (~1.5 s), which then overlaps the compilation that follows.
    pool = concurrent.futures.ThreadPoolExecutor(1)
    self._tb = pool.submit(_summary_writer, os.path.join(workdir, "tensorboard"))
    pool.shutdown(wait=False)

  def _rows(self) -> list[tuple[int, dict | None]]:
    """(byte offset, row) of each line of the file; a last line cut short by a crash (no
    newline, not valid JSON) has row None.

    Raises:
      ValueError: a line before the last is not valid JSON (not a write cut short by a crash).
    """
    with open(self.path, "rb") as f:
      data = f.read()
    rows, offset = [], 0
    lines = data.split(b"\n")
    for i, line in enumerate(lines):
      if line.strip():
        try:
          rows.append((offset, json.loads(line)))
        except json.JSONDecodeError:
          if any(l.strip() for l in lines[i + 1:]):
            raise ValueError(f"{self.path}: line {i + 1} is not valid JSON and is not the last "
                             f"line (not a write cut short by a crash): {line[:200]!r}") from None
          rows.append((offset, None))
      offset += len(line) + 1
    return rows

  def keep_epochs_before(self, epoch: int) -> None:
    """Drops the rows of `epoch` and later (and a last line cut short by a crash). The rows
    kept are a prefix of the file (rows are written in epoch order), so the file is cut in
    place (`os.truncate`): that needs no free disk space, and a crash leaves the old or the new
    length. A file whose rows are out of order is rewritten (temporary file, one rename)."""
    if not os.path.exists(self.path):
      return
    rows = self._rows()
    drop = [i for i, (_, row) in enumerate(rows) if row is None or row["epoch"] >= epoch]
    if not drop:
      return
    if rows[drop[-1]][1] is None:
      with open(self.path, "rb") as f:
        f.seek(rows[drop[-1]][0])
        cut = f.read(200).decode(errors="replace")
      self.log(f"{self.path}: dropping its last line, cut short (not valid JSON): {cut!r}")
    if drop == list(range(drop[0], len(rows))):
      os.truncate(self.path, rows[drop[0]][0])
      return
    tmp = self.path + ".tmp"  # replaced in one rename: a crash leaves the old or the new file
    with open(tmp, "w") as f:
      for i, (_, row) in enumerate(rows):
        if i not in drop:
          f.write(json.dumps(row) + "\n")
    os.replace(tmp, self.path)

  @property
  def tb(self):
    return self._tb.result()

  def write(self, epoch: int, metrics: dict, reward_keys=()) -> None:
    """Appends the row of `epoch` to metrics.jsonl; TensorBoard and wandb get it under the
    grouped names (reward/…, train/…, time/…) plus train/learning_rate."""
    row = {"epoch": epoch, **{k: float(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    named = {logging_sinks.tag_of(k, reward_keys): v for k, v in row.items() if k != "epoch"}
    train = (self.config or {}).get("train") or {}
    if "learning_rate" in train:  # constant: the optimizer has no schedule
      named["train/learning_rate"] = float(train["learning_rate"])
    for k, v in named.items():
      self.tb.add_scalar(k, v, epoch)
    self.tb.flush()
    if self.wandb is not None:
      self.wandb.metrics(epoch, named)

  def images(self, epoch: int, samples, workdir: str) -> str:
    """Writes the grid of `samples` (uint8 NHWC images, or (images, prompts, rewards) for a
    captioned grid grouped by prompt; the first 64) to WORKDIR/samples/epoch_N.png,
    TensorBoard and wandb; returns the PNG's path."""
    images, prompts, rewards = samples if isinstance(samples, tuple) else (samples, None, None)
    images = np.asarray(images)[:64]
    if prompts is not None:
      prompts = [str(p) for p in list(prompts)[:64]]
      rewards = None if rewards is None else np.asarray(rewards, np.float64)[:64]
      grid = logging_sinks.captioned_grid(images, prompts, rewards)
    else:
      h, w = logging_sinks.cell_side(*images.shape[1:3])
      grid = image_grid(np.stack([_resized(x, h, w) for x in images]), pad=logging_sinks.PAD)
    path = os.path.join(workdir, "samples", f"epoch_{epoch:05d}.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    from PIL import Image
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
    self.tb.add_image("samples/grid", grid, epoch, dataformats="HWC")
    self.tb.flush()
    if self.wandb is not None:
      self.wandb.images(epoch, grid, images, prompts or [""] * len(images), rewards)
    return path

  def hparams(self, final: dict) -> None:
    """TensorBoard's hparams (the config's leaves) with the final metrics ("final/KEY"), in
    WORKDIR/tensorboard/hparams; wandb's summary gets the final metrics."""
    if self.config is None:
      return
    metrics = {f"final/{k}": float(v) for k, v in final.items()}
    self.tb.add_hparams(logging_sinks.flat_hparams(self.config), metrics, name="hparams")
    self.tb.flush()
    if self.wandb is not None:
      self.wandb.summary(metrics)

  def close(self, failed: bool = False) -> None:
    """Flushes TensorBoard and ends the wandb run."""
    try:
      self.tb.flush()
    finally:
      if self.wandb is not None:
        self.wandb.finish(failed)
        self.wandb = None


def _resized(image: np.ndarray, h: int, w: int) -> np.ndarray:
  from PIL import Image
  if image.shape[:2] == (h, w):
    return image
  img = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  out = np.asarray(img.resize((w, h), Image.NEAREST if h >= image.shape[0] else Image.BILINEAR))
  return out[..., None] if out.ndim == 2 else out


def _summary_writer(logdir: str):
  from tensorboardX import SummaryWriter
  return SummaryWriter(logdir)


def image_grid(images: np.ndarray, pad: int = 1, cols: int | None = None) -> np.ndarray:
  """(N,H,W,C) uint8 -> one (rows*(H+pad), cols*(W+pad), C) uint8 grid, row-major.

  `cols` defaults to ceil(sqrt(N)).
  """
  n, h, w, c = images.shape
  cols = int(np.ceil(np.sqrt(n))) if cols is None else cols
  rows = int(np.ceil(n / cols))
  grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), np.uint8)
  for i, img in enumerate(images):
    r, q = divmod(i, cols)
    grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = img
  return grid


def _host_reward(reward: Reward, images, prompts, metadata):
  """A host reward of this process's rows; `images` is a global array (read locally here)."""
  rewards, info = call_reward(reward, to_uint8(parallel.local_rows(images)), prompts, metadata)
  numeric = {k: np.atleast_1d(np.asarray(v)) for k, v in info.items()}
  # Only numeric info is logged (a remote scorer may also return e.g. the VLM's answers).
  return np.asarray(rewards, np.float32), {k: v for k, v in numeric.items()
                                           if np.issubdtype(v.dtype, np.number)}


def enable_compilation_cache(path: str, log=print) -> None:
  """Turns on JAX's persistent compilation cache in `path` ("" = leave it off)."""
  if not path:
    return
  path = os.path.abspath(os.path.expanduser(path))
  os.makedirs(path, exist_ok=True)
  if jax.config.jax_compilation_cache_dir != path:
    from jax.experimental.compilation_cache import compilation_cache
    jax.config.update("jax_compilation_cache_dir", path)
    compilation_cache.reset_cache()  # takes effect even after earlier compilations
  log(f"persistent compilation cache: {path}")


def _abstract(x, sharding=None, batch: int | None = None):
  """ShapeDtypeStruct of an array (leading dim replaced by `batch` when given)."""
  shape = tuple(x.shape) if batch is None else (batch,) + tuple(x.shape[1:])
  return jax.ShapeDtypeStruct(shape, x.dtype, sharding=sharding if sharding is not None else
                              getattr(x, "sharding", None))


# An epoch function: (epoch, state) -> (state, metrics row, images or None). The row holds
# numbers the epoch measured (converted to float); images, when given, is a function returning
# this process's rows of uint8 NHWC samples for the grid, or (those images, their prompts, their
# rewards or None) for a captioned grid (called only for epochs with a grid). An epoch function
# may name the row keys that are rewards in `reward_keys` (TensorBoard's "reward/" group).
EpochFn = Callable[[int, TrainState],
                   tuple[TrainState, dict, "Callable[[], np.ndarray] | None"]]


def _describe(row: dict) -> str:
  return "  ".join(f"{k} {v:.4g}" for k, v in row.items())


@dataclasses.dataclass
class TrainingRun:
  """A run opened by `training_run`: the restored `state` and checkpoint `meta` (its "epoch" is
  the first epoch to run), its checkpoints and (process 0) metrics writer."""
  config: ml_collections.ConfigDict
  workdir: str
  ckpts: checkpoints.RunCheckpoints
  writer: "MetricsWriter | None"
  state: TrainState
  meta: dict
  log: Callable[[str], None]

  @property
  def start_epoch(self) -> int:
    return int(self.meta["epoch"])

  def run_epochs(self, num_epochs: int, epoch_fn: EpochFn, describe=_describe,
                 save_meta: Callable[[], dict] = dict) -> dict:
    """Runs epochs `start_epoch` … `num_epochs` − 1 of `epoch_fn`; returns the last row.

    After each epoch: one finiteness check (every metric and every parameter; a non-finite one
    raises FloatingPointError before anything of that epoch is saved), the metrics row once
    the saves before it have committed, the log line (`describe(row)`), the image grid every
    `config.log_image_freq` epochs and at the last, and a checkpoint of the state with
    {"epoch": epoch + 1, **save_meta()} every `config.save_freq` epochs and at the last. After
    the last epoch, TensorBoard's hparams get the last row. With `config.progress`, process 0
    shows a bar over the epochs (ETA, the latest reward)."""
    config, last = self.config, {}
    bar = tqdm.tqdm(total=num_epochs, initial=min(self.start_epoch, num_epochs), desc="epochs",
                    unit="epoch", position=0, dynamic_ncols=True,
                    disable=not (config.get("progress", True) and self.writer is not None))
    def say(text):
      if bar.disable:
        self.log(text)
      else:
        with tqdm.tqdm.external_write_mode():
          self.log(text)
    try:
      for epoch in range(self.start_epoch, num_epochs):
        self.state, row, images = epoch_fn(epoch, self.state)
        row = {k: float(v) for k, v in row.items()}
        if not all(np.isfinite(v) for v in row.values()) or not params_finite(self.state.params):
          raise FloatingPointError(f"epoch {epoch}: non-finite metrics or parameters ({row}); "
                                   "stopping without saving this epoch")
        self.ckpts.wait()  # a row is written only once the saves before it have committed
        if self.writer is not None:
          self.writer.write(epoch, row, getattr(epoch_fn, "reward_keys", ()))
        say(f"epoch {epoch}: {describe(row)}")
        last_epoch = epoch + 1 == num_epochs
        if self.writer is not None and images is not None and config.log_image_freq and (
            epoch % config.log_image_freq == 0 or last_epoch):
          self.writer.images(epoch, images(), self.workdir)
        if (epoch + 1) % config.save_freq == 0 or last_epoch:
          self.ckpts.save(epoch + 1, self.state, {"epoch": epoch + 1, **save_meta()})
        if self.writer is not None and last_epoch:
          self.writer.hparams(row)
        if "reward_mean" in row:
          bar.set_postfix(reward=f"{row['reward_mean']:.4g}", refresh=False)
        bar.update(1)
        last = row
    finally:
      bar.close()
    return last


@contextlib.contextmanager
def training_run(config: ml_collections.ConfigDict, workdir: str, state: TrainState,
                 meta: dict, log=print, allow_config_change: tuple[str, ...] = (),
                 base_weights: dict | None = None) -> Iterator[TrainingRun]:
  """Opens a run in `workdir`: resumes `state` (a template with the run's shardings) and
  `meta` (the checkpoint metadata of a fresh start; its "epoch" 0) from the newest intact
  checkpoint, or saves them as step 0. Its saved config must equal `config` except in
  `checkpoints.CHANGEABLE_ON_RESUME` and the keys (or fnmatch patterns) of
  `allow_config_change`, and its base weights must be `base_weights` (`families.base_weights`,
  saved with every step). A new run (no checkpoint) moves an old metrics.jsonl with rows aside
  instead of dropping them. On leaving the block, waits for the saves to commit; on an error
  (a failed save included), stops the saves and cuts metrics.jsonl back to the epochs of the
  last committed checkpoint (they are retrained on resume); a full disk is said as such
  (`DiskFullError`). In a multi-process run every process opens it; process 0 writes
  metrics."""
  ckpts = checkpoints.RunCheckpoints(workdir, config, allow_config_change, log, base_weights)
  writer = None
  try:
    state, meta = ckpts.start(state, meta)
    if parallel.is_main_process():
      logging_sinks.write_config_json(workdir, config)
      writer = MetricsWriter(workdir, int(meta["epoch"]), log, fresh=ckpts.fresh, config=config)
    yield TrainingRun(config, workdir, ckpts, writer, state, meta, log)
    ckpts.close()
    if writer is not None:
      writer.close()
  except BaseException as e:
    committed = ckpts.abort()
    if writer is not None:
      try:
        writer.close(failed=True)
      except Exception as closing:  # noqa: BLE001  (the run's own error is the one to report)
        log(f"could not close the metrics writer: {type(closing).__name__}: {closing}")
    if writer is not None:
      try:
        writer.keep_epochs_before(0 if committed is None else committed)
      except Exception as cut:  # noqa: BLE001  (the run's own error is the one to report)
        log(f"could not cut {writer.path} back to the epochs of checkpoint step {committed}: "
            f"{type(cut).__name__}: {cut}")
    full = _disk_full(e)
    if full is not None:
      raise DiskFullError(
          f"no space left on the device holding {workdir} ({full}): free "
          f"space there, then run the same command again to resume from checkpoint step "
          f"{committed} (metrics.jsonl has been cut back to it)") from e
    raise


class DiskFullError(OSError):
  """The run stopped because the disk holding WORKDIR (or a file it writes) is full."""


def _disk_full(error: BaseException) -> str | None:
  """What ran out of space behind `error` (itself, its causes or contexts: an ENOSPC OSError,
  or TensorStore's RESOURCE_EXHAUSTED error with os_error_code 28 that Orbax raises as a
  ValueError), else None."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
      return str(error.filename or error)
    if "No space left on device" in str(error):
      return str(error).strip().splitlines()[0][:300]
    error = error.__cause__ or error.__context__
  return None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, log=print,
                       allow_config_change: tuple[str, ...] = ()) -> dict:
  """Runs (or resumes) DDPO training in `workdir`; returns the last epoch's metrics.

  Resuming restores the newest intact checkpoint (`checkpoints.RunCheckpoints`); its saved
  config must equal `config` except in `checkpoints.CHANGEABLE_ON_RESUME` and the keys (or
  fnmatch patterns) of `allow_config_change`, checked before the model is built. If the run
  stops on an error (a failed save included), metrics.jsonl is cut back to the epochs of the
  last committed checkpoint. The run holds WORKDIR's lock (`ddpo_jax.trainer.workdir`) throughout: a
  second run on the same WORKDIR stops before touching anything.

  In a multi-process run every process calls this with the same config and workdir (on a
  filesystem all hosts share); process 0 writes metrics, image grids and the log.
  """
  workdir = workdir_lib.resolve(workdir)
  if not parallel.is_main_process():
    log = lambda *a, **k: None  # noqa: E731
  mesh = parallel.make_mesh(config.mesh)
  validate_config(config, mesh)
  if _wandb_mode(config) and parallel.is_main_process():
    logging_sinks.import_wandb()  # not installed: say so now, not after compiling
  with workdir_lib.lock(workdir, log):
    done = checkpoints.check_saved_config(workdir, config, allow_config_change)
    if done is not None and done >= int(config.num_epochs):
      return finished_run(workdir, done, int(config.num_epochs), log)
    return _train_and_evaluate(config, workdir, mesh, log, allow_config_change)


def finished_run(workdir: str, epochs_done: int, num_epochs: int, log=print) -> dict:
  """A run whose checkpoints already hold `num_epochs` epochs: says so, and returns the last
  row of its metrics.jsonl (without "epoch"; {} if none). Nothing is built or compiled."""
  log(f"{workdir} is finished: its checkpoints hold {epochs_done} epochs and num_epochs is "
      f"{num_epochs}, so there is nothing to train. To train on, raise num_epochs (e.g. "
      f"--config.num_epochs={epochs_done + max(1, num_epochs)}); to start afresh, give another "
      "--workdir")
  path = os.path.join(workdir, "metrics.jsonl")
  last = {}
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          row = json.loads(line)
        except json.JSONDecodeError:
          continue
        if row.get("epoch", -1) < epochs_done:
          last = row
  return {k: v for k, v in last.items() if k != "epoch"}


def _train_and_evaluate(config, workdir, mesh, log, allow_config_change) -> dict:
  enable_compilation_cache(config.compilation_cache_dir, log)
  parallel.check_same_on_all_processes("config", config.to_json())
  policy = build_policy(config, workdir)
  terms = make_rewards(config, policy, log)
  optimizer = make_optimizer(config.train, policy.learning_rates)
  repl = parallel.replicated(mesh)
  params_sh, frozen_sh, state_sh = model_shardings(policy, config, optimizer, mesh)

  if isinstance(params_sh, jax.sharding.Sharding):
    fsdp_note = ""
  else:
    leaves = list(zip(jax.tree.leaves(policy.params["unet"]), jax.tree.leaves(params_sh)))
    split = [x.size for x, sh in leaves if parallel.FSDP_AXIS in jax.tree.leaves(tuple(sh.spec))]
    fsdp_note = (f"; fsdp splits {len(split)} of {len(leaves)} trainable parameter arrays "
                 f"({sum(split) / max(1, sum(x.size for x, _ in leaves)):.0%} of the elements)")
  # `put` copies: the train state is donated to the update, the pre-trained params must survive.
  frozen = parallel.put(frozen_params(policy, config), frozen_sh)
  unet0 = parallel.put(policy.params["unet"], params_sh)
  opt_sh = state_sh.opt_state if isinstance(state_sh, TrainState) else repl
  # The weight EMA and DiffusionNFT's old policy start as copies of the pre-trained params.
  state = TrainState(step=parallel.put(np.zeros((), np.int32), repl), params=unet0,
                     opt_state=jax.jit(optimizer.init, out_shardings=opt_sh)(unet0),
                     rng=parallel.put(jax.random.PRNGKey(config.seed), repl),
                     ema_params=(parallel.put(policy.params["unet"], params_sh)
                                 if config.train.ema.enabled else None),
                     old_params=(parallel.put(policy.params["unet"], params_sh)
                                 if keeps_old_params(config) else None))
  tracker = rl.PerPromptStatTracker(config.per_prompt_stat_tracking.buffer_size,
                                    config.per_prompt_stat_tracking.min_count)
  with training_run(config, workdir, state, {"epoch": 0, "stat_tracker": tracker.state_dict()},
                    log, allow_config_change, base_weights(config)) as run:
    tracker.load_state_dict(run.meta["stat_tracker"])
    log(f"training on {parallel.describe_mesh(mesh)}{fsdp_note}")
    epoch_fn = DDPOEpoch(config, policy, terms, frozen, optimizer, mesh, tracker, run.state,
                         run.start_epoch, log)
    try:
      last = run.run_epochs(
          config.num_epochs, epoch_fn, describe=_describe_ddpo,
          save_meta=lambda: {"stat_tracker": tracker.state_dict()})
    finally:
      epoch_fn.pool.shutdown(wait=False)
  return last


def _describe_ddpo(row: dict) -> str:
  return (f"reward {row['reward_mean']:.4f} ± {row['reward_stderr']:.4f}  loss {row['loss']:.4g}"
          f"  approx_kl {row['approx_kl']:.3g}  clipfrac {row['clipfrac']:.3f}"
          f"  {row['samples_per_s']:.1f} samples/s")


@dataclasses.dataclass
class SampledEpoch:
  """An epoch's samples (`DDPOEpoch.sample_batches`), N = sample.batch_size × num_batches.

  traj: the N trajectories (`diffusion.Trajectory`, leading axis N, sharded over the data axis).
  prompts: the N global prompts, in row order.
  device_rewards: per batch, {reward name: (rewards (B,), info)} of the device rewards.
  host_rewards: per batch, {reward name: Future of this process's (rewards, info)} of the host
    rewards, running on the thread pool.
  grid_images: the first batch's images, (B, h, w, c) float32 in [0, 1] (the sample grid).
  """
  traj: object
  prompts: list
  device_rewards: list
  host_rewards: list
  grid_images: object


class DDPOEpoch:
  """DDPO's epoch function (`EpochFn`): `run_epoch` = sample every batch (host rewards on a
  thread pool overlapping the sampling), gather the rewards, advantages (`rl.advantages`),
  the update's inner epochs (and DiffusionNFT's old-policy refresh), the metrics row.

  Made once per run: compiles the sampling and update programs ahead of time (shapes from
  `state` and the first batch's host data). Its `pool` (the host rewards' threads) is the
  caller's to shut down.

  RNG: batch b of epoch e samples with key fold_in(fold_in(rng, e), b) and draws its prompts
  from `np.random.default_rng([seed, e, b])`; inner epoch i updates with fold_in(fold_in(
  fold_in(rng, e), 10_000), i), rng the run's initial `TrainState.rng`.
  """

  def __init__(self, config, policy, terms, frozen, optimizer, mesh, tracker, state,
               start_epoch: int, log):
    self.config, self.policy, self.terms, self.frozen, self.mesh = (config, policy, terms,
                                                                    frozen, mesh)
    self.optimizer, self.tracker, self.log = optimizer, tracker, log
    self.advantage_settings = rl.AdvantageSettings.from_config(config)
    self.device_terms = [(w, r) for w, r in terms if r.on_device]
    self.host_terms = [(w, r) for w, r in terms if not r.on_device]
    self.B, self.num_batches = config.sample.batch_size, config.sample.num_batches_per_epoch
    self.rows = parallel.process_rows(mesh, self.B)  # this process's rows of every batch
    # ... and of the epoch's concatenation
    self.rows_epoch = parallel.process_rows(mesh, self.B * self.num_batches)
    self.rng_host = np.asarray(parallel.to_host(state.rng))
    self._compile(state, start_epoch)
    self.concat = jax.jit(lambda trajs: jax.tree.map(lambda *xs: jnp.concatenate(xs), *trajs),
                          out_shardings=parallel.data_sharding(mesh))
    # one thread per host reward term (each its own server or scorer), at least 2
    self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(2, len(self.host_terms)))
    self.reward_keys: set[str] = set()  # the row's reward-term keys (TensorBoard's reward/)

  def __call__(self, epoch: int, state: TrainState):
    return self.run_epoch(epoch, state)

  def run_epoch(self, epoch: int, state: TrainState):
    """One epoch: (state after it, metrics row, the sample grid's images function)."""
    t0 = time.time()
    sampled = self.sample_batches(epoch, state)
    t_sampled = time.time()
    rewards, reward_metrics = self.gather_rewards(epoch, sampled)
    self.reward_keys = set(reward_metrics)
    advantages, scales = rl.advantages(rewards, sampled.prompts, self.advantage_settings,
                                       self.tracker)
    # this process's rows of the advantages, their scales and the rewards, on the devices
    update_inputs = [parallel.to_global(a.astype(np.float32)[self.rows_epoch], self.mesh)
                     for a in (advantages, scales, rewards)]
    t_rewarded = time.time()  # host rewards (overlapping sampling until then), advantages
    state, update_metrics = self.update(epoch, state, sampled.traj, *update_inputs)
    t_updated = time.time()
    n = rewards.shape[0]
    row = {"reward_mean": rewards.mean(), "reward_std": rewards.std(),
           "reward_stderr": rewards.std() / np.sqrt(n), **reward_metrics, **update_metrics,
           # Phase wall times (s); they add up to epoch_time_s (the finiteness check,
           # checkpointing and image grids come after it).
           "samples_per_s": n / (t_updated - t0), "epoch_time_s": t_updated - t0,
           "sample_time_s": t_sampled - t0, "reward_time_s": t_rewarded - t_sampled,
           "train_time_s": t_updated - t_rewarded,
           "optimizer_step": int(parallel.to_host(state.step))}
    for k in ("approx_kl", "clipfrac"):
      row.setdefault(k, 0.0)
    # the grid: this process's rows of the first batch, with their prompts and rewards
    grid_prompts = list(np.asarray(sampled.prompts[:self.B], object)[self.rows])
    grid_rewards = np.asarray(rewards[:self.B])[self.rows]
    return state, row, lambda: (to_uint8(parallel.local_rows(sampled.grid_images)),
                                grid_prompts, grid_rewards)

  # ------------------------------------------------------------------------ the phases
  def sample_batches(self, epoch: int, state: TrainState) -> SampledEpoch:
    """Samples the epoch's batches; each batch's host rewards start on the pool at once (they
    overlap the sampling of the next batches). Its time ends when the samples are ready."""
    sampled = SampledEpoch(None, [], [], [], None)
    trajs = []
    for b in tqdm.trange(self.num_batches, desc=f"epoch {epoch} sampling", leave=False,
                         position=1, dynamic_ncols=True,
                         disable=not (self.config.progress and parallel.is_main_process())):
      prompts, local = self.batch_prompts(epoch, b)
      ids, meta = prompt_inputs(self.policy, self.device_terms, local)
      meta_dev = with_sde_window(self.config, meta, len(local), epoch, b)
      ids, meta_dev = parallel.to_global((ids, meta_dev), self.mesh)
      traj, images, rewards = self.sample_fn(sampling_params(state), self.frozen,
                                             self.put_key(epoch, b), ids, meta_dev)
      # Host rewards of this process's rows run on the pool while the device samples on.
      sampled.host_rewards.append({r.name: self.pool.submit(_host_reward, r, images, local, meta)
                                   for _, r in self.host_terms})
      trajs.append(traj)
      sampled.prompts.extend(prompts)
      sampled.device_rewards.append(rewards)
      if sampled.grid_images is None:
        sampled.grid_images = images
    sampled.traj = self.concat(trajs)
    # The sampling program runs asynchronously: its time ends when its results are ready.
    jax.block_until_ready((sampled.traj, sampled.device_rewards))
    return sampled

  def gather_rewards(self, epoch: int, sampled: SampledEpoch) -> tuple[np.ndarray, dict]:
    """(the weighted sum of the reward terms, (N,) float32; {"NAME_mean", "NAME_FIELD_mean"}).

    Every process gathers every reward, in the same order. A NaN/inf reward stops the run
    (FloatingPointError); a NaN/inf in an info field (logged only) is named and left out of
    its mean."""
    total = np.zeros(self.B * self.num_batches, np.float32)
    metrics = {}
    for w, r in self.terms:
      if r.on_device:
        parts = [parallel.to_host(d[r.name]) for d in sampled.device_rewards]
      else:
        parts = [parallel.gather_rows(fs[r.name].result()) for fs in sampled.host_rewards]
      values = np.concatenate([p[0] for p in parts]).astype(np.float32)
      if not np.all(np.isfinite(values)):
        raise FloatingPointError(f"epoch {epoch}: reward {r.name!r} returned NaN/inf; "
                                 "stopping without saving this epoch")
      total += w * values
      metrics[f"{r.name}_mean"] = values.mean()
      for k in parts[0][1]:
        info = np.concatenate([np.asarray(p[1][k], np.float64).reshape(-1) for p in parts])
        finite = np.isfinite(info)
        if not finite.all():
          self.log(f"epoch {epoch}: reward {r.name!r}'s info field {k!r} has "
                   f"{int((~finite).sum())} NaN/inf of {info.size} values (logged only: left "
                   f"out of {r.name}_{k}_mean)")
        if finite.any():
          metrics[f"{r.name}_{k}_mean"] = info[finite].mean()
    return total, metrics

  def update(self, epoch: int, state: TrainState, traj, advantages, scales, rewards):
    """`train.num_inner_epochs` calls of the update program, then (DiffusionNFT) the old
    policy's refresh: (state, the last inner epoch's metrics on the host)."""
    for inner in range(self.config.train.num_inner_epochs):
      state, metrics = self.update_fn(state, self.frozen, traj, advantages, scales, rewards,
                                      self.put_key(epoch, 10_000, inner))
    if self.old_policy_fn is not None:  # DiffusionNFT: the old policy moves once per epoch
      state = self.old_policy_fn(state)
    return state, parallel.to_host(metrics)

  # ----------------------------------------------------------------------- the inputs
  def batch_prompts(self, epoch: int, b: int):
    """(global prompts, this process's prompts) of batch b of `epoch`."""
    config, policy, group = self.config, self.policy, int(self.config.sample.group_size)
    rng = np.random.default_rng([config.seed, epoch, b])
    if config.sample.prompt_sampling == "epoch_unique":  # flow_grpo: no repeats in an epoch
      drawn = prompts_lib.epoch_unique_prompts(policy.prompt_fn, config.seed, epoch, b,
                                               self.num_batches, self.B // group)
    else:  # DDPO: with replacement
      drawn = policy.prompt_fn(rng, self.B // group)
    # GRPO: B / G prompts, each G times in a row (whole groups per batch)
    prompts = np.repeat(np.asarray(drawn, object), group) if group > 1 else drawn
    return prompts, list(prompts[self.rows])

  def put_key(self, *folds: int):
    """The run's initial key folded with `folds`, replicated on the devices."""
    key = self.rng_host
    for f in folds:
      key = jax.random.fold_in(key, f)
    return parallel.put(np.asarray(key), parallel.replicated(self.mesh))

  def _compile(self, state: TrainState, start_epoch: int) -> None:
    """Compiles `sample_fn`, `update_fn` and `old_policy_fn` (DiffusionNFT, else None)."""
    data = parallel.data_sharding(self.mesh)
    _, local0 = self.batch_prompts(start_epoch, 0)
    ids0, meta0 = prompt_inputs(self.policy, self.device_terms, local0)
    meta0 = with_sde_window(self.config, meta0, len(local0), start_epoch, 0)
    t0 = time.time()
    programs = trace_programs(self.config, self.policy, self.optimizer, self.mesh,
                              self.device_terms, state, self.frozen,
                              _abstract(ids0, data, self.B),
                              {k: _abstract(v, data, self.B) for k, v in meta0.items()})
    self.sample_fn = programs["sample"].lower().compile()
    t_compile_sample = time.time() - t0
    t0 = time.time()
    self.update_fn = programs["update"].lower().compile()
    self.old_policy_fn = (programs["old_policy"].lower().compile() if "old_policy" in programs
                          else None)
    t_compile_update = time.time() - t0
    self.log(f"compiled the sample step in {t_compile_sample:.1f} s and the update step in "
             f"{t_compile_update:.1f} s")


def prompt_inputs(policy, device_terms, prompts: list[str]) -> tuple[np.ndarray, dict]:
  """(token ids (n, ...) int32, metadata {name: (n, ...) array}) of `prompts` for the sampling
  program: the policy's ids and prompt metadata, and each device reward's own (e.g. a CLIP
  reward's token ids). Host rewards read the same metadata."""
  meta = dict(policy.prompt_metadata(prompts))
  for _, r in device_terms:
    if r.prompt_metadata is not None:
      meta.update(r.prompt_metadata(prompts))
  return policy.tokenize(prompts), {k: np.asarray(v) for k, v in meta.items()}


def with_sde_window(config, meta: dict, n: int, epoch: int, batch: int) -> dict:
  """The sampling program's metadata: `meta`, plus the SDE window's steps "sde_steps" (n, T)
  bool of sampling call `batch` of `epoch` when the sampler has one
  (`dynamics.sde_window_steps`)."""
  window = dynamics.sde_window_steps(config.sample, config.seed, epoch, batch)
  if window is None:
    return meta
  return {**meta, "sde_steps": np.broadcast_to(window, (n,) + window.shape).copy()}


def trace_programs(config, policy, optimizer, mesh, device_terms, state, frozen, ids,
                   metadata) -> dict[str, jax.stages.Traced]:
  """The run's compiled phases, traced for `mesh` (`.lower().compile()` compiles one):

    "sample": one sampling call (`train.make_sample_fn`: the prompts' encoding, the whole
      trajectory scan, the decoder and the device rewards) of `sample.batch_size` samples;
    "update": one inner epoch over the epoch's N = batch_size x num_batches_per_epoch
      trajectories (`train.make_update_fn`: every micro-batch, gradient accumulation and
      optimizer step);
    "old_policy": DiffusionNFT's old-policy refresh (`train.make_old_policy_fn`), when the
      algorithm keeps one.

  The training loop (`DDPOEpoch`) and `ddpo_jax.plan` both build their programs here: `state`
  (`TrainState`) and `frozen` are arrays or `jax.ShapeDtypeStruct`s with their shardings; `ids`
  and `metadata` are one sampling call's ShapeDtypeStructs (leading axis `sample.batch_size`,
  the data sharding), e.g. from `prompt_inputs` / `with_sde_window`.
  """
  repl, data = parallel.replicated(mesh), parallel.data_sharding(mesh)
  key = jax.ShapeDtypeStruct(state.rng.shape, state.rng.dtype, sharding=repl)
  sample = make_sample_fn(policy, config, device_terms, mesh).trace(
      sampling_params(state), frozen, key, ids, metadata)
  n = int(config.sample.batch_size) * int(config.sample.num_batches_per_epoch)
  trajectories = jax.tree.map(lambda x: _abstract(x, data, n), sample.out_info[0])
  per_sample = jax.ShapeDtypeStruct((n,), jnp.float32, sharding=data)
  programs = {"sample": sample,
              "update": make_update_fn(policy, config, optimizer, mesh).trace(
                  state, frozen, trajectories, per_sample, per_sample, per_sample, key)}
  old_policy_fn = make_old_policy_fn(config, optimizer, policy, mesh)
  if old_policy_fn is not None:
    programs["old_policy"] = old_policy_fn.trace(state)
  return programs
