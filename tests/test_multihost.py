"""Multi-process DDPO on CPU (launch/local_multiprocess.sh), mesh and sharding rules, bad input."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import types

import jax
import ml_collections
import numpy as np
import pytest

from conftest import REPO
from helpers import load_config, xla_flags

from ddpo_jax.algorithms import train
from ddpo_jax.numerics import parallel
from ddpo_jax.trainer import checkpoints

LAUNCHER = os.path.join(REPO, "launch", "local_multiprocess.sh")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _main_cmd(*args):
  return [sys.executable, "-m", "ddpo_jax.main", f"--config={REPO}/ddpo_jax/configs/default.py:runlocal",
          *args]


def _params(workdir):
  step, state, _ = checkpoints.read_state(str(workdir))
  return step, [np.asarray(x) for x in jax.tree.leaves(state["params"])]


# The tiny digits config with host rewards only: each process scores its own rows (JPEG size,
# held-out SVC) and the rows are gathered, the path a remote or NumPy reward takes on a
# multi-host run; and no process spends ~10 s training the digits reward CNN. (Device rewards
# take `parallel.to_host`, covered by test_multiprocess_batch_helpers.)
_HOST_REWARD_CONFIG = """
import importlib.util
spec = importlib.util.spec_from_file_location("default_config", "{repo}/ddpo_jax/configs/default.py")
default = importlib.util.module_from_spec(spec)
spec.loader.exec_module(default)


def get_config(arg=None):
  config = default.get_config("runlocal")
  config.reward.weights = {{"jpeg_compressibility": 1.0}}
  config.reward.metrics = ("digits_heldout_accuracy",)
  config.sample.guidance_scale = 1.0  # the digits default (runlocal exercises CFG elsewhere)
  config.train.timestep_fraction = 0.5  # 2 of 4 steps: half the update's micro-steps
  return config
"""


@pytest.mark.slow  # three launches; the fast tier's kill-and-resume test is tests/test_train.py's
def test_two_processes_equal_one_process_after_kill_and_resume(digits_cache, tmp_path):
  """2 processes × 2 CPU devices with mesh (data 2, fsdp 2), killed (SIGKILL to every process)
  during epoch 1 and launched again, end with the parameters of one uninterrupted 4-device
  process (mesh data 4).

  Adam's epsilon is 1e-4 for the reason given in test_train.test_four_devices_equal_one_device
  (with 1e-8, gradients of ~1e-8 flip a parameter by ±lr depending on the reduction order).
  """
  config = tmp_path / "config.py"
  config.write_text(_HOST_REWARD_CONFIG.format(repo=REPO))
  common = [f"--config={config}", "--config.train.adam_epsilon=1e-4"]
  env = {**os.environ, "XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=4")}
  one = subprocess.run([sys.executable, "-m", "ddpo_jax.main", f"--workdir={tmp_path / 'one'}",
                        *common], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert one.returncode == 0, one.stderr[-3000:]
  assert "mesh {'data': 4, 'fsdp': 1}" in one.stdout

  multi = [LAUNCHER, "2", f"--workdir={tmp_path / 'multi'}", *common, "--config.mesh.fsdp=2",
           "--config.mesh.fsdp_min_size=64", f"--config.compilation_cache_dir={tmp_path / 'xla'}"]
  # Their own, empty model cache: both processes pre-train the digits model at once and save
  # it together (Orbax's save is collective), as a first multi-process run does.
  env = {**os.environ, "DEVICES_PER_PROCESS": "2", "DDPO_JAX_CACHE": str(tmp_path / "cache")}
  # First launch: killed, all processes at once, as soon as checkpoint 1 is committed (the run
  # is then in epoch 1 of 2).
  log = tmp_path / "killed.log"
  with open(log, "w") as out:
    proc = subprocess.Popen(multi, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)
    step1 = tmp_path / "multi" / "checkpoints" / "1"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not step1.exists():
      time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed:\n" + log.read_text()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
  killed = log.read_text()
  assert "2 processes, mesh {'data': 2, 'fsdp': 2}); fsdp splits" in killed
  assert "pre-training one" in killed
  assert "epoch 1:" not in killed, killed[-3000:]
  run = subprocess.run(multi, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, (run.stdout + run.stderr)[-5000:]
  assert "resuming from checkpoint step 1 (epoch 1)" in run.stdout + run.stderr
  assert sorted(checkpoints.manager(str(tmp_path / "multi"), read_only=True).all_steps()) == \
      [0, 1, 2]
  assert any(f.startswith("jit_update") for f in os.listdir(tmp_path / "xla"))

  step_one, a = _params(tmp_path / "one")
  step_multi, b = _params(tmp_path / "multi")
  assert step_one == step_multi == 2
  flat_a, flat_b = np.concatenate([x.ravel() for x in a]), np.concatenate([x.ravel() for x in b])
  assert not np.array_equal(flat_a, _params_at_step0(tmp_path / "one"))  # training moved them
  rel = np.linalg.norm(flat_a - flat_b) / np.linalg.norm(flat_a)
  print(f"multi-process vs single-process: relative L2 {rel:.3g}, max abs "
        f"{np.abs(flat_a - flat_b).max():.3g}")
  assert rel < 1e-5
  np.testing.assert_allclose(flat_b, flat_a, rtol=0, atol=1e-5 * np.abs(flat_a).max())

  rows_one = [json.loads(l) for l in open(tmp_path / "one" / "metrics.jsonl")]
  rows_multi = [json.loads(l) for l in open(tmp_path / "multi" / "metrics.jsonl")]
  assert [r["epoch"] for r in rows_multi] == [0, 1]
  for r1, r2 in zip(rows_one, rows_multi):  # the same samples and rewards on every topology
    for key in ("reward_mean", "jpeg_compressibility_jpeg_kb_mean", "digits_heldout_accuracy_mean"):
      np.testing.assert_allclose(r2[key], r1[key], rtol=1e-5, err_msg=key)
    np.testing.assert_allclose(r2["loss"], r1["loss"], rtol=0, atol=1e-5)


def _params_at_step0(workdir):
  _, state, _ = checkpoints.read_state(str(workdir), step=0)
  return np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(state["params"])])


_WORKER = """
import sys
import jax
import ml_collections
import numpy as np
from jax.sharding import PartitionSpec as P
from ddpo_jax.numerics import parallel

