"""Reading and writing diffusers-format pipeline directories, for every model family.

What the family modules (`pipeline` for SD / SDXL, `flow_pipeline` for SD3 / FLUX.1) share:

* `resolve(path, hub_patterns)`: a local directory, or a Hub id downloaded with only the files
  the family reads.
* `component_dirs`: model_index.json's components checked against the classes a family accepts;
  a missing required component, or one of another class, is an error naming it.
* `weight_files`: a component's safetensors, single or sharded with their index, plain or a
  precision variant (`.fp16`, `.bf16`: `model.fp16.safetensors`, or a sharded variant whose
  index is `model.safetensors.index.fp16.json` as diffusers names it).
* `parse_config`: a component's config.json as its config dataclass, every value checked
  against the field's type (a string where an int belongs names the file and the key).
* `LazySafetensors`: those files as a read-only mapping that reads one tensor when it is
  asked for, so a converter that places each parameter as it goes (`weights.torch_to_flax` with
  a `placement`) holds one tensor on the host at a time, not the component twice. Every
  tensor's byte range is checked against the file size when the headers are read: a truncated
  file is named with its first incomplete tensor.
* `save_directory`: a pipeline assembled in a temporary directory beside the target and
  renamed into place, with the SHA-256 and size of every file in `WRITTEN_BY`;
  `check_output_dir` refuses to replace anything this library did not write: an earlier
  pipeline is replaced (with `overwrite`) only while it holds nothing but those files,
  unchanged; `verify_written_files` checks the digests on load.

Every error is raised before anything is compiled and names the file, the component or the key.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import tempfile
import types
import typing
from collections.abc import Mapping
from typing import Callable, Iterator

import numpy as np

from ddpo_jax.models.weights import WeightLoadingError

# The file that marks a directory as a pipeline `save_directory` wrote (diffusers ignores it):
# {"written_by": writer, "sha256": {relative path: hex digest}, "bytes": {relative path: size}}
# of every file written beside it. Only such a directory, holding only those files unchanged,
# is ever replaced by a later save; `verify_written_files` checks the digests on load.
WRITTEN_BY = "ddpo_jax_pipeline.json"
WEIGHT_VARIANTS = ("", "fp16", "bf16")


class PipelineLoadError(ValueError):
  """The path is not a (supported) diffusers pipeline."""


def resolve(path, hub_patterns: list[str]) -> str:
  """A local directory as it is, or a Hub id ("owner/name") downloaded with `hub_patterns`.

  Raises:
    PipelineLoadError: a file, a missing local path, or a Hub id that cannot be downloaded.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    return path
  if os.path.exists(path):
    raise PipelineLoadError(f"{path}: not a directory (expected a diffusers pipeline directory "
                            "with model_index.json)")
  if path.startswith((".", "/", "~")) or path.count("/") != 1:
    raise PipelineLoadError(f"{path}: no such directory (expected a diffusers pipeline directory "
                            "with model_index.json, or a Hugging Face Hub id 'owner/name')")
  try:
    from huggingface_hub import snapshot_download
    return snapshot_download(path, allow_patterns=hub_patterns)
  except Exception as e:  # offline, unknown repo, gated repo, no huggingface_hub...
    raise PipelineLoadError(
        f"{path!r} is not a local directory and could not be downloaded from the Hugging Face "
        f"Hub ({type(e).__name__}: {e}). Pass a local diffusers pipeline directory.") from e


def hub_patterns(components: dict[str, str]) -> list[str]:
  """allow_patterns for `snapshot_download` of the given {component: weight basename} (configs,
  single, sharded and variant safetensors), the tokenizers and the scheduler."""
  out = ["model_index.json", "scheduler/*.json", "tokenizer*/*"]
  for name, base in components.items():
    out += [f"{name}/config.json", f"{name}/{base}*.safetensors",
            f"{name}/{base}.safetensors.index*.json"]
  return out


