"""A run's WORKDIR: refused when empty, one run at a time (a lock a killed process does not
leave held), metrics rows never dropped by a new run, a full disk said as such with
metrics.jsonl cut back and the run resumable. The loop (`loop.training_run`) runs here with a
small real TrainState and an epoch function of its own, so each fault is exact and quick."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import REPO
from helpers import load_config

from ddpo_jax.algorithms import train
from ddpo_jax.trainer import checkpoints, loop, workdir as workdir_lib


def _state(seed: int = 0) -> train.TrainState:
  params = {"w": jnp.arange(64, dtype=jnp.float32) + seed, "b": jnp.zeros((8,), jnp.float32)}
  return train.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=optax.adam(1e-3).init(params), rng=jax.random.PRNGKey(seed))


def _epoch(epoch, state):
  state = state.replace(params=jax.tree.map(lambda x: x + 1.0, state.params),
                        step=state.step + 1)
  return state, {"value": float(epoch) * 2.0}, None


def _run(workdir, num_epochs, epoch_fn=_epoch, log=lambda message: None, **config_overrides):
  config = load_config("default", "runlocal", **{"save_freq": 1, "num_epochs": num_epochs,
                                                 **config_overrides})
  with workdir_lib.lock(workdir, log):
    with loop.training_run(config, workdir, _state(), {"epoch": 0}, log) as run:
      return run.run_epochs(num_epochs, epoch_fn)


def _rows(workdir, name="metrics.jsonl"):
  with open(os.path.join(workdir, name)) as f:
    return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------- empty WORKDIR
@pytest.mark.parametrize("workdir", ["", "  "])
def test_an_empty_workdir_is_refused_before_anything_is_written(workdir, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  config = load_config("default", "runlocal")
  with pytest.raises(ValueError, match="--workdir is empty"):
    loop.train_and_evaluate(config, workdir)
  from ddpo_jax.trainer.runs import restore_run
  with pytest.raises(ValueError, match="--workdir is empty"):
    restore_run(workdir)
  assert os.listdir(tmp_path) == []


def test_the_cli_refuses_an_empty_workdir(tmp_path):
  result = subprocess.run([sys.executable, "-m", "ddpo_jax.main",
                           f"--config={REPO}/ddpo_jax/configs/default.py:runlocal", "--workdir="],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert result.stderr.strip().splitlines()[-1] == (
      "process 0: stopped by ValueError: --workdir is empty (an unset shell variable?): name the run's directory, e.g. "
      "--workdir=workdirs/my_run")
  assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- one run per WORKDIR
_HOLD = """
import sys, time
from ddpo_jax.trainer import workdir
with workdir.lock(sys.argv[1]):
  print("locked", flush=True)
  time.sleep(120)
