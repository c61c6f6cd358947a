"""LAION aesthetic reward: .pth readers (torch / NumPy-only), MLP parity with PyTorch, errors."""
import os
import pickle
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from conftest import LAION_MLP_PATH
from ddpo_jax.models import clip as clip_lib
from ddpo_jax.models.weights import WeightLoadingError
from ddpo_jax.rewards import aesthetic as A

ATOL = 1e-4


@pytest.fixture(params=["random", "laion"])
def mlp_path(request):
  """A random LAION-shaped state dict saved with torch.save (always), or the real LAION weights
  `sac+logos+ava1-l14-linearMSE.pth` from the shared assets (skipped if absent)."""
  if request.param == "laion":
    if not os.path.isfile(LAION_MLP_PATH):
      pytest.skip(f"the real LAION aesthetic MLP weights: {LAION_MLP_PATH} not present")
    return LAION_MLP_PATH
  return request.getfixturevalue("random_aesthetic_mlp")


class TorchMLP(torch.nn.Module):
  """The reference's `MLP` (ddpo_pytorch/aesthetic_scorer.py)."""

  def __init__(self):
    super().__init__()
    self.layers = torch.nn.Sequential(
        torch.nn.Linear(768, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
        torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
        torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))

  def forward(self, embed):
    return self.layers(embed)


def _random_state_dict(seed=0, in_dim=768):
  torch.manual_seed(seed)
  sd = TorchMLP().state_dict()
  if in_dim != 768:
    sd["layers.0.weight"] = torch.randn(1024, in_dim)
  return sd


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
  """A random transformers CLIP image tower with projection_dim 768, saved and loaded in Flax."""
  config = transformers.CLIPVisionConfig(
      image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, projection_dim=768,
      num_hidden_layers=2, num_attention_heads=4, hidden_act="quick_gelu")
  torch.manual_seed(0)
  tmodel = transformers.CLIPVisionModelWithProjection(config).eval()
  with torch.no_grad():
    for p in tmodel.parameters():
      p.copy_(torch.randn_like(p) * 0.2)
  path = tmp_path_factory.mktemp("tiny_clip")
  tmodel.save_pretrained(path)
  return tmodel, clip_lib.load_clip_vision(path)


def _images(seed=0, shape=(3, 40, 56, 3)):
  rng = np.random.RandomState(seed)
  img = rng.randint(0, 256, shape).astype(np.uint8)
  img[0] = np.linspace(0, 255, shape[2])[None, :, None].astype(np.uint8)  # one smooth image
  return img


# ------------------------------------------------------------------------------------------
# Reading the .pth
# ------------------------------------------------------------------------------------------


def test_pth_torch_and_numpy_readers_agree(mlp_path, monkeypatch):
  with_torch = A.read_torch_state_dict(mlp_path, use_torch=True)
  without = A.read_torch_state_dict_numpy(mlp_path)
  assert list(with_torch) == list(without) == [
      f"layers.{i}.{n}" for i in (0, 2, 4, 6, 7) for n in ("weight", "bias")]
  for k in with_torch:
    assert without[k].dtype == with_torch[k].dtype == np.float32
    np.testing.assert_array_equal(without[k], with_torch[k])
  # load_aesthetic_mlp falls back to the NumPy reader when torch cannot be imported.
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(ImportError):
    import torch as _  # noqa: F401
  mlp_np = A.load_aesthetic_mlp(mlp_path)
  monkeypatch.undo()
  mlp_t = A.load_aesthetic_mlp(mlp_path, use_torch=True)
  for a, b in zip(jax.tree_util.tree_leaves(mlp_np.params), jax.tree_util.tree_leaves(
      mlp_t.params)):
    np.testing.assert_array_equal(a, b)


