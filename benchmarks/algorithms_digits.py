r"""Method comparisons on the built-in digits task, several seeds each; the tables and plots in
docs/results.md.

`--suite=ddpo` (default): the DDPO paper's central comparison (Black et al. 2023, Fig. 4):
DDPO-IS (PPO-clipped importance sampling), DDPO-SF (score function), RWR and RWR-sparse at the
same number of samples, on the UNet digits model (ddpo_jax/configs/default.py).

  python benchmarks/algorithms_digits.py --root=/tmp/algorithms_digits --epochs=30 --seeds=0,1,2

Each run is `python -m ddpo_jax.main --config=default --workdir=ROOT/ALGO_sSEED
--config.train.algorithm=ALGO --config.seed=SEED --config.num_epochs=EPOCHS` (256 samples per
epoch for every algorithm; the pre-trained digits model is the same for all runs, its seed is
`model.pretrain.seed`). DDPO-SF takes one optimizer step per data collection
(docs/algorithms.md §3.3), so its run accumulates the epoch's 8 minibatches into one step
(`train.gradient_accumulation_steps=8`); the others take the default's 8 steps per epoch.

`--suite=flow`: the flow-matching methods on the digits MMDiT (ddpo_jax/configs/digits_flow.py and its
variants): Flow-GRPO (SDE), CPS, MixGRPO, Flow-GRPO-Fast and DiffusionNFT, compared at the same
wall-clock budget: with `--budget_s=B` each run's rows are cut at the last epoch whose summed
`epoch_time_s` (sampling + reward + update, compilation and pre-training excluded) is at most B,
so a cheaper method gets more epochs. The table adds the epochs within the budget and the
denoiser evaluations per epoch (`model_evaluations_per_epoch`, counted from the config).

  python benchmarks/algorithms_digits.py --suite=flow --root=/tmp/flow_digits --epochs=60 \
      --budget_s=60 --seeds=0,1,2

`--suite=lora`: Flow-GRPO on the digits MMDiT with LoRA factors beside the frozen base, the
base and activations in float32 or in bfloat16 (ddpo_jax/configs/digits_flow.py variants `lora`,
`lora,bf16`), the same epochs: the bfloat16 curve should match the float32 one within seeds.

  python benchmarks/algorithms_digits.py --suite=lora --root=/tmp/lora_digits --epochs=20 \
      --seeds=0,1

Finished runs (metrics.jsonl with EPOCHS rows) are not repeated. `--variants=runlocal` adds
the configs' `runlocal` variant to every run (the tiny digits model, 8 samples of 4 steps per
epoch: seconds; what tests/test_benchmarks.py runs).

Writes ROOT/results.md (per method: mean ± sample standard deviation over the seeds of the
reward and the held-out-judge accuracy, at the first epoch, the last epoch and over the last 3
epochs) and ROOT/curves.png (per-epoch means, a band of ± one standard deviation), and prints
the table.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALGORITHMS = {  # name in the table -> ddpo_jax.main flags
    "DDPO-IS": ["--config.train.algorithm=ppo"],
    "DDPO-SF": ["--config.train.algorithm=sf", "--config.train.gradient_accumulation_steps=8"],
    "RWR": ["--config.train.algorithm=rwr"],
    "RWR-sparse": ["--config.train.algorithm=rwr_sparse"],
}
FLOW_METHODS = {  # name in the table -> ddpo_jax/configs/digits_flow.py variant
    "Flow-GRPO": "", "CPS": "cps", "MixGRPO": "mixgrpo", "Flow-GRPO-Fast": "fast",
    "DiffusionNFT": "nft",
}
LORA_PRECISIONS = {  # name in the table -> ddpo_jax/configs/digits_flow.py variants (Flow-GRPO, SDE)
    "LoRA float32": "lora", "LoRA bfloat16": "lora,bf16",
}
SUITES = {"ddpo": ALGORITHMS, "flow": FLOW_METHODS, "lora": LORA_PRECISIONS}
JUDGE = "digits_heldout_accuracy_mean"


def _variant_arg(*variants: str) -> str:
  """The config variants `variants` (comma-separated lists, blanks dropped) as one argument."""
  return ",".join(v for arg in variants for v in arg.split(",") if v.strip())


def _command(suite: str, name: str, variants: str = "") -> list[str]:
  """The `ddpo_jax.main` flags of a method of `suite`; `variants`: config variants added to
  the method's (e.g. "runlocal")."""
  if suite == "ddpo":
    arg = _variant_arg(variants)
    return [f"--config={REPO}/ddpo_jax/configs/default.py" + (f":{arg}" if arg else ""), *ALGORITHMS[name]]
  arg = _variant_arg(SUITES[suite][name], variants)
  return [f"--config={REPO}/ddpo_jax/configs/digits_flow.py" + (f":{arg}" if arg else "")]


