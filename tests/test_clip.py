"""Parity of the Flax CLIP towers with transformers (PyTorch, test-only oracle), CPU, fp32."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from ddpo_jax.models import clip
from ddpo_jax.models.weights import WeightLoadingError

ATOL = 1e-4  # max abs error, fp32
VOCAB, EOS, BOS = 99, 95, 96  # random tokens are < 90; VOCAB - 1 = 98 is a larger id

torch.manual_seed(0)


def _text_torch_config(hidden_act="quick_gelu", eos_token_id=EOS, num_hidden_layers=2):
  return transformers.CLIPTextConfig(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=37, projection_dim=16,
      num_hidden_layers=num_hidden_layers, num_attention_heads=4, max_position_embeddings=16,
      hidden_act=hidden_act, bos_token_id=BOS, eos_token_id=eos_token_id, pad_token_id=1)


def _vision_torch_config(projection_dim=12):
  return transformers.CLIPVisionConfig(
      image_size=32, patch_size=8, hidden_size=32, intermediate_size=37,
      projection_dim=projection_dim, num_hidden_layers=2, num_attention_heads=4,
      hidden_act="quick_gelu")


def _token_ids(eos_token_id, batch=3, length=16, seed=0):
  """BOS, random tokens, EOS, then EOS padding (SD tokenizer style: pad == eos)."""
  rng = np.random.RandomState(seed)
  ids = rng.randint(2, 90, (batch, length))
  ids[:, 0] = BOS
  for b, end in enumerate(rng.randint(2, length, batch)):
    ids[b, end:] = eos_token_id
  return ids


def _max_err(a, b):
  return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


def _randomize_(model):
  """LayerNorm weights are 1/0 at init: make every parameter random so the test can fail."""
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn_like(p) * 0.2)
  return model


# ------------------------------------------------------------------------------------------
# Text encoder
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hidden_act,eos_token_id", [("quick_gelu", 2), ("quick_gelu", EOS),
                                                     ("gelu", EOS)])
def test_text_parity(tmp_path, hidden_act, eos_token_id):
  tconfig = _text_torch_config(hidden_act, eos_token_id)
  tmodel = _randomize_(transformers.CLIPTextModel(tconfig)).eval()
  tmodel.save_pretrained(tmp_path)
  if eos_token_id == 2:  # legacy: the EOS token has the highest id (argmax pooling)
    ids = _token_ids(VOCAB - 1)
  else:
    ids = _token_ids(EOS)
    ids[:, 1] = VOCAB - 1  # a larger id before EOS: argmax pooling would pick it
  with torch.no_grad():
    out = tmodel(torch.tensor(ids))

  with open(tmp_path / "config.json") as f:
    config = clip.CLIPTextConfig.from_dict(json.load(f))
  assert config.hidden_act == hidden_act and config.eos_token_id == eos_token_id
  params = clip.clip_text_from_torch(load_file(tmp_path / "model.safetensors"), config,
                                     source=str(tmp_path))
  hidden, pooled = jax.jit(clip.CLIPTextModel(config).apply)({"params": params}, ids)
  assert hidden.shape == (3, 16, 32) and pooled.shape == (3, 32)
  err_h = _max_err(hidden, out.last_hidden_state)
  err_p = _max_err(pooled, out.pooler_output)
  print(f"text {hidden_act} eos={eos_token_id}: last_hidden_state {err_h:.2e} pooled {err_p:.2e}")
  assert err_h <= ATOL and err_p <= ATOL

  # The directory loader gives the same parameters.
  config2, params2 = clip.load_clip_text(tmp_path)
  assert config2 == config
  jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)


def test_text_hub_layout_and_position_ids():
  """v4 / Hub checkpoints: `text_model.` prefix and a persistent `position_ids` buffer."""
  tconfig = _text_torch_config()
  tmodel = _randomize_(transformers.CLIPTextModel(tconfig)).eval()
  config = clip.CLIPTextConfig.from_dict(tconfig.to_dict())
  sd = {k: v.numpy() for k, v in tmodel.state_dict().items()}
  hub = {"text_model." + k: v for k, v in sd.items()}
  hub["text_model.embeddings.position_ids"] = np.arange(16, dtype=np.int64)[None]
  a = clip.clip_text_from_torch(sd, config)
  b = clip.clip_text_from_torch(hub, config)
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
  exported = clip.clip_text_to_torch(a, config, prefix="text_model.", include_position_ids=True)
  assert set(exported) == set(hub)
  assert "text_model.encoder.layers.0.self_attn.q_proj.weight" in exported


def test_text_truncated_layers_is_penultimate(tmp_path):
  """SD 2.x: the layer choice is `num_hidden_layers` (diffusers ships 23 of OpenCLIP's 24)."""
  tmodel = _randomize_(transformers.CLIPTextModel(
      _text_torch_config("gelu", num_hidden_layers=4))).eval()
  ids = _token_ids(EOS)
  with torch.no_grad():
    out = tmodel(torch.tensor(ids), output_hidden_states=True)
    penultimate = tmodel.final_layer_norm(out.hidden_states[-2])
  sd = {k: v.numpy() for k, v in tmodel.state_dict().items()}
  config = clip.CLIPTextConfig.from_dict(_text_torch_config("gelu", num_hidden_layers=3).to_dict())
  with pytest.raises(WeightLoadingError, match=r"encoder\.layers\.3\."):
    clip.clip_text_from_torch(sd, config, source="four-layer.safetensors")
  sd = {k: v for k, v in sd.items() if not k.startswith("encoder.layers.3.")}
  params = clip.clip_text_from_torch(sd, config)
  hidden, _ = clip.CLIPTextModel(config).apply({"params": params}, ids)
  assert _max_err(hidden, penultimate) <= ATOL


def test_text_round_trip(tmp_path):
  config = clip.CLIPTextConfig.from_dict(_text_torch_config("gelu").to_dict())
  params = clip.init_clip_text_params(config, jax.random.PRNGKey(1))
  ids = _token_ids(EOS)
  hidden, pooled = clip.CLIPTextModel(config).apply({"params": params}, ids)

  state_dict = clip.clip_text_to_torch(params, config)
  tmodel = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config.to_dict())).eval()
  tmodel.load_state_dict({k: torch.tensor(v) for k, v in state_dict.items()}, strict=True)
  with torch.no_grad():
    out = tmodel(torch.tensor(ids))
  assert _max_err(hidden, out.last_hidden_state) <= ATOL
  assert _max_err(pooled, out.pooler_output) <= ATOL

  # config.json + safetensors written by us load with from_pretrained, in both key layouts.
  for prefix in ("", "text_model."):
    d = tmp_path / f"export{prefix or '_v5'}"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config.to_dict()))
    save_file(clip.clip_text_to_torch(params, config, prefix=prefix), d / "model.safetensors")
    loaded = transformers.CLIPTextModel.from_pretrained(d).eval()
    assert loaded.config.hidden_act == "gelu" and loaded.config.num_hidden_layers == 2
    with torch.no_grad():
      assert _max_err(hidden, loaded(torch.tensor(ids)).last_hidden_state) <= ATOL


