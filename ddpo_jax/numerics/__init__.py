"""Numerics: pure math and sharding, no knowledge of training or of a model family.

Noise schedules and the DDIM step (`diffusion`), flow matching and Flow-GRPO's SDE / CPS steps
(`flow`), advantages and the RL losses (`rl`), the device mesh and sharding rules (`parallel`),
array checksums (`checksums`).

Layering (docs/architecture.md, checked by tests/test_architecture.py): imports only the config
modules; every other layer builds on it.
"""