pid, port = int(sys.argv[1]), sys.argv[2]
assert parallel.initialize_distributed("auto", "127.0.0.1:" + port, 2, pid, 30)
mesh = parallel.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 2}))
assert dict(mesh.shape) == {"data": 2, "fsdp": 2}
assert [d.process_index for d in mesh.devices.flat] == [0, 0, 1, 1]
rows = parallel.process_rows(mesh, 8)
assert rows == slice(4 * pid, 4 * pid + 4), rows
x = np.arange(24, dtype=np.float32).reshape(8, 3)
g = parallel.to_global(x[rows], mesh)  # this process's prompts/advantages -> one global batch
assert g.shape == (8, 3) and not g.is_fully_addressable
np.testing.assert_array_equal(parallel.local_rows(g), x[rows])  # host rewards read these
y = jax.jit(lambda a: 2 * a, out_shardings=parallel.data_sharding(mesh))(g)
np.testing.assert_array_equal(parallel.to_host(y), 2 * x)  # device rewards -> every process
local_reward = (x[rows, 0], {"info": x[rows, 1]})
gathered = parallel.gather_rows(local_reward)  # host rewards -> every process
np.testing.assert_array_equal(gathered[0], x[:, 0])
np.testing.assert_array_equal(gathered[1]["info"], x[:, 1])
w = np.arange(256, dtype=np.float32).reshape(64, 4)
placed = parallel.put({"k": w, "b": w[0]}, parallel.param_shardings({"k": w, "b": w[0]}, mesh, 16))
assert placed["k"].sharding.spec == P("fsdp", None) and placed["b"].sharding.spec == P()
assert placed["k"].addressable_shards[0].data.shape == (32, 4)
np.testing.assert_array_equal(parallel.to_host(placed["k"]), w)
parallel.check_same_on_all_processes("config", "the same")
try:
  parallel.check_same_on_all_processes("config", "differs on process %d" % pid)
except ValueError as e:
  assert "processes [1] run a different config than process 0" in str(e), e
else:
  raise AssertionError("differing configs were not detected")
