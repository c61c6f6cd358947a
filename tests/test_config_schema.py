"""The one config schema (ddpo_jax/config_schema.py): every recipe fits it, docs/config.md is its
table, and a key it lacks or a value outside its choices fails before anything is built,
naming the key, for every run kind."""
import os
import subprocess
import sys

import pytest

from conftest import REPO
from helpers import load_config
from ddpo_jax import config_base, config_schema, configs

CONFIGS = configs.names()  # ddpo_jax/configs/NAME.py
# One config of each run kind and model family.
KINDS = {"ddpo/digits": "default", "ddpo/sd": "sd_compressibility",
         "ctrl/digits": "ctrl_digits_class", "ctrl/sd": "ctrl_sd_compressibility",
         "pretrain/digits": "digits_pretrain"}


def test_docs_config_md_is_the_schema():
  with open(os.path.join(REPO, "docs", "config.md")) as f:
    assert f.read() == config_schema.markdown(), (
        "docs/config.md is stale: regenerate it with the command at its top")


@pytest.mark.parametrize("variant", [None, "runlocal"])
@pytest.mark.parametrize("name", CONFIGS)
def test_every_recipe_fits_the_schema(name, variant):
  config = load_config(name, variant)
  config_schema.validate(config)
  assert set(config_schema.new_config(config.mode, config.model.kind).keys()) == set(config.keys())


@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # config_flags' loader
@pytest.mark.parametrize("name", CONFIGS)
def test_every_variant_loads_from_the_command_line_form(name):
  """Each variant a config knows (listed by its unknown-variant error), alone and with
  `runlocal`, through ml_collections' `--config=ddpo_jax/configs/NAME.py:VARIANTS` and valid."""
  from absl import flags
  from ml_collections import config_flags
  with pytest.raises(ValueError, match="config variant 'no_such_variant'; known: ") as error:
    load_config(name, "no_such_variant")
  known = str(error.value).split("; known: ")[1].split(", ")
  assert "runlocal" in known
  for variant in known:
    variant = "n100" if variant == "nN" else variant  # a label budget
    for arg in {variant, f"{variant},runlocal"}:
      flag_values = flags.FlagValues()
      config_flags.DEFINE_config_file("config", flag_values=flag_values)
      flag_values(["main", f"--config={REPO}/ddpo_jax/configs/{name}.py:{arg}"])
      config_schema.validate(flag_values.config)


def test_keys_of_each_kind():
  ddpo, ctrl = config_schema.new_config("ddpo", "sd"), config_schema.new_config("ctrl", "sd")
  assert "ctrl" not in ddpo and "control_learning_rate" not in ddpo.train
  assert ctrl.ctrl.solver == "backprop" and ctrl.train.control_learning_rate == 1e-2
  # CTRL's own defaults of shared keys; the rest as DDPO's
  assert ctrl.train.learning_rate == 1e-4 and ddpo.train.learning_rate == 3e-4
  assert dict(ctrl.reward.weights) == {"ctrl_log_likelihood": 1.0}
  assert ctrl.train.adam_beta2 == ddpo.train.adam_beta2 == 0.999
  assert "pretrained_path" in ddpo.model and "pretrain" not in ddpo.model
  digits = config_schema.new_config("pretrain", "digits")
  assert digits.mode == "pretrain" and digits.model.pretrain.steps == 1500
  with pytest.raises(ValueError, match="config.mode='finetune'"):
    config_schema.new_config("finetune", "sd")
  with pytest.raises(ValueError, match="config.model.kind='flux'"):
    config_schema.new_config("ddpo", "flux")


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_unknown_missing_and_bad_values_name_the_key(kind):
  config = load_config(KINDS[kind], "runlocal")
  config.train.lerning_rate = 1e-3  # a typo set by a recipe (the command line refuses it)
  with pytest.raises(ValueError, match=r"unknown config key train\.lerning_rate"):
    config_schema.validate(config)
  del config.train["lerning_rate"]
  del config.sample["eta"]
  with pytest.raises(ValueError, match=r"config lacks key sample\.eta"):
    config_schema.validate(config)
  config.sample.eta = 1.0
  config.train.kl_reduction = "max"
  with pytest.raises(ValueError, match=r"train\.kl_reduction='max'; choose one of \('mean', 'sum'\)"):
    config_schema.validate(config)
  config.train.kl_reduction = "mean"
  config_schema.validate(config)