def read_json(path: str, what: str) -> dict:
  """The JSON object at `path` (`what` names it in errors)."""
  if not os.path.isfile(path):
    raise PipelineLoadError(f"{path}: missing ({what})")
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise PipelineLoadError(f"{path}: cannot read JSON ({e})") from e


def read_model_index(root: str, supported: Mapping[str, object]) -> tuple[str, dict]:
  """(path of model_index.json, its dict), after checking its `_class_name` is in `supported`."""
  index_path = os.path.join(root, "model_index.json")
  if not os.path.isfile(index_path):
    raise PipelineLoadError(f"{root}: not a diffusers pipeline (no model_index.json)")
  model_index = read_json(index_path, "pipeline index")
  pipeline_class = model_index.get("_class_name", "StableDiffusionPipeline")
  if pipeline_class not in supported:
    raise PipelineLoadError(f"{index_path}: _class_name={pipeline_class!r} is not a supported "
                            f"pipeline class; supported: {', '.join(supported)}")
  return index_path, model_index


def component_dirs(root: str, model_index: dict, components: Mapping[str, tuple[str, ...]],
                   required: tuple[str, ...]) -> dict[str, str]:
  """{component: directory} of the components present, checked against model_index.json.

  Args:
    components: {component name: the classes accepted for it} of the family (others in
      model_index.json, e.g. a safety checker, are ignored).
    required: the components that must be present (an entry and a directory).

  Raises:
    PipelineLoadError: a required component missing, or a component of another class.
  """
  index_path = os.path.join(root, "model_index.json")
  dirs = {}
  for name, allowed in components.items():
    entry = model_index.get(name)
    directory = os.path.join(root, name)
    present = bool(entry) and entry[0] is not None and os.path.isdir(directory)
    if name in required and not present:
      raise PipelineLoadError(
          f"{root}: component '{name}' is missing ("
          + ("no entry in model_index.json" if not entry or entry[0] is None
             else f"no directory {directory}") + ")")
    if not present:
      continue
    if allowed and entry[1] not in allowed:
      raise PipelineLoadError(f"{index_path}: component '{name}' has class {entry[1]!r}; "
                              f"supported: {', '.join(allowed)}")
    dirs[name] = directory
  return dirs


def parse_config(directory: str, name: str, from_dict: Callable):
  """`from_dict` of `directory`/config.json, every value checked against the type of its
  config dataclass field (`from_dict.__self__`, e.g. `UNetConfig`).

  Raises:
    PipelineLoadError: naming the file and the key of a value of the wrong type (a string
      where an int is expected, e.g. "sample_size": "64"), or the file and `from_dict`'s
      ValueError / TypeError.
  """
  file = os.path.join(directory, "config.json")
  raw = read_json(file, f"{name} config")
  if not isinstance(raw, dict):
    raise PipelineLoadError(f"{file}: holds a JSON {type(raw).__name__}, expected an object "
                            f"of {name} config keys; restore the component's config.json")
  cls = getattr(from_dict, "__self__", None)
  try:
    config = from_dict(raw)
  except (ValueError, TypeError) as e:
    # A value of the wrong type often fails inside `from_dict` ("%d" % "4", len(64)): name its
    # key rather than the symptom.
    wrong = _wrong_type(raw, cls, file) if dataclasses.is_dataclass(cls) else None
    raise PipelineLoadError(wrong or f"{file}: {e}") from e
  if dataclasses.is_dataclass(config):
    wrong = _wrong_type({f.name: getattr(config, f.name) for f in dataclasses.fields(config)},
                        type(config), file)
    if wrong:
      raise PipelineLoadError(wrong)
  return config


def _wrong_type(values: Mapping, cls, file: str) -> str | None:
  """The error message naming `file`, the first key of `values` that is a field of the
  dataclass `cls` whose value is of another JSON type than the field's annotation
  (`_has_type`), and the type expected; None if every value fits."""
  hints = _field_types(cls)
  for key, value in values.items():
    hint = hints.get(key)
    if hint is not None and not _has_type(value, hint):
      shown = _to_json(value)
      return (f"{file}: key {key!r} is {json.dumps(shown, default=repr)} "
              f"({_json_type(shown)}), expected {_type_name(hint)}; correct it in the file")
  return None


