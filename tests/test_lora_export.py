"""LoRA files in the diffusers / PEFT format (`ddpo_jax.models.lora_io`): for tiny SD (UNet, a
1×1-conv target included), SD3 and FLUX.1 pipelines, random non-zero factors applied unmerged
here (`adapters.apply`) equal the diffusers denoiser after `pipe.load_lora_weights`; files read
back (ours, diffusers-written, with an alpha in the header) give our factors; bad files list
every missing and extra key and name shape mismatches; `model.lora.init_path` starts a policy
from a file; a LoRA run's `python -m ddpo_jax.export` writes a file diffusers loads."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from conftest import REPO
from ddpo_jax.models import adapters, lora, lora_io
from ddpo_jax.models.pipeline import load_pipeline
from test_sd import (compile_cache, load_config, sd_cache_dir,  # noqa: F401
                     sd_overrides, subprocess_env, tiny_sd)

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
try:
  import peft  # noqa: F401  diffusers' load_lora_weights needs its PEFT backend
  HAVE_PEFT = True
except ImportError:
  HAVE_PEFT = False
needs_peft = pytest.mark.skipif(not HAVE_PEFT, reason="diffusers' load_lora_weights needs peft")

TOL = 1e-4  # max abs difference, float32
RANK, ALPHA = 4, 6.0  # scale 1.5: folding it into lora_B is exercised
TARGETS = lora.DEFAULT_TARGETS
# name -> (tiny pipeline writer, extra targets, factor std)
FAMILIES = {
    "sd": (lambda d: _tiny_models().save_tiny_pipeline(d), (r"(^|/)proj_in$",), 0.2),
    "sd3": (lambda d: _tiny_models().save_tiny_flow_pipeline(d, "sd3"), (), 0.2),
    # FLUX's sinusoids make large weights amplify XLA/PyTorch round-off (tests/test_flux.py)
    "flux": (lambda d: _tiny_models().save_tiny_flow_pipeline(d, "flux"), (), 0.1),
}


def _tiny_models():
  import tiny_models
  return tiny_models


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_setup(request, tmp_path_factory):
  """(name, base dir, our Pipeline, targets, random non-zero factors as NumPy)."""
  name = request.param
  write, extra_targets, std = FAMILIES[name]
  base_dir = write(str(tmp_path_factory.mktemp(f"tiny_{name}") / "pipe"))
  pipe = load_pipeline(base_dir)
  targets = TARGETS + extra_targets
  base = pipe.params[pipe.denoiser]
  factors = random_factors(base, targets, std, seed=1)
  return name, base_dir, pipe, targets, factors


def random_factors(base, targets, std, seed=0, rank=RANK):
  """Factors for `targets` with A and B both drawn N(0, std²) (B = 0 would test nothing)."""
  init = lora.init_lora(base, lora.LoraConfig(rank=rank, alpha=ALPHA, targets=targets),
                        jax.random.PRNGKey(0))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: (std * rng.standard_normal(x.shape)).astype(np.float32), init)


def _inputs(name, pipe):
  """Denoiser inputs (NumPy): ours and the torch model's positional args."""
  rng = np.random.default_rng(0)
  if name == "sd":
    cfg = pipe.unet_config
    x = rng.standard_normal((2, 8, 8, cfg.in_channels)).astype(np.float32)
    t = np.array([999, 17], np.int32)
    ctx = rng.standard_normal((2, 6, cfg.context_dim)).astype(np.float32)
    return (x, t, ctx), lambda tm: (tm.to_nchw(x), torch.from_numpy(t).long(),
                                    torch.from_numpy(ctx))
  tcfg = pipe.transformer.config
  if name == "sd3":
    x = rng.standard_normal((2, 8, 8, tcfg.in_channels)).astype(np.float32)
    t = np.array([3.5, 917.0], np.float32)
    ctx = rng.standard_normal((2, 5, tcfg.joint_attention_dim)).astype(np.float32)
    pooled = rng.standard_normal((2, tcfg.pooled_projection_dim)).astype(np.float32)
    return (x, t, ctx, pooled), lambda tm: (tm.to_nchw(x), torch.from_numpy(ctx),
                                            torch.from_numpy(pooled), torch.from_numpy(t))
  from ddpo_jax.models import flux as F
  tokens = rng.standard_normal((2, 12, tcfg.in_channels)).astype(np.float32)
  ctx = rng.standard_normal((2, 5, tcfg.joint_attention_dim)).astype(np.float32)
  pooled = rng.standard_normal((2, tcfg.pooled_projection_dim)).astype(np.float32)
  t = np.array([0.3, 0.9], np.float32)
  img_ids, txt_ids = np.asarray(F.image_ids(6, 8), np.float32), np.zeros((5, 3), np.float32)
  guidance = np.array([3.5, 3.5], np.float32) if tcfg.guidance_embeds else None
  ours = (tokens, ctx, pooled, t, img_ids, txt_ids, guidance)
  return ours, lambda tm: (torch.from_numpy(tokens), torch.from_numpy(ctx),
                           torch.from_numpy(pooled), torch.from_numpy(t),
                           torch.from_numpy(img_ids), torch.from_numpy(txt_ids),
                           None if guidance is None else torch.from_numpy(guidance))


