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

from ddpo_jax import config_schema
from ddpo_jax.pipelines import digits
from ddpo_jax.trainer import ctrl as ctrl_trainer
from ddpo_jax.trainer import loop

# The repository's configs/ folder, beside the package (as ddpo_jax/main.py finds it).
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def config_names() -> tuple[str, ...]:
  """The configs in the repository's configs/ folder ("default", "sd3_pickscore", ...)."""
  if not os.path.isdir(CONFIGS):
    return ()
  return tuple(sorted(f[:-len(".py")] for f in os.listdir(CONFIGS)
                      if f.endswith(".py") and not f.startswith("_")))


def config_path(name: str) -> str:
  """The file of config `name`: a path if it ends in ".py" (relative to the working directory,
  as the CLI's --config), else configs/NAME.py of the repository.

  Raises:
    FileNotFoundError: no such file (listing the repository's configs for a name).
  """
  if name.endswith(".py"):
    path = os.path.abspath(os.path.expanduser(name))
    if not os.path.isfile(path):
      raise FileNotFoundError(f"config file {name!r} ({path}) does not exist")
    return path
  path = os.path.join(CONFIGS, f"{name}.py")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no config {name!r} in {CONFIGS}; known: "
                            f"{', '.join(config_names()) or '(none)'} (or a path to a .py file)")
  return path


def get_config(spec: str = "default") -> ml_collections.ConfigDict:
  """The config the CLI's `--config=SPEC` would train with: SPEC is "NAME[:VARIANTS]" (a file
  of the repository's configs/, e.g. "default", "sd3_pickscore:full", "default:runlocal") or
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
