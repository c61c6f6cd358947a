#!/usr/bin/env python
r"""Training memory of SD3.5-Medium and FLUX.1-dev at 512 px, computed without weights.

  python benchmarks/memory.py [--models=sd35_medium,flux_dev] [--rows=all]
      [--depths=auto|full|fit] [--markdown] [--device_gib=80] [--num_devices=8]
  python benchmarks/memory.py --tiny         # tiny configs, seconds (for the tests)

Nothing is allocated: the parameter trees are `jax.eval_shape`s (`abstract_mmdit_params`,
`abstract_flux_params`; the LoRA factors an `eval_shape` of `lora.init_lora`), and one training
micro-step, `jax.value_and_grad` of the flow-matching loss mean((v_pred - v_target)^2) with
respect to the trainable parameters only, is lowered from `jax.ShapeDtypeStruct`s and compiled
by XLA:CPU; `compiled.memory_analysis()` gives its argument, output, alias and temp bytes.

Rows: model x {LoRA, full fine-tuning} x remat {off, on} (`remat` of the modules: each block in
`nn.remat`). Compute dtype bfloat16 everywhere. Assumptions:
  * full: fp32 master weights (4 B/param), gradients fp32, AdamW mu + nu fp32 (8 B/param).
  * LoRA: the frozen base in bfloat16 (2 B/param), fp32 factors A (fan_in, r) and B (r, out)
    applied beside the kernels, unmerged (`models.adapters.apply`; rows "lora_merged": merged
    into the kernels inside the step, the library's earlier application); gradients and AdamW
    state for the factors only. Targets: the joint-attention projections of flow_grpo's SD3 LoRA
    (attn/to_q, to_k, to_v, to_out_0, add_q_proj, add_k_proj, add_v_proj, to_add_out; not
    SD3.5-M's image-only attn2), the same regexes on FLUX (they also match the single blocks'
    attn/to_q,k,v). SD3.5-M rank 32 alpha 64, FLUX rank 32 alpha 32 (alpha changes no byte).
  * inputs at 512 px: latents (B, 64, 64, 16) fp32 (FLUX: packed to (B, 1024, 64)), text
    tokens SD3.5 (B, 333, 4096) = 77 CLIP + 256 T5, pooled (B, 2048); FLUX (B, 512, 4096),
    pooled (B, 768), guidance (B,), image / text ids of the 32x32 token grid / 512 tokens.
  * activations = the compiled step's temp bytes at batch 1, and the slope temp(2) - temp(1)
    per extra sample, from a GPU-like compile: XLA:CPU as it is computes every bf16 / f16 dot
    in f32 (f32 copies of all the weights stay live: +44 GiB for FLUX LoRA) and drops
    jax.checkpoint's optimization barriers (remat on = remat off), so the activation columns
    compile the step in float16 (the same bytes as bfloat16) with those two passes off
    (`EMULATE_OPTIONS`); XLA:CPU's own bf16 temp is shown beside them for comparison, and the
    autodiff residuals (what `jax.vjp` saves, in bf16, weights not counted) as a cross-check.

Depths: `--depths=fit` compiles reduced depths with the real widths and sequence lengths, fits
temp = a + b1 n1 + b2 n2 (n1, n2: blocks of each kind: SD3.5-M's dual-attention and plain joint
blocks, FLUX's double- and single-stream blocks) through three depths, checks the fit at a
fourth and extrapolates to the real depth; parameter, gradient and optimizer bytes are exact
at the real depth (from the abstract trees). `--depths=full` compiles the real depth (on 2
cores: ~15 s per compile for SD3.5-M, ~30 s for FLUX). `--depths=auto` (the default) fits, and
also compiles the real depth (reporting it, and the fit's error) when the fit predicts that
takes under `--max_row_compile_s` per row.

Mesh: for `--num_devices` devices of `--device_gib` each and every (data, fsdp) shape, the
per-device bytes are the state (weights + grads + mu + nu) with each leaf split over fsdp as
`ddpo_jax.numerics.parallel.param_spec` splits it (kernels of >= 2^18 elements along their largest
divisible axis; vectors replicated), plus activations and inputs x the per-device batch (the
batch is split over both axes, so the per-device batch does not depend on the shape).

Caveat: XLA:CPU's buffer assignment and fusion are not the GPU's (nor the TPU's); the temp
numbers are an estimate of the GPU/TPU activation peak, not a measurement of it.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from typing import Any, Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from ddpo_jax.models import lora, adapters, flux, mmdit  # noqa: E402
from ddpo_jax.numerics import parallel  # noqa: E402

GiB = float(1 << 30)
# XLA:CPU's LLVM optimisation level changes code generation only, not buffer assignment; level
# 0 roughly halves compile times.
PLAIN_OPTIONS = {"xla_backend_optimization_level": 0}
# The GPU-like compile (the activation columns): compute in float16, a stand-in of bfloat16's
# size, with two XLA:CPU passes off: `change-op-data-type` (XLA:CPU has no 16-bit dot kernels:
# it converts the operands of every f16 / bf16 dot to f32, and the f32 copies of the weights then
# stay live through the step, e.g. 44 GiB for FLUX's bf16 LoRA base) and `cse_barrier_expander`
# (it drops the optimization barriers of `jax.checkpoint` before CSE and scheduling, which undoes
# remat on XLA:CPU: remat on and off compile to the same temp). XLA:CPU's bf16 dots go through
# `float-normalization-bf16`, which cannot be turned off (no bf16 dot emitter), hence float16.
EMULATE_OPTIONS = {"xla_backend_optimization_level": 0,
                   "xla_disable_hlo_passes": "change-op-data-type,cse_barrier_expander"}
EMULATE_DTYPE = jnp.float16
FSDP_MIN_SIZE = 2 ** 18  # config_schema's mesh.fsdp_min_size default
T5_XXL_PARAMS = 4_762_310_656  # the T5-XXL encoder, bf16 when resident
ATTN_TARGETS = (r"(^|/)attn/(to_q|to_k|to_v|to_out_0|add_q_proj|add_k_proj|add_v_proj|"
                r"to_add_out)$",)
ROWS = ("lora-off", "lora-on", "lora_merged-off", "lora_merged-on", "full-off", "full-on")
MAX_BATCH = 256
METHOD_LABELS = {"lora": "LoRA", "lora_merged": "LoRA merged (before)", "full": "full"}


# ================================================================================== models
@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A denoiser: how to build it at a given number of blocks of each kind and call it."""
  name: str
  label: str
  kinds: tuple[str, str]  # the two kinds of block, varied independently
  real: tuple[int, int]  # the real model's count of each kind
  make_config: Callable[[int, int], Any]
  abstract_params: Callable[[Any, Any], dict]
  make_module: Callable[[Any, bool, Any], Any]  # (config, remat, compute dtype)
  inputs: Callable[[int], dict]  # batch size -> {name: ShapeDtypeStruct}
  velocity: Callable[[Any, dict, dict], tuple]  # (module, params, batch) -> (v_pred, v_target)
  lora: lora.LoraConfig
  expected_params: int | None = None
  note: str = ""