@functools.cache
def _field_types(cls) -> dict:
  """{field name: resolved annotation} of the dataclass `cls` ({} if they cannot be resolved)."""
  try:
    hints = typing.get_type_hints(cls)
  except Exception:  # an annotation this module cannot evaluate: nothing is checked
    return {}
  return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.name in hints}


def _has_type(value, hint) -> bool:
  """Whether the JSON-derived `value` (a list may already be a tuple) has the JSON type of the
  annotation `hint`: int (not a bool), float (an int too), bool (0 / 1 too), str, unions,
  tuple[...] / list[...]; any other annotation accepts everything.

  Lenient where diffusers configs are looser than the annotations: null is accepted anywhere
  (diffusers writes it for "the default", e.g. SDXL's "upcast_attention": null), and an element
  of a list may be a list of that element type (transformer_layers_per_block, one list per
  block)."""
  origin, args = typing.get_origin(hint), typing.get_args(hint)
  if value is None or hint is typing.Any:
    return True
  if origin in (typing.Union, types.UnionType):
    return any(_has_type(value, arm) for arm in args)
  if hint is type(None):
    return False
  if hint is bool:
    return isinstance(value, (bool, np.bool_)) or (
        isinstance(value, (int, np.integer)) and value in (0, 1))
  if hint is int:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
  if hint is float:
    return (isinstance(value, (int, float, np.integer, np.floating))
            and not isinstance(value, bool))
  if hint is str:
    return isinstance(value, str)
  if origin in (tuple, list) or hint in (tuple, list):
    if not isinstance(value, (tuple, list)):
      return False
    if not args:
      return True
    if origin is list or (len(args) == 2 and args[1] is Ellipsis):
      return all(_has_element_type(v, args[0]) for v in value)
    return len(value) == len(args) and all(_has_element_type(v, a) for v, a in zip(value, args))
  return True


def _has_element_type(value, hint) -> bool:
  """`_has_type` of a list element, which may itself be a list of that type."""
  if isinstance(value, (tuple, list)) and not _has_type(value, hint):
    return all(_has_element_type(v, hint) for v in value)
  return _has_type(value, hint)


def _to_json(value):
  """A config value as JSON shows it (tuples as lists)."""
  return [_to_json(v) for v in value] if isinstance(value, (tuple, list)) else value


def _json_type(value) -> str:
  """The JSON type of a value: "string", "number", "boolean", "list", "null", "object"."""
  if value is None:
    return "null"
  if isinstance(value, bool):
    return "boolean"
  if isinstance(value, (int, float)):
    return "number"
  if isinstance(value, str):
    return "string"
  return "list" if isinstance(value, list) else "object" if isinstance(value, dict) else (
      type(value).__name__)


def _type_name(hint) -> str:
  """`hint` as a reader of config.json thinks of it: "int", "int or a list of int", ..."""
  origin, args = typing.get_origin(hint), typing.get_args(hint)
  if origin in (typing.Union, types.UnionType):
    return " or ".join(_type_name(a) for a in args)
  if hint is type(None):
    return "null"
  if origin in (tuple, list):
    if len(args) == 2 and args[1] is Ellipsis or origin is list:
      return f"a list of {_type_name(args[0])}"
    return f"a list of {len(args)} ({', '.join(_type_name(a) for a in args)})"
  return getattr(hint, "__name__", str(hint))


def _variant(filename: str, variant: str) -> str:
  """diffusers' `_add_variant`: the variant goes before the last extension."""
  if not variant:
    return filename
  stem, ext = filename.rsplit(".", 1)
  return f"{stem}.{variant}.{ext}"


