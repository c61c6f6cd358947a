r"""Digits with the JPEG compressibility reward (−JPEG size in kB, PIL quality 95).

  python -m ddpo_jax.main --config=configs/digits_compressibility.py --workdir=/tmp/ddpo_digits_jpeg
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import default  # noqa: E402  (the digits defaults)


def get_config(arg=None):
  config = default.get_config(arg)
  config.reward.weights = {"jpeg_compressibility": 1.0}
  config.reward.metrics = ()
  config.per_prompt_stat_tracking.enabled = False
  return config