def test_text_with_projection(tmp_path):
  """`CLIPTextModelWithProjection` (SDXL's text_encoder_2): text_embeds, every hidden state,
  the checkpoint layout both ways, and a directory transformers loads."""
  tconfig = _text_torch_config("gelu", eos_token_id=2, num_hidden_layers=3)
  tmodel = _randomize_(transformers.CLIPTextModelWithProjection(tconfig)).eval()
  tmodel.save_pretrained(tmp_path / "hub")
  ids = _token_ids(VOCAB - 1)
  with torch.no_grad():
    out = tmodel(torch.tensor(ids), output_hidden_states=True)

  config, params = clip.load_clip_text(tmp_path / "hub")
  assert config.with_projection and config.projection_dim == 16
  hidden, text_embeds, states = jax.jit(
      lambda p, i: clip.CLIPTextModel(config).apply({"params": p}, i, output_hidden_states=True))(
          params, ids)
  assert text_embeds.shape == (3, 16) and len(states) == len(out.hidden_states) == 4
  errs = [_max_err(hidden, out.last_hidden_state), _max_err(text_embeds, out.text_embeds)]
  errs += [_max_err(a, b) for a, b in zip(states, out.hidden_states)]
  print(f"text with projection: max abs errors {['%.2e' % e for e in errs]}")
  assert max(errs) <= ATOL
  # Without output_hidden_states: the same two outputs.
  two = clip.CLIPTextModel(config).apply({"params": params}, ids)
  assert len(two) == 2 and _max_err(two[1], text_embeds) <= 1e-6

  back = clip.clip_text_to_torch(params, config)
  assert set(back) == set(tmodel.state_dict())  # text_model.* and text_projection.weight
  fresh = transformers.CLIPTextModelWithProjection(tconfig).eval()
  fresh.load_state_dict({k: torch.tensor(v) for k, v in back.items()}, strict=True)
  d = tmp_path / "ours"
  d.mkdir()
  (d / "config.json").write_text(json.dumps(config.to_dict()))
  save_file(back, d / "model.safetensors")
  loaded = transformers.CLIPTextModelWithProjection.from_pretrained(d).eval()
  with torch.no_grad():
    assert _max_err(text_embeds, loaded(torch.tensor(ids)).text_embeds) <= ATOL
  assert clip.CLIPTextConfig.from_dict(json.loads((d / "config.json").read_text())) == config


