"""GenEval reward for the reward server: object presence, counts, colours and positions.

    python -m ddpo_jax.rewards.server --scorer=geneval --scorer_kwargs='{
        "metadata_path": "/data/flow_grpo/dataset/geneval/train_metadata.jsonl",
        "engine_kwargs": {"checkpoint": "/data/mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth"}}'

Each prompt comes with a GenEval task spec (a JSON object, one line of GenEval's / flow_grpo's
`*_metadata.jsonl`):

  {"tag": "position", "prompt": "a photo of a dog right of a teddy bear",
   "include": [{"class": "teddy bear", "count": 1},
               {"class": "dog", "count": 1, "position": ["right of", 0]}]}

`include` entries may carry "color" (one of `COLORS`) and "position" ([relation, index of an
earlier include entry], relation one of `RELATIONS`); `exclude` entries ({"class", "count"})
forbid `count` or more of a class. The spec of a prompt is taken from the request's per-sample
metadata (`metadata["geneval"]`: a JSON string or a map per image) or, when the request has
none, looked up by the prompt text in the JSONL file `metadata_path` read when the scorer is
built (the trainer sends prompt strings only; docs/rewards.md).

Rules (GenEval's evaluation, with the constants of its `evaluate_images.py`):
- detections of a class are kept when their confidence is > 0.3 (> 0.9 for the "counting" tag),
  most confident first, at most 16 per class, then de-duplicated by IoU >= `max_overlap` (1.0:
  no de-duplication);
- position: with box centres c and sizes s (x right, y down), offset = c_A - c_B, each
  coordinate shrunk towards 0 by 0.1 (s_A + s_B); no relation if both shrunk coordinates are
  < 1e-3 in size, else, divided by |offset|, dx < -0.5: "left of", dx > 0.5: "right of",
  dy < -0.5: "above", dy > 0.5: "below" (A may be e.g. both "left of" and "above" B);
- colour of a detection: its own "color" if the detector gives one, else the colour classifier
  (the default engine: CLIP ViT-L-14 zero-shot on the object's masked crop, GenEval's prompts).

Two outcomes per image (`evaluate_geneval`, `evaluate_score`):
- GenEval's accuracy: every include entry has >= count detections, its `count` most confident
  have the colour and the relation to every object of the target entry, and no exclude entry
  is met; 1 or 0;
- flow_grpo's training reward (its reward server's `evaluate_reward`, what `geneval_sd3`
  trains on; the default `reward="score"`): the mean of one term per check, each include entry
  giving 1 - |count - n| / count for its n detections (negative when n > 2 count), then, if n !=
  count, 0 for a colour or position it asks for; else 1 - |count - k| / count for k of the
  objects in the asked colour, and for a position 1 (every pair holds) or 0 followed by 1 (the
  reference appends 1 after its pair loop either way; `reference_position_term=False` gives the
  single 0) or 0 (the target entry failed). Exclude entries are not used. Its strict accuracy:
  1 when every check passed with exact counts, else 0.
`reward="strict"` trains on the strict accuracy, `reward="accuracy"` on GenEval's accuracy.

The detector is pluggable: any callable `images -> detections per image`, a detection being a
`Detection`, a map {"label", "score", "box": [x0, y0, x1, y1] (pixels), "color"?, "mask"?} or a
tuple (label, score, box[, color]); labels are GenEval's class names (`CLASS_NAMES`). Default:
`MMDetDetector` (GenEval's Mask2Former in mmdetection and CLIP colours, imported when the scorer
is built; the ImportError says what to install).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from PIL import Image

from ddpo_jax.rewards.plugins import load_plugin

COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black",
          "white")
RELATIONS = ("left of", "right of", "above", "below")
# GenEval's object_names.txt: the 80 COCO classes in COCO's order, a few renamed.
CLASS_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse",
    "tv remote", "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier",
    "toothbrush")
THRESHOLD = 0.3
COUNTING_THRESHOLD = 0.9
MAX_OBJECTS = 16
MAX_OVERLAP = 1.0
POSITION_THRESHOLD = 0.1
REWARDS = ("score", "strict", "accuracy")
MASK2FORMER_CONFIG = "mask2former/mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.py"
MMDET_MISSING = (
    "the GenEval scorer's default engine (GenEval's Mask2Former in mmdetection, CLIP ViT-L-14 "
    "colours) needs torch, mmdet with mmcv and open_clip: pip install torch torchvision "
    "open_clip_torch openmim && mim install mmengine mmcv-full && pip install 'mmdet<3' "
    "(GenEval and flow_grpo's reward server use mmdet 2.x; mmdet 3.x's result format is read "
    "too), and the checkpoint mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth "
    "(docs/rewards.md); or plug in another detector with engine='MODULE:ATTR'")


# ----------------------------------------------------------------------------------------------
# Detections and specs
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Detection:
  """One detected object: GenEval class name, confidence, box (x0, y0, x1, y1) in pixels (x
  right, y down), optionally its colour (one of COLORS) and its (H, W) bool mask (used by the
  default colour classifier)."""
  label: str
  score: float
  box: tuple[float, float, float, float]
  color: str | None = None
  mask: Any = None


def to_detection(obj) -> Detection:
  """A Detection from a Detection, a map {"label", "score", "box", "color"?, "mask"?} or a tuple
  (label, score, box[, color]).

  Raises:
    ValueError: a malformed detection (the message shows it).
  """
  if isinstance(obj, Detection):
    det = obj
  elif isinstance(obj, Mapping):
    missing = [k for k in ("label", "score", "box") if k not in obj]
    if missing:
      raise ValueError(f"detection {obj!r} lacks {missing}")
    det = Detection(obj["label"], obj["score"], obj["box"], obj.get("color"), obj.get("mask"))
  elif isinstance(obj, (tuple, list)) and len(obj) in (3, 4):
    det = Detection(*obj)
  else:
    raise ValueError(f"detection {obj!r}: expected a Detection, a map with label, score, box, "
                     "or a tuple (label, score, box[, color])")
  try:
    box = tuple(float(v) for v in np.asarray(det.box, np.float64).reshape(-1))
    score = float(det.score)
  except (TypeError, ValueError) as e:
    raise ValueError(f"detection {obj!r}: score and box must be numbers ({e})") from None
  if not isinstance(det.label, str):
    raise ValueError(f"detection {obj!r}: label must be a str (a GenEval class name)")
  if len(box) != 4 or not all(math.isfinite(v) for v in box) or not math.isfinite(score):
    raise ValueError(f"detection {obj!r}: need a finite score and box (x0, y0, x1, y1)")
  if box[2] < box[0] or box[3] < box[1]:
    raise ValueError(f"detection {obj!r}: box (x0, y0, x1, y1) with x1 < x0 or y1 < y0")
  if det.color is not None and det.color not in COLORS:
    raise ValueError(f"detection {obj!r}: color {det.color!r} is not one of {COLORS}")
  return dataclasses.replace(det, box=box, score=score)


def parse_spec(spec) -> dict:
  """A GenEval task spec (a map, or its JSON text) checked and normalised: {"tag", "include":
  [{"class", "count", "color"?, "position"?: (relation, index)}], "exclude": [{"class",
  "count"}], "prompt"?}.

  Raises:
    ValueError: not JSON, or a spec the rules cannot evaluate (the message names the field).
  """
  if isinstance(spec, (str, bytes)):
    try:
      spec = json.loads(spec)
    except json.JSONDecodeError as e:
      raise ValueError(f"GenEval spec is not JSON ({e}): {spec[:200]!r}") from None
  if not isinstance(spec, Mapping):
    raise ValueError(f"GenEval spec must be a map, got {type(spec).__name__}: {spec!r}")
  bad = f"GenEval spec {dict(spec)!r}"
  tag = spec.get("tag")
  if not isinstance(tag, str):
    raise ValueError(f"{bad}: needs a str 'tag'")
  out = {"tag": tag, "include": [], "exclude": []}
  if "prompt" in spec:
    out["prompt"] = spec["prompt"]
  for field in ("include", "exclude"):
    entries = spec.get(field, [])
    if not isinstance(entries, list):
      raise ValueError(f"{bad}: '{field}' must be a list")
    for i, req in enumerate(entries):
      if not isinstance(req, Mapping) or not isinstance(req.get("class"), str):
        raise ValueError(f"{bad}: {field}[{i}] needs a str 'class'")
      count = req.get("count")
      if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"{bad}: {field}[{i}] needs an integer 'count' >= 1")
      entry = {"class": req["class"], "count": count}
      if field == "include" and "color" in req:
        if req["color"] not in COLORS:
          raise ValueError(f"{bad}: include[{i}] color {req['color']!r} is not one of {COLORS}")
        entry["color"] = req["color"]
      if field == "include" and "position" in req:
        position = req["position"]
        if not (isinstance(position, (list, tuple)) and len(position) == 2 and
                position[0] in RELATIONS and isinstance(position[1], int) and
                not isinstance(position[1], bool) and 0 <= position[1] < i):
          raise ValueError(f"{bad}: include[{i}] position must be [relation, index of an "
                           f"earlier include entry], relation one of {RELATIONS}")
        entry["position"] = (position[0], position[1])
      out[field].append(entry)
  return out


def load_spec_table(path: str | os.PathLike) -> dict[str, dict]:
  """{prompt: spec} from a JSONL file of specs with a "prompt" each (GenEval's
  evaluation_metadata.jsonl, flow_grpo's dataset/geneval/*_metadata.jsonl); blank lines skipped.

  Raises:
    FileNotFoundError; ValueError naming the line of a bad spec, or of a prompt given two
    different specs.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"GenEval metadata file {path}: no such file")
  table, first_line = {}, {}
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        spec = parse_spec(line)
      except ValueError as e:
        raise ValueError(f"{path}:{number}: {e}") from None
      prompt = spec.get("prompt")
      if not isinstance(prompt, str):
        raise ValueError(f"{path}:{number}: the spec has no str 'prompt'")
      if prompt in table and table[prompt] != spec:
        raise ValueError(f"{path}:{number}: prompt {prompt!r} has another spec at line "
                         f"{first_line[prompt]}")
      table.setdefault(prompt, spec)
      first_line.setdefault(prompt, number)
  if not table:
    raise ValueError(f"GenEval metadata file {path} has no spec")
  return table


