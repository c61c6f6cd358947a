"""The shipped run configurations: one file per config, NAME.py with `get_config(arg)` (ml_collections'
config-file convention; what several share: ddpo_jax/config_base.py).

Every command that takes `--config` (ddpo_jax.main, ddpo_jax.plan, ddpo_jax.ctrl.make_sampled_data)
and `ddpo_jax.get_config` take either form:

  --config=default:runlocal                        # NAME[:VARIANTS]: this package's NAME.py
  --config=path/to/mine.py:runlocal                # PATH.py[:VARIANTS]: any config file

so `--config=ddpo_jax/configs/default.py` from a clone and `--config=default` from anywhere (an
installed package) load the same file. A spec whose part before ":" is an existing file is taken
as that file, as ml_collections' config_flags would; otherwise a NAME of this package is resolved
to its file's path (`resolve`), before absl parses the flags (`resolve_argv`).

This module imports nothing heavy: the config files themselves are loaded by path, not imported.
"""
from __future__ import annotations

import os

DIR = os.path.dirname(os.path.abspath(__file__))


def names() -> tuple[str, ...]:
  """The shipped configs' names ("default", "sd3_pickscore", ...)."""
  return tuple(sorted(f[:-len(".py")] for f in os.listdir(DIR)
                      if f.endswith(".py") and not f.startswith("_")))


def path(name: str) -> str:
  """The file of config `name`: PATH.py (relative to the working directory) if it ends in ".py",
  else this package's NAME.py.

  Raises:
    FileNotFoundError: no such file (listing the shipped configs for a name).
  """
  if name.endswith(".py"):
    file = os.path.abspath(os.path.expanduser(name))
    if not os.path.isfile(file):
      raise FileNotFoundError(f"config file {name!r} ({file}) does not exist")
    return file
  file = os.path.join(DIR, f"{name}.py")
  if os.sep in name or "/" in name or not os.path.isfile(file):
    raise FileNotFoundError(f"no config {name!r} in {DIR}; known: {', '.join(names())} "
                            "(or a path to a .py file)")
  return file


def resolve(spec: str) -> str:
  """`--config`'s value with a shipped config's NAME replaced by its file's path:
  "default:runlocal" -> ".../ddpo_jax/configs/default.py:runlocal". Returned unchanged when the
  part before ":" is an existing file or not a shipped name (config_flags then reports it)."""
  name, sep, variants = spec.partition(":")
  if os.path.isfile(name) or name.endswith(".py") or not name:
    return spec
  try:
    return path(name) + sep + variants
  except FileNotFoundError:
    return spec


def resolve_argv(argv: list[str], flag: str = "config") -> list[str]:
  """`argv` with the value of `--FLAG=SPEC` / `--FLAG SPEC` resolved (`resolve`); the
  `--FLAG.key=value` overrides and every other argument unchanged."""
  out, i = [], 0
  while i < len(argv):
    arg = argv[i]
    for prefix in (f"--{flag}", f"-{flag}"):
      if arg.startswith(prefix + "="):
        arg = prefix + "=" + resolve(arg[len(prefix) + 1:])
        break
      if arg == prefix and i + 1 < len(argv):
        out.append(arg)
        i += 1
        arg = resolve(argv[i])
        break
    out.append(arg)
    i += 1
  return out


def default_file() -> str:
  """The commands' default --config: default.py (digits prompt alignment)."""
  return os.path.join(DIR, "default.py")
