"""LoRA (low-rank adaptation) of a Flax parameter tree, applied by merging into the kernels.

A LoRA of a layer with kernel W (fan_in..., out) is a pair A (fan_in, r), B (r, out) with

    W' = W + (alpha / r) · reshape(A @ B, W.shape)

(fan_in is the product of all but the last kernel axis, so 1×1 convolutions work as Dense
layers do). B starts at zero, so at initialisation W' == W bit for bit and the adapted model is
the base model. Only A and B are trained; the base tree is frozen.

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
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

# The attention projections of diffusers' UNet (self- and cross-attention).
from ddpo_jax.config_schema import LORA_DEFAULT_TARGETS as DEFAULT_TARGETS

Params = Any


class LoraTargetError(ValueError):
  """A LoRA target pattern is invalid or matches no layer."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """rank r, alpha (scale = alpha / r), target regexes, A's init std (None: 1 / r)."""
  rank: int = 4
  alpha: float = 4.0
  targets: tuple[str, ...] = DEFAULT_TARGETS
  init_std: float | None = None

  @property
  def scale(self) -> float:
    return float(self.alpha) / int(self.rank)

  @classmethod
  def from_config(cls, cfg) -> "LoraConfig":
    """From an ml_collections `model.lora` node (rank, alpha, targets, init_std; 0 = 1/rank)."""
    init_std = float(cfg.get("init_std", 0.0) or 0.0)
    return cls(rank=int(cfg.rank), alpha=float(cfg.alpha), targets=tuple(cfg.targets),
               init_std=init_std if init_std > 0 else None)


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


def merge_lora(base_params: Params, lora_params: Params, scale: float = 1.0) -> Params:
  """UNet params with every adapted kernel replaced by W + scale · reshape(A @ B, W.shape).

  Pure and jit-able; differentiable in `lora_params`. Leaves that are not adapted are returned
  as they are (no copy). Merged kernels are float32 if W is float32 or lower precision (the
  module casts them to its compute dtype), so a LoRA on bfloat16 base weights keeps its update.
  With B == 0 the merged kernels equal W exactly.

  Args:
    base_params: the frozen base tree.
    lora_params: a tree from `init_lora` (sparse, {"a", "b"} leaves).
    scale: alpha / rank.

  Raises:
    KeyError: a LoRA module missing from `base_params`.
  """
  flat = dict(traverse_util.flatten_dict(base_params))
  lora_flat = traverse_util.flatten_dict(lora_params)
  modules = sorted({k[:-1] for k in lora_flat})
  for m in modules:
    kkey = m + ("kernel",)
    if kkey not in flat:
      raise KeyError(f"LoRA module {'/'.join(m)!r} has no kernel in the base params")
    w = flat[kkey]
    a, b = lora_flat[m + ("a",)], lora_flat[m + ("b",)]
    delta = (a.astype(jnp.float32) @ b.astype(jnp.float32)).reshape(w.shape)
    dtype = jnp.promote_types(w.dtype, jnp.float32)
    flat[kkey] = w.astype(dtype) + jnp.asarray(scale, dtype) * delta.astype(dtype)
  return traverse_util.unflatten_dict(flat)


def num_params(tree: Params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