# ----------------------------------------------------------------------------------------------
# Geometry and selection
# ----------------------------------------------------------------------------------------------

def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
  """IoU of boxes (x0, y0, x1, y1) with GenEval's pixel-inclusive areas ((x1 - x0 + 1) (y1 -
  y0 + 1)); 0 when the union is empty."""
  def area(box):
    return max(box[2] - box[0] + 1, 0) * max(box[3] - box[1] + 1, 0)
  inter = area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))
  union = area(a) + area(b) - inter
  return inter / union if union else 0.0


def relative_position(box_a: Sequence[float], box_b: Sequence[float],
                      threshold: float = POSITION_THRESHOLD) -> set[str]:
  """The relations of box A to box B (module docstring): a subset of RELATIONS."""
  a, b = np.asarray(box_a, np.float64)[:4], np.asarray(box_b, np.float64)[:4]
  offset = (a[:2] + a[2:]) / 2 - (b[:2] + b[2:]) / 2
  sizes = np.abs(a[2:] - a[:2]) + np.abs(b[2:] - b[:2])
  shrunk = np.maximum(np.abs(offset) - threshold * sizes, 0.0) * np.sign(offset)
  if np.all(np.abs(shrunk) < 1e-3):
    return set()
  dx, dy = shrunk / np.linalg.norm(offset)
  relations = set()
  if dx < -0.5:
    relations.add("left of")
  if dx > 0.5:
    relations.add("right of")
  if dy < -0.5:
    relations.add("above")
  if dy > 0.5:
    relations.add("below")
  return relations


