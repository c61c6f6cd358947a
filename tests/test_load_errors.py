"""Load errors name the file and the tensor or key: a truncated safetensors file, a config.json
value of the wrong type (tiny random pipelines written by diffusers)."""
import json
import os
import shutil

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import tiny_models as tm  # noqa: E402
from ddpo_jax.models import pipeline as P  # noqa: E402
from ddpo_jax.models import pipeline_io  # noqa: E402
from ddpo_jax.models.weights import WeightLoadingError  # noqa: E402

UNET_WEIGHTS = os.path.join("unet", "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  return tm.save_tiny_pipeline(str(tmp_path_factory.mktemp("pipes") / "tiny-sd"))


def _copy(tiny_dir, tmp_path, name):
  return shutil.copytree(tiny_dir, tmp_path / name)


def _tensor_keys(weights):
  with open(weights, "rb") as f:
    header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
  return [k for k in header if k != "__metadata__"]


def test_a_truncated_safetensors_file_is_named_with_the_tensor(tiny_dir, tmp_path):
  """A download cut short: the header is intact, the data ends early. The error names the
  file and the first tensor whose data is missing (it used to be NumPy's "cannot reshape
  array of size ..." while converting, naming neither)."""
  root = _copy(tiny_dir, tmp_path, "truncated")
  weights = os.path.join(root, UNET_WEIGHTS)
  with open(weights, "r+b") as f:
    f.truncate(os.path.getsize(weights) // 2)
  with pytest.raises(WeightLoadingError) as info:
    P.load_pipeline(str(root))
  message = str(info.value)
  assert weights in message and "truncated: tensor '" in message, message
  named = message.split("tensor '")[1].split("'")[0]
  assert named in _tensor_keys(weights), message


def test_a_file_truncated_after_its_header_was_read_is_named_with_the_tensor(tiny_dir, tmp_path):
  """The file shrinks between reading its header and reading a tensor (`LazySafetensors`
  reads each tensor when it is converted)."""
  root = _copy(tiny_dir, tmp_path, "shrinks")
  weights = os.path.join(root, UNET_WEIGHTS)
  state = pipeline_io.LazySafetensors([weights])
  last = max(state, key=lambda k: state._where[k][3])  # the tensor stored last
  with open(weights, "r+b") as f:
    f.truncate(os.path.getsize(weights) - 4)
  with pytest.raises(WeightLoadingError, match=rf"{weights}: truncated: tensor '{last}'"):
    state[last]


@pytest.mark.parametrize("component,key,value,expected", [
    ("unet", "sample_size", "64", "int or a list of 2 (int, int) or null"),
    ("unet", "block_out_channels", ["32", "64"], "a list of int"),
    ("vae", "latent_channels", "4", "int"),
    ("text_encoder", "hidden_size", "32", "int"),
])
def test_a_string_for_an_int_in_config_json_names_the_file_and_key(tiny_dir, tmp_path, component,
                                                                   key, value, expected):
  """A hand-edited config.json with a string where an int belongs: the error names the file,
  the key, the value and the type expected (it used to load silently, e.g. "sample_size": "64",
  or fail far from the cause: "in_channels=4 does not match the VAE's latent_channels=4",
  "not all arguments converted during string formatting")."""
  root = _copy(tiny_dir, tmp_path, f"{component}-{key}")
  config_path = os.path.join(root, component, "config.json")
  with open(config_path) as f:
    config = json.load(f)
  assert isinstance(config[key], (int, list))
  config[key] = value
  with open(config_path, "w") as f:
    json.dump(config, f)
  with pytest.raises(P.PipelineLoadError) as info:
    P.load_pipeline(str(root))
  message = str(info.value)
  assert message.startswith(f"{config_path}: key {key!r} is {json.dumps(value)}"), message
  assert f"expected {expected};" in message, message
