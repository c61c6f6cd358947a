"""Normalisation layers shared by the transformer families (MMDiT, FLUX, T5)."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def plain_layer_norm(name=None):
  """LayerNorm without scale or bias, eps 1e-6 (diffusers' `elementwise_affine=False`)."""
  return nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False, use_fast_variance=False,
                      name=name)


class RMSNorm(nn.Module):
  """RMS norm over the last axis with a weight: x / sqrt(mean(x^2) + eps) * weight, statistics
  and product in float32, returned in x's dtype (diffusers' `RMSNorm`, `torch.nn.RMSNorm`,
  transformers' `T5LayerNorm`; the weight is the Flax param `scale`)."""
  eps: float = 1e-6
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)
