"""Loading / saving diffusers-format SD pipelines (tiny random pipeline written by diffusers)."""
import contextlib
import dataclasses
import functools
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
from ddpo_jax.models import pipeline as P  # noqa: E402
from ddpo_jax.models import pipeline_io  # noqa: E402
from ddpo_jax.models.weights import WeightLoadingError  # noqa: E402

TOL = 1e-4
FAST_COMPILE = {"xla_backend_optimization_level": 0}  # tests only: halves CPU compile times
SD15_COUNTS = {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  return tm.save_tiny_pipeline(str(tmp_path_factory.mktemp("pipes") / "tiny-sd"))


@pytest.fixture(scope="module")
def torch_pipe(tiny_dir):
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny_dir)
  for m in (pipe.unet, pipe.vae, pipe.text_encoder):
    m.eval()
  return pipe


@pytest.fixture(scope="module")
def pipe(tiny_dir):
  return P.load_pipeline(tiny_dir)


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  latents = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  images = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  return latents, images, np.array([10, 901])


def _errors(pipe, params, tp, prompts=("a cat", "the dog the dog")):
  """Max abs errors of the JAX bundle `pipe` with `params` vs the torch pipeline `tp`."""
  latents, images, t = _inputs()
  ids = pipe.tokenize(list(prompts))
  ref_ids = tp.tokenizer(list(prompts), padding="max_length",
                         max_length=tp.tokenizer.model_max_length, truncation=True,
                         return_tensors="np").input_ids
  np.testing.assert_array_equal(ids, ref_ids)
  jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  context, pooled = jit(pipe.encode_prompt)(params, ids)
  eps = jit(pipe.unet_apply)(params["unet"], latents, t, context)
  decoded = jit(pipe.vae_decode)(params["vae"], latents)
  encoded = jit(pipe.vae_encode)(params["vae"], images)
  scale = tp.vae.config.scaling_factor
  with torch.no_grad():
    ref_context, ref_pooled = tp.text_encoder(torch.from_numpy(ids.astype(np.int64)))[:2]
    ref_eps = tp.unet(tm.to_nchw(latents), torch.from_numpy(t), ref_context).sample
    ref_decoded = tp.vae.decode(tm.to_nchw(latents) / scale).sample
    ref_encoded = tp.vae.encode(tm.to_nchw(images)).latent_dist.mean * scale
  return {
      "text": float(np.abs(np.asarray(context) - ref_context.numpy()).max()),
      "pooled": float(np.abs(np.asarray(pooled) - ref_pooled.numpy()).max()),
      "unet": float(np.abs(np.asarray(eps) - tm.to_nhwc(ref_eps)).max()),
      "vae_decode": float(np.abs(np.asarray(decoded) - tm.to_nhwc(ref_decoded)).max()),
      "vae_encode": float(np.abs(np.asarray(encoded) - tm.to_nhwc(ref_encoded)).max()),
  }


# ------------------------------------------------------------------------------------------------
def test_load_parity(pipe, torch_pipe):
  assert pipe.tokenizer is not None and pipe.max_length == tm.TINY_MAX_LENGTH
  assert pipe.scheduler_config["_class_name"] == "DDIMScheduler"
  assert pipe.scheduler_config["steps_offset"] == 1
  assert pipe.vae_config.scaling_factor == pytest.approx(0.18215)
  errs = _errors(pipe, pipe.params, torch_pipe)
  print("load_pipeline vs diffusers:", {k: f"{v:.3g}" for k, v in errs.items()})
  assert max(errs.values()) <= TOL, errs


def test_save_round_trip(pipe, tmp_path):
  out = str(tmp_path / "saved")
  P.save_pipeline(pipe, out)
  # Replacing an existing pipeline works too; components that are not saved (an SD 1.5 safety
  # checker listed in the model_index.json it was loaded from) are written as null.
  index = {**pipe.model_index, "requires_safety_checker": True,
           "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"]}
  with pytest.raises(FileExistsError, match="pass overwrite=True"):
    P.save_pipeline(pipe, out)  # an exported pipeline is replaced only when asked
  P.save_pipeline(dataclasses.replace(pipe, model_index=index), out, overwrite=True)
  with open(os.path.join(out, "model_index.json")) as f:
    saved_index = json.load(f)
  assert saved_index["safety_checker"] == [None, None]
  assert saved_index["unet"] == ["diffusers", "UNet2DConditionModel"]
  assert sorted(os.listdir(tmp_path)) == ["saved"]  # no temporary directories left
  assert os.path.isfile(os.path.join(out, "unet", "diffusion_pytorch_model.safetensors"))
  assert os.path.isfile(os.path.join(out, "text_encoder", "model.safetensors"))
  reloaded_torch = diffusers.StableDiffusionPipeline.from_pretrained(out)
  assert type(reloaded_torch.scheduler).__name__ == "DDIMScheduler"
  errs = _errors(pipe, pipe.params, reloaded_torch)
  print("save_pipeline -> diffusers:", {k: f"{v:.3g}" for k, v in errs.items()})
  assert max(errs.values()) <= TOL, errs
  reloaded = P.load_pipeline(out)
  leaves = jax.tree_util.tree_leaves
  for a, b in zip(leaves(pipe.params), leaves(reloaded.params)):
    np.testing.assert_array_equal(a, b)
  assert reloaded.unet_config == pipe.unet_config and reloaded.vae_config == pipe.vae_config
  assert reloaded.text_config == pipe.text_config


