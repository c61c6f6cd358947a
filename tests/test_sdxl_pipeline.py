"""SDXL pipelines in diffusers format (tiny random `StableDiffusionXLPipeline` written by
diffusers): loading, prompt encoding, the UNet with SDXL's added conditioning, the SDXL policy's
DDPO sampler against diffusers' own pipeline, training, export, saving back."""
import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import tiny_models as tm  # noqa: E402
from helpers import edit_json, load_config  # noqa: E402
from ddpo_jax import config_base, export  # noqa: E402
from ddpo_jax.models import pipeline as P  # noqa: E402
from ddpo_jax.numerics import diffusion  # noqa: E402
from ddpo_jax.pipelines import sd  # noqa: E402
from ddpo_jax.trainer import loop  # noqa: E402

TOL = 1e-4  # max abs error, float32: networks and prompt encoding
SAMPLE_TOL = 1e-3  # max abs error of the final latents of a 4-step guided DDIM chain
FAST_COMPILE = {"xla_backend_optimization_level": 0}  # tests only: halves CPU compile times
PROMPTS = ("a cat", "the dog the dog")
ETA = 1e-6  # DDPO's sampler needs eta > 0 (test_policy_sampler_matches_diffusers_pipeline)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  return tm.save_tiny_sdxl_pipeline(str(tmp_path_factory.mktemp("pipes") / "tiny-sdxl"))


@pytest.fixture(scope="module")
def torch_pipe(tiny_dir):
  return diffusers.StableDiffusionXLPipeline.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def pipe(tiny_dir):
  return P.load_pipeline(tiny_dir)


def _jit(fn):
  return jax.jit(fn, compiler_options=FAST_COMPILE)


def _err(a, b) -> float:
  return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


def _encode_errors(pipe, params, tp):
  """Max abs errors of prompt encoding and one UNet call against the torch pipeline `tp`."""
  ids = pipe.tokenize(list(PROMPTS))
  assert ids.shape == (2, 2, tm.TINY_MAX_LENGTH)
  for k, tokenizer in enumerate((tp.tokenizer, tp.tokenizer_2)):
    ref_ids = tokenizer(list(PROMPTS), padding="max_length", max_length=tm.TINY_MAX_LENGTH,
                        truncation=True, return_tensors="np").input_ids
    np.testing.assert_array_equal(ids[:, k], ref_ids)
  assert not np.array_equal(ids[:, 0], ids[:, 1])  # the second tokenizer pads with "!"
  context, pooled = _jit(pipe.encode_prompt)(params, ids)
  with torch.no_grad():
    ref_context, _, ref_pooled, _ = tp.encode_prompt(list(PROMPTS), device="cpu",
                                                     do_classifier_free_guidance=False)
  assert context.shape == (2, tm.TINY_MAX_LENGTH, 56) and pooled.shape == (2, 16)

  rng = np.random.default_rng(0)
  latents = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  t = np.array([10, 901])
  eps = _jit(pipe.unet_apply)(params["unet"], latents, t, context, text_embeds=pooled)
  factor = pipe.vae_scale_factor
  time_ids = torch.tensor([[8 * factor, 8 * factor, 0, 0, 8 * factor, 8 * factor]] * 2,
                          dtype=torch.float32)
  with torch.no_grad():
    ref_eps = tp.unet(tm.to_nchw(latents), torch.from_numpy(t), ref_context,
                      added_cond_kwargs={"text_embeds": ref_pooled, "time_ids": time_ids}).sample
  return {"context": _err(context, ref_context.numpy()), "pooled": _err(pooled, ref_pooled.numpy()),
          "unet": _err(eps, tm.to_nhwc(ref_eps))}


def test_load_and_encode_parity(pipe, torch_pipe):
  assert pipe.is_sdxl and pipe.text_config_2.with_projection
  assert pipe.tokenizer_2 is not None and pipe.model_index["force_zeros_for_empty_prompt"]
  errs = _encode_errors(pipe, pipe.params, torch_pipe)
  print("SDXL load_pipeline vs diffusers:", {k: f"{v:.3g}" for k, v in errs.items()})
  assert max(errs.values()) <= TOL, errs


