"""The published models' configs, shipped without weights: diffusers-format directories under
`ddpo_jax/models/published/` holding only model_index.json and each component's config (no
weights, no tokenizers; sources in published/SOURCES.md).

`load_pipeline(directory, abstract=True)` builds a pipeline of parameter shapes from them, which
is all `python -m ddpo_jax.plan` needs to compile a run's programs for a TPU or GPU topology;
`directory(hub_id)` maps a config's `model.pretrained_path` Hub id to its directory.
"""
from __future__ import annotations

import os

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "published")

# Hub id -> directory name under ROOT. SD 1.4 and 1.5 share every config (the UNet, VAE, CLIP
# text encoder and PNDM scheduler); only their weights differ.
HUB_IDS = {
    "CompVis/stable-diffusion-v1-4": "stable-diffusion-v1-5",
    "runwayml/stable-diffusion-v1-5": "stable-diffusion-v1-5",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "stable-diffusion-v1-5",
    "stabilityai/stable-diffusion-xl-base-1.0": "stable-diffusion-xl-base-1.0",
    "stabilityai/stable-diffusion-3.5-medium": "stable-diffusion-3.5-medium",
    "black-forest-labs/FLUX.1-dev": "FLUX.1-dev",
}


def directory(hub_id: str) -> str:
  """The shipped config directory of a published model's Hub id.

  Raises:
    ValueError: an id without shipped configs (naming the ones there are).
  """
  if hub_id not in HUB_IDS:
    raise ValueError(f"no shipped configs for the Hub id {hub_id!r} (and it is not a local "
                     f"directory); shipped: {', '.join(sorted(HUB_IDS))}. Give a local "
                     "diffusers directory: only its config files are read")
  return os.path.join(ROOT, HUB_IDS[hub_id])
