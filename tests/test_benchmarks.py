"""benchmarks/: vs_trl.py's CLI parses and its settings checks hold, its SD-2-style tiny pipeline
has the SD-2 layout, and --rows=all passes the flags on to one process per row and tabulates them
(the rows' processes faked: no TRL, no compilation); ctrl_classifiers.py runs on one small case;
ctrl_digits.py's replicates move every seed and its replicate table gives means and sample
standard deviations; algorithms_digits.py tabulates and plots runs' metrics rows.

Every script in benchmarks/ also runs end to end, as its docs say (`python benchmarks/X.py ...`),
on its smallest setting (the smoke tests at the end; `slow` where it takes over about a minute on
the 2-core CPU), and no script reaches a private (`_name`) of a ddpo_jax module: a benchmark that
nothing runs broke silently when `train._schedule` moved (vs_trl.py --size=tiny crashed in
model_flops). vs_trl.py's TRL side needs the `bench` extra (TRL), which CI does not install: its
run skips without TRL, and its ddpo_jax side (--only=ddpo_jax: compilation, epochs, model FLOPs,
the train_and_evaluate cross-check) runs without it.
"""
import ast
import glob
import importlib
import importlib.util
import re
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
  assert "--style" in result.stdout and "--rows" in result.stdout


def test_settings_match_trl_rules():
  vs_trl = _module()
  args = vs_trl.argparse.Namespace(size="tiny", full=False, **{k: None for k in vs_trl.SIZES["tiny"]})
  s = vs_trl.resolve_settings(args)
  assert s["style"] == "sd1" and s["num_prompts"] == 16 and s["train_batch_size"] == 4
  assert s["num_batches"] * s["sample_batch_size"] == s["num_prompts"]
  assert s["K"] == int(s["steps"] * s["timestep_fraction"]) and s["lora"]
  assert s["optimizer_steps"] == s["num_prompts"] // (s["train_batch_size"] * s["grad_accum"])
  args.sample_batch_size = 6  # 16 prompts do not split into calls of 6
  with pytest.raises(SystemExit, match="multiple of --sample_batch_size"):
    vs_trl.resolve_settings(args)
  args.sample_batch_size, args.train_batch_size = 8, 3  # TRL: sample batch % train batch == 0
  with pytest.raises(SystemExit, match="train_batch_size"):
    vs_trl.resolve_settings(args)


@pytest.mark.slow  # 38 s in CI; a benchmark's smallest run
def test_ctrl_classifier_table_runs():
  """benchmarks/ctrl_classifiers.py trains the thickness config's 100-label classifier as the
  config does and scores it on the held-out split: one table row, above chance (1/3)."""
  out = _run_script("ctrl_classifiers.py", "--tasks=thickness", "--budgets=100", "--shifts=1",
                    timeout=300)
  rows = [r for r in out.splitlines() if r.startswith("| thickness |")]
  assert len(rows) == 1 and "| 100 (80/20) | 1 |" in rows[0], out
  accuracy = float(rows[0].split("|")[5])
  assert 0.6 < accuracy <= 1.0, rows[0]


@pytest.mark.parametrize("task", ["class", "thickness", "multi"])
def test_ctrl_digits_replicate_moves_every_seed(task):
  """Replicate r adds r to config.seed and to each control's data and classifier seed, through
  flags whose paths exist in the task's config; replicate 0 is the config as it is."""
  ctrl_digits = _module("ctrl_digits")
  config = importlib.import_module(f"ddpo_jax.configs.ctrl_digits_{task}").get_config()
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


def test_sd2_settings_are_the_issues_reference():
  """tiny sd2: 32 samples per epoch, 20 DDIM steps, CFG 5, minibatch 8, all timesteps, 4 AdamW
  steps; no SD-2 style at sd15."""
  vs_trl = _module()
  args = vs_trl.build_parser().parse_args(["--style=sd2", "--full"])
  s = vs_trl.resolve_settings(args)
  assert (s["style"], s["lora"], s["num_prompts"], s["steps"], s["guidance_scale"]) == \
      ("sd2", False, 32, 20, 5.0)
  assert (s["train_batch_size"], s["grad_accum"], s["K"], s["optimizer_steps"]) == (8, 1, 20, 4)
  with pytest.raises(SystemExit, match="--style=sd2 exists for --size=tiny only"):
    vs_trl.resolve_settings(vs_trl.build_parser().parse_args(["--size=sd15", "--style=sd2"]))


