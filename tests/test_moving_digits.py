"""The moving-digits video task (`ddpo_jax.tasks.moving_digits`): the clips, the prompts, and the
held-out judge (trained on the held-out split only, checked on training-split digits)."""
import numpy as np
import pytest

from ddpo_jax.tasks import moving_digits as md


@pytest.fixture(scope="module")
def train_digits():
  return md.load_digits_split("train")


@pytest.fixture(scope="module")
def train_clips(train_digits):
  """200 clips of distinct training-split digits, directions drawn uniformly."""
  images, labels = train_digits
  rng = np.random.default_rng(1)
  idx = rng.choice(len(images), 200, replace=False)
  directions = rng.integers(0, len(md.DIRECTIONS), 200)
  return md.make_clips(images[idx], labels[idx], directions, rng=2)


def test_split_is_the_digits_pipelines_split():
  from ddpo_jax.pipelines import digits
  for split in ("train", "heldout"):
    ours, our_labels = md.load_digits_split(split)
    theirs, their_labels = digits.load_digits_split(split)
    np.testing.assert_array_equal(ours, theirs[..., 0])
    np.testing.assert_array_equal(our_labels, their_labels)
  with pytest.raises(ValueError, match="unknown digits split"):
    md.load_digits_split("test")


def test_clip_shapes_range_and_straight_motion(train_digits, train_clips):
  images, _ = train_digits
  clips, meta = train_clips
  assert clips.shape == (200, 8, 16, 16, 1) and clips.dtype == np.float32
  assert clips.min() == 0.0 and clips.max() <= 1.0 and clips.max() > 0.9
  assert meta["labels"].shape == (200,) and len(meta["prompts"]) == 200
  # every frame holds the whole digit: the same mass in each frame
  mass = clips.sum(axis=(2, 3, 4))
  np.testing.assert_allclose(mass, mass[:, :1].repeat(8, axis=1), rtol=1e-5)
  for i in range(200):
    step = np.asarray(md.STEPS[meta["directions"][i]])
    r0, c0 = meta["start"][i]
    for f in (0, 7):
      r, c = np.asarray([r0, c0]) + f * step
      assert 0 <= r <= 8 and 0 <= c <= 8
      box = clips[i, f, r:r + 8, c:c + 8, 0]
      assert box.sum() == pytest.approx(clips[i, f].sum(), rel=1e-6)
  # the same digit image, pasted: frame 0's box is one of the training images
  i = 0
  r, c = meta["start"][i]
  assert any(np.array_equal(clips[i, 0, r:r + 8, c:c + 8, 0], im) for im in images)
  assert set(meta["directions"]) == set(md.DIRECTIONS)


def test_start_positions_cover_the_allowed_range():
  images = np.ones((400, 8, 8), np.float32)
  _, meta = md.make_clips(images, np.zeros(400, int), "right", frames=3, size=16, speed=2, rng=0)
  # right: column 0..(16-8-2*2)=4, row 0..8, all reached
  assert set(meta["start"][:, 1]) == set(range(5)) and set(meta["start"][:, 0]) == set(range(9))
  _, meta = md.make_clips(images, np.zeros(400, int), "up", frames=3, size=16, speed=2, rng=0)
  assert set(meta["start"][:, 0]) == set(range(4, 9))  # row moves up by 4: starts at 4..8


def test_clips_are_deterministic_per_seed(train_digits):
  images, labels = train_digits
  a, meta_a = md.make_clips(images[:20], labels[:20], "left", rng=7)
  b, meta_b = md.make_clips(images[:20], labels[:20], "left", rng=np.random.default_rng(7))
  c, _ = md.make_clips(images[:20], labels[:20], "left", rng=8)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(meta_a["start"], meta_b["start"])
  assert not np.array_equal(a, c)


def test_judged_direction_is_the_label(train_clips):
  clips, meta = train_clips
  judged = md.directions_of(clips)
  assert (judged == meta["directions"]).mean() >= 0.99
  assert md.direction_of(clips[0]) == meta["directions"][0]
  assert md.direction_of(clips[0, ..., 0]) == meta["directions"][0]  # no channel axis


