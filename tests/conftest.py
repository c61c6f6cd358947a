"""Test-wide settings: CPU, deterministic, a private cache for the pre-trained digits model."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data", "ddpo_assets")


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory):
  """A fresh DDPO_JAX_CACHE so tests pre-train their own tiny digits models."""
  path = str(tmp_path_factory.mktemp("ddpo_jax_cache"))
  os.environ["DDPO_JAX_CACHE"] = path
  return path
