"""`python -m ddpo_jax.plan`: abstract pipelines from configs alone, the shipped published configs,
the jaxpr FLOP count against closed forms and XLA, the collectives parser, topology names, and
(where libtpu is installed: `pip install -e ".[tpu-plan]"`) the real compile for a TPU topology
with its bad-input lines and exit codes.
"""
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny_models as tm
from conftest import REPO
from ddpo_jax.models import published_configs
from ddpo_jax.models.pipeline import load_pipeline
from ddpo_jax.numerics import flops
from ddpo_jax.trainer import plan as plan_lib

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu not installed "
                                  "(pip install -e '.[tpu-plan]')")
# The smallest digits run: one sampling call of 8 samples, 2 steps, one micro-batch.
TINY = ["--config.sample.batch_size=8", "--config.sample.num_batches_per_epoch=1",
        "--config.sample.num_steps=2", "--config.train.batch_size=8",
        "--config.train.gradient_accumulation_steps=1"]


def _shapes(tree):
  return jax.tree.map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype)), tree)


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
def test_abstract_pipeline_has_the_loaded_pipelines_shapes_and_ids(tmp_path, family):
  """load_pipeline(abstract=True): the same parameter tree, shapes and dtypes as loading the
  weights, and token ids of the tokenizers' shape, without reading weights or tokenizers."""
  if family == "sd":
    path = tm.save_tiny_pipeline(str(tmp_path / family))
  elif family == "sdxl":
    path = tm.save_tiny_sdxl_pipeline(str(tmp_path / family))
  else:
    path = tm.save_tiny_flow_pipeline(str(tmp_path / family), family)
  real = load_pipeline(path, jnp.bfloat16)
  abstract = load_pipeline(path, jnp.bfloat16, abstract=True)
  assert abstract.abstract and not getattr(real, "abstract")
  assert _shapes(abstract.params) == _shapes(real.params)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract.params))
  ids = real.tokenize(["a cat", ""])
  placeholder = abstract.tokenize(["a cat", ""])
  assert placeholder.shape == ids.shape and placeholder.dtype == ids.dtype


# Published parameter counts (the model cards / papers), millions: the abstract trees built from
# the shipped configs must reproduce them to 0.1 M.
PUBLISHED_MILLIONS = {
    "runwayml/stable-diffusion-v1-5": {"unet": 859.5, "vae": 83.7, "text_encoder": 123.1},
    "stabilityai/stable-diffusion-xl-base-1.0": {"unet": 2567.5, "text_encoder_2": 694.7},
    "stabilityai/stable-diffusion-3.5-medium": {"text_encoder_3": 4762.3},
    "black-forest-labs/FLUX.1-dev": {"transformer": 11901.4, "text_encoder_2": 4762.3},
}


@pytest.mark.parametrize("hub_id", [
    "runwayml/stable-diffusion-v1-5",
    pytest.param("stabilityai/stable-diffusion-xl-base-1.0", marks=pytest.mark.slow),
    pytest.param("stabilityai/stable-diffusion-3.5-medium", marks=pytest.mark.slow),
    "black-forest-labs/FLUX.1-dev"])
def test_shipped_published_configs_give_the_published_parameter_counts(hub_id):
  pipe = load_pipeline(published_configs.directory(hub_id), jnp.bfloat16, abstract=True)
  for component, millions in PUBLISHED_MILLIONS[hub_id].items():
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(pipe.params[component]))
    assert abs(count / 1e6 - millions) < 0.1, (component, count)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(pipe.params))


def test_unknown_hub_id_without_shipped_configs_is_named():
  with pytest.raises(ValueError, match="no shipped configs for the Hub id 'someone/model'"):
    published_configs.directory("someone/model")


