"""The families' standard samplers (`ddpo_jax.trainer.sample.pipeline_sampler`) against the diffusers
pipelines' own outputs, and the `python -m ddpo_jax.sample --pipeline=DIR` command.

For each family a tiny random diffusers pipeline is written by diffusers itself; both sides
start from the same initial latents (NHWC here, NCHW / packed there) and run 4 steps with
guidance: deterministic DDIM (eta 0) for SD and SDXL, the Euler flow ODE for SD3 (classifier-free
guidance) and FLUX.1-dev (embedded guidance) and FLUX.1-schnell-style (neither). Compared: the
final latents (diffusers `output_type="latent"`) and the decoded images in [0, 1]
(`output_type="np"`), max abs error <= 1e-3 (SAMPLE_TOL) in float32.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402

import tiny_models as tm  # noqa: E402
from ddpo_jax.models import load_pipeline  # noqa: E402
from ddpo_jax.trainer import sample as sample_lib  # noqa: E402

SAMPLE_TOL = 1e-3  # max abs error of final latents / images after 4 guided steps, float32
FAST_COMPILE = {"xla_backend_optimization_level": 0}
PROMPTS = ["a photo of a cat", "the red dog"]
STEPS = 4

# family -> (writer, diffusers class, resolution, guidance scale)
FAMILIES = {
    "sd": (lambda d: tm.save_tiny_pipeline(d), "StableDiffusionPipeline", 32, 5.0),
    "sdxl": (lambda d: tm.save_tiny_sdxl_pipeline(d), "StableDiffusionXLPipeline", 32, 5.0),
    "sd3": (lambda d: tm.save_tiny_flow_pipeline(d, "sd3"), "StableDiffusion3Pipeline", 16, 4.0),
    "flux_dev": (lambda d: tm.save_tiny_flow_pipeline(d, "flux"), "FluxPipeline", 16, 3.5),
    "flux_schnell": (lambda d: tm.save_tiny_flow_pipeline(d, "flux", guidance_embeds=False),
                     "FluxPipeline", 16, 3.5),
}


@pytest.fixture(scope="module")
def pipe_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("sample_pipes")
  return {name: spec[0](str(root / name)) for name, spec in FAMILIES.items()}


def _err(a, b) -> float:
  return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


def _diffusers_call(name, directory, latents, output_type):
  """The diffusers pipeline's own sampling from NHWC `latents`, as NHWC latents or images."""
  _, cls_name, resolution, guidance = FAMILIES[name]
  tp = getattr(diffusers, cls_name).from_pretrained(directory)
  tp.set_progress_bar_config(disable=True)
  x = tm.to_nchw(latents)
  kw = dict(prompt=PROMPTS, num_inference_steps=STEPS, height=resolution, width=resolution,
            guidance_scale=guidance, output_type=output_type)
  if name.startswith("flux"):
    b, c, h, w = x.shape
    x = tp._pack_latents(x, b, c, h, w)
    kw["max_sequence_length"] = 512
  if name == "sd3":
    kw["max_sequence_length"] = 256
  with torch.no_grad():
    out = tp(latents=x, **kw).images
  if output_type == "np":
    return np.asarray(out)
  if name.startswith("flux"):
    out = tp._unpack_latents(out, resolution, resolution, tp.vae_scale_factor)
  return tm.to_nhwc(out)


# sdxl and flux_schnell run in the slow tier: SDXL's sampler is checked against diffusers in the
# fast tier by tests/test_sdxl_pipeline.py (test_policy_sampler_matches_diffusers_pipeline), and
# flux_schnell differs from flux_dev only by the guidance embedding it lacks.
SLOW_FAMILIES = ("sdxl", "flux_schnell")


@pytest.mark.parametrize("name", [
    pytest.param(name, marks=pytest.mark.slow) if name in SLOW_FAMILIES else name
    for name in FAMILIES])
