"""Scaled dot-product attention with a cuDNN fast path and a portable XLA path.

`dot_product_attention` is the single attention kernel used by the UNet, the VAE and (if it
wants to) the CLIP port. Layout is "BLHD" (batch, length, heads, head_dim) like
`jax.nn.dot_product_attention`.

Implementations:
  * "xla": einsum -> softmax -> einsum. The logits are accumulated and the softmax is taken in
    float32 whatever the input dtype (this is diffusers' `upcast_attention` / `upcast_softmax`
    behaviour), the result is cast back to the dtype of `v`. Runs everywhere. Memory-efficient:
    computed in blocks of (batch, head) pairs of at most 2^20 logits each, and the backward pass
    recomputes a block's softmax weights rather than keeping all (B, H, Lq, Lk) of them (a custom
    VJP; gradients accumulate in float32).
  * "cudnn": `jax.nn.dot_product_attention(..., implementation="cudnn")` (flash attention). Only
    on NVIDIA GPUs and for fp16/bf16 inputs.
  * "auto": "cudnn" when the default backend is GPU and the inputs are fp16/bf16, falling back to
    "xla" when cuDNN rejects the shapes/dtypes (the check happens at trace time); "xla" otherwise.
"""
from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp

from ddpo_jax.models import backend

IMPLEMENTATIONS = ("auto", "xla", "cudnn")

_LOW_PRECISION = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))
_log = logging.getLogger(__name__)


# Work per block of the blocked XLA path: at most this many logits (f32) per block of
# (batch, head) pairs, i.e. 4 MiB, about one core's L2 cache on the CPUs we run tests on.
_BLOCK_LOGITS = 1 << 20


def _num_blocks(n: int, lq: int, lk: int) -> int:
  """How many blocks the n (batch, head) pairs are split into (a divisor of n)."""
  per_block = max(1, min(n, _BLOCK_LOGITS // max(1, lq * lk)))
  while n % per_block:
    per_block -= 1
  return n // per_block


def _attention_block(q, k, v, scale):
  """(n, Lq, D), (n, Lk, D), (n, Lk, D) -> out (n, Lq, D) in v's dtype, weights (n, Lq, Lk) f32."""
  logits = jnp.einsum("nqd,nkd->nqk", q, k, preferred_element_type=jnp.float32)
  weights = jax.nn.softmax(logits * scale, axis=-1)
  out = jnp.einsum("nqk,nkd->nqd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.astype(v.dtype), weights


def _blocked(fn, blocks: int, *arrays):
  """Applies `fn` to `blocks` consecutive slices of the leading axis, one after another."""
  if blocks == 1:
    return fn(*arrays)
  split = lambda a: a.reshape((blocks, a.shape[0] // blocks) + a.shape[1:])
  outs = jax.lax.map(lambda xs: fn(*xs), tuple(split(a) for a in arrays))
  return jax.tree.map(lambda o: o.reshape((-1,) + o.shape[2:]), outs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _memory_efficient_attention(q, k, v, scale):
  """Attention over (n, L, D) operands, computed in blocks of (batch, head) pairs; the backward
  pass recomputes each block's weights instead of keeping the (n, Lq, Lk) weights."""
  blocks = _num_blocks(q.shape[0], q.shape[1], k.shape[1])
  return _blocked(lambda q, k, v: _attention_block(q, k, v, scale)[0], blocks, q, k, v)


def _memory_efficient_attention_fwd(q, k, v, scale):
  return _memory_efficient_attention(q, k, v, scale), (q, k, v)


def _memory_efficient_attention_bwd(scale, residuals, d_out):
  q, k, v = residuals

  def block_grads(q, k, v, d_out):
    _, w = _attention_block(q, k, v, scale)
    f32 = dict(preferred_element_type=jnp.float32)
    # The two products that contract over the queries take the (n, Lq, Lk) matrix as the
    # right operand, contracted over its major axis (a plain matrix product), and a small
    # transposed (n, D, Lq) left operand; the result comes out as (n, D, Lk) and is transposed
    # back. Written as "nqk,nqd->nkd" they contract the big matrix's major axis on the left,
    # which XLA:CPU ran 3.4x slower (5.1 vs 1.5 ms at n=32, Lq=Lk=256, D=16).
    t = lambda a: jnp.swapaxes(a, 1, 2)
    d_v = t(jnp.einsum("ndq,nqk->ndk", t(d_out), w.astype(d_out.dtype), **f32))
    d_w = jnp.einsum("nqd,nkd->nqk", d_out, v, **f32)
    d_logits = (w * (d_w - jnp.sum(d_w * w, axis=-1, keepdims=True)) * scale).astype(q.dtype)
    d_q = jnp.einsum("nqk,nkd->nqd", d_logits, k, **f32)
    d_k = t(jnp.einsum("ndq,nqk->ndk", t(q), d_logits, **f32))
    return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype)

  blocks = _num_blocks(q.shape[0], q.shape[1], k.shape[1])
  return _blocked(block_grads, blocks, q, k, v, d_out)


_memory_efficient_attention.defvjp(_memory_efficient_attention_fwd,
                                   _memory_efficient_attention_bwd)


def _xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
  """BLHD in and out. Heads go before tokens and are merged with the batch, (B·H, L, D), so that
  both contractions are batched matrix products with the contracted dimension minor
  (contracting the BLHD operands directly made XLA:CPU run slow strided dots: 4.3x slower on
  the benchmark UNet's self-attention), then `_memory_efficient_attention`."""
  b, lq, h, d = q.shape
  merge = lambda a: jnp.swapaxes(a, 1, 2).reshape((b * h, a.shape[1], a.shape[3]))
  out = _memory_efficient_attention(merge(q), merge(k), merge(v), scale)
  return jnp.swapaxes(out.reshape((b, h, lq, v.shape[3])), 1, 2)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          implementation: str = "auto",
                          scale: float | None = None) -> jax.Array:
  """Multi-head scaled dot-product attention (no mask, no bias, not causal).

  Args:
    q: queries, (B, Lq, H, Dh).
    k: keys, (B, Lk, H, Dh), same dtype as `q`.
    v: values, (B, Lk, H, Dh), same dtype as `q`.
    implementation: "auto", "xla" or "cudnn" (see the module docstring).
    scale: logit scale; default `1 / sqrt(Dh)`.

  Returns:
    (B, Lq, H, Dh) in the dtype of `v`.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}, "
                     f"got {implementation!r}")
  if scale is None:
    scale = 1.0 / math.sqrt(q.shape[-1])
  if implementation == "xla":
    return _xla_attention(q, k, v, scale)
  if implementation == "cudnn":
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
  # "auto"
  if backend.target_platform() == "gpu" and jnp.dtype(q.dtype) in _LOW_PRECISION:
    try:
      return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
    except Exception as e:  # cuDNN rejects the shape / dtype / version: use the XLA path.
      _log.debug("cuDNN attention unavailable for q%s k%s %s (%s); using XLA.",
                 q.shape, k.shape, q.dtype, e)
  return _xla_attention(q, k, v, scale)