def select_objects(detections: Sequence[Detection], threshold: float,
                   max_objects: int = MAX_OBJECTS,
                   max_overlap: float = MAX_OVERLAP) -> dict[str, list[Detection]]:
  """{label: its detections with score > threshold, most confident first (ties in detector
  order), the first `max_objects`, then greedily dropping any with IoU >= max_overlap with a
  kept one (max_overlap 1: none dropped)}; labels with none kept are absent."""
  by_label: dict[str, list[Detection]] = {}
  for det in detections:
    if det.score > threshold:
      by_label.setdefault(det.label, []).append(det)
  objects = {}
  for label, dets in by_label.items():
    pending = sorted(dets, key=lambda d: -d.score)[:max_objects]
    kept = []
    while pending:
      best = pending.pop(0)
      kept.append(best)
      if max_overlap < 1:
        pending = [d for d in pending if box_iou(best.box, d.box) < max_overlap]
    objects[label] = kept
  return objects


class ColorLookup:
  """Colours of an image's selected objects: `lookup(label, n)` -> the colours of the first n
  objects of `label` (their own "color", else the classifier's, asked once per object).

  Args:
    image: the (H, W, 3) uint8 image.
    objects: `select_objects`'s result.
    classifier: `(image, detections, label) -> list of colour names`, or None.
  """

  def __init__(self, image, objects: Mapping[str, list[Detection]],
               classifier: Callable | None):
    self.image, self.objects, self.classifier = image, objects, classifier
    self._known: dict[str, list] = {}

  def __call__(self, label: str, n: int) -> list[str]:
    dets = self.objects.get(label, [])[:n]
    known = self._known.setdefault(label, [])
    while len(known) < len(dets):
      known.append(dets[len(known)].color)
    todo = [i for i in range(len(dets)) if known[i] is None]
    if todo:
      if self.classifier is None:
        raise ValueError(f"GenEval: a spec asks the colour of {label!r} but its detections "
                         "carry no 'color' and no colour classifier is plugged in "
                         "(color_engine=..., or a detector with a classify_colors method)")
      colors = list(self.classifier(self.image, [dets[i] for i in todo], label))
      if len(colors) != len(todo) or not all(c in COLORS for c in colors):
        raise ValueError(f"GenEval colour classifier returned {colors!r} for {len(todo)} "
                         f"objects; expected one of {COLORS} each")
      for i, c in zip(todo, colors):
        known[i] = c
    return known[:len(dets)]