def test_still_and_blank_clips_are_judged_none(train_digits):
  images, labels = train_digits
  still, _ = md.make_clips(images[:10], labels[:10], "down", speed=0, rng=0)
  assert list(md.directions_of(still)) == ["none"] * 10
  assert md.direction_of(np.zeros((8, 16, 16, 1))) == "none"
  # a one-pixel wobble is below the threshold
  wobble, _ = md.make_clips(images[:1], labels[:1], "right", frames=2, speed=1, rng=0)
  assert md.direction_of(wobble[0]) == "none"


def test_heldout_class_judge_on_training_digits(train_clips):
  clips, meta = train_clips
  result = md.judge(clips, meta["prompts"])
  assert set(result) >= {"class_accuracy", "direction_correct", "frame_classes", "directions"}
  assert result["class_accuracy"].shape == (200,) and result["frame_classes"].shape == (200, 8)
  per_frame = (result["frame_classes"] == meta["labels"][:, None]).mean()
  assert per_frame == pytest.approx(result["class_accuracy"].mean())
  assert per_frame >= 0.90, per_frame
  assert result["direction_correct"].mean() >= 0.99
  # the judge reads the prompts: the wrong direction or class is not rewarded
  wrong = [md.prompt((l + 1) % 10, {"left": "right", "right": "left", "up": "down",
                                    "down": "up"}[d])
           for l, d in (md.parse_prompt(p) for p in meta["prompts"])]
  bad = md.judge(clips, wrong)
  assert bad["direction_correct"].mean() == 0.0
  assert bad["class_accuracy"].mean() < 0.1
  with pytest.raises(ValueError, match="2 prompts for 200 clips"):
    md.judge(clips, meta["prompts"][:2])


@pytest.mark.parametrize("frames,size,speed,numbers", [
    (8, 14, 1, "size=14"), (8, 16, 2, "speed=2"), (1, 7, 0, "size=7"), (10, 16, 1, "frames=10")])
def test_geometry_that_leaves_the_canvas_is_refused(frames, size, speed, numbers):
  with pytest.raises(ValueError, match=numbers) as err:
    md.make_clips(np.zeros((1, 8, 8)), [0], "left", frames=frames, size=size, speed=speed, rng=0)
  assert f"{8 + speed * (frames - 1)}" in str(err.value)


def test_other_bad_inputs_are_refused():
  x = np.zeros((2, 8, 8))
  with pytest.raises(ValueError, match="speed=-1"):
    md.make_clips(x, [0, 1], "left", speed=-1, rng=0)
  with pytest.raises(ValueError, match="frames=0"):
    md.make_clips(x, [0, 1], "left", frames=0, rng=0)
  with pytest.raises(ValueError, match="whole number"):
    md.make_clips(x, [0, 1], "left", speed=1.5, rng=0)
  with pytest.raises(ValueError, match="unknown direction 'sideways'"):
    md.make_clips(x, [0, 1], "sideways", rng=0)
  with pytest.raises(ValueError, match="shape"):
    md.make_clips(np.zeros((2, 16, 16)), [0, 1], "left", rng=0)
  with pytest.raises(ValueError, match="labels"):
    md.make_clips(x, [0, 12], "left", rng=0)


def test_prompt_round_trip():
  for label in range(10):
    for direction in md.DIRECTIONS:
      text = md.prompt(label, direction)
      assert md.parse_prompt(text) == (label, direction)
  assert md.prompt(3, "left") == "a handwritten 3 moving left"
  for bad in ("a handwritten 3", "a handwritten 12 moving left", "a handwritten 3 moving left ",
              "a handwritten 3 moving sideways", ""):
    with pytest.raises(ValueError, match="not a moving-digits prompt"):
      md.parse_prompt(bad)
  with pytest.raises(ValueError):
    md.prompt(10, "left")
  with pytest.raises(ValueError):
    md.prompt(1, "none")
