"""The package as a user installs it: the shipped configs by name (`--config=NAME[:VARIANTS]`,
`ddpo_jax.get_config`) from any directory, the package data in a non-editable install, and the
sample command's prompt file, PNG names and grid."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from ddpo_jax import configs
from ddpo_jax.trainer import sample as sample_lib


def test_a_config_name_resolves_to_the_shipped_file(tmp_path, monkeypatch):
  default = os.path.join(configs.DIR, "default.py")
  assert configs.resolve("default") == default
  assert configs.resolve("default:runlocal") == default + ":runlocal"
  assert {"default", "sd3_pickscore", "ctrl_digits_class"} <= set(configs.names())
  assert "__init__" not in configs.names()
  # a path is left to config_flags, as is what is neither a file nor a shipped name
  assert configs.resolve("ddpo_jax/configs/default.py:runlocal") == \
      "ddpo_jax/configs/default.py:runlocal"
  assert configs.resolve("nonesuch:runlocal") == "nonesuch:runlocal"
  # an existing file of that name in the working directory wins over the shipped config
  monkeypatch.chdir(tmp_path)
  (tmp_path / "default").write_text("")
  assert configs.resolve("default:x") == "default:x"
  argv = ["main", "--config", "sd3_pickscore:full", "--config.seed=3", "--workdir=w",
          "--config=digits_flow", "-config=default"]
  assert configs.resolve_argv(argv) == [
      "main", "--config", os.path.join(configs.DIR, "sd3_pickscore.py") + ":full",
      "--config.seed=3", "--workdir=w", "--config=" + os.path.join(configs.DIR, "digits_flow.py"),
      "-config=default"]  # the cwd's file "default"
  with pytest.raises(FileNotFoundError, match="no config 'defualt' in .*known: .*default"):
    configs.path("defualt")


def test_prompts_file_png_names_and_grid(tmp_path):
  prompts_file = tmp_path / "p.txt"
  prompts_file.write_text("a photo of a cat, sleeping\n\n  a red bicycle  \n")
  prompts = sample_lib.read_prompts_file(str(prompts_file))
  assert prompts == ["a photo of a cat, sleeping", "a red bicycle"]
  (tmp_path / "empty.txt").write_text("\n \n")
  with pytest.raises(ValueError, match="no prompts"):
    sample_lib.read_prompts_file(str(tmp_path / "empty.txt"))
  assert sample_lib.slug("A photo of a CAT, sleeping!") == "a-photo-of-a-cat-sleeping"
  assert sample_lib.slug("?!") == "prompt"
  long = sample_lib.slug("word " * 40)
  assert len(long) <= 60 and long.endswith("word") and not long.endswith("-")
  assert sample_lib.png_name(3, "a photo of a cat", 10) == "0003_a-photo-of-a-cat.png"
  assert sample_lib.png_name(3, "x", 123456) == "000003_x.png"
  images = np.random.default_rng(0).integers(0, 256, (5, 8, 6, 1), dtype=np.uint8)
  sample_lib.write_pngs(images, ["a handwritten 3", "a handwritten 7"] * 2 + ["a handwritten 3"],
                        str(tmp_path / "png"), str(tmp_path / "g" / "grid.png"))
  assert sorted(os.listdir(tmp_path / "png")) == [
      f"{i:04d}_a-handwritten-{d}.png" for i, d in enumerate([3, 7, 3, 7, 3])]
  from PIL import Image
  grid = np.asarray(Image.open(tmp_path / "g" / "grid.png"))
  assert grid.shape == (2 * (8 + 1) + 1, 3 * (6 + 1) + 1)  # 3 columns, 2 rows, 1-pixel padding
  np.testing.assert_array_equal(grid[1:9, 1:7], images[0, ..., 0])


def _clone_copy(dest):
  """The repository's files that git knows of (tracked, or new and not ignored) copied to
  `dest`: a clone's content without build outputs, caches or run directories."""
  listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                          cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
  for rel in filter(None, listed):
    src = os.path.join(REPO, rel)
    if os.path.isfile(src) and not os.path.islink(src):
      os.makedirs(os.path.join(dest, os.path.dirname(rel)), exist_ok=True)
      shutil.copy2(src, os.path.join(dest, rel))