def test_sd2_pipeline_layout():
  """The SD-2-style pipeline's parts (no diffusers import; the benchmark builds them with
  diffusers and loads them in ddpo_jax): linear projections, per-level heads, three levels,
  text width = cross_attention_dim, 16x16x4 latents at 32 px; its directory is named by style."""
  from types import SimpleNamespace
  from ddpo_jax.models.pipeline import Pipeline
  vs_trl = _module()
  unet, vae, text = vs_trl.pipeline_components("tiny", 32, range(520), "sd2")
  assert unet["use_linear_projection"] and unet["attention_head_dim"] == (2, 4, 8)
  assert len(unet["block_out_channels"]) == 3 and unet["sample_size"] == 16
  assert text["hidden_size"] == unet["cross_attention_dim"] and text["hidden_act"] == "gelu"
  assert text["max_position_embeddings"] == vs_trl.SD_MAX_LENGTH and text["vocab_size"] == 520
  pipe = SimpleNamespace(vae_config=SimpleNamespace(**vae), unet_config=SimpleNamespace(**unet),
                         vae_scale_factor=2 ** (len(vae["block_out_channels"]) - 1))
  assert Pipeline.latent_shape(pipe, 32) == (16, 16, 4)
  sd1_unet, _, sd1_text = vs_trl.pipeline_components("tiny", 32, range(520), "sd1")
  assert not sd1_unet.get("use_linear_projection") and sd1_text["hidden_size"] == 32
  names = {vs_trl.pipeline_dir_name("tiny", style, 32) for style in ("sd1", "sd2")}
  assert len(names) == 2 and all(style in n for n, style in zip(sorted(names), ("sd1", "sd2")))
  with pytest.raises(ValueError, match="style 'sd2' exists for size 'tiny' only"):
    vs_trl.pipeline_components("sd15", 512, range(520), "sd2")


def test_row_argv_passes_flags_on():
  vs_trl = _module()
  assert vs_trl.all_rows("tiny") == [("sd1", False), ("sd1", True), ("sd2", False), ("sd2", True)]
  assert vs_trl.all_rows("sd15") == [("sd1", False), ("sd1", True)]
  parser = vs_trl.build_parser()
  args = parser.parse_args(["--rows=all", "--threads=1", "--steps=2", "--guidance_scale=3",
                            "--no_flops", "--cache_dir=/c", "--json_out=all.json", "--style=sd1"])
  child = parser.parse_args(vs_trl.row_argv(args, "sd2", True, "row.json"))
  assert (child.rows, child.style, child.full, child.json_out) == ("one", "sd2", True, "row.json")
  assert (child.threads, child.steps, child.guidance_scale, child.no_flops, child.cache_dir) == \
      (1, 2, 3.0, True, "/c")
  assert child.num_prompts is None and not child.skip_train_and_evaluate


def _fake_results(vs_trl, style, full, trl_s, jax_s):
  args = vs_trl.build_parser().parse_args([f"--style={style}"] + (["--full"] if full else []))
  s = vs_trl.resolve_settings(args)
  n = s["num_prompts"]
  side = lambda t: dict(epoch_s=t, samples_per_s=n / t, sample_s=t / 2, reward_s=0.01,
                        train_s=t / 2 - 0.01)
  return {"size": "tiny", "style": style, "settings": s, "trl": side(trl_s),
          "ddpo_jax": side(jax_s)}