def _ours(pipe, factors, inputs, scale=ALPHA / RANK):
  module = getattr(pipe, pipe.denoiser)
  base = pipe.params[pipe.denoiser]
  fn = jax.jit(lambda b, f: adapters.apply(module, adapters.LoraAdapted(b, f, scale), *inputs))
  return np.asarray(fn(base, jax.tree.map(jnp.asarray, factors)))


def _torch_out(denoiser, name, torch_inputs):
  tm = _tiny_models()
  with torch.no_grad():
    out = denoiser(*torch_inputs(tm)).sample
  return tm.to_nhwc(out) if name in ("sd", "sd3") else out.numpy()


@needs_peft
def test_diffusers_loads_our_lora_and_matches(family_setup, tmp_path):
  name, base_dir, pipe, targets, factors = family_setup
  out_dir = lora_io.save_lora(str(tmp_path / "lora"), factors, pipe.params[pipe.denoiser],
                              rank=RANK, alpha=ALPHA, targets=targets, base_model=base_dir)
  assert sorted(os.listdir(out_dir)) == sorted([lora_io.LORA_WEIGHT_NAME, lora_io.LORA_INFO_NAME,
                                               "ddpo_jax_pipeline.json"])
  info = json.load(open(os.path.join(out_dir, lora_io.LORA_INFO_NAME)))
  assert (info["rank"], info["alpha"], info["base_model"]) == (RANK, ALPHA, base_dir)
  prefix = "unet." if name == "sd" else "transformer."
  keys = safetensors.numpy.load_file(os.path.join(out_dir, lora_io.LORA_WEIGHT_NAME))
  assert all(k.startswith(prefix) and k.endswith((".lora_A.weight", ".lora_B.weight"))
             for k in keys)
  assert len(keys) == 2 * len(info["modules"]) == 2 * len(lora.select_targets(
      pipe.params[pipe.denoiser], targets))

  ours_in, torch_in = _inputs(name, pipe)
  ours = _ours(pipe, factors, ours_in)
  tpipe = diffusers.DiffusionPipeline.from_pretrained(base_dir, dtype=torch.float32)
  denoiser = getattr(tpipe, pipe.denoiser)
  base_out = _torch_out(denoiser, name, torch_in)
  tpipe.load_lora_weights(out_dir)
  denoiser = getattr(tpipe, pipe.denoiser)
  lora_layers = [n for n, _ in denoiser.named_modules() if n.endswith(".lora_A")]
  assert len(lora_layers) == len(info["modules"]), lora_layers[:4]
  theirs = _torch_out(denoiser, name, torch_in)
  err = float(np.abs(theirs - ours).max())
  change = float(np.abs(base_out - ours).max())
  print(f"{name}: max abs difference {err:.3g} (the LoRA changes the output by {change:.3g})")
  assert theirs.shape == ours.shape and err <= TOL
  assert change > 100 * TOL  # the adapter does something

  if name == "sd":  # a file diffusers itself writes (PEFT's state dict) reads back as ours
    from peft.utils import get_peft_model_state_dict
    from diffusers.utils import convert_state_dict_to_diffusers
    (adapter,) = denoiser.peft_config  # diffusers names it default_0
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(denoiser,
                                                                       adapter_name=adapter))
    type(tpipe).save_lora_weights(str(tmp_path / "theirs"), unet_lora_layers=layers)
    back = lora_io.read_lora_file(str(tmp_path / "theirs"), pipe.params["unet"],
                                  lora.select_targets(pipe.params["unet"], targets), RANK,
                                  ALPHA / RANK)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 back, factors)


@pytest.fixture(scope="module")
def sd_base(tmp_path_factory):
  base_dir = _tiny_models().save_tiny_pipeline(str(tmp_path_factory.mktemp("sd") / "pipe"))
  return load_pipeline(base_dir).params["unet"]


