"""PickScore / CLIPScore device rewards: parity with transformers' CLIPModel (tiny random models,
PyTorch as the test-only oracle, CPU, fp32), the real ViT-H/14 and ViT-L/14 parameter counts, the
rewards under jit, and bad inputs."""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

import tiny_models as tm
from ddpo_jax.models import clip as clip_lib
from ddpo_jax.models.weights import WeightLoadingError
from ddpo_jax.rewards import Reward, make_rewards, to_uint8
from ddpo_jax.rewards import clip_score as C

ATOL = 1e-4  # max abs error of unit-norm embeddings and cosines, fp32
LOGIT_SCALE = float(np.log(100.0))  # PickScore_v1's exp(logit_scale) is about 100
PROMPTS = ["a cat", "the dog", "a photo of the cat and the dog on the mat", ""]
ONE_LEVEL = 1 / 255 / min(clip_lib.CLIP_STD)  # one grey level in normalised pixel units


def _max_err(a, b):
  return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def _unit(t):
  t = t.detach().numpy().astype(np.float64)
  return t / np.linalg.norm(t, axis=-1, keepdims=True)


def _torch_config(n_tokens, eos_token_id, hidden_act):
  text = dict(vocab_size=n_tokens, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=77, hidden_act=hidden_act,
              projection_dim=7, bos_token_id=n_tokens - 2, eos_token_id=eos_token_id,
              pad_token_id=1)
  vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37,
                num_hidden_layers=2, num_attention_heads=4, hidden_act=hidden_act,
                projection_dim=7)
  # The top-level projection_dim (16) sizes both projections; the towers' 7 must be ignored.
  return transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)