# ----------------------------------------------------------------------------- FLOPs
def test_matmul_flops_closed_forms():
  """2·m·k·n per matmul, a scan's body × its length, the gradient's transposed matmuls, and
  convolutions (grouped too), against formulas written out here."""
  x = jax.ShapeDtypeStruct((8, 64), jnp.float32)
  w = jax.ShapeDtypeStruct((64, 32), jnp.float32)
  assert flops.matmul_flops(lambda a, b: a @ b, x, w).flops == 2 * 8 * 64 * 32

  def scanned(a, b):
    back = jnp.ones((32, 64))
    return jax.lax.scan(lambda c, _: (jnp.tanh(c @ b) @ back, None), a, None, length=5)[0].sum()
  forward = 5 * 2 * (2 * 8 * 64 * 32)
  assert flops.matmul_flops(scanned, x, w).flops == forward
  # d/da only: one transposed matmul per forward matmul (no weight gradients)
  assert flops.matmul_flops(jax.jit(jax.grad(scanned)), x, w).flops == 2 * forward

  def conv(img, kernel, groups=1):
    return jax.lax.conv_general_dilated(img, kernel, (1, 1), "SAME", feature_group_count=groups,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
  img = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
  kernel = jax.ShapeDtypeStruct((3, 3, 3, 8), jnp.float32)
  assert flops.matmul_flops(conv, img, kernel).flops == 2 * (2 * 16 * 16 * 8) * (3 * 3 * 3)
  img8 = jax.ShapeDtypeStruct((2, 16, 16, 8), jnp.float32)
  depthwise = jax.ShapeDtypeStruct((3, 3, 1, 8), jnp.float32)
  assert flops.matmul_flops(lambda a, b: conv(a, b, 8), img8, depthwise).flops == \
      2 * (2 * 16 * 16 * 8) * 9
  both = jax.grad(lambda a, b: conv(a, b).sum(), argnums=(0, 1))
  assert flops.matmul_flops(both, img, kernel).flops == 3 * 2 * (2 * 16 * 16 * 8) * 27


def test_a_shard_map_body_counts_once_per_device():
  """shard_map's body has per-device shapes (the update's gradient function is one): it runs on
  each of the mesh's 4 devices, so the count is the global matmul's, not a quarter of it."""
  from jax.sharding import AbstractMesh, PartitionSpec as P
  mesh = AbstractMesh((4,), ("d",))

  def sharded(x, w):
    return jax.shard_map(lambda a, b: jax.lax.psum(a @ b, "d"), mesh=mesh, check_vma=False,
                         in_specs=(P(None, "d"), P("d", None)), out_specs=P())(x, w)
  x = jax.ShapeDtypeStruct((8, 64), jnp.float32)
  w = jax.ShapeDtypeStruct((64, 32), jnp.float32)
  assert flops.matmul_flops(sharded, x, w).flops == 2 * 8 * 64 * 32


def test_matmul_flops_agree_with_xla_on_a_loop_free_unet_step():
  """One tiny UNet forward (no loops): XLA's count (which adds elementwise work and leaves out
  the padding's products) and the jaxpr count agree to 25%; with the step in a 4-step scan XLA
  still counts one step, the jaxpr count four."""
  from ddpo_jax.models.unet import UNet2DConditionModel, UNetConfig, abstract_unet_params
  config = UNetConfig.from_dict(tm.unet_sd1_kwargs())
  model = UNet2DConditionModel(config)
  params = abstract_unet_params(config)
  x = jax.ShapeDtypeStruct((2, 16, 16, config.in_channels), jnp.float32)
  ctx = jax.ShapeDtypeStruct((2, 7, config.context_dim), jnp.float32)

  def step(p, lat, context):
    return model.apply({"params": p}, lat, jnp.full((2,), 10), context)
  ours = flops.matmul_flops(step, params, x, ctx).flops
  xla = jax.jit(step).lower(params, x, ctx).compile().cost_analysis()["flops"]
  assert 0.75 < ours / xla < 1.25, (ours, xla)

  def four(p, lat, context):
    return jax.lax.scan(lambda c, _: (step(p, c, context), None), lat, None, length=4)[0]
  assert flops.matmul_flops(four, params, x, ctx).flops == 4 * ours
  xla_four = jax.jit(four).lower(params, x, ctx).compile().cost_analysis()["flops"]
  assert xla_four < 1.5 * xla  # the loop body once: why plan counts the jaxpr


# ----------------------------------------------------------------------------- parsing
def test_collectives_are_read_from_compiled_hlo_text():
  text = """
  %all-reduce.3 = f32[4096]{0} all-reduce(f32[4096]{0} %x), replica_groups={{0,1}}
  %ags = (bf16[4096,512]{1,0}, bf16[4096,4096]{1,0}) all-gather-start(bf16[4096,512]{1,0} %w)
  %agd = bf16[4096,4096]{1,0} all-gather-done((bf16[4096,512]{1,0}, bf16[4096,4096]{1,0}) %ags)
  %all-reduce.4 = (f32[2]{0}, s32[]) all-reduce(f32[2]{0} %a, s32[] %b), to_apply=%add
  %fusion = f32[8]{0} fusion(f32[8]{0} %p), kind=kLoop, calls=%all_reduce_like_name
  """
  got = {c["kind"]: (c["count"], c["bytes"]) for c in plan_lib._collectives(text)}
  assert got == {"all-reduce": (2, 4096 * 4 + 2 * 4 + 4), "all-gather": (1, 4096 * 4096 * 2)}


def test_topology_names_and_aliases():
  assert plan_lib.resolve_topology_name("v5e-8") == ("v5e", "v5e:2x4", "2x4")
  assert plan_lib.resolve_topology_name("v5p:4x4x4") == ("v5p", "v5p:4x4x4", "4x4x4")
  assert plan_lib.resolve_topology_name("h100-8") == ("h100", "h100:1x1x8", "1x1x8")
  for bad in ("v7-8", "v5e", "v5e:2", "tpu-8"):
    with pytest.raises(ValueError, match="unknown topology"):
      plan_lib.resolve_topology_name(bad)


# ----------------------------------------------------------------------------- the CLI
def _plan(*args, timeout=900):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "ddpo_jax.plan", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_unknown_topology_is_one_line_and_exit_2():
  out = _plan("--topology=v9x-8")
  assert out.returncode == 2, out.stderr[-2000:]
  errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "unknown topology 'v9x-8'" in errors[0]


@needs_libtpu
@pytest.mark.parametrize("args, message", [
    (["--config.mesh.fsdp=3"], "mesh.fsdp=3 does not divide the 4 devices"),
    (["--config.sample.batch_size=6", "--config.train.batch_size=6"],
     "not divisible by the 4 devices"),
])
def test_bad_mesh_or_batch_for_the_topology_is_one_line_before_compiling(args, message,
                                                                          digits_cache):
  out = _plan("--topology=v5e:2x2", *TINY, *args)
  assert out.returncode == 2, out.stderr[-2000:]
  assert message in out.stderr and "compiling" not in out.stderr


@needs_libtpu
def test_plan_compiles_the_digits_run_for_a_tpu_topology(tmp_path, digits_cache):
  """The tiny digits run on v5e:2x2 (4 compile-only TPU v5e devices): both programs compile,
  fit in 16 GiB, count their FLOPs, and the update all-reduces its gradients."""
  path = tmp_path / "plan.json"
  out = _plan("--topology=v5e:2x2", f"--json={path}", *TINY)
  assert out.returncode == 0, out.stderr[-3000:]
  plan = json.loads(path.read_text())
  assert plan["topology"] == "v5e:2x2" and plan["num_devices"] == 4
  assert plan["hbm_bytes_per_device"] == 16 * 2 ** 30 and plan["fits"]
  names = [p["name"] for p in plan["programs"]]
  assert names == ["sample", "update"]
  for p in plan["programs"]:
    assert set(p["bytes"]) >= {"arguments", "outputs", "temporaries", "code", "total"}
    assert 0 < p["bytes"]["total"] < 2 ** 30 and p["fits"] and p["flops"] > 0
    assert p["compile_s"] > 0
  update = plan["programs"][1]
  assert any(c["kind"] == "all-reduce" and c["count"] >= 1 for c in update["collectives"])
  assert plan["flops_per_sample"] > 0
  assert plan["projected_samples_per_s_per_chip"]["0.4"] == pytest.approx(
      197e12 * 0.4 / plan["flops_per_sample"])
  assert "fits: yes" in out.stdout and "projected samples/s per chip" in out.stdout


@needs_libtpu
@pytest.mark.slow  # a second pair of TPU compiles; the fitting case is the fast tier's
def test_a_run_that_does_not_fit_says_so_with_exit_1_and_still_writes_json(tmp_path,
                                                                          digits_cache):
  path = tmp_path / "plan.json"
  big = ["--config.sample.batch_size=4194304", "--config.train.batch_size=4194304"]
  out = _plan("--topology=v5e:2x2", f"--json={path}", *TINY[2:3], *TINY[4:], *big,
              "--config.sample.num_batches_per_epoch=1")
  assert out.returncode == 1, out.stderr[-3000:]
  plan = json.loads(path.read_text())
  assert not plan["fits"] and not all(p["fits"] for p in plan["programs"])
  assert "DOES NOT FIT" in out.stdout and "fits: NO" in out.stdout
  assert sorted(os.listdir(tmp_path)) == ["plan.json"]


@needs_libtpu
@pytest.mark.slow  # two more TPU compiles of the tiny run
def test_max_batch_search_compiles_upward_until_the_limit(digits_cache):
  from helpers import load_config
  config = load_config("default")
  config.sample.num_batches_per_epoch = 1
  config.sample.num_steps = 2
  config.train.gradient_accumulation_steps = 1
  topology = plan_lib.make_topology("v5e:2x2")
  seen = []
  best, plan, refused = plan_lib.max_batch(config, topology, log=seen.append, limit=2)
  assert best == 2 and plan.fits and not refused
  assert [line for line in seen if line.startswith("batch ")] == [
      "batch 1 per device: fits", "batch 2 per device: fits"]
  assert plan.samples_per_epoch == 8  # 2 per device x 4 devices


@needs_libtpu
def test_trace_only_counts_flops_without_compiling(tmp_path, digits_cache):
  """--trace_only: the FLOPs and the projection from the traced programs, no compile (so no
  memory, collectives or verdict: null in the JSON), exit 0."""
  path = tmp_path / "plan.json"
  out = _plan("--topology=v5e:2x2", f"--json={path}", "--trace_only", *TINY)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "compiling" not in out.stderr and "fits: not compiled" in out.stdout
  plan = json.loads(path.read_text())
  assert plan["fits"] is None and plan["flops_per_sample"] > 0
  for p in plan["programs"]:
    assert p["bytes"] is None and p["collectives"] is None and p["flops"] > 0
