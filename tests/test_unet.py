"""Parity of the Flax UNet with diffusers' UNet2DConditionModel (tiny random models, CPU)."""
import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import tiny_models as tm  # noqa: E402
from ddpo_jax.models import attention  # noqa: E402
from ddpo_jax.models import unet as U  # noqa: E402
from ddpo_jax.models.weights import WeightLoadingError, flax_path_to_torch_key  # noqa: E402
from flax import traverse_util  # noqa: E402

TOL = 1e-4
# Tests only: XLA's CPU backend optimisations double compile times of these tiny models.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _jit(fn, **kwargs):
  return jax.jit(fn, compiler_options=FAST_COMPILE, **kwargs)
SD15_UNET_PARAMS = 859_520_964
SDXL_UNET_PARAMS = 2_567_463_684  # stabilityai/stable-diffusion-xl-base-1.0 unet


def _state_dict(model):
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _inputs(kw, batch=2, seq=5, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, 8, 8, kw["in_channels"])).astype(np.float32)
  ctx = rng.standard_normal((batch, seq, kw["cross_attention_dim"])).astype(np.float32)
  t = np.array([3, 917])[:batch]
  labels = np.array([1, 7])[:batch] if kw.get("num_class_embeds") else None
  return x, t, ctx, labels


def _sdxl_inputs(kw, batch=2, seed=1):
  """(text_embeds (B, 24), time_ids (B, 6)) for the tiny SDXL UNets."""
  rng = np.random.default_rng(seed)
  width = kw["projection_class_embeddings_input_dim"] - 6 * kw["addition_time_embed_dim"]
  text = rng.standard_normal((batch, width)).astype(np.float32)
  time_ids = np.array([[64, 64, 0, 0, 64, 64], [48, 40, 2, 4, 64, 64]], np.float32)[:batch]
  return text, time_ids


_KWARGS = {"sd1": tm.unet_sd1_kwargs, "sd2_linear_per_block_heads": tm.unet_sd2_kwargs,
           "pixel_class_labels": tm.unet_pixel_class_kwargs, "variants": tm.unet_variants_kwargs,
           "sdxl": tm.unet_sdxl_kwargs, "sdxl_nested_layers": tm.unet_sdxl_nested_kwargs}


@functools.lru_cache(maxsize=None)
def _models(name):
  """(diffusers model, kwargs, UNetConfig, Flax params) of a tiny UNet, built once."""
  kw = _KWARGS[name]()
  model = tm.make_torch_unet(kw)
  config = U.UNetConfig.from_dict(dict(model.config))
  return model, kw, config, U.unet_from_torch(_state_dict(model), config, source=name)


def _torch_eps(model, x, t, ctx, labels=None, text_embeds=None, time_ids=None):
  added = None
  if text_embeds is not None:
    added = {"text_embeds": torch.from_numpy(text_embeds), "time_ids": torch.from_numpy(time_ids)}
  with torch.no_grad():
    out = model(tm.to_nchw(x), torch.as_tensor(t), torch.from_numpy(ctx),
                class_labels=None if labels is None else torch.as_tensor(labels),
                added_cond_kwargs=added).sample
  return tm.to_nhwc(out)


# ------------------------------------------------------------------------------------------------
def test_attention_implementations_agree_on_cpu():
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((2, 7, 3, 16)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((2, 5, 3, 16)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((2, 5, 3, 16)), jnp.float32)
  ref = jax.nn.dot_product_attention(q, k, v)
  for impl in ("auto", "xla"):
    out = attention.dot_product_attention(q, k, v, implementation=impl)
    assert out.shape == (2, 7, 3, 16)
    np.testing.assert_allclose(out, ref, atol=1e-5)
  # bf16 inputs: softmax in fp32, output in bf16.
  out16 = attention.dot_product_attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16),
                                          v.astype(jnp.bfloat16))
  assert out16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out16, np.float32), ref, atol=5e-2)
  with pytest.raises(ValueError, match="implementation"):
    attention.dot_product_attention(q, k, v, implementation="flash")


