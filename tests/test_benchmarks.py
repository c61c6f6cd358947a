"""benchmarks/: vs_trl.py's CLI parses and its settings checks hold (no TRL, no compilation);
ctrl_classifiers.py runs on one small case.

The TRL benchmark itself needs the `bench` extra (TRL) and minutes of CPU; CI installs only
`.[test]`.
"""
import os
import subprocess
import sys

import pytest

from conftest import REPO

SCRIPT = os.path.join(REPO, "benchmarks", "vs_trl.py")


def _module():
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  try:
    import vs_trl
  finally:
    sys.path.pop(0)
  return vs_trl


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
