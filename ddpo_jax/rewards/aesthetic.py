"""LAION aesthetic predictor on CLIP image embeddings, in JAX (the DDPO "aesthetic" task).

score = MLP(e / ||e||), e = CLIP ViT-L/14 `image_embeds` (768) of the CLIP-preprocessed image.
The MLP (LAION "improved aesthetic predictor", `sac+logos+ava1-l14-linearMSE.pth`) is five Dense
layers 768 -> 1024 -> 128 -> 64 -> 16 -> 1 with no activation between them (its dropouts act
in training only); the PyTorch state dict names them `layers.{0,2,4,6,7}.{weight,bias}` (the
indices of the Linear modules in the reference's `nn.Sequential`, the dropouts between them).

Everything after loading is pure JAX (jit-able, differentiable), so the score can be compiled
into the same program as VAE decoding. Reading the `.pth` needs no PyTorch: when torch is not
importable, a restricted unpickler rebuilds the tensors of the zip checkpoint with NumPy.

Params tree of `AestheticMLP.params`: {'layers_0': {'kernel': (768, 1024), 'bias': (1024,)},
'layers_2': ..., 'layers_4': ..., 'layers_6': ..., 'layers_7': {'kernel': (16, 1), ...}}
(kernel = PyTorch weight transposed), float32 unless a dtype is asked for.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import pickle
import zipfile
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ddpo_jax.models.clip import ClipVision, load_clip_vision
from ddpo_jax.models.weights import WeightLoadingError
from ddpo_jax.rewards.base import Reward
from ddpo_jax.rewards.registry import register

Params = Any

# (torch Sequential index, in_features, out_features)
MLP_LAYERS = ((0, 768, 1024), (2, 1024, 128), (4, 128, 64), (6, 64, 16), (7, 16, 1))
EMBED_DIM = MLP_LAYERS[0][1]


# ----------------------------------------------------------------------------------------------
# Reading PyTorch `.pth` state dicts without PyTorch
# ----------------------------------------------------------------------------------------------

def _storage_dtypes() -> dict[str, np.dtype]:
  import ml_dtypes  # a JAX dependency
  return {
      "FloatStorage": np.dtype(np.float32), "DoubleStorage": np.dtype(np.float64),
      "HalfStorage": np.dtype(np.float16), "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
      "LongStorage": np.dtype(np.int64), "IntStorage": np.dtype(np.int32),
      "ShortStorage": np.dtype(np.int16), "CharStorage": np.dtype(np.int8),
      "ByteStorage": np.dtype(np.uint8), "BoolStorage": np.dtype(np.bool_),
  }


@dataclasses.dataclass(frozen=True)
class _StorageType:
  dtype: np.dtype


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  """NumPy version of `torch._utils._rebuild_tensor_v2`: a strided view, copied."""
  del requires_grad, backward_hooks, metadata
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  if len(size) != len(stride):
    raise pickle.UnpicklingError(f"tensor size {size} and stride {stride} differ in rank")
  if any(s == 0 for s in size):
    return np.zeros(size, storage.dtype)
  last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
  if storage_offset < 0 or min(stride, default=0) < 0 or last >= storage.size:
    raise pickle.UnpicklingError(f"tensor (offset {storage_offset}, size {size}, stride "
                                 f"{stride}) reads past its storage of {storage.size} elements")
  base = storage[storage_offset:]
  view = np.lib.stride_tricks.as_strided(base, size, [s * storage.itemsize for s in stride])
  return np.array(view)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *state):
  del requires_grad, backward_hooks, state
  return data


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickles a torch zip checkpoint's `data.pkl` into NumPy arrays; refuses other globals."""

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str, byteorder: str, source: str):
    super().__init__(file)
    self._archive, self._prefix, self._source = archive, prefix, source
    self._byteorder = "<" if byteorder == "little" else ">"
    self._dtypes = _storage_dtypes()
    self._storages: dict[str, np.ndarray] = {}

  def find_class(self, module, name):
    if (module, name) == ("collections", "OrderedDict"):
      return collections.OrderedDict
    if module == "torch._utils" and name == "_rebuild_tensor_v2":
      return _rebuild_tensor_v2
    if module == "torch._utils" and name == "_rebuild_parameter":
      return _rebuild_parameter
    if module == "torch" and name in self._dtypes:
      return _StorageType(self._dtypes[name])
    raise pickle.UnpicklingError(f"{self._source}: refusing to load the global {module}.{name} "
                                 "(only tensor state dicts can be read without PyTorch)")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
      raise pickle.UnpicklingError(f"{self._source}: unsupported persistent id {pid!r}")
    _, storage_type, key, _location, numel = pid[:5]
    if not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError(f"{self._source}: unsupported storage type {storage_type!r}")
    dtype = storage_type.dtype.newbyteorder(self._byteorder)
    if key not in self._storages:
      name = f"{self._prefix}data/{key}"
      try:
        raw = self._archive.read(name)
      except KeyError as e:
        raise pickle.UnpicklingError(f"{self._source}: storage {name} is missing") from e
      if len(raw) < numel * dtype.itemsize:
        raise pickle.UnpicklingError(f"{self._source}: storage {name} has {len(raw)} bytes, "
                                     f"expected {numel} x {dtype.itemsize}")
      array = np.frombuffer(raw, dtype, count=numel)
      self._storages[key] = array.astype(array.dtype.newbyteorder("="))
    return self._storages[key]