def test_a_damaged_export_is_refused_naming_the_file(pipe, tmp_path):
  """One flipped bit in an exported weight file (which safetensors would load silently: the
  value changes, the header stays valid) or a deleted file: load_pipeline names them."""
  out = P.save_pipeline(pipe, str(tmp_path / "saved"))
  with open(os.path.join(out, pipeline_io.WRITTEN_BY)) as f:
    listed = json.load(f)["sha256"]
  assert "unet/diffusion_pytorch_model.safetensors" in listed and "model_index.json" in listed
  weights = os.path.join(out, "unet", "diffusion_pytorch_model.safetensors")
  data = bytearray(open(weights, "rb").read())
  data[-5] ^= 0x40  # in the last tensor's data (the header is at the start)
  open(weights, "wb").write(bytes(data))
  from safetensors.numpy import load_file
  load_file(weights)  # still a readable file: only the checksum tells
  with pytest.raises(WeightLoadingError,
                     match=r"unet/diffusion_pytorch_model.safetensors \(SHA-256 differs"):
    P.load_pipeline(out)
  data[-5] ^= 0x40
  open(weights, "wb").write(bytes(data))
  P.load_pipeline(out)  # restored: loads again
  os.remove(os.path.join(out, "vae", "config.json"))
  with pytest.raises(WeightLoadingError, match=r"vae/config.json \(missing\)"):
    P.load_pipeline(out)


def test_save_never_replaces_what_it_did_not_write(pipe, tmp_path):
  """A regular file, or a directory with other contents, is left as it was, even with
  overwrite=True; an empty directory is written into."""
  a_file = tmp_path / "notes.txt"
  a_file.write_text("mine")
  busy = tmp_path / "busy"
  (busy / "sub").mkdir(parents=True)
  (busy / "results.csv").write_text("1,2")
  for target, message in ((a_file, "is not a directory"), (busy, "did not write as a pipeline")):
    for overwrite in (False, True):
      with pytest.raises(FileExistsError, match=message):
        P.save_pipeline(pipe, target, overwrite=overwrite)
  assert a_file.read_text() == "mine" and (busy / "results.csv").read_text() == "1,2"
  assert sorted(os.listdir(busy)) == ["results.csv", "sub"]
  assert sorted(os.listdir(tmp_path)) == ["busy", "notes.txt"]  # no temporary directory left
  empty = tmp_path / "empty"
  empty.mkdir()
  P.save_pipeline(pipe, empty)
  assert "model_index.json" in os.listdir(empty)


def test_overwrite_replaces_only_what_the_export_wrote(pipe, tmp_path):
  """overwrite=True (export --overwrite) replaces an earlier export only while it holds just
  the files listed in its ddpo_jax_pipeline.json, unchanged: a file the user put into it, a
  directory of theirs, an exported file they edited, or an export from before the list
  existed are refused, naming them, and left as they were."""
  out = P.save_pipeline(pipe, str(tmp_path / "saved"))
  notes = os.path.join(out, "notes.txt")
  with open(notes, "w") as f:
    f.write("mine")
  os.makedirs(os.path.join(out, "unet", "my_eval"))
  with open(os.path.join(out, "unet", "my_eval", "scores.csv"), "w") as f:
    f.write("1,2")
  with pytest.raises(FileExistsError, match="not replaced, even with overwrite") as info:
    P.save_pipeline(pipe, out, overwrite=True)
  message = str(info.value)
  assert "notes.txt (not written by the export)" in message, message
  assert os.path.join("unet", "my_eval") + os.sep + " (a directory" in message, message
  assert "\n" not in message and "move them out" in message
  with open(notes) as f:
    assert f.read() == "mine"
  assert os.path.isfile(os.path.join(out, "unet", "my_eval", "scores.csv"))
  assert sorted(os.listdir(tmp_path)) == ["saved"]  # no temporary directory left

  # Once they are moved out, the unchanged export is replaced.
  os.remove(notes)
  shutil.rmtree(os.path.join(out, "unet", "my_eval"))
  P.save_pipeline(pipe, out, overwrite=True)
  assert sorted(os.listdir(tmp_path)) == ["saved"]
  P.load_pipeline(out)
  with open(os.path.join(out, pipeline_io.WRITTEN_BY)) as f:
    manifest = json.load(f)  # every file's size beside its SHA-256
  assert manifest["bytes"]["model_index.json"] == os.path.getsize(
      os.path.join(out, "model_index.json"))

  # An exported file the user edited is theirs now.
  scheduler = os.path.join(out, "scheduler", "scheduler_config.json")
  with open(scheduler, "a") as f:
    f.write(" ")
  with pytest.raises(FileExistsError,
                     match=r"scheduler_config.json \(changed since the export\)"):
    P.save_pipeline(pipe, out, overwrite=True)
  with open(scheduler) as f:
    assert f.read().endswith("\n ")

  # An export from before exports listed their files: nothing tells its files from the user's.
  with open(os.path.join(out, pipeline_io.WRITTEN_BY), "w") as f:
    json.dump({"written_by": "ddpo_jax.models.pipeline.save_pipeline"}, f)
  with pytest.raises(FileExistsError, match="lists no files.*delete the directory yourself"):
    P.save_pipeline(pipe, out, overwrite=True)
  assert os.path.isfile(scheduler) and sorted(os.listdir(tmp_path)) == ["saved"]


