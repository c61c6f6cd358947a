"""Flow-GRPO through the one training core: ddpo_jax/configs/sd3_pickscore.py and
ddpo_jax/configs/flux_pickscore.py (:runlocal, LoRA, and :full,runlocal) on tiny random SD3.5- and
FLUX.1-dev-style pipelines, trained by `loop.train_and_evaluate` with the flow SDE
(`sample.sampler="sde"`), groups of prompts, group-relative advantages and the PickScore reward
of a tiny random CLIPModel: `python -m ddpo_jax.main` killed after its first update's
checkpoint, the resumed run finishing with the update's log-probs equal to the sampler's at the
sampling params, samples from the result; the FLUX transformer split over a 4-device fsdp mesh
with the single-device update; the bad combinations refused before anything compiles."""
import inspect
import json
import os
import pickle
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import tiny_models as tm  # noqa: E402
from conftest import REPO  # noqa: E402
import jax  # noqa: E402
from ddpo_jax.algorithms import train  # noqa: E402
from ddpo_jax.numerics import parallel  # noqa: E402
from ddpo_jax.rewards import server as srv  # noqa: E402
from ddpo_jax.tasks import dynamics  # noqa: E402
from ddpo_jax.trainer import checkpoints, families, loop, runs, sample  # noqa: E402
from helpers import committed_steps, kill_after_commit, xla_flags  # noqa: E402
from test_clip_score import _write_model as write_tiny_clip_model  # noqa: E402
from test_sd import (compile_cache, load_config, sd_cache_dir, sd_overrides,  # noqa: F401,E402
                     subprocess_env, tiny_sd)

RECIPE = "sd3_pickscore"


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
  return tm.save_tiny_flow_pipeline(str(tmp_path_factory.mktemp("grpo") / "sd3"), "sd3")


@pytest.fixture(scope="module")
def tiny_pickscore(tmp_path_factory):
  """A tiny random transformers CLIPModel (standing in for PickScore_v1) and a prompt file."""
  root = tmp_path_factory.mktemp("pickscore")
  write_tiny_clip_model(str(root / "clip"), legacy=False, seed=7)
  (root / "prompts.txt").write_text("a photo of a cat\nthe red dog\na cat on the mat\n")
  return str(root / "clip"), str(root / "prompts.txt")


def _flow_overrides(tiny_sd3, tiny_pickscore, **extra):
  clip, prompts = tiny_pickscore
  return {"model.pretrained_path": tiny_sd3, "prompt_fn_kwargs.path": prompts,
          "reward.pickscore_path": clip, **extra}


