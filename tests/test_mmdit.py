"""Parity of the Flax MMDiT with diffusers' SD3Transformer2DModel (tiny random models, CPU)."""
import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402

import tiny_models as tm  # noqa: E402
from ddpo_jax.models import mmdit as M  # noqa: E402
from ddpo_jax.models.unet import count_params  # noqa: E402
from ddpo_jax.models.weights import WeightLoadingError  # noqa: E402

TOL = 1e-4  # max abs error, float32
FAST_COMPILE = {"xla_backend_optimization_level": 0}  # tests only: halves CPU compile times

_TINY = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
             num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
             pooled_projection_dim=10, out_channels=4, pos_embed_max_size=8)
TINY = {"sd3": _TINY,
        # SD3.5-Medium's extras: RMS-normalised q/k, a second attention in the first blocks.
        "sd35_qk_norm_dual_attention": {**_TINY, "qk_norm": "rms_norm",
                                        "dual_attention_layers": (0, 1)}}

# Real transformer configs (transformer/config.json of stabilityai/stable-diffusion-3-medium-
# diffusers, stable-diffusion-3.5-medium, stable-diffusion-3.5-large; the keys that differ
# from the defaults shared below).
_REAL = dict(sample_size=128, patch_size=2, in_channels=16, attention_head_dim=64,
             joint_attention_dim=4096, pooled_projection_dim=2048, out_channels=16)
REAL = {
    "sd3_medium": (dict(_REAL, num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                        pos_embed_max_size=192), 2_028_328_000),
    "sd35_medium": (dict(_REAL, num_layers=24, num_attention_heads=24,
                         caption_projection_dim=1536, pos_embed_max_size=384, qk_norm="rms_norm",
                         dual_attention_layers=tuple(range(13))), 2_243_171_520),
    "sd35_large": (dict(_REAL, num_layers=38, num_attention_heads=38,
                        caption_projection_dim=2432, pos_embed_max_size=192, qk_norm="rms_norm"),
                   8_056_627_520),
}


@functools.lru_cache(maxsize=None)
def _models(name):
  """(diffusers model, MMDiTConfig, Flax params) of a tiny random MMDiT, built once."""
  torch.manual_seed(0)
  model = diffusers.SD3Transformer2DModel(**TINY[name]).eval()
  with torch.no_grad():
    for p in model.parameters():  # RMSNorm weights are ones at init: make everything random
      p.copy_(torch.randn_like(p) * 0.2)
  config = M.MMDiTConfig.from_dict(dict(model.config))
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  return model, config, M.mmdit_from_torch(state, config, source=name)


