"""Flow-GRPO through the one training core (issue 18): configs/sd3_pickscore.py and
configs/flux_pickscore.py (:runlocal, LoRA, and :full,runlocal) on tiny random SD3.5- and
FLUX.1-dev-style pipelines, trained by `loop.train_and_evaluate` with the flow SDE
(`sample.sampler="sde"`), groups of prompts, group-relative advantages and the PickScore reward
of a tiny random CLIPModel: `python -m ddpo_jax.main` killed after its first update's
checkpoint, the resumed run finishing with the update's log-probs equal to the sampler's at the
sampling params, samples from the result; the bad combinations refused before anything
compiles."""
import json
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import tiny_models as tm  # noqa: E402
from conftest import REPO  # noqa: E402
import jax  # noqa: E402
from ddpo_jax import (checkpoints, dynamics, families, loop, parallel, runs, sample,  # noqa: E402
                      train)
from helpers import committed_steps, kill_after_commit  # noqa: E402
from test_clip_score import _write_model as write_tiny_clip_model  # noqa: E402
from test_sd import (compile_cache, load_config, sd_cache_dir, sd_overrides,  # noqa: F401,E402
                     subprocess_env, tiny_sd)

RECIPE = "sd3_pickscore"


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
  return tm.save_tiny_flow_pipeline(str(tmp_path_factory.mktemp("grpo") / "sd3"), "sd3")


@pytest.fixture(scope="module")
def tiny_pickscore(tmp_path_factory):
  """A tiny random transformers CLIPModel (standing in for PickScore_v1) and a prompt file."""
  root = tmp_path_factory.mktemp("pickscore")
  write_tiny_clip_model(str(root / "clip"), legacy=False, seed=7)
  (root / "prompts.txt").write_text("a photo of a cat\nthe red dog\na cat on the mat\n")
  return str(root / "clip"), str(root / "prompts.txt")


def _flow_overrides(tiny_sd3, tiny_pickscore, **extra):
  clip, prompts = tiny_pickscore
  return {"model.pretrained_path": tiny_sd3, "prompt_fn_kwargs.path": prompts,
          "reward.pickscore_path": clip, **extra}


# The runlocal variant of each flow config: (config file, variant, pipeline fixture).
# sd3_pickscore:full,runlocal (about 40 s on the 2-core CI machine, past the suite's time
# budget) runs with DDPO_JAX_ALL_FLOW_RUNS=1; the full-fine-tuning path is the same `_full`
# variant in flux_pickscore:full,runlocal, which CI runs.
ALL_FLOW_RUNS = bool(os.environ.get("DDPO_JAX_ALL_FLOW_RUNS"))
RUNLOCAL_RUNS = [
    pytest.param("sd3_pickscore", "runlocal", "tiny_sd3", id="sd3_pickscore:runlocal"),
    pytest.param("sd3_pickscore", "full,runlocal", "tiny_sd3", id="sd3_pickscore:full,runlocal",
                 marks=pytest.mark.skipif(not ALL_FLOW_RUNS, reason="set DDPO_JAX_ALL_FLOW_RUNS=1")),
    pytest.param("flux_pickscore", "runlocal", "tiny_flux", id="flux_pickscore:runlocal"),
    pytest.param("flux_pickscore", "full,runlocal", "tiny_flux", id="flux_pickscore:full,runlocal"),
]