@pytest.mark.parametrize("block_logits", [  # one block (slow tier: 8 s); 3 blocks of 1 head;
    pytest.param(1 << 20, marks=pytest.mark.slow), 2 * 7 * 5, 1])  # each head in 7 query chunks
def test_xla_attention_gradients_match_reference(monkeypatch, block_logits):
  """The blocked, recomputing custom VJP of the XLA path against autodiff of
  `jax.nn.dot_product_attention` (f32, atol 1e-5), and it keeps no (B, H, Lq, Lk) residual."""
  monkeypatch.setattr(attention, "_BLOCK_LOGITS", block_logits)
  rng = np.random.default_rng(1)
  q, k, v, d_out = (jnp.asarray(rng.standard_normal(s), jnp.float32)
                    for s in [(2, 7, 3, 4), (2, 5, 3, 4), (2, 5, 3, 4), (2, 7, 3, 4)])

  def loss(impl):
    if impl == "reference":
      return lambda q, k, v: jnp.sum(jax.nn.dot_product_attention(q, k, v, scale=0.7) * d_out)
    return lambda q, k, v: jnp.sum(
        attention.dot_product_attention(q, k, v, implementation="xla", scale=0.7) * d_out)

  want = jax.grad(loss("reference"), argnums=(0, 1, 2))(q, k, v)
  got = jax.jit(jax.grad(loss("xla"), argnums=(0, 1, 2)))(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=1e-5)
  _, vjp_fn = jax.vjp(lambda q, k, v: attention.dot_product_attention(
      q, k, v, implementation="xla"), q, k, v)
  assert all(x.size < 2 * 3 * 7 * 5 for x in jax.tree.leaves(vjp_fn)), \
      [x.shape for x in jax.tree.leaves(vjp_fn)]
  # bf16: gradients in the inputs' dtype, close to the f32 reference.
  got16 = jax.grad(loss("xla"), argnums=(0, 1, 2))(*(a.astype(jnp.bfloat16) for a in (q, k, v)))
  for g, w in zip(got16, want):
    assert g.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(g, np.float32), w, atol=0.1)


@pytest.mark.parametrize("name", ["sd1", "sd2_linear_per_block_heads", "pixel_class_labels",
                                  "variants", "sdxl",
                                  pytest.param("sdxl_nested_layers", marks=pytest.mark.slow)])
def test_unet_parity_with_diffusers(name):
  model, kw, config, params = _models(name)
  x, t, ctx, labels = _inputs(kw)
  sdxl = _sdxl_inputs(kw) if kw.get("addition_embed_type") else (None, None)
  ref = _torch_eps(model, x, t, ctx, labels, *sdxl)
  out = _jit(U.UNet2DConditionModel(config).apply)({"params": params}, x, t, ctx, labels,
                                                   text_embeds=sdxl[0], time_ids=sdxl[1])
  err = float(np.abs(np.asarray(out) - ref).max())
  print(f"{name}: max abs error {err:.3g} (|eps| max {np.abs(ref).max():.3g})")
  assert out.shape == ref.shape and err <= TOL


def test_scalar_and_float_timesteps_broadcast():
  model, kw, config, params = _models("pixel_class_labels")
  x, _, ctx, labels = _inputs(kw)
  apply = _jit(U.UNet2DConditionModel(config).apply)
  ref = _torch_eps(model, x, torch.tensor(321.5), ctx, labels)
  out = apply({"params": params}, x, jnp.float32(321.5), ctx, labels)
  assert float(np.abs(np.asarray(out) - ref).max()) <= TOL
  np.testing.assert_allclose(
      out, apply({"params": params}, x, jnp.full((2,), 321.5), ctx, labels), atol=1e-6)