# The runlocal variant of each flow config: (config file, variant, pipeline fixture). Slow tier
# (a minute or more each on the 2-core CPU): the fast tier's kill-and-resume test is
# tests/test_train.py's, and its Flow-GRPO training is below: SD3 with LoRA in
# test_multi_reward_runlocal_trains_on_pickscore_ocr_and_geneval, the FLUX full,runlocal update
# in test_fsdp_shards_the_flux_transformer_and_updates_as_one_device.
RUNLOCAL_RUNS = [
    pytest.param("sd3_pickscore", "runlocal", "tiny_sd3", id="sd3_pickscore:runlocal"),
    pytest.param("sd3_pickscore", "full,runlocal", "tiny_sd3", id="sd3_pickscore:full,runlocal"),
    pytest.param("flux_pickscore", "runlocal", "tiny_flux", id="flux_pickscore:runlocal"),
    pytest.param("flux_pickscore", "full,runlocal", "tiny_flux", id="flux_pickscore:full,runlocal"),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, variant, pipeline", RUNLOCAL_RUNS)
def test_runlocal_trains_resumes_after_a_kill_and_samples(name, variant, pipeline, request,
                                                          tiny_pickscore, compile_cache, tmp_path):
  """ddpo_jax/configs/NAME.py:VARIANT on its tiny pipeline: `python -m ddpo_jax.main` is SIGKILLed as soon
  as checkpoint step 1 (epoch 0's update) is committed (started with num_epochs=50 so that it
  cannot end first), then `loop.train_and_evaluate` resumes from the newest committed step and
  trains to the end (runlocal's 2 epochs when the kill came before step 2, as it nearly always
  does), and the result samples.

  Every epoch takes one optimizer step, after all of its micro-steps (asserted on the config):
  the update re-scores each step at the params that sampled it, so every epoch's importance
  ratio is 1 up to float error (approx_kl < 1e-10, clipfrac 0) -- with CFG (SD3) or the
  embedded guidance (FLUX), LoRA or the full transformer, in the killed run and the resumed
  one."""
  path = request.getfixturevalue(pipeline)
  overrides = _flow_overrides(path, tiny_pickscore)
  workdir = str(tmp_path / "run")
  cmd = [sys.executable, "-m", "ddpo_jax.main", f"--config={REPO}/ddpo_jax/configs/{name}.py:{variant}",
         f"--workdir={workdir}", "--config.num_epochs=50",
         *[f"--config.{k}={v}" for k, v in overrides.items()]]
  committed, out = kill_after_commit(cmd, workdir, step=1, env=subprocess_env(compile_cache))
  resume = committed[-1]
  assert committed == list(range(resume + 1)) and "saved the starting point as step 0" in out
  killed_rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert len(killed_rows) >= resume  # epochs whose checkpoint was committed were logged

  config = load_config(name, variant, **overrides, num_epochs=resume + 1)
  s, t = config.sample, config.train
  assert s.batch_size * s.num_batches_per_epoch == t.batch_size * t.gradient_accumulation_steps
  assert t.num_inner_epochs == 1 and config.save_freq == 1
  logs = []
  metrics = loop.train_and_evaluate(config, workdir, log=logs.append)
  said = "\n".join(map(str, logs))
  assert f"resuming from checkpoint step {resume} (epoch {resume})" in said, said
  assert "config change on resume: num_epochs: 50 -> " in said, said
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["epoch"] for r in rows] == list(range(resume + 1))  # each epoch once
  assert rows[:resume] == killed_rows[:resume]  # the killed run's committed epochs are kept
  for row in rows:
    assert row["approx_kl"] < 1e-10 and row["clipfrac"] == 0.0, row
    assert np.isfinite(row["loss"]) and np.isfinite(row["pickscore_mean"]), row
  assert np.isfinite(metrics["pickscore_cosine_mean"])
  assert metrics["optimizer_step"] == resume + 1
  assert committed_steps(workdir) == list(range(resume + 2))

  run_config, policy, params, step = runs.restore_run(workdir)
  assert step == resume + 1 and run_config.model.lora.enabled == ("full" not in variant)
  paths = [parallel.path_str(k) for k, _ in jax.tree_util.tree_leaves_with_path(params)]
  if "full" in variant:  # the whole transformer is trained
    assert "base_unet" not in policy.params and "transformer_blocks_0/attn/to_q/kernel" in paths
  else:  # LoRA factors on the attention; the pre-trained transformer is frozen
    assert "base_unet" in policy.params and all(k.endswith(("/a", "/b")) for k in paths), paths
    assert "transformer_blocks_0/attn/to_q/a" in paths, paths
    if name.startswith("flux"):  # the single-stream blocks' attention too
      assert "single_transformer_blocks_0/attn/to_q/a" in paths, paths
  _, start, _ = checkpoints.read_state(workdir, 0)
  moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                       start["params"], params)
  assert any(jax.tree.leaves(moved))  # training changed the params
  images, prompts = sample.sample_images(run_config, policy, params, 4, ["a cat"])
  assert images.shape == (4, 16, 16, 3) and images.dtype == np.uint8 and prompts == ["a cat"] * 4
  assert len({im.tobytes() for im in images}) == 4  # 4 different noise draws


def test_bad_flow_configs_are_refused_before_compiling(tiny_sd3, tiny_sd, prompt_assets):
  mesh = parallel.make_mesh()

  def refused(overrides, match, path=tiny_sd3, stage="policy"):
    config = load_config("sd_compressibility", "runlocal", **sd_overrides(path, prompt_assets,
                                                                          **overrides))
    with pytest.raises(ValueError, match=match):
      train.validate_config(config, mesh)
      dynamics.make_dynamics(families.build_policy(config, "").denoiser, config.sample)

  refused({}, r"sample.sampler='ddim' needs a 'eps'-predicting model; this one predicts "
          r"'velocity' \(use sample.sampler in \['sde', 'cps', 'ode', 'dpm2'\]\)")
  refused({"sample.sampler": "sde"}, r"'sde' needs a 'velocity'-predicting model; this one "
          r"predicts 'eps'", path=tiny_sd)
  refused({"sample.sampler": "sde", "sample.group_size": 3}, r"sample.group_size=3 must "
          r"divide sample.batch_size=4")
  refused({"sample.sampler": "sde", "sample.group_size": 2}, "set per_prompt_stat_tracking"
          r".enabled=False")
  refused({"sample.sampler": "cps", "sample.noise_level": 1.5}, "CPS needs 0 < noise_level")
  refused({"sample.sampler": "sde", "train.algorithm": "rwr"},
          r"train.algorithm='rwr' is an eps regression, written for DDIM")


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
  return tm.save_tiny_flow_pipeline(str(tmp_path_factory.mktemp("grpo") / "flux"), "flux")


