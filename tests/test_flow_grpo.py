"""Flow-GRPO through the one training core (issue 18): configs/sd3_pickscore.py:runlocal on a
tiny random SD3.5-style pipeline, trained by `loop.train_and_evaluate` with the flow SDE
(`sample.sampler="sde"`), groups of prompts, group-relative advantages and the PickScore reward
of a tiny random CLIPModel: the update's log-probs equal the sampler's at the sampling params,
the run trains 2 epochs, resumes and samples, and the bad combinations are refused before
anything compiles."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import tiny_models as tm  # noqa: E402
from conftest import REPO  # noqa: E402
from ddpo_jax import checkpoints, dynamics, families, loop, parallel, train  # noqa: E402
from test_clip_score import _write_model as write_tiny_clip_model  # noqa: E402
from test_sd import (compile_cache, load_config, one_update, sd_cache_dir,  # noqa: F401,E402
                     sd_overrides, subprocess_env, tiny_sd)

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


def test_update_log_probs_equal_the_samplers_at_init(tiny_sd3, tiny_pickscore, compile_cache):
  """One sampling call and one update call at learning rate 0 (the params stay the sampling
  params): every micro-step's importance ratio is 1 up to float error (approx_kl < 1e-10,
  clipfrac 0), with CFG in both programs, LoRA on the MMDiT's attention projections. (CPS's
  steps go through the same `FlowDynamics` code; tests/test_flow_sde.py checks its re-scoring
  on the same transformer.)"""
  config = load_config(RECIPE, "runlocal", **_flow_overrides(tiny_sd3, tiny_pickscore))
  policy, frozen, state, metrics = one_update(config, lr=0.0)
  assert policy.prediction_type == "flow" and config.sample.guidance_scale != 1.0
  assert metrics["approx_kl"] < 1e-10, metrics
  assert metrics["clipfrac"] == 0.0 and np.isfinite(metrics["loss"])
  assert "base_unet" in frozen and "transformer" not in frozen  # LoRA on the transformer


def test_flow_grpo_runlocal_trains_resumes_and_samples(tiny_sd3, tiny_pickscore, compile_cache,
                                                       tmp_path):
  workdir = str(tmp_path / "run")
  config = load_config(RECIPE, "runlocal",
                       **_flow_overrides(tiny_sd3, tiny_pickscore, num_epochs=1))
  assert config.sample.group_size == 2 and config.sample.group_std == "global"
  loop.train_and_evaluate(config, workdir)
  rows1 = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  logs = []
  config = load_config(RECIPE, "runlocal", **_flow_overrides(tiny_sd3, tiny_pickscore))
  metrics = loop.train_and_evaluate(config, workdir, log=logs.append)
  assert any("resuming from checkpoint step 1 (epoch 1)" in l for l in logs), logs
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["epoch"] for r in rows] == [0, 1] and rows[0] == rows1[0]
  assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["pickscore_mean"])
  assert np.isfinite(metrics["pickscore_cosine_mean"])
  assert metrics["optimizer_step"] == 2
  mngr = checkpoints.manager(workdir, read_only=True)
  assert sorted(mngr.all_steps()) == [0, 1, 2]
  mngr.close()
  out = tmp_path / "samples.npz"
  result = subprocess.run(
      [sys.executable, "-m", "ddpo_jax.sample", f"--workdir={workdir}", "--num=2", f"--out={out}",
       "--prompts=a cat"], cwd=REPO, capture_output=True, text=True, timeout=300,
      env=subprocess_env(compile_cache))
  assert result.returncode == 0, result.stderr[-3000:]
  data = np.load(out)
  assert data["images"].shape == (2, 16, 16, 3) and int(data["step"]) == 2


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
  refused({"sample.sampler": "sde", "train.kl_coef": 0.1,
           "per_prompt_stat_tracking.enabled": False}, r"train.kl_coef=0")
  refused({"sample.sampler": "cps", "sample.noise_level": 1.5}, "CPS needs 0 < noise_level")
  refused({"sample.sampler": "sde", "train.algorithm": "rwr"}, "RWR's eps regression")


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
  return tm.save_tiny_flow_pipeline(str(tmp_path_factory.mktemp("grpo") / "flux"), "flux")


def test_flux_dev_update_at_init_and_guidance(tiny_flux, tiny_pickscore, compile_cache):
  """configs/flux_pickscore.py:runlocal on a tiny FLUX.1-dev-style pipeline: the embedded
  guidance (model.embedded_guidance) in both programs, no CFG, LoRA on the double- and
  single-stream attention: the ratio is 1 at the sampling params; CFG on FLUX is refused."""
  config = load_config("flux_pickscore", "runlocal", **_flow_overrides(tiny_flux, tiny_pickscore))
  assert config.sample.guidance_scale == 1.0 and config.model.embedded_guidance == 3.5
  policy, frozen, state, metrics = one_update(config, lr=0.0)
  assert metrics["approx_kl"] < 1e-10 and metrics["clipfrac"] == 0.0, metrics
  single = [k for k in state.params if k.startswith("single_transformer_blocks")]
  assert single and "transformer_blocks_0" in state.params  # LoRA on both kinds of block
  config = load_config("flux_pickscore", "runlocal", **_flow_overrides(
      tiny_flux, tiny_pickscore, **{"sample.guidance_scale": 2.0}))
  with pytest.raises(ValueError, match=r"embeds its guidance scale .* set sample.guidance_scale=1"):
    families.build_policy(config, "")