# ----------------------------------------------------------------------------------------------
# The two rules
# ----------------------------------------------------------------------------------------------

def _position_holds(found, targets, relation, threshold) -> tuple[bool, str]:
  for obj in found:
    for target in targets:
      relations = relative_position(obj.box, target.box, threshold)
      if relation not in relations:
        return False, " and ".join(sorted(relations)) or "no relation"
  return True, ""


def evaluate_geneval(spec: dict, objects: Mapping[str, list[Detection]],
                     colors: Callable[[str, int], list[str]],
                     position_threshold: float = POSITION_THRESHOLD) -> tuple[bool, str]:
  """GenEval's accuracy rule (module docstring) -> (correct, reasons, "\\n"-joined)."""
  correct, reasons, groups = True, [], []
  for req in spec["include"]:
    label, count = req["class"], req["count"]
    found = objects.get(label, [])[:count]
    matched = True
    if len(found) < count:
      matched = False
      reasons.append(f"expected {label}>={count}, found {len(found)}")
    else:
      if "color" in req:
        k = colors(label, count).count(req["color"])
        if k < count:
          matched = False
          reasons.append(f"expected {req['color']} {label}>={count}, found {k}")
      if "position" in req and matched:
        relation, index = req["position"]
        if groups[index] is None:
          matched = False
          reasons.append(f"no target for {label} to be {relation}")
        else:
          holds, seen = _position_holds(found, groups[index], relation, position_threshold)
          if not holds:
            matched = False
            reasons.append(f"expected {label} {relation} target, found {seen}")
    correct &= matched
    groups.append(found if matched else None)
  for req in spec["exclude"]:
    n = len(objects.get(req["class"], []))
    if n >= req["count"]:
      correct = False
      reasons.append(f"expected {req['class']}<{req['count']}, found {n}")
  return correct, "\n".join(reasons)


