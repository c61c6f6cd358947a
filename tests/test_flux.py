"""Parity of the Flax FLUX.1 transformer with diffusers' FluxTransformer2DModel (tiny random
models, CPU), and of the latent packing and position ids with diffusers' FluxPipeline."""
import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
from diffusers.models.transformers.transformer_flux import FluxPosEmbed  # noqa: E402
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline  # noqa: E402

import tiny_models as tm  # noqa: E402
from ddpo_jax.models import flux as F  # noqa: E402
from ddpo_jax.models.unet import count_params  # noqa: E402
from ddpo_jax.models.weights import WeightLoadingError  # noqa: E402

TOL = 1e-4  # max abs error, float32
FAST_COMPILE = {"xla_backend_optimization_level": 0}  # tests only: halves CPU compile times
FLUX_DEV_TRANSFORMER_PARAMS = 11_901_408_320

_TINY = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
             attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
             pooled_projection_dim=10, axes_dims_rope=(2, 2, 4))
TINY = {"dev_guidance": {**_TINY, "guidance_embeds": True}, "schnell": _TINY}


@functools.lru_cache(maxsize=None)
def _models(name):
  """(diffusers model, FluxConfig, Flax params). Weights ~ N(0, 0.1^2): the timestep and
  guidance sinusoids have arguments up to 3500 rad, where a 1-ulp difference of exp() between
  XLA and PyTorch moves them by ~2e-4; larger random weights amplify that far above float32
  round-off (at std 0.2 the output differs by 1.2e-4 while small arguments agree to 2e-6,
  closer to PyTorch's float64 result than PyTorch's own float32 one)."""
  torch.manual_seed(0)
  model = diffusers.FluxTransformer2DModel(**TINY[name]).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn_like(p) * 0.1)
  config = F.FluxConfig.from_dict(dict(model.config))
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  return model, config, F.flux_from_torch(state, config, source=name)


def _inputs(seed=0):
  """A 6x8 latent (3x4 packed tokens), 5 text tokens, FLUX.1-dev-like timesteps/guidance."""
  rng = np.random.default_rng(seed)
  latents = rng.standard_normal((2, 6, 8, 4)).astype(np.float32)
  context = rng.standard_normal((2, 5, 12)).astype(np.float32)
  pooled = rng.standard_normal((2, 10)).astype(np.float32)
  return latents, context, pooled, np.array([0.3, 0.9], np.float32)


def test_packing_and_ids_match_the_diffusers_pipeline():
  latents = _inputs()[0]
  tokens = np.asarray(F.pack_latents(latents))
  ref = FluxPipeline._pack_latents(tm.to_nchw(latents), 2, 4, 6, 8).numpy()
  np.testing.assert_array_equal(tokens, ref)
  np.testing.assert_array_equal(np.asarray(F.unpack_latents(tokens, 6, 8)), latents)
  ids = F.image_ids(6, 8)
  np.testing.assert_array_equal(
      ids, FluxPipeline._prepare_latent_image_ids(2, 3, 4, "cpu", torch.float32).numpy())
  all_ids = np.concatenate([np.zeros((5, 3), np.float32), ids])
  cos, sin = FluxPosEmbed(theta=10000, axes_dim=(2, 2, 4))(torch.from_numpy(all_ids))
  ours = F.rope_tables(all_ids, (2, 2, 4))
  np.testing.assert_array_equal(ours[0], cos.numpy())
  np.testing.assert_array_equal(ours[1], sin.numpy())
  with pytest.raises(ValueError, match="must be even"):
    F.pack_latents(latents[:, :5])


@pytest.mark.parametrize("name", list(TINY))
def test_flux_parity_with_diffusers(name):
  model, config, params = _models(name)
  latents, context, pooled, t = _inputs()
  tokens = np.asarray(F.pack_latents(latents))
  img_ids, txt_ids = F.image_ids(6, 8), np.zeros((5, 3), np.float32)
  guidance = np.array([3.5, 3.5], np.float32) if config.guidance_embeds else None
  with torch.no_grad():
    ref = model(torch.from_numpy(tokens), torch.from_numpy(context), torch.from_numpy(pooled),
                torch.from_numpy(t), torch.from_numpy(img_ids), torch.from_numpy(txt_ids),
                None if guidance is None else torch.from_numpy(guidance)).sample.numpy()
  module = F.FluxTransformer2DModel(config)
  apply = jax.jit(lambda p, x, c, y, s, g: module.apply({"params": p}, x, c, y, s, img_ids,
                                                        txt_ids, g),
                  compiler_options=FAST_COMPILE)
  out = apply(params, tokens, context, pooled, t, guidance)
  err = float(np.abs(np.asarray(out) - ref).max())
  print(f"{name}: max abs error {err:.3g} (|v| max {np.abs(ref).max():.3g})")
  assert out.shape == ref.shape == (2, 12, 16) and err <= TOL