def test_rows_all_runs_each_row_and_prints_the_table(monkeypatch, tmp_path, capsys):
  """--rows=all starts one process per row (faked here: it writes the row's --json_out) and
  ends with the table, each row's ratio and the minimum as the last line."""
  vs_trl = _module()
  times = {"sd1-lora": (10.0, 5.0), "sd1-full": (20.0, 4.0), "sd2-lora": (8.0, 16.0),
           "sd2-full": (9.0, 3.0)}
  commands = []
  real_popen = subprocess.Popen

  class FakePopen:
    def __new__(cls, cmd, **kw):  # other commands (platform's `uname -p`) run for real
      if not (isinstance(cmd, list) and cmd[1:2] == [os.path.abspath(SCRIPT)]):
        return real_popen(cmd, **kw)
      return super().__new__(cls)

    def __init__(self, cmd, **kw):
      commands.append(cmd)
      args = vs_trl.build_parser().parse_args(cmd[2:])
      label = vs_trl.row_label(args.style, args.full)
      with open(args.json_out, "w") as f:
        vs_trl.json.dump(_fake_results(vs_trl, args.style, args.full, *times[label]), f)
      self.stdout = iter([f"row {label} output\n", "ratio=1.00\n"])

    def wait(self):
      return 0

  monkeypatch.setattr(subprocess, "Popen", FakePopen)
  out = tmp_path / "all.json"
  results = vs_trl.main(["--rows=all", "--threads=1", "--epochs=1", f"--json_out={out}"])
  lines = capsys.readouterr().out.splitlines()
  assert len(commands) == 4 and all("--threads=1" in c and "--epochs=1" in c for c in commands)
  assert "[sd2-full] row sd2-full output" in lines
  assert lines[-1] == "ratio=0.50" and results["min_ratio"] == 0.5
  assert lines[-5:-1] == ["ratio[sd1-lora]=2.00", "ratio[sd1-full]=5.00", "ratio[sd2-lora]=0.50",
                          "ratio[sd2-full]=3.00"]
  table = [l for l in lines if l.startswith("| sd")]
  assert [l.split(" | ")[0] for l in table] == ["| sd1-lora", "| sd1-full", "| sd2-lora",
                                                "| sd2-full"]
  cells = table[2].split(" | ")
  assert "N=32 (calls of 8), T=20, CFG 5, mb 8x1, K=20, 4 AdamW steps" == cells[1]
  assert cells[2:5] == ["8.00", "16.00", "0.50"] and cells[5] == "4.00 / 0.010 / 3.99"
  saved = vs_trl.json.load(open(out))
  assert [r["label"] for r in saved["rows"]] == list(times) and saved["min_ratio"] == 0.5
  assert saved["rows"][3]["results"]["settings"]["style"] == "sd2"


def test_algorithm_comparison_tabulates_and_plots(tmp_path):
  """algorithms_digits.py's table (mean ± sample sd over seeds, judge in %) and plot from
  metrics rows written as ddpo_jax.main writes them (no training: the runs' rows are made)."""
  bench = _module("algorithms_digits")
  root = str(tmp_path)
  for name, base in (("DDPO-IS", 0.5), ("RWR", 0.1)):
    for seed, shift in ((0, 0.0), (1, 0.2)):
      workdir = os.path.join(root, f"{name}_s{seed}")
      os.makedirs(workdir)
      with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        for epoch in range(4):
          f.write(bench.json.dumps({"epoch": epoch, "reward_mean": -4.0 + epoch + shift,
                                    bench.JUDGE: base + 0.1 * epoch + shift}) + "\n")
  results = {name: [bench.run_one(root, name, seed, 4) for seed in (0, 1)]
             for name in ("DDPO-IS", "RWR")}
  table = bench.table(results)
  # DDPO-IS, last epoch: rewards -1.0 and -0.8 -> mean -0.900, sd 0.1414; judge 80% and 100%
  assert "| DDPO-IS | 2 | -3.900 ± 0.141 | -0.900 ± 0.141 | -1.900 ± 0.141 | 60.0 ± 14.1 | " \
         "90.0 ± 14.1 | 80.0 ± 14.1 |" in table, table
  assert "| RWR | 2 |" in table
  bench.plot(results, os.path.join(root, "curves.png"))
  assert os.path.getsize(os.path.join(root, "curves.png")) > 1000
  # a run whose rows skip an epoch (here epoch 1) is an error, not a shorter curve
  path = os.path.join(root, "RWR_s0", "metrics.jsonl")
  with open(path) as f:
    rows = f.readlines()
  with open(path, "w") as f:
    f.writelines(rows[:1] + rows[2:])
  with pytest.raises(RuntimeError, match=r"does not hold epochs 0\.\.2"):
    bench.run_one(root, "RWR", 0, 3)


