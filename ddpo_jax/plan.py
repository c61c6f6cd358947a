r"""Compiles a run's programs for a TPU or GPU topology on a machine without one and prints
per-device memory against HBM, FLOPs, collectives and projected samples/s per chip:

  python -m ddpo_jax.plan --config=NAME[:VARIANTS] --topology=v5e-8 [--json=FILE]
      [--max_batch] [--config.key=value ...]

Topologies: get_topology_desc names (v5e:2x4, v5p:2x2x1, v5p:4x4x4, v6e:2x4, ...), GPU ones
(h100:1x1x8, h200:1x1x8) or the aliases v5e-8, v5p-8, v5p-64, v5p-128, v6e-8, h100-8, ... TPUs
need libtpu (`pip install -e ".[tpu-plan]"`), GPUs the CUDA plugin
(`pip install "jax-cuda12-plugin[with-cuda]"`); neither needs the hardware. Parameters come from
the model's configs alone (a local diffusers directory, or the published configs shipped with
the package for the Hub ids in `ddpo_jax.models.published_configs`): nothing is downloaded.

Exit status: 0 when every program fits, 1 when one does not (the table says which and why), 2
for bad input (an unknown topology, a mesh or batch the topology's devices cannot take: one
line, before anything is compiled). `--json` is written in every case but bad input.
See docs/plan.md.
"""
import os

# Compiling only: never open an accelerator of this machine, and let the CUDA plugin load
# without a driver.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")

import json  # noqa: E402
import sys  # noqa: E402

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from ddpo_jax import configs  # noqa: E402
from ddpo_jax.trainer import plan as plan_lib  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", configs.default_file(), "A config: NAME[:VARIANTS] (ddpo_jax/configs/NAME.py) or "
    "PATH.py[:VARIANTS].",
    lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "Topology name or alias, e.g. v5e-8.")
_JSON = flags.DEFINE_string("json", None, "Write the plan as JSON to this file.")
_TRACE_ONLY = flags.DEFINE_bool(
    "trace_only", False, "Trace the programs without compiling them: FLOPs and the projected "
    "samples/s only (seconds instead of minutes), no memory, collectives or verdict.")
_MAX_BATCH = flags.DEFINE_bool(
    "max_batch", False, "Also search the largest per-device batch (sampling call and training "
    "micro-batch) that fits, by compiling.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _TOPOLOGY.value:
    raise app.UsageError("--topology is required (e.g. --topology=v5e-8)")
  log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
  try:
    plan_lib.resolve_topology_name(_TOPOLOGY.value)
    topology = plan_lib.make_topology(_TOPOLOGY.value)
    plan = plan_lib.plan_run(_CONFIG.value, topology, log, compile=not _TRACE_ONLY.value)
  except (ValueError, RuntimeError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(plan_lib.format_plan(plan))
  out = plan.as_json()
  if _MAX_BATCH.value and not _TRACE_ONLY.value:
    best, best_plan, refused = plan_lib.max_batch(_CONFIG.value, topology, log)
    print(f"largest batch per device that fits: {best}"
          + (f" ({best_plan.samples_per_s_per_chip(0.4):.3g} samples/s/chip at 40% MFU)"
             if best_plan else ""))
    for line in refused:
      print(f"  refused: {line}")
    out["max_batch_per_device"] = best
    out["max_batch_plan"] = best_plan.as_json() if best_plan else None
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(out, f, indent=1)
  return 1 if plan.fits is False else 0


if __name__ == "__main__":
  sys.argv[:] = configs.resolve_argv(sys.argv)  # --config=NAME: the shipped file
  app.run(lambda argv: sys.exit(main(argv)))
