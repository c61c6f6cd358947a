"""Stable Diffusion DDPO on a tiny random diffusers pipeline: the policy, each ddpo_jax/configs/sd_*.py
`runlocal` variant (train, resume, sample CLI), full fine-tuning in bf16, bad inputs. Prompts come
from synthetic files in the paper's format (the `prompt_assets` fixture), the aesthetic reward
from a tiny CLIP tower and a random LAION-shaped MLP: nothing outside the checkout is needed.

Compiled programs go to a persistent compilation cache private to these tests (restored at
module teardown), so the resumed run and the sample CLI reuse the first run's executables.
"""
import json
import os
import select
import subprocess
import sys
import time
import urllib.error
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from helpers import one_update  # noqa: F401  (test_lora imports it from here)
from helpers import load_config as _load_config

CONFIGS = ("sd_compressibility", "sd_incompressibility", "sd_aesthetic", "sd_alignment")


# ------------------------------------------------------------------------------------------
# Fixtures (also imported by test_lora.py)
# ------------------------------------------------------------------------------------------
# Session-wide paths under the base temp directory (not `mktemp`): test_lora.py imports these
# fixtures, which makes them separate fixtures there; a fixed path lets both modules share them.
@pytest.fixture(scope="session")
def sd_cache_dir(tmp_path_factory):
  path = tmp_path_factory.getbasetemp() / "sd_shared" / "jax_cache"
  path.mkdir(parents=True, exist_ok=True)
  return str(path)