def test_save_round_trip(pipe, tmp_path):
  out = str(tmp_path / "saved")
  P.save_pipeline(pipe, out)
  with open(os.path.join(out, "model_index.json")) as f:
    index = json.load(f)
  assert index["_class_name"] == "StableDiffusionXLPipeline"
  assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
  assert "requires_safety_checker" not in index
  reloaded_torch = diffusers.StableDiffusionXLPipeline.from_pretrained(out)
  errs = _encode_errors(pipe, pipe.params, reloaded_torch)
  print("SDXL save_pipeline -> diffusers:", {k: f"{v:.3g}" for k, v in errs.items()})
  assert max(errs.values()) <= TOL, errs
  reloaded = P.load_pipeline(out)
  assert reloaded.is_sdxl and reloaded.text_config_2 == pipe.text_config_2
  for a, b in zip(jax.tree_util.tree_leaves(reloaded.params),
                  jax.tree_util.tree_leaves(pipe.params)):
    np.testing.assert_array_equal(a, b)


def _copy(src, dst):
  shutil.copytree(src, dst)
  return dst


def test_bad_sdxl_pipelines(tiny_dir, tmp_path):
  # An unsupported pipeline class, named with the file.
  refiner = _copy(tiny_dir, str(tmp_path / "refiner"))
  edit_json(os.path.join(refiner, "model_index.json"),
             _class_name="StableDiffusionXLImg2ImgPipeline")
  with pytest.raises(P.PipelineLoadError, match=r"model_index.json: _class_name="
                     r"'StableDiffusionXLImg2ImgPipeline' is not a supported pipeline class"):
    P.load_pipeline(refiner)
  # Another family's class over SDXL's components: that family's component is missing.
  flux = _copy(tiny_dir, str(tmp_path / "flux"))
  edit_json(os.path.join(flux, "model_index.json"), _class_name="FluxPipeline")
  with pytest.raises(P.PipelineLoadError, match="component 'transformer' is missing"):
    P.load_pipeline(flux)
  # SDXL without its second text encoder.
  missing = _copy(tiny_dir, str(tmp_path / "missing"))
  shutil.rmtree(os.path.join(missing, "text_encoder_2"))
  with pytest.raises(P.PipelineLoadError, match="component 'text_encoder_2' is missing"):
    P.load_pipeline(missing)
  # A second text encoder without projection.
  plain = _copy(tiny_dir, str(tmp_path / "plain"))
  edit_json(os.path.join(plain, "text_encoder_2", "config.json"),
             architectures=["CLIPTextModel"])
  with pytest.raises(P.PipelineLoadError, match=r"text_encoder_2/config.json: not a "
                                                r"CLIPTextModelWithProjection"):
    P.load_pipeline(plain)
  # The added embedding's width must fit the second encoder's projection.
  width = _copy(tiny_dir, str(tmp_path / "width"))
  edit_json(os.path.join(width, "unet", "config.json"), projection_class_embeddings_input_dim=70)
  with pytest.raises(P.PipelineLoadError, match=r"projection_class_embeddings_input_dim=70 does "
                                                r"not match text_encoder_2's projection_dim 16"):
    P.load_pipeline(width)
  # An SD UNet in an SDXL pipeline.
  sd_unet = _copy(tiny_dir, str(tmp_path / "sd_unet"))
  edit_json(os.path.join(sd_unet, "unet", "config.json"), addition_embed_type=None,
             addition_time_embed_dim=None, projection_class_embeddings_input_dim=None)
  with pytest.raises(P.PipelineLoadError, match="addition_embed_type=None in a "
                                                "StableDiffusionXLPipeline"):
    P.load_pipeline(sd_unet)


def _runlocal_config(tiny_dir, **model):
  config = load_config("sd_compressibility", "runlocal")
  config.model.pretrained_path = tiny_dir
  config.model.update(model)
  config.prompt_fn = "list"
  config.prompt_fn_kwargs.prompts = list(PROMPTS)
  return config