def test_text_bf16_smoke():
  config = clip.CLIPTextConfig.from_dict(_text_torch_config().to_dict())
  params = clip.init_clip_text_params(config, jax.random.PRNGKey(0))
  ids = _token_ids(EOS)
  ref, _ = clip.CLIPTextModel(config).apply({"params": params}, ids)
  p16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
  out, pooled = clip.CLIPTextModel(config, dtype=jnp.bfloat16).apply({"params": p16}, ids)
  assert out.dtype == jnp.bfloat16 and pooled.dtype == jnp.bfloat16
  assert _max_err(out, ref) < 0.1


# ------------------------------------------------------------------------------------------
# Vision tower
# ------------------------------------------------------------------------------------------


def _pixels(seed=0, batch=2):
  return np.random.RandomState(seed).randn(batch, 32, 32, 3).astype(np.float32)  # NHWC


def test_vision_parity(tmp_path):
  tmodel = _randomize_(transformers.CLIPVisionModelWithProjection(_vision_torch_config())).eval()
  tmodel.save_pretrained(tmp_path)
  x = _pixels()
  with torch.no_grad():
    out = tmodel(torch.from_numpy(x.transpose(0, 3, 1, 2)))
    pooled_ref = tmodel.vision_model(torch.from_numpy(x.transpose(0, 3, 1, 2))).pooler_output

  vision = clip.load_clip_vision(tmp_path)
  assert vision.config.projection_dim == 12 and vision.config.num_positions == 17
  embeds = jax.jit(vision.apply)(vision.params, x)
  assert embeds.shape == (2, 12)
  err = _max_err(embeds, out.image_embeds)
  last, pooled, embeds2 = vision.encode(vision.params, x)
  errs = (_max_err(last, out.last_hidden_state), _max_err(pooled, pooled_ref))
  print(f"vision: image_embeds {err:.2e} last_hidden_state {errs[0]:.2e} pooled {errs[1]:.2e}")
  assert err <= ATOL and max(errs) <= ATOL
  np.testing.assert_allclose(embeds2, embeds, atol=1e-6)  # eager vs jit


def test_clip_model_directory(tmp_path):
  """A full CLIPModel (e.g. openai/clip-vit-large-patch14): top-level projection_dim, text keys."""
  tconfig = transformers.CLIPConfig(text_config=_text_torch_config().to_dict(),
                                    vision_config=_vision_torch_config(projection_dim=7).to_dict(),
                                    projection_dim=10)
  tmodel = _randomize_(transformers.CLIPModel(tconfig)).eval()
  tmodel.save_pretrained(tmp_path)
  x = _pixels(1)
  ids = _token_ids(EOS)
  with torch.no_grad():
    pooled = tmodel.vision_model(torch.from_numpy(x.transpose(0, 3, 1, 2))).pooler_output
    ref = tmodel.visual_projection(pooled)
    text_ref = tmodel.text_model(torch.tensor(ids)).last_hidden_state

  vision = clip.load_clip_vision(tmp_path)
  assert vision.config.projection_dim == 10  # CLIPModel.visual_projection uses the top level
  err = _max_err(vision.apply(vision.params, x), ref)
  print(f"CLIPModel dir: image_embeds {err:.2e}")
  assert err <= ATOL

  config, params = clip.load_clip_text(tmp_path)
  hidden, _ = clip.CLIPTextModel(config).apply({"params": params}, ids)
  assert _max_err(hidden, text_ref) <= ATOL


