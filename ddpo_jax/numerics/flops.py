"""Matrix-multiply FLOPs of a traced program, loops counted by their trip counts.

XLA's `cost_analysis()` counts the body of a while loop once, whatever its trip count (measured
with jax 0.10.2 for TPU: a 10-step `lax.scan` of a matmul reports the FLOPs of one step), so it
cannot count a sampling scan over 50 denoising steps or the update's scan over micro-batches.
`matmul_flops` walks the jaxpr instead: every `dot_general` and `conv_general_dilated` counts
2 x (output elements) x (contracted elements per output), scans multiply their body by their
length, a `shard_map` body (per-device shapes) counts once per device of its mesh, calls and
checkpoints (`jit`, `remat`, custom derivatives) recurse, and a `cond` counts its most
expensive branch. Elementwise work, reductions and transcendentals are not counted
(a few percent of a diffusion model's FLOPs). A `while` loop of unknown trip count (none in this
package's programs) counts once and is reported in `unbounded_loops`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
from jax.extend import core as jax_core


@dataclasses.dataclass
class FlopCount:
  """flops: matmul and convolution FLOPs of one call (all devices together), float.
  unbounded_loops: how many `while` loops of unknown trip count were counted once."""
  flops: float = 0.0
  unbounded_loops: int = 0


def _dot_flops(eqn) -> float:
  (lhs_contract, _), _ = eqn.params["dimension_numbers"]
  lhs = eqn.invars[0].aval.shape
  out = eqn.outvars[0].aval.shape
  return 2.0 * math.prod(out) * math.prod(lhs[d] for d in lhs_contract)


def _conv_flops(eqn) -> float:
  rhs = eqn.invars[1].aval.shape
  out = eqn.outvars[0].aval.shape
  dn = eqn.params["dimension_numbers"]
  rhs_spec = dn.rhs_spec  # (out feature dim, in feature dim, spatial dims...)
  per_output = rhs[rhs_spec[1]] * math.prod(rhs[d] for d in rhs_spec[2:])
  # grouped convolutions: the kernel's in-feature dim is already per group; batch groups split
  # the output features
  return 2.0 * math.prod(out) * per_output / int(eqn.params.get("batch_group_count", 1))


def _sub_jaxprs(eqn) -> list[Any]:
  """The jaxprs an equation calls (a `jit`'s, a checkpoint's, a custom derivative's)."""
  return [j.jaxpr if isinstance(j, jax_core.ClosedJaxpr) else j
          for j in jax_core.jaxprs_in_params(eqn.params)]


def _mesh_size(mesh) -> int:
  return int(math.prod(dict(mesh.shape).values()))


def _count(jaxpr, acc: FlopCount) -> float:
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot_flops(eqn)
    elif name == "conv_general_dilated":
      total += _conv_flops(eqn)
    elif name == "scan":
      total += int(eqn.params["length"]) * _count(eqn.params["jaxpr"].jaxpr, acc)
    elif name == "cond":
      total += max(_count(b.jaxpr, acc) for b in eqn.params["branches"])
    elif name == "shard_map":  # the body is per device: it runs once on each of the mesh's
      total += _mesh_size(eqn.params["mesh"]) * sum(_count(sub, acc) for sub in _sub_jaxprs(eqn))
    elif name == "while":
      acc.unbounded_loops += 1
      total += _count(eqn.params["body_jaxpr"].jaxpr, acc)
      total += _count(eqn.params["cond_jaxpr"].jaxpr, acc)
    else:
      total += sum(_count(sub, acc) for sub in _sub_jaxprs(eqn))
  return total


def matmul_flops(fn: Callable, *args, **kwargs) -> FlopCount:
  """The matmul + convolution FLOPs of one call of `fn(*args, **kwargs)` (arrays or
  `jax.ShapeDtypeStruct`s; `fn` may be a `jax.jit` function), summed over all devices."""
  acc = FlopCount()
  closed = jax.make_jaxpr(fn)(*args, **kwargs)
  acc.flops = _count(closed.jaxpr, acc)
  return acc


def jaxpr_matmul_flops(closed_jaxpr) -> FlopCount:
  """`matmul_flops` of an already traced `jax.core.ClosedJaxpr` (e.g. `jit(f).trace(...).jaxpr`)."""
  acc = FlopCount()
  acc.flops = _count(closed_jaxpr.jaxpr, acc)
  return acc
