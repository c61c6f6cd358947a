"""OCR and GenEval scorers of the reward server (ddpo_jax/rewards/ocr.py, geneval.py): the
reward math against hand-computed values, the GenEval rules on hand-built detections, the
engines' result formats, and both scorers over HTTP (a server subprocess for OCR, an in-process
server for GenEval's per-sample specs).

The engines plugged in here are deterministic readers of the test images' pixels (`fake_reader`,
`fake_detector`), not OCR or detection models: they test the plumbing and the rules, not
PaddleOCR or Mask2Former. This module is imported by the server subprocess
(`--scorer_kwargs='{"engine": "tests.test_reward_plugins:fake_reader"}'`), so its top level
imports no test helper.
"""
import importlib.util
import json
import sys
import threading
import types

import numpy as np
import pytest

from ddpo_jax import config_schema
from ddpo_jax.rewards import client as C
from ddpo_jax.rewards import make_rewards
from ddpo_jax.rewards import geneval as G
from ddpo_jax.rewards import ocr as O
from ddpo_jax.rewards import scorers as S
from ddpo_jax.rewards import server as srv
from ddpo_jax.rewards.plugins import load_plugin

# ------------------------------------------------------------------------------------------
# Deterministic engines reading the test images' pixels
# ------------------------------------------------------------------------------------------
BLOCK = 16  # a bit is a 16x16 black / white block: JPEG at quality 80 keeps it
ROWS = 8  # characters per image, one per row of 8 bit-blocks (128 x 128 images)


def encode_text(text: str) -> np.ndarray:
  """(128, 128, 3) uint8 image holding `text` (<= 7 ASCII chars): row r = bits of char r."""
  assert len(text) < ROWS and all(0 < ord(c) < 128 for c in text)
  image = np.zeros((ROWS * BLOCK, 8 * BLOCK, 3), np.uint8)
  for r, ch in enumerate(text):
    for b in range(8):
      if (ord(ch) >> (7 - b)) & 1:
        image[r * BLOCK:(r + 1) * BLOCK, b * BLOCK:(b + 1) * BLOCK] = 255
  return image


def fake_reader(images):
  """An OCR engine for `encode_text` images: list of (H, W, 3) uint8 -> list of str."""
  texts = []
  for image in images:
    gray = np.asarray(image, np.float64).mean(-1)
    chars = []
    for r in range(ROWS):
      bits = [gray[r * BLOCK + 4:(r + 1) * BLOCK - 4, b * BLOCK + 4:(b + 1) * BLOCK - 4].mean()
              > 127 for b in range(8)]
      code = int("".join("1" if bit else "0" for bit in bits), 2)
      if code == 0:
        break
      chars.append(chr(code))
    texts.append("".join(chars))
  return texts


# Solid-colour rectangles stand for objects: colour code -> (class, colour).
CODES = {(255, 0, 0): ("car", "red"), (0, 0, 255): ("car", "blue"),
         (0, 255, 0): ("teddy bear", "green"), (255, 255, 0): ("dog", "yellow")}


def draw(objects, size=64) -> np.ndarray:
  """A grey image with one filled rectangle (x0, y0, x1, y1 inclusive) per (code, box)."""
  image = np.full((size, size, 3), 128, np.uint8)
  for code, (x0, y0, x1, y1) in objects:
    image[y0:y1 + 1, x0:x1 + 1] = code
  return image


def fake_detector(images):
  """A GenEval detector for `draw` images: the bounding box of each colour code's pixels
  (one object per code), score 0.95, with its colour."""
  out = []
  for image in images:
    image = np.asarray(image, np.int32)
    dets = []
    for code, (label, color) in CODES.items():
      ys, xs = np.nonzero(np.abs(image - np.array(code)).max(-1) < 60)
      if len(xs) > 20:
        dets.append({"label": label, "score": 0.95, "color": color,
                     "box": [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]})
    out.append(dets)
  return out


def test_the_fake_engines_read_back_what_was_drawn_through_jpeg():
  texts = ["HELLO", "W0RLD", "", "xAByy"]
  decoded = [C.decode_jpeg(C.encode_jpeg(encode_text(t))) for t in texts]
  assert fake_reader(decoded) == texts
  image = C.decode_jpeg(C.encode_jpeg(draw([((255, 0, 0), (4, 8, 23, 27))])))
  [[det]] = fake_detector([image])
  assert det["label"] == "car" and det["color"] == "red"
  assert np.abs(np.array(det["box"]) - [4, 8, 23, 27]).max() <= 1