@pytest.mark.parametrize("alpha", [8.0, 6.0])  # scale 2 (exact), 1.5 (one rounding)
def test_round_trip(sd_base, tmp_path, alpha):
  modules = lora.select_targets(sd_base, TARGETS + (r"proj_in$",))
  factors = random_factors(sd_base, TARGETS + (r"proj_in$",), 0.3)
  path = lora_io.save_lora(str(tmp_path / "lora"), factors, sd_base, rank=RANK, alpha=alpha,
                           targets=TARGETS)
  back = lora_io.read_lora_file(path, sd_base, modules, RANK, alpha / RANK)
  assert jax.tree.structure(back) == jax.tree.structure(factors)
  check = (np.testing.assert_array_equal if alpha == 8.0 else
           lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=0))
  jax.tree.map(check, back, factors)
  # The same file read for another scale: B absorbs the ratio (the layer is the same).
  other = lora_io.read_lora_file(path, sd_base, modules, RANK, 0.5)
  np.testing.assert_allclose(other["mid_block"]["attentions_0"]["transformer_blocks_0"]["attn1"]
                             ["to_q"]["b"] * 0.5,
                             factors["mid_block"]["attentions_0"]["transformer_blocks_0"]["attn1"]
                             ["to_q"]["b"] * alpha / RANK, rtol=1e-6)


def test_file_alpha_and_peft_naming(sd_base, tmp_path):
  """A file with lora_alpha ≠ r in its header (unfolded factors), and PEFT's own naming
  (`base_model.model.*`, alpha in adapter_config.json), read as the same layer."""
  modules = lora.select_targets(sd_base, TARGETS)
  factors = random_factors(sd_base, TARGETS, 0.3)
  sd = lora_io.lora_state_dict(factors, sd_base, 1.0)  # unfolded (scale 1)
  meta = {"unet.r": RANK, "unet.lora_alpha": 2 * RANK, "unet.target_modules": []}
  os.makedirs(tmp_path / "a")
  safetensors.numpy.save_file(sd, str(tmp_path / "a" / "x.safetensors"), metadata={
      "format": "pt", lora_io.METADATA_KEY: json.dumps(meta)})
  back = lora_io.read_lora_file(str(tmp_path / "a"), sd_base, modules, RANK, 2.0)
  jax.tree.map(np.testing.assert_array_equal, back, factors)  # file scale 2 == ours

  os.makedirs(tmp_path / "peft")
  safetensors.numpy.save_file({"base_model.model." + k[len("unet."):]: v for k, v in sd.items()},
                              str(tmp_path / "peft" / lora_io.PEFT_WEIGHT_NAME))
  with open(tmp_path / "peft" / lora_io.PEFT_CONFIG_NAME, "w") as f:
    json.dump({"r": RANK, "lora_alpha": RANK / 2}, f)
  back = lora_io.read_lora_file(str(tmp_path / "peft"), sd_base, modules, RANK, 0.5)
  jax.tree.map(np.testing.assert_array_equal, back, factors)


def test_bad_files_list_every_key(sd_base, tmp_path):
  modules = lora.select_targets(sd_base, TARGETS)
  factors = random_factors(sd_base, TARGETS, 0.3)
  sd = lora_io.lora_state_dict(factors, sd_base, 1.0)
  keys = sorted(sd)
  dropped, extra = keys[0], "unet.down_blocks.0.resnets.0.conv1.lora_A.weight"
  bad = {k: v for k, v in sd.items() if k != dropped}
  bad[extra] = np.zeros((RANK, 3), np.float32)
  bad["text_encoder.foo.lora_A.weight"] = np.zeros((RANK, 3), np.float32)
  file = str(tmp_path / "bad.safetensors")
  safetensors.numpy.save_file(bad, file)
  with pytest.raises(lora_io.LoraFileError) as e:
    lora_io.read_lora_file(file, sd_base, modules, RANK, 1.0)
  msg = str(e.value)
  assert file in msg and dropped in msg and extra in msg and "text_encoder.foo" in msg
  assert "1 missing keys" in msg and "2 extra keys" in msg, msg
  assert isinstance(e.value, ValueError)

  wrong = dict(sd)
  wrong[keys[1]] = np.zeros((RANK + 1,) + sd[keys[1]].shape[1:], np.float32)
  safetensors.numpy.save_file(wrong, file)
  with pytest.raises(lora_io.LoraFileError, match=rf"wrong shape.*{keys[1]} \(5, ") as e:
    lora_io.read_lora_file(file, sd_base, modules, RANK, 1.0)
  assert file in str(e.value)
  # A file of another rank: every factor named (rank 2 config, rank 4 file).
  safetensors.numpy.save_file(sd, file)
  with pytest.raises(lora_io.LoraFileError, match=rf"{len(sd)} LoRA factors of the wrong shape"):
    lora_io.read_lora_file(file, sd_base, modules, 2, 1.0)
  with pytest.raises(FileNotFoundError):
    lora_io.read_lora_file(str(tmp_path / "none"), sd_base, modules, RANK, 1.0)


