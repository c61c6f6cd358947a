"""Processes, the device mesh and shardings: one code path for 1 device, N devices and N hosts.

Every phase runs under one `jax.sharding.Mesh` with axes (`data`, `fsdp`) over all devices of
all processes (`config.mesh`; the default is all `data`). Trajectory and batch arrays are split
along their leading (sample) axis over both axes jointly; parameters and optimizer state are
replicated, except that with `fsdp > 1` large kernels are split over `fsdp` along their largest
divisible axis (`PARAM_RULES`, `param_shardings`). Batch sizes in configs are global (all
devices of all hosts together).

Multi-host: `initialize_distributed` starts `jax.distributed` from explicit flags or the
environment (SLURM, TPU VM pods, Open MPI, `JAX_COORDINATOR_ADDRESS`). Each process then holds
the rows `process_rows` of every batch: it builds that share on the host, `to_global` assembles
the global array (`jax.make_array_from_process_local_data`), `local_rows` reads the share of a
global array back, and `to_host` / `gather_rows` give every process the whole batch.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
import socket
import sys
import time
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ddpo_jax import config_schema

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)  # the sample axis is split over both, data-major

# Parameter (and optimizer-state) sharding: the first rule whose regex matches the "/"-joined
# key path decides. "replicate": a copy on every device; "fsdp": split the largest axis that
# the `fsdp` axis divides, if the array has at least `fsdp_min_size` elements (else replicated).
# Optimizer-state paths end with their parameter's path, so the same rules cover mu and nu.
PARAM_RULES = (
    (r"(^|/)(bias|scale|embedding_bias)$", "replicate"),  # vectors: tiny, read everywhere
    (r"(^|/)(count|step|rng)$", "replicate"),  # optimizer counters, the step, the PRNG key
    (r".*", "fsdp"),  # kernels and embedding tables
)
DEFAULT_FSDP_MIN_SIZE = config_schema.default("mesh.fsdp_min_size")  # elements (1 MiB in f32)


# ----------------------------------------------------------------------------- processes


def _env_cluster() -> str | None:
  """The multi-process launcher visible in the environment, or None for a single process."""
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return "JAX_COORDINATOR_ADDRESS"
  if "SLURM_STEP_NODELIST" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
    return "slurm"
  if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return "openmpi"
  hosts = env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_PROCESS_ADDRESSES") or ""
  if "," in hosts:
    return "tpu"
  return None


def wait_for_coordinator(address: str, timeout_s: float, process_id: int | None = None) -> None:
  """Blocks until a TCP connection to `address` ("host:port") succeeds.

  `jax.distributed.initialize` aborts the whole process (a C++ fatal error, no Python
  exception) when the coordinator is not there in time; checking first gives a clear error.

  Raises:
    TimeoutError: if nothing accepts connections at `address` within `timeout_s` seconds.
  """
  host, _, port = address.rpartition(":")
  host = host.strip("[]")
  if not host or not port.isdigit():
    raise ValueError(f"coordinator address {address!r} is not HOST:PORT")
  deadline = time.monotonic() + timeout_s
  error = None
  while True:
    try:
      with socket.create_connection((host, int(port)), timeout=min(2.0, max(0.1, timeout_s))):
        return
    except OSError as e:
      error = e
    if time.monotonic() >= deadline:
      raise TimeoutError(
          f"process {process_id}: could not reach the JAX coordinator at {address} within "
          f"{timeout_s:g} s ({error}). Is process 0 running, started with the same "
          f"--coordinator_address, and is port {port} open between the hosts?")
    time.sleep(0.25)


def initialize_distributed(mode: str = "auto", coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None,
                           timeout_s: int = 300, log=None) -> bool:
  """Starts `jax.distributed` when this is one of several processes; returns whether it did.

  Must run before anything touches a JAX backend.

  Args:
    mode: "auto": initialize if explicit flags are given or the environment names a
      multi-process launcher (SLURM with >1 task, Open MPI, `JAX_COORDINATOR_ADDRESS`, a
      multi-host TPU VM's `TPU_WORKER_HOSTNAMES`); "on": always (JAX detects the cluster,
      e.g. a TPU VM pod from its metadata server); "off": never (a single process).
    coordinator_address, num_processes, process_id: explicit values ("HOST:PORT" of process
      0); all three or none.
    timeout_s: how long to wait for the coordinator and for all processes to join.
    log: callable for progress lines (default: stderr).

  Raises:
    ValueError: partial or inconsistent explicit values, or processes that disagree on the
      number of processes.
    TimeoutError: the coordinator cannot be reached within `timeout_s`.
  """
  log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
  if mode not in ("auto", "on", "off"):
    raise ValueError(f"distributed mode {mode!r}; use 'auto', 'on' or 'off'")
  explicit = [v is not None for v in (coordinator_address, num_processes, process_id)]
  if any(explicit) and not all(explicit):
    raise ValueError("--coordinator_address, --num_processes and --process_id go together: "
                     f"got coordinator_address={coordinator_address!r}, "
                     f"num_processes={num_processes}, process_id={process_id}")
  if mode == "off":
    if any(explicit):
      raise ValueError("--distributed=off contradicts the coordinator flags")
    return False
  source = "flags" if any(explicit) else _env_cluster()
  if mode == "auto" and source is None:
    return False
  if any(explicit):
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id={process_id} must lie in [0, --num_processes="
                       f"{num_processes})")
  address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if address and process_id not in (None, 0):
    wait_for_coordinator(address, timeout_s, process_id)
  who = f"process {process_id} of {num_processes}" if any(explicit) else "this process"
  log(f"jax.distributed: {who} joining via {source or 'cluster auto-detection'}"
      f"{' at ' + address if address else ''}; waiting up to {timeout_s} s for all processes "
      "(if one never arrives, every process aborts with DEADLINE_EXCEEDED)")
  try:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               initialization_timeout=int(timeout_s))
  except ValueError as e:
    raise ValueError(f"jax.distributed.initialize failed ({e}); on a cluster JAX does not "
                     "detect, pass --coordinator_address, --num_processes and --process_id") from e
  exit_on_uncaught_exception()
  declared = num_processes if num_processes is not None else jax.process_count()
  counts = gather_rows(np.asarray([declared, jax.local_device_count()], np.int64)[None])
  if np.any(counts[:, 0] != jax.process_count()):
    raise ValueError(f"the processes disagree on the number of processes: they declared "
                     f"{counts[:, 0].tolist()} (process 0 first) but {jax.process_count()} "
                     "joined; pass the same --num_processes to every process")
  if len(set(counts[:, 1].tolist())) > 1:
    raise ValueError(f"processes have different numbers of devices {counts[:, 1].tolist()}; "
                     "every host must contribute the same number")
  log(f"jax.distributed: process {jax.process_index()} of {jax.process_count()}, "
      f"{jax.local_device_count()} local / {jax.device_count()} global devices")
  return True


def exit_on_uncaught_exception() -> None:
  """After an uncaught exception, print it (its traceback, then one line: the process, the
  error's type and its message's first line) and exit at once (status 1); for the CLIs.

  A normal exit waits for non-daemon threads and runs `jax.distributed.shutdown`: after a failed
  checkpoint save, Orbax's background threads wait up to 5 minutes for signals that never come,
  and the shutdown barrier waits (up to 5 minutes) for the other processes, which may
  themselves wait for this one in a collective: a hang instead of an error. The launchers stop
  the remaining processes when one exits non-zero. Calling it again changes nothing.
  """
  if getattr(sys.excepthook, "_ddpo_jax_exit", False):
    return
  previous = sys.excepthook

  def hook(exc_type, exc, tb):
    try:
      previous(exc_type, exc, tb)
      # The traceback's chain can end in a secondary error; the last line names this one.
      first = (str(exc).strip().splitlines() or [""])[0]
      print(f"process {jax.process_index()}: stopped by {exc_type.__name__}: {first}",
            file=sys.stderr)
      sys.stdout.flush()
      sys.stderr.flush()
    finally:
      os._exit(1)
  hook._ddpo_jax_exit = True
  sys.excepthook = hook


def is_main_process() -> bool:
  return jax.process_index() == 0


def check_same_on_all_processes(name: str, value: str) -> None:
  """Raises ValueError on every process if `value` (e.g. the config) differs between them."""
  if jax.process_count() == 1:
    return
  digest = np.frombuffer(hashlib.sha256(value.encode()).digest()[:8], np.int64)
  digests = gather_rows(digest[None])[:, 0]
  if len(set(digests.tolist())) > 1:
    differ = [i for i, d in enumerate(digests) if d != digests[0]]
    raise ValueError(f"processes {differ} run a different {name} than process 0; every "
                     "process must be started with the same arguments")


# ----------------------------------------------------------------------------- the mesh


def mesh_shape(mesh_config=None, num_devices: int | None = None) -> tuple[int, int]:
  """(data, fsdp) sizes from `config.mesh` (`data = -1`: all remaining devices).

  Raises:
    ValueError: if the sizes are not positive or do not multiply to the device count.
  """
  n = jax.device_count() if num_devices is None else num_devices
  data = -1 if mesh_config is None else int(mesh_config.data)
  fsdp = 1 if mesh_config is None else int(mesh_config.fsdp)
  if fsdp < 1 or data == 0 or data < -1:
    raise ValueError(f"mesh (data={data}, fsdp={fsdp}): sizes must be positive (data may be -1)")
  if data == -1:
    if n % fsdp:
      raise ValueError(f"mesh.fsdp={fsdp} does not divide the {n} devices "
                       f"({jax.process_count()} processes × {n // max(1, jax.process_count())})")
    data = n // fsdp
  if data * fsdp != n:
    raise ValueError(f"mesh (data={data}, fsdp={fsdp}) needs {data * fsdp} devices, but there "
                     f"are {n}; set mesh.data=-1 to use all of them")
  return data, fsdp


def make_mesh(mesh_config=None, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The (`data`, `fsdp`) mesh over `devices` (default: all devices of all processes).

  `make_mesh()` is all-data (fsdp = 1). Across processes, each process's devices form one
  contiguous block of the flattened mesh, in process order, so the rows of a batch a process
  holds are one contiguous slice (`process_rows`).
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_config, len(devices))
  auto = (jax.sharding.AxisType.Auto,) * 2
  mesh = jax.make_mesh(shape, BATCH_AXES, axis_types=auto, devices=devices)
  procs = [d.process_index for d in mesh.devices.flat]
  if procs != sorted(procs):  # keep each process's devices together, in process order
    ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
    mesh = Mesh(np.asarray(ordered).reshape(shape), BATCH_AXES, axis_types=auto)
  return mesh


def describe_mesh(mesh: Mesh) -> str:
  """E.g. "2 devices (cpu, 1 process, mesh {'data': 2, 'fsdp': 1})", for the training logs."""
  n = jax.process_count()
  return (f"{mesh.devices.size} devices ({jax.default_backend()}, {n} "
          f"process{'es' if n > 1 else ''}, mesh {dict(mesh.shape)})")


def batch_axes(mesh) -> tuple[str, ...]:
  """The mesh axes the sample axis is split over (both axes; only `data` for a 1-D mesh)."""
  return tuple(a for a in BATCH_AXES if a in mesh.shape)


def batch_spec(mesh) -> P:
  axes = batch_axes(mesh)
  return P(axes if len(axes) > 1 else axes[0])


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading axis split over all batch axes (`data` × `fsdp`), the rest replicated."""
  return NamedSharding(mesh, batch_spec(mesh))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def num_batch_shards(mesh) -> int:
  return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def check_divisible(name: str, value: int, mesh: Mesh) -> None:
  """Raises ValueError unless a global batch of `value` splits evenly over hosts and devices."""
  devices = getattr(mesh, "devices", None)
  hosts = len({d.process_index for d in np.asarray(devices).flat}) if devices is not None else 1
  if hosts > 1 and value % hosts:
    raise ValueError(f"{name}={value} is not divisible by the {hosts} processes (hosts); batch "
                     "sizes are global and every host samples an equal share")
  n = num_batch_shards(mesh)
  if value % n:
    raise ValueError(f"{name}={value} is not divisible by the {n} devices of the data axis; "
                     f"batch sizes are global and must split evenly over devices")


