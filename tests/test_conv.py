"""The convolution with XLA:CPU-canonical gradients (ddpo_jax/models/conv.py)."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from ddpo_jax.models.conv import conv2d_nhwc, conv_general_dilated

NHWC = ("NHWC", "HWIO", "NHWC")
CANONICAL = "dim_labels=b01f_01io->b01f"


def _numpy_conv(x, w, stride, pad):
  """Direct NHWC/HWIO cross-correlation in float64 NumPy."""
  (lo_h, hi_h), (lo_w, hi_w) = pad
  x = np.pad(x, ((0, 0), (lo_h, hi_h), (lo_w, hi_w), (0, 0)))
  kh, kw = w.shape[:2]
  oh = (x.shape[1] - kh) // stride + 1
  ow = (x.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], oh, ow, w.shape[3]))
  for i in range(oh):
    for j in range(ow):
      patch = x[:, i * stride: i * stride + kh, j * stride: j * stride + kw, :]
      out[:, i, j] = np.einsum("bhwc,hwco->bo", patch, w)
  return out


CASES = [  # (H, W, kernel, stride, padding)
    (8, 8, 3, 1, ((1, 1), (1, 1))),  # the UNet's 3x3 convs
    (8, 8, 3, 2, ((1, 1), (1, 1))),  # Downsample2D
    (9, 7, 3, 2, ((0, 1), (0, 1))),  # the VAE's asymmetric downsample, odd sizes
    (6, 6, 1, 1, ((0, 0), (0, 0))),  # 1x1 projections / shortcuts
    (28, 28, 14, 14, ((0, 0), (0, 0))),  # CLIP's patch embedding
    (5, 6, 3, 1, ((2, 0), (0, 2))),  # lopsided padding
    (9, 10, 3, 2, ((1, 0), (0, 0))),  # the stride leaves a row unread: negative high padding
    (7, 7, 1, 2, ((0, 0), (0, 0))),  # strided 1x1
]


@pytest.mark.parametrize("h,w,k,s,pad", CASES)
def test_forward_and_gradients_match(h, w, k, s, pad):
  rng = np.random.default_rng(h * 100 + k)
  x = rng.normal(size=(2, h, w, 3)).astype(np.float32)
  kernel = rng.normal(size=(k, k, 3, 5)).astype(np.float32)
  y = conv2d_nhwc(jnp.asarray(x), jnp.asarray(kernel), (s, s), pad)
  np.testing.assert_allclose(np.asarray(y), _numpy_conv(x.astype(np.float64), kernel, s, pad),
                             rtol=1e-4, atol=1e-4)
  cot = rng.normal(size=y.shape).astype(np.float32)

  def ours(x, w):
    return jnp.sum(conv2d_nhwc(x, w, (s, s), pad) * cot)

  def reference(x, w):  # XLA's own convolution transpose rules
    return jnp.sum(lax.conv_general_dilated(x, w, (s, s), pad, dimension_numbers=NHWC) * cot)

  got = jax.grad(ours, (0, 1))(x, kernel)
  want = jax.grad(reference, (0, 1))(x, kernel)
  for g, r in zip(got, want):
    assert g.shape == r.shape and g.dtype == r.dtype
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5,
                               atol=1e-5 * float(np.abs(r).max()))
  # The kernel gradient against a finite difference of the float64 NumPy convolution.
  eps = 1e-3
  idx = (k // 2, 0, 1, 2)
  w_plus, w_minus = kernel.astype(np.float64), kernel.astype(np.float64)  # two copies
  w_plus[idx] += eps
  w_minus[idx] -= eps
  fd = (np.sum(_numpy_conv(x.astype(np.float64), w_plus, s, pad) * cot)
        - np.sum(_numpy_conv(x.astype(np.float64), w_minus, s, pad) * cot)) / (2 * eps)
  np.testing.assert_allclose(float(got[1][idx]), fd, rtol=1e-3)


def test_drop_in_for_lax_with_string_padding_and_fallbacks():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 7, 7, 3)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32)
  for kwargs in [dict(padding="SAME"), dict(padding="VALID"),
                 dict(padding="SAME", rhs_dilation=(2, 2))]:  # dilation: the lax fallback
    def f(fn, x, w):
      return jnp.sum(jnp.sin(fn(x, w, (2, 2), dimension_numbers=NHWC, **kwargs)))
    for a, b in zip(jax.grad(lambda x, w: f(conv_general_dilated, x, w), (0, 1))(x, w),
                    jax.grad(lambda x, w: f(lax.conv_general_dilated, x, w), (0, 1))(x, w)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def _conv_dim_labels(hlo: str) -> set[str]:
  return set(re.findall(r"convolution\([^\n]*?(dim_labels=[^ ,]+)", hlo))


def test_gradients_inside_a_scan_compile_to_canonical_convolutions():
  """XLA:CPU canonicalises convolutions only in the entry computation, so autodiff's
  kernel- and input-gradient convolutions inside a `while` body run on its naive loop
  emitter. Ours stay NHWC/HWIO there too (the CPU backend is what the suite runs on)."""
  assert jax.default_backend() == "cpu"
  rng = np.random.default_rng(1)
  xs = jnp.asarray(rng.normal(size=(4, 2, 8, 8, 3)), jnp.float32)
  w0 = jnp.asarray(rng.normal(size=(3, 3, 3, 6)), jnp.float32)

  def scanned(fn):
    def loss(w, x):
      return jnp.mean(jnp.square(fn(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC)))

    def run(w, xs):
      def body(acc, x):
        return acc + jax.grad(loss)(w, x), None
      return lax.scan(body, jnp.zeros_like(w), xs)[0]
    return jax.jit(run)

  ours, plain = scanned(conv_general_dilated), scanned(lax.conv_general_dilated)
  np.testing.assert_allclose(np.asarray(ours(w0, xs)), np.asarray(plain(w0, xs)), rtol=1e-5,
                             atol=1e-5)
  assert _conv_dim_labels(ours.lower(w0, xs).compile().as_text()) == {CANONICAL}
  # The check can fail: lax's own gradient inside the loop is not canonical.
  assert _conv_dim_labels(plain.lower(w0, xs).compile().as_text()) != {CANONICAL}


def test_bfloat16_gradients_keep_dtypes_and_match():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 8, 8, 4)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(3, 3, 4, 6)), jnp.bfloat16)

  def f(fn, x, w):
    y = fn(x, w, (2, 2), ((1, 1), (1, 1)), dimension_numbers=NHWC)
    return jnp.sum(y.astype(jnp.float32) ** 2)

  got = jax.grad(lambda x, w: f(conv_general_dilated, x, w), (0, 1))(x, w)
  want = jax.grad(lambda x, w: f(lax.conv_general_dilated, x, w), (0, 1))(x, w)
  for g, r in zip(got, want):
    assert g.dtype == jnp.bfloat16
    g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
    np.testing.assert_allclose(g, r, rtol=2e-2, atol=2e-2 * np.abs(r).max())