def test_to_torch_round_trip_and_diffusers_config():
  from diffusers import UNet2DConditionModel as TorchUNet
  model, _, config, params = _models("sd2_linear_per_block_heads")
  back = U.unet_to_torch(params, config)
  ref = _state_dict(model)
  assert set(back) == set(ref)
  for key in ref:
    np.testing.assert_array_equal(back[key], ref[key], err_msg=key)
  # to_dict() is a diffusers-loadable config of the same architecture.
  rebuilt = TorchUNet.from_config(config.to_dict())
  rebuilt.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in back.items()}, strict=True)
  assert U.UNetConfig.from_dict(config.to_dict()) == config


def test_init_and_bad_state_dicts():
  model, _, config, _ = _models("pixel_class_labels")
  # init_unet_params gives the tree that the converter fills, with Flax's init distributions.
  init = U.init_unet_params(config, jax.random.PRNGKey(0))
  abstract = U.abstract_unet_params(config)
  assert (jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), init)
          == jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), abstract))
  kernel = np.asarray(init["down_blocks_0"]["resnets_0"]["conv1"]["kernel"])  # (3, 3, 32, 32)
  fan_in = 3 * 3 * 32
  assert abs(kernel.std() * np.sqrt(fan_in) - 1.0) < 0.1  # lecun_normal
  assert np.abs(kernel).max() <= 2 / np.sqrt(fan_in) / 0.8796 + 1e-6  # truncated at 2 sigma
  assert np.all(np.asarray(init["conv_norm_out"]["scale"]) == 1.0)
  assert np.all(np.asarray(init["conv_norm_out"]["bias"]) == 0.0)
  init16 = U.init_unet_params(config, jax.random.PRNGKey(1), jnp.bfloat16)
  assert all(a.dtype == jnp.bfloat16 for a in jax.tree_util.tree_leaves(init16))
  ref = _state_dict(model)
  bad = dict(ref)
  bad["down_blocks.0.attentions.0.proj_in.weight"] = np.zeros((3, 3, 1, 1), np.float32)
  with pytest.raises(WeightLoadingError, match=r"down_blocks\.0\.attentions\.0\.proj_in\.weight"):
    U.unet_from_torch(bad, config, source="bad.safetensors")
  missing = {k: v for k, v in ref.items() if k != "class_embedding.weight"}
  with pytest.raises(WeightLoadingError, match="class_embedding.weight"):
    U.unet_from_torch(missing, config)


def test_config_semantics_and_errors():
  base = dict(tm.make_torch_unet(tm.unet_sd1_kwargs()).config)
  config = U.UNetConfig.from_dict(base)  # _class_name, _diffusers_version, ... ignored
  assert config.heads_per_block == (2, 2)  # attention_head_dim is the number of heads
  sd2 = U.UNetConfig.from_dict(tm.unet_sd2_kwargs())
  assert sd2.heads_per_block == (2, 4, 8)
  with pytest.raises(ValueError, match=r"down_block_types\[1\]='SimpleCrossAttnDownBlock2D'"):
    U.UNetConfig.from_dict({**base, "down_block_types": ["CrossAttnDownBlock2D",
                                                         "SimpleCrossAttnDownBlock2D"]})
  with pytest.raises(ValueError, match="up_block_types"):
    U.UNetConfig.from_dict({**base, "up_block_types": ["AttnUpBlock2D", "CrossAttnUpBlock2D"]})
  with pytest.raises(ValueError, match="class_embed_type='timestep'"):
    U.UNetConfig.from_dict({**base, "class_embed_type": "timestep"})
  with pytest.raises(ValueError, match="addition_embed_type='text_image'"):
    U.UNetConfig.from_dict({**base, "addition_embed_type": "text_image"})
  with pytest.raises(ValueError, match="text_time' needs addition_time_embed_dim"):
    U.UNetConfig.from_dict({**base, "addition_embed_type": "text_time"})
  with pytest.raises(ValueError, match="projection_class_embeddings_input_dim=16 without"):
    U.UNetConfig.from_dict({**base, "projection_class_embeddings_input_dim": 16})
  with pytest.raises(ValueError, match="_class_name"):
    U.UNetConfig.from_dict({**base, "_class_name": "UNet2DModel"})
  with pytest.warns(UserWarning, match="some_new_key"):
    U.UNetConfig.from_dict({**base, "some_new_key": 1})