def _write_model(directory, *, legacy, seed):
  """A random transformers CLIPModel + tokenizer + image processor saved to `directory`.

  legacy=False: transformers v5 layout (tokenizer.json, processor_config.json), the config's
  eos_token_id is the tokenizer's EOS, gelu. legacy=True: the Hub layout of PickScore_v1 /
  openai CLIP (vocab.json + merges.txt, preprocessor_config.json) and the legacy
  eos_token_id 2 (pooling at the argmax id), quick_gelu.
  """
  tokenizer = tm.make_tiny_tokenizer(os.path.join(directory + ".src"), max_length=77)
  n = len(tokenizer)
  config = _torch_config(n, 2 if legacy else tokenizer.eos_token_id,
                         "quick_gelu" if legacy else "gelu")
  torch.manual_seed(seed)
  model = tm._randomize_(transformers.CLIPModel(config), seed)
  with torch.no_grad():
    model.logit_scale.fill_(LOGIT_SCALE)
  model.save_pretrained(directory)
  image_processor = transformers.CLIPImageProcessorPil(
      size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
  if legacy:
    tm.write_tiny_tokenizer_files(directory)
    image_processor.save_pretrained(directory)  # preprocessor_config.json
    assert os.path.isfile(os.path.join(directory, "preprocessor_config.json"))
  else:
    transformers.CLIPProcessor(image_processor=image_processor,
                               tokenizer=tokenizer).save_pretrained(directory)
  return model.eval(), image_processor, transformers.CLIPTokenizer.from_pretrained(directory)


@pytest.fixture(scope="module", params=["v5", "legacy"])
def tiny(request, tmp_path_factory):
  directory = str(tmp_path_factory.mktemp(f"clip_{request.param}") / "model")
  torch_model, processor, tokenizer = _write_model(directory, legacy=request.param == "legacy",
                                                   seed=3)
  return directory, torch_model, processor, tokenizer


def _images(seed=0, batch=4, shape=(40, 56)):
  return np.random.RandomState(seed).rand(batch, *shape, 3).astype(np.float32)


# ------------------------------------------------------------------------------------------
# Parity with transformers' CLIPModel
# ------------------------------------------------------------------------------------------


def test_load_and_parity(tiny):
  """Embeddings, cosines, PickScore and CLIPScore against `CLIPModel.get_image_features`,
  `get_text_features` and `logits_per_text` (its diagonal is PickScore).

  With the processor's pixels (the exact path) every unit-norm embedding and cosine is within
  1e-4 and PickScore within 1e-4 relative (1e-4 * exp(logit_scale) = 0.01 absolute at the
  scale 100). From [0, 1] images at 40 x 56 (quantised, resized and cropped to 32 on device),
  measured on these random towers: with the default PIL-like rounding (pixels equal to the
  processor's but for rounding ties) image embeddings within ~1.2e-4, cosines ~1e-4 and
  PickScore ~0.01 absolute (1e-4 relative); without rounding (`round_like_pil=False`, the
  differentiable resize, pixels <= ~1 grey level off) image embeddings ~2.2e-3, cosines
  ~1.6e-3. The test allows 5e-4 / 5e-2 absolute at the scale 100 and 1e-2 without rounding.
  """
  directory, tmodel, processor, tokenizer = tiny
  model = C.load_clip_model(directory)
  assert model.text_config.with_projection and model.text_config.projection_dim == 16
  assert model.vision_config.projection_dim == 16 and model.processing.size == 32
  assert abs(model.logit_scale - 100.0) < 1e-3
  images = _images()
  uint8 = to_uint8(images)

  ids = model.tokenize(PROMPTS)
  assert ids.shape == (4, 77) and ids.dtype == np.int32
  ref_text = tokenizer(PROMPTS, padding=True, return_tensors="pt")  # the references: longest
  np.testing.assert_array_equal(ids[:, :ref_text["input_ids"].shape[1]], ref_text["input_ids"])
  pixels = processor(images=list(uint8), return_tensors="np")["pixel_values"]
  with torch.no_grad():
    out = tmodel(input_ids=ref_text["input_ids"], attention_mask=ref_text["attention_mask"],
                 pixel_values=torch.from_numpy(pixels))
    img_ref = _unit(tmodel.get_image_features(pixel_values=torch.from_numpy(pixels)).pooler_output)
    txt_ref = _unit(tmodel.get_text_features(**ref_text).pooler_output)
  cos_ref = (img_ref * txt_ref).sum(-1)
  pick_ref = np.diag(out.logits_per_text.numpy())

  params = model.params
  txt = jax.jit(lambda p, i: C.text_embeds(model, p, i))(params, ids)
  # Exact path: the processor's pixels straight into the vision tower.
  img_exact = jax.jit(lambda p, x: C._l2_normalize(model.vision(p).apply(p["vision"], x)))(
      params, pixels.transpose(0, 2, 3, 1))
  cos_exact = np.asarray(jnp.sum(img_exact * txt, -1))
  errs = {"text_embeds": _max_err(txt, txt_ref), "image_embeds": _max_err(img_exact, img_ref),
          "cosine": _max_err(cos_exact, cos_ref)}
  pick = np.asarray(C.pickscore_from_cosine(params, cos_exact))
  errs["pickscore_rel"] = _max_err(pick, pick_ref) / model.logit_scale
  clip_s = C.clipscore_from_cosine(cos_exact)
  errs["clipscore"] = _max_err(clip_s, 2.5 * np.maximum(cos_ref, 0))
  errs["clipscore_tm"] = _max_err(C.clipscore_from_cosine(cos_exact, "torchmetrics"),
                                  100 * cos_ref) / 100
  print("exact path:", {k: f"{v:.1e}" for k, v in errs.items()})
  assert max(errs.values()) <= ATOL

  # From [0, 1] images: on-device quantisation, resize, crop, normalisation.
  @jax.jit
  def from_images(p, x, i):
    return (C.image_embeds(model, p, x), C.image_embeds(model, p, x, round_like_pil=False),
            C.pickscore(model, p, x, i), C.clipscore(model, p, x, i))

  img, img_nr, pick, clip_s = map(np.asarray, from_images(params, images, ids))
  cos = pick / model.logit_scale
  e, e_nr = _max_err(img, img_ref), _max_err(img_nr, img_ref)
  e_cos, e_pick = _max_err(cos, cos_ref), _max_err(pick, pick_ref)
  print(f"from [0,1] images: image_embeds {e:.1e} (without rounding {e_nr:.1e}), cosine "
        f"{e_cos:.1e}, pickscore {e_pick:.1e} abs at scale {model.logit_scale:.0f}")
  assert e <= 5e-4 and e_cos <= 5e-4 and e_pick <= 100 * 5e-4 and e_nr <= 1e-2
  np.testing.assert_allclose(clip_s, 2.5 * np.maximum(cos, 0), atol=1e-5)


def test_preprocessing_matches_processor_pixels(tiny):
  """The on-device pixels vs the PIL processor's, at sizes other than the model's 32 (larger,
  smaller, portrait): <= 1.2 grey levels without rounding, <= 2.05 with `round_like_pil`."""
  directory, _, processor, _ = tiny
  model = C.load_clip_model(directory)
  p = model.processing
  for shape in [(40, 56), (24, 30), (50, 33)]:
    uint8 = to_uint8(_images(1, 2, shape))
    ref = processor(images=list(uint8), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    ours = clip_lib.clip_preprocess(uint8.astype(np.float32), p.size, p.mean, p.std)
    rounded = clip_lib.clip_preprocess(uint8.astype(np.float32), p.size, p.mean, p.std,
                                       round_like_pil=True)
    e, e_r = _max_err(ours, ref), _max_err(rounded, ref)
    print(f"pixels {shape}: max {e / ONE_LEVEL:.2f} grey levels (round_like_pil "
          f"{e_r / ONE_LEVEL:.2f})")
    assert ours.shape == ref.shape == (2, 32, 32, 3)
    assert e <= 1.2 * ONE_LEVEL and e_r <= 2.05 * ONE_LEVEL


# ------------------------------------------------------------------------------------------
# The rewards
# ------------------------------------------------------------------------------------------


def test_rewards_under_jit(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("clip_reward") / "model")
  _write_model(directory, legacy=False, seed=4)
  pick = C.make_pickscore_reward(directory)
  clip_r = C.make_clipscore_reward(directory)
  clip_tm = C.make_clipscore_reward(directory, variant="torchmetrics", name="clipscore_100")
  assert isinstance(pick, Reward) and pick.on_device and pick.name == "pickscore"
  assert clip_r.name == "clipscore" and clip_tm.name == "clipscore_100"
  images = jnp.asarray(_images(2))
  policy_ids = jnp.zeros((4, 16), jnp.int32)  # the policy's tokenisation: ignored
  metadata = {**pick.fn.prompt_metadata(PROMPTS), "class_label": jnp.arange(4)}
  assert metadata["clip_ids"].shape == (4, 77) and metadata["clip_ids"].dtype == np.int32
  np.testing.assert_array_equal(pick.fn.tokenize(PROMPTS), C.tokenize(pick.fn.model, PROMPTS))

  # Every variant in one program (one compile); CLIPScore's fns share PickScore's params.
  model = pick.fn.model
  hessel, tm_fn = C.ClipRewardFn(model, "clipscore"), C.ClipRewardFn(model, "clipscore",
                                                                     variant="torchmetrics")
  assert clip_r.fn.kind == "clipscore" and clip_r.fn.variant == "hessel"
  assert clip_tm.fn.variant == "torchmetrics" and clip_r.fn.w == 2.5

  @jax.jit
  def run(params, images, policy_ids, metadata):
    shuffled = {"clip_ids": metadata["clip_ids"][::-1]}
    return (pick.fn(images, policy_ids, metadata), hessel(images, policy_ids, metadata),
            tm_fn(images, policy_ids, metadata),
            pick.fn.apply(params, images, policy_ids, metadata),  # params as an argument
            pick.fn(images, policy_ids, shuffled)[0])

  (scores, info), (s_clip, info_c), (s_tm, _), (scores_p, _), s_shuffled = run(
      model.params, images, policy_ids, metadata)
  assert scores.shape == (4,) and scores.dtype == jnp.float32 and set(info) == {"cosine"}
  cos = np.asarray(info["cosine"])
  assert np.all(np.abs(cos) <= 1 + 1e-6)
  # flow_grpo's pickscore_scorer: logit_scale.exp() * cos / 26
  np.testing.assert_allclose(scores, model.logit_scale * cos / 26, rtol=1e-5)
  np.testing.assert_allclose(scores_p, scores, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(info_c["cosine"], cos, atol=1e-6)
  np.testing.assert_allclose(s_clip, 2.5 * np.maximum(cos, 0), atol=1e-6)
  np.testing.assert_allclose(s_tm, 100 * cos, atol=1e-4)
  # Matching captions score differently from shuffled ones (the text is read).
  assert not np.allclose(s_shuffled, scores)
  # The Reward objects' own fns (their own loaded params) under jit: the same numbers.
  s2, _ = jax.jit(clip_tm.fn)(images, policy_ids, metadata)
  np.testing.assert_allclose(s2, s_tm, atol=1e-4)


def test_gradient_without_quantize(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("clip_grad") / "model")
  _write_model(directory, legacy=True, seed=6)
  model = C.load_clip_model(directory)
  images = jnp.asarray(_images(3, 2))
  metadata = C.ClipRewardFn(model).prompt_metadata(PROMPTS[:2])

  @jax.jit
  def grads(x):
    # quantize=False keeps gradients; quantize (the default) rounds to uint8 values: zero.
    return [jax.grad(lambda x: C.ClipRewardFn(model, "pickscore", quantize=q)(
        x, None, metadata)[0].sum())(x) for q in (False, True)]

  grad, grad_q = grads(images)
  assert grad.shape == images.shape and float(jnp.abs(grad).sum()) > 0
  assert float(jnp.abs(grad_q).sum()) == 0


# ------------------------------------------------------------------------------------------
# The real architectures: parameter counts (shapes only, no weights)
# ------------------------------------------------------------------------------------------

VIT_H14 = dict(  # yuvalkirstain/PickScore_v1 = laion/CLIP-ViT-H-14-laion2B-s32B-b79K
    text_config=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                     num_hidden_layers=24, hidden_act="gelu", projection_dim=1024),
    vision_config=dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=16,
                       num_hidden_layers=32, patch_size=14, image_size=224, hidden_act="gelu",
                       projection_dim=1024),
    projection_dim=1024)
VIT_L14 = dict(  # openai/clip-vit-large-patch14
    text_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                     num_hidden_layers=12, projection_dim=768),
    vision_config=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                       num_hidden_layers=24, patch_size=14, image_size=224, projection_dim=768),
    projection_dim=768)


