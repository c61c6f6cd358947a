r"""Flow-GRPO on the built-in digits task with a flow-matching transformer: offline, CPU.

The digits model as SD3's MMDiT (2x2 patches, the prompt embedding as its text), pre-trained by
rectified flow matching on scikit-learn's digits (first run only; cached), then fine-tuned with
Flow-GRPO (the SDE sampler, groups of 8 per prompt, group-relative advantages, PPO clip) on the
digits alignment reward log p(prompted class | image); the held-out SVC judge is logged.

  python -m ddpo_jax.main --config=configs/digits_flow.py --workdir=/tmp/digits_flow

Variants: `:cps` (coefficients-preserving sampling), `:mixgrpo` (a sliding SDE window),
`:fast` (Flow-GRPO-Fast), `:nft` (DiffusionNFT), `:runlocal` (seconds, for tests);
`ddpo_jax.recipes.digits_flow_config` has the settings.
"""
from ddpo_jax import recipes


def get_config(arg=None):
  return recipes.digits_flow_config(arg)