def model_evaluations_per_epoch(config) -> int:
  """Denoiser evaluations (one per sample per call; classifier-free guidance counts 2) of one
  epoch of `config`: sampling's T steps for every sample, plus the update's K trained steps per
  sample per inner epoch (DiffusionNFT evaluates the trained and the sampling params: 2)."""
  from ddpo_jax import algorithms
  from ddpo_jax.tasks import dynamics
  s, t = config.sample, config.train
  n = s.batch_size * s.num_batches_per_epoch
  guided = 2 if float(s.guidance_scale) != 1.0 else 1
  update_guided = guided if t.cfg else 1
  k = dynamics.trained_steps_per_sample(s, t.timestep_fraction)
  per_step = 2 if algorithms.get(t.algorithm).needs_sampling_params else 1
  return n * s.num_steps * guided + n * k * update_guided * per_step * t.num_inner_epochs


def within_budget(rows: list[dict], budget_s: float) -> list[dict]:
  """The leading rows whose summed `epoch_time_s` is at most `budget_s` (at least one row)."""
  total, kept = 0.0, []
  for row in rows:
    total += row["epoch_time_s"]
    if total > budget_s and kept:
      break
    kept.append(row)
  return kept


def _rows(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def run_one(root: str, name: str, seed: int, epochs: int, suite: str = "ddpo",
            variants: str = "") -> list[dict]:
  """Runs (or reads back) one method of `suite` and seed; returns its metrics rows, one per
  epoch."""
  workdir = os.path.join(root, f"{name}_s{seed}")
  if len(_rows(workdir)) < epochs:
    cmd = [sys.executable, "-m", "ddpo_jax.main", *_command(suite, name, variants),
           f"--workdir={workdir}", f"--config.seed={seed}", f"--config.num_epochs={epochs}",
           "--config.progress=False", "--config.log_image_freq=0"]
    print("running:", " ".join(cmd[1:]), flush=True)
    t0 = time.time()
    subprocess.run(cmd, cwd=REPO, check=True)
    with open(os.path.join(workdir, "wall_time_s.txt"), "w") as f:
      f.write(f"{time.time() - t0:.1f}\n")
  rows = _rows(workdir)[:epochs]
  if [r["epoch"] for r in rows] != list(range(epochs)):
    raise RuntimeError(f"{workdir}/metrics.jsonl does not hold epochs 0..{epochs - 1}")
  return rows


def _mean_sd(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
  m = statistics.mean(values) * scale
  sd = statistics.stdev(values) * scale if len(values) > 1 else 0.0
  return f"{m:.{digits}f} ± {sd:.{digits}f}"


def table(results: dict[str, list[list[dict]]], evaluations: dict[str, int] | None = None
          ) -> str:
  """Markdown table: per algorithm, mean ± sd over seeds (judge accuracy in %); with
  `evaluations` ({name: denoiser evaluations per epoch}) also the epochs run (mean ± sd) and
  the evaluations per epoch."""
  extra = evaluations is not None
  lines = ["| algorithm | seeds | " + ("epochs | model evaluations / epoch | " if extra else "")
           + "reward, epoch 0 | reward, last epoch | reward, last 3 epochs | "
           "judge %, epoch 0 | judge %, last epoch | judge %, last 3 epochs |",
           "|---|---|" + ("---|---|" if extra else "") + "---|---|---|---|---|---|"]
  for name, runs in results.items():
    cells = []
    for key, scale in (("reward_mean", 1.0), (JUDGE, 100.0)):
      first = [r[0][key] for r in runs]
      last = [r[-1][key] for r in runs]
      last3 = [statistics.mean(x[key] for x in r[-3:]) for r in runs]
      digits = 3 if scale == 1.0 else 1
      cells += [_mean_sd(v, scale, digits) for v in (first, last, last3)]
    if extra:
      cells = [_mean_sd([float(len(r)) for r in runs], 1.0, 1), str(evaluations[name])] + cells
    lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(results: dict[str, list[list[dict]]], path: str, against_time: bool = False) -> None:
  """Per-epoch means over the seeds ± one sd; `against_time`: x is the seeds' mean summed
  epoch time (s) instead of the epoch."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  for name, runs in results.items():
    length = min(len(run) for run in runs)  # runs cut at a time budget differ in length
    for ax, key, scale in ((axes[0], "reward_mean", 1.0), (axes[1], JUDGE, 100.0)):
      values = np.asarray([[row[key] for row in run[:length]] for run in runs]) * scale
      mean = values.mean(0)
      sd = values.std(0, ddof=1) if len(runs) > 1 else np.zeros_like(mean)
      x = np.arange(len(mean))
      if against_time:
        x = np.mean([np.cumsum([row["epoch_time_s"] for row in run[:length]]) for run in runs],
                    axis=0)
      ax.plot(x, mean, label=name)
      ax.fill_between(x, mean - sd, mean + sd, alpha=0.2)
  xlabel = "summed epoch time (s)" if against_time else "epoch (256 samples each)"
  axes[0].set(xlabel=xlabel, ylabel="reward: log p̂(prompted class | image)")
  axes[1].set(xlabel=xlabel, ylabel="held-out judge accuracy (%)")
  axes[1].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--suite", default="ddpo", choices=sorted(SUITES))
  parser.add_argument("--root", default="/tmp/algorithms_digits")
  parser.add_argument("--epochs", type=int, default=30)
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--algorithms", default="", help="comma-separated; default: the suite's")
  parser.add_argument("--budget_s", type=float, default=0.0,
                      help="> 0: cut each run at this much summed epoch time (s)")
  parser.add_argument("--variants", default="",
                      help="config variants added to every run's, comma-separated (runlocal: "
                           "the tiny digits model and few steps, seconds per run; for the tests)")
  args = parser.parse_args(argv)
  methods = SUITES[args.suite]
  seeds = [int(s) for s in args.seeds.split(",")]
  names = args.algorithms.split(",") if args.algorithms else list(methods)
  unknown = sorted(set(names) - set(methods))
  if unknown:
    parser.error(f"unknown algorithms {unknown}; known: {list(methods)}")
  os.makedirs(args.root, exist_ok=True)
  results = {}
  for seed in seeds:  # seed-major: a stopped sweep has every algorithm at the first seeds
    for name in names:
      rows = run_one(args.root, name, seed, args.epochs, args.suite, args.variants)
      results.setdefault(name, []).append(within_budget(rows, args.budget_s)
                                          if args.budget_s > 0 else rows)
  evaluations = None
  if args.suite == "flow":
    from ddpo_jax.configs import digits_flow
    evaluations = {name: model_evaluations_per_epoch(digits_flow.get_config(
        _variant_arg(FLOW_METHODS[name], args.variants))) for name in names}
  md = table(results, evaluations)
  if args.budget_s > 0:
    md += (f"\n\nEach run cut at {args.budget_s:g} s of summed epoch time (sampling, reward, "
           "update).")
  with open(os.path.join(args.root, "results.md"), "w") as f:
    f.write(md + "\n")
  plot(results, os.path.join(args.root, "curves.png"), against_time=args.suite == "flow")
  print(md)
  print(f"wrote {args.root}/results.md and {args.root}/curves.png")


if __name__ == "__main__":
  main()
