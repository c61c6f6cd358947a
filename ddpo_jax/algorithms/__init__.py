"""DDPO's RL algorithms, one module each, behind one interface (`base.Algorithm`).

  ppo.PPO                                   "ppo"         DDPO-IS (docs/algorithms.md §3.2)
  sf.ScoreFunction                          "sf"          DDPO-SF (§3.3)
  rwr.RewardWeightedRegression              "rwr"         RWR (§3.4)
  rwr.SparseRewardWeightedRegression        "rwr_sparse"  RWR-sparse (§3.4)
  nft.NFT                                   "nft"         DiffusionNFT, flow models (§6.6)

`get(config.train.algorithm)` is how the trainer finds one; `register` adds another.
"""
from __future__ import annotations

from ddpo_jax.algorithms import nft, ppo, rwr, sf
from ddpo_jax.algorithms.base import Algorithm, PolicyGradient, StepModel

_REGISTRY: dict[str, Algorithm] = {}


def register(algorithm: Algorithm) -> Algorithm:
  """Makes `algorithm` available as `train.algorithm = algorithm.name`; returns it.

  Raises:
    ValueError: the name is empty or taken.
  """
  if not algorithm.name or algorithm.name in _REGISTRY:
    raise ValueError(f"algorithm name {algorithm.name!r} is empty or already registered "
                     f"({sorted(_REGISTRY)})")
  _REGISTRY[algorithm.name] = algorithm
  return algorithm


def unregister(name: str) -> None:
  """Removes a registered algorithm (e.g. one a test added)."""
  _REGISTRY.pop(name)


def names() -> tuple[str, ...]:
  return tuple(_REGISTRY)


def get(name: str) -> Algorithm:
  """The algorithm `train.algorithm = name` names.

  Raises:
    ValueError: an unknown name, listing the known ones.
  """
  if name not in _REGISTRY:
    raise ValueError(f"train.algorithm={name!r}; choose one of {names()}")
  return _REGISTRY[name]


for _algorithm in (ppo.PPO(), sf.ScoreFunction(), rwr.RewardWeightedRegression(),
                   rwr.SparseRewardWeightedRegression(), nft.NFT()):
  register(_algorithm)

__all__ = ["Algorithm", "PolicyGradient", "StepModel", "get", "names", "register", "unregister"]