@pytest.mark.parametrize("name, variant, pipeline", RUNLOCAL_RUNS)
def test_runlocal_trains_resumes_after_a_kill_and_samples(name, variant, pipeline, request,
                                                          tiny_pickscore, compile_cache, tmp_path):
  """configs/NAME.py:VARIANT on its tiny pipeline: `python -m ddpo_jax.main` is SIGKILLed as soon
  as checkpoint step 1 (epoch 0's update) is committed (started with num_epochs=50 so that it
  cannot end first), then `loop.train_and_evaluate` resumes from the newest committed step and
  trains to the end (runlocal's 2 epochs when the kill came before step 2, as it nearly always
  does), and the result samples.

  Every epoch takes one optimizer step, after all of its micro-steps (asserted on the config):
  the update re-scores each step at the params that sampled it, so every epoch's importance
  ratio is 1 up to float error (approx_kl < 1e-10, clipfrac 0) -- with CFG (SD3) or the
  embedded guidance (FLUX), LoRA or the full transformer, in the killed run and the resumed
  one."""
  path = request.getfixturevalue(pipeline)
  overrides = _flow_overrides(path, tiny_pickscore)
  workdir = str(tmp_path / "run")
  cmd = [sys.executable, "-m", "ddpo_jax.main", f"--config={REPO}/configs/{name}.py:{variant}",
         f"--workdir={workdir}", "--config.num_epochs=50",
         *[f"--config.{k}={v}" for k, v in overrides.items()]]
  committed, out = kill_after_commit(cmd, workdir, step=1, env=subprocess_env(compile_cache))
  resume = committed[-1]
  assert committed == list(range(resume + 1)) and "saved the starting point as step 0" in out
  killed_rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert len(killed_rows) >= resume  # epochs whose checkpoint was committed were logged

  config = load_config(name, variant, **overrides, num_epochs=resume + 1)
  s, t = config.sample, config.train
  assert s.batch_size * s.num_batches_per_epoch == t.batch_size * t.gradient_accumulation_steps
  assert t.num_inner_epochs == 1 and config.save_freq == 1
  logs = []
  metrics = loop.train_and_evaluate(config, workdir, log=logs.append)
  said = "\n".join(map(str, logs))
  assert f"resuming from checkpoint step {resume} (epoch {resume})" in said, said
  assert "config change on resume: num_epochs: 50 -> " in said, said
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["epoch"] for r in rows] == list(range(resume + 1))  # each epoch once
  assert rows[:resume] == killed_rows[:resume]  # the killed run's committed epochs are kept
  for row in rows:
    assert row["approx_kl"] < 1e-10 and row["clipfrac"] == 0.0, row
    assert np.isfinite(row["loss"]) and np.isfinite(row["pickscore_mean"]), row
  assert np.isfinite(metrics["pickscore_cosine_mean"])
  assert metrics["optimizer_step"] == resume + 1
  assert committed_steps(workdir) == list(range(resume + 2))

  run_config, policy, params, step = runs.restore_run(workdir)
  assert step == resume + 1 and run_config.model.lora.enabled == ("full" not in variant)
  paths = [parallel.path_str(k) for k, _ in jax.tree_util.tree_leaves_with_path(params)]
  if "full" in variant:  # the whole transformer is trained
    assert "base_unet" not in policy.params and "transformer_blocks_0/attn/to_q/kernel" in paths
  else:  # LoRA factors on the attention; the pre-trained transformer is frozen
    assert "base_unet" in policy.params and all(k.endswith(("/a", "/b")) for k in paths), paths
    assert "transformer_blocks_0/attn/to_q/a" in paths, paths
    if name.startswith("flux"):  # the single-stream blocks' attention too
      assert "single_transformer_blocks_0/attn/to_q/a" in paths, paths
  _, start, _ = checkpoints.read_state(workdir, 0)
  moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                       start["params"], params)
  assert any(jax.tree.leaves(moved))  # training changed the params
  images, prompts = sample.sample_images(run_config, policy, params, 4, ["a cat"])
  assert images.shape == (4, 16, 16, 3) and images.dtype == np.uint8 and prompts == ["a cat"] * 4
  assert len({im.tobytes() for im in images}) == 4  # 4 different noise draws


def test_bad_flow_configs_are_refused_before_compiling(tiny_sd3, tiny_sd, prompt_assets):
  mesh = parallel.make_mesh()

  def refused(overrides, match, path=tiny_sd3, stage="policy"):
    config = load_config("sd_compressibility", "runlocal", **sd_overrides(path, prompt_assets,
                                                                          **overrides))
    with pytest.raises(ValueError, match=match):
      train.validate_config(config, mesh)
      dynamics.make_dynamics(families.build_policy(config, ""), config)

  refused({}, r"sample.sampler='ddim' needs a 'epsilon'-predicting model; this one predicts "
          r"'flow' \(use sample.sampler in \['sde', 'cps', 'ode'\]\)")
  refused({"sample.sampler": "sde"}, r"'sde' needs a 'flow'-predicting model; this one "
          r"predicts 'epsilon'", path=tiny_sd)
  refused({"sample.sampler": "sde", "sample.group_size": 3}, r"sample.group_size=3 must be "
          r">= 1 and divide sample.batch_size=4")
  refused({"sample.sampler": "sde", "sample.group_size": 2}, "set per_prompt_stat_tracking"
          r".enabled=False")
  refused({"sample.sampler": "cps", "sample.noise_level": 1.5}, "CPS needs 0 < noise_level")
  refused({"sample.sampler": "sde", "train.algorithm": "rwr"},
          r"train.algorithm='rwr' is an eps regression, written for DDIM")


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
  return tm.save_tiny_flow_pipeline(str(tmp_path_factory.mktemp("grpo") / "flux"), "flux")


def test_flux_dev_guidance_and_cfg_refused(tiny_flux, tiny_pickscore):
  """configs/flux_pickscore.py:runlocal on a tiny FLUX.1-dev-style pipeline feeds the embedded
  guidance (model.embedded_guidance) and no CFG (the ratio-1 check of both programs with it:
  `test_runlocal_trains_resumes_after_a_kill_and_samples`); CFG on FLUX is refused."""
  config = load_config("flux_pickscore", "runlocal", **_flow_overrides(tiny_flux, tiny_pickscore))
  assert config.sample.guidance_scale == 1.0 and config.model.embedded_guidance == 3.5
  config = load_config("flux_pickscore", "runlocal", **_flow_overrides(
      tiny_flux, tiny_pickscore, **{"sample.guidance_scale": 2.0}))
  with pytest.raises(ValueError, match=r"embeds its guidance scale .* set sample.guidance_scale=1"):
    families.build_policy(config, "")

