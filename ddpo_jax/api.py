"""The Python API for notebooks and scripts: `get_config` loads a config as the CLI does,
`train` runs it (re-exported, lazily, as `ddpo_jax.get_config` / `ddpo_jax.train`).

  import ddpo_jax

  @ddpo_jax.rewards.reward("brightness")          # a host reward (docs/rewards.md)
  def brightness(images, prompts, metadata):
    return images.mean(axis=(1, 2, 3)) / 255.0, {}

  config = ddpo_jax.get_config("default:runlocal")
  config.reward.weights = {"brightness": 1.0}
  metrics = ddpo_jax.train(config, "workdirs/brightness")

One process: a multi-host run starts `python -m ddpo_jax.main` on every host (docs/operations.md).
"""
from __future__ import annotations

import importlib.util
import os

import jax
import ml_collections

from ddpo_jax import config_schema, configs
from ddpo_jax.pipelines import digits
from ddpo_jax.trainer import ctrl as ctrl_trainer
from ddpo_jax.trainer import loop

# The shipped configs (ddpo_jax/configs/NAME.py); `--config=NAME` of the CLIs resolves there too.
CONFIGS = configs.DIR
config_names = configs.names
config_path = configs.path


def get_config(spec: str = "default") -> ml_collections.ConfigDict:
  """The config the CLI's `--config=SPEC` would train with: SPEC is "NAME[:VARIANTS]" (a file
  of ddpo_jax/configs/, e.g. "default", "sd3_pickscore:full", "default:runlocal") or
  "PATH.py[:VARIANTS]"; the file's `get_config(VARIANTS)` (no argument without VARIANTS),
  locked as the CLI locks it (existing keys may be set, e.g. `config.reward.weights = {...}`;
  new ones may not be added).

  Raises:
    FileNotFoundError: `config_path`'s; ValueError: a file without `get_config`, or the
      config's own (an unknown variant, naming the known ones).
  """
  name, sep, variants = spec.partition(":")
  path = config_path(name)
  module_name = "ddpo_jax_config_" + os.path.splitext(os.path.basename(path))[0]
  loader = importlib.util.spec_from_file_location(module_name, path)
  module = importlib.util.module_from_spec(loader)
  loader.loader.exec_module(module)
  if not callable(getattr(module, "get_config", None)):
    raise ValueError(f"config file {path} defines no get_config(arg)")
  config = module.get_config(variants) if sep else module.get_config()
  if not isinstance(config, ml_collections.ConfigDict):
    raise ValueError(f"{path}: get_config returned a {type(config).__name__}, not a ConfigDict")
  config.lock()
  return config


def use_cpu_devices(num: int) -> None:
  """`config.cpu_devices` as the CLI applies it (JAX's CPU backend split into `num` devices;
  0: JAX's default); it must come before JAX starts its backend."""
  if num < 0:
    raise ValueError(f"config.cpu_devices={num} must be >= 0 (0: JAX's default)")
  if num:
    jax.config.update("jax_num_cpu_devices", num)


def train(config: ml_collections.ConfigDict, workdir: str, log=print,
          allow_config_change: tuple[str, ...] = ()) -> dict:
  """Runs (or resumes) `config` in `workdir` as `python -m ddpo_jax.main` would (in this
  process: one host), by `config.mode`: "ddpo", "ctrl" or "pretrain" (the digits model only).
  Returns the last epoch's metrics row (that of metrics.jsonl; {} for "pretrain").
  `log`: a print-like function for progress messages; `allow_config_change`: config keys (or
  fnmatch patterns) that may differ from the config a resumed run was saved with.
  """
  use_cpu_devices(int(config.cpu_devices))
  return run_mode(config, workdir, log, allow_config_change)


def run_mode(config: ml_collections.ConfigDict, workdir: str, log=print,
             allow_config_change: tuple[str, ...] = ()) -> dict:
  """`train` without the CPU-device setup (the CLI sets it up before `jax.distributed`)."""
  allow = tuple(allow_config_change)
  if config.mode == "pretrain":
    config_schema.validate(config)
    if config.model.kind != "digits":
      raise ValueError("mode='pretrain' exists for the built-in digits model only")
    digits.load_or_pretrain(config.model, config.model.pretrain.seed)
    return {}
  if config.mode == "ctrl":
    return ctrl_trainer.train_and_evaluate(config, workdir, log=log, allow_config_change=allow)
  if config.mode != "ddpo":
    raise ValueError(f"config.mode={config.mode!r}; use 'ddpo', 'ctrl' or 'pretrain'")
  return loop.train_and_evaluate(config, workdir, log=log, allow_config_change=allow)
