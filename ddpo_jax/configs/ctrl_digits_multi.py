r"""CTRL on the digits with two controls at once: y = (digit class, stroke thickness).

Each control has its own labelled data set (class labels and thickness levels come from two
disjoint halves of the digits training split, so no image carries both labels) and its own
classifier; the reward is log p̂_class(y1 | x) + log p̂_thick(y2 | x) (y1 ⊥ y2 | x), the
prompt is "" (the unconditional model). Labels are written `class:thickness`.

  python -m ddpo_jax.main --config=ctrl_digits_multi --workdir=/tmp/ctrl_multi
  python -m ddpo_jax.sample --workdir=/tmp/ctrl_multi --labels=3:0,3:2,8:0,8:2 --num=16

Variants: `n100`, `n300`, `cfg`, `cg`, `ddpo`, `runlocal`
(`ddpo_jax.config_base.CTRL_VARIANTS`).
"""
from ddpo_jax import config_base
from ddpo_jax.config_schema import condition


def get_config(arg=None):
  config = config_base.ctrl_digits_base()
  config.ctrl.controls = ("digit", "thickness")
  config.ctrl.conditions.digit = condition("digits_class", 10, split="train", part=0, num_parts=2)
  config.ctrl.conditions.thickness = condition("digits_thickness", 3, split="train", part=1,
                                               num_parts=2)
  config.ctrl.prompts = ("",)
  return config_base.apply_variants(config, arg, config_base.CTRL_VARIANTS, "CTRL")