def _sd3_spec(name, label, base: dict, real: tuple[int, int], latent: tuple[int, int, int],
              text_tokens: int, expected=None, note=""):
  """SD3.5-style MMDiT: n1 dual-attention blocks, n2 plain joint blocks, then the last
  (context_pre_only) block, which is always there."""
  def make_config(n_dual, n_joint):
    return mmdit.MMDiTConfig(**{**base, "num_layers": n_dual + n_joint + 1,
                                "dual_attention_layers": tuple(range(n_dual))})

  def make_module(config, remat, dtype=jnp.bfloat16):
    return mmdit.SD3Transformer2DModel(config, dtype=dtype, remat=remat,
                                       attention_implementation="xla")

  def inputs(b):
    s = jax.ShapeDtypeStruct
    return dict(x0=s((b,) + latent, jnp.float32), noise=s((b,) + latent, jnp.float32),
                t=s((b,), jnp.float32),
                context=s((b, text_tokens, base["joint_attention_dim"]), jnp.float32),
                pooled=s((b, base["pooled_projection_dim"]), jnp.float32))

  def velocity(module, params, batch):
    t = batch["t"][:, None, None, None]
    x_t = (1 - t) * batch["x0"] + t * batch["noise"]
    v = adapters.apply(module, params, x_t, batch["t"] * 1000.0, batch["context"],
                     batch["pooled"])
    return v, batch["noise"] - batch["x0"]

  return ModelSpec(name, label, ("dual", "joint"), real, make_config,
                   lambda c, dt: mmdit.abstract_mmdit_params(c, dt), make_module, inputs,
                   velocity, lora.LoraConfig(rank=32, alpha=64.0, targets=ATTN_TARGETS),
                   expected, note)


