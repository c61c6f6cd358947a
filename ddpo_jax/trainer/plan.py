"""Compile a run's programs for a TPU or GPU topology without the hardware: memory, FLOPs,
collectives and a projected throughput, before the run is paid for (`python -m ddpo_jax.plan`).

`plan_run(config, topology)` builds the run's policy from its model's configs alone
(`families.build_base_policy(config, abstract=True)`: parameter shapes, no weights), the train
state, frozen params and one sampling call's inputs as `jax.ShapeDtypeStruct`s with the
shardings the trainer gives them, traces the run's programs with the trainer's own code
(`loop.trace_programs`: sampling, the update, DiffusionNFT's old-policy refresh) and compiles
each for the topology's compile-only devices:

* TPU (`jax.experimental.topologies.get_topology_desc(topology_name=..., platform="tpu")`,
  needs libtpu: `pip install -e ".[tpu-plan]"`);
* NVIDIA H100 / H200 (`platform="cuda"` with a target description, `gpu_targets/*.txtpb`;
  needs the CUDA plugin: `pip install "jax-cuda12-plugin[with-cuda]"`, no GPU).

Per program and per device it reports XLA's `memory_analysis()` (arguments, outputs,
temporaries, generated code; donated arguments counted once) against the chip's HBM, the
matmul/convolution FLOPs (`numerics.flops`: XLA's cost analysis counts a loop body once, so
the sampling scan would count one step), XLA's bytes accessed (loop bodies once), the
collectives in the compiled HLO (kind, count, bytes of their results; a collective inside a
loop counts once) and the compile time. These are compile-time numbers and projections,
not measurements.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from typing import Any

import jax
import numpy as np

from ddpo_jax.algorithms.train import (frozen_params, make_optimizer, model_shardings,
                                       new_train_state, validate_config)
from ddpo_jax.models import backend
from ddpo_jax.numerics import flops as flops_lib, parallel
from ddpo_jax.rewards import build_term, is_remote, term_names
from ddpo_jax.trainer.families import build_base_policy
from ddpo_jax.trainer.loop import prompt_inputs, trace_programs, with_sde_window

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
  """An accelerator: HBM per chip (bytes), peak dense bfloat16 FLOP/s per chip, and where the
  numbers are published."""
  name: str
  hbm_bytes: int
  peak_bf16_flops: float
  source: str


CHIPS = {
    "v4": Chip("TPU v4", 32 * GiB, 275e12, "cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("TPU v5e", 16 * GiB, 197e12, "cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("TPU v5p", 95 * GiB, 459e12, "cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("TPU v6e (Trillium)", 32 * GiB, 918e12, "cloud.google.com/tpu/docs/v6e"),
    "h100": Chip("NVIDIA H100 SXM", 80 * 10 ** 9, 989e12,
                 "nvidia.com/en-us/data-center/h100 (dense BF16 Tensor Core, SXM)"),
    "h200": Chip("NVIDIA H200 SXM", 141 * 10 ** 9, 989e12,
                 "nvidia.com/en-us/data-center/h200 (dense BF16 Tensor Core, SXM)"),
}

# Short names (Cloud TPU's accelerator types: TensorCores for v4 / v5p, chips for v5e / v6e)
# -> get_topology_desc names (chips per axis).
TOPOLOGY_ALIASES = {
    "v4-8": "v4:2x2x1", "v4-32": "v4:2x2x4",
    "v5e-4": "v5e:2x2", "v5e-8": "v5e:2x4", "v5e-16": "v5e:4x4", "v5e-256": "v5e:16x16",
    "v5p-8": "v5p:2x2x1", "v5p-16": "v5p:2x2x2", "v5p-32": "v5p:2x2x4", "v5p-64": "v5p:2x4x4",
    "v5p-128": "v5p:4x4x4",
    "v6e-4": "v6e:2x2", "v6e-8": "v6e:2x4", "v6e-16": "v6e:4x4",
    "h100-1": "h100:1x1x1", "h100-8": "h100:1x1x8", "h100-16": "h100:1x2x8",
    "h200-1": "h200:1x1x1", "h200-8": "h200:1x1x8", "h200-16": "h200:1x2x8",
}
_TOPOLOGY = re.compile(r"^(v4|v5e|v5p|v6e|h100|h200):(\d+(?:x\d+){1,2})$")
GPU_TARGETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_targets")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
MFUS = (0.2, 0.4, 0.6)


@dataclasses.dataclass(frozen=True)
class Topology:
  """A resolved topology: its `get_topology_desc` name, chip, chip count and devices."""
  name: str
  chip_kind: str
  num_chips: int
  devices: tuple

  @property
  def chip(self) -> Chip:
    return CHIPS[self.chip_kind]

  @property
  def platform(self) -> str:
    """"tpu" or "gpu": the platform the programs are traced for (`models.backend`)."""
    return "gpu" if self.chip_kind in ("h100", "h200") else "tpu"

  @property
  def hbm_bytes_per_device(self) -> int:
    """HBM per device (a v4 chip shows its 2 TensorCores as 2 compile-only devices)."""
    return self.chip.hbm_bytes * self.num_chips // len(self.devices)


def resolve_topology_name(name: str) -> tuple[str, str, str]:
  """(chip kind, full name "v5e:2x4", the shape "2x4") of a topology name or alias.

  Raises:
    ValueError: an unknown name (one line, listing the aliases).
  """
  full = TOPOLOGY_ALIASES.get(name, name)
  match = _TOPOLOGY.match(full)
  if not match:
    raise ValueError(f"unknown topology {name!r}: give CHIP:SHAPE (chips v4, v5e, v5p, v6e as "
                     "get_topology_desc names them, e.g. v5e:2x4, v5p:2x2x1; h100 / h200 as "
                     "PARTITIONSxHOSTSxGPUS, e.g. h100:1x1x8) or an alias: "
                     f"{', '.join(TOPOLOGY_ALIASES)}")
  return match.group(1), full, match.group(2)


def make_topology(name: str) -> Topology:
  """The compile-only devices of topology `name` (see `resolve_topology_name`).

  Raises:
    ValueError: an unknown name; RuntimeError: the platform's compiler is not installed.
  """
  from jax.experimental import topologies
  kind, full, shape = resolve_topology_name(name)
  # libtpu takes a machine-wide lock (/tmp/libtpu_lockfile) so that one process drives the
  # TPUs; compile-only devices drive nothing, and plans (or test workers) may run side by side.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  if kind in ("h100", "h200"):
    with open(os.path.join(GPU_TARGETS, f"{kind}.txtpb")) as f:
      target = f.read()
    try:
      desc = topologies.get_topology_desc(platform="cuda", topology=shape, target_config=target)
    except Exception as e:  # the plugin missing or failing to load
      raise RuntimeError(
          f"cannot make compile-only {kind} devices ({type(e).__name__}: "
          f"{str(e).splitlines()[0] if str(e) else ''}); install the CUDA plugin "
          "(pip install \"jax-cuda12-plugin[with-cuda]\", the jax version's) and set "
          "JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 (`python -m ddpo_jax.plan` does)") from e
  else:
    try:
      desc = topologies.get_topology_desc(topology_name=full, platform="tpu")
    except Exception as e:
      raise RuntimeError(
          f"cannot make compile-only TPU devices for {full} ({type(e).__name__}: "
          f"{str(e).splitlines()[0] if str(e) else ''}); install libtpu: "
          "pip install -e \".[tpu-plan]\"") from e
  num_chips = math.prod(int(d) for d in shape.split("x"))
  return Topology(full, kind, num_chips, tuple(desc.devices))


# ----------------------------------------------------------------------------- one program
@dataclasses.dataclass
class ProgramPlan:
  """One compiled program's per-device numbers (bytes, FLOPs) and its collectives."""
  name: str
  bytes: dict
  fits: bool
  flops: float
  xla_flops: float | None
  bytes_accessed: float | None
  collectives: list
  compile_s: float
  largest_arguments: list

  def as_json(self) -> dict:
    return dataclasses.asdict(self)


