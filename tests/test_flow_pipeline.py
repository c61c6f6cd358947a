"""SD3 / SD3.5 and FLUX.1 pipelines in diffusers format (`flow_pipeline.FlowPipeline`, tiny
random `StableDiffusion3Pipeline` / `FluxPipeline` built here and written by diffusers):
prompt encoding against the diffusers pipelines' `encode_prompt`, the 16-channel VAE with its
shift factor, the pipeline-level denoiser (FLUX's packing, ids and t / 1000), saving back into
diffusers, sharded and fp16 / bf16 variant checkpoints, placement onto a device mesh, and the
errors of bad pipeline directories."""
import copy
import dataclasses
import functools
import inspect
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import tiny_models as tm  # noqa: E402
from helpers import edit_json  # noqa: E402
from ddpo_jax.models import flow_pipeline as FP  # noqa: E402
from ddpo_jax.models import pipeline as P  # noqa: E402
from ddpo_jax.models.weights import WeightLoadingError  # noqa: E402

TOL = 1e-4  # max abs error, float32
FAST_COMPILE = {"xla_backend_optimization_level": 0}  # tests only: halves CPU compile times
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The second is longer than the CLIP tokenizers' 16 tokens (truncated, as diffusers does) and
# holds characters outside the T5 words (spelled with the letter pieces).
PROMPTS = ("a cat", "the red dog on the blue photo of a digit 7 cat dog, zebra")
# name -> (tiny_models builder, its options, diffusers pipeline class name)
BUILDS = {
    "sd3": (tm.make_torch_sd3_pipeline, {}, "StableDiffusion3Pipeline"),
    "sd3_no_t5": (tm.make_torch_sd3_pipeline, {"with_t5": False}, "StableDiffusion3Pipeline"),
    "flux_dev": (tm.make_torch_flux_pipeline, {}, "FluxPipeline"),
    "flux_schnell": (tm.make_torch_flux_pipeline, {"guidance_embeds": False}, "FluxPipeline"),
}
# diffusers' from_pretrained refuses a directory whose model_index.json lists null components
# unless they are passed explicitly.
FROM_PRETRAINED = {"sd3_no_t5": {"text_encoder_3": None, "tokenizer_3": None}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """{name: (pipeline directory, the torch pipeline diffusers wrote it from)}, built once."""
  root = tmp_path_factory.mktemp("flow_pipes")
  out = {}
  for name, (make, options, _) in BUILDS.items():
    directory = str(root / name)
    torch_pipe = make(str(root / f"{name}.src"), **options)
    torch_pipe.save_pretrained(directory, safe_serialization=True)
    out[name] = (directory, torch_pipe)
  return out


@pytest.fixture(scope="module")
def load(tiny):
  """name -> `load_pipeline` of that directory (float32), loaded once."""
  return functools.lru_cache(maxsize=None)(lambda name: P.load_pipeline(tiny[name][0]))


def _jit(fn):
  return jax.jit(fn, compiler_options=FAST_COMPILE)


def _err(a, b) -> float:
  return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


def _assert_same_params(a: dict, b: dict, expect=lambda x: x):
  """Every leaf of `b` equals `expect` of the same leaf of `a`, exactly (same tree)."""
  flat_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
  flat_b, tree_b = jax.tree_util.tree_flatten_with_path(b)
  assert tree_a == tree_b
  for (path, x), (_, y) in zip(flat_a, flat_b):
    assert y.dtype == x.dtype, jax.tree_util.keystr(path)
    np.testing.assert_array_equal(np.asarray(y), expect(np.asarray(x)),
                                  err_msg=jax.tree_util.keystr(path))


def _check_ids(pipe, torch_pipe, prompts):
  """`tokenize`'s segments are the diffusers pipeline's tokenizers' ids (what its
  `encode_prompt` feeds each encoder)."""
  ids = pipe.tokenize(list(prompts))
  tokenizers = {"text_encoder": torch_pipe.tokenizer, "text_encoder_2": torch_pipe.tokenizer_2,
                "text_encoder_3": getattr(torch_pipe, "tokenizer_3", None)}
  for component, (start, stop) in pipe.token_segments.items():
    ref = tokenizers[component](list(prompts), padding="max_length", max_length=stop - start,
                                truncation=True, return_tensors="np").input_ids
    np.testing.assert_array_equal(ids[:, start:stop], ref, err_msg=component)
  return ids


# ------------------------------------------------------------------------------------------------
# 1-2. Prompt encoding.
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sd3", "sd3_no_t5"])
def test_sd3_encode_and_uncond_match_diffusers(tiny, load, name):
  """context (B, 16 + 256, 64) and pooled (B, 16 + 12) of `encode`, and `uncond`, against
  `StableDiffusion3Pipeline.encode_prompt` of the prompts / of "" (its default negative prompt):
  max abs error <= 1e-4 (the T5 weights: `tiny_models.make_torch_t5`)."""
  pipe, torch_pipe = load(name), tiny[name][1]
  with_t5 = name == "sd3"
  assert pipe.is_sd3 and pipe.prediction_type == "flow" and pipe.denoiser == "transformer"
  assert ("text_encoder_3" in pipe.params) == with_t5 and pipe.max_sequence_length == 256
  ids = _check_ids(pipe, torch_pipe, PROMPTS)
  cond = _jit(pipe.encode)(pipe.params, ids)
  uncond = _jit(pipe.uncond)(pipe.params)
  with torch.no_grad():
    ref, _, ref_pooled, _ = torch_pipe.encode_prompt(
        prompt=list(PROMPTS), prompt_2=None, prompt_3=None, do_classifier_free_guidance=False,
        max_sequence_length=pipe.max_sequence_length)
    ref_uncond, _, ref_uncond_pooled, _ = torch_pipe.encode_prompt(
        prompt=[""], prompt_2=None, prompt_3=None, do_classifier_free_guidance=False,
        max_sequence_length=pipe.max_sequence_length)
  assert cond["context"].shape == ref.shape == (2, tm.TINY_MAX_LENGTH + 256, 64)
  assert cond["pooled"].shape == ref_pooled.shape == (2, 16 + 12)
  assert uncond["context"].shape == (1, tm.TINY_MAX_LENGTH + 256, 64)
  assert cond["context"].dtype == jnp.float32
  if not with_t5:  # the T5 tokens are zeros
    assert not np.asarray(cond["context"][:, tm.TINY_MAX_LENGTH:]).any()
  errs = {"context": _err(cond["context"], ref.numpy()),
          "pooled": _err(cond["pooled"], ref_pooled.numpy()),
          "uncond_context": _err(uncond["context"], ref_uncond.numpy()),
          "uncond_pooled": _err(uncond["pooled"], ref_uncond_pooled.numpy())}
  print(f"{name} encode vs diffusers:", {k: f"{v:.3g}" for k, v in errs.items()})
  assert max(errs.values()) <= TOL, errs


@pytest.mark.parametrize("name,max_sequence_length", [("flux_dev", None), ("flux_schnell", 32)])
def test_flux_encode_matches_diffusers(tiny, load, name, max_sequence_length):
  """context = the T5 tokens (B, 512 or a shorter max_sequence_length, 24), pooled = CLIP's
  pooled output (B, 32), against `FluxPipeline.encode_prompt`: max abs error <= 1e-4 (see
  `tiny_models.make_torch_t5`)."""
  pipe, torch_pipe = load(name), tiny[name][1]
  if max_sequence_length is not None:  # the diffusers pipeline's max_sequence_length argument
    pipe = dataclasses.replace(pipe, max_sequence_length=max_sequence_length)
  length = pipe.max_sequence_length
  assert length == (max_sequence_length or 512)
  assert pipe.guidance_embedded == (name == "flux_dev")
  ids = _check_ids(pipe, torch_pipe, PROMPTS)
  cond = _jit(pipe.encode)(pipe.params, ids)
  with torch.no_grad():
    ref, ref_pooled, text_ids = torch_pipe.encode_prompt(prompt=list(PROMPTS), prompt_2=None,
                                                         max_sequence_length=length)
  assert cond["context"].shape == ref.shape == (2, length, 24)
  assert cond["pooled"].shape == ref_pooled.shape == (2, 32)
  assert not text_ids.numpy().any()  # the zero text ids `denoise` passes
  errs = {"context": _err(cond["context"], ref.numpy()),
          "pooled": _err(cond["pooled"], ref_pooled.numpy())}
  print(f"{name} encode vs diffusers:", {k: f"{v:.3g}" for k, v in errs.items()})
  assert max(errs.values()) <= TOL, errs


# ------------------------------------------------------------------------------------------------
# 3. VAE.
# ------------------------------------------------------------------------------------------------
def test_vae_with_shift_factor_matches_diffusers(tiny, load):
  """vae_encode (NHWC) = (posterior mean - shift_factor) * scaling_factor of diffusers'
  AutoencoderKL (NCHW), vae_decode(z) = decode(z / scaling_factor + shift_factor): max abs error
  <= 1e-4 (measured ~1e-6). The FLUX pipelines' VAE has the same config."""
  pipe, vae = load("sd3"), tiny["sd3"][1].vae
  scale, shift = vae.config.scaling_factor, vae.config.shift_factor
  assert (pipe.vae_config.scaling_factor, pipe.vae_config.shift_factor) == (scale, shift)
  assert shift != 0 and pipe.vae_config.latent_channels == 16
  assert load("flux_dev").vae_config == pipe.vae_config
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  latents = rng.standard_normal((2, 8, 8, 16)).astype(np.float32)
  assert pipe.latent_shape(16) == latents.shape[1:] and pipe.vae_scale_factor == 2
  encoded = _jit(pipe.vae_encode)(pipe.params["vae"], images)
  decoded = _jit(pipe.vae_decode)(pipe.params["vae"], latents)
  with torch.no_grad():
    ref_encoded = (vae.encode(tm.to_nchw(images)).latent_dist.mean - shift) * scale
    ref_decoded = vae.decode(tm.to_nchw(latents) / scale + shift).sample
  assert encoded.shape == (2, 8, 8, 16) and decoded.shape == images.shape
  errs = {"vae_encode": _err(encoded, tm.to_nhwc(ref_encoded)),
          "vae_decode": _err(decoded, tm.to_nhwc(ref_decoded))}
  print("VAE vs diffusers:", {k: f"{v:.3g}" for k, v in errs.items()})
  assert max(errs.values()) <= TOL, errs


# ------------------------------------------------------------------------------------------------
# 4. The denoiser.
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sd3", "flux_dev", "flux_schnell"])
def test_denoise_matches_the_diffusers_transformer_call(tiny, load, name):
  """`denoise` on NHWC latents of a non-square 6 x 8 latent at t = 1000 sigma against the
  transformer call of the diffusers pipeline's denoising loop: SD3 on NCHW latents and t;
  FLUX on `_pack_latents` tokens with `_prepare_latent_image_ids`, zero text ids, t / 1000 and
  (dev) the guidance scale, unpacked with `_unpack_latents`. Conditioning from `encode`. Max
  abs error <= 1e-4. Passing guidance where the model takes none (and none where FLUX.1-dev
  needs it) is a ValueError."""
  pipe, torch_pipe = load(name), tiny[name][1]
  rng = np.random.default_rng(1)
  latents = rng.standard_normal((2, 6, 8, 16)).astype(np.float32)
  t = np.array([3.5, 917.0], np.float32)
  guidance = np.array([3.5, 5.0], np.float32) if pipe.guidance_embedded else None
  cond = _jit(pipe.encode)(pipe.params, pipe.tokenize(list(PROMPTS)))
  out = _jit(pipe.denoise)(pipe.params["transformer"], latents, t, cond, guidance)
  context = torch.from_numpy(np.array(cond["context"]))
  pooled = torch.from_numpy(np.array(cond["pooled"]))
  with torch.no_grad():
    if pipe.is_sd3:
      ref = torch_pipe.transformer(hidden_states=tm.to_nchw(latents), timestep=torch.from_numpy(t),
                                   encoder_hidden_states=context,
                                   pooled_projections=pooled).sample
    else:
      fp = diffusers.FluxPipeline
      tokens = fp._pack_latents(tm.to_nchw(latents), 2, 16, 6, 8)
      img_ids = fp._prepare_latent_image_ids(2, 3, 4, "cpu", torch.float32)
      txt_ids = torch.zeros(context.shape[1], 3)
      packed = torch_pipe.transformer(
          hidden_states=tokens, timestep=torch.from_numpy(t) / 1000,
          guidance=None if guidance is None else torch.from_numpy(guidance),
          pooled_projections=pooled, encoder_hidden_states=context, txt_ids=txt_ids,
          img_ids=img_ids).sample
      factor = torch_pipe.vae_scale_factor
      ref = fp._unpack_latents(packed, 6 * factor, 8 * factor, factor)
  assert out.shape == latents.shape and out.dtype == jnp.float32
  err = _err(out, tm.to_nhwc(ref))
  print(f"{name} denoise vs diffusers: max abs error {err:.3g} "
        f"(|v| max {np.abs(ref.numpy()).max():.3g})")
  assert err <= TOL
  with pytest.raises(ValueError, match="no embedded guidance" if pipe.is_sd3 else
                     "pass guidance" if pipe.guidance_embedded else "no guidance embedding"):
    pipe.denoise(pipe.params["transformer"], latents, t, cond,
                 None if pipe.guidance_embedded else 3.5)


# ------------------------------------------------------------------------------------------------
# 5. Saving back into diffusers.
# ------------------------------------------------------------------------------------------------
def _state_dicts(torch_pipe) -> dict:
  return {name: getattr(torch_pipe, name).state_dict()
          for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
          if getattr(torch_pipe, name, None) is not None}


@pytest.mark.parametrize("name", ["sd3", "sd3_no_t5", "flux_dev"])
def test_save_round_trip_into_diffusers(tiny, load, name, tmp_path):
  """save_pipeline -> the diffusers pipeline class's from_pretrained: every weight of every
  component equals the original torch pipeline's exactly (float32 written as float32), the
  tokenizers give the same ids, the scheduler config is kept; and load_pipeline of the saved
  directory gives the same params and configs."""
  pipe, (_, torch_pipe) = load(name), tiny[name]
  out = P.save_pipeline(pipe, str(tmp_path / "saved"))
  with open(os.path.join(out, "model_index.json")) as f:
    index = json.load(f)
  assert index["_class_name"] == BUILDS[name][2]
  assert index["transformer"] == ["diffusers", pipe.spec.transformer_class]
  if name == "sd3_no_t5":
    assert index["text_encoder_3"] == [None, None] and index["tokenizer_3"] == [None, None]
  reloaded_torch = getattr(diffusers, BUILDS[name][2]).from_pretrained(
      out, **FROM_PRETRAINED.get(name, {}))
  ref, got = _state_dicts(torch_pipe), _state_dicts(reloaded_torch)
  assert set(got) == set(ref) == set(pipe.params)
  for component, state in ref.items():
    assert set(got[component]) >= set(state), component
    for key, value in state.items():
      assert torch.equal(got[component][key], value), (component, key)
  _check_ids(pipe, reloaded_torch, PROMPTS)
  assert type(reloaded_torch.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
  for key in ("shift", "use_dynamic_shifting", "base_shift", "max_shift"):
    assert reloaded_torch.scheduler.config[key] == torch_pipe.scheduler.config[key], key

  reloaded = P.load_pipeline(out)
  assert isinstance(reloaded, FP.FlowPipeline) and reloaded.pipeline_class == pipe.pipeline_class
  assert reloaded.transformer_config == pipe.transformer_config
  assert reloaded.vae_config == pipe.vae_config and reloaded.text_configs == pipe.text_configs
  assert reloaded.schedule == pipe.schedule
  _assert_same_params(pipe.params, reloaded.params)


# ------------------------------------------------------------------------------------------------
# 6. Sharded and fp16 / bf16 variant checkpoints.
# ------------------------------------------------------------------------------------------------
def test_sharded_checkpoints(tiny, load, tmp_path):
  """The SD3 pipeline (every component kind) as diffusers writes it with
  `save_pretrained(max_shard_size="50KB")` (an index and shards per component) loads into the
  same float32 params, exactly."""
  pipe, torch_pipe = load("sd3"), tiny["sd3"][1]
  sharded = str(tmp_path / "sharded")
  torch_pipe.save_pretrained(sharded, max_shard_size="50KB")
  for component, base in FP.WEIGHT_BASENAMES.items():
    files = os.listdir(os.path.join(sharded, component))
    assert f"{base}.safetensors.index.json" in files and f"{base}.safetensors" not in files
    assert sum(f.endswith(".safetensors") for f in files) >= 2, (component, files)
  _assert_same_params(pipe.params, P.load_pipeline(sharded).params)


@pytest.mark.parametrize("name", ["flux_dev", "sd3"])
def test_fp16_and_bf16_variant_checkpoints(tiny, load, name, tmp_path):
  """The pipeline converted to float16 and saved sharded with variant="fp16" (diffusers'
  `*.safetensors.index.fp16.json` naming), and to bfloat16 with variant="bf16" (single files),
  loads into float32 params equal to the float32 original's rounded to that dtype, exactly; the
  bf16 one loaded with dtype=bfloat16 gives the original's params cast to bfloat16."""
  import ml_dtypes
  pipe, torch_pipe = load(name), tiny[name][1]
  base = "diffusion_pytorch_model"
  for variant, torch_dtype, dtype, shard in (("fp16", torch.float16, np.float16, "50KB"),
                                             ("bf16", torch.bfloat16, ml_dtypes.bfloat16, None)):
    directory = str(tmp_path / variant)
    copy.deepcopy(torch_pipe).to(torch_dtype).save_pretrained(directory, variant=variant,
                                                              max_shard_size=shard)
    files = set(os.listdir(os.path.join(directory, "transformer")))
    assert not files & {f"{base}.safetensors", f"{base}.safetensors.index.json"}, files
    assert (f"{base}.safetensors.index.fp16.json" if shard else f"{base}.bf16.safetensors") \
        in files, files
    loaded = P.load_pipeline(directory)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(loaded.params))
    _assert_same_params(pipe.params, loaded.params,
                        lambda x, dtype=dtype: x.astype(dtype).astype(x.dtype))
  low = P.load_pipeline(directory, dtype=jnp.bfloat16)
  _assert_same_params(jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), pipe.params),
                      low.params)