# ----------------------------------------------------------------------------- parameters


def path_str(path) -> str:
  """A pytree key path as "a/b/0/c", whatever the containers (dict, dataclass, namedtuple)."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def param_spec(path: str, shape: Sequence[int], fsdp: int, min_size: int) -> P:
  """The PartitionSpec `PARAM_RULES` give a parameter of `shape` at key path `path`."""
  for pattern, action in PARAM_RULES:
    if re.search(pattern, path):
      break
  if action == "replicate" or fsdp == 1 or math.prod(shape) < min_size:
    return P()
  # The largest axis the fsdp axis divides (the last one on ties: conv output channels).
  best = max((i for i, d in enumerate(shape) if d % fsdp == 0), default=None,
             key=lambda i: (shape[i], i))
  if best is None:
    return P()
  spec = [None] * len(shape)
  spec[best] = FSDP_AXIS
  return P(*spec)


def param_shardings(tree: Any, mesh: Mesh, min_size: int | None = None) -> Any:
  """NamedShardings of a params / optimizer-state / train-state pytree under `PARAM_RULES`.

  Leaves may be arrays or ShapeDtypeStructs; scalars and non-array leaves are replicated.
  """
  fsdp = mesh.shape.get(FSDP_AXIS, 1)
  min_size = DEFAULT_FSDP_MIN_SIZE if min_size is None else int(min_size)

  def one(path, leaf):
    shape = getattr(leaf, "shape", ())
    return NamedSharding(mesh, param_spec(path_str(path), tuple(shape), fsdp, min_size))
  return jax.tree_util.tree_map_with_path(one, tree)


def fsdp_min_size(config) -> int:
  """`config.mesh.fsdp_min_size`: fsdp splits arrays of at least this many elements."""
  return int(config.mesh.fsdp_min_size)


def put(tree: Any, shardings: Any) -> Any:
  """Places a pytree whose values are the same on every process onto (global) shardings.

  `shardings` is a sharding or a pytree of them matching `tree`. Each process copies only the
  pieces its own devices hold; there is no cross-process check or transfer.
  """
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, tree)

  def one(x, sharding):
    if isinstance(x, jax.Array) and x.sharding == sharding:
      return x
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])
  return jax.tree.map(one, tree, shardings)


# ----------------------------------------------------------------------------- batches


def process_rows(mesh: Mesh, n: int) -> slice:
  """The rows [start, stop) of a global batch of `n` this process holds under `data_sharding`."""
  index_map = data_sharding(mesh).addressable_devices_indices_map((n,))
  starts = sorted({(idx[0].start or 0, n if idx[0].stop is None else idx[0].stop)
                   for idx in index_map.values()})
  lo, hi = starts[0][0], starts[-1][1]
  covered = sum(b - a for a, b in starts)
  if covered != hi - lo:
    raise ValueError(f"this process's rows of the batch are not contiguous: {starts}")
  return slice(lo, hi)


def to_global(local: Any, mesh: Mesh) -> Any:
  """This process's rows (`process_rows`) of a batch pytree -> global batch-sharded arrays."""
  sharding = data_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local)


def local_rows(x: jax.Array) -> np.ndarray:
  """The rows of a batch-sharded global array that this process holds, in order, on the host."""
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  shards = {}
  for s in x.addressable_shards:
    start = (s.index[0].start or 0) if s.index else 0
    shards.setdefault(start, s.data)
  return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)])


def gather_rows(local: Any) -> Any:
  """Concatenates every process's host rows, in process order (identity for one process).

  A collective: every process must call it, in the same order.
  """
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, local)
  from jax.experimental import multihost_utils
  return jax.tree.map(np.asarray, multihost_utils.process_allgather(local, tiled=True))


def to_host(x: Any) -> Any:
  """Global arrays -> NumPy on every process (a collective when they span several processes)."""
  def one(a):
    if not isinstance(a, jax.Array) or a.is_fully_addressable or a.is_fully_replicated:
      return np.asarray(jax.device_get(a))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(a, tiled=True))
  return jax.tree.map(one, x)
