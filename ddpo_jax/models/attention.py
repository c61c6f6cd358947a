"""Scaled dot-product attention with a cuDNN fast path and a portable XLA path.

`dot_product_attention` is the single attention kernel used by the UNet, the VAE and (if it
wants to) the CLIP port. Layout is "BLHD" (batch, length, heads, head_dim) like
`jax.nn.dot_product_attention`.

Implementations:
  * "xla": einsum -> softmax -> einsum. The logits are accumulated and the softmax is taken in
    float32 whatever the input dtype (this is diffusers' `upcast_attention` / `upcast_softmax`
    behaviour), the result is cast back to the dtype of `v`. Runs everywhere. Memory-efficient:
    computed in blocks of at most 2^20 logits (or one (batch, head) pair's, if larger): groups
    of heads, or one head's queries in chunks, the whole batch in every block (so a batch split
    over devices is never gathered); the backward pass recomputes a block's softmax weights
    rather than keeping all (B, H, Lq, Lk) of them (a custom VJP; gradients accumulate in
    float32).
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


# Work per block of the blocked XLA path: at most this many logits (f32) per block, i.e. 4 MiB,
# about one core's L2 cache on the CPUs we run tests on (or one (batch, head) pair's Lq x Lk,
# when that is larger).
_BLOCK_LOGITS = 1 << 20


def _divisor_at_most(n: int, limit: int) -> int:
  """The largest divisor of n that is at most max(1, limit)."""
  d = max(1, min(n, limit))
  while n % d:
    d -= 1
  return d


def _block_layout(h: int, b: int, lq: int, lk: int) -> tuple[int, int]:
  """(heads per block, query chunks per head) for (H, B, Lq, Lk) operands: every block holds
  the whole batch (so a batch split over devices stays on its devices), and at most
  max(_BLOCK_LOGITS, Lq·Lk) logits: several heads when one head's B·Lq·Lk fits, else one head
  and its queries in chunks."""
  budget = max(_BLOCK_LOGITS, lq * lk)
  per_head = b * lq * lk
  if per_head <= budget:
    return _divisor_at_most(h, budget // per_head), 1
  return 1, lq // _divisor_at_most(lq, budget // (b * lk))


def _attention_block(q, k, v, scale):
  """(..., Lq, D), (..., Lk, D), (..., Lk, D) -> out (..., Lq, D) in v's dtype, weights
  (..., Lq, Lk) f32."""
  logits = jnp.einsum("...qd,...kd->...qk", q, k, preferred_element_type=jnp.float32)
  weights = jax.nn.softmax(logits * scale, axis=-1)
  out = jnp.einsum("...qk,...kd->...qd", weights.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return out.astype(v.dtype), weights


def _blocked(fn, q, k, v, d_out=None):
  """`fn(q, k, v[, d_out])` on (H, B, L, D) operands, one block (`_block_layout`) after another:
  groups of heads, or one head's query chunks; the batch axis is never split. Returns fn's
  outputs reassembled: query-shaped ones (H, B, Lq, D), key-shaped ones (H, B, Lk, D)."""
  h, b, lq, _ = q.shape
  heads, chunks = _block_layout(h, b, lq, k.shape[2])
  if heads == h and chunks == 1:
    return fn(q, k, v) if d_out is None else fn(q, k, v, d_out)
  group = lambda a: a.reshape((h // heads, heads) + a.shape[1:])  # (G, heads, B, L, D)
  ungroup = lambda a: a.reshape((h,) + a.shape[2:])
  if chunks == 1:
    args = (q, k, v) if d_out is None else (q, k, v, d_out)
    outs = jax.lax.map(lambda xs: fn(*xs), tuple(group(a) for a in args))
    return jax.tree.map(ungroup, outs)

  def chunk(a):  # (H, B, Lq, D) -> (H, C, B, Lq/C, D): one head's chunks in a row
    return jnp.swapaxes(a.reshape(a.shape[:2] + (chunks, lq // chunks) + a.shape[3:]), 1, 2)

  def unchunk(a):
    return jnp.swapaxes(a, 1, 2).reshape(a.shape[:1] + (a.shape[2], lq) + a.shape[4:])

  def per_head(xs):  # one head: its query chunks one after another against its keys
    qh, kh, vh = xs[:3]
    if d_out is None:
      return jax.lax.map(lambda qc: fn(qc, kh, vh), qh)
    outs = jax.lax.map(lambda c: fn(c[0], kh, vh, c[1]), (qh, xs[3]))
    return outs[0], jnp.sum(outs[1], axis=0), jnp.sum(outs[2], axis=0)  # d_k, d_v: all chunks

  args = (chunk(q), k, v) if d_out is None else (chunk(q), k, v, chunk(d_out))
  outs = jax.lax.map(per_head, args)
  if d_out is None:
    return unchunk(outs)
  return unchunk(outs[0]), outs[1], outs[2]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _memory_efficient_attention(q, k, v, scale):
  """Attention over (H, B, L, D) operands, computed in blocks (`_blocked`); the backward pass
  recomputes each block's weights instead of keeping the (H, B, Lq, Lk) weights."""
  return _blocked(lambda q, k, v: _attention_block(q, k, v, scale)[0], q, k, v)


