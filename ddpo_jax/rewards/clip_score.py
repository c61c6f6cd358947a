"""PickScore and CLIPScore as device rewards, on the project's Flax CLIP towers.

Both scores compare a CLIP image embedding with a CLIP text embedding of the prompt:

  cos       = <e_img / ||e_img||, e_txt / ||e_txt||>            (dimensionless, in [-1, 1])
  PickScore = exp(logit_scale) * cos                           (Kirstain et al. 2023; the
              reference computes `model.logit_scale.exp() * (text_embs @ image_embs.T)` and
              takes the diagonal; PickScore_v1's exp(logit_scale) is about 100, so scores are
              about 15-25; the PickScore *reward* is the score / 26, as flow_grpo's)
  CLIPScore = w * max(cos, 0), w = 2.5                         (Hessel et al. 2021, CLIP-S)
              or 100 * cos                                     (`variant="torchmetrics"`: the
              per-sample value of torchmetrics' `clip_score`, which clamps only the mean over
              its batch at 0, not each sample)

`load_clip_model` reads a transformers `CLIPModel` directory (config.json with text_config and
vision_config, model.safetensors; e.g. `yuvalkirstain/PickScore_v1`, a CLIP ViT-H/14 fine-tuned
on Pick-a-Pic, or `openai/clip-vit-large-patch14` for CLIPScore) into the towers of
`ddpo_jax.models.clip`: `CLIPTextModel` with `text_projection` (a `CLIPTextConfig` with
`with_projection=True` and the top-level `projection_dim`) and `CLIPVisionModelWithProjection`.
The state dict is checked strictly: every `text_model.*`, `text_projection.weight`,
`vision_model.*`, `visual_projection.weight` and `logit_scale` key must be there with its shape,
and no other key (the `position_ids` buffers of older checkpoints excepted).

Parameter tree (`ClipModel.params`): {'text': the text tree of `ddpo_jax.models.clip` with
'text_projection', 'vision': the vision tree ('vision_model', 'visual_projection'),
'logit_scale': () float32, stored as the log (as the checkpoint); scores use its exp}.

Images: the rewards take (B, H, W, 3) float32 in [0, 1] (the decoded samples), round them to
uint8 values first (as every image reward of the reference, which hands PIL images to the
processor; `quantize=False` keeps gradients instead) and preprocess on device with
`clip_preprocess`: resize the shortest side to the processor's size with antialiased bicubic
(PIL's two passes, horizontal then vertical, clipped to [0, 255] after each), centre-crop, CLIP
mean/std. With `quantize` the resize also rounds after each pass as PIL does
(`round_like_pil`; the input has no gradient anyway): the pixels then match
`CLIPImageProcessor`'s (PIL backend) but for 1-2 grey levels on ~0.1% of pixels (rounding ties).
Without rounding (`quantize=False`, differentiable) they differ by <= ~1.1 grey levels. Measured
on tiny random towers (tests/test_clip_score.py): unit-norm image embeddings within ~1e-4 of
transformers' with rounding and ~2e-3 without.

Text: the policy's prompt ids come from the policy's tokenizer, not CLIP's, so the reward reads
its own CLIP ids (B, 77) int32 from `metadata["clip_ids"]`; the host puts them there with the
reward function's `tokenize(prompts)` (or `prompt_metadata(prompts)`, a dict to merge into the
batch's metadata: the trainer's epoch loop does so through `Reward.prompt_metadata`). Ids are padded to `max_position_embeddings` and truncated with the EOS token
kept; the text tower is causal and pools at the (first) EOS token, so padding does not change
the embedding (the references pad to the longest prompt with an attention mask: the same
numbers).

Matmul precision: on GPU/TPU wrap calls in `jax.default_matmul_precision("highest")` for fp32
parity with PyTorch (see `ddpo_jax.models.clip`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ddpo_jax.models.clip import (CLIP_MEAN, CLIP_STD, LIST_NAMES, CLIPTextConfig,
                                  CLIPTextModel, CLIPVisionConfig, ClipVision, clip_preprocess,
                                  clip_text_from_torch, clip_vision_from_torch,
                                  init_clip_text_params, init_clip_vision_params,
                                  model_safetensors_files, read_model_config,
                                  read_safetensors_state_dict, resolve_model_directory)
from ddpo_jax.models.weights import WeightLoadingError, flax_path_to_torch_key
from ddpo_jax.rewards.aesthetic import float_to_uint8_values
from ddpo_jax.rewards.base import Reward
from ddpo_jax.rewards.registry import register

Params = Any
Dtype = Any

CLIP_IDS_KEY = "clip_ids"
HESSEL_W = 2.5  # CLIP-S weight (Hessel et al. 2021)
TORCHMETRICS_SCALE = 100.0
CLIPSCORE_VARIANTS = ("hessel", "torchmetrics")

_TEXT_KEYS = re.compile(r"^text_model\.|^text_projection\.weight$")
_VISION_KEYS = re.compile(r"^vision_model\.|^visual_projection\.weight$")
_BUFFER = re.compile(r"(^|\.)position_ids$")
_LOGIT_SCALE = "logit_scale"
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")
_BICUBIC = 3  # PIL.Image.BICUBIC, `resample` of CLIPImageProcessor


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------


def clip_model_configs(raw: Mapping[str, Any], source: str = "<config>"
                       ) -> tuple[CLIPTextConfig, CLIPVisionConfig]:
  """The two towers' configs of a transformers `CLIPModel` `config.json` dict.

  The text config gets `with_projection=True` and the top-level `projection_dim` (the size of
  `CLIPModel.text_projection`, as `visual_projection`; a sub-config's own `projection_dim` is
  ignored by `CLIPModel`).

  Raises:
    ValueError: not a `CLIPModel` config (another model_type, or no text_config /
      vision_config; the message names `source`), or an unsupported tower config.
  """
  raw = dict(raw)
  model_type = raw.get("model_type")
  missing = [name for name in ("text_config", "vision_config")
             if not (raw.get(name) or raw.get(name + "_dict"))]
  if model_type not in (None, "clip") or missing:
    what = (f"model_type {model_type!r}" if model_type not in (None, "clip")
            else f"no {' / '.join(missing)}")
    raise ValueError(
        f"{source}: not a transformers CLIPModel config ({what}, architectures "
        f"{raw.get('architectures')}); expected model_type 'clip' with text_config and "
        "vision_config, e.g. yuvalkirstain/PickScore_v1 or openai/clip-vit-large-patch14 (a "
        "CLIPVisionModelWithProjection directory loads with ddpo_jax.models.load_clip_vision)")
  text = CLIPTextConfig.from_dict(raw)
  text = dataclasses.replace(text, with_projection=True,
                             projection_dim=int(raw.get("projection_dim", 512)))
  return text, CLIPVisionConfig.from_dict(raw)


@dataclasses.dataclass(frozen=True)
class ClipImageProcessing:
  """What `CLIPImageProcessor` does, as far as `clip_preprocess` follows it.

  Attributes:
    size: resize the shortest side to `size` (bicubic), then centre-crop `size` x `size`.
    mean, std: per-channel normalisation of the [0, 1] pixels (RGB).
  """
  size: int
  mean: tuple[float, float, float] = CLIP_MEAN
  std: tuple[float, float, float] = CLIP_STD


def _image_processor_dict(directory: str) -> tuple[dict | None, str]:
  """The image-processor dict: `preprocessor_config.json` (Hub, transformers v4) or the
  `image_processor` entry of `processor_config.json` (transformers v5 `CLIPProcessor`)."""
  path = os.path.join(directory, "preprocessor_config.json")
  if os.path.isfile(path):
    with open(path) as f:
      return json.load(f), path
  path = os.path.join(directory, "processor_config.json")
  if os.path.isfile(path):
    with open(path) as f:
      d = json.load(f).get("image_processor")
    if d is not None:
      return d, path
  return None, directory


def _side(value, key: str, source: str) -> int:
  """A square side: an int, {'shortest_edge': N} (`size`) or {'height': N, 'width': N}
  (`crop_size` only: as `size` it would mean a resize to exactly N x N, ignoring the aspect)."""
  if isinstance(value, int):
    return value
  if isinstance(value, Mapping):
    if key == "size" and set(value) == {"shortest_edge"}:
      return int(value["shortest_edge"])
    if key == "crop_size" and set(value) == {"height", "width"} and \
        value["height"] == value["width"]:
      return int(value["height"])
  expected = "{'shortest_edge': N}" if key == "size" else "{'height': N, 'width': N}"
  raise ValueError(f"{source}: unsupported {key} {value!r} (expected an int or {expected})")


def read_image_processing(directory: str | os.PathLike,
                          vision_config: CLIPVisionConfig) -> ClipImageProcessing:
  """The preprocessing of a CLIP directory: from its image-processor config when there is one,
  else the CLIP defaults at `vision_config.image_size`.

  Raises:
    ValueError: a processor `clip_preprocess` does not implement (not bicubic, no resize /
      centre crop / rescale by 1/255 / normalisation, resize size != crop size), or a crop size
      other than the model's image size (the file is named).
  """
  d, source = _image_processor_dict(os.fspath(directory))
  if d is None:
    return ClipImageProcessing(vision_config.image_size)
  for flag in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
    if not d.get(flag, True):
      raise ValueError(f"{source}: {flag}=false is not supported (clip_preprocess always "
                       "resizes, centre-crops, rescales and normalises)")
  if d.get("resample", _BICUBIC) != _BICUBIC:
    raise ValueError(f"{source}: resample {d['resample']!r} is not supported (only bicubic, 3)")
  if abs(float(d.get("rescale_factor", 1 / 255)) * 255 - 1) > 1e-6:
    raise ValueError(f"{source}: rescale_factor {d['rescale_factor']!r} is not 1/255")
  size = _side(d.get("size", vision_config.image_size), "size", source)
  crop = _side(d.get("crop_size", size), "crop_size", source)
  if size != crop or crop != vision_config.image_size:
    raise ValueError(f"{source}: resize to {size} and crop to {crop} with a model image_size of "
                     f"{vision_config.image_size}: only resize == crop == image_size is supported")
  mean = tuple(float(x) for x in d.get("image_mean", CLIP_MEAN))
  std = tuple(float(x) for x in d.get("image_std", CLIP_STD))
  if len(mean) != 3 or len(std) != 3:
    raise ValueError(f"{source}: image_mean / image_std must have 3 entries, got {mean}, {std}")
  return ClipImageProcessing(size, mean, std)


# ----------------------------------------------------------------------------------------------
# Parameters and loading
# ----------------------------------------------------------------------------------------------


def init_clip_model_params(text_config: CLIPTextConfig, vision_config: CLIPVisionConfig,
                           key: jax.Array, dtype: Dtype = jnp.float32,
                           logit_scale: float = float(np.log(1 / 0.07))) -> Params:
  """Random `ClipModel` params ({'text', 'vision', 'logit_scale'}); works under `jax.eval_shape`.

  `logit_scale` is the log of the scale (CLIP's init, log(1 / 0.07)); it stays float32.
  """
  if not text_config.with_projection:
    raise ValueError("init_clip_model_params: the text config needs with_projection=True")
  k_text, k_vision = jax.random.split(key)
  return {"text": init_clip_text_params(text_config, k_text, dtype),
          "vision": init_clip_vision_params(vision_config, k_vision, dtype),
          _LOGIT_SCALE: jnp.asarray(logit_scale, jnp.float32)}


def clip_model_from_torch(state_dict: Mapping[str, Any], text_config: CLIPTextConfig,
                          vision_config: CLIPVisionConfig, source: str = "<state dict>",
                          dtype: Dtype = jnp.float32) -> Params:
  """Converts a transformers `CLIPModel` state dict to `ClipModel` params.

  Keys: `text_model.*` and `text_projection.weight` -> 'text' (`clip_text_from_torch`),
  `vision_model.*` and `visual_projection.weight` -> 'vision' (`clip_vision_from_torch`),
  `logit_scale` (a scalar, the log of the scale) -> 'logit_scale' (float32).

  Raises:
    WeightLoadingError: a missing, unexpected or misshapen key (the message names `source` and
      the key).
  """
  text, vision, other = {}, {}, {}
  for key in state_dict.keys():
    if _TEXT_KEYS.search(key):
      text[key] = state_dict[key]
    elif _VISION_KEYS.search(key):
      vision[key] = state_dict[key]
    else:
      other[key] = state_dict[key]
  if _LOGIT_SCALE not in other:
    raise WeightLoadingError(f"{source}: missing key {_LOGIT_SCALE!r} (a CLIPModel checkpoint "
                             "has text_model.*, vision_model.*, text_projection.weight, "
                             "visual_projection.weight and logit_scale)")
  logit_scale = np.asarray(other.pop(_LOGIT_SCALE), np.float32)
  if logit_scale.size != 1:
    raise WeightLoadingError(f"{source}: {_LOGIT_SCALE} has shape {logit_scale.shape}, "
                             "expected a scalar")
  if other:
    raise WeightLoadingError(f"{source}: unexpected keys {sorted(other)[:8]} (not part of a "
                             "CLIPModel's text_model / vision_model / projections / logit_scale)")
  _check_text_keys(text, text_config, source)
  return {"text": clip_text_from_torch(text, text_config, source=source, dtype=dtype),
          "vision": clip_vision_from_torch(vision, vision_config, source=source, dtype=dtype),
          _LOGIT_SCALE: jnp.asarray(logit_scale.reshape(()), jnp.float32)}


def _check_text_keys(text: Mapping[str, Any], config: CLIPTextConfig, source: str):
  """Missing / unexpected text keys, named as in the checkpoint (`clip_text_from_torch` names
  them without their `text_model.` prefix)."""
  abstract = jax.eval_shape(lambda: init_clip_text_params(config, jax.random.PRNGKey(0)))
  wanted = set()
  for path, _ in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    key = flax_path_to_torch_key(tuple(p.key for p in path), LIST_NAMES)
    wanted.add(key if key.startswith("text_projection.") else "text_model." + key)
  got = {k for k in text if not _BUFFER.search(k)}
  missing, unexpected = sorted(wanted - got), sorted(got - wanted)
  if missing or unexpected:
    raise WeightLoadingError(f"{source}: the text tower does not match the config: "
                             f"{len(missing)} missing keys {missing[:8]}, {len(unexpected)} "
                             f"unexpected keys {unexpected[:8]}")


def _load_tokenizer(path: str):
  """A transformers `CLIPTokenizer` from `path` (local files only when it is a directory)."""
  from transformers import CLIPTokenizer  # optional dependency, only for host tokenisation
  local = os.path.isdir(path)
  try:
    return CLIPTokenizer.from_pretrained(path, local_files_only=local)
  except Exception as e:
    raise OSError(f"{path}: cannot load a CLIPTokenizer ({type(e).__name__}: {e})") from e


@dataclasses.dataclass(frozen=True, eq=False)
class ClipModel:
  """A loaded CLIP model (both towers): configs, params, preprocessing and tokenizer.

  Attributes:
    text_config: the text tower (with_projection=True, projection_dim = the joint space).
    vision_config: the image tower (projection_dim = the joint space).
    params: {'text', 'vision', 'logit_scale'} (see the module docstring).
    processing: the image preprocessing (`read_image_processing`).
    tokenizer: a transformers `CLIPTokenizer`, or None when the directory has none (then
      `tokenize` raises; pass `tokenizer_path` to `load_clip_model`).
    dtype: parameter and computation dtype of the towers (scores are float32).
    source: where the weights came from, for messages.
  """
  text_config: CLIPTextConfig
  vision_config: CLIPVisionConfig
  params: Params
  processing: ClipImageProcessing
  tokenizer: Any = None
  dtype: Dtype = jnp.float32
  source: str = "<params>"

  @property
  def logit_scale(self) -> float:
    """exp(params['logit_scale']): the scale of PickScore (about 100 for PickScore_v1)."""
    return float(np.exp(np.asarray(self.params[_LOGIT_SCALE], np.float32)))

  @property
  def text_module(self) -> CLIPTextModel:
    return CLIPTextModel(self.text_config, dtype=self.dtype, param_dtype=self.dtype)

  def vision(self, params: Params | None = None) -> ClipVision:
    """The image tower as a `ClipVision` (its params: `params['vision']`, default self's)."""
    params = self.params if params is None else params
    return ClipVision(self.vision_config, params["vision"], self.dtype)

  def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
    """Prompts -> (B, max_position_embeddings) int32 CLIP ids (host; see `tokenize`)."""
    return tokenize(self, prompts)


def load_clip_model(path: str | os.PathLike, dtype: Dtype = jnp.float32, *,
                    tokenizer_path: str | os.PathLike | None = None) -> ClipModel:
  """Loads a transformers `CLIPModel` directory (or Hub id) into a `ClipModel`.

  Args:
    path: a directory written by `CLIPModel.save_pretrained` (config.json with text_config and
      vision_config, model.safetensors or a sharded index), e.g. `yuvalkirstain/PickScore_v1`
      (CLIP ViT-H/14) or `openai/clip-vit-large-patch14`, or a Hub id (weights and *.json
      downloaded with `huggingface_hub.snapshot_download`). Its tokenizer files (tokenizer.json
      or vocab.json + merges.txt) and image-processor config are used when present.
    dtype: parameter and computation dtype of the towers.
    tokenizer_path: where to load the `CLIPTokenizer` from instead (a directory, or a Hub id),
      e.g. `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`, the processor of PickScore's reference.

  Raises:
    FileNotFoundError: no directory / config.json / safetensors (names the path).
    OSError: a Hub id that cannot be downloaded, or an unreadable tokenizer.
    ValueError: not a `CLIPModel` config (names config.json), or an unsupported config or image
      processor.
    WeightLoadingError: missing, unexpected or misshapen keys (names the file and the keys).
  """
  directory = resolve_model_directory(path)
  config_path = os.path.join(directory, "config.json")
  text_config, vision_config = clip_model_configs(read_model_config(directory), source=config_path)
  processing = read_image_processing(directory, vision_config)
  files = model_safetensors_files(directory)
  source = ", ".join(files)
  params = clip_model_from_torch(read_safetensors_state_dict(files), text_config, vision_config,
                                 source=source, dtype=dtype)
  tokenizer = None
  if tokenizer_path is not None:
    tokenizer = _load_tokenizer(os.fspath(tokenizer_path))
  elif any(os.path.isfile(os.path.join(directory, f)) for f in _TOKENIZER_FILES):
    tokenizer = _load_tokenizer(directory)
  if tokenizer is not None:
    _check_tokenizer(tokenizer, text_config, os.fspath(tokenizer_path or directory))
  return ClipModel(text_config, vision_config, params, processing, tokenizer, dtype, source)


def _check_tokenizer(tokenizer, config: CLIPTextConfig, source: str):
  """The text tower pools at the EOS token: the tokenizer's EOS must be the one it looks for."""
  if len(tokenizer) > config.vocab_size:
    raise ValueError(f"{source}: the tokenizer has {len(tokenizer)} tokens, the text tower's "
                     f"vocab_size is {config.vocab_size}")
  eos = tokenizer.eos_token_id
  if config.eos_token_id == 2:  # legacy configs: pooling at the argmax of the ids
    if eos != len(tokenizer) - 1:
      raise ValueError(f"{source}: the config's legacy eos_token_id 2 pools at the largest id, "
                       f"but the tokenizer's EOS {eos} is not its largest id {len(tokenizer) - 1}")
  elif eos != config.eos_token_id:
    raise ValueError(f"{source}: the tokenizer's EOS id {eos} is not the text config's "
                     f"eos_token_id {config.eos_token_id} (the tower pools at that token)")


def tokenize(model: ClipModel, prompts: Sequence[str]) -> np.ndarray:
  """Host-side CLIP tokenisation of prompts for the text tower and `metadata["clip_ids"]`.

  BOS, the BPE tokens, EOS, then padding to `max_position_embeddings` (77); longer prompts are
  truncated to that length with EOS kept last.

  Returns:
    (B, max_position_embeddings) int32 NumPy ids.

  Raises:
    ValueError: the model has no tokenizer.
  """
  if model.tokenizer is None:
    raise ValueError(f"{model.source}: this CLIP model has no tokenizer (no tokenizer.json / "
                     "vocab.json in its directory); load it with load_clip_model(..., "
                     "tokenizer_path=...), e.g. laion/CLIP-ViT-H-14-laion2B-s32B-b79K for "
                     "PickScore_v1")
  if isinstance(prompts, str):
    prompts = [prompts]
  length = model.text_config.max_position_embeddings
  ids = model.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=length,
                        return_tensors="np")["input_ids"]
  return np.asarray(ids, np.int32)


# ----------------------------------------------------------------------------------------------
# Embeddings and scores (pure JAX)
# ----------------------------------------------------------------------------------------------


def _l2_normalize(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
  return x / jnp.maximum(norm, jnp.finfo(jnp.float32).tiny)


def image_embeds(model: ClipModel, params: Params, images01: jax.Array, *,
                 quantize: bool = True, round_like_pil: bool | None = None) -> jax.Array:
  """L2-normalised CLIP image embeddings of images in [0, 1] (pure JAX, jit-able).

  images -> (with `quantize`) round(255 x) clipped to [0, 255], as the uint8 images the
  reference scores (zero gradient), else 255 x clipped (differentiable) -> `clip_preprocess`
  (shortest side to `model.processing.size`, antialiased bicubic, centre crop, mean/std) ->
  `get_image_features` (vision tower + `visual_projection`) -> x / ||x||.

  Args:
    model: the loaded model (configs, dtype, processing).
    params: `model.params` or a tree of the same structure (only 'vision' is read).
    images01: (B, H, W, 3) float in [0, 1], any H, W.
    quantize: round to uint8 values first (as the reference's PIL images).
    round_like_pil: round after each resize pass, as PIL does (see `clip_preprocess`); None =
      `quantize` (rounding costs nothing when the input is already rounded, no gradient).

  Returns:
    (B, projection_dim) float32, unit norm.
  """
  images01 = jnp.asarray(images01)
  c = model.vision_config
  if images01.ndim != 4 or images01.shape[-1] != c.num_channels:
    raise ValueError(f"image_embeds: expected images (B, H, W, {c.num_channels}) NHWC in [0, 1], "
                     f"got shape {images01.shape}")
  x = (float_to_uint8_values(images01) if quantize
       else jnp.clip(images01.astype(jnp.float32), 0.0, 1.0) * 255.0)
  p = model.processing
  round_like_pil = quantize if round_like_pil is None else round_like_pil
  pixels = clip_preprocess(x, size=p.size, mean=p.mean, std=p.std, round_like_pil=round_like_pil)
  vision = model.vision(params)
  return _l2_normalize(vision.apply(params["vision"], pixels.astype(model.dtype)))


def text_embeds(model: ClipModel, params: Params, ids: jax.Array) -> jax.Array:
  """L2-normalised CLIP text embeddings (`get_text_features` / ||.||) of CLIP token ids.

  Args:
    model: the loaded model.
    params: `model.params` or a tree of the same structure (only 'text' is read).
    ids: (B, L) int CLIP token ids (`tokenize`), L <= max_position_embeddings; pooled at the
      first EOS token (argmax of the ids for legacy configs with eos_token_id 2).

  Returns:
    (B, projection_dim) float32, unit norm.
  """
  ids = jnp.asarray(ids)
  if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"text_embeds: expected (B, L) integer CLIP token ids, got "
                     f"{ids.dtype} {ids.shape}")
  _, pooled = model.text_module.apply({"params": params["text"]}, ids.astype(jnp.int32))
  return _l2_normalize(pooled)


def cosine(model: ClipModel, params: Params, images01: jax.Array, ids: jax.Array,
           **image_kwargs) -> jax.Array:
  """cos(image_i, text_i) of each pair: (B,) float32 in [-1, 1]; `image_kwargs` go to
  `image_embeds` (quantize, round_like_pil)."""
  img = image_embeds(model, params, images01, **image_kwargs)
  txt = text_embeds(model, params, ids)
  if img.shape[0] != txt.shape[0]:
    raise ValueError(f"cosine: {img.shape[0]} images but {txt.shape[0]} token-id rows")
  return jnp.sum(img * txt, axis=-1)


def pickscore_from_cosine(params: Params, cos: jax.Array) -> jax.Array:
  """exp(params['logit_scale']) * cos: (B,) float32."""
  return jnp.exp(jnp.asarray(params[_LOGIT_SCALE], jnp.float32)) * cos


def clipscore_from_cosine(cos: jax.Array, variant: str = "hessel",
                          w: float = HESSEL_W) -> jax.Array:
  """CLIPScore of cosines: `"hessel"` w * max(cos, 0) (CLIP-S, w = 2.5: in [0, 2.5]);
  `"torchmetrics"` 100 * cos per sample, not clamped (torchmetrics clamps only its batch
  mean at 0). (B,) float32."""
  if variant == "hessel":
    return w * jnp.maximum(cos, 0.0)
  if variant == "torchmetrics":
    return TORCHMETRICS_SCALE * cos
  raise ValueError(f"clipscore: unknown variant {variant!r}; known: {CLIPSCORE_VARIANTS}")


def pickscore(model: ClipModel, params: Params, images01: jax.Array, ids: jax.Array,
              **image_kwargs) -> jax.Array:
  """PickScore: exp(logit_scale) * cos(image, prompt), (B,) float32 (about 15-25 for
  PickScore_v1, whose exp(logit_scale) is about 100). Args as `cosine`."""
  return pickscore_from_cosine(params, cosine(model, params, images01, ids, **image_kwargs))


def clipscore(model: ClipModel, params: Params, images01: jax.Array, ids: jax.Array, *,
              variant: str = "hessel", w: float = HESSEL_W, **image_kwargs) -> jax.Array:
  """CLIPScore (see `clipscore_from_cosine`), (B,) float32. Args as `cosine`."""
  return clipscore_from_cosine(cosine(model, params, images01, ids, **image_kwargs), variant, w)


# ----------------------------------------------------------------------------------------------
# Device rewards
# ----------------------------------------------------------------------------------------------


def clip_ids_from_metadata(metadata: Mapping[str, Any] | None, batch: int, max_length: int,
                           who: str = "clip reward") -> jax.Array:
  """`metadata["clip_ids"]`, checked: (B, L <= max_length) integer.

  Raises:
    ValueError: metadata without "clip_ids" (the message says how the host makes them), or a
      wrong shape / dtype.
  """
  if metadata is None or CLIP_IDS_KEY not in metadata:
    keys = sorted(metadata) if metadata is not None else None
    raise ValueError(
        f"{who}: metadata has no {CLIP_IDS_KEY!r} (keys: {keys}). This reward scores the CLIP "
        f"tokenisation of the prompts, not the policy's prompt ids: put "
        f"reward.fn.tokenize(prompts) ((B, 77) int32) in metadata[{CLIP_IDS_KEY!r}] on the "
        "host, e.g. metadata.update(reward.fn.prompt_metadata(prompts))")
  ids = jnp.asarray(metadata[CLIP_IDS_KEY])
  if (ids.ndim != 2 or ids.shape[0] != batch or ids.shape[1] > max_length
      or not jnp.issubdtype(ids.dtype, jnp.integer)):
    raise ValueError(f"{who}: metadata[{CLIP_IDS_KEY!r}] must be ({batch}, <= {max_length}) "
                     f"integer CLIP ids, got {ids.dtype} {ids.shape}")
  return ids


@dataclasses.dataclass(frozen=True, eq=False)
class ClipRewardFn:
  """The `fn` of a PickScore / CLIPScore `Reward`: a device reward with a host tokenizer.

  `fn(images (B,H,W,3) float32 in [0,1], prompt_ids (ignored), metadata with "clip_ids")`
  -> (scores (B,) float32, {"cosine": (B,) float32}); the params are closed over (`apply`
  takes them as an argument instead, e.g. to pass them to jit). `tokenize(prompts)` /
  `prompt_metadata(prompts)` make the "clip_ids" on the host.

  Attributes:
    model: the loaded CLIP model.
    kind: "pickscore" or "clipscore".
    variant, w: CLIPScore's variant and weight (`clipscore_from_cosine`).
    quantize, round_like_pil: image handling (`image_embeds`).
  """
  model: ClipModel
  kind: str = "pickscore"
  variant: str = "hessel"
  w: float = HESSEL_W
  quantize: bool = True
  round_like_pil: bool | None = None

  def __post_init__(self):
    if self.kind not in ("pickscore", "clipscore"):
      raise ValueError(f"ClipRewardFn: kind {self.kind!r} is not 'pickscore' or 'clipscore'")
    if self.variant not in CLIPSCORE_VARIANTS:
      raise ValueError(f"ClipRewardFn: unknown variant {self.variant!r}; known: "
                       f"{CLIPSCORE_VARIANTS}")

  def apply(self, params: Params, images, prompt_ids, metadata):
    """Pure: (rewards (B,) float32: PickScore / 26 or CLIPScore, {"cosine": (B,) float32})."""
    del prompt_ids  # the policy's tokenisation; CLIP's comes in the metadata
    images = jnp.asarray(images)
    ids = clip_ids_from_metadata(metadata, images.shape[0],
                                 self.model.text_config.max_position_embeddings, self.kind)
    cos = cosine(self.model, params, images, ids, quantize=self.quantize,
                 round_like_pil=self.round_like_pil)
    if self.kind == "pickscore":
      scores = pickscore_from_cosine(params, cos) / PICKSCORE_REWARD_DIVISOR
    else:
      scores = clipscore_from_cosine(cos, self.variant, self.w)
    return scores, {"cosine": cos}

  def __call__(self, images, prompt_ids, metadata):
    return self.apply(self.model.params, images, prompt_ids, metadata)

  def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
    """(B, 77) int32 CLIP ids of `prompts` (host), for metadata["clip_ids"]."""
    return tokenize(self.model, prompts)

  def prompt_metadata(self, prompts: Sequence[str]) -> dict[str, np.ndarray]:
    """{"clip_ids": tokenize(prompts)}: merge into the batch's metadata on the host."""
    return {CLIP_IDS_KEY: self.tokenize(prompts)}


# flow_grpo's PickScore reward (flow_grpo/pickscore_scorer.py) is the score divided by 26, so
# that it is about 0.6-1.0: the reward, its logged mean and a KL coefficient in its units (beta)
# are on the reference's scale. (Group-normalised advantages do not depend on it.)
PICKSCORE_REWARD_DIVISOR = 26.0


def make_pickscore_reward(path: str | os.PathLike, dtype: Dtype = jnp.float32, *,
                          name: str = "pickscore",
                          tokenizer_path: str | os.PathLike | None = None,
                          quantize: bool = True, round_like_pil: bool | None = None):
  """The PickScore device `Reward` (on_device=True) of a CLIPModel directory / Hub id
  (`yuvalkirstain/PickScore_v1`; `tokenizer_path` as `load_clip_model`). Its `fn` is a
  `ClipRewardFn`: rewards exp(logit_scale) * cos / 26 (PickScore on flow_grpo's reward scale,
  `PICKSCORE_REWARD_DIVISOR`), info {"cosine"}; needs metadata["clip_ids"] from
  `reward.fn.tokenize(prompts)`."""
  model = load_clip_model(path, dtype, tokenizer_path=tokenizer_path)
  fn = ClipRewardFn(model, "pickscore", quantize=quantize, round_like_pil=round_like_pil)
  return Reward(name, fn, on_device=True, prompt_metadata=fn.prompt_metadata)


def make_clipscore_reward(path: str | os.PathLike, dtype: Dtype = jnp.float32, *,
                          name: str = "clipscore", variant: str = "hessel", w: float = HESSEL_W,
                          tokenizer_path: str | os.PathLike | None = None,
                          quantize: bool = True, round_like_pil: bool | None = None):
  """The CLIPScore device `Reward` (on_device=True) of a CLIPModel directory / Hub id
  (`openai/clip-vit-large-patch14`): `variant="hessel"` w * max(cos, 0) with w = 2.5, or
  `"torchmetrics"` 100 * cos; info {"cosine"}; needs metadata["clip_ids"] from
  `reward.fn.tokenize(prompts)`."""
  model = load_clip_model(path, dtype, tokenizer_path=tokenizer_path)
  fn = ClipRewardFn(model, "clipscore", variant=variant, w=w, quantize=quantize,
                    round_like_pil=round_like_pil)
  return Reward(name, fn, on_device=True, prompt_metadata=fn.prompt_metadata)


def _register_clip_term(name: str, make_reward) -> None:
  """Registers device reward `name` ("pickscore" / "clipscore"): `make_reward` of the CLIPModel
  at `config.reward.<name>_path`, its tokenizer at `config.reward.clip_tokenizer_path` (the
  model's own when '')."""
  @register(name, on_device=True, needs=(f"reward.{name}_path",))
  def make_term(config, log) -> Reward:
    del log
    return make_reward(config.reward[f"{name}_path"], name=name,
                       tokenizer_path=config.reward.clip_tokenizer_path or None)


_register_clip_term("pickscore", make_pickscore_reward)
_register_clip_term("clipscore", make_clipscore_reward)
