"""CTRL's augmented model, and the two baselines, as `Policy`s.

A run controls M labels y = (y_1, ..., y_M); control i has K_i classes and a table E_i of
shape (K_i + 1, time_embed_dim), zero-initialised, whose last row (label K_i) is the "null"
label: it is multiplied by zero wherever the table is read, so its value and its gradient are
zero. The denoiser becomes

    eps_θ(x_t, t, c, y) = UNet(x_t, t, c; time embedding + Σ_i E_i[y_i]),

so at initialisation it equals the pre-trained model exactly. With `ctrl.control_min_timestep`
= t_min > 0 the tables are read only at t ≥ t_min (below it the control embedding is zero):
an option for chains whose last, low-noise steps are so narrow that any change of eps there
dominates the KL (see the digits results in docs/results.md). `config.ctrl.method` picks:
- "ctrl": trainable params {"control": {name: E_i}} (+ "base": the base model's trainable tree,
  i.e. its LoRA factors or the full UNet, when `ctrl.train_base`);
- "cfg" (baseline): the same augmented model trained by denoising on the labelled data with
  label dropout; sampled with guidance on the labels,
  eps = eps(∅) + w Σ_i (eps(y_i, others ∅) − eps(∅));
- "classifier_guidance" (baseline): the pre-trained model plus noise-conditional classifiers
  (trainable params {"classifiers": {name: params}}),
  eps = eps_pre − w sqrt(1 − ā_t) ∇_x Σ_i log p_i(y_i | x_t, t).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ddpo_jax.config_schema import CTRL_METHODS as METHODS
from ddpo_jax.ctrl import classifiers, data, judges, sampled_data
from ddpo_jax.models.weights import host_init
from ddpo_jax.numerics import diffusion
from ddpo_jax.ctrl.controls import (Control, ControlledModel, check_labels, controls_from_config,
                                    format_context, parse_context)
from ddpo_jax.pipelines.policy import Policy
from ddpo_jax.rewards import Reward

# ----------------------------------------------------------------------------- the tables


def init_control_tables(controls: Sequence[Control], dim: int) -> dict:
  """{name: zeros (K_i + 1, dim) float32}: the augmented model starts as the pre-trained one."""
  return {c.name: jnp.zeros((c.num_classes + 1, dim), jnp.float32) for c in controls}


def control_embedding(tables: dict, labels: jax.Array, controls: Sequence[Control]) -> jax.Array:
  """Σ_i E_i[y_i] with each table's null row masked to zero: (N, dim) float32.

  Args:
    tables: {name: (K_i + 1, dim)}.
    labels: (N, M) int, column i in [0, K_i] (K_i = null).
  """
  out = 0.0
  for i, c in enumerate(controls):
    mask = (jnp.arange(c.num_classes + 1) < c.num_classes).astype(tables[c.name].dtype)
    out = out + (tables[c.name] * mask[:, None])[labels[:, i]]
  return out


# ----------------------------------------------------------------------------- the policy


def classifier_dir(workdir: str, name: str) -> str:
  return os.path.join(os.path.abspath(workdir), "classifiers", name)


def classifier_kwargs(classifier_cfg) -> dict:
  """`classifiers.train_offline_classifier` keyword arguments from a condition's `classifier`
  config section (`config_schema.condition`)."""
  c = classifier_cfg
  return dict(seed=int(c.seed), steps=int(c.steps), val_fraction=float(c.val_fraction),
              augment_noise=float(c.augment_noise), augment_shift=int(c.augment_shift),
              input_size=int(c.input_size) or None)


def load_controls(config, workdir: str, base: Policy, log=print):
  """Loads each control's labelled data (sampling `base`, the pre-trained model, for sources
  made that way) and trains (or loads) its calibrated classifier.

  Returns (controls, {name: LabelledDataset}, {name: Classifier}). Classifiers are saved with
  Orbax in WORKDIR/classifiers/NAME (with their accuracy / calibration report) and reused.
  """
  controls = controls_from_config(config)
  datasets, clfs = {}, {}
  for c in controls:
    cond = config.ctrl.conditions[c.name]
    if sampled_data.is_sampled_source(cond.data.source):  # made by sampling the base model
      ds, _ = sampled_data.load_or_sample(cond.data, config, workdir, c.num_classes, base,
                                          log=log)
    else:
      ds = data.load_dataset(cond.data)
    if ds.num_classes != c.num_classes:
      raise ValueError(f"control {c.name!r}: config says num_classes={c.num_classes} but its "
                       f"dataset {ds.name!r} has {ds.num_classes} classes")
    clf, report = classifiers.load_or_train_classifier(classifier_dir(workdir, c.name), ds,
                                                       **classifier_kwargs(cond.classifier))
    if clf.module.num_classes != c.num_classes:
      raise ValueError(f"control {c.name!r}: the classifier in {classifier_dir(workdir, c.name)} "
                       f"has {clf.module.num_classes} classes but the embedding table has "
                       f"{c.num_classes} (+1 null) rows")
    log(f"control {c.name!r}: {len(ds)} labelled examples, classifier val accuracy "
        f"{report['accuracy_val']:.3f}, ECE {report['ece_val_before']:.3f} -> "
        f"{report['ece_val_after']:.3f} (T={report['temperature']:.2f})")
    datasets[c.name], clfs[c.name] = ds, clf
  return controls, datasets, clfs


def log_likelihood_reward(controls: Sequence[Control], clfs: dict) -> Reward:
  """Device reward Σ_i w_i log p̂_i(y_i | x_0) on decoded images; info: each classifier's
  accuracy on the requested label."""
  def fn(images, prompt_ids, metadata):
    labels = metadata["control_label"]
    total, info = 0.0, {}
    for i, c in enumerate(controls):
      lp = clfs[c.name].log_probs(images)
      y = labels[:, i]
      total = total + c.weight * jnp.take_along_axis(lp, y[:, None], axis=-1)[:, 0]
      info[f"{c.name}_classifier_accuracy"] = (jnp.argmax(lp, -1) == y).astype(jnp.float32)
    return total, info
  return Reward("ctrl_log_likelihood", fn, on_device=True)


def control_learning_rates(config) -> dict[str, float]:
  """`Policy.learning_rates` of a CTRL policy: the control tables ("control") at
  `train.control_learning_rate` when it is > 0 (else everything at `train.learning_rate`)."""
  rate = float(config.train.control_learning_rate)
  return {"control": rate} if rate else {}


def make_policy(config, workdir: str, base: Policy, log=print) -> Policy:
  """The CTRL (or baseline) policy of `config` on the pre-trained model `base` (the policy of
  its model family; see the module docstring)."""
  method = config.ctrl.method
  if method not in METHODS:
    raise ValueError(f"config.ctrl.method={method!r}; choose one of {METHODS}")
  if not base.denoiser.time_embed_dim:
    raise ValueError(f"model kind {config.model.kind!r} does not expose its time embedding")
  controls, datasets, clfs = load_controls(config, workdir, base, log=log)
  fixed_prompts = tuple(config.ctrl.prompts)
  base_frozen = {k: v for k, v in base.params.items() if k != "unet"}

  def prompt_fn(rng: np.random.Generator, n: int) -> list[str]:
    """n contexts: prompts from `ctrl.prompts` (or the task's), labels uniform per control."""
    if fixed_prompts:
      prompts = [fixed_prompts[i] for i in rng.integers(0, len(fixed_prompts), n)]
    else:
      prompts = base.prompt_fn(rng, n)
    labels = np.stack([rng.integers(0, c.num_classes, n) for c in controls], axis=1)
    return [format_context(p, l) for p, l in zip(prompts, labels)]

  def split(contexts):
    pairs = [parse_context(s) for s in contexts]
    labels = np.asarray([l for _, l in pairs], np.int32).reshape(len(pairs), len(controls))
    check_labels(labels, controls)
    return [p for p, _ in pairs], labels

  def tokenize(contexts):  # contexts or bare prompts (e.g. "" for classifier-free guidance)
    return base.tokenize([parse_context(s)[0] if "||y=" in s else s for s in contexts])

  def prompt_metadata(contexts):
    prompts, labels = split(contexts)
    return {**base.prompt_metadata(prompts), "control_label": labels}

  rewards = {"ctrl_log_likelihood": log_likelihood_reward(controls, clfs)}
  for c in controls:
    judge = judges.make_judge(config.ctrl.conditions[c.name].data, config, workdir)
    if judge is not None:
      rewards[f"{c.name}_judge_accuracy"] = judges.judge_accuracy_reward(
          judge, controls.index(c), f"{c.name}_judge_accuracy")
  extension = ControlledModel(method=method, controls=tuple(controls), datasets=datasets,
                              classifiers=clfs, base_policy=base)
  common = dict(tokenize=tokenize, encode_prompts=base.encode_prompts, decode=base.decode,
                encode_images=base.encode_images, prompt_fn=prompt_fn,
                prompt_metadata=prompt_metadata, rewards={**base.rewards, **rewards},
                pipeline=base.pipeline, learning_rates=control_learning_rates(config))

  if method == "classifier_guidance":
    return _classifier_guidance_policy(config, base, controls, base_frozen, common, extension)

  train_base = bool(config.ctrl.train_base) or method == "cfg"
  tables = init_control_tables(controls, base.denoiser.time_embed_dim)
  if train_base:
    trainable = {"control": tables, "base": base.params["unet"]}
    frozen = base_frozen
  else:
    trainable = {"control": tables}
    frozen = {**base_frozen, "ctrl_base": base.params["unet"]}

  def assemble(tr, fr):
    base_tr = tr["base"] if "base" in tr else fr["ctrl_base"]
    return {"control": tr["control"], "base": base.assemble_denoiser(base_tr, fr)}

  min_t = int(config.ctrl.control_min_timestep)

  def conditional_eps(p, x, t, context, labels):
    emb = control_embedding(p["control"], labels, controls)
    if min_t > 0:  # the control acts only at the noisier steps t >= min_t
      emb = emb * (t >= min_t).astype(emb.dtype)[:, None]
    return base.denoiser.network(p["base"], x, t, context, None, emb)

  if method == "ctrl":
    def network(p, x, t, context, class_labels, added_time_emb):
      del added_time_emb
      return conditional_eps(p, x, t, context, class_labels)
  else:  # "cfg": guidance on the labels, composed over the controls
    w = float(config.ctrl.label_guidance_scale)
    nulls = np.asarray([c.null_label for c in controls], np.int32)

    def network(p, x, t, context, class_labels, added_time_emb):
      del added_time_emb
      n, m = class_labels.shape
      variants = [jnp.broadcast_to(jnp.asarray(nulls), (n, m))]
      for i in range(m):  # labels with only control i set
        variants.append(jnp.asarray(nulls)[None, :].repeat(n, 0).at[:, i].set(class_labels[:, i]))
      k = m + 1
      eps = conditional_eps(p, jnp.tile(x, (k, 1, 1, 1)), jnp.tile(t, k),
                            jnp.tile(context, (k, 1, 1)), jnp.concatenate(variants))
      eps = eps.reshape((k, n) + eps.shape[1:])
      return eps[0] + w * jnp.sum(eps[1:] - eps[0], axis=0)

  # Prompt guidance runs its unconditional half with the null controls (the reference's CFG).
  nulls = np.asarray([c.null_label for c in controls], np.int32)
  denoiser = base.denoiser.wrap(network, labels_key="control_label", null_labels=nulls)
  return Policy(params={**frozen, "unet": trainable}, denoiser=denoiser,
                assemble_denoiser=assemble,
                ctrl=dataclasses.replace(extension, conditional_eps=conditional_eps), **common)


def _classifier_guidance_policy(config, base: Policy, controls, base_frozen, common,
                                extension: ControlledModel):
  """The classifier-guidance baseline: the pre-trained eps corrected by noisy classifiers."""
  sched = diffusion.NoiseSchedule.from_config(base.denoiser.scheduler_config)
  alphas_cumprod = sched.alphas_cumprod
  w = float(config.ctrl.classifier_guidance_scale)
  modules, init = {}, {}
  for c in controls:
    module = classifiers.NoisyClassifier(num_classes=c.num_classes)
    shape = (1,) + tuple(base.denoiser.latent_shape)
    init[c.name] = host_init(module, jax.random.PRNGKey(0), jnp.zeros(shape),
                             jnp.zeros((1,), jnp.int32))
    modules[c.name] = module
  frozen = {**base_frozen, "ctrl_base": base.params["unet"]}

  def assemble(tr, fr):
    return {"classifiers": tr["classifiers"], "base": base.assemble_denoiser(fr["ctrl_base"], fr)}

  def network(p, x, t, context, class_labels, added_time_emb):
    del added_time_emb
    eps = base.denoiser.network(p["base"], x, t, context, None, None)

    def log_p(x_in):
      total = 0.0
      for i, c in enumerate(controls):
        logits = modules[c.name].apply({"params": p["classifiers"][c.name]}, x_in, t)
        lp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        total = total + c.weight * jnp.take_along_axis(lp, class_labels[:, i:i + 1], -1).sum()
      return total

    grad = jax.grad(log_p)(x.astype(jnp.float32))
    sigma = jnp.sqrt(1.0 - alphas_cumprod[t]).reshape((-1,) + (1,) * (x.ndim - 1))
    return eps - w * sigma * grad

  return Policy(params={**frozen, "unet": {"classifiers": init}},
                denoiser=base.denoiser.wrap(network, labels_key="control_label"),
                assemble_denoiser=assemble,
                ctrl=dataclasses.replace(extension, noisy_classifier_modules=modules), **common)