# ------------------------------------------------------------------------------------------------
# 7. Placement onto a device mesh.
# ------------------------------------------------------------------------------------------------
def _placement_check(path: str) -> str:
  """Loads `path` unplaced and onto a 2 x 2 mesh (the last axis of matrices over "fsdp",
  vectors replicated; the VAE on the default device) and checks every array's sharding and value.
  Self-contained (jax and ddpo_jax only): it also runs as a script in a subprocess."""
  import jax
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec
  from ddpo_jax.models import pipeline as P
  mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "fsdp"))

  def placement(component, path, shape):
    if component == "vae":
      return None
    if len(shape) >= 2 and shape[-1] % 2 == 0:  # kernels, embeddings
      return NamedSharding(mesh, PartitionSpec(*([None] * (len(shape) - 1)), "fsdp"))
    return NamedSharding(mesh, PartitionSpec())  # biases, norm scales

  plain = P.load_pipeline(path)
  placed = P.load_pipeline(path, placement=placement)
  assert set(placed.params) == set(plain.params)
  counts = {"sharded": 0, "replicated": 0, "default": 0}
  for component in plain.params:
    flat = jax.tree_util.tree_flatten_with_path(placed.params[component])[0]
    ref = jax.tree_util.tree_leaves(plain.params[component])
    assert len(flat) == len(ref)
    for (keys, x), y in zip(flat, ref):
      names = tuple(k.key for k in keys)
      want = placement(component, names, tuple(x.shape))
      if want is None:
        assert x.sharding == y.sharding, (component, names)
        counts["default"] += 1
      else:
        assert x.sharding == want, (component, names, x.sharding)
        counts["sharded" if want.spec else "replicated"] += 1
        if want.spec:
          assert x.addressable_shards[0].data.shape[-1] == x.shape[-1] // 2, (component, names)
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=f"{component} {names}")
  assert min(counts.values()) > 0, counts
  return f"{len(jax.devices())} devices, arrays {counts}"