@pytest.mark.parametrize("kwargs,expected", [(VIT_H14, 986_109_441), (VIT_L14, 427_616_513)],
                         ids=["vit_h14_pickscore", "vit_l14_openai"])
def test_param_count(kwargs, expected):
  """Equal to transformers' CLIPModel on the meta device; the totals are open_clip's / the
  model cards' (ViT-H/14 986.1M, ViT-L/14 427.6M, logit_scale included)."""
  tconfig = transformers.CLIPConfig(**kwargs)
  text, vision = C.clip_model_configs(tconfig.to_dict())
  abstract = jax.eval_shape(lambda: C.init_clip_model_params(text, vision, jax.random.PRNGKey(0)))
  n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(abstract))
  with torch.device("meta"):
    n_torch = sum(p.numel() for p in transformers.CLIPModel(tconfig).parameters())
  assert n == n_torch == expected


# ------------------------------------------------------------------------------------------
# Bad inputs
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("clip_bad") / "model")
  _write_model(directory, legacy=False, seed=5)
  return directory


def _copy(src, dst, state_dict=None, config=None, files=("tokenizer.json",
                                                          "tokenizer_config.json")):
  os.makedirs(dst)
  with open(os.path.join(dst, "config.json"), "w") as f:
    f.write(config if config is not None else open(os.path.join(src, "config.json")).read())
  save_file(state_dict if state_dict is not None
            else load_file(os.path.join(src, "model.safetensors")),
            os.path.join(dst, "model.safetensors"))
  for name in files:
    with open(os.path.join(src, name), "rb") as f_in, open(os.path.join(dst, name), "wb") as f:
      f.write(f_in.read())
  return dst