print("worker %d ok" % pid, flush=True)
"""


def test_multiprocess_batch_helpers(tmp_path):
  """to_global / local_rows / to_host / gather_rows / put on 2 processes × 2 CPU devices."""
  worker = tmp_path / "worker.py"
  worker.write_text(_WORKER)
  port = str(_free_port())
  env = {**os.environ, "XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=2"),
         "PYTHONPATH": REPO}
  procs = [subprocess.Popen([sys.executable, str(worker), str(i), port], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0 and f"worker {i} ok" in out, out[-3000:]


def test_unreachable_coordinator_is_a_clear_error(tmp_path):
  port = _free_port()  # nothing listens there
  t0 = time.time()
  result = subprocess.run(
      _main_cmd(f"--workdir={tmp_path}", f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2", "--process_id=1", "--distributed_timeout=2"),
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert f"could not reach the JAX coordinator at 127.0.0.1:{port} within 2 s" in result.stderr
  assert time.time() - t0 < 60


@pytest.mark.parametrize("counts, message", [
    # Process 1 claims 3 processes, the coordinator (process 0) expects 2: caught after joining.
    ((2, 3), "the processes disagree on the number of processes: they declared [2, 3]"),
    # Process 0 waits for a third process that never comes: JAX aborts both at the timeout.
    pytest.param((3, 2), "DEADLINE_EXCEEDED", marks=pytest.mark.slow),  # 13 s: JAX's own timeout
])
def test_mismatched_process_counts_fail_on_every_process(tmp_path, counts, message):
  port = _free_port()
  env = {**os.environ, "XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=2")}
  t0 = time.time()
  procs = [subprocess.Popen(
      _main_cmd(f"--workdir={tmp_path}", f"--coordinator_address=127.0.0.1:{port}",
                f"--num_processes={n}", f"--process_id={i}", "--distributed_timeout=3"),
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i, n in enumerate(counts)]
  outs = [p.communicate(timeout=120)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode != 0, out[-3000:]
    assert message in out, out[-3000:]
  assert time.time() - t0 < 90
  assert not os.path.exists(tmp_path / "checkpoints")


def test_launcher_stops_the_others_when_one_fails(tmp_path):
  """local_multiprocess.sh: process 1 exits with 3 while process 0 would run for minutes.

  Process 1 fails only once process 0 has written its pid: otherwise, on a loaded machine, the
  launcher may stop process 0 before it has started, and there is no pid to check.
  """
  fake = tmp_path / "fake_python.sh"
  fake.write_text(f"""#!/usr/bin/env bash
case "$*" in
  *--process_id=1*) for _ in $(seq 300); do [ -s {tmp_path}/sleeper.pid ] && exit 3; sleep 0.1; done
                    exit 4 ;;
  *) echo $$ > {tmp_path}/sleeper.pid.tmp; mv {tmp_path}/sleeper.pid.tmp {tmp_path}/sleeper.pid
     exec sleep 300 ;;