@pytest.mark.slow  # four rows compiled at the real depth: 244 s on the loaded 2-core CPU; the
# fast tier runs memory.py's one-row smoke run (test_memory_tiny_runs, 35 s)
def test_memory_table_tiny_is_consistent():
  """benchmarks/memory.py on the tiny SD3.5 config (compiled at its real depth, no weights):
  fp32 params are 4 B each and the LoRA base 2 B, the compiled gradients are 4 B per trainable
  param, AdamW holds 8 B per trainable param, remat saves activations, the mesh split gives
  the unsplit state at fsdp=1 and less with fsdp; the depth fit is exact on linear data; the
  merged-LoRA rows (the earlier application) hold the same state."""
  import math
  import numpy as np
  from flax import traverse_util
  memory = _module("memory")
  spec = memory.TINY_MODELS["sd35_medium"]
  log = lambda msg: None
  rows = {(m, r): memory.measure_row(spec, m, r, "full", 1, 0.0, log, plain=False)
          for m, r in (("lora", False), ("lora", True), ("lora_merged", False), ("full", True))}
  for (method, remat), row in rows.items():
    n = row["trainable_params"]
    assert row["grad_bytes"] == 4 * n and row["optimizer_bytes"] == 8 * n, row
    # the compiled step's outputs are the gradients and the loss, each buffer padded to at
    # most XLA's 64-byte alignment
    leaves = len(memory.jax.tree.leaves(row["trees"][0])) + 1
    assert 4 * n + 4 <= row["compiles"][0]["output"] <= 4 * n + 4 + 64 * leaves, row
    assert row["temp1"] > 0 and row["slope"] > 0 and row["residuals1"] > 0
    if method == "full":
      assert row["param_bytes"] == 4 * n and n == row["base_params"]
    else:
      assert row["param_bytes"] == 2 * row["base_params"] + 4 * n and n < row["base_params"]
      trainable, frozen = row["trees"]
      kernels = traverse_util.flatten_dict(frozen)
      assert n == sum(32 * (math.prod(kernels[tuple(p.split("/")) + ("kernel",)].shape[:-1])
                            + kernels[tuple(p.split("/")) + ("kernel",)].shape[-1])
                      for p in memory.lora.select_targets(frozen, spec.lora.targets))
    state = [memory.per_device_state_bytes(*row["trees"], f) for f in (1, 2, 4)]
    assert state[0] == row["param_bytes"] + row["grad_bytes"] + row["optimizer_bytes"]
    assert state[0] >= state[1] >= state[2]
    fit = memory.mesh_fit(row, 8, 80 * memory.GiB)
    assert all(best == memory.MAX_BATCH for _, best, _, _ in fit.values())
  lora_off, lora_on = rows["lora", False], rows["lora", True]
  merged = rows["lora_merged", False]
  assert (merged["param_bytes"], merged["grad_bytes"]) == (lora_off["param_bytes"],
                                                           lora_off["grad_bytes"])
  assert lora_on["temp1"] <= lora_off["temp1"] and lora_on["residuals1"] < lora_off["residuals1"]
  a = memory.fit_linear([((1, 1), 10.0 + 3 + 5), ((2, 1), 10.0 + 6 + 5), ((1, 2), 10.0 + 3 + 10)])
  assert np.allclose(a, [10.0, 3.0, 5.0])
  assert memory.depth_points(memory.MODELS["flux_dev"], 2) == ([(2, 2), (4, 2), (2, 4)], (4, 4))
  args = memory.build_parser().parse_args(["--tiny", "--markdown"])
  args.pixels = "tiny"
  table = memory.tables(list(rows.values()), args)
  assert table.count("| tiny SD3.5 ") == 8, table  # 4 rows in each of the two tables
  assert table.count("| tiny SD3.5 LoRA merged (before) ") == 2, table