# ------------------------------------------------------------------------------------------
# OCR: the reward, hand-computed and against the reference's formula
# ------------------------------------------------------------------------------------------

def _reference_edit_distance(a: str, b: str) -> int:
  """Unit-cost Levenshtein distance by the textbook dynamic programme (the test's own oracle
  for the rapidfuzz distance the reward uses)."""
  table = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
  for i in range(1, len(a) + 1):
    for j in range(1, len(b) + 1):
      table[i][j] = min(table[i - 1][j] + 1, table[i][j - 1] + 1,
                        table[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
  return table[-1][-1]


@pytest.mark.parametrize("read, target", [
    ("kitten", "sitting"), ("flaw", "lawn"), ("intention", "execution"),
    ("ab", "ba"),  # no transpositions: two substitutions
    ("", "abc"), ("abc", "a"), ("same", "same"), ("hell0", "hello"), ("stop", "stopsign"),
    ("A Sign SAYS hi", "hi there"), ("xyzxyzxyz", "ab"), ("Caf\u00e9 OPEN", "cafe open"),
    ("tab\there", "tab here"),
])
def test_ocr_reward_equals_the_reference_formula(read, target):
  """reward = 1 - d / len(target), d = 0 if the normalised target is in the normalised read,
  else min(edit distance, len(target)) (flow_grpo's `ocr` reward), with the distance from a DP
  written here."""
  r, t = read.replace(" ", "").lower(), target.replace(" ", "").lower()
  want_d = 0 if t in r else min(_reference_edit_distance(r, t), len(t))
  got, d = O.ocr_reward(read, target)
  assert d == want_d
  assert got == pytest.approx(1 - want_d / len(t), abs=1e-12)


def test_target_text_is_the_first_quoted_span():
  assert O.target_text('A sign that says "HELLO"') == "HELLO"
  assert O.target_text('a "b c" and "d"') == "b c"
  assert O.target_text('a sign "OPEN') == "OPEN"  # an unclosed quote runs to the end
  with pytest.raises(ValueError, match="no quoted text"):
    O.target_text("a sign that says hello")


@pytest.mark.parametrize("read, target, reward, distance", [
    ("HELLO WORLD!", "Hello World", 1.0, 0),  # lower-cased, spaces dropped, substring
    ("HELL0", "HELLO", 0.8, 1),  # 1 - 1/5
    ("helo", "hello", 0.8, 1),
    ("Stop", "STOP SIGN", 0.5, 4),  # "stop" vs "stopsign": 4 insertions of 8
    ("", "abc", 0.0, 3),  # no text read
    ("xyzxyzxyz", "ab", 0.0, 2),  # distance 9 capped at len("ab")
    ("hello\tworld", "hello world", 0.9, 1),  # only ' ' is removed: the tab costs 1 of 10
])
def test_ocr_reward_hand_computed(read, target, reward, distance):
  got, d = O.ocr_reward(read, target)
  assert d == distance
  assert got == pytest.approx(reward, abs=1e-12)


def test_ocr_reward_refuses_an_empty_target():
  with pytest.raises(ValueError, match="empty"):
    O.ocr_reward("anything", "   ")


def test_ocr_scorer_in_process():
  calls = []

  def engine(images):
    calls.append(len(images))
    return ["HELL0", "say OPEN now", ""]
  scorer = O.make_ocr_scorer(engine)
  rewards, info = scorer(np.zeros((3, 8, 8, 3), np.uint8),
                         ['sign "HELLO"', 'door "OPEN"', 'mug "AB"'], {})
  assert rewards == pytest.approx([0.8, 1.0, 0.0])
  assert info == {"edit_distance": [1, 0, 2], "ocr_text": ["HELL0", "say OPEN now", ""]}
  assert calls == [3]
  # A prompt without quoted text (or with empty quotes) is refused before the engine runs.
  for prompt in ("no quotes here", 'empty "" quotes'):
    with pytest.raises(ValueError, match="quote"):
      scorer(np.zeros((1, 8, 8, 3), np.uint8), [prompt], {})
  assert calls == [3]
  for answer in (["only one"], "ab", None, [1, 2]):
    with pytest.raises(ValueError, match="must return a list of one str per image"):
      O.OcrScorer(lambda images: answer)(np.zeros((2, 8, 8, 3), np.uint8), ['"a"', '"b"'])


def test_ocr_engine_plugins():
  scorer = O.make_ocr_scorer(f"{__name__}:fake_reader")
  assert scorer.engine is fake_reader
  rewards, _ = scorer(np.stack([encode_text("HI")]), ['say "hi"'])
  assert rewards == [1.0]
  # With engine_kwargs, MODULE:ATTR names a factory.
  factory = load_plugin("ddpo_jax.rewards.ocr:OcrScorer", {"engine": fake_reader})
  assert isinstance(factory, O.OcrScorer)
  built = S.BUILTIN["ocr"](engine=f"{__name__}:fake_reader")
  assert isinstance(built, O.OcrScorer) and built.engine is fake_reader
  assert srv.resolve_scorer("ocr", {"engine": f"{__name__}:fake_reader"}).engine is fake_reader
  with pytest.raises(ImportError, match="OCR engine 'no_such_mod_q:f': cannot import"):
    O.make_ocr_scorer("no_such_mod_q:f")
  with pytest.raises(ValueError, match="expected MODULE:ATTR"):
    O.make_ocr_scorer("not_a_spec")


@pytest.mark.skipif(importlib.util.find_spec("paddleocr") is not None,
                    reason="PaddleOCR is installed")
def test_default_ocr_engine_without_paddle_names_what_to_install():
  with pytest.raises(ImportError, match=r"pip install paddleocr paddlepaddle"):
    O.make_ocr_scorer()


def test_paddle_result_formats():
  box = [[0, 0], [1, 0], [1, 1], [0, 1]]
  # 2.x: one entry per page, [box, (text, confidence)] lines; confidence 0 lines dropped.
  assert O.texts_from_paddle2([[[box, ("HEL", 0.9)], [box, ("xx", 0.0)],
                                [box, ("LO", 0.5)]]]) == "HELLO"
  assert O.texts_from_paddle2([None]) == "" and O.texts_from_paddle2([]) == ""
  # 3.x: results mapping rec_texts / rec_scores.
  assert O.texts_from_paddle3([{"rec_texts": ["A", "b", "C"],
                                "rec_scores": [0.9, 0.0, 0.2]}]) == "AC"
  assert O.texts_from_paddle3([{"rec_texts": [], "rec_scores": []}]) == ""


@pytest.mark.parametrize("version", ["2.9.1", "3.1.0"])
def test_paddle_reader_adapter(monkeypatch, version):
  """PaddleOcrReader's constructor arguments, read call and per-image failure fallback, against
  a stand-in `paddleocr` module answering in each major version's documented result format."""
  made = {}

  class StandIn:
    def __init__(self, **kwargs):
      made.update(kwargs)

    def _answer(self, image):
      if image.mean() > 200:
        raise RuntimeError("cannot read")
      return "TEXT" if image.mean() > 100 else ""

    def ocr(self, image, cls):
      text = self._answer(image)
      return [[[None, (text, 0.9)]] if text else None]

    def predict(self, image):
      text = self._answer(image)
      return [{"rec_texts": [text] if text else [], "rec_scores": [0.9] if text else []}]
  monkeypatch.setitem(sys.modules, "paddleocr",
                      types.SimpleNamespace(__version__=version, PaddleOCR=StandIn))
  reader = O.PaddleOcrReader(use_gpu=True)
  if version.startswith("2"):
    assert reader.api == 2 and made == {"use_angle_cls": False, "lang": "en", "use_gpu": True,
                                        "show_log": False}
  else:
    assert reader.api == 3 and made["device"] == "gpu" and made["use_textline_orientation"] is False
  images = [np.full((4, 4, 3), v, np.uint8) for v in (150, 50, 250)]
  assert reader(images) == ["TEXT", "", ""]  # the third raised: read as no text
  assert reader.failures == 1


# ------------------------------------------------------------------------------------------
# GenEval: geometry, selection and the two rules on hand-built detections
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("a, b, relations", [
    # centres (5, 5) and (25, 5): offset (-20, 0), shrunk by 0.1 * (10 + 10) -> dx = -18/20
    ((0, 0, 10, 10), (20, 0, 30, 10), {"left of"}),
    ((20, 0, 30, 10), (0, 0, 10, 10), {"right of"}),
    ((0, 0, 10, 10), (0, 30, 10, 40), {"above"}),  # dy = -28/30 (y grows downwards)
    ((0, 30, 10, 40), (0, 0, 10, 10), {"below"}),
    # offset (-20, -20), shrunk (-18, -18) / 28.28: dx = dy = -0.64
    ((0, 0, 10, 10), (20, 20, 30, 30), {"left of", "above"}),
    # offset (-20, -8), shrunk (-18, -6) / 21.54: dx = -0.84, dy = -0.28
    ((0, 0, 10, 10), (20, 8, 30, 18), {"left of"}),
    # offset (-1, 0) is within 0.1 * (10 + 10): no relation
    ((0, 0, 10, 10), (1, 0, 11, 10), set()),
])
def test_relative_position(a, b, relations):
  assert G.relative_position(a, b) == relations


def test_box_iou_and_selection():
  assert G.box_iou((0, 0, 9, 9), (0, 0, 9, 9)) == 1.0
  assert G.box_iou((0, 0, 9, 9), (5, 0, 14, 9)) == pytest.approx(50 / 150)  # +1 pixel areas
  assert G.box_iou((0, 0, 9, 9), (20, 20, 29, 29)) == 0.0
  dets = [G.to_detection(d) for d in [
      ("cat", 0.3, (0, 0, 9, 9)),  # not > 0.3
      ("cat", 0.5, (0, 0, 9, 9)),
      {"label": "cat", "score": 0.9, "box": [5, 0, 14, 9]},
      ("cat", 0.7, (0, 0, 9, 9)),
      ("dog", 0.2, (0, 0, 1, 1)),
  ]]
  objects = G.select_objects(dets, threshold=0.3)
  assert list(objects) == ["cat"]  # the dog is under the threshold
  assert [d.score for d in objects["cat"]] == [0.9, 0.7, 0.5]
  assert [d.score for d in G.select_objects(dets, 0.3, max_objects=2)["cat"]] == [0.9, 0.7]
  # max_overlap 0.5: 0.5 duplicates 0.7's box (IoU 1); 0.7 overlaps 0.9 by 1/3 only.
  assert [d.score for d in G.select_objects(dets, 0.3, max_overlap=0.5)["cat"]] == [0.9, 0.7]
  with pytest.raises(ValueError, match="x1 < x0"):
    G.to_detection(("cat", 0.9, (10, 0, 0, 10)))
  with pytest.raises(ValueError, match="color 'teal'"):
    G.to_detection(("cat", 0.9, (0, 0, 1, 1), "teal"))


SINGLE = {"tag": "single_object", "include": [{"class": "cat", "count": 1}]}
COUNTING = {"tag": "counting", "include": [{"class": "clock", "count": 2}],
            "exclude": [{"class": "clock", "count": 3}]}
COLOR = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]}
COLOR_ATTR = {"tag": "color_attr", "include": [{"class": "bus", "count": 1, "color": "green"},
                                                {"class": "microwave", "count": 1,
                                                 "color": "purple"}]}
