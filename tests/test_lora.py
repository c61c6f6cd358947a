"""LoRA: exact identity at init, target selection and errors, the unmerged application equals
the merged kernels' formula, a bfloat16 fine-tune keeps its small updates (the merged one does
not), only LoRA factors train (the base UNet stays bit-identical), and the merged export loads
in diffusers with the same UNet output."""
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import REPO
from ddpo_jax import config_schema
from ddpo_jax.models import lora, adapters
from ddpo_jax.models.mmdit import SD3Transformer2DModel
from ddpo_jax.models.weights import host_random_params
from ddpo_jax.pipelines import digits
from test_sd import (compile_cache, load_config, one_update, sd_cache_dir,  # noqa: F401
                     sd_overrides, subprocess_env, tiny_sd)

PROJECTIONS = ("to_q", "to_k", "to_v", "to_out_0")


@pytest.fixture(scope="module")
def lora_policy(tiny_sd, prompt_assets):
  from ddpo_jax.pipelines import sd
  return sd.make_policy(load_config("sd_compressibility", **sd_overrides(tiny_sd, prompt_assets)))


def _eps_inputs(policy, n=2, seed=0):
  rng = np.random.RandomState(seed)
  x = jnp.asarray(rng.randn(n, *policy.denoiser.latent_shape).astype(np.float32))
  t = jnp.asarray([999, 1][:n], jnp.int32)
  ids = jnp.asarray(policy.tokenize(["a cat", "a dog"][:n]))
  return x, t, policy.encode_prompts(policy.params, ids)


def test_init_targets_and_exact_identity(lora_policy):
  policy = lora_policy
  base, lora_params = policy.params["base_unet"], policy.params["unet"]
  adapted = lora.module_paths(lora_params_as_modules(lora_params))
  attention = [p for p in lora.module_paths(base) if p.rsplit("/", 1)[-1] in PROJECTIONS]
  assert adapted == attention and len(adapted) == 4 * 2 * 4  # 4 transformers x attn1/attn2
  for leaf_path, leaf in jax.tree_util.tree_leaves_with_path(lora_params):
    name = leaf_path[-1].key
    assert leaf.dtype == jnp.float32
    if name == "b":
      assert not np.any(np.asarray(leaf)) and leaf.shape[0] == 2  # rank 2 in runlocal
    else:
      assert np.std(np.asarray(leaf)) > 0.1 and leaf.shape[1] == 2  # std 1/rank

  frozen = {k: v for k, v in policy.params.items() if k != "unet"}
  adapted = policy.assemble_denoiser(lora_params, frozen)
  assert isinstance(adapted, adapters.LoraAdapted) and adapted.base is base  # no copy
  merged = jax.jit(adapters.merged)(adapted)
  jax.tree.map(np.testing.assert_array_equal, merged, base)  # bit for bit
  x, t, ctx = _eps_inputs(policy)
  eps_fn = jax.jit(policy.denoiser)
  eps_lora = jax.jit(lambda p, f: policy.denoiser(policy.assemble_denoiser(p, f), x, t, ctx))
  np.testing.assert_array_equal(eps_lora(lora_params, frozen), eps_fn(base, x, t, ctx))


def lora_params_as_modules(tree):
  """{"a", "b"} leaves renamed to "kernel" so that `module_paths` lists the adapted modules."""
  from flax import traverse_util
  flat = traverse_util.flatten_dict(tree)
  return traverse_util.unflatten_dict({k[:-1] + ("kernel",): v for k, v in flat.items()
                                       if k[-1] == "a"})


def test_merge_formula_dense_and_conv():
  key = jax.random.PRNGKey(0)
  base = {"blk": {"to_q": {"kernel": jax.random.normal(key, (6, 5)), "bias": jnp.ones(5)},
                  "proj_in": {"kernel": jax.random.normal(key, (1, 1, 6, 4))},
                  "norm": {"scale": jnp.ones(6)}}}
  cfg = lora.LoraConfig(rank=3, alpha=6.0, targets=(r"to_q$", r"proj_in$"))
  params = lora.init_lora(base, cfg, key)
  assert params["blk"]["proj_in"]["a"].shape == (6, 3)
  assert params["blk"]["to_q"]["b"].shape == (3, 5)
  params = jax.tree.map(lambda x: x + 0.5, params)  # a non-zero B
  merged = adapters.merged(adapters.LoraAdapted(base, params, cfg.scale))
  q = params["blk"]["to_q"]
  np.testing.assert_allclose(merged["blk"]["to_q"]["kernel"],
                             base["blk"]["to_q"]["kernel"] + 2.0 * q["a"] @ q["b"], rtol=1e-6)
  c = params["blk"]["proj_in"]
  delta = (c["a"] @ c["b"]).reshape(1, 1, 6, 4)
  np.testing.assert_allclose(merged["blk"]["proj_in"]["kernel"],
                             base["blk"]["proj_in"]["kernel"] + 2.0 * delta, rtol=1e-6)
  assert merged["blk"]["to_q"]["bias"] is base["blk"]["to_q"]["bias"]  # untouched leaves
  assert merged["blk"]["norm"]["scale"] is base["blk"]["norm"]["scale"]