def test_round_trip_into_diffusers():
  model, config, params = _models("dev_guidance")
  back = F.flux_to_torch(params)
  assert set(back) == set(model.state_dict())
  rebuilt = diffusers.FluxTransformer2DModel.from_config(config.to_dict()).eval()
  rebuilt.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in back.items()}, strict=True)
  for k, v in model.state_dict().items():
    np.testing.assert_array_equal(rebuilt.state_dict()[k].numpy(), v.numpy(), err_msg=k)
  assert F.FluxConfig.from_dict(config.to_dict()) == config


def test_flux_dev_param_count_matches_diffusers():
  kwargs = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
  with torch.device("meta"):
    ref = diffusers.FluxTransformer2DModel(**kwargs)
  assert sum(p.numel() for p in ref.parameters()) == FLUX_DEV_TRANSFORMER_PARAMS
  assert count_params(F.abstract_flux_params(F.FluxConfig(**kwargs))) == \
      FLUX_DEV_TRANSFORMER_PARAMS


def test_bad_configs_inputs_and_weights():
  with pytest.raises(ValueError, match="axes_dims_rope=\\[2, 2, 2\\] must be even and sum to "
                                       "attention_head_dim=8"):
    F.FluxConfig(**{**_TINY, "axes_dims_rope": (2, 2, 2)})
  with pytest.raises(ValueError, match="unsupported patch_size=2"):
    F.FluxConfig(**{**_TINY, "patch_size": 2})
  model, config, params = _models("dev_guidance")
  latents, context, pooled, t = _inputs()
  tokens = F.pack_latents(latents)
  module = F.FluxTransformer2DModel(config)
  ids, txt = F.image_ids(6, 8), np.zeros((5, 3), np.float32)
  with pytest.raises(ValueError, match="pass guidance"):
    jax.eval_shape(lambda p: module.apply({"params": p}, tokens, context, pooled, t, ids, txt),
                   params)
  with pytest.raises(ValueError, match=r"img_ids \(6, 3\)"):
    jax.eval_shape(lambda p: module.apply({"params": p}, tokens, context, pooled, t, ids[:6],
                                          txt, t), params)
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  missing = {k: v for k, v in state.items() if not k.startswith("time_text_embed.guidance")}
  with pytest.raises(WeightLoadingError, match="guidance_embedder"):
    F.flux_from_torch(missing, config, source="schnell-weights.safetensors")


def test_flux_dev_flow_sampling_matches_the_diffusers_pipeline():
  """`flow.sample_ode` with the Flax FLUX transformer (guidance embedded, no CFG, the dynamic
  schedule of 12 image tokens) against `FluxPipeline` from the same packed latents and
  embeddings (no text encoders involved), output_type="latent"."""
  from ddpo_jax.numerics import flow
  model, config, params = _models("dev_guidance")
  scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
      shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
      base_image_seq_len=256, max_image_seq_len=4096)
  pipe = diffusers.FluxPipeline(transformer=model, scheduler=scheduler, vae=tm.make_torch_vae(),
                                text_encoder=None, tokenizer=None, text_encoder_2=None,
                                tokenizer_2=None)
  latents, context, pooled, _ = _inputs(seed=3)
  tokens = np.asarray(F.pack_latents(latents))
  steps, guidance = 4, 3.5
  side = latents.shape[1] * pipe.vae_scale_factor
  with torch.no_grad():
    ref = pipe(prompt_embeds=torch.from_numpy(context),
               pooled_prompt_embeds=torch.from_numpy(pooled), latents=torch.from_numpy(tokens),
               num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
               height=side, width=latents.shape[2] * pipe.vae_scale_factor).images.numpy()
  module = F.FluxTransformer2DModel(config)
  img_ids, txt_ids = F.image_ids(*latents.shape[1:3]), np.zeros((5, 3), np.float32)
  g = np.full((2,), guidance, np.float32)

  def velocity(p, x, sigma, cond, labels=None):  # FLUX's timestep input is sigma itself
    del labels
    return module.apply({"params": p}, x, cond["context"], cond["pooled"], sigma, img_ids,
                        txt_ids, g)

  sigmas, _ = flow.FlowSchedule.from_config(dict(scheduler.config)).sigmas(
      steps, image_seq_len=tokens.shape[1])
  sample = jax.jit(lambda p, x0: flow.sample_ode(
      velocity, p, x0, {"context": context, "pooled": pooled}, None, sigmas=sigmas,
      guidance_scale=1.0), compiler_options=FAST_COMPILE)
  ours = np.asarray(sample(params, tokens))
  err = float(np.abs(ours - ref).max())
  print(f"FLUX.1-dev flow sampling ({steps} steps, guidance {guidance}) vs diffusers: max abs "
        f"error {err:.3g} (|x| max {np.abs(ref).max():.3g})")
  assert err <= 1e-3