def test_flow_comparison_budget_and_model_evaluations():
  """algorithms_digits.py --suite=flow: runs are cut at the summed epoch time, and the
  denoiser evaluations per epoch are counted from the configs (256 samples x 10 steps of
  sampling; the update's K = 5 of 10 steps, MixGRPO's 4-step window, Fast's 2, NFT's 5 at two
  param sets)."""
  bench = _module("algorithms_digits")
  rows = [{"epoch": e, "epoch_time_s": t} for e, t in enumerate([3.0, 2.0, 2.0, 4.0])]
  assert [r["epoch"] for r in bench.within_budget(rows, 7.0)] == [0, 1, 2]
  assert [r["epoch"] for r in bench.within_budget(rows, 1.0)] == [0]  # at least one row
  from ddpo_jax.configs import digits_flow
  counts = {name: bench.model_evaluations_per_epoch(digits_flow.get_config(variant))
            for name, variant in bench.FLOW_METHODS.items()}
  sampling = 256 * 10
  assert counts == {"Flow-GRPO": sampling + 256 * 5, "CPS": sampling + 256 * 5,
                    "MixGRPO": sampling + 256 * 4, "Flow-GRPO-Fast": sampling + 256 * 2,
                    "DiffusionNFT": sampling + 256 * 5 * 2}
  table = bench.table({"Flow-GRPO": [[{"reward_mean": -1.0, bench.JUDGE: 0.5}] * 3] * 2},
                      {"Flow-GRPO": counts["Flow-GRPO"]})
  assert "| Flow-GRPO | 2 | 3.0 ± 0.0 | 3840 | -1.000 ± 0.000 |" in table, table


# ------------------------------------------------------------------------------------------------
# No private ddpo_jax names in benchmarks/
# ------------------------------------------------------------------------------------------------
BENCHMARK_SCRIPTS = sorted(glob.glob(os.path.join(REPO, "benchmarks", "*.py")))


def _is_private(name: str) -> bool:
  return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_ddpo_jax_names(source: str) -> list[str]:
  """"LINE: NAME" for each private name of a ddpo_jax module that `source` imports or reaches:
  `from ddpo_jax.m import _f`, `import ddpo_jax._m`, and attribute chains from a name bound to
  something of ddpo_jax (`from ddpo_jax import train` ... `train._schedule`, `ddpo_jax.m._f`,
  `getattr(train, "_f")`). Names are tracked per file, not per scope (a benchmark script is
  small; a false alarm would name the line)."""
  tree = ast.parse(source)
  bound, found = set(), []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.split(".")[0] != "ddpo_jax":
          continue
        found += [f"{node.lineno}: {alias.name}" for part in alias.name.split(".")
                  if _is_private(part)][:1]
        bound.add(alias.asname or "ddpo_jax")
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
        node.module.split(".")[0] == "ddpo_jax":
      if any(_is_private(part) for part in node.module.split(".")):
        found.append(f"{node.lineno}: {node.module}")
      for alias in node.names:
        if _is_private(alias.name):
          found.append(f"{node.lineno}: {node.module}.{alias.name}")
        bound.add(alias.asname or alias.name)

  def root(node):
    while isinstance(node, ast.Attribute):
      node = node.value
    return node.id if isinstance(node, ast.Name) else None

  for node in ast.walk(tree):
    if isinstance(node, ast.Attribute) and _is_private(node.attr) and root(node) in bound:
      found.append(f"{node.lineno}: {ast.unparse(node)}")
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
        node.func.id in ("getattr", "hasattr", "setattr") and len(node.args) >= 2 and \
        root(node.args[0]) in bound and isinstance(node.args[1], ast.Constant) and \
        isinstance(node.args[1].value, str) and _is_private(node.args[1].value):
      found.append(f"{node.lineno}: {ast.unparse(node)}")
  return sorted(set(found), key=lambda f: int(f.split(":")[0]))


