"""Trainer: the run level: the epoch loop every trainer runs (`loop`), reading a run back
(`runs`), work directories (`workdir`), sampling a run (`sample`) and CTRL's run and evaluation
(`ctrl`, `ctrl_evaluate`).

Layering: may import every layer below it (algorithms/, rewards/, tasks/, pipelines/, ctrl/,
models/, numerics/, the config modules); only the command lines (ddpo_jax.main, .sample,
.export) import it.
"""
