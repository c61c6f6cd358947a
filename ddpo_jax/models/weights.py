"""Mapping between PyTorch (diffusers / transformers) state dicts and Flax parameter trees.

The Flax modules in this package name their submodules after the PyTorch modules they port
(`down_blocks_0/resnets_1/conv1/kernel` <-> `down_blocks.0.resnets.1.conv1.weight`), so the
key table of each model is short: a set of *list names* (the PyTorch `ModuleList`s whose Flax
counterparts are named `NAME_INDEX`), optional renames of legacy PyTorch keys, and the leaf
rules below, which are the same for every model:

| Flax leaf          | PyTorch key suffix | transform                          |
|--------------------|--------------------|------------------------------------|
| `kernel` (4-D)     | `weight`           | (O, I, kh, kw) -> (kh, kw, I, O)    |
| `kernel` (2-D)     | `weight`           | (out, in) -> (in, out); a (out, in, 1, 1) conv weight loads into a Dense kernel too |
| `scale`            | `weight`           | none (LayerNorm / GroupNorm)        |
| `embedding`        | `weight`           | none (nn.Embedding)                 |
| anything else      | same name          | none (`bias`, `class_embedding`, ...) |

`torch_to_flax` checks every key and every shape against the Flax tree and raises
`WeightLoadingError` naming the file and the offending keys before anything is compiled.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util


# (Flax parameter path, shape) -> where the parameter goes (`torch_to_flax`'s `placement`).
Placement = Callable[[tuple[str, ...], tuple[int, ...]], Any]


class WeightLoadingError(ValueError):
  """A checkpoint does not match the model it is loaded into (missing/unexpected key, shape)."""


_INDEXED = re.compile(r"^(?P<name>.+)_(?P<index>\d+)$")


def flax_path_to_torch_key(path: tuple[str, ...], list_names: Iterable[str]) -> str:
  """Returns the PyTorch state-dict key of a Flax parameter path.

  Args:
    path: the Flax path, e.g. ("down_blocks_0", "resnets_1", "conv1", "kernel").
    list_names: PyTorch `ModuleList` attribute names; a Flax component `NAME_I` with NAME in
      this set becomes `NAME.I`.
  """
  list_names = frozenset(list_names)
  parts = []
  for component in path[:-1]:
    match = _INDEXED.match(component)
    if match and match["name"] in list_names:
      parts += [match["name"], match["index"]]
    else:
      parts.append(component)
  leaf = path[-1]
  parts.append("weight" if leaf in ("kernel", "scale", "embedding") else leaf)
  return ".".join(parts)


def _to_flax_layout(leaf: str, array: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray:
  if leaf == "kernel":
    if array.ndim == 4 and len(target_shape) == 4:
      return array.transpose(2, 3, 1, 0)
    if array.ndim == 4 and len(target_shape) == 2 and array.shape[2:] == (1, 1):
      array = array[:, :, 0, 0]
    if array.ndim == 2:
      return array.T
  return array


def _to_torch_layout(leaf: str, array: np.ndarray) -> np.ndarray:
  if leaf == "kernel":
    if array.ndim == 4:
      return array.transpose(3, 2, 0, 1)
    if array.ndim == 2:
      return array.T
  return array


def torch_to_flax(
    state_dict: Mapping[str, Any],
    abstract_params: Any,
    list_names: Iterable[str],
    *,
    renames: Iterable[tuple[str, str]] = (),
    ignore: Iterable[str] = (),
    source: str = "<state dict>",
    dtype: Any = jnp.float32,
    placement: Placement | None = None,
) -> dict:
  """Converts a PyTorch state dict into a Flax parameter tree, checking keys and shapes.

  Args:
    state_dict: key -> array (NumPy or anything `np.asarray` accepts).
    abstract_params: the Flax parameter tree (arrays or `jax.ShapeDtypeStruct`s, e.g. from
      `jax.eval_shape(model.init, ...)`), giving every expected path and shape.
    list_names: see `flax_path_to_torch_key`.
    renames: (regex, replacement) pairs applied to the incoming keys first (legacy names).
    ignore: regexes of incoming keys that are not parameters (buffers such as `position_ids`).
    source: what the state dict was read from, for error messages.
    dtype: dtype of the returned parameters.
    placement: (Flax path tuple, shape) -> the `jax.sharding.Sharding` of that parameter, or
      None for the default device. Each parameter is converted and placed before the next is
      read, so with a lazily read state dict (`pipeline_io.LazySafetensors`) the host holds one
      tensor at a time and every device only its shard (`jax.make_array_from_callback`).

  Raises:
    WeightLoadingError: on missing or unexpected keys or a shape mismatch; the message names
      `source` and the keys.
  """
  renames = [(re.compile(pattern), repl) for pattern, repl in renames]
  ignore = [re.compile(pattern) for pattern in ignore]
  incoming = {}  # renamed key -> key in `state_dict` (values are read one at a time below)
  for original in state_dict.keys():
    if any(p.search(original) for p in ignore):
      continue
    key = original
    for pattern, repl in renames:
      key = pattern.sub(repl, key)
    incoming[key] = original

  flat = traverse_util.flatten_dict(_unfreeze(abstract_params))
  wanted = {flax_path_to_torch_key(path, list_names): path for path in flat}
  missing = sorted(set(wanted) - set(incoming))
  unexpected = sorted(set(incoming) - set(wanted))
  if missing or unexpected:
    raise WeightLoadingError(
        f"{source}: state dict does not match the model: "
        f"{len(missing)} missing keys {_preview(missing)}, "
        f"{len(unexpected)} unexpected keys {_preview(unexpected)}")

  out, bad_shapes = {}, []
  for key, path in wanted.items():
    target_shape = tuple(flat[path].shape)
    value = np.asarray(state_dict[incoming[key]])
    array = _to_flax_layout(path[-1], value, target_shape)
    if tuple(array.shape) != target_shape:
      bad_shapes.append(f"{key}: checkpoint {tuple(value.shape)}, "
                        f"model expects {target_shape} (Flax layout)")
      continue
    if bad_shapes:  # an error is coming: do not place more
      continue
    # Cast on the host and transfer with device_put: a device-side convert, and jnp.asarray
    # itself (in jax 0.10), compile one program per shape.
    host = np.asarray(array, dtype=np.dtype(dtype))
    sharding = placement(path, target_shape) if placement is not None else None
    if sharding is None:
      out[path] = jax.device_put(host)
    else:
      out[path] = jax.make_array_from_callback(target_shape, sharding, host.__getitem__)
  if bad_shapes:
    raise WeightLoadingError(f"{source}: shape mismatch for {len(bad_shapes)} keys: "
                             + "; ".join(bad_shapes[:10]))
  return traverse_util.unflatten_dict(out)


def flax_to_torch(params: Any, list_names: Iterable[str], dtype=np.float32) -> dict[str, np.ndarray]:
  """Converts a Flax parameter tree into a PyTorch-layout state dict of NumPy arrays."""
  flat = traverse_util.flatten_dict(_unfreeze(params))
  return {
      flax_path_to_torch_key(path, list_names):
          np.ascontiguousarray(_to_torch_layout(path[-1], np.asarray(jax.device_get(v), dtype=dtype)))
      for path, v in flat.items()
  }


def _unfreeze(tree):
  return tree.unfreeze() if hasattr(tree, "unfreeze") else dict(tree)


def _preview(keys: list[str], n: int = 8) -> str:
  shown = ", ".join(keys[:n])
  return f"[{shown}{', ...' if len(keys) > n else ''}]"


def host_init(module, key: jax.Array, *example_inputs) -> dict:
  """`module`'s "params" for `example_inputs`, drawn on the host from `key`
  (`host_random_params` of the tree `module.init` would give; nothing is compiled)."""
  abstract = jax.eval_shape(module.init, key, *example_inputs)["params"]
  return host_random_params(abstract, key)


def host_random_params(abstract, key: jax.Array, dtype=jnp.float32) -> dict:
  """Random parameters for an abstract tree, drawn on the host with NumPy.

  The distributions are those of Flax's default initialisers: `kernel` truncated normal with
  fan-in variance (lecun_normal), `embedding` normal with variance 1/num_embeddings, `scale` ones,
  everything else (biases) zeros. Unlike `module.init`, this compiles nothing: flax's init run
  eagerly compiles one small program per parameter shape (26 s for the digits model on a 2-core
  CPU), and jitted it is one program of several seconds.

  Args:
    abstract: a parameter tree of arrays or `jax.ShapeDtypeStruct`s.
    key: a JAX PRNG key (raw uint32 or typed); only its bits seed the NumPy generator.
    dtype: dtype of the returned (device) arrays.
  """
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  rng = np.random.default_rng([int(x) for x in np.asarray(key).ravel()])
  flat = traverse_util.flatten_dict(abstract.unfreeze() if hasattr(abstract, "unfreeze")
                                    else dict(abstract))
  out = {}
  for path in sorted(flat):
    shape, leaf = tuple(flat[path].shape), path[-1]
    if leaf == "kernel":
      x = rng.standard_normal(shape, dtype=np.float32)
      bad = np.abs(x) > 2.0
      while bad.any():  # truncate to [-2, 2] by resampling
        x[bad] = rng.standard_normal(int(bad.sum()), dtype=np.float32)
        bad = np.abs(x) > 2.0
      # 0.8796... = std of a unit normal truncated to [-2, 2] (as jax.nn.initializers).
      x *= np.float32(1.0 / np.sqrt(np.prod(shape[:-1])) / 0.87962566103423978)
    elif leaf == "embedding":
      x = rng.standard_normal(shape, dtype=np.float32) * np.float32(1.0 / np.sqrt(shape[0]))
    elif leaf == "scale":
      x = np.ones(shape, np.float32)
    else:
      x = np.zeros(shape, np.float32)
    out[path] = jax.device_put(x.astype(jnp.dtype(dtype)))  # no compilation (see above)
  return traverse_util.unflatten_dict(out)
