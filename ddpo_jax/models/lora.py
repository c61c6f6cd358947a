"""LoRA (low-rank adaptation) of a Flax parameter tree: targets, initialisation, policy setup.

A LoRA of a layer with kernel W (fan_in..., out) is a pair A (fan_in, r), B (r, out); the
adapted layer computes y = layer_W(x) + (alpha / r) · layer_A(x) @ B beside the frozen W,
unmerged, in float32 (`ddpo_jax.models.adapters`: sampling and training run this one
application; `adapters.merged` folds the factors into the kernels for export). fan_in is the
product of all but the last kernel axis, so convolutions work as Dense layers do. B starts at
zero, so at initialisation the adapted model is the base model exactly. Only A and B are
trained; the base tree is frozen.

The defaults follow kvablack/ddpo-pytorch (diffusers' `LoRAAttnProcessor`): rank 4, A drawn
from N(0, (1/r)²), B = 0, scale alpha / r = 1, on the q/k/v/out projections of every attention
layer of the UNet.

Trees:
  base params: the Flax params dict, e.g. {"down_blocks_0": {"attentions_0": {...
    "attn1": {"to_q": {"kernel": (in, out)}, ...}}}}.
  LoRA params: a sparse tree with the same nesting down to each adapted module, whose leaf dict
    is {"a": (fan_in, r) float32, "b": (r, out) float32} in place of {"kernel", "bias"}.

Adapted modules are selected by regular expressions searched (`re.search`) in the module path,
the "/"-joined keys down to the dict holding "kernel", e.g.
"down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q".
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

# The attention projections of diffusers' UNet (self- and cross-attention).
from ddpo_jax.config_schema import LORA_DEFAULT_TARGETS as DEFAULT_TARGETS
from ddpo_jax.models import lora_io
from ddpo_jax.models.adapters import LoraAdapted

Params = Any


class LoraTargetError(ValueError):
  """A LoRA target pattern is invalid or matches no layer."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """rank r, alpha (scale = alpha / r), target regexes, A's init std (None: 1 / r), and a
  diffusers / PEFT LoRA file to start from instead ("": the random init; `load_lora`)."""
  rank: int = 4
  alpha: float = 4.0
  targets: tuple[str, ...] = DEFAULT_TARGETS
  init_std: float | None = None
  init_path: str = ""

  @property
  def scale(self) -> float:
    return float(self.alpha) / int(self.rank)

  @classmethod
  def from_config(cls, cfg) -> "LoraConfig":
    """From an ml_collections `model.lora` node (rank, alpha, targets, init_std: 0 = 1/rank,
    init_path)."""
    init_std = float(cfg.get("init_std", 0.0) or 0.0)
    return cls(rank=int(cfg.rank), alpha=float(cfg.alpha), targets=tuple(cfg.targets),
               init_std=init_std if init_std > 0 else None,
               init_path=str(cfg.get("init_path", "") or ""))


def module_paths(params: Params) -> list[str]:
  """The "/"-joined paths of every module of `params` that has a "kernel" (sorted)."""
  flat = traverse_util.flatten_dict(params)
  return sorted({"/".join(k[:-1]) for k in flat if k[-1] == "kernel"})


def select_targets(params: Params, targets: Sequence[str]) -> list[str]:
  """Module paths (with a kernel of rank ≥ 2) matched by any regex in `targets`.

  Raises:
    LoraTargetError: no targets, an invalid regex, or a regex that matches no layer (the
      message lists example layer names).
  """
  if isinstance(targets, str):
    targets = (targets,)
  if not targets:
    raise LoraTargetError("LoRA needs at least one target regex (model.lora.targets is empty)")
  paths = module_paths(params)
  flat = traverse_util.flatten_dict(params)
  selected = set()
  for pattern in targets:
    try:
      rx = re.compile(pattern)
    except re.error as e:
      raise LoraTargetError(
          f"LoRA target {pattern!r} is not a valid regular expression: {e}") from e
    hits = [p for p in paths if rx.search(p)]
    if not hits:
      examples = ", ".join(repr(p) for p in paths[:3] + [q for q in paths if "attn" in q][:3])
      raise LoraTargetError(
          f"LoRA target regex {pattern!r} matches no layer of the model (it is searched in "
          f"module paths such as {examples}; {len(paths)} layers have a kernel)")
    selected.update(hits)
  out = []
  for p in sorted(selected):
    kernel = flat[tuple(p.split("/")) + ("kernel",)]
    if kernel.ndim < 2:
      raise LoraTargetError(
          f"LoRA target {p!r} has a kernel of shape {kernel.shape}; need rank ≥ 2")
    out.append(p)
  return out


def init_lora(base_params: Params, config: LoraConfig, key: jax.Array) -> Params:
  """LoRA params for the modules of `base_params` matched by `config.targets`.

  A ~ N(0, init_std²) (default std 1/rank), B = 0; both float32. Deterministic for a key (one
  key per module, folded from the key by the module's index in sorted path order).

  Raises:
    LoraTargetError: see `select_targets`; ValueError: rank < 1.
  """
  if int(config.rank) < 1:
    raise ValueError(f"LoRA rank must be ≥ 1, got {config.rank}")
  flat = traverse_util.flatten_dict(base_params)
  std = config.init_std if config.init_std is not None else 1.0 / config.rank
  out = {}
  for i, path in enumerate(select_targets(base_params, config.targets)):
    kernel = flat[tuple(path.split("/")) + ("kernel",)]
    fan_in = int(np.prod(kernel.shape[:-1]))
    a = std * jax.random.normal(jax.random.fold_in(key, i), (fan_in, config.rank), jnp.float32)
    b = jnp.zeros((config.rank, kernel.shape[-1]), jnp.float32)
    out[tuple(path.split("/")) + ("a",)] = a
    out[tuple(path.split("/")) + ("b",)] = b
  return traverse_util.unflatten_dict(out)


def load_lora(path: str, base_params: Params, config: LoraConfig) -> Params:
  """The factors of the diffusers / PEFT LoRA file at `path` (a file, or a directory holding
  `pytorch_lora_weights.safetensors`, e.g. one `python -m ddpo_jax.export` wrote) for the
  modules of `base_params` that `config.targets` select, at `config.rank`, converted to
  `config.scale` (`models.lora_io.read_lora_file`); float32 device arrays.

  Raises:
    FileNotFoundError: no file; LoraTargetError: see `select_targets`;
    lora_io.LoraFileError: missing / extra keys (all listed, naming the file), wrong shapes.
  """
  modules = select_targets(base_params, config.targets)
  factors = lora_io.read_lora_file(path, base_params, modules, int(config.rank), config.scale)
  return jax.tree.map(lambda x: jax.device_put(np.asarray(x, np.float32)), factors)


def adapted_policy_params(params: dict, model_config) -> tuple[dict, Any]:
  """A family's {"unet": denoiser, ...frozen} params set up for LoRA training when
  `model_config.lora.enabled`: ({"unet": factors, "base_unet": the denoiser as given (its
  dtype is the family's `model.dtype`), ...}, assemble) with assemble(trainable, frozen) =
  `LoraAdapted(frozen["base_unet"], trainable, scale)`, the `Policy.assemble_denoiser` the
  denoiser function takes unmerged. Without LoRA: (params, identity). The factors start
  from `init_lora`, or with `model.lora.init_path` from that LoRA file (`load_lora`). Abstract
  params (`jax.ShapeDtypeStruct` leaves) give abstract factors (the file is not read).

  Raises:
    LoraTargetError, ValueError: see `init_lora`; FileNotFoundError, lora_io.LoraFileError:
      see `load_lora`.
  """
  if not model_config.get("lora") or not model_config.lora.enabled:
    return params, _trainable_tree
  config = LoraConfig.from_config(model_config.lora)
  def init():
    return init_lora(params["unet"], config, jax.random.PRNGKey(int(model_config.lora.seed)))
  abstract = any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params["unet"]))
  if abstract:
    factors = jax.eval_shape(init)  # shapes only for an abstract denoiser
  elif config.init_path:
    factors = load_lora(config.init_path, params["unet"], config)
  else:
    factors = init()
  return ({**params, "unet": factors, "base_unet": params["unet"]},
          functools.partial(_adapt, scale=config.scale))


def _trainable_tree(trainable, frozen):
  del frozen
  return trainable


def _adapt(trainable, frozen, scale: float) -> LoraAdapted:
  return LoraAdapted(frozen["base_unet"], trainable, scale)


def num_params(tree: Params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