def _inputs(seed=0, height=6, width=8):
  """A non-square latent (a 3x4 patch grid: the crop of the position embedding is off-centre
  in one axis) and float timesteps."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((2, height, width, 4)).astype(np.float32)
  context = rng.standard_normal((2, 5, 12)).astype(np.float32)
  pooled = rng.standard_normal((2, 10)).astype(np.float32)
  return x, np.array([3.5, 917.0], np.float32), context, pooled


def _torch_velocity(model, x, t, context, pooled):
  with torch.no_grad():
    out = model(tm.to_nchw(x), torch.from_numpy(context), torch.from_numpy(pooled),
                torch.from_numpy(t)).sample
  return tm.to_nhwc(out)


@pytest.mark.parametrize("name", list(TINY))
def test_mmdit_parity_with_diffusers(name):
  model, config, params = _models(name)
  inputs = _inputs()
  ref = _torch_velocity(model, *inputs)
  apply = jax.jit(M.SD3Transformer2DModel(config).apply, compiler_options=FAST_COMPILE)
  out = apply({"params": params}, *inputs)
  err = float(np.abs(np.asarray(out) - ref).max())
  print(f"{name}: max abs error {err:.3g} (|v| max {np.abs(ref).max():.3g})")
  assert out.shape == ref.shape and err <= TOL


def test_round_trip_into_diffusers():
  model, config, params = _models("sd35_qk_norm_dual_attention")
  back = M.mmdit_to_torch(params, config)
  ref = {k: v.numpy() for k, v in model.state_dict().items()}
  assert set(back) == set(ref)  # the position-embedding buffer included
  for key in ref:
    np.testing.assert_allclose(back[key], ref[key], rtol=0, atol=1e-6, err_msg=key)
  rebuilt = diffusers.SD3Transformer2DModel.from_config(config.to_dict()).eval()
  rebuilt.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in back.items()}, strict=True)
  inputs = _inputs(seed=1)
  np.testing.assert_allclose(_torch_velocity(rebuilt, *inputs), _torch_velocity(model, *inputs),
                             rtol=0, atol=1e-6)
  assert M.MMDiTConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("name", list(REAL))
def test_real_config_param_counts_match_diffusers(name):
  kwargs, expected = REAL[name]
  with torch.device("meta"):
    ref = diffusers.SD3Transformer2DModel(**kwargs)
  assert sum(p.numel() for p in ref.parameters()) == expected
  assert count_params(M.abstract_mmdit_params(M.MMDiTConfig(**kwargs))) == expected


def test_bad_configs_inputs_and_weights():
  with pytest.raises(ValueError, match="qk_norm='layer_norm'"):
    M.MMDiTConfig(**{**_TINY, "qk_norm": "layer_norm"})
  with pytest.raises(ValueError, match="caption_projection_dim=12 must equal"):
    M.MMDiTConfig(**{**_TINY, "caption_projection_dim": 12})
  with pytest.raises(ValueError, match=r"dual_attention_layers \[3\] outside the 3 layers"):
    M.MMDiTConfig(**{**_TINY, "dual_attention_layers": (3,)})
  with pytest.raises(ValueError, match="_class_name"):
    M.MMDiTConfig.from_dict({**_TINY, "_class_name": "FluxTransformer2DModel"})

  model, config, params = _models("sd3")
  apply = M.SD3Transformer2DModel(config).apply
  x, t, context, pooled = _inputs()
  with pytest.raises(ValueError, match="must be divisible by patch_size 2"):
    jax.eval_shape(apply, {"params": params}, x[:, :5], t, context, pooled)
  with pytest.raises(ValueError, match="pos_embed_max_size is 8"):
    jax.eval_shape(apply, {"params": params}, np.zeros((2, 18, 8, 4), np.float32), t, context,
                   pooled)

  state = {k: v.numpy() for k, v in model.state_dict().items()}
  moved = dict(state)
  moved[M.POS_EMBED_KEY] = state[M.POS_EMBED_KEY] + 0.01
  with pytest.raises(WeightLoadingError, match="pos_embed.pos_embed .* is not the sin-cos"):
    M.mmdit_from_torch(moved, config, source="edited.safetensors")
  missing = {k: v for k, v in state.items() if k != "context_embedder.weight"}
  with pytest.raises(WeightLoadingError, match="context_embedder.weight"):
    M.mmdit_from_torch(missing, config)


def test_sd3_flow_sampling_matches_the_diffusers_pipeline():
  """`flow.sample_ode` with the Flax MMDiT (guided Euler, SD3's shift-3 schedule) against
  `StableDiffusion3Pipeline` from the same latents and embeddings (the pipeline's text
  encoders are not involved: embeddings are passed in), output_type="latent"."""
  from ddpo_jax.numerics import flow
  model, config, params = _models("sd35_qk_norm_dual_attention")
  scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
  pipe = diffusers.StableDiffusion3Pipeline(
      transformer=model, scheduler=scheduler, vae=tm.make_torch_vae(), text_encoder=None,
      tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
      tokenizer_3=None)
  x, _, context, pooled = _inputs(seed=2)
  neg_context, neg_pooled = np.zeros_like(context), np.zeros_like(pooled)
  steps, guidance = 4, 5.0
  with torch.no_grad():
    ref = pipe(prompt_embeds=torch.from_numpy(context), pooled_prompt_embeds=torch.from_numpy(
        pooled), negative_prompt_embeds=torch.from_numpy(neg_context),
        negative_pooled_prompt_embeds=torch.from_numpy(neg_pooled), latents=tm.to_nchw(x),
        num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
        height=x.shape[1] * pipe.vae_scale_factor, width=x.shape[2] * pipe.vae_scale_factor
        ).images
  ref = tm.to_nhwc(ref)
  module = M.SD3Transformer2DModel(config)

  def velocity(p, latents, sigma, cond, labels=None):  # SD3's timestep is 1000 sigma
    del labels
    return module.apply({"params": p}, latents, 1000.0 * sigma, cond["context"], cond["pooled"])

  sigmas, _ = flow.FlowSchedule.from_config(dict(scheduler.config)).sigmas(steps)
  sample = jax.jit(lambda p, x0: flow.sample_ode(
      velocity, p, x0, {"context": context, "pooled": pooled},
      {"context": neg_context[:1], "pooled": neg_pooled[:1]}, sigmas=sigmas,
      guidance_scale=guidance), compiler_options=FAST_COMPILE)
  ours = np.asarray(sample(params, x))
  err = float(np.abs(ours - ref).max())
  print(f"SD3 flow sampling ({steps} steps, CFG {guidance}) vs diffusers: max abs error "
        f"{err:.3g} (|x| max {np.abs(ref).max():.3g})")
  assert err <= 1e-3