def test_policy_sampler_matches_diffusers_pipeline(tiny_dir, torch_pipe):
  """The SDXL policy (pooled embedding and time ids inside its denoiser, zero unconditional
  conditioning) through DDPO's own sampler, `diffusion.sample_trajectory`. The sampler refuses
  eta = 0 (no log-probability), so both sample at eta = 1e-6: each step's noise std is at most
  1e-6, far below the tolerance, and the two chains are deterministic up to it."""
  config = _runlocal_config(tiny_dir, lora=dict(enabled=False))
  policy = sd.make_policy(config)
  steps, guidance = 4, 5.0
  schedule = diffusion.NoiseSchedule.from_config(policy.denoiser.scheduler_config)
  timesteps, prev = schedule.ddim_timesteps(steps)
  latents = np.random.default_rng(2).standard_normal((2,) + policy.denoiser.latent_shape).astype(
      np.float32)

  def sample(params, ids, x):
    traj = diffusion.sample_trajectory(
        policy.denoiser, params["unet"], jax.random.PRNGKey(0), policy.encode_prompts(params, ids),
        policy.encode_uncond(params), alphas_cumprod=schedule.alphas_cumprod,
        timesteps=timesteps, prev_timesteps=prev, latent_shape=policy.denoiser.latent_shape, eta=ETA,
        guidance_scale=guidance, final_alpha_cumprod=schedule.final_alpha_cumprod,
        initial_latents=x)
    return traj.final_latents

  ours = _jit(sample)(policy.params, jnp.asarray(policy.tokenize(list(PROMPTS))), latents)
  side = policy.denoiser.latent_shape[0] * policy.pipeline.vae_scale_factor
  with torch.no_grad():
    ref = torch_pipe(list(PROMPTS), height=side, width=side, num_inference_steps=steps,
                     guidance_scale=guidance, eta=ETA, latents=tm.to_nchw(latents),
                     generator=torch.Generator().manual_seed(0), output_type="latent").images
  err = _err(ours, tm.to_nhwc(ref))
  print(f"SDXL policy sampler vs diffusers: max abs error {err:.3g}")
  assert err <= SAMPLE_TOL


@pytest.mark.slow  # SDXL's sampler and export format are checked in the fast tier above
def test_ddpo_trains_sdxl_and_exports_for_diffusers(tiny_dir, tmp_path):
  """One runlocal DDPO epoch (LoRA) on the tiny SDXL pipeline: on-policy at the first
  minibatch, then exported as a StableDiffusionXLPipeline with the trained UNet."""
  config = _runlocal_config(tiny_dir)
  config.num_epochs = 1
  workdir = str(tmp_path / "run")
  loop.train_and_evaluate(config, workdir, log=lambda *a: None)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert len(rows) == 1 and np.isfinite(rows[0]["reward_mean"])
  assert rows[0]["approx_kl"] < 1e-10  # the sampler's and the update's log-probs agree
  out = export.export_pipeline(workdir, str(tmp_path / "exported"))
  exported = diffusers.StableDiffusionXLPipeline.from_pretrained(out)
  base = diffusers.StableDiffusionXLPipeline.from_pretrained(tiny_dir)
  trained = dict(exported.unet.state_dict())
  changed = [k for k, v in base.unet.state_dict().items() if not torch.equal(v, trained[k])]
  assert changed and all("attn" in k for k in changed)  # LoRA targets: attention projections
  for name in ("text_encoder", "text_encoder_2", "vae"):
    for k, v in getattr(base, name).state_dict().items():
      assert torch.equal(v, getattr(exported, name).state_dict()[k]), (name, k)


def test_ctrl_refuses_sdxl_clearly(tiny_dir):
  config = config_base.ctrl_sd_base("imagenet_animals")
  config.model.pretrained_path = tiny_dir
  config.prompt_fn = "list"
  config.prompt_fn_kwargs.prompts = list(PROMPTS)
  with pytest.raises(ValueError, match="CTRL on SDXL and the flow models is not supported yet"):
    sd.make_policy(config)