def test_private_name_check_flags_what_broke():
  """The check finds the access that crashed vs_trl.py (and the other forms), and passes
  public names, other packages' private names and private attributes of TRL's objects."""
  broken = ("def model_flops(policy, config):\n"
            "  from ddpo_jax import diffusion, rl, train\n"
            "  sched, timesteps, prev = train._schedule(policy, config.sample.num_steps)\n")
  assert private_ddpo_jax_names(broken) == ["3: train._schedule"]
  assert private_ddpo_jax_names(
      "import ddpo_jax.models.unet as unet_lib\nfrom ddpo_jax.algorithms.train import _schedule as s\n"
      "import ddpo_jax._hidden\nx = unet_lib._conv(1)\ny = ddpo_jax.algorithms.train._schedule\n"
      "z = getattr(unet_lib, '_conv')\n") == [
          "2: ddpo_jax.algorithms.train._schedule", "3: ddpo_jax._hidden", "4: unet_lib._conv",
          "5: ddpo_jax.algorithms.train._schedule", "6: getattr(unet_lib, '_conv')"]
  assert private_ddpo_jax_names(
      "from ddpo_jax import dynamics, train\nfrom jax._src import core\nimport trl\n"
      "d = dynamics.make_dynamics(1, 2).schedule\ntr = trl.DDPOTrainer()\n"
      "tr._generate_samples = 1\nv = ddpo_jax.__version__\n") == []


@pytest.mark.parametrize("path", BENCHMARK_SCRIPTS, ids=os.path.basename)
def test_benchmarks_use_public_names_only(path):
  with open(path, encoding="utf-8") as f:
    found = private_ddpo_jax_names(f.read())
  assert not found, (f"{os.path.relpath(path, REPO)} reaches private ddpo_jax names (use or add "
                     f"a public function): {found}")


