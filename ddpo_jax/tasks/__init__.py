"""Tasks: what is sampled and how: the sampling dynamics behind one signature (`dynamics`: DDIM,
flow SDE / CPS / ODE / DPM2, SDE windows) and the prompt sets (`prompts`).

Layering (docs/architecture.md, checked by tests/test_architecture.py): may import models/,
numerics/ and the config modules; pipelines/ and everything above build on it.
"""