def read_torch_state_dict_numpy(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a `torch.save`d state dict (zip format, torch >= 1.6) with NumPy only.

  Only plain tensors, `OrderedDict`s and `nn.Parameter`s are rebuilt; any other global in the
  pickle is refused (no arbitrary code runs).

  Raises:
    FileNotFoundError: no such file.
    WeightLoadingError: not a zip checkpoint (e.g. the legacy pre-1.6 format), a refused
      global, or a corrupt archive (the message names the file).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file")
  if not zipfile.is_zipfile(path):
    raise WeightLoadingError(f"{path}: not a zip-format torch checkpoint (legacy torch.save "
                             "format?); install torch to read it, or re-save it with torch>=1.6")
  with zipfile.ZipFile(path) as archive:
    pkls = [n for n in archive.namelist() if n.endswith("data.pkl")
            and n.count("/") == 1]
    if len(pkls) != 1:
      raise WeightLoadingError(f"{path}: expected one <name>/data.pkl in the archive, found "
                               f"{pkls}")
    prefix = pkls[0][:-len("data.pkl")]
    byteorder = "little"
    if f"{prefix}byteorder" in archive.namelist():
      byteorder = archive.read(f"{prefix}byteorder").decode().strip()
    with archive.open(pkls[0]) as f:
      try:
        obj = _RestrictedUnpickler(f, archive, prefix, byteorder, path).load()
      except pickle.UnpicklingError as e:
        raise WeightLoadingError(f"{path}: {e}") from e
  if not isinstance(obj, Mapping):
    raise WeightLoadingError(f"{path}: expected a state dict, got a {type(obj).__name__}")
  return dict(obj)


def read_torch_state_dict(path: str | os.PathLike, *, use_torch: bool | None = None
                          ) -> dict[str, np.ndarray]:
  """A `.pth` state dict as NumPy arrays: with `torch.load(weights_only=True)` when torch is
  importable (or `use_torch=True`), else with `read_torch_state_dict_numpy`.

  Raises:
    FileNotFoundError: no such file.
    WeightLoadingError: an unreadable file (names it).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file")
  torch = None
  if use_torch is not False:
    try:
      import torch  # noqa: F811  (optional; only for reading the checkpoint)
    except ImportError:
      if use_torch:
        raise
  if torch is None:
    return read_torch_state_dict_numpy(path)
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:
    raise WeightLoadingError(f"{path}: torch.load failed ({type(e).__name__}: {e})") from e
  if not isinstance(obj, Mapping):
    raise WeightLoadingError(f"{path}: expected a state dict, got a {type(obj).__name__}")
  out = {}
  for key, value in obj.items():
    if isinstance(value, torch.Tensor):
      value = value.detach()
      value = value.float().numpy() if value.dtype == torch.bfloat16 else value.numpy()
    out[key] = value
  return out


# ----------------------------------------------------------------------------------------------
# The MLP
# ----------------------------------------------------------------------------------------------

def mlp_apply(params: Params, embeds: jax.Array) -> jax.Array:
  """(B, 768) L2-normalised image embeddings -> (B,) aesthetic scores (float32)."""
  x = jnp.asarray(embeds, jnp.float32)
  for index, _, _ in MLP_LAYERS:
    layer = params[f"layers_{index}"]
    x = jnp.dot(x, layer["kernel"].astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    x = x + layer["bias"].astype(jnp.float32)
  return x[:, 0]


@dataclasses.dataclass(frozen=True, eq=False)
class AestheticMLP:
  """The LAION aesthetic MLP: params and the pure `apply(params, embeds (B, 768)) -> (B,)`."""
  params: Params

  @staticmethod
  def apply(params: Params, embeds: jax.Array) -> jax.Array:
    return mlp_apply(params, embeds)

  def __call__(self, embeds: jax.Array) -> jax.Array:
    return mlp_apply(self.params, embeds)


def aesthetic_mlp_from_torch(state_dict: Mapping[str, Any], source: str = "<state dict>",
                             dtype=jnp.float32) -> Params:
  """`layers.{0,2,4,6,7}.{weight,bias}` (PyTorch Linear layout) -> the MLP params tree.

  Raises:
    WeightLoadingError: a missing or unexpected key, or a wrong shape (names `source`).
  """
  expected = {}
  for index, n_in, n_out in MLP_LAYERS:
    expected[f"layers.{index}.weight"] = (n_out, n_in)
    expected[f"layers.{index}.bias"] = (n_out,)
  missing = [k for k in expected if k not in state_dict]
  unexpected = [k for k in state_dict if k not in expected]
  if missing or unexpected:
    raise WeightLoadingError(
        f"{source}: not a LAION aesthetic MLP state dict (layers.{{0,2,4,6,7}}.{{weight,bias}}, "
        f"768->1024->128->64->16->1): missing keys {missing}, unexpected keys {unexpected}")
  for key, shape in expected.items():
    got = tuple(np.shape(state_dict[key]))
    if got != shape:
      hint = (f" (a state dict for {got[1]}-dim CLIP embeddings? this MLP needs ViT-L/14's "
              f"{EMBED_DIM})" if key == "layers.0.weight" and len(got) == 2 else "")
      raise WeightLoadingError(f"{source}: {key} has shape {got}, expected {shape}{hint}")
  params = {}
  for index, _, _ in MLP_LAYERS:
    weight = np.asarray(state_dict[f"layers.{index}.weight"], np.float32)
    bias = np.asarray(state_dict[f"layers.{index}.bias"], np.float32)
    params[f"layers_{index}"] = {"kernel": jnp.asarray(weight.T, dtype),
                                 "bias": jnp.asarray(bias, dtype)}
  return params


def load_aesthetic_mlp(path: str | os.PathLike, dtype=jnp.float32, *,
                       use_torch: bool | None = None) -> AestheticMLP:
  """Loads `sac+logos+ava1-l14-linearMSE.pth` (a torch state dict) without needing torch.

  Args:
    path: the `.pth` file.
    dtype: parameter dtype (the computation is float32).
    use_torch: None = torch.load if torch is importable, else the NumPy reader; True/False
      forces one.

  Raises:
    FileNotFoundError: no such file.
    WeightLoadingError: unreadable file, missing/unexpected key or wrong shape (names file+key).
  """
  path = os.fspath(path)
  state_dict = read_torch_state_dict(path, use_torch=use_torch)
  return AestheticMLP(aesthetic_mlp_from_torch(state_dict, source=path, dtype=dtype))


# ----------------------------------------------------------------------------------------------
# Scores and the device reward
# ----------------------------------------------------------------------------------------------

def _check_images(images, clip: ClipVision):
  if images.ndim != 4 or images.shape[-1] != clip.config.num_channels:
    raise ValueError(f"aesthetic_score: expected images (B, H, W, {clip.config.num_channels}) "
                     f"NHWC, got shape {images.shape}")


def aesthetic_score(clip: ClipVision, mlp: AestheticMLP, images: jax.Array, *,
                    clip_params: Params | None = None,
                    mlp_params: Params | None = None) -> jax.Array:
  """Aesthetic scores of images, pure JAX (jit-able, differentiable in float input).

  uint8 images -> `clip_preprocess` (resize shortest side to the CLIP input size, bicubic
  antialiased, centre crop, CLIP mean/std) -> CLIP `image_embeds` -> L2 normalise -> MLP.

  Args:
    clip: a CLIP ViT-L/14 image tower (`load_clip_vision`; projection_dim must be 768).
    mlp: the aesthetic MLP (`load_aesthetic_mlp`).
    images: (B, H, W, 3) uint8, or float in [0, 255], any H, W.
    clip_params, mlp_params: override `clip.params` / `mlp.params` (pass them as jit
      arguments instead of closing over large constants).

  Returns:
    (B,) float32 scores (about 1-10; LAION's scale).
  """
  mlp_params = mlp.params if mlp_params is None else mlp_params
  if clip.config.projection_dim != EMBED_DIM:
    raise ValueError(f"aesthetic_score: the CLIP tower's projection_dim is "
                     f"{clip.config.projection_dim}, the aesthetic MLP needs {EMBED_DIM} "
                     "(CLIP ViT-L/14)")
  return mlp_apply(mlp_params, normalized_image_embeds(clip, images, clip_params=clip_params))


def normalized_image_embeds(clip: ClipVision, images: jax.Array, *,
                            clip_params: Params | None = None) -> jax.Array:
  """(B, H, W, 3) uint8 (or float in [0, 255]) -> (B, projection_dim) float32 L2-normalised
  CLIP `image_embeds` of the CLIP-preprocessed images (pure JAX)."""
  clip_params = clip.params if clip_params is None else clip_params
  images = jnp.asarray(images)
  _check_images(images, clip)
  pixels = clip.preprocess(images)
  embeds = clip.apply(clip_params, pixels.astype(clip.dtype)).astype(jnp.float32)
  norm = jnp.linalg.norm(embeds, axis=-1, keepdims=True)
  return embeds / jnp.maximum(norm, jnp.finfo(jnp.float32).tiny)


def float_to_uint8_values(images: jax.Array) -> jax.Array:
  """Float images in [0, 1] -> float32 values of their uint8 conversion, round(255 x) clipped to
  [0, 255] (as `ddpo_jax.rewards.to_uint8`, in JAX; the rounding has zero gradient)."""
  return jnp.clip(jnp.round(jnp.asarray(images, jnp.float32) * 255.0), 0.0, 255.0)


def aesthetic_reward_fn(clip: ClipVision, mlp: AestheticMLP):
  """A device reward `fn(images (B,H,W,3) float32 in [0,1], prompt_ids, metadata)`
  -> (scores (B,) float32, {}): images are rounded to uint8 values first (as every image reward
  of the reference), then scored by `aesthetic_score`. The params are closed over."""
  if clip.config.projection_dim != EMBED_DIM:
    raise ValueError(f"aesthetic_reward_fn: the CLIP tower's projection_dim is "
                     f"{clip.config.projection_dim}, the aesthetic MLP needs {EMBED_DIM}")

  def fn(images, prompt_ids, metadata):
    del prompt_ids, metadata
    return aesthetic_score(clip, mlp, float_to_uint8_values(images)), {}
  return fn


def make_aesthetic_reward(clip_path: str | os.PathLike, mlp_path: str | os.PathLike,
                          dtype=jnp.float32):
  """Loads CLIP (transformers directory or Hub id, e.g. `openai/clip-vit-large-patch14`) and
  the MLP `.pth`, and returns `aesthetic_reward_fn(clip, mlp)`."""
  return aesthetic_reward_fn(load_clip_vision(clip_path, dtype=dtype), load_aesthetic_mlp(mlp_path))


@register("aesthetic", on_device=True, needs=("reward.clip_path", "reward.aesthetic_mlp_path"))
def make_aesthetic_term(config, log) -> Reward:
  """The "aesthetic" device reward of `config.reward.clip_path` (CLIP ViT-L/14 vision tower)
  and `config.reward.aesthetic_mlp_path` (the LAION MLP `.pth`)."""
  del log
  return Reward("aesthetic", make_aesthetic_reward(config.reward.clip_path,
                                                   config.reward.aesthetic_mlp_path),
                on_device=True)