def test_ctrl_sections_are_checked():
  config = load_config("ctrl_digits_class", "runlocal")
  config.ctrl.truncation = "sometimes"
  with pytest.raises(ValueError, match=r"ctrl\.truncation='sometimes'"):
    config_schema.validate(config)
  config.ctrl.truncation = "none"
  config.ctrl.conditions.digit.classifier.stpes = 3
  with pytest.raises(ValueError, match=r"unknown config key ctrl\.conditions\.digit\.classifier\.stpes"):
    config_schema.validate(config)
  del config.ctrl.conditions.digit.classifier["stpes"]
  config.ctrl.conditions.digit.data.split = "heldout"  # a source's own data key is free
  config_schema.validate(config)
  config.ctrl.controls = ("digit", "thickness")
  with pytest.raises(ValueError, match="ctrl.controls names 'thickness'"):
    config_schema.validate(config)


def test_digits_model_refuses_a_prompt_set():
  config = load_config("default", "runlocal")
  config.prompt_fn = "imagenet_animals"
  with pytest.raises(ValueError, match="digits model has its own prompts"):
    config_schema.validate(config)


def test_complete_fills_keys_an_older_run_lacks():
  saved = load_config("ctrl_digits_class", "runlocal").to_dict()
  del saved["prompt_fn"], saved["ctrl"]["control_min_timestep"]
  saved["ctrl"]["kl_weight"] = 0.5
  config = config_schema.complete(saved)
  config_schema.validate(config)
  assert config.prompt_fn == "" and config.ctrl.control_min_timestep == 0
  assert config.ctrl.kl_weight == 0.5 and config.ctrl.conditions.digit.num_classes == 10


def test_variants_apply_in_table_order_and_reject_typos():
  seen = []
  table = (config_base.Variant("nN", lambda c, n: seen.append(("n", n))),
           config_base.Variant("a", lambda c: seen.append("a")),
           config_base.Variant("b", lambda c: seen.append("b")))
  config_base.apply_variants(None, "b, n12,a", table, "test")
  assert seen == [("n", 12), "a", "b"]
  with pytest.raises(ValueError, match="unknown test config variant 'n1x'; known: nN, a, b"):
    config_base.apply_variants(None, "n1x", table, "test")


@pytest.mark.parametrize("kind", ["ddpo/digits", "ctrl/digits", "pretrain/digits"])
def test_command_line_unknown_key_fails_before_anything_runs(kind, tmp_path):
  """`--config.KEY` that the schema lacks: an error naming the key, no workdir written."""
  workdir = tmp_path / "run"
  result = subprocess.run([sys.executable, "-m", "ddpo_jax.main",
                           f"--config={REPO}/ddpo_jax/configs/{KINDS[kind]}.py:runlocal",
                           f"--workdir={workdir}", "--config.train.lerning_rate=0.1"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0 and "lerning_rate" in result.stderr, result.stderr[-2000:]
  assert not workdir.exists()


def test_every_numeric_key_has_a_valid_range_that_holds_its_default():
  """Each number (or tuple of numbers) in the schema has its range in RANGES, each RANGES entry
  names a key, and every default lies inside its range."""
  rows = list(config_schema.COMMON) + list(config_schema.CTRL) + list(config_schema.CONDITION)
  for model in config_schema.MODEL_KINDS:
    rows += list(config_schema.MODELS[model])
  for mode, default in config_schema.CTRL_DEFAULTS.items():
    rows.append(config_schema.Key(mode, default, "", (), config_schema.RANGES.get(mode)))
  numeric = {k.path for k in rows if config_schema._is_numeric(k.default)}
  assert numeric - set(config_schema.RANGES) == set()
  assert set(config_schema.RANGES) - {k.path for k in rows} == set()
  for k in rows:
    if k.path in numeric:
      values = k.default if isinstance(k.default, tuple) else (k.default,)
      assert all(config_schema.RANGES[k.path].contains(v) for v in values), k


def test_ranges_reject_nan_inf_bools_and_non_integers():
  r = config_schema.Range(0.0, 1.0, lo_open=True)
  assert [r.contains(v) for v in (0.0, 1e-9, 1.0, 1.0000001, float("nan"), float("inf"))] == [
      False, True, True, False, False, False]
  whole = config_schema.RANGES["mesh.data"]
  assert [whole.contains(v) for v in (-1, 0, 1, 7, 2.0, True)] == [
      True, False, True, True, False, False]
  unbounded = config_schema.RANGES["train.learning_rate"]
  assert not unbounded.contains(float("inf")) and unbounded.contains(1e6)
  assert str(config_schema.RANGES["train.adam_beta1"]) == "[0, 1)"
  assert str(whole) == "an integer in [1, inf) or -1"