class _Layers(nn.Module):
  """A strided 3×3 conv, a Dense under nn.remat, a bfloat16-free Dense head."""

  @nn.compact
  def __call__(self, x):
    h = nn.Conv(6, (3, 3), strides=(2, 2), padding="SAME", name="conv")(x)
    h = nn.remat(nn.Dense)(5, name="blk")(h)
    return nn.Dense(4, name="out")(h)


def test_unmerged_application_is_the_merged_kernels_formula():
  """y = layer_W(x) + s · layer_A(x) @ B for a strided conv and a rematerialised Dense equals
  the layer with kernel W + s · reshape(A @ B, W.shape), value and factor gradients."""
  m, x = _Layers(), jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
  base = m.init(jax.random.PRNGKey(1), x)["params"]
  keys = jax.random.split(jax.random.PRNGKey(2), 4)
  factors = {"conv": {"a": jax.random.normal(keys[0], (27, 2)),
                      "b": jax.random.normal(keys[1], (2, 6))},
             "blk": {"a": jax.random.normal(keys[2], (6, 2)),
                     "b": jax.random.normal(keys[3], (2, 5))}}

  def by_hand(f):  # the merged kernels, written out
    p = jax.tree.map(lambda v: v, base)
    p["conv"]["kernel"] = base["conv"]["kernel"] + 0.5 * (f["conv"]["a"] @ f["conv"]["b"]).reshape(3, 3, 3, 6)
    p["blk"]["kernel"] = base["blk"]["kernel"] + 0.5 * f["blk"]["a"] @ f["blk"]["b"]
    return m.apply({"params": p}, x)

  unmerged = jax.jit(lambda f: adapters.apply(m, adapters.LoraAdapted(base, f, 0.5), x))
  np.testing.assert_allclose(unmerged(factors), by_hand(factors), rtol=1e-5, atol=1e-5)
  g1 = jax.grad(lambda f: unmerged(f).sum())(factors)
  g2 = jax.grad(lambda f: by_hand(f).sum())(factors)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), g1, g2)
  with pytest.raises(ValueError, match=r"\['head'\] .* are not applied"):
    adapters.apply(m, adapters.LoraAdapted(base, {**factors, "head": factors["blk"]}, 0.5), x)


def _output_change_after_adamw(dtype, apply_merged: bool, steps=5, lr=3e-5, seed=1):
  """The digits MMDiT with weights and activations in `dtype`: LoRA factors (rank 4, the
  attention projections) take `steps` AdamW steps on a regression loss; returns the change of
  the denoiser's output (64 × 8×8×1 values) from the adapted model at init, float32 NumPy."""
  mc = config_schema.new_config("ddpo", "digits").model
  mc.denoiser = "mmdit"
  net = SD3Transformer2DModel(config=digits.mmdit_config(mc), dtype=dtype)
  n = 64
  x = jax.random.normal(jax.random.PRNGKey(0), (n, 8, 8, 1))
  t = jnp.linspace(100.0, 900.0, n)
  ctx = jax.random.normal(jax.random.PRNGKey(1), (n, 1, mc.context_dim))
  abstract = jax.eval_shape(lambda k: net.init(k, x, t, ctx, ctx[:, 0])["params"],
                            jax.random.PRNGKey(0))
  base = jax.tree.map(lambda v: v.astype(dtype),
                      host_random_params(abstract, jax.random.PRNGKey(2)))
  cfg = lora.LoraConfig(rank=4, alpha=4.0)
  f0 = lora.init_lora(jax.tree.map(lambda v: v.astype(jnp.float32), base), cfg,
                      jax.random.PRNGKey(seed + 7))
  target = jax.random.normal(jax.random.PRNGKey(seed), x.shape)

  def forward(f):
    p = adapters.LoraAdapted(base, f, cfg.scale)
    return adapters.apply(net, adapters.merged(p) if apply_merged else p, x, t, ctx,
                          ctx[:, 0]).astype(jnp.float32)

  opt = optax.adamw(lr, weight_decay=1e-4)

  @jax.jit
  def step(f, state):
    grads = jax.grad(lambda f: jnp.mean(jnp.square(forward(f) - target)))(f)
    updates, state = opt.update(grads, state, f)
    return optax.apply_updates(f, updates), state

  f, state = f0, opt.init(f0)
  for _ in range(steps):
    f, state = step(f, state)
  return np.asarray(jax.jit(forward)(f) - jax.jit(forward)(f0))