@pytest.fixture(scope="module")
def compile_cache(sd_cache_dir):
  """Turns on JAX's persistent compilation cache in `sd_cache_dir` for this module only.
  Returns the environment variables that give subprocesses the same cache."""
  from jax.experimental.compilation_cache import compilation_cache as cc
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  old = {n: getattr(jax.config, n) for n in names}
  jax.config.update("jax_compilation_cache_dir", sd_cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  cc.reset_cache()
  yield {"JAX_COMPILATION_CACHE_DIR": sd_cache_dir,
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
         "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}
  for n, v in old.items():
    jax.config.update(n, v)
  cc.reset_cache()


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
  """A tiny random diffusers SD pipeline directory (16×16 images, 8×8×4 latents). The UNet has
  one resolution level (a cross-attention down block, the mid block, a cross-attention up block:
  4 transformer blocks), which halves XLA's compile time on a CPU."""
  import tiny_models
  path = tmp_path_factory.getbasetemp() / "sd_shared" / "tiny_sd"
  if not (path / "model_index.json").exists():
    tiny_models.save_tiny_pipeline(str(path), unet_kwargs=tiny_models.unet_sd1_kwargs(
        layers_per_block=1, block_out_channels=(32,), down_block_types=("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",)))
  return str(path)


def load_config(name, variant="runlocal", **overrides):
  return _load_config(name, variant, **overrides)


def sd_overrides(tiny_sd, prompt_assets, **extra):
  """The tiny pipeline, prompts from the `prompt_assets` fixture's synthetic files."""
  return {"model.pretrained_path": tiny_sd, "prompt_fn_kwargs.path": prompt_assets, **extra}


def subprocess_env(extra=None):
  return {**os.environ, "JAX_PLATFORMS": "cpu",
          "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), **(extra or {})}


# ------------------------------------------------------------------------------------------
# The policy
# ------------------------------------------------------------------------------------------
def test_policy_matches_diffusers_components(tiny_sd, prompt_assets):
  """Tokenisation, prompt encoding and decoding equal the diffusers pipeline's."""
  import torch
  from diffusers import StableDiffusionPipeline
  from ddpo_jax.pipelines import sd
  config = load_config("sd_compressibility", **sd_overrides(tiny_sd, prompt_assets))
  policy = sd.make_policy(config)
  tpipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
  prompts = ["a cat", "the dog " * 20, ""]  # the second is truncated
  ids = policy.tokenize(prompts)
  ref = tpipe.tokenizer(prompts, padding="max_length", max_length=tpipe.tokenizer.model_max_length,
                        truncation=True, return_tensors="np").input_ids
  assert ids.dtype == np.int32 and ids.shape == (3, 16)
  np.testing.assert_array_equal(ids, ref)
  context = policy.encode_prompts(policy.params, jnp.asarray(ids))
  with torch.no_grad():
    ref_ctx = tpipe.text_encoder(torch.from_numpy(ref.astype(np.int64)))[0].numpy()
  np.testing.assert_allclose(context, ref_ctx, atol=1e-4)

  assert policy.denoiser.latent_shape == (8, 8, 4)
  assert policy.denoiser.scheduler_config["beta_schedule"] == "scaled_linear"
  assert policy.prompt_metadata(["a cat"]) == {}
  assert len(policy.prompt_fn(np.random.default_rng(0), 5)) == 5
  latents = np.random.RandomState(0).randn(2, 8, 8, 4).astype(np.float32)
  images = np.asarray(policy.decode(policy.params, jnp.asarray(latents)))
  with torch.no_grad():
    z = torch.from_numpy(latents.transpose(0, 3, 1, 2)) / tpipe.vae.config.scaling_factor
    ref_img = (tpipe.vae.decode(z).sample / 2 + 0.5).clamp(0, 1).numpy().transpose(0, 2, 3, 1)
  assert images.shape == (2, 16, 16, 3) and images.min() >= 0 and images.max() <= 1
  np.testing.assert_allclose(images, ref_img, atol=1e-4)


# ------------------------------------------------------------------------------------------
# Reward-server and CLIP fixtures for the aesthetic / alignment configs
# ------------------------------------------------------------------------------------------
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="module")
def brightness_server(tmp_path_factory):
  """`python -m ddpo_jax.rewards.server --scorer=brightness --port=0` on 127.0.0.1."""
  log_path = tmp_path_factory.mktemp("sd_server") / "server.log"
  with open(log_path, "w") as log:
    proc = subprocess.Popen(
        [sys.executable, "-m", "ddpo_jax.rewards.server", "--host=127.0.0.1", "--port=0",
         "--scorer=brightness"], stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
        text=True, cwd=REPO, env=subprocess_env())
  try:
    line, deadline = "", time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
      if select.select([proc.stdout], [], [], 0.2)[0]:
        line = proc.stdout.readline()
        break
    assert "listening on " in line, f"server did not start: {line!r} {log_path.read_text()[-2000:]}"
    url = line.rsplit("listening on ", 1)[1].strip()
    while time.monotonic() < deadline:
      try:
        with _NO_PROXY.open(url + "/health", timeout=2):
          break
      except (urllib.error.URLError, ConnectionError):
        time.sleep(0.05)
    yield url
  finally:
    if proc.poll() is None:
      proc.terminate()
      try:
        proc.wait(timeout=10)
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    proc.stdout.close()


@pytest.fixture(scope="module")
def tiny_clip_768(tmp_path_factory):
  """A random transformers CLIP image tower with projection_dim 768 (what the MLP takes)."""
  import torch
  import transformers
  config = transformers.CLIPVisionConfig(
      image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, projection_dim=768,
      num_hidden_layers=1, num_attention_heads=4, hidden_act="quick_gelu")
  torch.manual_seed(0)
  model = transformers.CLIPVisionModelWithProjection(config).eval()
  path = str(tmp_path_factory.mktemp("tiny_clip_768"))
  model.save_pretrained(path)
  return path


# ------------------------------------------------------------------------------------------
# Each config's runlocal variant: 2 epochs (1, then resumed for the 2nd), the sample CLI. The
# fast tier runs sd_compressibility; the other three (the same loop with another reward, each
# reward checked on its own in tests/test_rewards.py, test_aesthetic.py and
# test_reward_server.py) run in the slow tier.
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [
    name if name == "sd_compressibility" else pytest.param(name, marks=pytest.mark.slow)
    for name in CONFIGS])
def test_runlocal_trains_resumes_and_samples(name, tiny_sd, prompt_assets, compile_cache, request,
                                             tmp_path):
  from ddpo_jax.trainer import checkpoints, loop
  extra = {}
  if name == "sd_aesthetic":  # a tiny CLIP tower and a random LAION-shaped MLP
    extra = {"reward.clip_path": request.getfixturevalue("tiny_clip_768"),
             "reward.aesthetic_mlp_path": request.getfixturevalue("random_aesthetic_mlp")}
  if name == "sd_alignment":
    extra = {"reward.server_url": request.getfixturevalue("brightness_server")}
  workdir = str(tmp_path / "run")
  reward_key = {"sd_compressibility": "jpeg_compressibility_mean",
                "sd_incompressibility": "jpeg_incompressibility_mean",
                "sd_aesthetic": "aesthetic_mean", "sd_alignment": "remote_mean"}[name]

  config = load_config(name, **sd_overrides(tiny_sd, prompt_assets, num_epochs=1, **extra))
  assert config.model.kind == "sd" and config.model.lora.enabled
  loop.train_and_evaluate(config, workdir)
  rows1 = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["epoch"] for r in rows1] == [0]

  logs = []
  config = load_config(name, **sd_overrides(tiny_sd, prompt_assets, **extra))
  assert config.num_epochs == 2
  metrics = loop.train_and_evaluate(config, workdir, log=logs.append)
  assert any("resuming from checkpoint step 1 (epoch 1)" in l for l in logs), logs
  assert sum(l.startswith("epoch ") for l in logs) == 1, logs  # only epoch 1 ran
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["epoch"] for r in rows] == [0, 1]
  assert rows[0] == rows1[0]  # the finished epoch was not retrained
  assert np.isfinite(metrics["loss"]) and np.isfinite(metrics[reward_key])
  assert metrics["optimizer_step"] == 2
  mngr = checkpoints.manager(workdir, read_only=True)
  assert sorted(mngr.all_steps()) == [0, 1, 2]
  mngr.close()
  if name == "sd_alignment":  # brightness in [0, 1], computed by the server on JPEGs
    assert 0.0 <= metrics["remote_mean"] <= 1.0

  out = tmp_path / "samples.npz"
  result = subprocess.run(
      [sys.executable, "-m", "ddpo_jax.sample", f"--workdir={workdir}", "--num=4", f"--out={out}",
       "--prompts=a cat,a dog"], cwd=REPO, capture_output=True, text=True, timeout=300,
      env=subprocess_env(compile_cache))
  assert result.returncode == 0, result.stderr[-3000:]
  data = np.load(out)
  assert data["images"].dtype == np.uint8 and data["images"].shape == (4, 16, 16, 3)
  assert list(data["prompts"]) == ["a cat", "a dog"] * 2 and int(data["step"]) == 2


