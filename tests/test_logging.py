"""Seeing a run: wandb (offline), captioned sample grids, grouped TensorBoard tags with the
learning rate and hparams, WORKDIR/config.json, a finished run re-run, Orbax's INFO lines.

One digits runlocal run (2 epochs) with wandb offline is shared by the module's tests."""
import glob
import json
import logging
import os
import struct
import sys
import time

import numpy as np
import pytest

from helpers import load_config

from ddpo_jax.trainer import checkpoints, logging_sinks, loop

try:
  import wandb  # noqa: F401  (optional: `pip install wandb`)
  WANDB = "offline"
except ImportError:
  WANDB = ""


def _config(**overrides):
  return load_config("default", "runlocal", **{"logging.wandb": WANDB, **overrides})


def _events(logdir: str) -> list:
  """The Event protos of every TensorBoard event file under `logdir` (TFRecord framing: length
  u64, its CRC u32, the data, its CRC u32)."""
  from tensorboardX.proto import event_pb2
  events = []
  for path in sorted(glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"),
                               recursive=True)):
    data = open(path, "rb").read()
    at = 0
    while at + 12 <= len(data):
      (n,) = struct.unpack("<Q", data[at:at + 8])
      event = event_pb2.Event()
      event.ParseFromString(data[at + 12:at + 12 + n])
      events.append((path, event))
      at += 12 + n + 4
  return events


@pytest.fixture(scope="module")
def logged_run(digits_cache, tmp_path_factory):
  """(workdir, config, the log's lines) of the 2-epoch digits run, with wandb offline when it
  is installed."""
  saved = {k: os.environ.get(k) for k in ("WANDB_SILENT", "WANDB_API_KEY")}
  os.environ["WANDB_SILENT"] = "true"
  os.environ.pop("WANDB_API_KEY", None)
  workdir = str(tmp_path_factory.mktemp("logged_run") / "run")
  config, said = _config(), []
  try:
    loop.train_and_evaluate(config, workdir, log=said.append)
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
  return workdir, config, said


def test_a_run_is_seen_in_tensorboard_grids_and_config_json(logged_run):
  workdir, config, _ = logged_run
  # WORKDIR/config.json is the run's config
  with open(os.path.join(workdir, "config.json")) as f:
    assert f.read().strip() == config.to_json(indent=2).strip()

  # the captioned grid: 8 samples of 8x8, each upscaled and captioned, grouped by prompt
  from PIL import Image
  pngs = sorted(os.listdir(os.path.join(workdir, "samples")))
  assert pngs == ["epoch_00000.png", "epoch_00001.png"]
  with Image.open(os.path.join(workdir, "samples", pngs[-1])) as im:
    assert im.size[::-1] == logging_sinks.grid_size(8, 8, 8) == (500, 392)
  assert logging_sinks.group_by_prompt(["a", "b", "a", "c", "b"]) == [0, 2, 1, 4, 3]

  # TensorBoard: grouped tags, the learning rate each epoch, the grid, hparams
  events = _events(os.path.join(workdir, "tensorboard"))
  scalars = {}
  for _, e in events:
    for v in e.summary.value:
      scalars.setdefault(v.tag, []).append((e.step, v.simple_value))
  assert {"reward/reward_mean", "reward/digit_class_logprob_mean", "train/loss",
          "train/approx_kl", "time/epoch_time_s", "samples/grid"} <= set(scalars)
  assert scalars["train/learning_rate"] == [(0, pytest.approx(config.train.learning_rate)),
                                            (1, pytest.approx(config.train.learning_rate))]
  assert not [t for t in scalars if "/" not in t and not t.startswith("_hparams_")], scalars
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["epoch"] for r in rows] == [0, 1]  # metrics.jsonl keeps its flat keys
  np.testing.assert_allclose([v for _, v in scalars["reward/reward_mean"]],
                             [r["reward_mean"] for r in rows], rtol=1e-6)
  # hparams (every config key) with the final metrics, in tensorboard/hparams
  hparams = [e for path, e in events if f"{os.sep}hparams{os.sep}" in path]
  assert {"final/reward_mean", "final/loss"} <= {v.tag for e in hparams for v in e.summary.value}
  assert scalars["final/reward_mean"] == [(0, pytest.approx(rows[-1]["reward_mean"]))]


def test_wandb_offline_run_holds_the_metrics_and_grids(logged_run):
  pytest.importorskip("wandb")
  workdir, _, said = logged_run
  assert any(line.startswith("wandb (offline): run ") for line in said), said
  # wandb offline: its run id kept for a resume, the run's files under WORKDIR/wandb
  run_id = open(os.path.join(workdir, "wandb", "run_id")).read().strip()
  runs = glob.glob(os.path.join(workdir, "wandb", f"offline-run-*-{run_id}"))
  assert len(runs) == 1, os.listdir(os.path.join(workdir, "wandb"))
  history = open(os.path.join(runs[0], f"run-{run_id}.wandb"), "rb").read()
  for name in (b"reward/reward_mean", b"train/loss", b"train/learning_rate",
               b"time/epoch_time_s", b"samples/grid"):
    assert name in history, name



def test_a_finished_run_says_so_at_once_without_compiling(logged_run, monkeypatch):
  workdir, config, _ = logged_run
  def no_build(*a, **k):
    raise AssertionError("a finished run built the model")
  monkeypatch.setattr(loop, "build_policy", no_build)
  said = []
  t0 = time.time()
  last = loop.train_and_evaluate(_config(**{"logging.wandb": ""}), workdir, log=said.append)
  assert time.time() - t0 < 15
  assert any("is finished" in line and "num_epochs" in line for line in said), said
  assert not any("compiled" in line for line in said), said
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert last == {k: v for k, v in rows[-1].items() if k != "epoch"}


def test_wandb_enabled_but_missing_is_a_clear_error(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
  with pytest.raises(ImportError, match="pip install wandb"):
    loop.train_and_evaluate(_config(**{"logging.wandb": "offline"}), str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_orbax_info_lines_are_off(logged_run):
  workdir, _, _ = logged_run
  records = []
  class Keep(logging.Handler):
    def emit(self, record):
      records.append(record)
  absl_logger = logging.getLogger("absl")
  handler, level = Keep(level=logging.DEBUG), absl_logger.level
  absl_logger.addHandler(handler)
  absl_logger.setLevel(logging.DEBUG)
  try:
    checkpoints.read_state(workdir)
  finally:
    absl_logger.removeHandler(handler)
    absl_logger.setLevel(level)
  orbax = [r for r in records if "orbax" in r.pathname]
  assert not [r for r in orbax if r.levelno < logging.WARNING], orbax
  assert not [r for r in orbax if "read only" in r.getMessage()], orbax