POSITION = {"tag": "position", "include": [{"class": "teddy bear", "count": 1},
                                            {"class": "dog", "count": 1,
                                             "position": ["right of", 0]}]}
LEFT, RIGHT = (0, 0, 10, 10), (20, 0, 30, 10)


def _score(spec, dets, **kwargs):
  """(score, strict accuracy, GenEval accuracy) of one image's detections."""
  scorer = G.GenEvalScorer(lambda images: [dets], **kwargs)
  rewards, info = scorer(np.zeros((1, 4, 4, 3), np.uint8), ["p"],
                         {"geneval": [json.dumps(spec)]})
  assert rewards == info["score"]
  return info["score"][0], info["strict_accuracy"][0], info["accuracy"][0]


@pytest.mark.parametrize("spec, dets, want", [
    (SINGLE, [("cat", 0.9, LEFT)], (1.0, 1, 1)),
    # two cats for one: count term 1 - |1 - 2| / 1 = 0; GenEval accepts >= count
    (SINGLE, [("cat", 0.9, LEFT), ("cat", 0.5, RIGHT)], (0.0, 0, 1)),
    # three cats: 1 - 2 = -1 (the reference does not clip)
    (SINGLE, [("cat", 0.9, LEFT), ("cat", 0.8, RIGHT), ("cat", 0.7, LEFT)], (-1.0, 0, 1)),
    (SINGLE, [("cat", 0.25, LEFT), ("dog", 0.9, LEFT)], (0.0, 0, 0)),  # under 0.3; wrong class
    # counting: the 0.9 threshold keeps 2 of 3
    (COUNTING, [("clock", 0.95, LEFT), ("clock", 0.92, RIGHT), ("clock", 0.5, LEFT)],
     (1.0, 1, 1)),
    # three clocks: 1 - 1/2; GenEval's exclude (>= 3 clocks) fails it
    (COUNTING, [("clock", 0.95, LEFT), ("clock", 0.92, RIGHT), ("clock", 0.91, LEFT)],
     (0.5, 0, 0)),
    (COUNTING, [("clock", 0.95, LEFT)], (0.5, 0, 0)),  # a wrong count fails
    (COLOR, [("car", 0.9, LEFT, "red")], (1.0, 1, 1)),
    (COLOR, [("car", 0.9, LEFT, "blue")], (0.5, 0, 0)),  # terms 1 (count), 0 (colour)
    (COLOR, [], (0.0, 0, 0)),  # terms 0 (count), 0 (the colour not checked)
    # GenEval checks the colour of the most confident car only; the score's count term fails
    (COLOR, [("car", 0.9, LEFT, "red"), ("car", 0.5, RIGHT, "blue")], (0.0, 0, 1)),
    (COLOR_ATTR, [("bus", 0.9, LEFT, "green"), ("microwave", 0.9, RIGHT, "red")],
     (0.75, 0, 0)),  # terms 1, 1, 1, 0
    (POSITION, [("teddy bear", 0.9, LEFT), ("dog", 0.9, RIGHT)], (1.0, 1, 1)),  # 1, 1, 1
    # the dog left of the bear: terms 1, 1, 0 and the reference's extra 1
    (POSITION, [("teddy bear", 0.9, RIGHT), ("dog", 0.9, LEFT)], (0.75, 0, 0)),
    # no bear: terms 0 (bear count), 1 (dog count), 0 (no target)
    (POSITION, [("dog", 0.9, RIGHT)], (1 / 3, 0, 0)),
    # two dogs for one: terms 1, 0 (dog count), 0 (position not checked)
    (POSITION, [("teddy bear", 0.9, LEFT), ("dog", 0.9, RIGHT), ("dog", 0.8, RIGHT)],
     (1 / 3, 0, 1)),
])
def test_geneval_rules_hand_built(spec, dets, want):
  score, strict, accuracy = _score(spec, dets)
  assert score == pytest.approx(want[0], abs=1e-12)
  assert (strict, accuracy) == (want[1], want[2])


