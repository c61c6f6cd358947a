r"""CTRL on the digits: add y = digit class to the unconditional digits model (prompt "").

The pre-trained digits model of the DDPO default (pre-trained first if it is not cached) is
used through its unconditional branch (prompt ""); CTRL learns a class-embedding table and
fine-tunes the UNet by backpropagating log p̂(y | x_0) − Σ_t KL_t through the whole 10-step DDIM
chain, the KL mean-reduced over the 64 pixels (the reference code's reduction; α = 1 / 64 in
the theory's terms, target p(x) p̂(y | x)^(1/α) / Z). The exact summed KL at α = 1 (target
p(x | y); `--config.ctrl.kl_reduction=sum`) learns the class far less on this chain (see
`ddpo_jax.config_base.ctrl_digits_base` and the digits results in docs/results.md).
p̂ is a SmallCNN trained on the labelled subset of the digits training split and
temperature-calibrated; the judge is an SVC trained on the held-out split.

  python -m ddpo_jax.main --config=ctrl_digits_class --workdir=/tmp/ctrl_class
  python -m ddpo_jax.sample --workdir=/tmp/ctrl_class --labels=0,1,2,3,4,5,6,7,8,9 --num=40

Variants (`--config=ctrl_digits_class:VARIANT`, comma-separated): `n100` / `n300`
(label budget), `cfg` / `cg` (the baselines on the same labelled data), `ddpo` (the PPO
solver), `runlocal` (seconds, for tests).
"""
from ddpo_jax import config_base
from ddpo_jax.config_schema import condition


def get_config(arg=None):
  config = config_base.ctrl_digits_base()
  config.ctrl.controls = ("digit",)
  config.ctrl.conditions.digit = condition("digits_class", 10, split="train")
  config.ctrl.prompts = ("",)
  return config_base.apply_variants(config, arg, config_base.CTRL_VARIANTS, "CTRL")
