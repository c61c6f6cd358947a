r"""The digits CTRL experiments: CTRL vs classifier-free guidance vs classifier guidance, for
each task and label budget, on CPU. Produces the table in docs/results.md.

  python benchmarks/ctrl_digits.py --root=/tmp/ctrl_digits \
      --tasks=class,thickness,multi --budgets=100,300,all --methods=ctrl,cfg,cg [--replicates=3]

Each run is `python -m ddpo_jax.main --config=ctrl_digits_TASK:VARIANTS
--workdir=ROOT/TASK_METHOD_BUDGET` (which trains and then writes eval.json: judge accuracy of
the requested label and diversity, `ddpo_jax.trainer.ctrl_evaluate`); finished runs are not repeated.
Replicate r > 0 (`--replicates=N` runs r = 0 … N−1) is the same run in
ROOT/TASK_METHOD_BUDGET_rR with every seed moved by r: `config.seed` (training, classifier
guidance's noisy classifier, the evaluation samples), each control's `data.seed` (which
labelled examples a budget draws) and `classifier.seed` (the offline p̂'s split and training);
replicate 0 is the configs' defaults. `--variants=runlocal` adds the configs' `runlocal` variant
to every run (the tiny digits model, few steps: seconds; what tests/test_benchmarks.py runs).
Prints one markdown table, and with replicates a second one of means ± sample standard
deviations (and writes ROOT/results.md and ROOT/results.jsonl).
"""
import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
METHOD_VARIANT = {"ctrl": "", "cfg": "cfg", "cg": "cg", "ctrl_ddpo": "ddpo"}
METHOD_NAME = {"ctrl": "CTRL (backprop)", "ctrl_ddpo": "CTRL (DDPO solver)",
               "cfg": "classifier-free guidance", "cg": "classifier guidance"}


def replicate_flags(task: str, replicate: int) -> list[str]:
  """ddpo_jax.main flags that move every seed of the task's config by `replicate` (none for 0)."""
  if replicate == 0:
    return []
  config = importlib.import_module(f"ddpo_jax.configs.ctrl_digits_{task}").get_config()
  flags = [f"--config.seed={config.seed + replicate}"]
  for name in config.ctrl.controls:
    cond = config.ctrl.conditions[name]
    flags += [f"--config.ctrl.conditions.{name}.data.seed={cond.data.seed + replicate}",
              f"--config.ctrl.conditions.{name}.classifier.seed={cond.classifier.seed + replicate}"]
  return flags


def run_one(root: str, task: str, method: str, budget: str, extra: list[str],
            replicate: int = 0, variants: str = "") -> dict:
  """Runs (or reads back) one (task, method, budget, replicate); `variants`: config variants
  added to the method's and the budget's (e.g. "runlocal")."""
  workdir = os.path.join(root, f"{task}_{method}_{budget}" + (f"_r{replicate}" if replicate else ""))
  eval_path = os.path.join(workdir, "eval.json")
  variants = [v for v in (METHOD_VARIANT[method], "" if budget == "all" else f"n{budget}",
                          *variants.split(",")) if v.strip()]
  config = f"{REPO}/ddpo_jax/configs/ctrl_digits_{task}.py" + (":" + ",".join(variants) if variants else "")
  cmd = [sys.executable, "-m", "ddpo_jax.main", f"--config={config}", f"--workdir={workdir}",
         "--config.progress=False", *replicate_flags(task, replicate), *extra]
  timing_path = os.path.join(workdir, "wall_time_s.txt")
  if not os.path.exists(eval_path):
    print("running:", " ".join(cmd[1:]), flush=True)
    t0 = time.time()
    subprocess.run(cmd, cwd=REPO, check=True)
    with open(timing_path, "w") as f:
      f.write(f"{time.time() - t0:.1f}\n")
  result = json.load(open(eval_path))
  result.update(task=task, method=method, budget=budget, replicate=replicate,
                command=" ".join(cmd[1:]),
                wall_time_s=float(open(timing_path).read()) if os.path.exists(timing_path) else None)
  return result


def _accuracy_keys(r: dict) -> list[str]:
  return sorted(k for k in r if k.endswith("_accuracy") and not k.endswith("classifier_accuracy"))


def table(rows: list[dict]) -> str:
  lines = ["| task | labels | method | judge accuracy | joint | diversity (data) | wall time |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    accs = [f"{k[:-len('_accuracy')]} {r[k]:.3f}" for k in _accuracy_keys(r) if k != "joint_accuracy"]
    joint = f"{r['joint_accuracy']:.3f}" if "joint_accuracy" in r else ""
    wall = f"{r['wall_time_s'] / 60:.1f} min" if r.get("wall_time_s") else ""
    labels = r["budget"] + (f" (r{r['replicate']})" if r.get("replicate") else "")
    lines.append(f"| {r['task']} | {labels} | {METHOD_NAME[r['method']]} | {', '.join(accs)} | "
                 f"{joint} | {r['diversity']:.3f} ({r['data_diversity']:.3f}) | {wall} |")
  return "\n".join(lines)


def replicate_table(rows: list[dict]) -> str:
  """Mean ± sample standard deviation over the replicates of each (task, labels, method)."""
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    groups.setdefault((r["task"], r["budget"], r["method"]), []).append(r)

  def stat(rs, key):
    xs = [r[key] for r in rs]
    sd = f" ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else ""
    return f"{statistics.fmean(xs):.3f}{sd}"

  lines = ["| task | labels | method | runs | judge accuracy | joint | diversity |",
           "|---|---|---|---|---|---|---|"]
  for (task, budget, method), rs in groups.items():
    keys = _accuracy_keys(rs[0])
    accs = ", ".join(f"{k[:-len('_accuracy')]} {stat(rs, k)}" for k in keys if k != "joint_accuracy")
    joint = stat(rs, "joint_accuracy") if "joint_accuracy" in keys else ""
    lines.append(f"| {task} | {budget} | {METHOD_NAME[method]} | {len(rs)} | {accs} | {joint} | "
                 f"{stat(rs, 'diversity')} |")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--root", default="/tmp/ctrl_digits")
  p.add_argument("--tasks", default="class,thickness,multi")
  p.add_argument("--budgets", default="100,300,all")
  p.add_argument("--methods", default="ctrl,cfg,cg")
  p.add_argument("--extra", default="", help="extra flags for ddpo_jax.main, space-separated")
  p.add_argument("--replicates", type=int, default=1,
                 help="runs per row, replicate r with every seed moved by r")
  p.add_argument("--variants", default="",
                 help="config variants added to every run's, comma-separated (runlocal: the tiny "
                      "digits model and few steps, seconds per run; for the tests)")
  args = p.parse_args(argv)
  if args.replicates < 1:
    p.error(f"--replicates={args.replicates} must be at least 1")
  os.makedirs(args.root, exist_ok=True)
  rows = []
  for task in args.tasks.split(","):
    for budget in args.budgets.split(","):
      for method in args.methods.split(","):
        for replicate in range(args.replicates):
          rows.append(run_one(args.root, task, method, budget, args.extra.split(), replicate,
                              args.variants))
          with open(os.path.join(args.root, "results.jsonl"), "a") as f:
            f.write(json.dumps(rows[-1]) + "\n")
  md = table(rows)
  if args.replicates > 1:
    md += "\n\n" + replicate_table(rows)
  with open(os.path.join(args.root, "results.md"), "w") as f:
    f.write(md + "\n")
  print(md)


if __name__ == "__main__":
  main()
