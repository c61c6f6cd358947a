"""OCR reward for the reward server: how well an image renders the text quoted in its prompt.

    python -m ddpo_jax.rewards.server --scorer=ocr --port=8085
    python -m ddpo_jax.rewards.server --scorer=ddpo_jax.rewards.ocr:make_ocr_scorer \\
        --scorer_kwargs='{"engine": "my_pkg.my_ocr:read_texts"}' --port=8085

The reward is flow_grpo's OCR reward (its `flow_grpo/ocr.py`, the `ocr` reward of
`general_ocr_sd3`), for a prompt such as 'A sign that says "Hello World"':

  target  = the prompt's text after its first '"', up to the next '"' (or the end);
  read    = the OCR engine's text of the image (PaddleOCR: its lines with a confidence > 0,
            concatenated);
  both lower-cased with every ' ' removed (other whitespace is kept, as the reference);
  d       = 0 if target is a substring of read, else min(Levenshtein(read, target), len(target));
  reward  = 1 - d / len(target),  in [0, 1].

So extra text around the target costs nothing, and an image with no text scores 0. The
Levenshtein distance (unit-cost insertions, deletions and substitutions) is rapidfuzz's
`rapidfuzz.distance.Levenshtein.distance`, the same distance as the python-Levenshtein package
the reference imports (rapidfuzz is the maintained library that package now wraps).

The OCR engine is pluggable: any callable `images -> list[str]` (one text per image; images a
list of (H, W, 3) uint8 RGB arrays), given as `engine="MODULE:ATTR"` (with `engine_kwargs`, the
attribute is a factory called with them). Default: `PaddleOcrReader` (PaddleOCR, imported when
the scorer is built; `pip install paddleocr paddlepaddle`). docs/rewards.md gives the commands.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Sequence

import numpy as np
from rapidfuzz.distance import Levenshtein

from ddpo_jax.rewards.plugins import load_plugin

PADDLE_MISSING = (
    "the OCR scorer's default engine is PaddleOCR, which is not installed: "
    "pip install paddleocr paddlepaddle (paddlepaddle-gpu for CUDA; flow_grpo used "
    "paddleocr==2.9.1 with paddlepaddle-gpu==2.6.2), or plug in another engine with "
    "engine='MODULE:ATTR' (a callable: list of (H, W, 3) uint8 images -> list of str)")


# ----------------------------------------------------------------------------------------------
# The reward
# ----------------------------------------------------------------------------------------------

def target_text(prompt: str) -> str:
  """The text a prompt asks to be written: after its first '"', up to the next '"' or the end
  ('A sign that says "Hi there"' -> 'Hi there'), as the reference's `prompt.split('"')[1]`.

  Raises:
    ValueError: the prompt has no '"'.
  """
  parts = prompt.split('"')
  if len(parts) < 2:
    raise ValueError(f"OCR reward: prompt {prompt!r} has no quoted text (the text to render "
                     "goes in double quotes, e.g. 'A sign that says \"HELLO\"')")
  return parts[1]


def normalize_text(text: str) -> str:
  """Lower-cased, every ' ' removed (the reference's normalisation of both texts)."""
  return text.replace(" ", "").lower()


def ocr_reward(read: str, target: str) -> tuple[float, int]:
  """(reward, capped edit distance) of the text `read` in an image against `target` (the
  module docstring's formula).

  Raises:
    ValueError: `target` is empty once normalised (the reward would divide by zero).
  """
  target, read = normalize_text(target), normalize_text(read)
  if not target:
    raise ValueError("OCR reward: the quoted target text is empty (or only spaces)")
  distance = 0 if target in read else min(Levenshtein.distance(read, target), len(target))
  return 1.0 - distance / len(target), distance


# ----------------------------------------------------------------------------------------------
# PaddleOCR, the default engine
# ----------------------------------------------------------------------------------------------

def texts_from_paddle2(result) -> str:
  """The text of one image from PaddleOCR 2.x's `ocr.ocr(image, cls=False)`: a list with one
  entry per page, each None (no text) or a list of [box, (text, confidence)]; the lines with
  confidence > 0 are concatenated (as the reference)."""
  if not result or not result[0]:
    return ""
  return "".join(text for _, (text, confidence) in result[0] if confidence > 0)


def texts_from_paddle3(results) -> str:
  """The text of one image from PaddleOCR 3.x's `ocr.predict(image)`: a list of results, each
  mapping "rec_texts" and "rec_scores" (lists); the texts with score > 0 are concatenated."""
  texts = []
  for res in results or ():
    for text, score in zip(res["rec_texts"], res["rec_scores"]):
      if score > 0:
        texts.append(text)
  return "".join(texts)


class PaddleOcrReader:
  """OCR engine on PaddleOCR: `reader(images) -> list of str`.

  PaddleOCR 2.x is built as the reference builds it (`PaddleOCR(use_angle_cls=False,
  lang="en", use_gpu=False, show_log=False)`, read with `ocr(image, cls=False)`); 3.x with its
  document-orientation, unwarping and text-line-orientation stages off (the same detection +
  recognition pipeline), read with `predict(image)`. Images are passed as RGB arrays, as the
  reference does. An image PaddleOCR fails on reads as "" (reward 0, as the reference's "maximum
  penalty"); each failure is written to stderr and counted in `failures`.

  Args:
    lang: PaddleOCR's language ("en").
    use_gpu: run PaddleOCR on the GPU (the reference: False, the CPU).
    **options: more PaddleOCR constructor arguments (they override the above).
  """

  def __init__(self, lang: str = "en", use_gpu: bool = False, **options):
    try:
      import paddleocr
    except ImportError as e:
      raise ImportError(f"{PADDLE_MISSING} ({e})") from e
    version = str(getattr(paddleocr, "__version__", "2"))
    self.api = 3 if version.split(".")[0].isdigit() and int(version.split(".")[0]) >= 3 else 2
    if self.api == 3:
      kwargs = dict(lang=lang, use_doc_orientation_classify=False, use_doc_unwarping=False,
                    use_textline_orientation=False, device="gpu" if use_gpu else "cpu")
    else:
      kwargs = dict(use_angle_cls=False, lang=lang, use_gpu=bool(use_gpu), show_log=False)
    kwargs.update(options)
    self.ocr = paddleocr.PaddleOCR(**kwargs)
    self.failures = 0

  def read(self, image: np.ndarray) -> str:
    if self.api == 3:
      return texts_from_paddle3(self.ocr.predict(image))
    return texts_from_paddle2(self.ocr.ocr(image, cls=False))

  def __call__(self, images) -> list[str]:
    texts = []
    for image in images:
      try:
        texts.append(self.read(np.ascontiguousarray(image, np.uint8)))
      except Exception as e:  # the reference's per-image fallback: reward 0
        self.failures += 1
        sys.stderr.write(f"OCR engine: PaddleOCR failed on an image ({type(e).__name__}: {e}); "
                         "read as no text\n")
        texts.append("")
    return texts


# ----------------------------------------------------------------------------------------------
# The scorer
# ----------------------------------------------------------------------------------------------

class OcrScorer:
  """Reward-server scorer `(images, prompts, metadata) -> (rewards, info)` of `ocr_reward`.

  Info (one value per image): "edit_distance" (the capped distance d) and "ocr_text" (the
  engine's raw text).

  Args:
    engine: callable, list of (H, W, 3) uint8 arrays -> list of str (one per image).
  """

  def __init__(self, engine: Callable[[list], Sequence[str]]):
    if not callable(engine):
      raise ValueError(f"OCR scorer: engine must be callable, got {type(engine).__name__}")
    self.engine = engine

  def __call__(self, images, prompts: Sequence[str], metadata: dict | None = None):
    del metadata
    if len(images) != len(prompts):
      raise ValueError(f"OCR scorer: {len(images)} images but {len(prompts)} prompts")
    targets = [target_text(p) for p in prompts]  # refuse a bad prompt before reading
    for prompt, target in zip(prompts, targets):
      if not normalize_text(target):
        raise ValueError(f"OCR reward: prompt {prompt!r} quotes no text (the quotes are empty)")
    answer = self.engine([np.asarray(img, np.uint8) for img in images])
    texts = list(answer) if isinstance(answer, (list, tuple)) else None
    if texts is None or len(texts) != len(prompts) or not all(isinstance(t, str) for t in texts):
      got = type(answer).__name__ + (f" of {len(answer)}" if hasattr(answer, "__len__") else "")
      raise ValueError(f"OCR engine {self.engine!r} must return a list of one str per image "
                       f"({len(prompts)}), got {got}")
    rewards, distances = [], []
    for text, target in zip(texts, targets):
      reward, distance = ocr_reward(text, target)
      rewards.append(reward)
      distances.append(distance)
    return rewards, {"edit_distance": distances, "ocr_text": texts}


def make_ocr_scorer(engine: str | Callable | None = None,
                    engine_kwargs: dict[str, Any] | None = None) -> OcrScorer:
  """The OCR scorer (the server's built-in "ocr").

  Args:
    engine: None: `PaddleOcrReader(**engine_kwargs)`; "MODULE:ATTR": the callable it names, or,
      with `engine_kwargs`, the factory it names called with them; or a callable.
    engine_kwargs: keyword arguments of the engine's factory (PaddleOcrReader: lang, use_gpu,
      PaddleOCR options).

  Raises:
    ImportError: the default engine without PaddleOCR installed (the message says what to
      install), or an engine module that cannot be imported.
  """
  if engine is None:
    reader = PaddleOcrReader(**(engine_kwargs or {}))
  elif isinstance(engine, str):
    reader = load_plugin(engine, engine_kwargs, what="OCR engine")
  elif callable(engine):
    if engine_kwargs:
      raise ValueError("OCR scorer: engine_kwargs need engine=None or 'MODULE:ATTR'")
    reader = engine
  else:
    raise ValueError(f"OCR scorer: engine must be None, 'MODULE:ATTR' or a callable, got "
                     f"{engine!r}")
  return OcrScorer(reader)