def test_position_term_without_the_reference_extra_one():
  dets = [("teddy bear", 0.9, RIGHT), ("dog", 0.9, LEFT)]
  assert _score(POSITION, dets, reference_position_term=False)[0] == pytest.approx(2 / 3)
  good = [("teddy bear", 0.9, LEFT), ("dog", 0.9, RIGHT)]
  assert _score(POSITION, good, reference_position_term=False)[0] == 1.0


def test_reward_choice_and_thresholds():
  dets = [("cat", 0.9, LEFT), ("cat", 0.5, RIGHT)]
  assert _score(SINGLE, dets)[0] == 0.0
  for reward, want in (("strict", 0.0), ("accuracy", 1.0)):
    scorer = G.GenEvalScorer(lambda images: [dets], reward=reward)
    rewards, _ = scorer(np.zeros((1, 4, 4, 3), np.uint8), ["p"], {"geneval": [SINGLE]})
    assert rewards == [want]
  assert _score(SINGLE, dets, threshold=0.6)[:2] == (1.0, 1)  # the 0.5 cat is dropped


def test_colour_classifier_is_asked_only_what_it_must():
  asked = []

  def classify(image, dets, label):
    asked.append((label, [d.score for d in dets]))
    return ["red" if d.score > 0.8 else "blue" for d in dets]
  dets = [("car", 0.9, LEFT), ("car", 0.85, RIGHT, "blue")]
  spec = {"tag": "colors", "include": [{"class": "car", "count": 2, "color": "red"}]}
  scorer = G.GenEvalScorer(lambda images: [dets], color_classifier=classify)
  rewards, info = scorer(np.zeros((1, 4, 4, 3), np.uint8), ["p"], {"geneval": [spec]})
  # the 0.9 car has no colour (classified red), the 0.85 car says blue: k = 1 of 2
  assert rewards == [pytest.approx((1 + 0.5) / 2)] and info["accuracy"] == [0.0]
  assert asked == [("car", [0.9])]  # once, for the car without a colour, shared by both rules
  for answer in ([], None, [None]):
    with pytest.raises(ValueError, match="one list of detections per image"):
      G.GenEvalScorer(lambda images: answer)(np.zeros((1, 4, 4, 3), np.uint8), ["p"],
                                             {"geneval": [spec]})
  with pytest.raises(ValueError, match="no colour classifier"):
    G.GenEvalScorer(lambda images: [dets])(np.zeros((1, 4, 4, 3), np.uint8), ["p"],
                                           {"geneval": [spec]})