esac
""")
  fake.chmod(0o755)
  t0 = time.time()
  result = subprocess.run([LAUNCHER, "2", "--workdir=unused"], cwd=REPO, capture_output=True,
                          text=True, timeout=120,
                          env={**os.environ, "PYTHON": str(fake), "COORDINATOR_PORT": "1"})
  assert result.returncode == 3, result.stderr
  assert "process 1" in result.stderr and "stopping the others" in result.stderr
  assert time.time() - t0 < 60
  pid = int((tmp_path / "sleeper.pid").read_text())
  with pytest.raises(ProcessLookupError):
    os.kill(pid, 0)


def test_launcher_usage_error():
  result = subprocess.run([LAUNCHER], capture_output=True, text=True, timeout=30)
  assert result.returncode == 2 and "usage" in result.stderr


@pytest.mark.parametrize("kwargs, message", [
    ({"coordinator_address": "127.0.0.1:1234"}, "go together"),
    ({"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 2},
     r"--process_id=2 must lie in \[0, --num_processes=2\)"),
    ({"mode": "sometimes"}, "distributed mode"),
])
def test_bad_distributed_flags(kwargs, message):
  with pytest.raises(ValueError, match=message):
    parallel.initialize_distributed(**kwargs)


def test_single_process_without_cluster_does_not_initialize(monkeypatch):
  for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_STEP_NODELIST", "OMPI_COMM_WORLD_SIZE",
              "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES"):
    monkeypatch.delenv(var, raising=False)
  assert parallel.initialize_distributed("auto") is False
  assert parallel.initialize_distributed("off") is False
  monkeypatch.setenv("SLURM_STEP_NODELIST", "node[1-2]")
  monkeypatch.setenv("SLURM_NTASKS", "2")
  assert parallel._env_cluster() == "slurm"


def _mesh_config(**kw):
  return ml_collections.ConfigDict({"data": -1, "fsdp": 1, "fsdp_min_size": 64, **kw})


@pytest.mark.parametrize("kw, devices, expected", [
    ({}, 4, (4, 1)), ({"fsdp": 2}, 4, (2, 2)), ({"data": 2, "fsdp": 4}, 8, (2, 4)),
    ({"fsdp": 3}, 4, "mesh.fsdp=3 does not divide the 4 devices"),
    ({"data": 3}, 4, r"mesh \(data=3, fsdp=1\) needs 3 devices, but there are 4"),
    ({"data": 2, "fsdp": 4}, 4, r"needs 8 devices, but there are 4"),
    ({"fsdp": 0}, 4, "must be positive"),
])
def test_mesh_shape(kw, devices, expected):
  if isinstance(expected, str):
    with pytest.raises(ValueError, match=expected):
      parallel.mesh_shape(_mesh_config(**kw), devices)
  else:
    assert parallel.mesh_shape(_mesh_config(**kw), devices) == expected


def test_make_mesh_defaults_and_errors():
  mesh = parallel.make_mesh()  # existing callers: all devices on `data`
  assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1}
  assert parallel.data_sharding(mesh).spec == jax.sharding.PartitionSpec(("data", "fsdp"))
  assert parallel.replicated(mesh).spec == jax.sharding.PartitionSpec()
  assert parallel.process_rows(mesh, 8) == slice(0, 8)
  with pytest.raises(ValueError, match="does not divide"):
    parallel.make_mesh(_mesh_config(fsdp=jax.device_count() + 1))


class _TwoHostMesh:
  """A mesh-like object: 4 devices on 2 processes, (data 2, fsdp 2)."""
  shape = {parallel.DATA_AXIS: 2, parallel.FSDP_AXIS: 2}
  devices = np.asarray([types.SimpleNamespace(process_index=i // 2) for i in range(4)])


@pytest.mark.parametrize("batch, message", [
    (3, "not divisible by the 2 processes"), (6, "not divisible by the 4 devices"), (8, None)])
def test_batch_must_divide_hosts_and_devices(batch, message):
  if message is None:
    parallel.check_divisible("sample.batch_size", batch, _TwoHostMesh())
    return
  with pytest.raises(ValueError, match=message):
    parallel.check_divisible("sample.batch_size", batch, _TwoHostMesh())
  config = load_config("default", "runlocal", **{"sample.batch_size": batch})
  with pytest.raises(ValueError, match=message):
    train.validate_config(config, _TwoHostMesh())


@pytest.mark.parametrize("path, shape, fsdp, expected", [
    ("conv_in/kernel", (3, 3, 4, 320), 2, (None, None, None, "fsdp")),  # largest divisible axis
    ("proj/kernel", (640, 9), 2, ("fsdp", None)),  # the 9 is not divisible
    ("proj/kernel", (9, 15), 2, ()),  # no divisible axis: replicated
    ("proj/kernel", (4, 4), 2, ()),  # below fsdp_min_size
    ("conv_in/bias", (640,), 2, ()),  # biases are always replicated
    ("norm/scale", (640,), 2, ()),
    ("opt_state/0/mu/conv_in/kernel", (3, 3, 4, 320), 2, (None, None, None, "fsdp")),
    ("opt_state/1/count", (), 2, ()),
    ("conv_in/kernel", (3, 3, 4, 320), 1, ()),  # no fsdp axis: replicated
])
def test_param_sharding_rules(path, shape, fsdp, expected):
  spec = parallel.param_spec(path, shape, fsdp, min_size=64)
  assert spec == jax.sharding.PartitionSpec(*expected)


def test_param_shardings_of_a_train_state():
  """On a real TrainState: kernels and their Adam moments shard alike, the rest replicates."""
  params = {"conv": {"kernel": np.zeros((3, 3, 8, 16), np.float32), "bias": np.zeros(16)}}
  opt = train.make_optimizer(load_config("default", "runlocal").train)
  state = train.TrainState(step=np.zeros((), np.int32), params=params,
                           opt_state=opt.init(params), rng=np.zeros(2, np.uint32))
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  specs = {parallel.path_str(p): parallel.param_spec(parallel.path_str(p), x.shape, 2, 64)
           for p, x in leaves}
  split = sorted(p for p, s in specs.items() if s != jax.sharding.PartitionSpec())
  assert split == ["opt_state/1/0/mu/conv/kernel", "opt_state/1/0/nu/conv/kernel",
                   "params/conv/kernel"], specs
  assert specs["params/conv/kernel"] == jax.sharding.PartitionSpec(None, None, None, "fsdp")
  mesh = parallel.make_mesh()  # one CPU device here: everything replicated, values unchanged
  placed = parallel.put(state, parallel.param_shardings(state, mesh, min_size=64))
  np.testing.assert_array_equal(np.asarray(placed.params["conv"]["kernel"]),
                                params["conv"]["kernel"])
  assert placed.params["conv"]["kernel"].sharding.spec == jax.sharding.PartitionSpec()
