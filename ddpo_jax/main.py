r"""Trains with DDPO: `python -m ddpo_jax.main --config=NAME[:VARIANTS] --workdir=DIR [--config.key=value]`.

NAME is a config shipped in ddpo_jax/configs/ (or give PATH.py[:VARIANTS], any config file; see
ddpo_jax/configs/__init__.py). With no --config it uses `default` (digits prompt alignment).
Re-running the same command resumes from the newest intact checkpoint in DIR/checkpoints, with
the config it was saved with (`--allow_config_change=KEY,...` to resume with other values of
those keys).

Several processes (hosts): start one per host (or per GPU) with the same arguments; they find
each other through SLURM's or a TPU VM pod's environment, or through
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (HOST:PORT of process 0).
See launch/ and docs/operations.md ("Multi-host and launch").
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from ddpo_jax import api, configs
from ddpo_jax.numerics import parallel

_CONFIG = config_flags.DEFINE_config_file(
    "config", configs.default_file(), "A config: NAME[:VARIANTS] (ddpo_jax/configs/NAME.py) or "
    "PATH.py[:VARIANTS].", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/default", "Run directory (checkpoints, metrics).")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "jax.distributed: 'auto' starts it when the coordinator flags are given or SLURM / Open MPI "
    "/ JAX_COORDINATOR_ADDRESS / TPU_WORKER_HOSTNAMES name several processes; 'on' always (JAX "
    "auto-detects the cluster, e.g. a TPU VM pod); 'off' never.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0 (with --num_processes, --process_id).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (hosts).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "This process's index in [0, num_processes).")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_list(
    "allow_config_change", [],
    "Config keys (or fnmatch patterns, e.g. 'train.*') that may differ from the config saved with "
    "the checkpoint a run resumes from; without them a changed key stops the run, naming it. "
    "num_epochs, the save/log cadence and the mesh may always change.")
_DIST_TIMEOUT = flags.DEFINE_integer(
    "distributed_timeout", 300, "Seconds to wait for the coordinator and for all processes.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  api.use_cpu_devices(int(config.cpu_devices))
  parallel.initialize_distributed(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value,
                                  _PROCESS_ID.value, _DIST_TIMEOUT.value)
  # After an uncaught error, exit at once: Orbax's background threads of a failed save (and, in
  # a multi-process run, jax.distributed's shutdown barrier) would otherwise hold the process
  # for minutes.
  parallel.exit_on_uncaught_exception()
  logging.set_verbosity(logging.WARNING)
  api.run_mode(config, _WORKDIR.value, allow_config_change=tuple(_ALLOW_CONFIG_CHANGE.value))


if __name__ == "__main__":
  sys.argv[:] = configs.resolve_argv(sys.argv)  # --config=NAME: the shipped file
  app.run(main)
