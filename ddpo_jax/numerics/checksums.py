"""Checksums of every array of a pytree: how checkpoints and the cached pre-trained digits model
are verified when read back (`checkpoints.RunCheckpoints`, `digits.load_or_pretrain`).

Each array gets two 32-bit sums of its words (the plain sum, and the sum of position-mixed
hashes), keyed by its path (`parallel.path_str`); integer sums do not depend on the order of
the reduction, so the numbers are the same on every backend, mesh and host count.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ddpo_jax.numerics import parallel


def _fmix32(h: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finaliser (uint32 -> uint32, every input bit reaches every output bit)."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
  """The bits of `x` as a flat uint32 vector (16- and 8-bit elements widened, 64-bit split)."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
  return jax.lax.bitcast_convert_type(x, bits).astype(jnp.uint32).reshape(-1)


def _leaf_checksum(x: jax.Array) -> jax.Array:
  """(2,) uint32: the sum of the array's 32-bit words, and the sum of their hashes with their
  positions, both modulo 2**32. Sums of integers do not depend on the order of the reduction, so
  the value is the same on every backend, mesh and host count; one flipped bit always changes
  the first sum, a swap or several flips the second with probability 1 - 2**-32."""
  u = _words(x)
  position = jnp.arange(u.size, dtype=jnp.uint32) * jnp.uint32(0x9E3779B9)
  return jnp.stack([jnp.sum(u, dtype=jnp.uint32), jnp.sum(_fmix32(u ^ position), dtype=jnp.uint32)])


_checksums = jax.jit(lambda tree: jax.tree.map(_leaf_checksum, tree))

# States up to this size (bytes) whose arrays are all on this process are checksummed on the
# host with NumPy (the same numbers): the compiled program costs ~4 s of tracing and compiling
# for the digits TrainState's 627 arrays on a CPU, NumPy ~2 ms. Larger or multi-process states
# use the compiled program on their devices (no host copy of a large model).
HOST_CHECKSUM_MAX_BYTES = 256 * 2**20


def _host_leaf_checksum(x: np.ndarray) -> list[int]:
  """`_leaf_checksum` in NumPy (uint64 arithmetic reduced modulo 2**32)."""
  a = np.asarray(x)
  if a.dtype == np.bool_:
    a = a.astype(np.uint8)
  bits = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint32}[a.dtype.itemsize]
  u = np.ascontiguousarray(a).view(bits).astype(np.uint64).reshape(-1)
  m = np.uint64(0xFFFFFFFF)
  h = u ^ ((np.arange(u.size, dtype=np.uint64) * np.uint64(0x9E3779B9)) & m)
  h ^= h >> np.uint64(16)
  h = (h * np.uint64(0x85EBCA6B)) & m
  h ^= h >> np.uint64(13)
  h = (h * np.uint64(0xC2B2AE35)) & m
  h ^= h >> np.uint64(16)
  return [int(u.sum() % 2**32), int(h.sum() % 2**32)]


def state_checksums(state: Any) -> dict[str, list[int]]:
  """{array path ("params/conv_in/kernel", `parallel.path_str`): [word sum, positional hash
  sum]} of every array of `state` (global arrays: the same dict on every process). The paths
  do not depend on the containers, so a state read back as nested dicts has the checksums of
  the `TrainState` that was saved. Computed on the host for small single-process states, else
  by one compiled program (`HOST_CHECKSUM_MAX_BYTES`); both give the same numbers."""
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  local = all(getattr(x, "is_fully_addressable", True) for _, x in leaves)
  nbytes = sum(x.nbytes if hasattr(x, "nbytes") else np.asarray(x).nbytes for _, x in leaves)
  if local and nbytes <= HOST_CHECKSUM_MAX_BYTES:
    if any(jnp.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key)
           for _, x in leaves):
      state = jax.tree.map(lambda x: jax.random.key_data(x) if jnp.issubdtype(
          x.dtype, jax.dtypes.prng_key) else x, state)
      leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    host = jax.device_get([x for _, x in leaves])
    return {parallel.path_str(path): _host_leaf_checksum(x)
            for (path, _), x in zip(leaves, host)}
  sums = parallel.to_host(_checksums(state))
  return {parallel.path_str(path): [int(v) for v in np.asarray(s)]
          for path, s in jax.tree_util.tree_flatten_with_path(sums)[0]}


def checksum_mismatches(expected: dict[str, list[int]], state: Any) -> list[str]:
  """The array paths (sorted) whose checksums in `state` differ from `expected` (from
  `state_checksums`), arrays missing on either side included."""
  got = state_checksums(state)
  return sorted(k for k in set(expected) | set(got) if expected.get(k) != got.get(k))