def test_vision_round_trip():
  config = clip.CLIPVisionConfig.from_dict(_vision_torch_config().to_dict())
  params = clip.init_clip_vision_params(config, jax.random.PRNGKey(2))
  x = _pixels(2)
  embeds = clip.CLIPVisionModelWithProjection(config).apply({"params": params}, x)
  state_dict = clip.clip_vision_to_torch(params, config)
  assert "visual_projection.weight" in state_dict
  assert "vision_model.embeddings.class_embedding" in state_dict
  assert "vision_model.pre_layrnorm.weight" in state_dict
  tmodel = transformers.CLIPVisionModelWithProjection(
      transformers.CLIPVisionConfig(**config.to_dict())).eval()
  tmodel.load_state_dict({k: torch.tensor(v) for k, v in state_dict.items()}, strict=True)
  with torch.no_grad():
    out = tmodel(torch.from_numpy(x.transpose(0, 3, 1, 2)))
  assert _max_err(embeds, out.image_embeds) <= ATOL


# ------------------------------------------------------------------------------------------
# Parameter counts of the real architectures (shapes only)
# ------------------------------------------------------------------------------------------


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def _torch_count(cls, config):
  with torch.device("meta"):
    return sum(p.numel() for p in cls(config).parameters())


SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                 num_hidden_layers=12, projection_dim=768)


@pytest.mark.parametrize("overrides", [SD15_TEXT, {}], ids=["sd15_vitl14", "defaults_vitb32"])
def test_text_param_count(overrides):
  tconfig = transformers.CLIPTextConfig(**overrides)
  config = clip.CLIPTextConfig.from_dict(tconfig.to_dict())
  abstract = jax.eval_shape(lambda: clip.init_clip_text_params(config, jax.random.PRNGKey(0)))
  n = _count(abstract)
  assert n == _torch_count(transformers.CLIPTextModel, tconfig)
  if overrides:
    assert n == 123_060_480


def test_text_with_projection_param_count_clip_g():
  """SDXL's text_encoder_2 (OpenCLIP ViT-bigG/14 text tower with projection)."""
  tconfig = transformers.CLIPTextConfig(
      hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
      projection_dim=1280, hidden_act="gelu", bos_token_id=0, eos_token_id=2)
  d = tconfig.to_dict()
  d["architectures"] = ["CLIPTextModelWithProjection"]
  config = clip.CLIPTextConfig.from_dict(d)
  abstract = jax.eval_shape(lambda: clip.init_clip_text_params(config, jax.random.PRNGKey(0)))
  n = _count(abstract)
  assert n == _torch_count(transformers.CLIPTextModelWithProjection, tconfig) == 694_659_840


def test_vision_param_count_vitl14():
  tconfig = transformers.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096,
                                          num_hidden_layers=24, num_attention_heads=16,
                                          patch_size=14, image_size=224, projection_dim=768)
  config = clip.CLIPVisionConfig.from_dict(tconfig.to_dict())
  abstract = jax.eval_shape(lambda: clip.init_clip_vision_params(config, jax.random.PRNGKey(0)))
  n = _count(abstract)
  assert n == _torch_count(transformers.CLIPVisionModelWithProjection, tconfig)
  assert n == 303_179_776 + 1024 * 768  # ViT-L/14 image tower + visual_projection


# ------------------------------------------------------------------------------------------
# Bad inputs
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vision_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("vision")
  transformers.CLIPVisionModelWithProjection(_vision_torch_config()).save_pretrained(d)
  return d


def _copy_with(src, dst, config=None, state_dict=None):
  dst.mkdir()
  (dst / "config.json").write_text(config if config is not None
                                   else (src / "config.json").read_text())
  save_file(state_dict if state_dict is not None else load_file(src / "model.safetensors"),
            dst / "model.safetensors")
  return dst


def test_missing_config(tmp_path, vision_dir):
  (tmp_path / "model.safetensors").write_bytes((vision_dir / "model.safetensors").read_bytes())
  with pytest.raises(FileNotFoundError, match=r"config\.json"):
    clip.load_clip_vision(tmp_path)
  with pytest.raises(FileNotFoundError, match="not a directory"):
    clip.load_clip_vision(tmp_path / "nope")


def test_missing_safetensors(tmp_path, vision_dir):
  (tmp_path / "config.json").write_text((vision_dir / "config.json").read_text())
  (tmp_path / "pytorch_model.bin").write_bytes(b"")
  with pytest.raises(FileNotFoundError, match=r"model\.safetensors.*pytorch_model\.bin"):
    clip.load_clip_vision(tmp_path)