def test_standard_sampler_matches_diffusers_pipeline(name, pipe_dirs):
  """`pipeline_sampler` (the sampler `python -m ddpo_jax.sample --pipeline` runs) reproduces
  the diffusers pipeline from the same initial latents: final latents and decoded images."""
  _, _, resolution, guidance = FAMILIES[name]
  pipe = load_pipeline(pipe_dirs[name])
  expected_type = "epsilon" if name in ("sd", "sdxl") else "flow"
  assert pipe.prediction_type == expected_type
  sample, shape = sample_lib.pipeline_sampler(pipe, num_steps=STEPS, guidance_scale=guidance,
                                              resolution=resolution)
  x_init = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (len(PROMPTS),) + shape))
  latents, images = jax.jit(sample, compiler_options=FAST_COMPILE)(
      pipe.params, pipe.tokenize(PROMPTS), x_init)
  ref_latents = _diffusers_call(name, pipe_dirs[name], x_init, "latent")
  ref_images = _diffusers_call(name, pipe_dirs[name], x_init, "np")
  assert ref_images.shape == images.shape == (len(PROMPTS), resolution, resolution, 3)
  # the chain moved the latents and guidance mattered: the check is not vacuous
  assert _err(ref_latents, x_init) > 0.1
  assert _err(latents, ref_latents) <= SAMPLE_TOL, _err(latents, ref_latents)
  assert _err(images, ref_images) <= SAMPLE_TOL, _err(images, ref_images)
  assert float(np.std(np.asarray(images))) > 1e-3


def test_standard_sampler_bad_input(pipe_dirs):
  """Resolutions the model cannot take and zero steps are refused before tracing."""
  sd3 = load_pipeline(pipe_dirs["sd3"])
  with pytest.raises(ValueError, match=r"resolution=18 must be a positive multiple of 4"):
    sample_lib.pipeline_sampler(sd3, num_steps=4, guidance_scale=1.0, resolution=18)
  with pytest.raises(ValueError, match="pos_embed_max_size=8"):
    sample_lib.pipeline_sampler(sd3, num_steps=4, guidance_scale=1.0, resolution=64)
  with pytest.raises(ValueError, match="num_steps=0"):
    sample_lib.pipeline_sampler(sd3, num_steps=0, guidance_scale=1.0, resolution=16)
  with pytest.raises(ValueError, match=r"latents of shape \(1, 8, 8, 16\)"):
    sample_lib.sample_pipeline(sd3, PROMPTS, num_steps=1, resolution=16,
                               latents=np.zeros((1, 8, 8, 16), np.float32))


@pytest.mark.slow  # 32 s in CI; the samplers' parity with diffusers stays fast
def test_sample_command_on_a_pipeline(pipe_dirs, tmp_path):
  """`python -m ddpo_jax.sample --pipeline=DIR` writes the npz and PNGs, and its images are
  `sample_pipeline`'s (seeded noise, 3 images in batches of 2); bad flag combinations are
  usage errors."""
  out, pngs = str(tmp_path / "s.npz"), str(tmp_path / "png")
  cmd = [sys.executable, "-m", "ddpo_jax.sample", f"--pipeline={pipe_dirs['sd3']}",
         "--prompts=a cat,the dog", "--num=3", "--steps=2", "--guidance=3", "--resolution=16",
         "--batch_size=2", f"--out={out}", f"--png_dir={pngs}", "--seed=5"]
  env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(
      sample_lib.__file__))))
  run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "wrote 3 images" in run.stdout
  data = np.load(out)
  assert data["images"].shape == (3, 16, 16, 3) and data["images"].dtype == np.uint8
  assert list(data["prompts"]) == ["a cat", "the dog", "a cat"]
  assert sorted(os.listdir(pngs)) == ["0000_a-cat.png", "0001_the-dog.png", "0002_a-cat.png"]
  pipe = load_pipeline(pipe_dirs["sd3"])
  images, latents, prompts = sample_lib.sample_pipeline(
      pipe, ["a cat", "the dog"], 3, num_steps=2, guidance_scale=3.0, resolution=16, seed=5,
      batch_size=2)
  assert latents.shape == (3, 8, 8, 16)
  assert np.abs(images.astype(int) - data["images"].astype(int)).max() <= 1
  for bad, message in (([], "give exactly one of --workdir"),
                       (["--workdir=/nonexistent"], "give exactly one of --workdir"),
                       (["--step=3"], "--step and --labels belong to --workdir")):
    args = [c for c in cmd if not c.startswith("--pipeline")] if bad == [] else cmd + bad
    run = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode != 0 and message in run.stderr, run.stderr[-2000:]
