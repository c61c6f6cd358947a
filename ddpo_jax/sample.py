"""Samples images from a training run's checkpoint or from a diffusers-format pipeline.

Command line only: `python -m ddpo_jax.sample ...` (flags: `--help`) runs
ddpo_jax.trainer.sample as __main__; the code and its flags are there: import from there.
"""
import runpy

if __name__ == "__main__":
  runpy.run_module("ddpo_jax.trainer.sample", run_name="__main__", alter_sys=True)
