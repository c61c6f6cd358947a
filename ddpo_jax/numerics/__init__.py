"""Numerics: pure math and sharding, no knowledge of training or of a model family.

Noise schedules and the DDIM step (`diffusion`), flow matching and Flow-GRPO's SDE / CPS steps
(`flow`), advantages and the RL losses (`rl`), the device mesh and sharding rules (`parallel`).

Layering: may import only the config schema (ddpo_jax.config_schema) and itself. Everything
else builds on it: models -> numerics.
"""