def evaluate_score(spec: dict, objects: Mapping[str, list[Detection]],
                   colors: Callable[[str, int], list[str]],
                   position_threshold: float = POSITION_THRESHOLD,
                   reference_position_term: bool = True) -> tuple[bool, float, str]:
  """flow_grpo's training reward and strict accuracy (module docstring) -> (strict_correct,
  score, reasons)."""
  correct, reasons, groups, terms = True, [], [], []
  for req in spec["include"]:
    label, count = req["class"], req["count"]
    found = objects.get(label, [])
    matched = True
    terms.append(1.0 - abs(count - len(found)) / count)
    if len(found) != count:
      matched = False
      reasons.append(f"expected {label}=={count}, found {len(found)}")
      if "color" in req or "position" in req:
        terms.append(0.0)
    else:
      if "color" in req:
        k = colors(label, count).count(req["color"])
        terms.append(1.0 - abs(count - k) / count)
        if k != count:
          matched = False
          reasons.append(f"expected {req['color']} {label}=={count}, found {k}")
      if "position" in req and matched:
        relation, index = req["position"]
        if groups[index] is None:
          matched = False
          reasons.append(f"no target for {label} to be {relation}")
          terms.append(0.0)
        else:
          holds, seen = _position_holds(found, groups[index], relation, position_threshold)
          if not holds:
            matched = False
            reasons.append(f"expected {label} {relation} target, found {seen}")
            terms.append(0.0)
          if holds or reference_position_term:
            terms.append(1.0)
    correct &= matched
    groups.append(found if matched else None)
  score = sum(terms) / len(terms) if terms else 0.0
  return correct, score, "\n".join(reasons)


# ----------------------------------------------------------------------------------------------
# The scorer
# ----------------------------------------------------------------------------------------------

