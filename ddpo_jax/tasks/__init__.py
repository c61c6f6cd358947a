"""Tasks: what is sampled and how (the digits task and model family, the prompt sets, the
trainer's sampling dynamics).

Layering: a middle-layer sibling of algorithms/, rewards/, pipelines/ and ctrl/ (they may import
each other); may import models/, numerics/ and the config modules; never trainer/ or the command
lines (main, sample, export).
"""