def _flux_spec(name, label, base: dict, real: tuple[int, int], latent: tuple[int, int, int],
               text_tokens: int, expected=None, note=""):
  """FLUX: n1 double-stream blocks, n2 single-stream blocks."""
  h, w, _ = latent
  img_ids = flux.image_ids(h, w)
  txt_ids = np.zeros((text_tokens, 3), np.float32)

  def make_config(n_double, n_single):
    return flux.FluxConfig(**{**base, "num_layers": n_double, "num_single_layers": n_single})

  def make_module(config, remat, dtype=jnp.bfloat16):
    return flux.FluxTransformer2DModel(config, dtype=dtype, remat=remat,
                                       attention_implementation="xla")

  def inputs(b):
    s = jax.ShapeDtypeStruct
    return dict(x0=s((b,) + latent, jnp.float32), noise=s((b,) + latent, jnp.float32),
                t=s((b,), jnp.float32), guidance=s((b,), jnp.float32),
                context=s((b, text_tokens, base["joint_attention_dim"]), jnp.float32),
                pooled=s((b, base["pooled_projection_dim"]), jnp.float32))

  def velocity(module, params, batch):
    t = batch["t"][:, None, None, None]
    x_t = (1 - t) * batch["x0"] + t * batch["noise"]
    v = adapters.apply(module, params, flux.pack_latents(x_t), batch["context"],
                     batch["pooled"], batch["t"], img_ids, txt_ids, batch["guidance"])
    return v, flux.pack_latents(batch["noise"] - batch["x0"])

  return ModelSpec(name, label, ("double", "single"), real, make_config,
                   lambda c, dt: flux.abstract_flux_params(c, dt), make_module, inputs,
                   velocity, lora.LoraConfig(rank=32, alpha=32.0, targets=ATTN_TARGETS),
                   expected, note)


# transformer/config.json of stabilityai/stable-diffusion-3.5-medium (tests/test_mmdit.py REAL)
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, attention_head_dim=64,
                   joint_attention_dim=4096, pooled_projection_dim=2048, out_channels=16,
                   num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=384,
                   qk_norm="rms_norm")
# black-forest-labs/FLUX.1-dev transformer (tests/test_flux.py's param-count test)
FLUX_DEV = dict(patch_size=1, in_channels=64, attention_head_dim=128, num_attention_heads=24,
                joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))

MODELS = {
    # 24 layers: 13 with dual attention, 10 plain, the last (context_pre_only)
    "sd35_medium": _sd3_spec("sd35_medium", "SD3.5-Medium", SD35_MEDIUM, (13, 10), (64, 64, 16),
                             77 + 256, expected=2_243_171_520),
    "flux_dev": _flux_spec("flux_dev", "FLUX.1-dev", FLUX_DEV, (19, 38), (64, 64, 16), 512,
                           expected=11_901_408_320),
}
TINY_MODELS = {
    "sd35_medium": _sd3_spec("sd35_medium", "tiny SD3.5", dict(
        sample_size=8, patch_size=2, in_channels=4, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=10,
        out_channels=4, pos_embed_max_size=8, qk_norm="rms_norm"), (2, 2), (16, 16, 4), 8),
    "flux_dev": _flux_spec("flux_dev", "tiny FLUX", dict(
        patch_size=1, in_channels=16, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=12, pooled_projection_dim=10, guidance_embeds=True,
        axes_dims_rope=(2, 2, 4)), (2, 2), (32, 32, 4), 16),
}


# ================================================================================== trees
def nbytes(tree) -> int:
  return int(sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(tree)))


def count(tree) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def trees(spec: ModelSpec, config, method: str, low=jnp.bfloat16):
  """(trainable, frozen) abstract trees: full -> (fp32 params, {}); lora -> (fp32 factors,
  base in `low`, bf16 or its float16 stand-in)."""
  if method == "full":
    return spec.abstract_params(config, jnp.float32), {}
  base = spec.abstract_params(config, low)
  selected = lora.select_targets(base, spec.lora.targets)
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)
  factors = jax.eval_shape(lambda k: lora.init_lora(base, spec.lora, k),
                           key)
  assert len(jax.tree.leaves(factors)) == 2 * len(selected)
  return factors, base


