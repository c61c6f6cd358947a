"""CTRL on Stable Diffusion (ddpo_jax/configs/ctrl_sd_*.py :runlocal) on a tiny random pipeline: offline
data sampled from the pre-trained model and labelled by JPEG size / aesthetic score (cached,
not resampled), training (`trainer.ctrl.train_and_evaluate`, what `python -m ddpo_jax.main`
runs for these configs), the sample CLI with --labels, the judges.

The JPEG-size judge is checked against an independent PIL computation. Compiled programs go to
test_sd.py's persistent compilation cache, so the sample CLI reuses the evaluation's program.
"""
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from helpers import load_config
from test_sd import compile_cache, sd_cache_dir, subprocess_env, tiny_clip_768  # noqa: F401

from ddpo_jax.ctrl import judges, sampled_data
from ddpo_jax.trainer import checkpoints

PROMPTS = ("a cat", "a dog")  # no prompt files needed


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
  """A tiny random diffusers SD pipeline (16×16 images, 8×8×4 latents) whose UNet has one
  resolution level without attention plus the cross-attention mid block: a third of
  test_sd.py's transformer blocks, which makes tracing the backprop solver's program ~40%
  faster (the KL, LoRA and control-embedding paths are the same)."""
  import tiny_models
  path = tmp_path_factory.getbasetemp() / "ctrl_sd" / "tiny_sd"
  if not (path / "model_index.json").exists():
    tiny_models.save_tiny_pipeline(str(path), unet_kwargs=tiny_models.unet_sd1_kwargs(
        layers_per_block=1, block_out_channels=(32,), down_block_types=("DownBlock2D",),
        up_block_types=("UpBlock2D",)))
  return str(path)


def overrides(tiny_sd, **extra):
  return {"model.pretrained_path": tiny_sd, "prompt_fn": "list",
          "prompt_fn_kwargs.prompts": PROMPTS, **extra}


def run(args, env):
  result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=subprocess_env(env))
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
  return result


def pil_jpeg_kb(image_uint8, quality=95):
  """Independent reference: bytes of a PIL JPEG of the image / 1000."""
  buf = io.BytesIO()
  Image.fromarray(image_uint8).save(buf, format="JPEG", quality=quality)
  return len(buf.getvalue()) / 1000.0


def sample_cli(workdir, labels, num, env, tmp_path):
  out = tmp_path / "samples.npz"
  run(["-m", "ddpo_jax.sample", f"--workdir={workdir}", f"--num={num}", f"--batch_size={num}",
       f"--out={out}", f"--labels={labels}"], env)
  npz = np.load(out)
  specs = labels.split(",")
  want = [tuple(int(v) for v in specs[i % len(specs)].split(":")) for i in range(num)]
  assert [tuple(l) for l in npz["labels"]] == want
  assert npz["images"].shape == (num, 16, 16, 3) and npz["images"].dtype == np.uint8
  return npz


def test_quantile_levels():
  values = np.asarray([3.0, 1.0, 2.0, 4.0, 2.0, 5.0, 6.0, 0.5])
  cuts = sampled_data.quantile_cuts(values, 4)
  np.testing.assert_allclose(cuts, np.quantile(values, [0.25, 0.5, 0.75]))
  got = sampled_data.levels(values, cuts)
  np.testing.assert_array_equal(got, [(values[i] >= cuts).sum() for i in range(len(values))])
  assert got.dtype == np.int32 and np.bincount(got, minlength=4).tolist() == [2, 2, 2, 2]
  with pytest.raises(ValueError, match="at least 2"):
    sampled_data.quantile_cuts(values, 1)