def test_overwrite_refuses_a_file_added_just_before_the_replacement(tmp_path, monkeypatch):
  """A file written into the old export after the last check, before it is moved aside, is
  seen in the moved-aside copy: the old directory is put back with it."""
  def fill(tmp):
    with open(os.path.join(tmp, "model_index.json"), "w") as f:
      f.write("{}")

  out = pipeline_io.save_directory(tmp_path / "saved", False, fill, "test")
  real_check, calls = pipeline_io.check_output_dir, []

  def check_then_write(path, overwrite):
    real_check(path, overwrite)
    calls.append(path)
    if len(calls) == 2:  # the check after filling: the user's file lands right after it
      with open(os.path.join(path, "late.txt"), "w") as f:
        f.write("mine")

  monkeypatch.setattr(pipeline_io, "check_output_dir", check_then_write)
  with pytest.raises(FileExistsError, match=r"saved holds 1 entry .*late.txt"):
    pipeline_io.save_directory(out, True, fill, "test")
  assert sorted(os.listdir(out)) == sorted(["late.txt", "model_index.json",
                                            pipeline_io.WRITTEN_BY])
  assert sorted(os.listdir(tmp_path)) == ["saved"]


def test_init_pipeline_save_and_diffusers_load(pipe, tmp_path):
  new = P.init_pipeline(pipe.unet_config, pipe.vae_config, pipe.text_config,
                        jax.random.PRNGKey(3), tokenizer=pipe.tokenizer)
  assert (jax.tree_util.tree_map(lambda a: a.shape, new.params)
          == jax.tree_util.tree_map(lambda a: a.shape, pipe.params))
  out = P.save_pipeline(new, tmp_path / "random")
  errs = _errors(new, new.params, diffusers.StableDiffusionPipeline.from_pretrained(out))
  assert max(errs.values()) <= TOL, errs


class _CompileCounter:
  """Counts XLA backend compilations while active."""

  def __init__(self):
    self.count, self.active = 0, False

  def __call__(self, event, duration, **kwargs):
    if self.active and event == "/jax/core/compile/backend_compile_duration":
      self.count += 1

  @contextlib.contextmanager
  def watch(self):
    jax.monitoring.register_event_duration_secs_listener(self)
    self.active = True
    try:
      yield self
    finally:
      self.active = False
      jax.monitoring.unregister_event_duration_listener(self)


def _copy(src, dst):
  shutil.copytree(src, dst)
  return str(dst)