def test_numpy_reader_dtypes_views_and_strides(tmp_path):
  """Non-contiguous, offset, shared-storage, half/bf16/double/int tensors, as torch.load."""
  base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
  sd = {
      "t": base.t(),  # strides (1, 10)
      "slice": base[2:5, 3:7],  # offset view of the same storage
      "f64": torch.randn(3, 2, dtype=torch.float64),
      "f16": torch.randn(5, dtype=torch.float16),
      "bf16": torch.randn(4, 3, dtype=torch.bfloat16),
      "i64": torch.arange(7),
      "b": torch.tensor([True, False]),
      "scalar": torch.tensor(3.5),
      "empty": torch.zeros(0, 4),
      "param": torch.nn.Parameter(torch.ones(2, 2)),
  }
  path = tmp_path / "mixed.pth"
  torch.save(sd, path)
  got = A.read_torch_state_dict_numpy(path)
  assert list(got) == list(sd)
  for k, v in sd.items():
    want = v.detach().float().numpy() if v.dtype == torch.bfloat16 else v.detach().numpy()
    assert got[k].shape == want.shape, k
    np.testing.assert_array_equal(np.asarray(got[k], want.dtype), want, err_msg=k)
  assert str(got["bf16"].dtype) == "bfloat16" and got["f16"].dtype == np.float16


