"""Trainer: the run level: the epoch loop every trainer runs (`loop`), checkpoints (`checkpoints`),
reading a run back (`runs`), work directories (`workdir`), the model-family registry
(`families`), sampling a run or a pipeline (`sample`), and CTRL's solvers, evaluation and
sampled data (`ctrl`, `ctrl_evaluate`, `ctrl_sampled_data`).

Layering (docs/architecture.md, checked by tests/test_architecture.py): may import every layer
below it; only the command lines (ddpo_jax.main, .sample, .export and the `python -m` shims)
import it.
"""