def test_placement_onto_a_mesh(tiny):
  """load_pipeline(placement=...) puts every parameter where the placement says (a 2 x 2 mesh
  of CPU devices, component-dependent), with the same values as the unplaced load. With fewer
  than 4 devices in this process, in a subprocess with 4 forced host devices."""
  path = tiny["sd3"][0]
  if jax.device_count() >= 4:
    print("placement:", _placement_check(path))
    return
  script = (textwrap.dedent(inspect.getsource(_placement_check))
            + f"\nprint('placement:', _placement_check({path!r}))\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
      os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip())
  env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
  result = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert "4 devices" in result.stdout, result.stdout
  print(result.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------
# 8. Bad pipelines and inputs.
# ------------------------------------------------------------------------------------------------
class _CompileCounter:
  """Counts XLA backend compilations while registered."""

  def __init__(self):
    self.count = 0

  def __call__(self, event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      self.count += 1

  def __enter__(self):
    jax.monitoring.register_event_duration_secs_listener(self)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self)


def _copy(tiny, name, dst) -> str:
  shutil.copytree(tiny[name][0], dst)
  return str(dst)


def test_bad_pipelines_raise_clear_errors_before_compiling(tiny, tmp_path):
  """Each broken directory raises a PipelineLoadError / WeightLoadingError whose message names
  the file, component, key or value, and nothing is compiled on the way."""
  from safetensors.numpy import load_file, save_file
  cases = []  # (name, edit(directory), exception, regex)

  def model_index(**changes):
    return lambda d: edit_json(os.path.join(d, "model_index.json"), **changes)

  def config(component, file="config.json", **changes):
    return lambda d: edit_json(os.path.join(d, component, file), **changes)

  cases += [
      # The T5 encoder without its tokenizer: null in model_index.json, or no directory.
      ("sd3", model_index(tokenizer_3=[None, None]), P.PipelineLoadError,
       r"component 'text_encoder_3' \(T5EncoderModel\) has no tokenizer: 'tokenizer_3' is "
       r"missing from model_index.json"),
      ("flux_dev", lambda d: shutil.rmtree(os.path.join(d, "tokenizer")), P.PipelineLoadError,
       r"component 'text_encoder' \(CLIPTextModel\) has no tokenizer: 'tokenizer' is missing"),
      # Required components.
      ("flux_dev", model_index(text_encoder_2=[None, None]), P.PipelineLoadError,
       r"component 'text_encoder_2' is missing \(no entry in model_index.json\)"),
      ("sd3", lambda d: shutil.rmtree(os.path.join(d, "transformer")), P.PipelineLoadError,
       r"component 'transformer' is missing \(no directory .*transformer\)"),
      # Unsupported pipeline classes.
      ("sd3", model_index(_class_name="StableDiffusion3Img2ImgPipeline"), P.PipelineLoadError,
       r"model_index.json: _class_name='StableDiffusion3Img2ImgPipeline' is not a supported "
       r"pipeline class"),
      ("flux_dev", model_index(_class_name="FluxControlPipeline"), P.PipelineLoadError,
       r"_class_name='FluxControlPipeline' is not a supported pipeline class"),
      # Unsupported component classes: in model_index.json, and in a component's config.json.
      ("sd3", model_index(transformer=["diffusers", "FluxTransformer2DModel"]),
       P.PipelineLoadError, r"model_index.json: component 'transformer' has class "
       r"'FluxTransformer2DModel'; supported: SD3Transformer2DModel"),
      ("sd3", model_index(text_encoder_3=["transformers", "UMT5EncoderModel"]),
       P.PipelineLoadError, r"component 'text_encoder_3' has class 'UMT5EncoderModel'"),
      ("sd3", config("transformer", _class_name="FluxTransformer2DModel"), P.PipelineLoadError,
       r"transformer/config.json: MMDiT config: unsupported _class_name="
       r"'FluxTransformer2DModel'"),
      ("sd3", config("text_encoder", architectures=["CLIPTextModel"]), P.PipelineLoadError,
       r"text_encoder/config.json: expected a CLIPTextModelWithProjection"),
      # Configs that do not fit together.
      ("sd3", config("transformer", joint_attention_dim=32), P.PipelineLoadError,
       r"transformer/config.json: joint_attention_dim=32 does not match the T5 encoder's "
       r"d_model=64"),
      ("sd3_no_t5", config("transformer", joint_attention_dim=48), P.PipelineLoadError,
       r"transformer/config.json: joint_attention_dim=48 is narrower than the CLIP encoders' "
       r"hidden sizes 32 \+ 24"),
      ("sd3", config("transformer", pooled_projection_dim=30), P.PipelineLoadError,
       r"pooled_projection_dim=30 does not match the CLIP encoders' projection_dim 16 \+ 12"),
      ("flux_dev", config("transformer", joint_attention_dim=32), P.PipelineLoadError,
       r"transformer/config.json: joint_attention_dim=32 does not match the T5 encoder's "
       r"d_model=24"),
      ("flux_dev", config("transformer", in_channels=16), P.PipelineLoadError,
       r"in_channels=16 must be 4 x the VAE's latent_channels=16"),
      # Schedulers the flow samplers do not implement.
      ("sd3", config("scheduler", "scheduler_config.json", use_karras_sigmas=True),
       P.PipelineLoadError, r"scheduler/scheduler_config.json: flow schedule: unsupported "
       r"use_karras_sigmas=True"),
      ("flux_dev", config("scheduler", "scheduler_config.json", _class_name="DDIMScheduler"),
       P.PipelineLoadError, r"scheduler/scheduler_config.json: flow schedule: scheduler "
       r"_class_name='DDIMScheduler' is not 'FlowMatchEulerDiscreteScheduler'"),
  ]

  def edit_weights(component, file, key, change):
    def edit(d):
      path = os.path.join(d, component, file)
      state = load_file(path)
      change(state, key)
      save_file(state, path, metadata={"format": "pt"})
    return edit

  def drop(state, key):
    del state[key]

  def widen(state, key):
    state[key] = np.zeros(state[key].shape[:-1] + (state[key].shape[-1] + 1,), np.float32)

  sd3_key = "transformer_blocks.0.attn.to_q.weight"
  flux_key = "single_transformer_blocks.0.proj_out.weight"
  cases += [
      ("sd3", edit_weights("transformer", "diffusion_pytorch_model.safetensors", sd3_key, drop),
       WeightLoadingError, r"transformer/diffusion_pytorch_model.safetensors: state dict does "
       rf"not match the model: 1 missing keys \[{sd3_key}\], 0 unexpected keys"),
      ("sd3", edit_weights("transformer", "diffusion_pytorch_model.safetensors", sd3_key, widen),
       WeightLoadingError, r"transformer/diffusion_pytorch_model.safetensors: shape mismatch "
       rf"for 1 keys: {sd3_key}: checkpoint \(16, 17\)"),
      ("flux_dev", edit_weights("transformer", "diffusion_pytorch_model.safetensors", flux_key,
                                widen),
       WeightLoadingError, rf"transformer/diffusion_pytorch_model.safetensors: shape mismatch "
       rf"for 1 keys: {flux_key}"),
      ("sd3", edit_weights("text_encoder_3", "model.safetensors",
                           "encoder.block.1.layer.1.DenseReluDense.wo.weight", drop),
       WeightLoadingError, r"text_encoder_3/model.safetensors: state dict does not match the "
       r"model: 1 missing keys \[encoder.block.1.layer.1.DenseReluDense.wo.weight\]"),
  ]
  with _CompileCounter() as counter:
    for i, (name, edit, error, match) in enumerate(cases):
      directory = _copy(tiny, name, tmp_path / f"case{i}")
      edit(directory)
      with pytest.raises(error, match=match):
        P.load_pipeline(directory)
  assert counter.count == 0, f"{counter.count} XLA compilations while failing to load"
  with _CompileCounter() as counter:  # the counter does see compilations
    jax.jit(lambda x: x * 5 - 2)(np.float32(2.0))
  assert counter.count > 0


def test_bad_resolutions_and_ids(load):
  """latent_shape: a side that is not a positive multiple of VAE factor x patch (2 x 2 = 4
  pixels here), and (SD3) a patch grid beyond pos_embed_max_size=8 (32 pixels), are
  ValueErrors naming the limit; FLUX has no such bound. encode refuses ids of another shape."""
  sd3, flux = load("sd3"), load("flux_dev")
  assert sd3.latent_shape(32) == (16, 16, 16) and sd3.latent_shape(20) == (10, 10, 16)
  assert sd3.default_resolution == 16 and flux.default_resolution == 256
  for pipe in (sd3, flux):
    for resolution in (18, 0, -4):
      with pytest.raises(ValueError, match=rf"resolution={resolution} must be a positive "
                                           r"multiple of 4 \(the VAE downsamples by 2, the "
                                           r"transformer takes 2x2 latent patches\)"):
        pipe.latent_shape(resolution)
  with pytest.raises(ValueError, match=r"resolution=36: a 9-patch side exceeds the "
                                       r"transformer's pos_embed_max_size=8 \(at most 32 pixels\)"):
    sd3.latent_shape(36)
  assert flux.latent_shape(36) == (18, 18, 16)
  with pytest.raises(ValueError, match=r"encode: ids of shape \(2, 16\); expected \(B, 288\)"):
    sd3.encode(sd3.params, sd3.tokenize(list(PROMPTS))[:, :16])