def test_loader_errors(tmp_path):
  missing = tmp_path / "nope.pth"
  for use_torch in (True, False):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
      A.load_aesthetic_mlp(missing, use_torch=use_torch)

  sd = _random_state_dict()
  del sd["layers.7.bias"]
  torch.save(sd, tmp_path / "missing_key.pth")
  for use_torch in (True, False):
    with pytest.raises(WeightLoadingError, match=r"missing_key.pth.*missing keys \['layers.7.bias"):
      A.load_aesthetic_mlp(tmp_path / "missing_key.pth", use_torch=use_torch)

  sd = _random_state_dict()
  sd["layers.1.weight"] = torch.zeros(3)
  torch.save(sd, tmp_path / "extra.pth")
  with pytest.raises(WeightLoadingError, match=r"unexpected keys \['layers.1.weight'\]"):
    A.load_aesthetic_mlp(tmp_path / "extra.pth")

  torch.save(_random_state_dict(in_dim=512), tmp_path / "vitb.pth")  # a ViT-B/32 (512-d) MLP
  for use_torch in (True, False):
    with pytest.raises(WeightLoadingError,
                       match=r"vitb.pth: layers.0.weight has shape \(1024, 512\), expected "
                             r"\(1024, 768\) \(a state dict for 512-dim CLIP"):
      A.load_aesthetic_mlp(tmp_path / "vitb.pth", use_torch=use_torch)

  (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
  for use_torch in (True, False):
    with pytest.raises(WeightLoadingError, match="junk.pth"):
      A.load_aesthetic_mlp(tmp_path / "junk.pth", use_torch=use_torch)

  # A pickle with an arbitrary global is refused by the NumPy reader (no code runs).
  torch.save({"layers.0.weight": torch.zeros(1), "evil": pickle.PickleError("x")},
             tmp_path / "evil.pth")
  with pytest.raises(WeightLoadingError, match="evil.pth: refusing to load the global"):
    A.read_torch_state_dict_numpy(tmp_path / "evil.pth")
  with pytest.raises(WeightLoadingError, match="evil.pth"):
    A.read_torch_state_dict(tmp_path / "evil.pth", use_torch=True)  # weights_only refuses too


# ------------------------------------------------------------------------------------------
# Scores
# ------------------------------------------------------------------------------------------


def _torch_scores(tmodel, state_dict, pixels_nhwc):
  """(scores (B,), normalised embeddings (B, 768)) as the reference's AestheticScorer."""
  mlp = TorchMLP().eval()
  mlp.load_state_dict(state_dict, strict=True)
  with torch.no_grad():
    pixels = torch.from_numpy(np.array(pixels_nhwc).transpose(0, 3, 1, 2))
    embeds = tmodel(pixel_values=pixels).image_embeds
    embeds = embeds / torch.linalg.vector_norm(embeds, dim=-1, keepdim=True)
    return mlp(embeds).squeeze(1).numpy(), embeds.numpy()


def test_score_parity_with_torch(tiny_clip, mlp_path):
  tmodel, clip = tiny_clip
  mlp = A.load_aesthetic_mlp(mlp_path)
  images = _images()
  pixels = np.asarray(clip_lib.clip_preprocess(images, size=32))
  ref, ref_embeds = _torch_scores(
      tmodel, torch.load(mlp_path, map_location="cpu", weights_only=True), pixels)
  got = jax.jit(lambda x: A.aesthetic_score(clip, mlp, x))(images)
  err = float(np.abs(np.asarray(got) - ref).max())
  embeds = jax.jit(lambda x: A.normalized_image_embeds(clip, x))(images)
  embed_err = float(np.abs(np.asarray(embeds) - ref_embeds).max())
  print(f"aesthetic parity: score max abs err {err:.2e}, normalised embeds {embed_err:.2e}, "
        f"scores {ref}")
  assert got.shape == (3,) and got.dtype == jnp.float32
  assert err <= ATOL and embed_err <= 1e-5
  assert np.ptp(ref) > 1e-3  # the images are scored differently: the test can fail
  # params passed as arguments (no closed-over constants) give the same result
  got2 = jax.jit(lambda cp, mp, x: A.aesthetic_score(clip, mlp, x, clip_params=cp,
                                                     mlp_params=mp))(clip.params, mlp.params,
                                                                     images)
  np.testing.assert_allclose(got2, got, atol=1e-6)


def test_reward_fn_rounds_float_images(tiny_clip):
  """The device reward on [0,1] floats == the score of their uint8 conversion; random MLP."""
  from ddpo_jax.rewards import to_uint8
  _, clip = tiny_clip
  mlp = A.AestheticMLP(A.aesthetic_mlp_from_torch(
      {k: v.numpy() for k, v in _random_state_dict(seed=3).items()}))
  floats = np.random.RandomState(1).uniform(-0.05, 1.05, (2, 32, 48, 3)).astype(np.float32)
  fn = A.aesthetic_reward_fn(clip, mlp)
  rewards, info = jax.jit(fn)(floats, jnp.zeros((2, 4), jnp.int32), {})
  assert rewards.shape == (2,) and info == {}
  np.testing.assert_array_equal(A.float_to_uint8_values(floats), to_uint8(floats))

  def total(x):
    scores = A.aesthetic_score(clip, mlp, x)
    return scores.sum(), scores
  # The scores of the uint8 images (as float values), and differentiability in float input.
  g, want = jax.jit(jax.grad(total, has_aux=True))(to_uint8(floats).astype(np.float32))
  np.testing.assert_allclose(rewards, want, atol=1e-5)
  assert g.shape == floats.shape and np.isfinite(np.asarray(g)).all() and np.abs(g).max() > 0


def test_score_bad_inputs(tiny_clip, tmp_path):
  _, clip = tiny_clip
  mlp = A.AestheticMLP(A.aesthetic_mlp_from_torch(
      {k: v.numpy() for k, v in _random_state_dict().items()}))
  with pytest.raises(ValueError, match=r"expected images \(B, H, W, 3\).*\(40, 56, 3\)"):
    A.aesthetic_score(clip, mlp, _images()[0])
  with pytest.raises(ValueError, match=r"got shape \(3, 40, 56, 4\)"):
    A.aesthetic_score(clip, mlp, np.zeros((3, 40, 56, 4), np.uint8))
  small = clip_lib.ClipVision(clip_lib.CLIPVisionConfig(
      image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, projection_dim=12,
      num_hidden_layers=1, num_attention_heads=4), None)
  with pytest.raises(ValueError, match="projection_dim is 12.*768"):
    A.aesthetic_score(small, mlp, _images())
  with pytest.raises(ValueError, match="projection_dim is 12"):
    A.aesthetic_reward_fn(small, mlp)
