"""benchmarks/: vs_trl.py's CLI parses and its settings checks hold (no TRL, no compilation);
ctrl_classifiers.py runs on one small case; ctrl_digits.py's replicates move every seed and its
replicate table gives means and sample standard deviations.

The TRL benchmark itself needs the `bench` extra (TRL) and minutes of CPU; CI installs only
`.[test]`.
"""
import importlib
import os
import subprocess
import sys

import pytest

from conftest import REPO

SCRIPT = os.path.join(REPO, "benchmarks", "vs_trl.py")


def _module(name="vs_trl"):
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  try:
    return importlib.import_module(name)
  finally:
    sys.path.pop(0)


def test_help_runs_without_trl():
  result = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True,
                          timeout=60, cwd=REPO)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "--size" in result.stdout and "sd15" in result.stdout and "ratio=R" in result.stdout


def test_settings_match_trl_rules():
  vs_trl = _module()
  args = vs_trl.argparse.Namespace(size="tiny", full=False, **{k: None for k in vs_trl.SIZES["tiny"]})
  s = vs_trl.resolve_settings(args)
  assert s["num_batches"] * s["sample_batch_size"] == s["num_prompts"]
  assert s["K"] == int(s["steps"] * s["timestep_fraction"]) and s["lora"]
  assert s["optimizer_steps"] == s["num_prompts"] // (s["train_batch_size"] * s["grad_accum"])
  args.sample_batch_size = 6  # 16 prompts do not split into calls of 6
  with pytest.raises(SystemExit, match="multiple of --sample_batch_size"):
    vs_trl.resolve_settings(args)
  args.sample_batch_size, args.train_batch_size = 8, 3  # TRL: sample batch % train batch == 0
  with pytest.raises(SystemExit, match="train_batch_size"):
    vs_trl.resolve_settings(args)


def test_ctrl_classifier_table_runs():
  """benchmarks/ctrl_classifiers.py trains the thickness config's 100-label classifier as the
  config does and scores it on the held-out split: one table row, above chance (1/3)."""
  script = os.path.join(REPO, "benchmarks", "ctrl_classifiers.py")
  result = subprocess.run([sys.executable, script, "--tasks=thickness", "--budgets=100",
                           "--shifts=1"], capture_output=True, text=True, timeout=300, cwd=REPO)
  assert result.returncode == 0, result.stderr[-2000:]
  rows = [r for r in result.stdout.splitlines() if r.startswith("| thickness |")]
  assert len(rows) == 1 and "| 100 (80/20) | 1 |" in rows[0], result.stdout
  accuracy = float(rows[0].split("|")[5])
  assert 0.6 < accuracy <= 1.0, rows[0]


@pytest.mark.parametrize("task", ["class", "thickness", "multi"])
def test_ctrl_digits_replicate_moves_every_seed(task):
  """Replicate r adds r to config.seed and to each control's data and classifier seed, through
  flags whose paths exist in the task's config; replicate 0 is the config as it is."""
  ctrl_digits = _module("ctrl_digits")
  config = importlib.import_module(f"ctrl_digits_{task}").get_config()
  assert ctrl_digits.replicate_flags(task, 0) == []
  moved = {}
  for flag in ctrl_digits.replicate_flags(task, 3):
    path, value = flag.removeprefix("--config.").split("=")
    node = config
    for part in path.split("."):
      node = node[part]
    moved[path] = int(value) - node
  expected = {"seed"} | {f"ctrl.conditions.{n}.{s}.seed" for n in config.ctrl.controls
                         for s in ("data", "classifier")}
  assert set(moved) == expected and set(moved.values()) == {3}, moved


def test_ctrl_digits_replicate_table():
  ctrl_digits = _module("ctrl_digits")
  rows = [dict(task="multi", budget="100", method="ctrl", digit_accuracy=a, thickness_accuracy=b,
               joint_accuracy=a * b, digit_classifier_accuracy=1.0, diversity=d)
          for a, b, d in [(0.8, 0.5, 1.0), (0.9, 0.5, 1.5), (1.0, 0.5, 2.0)]]
  rows.append(dict(task="class", budget="all", method="cfg", digit_accuracy=0.97, diversity=1.5))
  lines = ctrl_digits.replicate_table(rows).splitlines()
  assert len(lines) == 4, lines
  assert lines[2] == ("| multi | 100 | CTRL (backprop) | 3 | digit 0.900 ± 0.100, "
                      "thickness 0.500 ± 0.000 | 0.450 ± 0.050 | 1.500 ± 0.500 |"), lines[2]
  assert lines[3] == ("| class | all | classifier-free guidance | 1 | digit 0.970 |  | 1.500 |"), lines[3]