# ------------------------------------------------------------------------------------------
# Full fine-tuning: fp32 master weights, bf16 compute, Adam first moment in bf16
# ------------------------------------------------------------------------------------------
@pytest.mark.slow  # 41 s in CI; SD's LoRA run stays fast
def test_full_finetune_bf16_compute_fp32_master(tiny_sd, prompt_assets, compile_cache):
  config = load_config("sd_compressibility", "runlocal,full", **sd_overrides(
      tiny_sd, prompt_assets, **{"model.compute_dtype": "bfloat16", "sample.num_steps": 2,
                                 "sample.batch_size": 2, "train.batch_size": 2,
                                 "train.gradient_accumulation_steps": 1}))  # bf16 is slow on a CPU
  assert not config.model.lora.enabled and config.train.adam_mu_dtype == "bfloat16"
  policy, frozen, state, metrics = one_update(config, lr=1e-3)
  assert "base_unet" not in frozen and "vae" in frozen
  assert all(np.isfinite(v) for v in metrics.values()), metrics
  assert int(state.step) == 1
  dtypes = {x.dtype for x in jax.tree.leaves(state.params)}
  assert dtypes == {jnp.dtype(jnp.float32)}
  mu = state.opt_state[1][0].mu
  assert {x.dtype for x in jax.tree.leaves(mu)} == {jnp.dtype(jnp.bfloat16)}
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                                         policy.params["unet"], state.params))
  assert sum(changed) > len(changed) // 2  # a full fine-tune moves (nearly) every tensor


# ------------------------------------------------------------------------------------------
# Bad input: clear errors before compiling, nothing in WORKDIR/checkpoints
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["empty_prompt_file", "missing_prompt_file", "lora_target",
                                  "lora_bad_regex", "no_model_path", "missing_model",
                                  "resolution", "empty_list"])
def test_bad_input_fails_before_anything_is_written(case, tiny_sd, prompt_assets, tmp_path):
  from ddpo_jax.algorithms import train
  from ddpo_jax.models import lora
  from ddpo_jax.trainer import loop
  empty = tmp_path / "empty.txt"
  empty.write_text("\n  \n")
  overrides, error, match = {
      "empty_prompt_file": ({"prompt_fn": "from_file", "prompt_fn_kwargs.path": str(empty)},
                            ValueError, "is empty"),
      "missing_prompt_file": ({"prompt_fn": "from_file",
                               "prompt_fn_kwargs.path": str(tmp_path / "nope.txt")},
                              FileNotFoundError, "nope.txt"),
      "lora_target": ({"model.lora.targets": ("to_q$", "no_such_layer")}, lora.LoraTargetError,
                      "'no_such_layer' matches no layer"),
      "lora_bad_regex": ({"model.lora.targets": ("to_q(",)}, lora.LoraTargetError,
                         "not a valid regular expression"),
      "no_model_path": ({"model.pretrained_path": ""}, ValueError, "pretrained_path is empty"),
      "missing_model": ({"model.pretrained_path": str(tmp_path / "no_pipe")}, ValueError,
                        "no such directory"),
      "resolution": ({"model.resolution": 17}, ValueError, "model.resolution=17"),
      "empty_list": ({"prompt_fn": "list"}, ValueError, "needs `prompts`"),
  }[case]
  config = load_config("sd_compressibility", **sd_overrides(tiny_sd, prompt_assets, **overrides))
  workdir = tmp_path / "w"
  with pytest.raises(error, match=match):
    loop.train_and_evaluate(config, str(workdir))
  assert not (workdir / "checkpoints").exists()