def weight_files(directory: str, component: str, basename: str) -> list[str]:
  """The safetensors files of a component, in this order of preference: plain, fp16, bf16;
  each single (`BASE[.VARIANT].safetensors`) or sharded (the index
  `BASE.safetensors.index[.VARIANT].json`, or `BASE[.VARIANT].safetensors.index.json`).

  Raises:
    PipelineLoadError: no safetensors (naming pickle files found instead), or a shard listed
      in an index that is missing.
  """
  for variant in WEIGHT_VARIANTS:
    single = os.path.join(directory, _variant(f"{basename}.safetensors", variant))
    if os.path.isfile(single):
      return [single]
    for index in (os.path.join(directory, _variant(f"{basename}.safetensors.index.json", variant)),
                  single + ".index.json"):
      if os.path.isfile(index):
        weight_map = read_json(index, "sharded checkpoint index").get("weight_map", {})
        if not weight_map:
          raise PipelineLoadError(f"{index}: no weight_map")
        files = [os.path.join(directory, s) for s in sorted(set(weight_map.values()))]
        for file in files:
          if not os.path.isfile(file):
            raise PipelineLoadError(f"{file}: shard listed in {index} is missing")
        return files
  others = sorted(n for n in os.listdir(directory) if n.endswith((".bin", ".ckpt", ".pt")))
  hint = (f" (found {others}: only safetensors are supported; re-save with "
          "save_pretrained(safe_serialization=True))") if others else ""
  raise PipelineLoadError(f"component '{component}': no {basename}.safetensors in "
                          f"{directory}{hint}")


_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                       "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "I64": "int64",
                       "I32": "int32", "I16": "int16", "I8": "int8", "U64": "uint64",
                       "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool"}


def _numpy_dtype(name: str) -> np.dtype:
  import ml_dtypes  # bfloat16 / float8 as NumPy dtypes (a JAX dependency)
  return np.dtype(getattr(ml_dtypes, name) if hasattr(ml_dtypes, name) else name)


class LazySafetensors(Mapping):
  """Safetensors files as a read-only {key: NumPy array} mapping; a tensor is read from disk
  when it is looked up (and not kept), so iterating the keys reads only the headers.

  The files are read as the format specifies them (an 8-byte little-endian header length, a
  JSON header of dtype / shape / byte offsets, the raw data), so bfloat16 and float8 tensors
  come back as ml_dtypes arrays, which `safetensors.numpy` cannot give. Floating-point tensors
  are cast to `dtype` (if given) as they are read.
  """

  def __init__(self, files: list[str], dtype=None):
    self.files = list(files)
    self.source = files[0] if len(files) == 1 else os.path.join(
        os.path.dirname(files[0]), "*.safetensors")
    self._dtype = None if dtype is None else np.dtype(dtype)
    self._where: dict[str, tuple[str, np.dtype, tuple[int, ...], int, int]] = {}
    for file in self.files:
      try:
        file_bytes = os.path.getsize(file)
        with open(file, "rb") as f:
          size = int.from_bytes(f.read(8), "little")
          if not 0 < size < file_bytes:
            raise ValueError(f"header length {size} does not fit the file")
          header = json.loads(f.read(size))
        data_bytes = file_bytes - 8 - size
        for key, info in header.items():
          if key == "__metadata__":
            continue
          if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {key!r} has unsupported dtype {info['dtype']}")
          dtype = _numpy_dtype(_SAFETENSORS_DTYPES[info["dtype"]])
          shape = tuple(int(n) for n in info["shape"])
          begin, end = (int(n) for n in info["data_offsets"])
          needed = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
          if not 0 <= begin <= end or end - begin != needed:
            raise ValueError(f"tensor {key!r} has data offsets [{begin}, {end}) for shape "
                             f"{shape} of {dtype} ({needed} bytes)")
          if end > data_bytes:
            raise ValueError(
                f"truncated: tensor {key!r} (shape {shape}, {dtype}) needs data bytes "
                f"[{begin}, {end}) but the file holds only {data_bytes} bytes of data "
                f"({file_bytes} in all); download or save the file again")
          self._where[key] = (file, dtype, shape, 8 + size + begin, end - begin)
      except (OSError, ValueError, KeyError, TypeError) as e:
        raise WeightLoadingError(f"{file}: cannot read safetensors "
                                 f"({type(e).__name__}: {e})") from e

  def __getitem__(self, key: str) -> np.ndarray:
    """The tensor `key` (its shape, read as little-endian `dtype`, cast to the mapping's dtype
    if floating).

    Raises:
      WeightLoadingError: naming the file and the tensor, if its data cannot be read in full
        (the file was truncated or replaced since its header was read).
    """
    file, dtype, shape, offset, nbytes = self._where[key]
    count = int(np.prod(shape, dtype=np.int64))
    try:
      with open(file, "rb") as f:
        f.seek(offset)
        value = np.fromfile(f, dtype=dtype.newbyteorder("<") if dtype.itemsize > 1 else dtype,
                            count=count)
    except (OSError, ValueError) as e:
      raise WeightLoadingError(f"{file}: cannot read tensor {key!r} "
                               f"({type(e).__name__}: {e})") from e
    if value.size != count:
      raise WeightLoadingError(
          f"{file}: truncated: tensor {key!r} (shape {shape}, {dtype}) has {value.size} of its "
          f"{count} values; download or save the file again")
    value = value.reshape(shape)
    floating = np.issubdtype(value.dtype, np.floating) or value.dtype.kind == "V"  # ml_dtypes
    if self._dtype is not None and floating and value.dtype != self._dtype:
      value = value.astype(self._dtype)
    return value

  def __iter__(self) -> Iterator[str]:
    return iter(self._where)

  def __len__(self) -> int:
    return len(self._where)


