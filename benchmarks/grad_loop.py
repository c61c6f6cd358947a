#!/usr/bin/env python
r"""UNet parameter gradients inside a `lax.scan` vs as separate calls (the update's micro-steps).

  python benchmarks/grad_loop.py [--batch=16] [--micro_steps=8] [--style=sd2] [--conv=ours|lax]

The tiny SD-2-style UNet of the tests (tests/tiny_models.py: three levels, linear projections,
per-level heads) at 16x16x4 latents and 77 context tokens, float32, random weights. Times (best
of `--repeats`, after compilation): one forward pass, one parameter gradient, `--micro_steps`
gradients accumulated in one `lax.scan`, the same scan unrolled, and the same gradients as
separate calls of one jitted gradient function. `--conv=lax` swaps the project's convolution
(`ddpo_jax.models.conv`) back to `lax.conv_general_dilated` to show the loop penalty it removes,
and prints how many of the scanned program's convolutions are canonical for XLA:CPU.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))  # tiny_models
if REPO not in sys.path:
  sys.path.insert(0, REPO)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--micro_steps", type=int, default=8)
  p.add_argument("--style", choices=("sd1", "sd2"), default="sd2")
  p.add_argument("--conv", choices=("ours", "lax"), default="ours")
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args(argv)

  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax import lax

  import ddpo_jax.models.unet as unet_lib
  from tiny_models import unet_sd1_kwargs, unet_sd2_kwargs
  if args.conv == "lax":
    unet_lib.conv_general_dilated = lax.conv_general_dilated
  kwargs = (unet_sd2_kwargs(sample_size=16) if args.style == "sd2"
            else unet_sd1_kwargs(sample_size=16, attention_head_dim=8))
  cfg = unet_lib.UNetConfig.from_dict(kwargs)
  model = unet_lib.UNet2DConditionModel(cfg)
  rng = np.random.default_rng(0)
  b = args.batch
  x = jnp.asarray(rng.normal(size=(b, 16, 16, 4)), jnp.float32)
  t = jnp.full((b,), 500, jnp.int32)
  ctx = jnp.asarray(rng.normal(size=(b, 77, cfg.context_dim)), jnp.float32)
  params = model.init(jax.random.PRNGKey(0), x, t, ctx)["params"]
  xs = jnp.stack([x * (1 + 0.01 * i) for i in range(args.micro_steps)])

  def loss(p, x):
    return jnp.mean(model.apply({"params": p}, x, t, ctx) ** 2)

  grad = jax.jit(jax.grad(loss))

  def scanned(p, xs, unroll=1):
    def body(acc, xi):
      return jax.tree.map(jnp.add, acc, jax.grad(loss)(p, xi)), None
    return lax.scan(body, jax.tree.map(jnp.zeros_like, p), xs, unroll=unroll)[0]

  def calls(p, xs):
    acc = grad(p, xs[0])
    for i in range(1, args.micro_steps):
      acc = jax.tree.map(jnp.add, acc, grad(p, xs[i]))
    return acc

  def best(fn, *a):
    jax.block_until_ready(fn(*a))
    times = []
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*a))
      times.append(time.perf_counter() - t0)
    return min(times)

  scan_fn = jax.jit(scanned)
  labels = re.findall(r"convolution\([^\n]*?dim_labels=([^ ,]+)",
                      scan_fn.lower(params, xs).compile().as_text())
  canonical = sum(l == "b01f_01io->b01f" for l in labels)
  print(f"{args.style} UNet, batch {b}, conv={args.conv}, backend {jax.default_backend()}, "
        f"load {'/'.join(f'{v:.1f}' for v in os.getloadavg())}")
  print(f"  forward           {best(jax.jit(loss), params, x) * 1e3:8.1f} ms")
  print(f"  gradient          {best(grad, params, x) * 1e3:8.1f} ms")
  m = args.micro_steps
  print(f"  {m} in a scan       {best(scan_fn, params, xs) * 1e3:8.1f} ms "
        f"({canonical} of {len(labels)} convolutions canonical)")
  print(f"  {m} scan, unrolled  "
        f"{best(jax.jit(lambda p, xs: scanned(p, xs, True)), params, xs) * 1e3:8.1f} ms")
  print(f"  {m} separate calls  {best(calls, params, xs) * 1e3:8.1f} ms")


if __name__ == "__main__":
  main()