@pytest.mark.slow  # samples the offline data, trains and evaluates: minutes on the 2-core CPU;
# CTRL's solver trains fast in tests/test_ctrl.py, SD with LoRA in tests/test_sd.py
def test_compressibility_runlocal(tiny_sd, compile_cache, tmp_path):
  """The runlocal config trains (sampling 16 offline images first) and is evaluated with the
  real-JPEG judge; the sample CLI writes the requested labels."""
  from ddpo_jax.trainer import ctrl as trainer
  workdir = tmp_path / "run"
  config = load_config("ctrl_sd_compressibility", "runlocal", **overrides(tiny_sd))
  assert config.model.kind == "sd" and config.model.lora.enabled
  assert config.ctrl.kl_reduction == "mean" and config.ctrl.truncation == "random"
  trainer.train_and_evaluate(config, str(workdir))
  mngr = checkpoints.manager(str(workdir), read_only=True)
  assert sorted(mngr.all_steps()) == [0, 1, 2]
  mngr.close()
  rows = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  assert [r["epoch"] for r in rows] == [0, 1]
  assert all(np.isfinite(r["loss"]) and np.isfinite(r["kl_to_pretrained"]) for r in rows)
  result = json.load(open(workdir / "eval.json"))
  assert result["num_samples"] == 8 and 0.0 <= result["jpeg_accuracy"] <= 1.0

  # The offline data: 16 samples of the pre-trained model, labelled by JPEG-size quartile.
  path = workdir / "offline_data" / "jpeg.npz"
  stored = sampled_data.read_npz(str(path))
  images, cuts = stored["images"], stored["cuts"]
  assert images.shape == (16, 16, 16, 3) and images.dtype == np.uint8 and cuts.shape == (3,)
  kb = np.asarray([pil_jpeg_kb(im) for im in images])
  np.testing.assert_allclose(stored["values"], kb, rtol=0, atol=1e-6)
  np.testing.assert_allclose(cuts, np.quantile(kb.astype(np.float32).astype(np.float64),
                                               [0.25, 0.5, 0.75]))
  want = np.asarray([int((k >= cuts).sum()) for k in stored["values"].astype(np.float64)])
  np.testing.assert_array_equal(stored["labels"], want)
  assert len(np.unique(stored["labels"])) >= 2  # the sizes differ: the check can fail

  # The judge (built as the evaluation builds it) recomputes those levels from the pixels,
  # and judges images of other sizes against the stored cut points.
  judge = judges.make_judge(config.ctrl.conditions.jpeg.data, config, str(workdir))
  np.testing.assert_array_equal(judge(images), stored["labels"])
  rng = np.random.default_rng(0)
  flat = np.full((2, 16, 16, 3), 128, np.uint8)  # tiny files -> level 0
  noisy = rng.integers(0, 256, (2, 16, 16, 3)).astype(np.uint8)  # big files -> level 3
  extra = np.concatenate([flat, noisy])
  kb_extra = np.asarray([pil_jpeg_kb(im) for im in extra])
  np.testing.assert_array_equal(judge(extra), [(np.float32(k) >= cuts).sum() for k in kb_extra])
  assert judge(extra).tolist() == [0, 0, 3, 3]

  # Cached: building the policy again (as the sample CLI does) does not resample.
  mtime = os.path.getmtime(path)
  npz = sample_cli(workdir, "0,3", 8, compile_cache, tmp_path)
  assert os.path.getmtime(path) == mtime
  assert set(npz["prompts"]) <= set(PROMPTS)

  def no_sampling(*a, **k):
    raise AssertionError("the cached offline data was resampled")
  logs = []
  sampled = sampled_data.sample_base_images
  try:
    sampled_data.sample_base_images = no_sampling
    ds, cuts2 = sampled_data.load_or_sample(config.ctrl.conditions.jpeg.data, config,
                                            str(workdir), 4, None, log=logs.append)
  finally:
    sampled_data.sample_base_images = sampled
  assert any("reusing 16 cached samples" in l for l in logs), logs
  np.testing.assert_array_equal(cuts2, cuts)
  np.testing.assert_array_equal(ds.labels, stored["labels"])
  np.testing.assert_allclose(ds.images, images / 255.0, atol=1e-7)
  # Other generation settings: a clear error instead of silently reusing the file.
  other = load_config("ctrl_sd_compressibility", "runlocal",
                      **overrides(tiny_sd, **{"ctrl.conditions.jpeg.data.num_images": 32}))
  with pytest.raises(ValueError, match="num_images: 16 there, 32 now"):
    sampled_data.load_or_sample(other.ctrl.conditions.jpeg.data, other, str(workdir), 4, None)


@pytest.fixture(scope="module")
def random_aesthetic_mlp(tmp_path_factory):
  """A random LAION-MLP-shaped state dict saved with torch (768 -> ... -> 1)."""
  import torch
  g = torch.Generator().manual_seed(0)
  sd = {}
  for i, n_in, n_out in ((0, 768, 1024), (2, 1024, 128), (4, 128, 64), (6, 64, 16), (7, 16, 1)):
    sd[f"layers.{i}.weight"] = torch.randn(n_out, n_in, generator=g) / n_in ** 0.5
    sd[f"layers.{i}.bias"] = torch.randn(n_out, generator=g) * 0.1
  path = tmp_path_factory.mktemp("aesthetic_mlp") / "mlp.pth"
  torch.save(sd, path)
  return str(path)


@pytest.mark.slow  # as test_compressibility_runlocal, with two sampled data sets
def test_multitask_runlocal(tiny_sd, tiny_clip_768, random_aesthetic_mlp, compile_cache,
                            tmp_path):
  """Two controls, each from its own sampled dataset, trained in-process; the judges recompute
  the stored levels (the aesthetic one with the real scorer)."""
  from ddpo_jax.trainer import ctrl as trainer
  config = load_config("ctrl_sd_multitask", "runlocal", **overrides(
      tiny_sd, **{"reward.clip_path": tiny_clip_768,
                  "reward.aesthetic_mlp_path": random_aesthetic_mlp}))
  assert config.ctrl.controls == ("aesthetic", "jpeg") and config.model.lora.enabled
  assert config.ctrl.eval_num_samples == 32  # 2 per label combination
  # Time budget: the KL term and the evaluation's sampling program are exercised (and their
  # programs compiled) by the compressibility test; skip them here.
  config.ctrl.kl_weight = 0.0
  config.ctrl.eval_num_samples = 0
  workdir = tmp_path / "run"
  last = trainer.train_and_evaluate(config, str(workdir))
  assert np.isfinite(last["loss"]) and np.isfinite(last["reward_mean"])
  assert last["optimizer_step"] == 4
  assert {"aesthetic_classifier_accuracy", "jpeg_classifier_accuracy"} <= set(last)
  mngr = checkpoints.manager(str(workdir), read_only=True)
  assert sorted(mngr.all_steps()) == [0, 1, 2]
  mngr.close()

  a = sampled_data.read_npz(str(workdir / "offline_data" / "aesthetic.npz"))
  j = sampled_data.read_npz(str(workdir / "offline_data" / "jpeg.npz"))
  assert a["settings"]["sample_seed"] != j["settings"]["sample_seed"]
  assert not np.array_equal(a["images"], j["images"])  # two separate pair datasets
  assert len(np.unique(a["labels"])) >= 2
  scores = sampled_data.aesthetic_scorer(tiny_clip_768, random_aesthetic_mlp)(a["images"])
  np.testing.assert_allclose(a["values"], scores, atol=1e-5)
  judge = judges.make_judge(config.ctrl.conditions.aesthetic.data, config, str(workdir))
  np.testing.assert_array_equal(judge(a["images"]), a["labels"])
  jpeg_judge = judges.make_judge(config.ctrl.conditions.jpeg.data, config, str(workdir))
  np.testing.assert_array_equal(jpeg_judge(j["images"]), j["labels"])