def load_components(dirs: Mapping[str, str], converters: Mapping[str, tuple[Callable, object]],
                    basenames: Mapping[str, str], dtype, placement=None) -> dict:
  """{component: Flax params} of the weight-bearing components, one at a time.

  Args:
    dirs: {component: directory} (`component_dirs`).
    converters: {component: (convert(state_dict, config, source, dtype, placement=...),
      config)}, e.g. `unet.unet_from_torch`.
    basenames: {component: weight file basename} ("diffusion_pytorch_model", "model").
    dtype: parameter dtype (tensors are cast as they are read).
    placement: (component, Flax path, shape) -> a Sharding or None (see
      `weights.torch_to_flax`); None: the default device.
  """
  params = {}
  for name, (convert, config) in converters.items():
    state_dict = LazySafetensors(weight_files(dirs[name], name, basenames[name]), dtype)
    where = None if placement is None else functools.partial(placement, name)
    params[name] = convert(state_dict, config, state_dict.source, dtype, placement=where)
  return params


def load_tokenizer(directory: str, cls_name: str):
  """A transformers tokenizer (`cls_name`: "CLIPTokenizer" or "T5TokenizerFast") from
  `directory`; any failure as a PipelineLoadError naming the directory."""
  try:
    import transformers
    return getattr(transformers, cls_name).from_pretrained(directory)
  except Exception as e:
    raise PipelineLoadError(f"{directory}: cannot load the {cls_name} "
                            f"({type(e).__name__}: {e})") from e


# ------------------------------------------------------------------------------------------------
# Writing.
# ------------------------------------------------------------------------------------------------
def save_safetensors(state_dict: dict[str, np.ndarray], path: str) -> None:
  from safetensors.numpy import save_file
  save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, path,
            metadata={"format": "pt"})


def write_json(obj, path: str) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 24), b""):
      h.update(block)
  return h.hexdigest()


def _manifest(root: str, writer: str) -> dict:
  """The `WRITTEN_BY` contents of the pipeline written into `root`: `writer`, and of every file
  under `root` (paths relative to it) its SHA-256 ("sha256", hex) and size ("bytes")."""
  digests, sizes = {}, {}
  for directory, _, files in os.walk(root):
    for name in files:
      rel = os.path.relpath(os.path.join(directory, name), root)
      if rel != WRITTEN_BY:
        digests[rel] = _sha256(os.path.join(root, rel))
        sizes[rel] = os.path.getsize(os.path.join(root, rel))
  return {"written_by": writer, "sha256": dict(sorted(digests.items())),
          "bytes": dict(sorted(sizes.items()))}