@pytest.mark.slow  # ~60-90 s on 2 CPU cores: a wheel build and install, one digits epoch
def test_installed_package_trains_and_samples_from_anywhere(digits_cache, tmp_path):
  """`pip install` (not editable) of a copy of the repository into a fresh venv, then from
  another directory: `ddpo_jax.get_config("default")`, `python -m ddpo_jax.main
  --config=default:runlocal` for one epoch and `python -m ddpo_jax.sample` on its checkpoint,
  all from the installed files (configs, published model configs and GPU targets included)."""
  src, venv, elsewhere = tmp_path / "src", tmp_path / "venv", tmp_path / "elsewhere"
  _clone_copy(src)
  elsewhere.mkdir()
  # --without-pip: the system's pip and setuptools (a venv's bundled setuptools may predate
  # building wheels without the `wheel` package)
  subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
                  str(venv)], check=True)
  python = str(venv / "bin" / "python")
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
  env["DDPO_JAX_CACHE"] = digits_cache
  pip = subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                        "--no-index", "--quiet", str(src)],
                       cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
  assert pip.returncode == 0, pip.stdout[-2000:] + pip.stderr[-3000:]

  def run(*args, timeout=600):
    result = subprocess.run([python, *args], cwd=elsewhere, env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout

  where = json.loads(run("-c", """import json, os
import ddpo_jax
from ddpo_jax import configs, models
from ddpo_jax.trainer import plan
config = ddpo_jax.get_config("default")
print(json.dumps({"package": os.path.dirname(ddpo_jax.__file__), "configs": configs.DIR,
                  "epochs": config.num_epochs, "names": list(configs.names()),
                  "published": sorted(os.listdir(os.path.join(os.path.dirname(models.__file__), "published"))),
                  "gpu_targets": sorted(os.listdir(plan.GPU_TARGETS))}))""").splitlines()[-1])
  site = os.path.realpath(str(venv))
  assert os.path.realpath(where["package"]).startswith(site), where  # the venv's, not the clone's
  assert os.path.realpath(where["configs"]).startswith(site), where
  assert where["epochs"] == 40 and set(configs.names()) == set(where["names"])
  assert "SOURCES.md" in where["published"] and len(where["published"]) >= 5, where
  assert where["gpu_targets"] == ["h100.txtpb", "h200.txtpb"], where
  assert os.path.isfile(os.path.join(where["package"], "models", "published",
                                     "stable-diffusion-v1-5", "unet", "config.json"))
  assert os.path.isfile(os.path.join(where["package"], "configs", "sd3_pickscore.py"))

  workdir = str(tmp_path / "run")
  run("-m", "ddpo_jax.main", "--config=default:runlocal", "--config.num_epochs=1",
      f"--workdir={workdir}")
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["epoch"] for r in rows] == [0] and np.isfinite(rows[0]["reward_mean"])

  (elsewhere / "prompts.txt").write_text("a handwritten 3\n\na handwritten 7\n")
  out = run("-m", "ddpo_jax.sample", f"--workdir={workdir}", "--num=3",
            "--prompts_file=prompts.txt", "--out=s.npz", "--png_dir=png", "--grid=grid.png")
  assert "wrote 3 images" in out
  data = np.load(elsewhere / "s.npz")
  assert list(data["prompts"]) == ["a handwritten 3", "a handwritten 7", "a handwritten 3"]
  assert sorted(os.listdir(elsewhere / "png")) == [
      "0000_a-handwritten-3.png", "0001_a-handwritten-7.png", "0002_a-handwritten-3.png"]
  assert os.path.getsize(elsewhere / "grid.png") > 0
