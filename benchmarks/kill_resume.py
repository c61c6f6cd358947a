"""kill -9 at random moments of a run, each followed by a restart: does every restart resume from
an intact step, and are the final parameters bit-identical to an uninterrupted run?

    python benchmarks/kill_resume.py [--kills=20] [--epochs=60] [--window_epochs=12] [--seed=0]
        [--workdir=DIR]

Runs `python -m ddpo_jax.main --config=default:runlocal` (the tiny digits config,
CPU, save_freq 1) once uninterrupted for `--epochs` epochs, and times a run of
`--window_epochs` epochs (start-up and compilation included). Then launches the `--epochs` run
in another directory and SIGKILLs it `--kills` times: odd-numbered kills at a moment drawn
uniformly from that timed window, even-numbered ones the instant a new checkpoint save is seen
in progress (an `*.orbax-checkpoint-tmp*` directory that was not there at launch), or at the
drawn moment if none appears first. After each kill the run is launched again; after the last,
it runs to the end. Prints the schedule (per launch: the newest committed step at its start,
the step it resumed from if it got that far, whether it found a damaged step, when it was
killed and whether a save was in progress), then checks that every launch resumed from the
newest committed step (or an older intact one past a step it found damaged), the final
parameters against the uninterrupted run's (bit for bit) and metrics.jsonl (each epoch once).
Exit status 0 only if every check holds. Set DDPO_JAX_CACHE to reuse a pre-trained digits model,
JAX_COMPILATION_CACHE_DIR to reuse compiled programs across launches.
"""
import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cmd(workdir, epochs):
  return [sys.executable, "-m", "ddpo_jax.main", f"--config={REPO}/ddpo_jax/configs/default.py:runlocal",
          f"--workdir={workdir}", f"--config.num_epochs={epochs}", "--config.save_freq=1"]


def _committed(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(e) for e in os.listdir(d) if e.isdigit()) if os.path.isdir(d) else []


def _saves_in_progress(workdir) -> set:
  d = os.path.join(workdir, "checkpoints")
  return {e for e in os.listdir(d) if "orbax-checkpoint-tmp" in e} if os.path.isdir(d) else set()


def _params(workdir):
  sys.path.insert(0, REPO)
  from ddpo_jax.trainer import checkpoints
  import jax
  step, state, _ = checkpoints.read_state(workdir)
  return step, [np.asarray(x) for x in jax.tree.leaves(state["params"])]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--kills", type=int, default=20)
  parser.add_argument("--epochs", type=int, default=60)
  parser.add_argument("--window_epochs", type=int, default=12)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--workdir", default=None)
  args = parser.parse_args()
  root = args.workdir or tempfile.mkdtemp(prefix="kill_resume_")
  ref, killed = os.path.join(root, "uninterrupted"), os.path.join(root, "killed")
  for d in (ref, killed):
    shutil.rmtree(d, ignore_errors=True)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  out = subprocess.run(_cmd(ref, args.epochs), cwd=REPO, env=env, capture_output=True, text=True)
  if out.returncode:
    sys.exit("the uninterrupted run failed:\n" + out.stderr[-3000:])
  t0 = time.monotonic()
  out = subprocess.run(_cmd(os.path.join(root, "timing"), args.window_epochs), cwd=REPO, env=env,
                       capture_output=True, text=True)
  duration = time.monotonic() - t0
  print(f"kill window: {duration:.1f} s (a {args.window_epochs}-epoch run, warm caches); "
        f"the run has {args.epochs} epochs", flush=True)

  rng = np.random.default_rng(args.seed)
  schedule = []
  for k in range(args.kills + 1):  # the last launch runs to the end
    last = k == args.kills
    entry = {"launch": k + 1, "committed_at_start": (_committed(killed) or [None])[-1]}
    log_path = os.path.join(root, f"launch_{k}.log")
    old_tmp = _saves_in_progress(killed)
    with open(log_path, "w") as log:
      proc = subprocess.Popen(_cmd(killed, args.epochs), cwd=REPO, env=env, stdout=log,
                              stderr=subprocess.STDOUT)
      if last:
        proc.wait()
      else:
        at_save, delay = k % 2 == 1, float(rng.uniform(0.0, duration))
        start, saving = time.monotonic(), False
        while proc.poll() is None and time.monotonic() - start < delay:
          if at_save and _saves_in_progress(killed) - old_tmp:
            saving = True
            break
          time.sleep(0.002)
        if proc.poll() is None:
          saving = saving or bool(_saves_in_progress(killed) - old_tmp)
          os.kill(proc.pid, signal.SIGKILL)
          proc.wait()
          entry.update(killed_at_s=round(time.monotonic() - start, 2), during_save=saving)
        else:
          entry["finished_before_the_kill"] = True
    text = open(log_path).read()
    m = re.search(r"resuming from checkpoint step (\d+)", text)
    entry["resumed_from"] = int(m.group(1)) if m else None
    entry["found_damage"] = "is damaged" in text
    entry["returncode"] = proc.returncode
    schedule.append(entry)
    print(json.dumps(entry), flush=True)
    if entry.get("finished_before_the_kill") or last:
      break
  final_ok = schedule[-1]["returncode"] == 0
  if not final_ok:
    print("the last launch failed:\n" + open(log_path).read()[-3000:])
  step_a, a = _params(ref)
  step_b, b = _params(killed)
  same = step_a == step_b and all(np.array_equal(x, y) for x, y in zip(a, b))
  rows = [json.loads(l)["epoch"] for l in open(os.path.join(killed, "metrics.jsonl"))]
  # A launch resumes from the newest committed step, or, where that step was cut short by a
  # kill and is found damaged, from an older intact one (the damaged one set aside).
  resumed_ok = all(e["resumed_from"] == e["committed_at_start"] or
                   (e["found_damage"] and e["committed_at_start"] is not None and
                    (e["resumed_from"] or 0) < e["committed_at_start"])
                   for e in schedule if e["resumed_from"] is not None)
  kills = [e for e in schedule if "killed_at_s" in e]
  print(f"{len(kills)} kills ({sum(e['during_save'] for e in kills)} during a save), "
        f"{len(schedule)} launches, {sum(e['resumed_from'] is not None for e in schedule)} of them "
        f"resumed; every resume from the newest intact step: {resumed_ok}; final step {step_b} "
        f"(uninterrupted {step_a}); params bit-identical: {same}; metrics.jsonl holds each epoch "
        f"once: {rows == list(range(args.epochs))}")
  ok = final_ok and same and rows == list(range(args.epochs)) and resumed_ok
  sys.exit(0 if ok else 1)


if __name__ == "__main__":
  main()
