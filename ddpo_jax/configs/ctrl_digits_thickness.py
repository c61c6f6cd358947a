r"""CTRL on the digits: add y = stroke-thickness level to the class-conditional digits model.

y ∈ {0 thin, 1, 2 thick} is the tertile of an image's mean intensity (8×8, on the data's 0–16
scale), cut at the 33rd / 67th percentiles of that value over the whole scikit-learn digits set
(`ddpo_jax.ctrl.data.thickness_level`), a rule anyone can recompute from pixels: it is the
judge. Prompts c are the digit prompts ("a handwritten 3"), so sampling targets
p(x | c) p̂(y | x)^(1/α) / Z. Otherwise as ddpo_jax/configs/ctrl_digits_class.py (direct backprop, the
table and the UNet trained, KL mean-reduced over pixels with weight 1: α = 1 / 64;
`--config.ctrl.kl_reduction=sum`: α = 1, the target p(x | c, y)).

  python -m ddpo_jax.main --config=ctrl_digits_thickness --workdir=/tmp/ctrl_thick
  python -m ddpo_jax.sample --workdir=/tmp/ctrl_thick --labels=0,1,2 --num=30 \
      --prompts="a handwritten 8"

Variants: `n100`, `n300`, `cfg`, `cg`, `ddpo`, `runlocal`
(`ddpo_jax.config_base.CTRL_VARIANTS`).
"""
from ddpo_jax import config_base
from ddpo_jax.config_schema import condition


def get_config(arg=None):
  config = config_base.ctrl_digits_base()
  config.ctrl.controls = ("thickness",)
  config.ctrl.conditions.thickness = condition("digits_thickness", 3, split="train")
  config.ctrl.prompts = ()  # the digits task's prompts: one of the ten classes
  return config_base.apply_variants(config, arg, config_base.CTRL_VARIANTS, "CTRL")
