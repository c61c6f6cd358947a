"""Evaluates a CTRL (or baseline) run: is the requested label there, and is there variety?

Command line only: `python -m ddpo_jax.ctrl.evaluate ...` (flags: `--help`) runs
ddpo_jax.trainer.ctrl_evaluate as __main__; the code and its flags are there: import from there.
"""
import runpy

if __name__ == "__main__":
  runpy.run_module("ddpo_jax.trainer.ctrl_evaluate", run_name="__main__", alter_sys=True)
