"""2-D convolution whose gradient stays on XLA:CPU's fast path, inside loops too.

Why: XLA:CPU runs a convolution through Eigen only when its dimension numbers are canonical
(input NHWC, kernel HWIO, output NHWC); any other one is emitted as a naive loop nest, one to
two orders of magnitude slower. Autodiff of an NHWC/HWIO convolution produces two
non-canonical ones: the input gradient (kernel dims `01oi`) and the kernel gradient
(`f01b_i01o->01bf`, batch and features swapped). XLA:CPU's `ConvCanonicalization` pass rewrites
such convolutions into transposes around a canonical one, but it visits only the entry
computation, so a convolution inside a `while` body, i.e. every gradient taken inside a
`lax.scan` (the update's micro-step loop, the backprop solver's chain), stays on the naive
path. Measured on the tiny SD-2-style UNet (batch 16, 16x16x4 latents, 2-core CPU): 8
parameter gradients in a scan 19.6 s vs 4.9 s as 8 separate calls
(`python benchmarks/grad_loop.py`).

What: `conv_general_dilated`, a drop-in for `lax.conv_general_dilated` (flax's
`nn.Conv(conv_general_dilated=...)`). On the CPU backend, for NHWC/HWIO convolutions without
dilation or feature groups, it is a custom VJP whose backward pass is written in canonical
form wherever it is traced:
  * input gradient: the cotangent, zero-interleaved (stride) and padded with `lax.pad`, is
    convolved (canonical NHWC/HWIO, stride 1) with the spatially flipped, io-swapped kernel;
  * kernel gradient: the convolution XLA's canonicalisation would have made of it at top
    level, written out: the input transposed to (Cin, H, W, B) convolved (canonical, stride 1)
    with the cotangent transposed to a (Ho, Wo, B, Cout) kernel dilated by the stride, giving
    (Cin, kh, kw, Cout); for 1x1 kernels, one matrix product of the input with the cotangent.
    (A first version took one matrix product of all kh·kw input patches, concatenated: 9
    times the input's size in temporaries and a transpose of them; in the tiny UNet's
    gradient its concatenations and transposes took about 15% of the time.)
Elsewhere (GPU/TPU, other layouts) it is `lax.conv_general_dilated` itself: cuDNN and the TPU
compiler handle every layout. The forward pass is `lax.conv_general_dilated` everywhere, so
values are unchanged; gradients agree to float rounding (tests/test_conv.py).
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from ddpo_jax.models import backend

_NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1),
                                 out_spec=(0, 3, 1, 2))


def _forward(x, w, strides, padding):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d_nhwc(x: jax.Array, w: jax.Array, strides: tuple[int, int],
                padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
  """x (B, H, W, Cin), w (kh, kw, Cin, Cout) -> (B, Ho, Wo, Cout), explicit (lo, hi) padding.

  Ho = (H + lo + hi − kh) // stride + 1 (likewise Wo). Output dtype is x's (= w's) dtype.
  """
  return _forward(x, w, strides, padding)


def _conv2d_fwd(x, w, strides, padding):
  return _forward(x, w, strides, padding), (x, w)


def _conv2d_bwd(strides, padding, residuals, dy):
  x, w = residuals
  kh, kw, _, _ = w.shape
  out_h, out_w = dy.shape[1], dy.shape[2]
  zero = jnp.zeros((), dy.dtype)
  # Input gradient: interleave stride−1 zeros between the cotangent's pixels, pad so that a
  # stride-1 VALID convolution with the flipped kernel lands on x's (H, W).
  pads = []
  for axis, (k, s, (lo, _)) in enumerate(zip((kh, kw), strides, padding)):
    size_in, size_out = x.shape[1 + axis], dy.shape[1 + axis]
    before = k - 1 - lo
    after = size_in - (size_out - 1) * s + lo - 1
    pads.append((before, after, s - 1))
  dy_padded = lax.pad(dy, zero, [(0, 0, 0), pads[0], pads[1], (0, 0, 0)])
  w_flipped = jnp.swapaxes(w[::-1, ::-1], 2, 3)  # (kh, kw, Cout, Cin)
  dx = lax.conv_general_dilated(dy_padded, w_flipped, (1, 1), ((0, 0), (0, 0)),
                                dimension_numbers=_NHWC)
  # Kernel gradient, dw[i, j, c, o] = sum_{b,h,w} x_pad[b, h*s + i, w*s + j, c] dy[b, h, w, o].
  sh, sw = strides
  if kh == kw == 1 and not any(lo or hi for lo, hi in padding):
    # 1x1: the (strided) input against the cotangent, one matrix product.
    dw = lax.dot_general(x[:, ::sh, ::sw, :][:, :out_h, :out_w], dy,
                         (((0, 1, 2), (0, 1, 2)), ((), ())), preferred_element_type=jnp.float32)
  else:
    # A canonical convolution, as XLA's ConvCanonicalization writes it at top level: the input
    # as (Cin, H, W, B) "images", the cotangent as a (Ho, Wo, B, Cout) "kernel" dilated by the
    # stride; the result (Cin, kh, kw, Cout). The high padding drops the rows and columns the
    # forward pass's stride never reached, so that the result is exactly kh x kw.
    pads = [(lo, hi - (size + lo + hi - k) % s)
            for (lo, hi), size, k, s in zip(padding, x.shape[1:3], (kh, kw), strides)]
    dw = lax.conv_general_dilated(jnp.transpose(x, (3, 1, 2, 0)), jnp.transpose(dy, (1, 2, 0, 3)),
                                  (1, 1), pads, rhs_dilation=strides, dimension_numbers=_NHWC,
                                  preferred_element_type=jnp.float32)
    dw = jnp.transpose(dw, (1, 2, 0, 3))
  dw = dw.reshape(w.shape).astype(w.dtype)
  return dx.astype(x.dtype), dw


conv2d_nhwc.defvjp(_conv2d_fwd, _conv2d_bwd)


def _is_nhwc(dimension_numbers, ndim: int) -> bool:
  if dimension_numbers is None or ndim != 4:
    return False
  dn = lax.conv_dimension_numbers((1,) * 4, (1,) * 4, dimension_numbers)
  return dn == _NHWC


def conv_general_dilated(lhs, rhs, window_strides: Sequence[int], padding,
                         lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
                         feature_group_count: int = 1, batch_group_count: int = 1,
                         precision=None, preferred_element_type=None):
  """`lax.conv_general_dilated`, with `conv2d_nhwc`'s canonical gradient on the CPU backend.

  Same arguments and result as `lax.conv_general_dilated`. The custom gradient is used when
  the target platform is CPU (`backend.target_platform`) and the convolution is 2-D NHWC/HWIO ("SAME", "VALID" or explicit
  (lo, hi) padding) with no lhs/rhs dilation, one feature and batch group, default precision
  and result type; otherwise this is `lax.conv_general_dilated` itself.
  """
  plain = functools.partial(
      lax.conv_general_dilated, lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count, batch_group_count=batch_group_count,
      precision=precision, preferred_element_type=preferred_element_type)
  if (backend.target_platform() != "cpu" or not _is_nhwc(dimension_numbers, lhs.ndim)
      or feature_group_count != 1 or batch_group_count != 1
      or precision is not None or preferred_element_type is not None
      or any(d != 1 for d in (lhs_dilation or ())) or any(d != 1 for d in (rhs_dilation or ()))
      or lhs.dtype != rhs.dtype):
    return plain()
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
  return conv2d_nhwc(lhs, rhs, tuple(int(s) for s in window_strides),
                     tuple((int(lo), int(hi)) for lo, hi in padding))