def test_init_path_starts_the_policy_from_a_file(tiny_sd, prompt_assets, tmp_path):
  from ddpo_jax.pipelines import sd as sd_family
  config = load_config("sd_compressibility", **sd_overrides(tiny_sd, prompt_assets))
  base = load_pipeline(tiny_sd).params["unet"]
  lc = config.model.lora
  factors = random_factors(base, tuple(lc.targets), 0.3, rank=lc.rank)
  path = lora_io.save_lora(str(tmp_path / "init"), factors, base, rank=lc.rank, alpha=lc.alpha,
                           targets=tuple(lc.targets))
  config.model.lora.init_path = path
  policy = sd_family.make_policy(config)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-6),
               policy.params["unet"], factors)
  config.model.lora.rank = lc.rank + 1
  with pytest.raises(lora_io.LoraFileError, match="wrong shape"):
    sd_family.make_policy(config)


@needs_peft
@pytest.mark.slow  # one epoch of a LoRA run (~40 s on a CPU), then the export subprocess
def test_lora_run_export_loads_in_diffusers(tiny_sd, prompt_assets, compile_cache, tmp_path):
  from diffusers import StableDiffusionPipeline
  from ddpo_jax.algorithms import train
  from ddpo_jax.trainer import loop, runs
  tm = _tiny_models()
  workdir, out = str(tmp_path / "run"), str(tmp_path / "lora")
  config = load_config("sd_compressibility", **sd_overrides(tiny_sd, prompt_assets, num_epochs=1))
  loop.train_and_evaluate(config, workdir)
  result = subprocess.run([sys.executable, "-m", "ddpo_jax.export", f"--workdir={workdir}",
                           f"--out={out}"], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=subprocess_env(compile_cache))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "diffusers LoRA" in result.stdout
  assert sorted(os.listdir(out)) == sorted([lora_io.LORA_WEIGHT_NAME, lora_io.LORA_INFO_NAME,
                                           "ddpo_jax_pipeline.json"])
  info = json.load(open(os.path.join(out, lora_io.LORA_INFO_NAME)))
  assert info["step"] == 1 and info["base_model"] == tiny_sd and info["rank"] == config.model.lora.rank

  _, policy, trained, _ = runs.restore_run(workdir)
  adapted = policy.assemble_denoiser(trained, train.frozen_params(policy, config))
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, *policy.denoiser.latent_shape)).astype(np.float32)
  t = np.array([999, 1], np.int32)
  ctx = policy.encode_prompts(policy.params, jnp.asarray(policy.tokenize(["a cat", "a dog"])))
  ours = np.asarray(jax.jit(policy.denoiser)(adapted, jnp.asarray(x), jnp.asarray(t), ctx))
  pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
  pipe.load_lora_weights(out)
  with torch.no_grad():
    theirs = pipe.unet(tm.to_nchw(x), torch.from_numpy(t).long(),
                       encoder_hidden_states=torch.from_numpy(np.asarray(ctx))).sample
  err = float(np.abs(tm.to_nhwc(theirs) - ours).max())
  print(f"exported run: max abs difference {err:.3g}")
  assert err <= TOL

  # The export starts a run again (model.lora.init_path): the trained factors.
  config.model.lora.init_path = out
  from ddpo_jax.pipelines import sd as sd_family
  started = sd_family.make_policy(config).params["unet"]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6,
                                                       atol=1e-7), started, trained)
  # --merged keeps the full merged pipeline.
  merged = str(tmp_path / "merged")
  result = subprocess.run([sys.executable, "-m", "ddpo_jax.export", f"--workdir={workdir}",
                           f"--out={merged}", "--merged"], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=subprocess_env(compile_cache))
  assert result.returncode == 0, result.stderr[-3000:]
  assert os.path.isfile(os.path.join(merged, "model_index.json"))
