"""Test-wide settings: CPU, deterministic, a private cache for the pre-trained digits model."""
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# JAX's persistent compilation cache, shared by every test and the subprocesses they start:
# many tests compile the same tiny programs (the runlocal configs), and XLA compilation is most
# of their time on a CPU. Entries are keyed by the program, the JAX version and the flags.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"ddpo_jax_tests_xla_cache_{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
# LLVM at -O0 for every test and subprocess: XLA's HLO passes (fusion, layout, the
# convolution rewrites) still run, only the machine-code optimisation is skipped. The suite's
# programs are tiny and mostly compile: measured on the 2-core machine, the CTRL digits class
# run 218 s -> 156 s, the default runlocal run 236 s -> 166 s, same metrics to 4 digits.
# Benchmarks do not import this file. Tests that set more flags append to these (`xla_flags`).
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
if TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The real assets (the paper's prompt files, the LAION aesthetic MLP), when a `shared` directory
# sits beside the checkout. Only tests that check the real files' contents or weights use them
# (and skip without them); every other test makes its own files with the fixtures below.
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data", "ddpo_assets")
LAION_MLP_PATH = os.path.join(SHARED_DATA, "sac+logos+ava1-l14-linearMSE.pth")

# Synthetic prompt files in the format of the paper's (`ddpo_jax.tasks.prompts`): 1000 ImageNet-style
# class lines ("name, synonym", the first 398 animals), 45 animals, 3 activities. The animals
# start with "cat", "dog", "horse" and include "ant" (for "an") as the real file does.
SYNTHETIC_IMAGENET = tuple(f"animal class {i}, Animalia synonym {i}" for i in range(398)) + \
    tuple(f"object class {i}" for i in range(398, 1000))
SYNTHETIC_ANIMALS = ("cat", "dog", "horse", "ant", "owl", "eel", "iguana", "yak") + \
    tuple(f"critter {i}" for i in range(8, 45))
SYNTHETIC_ACTIVITIES = ("sweeping the floor", "reading a map", "flying a kite")


def write_prompt_assets(directory) -> str:
  """Writes imagenet_classes.txt, simple_animals.txt, activities.txt (the synthetic sets above)
  into `directory` (created if needed); returns its path. Padded and blank lines included, as
  the loader strips and skips them; the last line has no newline, like the real files."""
  os.makedirs(directory, exist_ok=True)
  files = {"imagenet_classes.txt": SYNTHETIC_IMAGENET, "simple_animals.txt": SYNTHETIC_ANIMALS,
           "activities.txt": SYNTHETIC_ACTIVITIES}
  for name, lines in files.items():
    text = "\n".join((f"  {line} " if i % 7 == 3 else line) for i, line in enumerate(lines))
    text = text.replace("\n", "\n\n", 1)  # one blank line after the first
    with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
      f.write(text)
  return os.fspath(directory)


def write_random_aesthetic_mlp(path, seed=0) -> str:
  """A random state dict shaped as the LAION aesthetic MLP (`layers.{0,2,4,6,7}.{weight,bias}`,
  768 -> 1024 -> 128 -> 64 -> 16 -> 1, PyTorch Linear layout), saved with `torch.save`.

  The MLP takes unit-norm embeddings: the first layer's weights have std 1 (the others
  1/sqrt(fan_in)), so that different images' scores differ by about as much as with the real
  weights (a few 0.01 on the tests' random images), not 30 times less."""
  import torch
  g = torch.Generator().manual_seed(seed)
  sd = {}
  for i, n_in, n_out in ((0, 768, 1024), (2, 1024, 128), (4, 128, 64), (6, 64, 16), (7, 16, 1)):
    scale = 1.0 if i == 0 else n_in ** -0.5
    sd[f"layers.{i}.weight"] = torch.randn(n_out, n_in, generator=g) * scale
    sd[f"layers.{i}.bias"] = torch.randn(n_out, generator=g) * 0.1
  torch.save(sd, path)
  return os.fspath(path)


@pytest.fixture(scope="session")
def prompt_assets(tmp_path_factory):
  """A directory with synthetic imagenet_classes.txt, simple_animals.txt and activities.txt."""
  return write_prompt_assets(tmp_path_factory.mktemp("prompt_assets"))


@pytest.fixture(scope="session")
def random_aesthetic_mlp(tmp_path_factory):
  """A random LAION-MLP-shaped state dict saved with torch (768 -> ... -> 1); its path."""
  return write_random_aesthetic_mlp(tmp_path_factory.mktemp("aesthetic_mlp") / "mlp.pth")


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory):
  """A fresh DDPO_JAX_CACHE so tests pre-train their own tiny digits models (and reward
  classifiers), once per test session: the pytest-xdist workers share it (the parent of their
  base temporary directories is the session's). Two workers needing the same entry at once
  make it once: the other waits on its lock, then loads it (`ddpo_jax.pipelines.digits._load_or_make`)."""
  if os.environ.get("PYTEST_XDIST_WORKER"):
    path = str(tmp_path_factory.getbasetemp().parent / "ddpo_jax_cache")
    os.makedirs(path, exist_ok=True)
  else:
    path = str(tmp_path_factory.mktemp("ddpo_jax_cache"))
  os.environ["DDPO_JAX_CACHE"] = path
  return path


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "slow: the slow tier (docs/testing.md): over about 30 s on the idle 2-core CPU, "
                 "its feature covered by a fast test; deselect with -m 'not slow'")