def test_specs_from_metadata_or_the_prompt_table(tmp_path):
  spec = dict(SINGLE, prompt="a photo of a cat")
  path = tmp_path / "train_metadata.jsonl"
  path.write_text(json.dumps(spec) + "\n\n" + json.dumps(dict(COLOR, prompt="a red car")) +
                  "\n" + json.dumps(spec) + "\n")  # an identical duplicate is fine
  detector = lambda images: [[("cat", 0.9, LEFT)] for _ in images]  # noqa: E731
  scorer = G.make_geneval_scorer(detector, metadata_path=str(path))
  rewards, info = scorer(np.zeros((2, 4, 4, 3), np.uint8), ["a photo of a cat", "a red car"])
  assert rewards == [1.0, 0.0] and info["tag"] == ["single_object", "colors"]
  with pytest.raises(ValueError, match="no spec for the prompt 'a dog'"):
    scorer(np.zeros((1, 4, 4, 3), np.uint8), ["a dog"], {})
  with pytest.raises(ValueError, match="spec is for the prompt 'a photo of a cat', not 'x'"):
    scorer(np.zeros((1, 4, 4, 3), np.uint8), ["x"], {"geneval": [json.dumps(spec)]})
  with pytest.raises(ValueError, match=r"one spec per image \(2\)"):
    scorer(np.zeros((2, 4, 4, 3), np.uint8), ["a", "b"], {"geneval": [SINGLE]})
  path.write_text(json.dumps(spec) + "\n" + json.dumps(dict(COLOR, prompt="a photo of a cat")))
  with pytest.raises(ValueError, match=r"jsonl:2: prompt 'a photo of a cat' has another spec"):
    G.load_spec_table(path)


