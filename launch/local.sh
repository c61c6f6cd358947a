#!/usr/bin/env bash
# Runs ddpo_jax.main on this machine (all local devices), resuming if WORKDIR has checkpoints.
#   launch/local.sh WORKDIR [CONFIG] [--config.key=value ...]
#   launch/local.sh /tmp/ddpo_digits default --config.num_epochs=20
# Several processes: launch/local_multiprocess.sh (CPU, this machine), launch/tpu_vm.sh (TPU VM
# pods), launch/slurm.sbatch (multi-node GPUs); see docs/operations.md "Multi-host and launch".
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 WORKDIR [CONFIG] [--config.key=value ...]" >&2
  exit 2
fi
workdir=$1; shift
config=default
if [ $# -gt 0 ] && [[ $1 != --* ]]; then config=$1; shift; fi
cd "$(dirname "$0")/.."
exec python3 -m ddpo_jax.main --config="$config" --workdir="$workdir" "$@"
