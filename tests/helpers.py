"""Helpers shared by the training tests: configs with overrides, one sample + update."""
import importlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from conftest import REPO


# LLVM optimisation for one program (conftest compiles everything at -O0), for the few tests
# whose programs run for minutes rather than compile for seconds.
OPTIMIZED = {"xla_backend_optimization_level": 3}


def compile_optimized(fn, *args):
  """`jax.jit(fn)` compiled for `args` with `OPTIMIZED`; call it with arrays of their shapes."""
  return jax.jit(fn).lower(*args).compile(compiler_options=OPTIMIZED)


def edit_json(path, **changes) -> None:
  """Sets `changes` in the JSON object stored at `path` (a config or model_index.json)."""
  with open(path) as f:
    d = json.load(f)
  d.update(changes)
  with open(path, "w") as f:
    json.dump(d, f)


def xla_flags(*flags: str) -> str:
  """The tests' XLA_FLAGS (conftest's, from the environment) followed by `flags`."""
  return " ".join((os.environ.get("XLA_FLAGS", ""),) + flags).strip()


def load_config(name, variant=None, **overrides):
  """ddpo_jax/configs/NAME.py's get_config(variant) with dotted-key overrides ("train.batch_size")."""
  config = importlib.import_module(f"ddpo_jax.configs.{name}").get_config(variant)
  for key, value in overrides.items():
    node = config
    *path, leaf = key.split(".")
    for p in path:
      node = node[p]
    node[leaf] = value
  return config


def one_update(config, lr=None):
  """Samples one batch of `sample.batch_size` and takes one update call with advantages
  increasing with the sample index. Returns (policy, frozen, new state, metrics on the host)."""
  from ddpo_jax.algorithms import train
  from ddpo_jax.numerics import parallel, rl
  from ddpo_jax.tasks import dynamics
  from ddpo_jax.trainer.families import build_policy
  if lr is not None:
    config.train.learning_rate = lr
  mesh = parallel.make_mesh()
  policy = build_policy(config, "")
  opt = train.make_optimizer(config.train)
  sample_fn = train.make_sample_fn(policy, config, [], mesh)
  update_fn = train.make_update_fn(policy, config, opt, mesh)
  frozen = train.frozen_params(policy, config)
  n = config.sample.batch_size
  prompts = policy.prompt_fn(np.random.default_rng(0), n)
  metadata = {k: jnp.asarray(v) for k, v in policy.prompt_metadata(prompts).items()}
  window = dynamics.sde_window_steps(config.sample, config.seed, 0, 0)  # as the loop's batch 0
  if window is not None:
    metadata["sde_steps"] = jnp.broadcast_to(jnp.asarray(window), (n,) + window.shape)
  traj, _, _ = sample_fn(policy.params["unet"], frozen, jax.random.PRNGKey(0),
                         jnp.asarray(policy.tokenize(prompts)), metadata)
  assert traj.log_probs.shape == (n, config.sample.num_steps)
  trainable = jax.tree.map(jnp.copy, policy.params["unet"])  # the state is donated
  state = train.new_train_state(config, trainable, opt.init(trainable), jax.random.PRNGKey(0))
  adv, scales = (jnp.asarray(a, jnp.float32) for a in
                 rl.normalize_advantages(np.arange(n, dtype=np.float32), return_scale=True))
  new_state, metrics = update_fn(state, frozen, traj, adv, scales,
                                 jnp.arange(n, dtype=jnp.float32), jax.random.PRNGKey(1))
  return policy, frozen, new_state, jax.device_get(metrics)


def committed_steps(workdir) -> list[int]:
  """The checkpoint steps committed in a run directory (Orbax's finished step directories; a
  save in progress is a `*.orbax-checkpoint-tmp*` directory), sorted."""
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(e) for e in os.listdir(d) if e.isdigit()) if os.path.isdir(d) else []


def kill_after_commit(cmd, workdir, step: int, env=None, timeout_s: float = 600) -> tuple:
  """Starts `cmd` (a training run writing to `workdir`), SIGKILLs it as soon as a checkpoint
  step >= `step` is committed, and returns (committed steps at the kill, the run's output).

  Raises AssertionError if the run exits (or `timeout_s` passes) before that: a run that can
  finish first (too few epochs) would not test the kill."""
  import signal
  import subprocess
  import tempfile
  import time
  with tempfile.TemporaryFile("w+") as out:
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline, killed = time.monotonic() + timeout_s, False
    try:
      while proc.poll() is None and time.monotonic() < deadline:
        steps = committed_steps(workdir)
        if steps and steps[-1] >= step:
          os.kill(proc.pid, signal.SIGKILL)
          killed = True
          break
        time.sleep(0.005)
    finally:
      if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
      proc.wait()
    out.seek(0)
    text = out.read()
  assert killed and proc.returncode == -signal.SIGKILL, (
      f"the run ended (status {proc.returncode}) or timed out before checkpoint step {step} "
      f"was committed and it could be killed:\n{text[-3000:]}")
  return committed_steps(workdir), text
