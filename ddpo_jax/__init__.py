"""ddpo_jax: reinforcement-learning fine-tuning of diffusion models (DDPO, CTRL) in JAX/Flax."""
__version__ = "0.1.0"
