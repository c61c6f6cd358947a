"""Low-rank adapters (LoRA) applied beside frozen layers, unmerged, as peft applies them.

A LoRA of a `nn.Dense` or `nn.Conv` layer with kernel W (k..., fan_in_c, out) is a pair of
factors A (fan_in, r), B (r, out), fan_in = prod(W.shape[:-1]). The adapted layer computes

    y = layer_W(x) + s · (layer_A(x) @ B)                        (s = alpha / r)

with layer_A the same layer (same kernel size, strides, padding) with `r` output features and
kernel reshape(A, W.shape[:-1] + (r,)), no bias. This equals the layer with the merged kernel
W + s · reshape(A @ B, W.shape), but W stays as it is (bfloat16, say) and is never copied: the
base branch runs in the layer's compute dtype, the adapter branch in float32 (x is cast to
float32, A and B are float32), and their sum is cast back to the layer's output dtype, as
peft's `lora.Linear.forward` does. So a small adapter update is not rounded away on the
bfloat16 grid of W, and no merged copy of the kernels is held in memory. Unlike peft, the base
product is kept in float32 (its accumulator) until the adapter branch is added, so the sum is
rounded once: an adapter change smaller than half an ulp of a bfloat16 output is not rounded
away either (the rounding point is dithered by the float32 base product), where rounding the
base product first would put it back on the bfloat16 grid.

`LoraAdapted(base, factors, scale)` is what a denoiser function takes in place of its params
tree when a LoRA is trained; `apply(module, params, *args)` runs `module.apply` with either a
plain tree or a `LoraAdapted`; `merged(params)` gives the plain tree with the factors merged
into the kernels (for export; float32 kernels where the factors are float32).

Trees:
  base: the Flax params dict of the module (inner dict, without {"params": ...}).
  factors: a sparse tree with the same nesting down to each adapted module, whose leaf dict
    is {"a": (fan_in, r) float32, "b": (r, out) float32} (`ddpo_jax.models.lora.init_lora`).
"""
from __future__ import annotations

import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from flax import traverse_util

Params = Any


@flax.struct.dataclass
class LoraAdapted:
  """A frozen params tree with LoRA factors applied beside its adapted layers.

  Attributes:
    base: the frozen params tree (any dtype; bfloat16 in the LoRA recipes).
    factors: {module path...: {"a": (fan_in, r), "b": (r, out)}}, float32 (trainable).
    scale: alpha / rank (static: part of the compiled program).
  """
  base: Params
  factors: Params
  scale: float = flax.struct.field(pytree_node=False)


def _factor_table(factors: Params) -> dict[tuple[str, ...], tuple[Any, Any]]:
  flat = traverse_util.flatten_dict(factors)
  modules = sorted({k[:-1] for k in flat})
  return {m: (flat[m + ("a",)], flat[m + ("b",)]) for m in modules}


def _adapter_branch(layer: nn.Module, x, a, b, scale: float):
  """s · (layer_A(x) @ B) in float32, layer_A being `layer` with r features, kernel A."""
  rank = a.shape[-1]
  if isinstance(layer, nn.Conv):
    kernel_size = ((layer.kernel_size,) if isinstance(layer.kernel_size, int)
                   else tuple(layer.kernel_size))
    kernel = a.reshape(kernel_size + (-1, rank))
  else:
    kernel = a
  low = layer.clone(parent=None, features=rank, use_bias=False, dtype=jnp.float32,
                    param_dtype=jnp.float32)
  h = low.apply({"params": {"kernel": kernel.astype(jnp.float32)}}, x.astype(jnp.float32))
  return scale * (h @ b.astype(jnp.float32))


def _output_dtype(layer: nn.Module, x):
  """What the layer returns: its compute dtype, or (None) its operands' promoted dtype."""
  return layer.dtype or jnp.result_type(x, layer.variables["params"]["kernel"])