def test_sdxl_config_and_input_errors():
  nested = tm.unet_sdxl_nested_kwargs()
  config = U.UNetConfig.from_dict(nested)
  assert config.transformer_layers_per_block == ((1, 1), (1, 2), (2, 1))  # hashable tuples
  hash(config)
  with pytest.raises(ValueError, match="reverse_transformer_layers_per_block must then give"):
    U.UNetConfig.from_dict({**nested, "reverse_transformer_layers_per_block": None})
  with pytest.raises(ValueError, match=r"transformer_layers_per_block\[1\]=\[1, 2, 3\] must have "
                                       r"one entry per layer of down block 1 \(2\)"):
    U.UNetConfig.from_dict({**nested, "transformer_layers_per_block": [[1, 1], [1, 2, 3],
                                                                       [2, 1]]})
  with pytest.raises(ValueError, match=r"reverse_transformer_layers_per_block\[0\]=\(2, 1\)"):
    U.UNetConfig.from_dict({**nested, "reverse_transformer_layers_per_block": [[2, 1], [1, 2, 1],
                                                                               [1, 1, 1]]})
  # to_dict() is a diffusers-loadable config that takes our weights, nested depths included.
  from diffusers import UNet2DConditionModel as TorchUNet
  _, _, config, params = _models("sdxl_nested_layers")
  assert U.UNetConfig.from_dict(config.to_dict()) == config
  TorchUNet.from_config(config.to_dict()).load_state_dict(
      {k: torch.from_numpy(v.copy()) for k, v in U.unet_to_torch(params).items()}, strict=True)

  _, kw, config, params = _models("sdxl")
  x, t, ctx, _ = _inputs(kw)
  text, time_ids = _sdxl_inputs(kw)
  apply = U.UNet2DConditionModel(config).apply
  with pytest.raises(ValueError, match="needs text_embeds"):
    jax.eval_shape(apply, {"params": params}, x, t, ctx)
  with pytest.raises(ValueError, match=r"give 64 features per sample \(16 \+ 6 x "
                                       r"addition_time_embed_dim 8\).*is 72"):
    jax.eval_shape(apply, {"params": params}, x, t, ctx, text_embeds=text[:, :16],
                   time_ids=time_ids)
  sd1 = _models("sd1")
  with pytest.raises(ValueError, match="text_embeds / time_ids are given"):
    jax.eval_shape(U.UNet2DConditionModel(sd1[2]).apply, {"params": sd1[3]},
                   *_inputs(sd1[1])[:3], text_embeds=text, time_ids=time_ids)