class GenEvalScorer:
  """Reward-server scorer `(images, prompts, metadata) -> (rewards, info)` of the GenEval rules.

  Info (one value per image): "score" (flow_grpo's reward), "strict_accuracy", "accuracy"
  (GenEval's; unless compute_accuracy=False), "tag" and "reason" (str).

  Args:
    detector: callable, list of (H, W, 3) uint8 images -> one sequence of detections per image.
    color_classifier: `(image, detections, label) -> colour names`; None: the detector's
      `classify_colors` method if it has one.
    specs: {prompt: spec} for prompts whose request carries no per-sample spec.
    metadata_key: the per-sample metadata entry holding the specs.
    reward: "score" (flow_grpo's), "strict" or "accuracy".
    threshold, counting_threshold, max_objects, max_overlap, position_threshold: the rules'
      constants (GenEval's values by default).
    reference_position_term: a failed position check adds the terms 0 and 1, as flow_grpo's
      reward server; False: 0 only.
    compute_accuracy: also evaluate GenEval's accuracy (it may classify more colours).
  """

  def __init__(self, detector: Callable, color_classifier: Callable | None = None,
               specs: Mapping[str, dict] | None = None, metadata_key: str = "geneval",
               reward: str = "score", threshold: float = THRESHOLD,
               counting_threshold: float = COUNTING_THRESHOLD, max_objects: int = MAX_OBJECTS,
               max_overlap: float = MAX_OVERLAP, position_threshold: float = POSITION_THRESHOLD,
               reference_position_term: bool = True, compute_accuracy: bool = True):
    if not callable(detector):
      raise ValueError(f"GenEval scorer: detector must be callable, got {detector!r}")
    if reward not in REWARDS:
      raise ValueError(f"GenEval scorer: reward must be one of {REWARDS}, got {reward!r}")
    if max_objects < 1 or not 0 < max_overlap <= 1:
      raise ValueError(f"GenEval scorer: need max_objects >= 1 and 0 < max_overlap <= 1 (got "
                       f"{max_objects}, {max_overlap})")
    self.detector = detector
    self.color_classifier = color_classifier or getattr(detector, "classify_colors", None)
    self.specs = {p: parse_spec(s) for p, s in (specs or {}).items()}
    self.metadata_key = metadata_key
    self.reward = reward
    self.threshold, self.counting_threshold = float(threshold), float(counting_threshold)
    self.max_objects, self.max_overlap = int(max_objects), float(max_overlap)
    self.position_threshold = float(position_threshold)
    self.reference_position_term = bool(reference_position_term)
    self.compute_accuracy = bool(compute_accuracy) or reward == "accuracy"

  def specs_of(self, prompts: Sequence[str], metadata: Mapping | None) -> list[dict]:
    """The spec of each prompt: per-sample metadata[metadata_key], else the prompt table."""
    metadata = metadata or {}
    if self.metadata_key in metadata:
      given = metadata[self.metadata_key]
      if not isinstance(given, (list, tuple)) or len(given) != len(prompts):
        raise ValueError(f"GenEval scorer: metadata[{self.metadata_key!r}] must hold one spec "
                         f"per image ({len(prompts)}), got {type(given).__name__}"
                         f"{' of %d' % len(given) if hasattr(given, '__len__') else ''}")
      specs = [parse_spec(s) for s in given]
      for i, (prompt, spec) in enumerate(zip(prompts, specs)):
        if "prompt" in spec and spec["prompt"] != prompt:
          raise ValueError(f"GenEval scorer: image {i}'s spec is for the prompt "
                           f"{spec['prompt']!r}, not {prompt!r}")
      return specs
    missing = [p for p in prompts if p not in self.specs]
    if missing:
      where = (f"the {len(self.specs)} prompts of metadata_path" if self.specs else
               "no metadata_path was given")
      raise ValueError(f"GenEval scorer: no spec for the prompt {missing[0]!r} "
                       f"({len(missing)} of {len(prompts)} prompts have none): the request has "
                       f"no metadata[{self.metadata_key!r}] and {where}")
    return [self.specs[p] for p in prompts]

  def __call__(self, images, prompts: Sequence[str], metadata: Mapping | None = None):
    if len(images) != len(prompts):
      raise ValueError(f"GenEval scorer: {len(images)} images but {len(prompts)} prompts")
    specs = self.specs_of(prompts, metadata)  # refuse a bad request before detecting
    images = [np.asarray(img, np.uint8) for img in images]
    answer = self.detector(images)
    per_image = list(answer) if isinstance(answer, (list, tuple)) else None
    if per_image is None or len(per_image) != len(images) or \
        not all(isinstance(d, (list, tuple)) for d in per_image):
      raise ValueError(f"GenEval detector {self.detector!r} must return a list of one list of "
                       f"detections per image ({len(images)}), got {type(answer).__name__}")
    out = {"score": [], "strict_accuracy": [], "tag": [], "reason": []}
    if self.compute_accuracy:
      out["accuracy"] = []
    for image, spec, dets in zip(images, specs, per_image):
      threshold = self.counting_threshold if spec["tag"] == "counting" else self.threshold
      objects = select_objects([to_detection(d) for d in dets], threshold, self.max_objects,
                               self.max_overlap)
      colors = ColorLookup(image, objects, self.color_classifier)
      strict, score, reason = evaluate_score(spec, objects, colors, self.position_threshold,
                                             self.reference_position_term)
      out["score"].append(score)
      out["strict_accuracy"].append(float(strict))
      out["tag"].append(spec["tag"])
      out["reason"].append(reason)
      if self.compute_accuracy:
        out["accuracy"].append(float(evaluate_geneval(spec, objects, colors,
                                                      self.position_threshold)[0]))
    rewards = {"score": out["score"], "strict": out["strict_accuracy"],
               "accuracy": out.get("accuracy")}[self.reward]
    return list(rewards), out


# ----------------------------------------------------------------------------------------------
# The default engine: mmdetection's Mask2Former and CLIP colours (GenEval's)
# ----------------------------------------------------------------------------------------------

def _numpy(x) -> np.ndarray:
  """A torch tensor (any device) or array-like -> NumPy."""
  if hasattr(x, "detach"):
    x = x.detach().cpu().numpy()
  return np.asarray(x)


