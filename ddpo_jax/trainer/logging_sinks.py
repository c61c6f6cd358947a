"""Where a run's numbers and pictures go besides metrics.jsonl: TensorBoard's grouped tags and
hparams, captioned sample grids, Weights & Biases (optional), WORKDIR/config.json.

- `tag_of(key, reward_keys)`: a metrics row's flat key -> its TensorBoard / wandb name,
  "reward/KEY" (the reward and its terms' fields), "time/KEY" (wall times, throughput) or
  "train/KEY" (the update's numbers, the learning rate, the optimizer step).
- `captioned_grid(images, prompts, rewards)`: the samples grouped by prompt (same prompt
  adjacent), each upscaled to at least `MIN_CELL` pixels and captioned with its prompt and
  reward (PIL's built-in font).
- `WandbRun`: a wandb run in WORKDIR/wandb (mode "online" or "offline"); its id is kept in
  WORKDIR/wandb/run_id and reused when the run resumes. `wandb` is imported only here, only
  when `logging.wandb` is set.
- `write_config_json(workdir, config)`: the run's config as WORKDIR/config.json, for humans
  and tools (the checkpoints keep their own copy, which is what a resume checks).

Process 0 alone makes any of these (`loop.MetricsWriter`).
"""
from __future__ import annotations

import json
import os
import secrets
import textwrap
from typing import Callable, Sequence

import numpy as np

# Cells of a captioned grid are at least this many pixels wide (smaller images are upscaled
# by an integer factor, nearest neighbour) and at most MAX_CELL (larger ones are shrunk).
MIN_CELL = 128
MAX_CELL = 256
PAD = 2
CAPTION_LINES = 3  # prompt (up to two lines) + reward
LINE_HEIGHT = 12
WANDB_MODES = ("", "online", "offline")


# ------------------------------------------------------------------------------ tags

def format_reward(value) -> str:
  """A reward for a caption: 3 decimals (no exponents for values near 0), 4 significant digits
  from 1000 on."""
  value = float(value)
  return f"{value:.4g}" if abs(value) >= 1000 else f"{value:.3f}"

def tag_of(key: str, reward_keys: Sequence[str] = ()) -> str:
  """The grouped TensorBoard / wandb name of a metrics row's `key`."""
  if key.startswith("reward") or key in reward_keys:
    return f"reward/{key}"
  if key.endswith("_time_s") or key.endswith("_per_s"):
    return f"time/{key}"
  return f"train/{key}"


def flat_hparams(config) -> dict:
  """The config's leaves as {dotted key: int/float/str/bool} (TensorBoard's hparams accept
  only those; tuples and None become their repr)."""
  out = {}

  def walk(node, prefix):
    for k, v in node.items():
      if isinstance(v, dict):
        walk(v, f"{prefix}{k}.")
      elif isinstance(v, (bool, int, float, str)):
        out[prefix + k] = v
      else:
        out[prefix + k] = repr(v)
  walk(json.loads(config.to_json()), "")
  return out


# ------------------------------------------------------------------------------ the grid
def _font():
  from PIL import ImageFont
  try:
    return ImageFont.load_default(size=11)  # Pillow >= 10.1 with FreeType: a scalable font
  except TypeError:
    return ImageFont.load_default()