def test_errors_are_clear_and_raised_before_compilation(tiny_dir, tmp_path, monkeypatch):
  counter = _CompileCounter()
  with counter.watch():
    with pytest.raises(P.PipelineLoadError, match="no such directory"):
      P.load_pipeline(str(tmp_path / "does-not-exist"))
    with pytest.raises(P.PipelineLoadError, match="not a directory"):
      P.load_pipeline(os.path.join(tiny_dir, "model_index.json"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(P.PipelineLoadError, match=r"not a diffusers pipeline \(no model_index"):
      P.load_pipeline(str(tmp_path / "empty"))

    # A missing component directory, and a component absent from model_index.json.
    no_vae = _copy(tiny_dir, tmp_path / "no_vae")
    shutil.rmtree(os.path.join(no_vae, "vae"))
    with pytest.raises(P.PipelineLoadError, match="component 'vae' is missing"):
      P.load_pipeline(no_vae)
    no_text = _copy(tiny_dir, tmp_path / "no_text")
    index_path = os.path.join(no_text, "model_index.json")
    with open(index_path) as f:
      index = json.load(f)
    index["text_encoder"] = [None, None]
    with open(index_path, "w") as f:
      json.dump(index, f)
    with pytest.raises(P.PipelineLoadError, match="component 'text_encoder' is missing"):
      P.load_pipeline(no_text)

    # No safetensors weights.
    no_weights = _copy(tiny_dir, tmp_path / "no_weights")
    os.remove(os.path.join(no_weights, "unet", "diffusion_pytorch_model.safetensors"))
    with pytest.raises(P.PipelineLoadError, match="'unet': no diffusion_pytorch_model.safetensors"):
      P.load_pipeline(no_weights)

    # Unknown block type in unet/config.json.
    bad_block = _copy(tiny_dir, tmp_path / "bad_block")
    config_path = os.path.join(bad_block, "unet", "config.json")
    with open(config_path) as f:
      config = json.load(f)
    config["down_block_types"][1] = "FancyDownBlock2D"
    with open(config_path, "w") as f:
      json.dump(config, f)
    with pytest.raises(P.PipelineLoadError,
                       match=r"unet/config.json: .*down_block_types\[1\]='FancyDownBlock2D'"):
      P.load_pipeline(bad_block)

    # One tensor with the wrong shape in the UNet safetensors file.
    from safetensors.numpy import load_file, save_file
    bad_shape = _copy(tiny_dir, tmp_path / "bad_shape")
    weights_path = os.path.join(bad_shape, "unet", "diffusion_pytorch_model.safetensors")
    state = load_file(weights_path)
    key = "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    state[key] = np.zeros((state[key].shape[0], state[key].shape[1] + 1), np.float32)
    save_file(state, weights_path, metadata={"format": "pt"})
    with pytest.raises(WeightLoadingError) as info:
      P.load_pipeline(bad_shape)
    assert weights_path in str(info.value) and key in str(info.value)

    # A Hub id while offline (snapshot_download fails).
    import huggingface_hub

    def offline(*args, **kwargs):
      raise OSError("we are offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(P.PipelineLoadError, match="could not be downloaded.*we are offline"):
      P.load_pipeline("some-org/some-model")
  assert counter.count == 0, f"{counter.count} XLA compilations while failing to load"
  with counter.watch():  # the counter does see compilations
    jax.jit(lambda x: x * 3 + 1)(np.float32(2.0))
  assert counter.count > 0


@pytest.mark.slow  # 13 s in CI; float32 parity stays fast
def test_remat_compute_dtype_and_bf16_params(tiny_dir, pipe):
  latents, _, t = _inputs()
  context = np.random.default_rng(0).standard_normal((2, 16, 32)).astype(np.float32)
  fwd = lambda p: jax.jit(p.unet_apply, compiler_options=FAST_COMPILE)(
      p.params["unet"], latents, t, context)
  ref = fwd(pipe)
  remat = P.load_pipeline(tiny_dir, remat=True)
  np.testing.assert_array_equal(fwd(remat), ref)

  mixed = P.load_pipeline(tiny_dir, compute_dtype=jnp.bfloat16)
  assert mixed.params["unet"]["conv_in"]["kernel"].dtype == jnp.float32
  out = fwd(mixed)
  assert out.dtype == jnp.float32 and np.isfinite(np.asarray(out)).all()
  rel = float(np.abs(np.asarray(out) - np.asarray(ref)).max() / np.abs(np.asarray(ref)).max())
  assert rel < 0.1, rel
  # bf16 parameters (bf16 params + bf16 compute also runs in test_unet.py).
  low = P.load_pipeline(tiny_dir, dtype=jnp.bfloat16)
  assert all(a.dtype == jnp.bfloat16 for a in jax.tree_util.tree_leaves(low.params))
  assert low.unet.dtype == jnp.bfloat16 and low.vae.dtype == jnp.bfloat16


def test_sd15_param_counts_match_torch():
  import transformers
  unet_config, vae_config, text_config = P.sd15_configs()
  abstract = P.abstract_pipeline_params(unet_config, vae_config, text_config)
  ours = {k: int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(v)))
          for k, v in abstract.items()}
  with torch.device("meta"):
    ref_models = {
        "unet": diffusers.UNet2DConditionModel.from_config(P.SD15_UNET_CONFIG),
        "vae": diffusers.AutoencoderKL.from_config(P.SD15_VAE_CONFIG),
        "text_encoder": transformers.CLIPTextModel(
            transformers.CLIPTextConfig(**P.SD15_TEXT_CONFIG)),
    }
  ref = {k: sum(p.numel() for p in m.parameters()) for k, m in ref_models.items()}
  print("SD-1.5 parameter counts:", ours)
  assert ours == ref == SD15_COUNTS