@pytest.mark.slow  # 28 s in CI; the UNet's parity with diffusers stays fast
def test_remat_identical_and_bf16_runs():
  # A one-level UNet (CrossAttnDownBlock2D, mid block, CrossAttnUpBlock2D): compiling two
  # backward passes on CPU is the slow part of this file. (DownBlock2D / UpBlock2D under remat:
  # test_pipeline_io.py.)
  kw = tm.unet_pixel_class_kwargs(block_out_channels=(32,), down_block_types=(
      "CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",))
  config = U.UNetConfig.from_dict(kw)
  params = U.init_unet_params(config, jax.random.PRNGKey(0))
  x, t, ctx, labels = _inputs(kw)

  def loss(p, module):
    return jnp.mean(module.apply({"params": p}, x, t, ctx, labels) ** 2)

  plain = U.UNet2DConditionModel(config)
  remat = U.UNet2DConditionModel(config, remat=True)
  fwd = lambda m: jax.jit(m.apply, compiler_options=FAST_COMPILE)(
      {"params": params}, x, t, ctx, labels)
  out_plain = fwd(plain)
  np.testing.assert_array_equal(out_plain, fwd(remat))  # bitwise identical forward
  grad_fn = jax.jit(jax.grad(loss), static_argnums=1, compiler_options=FAST_COMPILE)
  g_plain, g_remat = grad_fn(params, plain), grad_fn(params, remat)
  for a, b in zip(jax.tree_util.tree_leaves(g_plain), jax.tree_util.tree_leaves(g_remat)):
    # Same gradients up to fp32 reassociation (XLA fuses the recomputed forward differently).
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(np.abs(a).max()) + 1e-9)

  # bf16 compute (and bf16 params): runs, close to fp32.
  bf16 = U.UNet2DConditionModel(config, dtype=jnp.bfloat16)
  params16 = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), params)
  out_bf16 = jax.jit(bf16.apply, compiler_options=FAST_COMPILE)(
      {"params": params16}, x, t, ctx, labels)
  assert out_bf16.dtype == jnp.bfloat16
  out_bf16 = np.asarray(out_bf16, np.float32)
  assert np.isfinite(out_bf16).all()
  rel = np.abs(out_bf16 - np.asarray(out_plain)).max() / np.abs(np.asarray(out_plain)).max()
  print(f"bf16 vs fp32: max abs error / max |eps| = {rel:.3g}")
  assert rel < 0.1, rel


def test_sd15_param_count_matches_diffusers():
  from diffusers import UNet2DConditionModel as TorchUNet
  from ddpo_jax.models.pipeline import SD15_UNET_CONFIG, sd15_configs
  unet_config = sd15_configs()[0]
  abstract = U.abstract_unet_params(unet_config)
  with torch.device("meta"):
    ref = TorchUNet.from_config(SD15_UNET_CONFIG)
  assert U.count_params(abstract) == SD15_UNET_PARAMS
  assert sum(p.numel() for p in ref.parameters()) == SD15_UNET_PARAMS
  assert _torch_shapes(abstract) == {k: tuple(v.shape) for k, v in ref.state_dict().items()}


def _torch_shapes(abstract) -> dict:
  """{diffusers state-dict key: shape in PyTorch layout} of a Flax UNet parameter tree."""
  ours = {}
  for path, leaf in traverse_util.flatten_dict(abstract).items():
    shape = tuple(leaf.shape)
    if path[-1] == "kernel":
      shape = shape[::-1] if len(shape) == 2 else (shape[3], shape[2], shape[0], shape[1])
    ours[flax_path_to_torch_key(path, U.UNET_LIST_NAMES)] = shape
  return ours


def test_sdxl_param_count_matches_diffusers():
  from diffusers import UNet2DConditionModel as TorchUNet
  from ddpo_jax.models.pipeline import SDXL_UNET_CONFIG
  with torch.device("meta"):
    ref = TorchUNet.from_config(SDXL_UNET_CONFIG)
  abstract = U.abstract_unet_params(U.UNetConfig.from_dict(SDXL_UNET_CONFIG))
  assert sum(p.numel() for p in ref.parameters()) == SDXL_UNET_PARAMS
  assert U.count_params(abstract) == SDXL_UNET_PARAMS
  # Every diffusers key exists with the same shape (in PyTorch layout): real weights load.
  assert _torch_shapes(abstract) == {k: tuple(v.shape) for k, v in ref.state_dict().items()}


def test_sample_size_must_be_divisible():
  config = U.UNetConfig.from_dict(tm.unet_sd2_kwargs())
  with pytest.raises(ValueError, match="divisible by 4"):
    jax.eval_shape(U.UNet2DConditionModel(config).init, jax.random.PRNGKey(0),
                   jnp.zeros((1, 6, 6, 4)), jnp.zeros((1,)), jnp.zeros((1, 3, 24)))