def _base_branch_float32(layer: nn.Module, x):
  """layer_W(x) with the layer's operand dtypes (bfloat16 inputs and kernel stay bfloat16) but
  a float32 result (`preferred_element_type`: the accumulator the hardware keeps anyway), so
  that adding the adapter branch rounds once, not twice.

  Its gradient (W is frozen: only the input's) is the layer's own, from the cotangent in the
  layer's output dtype: differentiating the float32-result product directly would transpose it
  against float32 copies of every adapted kernel (measured: +5 GiB of temporaries in a
  compiled FLUX.1 LoRA step, benchmarks/memory.py)."""
  params = layer.variables["params"]
  out_dtype = _output_dtype(layer, x)
  if isinstance(layer, nn.Conv):
    conv = layer.conv_general_dilated or lax.conv_general_dilated
    wide = layer.clone(parent=None, conv_general_dilated=functools.partial(
        conv, preferred_element_type=jnp.float32))
  else:
    dot = layer.dot_general or lax.dot_general
    wide = layer.clone(parent=None, dot_general=functools.partial(
        dot, preferred_element_type=jnp.float32))
  narrow = layer.clone(parent=None)

  @jax.custom_vjp
  def product(x, params):
    return wide.apply({"params": params}, x).astype(jnp.float32)

  def forward(x, params):
    return product(x, params), (x, params)

  def backward(residuals, cotangent):
    x, params = residuals
    _, input_vjp = jax.vjp(lambda x: narrow.apply({"params": params}, x), x)
    (dx,) = input_vjp(cotangent.astype(out_dtype))
    return dx, jax.tree.map(jnp.zeros_like, params)  # frozen: never consumed

  product.defvjp(forward, backward)
  return product(x, params)


def apply(module: nn.Module, params: Params | LoraAdapted, *args, **kwargs):
  """`module.apply({"params": params}, *args, **kwargs)`; for a `LoraAdapted`, the base tree
  with every adapted Dense / Conv layer computing y = layer_W(x) + s · layer_A(x) @ B: the
  base product with the layer's operand dtypes and a float32 result, the adapter branch in
  float32, their sum rounded once to the layer's output dtype.

  Raises:
    ValueError: a factor names a module that the call never runs as an `nn.Dense` or `nn.Conv`
      (its adapter would silently do nothing).
  """
  if not isinstance(params, LoraAdapted):
    return module.apply({"params": params}, *args, **kwargs)
  table = _factor_table(params.factors)
  used = set()

  def interceptor(next_fun, call_args, call_kwargs, context):
    layer = context.module
    if context.method_name != "__call__" or not isinstance(layer, (nn.Dense, nn.Conv)):
      return next_fun(*call_args, **call_kwargs)
    ab = table.get(tuple(layer.path))
    if ab is None:
      return next_fun(*call_args, **call_kwargs)
    used.add(tuple(layer.path))
    x = call_args[0] if call_args else call_kwargs["inputs"]
    y = _base_branch_float32(layer, x) + _adapter_branch(layer, x, *ab, params.scale)
    return y.astype(_output_dtype(layer, x))

  with nn.intercept_methods(interceptor):
    out = module.apply({"params": params.base}, *args, **kwargs)
  missing = sorted("/".join(m) for m in table if m not in used)
  if missing:
    raise ValueError(f"LoRA factors for {missing[:3]} ({len(missing)} modules) are not applied: "
                     "no nn.Dense or nn.Conv with that path runs in this call")
  return out


def merged(params: Params | LoraAdapted) -> Params:
  """The plain params tree: a `LoraAdapted`'s base with each adapted kernel replaced by
  W + s · reshape(A @ B, W.shape), in float32 where W is float32 or narrower (the layer casts
  it to its compute dtype); any other tree as it is. With B == 0 the kernels equal W exactly.

  Raises:
    KeyError: a factor's module has no kernel in the base tree.
  """
  if not isinstance(params, LoraAdapted):
    return params
  flat = dict(traverse_util.flatten_dict(params.base))
  for module, (a, b) in _factor_table(params.factors).items():
    key = module + ("kernel",)
    if key not in flat:
      raise KeyError(f"LoRA module {'/'.join(module)!r} has no kernel in the base params")
    w = flat[key]
    dtype = jnp.promote_types(w.dtype, jnp.float32)
    delta = (a.astype(jnp.float32) @ b.astype(jnp.float32)).reshape(w.shape)
    flat[key] = w.astype(dtype) + jnp.asarray(params.scale, dtype) * delta.astype(dtype)
  return traverse_util.unflatten_dict(flat)