@pytest.mark.parametrize("key", ["vision_model.post_layernorm.weight", "text_projection.weight",
                                 "logit_scale", "text_model.encoder.layers.1.mlp.fc2.bias"])
def test_missing_key(tmp_path, model_dir, key):
  sd = load_file(os.path.join(model_dir, "model.safetensors"))
  del sd[key]
  d = _copy(model_dir, str(tmp_path / "missing"), state_dict=sd)
  with pytest.raises(WeightLoadingError, match=rf"missing/model\.safetensors.*{key}"):
    C.load_clip_model(d)


def test_unexpected_key_and_shape(tmp_path, model_dir):
  sd = load_file(os.path.join(model_dir, "model.safetensors"))
  d = _copy(model_dir, str(tmp_path / "extra"), state_dict={**sd, "foo.bar": sd["logit_scale"]})
  with pytest.raises(WeightLoadingError, match=r"extra/model\.safetensors: unexpected.*foo\.bar"):
    C.load_clip_model(d)
  d = _copy(model_dir, str(tmp_path / "extra2"),
            state_dict={**sd, "vision_model.foo": sd["logit_scale"]})
  with pytest.raises(WeightLoadingError, match=r"extra2/model\.safetensors.*vision_model\.foo"):
    C.load_clip_model(d)
  config = json.loads(open(os.path.join(model_dir, "config.json")).read())
  config["projection_dim"] = 5
  d = _copy(model_dir, str(tmp_path / "shape"), config=json.dumps(config))
  with pytest.raises(WeightLoadingError, match=r"shape/model\.safetensors.*projection\.weight"):
    C.load_clip_model(d)