# ------------------------------------------------------------------------------------------------
# Each script end to end on its smallest setting
# ------------------------------------------------------------------------------------------------
def _run_script(name: str, *args: str, timeout: int = 600) -> str:
  """`python benchmarks/NAME ARGS` from the repository root; its stdout (fails on an error)."""
  result = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", name), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)
  assert result.returncode == 0, (f"{name} {' '.join(args)} exited {result.returncode}:\n"
                                  f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
  return result.stdout


def test_every_benchmark_has_a_smoke_test():
  """A new script in benchmarks/ needs its run here (a test that names it)."""
  with open(__file__, encoding="utf-8") as f:
    source = f.read()
  untested = [os.path.basename(p) for p in BENCHMARK_SCRIPTS
              if f'_run_script("{os.path.basename(p)}"' not in source]
  assert not untested, f"benchmarks without a smoke test: {untested}"


# vs_trl.py's smallest row: 4 prompts in one sampling call, 2 DDIM steps, minibatch 2 (2 AdamW
# steps), one timed epoch and no warm-up epoch, a pipeline of its own under tmp_path.
VS_TRL_SMALLEST = ("--size=tiny", "--num_prompts=4", "--sample_batch_size=4",
                   "--train_batch_size=2", "--steps=2", "--epochs=1", "--warmup_epochs=0")


@pytest.mark.slow
def test_vs_trl_ddpo_jax_side_runs_without_trl(tmp_path):
  """--only=ddpo_jax: the pipeline is written and loaded, both programs compile, an epoch runs,
  the model FLOPs / MFU are counted (model_flops: where the missing train._schedule crashed)
  and train_and_evaluate's cross-check runs; the ratio is n/a without TRL's side."""
  out = _run_script("vs_trl.py", *VS_TRL_SMALLEST, "--only=ddpo_jax",
                    f"--cache_dir={tmp_path / 'cache'}", f"--json_out={tmp_path / 'r.json'}")
  assert "ddpo_jax model FLOPs per epoch (XLA cost analysis)" in out, out[-3000:]
  assert "ddpo_jax train_and_evaluate epochs (cross-check" in out, out[-3000:]
  assert out.rstrip().splitlines()[-1] == "ratio=n/a", out[-3000:]
  import json
  r = json.load(open(tmp_path / "r.json"))["ddpo_jax"]
  assert r["flops_sample"] > 0 and r["flops_train"] > 0 and r["tae_samples_per_s"] > 0, r


@pytest.mark.slow
def test_vs_trl_runs_both_sides(tmp_path):
  """The benchmark as its docs run it, on the smallest row: TRL's DDPOTrainer and ddpo_jax on
  one pipeline, ending with the ratio line (needs the `bench` extra)."""
  pytest.importorskip("trl", reason="vs_trl.py's TRL side needs the bench extra: "
                                    "pip install -e '.[bench]'")
  out = _run_script("vs_trl.py", *VS_TRL_SMALLEST, f"--cache_dir={tmp_path / 'cache'}")
  assert "TRL 0.23.1 DDPOTrainer" in out and "ddpo_jax model FLOPs per epoch" in out, out[-3000:]
  assert re.fullmatch(r"ratio=\d+\.\d\d", out.rstrip().splitlines()[-1]), out[-3000:]


@pytest.mark.slow
def test_grad_loop_runs():
  out = _run_script("grad_loop.py", "--style=sd1", "--batch=1", "--micro_steps=2",
                    "--repeats=1")
  assert "sd1 UNet, batch 1" in out and "2 separate calls" in out, out
  assert re.search(r"\((\d+) of \1 convolutions canonical\)", out), out


@pytest.mark.slow
def test_update_vs_grads_runs(tmp_path):
  out = _run_script("update_vs_grads.py", "--style=sd1", "--lora", "--repeats=1", "--steps=2",
                    f"--cache_dir={tmp_path}", timeout=1200)
  assert re.search(r"sd1 LoRA conv=ours.*update [\d.]+ s .* ratio [\d.]+$", out.strip()), out


@pytest.mark.slow  # 45 s in CI; a benchmark's smallest run
def test_memory_tiny_runs():
  """One row (tiny SD3.5, LoRA, no remat) compiled at its real depth only: both tables."""
  out = _run_script("memory.py", "--tiny", "--markdown", "--models=sd35_medium",
                    "--rows=lora-off", "--depths=full")
  assert out.count("| tiny SD3.5 ") == 2, out


@pytest.mark.slow  # 24 s in CI; a benchmark's smallest run
def test_reward_server_load_runs():
  out = _run_script("reward_server_load.py", "--clients=1,20", "--seconds=0.5", "--images=2",
                    "--size=16")
  lines = [l for l in out.splitlines() if l.startswith("clients=")]
  assert [l.split(":")[0] for l in lines] == ["clients=1", "clients=20"], out
  assert all(l.endswith("failed 0") for l in lines), out


@pytest.mark.slow
def test_kill_resume_runs(tmp_path, digits_cache):
  out = _run_script("kill_resume.py", "--kills=1", "--epochs=2", "--window_epochs=1",
                    f"--workdir={tmp_path}")
  assert "params bit-identical: True" in out and "each epoch once: True" in out, out


@pytest.mark.slow
def test_algorithms_digits_runs(tmp_path, digits_cache):
  out = _run_script("algorithms_digits.py", "--variants=runlocal", "--epochs=1", "--seeds=0",
                    "--algorithms=RWR", f"--root={tmp_path}")
  assert "| RWR | 1 |" in out and os.path.exists(tmp_path / "curves.png"), out


@pytest.mark.slow
def test_ctrl_digits_runs(tmp_path, digits_cache):
  out = _run_script("ctrl_digits.py", "--variants=runlocal", "--tasks=class", "--budgets=100",
                    "--methods=cfg", f"--root={tmp_path}")
  assert "| class | 100 | classifier-free guidance | digit " in out, out
  assert os.path.exists(tmp_path / "class_cfg_100" / "eval.json")


@pytest.mark.slow  # one TPU compile of the tiny digits run (the plan CLI's fast test does one)
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu not installed (pip install -e '.[tpu-plan]')")
def test_plan_table_smoke_row(tmp_path, digits_cache):
  """benchmarks/plan_table.py's smallest row: the digits run compiled for v5e:2x2; its JSON is
  kept and a second call reads it back instead of compiling."""
  out = _run_script("plan_table.py", "--rows=tiny", f"--out={tmp_path}", timeout=900)
  row = [line for line in out.splitlines() if line.startswith("| digits DDPO")]
  assert len(row) == 1 and "| v5e:2x2 |" in row[0] and "does not fit" not in row[0], out
  assert (tmp_path / "tiny.json").exists()
  assert _run_script("plan_table.py", "--rows=tiny", f"--out={tmp_path}").splitlines()[2] == row[0]