def detections_from_mmdet(result, class_names: Sequence[str] = CLASS_NAMES) -> list[Detection]:
  """One image's mmdetection result -> Detections (masks kept when present).

  mmdet 2.x: `bbox` or `(bbox, segm)`, bbox[k] an (n_k, 5) array of x0, y0, x1, y1, score of
  class k and segm[k] its n_k (H, W) masks. mmdet 3.x: a DetDataSample whose `pred_instances`
  has bboxes (n, 4), scores (n,), labels (n,) and optionally masks (n, H, W). A panoptic
  model's {"ins_results": ...} is read as its instance part.
  """
  dets = []
  if isinstance(result, Mapping) and "ins_results" in result:
    result = result["ins_results"]
  if hasattr(result, "pred_instances"):
    inst = result.pred_instances
    boxes, scores = _numpy(inst.bboxes).reshape(-1, 4), _numpy(inst.scores).reshape(-1)
    labels = _numpy(inst.labels).reshape(-1)
    masks = _numpy(inst.masks) if "masks" in inst else None
    for j in range(len(scores)):
      dets.append(Detection(class_names[int(labels[j])], float(scores[j]),
                            tuple(boxes[j].tolist()), None,
                            None if masks is None else masks[j].astype(bool)))
    return dets
  bbox = result[0] if isinstance(result, tuple) else result
  segm = result[1] if isinstance(result, tuple) and len(result) > 1 else None
  if len(bbox) != len(class_names):
    raise ValueError(f"mmdet result has {len(bbox)} classes, class_names {len(class_names)}")
  for k, rows in enumerate(bbox):
    rows = _numpy(rows).reshape(-1, 5)
    for j, row in enumerate(rows):
      mask = None if segm is None else np.asarray(segm[k][j], bool)
      dets.append(Detection(class_names[k], float(row[4]), tuple(row[:4].tolist()), None, mask))
  return dets


def color_crop(image: np.ndarray, det: Detection, background: str = "#999"):
  """The PIL image GenEval's colour classifier sees: the object's mask over a flat background
  (the whole image when there is no mask), cropped to its box."""
  pil = Image.fromarray(np.asarray(image, np.uint8)).convert("RGB")
  if det.mask is not None:
    mask = np.asarray(det.mask, bool)
    if mask.shape != (pil.height, pil.width):
      raise ValueError(f"detection mask {mask.shape} != image {(pil.height, pil.width)}")
    pil = Image.composite(pil, Image.new("RGB", pil.size, color=background),
                          Image.fromarray(mask))
  return pil.crop(tuple(det.box))