def verify_written_files(root: str) -> None:
  """Checks a pipeline `save_directory` wrote against the SHA-256s in its `WRITTEN_BY` marker
  (a pipeline without the marker, e.g. one diffusers wrote, is not checked).

  Raises:
    WeightLoadingError: a listed file is missing or its contents changed (names the files).
  """
  marker = os.path.join(root, WRITTEN_BY)
  if not os.path.isfile(marker):
    return
  listed = read_json(marker, "the export's file list").get("sha256")
  if listed is None:  # written before checksums were recorded
    return
  bad = []
  for rel, digest in listed.items():
    file = os.path.join(root, rel)
    if not os.path.isfile(file):
      bad.append(f"{rel} (missing)")
    elif _sha256(file) != digest:
      bad.append(f"{rel} (SHA-256 differs from the one recorded at export)")
  if bad:
    raise WeightLoadingError(f"{root}: damaged pipeline, {len(bad)} of {len(listed)} files do "
                             f"not match {WRITTEN_BY}: {'; '.join(bad)}")


def check_output_dir(path: str, overwrite: bool) -> None:
  """Refuses to write a pipeline where that would destroy something else: `path` may be
  missing or an empty directory; a pipeline this library wrote (it holds `WRITTEN_BY`) is
  replaced only with `overwrite`, and only while it holds nothing but the files listed in
  `WRITTEN_BY`, unchanged (`foreign_files`); anything else (a file, a directory with other
  contents) is never replaced.

  Raises:
    FileExistsError: what `path` holds, and what would allow the write.
  """
  _check_output_dir(path, overwrite, path)


def _check_output_dir(path: str, overwrite: bool, scanned: str) -> None:
  """`check_output_dir` of the directory `scanned`, named `path` in errors (`save_directory`
  checks the old directory once more after moving it aside)."""
  if not os.path.lexists(scanned):
    return
  if not os.path.isdir(scanned) or os.path.islink(scanned):
    raise FileExistsError(f"{path} exists and is not a directory: not replaced by a pipeline")
  entries = os.listdir(scanned)
  if not entries:
    return
  if WRITTEN_BY not in entries:
    raise FileExistsError(
        f"{path} is a non-empty directory that this library did not write as a pipeline "
        f"({len(entries)} entries, e.g. {sorted(entries)[:3]}): not replaced; choose a new or "
        "empty directory")
  if not overwrite:
    raise FileExistsError(f"{path} already holds an exported pipeline: pass overwrite=True "
                          "(--overwrite) to replace it")
  try:
    foreign = foreign_files(scanned)
  except FileExistsError as e:
    raise FileExistsError(str(e).replace(scanned, path)) from e
  if foreign:
    raise FileExistsError(
        f"{path} holds {len(foreign)} {'entry' if len(foreign) == 1 else 'entries'} the "
        f"earlier export did not write or that changed since ({'; '.join(foreign[:3])}"
        f"{'; ...' if len(foreign) > 3 else ''}): not replaced, even with overwrite; move "
        "them out (or delete the directory yourself) and export again")