def _collectives(hlo_text: str) -> list[dict]:
  """[{"kind", "count", "bytes"}] of the collectives in compiled HLO text: each instruction
  (an async pair's start) once, bytes its result's (per device; an async start's last tuple
  element)."""
  found: dict[str, list] = {}
  pattern = re.compile(r"=\s*(\(.*?\)|\S+)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
  for line in hlo_text.splitlines():
    match = pattern.search(line)
    if not match:
      continue
    shapes = re.findall(r"([a-z]+[0-9]*)\[([0-9,]*)\]", match.group(1))
    if match.group(3) and len(shapes) > 1:  # async start: (operands..., result)
      shapes = shapes[-1:]
    size = sum(_dtype_bytes(dt) * math.prod(int(d) for d in dims.split(",") if d)
               for dt, dims in shapes)
    entry = found.setdefault(match.group(2), [0, 0])
    entry[0] += 1
    entry[1] += size
  return [{"kind": k, "count": c, "bytes": b} for k, (c, b) in sorted(found.items())]


def _dtype_bytes(name: str) -> int:
  if name == "pred":
    return 1
  bits = re.search(r"(\d+)$", name)
  return max(1, int(bits.group(1)) // 8) if bits else 4


def _per_device_bytes(x) -> int:
  sharding = getattr(x, "sharding", None)
  shape = sharding.shard_shape(x.shape) if sharding is not None else x.shape
  return int(math.prod(shape)) * np.dtype(x.dtype).itemsize


def _largest_arguments(args, n: int = 5) -> list[dict]:
  leaves = jax.tree_util.tree_flatten_with_path(args)[0]
  rows = [{"path": parallel.path_str(path), "shape": list(x.shape), "dtype": str(x.dtype),
           "bytes": _per_device_bytes(x)} for path, x in leaves if hasattr(x, "shape")]
  return sorted(rows, key=lambda r: -r["bytes"])[:n]


def plan_program(name: str, traced, args, topology: Topology,
                 compile: bool = True) -> ProgramPlan:
  """Compiles one traced program for `topology` and reads its numbers; `compile=False`: the
  FLOPs only (from the jaxpr; bytes, collectives and the verdict are None)."""
  num_devices = len(topology.devices)
  count = flops_lib.jaxpr_matmul_flops(traced.jaxpr)
  if not compile:
    return ProgramPlan(name=name, bytes=None, fits=None, flops=count.flops / num_devices,
                       xla_flops=None, bytes_accessed=None, collectives=None, compile_s=None,
                       largest_arguments=_largest_arguments(args))
  t0 = time.time()
  compiled = traced.lower().compile()
  compile_s = time.time() - t0
  mem = compiled.memory_analysis()
  sizes = {"arguments": int(mem.argument_size_in_bytes), "outputs": int(mem.output_size_in_bytes),
           "temporaries": int(mem.temp_size_in_bytes),
           "code": int(mem.generated_code_size_in_bytes),
           "aliased": int(mem.alias_size_in_bytes)}
  sizes["total"] = (sizes["arguments"] + sizes["outputs"] - sizes["aliased"]
                    + sizes["temporaries"] + sizes["code"])
  try:
    cost = compiled.cost_analysis() or {}
  except Exception:  # some plugins do not implement it
    cost = {}
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return ProgramPlan(
      name=name, bytes=sizes, fits=sizes["total"] <= topology.hbm_bytes_per_device,
      flops=count.flops / num_devices, xla_flops=cost.get("flops"),
      bytes_accessed=cost.get("bytes accessed"), collectives=_collectives(compiled.as_text()),
      compile_s=compile_s, largest_arguments=_largest_arguments(args))


# ----------------------------------------------------------------------------- the run
@dataclasses.dataclass
class Plan:
  """A run's plan on a topology (`plan_run`); `as_json` is `--json`'s content."""
  topology: Topology
  programs: list
  flops_per_sample: float
  samples_per_epoch: int
  notes: list

  @property
  def fits(self) -> bool | None:
    """Whether every program fits; None when they were not compiled (`compile=False`)."""
    if any(p.fits is None for p in self.programs):
      return None
    return all(p.fits for p in self.programs)

  def samples_per_s_per_chip(self, mfu: float) -> float:
    """Projected samples/s per chip: peak bf16 FLOP/s x `mfu` / FLOPs per sample."""
    return self.topology.chip.peak_bf16_flops * mfu / self.flops_per_sample

  def as_json(self) -> dict:
    return {"topology": self.topology.name, "num_devices": len(self.topology.devices),
            "num_chips": self.topology.num_chips,
            "hbm_bytes_per_device": self.topology.hbm_bytes_per_device,
            "fits": self.fits, "programs": [p.as_json() for p in self.programs],
            "flops_per_sample": self.flops_per_sample,
            "samples_per_epoch": self.samples_per_epoch,
            "projected_samples_per_s_per_chip": {
                f"{m:g}": self.samples_per_s_per_chip(m) for m in MFUS},
            "peak_bf16_flops_per_chip": self.topology.chip.peak_bf16_flops,
            "notes": self.notes}


def _with_shardings(tree, shardings):
  """ShapeDtypeStructs of `tree` carrying `shardings` (one sharding, or a matching tree)."""
  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings),
                        tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def _device_terms(config, policy, notes: list, log) -> list:
  """The device reward terms that can be built on this machine; the others are left out of the
  sampling program with a note (weights that are not here, a Hub id offline), as are the host
  and reward-server terms (they run outside the compiled programs)."""
  terms = []
  for name, weight in term_names(config).items():
    if is_remote(name):
      notes.append(f"reward {name!r} is scored by a reward server (outside the programs)")
      continue
    try:
      reward = build_term(name, config, policy.rewards, log)
    except Exception as e:  # its weights are not on this machine
      first = (str(e).strip().splitlines() or [""])[0]
      notes.append(f"reward {name!r} left out of the sampling program: it could not be built "
                   f"here ({type(e).__name__}: {first[:200]})")
      continue
    if reward.on_device:
      terms.append((float(weight), reward))
    else:
      notes.append(f"reward {name!r} runs on the host (outside the programs)")
  return terms


def plan_run(config, topology: Topology, log=lambda msg: None, compile: bool = True) -> Plan:
  """Builds and compiles `config`'s programs for `topology` (see the module docstring);
  `compile=False` traces them only: FLOPs and the projection, no memory (seconds, not minutes).

  Raises:
    ValueError: a config the trainer refuses for this topology's devices (a mesh that does not
      divide them, a batch not divisible by the data axis, ...), before anything is compiled.
  """
  if config.mode != "ddpo":
    raise ValueError(f"plan covers config.mode='ddpo' runs (DDPO and the flow methods); got "
                     f"{config.mode!r}")
  mesh = parallel.make_mesh(config.mesh, devices=topology.devices)
  validate_config(config, mesh)
  notes: list[str] = []
  policy = build_base_policy(config, abstract=True)
  device_terms = _device_terms(config, policy, notes, log)
  optimizer = make_optimizer(config.train, policy.learning_rates)
  _, frozen_sh, state_sh = model_shardings(policy, config, optimizer, mesh)
  unet = policy.params["unet"]
  state = jax.eval_shape(lambda p: new_train_state(
      config, p, optimizer.init(p), jax.random.PRNGKey(0)), unet)
  state = _with_shardings(state, state_sh)
  frozen = _with_shardings(frozen_params(policy, config), frozen_sh)
  B = int(config.sample.batch_size)
  prompts = list(policy.prompt_fn(np.random.default_rng(int(config.seed)), B))
  ids, meta = prompt_inputs(policy, device_terms, prompts)
  meta = with_sde_window(config, meta, B, 0, 0)
  data = parallel.data_sharding(mesh)
  ids, meta = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=data),
                           (np.asarray(ids), meta))
  with backend.compiling_for(topology.platform):  # the target's implementation choices
    traced = trace_programs(config, policy, optimizer, mesh, device_terms, state, frozen, ids,
                            meta)
  args = {"sample": (state.params, frozen, ids, meta), "update": (state, frozen),
          "old_policy": (state,)}
  programs = []
  for name, program in traced.items():
    if compile:
      log(f"compiling {name} for {topology.name} ({len(topology.devices)} devices)")
    programs.append(plan_program(name, program, args[name], topology, compile))
    if compile:
      log(f"  {name}: {programs[-1].compile_s:.1f} s")
  num_batches = int(config.sample.num_batches_per_epoch)
  calls = {"sample": num_batches, "update": int(config.train.num_inner_epochs),
           "old_policy": 1}
  n = B * num_batches
  total = sum(calls[p.name] * p.flops * len(topology.devices) for p in programs)
  return Plan(topology, programs, total / n, n, notes)


