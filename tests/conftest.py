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

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data", "ddpo_assets")


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory):
  """A fresh DDPO_JAX_CACHE so tests pre-train their own tiny digits models."""
  path = str(tmp_path_factory.mktemp("ddpo_jax_cache"))
  os.environ["DDPO_JAX_CACHE"] = path
  return path
