#!/usr/bin/env bash
# Cloud TPU VM (single host or pod slice): create it, copy this checkout to every worker, run
# ddpo_jax.main on all workers at once (one process per host; jax.distributed finds the others
# through the TPU metadata server), delete it.
#
#   launch/tpu_vm.sh create NAME ZONE ACCELERATOR [RUNTIME_VERSION]  # e.g. v4-32 (4 hosts)
#   launch/tpu_vm.sh setup  NAME ZONE        # copy this checkout to ~/ddpo_jax, pip install it
#   launch/tpu_vm.sh run    NAME ZONE WORKDIR [ARGS for python -m ddpo_jax.main ...]
#   launch/tpu_vm.sh ssh    NAME ZONE 'COMMAND'   # any command on all workers
#   launch/tpu_vm.sh delete NAME ZONE
#
# WORKDIR must be the same directory on every worker: a shared filesystem (Filestore/NFS, or
# a bucket mounted with gcsfuse at the same path on all workers). Every host writes its
# shards of each checkpoint there; host 0 also writes metrics.jsonl and the sample grids.
# Environment: TPU_PROJECT (gcloud --project), TPU_SPOT=1 (spot VMs), PIP_EXTRA (more pip args).
set -euo pipefail
usage() { sed -n '2,15p' "$0" >&2; exit 2; }
[ $# -ge 3 ] || usage
cmd=$1 name=$2 zone=$3; shift 3
project=()
[ -n "${TPU_PROJECT:-}" ] && project=(--project="$TPU_PROJECT")
on_all() {  # on_all 'COMMAND': run on every worker of the slice, concurrently
  gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" "${project[@]}" --worker=all --command="$1"
}
q() { printf '%q ' "$@"; }  # shell-quote arguments for the remote command line

case $cmd in
  create)
    [ $# -ge 1 ] || usage
    spot=()
    [ "${TPU_SPOT:-0}" = 1 ] && spot=(--spot)
    gcloud compute tpus tpu-vm create "$name" --zone="$zone" "${project[@]}" \
      --accelerator-type="$1" --version="${2:-tpu-ubuntu2204-base}" "${spot[@]}"
    ;;
  setup)
    repo=$(cd "$(dirname "$0")/.." && pwd)
    tarball=$(mktemp /tmp/ddpo_jax_src.XXXXXX.tar.gz)
    # Tracked files plus uncommitted edits of them (what `git stash create` would hold).
    (cd "$repo" && git ls-files -z | tar --null -czf "$tarball" -T -)
    gcloud compute tpus tpu-vm scp "$tarball" "$name":ddpo_jax_src.tar.gz --zone="$zone" \
      "${project[@]}" --worker=all
    rm -f "$tarball"
    on_all "set -e; rm -rf ~/ddpo_jax && mkdir -p ~/ddpo_jax && tar -xzf ~/ddpo_jax_src.tar.gz -C ~/ddpo_jax \
      && cd ~/ddpo_jax && python3 -m pip install -q -U pip && python3 -m pip install -q -e . 'jax[tpu]' ${PIP_EXTRA:-}"
    ;;
  run)
    [ $# -ge 1 ] || usage
    workdir=$1; shift
    # --distributed=on: jax.distributed.initialize() detects the pod's hosts from the metadata
    # server (a single-host TPU VM simply runs as one process).
    on_all "cd ~/ddpo_jax && python3 -m ddpo_jax.main --distributed=on $(q --workdir="$workdir" "$@")"
    ;;
  ssh)
    [ $# -ge 1 ] || usage
    on_all "$1"
    ;;
  delete)
    gcloud compute tpus tpu-vm delete "$name" --zone="$zone" "${project[@]}" --quiet
    ;;
  *) usage ;;
esac