@pytest.mark.parametrize("spec, message", [
    ({"include": []}, "needs a str 'tag'"),
    ({"tag": "t", "include": [{"class": "cat", "count": 0}]}, "integer 'count' >= 1"),
    ({"tag": "t", "include": [{"class": "cat", "count": 1, "color": "teal"}]}, "'teal'"),
    ({"tag": "t", "include": [{"class": "cat", "count": 1, "position": ["left of", 0]}]},
     "earlier include entry"),  # an entry cannot be placed relative to itself
    ({"tag": "t", "include": [{"class": "a", "count": 1},
                              {"class": "b", "count": 1, "position": ["near", 0]}]}, "relation"),
    ("{not json", "not JSON"),
])
def test_bad_specs_are_refused(spec, message):
  with pytest.raises(ValueError, match=message):
    G.parse_spec(spec)


def test_mmdet_result_formats():
  # mmdet 2.x: per-class (n, 5) arrays and masks; class 15 is GenEval's "cat", 16 "dog".
  bbox = [np.zeros((0, 5), np.float32) for _ in G.CLASS_NAMES]
  bbox[15] = np.array([[1, 2, 3, 4, 0.9], [0, 0, 2, 2, 0.4]], np.float32)
  bbox[16] = np.array([[5, 5, 7, 7, 0.8]], np.float32)
  segm = [[np.ones((8, 8), bool)] * len(b) for b in bbox]
  dets = G.detections_from_mmdet((bbox, segm))
  assert [(d.label, round(d.score, 3), d.box) for d in dets] == [
      ("cat", 0.9, (1.0, 2.0, 3.0, 4.0)), ("cat", 0.4, (0.0, 0.0, 2.0, 2.0)),
      ("dog", 0.8, (5.0, 5.0, 7.0, 7.0))]
  assert dets[0].mask.shape == (8, 8)
  assert [d.label for d in G.detections_from_mmdet({"ins_results": (bbox, segm)})] == \
      ["cat", "cat", "dog"]
  assert G.detections_from_mmdet(bbox)[2].mask is None

  # mmdet 3.x: a DetDataSample's pred_instances (an InstanceData: attributes and `in`).
  class Instances(types.SimpleNamespace):
    def __contains__(self, key):
      return hasattr(self, key)
  sample = types.SimpleNamespace(pred_instances=Instances(
      bboxes=np.array([[1, 2, 3, 4]], np.float32), scores=np.array([0.7], np.float32),
      labels=np.array([62])))
  [det] = G.detections_from_mmdet(sample)
  assert (det.label, det.box, det.mask) == ("tv", (1.0, 2.0, 3.0, 4.0), None)


