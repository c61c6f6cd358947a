r"""The digits CTRL experiments: CTRL vs classifier-free guidance vs classifier guidance, for
each task and label budget, on CPU. Produces the table in README.md.

  python benchmarks/ctrl_digits.py --root=/tmp/ctrl_digits \
      --tasks=class,thickness,multi --budgets=100,300,all --methods=ctrl,cfg,cg

Each run is `python -m ddpo_jax.main --config=configs/ctrl_digits_TASK.py:VARIANTS
--workdir=ROOT/TASK_METHOD_BUDGET` (which trains and then writes eval.json: judge accuracy of
the requested label and diversity, `ddpo_jax.ctrl.evaluate`); finished runs are not repeated.
Prints one markdown table (and writes ROOT/results.md and ROOT/results.jsonl).
"""
import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHOD_VARIANT = {"ctrl": "", "cfg": "cfg", "cg": "cg", "ctrl_ddpo": "ddpo"}
METHOD_NAME = {"ctrl": "CTRL (backprop)", "ctrl_ddpo": "CTRL (DDPO solver)",
               "cfg": "classifier-free guidance", "cg": "classifier guidance"}


def run_one(root: str, task: str, method: str, budget: str, extra: list[str]) -> dict:
  workdir = os.path.join(root, f"{task}_{method}_{budget}")
  eval_path = os.path.join(workdir, "eval.json")
  variants = [v for v in (METHOD_VARIANT[method], "" if budget == "all" else f"n{budget}") if v]
  config = f"{REPO}/configs/ctrl_digits_{task}.py" + (":" + ",".join(variants) if variants else "")
  cmd = [sys.executable, "-m", "ddpo_jax.main", f"--config={config}", f"--workdir={workdir}",
         "--config.progress=False", *extra]
  timing_path = os.path.join(workdir, "wall_time_s.txt")
  if not os.path.exists(eval_path):
    print("running:", " ".join(cmd[1:]), flush=True)
    t0 = time.time()
    subprocess.run(cmd, cwd=REPO, check=True)
    with open(timing_path, "w") as f:
      f.write(f"{time.time() - t0:.1f}\n")
  result = json.load(open(eval_path))
  result.update(task=task, method=method, budget=budget, command=" ".join(cmd[1:]),
                wall_time_s=float(open(timing_path).read()) if os.path.exists(timing_path) else None)
  return result


def table(rows: list[dict]) -> str:
  lines = ["| task | labels | method | judge accuracy | joint | diversity (data) | wall time |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    accs = [f"{k[:-len('_accuracy')]} {r[k]:.3f}" for k in sorted(r)
            if k.endswith("_accuracy") and not k.endswith("classifier_accuracy") and k != "joint_accuracy"]
    joint = f"{r['joint_accuracy']:.3f}" if "joint_accuracy" in r else ""
    wall = f"{r['wall_time_s'] / 60:.1f} min" if r.get("wall_time_s") else ""
    lines.append(f"| {r['task']} | {r['budget']} | {METHOD_NAME[r['method']]} | {', '.join(accs)} | "
                 f"{joint} | {r['diversity']:.3f} ({r['data_diversity']:.3f}) | {wall} |")
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--root", default="/tmp/ctrl_digits")
  p.add_argument("--tasks", default="class,thickness,multi")
  p.add_argument("--budgets", default="100,300,all")
  p.add_argument("--methods", default="ctrl,cfg,cg")
  p.add_argument("--extra", default="", help="extra flags for ddpo_jax.main, space-separated")
  args = p.parse_args()
  os.makedirs(args.root, exist_ok=True)
  rows = []
  for task in args.tasks.split(","):
    for budget in args.budgets.split(","):
      for method in args.methods.split(","):
        rows.append(run_one(args.root, task, method, budget, args.extra.split()))
        with open(os.path.join(args.root, "results.jsonl"), "a") as f:
          f.write(json.dumps(rows[-1]) + "\n")
  md = table(rows)
  with open(os.path.join(args.root, "results.md"), "w") as f:
    f.write(md + "\n")
  print(md)


if __name__ == "__main__":
  main()