def test_flux_dev_guidance_and_cfg_refused(tiny_flux, tiny_pickscore):
  """ddpo_jax/configs/flux_pickscore.py:runlocal on a tiny FLUX.1-dev-style pipeline feeds the embedded
  guidance (model.embedded_guidance) and no CFG (the ratio-1 check of both programs with it:
  `test_runlocal_trains_resumes_after_a_kill_and_samples`); CFG on FLUX is refused."""
  config = load_config("flux_pickscore", "runlocal", **_flow_overrides(tiny_flux, tiny_pickscore))
  assert config.sample.guidance_scale == 1.0 and config.model.embedded_guidance == 3.5
  config = load_config("flux_pickscore", "runlocal", **_flow_overrides(
      tiny_flux, tiny_pickscore, **{"sample.guidance_scale": 2.0}))
  with pytest.raises(ValueError, match=r"embeds its guidance scale .* set sample.guidance_scale=1"):
    families.build_policy(config, "")


FSDP_MIN_SIZE = 256  # elements: every kernel of the tiny FLUX transformer is at least 16 x 16


def _fsdp_check(flux, clip, prompts, min_size):
  """Runs in a process with 4 CPU devices: ddpo_jax/configs/flux_pickscore.py:full,runlocal; one sampled
  batch (one device), then one update on a (data 1, fsdp 4) mesh and one on a single device
  (fsdp 1) from the same trajectory, keys and initial state. Returns, for each mesh, the update's
  metrics, the parameter arrays (ndim >= 2, >= `min_size` elements) of the train state's params,
  Adam moments and the frozen params that are NOT split in 4 over `fsdp` (path, shape, spec,
  shard shape), and the host copies of the new params and of Adam's moments."""
  import jax
  import numpy as np
  from helpers import load_config
  from ddpo_jax.algorithms import train
  from ddpo_jax.numerics import parallel, rl
  from ddpo_jax.trainer import families
  assert jax.device_count() == 4, jax.devices()

  def config_for(fsdp):
    return load_config("flux_pickscore", "full,runlocal", **{
        "model.pretrained_path": flux, "prompt_fn_kwargs.path": prompts,
        "reward.pickscore_path": clip, "mesh.data": 1, "mesh.fsdp": fsdp,
        "mesh.fsdp_min_size": min_size,
        # 4 rows per micro-batch: one on each of the 4 devices the batch is split over
        "train.batch_size": 4, "train.gradient_accumulation_steps": 1})

  one = config_for(1)
  policy = families.build_policy(one, "")
  meshes = {4: parallel.make_mesh(config_for(4).mesh),
            1: parallel.make_mesh(one.mesh, jax.devices()[:1])}
  n = one.sample.batch_size
  batch = policy.prompt_fn(np.random.default_rng(0), n)
  meta = {k: np.asarray(v) for k, v in policy.prompt_metadata(batch).items()}
  traj, _, _ = train.make_sample_fn(policy, one, [], meshes[1])(
      policy.params["unet"], train.frozen_params(policy, one), jax.random.PRNGKey(0),
      policy.tokenize(batch), meta)
  traj = jax.device_get(traj)
  adv, scales = (np.asarray(a, np.float32) for a in rl.normalize_advantages(
      np.arange(n, dtype=np.float32), return_scale=True))

  def unsplit(tree):
    bad = []
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
      if x.ndim >= 2 and x.size >= min_size:
        shard = x.addressable_shards[0].data.shape
        if (parallel.FSDP_AXIS not in jax.tree.leaves(tuple(x.sharding.spec))
            or 4 * int(np.prod(shard)) != x.size or len(x.sharding.device_set) != 4):
          bad.append((parallel.path_str(path), x.shape, str(x.sharding.spec), shard))
    return bad

  out = {}
  for fsdp, mesh in meshes.items():  # as loop.train_and_evaluate places the state
    config = config_for(fsdp)
    opt = train.make_optimizer(config.train)
    params_sh, frozen_sh, state_sh = train.model_shardings(policy, config, opt, mesh)
    repl = parallel.replicated(mesh)
    frozen = parallel.put(train.frozen_params(policy, config), frozen_sh)
    params = parallel.put(policy.params["unet"], params_sh)
    opt_sh = state_sh.opt_state if isinstance(state_sh, train.TrainState) else repl
    state = train.TrainState(step=parallel.put(np.zeros((), np.int32), repl), params=params,
                             opt_state=jax.jit(opt.init, out_shardings=opt_sh)(params),
                             rng=parallel.put(jax.random.PRNGKey(0), repl),
                             ema_params=(parallel.put(policy.params["unet"], params_sh)
                                         if config.train.ema.enabled else None))
    update = train.make_update_fn(policy, config, opt, mesh)
    new, metrics = update(state, frozen, traj, adv, scales, np.arange(n, dtype=np.float32),
                          jax.random.PRNGKey(1))
    adam = new.opt_state[1][0]  # clip_by_global_norm, then adamw's (scale_by_adam, ...)
    out[fsdp] = {"metrics": {k: float(v) for k, v in jax.device_get(metrics).items()},
                 "unsplit": {"params": unsplit(new.params), "mu": unsplit(adam.mu),
                             "nu": unsplit(adam.nu), "frozen": unsplit(frozen)},
                 "mu_dtype": str(jax.tree.leaves(adam.mu)[0].dtype),
                 "params": jax.device_get(new.params), "mu": jax.device_get(adam.mu),
                 "nu": jax.device_get(adam.nu)}
  return jax.device_get(policy.params["unet"]), one.train.learning_rate, out