@pytest.mark.slow  # 27 s in CI (cold cache); merged == unmerged stays fast
def test_bfloat16_lora_keeps_small_updates():
  """Five small AdamW steps (lr 3e-5) on a bfloat16 denoiser: the fraction of the float32 run's
  output change that the bfloat16 run reproduces, <d_bf16, d_f32> / |d_f32|², is 1 within the
  spread of this estimate (bfloat16 rounding of the whole forward pass; 0.91–1.10 over three
  seeds). With the factors merged into the bfloat16 kernels, updates smaller than half an ulp
  of a weight round away: 0.42–0.51 of the change survives, and this test fails."""
  reference = _output_change_after_adamw(jnp.float32, apply_merged=False)

  def reproduced(change):
    return float(np.vdot(change, reference) / np.vdot(reference, reference))

  unmerged = reproduced(_output_change_after_adamw(jnp.bfloat16, apply_merged=False))
  merged = reproduced(_output_change_after_adamw(jnp.bfloat16, apply_merged=True))
  assert 0.8 < unmerged < 1.2, (unmerged, merged)
  assert merged < 0.6, (unmerged, merged)  # the check can fail: the merged application does


def test_target_errors():
  base = {"blk": {"attn1": {"to_q": {"kernel": jnp.ones((4, 4))}}, "norm": {"kernel": jnp.ones(4)}}}
  with pytest.raises(lora.LoraTargetError, match=r"'to_z' matches no layer .*'blk/attn1/to_q'"):
    lora.init_lora(base, lora.LoraConfig(targets=("to_q", "to_z")), jax.random.PRNGKey(0))
  with pytest.raises(lora.LoraTargetError, match="not a valid regular expression"):
    lora.select_targets(base, ["to_q["])
  with pytest.raises(lora.LoraTargetError, match="at least one target"):
    lora.select_targets(base, [])
  with pytest.raises(lora.LoraTargetError, match="need rank"):
    lora.select_targets(base, ["norm"])
  with pytest.raises(ValueError, match="rank must be"):
    lora.init_lora(base, lora.LoraConfig(rank=0), jax.random.PRNGKey(0))


def test_update_trains_only_lora_base_bit_identical(tiny_sd, prompt_assets, compile_cache):
  config = load_config("sd_compressibility", **sd_overrides(tiny_sd, prompt_assets))
  from ddpo_jax.pipelines import sd
  before = jax.tree.map(np.array, sd.make_policy(config).params["base_unet"])
  policy, frozen, state, metrics = one_update(config)
  assert all(np.isfinite(v) for v in metrics.values()), metrics
  assert int(state.step) == 1
  # The trainable state is the LoRA tree only (no base weight is in the optimizer).
  assert (jax.tree.structure(state.params) == jax.tree.structure(policy.params["unet"]))
  assert lora.num_params(state.params) < lora.num_params(before) / 5
  jax.tree.map(np.testing.assert_array_equal, frozen["base_unet"], before)
  jax.tree.map(np.testing.assert_array_equal, policy.params["base_unet"], before)
  bs = [np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(state.params)
        if p[-1].key == "b"]
  assert all(np.any(b != 0) for b in bs)  # every B left zero