class MMDetDetector:
  """GenEval's detector: Mask2Former (Swin-S, COCO) in mmdetection, and CLIP ViT-L-14 (OpenAI
  weights, open_clip) zero-shot colours of the masked crops ("a photo of a {c} {object}", "a
  photo of a {c}-colored {object}", "a photo of a {c} object"; grey #999 background).

  Args:
    checkpoint: the Mask2Former weights (mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth).
    config: its mmdetection config; None: `MASK2FORMER_CONFIG` in mmdet's configs folder.
    device: "cuda", "cpu", ...; None: cuda if available.
    class_names: the detector's class index -> GenEval class name.
    clip_arch, clip_pretrained: the colour classifier's open_clip model.
    rgb_to_bgr: feed the detector BGR arrays, as GenEval does (mmdet reads image files as BGR);
      flow_grpo's reward server passes RGB arrays (False reproduces that).
  """

  def __init__(self, checkpoint: str | None = None, config: str | None = None,
               device: str | None = None,
               class_names: Sequence[str] = CLASS_NAMES, clip_arch: str = "ViT-L-14",
               clip_pretrained: str = "openai", rgb_to_bgr: bool = True,
               background: str = "#999"):
    if not checkpoint:
      raise ValueError("GenEval MMDetDetector: `checkpoint` (the Mask2Former .pth) is required")
    try:
      import mmdet
      import open_clip
      import torch
      from mmdet.apis import inference_detector, init_detector
    except ImportError as e:
      raise ImportError(f"{MMDET_MISSING} ({e})") from e
    if config is None:
      root = os.path.dirname(mmdet.__file__)
      candidates = [os.path.join(root, "..", "configs", MASK2FORMER_CONFIG),  # a source install
                    os.path.join(root, ".mim", "configs", MASK2FORMER_CONFIG)]  # a pip install
      config = next((c for c in candidates if os.path.isfile(c)), None)
      if config is None:
        raise ValueError(f"GenEval MMDetDetector: {MASK2FORMER_CONFIG} is not in mmdet's "
                         f"configs ({candidates}); pass config=PATH")
    self._torch = torch
    self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    self._inference = inference_detector
    self.model = init_detector(config, checkpoint, device=self.device)
    self.class_names = tuple(class_names)
    self.rgb_to_bgr = rgb_to_bgr
    self.background = background
    self.clip, _, self.clip_transform = open_clip.create_model_and_transforms(
        clip_arch, pretrained=clip_pretrained, device=self.device)
    self.clip.eval()
    self.clip_tokenizer = open_clip.get_tokenizer(clip_arch)
    self._classifiers = {}

  def __call__(self, images) -> list[list[Detection]]:
    arrays = [np.ascontiguousarray(np.asarray(im, np.uint8)[..., ::-1] if self.rgb_to_bgr
                                   else im) for im in images]
    with self._torch.no_grad():
      results = self._inference(self.model, arrays)
    return [detections_from_mmdet(result, self.class_names) for result in results]

  def _color_weights(self, label: str):
    """(len(COLORS), D) unit text embeddings: each colour's templates' mean, re-normalised."""
    if label not in self._classifiers:
      torch = self._torch
      templates = (f"a photo of a {{c}} {label}", f"a photo of a {{c}}-colored {label}",
                   "a photo of a {c} object")
      rows = []
      with torch.no_grad():
        for color in COLORS:
          tokens = self.clip_tokenizer([t.format(c=color) for t in templates]).to(self.device)
          emb = torch.nn.functional.normalize(self.clip.encode_text(tokens).float(), dim=-1)
          rows.append(torch.nn.functional.normalize(emb.mean(0), dim=-1))
      self._classifiers[label] = torch.stack(rows)
    return self._classifiers[label]

  def classify_colors(self, image, detections: Sequence[Detection], label: str) -> list[str]:
    torch = self._torch
    weights = self._color_weights(label)
    crops = torch.stack([self.clip_transform(color_crop(image, d, self.background))
                         for d in detections]).to(self.device)
    with torch.no_grad():
      feats = torch.nn.functional.normalize(self.clip.encode_image(crops).float(), dim=-1)
    return [COLORS[i] for i in (feats @ weights.T).argmax(-1).tolist()]


def make_geneval_scorer(engine: str | Callable | None = None,
                        engine_kwargs: dict[str, Any] | None = None,
                        color_engine: str | Callable | None = None,
                        color_engine_kwargs: dict[str, Any] | None = None,
                        metadata_path: str | None = None, **options) -> GenEvalScorer:
  """The GenEval scorer (the server's built-in "geneval").

  Args:
    engine: the detector. None: `MMDetDetector(**engine_kwargs)` (engine_kwargs must name the
      checkpoint); "MODULE:ATTR": the callable it names, or, with `engine_kwargs`, the factory it
      names called with them; or a callable.
    color_engine, color_engine_kwargs: the colour classifier, the same way (default: the
      detector's `classify_colors`, if any).
    metadata_path: JSONL of specs with their prompts (`load_spec_table`), for requests that
      carry no per-sample spec.
    **options: `GenEvalScorer`'s (reward, metadata_key, thresholds, ...).
  """
  if engine is None:
    detector = MMDetDetector(**(engine_kwargs or {}))
  elif isinstance(engine, str):
    detector = load_plugin(engine, engine_kwargs, what="GenEval engine")
  elif callable(engine) and not engine_kwargs:
    detector = engine
  else:
    raise ValueError(f"GenEval scorer: engine must be None, 'MODULE:ATTR' or a callable (and "
                     f"engine_kwargs only with the first two), got {engine!r}")
  classifier = None
  if isinstance(color_engine, str):
    classifier = load_plugin(color_engine, color_engine_kwargs, what="GenEval colour engine")
  elif color_engine is not None:
    classifier = color_engine
  specs = load_spec_table(metadata_path) if metadata_path else None
  return GenEvalScorer(detector, classifier, specs, **options)