@pytest.mark.slow  # 25 s in CI; FLUX's parity and Flow-GRPO's SD3 run stay fast
def test_fsdp_shards_the_flux_transformer_and_updates_as_one_device(tiny_flux, tiny_pickscore,
                                                                    tmp_path):
  """mesh (data 1, fsdp 4) on 4 CPU devices, ddpo_jax/configs/flux_pickscore.py:full,runlocal with
  mesh.fsdp_min_size=256 (the tiny transformer's kernels are 16 x 16 to 256 x 16):
  `parallel.PARAM_RULES` split every kernel of the FLUX transformer, its Adam moments and the
  frozen VAE / text encoders' matrices in 4 over `fsdp` (each device holds a quarter), and the
  update from one trajectory equals the single-device (fsdp 1) update (measured differences in
  brackets):
  - grad_norm to 1e-5 relative [4.5e-7]; the loss to 1e-5 absolute [4.5e-8: a mean of
    +-advantage x ratio terms of size ~1 that cancel] and approx_kl to 1e-10 [1.9e-13];
  - Adam's second moment (after one step 0.001 g^2, float32: each element's gradient
    magnitude) to 3e-5 of each array's largest element [3.7e-6], the first moment (0.1 g,
    bfloat16 under :full) to 1e-2 of it [2.8e-4];
  - each parameter's change to 1e-2 of one learning-rate step [1.5e-3] (Adam's first step moves
    each element by about lr, which it is asserted to do).
  The same split check on the single-device state reports every such array (so it can fail)."""
  clip, prompts = tiny_pickscore
  out_file = tmp_path / "fsdp.pkl"
  script = (textwrap.dedent(inspect.getsource(_fsdp_check)) +
            "\nimport pickle\nwith open(%r, 'wb') as f:\n  pickle.dump(_fsdp_check(%r, %r, %r, %d), f)\n"
            % (str(out_file), tiny_flux, clip, prompts, FSDP_MIN_SIZE))
  # No JAX compilation-cache settings at all: nothing reuses these 4-device programs, and with
  # a cache directory set (or JAX_ENABLE_COMPILATION_CACHE=false) the subprocess took twice the
  # CPU time (measured on the 2-core machine: 25-34 s vs 13-14 s user).
  env = {k: v for k, v in subprocess_env().items() if not k.startswith(
      ("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE", "JAX_ENABLE_COMPILATION_CACHE"))}
  env["XLA_FLAGS"] = xla_flags("--xla_force_host_platform_device_count=4")
  env["PYTHONPATH"] = os.pathsep.join((REPO, os.path.join(REPO, "tests"), env["PYTHONPATH"]))
  result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  with open(out_file, "rb") as f:
    start, lr, out = pickle.load(f)
  sharded, single = out[4], out[1]
  assert sharded["unsplit"] == {"params": [], "mu": [], "nu": [], "frozen": []}, sharded["unsplit"]
  big = [x for x in jax.tree.leaves(start) if x.ndim >= 2 and x.size >= FSDP_MIN_SIZE]
  assert len(big) >= 20 and len(single["unsplit"]["params"]) == len(big)
  assert len(single["unsplit"]["nu"]) == len(big) and single["unsplit"]["frozen"]
  assert sum(x.size for x in big) > 0.9 * sum(x.size for x in jax.tree.leaves(start))
  assert sharded["mu_dtype"] == single["mu_dtype"] == "bfloat16"

  m4, m1 = sharded["metrics"], single["metrics"]
  assert all(np.isfinite(v) for v in m4.values()) and m4["grad_norm"] > 0, m4
  np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-5)
  np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=0, atol=1e-5)
  np.testing.assert_allclose(m4["approx_kl"], m1["approx_kl"], rtol=0, atol=1e-10)
  assert m4["clipfrac"] == m1["clipfrac"] == 0.0
  for key, rel in (("nu", 3e-5), ("mu", 1e-2)):
    for a, b in zip(jax.tree.leaves(sharded[key]), jax.tree.leaves(single[key])):
      a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
      assert np.abs(b).max() > 0
      np.testing.assert_allclose(a, b, rtol=0, atol=rel * np.abs(b).max(), err_msg=key)
  for x0, a, b in zip(jax.tree.leaves(start), jax.tree.leaves(sharded["params"]),
                      jax.tree.leaves(single["params"])):
    np.testing.assert_allclose(a - x0, b - x0, rtol=0, atol=1e-2 * lr)
  assert max(np.abs(b - x0).max() for x0, b in zip(
      jax.tree.leaves(start), jax.tree.leaves(single["params"]))) > 0.5 * lr  # it did move