def test_unexpected_and_missing_key(tmp_path, vision_dir):
  sd = load_file(vision_dir / "model.safetensors")
  extra = _copy_with(vision_dir, tmp_path / "extra", state_dict={**sd, "vision_model.foo": sd[
      "visual_projection.weight"]})
  with pytest.raises(WeightLoadingError, match=r"extra/model\.safetensors.*vision_model\.foo"):
    clip.load_clip_vision(extra)
  del sd["visual_projection.weight"]  # e.g. a CLIPVisionModel without projection
  missing = _copy_with(vision_dir, tmp_path / "missing", state_dict=sd)
  with pytest.raises(WeightLoadingError, match=r"missing/model\.safetensors.*visual_projection"):
    clip.load_clip_vision(missing)


def test_shape_mismatch(tmp_path, vision_dir):
  config = json.loads((vision_dir / "config.json").read_text())
  config["projection_dim"] = 5
  d = _copy_with(vision_dir, tmp_path / "shape", config=json.dumps(config))
  with pytest.raises(WeightLoadingError,
                     match=r"shape/model\.safetensors: shape mismatch.*visual_projection\.weight"):
    clip.load_clip_vision(d)


def test_bad_configs(monkeypatch):
  with pytest.raises(ValueError, match="hidden_act 'relu'"):
    clip.CLIPTextConfig.from_dict({"hidden_act": "relu"})
  with pytest.raises(ValueError, match="hidden_act 'swish'"):
    clip.CLIPVisionConfig.from_dict({"hidden_act": "swish"})
  with pytest.raises(ValueError, match="model_type"):
    clip.CLIPVisionConfig.from_dict({"model_type": "clip_text_model"})
  # bookkeeping keys are ignored
  c = clip.CLIPTextConfig.from_dict({"architectures": ["CLIPTextModel"], "torch_dtype": "float16",
                                     "dropout": 0.0, "transformers_version": "4.25.0",
                                     "hidden_act": "gelu", "num_hidden_layers": 23})
  assert c.num_hidden_layers == 23 and c.hidden_act == "gelu"

  def offline(*args, **kwargs):
    raise ConnectionError("offline")

  import huggingface_hub
  monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
  with pytest.raises(OSError, match="could not be downloaded.*offline"):
    clip.load_clip_vision("openai/clip-vit-large-patch14")


# ------------------------------------------------------------------------------------------
# Preprocessing vs transformers' CLIPImageProcessor (PIL backend)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(256, 320), (300, 200), (180, 200), (224, 300), (224, 224)])
def test_preprocess_matches_image_processor(shape):
  """Measured (uniform-noise uint8 images, normalised units): max 0.0163 / mean 0.0046 without
  rounding (PIL rounds to uint8 after each pass: <= ~1.1 grey levels), max 0.0150 (2 grey
  levels on ~0.1% of pixels, rounding ties) / mean < 2e-5 with `round_like_pil=True`."""
  processor = transformers.CLIPImageProcessorPil()
  images = np.random.RandomState(sum(shape)).randint(0, 256, (2, *shape, 3)).astype(np.uint8)
  ref = processor(images=list(images), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
  out = jax.jit(clip.clip_preprocess)(images)
  assert out.shape == (2, 224, 224, 3) and out.dtype == jnp.float32
  err = np.abs(np.asarray(out) - ref)
  rounded = np.abs(np.asarray(clip.clip_preprocess(images, round_like_pil=True)) - ref)
  print(f"preprocess {shape}: max {err.max():.4f} mean {err.mean():.5f}; "
        f"rounded max {rounded.max():.4f} mean {rounded.mean():.6f}")
  one_level = 1 / 255 / min(clip.CLIP_STD)  # one grey level in normalised units (0.0146)
  assert err.max() <= 1.2 * one_level and err.mean() <= 0.4 * one_level
  assert rounded.max() <= 2.05 * one_level and rounded.mean() <= 0.01 * one_level


def test_preprocess_size_from_config_and_grad():
  vision_config = clip.CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32,
                                        intermediate_size=37, num_hidden_layers=1,
                                        num_attention_heads=4, projection_dim=12)
  params = clip.init_clip_vision_params(vision_config, jax.random.PRNGKey(0))
  vision = clip.ClipVision(vision_config, params)
  images = np.random.RandomState(0).randint(0, 256, (2, 40, 50, 3)).astype(np.uint8)
  assert vision.preprocess(images).shape == (2, 32, 32, 3)
  assert vision.embed(images).shape == (2, 12)
  grad = jax.grad(lambda im: vision.apply(params, clip.clip_preprocess(im, 32)).sum())(
      jnp.asarray(images, jnp.float32))
  assert grad.shape == images.shape and float(jnp.abs(grad).sum()) > 0
