"""notebooks/sd_colab.ipynb executes top to bottom on a CPU against a tiny random pipeline.

The parameter cell reads environment variables: the tiny diffusers pipeline in place of the
Hub model, a tiny CLIP tower (projection_dim 768) with a random LAION-shaped MLP, synthetic
prompt files in the paper's format, the `runlocal` variant, and SD_NOTEBOOK_SKIP_INSTALL=1 to
skip the pip cell.
"""
import os

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REPO
from test_sd import compile_cache, sd_cache_dir, tiny_clip_768, tiny_sd  # noqa: F401


@pytest.mark.slow  # its steps (train, resume, sample, export) are fast-tier tests in
# tests/test_sd.py and tests/test_lora.py; the fast tier executes notebooks/quickstart_digits.ipynb
def test_sd_colab_notebook_runs(tiny_sd, tiny_clip_768, random_aesthetic_mlp, prompt_assets,
                                compile_cache, tmp_path, monkeypatch):
  workdir = tmp_path / "run"
  env = {"SD_NOTEBOOK_MODEL": tiny_sd, "SD_NOTEBOOK_SKIP_INSTALL": "1",
         "SD_NOTEBOOK_WORKDIR": str(workdir), "SD_NOTEBOOK_CLIP": tiny_clip_768,
         "SD_NOTEBOOK_MLP": random_aesthetic_mlp, "SD_NOTEBOOK_ASSETS": prompt_assets,
         "SD_NOTEBOOK_VARIANT": "runlocal", "SD_NOTEBOOK_EPOCHS": "2",
         "JAX_PLATFORMS": "cpu", **compile_cache}
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  nb = nbformat.read(os.path.join(REPO, "notebooks", "sd_colab.ipynb"), as_version=4)
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
  outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                    for o in c.get("outputs", []))
  assert "skipping the install" in outputs
  assert "uint8 (8, 16, 16, 3)" in outputs  # before/after samples: uint8 NHWC
  for name in ("reward_curve.png", "before_after.png", "metrics.jsonl"):
    assert (workdir / name).exists(), name
  assert len((workdir / "metrics.jsonl").read_text().splitlines()) == 2
  # exported beside the run (export refuses a directory inside the WORKDIR)
  exported = sorted(os.listdir(f"{workdir}_exported"))
  assert {"model_index.json", "unet", "vae", "text_encoder", "tokenizer",
          "scheduler"} <= set(exported)
  assert not any(p.name.startswith(".") for p in workdir.iterdir())  # no half-written export