# the test reader reads 128-px text images; the tiny pipeline's 16-px images read as "" (its
# empty 4-px-inset slices warn)
@pytest.mark.filterwarnings("ignore:Mean of empty slice", "ignore:invalid value encountered")
def test_multi_reward_runlocal_trains_on_pickscore_ocr_and_geneval(tiny_sd3, tiny_pickscore,
                                                                   compile_cache, tmp_path):
  """ddpo_jax/configs/sd3_multi_reward.py:runlocal: PickScore on device plus the OCR and GenEval scorers
  (tests/test_reward_plugins.py's deterministic engines) on two reward servers, 2 epochs
  through `loop.train_and_evaluate`: every term is logged, and reward_mean is the weighted sum
  1.0 pickscore + 0.5 remote_ocr + 0.5 remote_geneval of the terms' means; each server was
  asked for every sampled image."""
  clip, _ = tiny_pickscore
  prompts, specs = _write_text_and_colour_prompts(tmp_path)
  seen, servers = {}, []
  try:
    urls = {"ocr": _start_thread_server("ocr", srv.resolve_scorer(
                "ocr", {"engine": "test_reward_plugins:fake_reader"}), servers, seen),
            "geneval": _start_thread_server("geneval", srv.resolve_scorer(
                "geneval", {"engine": "test_reward_plugins:fake_detector",
                            "metadata_path": str(specs)}), servers, seen)}
    overrides = {**_flow_overrides(tiny_sd3, tiny_pickscore),
                 "prompt_fn_kwargs.path": str(tmp_path / "prompts.txt"),
                 "reward.server_urls.ocr": urls["ocr"],
                 "reward.server_urls.geneval": urls["geneval"]}
    config = load_config("sd3_multi_reward", "runlocal", **overrides)
    assert config.reward.pickscore_path == clip
    loop.train_and_evaluate(config, str(tmp_path / "run"))
  finally:
    for server in servers:
      server.shutdown()
      server.server_close()
  rows = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
  assert [r["epoch"] for r in rows] == [0, 1]
  for row in rows:
    total = row["pickscore_mean"] + 0.5 * row["remote_ocr_mean"] + 0.5 * row["remote_geneval_mean"]
    np.testing.assert_allclose(row["reward_mean"], total, rtol=1e-5, atol=1e-6)
    assert 0.0 <= row["remote_ocr_mean"] <= 1.0 and "remote_geneval_strict_accuracy_mean" in row
  n = config.sample.batch_size * config.sample.num_batches_per_epoch * 2
  assert seen == {"ocr": n, "geneval": n}


