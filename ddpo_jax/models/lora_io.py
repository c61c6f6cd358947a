"""LoRA factors to and from diffusers / PEFT LoRA files (`pytorch_lora_weights.safetensors`).

The file is what diffusers' `save_lora_weights` writes and `pipe.load_lora_weights(dir)` reads
(PEFT naming, PyTorch layout), one pair of tensors per adapted module:

    {prefix}.{diffusers module path}.lora_A.weight   (r, in)            Linear
    {prefix}.{diffusers module path}.lora_B.weight   (out, r)
    {prefix}.{...}.lora_A.weight                     (r, in, kh, kw)    Conv2d
    {prefix}.{...}.lora_B.weight                     (out, r, 1, 1)

with prefix "unet" for the SD 1.x / 2.x / SDXL UNet and "transformer" for the SD3 / SD3.5 and
FLUX.1 transformers; the module path is the Flax one with the model's key table
(`down_blocks_0/attentions_1/.../to_out_0` -> `down_blocks.0.attentions.1....to_out.0`,
`weights.flax_path_to_torch_key`). PEFT applies y = W x + (lora_alpha / r) · B A x, and with no
alpha in the file lora_alpha = r. Ours is y = W x + s · (x A) B with s = alpha / rank
(`models.adapters`), so the writer folds s into lora_B (lora_B = s · Bᵀ, lora_A = Aᵀ) and
records lora_alpha = r in the file's `lora_adapter_metadata` header (the one diffusers'
`save_lora_weights(..., unet_lora_adapter_metadata=...)` writes): every loader, with or
without that header, computes the same layer as ours. A conv factor A (kh·kw·in, r) is the
kernel of the layer with r outputs, as PEFT's `lora_A` Conv2d (same kernel size, stride and
padding) followed by a 1×1 `lora_B`.

The reader takes such a file (ours, one diffusers' `save_lora_weights` wrote, PEFT's
`adapter_model.safetensors` with its `adapter_config.json`, keys `base_model.model.*`) and
gives our factor tree, with the file's own scale (metadata `lora_alpha` / `r`,
`alpha_pattern`, `use_rslora`; kohya-style `{module}.alpha` tensors; default 1) converted to
ours: B = (s_file / s) · lora_Bᵀ. It checks the file against the modules a config adapts:
every missing and every extra key in one `LoraFileError` naming the file, then every shape
that does not match (rank or layer size) named by key.

Trees: factors {module path...: {"a": (fan_in, r), "b": (r, out)}} float32
(`models.lora.init_lora`); base: the denoiser's Flax params (arrays or ShapeDtypeStructs).
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Iterable, Sequence

import numpy as np
import safetensors.numpy
from flax import traverse_util

from ddpo_jax.models import pipeline_io
from ddpo_jax.models.flux import FLUX_LIST_NAMES
from ddpo_jax.models.mmdit import MMDIT_LIST_NAMES
from ddpo_jax.models.unet import UNET_LIST_NAMES
from ddpo_jax.models.weights import flax_path_to_torch_key

Params = Any

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
LORA_INFO_NAME = "ddpo_jax_lora.json"                   # what we wrote it from
PEFT_WEIGHT_NAME = "adapter_model.safetensors"          # PEFT's `save_pretrained`
PEFT_CONFIG_NAME = "adapter_config.json"
METADATA_KEY = "lora_adapter_metadata"                   # diffusers' LORA_ADAPTER_METADATA_KEY
_PEFT_PREFIX = "base_model.model."
# Older diffusers namings of the same factors (what `convert_state_dict_to_diffusers` and the
# attention-processor LoRAs wrote; diffusers converts them on load as well) -> PEFT's.
_OLD_NAMES = (
    (re.compile(r"\.processor\."), "."),
    (re.compile(r"\.to_out_lora\.(up|down)\."), r".to_out.0.lora_\1."),
    (re.compile(r"\.(to_q|to_k|to_v)_lora\.(up|down)\."), r".\1.lora_\2."),
    (re.compile(r"\.(?:lora|lora_linear_layer)\.(up|down)\."), r".lora_\1."),
    (re.compile(r"\.lora_up\."), ".lora_B."),
    (re.compile(r"\.lora_down\."), ".lora_A."),
)

# family -> (the model's key table: its list names, the diffusers pipeline's component prefix)
FAMILIES = {
    "unet": (UNET_LIST_NAMES, "unet"),         # SD 1.x / 2.x, SDXL (UNet2DConditionModel)
    "sd3": (MMDIT_LIST_NAMES, "transformer"),  # SD3 / SD3.5 (SD3Transformer2DModel)
    "flux": (FLUX_LIST_NAMES, "transformer"),  # FLUX.1 (FluxTransformer2DModel)
}


class LoraFileError(ValueError):
  """A LoRA file does not match the model or the LoRA config it is loaded for."""


def denoiser_family(base: Params) -> str:
  """"unet", "sd3" or "flux": which denoiser a Flax params tree is (its top-level modules).

  Raises:
    LoraFileError: none of them.
  """
  top = set(base)
  if "conv_in" in top or any(k.startswith("down_blocks_") for k in top):
    return "unet"
  if any(k.startswith("single_transformer_blocks_") for k in top) or "x_embedder" in top:
    return "flux"
  if any(k.startswith("transformer_blocks_") for k in top):
    return "sd3"
  raise LoraFileError(f"not a UNet, SD3 or FLUX.1 denoiser (top-level modules "
                      f"{sorted(top)[:6]}): no diffusers LoRA naming for it")


def _family(base: Params, family: str | None) -> tuple[str, frozenset, str]:
  family = family or denoiser_family(base)
  if family not in FAMILIES:
    raise ValueError(f"family {family!r}: one of {sorted(FAMILIES)}")
  list_names, prefix = FAMILIES[family]
  return family, frozenset(list_names), prefix


def torch_module_name(path: str, list_names: Iterable[str]) -> str:
  """The diffusers module name of a Flax module path ("a_0/to_out_0" -> "a.0.to_out.0")."""
  return flax_path_to_torch_key(tuple(path.split("/")) + ("bias",), list_names)[:-len(".bias")]


def _kernel_shapes(base: Params) -> dict[str, tuple[int, ...]]:
  flat = traverse_util.flatten_dict(base)
  return {"/".join(k[:-1]): tuple(v.shape) for k, v in flat.items() if k[-1] == "kernel"}


def _factor_modules(factors: Params) -> dict[str, tuple[Any, Any]]:
  flat = traverse_util.flatten_dict(factors)
  modules = sorted({k[:-1] for k in flat})
  return {"/".join(m): (flat[m + ("a",)], flat[m + ("b",)]) for m in modules}


# ------------------------------------------------------------------------------------------------
# Writing.
# ------------------------------------------------------------------------------------------------
def lora_state_dict(factors: Params, base: Params, scale: float,
                    family: str | None = None) -> dict[str, np.ndarray]:
  """The diffusers / PEFT state dict of `factors` (float32, PyTorch layout, s folded into
  lora_B: see the module docstring).

  Raises:
    LoraFileError: a factor's module has no kernel in `base`, or a factor's shape does not fit
      that kernel.
  """
  _, list_names, prefix = _family(base, family)
  kernels = _kernel_shapes(base)
  out = {}
  for path, (a, b) in _factor_modules(factors).items():
    if path not in kernels:
      raise LoraFileError(f"LoRA module {path!r} has no kernel in the base params")
    shape = kernels[path]
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    rank = a.shape[-1]
    if a.shape != (int(np.prod(shape[:-1])), rank) or b.shape != (rank, shape[-1]):
      raise LoraFileError(f"LoRA module {path!r}: factors {a.shape}, {b.shape} do not fit its "
                          f"kernel {shape}")
    up = b.T if scale == 1 else (np.float32(scale) * b).T
    if len(shape) == 4:  # Conv (kh, kw, in, out): PEFT's Conv2d pair
      down = a.reshape(shape[:-1] + (rank,)).transpose(3, 2, 0, 1)
      up = up[:, :, None, None]
    elif len(shape) == 2:
      down = a.T
    else:
      raise LoraFileError(f"LoRA module {path!r}: kernel of rank {len(shape)} {shape}; only "
                          "Dense (2-D) and 2-D conv (4-D) kernels have a diffusers LoRA form")
    name = f"{prefix}.{torch_module_name(path, list_names)}"
    out[f"{name}.lora_A.weight"] = np.ascontiguousarray(down)
    out[f"{name}.lora_B.weight"] = np.ascontiguousarray(up)
  if not out:
    raise LoraFileError("no LoRA factors to write")
  return out


def adapter_metadata(state_dict: dict[str, np.ndarray], family: str) -> dict:
  """diffusers' `lora_adapter_metadata` of a folded state dict: {"{prefix}.r": rank,
  "{prefix}.lora_alpha": rank (scale 1: s is in lora_B), "{prefix}.target_modules": [...]}."""
  prefix = FAMILIES[family][1]
  ranks = {v.shape[1] for k, v in state_dict.items() if k.endswith(".lora_B.weight")}
  if len(ranks) != 1:
    raise LoraFileError(f"LoRA factors of several ranks {sorted(ranks)}; one rank is written")
  rank = int(ranks.pop())
  modules = sorted({k[len(prefix) + 1:-len(".lora_A.weight")] for k in state_dict
                    if k.endswith(".lora_A.weight")})
  config = {"r": rank, "lora_alpha": rank, "target_modules": modules, "rank_pattern": {},
            "alpha_pattern": {}, "use_dora": False, "use_rslora": False, "lora_bias": False}
  return {f"{prefix}.{k}": v for k, v in config.items()}


def write_lora_file(factors: Params, base: Params, scale: float, file: str,
                    family: str | None = None) -> str:
  """Writes `factors` to `file` (a .safetensors path) in the diffusers / PEFT format, with
  the `lora_adapter_metadata` header. Returns the family written ("unet", "sd3", "flux")."""
  family, _, _ = _family(base, family)
  state_dict = lora_state_dict(factors, base, scale, family)
  header = {"format": "pt",
            METADATA_KEY: json.dumps(adapter_metadata(state_dict, family), indent=2,
                                     sort_keys=True)}
  safetensors.numpy.save_file(state_dict, file, metadata=header)
  return family


def save_lora(path: str, factors: Params, base: Params, *, rank: int, alpha: float,
              targets: Sequence[str], base_model: str = "", family: str | None = None,
              extra_info: dict | None = None, overwrite: bool = False) -> str:
  """Writes a LoRA directory atomically (`pipeline_io.save_directory`: the same output checks
  and `ddpo_jax_pipeline.json` file list as an exported pipeline): `LORA_WEIGHT_NAME`, which
  `pipe.load_lora_weights(path)` loads into the diffusers pipeline of `base_model`, and
  `LORA_INFO_NAME` (base model, family, rank, alpha, scale, target regexes, modules).

  Returns:
    `path` (absolute).

  Raises:
    FileExistsError: `path` holds something that is not replaced.
    LoraFileError: see `lora_state_dict`.
  """
  family, list_names, prefix = _family(base, family)
  scale = float(alpha) / int(rank)
  modules = sorted(_factor_modules(factors))
  info = {
      "format": "diffusers-peft-lora",
      "weights": LORA_WEIGHT_NAME,
      "base_model": base_model,
      "family": family,
      "component": prefix,
      "rank": int(rank),
      "alpha": float(alpha),
      "scale": scale,
      "scale_folded_into_lora_B": True,
      "targets": list(targets),
      "modules": [torch_module_name(m, list_names) for m in modules],
      **(extra_info or {}),
  }

  def fill(tmp: str) -> None:
    write_lora_file(factors, base, scale, os.path.join(tmp, LORA_WEIGHT_NAME), family)
    pipeline_io.write_json(info, os.path.join(tmp, LORA_INFO_NAME))

  return pipeline_io.save_directory(path, overwrite, fill, "ddpo_jax.models.lora_io.save_lora")


# ------------------------------------------------------------------------------------------------
# Reading.
# ------------------------------------------------------------------------------------------------
def find_lora_file(path: str) -> str:
  """The weights file of `path`: the file itself, or in a directory `LORA_WEIGHT_NAME`, else
  `PEFT_WEIGHT_NAME`, else its only .safetensors file.

  Raises:
    FileNotFoundError: nothing there to read.
  """
  path = os.fspath(path)
  if os.path.isfile(path):
    return path
  if not os.path.isdir(path):
    raise FileNotFoundError(f"LoRA file {path} does not exist")
  for name in (LORA_WEIGHT_NAME, PEFT_WEIGHT_NAME):
    if os.path.isfile(os.path.join(path, name)):
      return os.path.join(path, name)
  found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
  if len(found) != 1:
    raise FileNotFoundError(
        f"{path}: no {LORA_WEIGHT_NAME} or {PEFT_WEIGHT_NAME}, and "
        f"{len(found)} other .safetensors files ({found[:3]}): name the file")
  return os.path.join(path, found[0])


def _file_header(file: str) -> dict:
  """The `__metadata__` of a safetensors file's header ({} if none)."""
  with open(file, "rb") as f:
    size = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(size))
  return header.get("__metadata__") or {}


