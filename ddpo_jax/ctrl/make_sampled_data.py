"""Makes (or checks) the sampled offline datasets of a CTRL config before training:

Command line only: `python -m ddpo_jax.ctrl.make_sampled_data ...` (flags: `--help`) runs
ddpo_jax.trainer.ctrl_sampled_data as __main__; the code and its flags are there: import from there.
"""
import runpy

if __name__ == "__main__":
  runpy.run_module("ddpo_jax.trainer.ctrl_sampled_data", run_name="__main__", alter_sys=True)
