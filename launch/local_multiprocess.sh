#!/usr/bin/env bash
# Runs N ddpo_jax.main processes on this machine (CPU, 127.0.0.1) as one multi-process job:
# what a multi-host run does, for testing multi-host code paths without a cluster.
#   launch/local_multiprocess.sh N [ARGS for python -m ddpo_jax.main ...]
#   launch/local_multiprocess.sh 2 --config=default:runlocal --workdir=/tmp/mp
# Environment:
#   DEVICES_PER_PROCESS  fake CPU devices per process (default 2)
#   COORDINATOR_PORT     port of process 0's coordinator (default: a free port)
#   DISTRIBUTED_TIMEOUT  seconds to wait for the coordinator and all processes (default 60)
#   LOG_DIR              if set, process I writes to LOG_DIR/process_I.log instead of the terminal
#   PYTHON               interpreter (default python3)
# Waits for all processes; when one fails, stops the others and exits with its status.
set -uo pipefail
if [ $# -lt 1 ] || ! [[ $1 =~ ^[0-9]+$ ]] || [ "$1" -lt 1 ]; then
  echo "usage: $0 N [ARGS for python -m ddpo_jax.main ...]" >&2
  exit 2
fi
n=$1; shift
python=${PYTHON:-python3}
cd "$(dirname "$0")/.."
port=${COORDINATOR_PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
export JAX_PLATFORMS=cpu
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-2}"
[ -n "${LOG_DIR:-}" ] && mkdir -p "$LOG_DIR"

pids=()
stop_all() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  for _ in $(seq 50); do  # up to 5 s to exit cleanly, then SIGKILL
    alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ $alive -eq 0 ] && return
    sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null; done
}
trap 'echo "local_multiprocess: interrupted, stopping all processes" >&2; stop_all; exit 130' INT TERM

for ((i = 0; i < n; i++)); do
  cmd=("$python" -u -m ddpo_jax.main --coordinator_address="127.0.0.1:$port" --num_processes="$n"
       --process_id="$i" --distributed_timeout="${DISTRIBUTED_TIMEOUT:-60}" "$@")
  if [ -n "${LOG_DIR:-}" ]; then
    "${cmd[@]}" >"$LOG_DIR/process_$i.log" 2>&1 &
  else
    "${cmd[@]}" &
  fi
  pids+=($!)
done
echo "local_multiprocess: $n processes (pids ${pids[*]}) on 127.0.0.1:$port" >&2

# Poll (portable: no `wait -n`) until all have exited or one has failed.
remaining=$n
done_flags=()
while [ $remaining -gt 0 ]; do
  for i in "${!pids[@]}"; do
    pid=${pids[$i]}
    [ -n "${done_flags[$i]:-}" ] && continue
    kill -0 "$pid" 2>/dev/null && continue
    wait "$pid"; rc=$?
    done_flags[$i]=1
    remaining=$((remaining - 1))
    if [ $rc -ne 0 ]; then
      echo "local_multiprocess: process $i (pid $pid) failed with status $rc; stopping the others" >&2
      stop_all
      wait 2>/dev/null
      exit $rc
    fi
  done
  [ $remaining -gt 0 ] && sleep 0.2
done
echo "local_multiprocess: all $n processes finished" >&2