# ----------------------------------------------------------------------------- the table
def format_plan(plan: Plan) -> str:
  """The plan as text: one row per program (per-device GiB, FLOPs, collectives), the verdict,
  the projection and the notes."""
  topo = plan.topology
  hbm = topo.hbm_bytes_per_device
  lines = [f"topology {topo.name}: {topo.num_chips} x {topo.chip.name}, {len(topo.devices)} "
           f"devices, {hbm / GiB:.1f} GiB HBM per device",
           f"{'program':<11} {'args':>7} {'outputs':>7} {'temps':>7} {'code':>6} {'total':>7} "
           f"{'of HBM':>7} {'TFLOP':>8} {'GB accessed':>11} {'compile s':>9}  collectives"]
  for p in plan.programs:
    if p.bytes is None:
      lines.append(f"{p.name:<11} {'not compiled (traced only)':>46} {p.flops / 1e12:8.4g}")
      continue
    b = {k: v / GiB for k, v in p.bytes.items()}
    coll = ", ".join(f"{c['kind']} x{c['count']} ({c['bytes'] / 2 ** 20:.1f} MiB)"
                     for c in p.collectives) or "none"
    accessed = f"{p.bytes_accessed / 1e9:11.2f}" if p.bytes_accessed is not None else "        n/a"
    lines.append(f"{p.name:<11} {b['arguments']:7.2f} {b['outputs']:7.2f} {b['temporaries']:7.2f} "
                 f"{b['code']:6.2f} {b['total']:7.2f} {p.bytes['total'] / hbm:7.0%} "
                 f"{p.flops / 1e12:8.4g} {accessed} {p.compile_s:9.1f}  {coll}")
  lines.append("(bytes per device in GiB; TFLOP per device per call: matmuls and convolutions, "
               "loops x trip counts; GB accessed: XLA's, loop bodies once)")
  for p in plan.programs:
    if p.fits is False:
      big = "; ".join(f"{a['path']} {a['dtype']}{a['shape']} {a['bytes'] / GiB:.2f} GiB"
                      for a in p.largest_arguments)
      lines.append(f"DOES NOT FIT: {p.name} needs {p.bytes['total'] / GiB:.2f} GiB of "
                   f"{hbm / GiB:.1f} GiB (temporaries {p.bytes['temporaries'] / GiB:.2f} GiB); "
                   f"largest arguments per device: {big}")
  lines.append(f"fits: {({True: 'yes', False: 'NO', None: 'not compiled'})[plan.fits]}")
  lines.append(f"FLOPs per sample (sampling + update, one epoch / {plan.samples_per_epoch} "
               f"samples): {plan.flops_per_sample:.4g}")
  lines.append("projected samples/s per chip (compile-time projection, not a measurement; "
               f"peak {topo.chip.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16, {topo.chip.source}): "
               + ", ".join(f"{plan.samples_per_s_per_chip(m):.3g} at {m:.0%} MFU" for m in MFUS))
  lines += [f"note: {n}" for n in plan.notes]
  return "\n".join(lines)


