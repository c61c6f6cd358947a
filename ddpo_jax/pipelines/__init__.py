"""Pipelines: the model families' seams: the `Policy` interface a family fills in
(`policy`), the Stable Diffusion family (`sd`), and `families.build_policy`, the one place a
config becomes a policy.

Layering: a middle-layer sibling of algorithms/, rewards/, tasks/ and ctrl/ (they may import
each other); may import models/, numerics/ and the config modules; never trainer/ or the command
lines (main, sample, export).
"""