def _write_text_and_colour_prompts(tmp_path):
  """Two prompts that suit both the OCR and the GenEval scorer, in tmp_path/prompts.txt, and
  their GenEval specs in tmp_path/specs.jsonl. Returns (prompts, the specs' path)."""
  prompts = ['a photo of a red car and a sign that says "HI"',
             'a photo of a blue car and a sign that says "OK"']
  (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
  specs = tmp_path / "specs.jsonl"
  specs.write_text("".join(json.dumps({"prompt": p, "tag": "colors", "include": [
      {"class": "car", "count": 1, "color": c}]}) + "\n" for p, c in zip(prompts, ("red", "blue"))))
  return prompts, specs


def _start_thread_server(name, scorer, servers, seen):
  """An in-process reward server (a thread) around `scorer`, counting the images it scored in
  seen[name]; appended to `servers` (the caller shuts them down). Returns its URL."""
  def recording(images, prompts, metadata):
    seen[name] = seen.get(name, 0) + len(images)
    return scorer(images, prompts, metadata)
  server = srv.RewardServer(("127.0.0.1", 0), recording, name=name)
  threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                   daemon=True).start()
  servers.append(server)
  return server.url


@pytest.mark.slow  # the OCR and GenEval terms train in the fast tier in the multi-reward test
@pytest.mark.filterwarnings("ignore:Mean of empty slice", "ignore:invalid value encountered")
@pytest.mark.parametrize("name", ["sd3_ocr", "sd3_geneval"])
def test_remote_reward_runlocal_resumes_after_a_kill_and_samples(name, tiny_sd3, compile_cache,
                                                                 tmp_path):
  """ddpo_jax/configs/sd3_ocr.py and sd3_geneval.py :runlocal with their scorer (the OCR / GenEval
  plug-in with tests/test_reward_plugins.py's engines) behind a reward server: the training
  process is SIGKILLed once checkpoint step 1 is committed, the resumed run finishes with each
  epoch logged once (the remote reward's mean finite, the ratio 1 at the sampling params), and
  the result samples."""
  prompts, specs = _write_text_and_colour_prompts(tmp_path)
  kind = name.split("_")[1]
  kwargs = ({"engine": "test_reward_plugins:fake_reader"} if kind == "ocr" else
            {"engine": "test_reward_plugins:fake_detector", "metadata_path": str(specs)})
  servers, seen = [], {}
  try:
    url = _start_thread_server(kind, srv.resolve_scorer(kind, kwargs), servers, seen)
    overrides = {"model.pretrained_path": tiny_sd3,
                 "prompt_fn_kwargs.path": str(tmp_path / "prompts.txt"), "reward.server_url": url}
    workdir = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "ddpo_jax.main", f"--config={REPO}/ddpo_jax/configs/{name}.py:runlocal",
           f"--workdir={workdir}", "--config.num_epochs=50",
           *[f"--config.{k}={v}" for k, v in overrides.items()]]
    committed, _ = kill_after_commit(cmd, workdir, step=1, env=subprocess_env(compile_cache))
    resume = committed[-1]
    config = load_config(name, "runlocal", **overrides, num_epochs=resume + 1)
    logs = []
    loop.train_and_evaluate(config, workdir, log=logs.append)
  finally:
    for server in servers:
      server.shutdown()
      server.server_close()
  assert f"resuming from checkpoint step {resume} (epoch {resume})" in "\n".join(map(str, logs))
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["epoch"] for r in rows] == list(range(resume + 1))
  for row in rows:
    assert np.isfinite(row["remote_mean"]) and row["approx_kl"] < 1e-10, row
  assert seen[kind] >= config.sample.batch_size * (resume + 1)
  run_config, policy, params, step = runs.restore_run(workdir)
  assert step == resume + 1
  images, _ = sample.sample_images(run_config, policy, params, 4, prompts[:1])
  assert images.shape == (4, 16, 16, 3) and images.dtype == np.uint8