"""


def _holder(workdir):
  proc = subprocess.Popen([sys.executable, "-c", _HOLD, workdir], stdout=subprocess.PIPE,
                          text=True)
  assert proc.stdout.readline().strip() == "locked"
  return proc


def test_a_second_run_on_a_workdir_stops_naming_the_first_and_touches_nothing(tmp_path):
  workdir = str(tmp_path / "run")
  _run(workdir, 2)
  before = {p: os.path.getmtime(os.path.join(workdir, p)) for p in os.listdir(workdir)}
  metrics = open(os.path.join(workdir, "metrics.jsonl")).read()
  holder = _holder(workdir)
  try:
    config = load_config("default", "runlocal", num_epochs=4)
    start = time.time()
    with pytest.raises(workdir_lib.WorkdirInUseError,
                       match=rf"{workdir} is in use by another run: host \S+, pid {holder.pid}, "
                             r"started 20\d\d-.*\. Wait for it to end"):
      loop.train_and_evaluate(config, workdir)
    assert time.time() - start < 30  # before the model is built or anything compiles
  finally:
    holder.kill()
    holder.wait()
  after = {p: os.path.getmtime(os.path.join(workdir, p)) for p in os.listdir(workdir)}
  assert {p: t for p, t in after.items() if p != workdir_lib.LOCK_FILE} == {
      p: t for p, t in before.items() if p != workdir_lib.LOCK_FILE}
  assert open(os.path.join(workdir, "metrics.jsonl")).read() == metrics
  # The killed holder left no lock behind: the run resumes.
  assert _run(workdir, 3) == {"value": 4.0}
  assert [r["epoch"] for r in _rows(workdir)] == [0, 1, 2]


def test_the_lock_is_reentrant_in_one_process_and_released_after(tmp_path):
  workdir = str(tmp_path / "run")
  with workdir_lib.lock(workdir):
    with workdir_lib.lock(workdir):  # CTRL's DDPO solver opens the loop inside CTRL's run
      pass
    holder = subprocess.run([sys.executable, "-c", _HOLD.replace("time.sleep(120)", ""),
                             workdir], capture_output=True, text=True, timeout=120)
    assert holder.returncode != 0 and "is in use by another run" in holder.stderr
  holder = subprocess.run([sys.executable, "-c", _HOLD.replace("time.sleep(120)", ""), workdir],
                          capture_output=True, text=True, timeout=120)
  assert holder.returncode == 0, holder.stderr


# ----------------------------------------------------------------------------- metrics kept
def test_a_new_run_keeps_an_old_metrics_file_beside_its_own(tmp_path):
  """A workdir whose checkpoints were deleted (or all set aside as damaged) starts afresh; the
  old rows are moved aside, not dropped."""
  workdir = str(tmp_path / "run")
  said = []
  _run(workdir, 3)
  old = open(os.path.join(workdir, "metrics.jsonl")).read()
  import shutil
  shutil.rmtree(os.path.join(workdir, "checkpoints"))
  _run(workdir, 2, log=said.append)
  aside = [n for n in os.listdir(workdir) if n.startswith("metrics.jsonl.before-")]
  assert len(aside) == 1
  assert open(os.path.join(workdir, aside[0])).read() == old
  assert [r["epoch"] for r in _rows(workdir)] == [0, 1]
  assert any("kept them as" in line and aside[0] in line for line in said), said


def test_a_resume_cuts_only_rows_past_its_checkpoint_in_place(tmp_path):
  workdir = str(tmp_path / "run")
  _run(workdir, 3)
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path, "a") as f:  # a row past the last checkpoint and a line cut short by a crash
    f.write(json.dumps({"epoch": 3, "value": 99.0}) + "\n" + '{"epoch": 4, "val')
  _run(workdir, 4)
  assert [(r["epoch"], r["value"]) for r in _rows(workdir)] == [(0, 0.0), (1, 2.0), (2, 4.0),
                                                                (3, 6.0)]


# ----------------------------------------------------------------------------- a full disk
@pytest.fixture
def small_disk(tmp_path):
  """A 4 MiB tmpfs (root only: skipped where it cannot be mounted)."""
  path = tmp_path / "disk"
  path.mkdir()
  result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(path)],
                          capture_output=True, text=True)
  if result.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
  yield str(path)
  subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_disk_says_so_keeps_the_workdir_consistent_and_resumes(small_disk):
  workdir = os.path.join(small_disk, "run")
  filler = os.path.join(small_disk, "filler")

  def fill_the_disk_at_epoch_2(epoch, state):
    if epoch == 2:
      with open(filler, "wb") as f:
        try:
          while True:
            f.write(b"\0" * 65536)
            f.flush()
        except OSError:
          pass
    return _epoch(epoch, state)

  said = []
  with pytest.raises(loop.DiskFullError) as error:
    _run(workdir, 5, fill_the_disk_at_epoch_2, log=said.append)
  message = str(error.value)
  assert message.startswith(f"no space left on the device holding {workdir}")
  committed = int(message.split("resume from checkpoint step ")[1].split()[0])
  assert committed in (1, 2, 3)
  assert checkpoints.manager(workdir, read_only=True).latest_step() == committed
  assert [r["epoch"] for r in _rows(workdir)] == list(range(committed))
  os.remove(filler)
  assert _run(workdir, 5) == {"value": 8.0}
  assert [(r["epoch"], r["value"]) for r in _rows(workdir)] == [(e, 2.0 * e) for e in range(5)]


# ----------------------------------------------------------------------------- checked first
@pytest.mark.parametrize("key, value, message", [
    ("train.learning_rate", float("inf"), r"train.learning_rate=inf is outside its valid range"),
    ("sample.guidance_scale", float("inf"), r"sample.guidance_scale=inf is outside"),
    ("train.rwr_beta", 0.0, r"train.rwr_beta=0.0 is outside .* \(0, inf\)"),
    ("seed", -1, r"seed=-1 is outside its valid range"),
])
def test_bad_values_stop_the_run_before_anything_is_built_or_saved(key, value, message,
                                                                    tmp_path):
  workdir = str(tmp_path / "run")
  config = load_config("default", "runlocal", **{key: value})
  start = time.time()
  with pytest.raises(ValueError, match=message):
    loop.train_and_evaluate(config, workdir)
  assert time.time() - start < 5  # no model built, nothing compiled
  assert not os.path.exists(workdir)  # nothing saved: the corrected re-run starts cleanly


def test_a_changed_model_config_stops_a_resume_before_the_model_is_built(tmp_path, monkeypatch):
  """The saved-config check comes first: a changed model is named without pre-training it."""
  workdir = str(tmp_path / "run")
  _run(workdir, 1)
  cache = tmp_path / "empty_cache"
  cache.mkdir()
  monkeypatch.setenv("DDPO_JAX_CACHE", str(cache))
  config = load_config("default", "runlocal", **{"model.channels": (12, 24)})
  said = []
  with pytest.raises(checkpoints.ConfigChangedError,
                     match=r"model.channels: \[8, 16\] -> \[12, 24\]"):
    loop.train_and_evaluate(config, workdir, log=said.append)
  assert os.listdir(cache) == [] and not any("pre-training" in line for line in said)