@pytest.mark.slow  # 42 s in CI (cold cache); the SD run's save/load round trip stays fast
def test_export_merged_loads_in_diffusers_and_matches(tiny_sd, prompt_assets, compile_cache,
                                                      tmp_path):
  """One epoch of LoRA training, `python -m ddpo_jax.export --merged`, diffusers UNet == merged
  UNet (the LoRA-file export: tests/test_lora_export.py)."""
  import torch
  from diffusers import StableDiffusionPipeline
  from ddpo_jax import export
  from ddpo_jax.algorithms import train
  from ddpo_jax.trainer import loop, runs
  import tiny_models
  workdir, out = str(tmp_path / "run"), str(tmp_path / "exported")
  config = load_config("sd_compressibility", **sd_overrides(tiny_sd, prompt_assets, num_epochs=1))
  loop.train_and_evaluate(config, workdir)
  result = subprocess.run([sys.executable, "-m", "ddpo_jax.export", f"--workdir={workdir}",
                           f"--out={out}", "--merged"], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=subprocess_env(compile_cache))
  assert result.returncode == 0, result.stderr[-3000:]
  assert sorted(os.listdir(tmp_path)) == ["exported", "run"]  # no temporary directory left

  _, policy, trained, step = runs.restore_run(workdir)
  assert step == 1
  frozen = train.frozen_params(policy, config)
  adapted = policy.assemble_denoiser(trained, frozen)
  x, t, ctx = _eps_inputs(policy)
  ours = np.asarray(jax.jit(policy.denoiser)(adapted, x, t, ctx))  # unmerged, as trained

  pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
  base_pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
  with torch.no_grad():
    theirs = pipe.unet(tiny_models.to_nchw(x), torch.from_numpy(np.array(t)).long(),
                       encoder_hidden_states=torch.from_numpy(np.asarray(ctx))).sample
  np.testing.assert_allclose(tiny_models.to_nhwc(theirs), ours, atol=1e-4)
  new_sd, base_sd = pipe.unet.state_dict(), base_pipe.unet.state_dict()
  for key in new_sd:
    same = torch.equal(new_sd[key], base_sd[key])
    adapted = key.rsplit(".", 2)[-2] in ("to_q", "to_k", "to_v") or key.endswith("to_out.0.weight")
    assert same != adapted, key  # exactly the adapted kernels changed
  for name in ("text_encoder", "vae"):
    a, b = getattr(pipe, name).state_dict(), getattr(base_pipe, name).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b), name
  assert pipe.tokenizer("a cat").input_ids == base_pipe.tokenizer("a cat").input_ids

  with pytest.raises(FileNotFoundError, match="no checkpoints"):
    export.export_pipeline(str(tmp_path / "nothing"), str(tmp_path / "new"), merged=True)

  # Nothing is replaced that should not be: the run's own directory (or one inside or above
  # it), an existing export without --overwrite; with it, the export is written again.
  for target in (workdir, os.path.join(workdir, "checkpoints"), str(tmp_path)):
    bad = subprocess.run([sys.executable, "-m", "ddpo_jax.export", f"--workdir={workdir}",
                          f"--out={target}", "--overwrite", "--merged"], cwd=REPO, capture_output=True,
                         text=True, timeout=300, env=subprocess_env(compile_cache))
    assert bad.returncode != 0 and "would replace the run's checkpoints" in bad.stderr, target
  assert runs.restore_run(workdir)[3] == 1  # the checkpoints are still there
  with pytest.raises(FileExistsError, match=r"already holds an exported pipeline: pass"):
    export.export_pipeline(workdir, out, merged=True)
  before = os.path.getmtime(os.path.join(out, "model_index.json"))
  export.export_pipeline(workdir, out, overwrite=True, merged=True)
  assert os.path.getmtime(os.path.join(out, "model_index.json")) >= before
  assert sorted(os.listdir(tmp_path)) == ["exported", "run"]


@pytest.mark.slow  # 17 s in CI; merged == unmerged is checked fast on the adapted layers
def test_sampling_with_merged_factors():
  """`sample_images(merge_lora=True)` (the sampling speed-up) gives the unmerged sampler's
  images: the same uint8 images in float32 (up to one level); with bfloat16 weights the merged
  kernels are rounded (a few levels at most, on average a small fraction of one). A run without
  LoRA is refused."""
  from ddpo_jax.configs import digits_flow
  from ddpo_jax.trainer import families, sample
  for variant, max_levels, mean_levels in (("lora,runlocal", 1, 0.01),
                                           ("lora,bf16,runlocal", 4, 0.5)):
    config = digits_flow.get_config(variant)
    policy = families.build_base_policy(config)
    trained = jax.tree.map(  # factors away from init (B = 0 would make merging trivial)
        lambda v: v + 0.02 * jax.random.normal(jax.random.PRNGKey(0), v.shape),
        policy.params["unet"])
    unmerged, _ = sample.sample_images(config, policy, trained, 32, seed=0)
    merged, _ = sample.sample_images(config, policy, trained, 32, seed=0, merge_lora=True)
    levels = np.abs(unmerged.astype(np.int32) - merged.astype(np.int32))
    assert levels.max() <= max_levels and levels.mean() <= mean_levels, (
        variant, levels.max(), levels.mean())
  config = digits_flow.get_config("runlocal")
  policy = families.build_base_policy(config)
  with pytest.raises(ValueError, match="trains no LoRA"):
    sample.sample_images(config, policy, policy.params["unet"], 4, merge_lora=True)