def _file_config(file: str, prefix: str) -> dict:
  """The file's PEFT LoRA config: diffusers' metadata header (its `prefix.` keys), else an
  `adapter_config.json` beside it, else {}."""
  header = _file_header(file)
  if header.get(METADATA_KEY):
    try:
      raw = json.loads(header[METADATA_KEY])
    except json.JSONDecodeError as e:
      raise LoraFileError(f"{file}: unreadable {METADATA_KEY} header: {e}") from e
    scoped = {k[len(prefix) + 1:]: v for k, v in raw.items() if k.startswith(prefix + ".")}
    return scoped or {k: v for k, v in raw.items() if "." not in k}
  config_file = os.path.join(os.path.dirname(file), PEFT_CONFIG_NAME)
  if os.path.isfile(config_file):
    return pipeline_io.read_json(config_file, "PEFT adapter config")
  return {}


def _file_scale(module: str, rank: int, config: dict, alphas: dict[str, float]) -> float:
  """lora_alpha / r (or / sqrt(r) with use_rslora) of one module of the file."""
  alpha = alphas.get(module)
  if alpha is None:
    for pattern, value in (config.get("alpha_pattern") or {}).items():
      key = pattern.lstrip("^")
      if module == key or module.endswith("." + key) or re.fullmatch(pattern, module):
        alpha = value
        break
  if alpha is None:
    alpha = config.get("lora_alpha", rank)
  return float(alpha) / (math.sqrt(rank) if config.get("use_rslora") else rank)