def cell_side(h: int, w: int) -> tuple[int, int]:
  """(height, width) an h x w image takes in a captioned grid."""
  side = max(h, w)
  if side < MIN_CELL:
    k = -(-MIN_CELL // side)
    return h * k, w * k
  if side > MAX_CELL:
    return max(1, h * MAX_CELL // side), max(1, w * MAX_CELL // side)
  return h, w


def grid_size(n: int, h: int, w: int, cols: int | None = None) -> tuple[int, int]:
  """(height, width) in pixels of `captioned_grid` of n images of h x w."""
  ch, cw = cell_side(h, w)
  cols = int(np.ceil(np.sqrt(n))) if cols is None else cols
  rows = int(np.ceil(n / cols))
  return rows * (ch + CAPTION_LINES * LINE_HEIGHT + PAD) + PAD, cols * (cw + PAD) + PAD


def group_by_prompt(prompts: Sequence[str]) -> list[int]:
  """Indices of `prompts` in an order with equal prompts adjacent (each group where its prompt
  first appears; the order within a group kept)."""
  first = {}
  for i, p in enumerate(prompts):
    first.setdefault(str(p), i)
  return sorted(range(len(prompts)), key=lambda i: (first[str(prompts[i])], i))


def _wrap(text: str, font, width: int, lines: int) -> list[str]:
  """`text` in at most `lines` lines of at most `width` pixels (the last cut with '…')."""
  chars = max(4, int(width / max(1.0, font.getlength("n"))))
  out = textwrap.wrap(text, chars) or [""]
  if len(out) > lines:
    out = out[:lines]
    out[-1] = out[-1][:max(1, chars - 1)] + "…"
  while out and font.getlength(out[-1]) > width and len(out[-1]) > 2:
    out[-1] = out[-1][:-2] + "…"
  return out


def captioned_grid(images: np.ndarray, prompts: Sequence[str], rewards: Sequence[float] | None,
                   cols: int | None = None) -> np.ndarray:
  """(N,H,W,C) uint8 images -> one RGB uint8 grid (`grid_size`), the images grouped by prompt,
  each with its prompt (up to two lines) and "reward R" under it, white text on black."""
  from PIL import Image, ImageDraw
  n, h, w, c = images.shape
  order = group_by_prompt(prompts)
  ch, cw = cell_side(h, w)
  cols = int(np.ceil(np.sqrt(n))) if cols is None else cols
  height, width = grid_size(n, h, w, cols)
  canvas = Image.new("RGB", (width, height))
  draw, font = ImageDraw.Draw(canvas), _font()
  for slot, i in enumerate(order):
    r, q = divmod(slot, cols)
    x, y = PAD + q * (cw + PAD), PAD + r * (ch + CAPTION_LINES * LINE_HEIGHT + PAD)
    img = images[i][..., 0] if c == 1 else images[i][..., :3]
    tile = Image.fromarray(np.ascontiguousarray(img)).convert("RGB")
    resample = Image.NEAREST if ch >= h else Image.BILINEAR
    canvas.paste(tile.resize((cw, ch), resample), (x, y))
    lines = _wrap(str(prompts[i]), font, cw, CAPTION_LINES - (rewards is not None))
    if rewards is not None:
      lines.append(f"reward {format_reward(rewards[i])}")
    for k, line in enumerate(lines):
      draw.text((x + 1, y + ch + k * LINE_HEIGHT), line, fill=(255, 255, 255), font=font)
  return np.asarray(canvas)


def caption(prompt: str, reward: float | None) -> str:
  return str(prompt) if reward is None else f"{prompt} | reward {format_reward(reward)}"


# ------------------------------------------------------------------------------ config.json
def write_config_json(workdir: str, config) -> str:
  """WORKDIR/config.json: the run's config (indented JSON), replaced in one rename."""
  path = os.path.join(workdir, "config.json")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(config.to_json(indent=2) + "\n")
  os.replace(tmp, path)
  return path


# ------------------------------------------------------------------------------ wandb
def import_wandb():
  """The `wandb` module.

  Raises:
    ImportError: wandb is not installed (the message says how to install it or turn it off).
  """
  try:
    import wandb
  except ImportError as e:
    raise ImportError(
        "config.logging.wandb is set but the wandb package is not installed: `pip install wandb` "
        "(or `pip install ddpo_jax[wandb]`), or turn it off with --config.logging.wandb=''"
    ) from e
  return wandb


class WandbRun:
  """A wandb run of WORKDIR (process 0 only).

  Its id: `logging.wandb_run_id` if set, else the one in WORKDIR/wandb/run_id when the run
  resumes (so the resumed run continues the same wandb run), else a new one (saved there).
  Rows are logged with "epoch" as their x axis (`define_metric`), so epochs redone after a
  resume are logged again instead of being dropped as older steps."""

  def __init__(self, config, workdir: str, fresh: bool, log: Callable[[str], object] = print):
    lc = config.logging
    if lc.wandb not in ("online", "offline"):
      raise ValueError(f"config.logging.wandb={lc.wandb!r}; choose one of {WANDB_MODES}")
    wandb = import_wandb()
    self.wandb = wandb
    folder = os.path.join(workdir, "wandb")
    os.makedirs(folder, exist_ok=True)
    id_path = os.path.join(folder, "run_id")
    run_id = lc.wandb_run_id
    if not run_id and not fresh and os.path.exists(id_path):
      with open(id_path) as f:
        run_id = f.read().strip()
    if not run_id:
      alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"  # wandb's own ids look like this
      run_id = "".join(secrets.choice(alphabet) for _ in range(8))
    with open(id_path, "w") as f:
      f.write(run_id + "\n")
    self.run = wandb.init(
        project=lc.wandb_project or "ddpo_jax", entity=lc.wandb_entity or None,
        name=lc.wandb_run_name or os.path.basename(os.path.normpath(workdir)), id=run_id,
        resume="allow", dir=workdir, mode=lc.wandb, config=json.loads(config.to_json()))
    self.run.define_metric("epoch")
    self.run.define_metric("*", step_metric="epoch")
    log(f"wandb ({lc.wandb}): run {run_id} in {self.run.dir}")

  def metrics(self, epoch: int, named: dict) -> None:
    self.run.log({"epoch": epoch, **named})

  def images(self, epoch: int, grid: np.ndarray, images: np.ndarray, prompts, rewards) -> None:
    from PIL import Image
    wandb, each = self.wandb, []
    ch, cw = cell_side(*images.shape[1:3])
    for i in group_by_prompt(prompts)[:32]:  # each image, captioned, up to 32
      img = images[i][..., 0] if images.shape[-1] == 1 else images[i]
      pil = Image.fromarray(np.ascontiguousarray(img)).resize(
          (cw, ch), Image.NEAREST if ch >= images.shape[1] else Image.BILINEAR)
      each.append(wandb.Image(pil, caption=caption(prompts[i], None if rewards is None
                                                   else rewards[i])))
    self.run.log({"epoch": epoch,
                  "samples/grid": wandb.Image(grid, caption=f"epoch {epoch}: grouped by prompt, "
                                                            "reward under each"),
                  "samples/images": each})

  def summary(self, final: dict) -> None:
    for k, v in final.items():
      self.run.summary[k] = v

  def finish(self, failed: bool = False) -> None:
    self.run.finish(exit_code=1 if failed else 0)