def test_color_crop_masks_over_grey_and_crops_the_box():
  image = np.zeros((4, 6, 3), np.uint8)
  image[..., 0] = 200
  mask = np.zeros((4, 6), bool)
  mask[1, 2] = True
  crop = np.asarray(G.color_crop(image, G.Detection("cat", 0.9, (1, 1, 4, 3), None, mask)))
  assert crop.shape == (2, 3, 3)  # rows 1..2, columns 1..3
  assert crop[0, 1].tolist() == [200, 0, 0]  # the masked pixel (row 1, column 2)
  assert crop[0, 0].tolist() == crop[1, 2].tolist() == [153, 153, 153]  # #999 elsewhere
  whole = np.asarray(G.color_crop(image, G.Detection("cat", 0.9, (0, 0, 6, 4))))
  assert (whole == image).all()


@pytest.mark.skipif(importlib.util.find_spec("mmdet") is not None, reason="mmdet is installed")
def test_default_geneval_engine_without_mmdet_names_what_to_install():
  with pytest.raises(ImportError, match=r"mim install mmengine mmcv-full"):
    G.make_geneval_scorer(engine_kwargs={"checkpoint": "mask2former.pth"})
  with pytest.raises(ValueError, match="`checkpoint`"):
    G.make_geneval_scorer()


# ------------------------------------------------------------------------------------------
# Over HTTP
# ------------------------------------------------------------------------------------------

def test_ocr_scorer_through_a_server_process(tmp_path):
  """`python -m ddpo_jax.rewards.server --scorer=ddpo_jax.rewards.ocr:make_ocr_scorer` with
  this module's reader plugged in; the client batches 5 images by 2."""
  from test_reward_server import _start_server, _stop  # the pytest process only
  proc, url = _start_server(
      tmp_path / "server.log", "--scorer=ddpo_jax.rewards.ocr:make_ocr_scorer",
      '--scorer_kwargs={"engine": "tests.test_reward_plugins:fake_reader"}')
  try:
    prompts = ['A sign that says "HELLO"', 'a "WORLD" mug', 'shop "OPEN"', 'text "AB"',
               'no quotes']
    written = ["HELLO", "W0RLD", "", "xAByy", "z"]
    client = C.RewardClient(url, batch_size=2, timeout=30, retries=1)
    images = np.stack([encode_text(t) for t in written])
    rewards, info = client(images[:4], prompts[:4], {"step": np.arange(4)})
    np.testing.assert_array_equal(rewards, np.float32([1.0, 0.8, 0.0, 1.0]))
    assert info["edit_distance"].tolist() == [0, 1, 4, 0]
    assert info["ocr_text"].tolist() == written[:4]
    with pytest.raises(C.RewardServerError, match="HTTP 500.*no quoted text"):
      client(images[4:], prompts[4:])
  finally:
    _stop(proc)


def test_geneval_specs_travel_as_per_sample_metadata():
  """An in-process server (2 images per scorer call) scoring 5 images sent 3 per request, each
  with its spec as a JSON string in metadata["geneval"]: the specs are sliced with their
  images by the client and by the server."""
  scorer = G.make_geneval_scorer(f"{__name__}:fake_detector")
  server = srv.RewardServer(("127.0.0.1", 0), scorer, name="geneval", batch_size=2)
  thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                            daemon=True)
  thread.start()
  try:
    red, blue, bear, dog = (255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 0)
    cases = [  # (image, spec, reward)
        (draw([(red, (4, 4, 27, 27))]), COLOR, 1.0),
        (draw([(blue, (4, 4, 27, 27))]), COLOR, 0.5),
        (draw([(bear, (2, 20, 21, 43)), (dog, (40, 20, 59, 43))]), POSITION, 1.0),
        (draw([(bear, (40, 20, 59, 43)), (dog, (2, 20, 21, 43))]), POSITION, 0.75),
        (draw([(dog, (40, 20, 59, 43))]), POSITION, 1 / 3),
    ]
    images = np.stack([c[0] for c in cases])
    specs = [json.dumps(c[1]) for c in cases]
    client = C.RewardClient(server.url, batch_size=3, timeout=30, retries=1)
    rewards, info = client(images, [f"prompt {i}" for i in range(5)], {"geneval": specs})
    np.testing.assert_allclose(rewards, [c[2] for c in cases], rtol=1e-6)
    assert info["tag"].tolist() == ["colors", "colors", "position", "position", "position"]
    assert info["strict_accuracy"].tolist() == [1, 0, 1, 0, 0]
  finally:
    server.shutdown()
    server.server_close()