def read_lora_file(path: str, base: Params, modules: Sequence[str], rank: int, scale: float,
                   family: str | None = None) -> Params:
  """The factor tree of the LoRA file at `path` (see `find_lora_file`) for the Flax modules
  `modules` of `base` (e.g. `lora.select_targets(base, config.targets)`), rank `rank` and our
  scale `scale`: A = lora_Aᵀ (a conv's reshaped to (kh·kw·in, r)), B = (s_file / scale) ·
  lora_Bᵀ; float32 NumPy arrays.

  Raises:
    FileNotFoundError: no file.
    LoraFileError (naming the file): keys missing for some of `modules` and keys the file has
      beyond them (all listed at once); then factors of the wrong shape (each key named with
      its shape and the one expected).
  """
  file = find_lora_file(path)
  family, list_names, prefix = _family(base, family)
  kernels = _kernel_shapes(base)
  try:
    tensors = pipeline_io.LazySafetensors([file], dtype=np.float32)
  except ValueError as e:  # WeightLoadingError: a damaged or truncated file
    raise LoraFileError(f"{file}: not a readable safetensors file: {e}") from e
  keys = list(tensors)

  def name_of(key: str) -> str:  # the file key in PEFT naming, without its pipeline prefix
    for p in (prefix + ".", _PEFT_PREFIX):
      if key.startswith(p):
        key = key[len(p):]
        break
    for pattern, repl in _OLD_NAMES:
      key = pattern.sub(repl, key)
    return key

  wanted = {torch_module_name(m, list_names): m for m in modules}
  by_name = {name_of(k): k for k in keys}
  alphas = {}
  for name, key in by_name.items():
    if name.endswith(".alpha") and name[:-len(".alpha")] in wanted:
      alphas[name[:-len(".alpha")]] = float(np.asarray(tensors[key]).reshape(()))
  expected = {f"{m}.lora_{w}.weight" for m in wanted for w in "AB"}
  missing = sorted(f"{prefix}.{n}" for n in expected - set(by_name))
  extra = sorted(by_name[n] for n in set(by_name) - expected
                 if not (n.endswith(".alpha") and n[:-len(".alpha")] in alphas))
  if missing or extra:
    def show(names):
      return ", ".join(names[:10]) + (f", ... ({len(names)} in all)" if len(names) > 10 else "")
    raise LoraFileError(
        f"{file}: the LoRA file does not match the {family} modules the config adapts "
        f"({len(wanted)} modules, model.lora.targets): {len(missing)} missing keys"
        f"{' [' + show(missing) + ']' if missing else ''}; {len(extra)} extra keys"
        f"{' [' + show(extra) + ']' if extra else ''}")
  config = _file_config(file, prefix)
  out, bad = {}, []
  for name, path in sorted(wanted.items()):
    shape = kernels[path]
    fan_in, features = int(np.prod(shape[:-1])), shape[-1]
    key_a, key_b = by_name[f"{name}.lora_A.weight"], by_name[f"{name}.lora_B.weight"]
    down, up = tensors[key_a], tensors[key_b]
    if len(shape) == 4:
      want_a, want_b = (rank, shape[2], shape[0], shape[1]), (features, rank, 1, 1)
    else:
      want_a, want_b = (rank, fan_in), (features, rank)
      if down.ndim == 4 and down.shape[2:] == (1, 1):  # a 1x1 conv's factors for a Dense
        down = down[:, :, 0, 0]
    if up.ndim == 4 and up.shape[2:] == (1, 1) and len(want_b) == 2:
      up = up[:, :, 0, 0]
    wrong = [f"{k} {tuple(v.shape)}, expected {w}" for k, v, w in
             ((key_a, down, want_a), (key_b, up, want_b)) if tuple(v.shape) != w]
    if wrong:
      bad += wrong
      continue
    if len(shape) == 4:
      a = down.transpose(2, 3, 1, 0).reshape(fan_in, rank)
    else:
      a = down.T
    b = up.reshape(features, rank).T
    ratio = _file_scale(name, rank, config, alphas) / float(scale)
    a = np.ascontiguousarray(a, np.float32)
    b = np.ascontiguousarray(b if ratio == 1 else b.astype(np.float64) * ratio, np.float32)
    out[tuple(path.split("/")) + ("a",)] = a
    out[tuple(path.split("/")) + ("b",)] = b
  if bad:
    raise LoraFileError(f"{file}: {len(bad)} LoRA factors of the wrong shape for rank {rank} "
                        f"and the base model's layers: {'; '.join(bad[:10])}")
  return traverse_util.unflatten_dict(out)
