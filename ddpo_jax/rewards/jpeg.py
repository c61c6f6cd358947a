"""JPEG (in)compressibility, DDPO's host rewards: "jpeg_compressibility" (−kB) and
"jpeg_incompressibility" (+kB), the file size at PIL quality 95."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from ddpo_jax.rewards.base import Reward
from ddpo_jax.rewards.registry import register


def jpeg_size_kb(images_uint8: np.ndarray, quality: int = 95) -> np.ndarray:
  """JPEG file size in kB (1000 bytes) of each uint8 image (B,H,W,C), PIL at `quality`."""
  sizes = []
  for img in images_uint8:
    pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", quality=quality)
    sizes.append(buf.tell() / 1000.0)
  return np.asarray(sizes, np.float32)


def jpeg_compressibility(images, prompts, metadata):
  """Reward = −JPEG size in kB (PIL quality 95). Host reward."""
  size = jpeg_size_kb(images)
  return -size, {"jpeg_kb": size}


def jpeg_incompressibility(images, prompts, metadata):
  """Reward = +JPEG size in kB (PIL quality 95). Host reward."""
  size = jpeg_size_kb(images)
  return size, {"jpeg_kb": size}


@register("jpeg_compressibility", on_device=False)
def make_jpeg_compressibility(config, log) -> Reward:
  del config, log
  return Reward("jpeg_compressibility", jpeg_compressibility, on_device=False)


@register("jpeg_incompressibility", on_device=False)
def make_jpeg_incompressibility(config, log) -> Reward:
  del config, log
  return Reward("jpeg_incompressibility", jpeg_incompressibility, on_device=False)