def optimizer_bytes(trainable) -> int:
  """AdamW (optax) state bytes, mu + nu (the scalar step count left out)."""
  state = jax.eval_shape(optax.adamw(1e-4).init, trainable)
  return int(sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(state) if x.ndim > 0))


def per_device_state_bytes(trainable, frozen, fsdp: int) -> int:
  """Weights + grads + mu + nu on one device when each leaf is split as `param_spec` splits
  it over `fsdp` (trainable leaves: weight, grad, mu, nu; frozen ones: the weight)."""
  total = 0
  for tree, copies in ((trainable, 4), (frozen, 1)):
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
      spec = parallel.param_spec(parallel.path_str(path), tuple(x.shape), fsdp, FSDP_MIN_SIZE)
      split = fsdp if any(a is not None for a in spec) else 1
      b = math.prod(x.shape) * jnp.dtype(x.dtype).itemsize // split
      # weight in its dtype; grad, mu, nu fp32
      total += b if copies == 1 else b + 3 * (math.prod(x.shape) * 4 // split)
  return total


# ================================================================================== compile
def flow_loss(spec: ModelSpec, config, method: str, remat: bool, dtype=jnp.bfloat16):
  """The flow-matching loss mean((v_pred - v_target)^2) of (trainable, frozen, batch); LoRA
  factors applied beside the frozen base ("lora", the library's `models.adapters.apply`) or
  merged into its kernels inside the step ("lora_merged", what the library did before)."""
  module = spec.make_module(config, remat, dtype)
  scale = spec.lora.scale

  def loss(trainable, frozen, batch):
    params = trainable if method == "full" else adapters.LoraAdapted(frozen, trainable, scale)
    if method == "lora_merged":  # the earlier application: factors merged into the kernels
      params = adapters.merged(params)
    v_pred, v_target = spec.velocity(module, params, batch)
    return jnp.mean(jnp.square(v_pred.astype(jnp.float32) - v_target))

  return loss


def train_step(spec: ModelSpec, config, method: str, remat: bool, dtype=jnp.bfloat16):
  return jax.value_and_grad(flow_loss(spec, config, method, remat, dtype))


def compile_stats(spec: ModelSpec, counts: tuple[int, int], method: str, remat: bool,
                  batch: int, emulate: bool = True) -> dict:
  """Memory analysis of the compiled micro-step at `counts` blocks and batch `batch`:
  GPU-like (`emulate`: float16 for bfloat16, `EMULATE_OPTIONS`) or XLA:CPU's plain bf16."""
  config = spec.make_config(*counts)
  low = EMULATE_DTYPE if emulate else jnp.bfloat16
  trainable, frozen = trees(spec, config, method, low)
  step = train_step(spec, config, method, remat, low)
  t0 = time.perf_counter()
  lowered = jax.jit(step).lower(trainable, frozen, spec.inputs(batch))
  t1 = time.perf_counter()
  compiled = lowered.compile(EMULATE_OPTIONS if emulate else PLAIN_OPTIONS)
  t2 = time.perf_counter()
  m = compiled.memory_analysis()
  return dict(counts=tuple(counts), batch=batch, emulate=emulate,
              argument=int(m.argument_size_in_bytes),
              output=int(m.output_size_in_bytes), temp=int(m.temp_size_in_bytes),
              alias=int(m.alias_size_in_bytes), lower_s=t1 - t0, compile_s=t2 - t1,
              inputs=nbytes(spec.inputs(batch)), trainable=nbytes(trainable),
              frozen=nbytes(frozen))


def depth_points(spec: ModelSpec, p: int):
  """Three fit depths and one check depth (blocks of each kind)."""
  n1, n2 = spec.real
  if min(n1, n2) < 2 * p:
    raise SystemExit(f"{spec.name}: --fit_blocks={p} needs at least {2 * p} blocks of each kind "
                     f"(it has {n1} + {n2})")
  fit = [(min(p, n1), min(p, n2)), (min(2 * p, n1), min(p, n2)), (min(p, n1), min(2 * p, n2))]
  return fit, (min(2 * p, n1), min(2 * p, n2))


def fit_linear(points: list[tuple[tuple[int, int], float]]):
  """Exact a + b1 n1 + b2 n2 through three points -> (a, b1, b2)."""
  a = np.array([[1.0, n1, n2] for (n1, n2), _ in points])
  y = np.array([v for _, v in points], np.float64)
  return np.linalg.solve(a, y)


def residual_bytes(spec: ModelSpec, config, method: str, remat: bool, batch: int):
  """Bytes of what JAX's autodiff saves between the forward and the backward pass (the
  residuals, in their traced dtypes: bf16 activations stay bf16), not counting residuals that
  are the step's arguments (the weights themselves). A platform-independent cross-check of the
  compiled temp: tracing only. None if this JAX has no `saved_residuals`."""
  try:
    from jax._src.ad_checkpoint import saved_residuals
  except ImportError:  # a private helper; the column is left empty without it
    return None
  trainable, frozen = trees(spec, config, method)
  res = saved_residuals(flow_loss(spec, config, method, remat), trainable, frozen,
                        spec.inputs(batch))
  return int(sum(math.prod(s.shape) * jnp.dtype(s.dtype).itemsize for s, d in res
                 if "from the argument" not in d))


def measure_row(spec: ModelSpec, method: str, remat: bool, depths: str, p: int,
                max_row_compile_s: float, log, plain: bool = True) -> dict:
  """One row: exact state bytes at the real depth, activation temp at batch 1 and its slope
  per sample: compiled at the real depth (`full`), extrapolated from reduced depths (`fit`),
  or both when the fit predicts the real depth compiles within `max_row_compile_s` (`auto`).
  `plain`: also XLA:CPU's own bf16 compile at batch 1 when the real depth is compiled."""
  real_config = spec.make_config(*spec.real)
  trainable, frozen = trees(spec, real_config, method)
  row = dict(model=spec.name, label=spec.label, method=method, remat=remat,
             trainable_params=count(trainable),
             base_params=count(trainable if method == "full" else frozen),
             param_bytes=nbytes(trainable) + nbytes(frozen), trainable_bytes=nbytes(trainable),
             frozen_bytes=nbytes(frozen), optimizer_bytes=optimizer_bytes(trainable),
             # fp32 gradients of the fp32 trainable leaves (exact); the compiled step's
             # output (below, `compiled_grad_bytes`) cross-checks it up to buffer alignment
             grad_bytes=4 * count(trainable),
             trees=(trainable, frozen), inputs1=nbytes(spec.inputs(1)), compiles=[])
  if method != "full":
    row["lora_modules"] = len(lora.select_targets(frozen, spec.lora.targets))
  tag = f"{spec.name} {method} remat={'on' if remat else 'off'}"

  def run(counts, batch, emulate=True):
    s = compile_stats(spec, counts, method, remat, batch, emulate)
    row["compiles"].append(s)
    log(f"[{tag}] {spec.kinds[0]}={counts[0]} {spec.kinds[1]}={counts[1]} B={batch}"
        f"{'' if emulate else ' (plain XLA:CPU bf16)'}: temp "
        f"{s['temp'] / GiB:.3f} GiB, out {s['output'] / GiB:.3f} GiB, arg "
        f"{s['argument'] / GiB:.3f} GiB, lower {s['lower_s']:.1f} s, compile "
        f"{s['compile_s']:.1f} s")
    return s

  n = np.array([1.0, *spec.real])
  compile_full = depths == "full"
  if depths in ("fit", "auto"):
    fit, check = depth_points(spec, p)
    m1 = [(c, run(c, 1)) for c in fit]
    m2 = [(c, run(c, 2)) for c in fit]
    a1 = fit_linear([(c, s["temp"]) for c, s in m1])
    a2 = fit_linear([(c, s["temp"]) for c, s in m2])
    sc = run(check, 1)
    predicted = float(a1 @ np.array([1.0, *check]))
    ag = fit_linear([(c, s["output"] - 4) for c, s in m1])  # grads (+ the loss): linear too
    at = fit_linear([(c, s["lower_s"] + s["compile_s"]) for c, s in m1])
    row.update(fit_depths=[c for c, _ in m1] + [check], fit_check_error=(
        sc["temp"] - predicted) / sc["temp"], fit_temp1=float(a1 @ n),
        fit_slope=float((a2 - a1) @ n), fit_grad_bytes=float(ag @ n),
        fit_per_block=[float(a1[1]), float(a1[2])], fit_fixed=float(a1[0]),
        predicted_real_compile_s=(3 if plain else 2) * float(at @ n))
    row.update(temp1=int(round(row["fit_temp1"])), slope=int(round(row["fit_slope"])),
               compiled_grad_bytes=int(round(row["fit_grad_bytes"])), measured="extrapolated")
    compile_full = depths == "auto" and row["predicted_real_compile_s"] <= max_row_compile_s
    if depths == "auto" and not compile_full:
      log(f"[{tag}] the real depth would take ~{row['predicted_real_compile_s']:.0f} s to "
          f"compile (> {max_row_compile_s:g} s): extrapolating")
  if compile_full:
    s1, s2 = run(spec.real, 1), run(spec.real, 2)
    row.update(temp1=s1["temp"], slope=s2["temp"] - s1["temp"],
               compiled_grad_bytes=s1["output"] - 4,
               measured="real depth", real_compile_s=sum(
                   s["lower_s"] + s["compile_s"] for s in (s1, s2)))
    if "fit_temp1" in row:
      row["fit_error"] = (row["fit_temp1"] - s1["temp"]) / s1["temp"]
    if plain:
      row["plain_temp1"] = run(spec.real, 1, emulate=False)["temp"]
  r1 = residual_bytes(spec, real_config, method, remat, 1)
  r2 = residual_bytes(spec, real_config, method, remat, 2)
  row.update(residuals1=r1, residual_slope=None if r1 is None else r2 - r1)
  row["compile_s"] = sum(s["lower_s"] + s["compile_s"] for s in row["compiles"])
  return row


# ================================================================================== mesh
def mesh_shapes(n: int):
  return [(n // f, f) for f in range(1, n + 1) if n % f == 0]


def activations(row, b: int) -> float:
  return row["temp1"] + (b - 1) * row["slope"] + b * row["inputs1"]


def mesh_fit(row, n_devices: int, device_bytes: float, resident_bytes: float = 0.0):
  """{(data, fsdp): (bytes at b=1, max per-device batch or 0, bytes at that batch)}."""
  out = {}
  trainable, frozen = row["trees"]
  for data, fsdp in mesh_shapes(n_devices):
    state = per_device_state_bytes(trainable, frozen, fsdp) + resident_bytes
    used1 = state + activations(row, 1)
    best = 0
    for b in range(1, MAX_BATCH + 1):
      if state + activations(row, b) <= device_bytes:
        best = b
      else:
        break
    out[(data, fsdp)] = (used1, best, state + activations(row, best) if best else used1, state)
  return out


# ================================================================================== output
def fmt_params(n: int) -> str:
  return f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n:,}"


def fmt_gib(b: float) -> str:
  return f"{b / GiB:.2f}" if abs(b) >= 0.01 * GiB or b == 0 else f"{b / GiB:.2g}"


def row_name(row) -> str:
  return f"{row['label']} {METHOD_LABELS[row['method']]}" \
         f" remat {'on' if row['remat'] else 'off'}"


def tables(rows, args) -> str:
  device_bytes = args.device_gib * GiB
  md = args.markdown
  lines = []

  def table(header, body):
    if md:
      lines.append("| " + " | ".join(header) + " |")
      lines.append("|" + "|".join("---" for _ in header) + "|")
      lines.extend("| " + " | ".join(r) + " |" for r in body)
    else:
      widths = [max(len(x) for x in col) for col in zip(header, *body)]
      for r in [header] + body:
        lines.append("  ".join(x.ljust(w) for x, w in zip(r, widths)))
    lines.append("")

  lines.append(f"Training micro-step memory, {args.pixels}, compute bfloat16 "
               "(GiB = 2^30 bytes)")
  lines.append("")
  header = ["model / method / remat", "trainable params", "params GiB", "AdamW mu+nu GiB",
            "grads GiB", "activations GiB (B=1)", "+ per extra sample",
            "autodiff residuals GiB (B=1; + per sample)", "plain XLA:CPU bf16 temp GiB (B=1)",
            "depth", "compile s"]
  body = []
  for r in rows:
    if r["measured"] == "real depth":
      d = "real, compiled"
      if "fit_error" in r:
        d += f" (fit from reduced depths: {100 * r['fit_error']:+.1f}%)"
    else:
      d = (f"extrapolated from {', '.join(f'{a}+{b}' for a, b in r['fit_depths'][:3])} "
           f"blocks (check at {'+'.join(map(str, r['fit_depths'][3]))}: "
           f"{100 * r['fit_check_error']:+.1f}%)")
    if r["method"] == "full":
      p = f"fp32 {fmt_gib(r['param_bytes'])}"
    else:
      p = f"bf16 base {fmt_gib(r['frozen_bytes'])} + fp32 LoRA {fmt_gib(r['trainable_bytes'])}"
    res = ("n/a" if r["residuals1"] is None else
           f"{fmt_gib(r['residuals1'])}; +{fmt_gib(r['residual_slope'])}")
    body.append([row_name(r), fmt_params(r["trainable_params"]), p,
                 fmt_gib(r["optimizer_bytes"]), fmt_gib(r["grad_bytes"]), fmt_gib(r["temp1"]),
                 fmt_gib(r["slope"]), res,
                 fmt_gib(r["plain_temp1"]) if "plain_temp1" in r else "n/a", d,
                 f"{r['compile_s']:.0f}"])
  table(header, body)

  n = args.num_devices
  shapes = mesh_shapes(n)
  lines.append(f"Per-device GiB on {n} x {args.device_gib:g} GiB, per-device batch 1, and the "
               "largest per-device batch that fits (state split over fsdp as "
               "parallel.param_spec splits it; activations not split)")
  lines.append("")
  header = ["model / method / remat"] + [f"(data={d}, fsdp={f})" for d, f in shapes] + \
           ["smallest fsdp that fits", f"+ T5-XXL bf16 resident ({fmt_gib(2 * T5_XXL_PARAMS)})"]
  body = []
  t5 = 2 * T5_XXL_PARAMS
  for r in rows:
    fit = mesh_fit(r, n, device_bytes)
    fit_t5 = mesh_fit(r, n, device_bytes, t5)
    cells = []
    for s in shapes:
      used1, best, used_best, _ = fit[s]
      cells.append(f"{fmt_gib(used1)} (max B={best})" if best else f"{fmt_gib(used1)} (no fit)")

    def pick(f):
      for s in shapes:
        used1, best, used_best, _ = f[s]
        if best:
          return (f"({s[0]},{s[1]}): B<={best}; headroom {fmt_gib(device_bytes - used1)} at "
                  f"B=1, {fmt_gib(device_bytes - used_best)} at B={best}")
      return "none"
    body.append([row_name(r)] + cells + [pick(fit), pick(fit_t5)])
  table(header, body)
  return "\n".join(lines)


NOTES = """Notes:
* Parameters: full = fp32 master weights; LoRA = frozen base in bf16 plus fp32 factors (the
  params column gives both). Gradients (fp32, 4 B per trainable param; the compiled step's
  output less the loss agrees to within its buffers' alignment, a few KiB) and AdamW mu + nu
  (fp32) cover the trainable parameters only.
* LoRA applies its factors beside the kernels, unmerged: y = x W + s (x A) B
  (`models.adapters.apply`). The "LoRA merged (before)" rows merge them into the kernels
  inside the step, as the library did before: the merged fp32 kernels of every targeted
  projection and their 16-bit copies are temporaries (FLUX.1-dev: 2.51 B targeted params x
  6 B = 14.0 GiB; SD3.5-M: 0.45 B, 2.5 GiB; batch independent).
* Activations: temp bytes of one jitted value_and_grad micro-step compiled by XLA:CPU in a
  GPU-like way: float16 in place of bfloat16 (same bytes) with the passes `change-op-data-type`
  (16-bit dots -> f32 dots on f32 copies of the operands, weights included) and
  `cse_barrier_expander` (drops jax.checkpoint's barriers, which undoes remat on XLA:CPU) off.
  Blocked XLA attention, whose backward recomputes the softmax (on GPU cuDNN flash attention
  plays that part). For LoRA they include the merged fp32 kernels and their 16-bit copies.
  "plain XLA:CPU bf16 temp": the same step as XLA:CPU compiles it by default, with those
  artefacts. "autodiff residuals": what JAX's autodiff saves for the backward pass, in bf16,
  weights not counted (a lower bound on the stored activations before XLA's fusion; the
  working set of the backward pass comes on top). XLA:CPU's buffer assignment is not the
  GPU's: the activation numbers are an estimate of the GPU/TPU peak, not a measurement.
* depth "extrapolated from a+b, ...": temp compiled at reduced depths (blocks of each kind, real widths and
  sequence lengths), fitted linearly (a + b1 n1 + b2 n2) through three depths, checked at a
  fourth (the % is measured vs predicted there) and extrapolated to the real depth; "real,
  compiled (fit from reduced depths: x%)": compiled at the real depth, x = the fit's error.
* Mesh: the state (weights, grads, mu, nu) of kernels >= 2^18 elements is split over fsdp,
  vectors and small arrays are replicated; activations scale with the per-device batch, which
  the global batch divided by all devices (data x fsdp), whatever the shape. Not counted: the
  fsdp all-gather buffers beyond what the single-device step holds, a gradient-accumulation
  buffer (one more fp32 copy of the trainable params if micro-steps are accumulated outside the
  step), the allocator's fragmentation and the framework's reserve (XLA preallocates 75% of
  the GPU by default: set XLA_PYTHON_CLIENT_MEM_FRACTION), the VAE and the text encoders.
* Text encoders: prompt embeddings can be computed once per epoch before the update, so the
  encoders (T5-XXL 4.76 B params, 8.87 GiB in bf16; CLIP-L/G) need not be resident during it;
  the last column shows the fit if T5-XXL stays resident (replicated, bf16).
"""


def run(args, log=lambda msg: print(msg, file=sys.stderr, flush=True)):
  models = TINY_MODELS if args.tiny else MODELS
  names = [m for m in args.models.split(",") if m]
  bad = [m for m in names if m not in models]
  if bad:
    raise SystemExit(f"unknown --models {bad}; choose from {list(models)}")
  rows_wanted = ROWS if args.rows == "all" else tuple(r for r in args.rows.split(",") if r)
  bad = [r for r in rows_wanted if r not in ROWS]
  if bad:
    raise SystemExit(f"unknown --rows {bad}; choose from {', '.join(ROWS)} or all")
  depths = args.depths
  rows = []
  for name in names:
    spec = models[name]
    if spec.expected_params is not None:
      got = count(spec.abstract_params(spec.make_config(*spec.real), jnp.float32))
      if got != spec.expected_params:
        raise SystemExit(f"{name}: {got:,} params, expected {spec.expected_params:,}")
    for r in rows_wanted:
      method, remat = r.split("-")
      rows.append(measure_row(spec, method, remat == "on", depths, args.fit_blocks,
                               args.max_row_compile_s, log))
  return rows


def build_parser():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--models", default="sd35_medium,flux_dev",
                 help="comma-separated: sd35_medium, flux_dev")
  p.add_argument("--rows", default="all", help=f"comma-separated of {', '.join(ROWS)}, or all")
  p.add_argument("--depths", choices=("auto", "full", "fit"), default="auto",
                 help="fit: compile reduced depths and extrapolate; full: compile the real "
                      "depth; auto: fit, then also the real depth if the fit predicts it "
                      "compiles within --max_row_compile_s")
  p.add_argument("--max_row_compile_s", type=float, default=240.0)
  p.add_argument("--fit_blocks", type=int, default=1,
                 help="auto: fit at (p,p), (2p,p), (p,2p) blocks of each kind, check at (2p,2p)")
  p.add_argument("--markdown", action="store_true", help="markdown tables (else aligned text)")
  p.add_argument("--tiny", action="store_true", help="tiny configs (seconds; for the tests)")
  p.add_argument("--device_gib", type=float, default=80.0)
  p.add_argument("--json_out", default=None, help="also write the rows as JSON here")
  p.add_argument("--num_devices", type=int, default=8)
  return p


def main(argv=None):
  args = build_parser().parse_args(argv)
  args.pixels = ("tiny configs and latents (not 512 px)" if args.tiny else
                 "512 px (latents 64x64x16)")
  t0 = time.perf_counter()
  rows = run(args)
  if args.json_out:
    import json
    with open(args.json_out, "w") as f:
      json.dump([{k: v for k, v in r.items() if k != "trees"} for r in rows], f, indent=1)
  print(tables(rows, args))
  print(NOTES)
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, {len(rows)} rows, "
        f"{sum(len(r['compiles']) for r in rows)} compiles, wall {time.perf_counter() - t0:.0f} s")
  return rows


if __name__ == "__main__":
  main()