# ------------------------------------------------------------------------------------------
# Several remote terms of one config, each on its own server
# ------------------------------------------------------------------------------------------

def test_one_config_with_ocr_and_geneval_on_two_servers_and_the_old_remote(tmp_path):
  """`make_rewards` of a config with "remote_ocr" and "remote_geneval" (reward.server_urls) and
  the plain "remote" (reward.server_url): three RewardClients, each scoring on its own
  in-process server (`--scorer=ocr` / `geneval` with this module's engines, built-in
  brightness) with its own weight; each server sees only its own term's requests."""
  prompts = ['a photo of a red car and a sign that says "HI"',
             'a photo of a blue car and a sign that says "OK"',
             'a photo of a red car and a sign that says "HELLO"']
  specs = tmp_path / "specs.jsonl"
  specs.write_text("".join(json.dumps({**spec, "prompt": p}) + "\n" for p, spec in zip(
      prompts, [COLOR, {"tag": "colors", "include": [{"class": "car", "count": 1,
                                                        "color": "blue"}]}, COLOR])))
  seen = {}
  servers = {}

  def start(name, scorer):
    def recording(images, prompts, metadata):
      seen.setdefault(name, []).append(list(prompts))
      return scorer(images, prompts, metadata)
    server = srv.RewardServer(("127.0.0.1", 0), recording, name=name)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                     daemon=True).start()
    servers[name] = server
    return server.url

  try:
    ocr_url = start("ocr", srv.resolve_scorer("ocr", {"engine": f"{__name__}:fake_reader"}))
    geneval_url = start("geneval", srv.resolve_scorer(
        "geneval", {"engine": f"{__name__}:fake_detector", "metadata_path": str(specs)}))
    bright_url = start("brightness", srv.resolve_scorer("brightness"))
    config = config_schema.new_config("ddpo", "sd")
    config.reward.weights = {"remote_ocr": 0.5, "remote_geneval": 0.25, "remote": 1.0}
    config.reward.server_urls = {"geneval": geneval_url + "/", "ocr": ocr_url, "unused": ""}
    config.reward.server_url = bright_url
    config.reward.metrics = ("remote_ocr",)  # already a term: not added twice
    config_schema.validate(config)
    terms = make_rewards(config, types.SimpleNamespace(rewards={}))
    assert {r.name: (w, r.on_device, r.fn.url) for w, r in terms} == {
        "remote_ocr": (0.5, False, ocr_url), "remote_geneval": (0.25, False, geneval_url),
        "remote": (1.0, False, bright_url)}
    assert len(terms) == 3
    clients = [r.fn for _, r in terms]
    assert all(isinstance(c, C.RewardClient) and c.batch_size == 16 for c in clients)
    assert len({id(c) for c in clients}) == 3  # each term its own client

    # Text rows on top (read by fake_reader), a red car below them (found by fake_detector).
    images = np.stack([encode_text(t) for t in ["HI", "OX", "HELLO"]])
    images[:2, 88:120, 16:64] = (255, 0, 0)
    got = {r.name: r.fn(images, prompts, {}) for _, r in terms}
    rewards, info = got["remote_ocr"]
    np.testing.assert_allclose(rewards, [1.0, 0.5, 1.0])  # "ox" vs "ok": 1 - 1/2
    assert info["ocr_text"].tolist() == ["HI", "OX", "HELLO"]
    rewards, info = got["remote_geneval"]
    np.testing.assert_allclose(rewards, [1.0, 0.5, 0.0])  # right / wrong colour / no car
    assert info["strict_accuracy"].tolist() == [1, 0, 0]
    decoded = np.stack([C.decode_jpeg(C.encode_jpeg(im)) for im in images])
    np.testing.assert_array_equal(got["remote"][0],
                                  np.float32(S.brightness(decoded, prompts, {})[0]))
    assert seen == {"ocr": [prompts], "geneval": [prompts], "brightness": [prompts]}
  finally:
    for server in servers.values():
      server.shutdown()
      server.server_close()
