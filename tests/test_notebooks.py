"""The quickstart notebook executes top to bottom (tiny `runlocal` variant)."""
import os

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REPO


@pytest.mark.slow  # 70 s in CI; README command 1 trains the same digits default
def test_quickstart_digits_notebook_runs(digits_cache, tmp_path, monkeypatch):
  monkeypatch.setenv("QUICKSTART_VARIANT", "runlocal")
  monkeypatch.setenv("QUICKSTART_WORKDIR", str(tmp_path / "run"))
  nb = nbformat.read(os.path.join(REPO, "notebooks", "quickstart_digits.ipynb"), as_version=4)
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
  assert os.path.exists(tmp_path / "run" / "reward_curve.png")
  assert os.path.exists(tmp_path / "run" / "before_after.png")