def test_not_a_clip_model(tmp_path, model_dir):
  vision = tmp_path / "vision"
  transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
      image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
      num_attention_heads=4)).save_pretrained(vision)
  with pytest.raises(ValueError, match=r"vision/config\.json: not a transformers CLIPModel.*"
                                       r"clip_vision_model"):
    C.load_clip_model(vision)
  config = json.loads(open(os.path.join(model_dir, "config.json")).read())
  del config["text_config"]
  d = _copy(model_dir, str(tmp_path / "no_text"), config=json.dumps(config))
  with pytest.raises(ValueError, match=r"no_text/config\.json: not a transformers CLIPModel.*"
                                       r"text_config"):
    C.load_clip_model(d)
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match=r"empty/config\.json"):
    C.load_clip_model(empty)
  with pytest.raises(FileNotFoundError, match="not a directory"):
    C.load_clip_model(tmp_path / "nope")


def test_metadata_without_clip_ids(model_dir):
  reward = C.make_pickscore_reward(model_dir)
  images = jnp.asarray(_images(4, 2))
  for metadata in ({"class_label": np.zeros(2)}, None):
    with pytest.raises(ValueError, match=r"pickscore: metadata has no 'clip_ids'.*tokenize"):
      reward.fn(images, None, metadata)
  with pytest.raises(ValueError, match=r"clip_ids'\] must be \(2, <= 77\)"):
    reward.fn(images, None, {"clip_ids": reward.fn.tokenize(PROMPTS)})  # 4 rows, 2 images
  with pytest.raises(ValueError, match="unknown variant"):
    C.make_clipscore_reward(model_dir, variant="bogus")


def test_tokenizer_elsewhere(tmp_path, model_dir):
  """A directory without tokenizer files (PickScore_v1's reference takes the processor from
  laion/CLIP-ViT-H-14-laion2B-s32B-b79K): tokenize says so; `tokenizer_path` supplies one."""
  d = _copy(model_dir, str(tmp_path / "no_tok"), files=())
  model = C.load_clip_model(d)
  with pytest.raises(ValueError, match="no tokenizer.*tokenizer_path"):
    model.tokenize(PROMPTS)
  model = C.load_clip_model(d, tokenizer_path=model_dir)
  np.testing.assert_array_equal(model.tokenize(PROMPTS), C.load_clip_model(model_dir).tokenize(
      PROMPTS))


def test_unsupported_image_processor(tmp_path, model_dir):
  """Preprocessing that `clip_preprocess` does not implement fails at load, naming the file."""
  base = json.loads(open(os.path.join(model_dir, "processor_config.json")).read())
  base = base["image_processor"]
  for i, (change, message) in enumerate([
      ({"resample": 2}, "resample 2"),
      ({"size": {"shortest_edge": 40}}, "resize to 40 and crop to 32"),
      ({"size": {"height": 32, "width": 32}}, "unsupported size"),
      ({"do_center_crop": False}, "do_center_crop=false")]):
    d = _copy(model_dir, str(tmp_path / f"proc{i}"))
    with open(os.path.join(d, "preprocessor_config.json"), "w") as f:
      json.dump({**base, **change}, f)
    with pytest.raises(ValueError, match=rf"proc{i}/preprocessor_config\.json: .*{message}"):
      C.load_clip_model(d)
  # No processor config at all: CLIP's defaults at the model's image size.
  model = C.load_clip_model(_copy(model_dir, str(tmp_path / "no_proc")))
  assert model.processing == C.ClipImageProcessing(32, clip_lib.CLIP_MEAN, clip_lib.CLIP_STD)


def test_make_rewards_builds_them_from_the_config(model_dir):
  """`rewards.make_rewards` builds "pickscore" / "clipscore" from `reward.pickscore_path` /
  `reward.clipscore_path`; each carries `prompt_metadata`, the hook through which the trainer's
  epoch loop adds the reward's own "clip_ids" to the sampled batch's metadata."""
  config = ml_collections.ConfigDict({"reward": {
      "weights": {"pickscore": 1.0}, "metrics": ("clipscore",), "pickscore_path": model_dir,
      "clipscore_path": model_dir, "clip_tokenizer_path": ""}})
  policy = type("P", (), {"rewards": {}})()
  terms = make_rewards(config, policy)
  assert [(w, r.name) for w, r in terms] == [(1.0, "pickscore"), (0.0, "clipscore")]
  for _, r in terms:
    assert r.on_device and r.prompt_metadata is not None
    ids = r.prompt_metadata(PROMPTS)["clip_ids"]
    np.testing.assert_array_equal(ids, r.fn.tokenize(PROMPTS))