# ----------------------------------------------------------------------------- largest batch
def with_batch_per_device(config, per_device: int, num_shards: int):
  """A copy of `config` whose sampling call and training micro-batch hold `per_device` samples
  per device of the data axes (`num_shards` devices): sample.batch_size = train.batch_size =
  per_device x num_shards; the other keys as given."""
  config = config.copy_and_resolve_references()
  config.sample.batch_size = per_device * num_shards
  config.train.batch_size = per_device * num_shards
  return config


def max_batch(config, topology: Topology, log=lambda msg: None, limit: int = 1024
              ) -> tuple[int, Plan | None, list[str]]:
  """The largest per-device batch (`with_batch_per_device`) whose programs all fit, by
  compiling: doubling from 1 until one does not fit (or `limit`), then bisecting.

  Returns (batch per device, 0 if even 1 does not fit; its plan; the sizes the trainer
  refused, one line each)."""
  mesh = parallel.make_mesh(config.mesh, devices=topology.devices)
  shards = parallel.num_batch_shards(mesh)
  refused, plans = [], {}

  def fits(b: int) -> bool:
    try:
      plans[b] = plan_run(with_batch_per_device(config, b, shards), topology, log)
    except ValueError as e:
      refused.append(f"{b} per device: {e}")
      return False
    log(f"batch {b} per device: {'fits' if plans[b].fits else 'does not fit'}")
    return plans[b].fits

  good, bad = 0, None
  b = 1
  while b <= limit:
    if fits(b):
      good, b = b, b * 2
    else:
      bad = b
      break
  if bad is not None:
    while bad - good > 1:
      mid = (good + bad) // 2
      if fits(mid):
        good = mid
      else:
        bad = mid
  return good, plans.get(good), refused
