"""Group normalisation with a closed-form gradient (ddpo_jax/models/group_norm.py)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpo_jax.models.group_norm import GroupNorm, group_norm


def _numpy_group_norm(x, scale, bias, groups, eps):
  """Float64 NumPy: statistics over all axes but batch and channel, per group of channels."""
  b, c = x.shape[0], x.shape[-1]
  g = x.reshape(b, -1, groups, c // groups)
  mean = g.mean(axis=(1, 3), keepdims=True)
  var = g.var(axis=(1, 3), keepdims=True)
  y = ((g - mean) / np.sqrt(var + eps)).reshape(x.shape)
  return y * scale + bias


CASES = [  # (shape, groups, eps)
    ((2, 8, 8, 32), 16, 1e-6),   # the UNet's ResnetBlock norms
    ((3, 4, 5, 12), 4, 1e-5),    # odd spatial sizes
    ((2, 6, 8), 2, 1e-5),        # (B, N, C)
    ((2, 3, 3, 8), 8, 1e-6),     # one channel per group (instance norm)
    ((1, 2, 2, 6), 1, 1e-3),     # one group (layer norm over H, W, C)
]


def _inputs(shape, seed):
  rng = np.random.default_rng(seed)
  x = (rng.normal(size=shape) * 3 + 2).astype(np.float32)  # an offset mean, as activations have
  scale = rng.normal(size=shape[-1:]).astype(np.float32)
  bias = rng.normal(size=shape[-1:]).astype(np.float32)
  cot = rng.normal(size=shape).astype(np.float32)
  return x, scale, bias, cot


@pytest.mark.parametrize("shape,groups,eps", CASES)
def test_forward_matches_numpy(shape, groups, eps):
  x, scale, bias, _ = _inputs(shape, len(shape) * 10 + groups)
  y = group_norm(jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias), groups, eps, jnp.float32)
  want = _numpy_group_norm(x.astype(np.float64), scale, bias, groups, eps)
  np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,groups,eps", CASES)
def test_gradients_match_flax_autodiff(shape, groups, eps):
  """Against autodiff of flax's own GroupNorm (same two-pass variance)."""
  x, scale, bias, cot = _inputs(shape, len(shape) * 10 + groups + 1)
  reference = nn.GroupNorm(num_groups=groups, epsilon=eps, use_fast_variance=False)

  def ours(x, s, b):
    return jnp.sum(jnp.tanh(group_norm(x, s, b, groups, eps, jnp.float32)) * cot)

  def theirs(x, s, b):
    return jnp.sum(jnp.tanh(reference.apply({"params": {"scale": s, "bias": b}}, x)) * cot)

  got = jax.grad(ours, (0, 1, 2))(x, scale, bias)
  want = jax.grad(theirs, (0, 1, 2))(x, scale, bias)
  for name, g, w in zip(("x", "scale", "bias"), got, want):
    assert g.shape == w.shape and g.dtype == w.dtype, name
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4,
                               atol=1e-5 * float(np.max(np.abs(w))), err_msg=name)


def test_input_gradient_matches_finite_differences_of_numpy():
  """A directional derivative of the float64 NumPy function, independent of any JAX autodiff."""
  shape, groups, eps = (2, 3, 4, 8), 4, 1e-5
  x, scale, bias, cot = _inputs(shape, 7)
  direction = np.random.default_rng(8).normal(size=shape)

  def f(x):
    return float(np.sum(np.tanh(_numpy_group_norm(x, scale, bias, groups, eps)) * cot))

  h = 1e-5
  x64 = x.astype(np.float64)
  numeric = (f(x64 + h * direction) - f(x64 - h * direction)) / (2 * h)
  dx = jax.grad(lambda x: jnp.sum(jnp.tanh(group_norm(x, scale, bias, groups, eps, jnp.float32))
                                  * cot))(x)
  np.testing.assert_allclose(float(np.sum(np.asarray(dx, np.float64) * direction)), numeric,
                             rtol=1e-3)


def test_bfloat16_keeps_dtypes_and_matches_float32():
  shape, groups = (2, 4, 4, 16), 8
  x, scale, bias, cot = _inputs(shape, 9)
  xb = jnp.asarray(x, jnp.bfloat16)
  y = group_norm(xb, scale, bias, groups, 1e-6, jnp.bfloat16)
  assert y.dtype == jnp.bfloat16
  want = group_norm(xb.astype(jnp.float32), scale, bias, groups, 1e-6, jnp.float32)
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(want), atol=0.05, rtol=0.02)
  dx, ds, db = jax.grad(
      lambda x, s, b: jnp.sum(group_norm(x, s, b, groups, 1e-6, jnp.bfloat16).astype(jnp.float32)
                              * cot), (0, 1, 2))(xb, jnp.asarray(scale), jnp.asarray(bias))
  assert (dx.dtype, ds.dtype, db.dtype) == (jnp.bfloat16, jnp.float32, jnp.float32)


def test_module_parameters_and_bad_groups():
  module = GroupNorm(num_groups=4, epsilon=1e-6)
  x = jnp.ones((1, 2, 2, 8))
  params = module.init(jax.random.PRNGKey(0), x)["params"]
  assert set(params) == {"scale", "bias"}
  np.testing.assert_array_equal(params["scale"], np.ones(8, np.float32))
  np.testing.assert_array_equal(params["bias"], np.zeros(8, np.float32))
  y = GroupNorm(num_groups=4, dtype=None).apply({"params": params}, x.astype(jnp.bfloat16))
  assert y.dtype == jnp.bfloat16  # dtype None: the input's
  with pytest.raises(ValueError, match="6 channels are not divisible into 4 groups"):
    module.init(jax.random.PRNGKey(0), jnp.ones((1, 2, 2, 6)))
