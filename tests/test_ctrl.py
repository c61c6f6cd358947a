"""CTRL on the tiny digits configs: the augmented model, both solvers, baselines, CLIs, bad input."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from helpers import load_config

from ddpo_jax.ctrl import controls as ctrl_controls, policy as ctrl_policy
from ddpo_jax.numerics import diffusion
from ddpo_jax.trainer import checkpoints, ctrl as trainer
from ddpo_jax.trainer.families import build_base_policy, build_policy


def test_contexts_and_label_specs():
  controls = [ctrl_controls.Control("digit", 10, 1.0), ctrl_controls.Control("thickness", 3, 1.0)]
  ctx = ctrl_controls.format_context("a handwritten 3", [3, 2])
  assert ctx == "a handwritten 3||y=3:2"
  assert ctrl_controls.parse_context(ctx) == ("a handwritten 3", (3, 2))
  assert ctrl_controls.parse_context("||y=0:1") == ("", (0, 1))
  assert ctrl_controls.parse_label_spec("7:null", controls) == (7, 3)
  with pytest.raises(ValueError, match="labels 0..9"):
    ctrl_controls.parse_label_spec("12:0", controls)
  with pytest.raises(ValueError, match="2 control"):
    ctrl_controls.parse_label_spec("3", controls)
  with pytest.raises(ValueError, match="not a CTRL context"):
    ctrl_controls.parse_context("a handwritten 3")


def test_control_embedding_null_row_has_zero_value_and_gradient():
  controls = [ctrl_controls.Control("a", 3, 1.0), ctrl_controls.Control("b", 2, 1.0)]
  tables = {"a": jnp.arange(4 * 5.0).reshape(4, 5), "b": jnp.ones((3, 5))}
  labels = jnp.asarray([[3, 2], [1, 2], [3, 0]])
  emb = ctrl_policy.control_embedding(tables, labels, controls)
  np.testing.assert_array_equal(emb[0], 0.0)  # both null
  np.testing.assert_array_equal(emb[1], tables["a"][1])
  np.testing.assert_array_equal(emb[2], tables["b"][0])
  grads = jax.grad(lambda t: ctrl_policy.control_embedding(t, labels, controls).sum())(tables)
  np.testing.assert_array_equal(grads["a"][3], 0.0)
  np.testing.assert_array_equal(grads["b"][2], 0.0)
  assert float(jnp.abs(grads["a"][1]).sum()) > 0


@pytest.mark.slow  # 72 s in CI; CTRL's init equality stays fast on the mixture (test_ctrl_gmm)
def test_augmented_model_equals_pretrained_at_init(digits_cache, tmp_path):
  """Zero tables: the CTRL policy's samples are bit-identical to the base model's for the
  same key and prompt, whatever labels are asked for; KL to the pre-trained model is 0."""
  config = load_config("ctrl_digits_class", "runlocal")
  policy = build_policy(config, str(tmp_path))
  np.testing.assert_array_equal(policy.denoiser.null_labels, [10])  # guidance's unconditional half
  base = build_base_policy(config)
  sched = diffusion.NoiseSchedule.from_config(base.denoiser.scheduler_config)
  ts, prev = sched.ddim_timesteps(config.sample.num_steps)
  n = 8
  ctx = base.encode_prompts(base.params, jnp.asarray(base.tokenize([""] * n)))
  kw = dict(alphas_cumprod=sched.alphas_cumprod, timesteps=ts, prev_timesteps=prev,
            latent_shape=base.denoiser.latent_shape, eta=1.0, guidance_scale=1.0,
            final_alpha_cumprod=sched.final_alpha_cumprod)
  key = jax.random.PRNGKey(0)
  frozen = {k: v for k, v in policy.params.items() if k != "unet"}
  unet = policy.assemble_denoiser(policy.params["unet"], frozen)
  labels = jnp.arange(n)[:, None] % 10
  a = diffusion.sample_trajectory(policy.denoiser, unet, key, ctx, None, class_labels=labels, **kw)
  b = diffusion.sample_trajectory(base.denoiser, base.params["unet"], key, ctx, None, **kw)
  np.testing.assert_array_equal(np.asarray(a.final_latents), np.asarray(b.final_latents))
  loss_fn = trainer.make_backprop_loss(policy, config, policy.rewards["ctrl_log_likelihood"].fn)
  ids = jnp.asarray(policy.tokenize([ctrl_controls.format_context("", [0])] * n))
  _, metrics = loss_fn(policy.params["unet"], {**frozen, "reference_unet": policy.params["unet"]},
                       key, ids, labels)
  assert float(metrics["kl_to_pretrained"]) == 0.0


def test_control_min_timestep_gates_the_control(digits_cache, tmp_path):
  """`ctrl.control_min_timestep`: with non-zero tables the model equals the pre-trained one
  exactly at t < t_min and differs from it at t >= t_min."""
  config = load_config("ctrl_digits_class", "runlocal", **{"ctrl.control_min_timestep": 500,
                                                           "ctrl.train_base": False})
  policy = build_policy(config, str(tmp_path))
  base = build_base_policy(config)
  frozen = {k: v for k, v in policy.params.items() if k != "unet"}
  trainable = jax.tree.map(lambda x: x + 1.0, policy.params["unet"])  # non-zero tables only
  unet = policy.assemble_denoiser(trainable, frozen)
  n = 4
  x = jax.random.normal(jax.random.PRNGKey(0), (n,) + tuple(base.denoiser.latent_shape))
  ctx = base.encode_prompts(base.params, jnp.asarray(base.tokenize([""] * n)))
  labels = jnp.arange(n)[:, None]
  for t, gated in ((499, True), (500, False)):
    tt = jnp.full((n,), t, jnp.int32)
    a = np.asarray(policy.denoiser(unet, x, tt, ctx, labels))
    b = np.asarray(base.denoiser(base.params["unet"], x, tt, ctx, None))
    if gated:
      np.testing.assert_array_equal(a, b)
    else:
      assert np.abs(a - b).max() > 1e-3


def _run(args, timeout=600):
  result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=os.environ.copy())
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
  return result


# The ddpo solver's run overrides the ctrl weights on the command line: the run must use them
# (they were copied into train.* / reward.* before the overrides applied, and ignored).
_DDPO_OVERRIDES = ("--config.ctrl.kl_weight=0.5", "--config.ctrl.reward_weight=2.0",
                   "--config.ctrl.kl_reduction=sum")


# Slow tier: 2-5 minutes per run (training, evaluation, sampling) on the 2-core CPU under load.
# The fast tier checks CTRL's model and loss at init (test_augmented_model_equals_pretrained_at_init
# and tests/test_ctrl_gmm.py), its data and classifiers (tests/test_ctrl_data.py) and its configs
# (test_bad_input_errors_before_training, tests/test_config_schema.py).
@pytest.mark.parametrize("config_name,variant,labels,overrides", [
    pytest.param("ctrl_digits_class", "runlocal", "0,1,2,3", (), marks=pytest.mark.slow),
    pytest.param("ctrl_digits_multi", "runlocal,cfg", "3:0,3:2", (), marks=pytest.mark.slow),
    pytest.param("ctrl_digits_thickness", "runlocal,cg", "0,2", (), marks=pytest.mark.slow),
    pytest.param("ctrl_digits_class", "runlocal,ddpo", "5", _DDPO_OVERRIDES,
                 marks=pytest.mark.slow),
])
def test_train_sample_evaluate_cli(digits_cache, tmp_path, config_name, variant, labels, overrides):
  """`ddpo_jax.main` trains (and evaluates) each method on the digits configs' two CPU devices
  (`cpu_devices`); the sample CLI cycles --labels and stores them in the npz. The ddpo solver
  trains with the ctrl weights given on the command line, and its saved config says so."""
  workdir = tmp_path / "run"
  train_run = _run(["-m", "ddpo_jax.main", f"--config={REPO}/ddpo_jax/configs/{config_name}.py:{variant}",
                    f"--workdir={workdir}", *overrides])
  if overrides:
    saved = json.loads(checkpoints.read_state(str(workdir))[2]["config"])
    assert saved["train"]["kl_coef"] == 0.5 and saved["train"]["kl_reduction"] == "sum"
    assert saved["reward"]["weights"] == {"ctrl_log_likelihood": 2.0}
  assert "training on 2 devices (cpu, 1 process, mesh {'data': 2, 'fsdp': 1})" in train_run.stdout
  assert checkpoints.manager(str(workdir), read_only=True).latest_step() >= 1
  result = json.load(open(workdir / "eval.json"))
  assert 0.0 <= result["diversity"] and result["num_samples"] == 60
  assert any(k.endswith("_accuracy") for k in result)
  out = tmp_path / "s.npz"
  _run(["-m", "ddpo_jax.sample", f"--workdir={workdir}", "--num=5", f"--out={out}",
        f"--labels={labels}"])
  npz = np.load(out)
  specs = labels.split(",")
  want = [tuple(int(v) for v in specs[i % len(specs)].split(":")) for i in range(5)]
  assert [tuple(l) for l in npz["labels"]] == want
  assert npz["images"].shape[0] == 5


@pytest.mark.slow  # two in-process runs; resuming is checked in the fast tier on DDPO's loop
def test_backprop_run_resumes(digits_cache, tmp_path):
  """A direct-backprop run stopped after one epoch continues from its checkpoint: the second
  call trains only epoch 1, its optimizer step count continues, and the control tables moved
  away from zero (the null rows stay exactly zero)."""
  overrides = {"ctrl.eval_num_samples": 0, "ctrl.steps_per_epoch": 3}
  workdir = str(tmp_path / "run")
  trainer.train_and_evaluate(load_config("ctrl_digits_class", "runlocal", num_epochs=1, **overrides), workdir)
  trainer.train_and_evaluate(load_config("ctrl_digits_class", "runlocal", num_epochs=2, **overrides), workdir)
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["epoch"] for r in rows] == [0, 1]
  assert [r["optimizer_step"] for r in rows] == [3, 6]
  step, state, _ = checkpoints.read_state(workdir)
  table = np.asarray(state["params"]["control"]["digit"])
  assert step == 2 and np.abs(table[:10]).max() > 0 and np.all(table[10] == 0)


def test_bad_input_errors_before_training(digits_cache, tmp_path):
  # a table size that disagrees with the data / classifier
  config = load_config("ctrl_digits_class", "runlocal", **{"ctrl.conditions.digit.num_classes": 9})
  with pytest.raises(ValueError, match="num_classes=9"):
    build_policy(config, str(tmp_path / "a"))
  # a saved classifier whose label count disagrees with the embedding table
  good = load_config("ctrl_digits_class", "runlocal")
  build_policy(good, str(tmp_path / "b"))
  thick = load_config("ctrl_digits_thickness", "runlocal")
  thick.ctrl.controls = ("digit",)
  thick.ctrl.conditions.digit = thick.ctrl.conditions.thickness
  with pytest.raises(ValueError, match="classes"):
    build_policy(thick, str(tmp_path / "b"))
  for field, value, match in [("ctrl.method", "magic", "ctrl.method"),
                              ("ctrl.truncation", "half", "ctrl.truncation"),
                              ("ctrl.kl_reduction", "max", "kl_reduction"),
                              ("ctrl.batch_size", 0, r"ctrl.batch_size=0 is outside its valid "
                               r"range: must be an integer in \[1, inf\)"),
                              ("train.control_learning_rate", -0.1,
                               r"train.control_learning_rate=-0.1 is outside .* \[0, inf\)"),
                              ("keep_checkpoints", -2, r"keep_checkpoints=-2 is outside")]:
    with pytest.raises(ValueError, match=match):
      trainer.train_and_evaluate(load_config("ctrl_digits_class", "runlocal", **{field: value}),
                                 str(tmp_path / "c"))
  with pytest.raises(ValueError, match="unknown CTRL config variant"):
    load_config("ctrl_digits_class", "runlocal,bogus")
  # config.mesh is the run's mesh: an fsdp axis the backprop loop would not use is an error
  with pytest.raises(ValueError, match=r"trains data-parallel only \(mesh.fsdp=1\)"):
    trainer.train_and_evaluate(load_config("ctrl_digits_class", "runlocal", **{"mesh.fsdp": 2}),
                               str(tmp_path / "e"))
  # the ddpo solver derives train.kl_coef / reward.weights from ctrl.*: setting them apart fails
  for field, value, match in [("train.kl_coef", 0.3, "ctrl.kl_weight"),
                              ("reward.weights", {"jpeg_compressibility": 1.0}, "ctrl.reward_weight")]:
    config = load_config("ctrl_digits_class", "runlocal,ddpo", **{field: value})
    with pytest.raises(ValueError, match=match):
      trainer.train_and_evaluate(config, str(tmp_path / "d"))


def test_offline_images_are_encoded_in_bounded_chunks():
  """The classifier-guidance baseline encodes its offline images `ENCODE_CHUNK` at a time
  (one VAE call on all of them needs hundreds of GB at 512 px): one compiled program whose
  batch never exceeds the chunk, the same encodings in the same order as one call."""
  traced = []

  def encode(w, images):  # a nonlinear per-image map, recording the batch it is traced for
    traced.append(images.shape[0])
    return jnp.tanh(images.reshape(images.shape[0], -1) @ w)

  rng = np.random.default_rng(0)
  images, w = rng.normal(size=(21, 4, 4, 3)).astype(np.float32), rng.normal(size=(48, 5)).astype(np.float32)
  got = trainer.encode_in_chunks(encode, jnp.asarray(w), images, chunk=8)
  assert traced == [8]  # 3 calls, the last padded: one program
  want = np.tanh(images.reshape(21, -1).astype(np.float64) @ w.astype(np.float64))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert trainer.encode_in_chunks(encode, jnp.asarray(w), images[:3], chunk=8).shape == (3, 5)
  with pytest.raises(ValueError, match="no images"):
    trainer.encode_in_chunks(encode, jnp.asarray(w), images[:0])


def test_cpu_devices_must_not_be_negative(tmp_path):
  result = subprocess.run([sys.executable, "-m", "ddpo_jax.main",
                           f"--config={REPO}/ddpo_jax/configs/ctrl_digits_class.py:runlocal",
                           f"--workdir={tmp_path}", "--config.cpu_devices=-1"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0 and "config.cpu_devices=-1 must be >= 0" in result.stderr, \
      result.stderr[-2000:]