def _memory_efficient_attention_fwd(q, k, v, scale):
  return _memory_efficient_attention(q, k, v, scale), (q, k, v)


def _memory_efficient_attention_bwd(scale, residuals, d_out):
  q, k, v = residuals

  def block_grads(q, k, v, d_out):
    _, w = _attention_block(q, k, v, scale)
    f32 = dict(preferred_element_type=jnp.float32)
    # The two products that contract over the queries take the (.., Lq, Lk) matrix as the
    # right operand, contracted over its major axis (a plain matrix product), and a small
    # transposed (.., D, Lq) left operand; the result comes out as (.., D, Lk) and is
    # transposed back. Written as "nqk,nqd->nkd" they contract the big matrix's major axis on
    # the left, which XLA:CPU ran 3.4x slower (5.1 vs 1.5 ms at n=32, Lq=Lk=256, D=16).
    t = lambda a: jnp.swapaxes(a, -1, -2)
    d_v = t(jnp.einsum("...dq,...qk->...dk", t(d_out), w.astype(d_out.dtype), **f32))
    d_w = jnp.einsum("...qd,...kd->...qk", d_out, v, **f32)
    d_logits = (w * (d_w - jnp.sum(d_w * w, axis=-1, keepdims=True)) * scale).astype(q.dtype)
    d_q = jnp.einsum("...qk,...kd->...qd", d_logits, k, **f32)
    d_k = t(jnp.einsum("...dq,...qk->...dk", t(q), d_logits, **f32))
    # d_k, d_v stay float32 until every query chunk is summed
    return d_q.astype(q.dtype), d_k, d_v

  d_q, d_k, d_v = _blocked(block_grads, q, k, v, d_out)
  return d_q, d_k.astype(k.dtype), d_v.astype(v.dtype)


_memory_efficient_attention.defvjp(_memory_efficient_attention_fwd,
                                   _memory_efficient_attention_bwd)


def _xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
  """BLHD in and out. Heads go first and the batch second, (H, B, L, D), so that both
  contractions are batched matrix products with the contracted dimension minor (contracting the
  BLHD operands directly made XLA:CPU run slow strided dots: 4.3x slower on the benchmark UNet's
  self-attention), and the blocks of `_memory_efficient_attention` (heads, or query chunks)
  never split the batch: a batch split over devices stays on its devices (blocks of merged
  (batch, head) pairs made XLA all-gather the operands: 146 all-gathers, 9.3 GiB per call in
  SD-1.5's sampling program on 8 TPU v5e devices, `python -m ddpo_jax.plan`)."""
  t = lambda a: jnp.transpose(a, (2, 0, 1, 3))
  out = _memory_efficient_attention(t(q), t(k), t(v), scale)
  return jnp.transpose(out, (1, 2, 0, 3))


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