def foreign_files(root: str) -> list[str]:
  """What a replacement of the pipeline `root` (it holds `WRITTEN_BY`) would destroy that
  `save_directory` did not write: every entry under `root` that is not a file listed in
  `WRITTEN_BY` with its recorded SHA-256 (a file added or edited since, a link, a directory
  holding no listed file), as "RELATIVE_PATH (why)", sorted. Listed files that are missing
  are not foreign.

  Raises:
    FileExistsError: `WRITTEN_BY` lists no files (written before the list existed) or cannot
      be read: then nothing in `root` can be told apart from a user's file.
  """
  try:
    with open(os.path.join(root, WRITTEN_BY)) as f:
      manifest = json.load(f)
    listed = manifest["sha256"]
    if not isinstance(listed, dict):
      raise TypeError(f"'sha256' is a {type(listed).__name__}, not a file list")
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise FileExistsError(
        f"{root}: its {WRITTEN_BY} lists no files ({type(e).__name__}: {e}; exports made "
        "before exports listed their files have none), so its files cannot be told apart from "
        "yours: not replaced; delete the directory yourself or choose another") from e
  sizes = manifest.get("bytes") or {}
  parents = set()  # the directories that hold listed files
  for rel in listed:
    parent = os.path.dirname(rel)
    while parent:
      parents.add(parent)
      parent = os.path.dirname(parent)
  foreign = []
  for directory, subdirs, files in os.walk(root):
    kept = []
    for name in subdirs:
      rel = os.path.relpath(os.path.join(directory, name), root)
      if os.path.islink(os.path.join(directory, name)):
        foreign.append(f"{rel} (a link the export did not write)")
      elif rel not in parents:
        foreign.append(f"{rel}{os.sep} (a directory the export did not write)")
      else:
        kept.append(name)
    subdirs[:] = kept  # os.walk descends only into these
    for name in files:
      file = os.path.join(directory, name)
      rel = os.path.relpath(file, root)
      if rel == WRITTEN_BY:
        continue
      if os.path.islink(file) or not os.path.isfile(file):
        foreign.append(f"{rel} (not a file the export wrote)")
      elif rel not in listed:
        foreign.append(f"{rel} (not written by the export)")
      elif os.path.getsize(file) != sizes.get(rel, os.path.getsize(file)) or (
          file_sha256(file) != listed[rel]):
        foreign.append(f"{rel} (changed since the export)")
  return sorted(foreign)


_DIGESTS: dict[tuple, str] = {}  # (device, inode, size, mtime, ctime) -> SHA-256


def file_sha256(file: str) -> str:
  """`_sha256(file)`, from `_DIGESTS` if this process hashed the same file (device, inode)
  unchanged (size, mtime, and ctime, which every write and metadata change moves) before:
  the directory a save replaces is checked up to four times (`export`, `save_directory`), and
  a run's base weights are fingerprinted at every start (`families.base_weights`)."""
  st = os.stat(file)
  key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
  if key not in _DIGESTS:
    if len(_DIGESTS) > 10_000:
      _DIGESTS.clear()
    _DIGESTS[key] = _sha256(file)
  return _DIGESTS[key]


def save_directory(path, overwrite: bool, fill: Callable[[str], None], writer: str) -> str:
  """Writes a pipeline directory atomically: `fill(tmp)` writes the files into a temporary
  directory beside `path`, the `WRITTEN_BY` marker (digests of every file, `writer`) is added,
  and the directory is renamed into place; `path` never holds a half-written pipeline.

  Returns:
    `path` (absolute).

  Raises:
    FileExistsError: `path` holds something that is not replaced (`check_output_dir`).
  """
  path = os.path.abspath(os.fspath(path))
  check_output_dir(path, overwrite)
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
  try:
    fill(tmp)
    write_json(_manifest(tmp, writer), os.path.join(tmp, WRITTEN_BY))
    check_output_dir(path, overwrite)  # again: something may have appeared meanwhile
    if os.path.exists(path):
      old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
      aside = os.path.join(old, "x")
      os.rename(path, aside)
      try:  # once more, out of reach: a file written between the check and the move
        _check_output_dir(path, overwrite, aside)
      except BaseException:
        os.rename(aside, path)
        os.rmdir(old)
        raise
      os.rename(tmp, path)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return path


def write_component(tmp: str, name: str, config: dict, state_dict: dict, basename: str) -> None:
  """`tmp`/`name`/config.json and `basename`.safetensors (float32 PyTorch layout)."""
  os.makedirs(os.path.join(tmp, name))
  write_json(config, os.path.join(tmp, name, "config.json"))
  save_safetensors(state_dict, os.path.join(tmp, name, basename + ".safetensors"))
