"""CTRL training: the two solvers of the KL-regularised objective, and the baselines.

Objective (docs/algorithms.md §4.1), for labels y ~ uniform per control and prompts c:

    maximise  E[ r(x_0, y) ] − α · E[ Σ_t KL_t ],   r = Σ_i w_i log p̂_i(y_i | x_0),
    KL_t = ‖mean_θ(x_t) − mean_pre(x_t)‖² / (2 std_t²)   (both at the same on-policy x_t),

written as the loss `ctrl.reward_weight · (−r) + ctrl.kl_weight · Σ_t KL_t` (α = kl_weight /
reward_weight); `ctrl.kl_reduction` "sum" over latent dims is the exact Gaussian KL, "mean"
is the reference code's.

Solvers (`ctrl.solver`):
- "backprop": the whole DDIM chain (eta > 0, reparameterised noise) in one `lax.scan` with
  `jax.checkpoint` per step; the reward's gradient flows through decoded images, the sampler
  and the UNet. Truncation (`ctrl.truncation`): "random" (step i of T keeps its UNet gradient
  with probability (i+1)/(T+1), the reference), "fixed" (only the last `ctrl.truncation_steps`
  keep it) or "none". Gradients are accumulated over `ctrl.gradient_accumulation_steps`
  batches, clipped to global norm `train.max_grad_norm`, AdamW with the control tables at
  `train.control_learning_rate`.
- "ddpo": DDPO's PPO update (ddpo_jax.algorithms.train) on contexts (c, y) with terminal reward
  `ctrl_log_likelihood` and the per-step penalty −α·KL_t (`train.kl_coef`): the later steps'
  KL in each step's return plus the direct ∇KL_t term, the same gradient as "backprop" in
  expectation (tests/test_ctrl_gmm.py).

Baselines (`ctrl.method`): "cfg" trains the augmented model by denoising score matching on
the labelled data with label dropout (`ctrl.label_dropout`); "classifier_guidance" trains one
noise-conditional classifier per control on the labelled data. All methods write the same
checkpoints (WORKDIR/checkpoints, a `TrainState` whose params are the policy's trainable
tree), so `python -m ddpo_jax.sample --labels=...` samples any of them.
"""
from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddpo_jax import config_schema
from ddpo_jax.algorithms import train
from ddpo_jax.ctrl import classifiers
from ddpo_jax.numerics import diffusion, parallel
from ddpo_jax.pipelines.policy import Policy
from ddpo_jax.rewards import call_reward, make_rewards
from ddpo_jax.trainer import checkpoints, loop, workdir as workdir_lib, ctrl_evaluate as evaluate
from ddpo_jax.trainer.families import base_weights, build_policy



# The DDPO keys the "ddpo" solver derives from `ctrl`: (section, key, derivation, source).
_DERIVED_DDPO_KEYS = (
    ("train", "kl_coef", lambda c: float(c.kl_weight), "ctrl.kl_weight"),
    ("train", "kl_reduction", lambda c: c.kl_reduction, "ctrl.kl_reduction"),
    ("reward", "weights", lambda c: {"ctrl_log_likelihood": float(c.reward_weight)},
     "ctrl.reward_weight"),
)


def _plain(value):
  return value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value


def ddpo_solver_config(config) -> ml_collections.ConfigDict:
  """The config the "ddpo" solver trains with: a copy of `config` whose `train.kl_coef`,
  `train.kl_reduction` and `reward.weights` are derived from `ctrl.kl_weight`,
  `ctrl.kl_reduction` and `ctrl.reward_weight`, at run time (after command-line overrides), so
  the `ctrl` keys are the one place to set them and the saved config shows what the run used.

  Raises:
    ValueError: one of the derived keys was set to another value than both its CTRL default
      (`config_schema`) and the derived one (set the `ctrl` key instead).
  """
  out = ml_collections.ConfigDict(config.to_dict())
  for section, name, derive, source in _DERIVED_DDPO_KEYS:
    default = _plain(config_schema.default(f"{section}.{name}", "ctrl", config.model.kind))
    value, wanted = _plain(out[section][name]), derive(out.ctrl)
    if value not in (default, wanted):
      raise ValueError(f"{section}.{name}={value!r}: the ddpo solver derives it from {source} "
                       f"(here {wanted!r}); set {source} instead")
    out[section][name] = ml_collections.ConfigDict(wanted) if isinstance(wanted, dict) else wanted
  return out


def validate_config(config, mesh) -> None:
  """Raises ValueError for impossible CTRL settings, before anything is built or compiled."""
  c = config.ctrl
  train.validate_shared_config(config)
  if c.method == "ctrl" and c.solver == "ddpo":
    train.validate_config(ddpo_solver_config(config), mesh)
    return
  if c.truncation == "fixed" and not 1 <= int(c.truncation_steps) <= config.sample.num_steps:
    raise ValueError(f"ctrl.truncation_steps={c.truncation_steps} must lie in "
                     f"[1, sample.num_steps={config.sample.num_steps}]")
  if not config.sample.eta > 0:
    raise ValueError(f"sample.eta={config.sample.eta}: CTRL's KL needs stochastic steps (eta > 0)")
  parallel.check_divisible("ctrl.batch_size", c.batch_size, mesh)


def truncation_mask(key: jax.Array, num_steps: int, mode: str, fixed_steps: int) -> jax.Array:
  """(T,) bool: which DDIM steps (0 = the first, from pure noise) keep their UNet gradient."""
  i = jnp.arange(num_steps)
  if mode == "none":
    return jnp.ones((num_steps,), bool)
  if mode == "fixed":
    return i >= num_steps - fixed_steps
  return jax.random.uniform(key, (num_steps,)) < (i + 1) / (num_steps + 1)


def make_backprop_loss(policy: Policy, config, reward_fn):
  """`loss(trainable, frozen, key, prompt_ids (B,L), labels (B,M)) -> (loss, metrics)`.

  Samples B chains of `sample.num_steps` DDIM steps under the trainable params with
  `diffusion.ddim_chain` (gradients flow through the chain; each step rematerialised; steps
  outside the truncation mask run without gradient), with KL_t against
  `frozen["reference_unet"]` at the same x_t, and scores the decoded x_0 with
  `reward_fn(images, ids, {"control_label": labels})`.
  """
  c = config.ctrl
  sched = diffusion.NoiseSchedule.from_config(policy.denoiser.scheduler_config)
  timesteps, prev = sched.ddim_timesteps(config.sample.num_steps)
  T = len(timesteps)
  guidance = float(config.sample.guidance_scale)
  eta = float(config.sample.eta)
  use_kl = float(c.kl_weight) > 0

  def loss_fn(trainable, frozen, key, ids, labels):
    params = {**frozen, "unet": trainable}
    context = policy.encode_prompts(params, ids)
    uncond = policy.encode_uncond(params)
    unet = policy.assemble_denoiser(trainable, frozen)
    ref = policy.assemble_denoiser(frozen["reference_unet"], frozen) if use_kl else None
    b = ids.shape[0]
    k_init, k_steps, k_trunc = jax.random.split(key, 3)
    x_init = jax.random.normal(k_init, (b,) + tuple(policy.denoiser.latent_shape), jnp.float32)
    keep = truncation_mask(k_trunc, T, c.truncation, int(c.truncation_steps))

    x0, steps = diffusion.ddim_chain(
        policy.denoiser, unet, x_init, jax.random.split(k_steps, T), context, uncond,
        alphas_cumprod=sched.alphas_cumprod, timesteps=timesteps, prev_timesteps=prev, eta=eta,
        guidance_scale=guidance, class_labels=labels,
        final_alpha_cumprod=sched.final_alpha_cumprod,
        uncond_class_labels=policy.denoiser.null_labels, reference_params=ref,
        kl_reduction=c.kl_reduction, keep_gradient=keep, remat=True)
    kls = steps["kl"] if use_kl else jnp.zeros((T, b), jnp.float32)
    images = policy.decode(params, x0)
    reward, info = reward_fn(images, ids, {"control_label": labels})
    kl_total = jnp.sum(kls, axis=0)  # (B,) Σ_t KL_t
    loss = float(c.reward_weight) * -jnp.mean(reward) + float(c.kl_weight) * jnp.mean(kl_total)
    metrics = {"loss": loss, "reward_mean": jnp.mean(reward), "kl_to_pretrained": jnp.mean(kl_total),
               **{k: jnp.mean(v) for k, v in info.items()}}
    return loss, metrics

  return loss_fn


def make_cfg_loss(policy: Policy, config):
  """`loss(trainable, frozen, key, images (B,h,w,c) in [0,1], labels (B,M)) -> (loss, metrics)`:
  denoising score matching of the augmented model on labelled data; each label is replaced by
  the null label with probability `ctrl.label_dropout`; the prompt is ""."""
  sched = diffusion.NoiseSchedule.from_config(policy.denoiser.scheduler_config)
  controls = policy.ctrl.controls
  nulls = jnp.asarray([c.null_label for c in controls], jnp.int32)
  p_drop = float(config.ctrl.label_dropout)
  conditional_eps = policy.ctrl.conditional_eps

  def loss_fn(trainable, frozen, key, images, labels):
    params = {**frozen, "unet": trainable}
    unet = policy.assemble_denoiser(trainable, frozen)
    k_drop, k_loss = jax.random.split(key)
    drop = jax.random.uniform(k_drop, labels.shape) < p_drop
    labels = jnp.where(drop, nulls[None, :], labels)
    x0 = policy.encode_images(params, images)
    uncond = policy.encode_uncond(params)  # (1, L, D)
    context = jnp.broadcast_to(uncond, (images.shape[0],) + uncond.shape[1:])
    per_sample = diffusion.denoising_loss_terms(
        lambda p, x, t, ctx, y: conditional_eps(p, x, t, ctx, y), unet, k_loss, x0, context,
        labels, sched.alphas_cumprod)
    loss = jnp.mean(per_sample)
    return loss, {"loss": loss}

  return loss_fn


def make_train_step(loss_fn, optimizer, mesh):
  """Compiles `step(state, frozen, batches, keys) -> (state, metrics)`: `batches` is a pytree
  whose leaves are (accum, B, ...), `keys` (accum,) per micro-batch; gradients averaged over
  `accum` (`train.accumulated_step`). The gradient is jitted so that the accumulation's shape
  query and its scan share one trace of the chain."""
  grad_fn = jax.jit(jax.grad(loss_fn, has_aux=True))

  def step(state: train.TrainState, frozen, batches, keys):
    return train.accumulated_step(
        state, optimizer, lambda p, x: grad_fn(p, frozen, x[1], *x[0]), (batches, keys))

  repl = parallel.replicated(mesh)
  batch_spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, parallel.DATA_AXIS))
  return jax.jit(step, in_shardings=(repl, repl, batch_spec, repl), out_shardings=(repl, repl),
                 donate_argnums=(0,))


def _labelled_batches(policy: Policy, rng: np.random.Generator, n: int):
  """n labelled examples for the baselines: from each control's dataset in turn (its label in
  its column, null elsewhere). Returns (images (n,h,w,c) float32, labels (n,M) int32)."""
  controls, datasets = policy.ctrl.controls, policy.ctrl.datasets
  m = len(controls)
  which = rng.integers(0, m, n)
  images = np.zeros((n,) + datasets[controls[0].name].images.shape[1:], np.float32)
  labels = np.tile(np.asarray([c.null_label for c in controls], np.int32), (n, 1))
  for i, c in enumerate(controls):
    sel = np.nonzero(which == i)[0]
    ds = datasets[c.name]
    idx = rng.integers(0, len(ds), len(sel))
    images[sel] = ds.images[idx]
    labels[sel, i] = ds.labels[idx]
  return images, labels


# Images per call of the VAE encoder when encoding offline data: its activations at 512 px take
# about 0.42 GB per image, so encoding thousands at once needs hundreds of GB.
ENCODE_CHUNK = 8


def encode_in_chunks(encode, params, images: np.ndarray, chunk: int = ENCODE_CHUNK) -> np.ndarray:
  """`encode(params, images)` on (N, H, W, C) images, `chunk` images per call of one compiled
  program (the last chunk padded by repeating its last image); returns the N encodings on
  the host, in order."""
  n = len(images)
  if n == 0:
    raise ValueError("no images to encode")
  chunk = min(chunk, n)
  fn = jax.jit(encode)
  out = []
  for i in range(0, n, chunk):
    part = np.asarray(images[i:i + chunk])
    m = len(part)
    if m < chunk:
      part = np.concatenate([part, np.repeat(part[-1:], chunk - m, axis=0)])
    out.append(np.asarray(fn(params, jnp.asarray(part)))[:m])
  return np.concatenate(out)


def _train_noisy_classifiers(policy: Policy, config, log) -> dict:
  """The classifier-guidance baseline's training: one noise-conditional classifier per control
  on its labelled data, in the diffusion variable's space. Returns {"classifiers": {...}}."""
  sched = diffusion.NoiseSchedule.from_config(policy.denoiser.scheduler_config)
  out = {}
  for c in policy.ctrl.controls:
    ds = policy.ctrl.datasets[c.name]
    x0 = encode_in_chunks(policy.encode_images, policy.params, ds.images)
    model = classifiers.train_noisy_classifier(
        x0, ds.labels, c.num_classes, sched.alphas_cumprod, seed=int(config.seed),
        steps=int(config.ctrl.noisy_classifier_steps), batch_size=int(config.ctrl.batch_size))
    out[c.name] = model.params
    log(f"control {c.name!r}: trained the noise-conditional classifier on {len(ds)} examples")
  return {"classifiers": out}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, log=print,
                       allow_config_change: tuple[str, ...] = ()) -> dict:
  """Runs (or resumes) a CTRL / baseline run in `workdir`; returns the last epoch's metrics
  (plus the final evaluation's, written to WORKDIR/eval.json). Resuming and
  `allow_config_change` work as in `loop.train_and_evaluate`, and so does WORKDIR's lock."""
  workdir = workdir_lib.resolve(workdir)
  c = config.ctrl
  fsdp = int(config.mesh.fsdp)
  if fsdp > 1 and not (c.method == "ctrl" and c.solver == "ddpo"):
    # The backprop solver's and the baselines' loop keeps the model replicated: an fsdp axis
    # would be accepted and then shard nothing.
    raise ValueError(
        f"mesh.fsdp={fsdp}: ctrl.method={c.method!r} / ctrl.solver={c.solver!r} trains "
        "data-parallel only (mesh.fsdp=1); the ddpo solver (ctrl.solver='ddpo') shards with fsdp")
  mesh = parallel.make_mesh(config.mesh)
  validate_config(config, mesh)
  with workdir_lib.lock(workdir, log):
    if c.method == "ctrl" and c.solver == "ddpo":
      last = loop.train_and_evaluate(ddpo_solver_config(config), workdir, log=log,
                                    allow_config_change=allow_config_change)
    else:
      done = checkpoints.check_saved_config(workdir, config, allow_config_change)
      if done is not None and done >= int(config.num_epochs):  # nothing to train: say so now
        return loop.finished_run(workdir, done, int(config.num_epochs), log)
      last = _train_loop(config, workdir, mesh, log, allow_config_change)
    if int(c.eval_num_samples) > 0:
      result = evaluate.evaluate_run(workdir, num=int(c.eval_num_samples), seed=int(config.seed))
      log("evaluation: " + json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                       for k, v in result.items() if not isinstance(v, dict)}))
      last = {**last, **{f"eval_{k}": v for k, v in result.items() if isinstance(v, float)}}
  return last


def _train_loop(config, workdir: str, mesh, log, allow_config_change) -> dict:
  c = config.ctrl
  if not parallel.is_main_process():
    log = lambda *a, **k: None  # noqa: E731
  policy = build_policy(config, workdir)
  repl = parallel.replicated(mesh)
  frozen_host = train.frozen_params(policy, config)
  if c.method == "ctrl" and float(c.kl_weight) > 0:  # the backprop solver's KL (ctrl.kl_weight)
    frozen_host["reference_unet"] = policy.params["unet"]
  frozen = jax.device_put(frozen_host, repl)
  optimizer = train.make_optimizer(config.train, policy.learning_rates)
  # A copy placed from the host (the state is donated; the policy's params must survive), with
  # no program compiled per leaf.
  unet0 = parallel.put(jax.tree.map(np.asarray, policy.params["unet"]), repl)
  state = train.TrainState(step=jnp.zeros((), jnp.int32), params=unet0,
                           opt_state=jax.jit(optimizer.init, out_shardings=repl)(unet0),
                           rng=jax.random.PRNGKey(config.seed))
  state = jax.device_put(state, repl)
  with loop.training_run(config, workdir, state, {"epoch": 0}, log, allow_config_change,
                         base_weights(config)) as run:
    log(f"training on {parallel.describe_mesh(mesh)}")
    if c.method == "classifier_guidance":  # one "epoch": the noisy classifiers
      def epoch_fn(epoch, state):
        t0 = time.time()
        params = jax.device_put(_train_noisy_classifiers(policy, config, log), repl)
        return (state.replace(params=params, step=state.step + 1),
                {"train_time_s": time.time() - t0}, None)
      return run.run_epochs(1, epoch_fn)
    return run.run_epochs(int(config.num_epochs), _solver_epoch_fn(config, policy, frozen,
                                                                   optimizer, mesh))


def _solver_epoch_fn(config, policy, frozen, optimizer, mesh):
  """The epoch function (`loop.EpochFn`) of the backprop solver (ctrl.method="ctrl") or the CFG
  baseline (ctrl.method="cfg"): `ctrl.steps_per_epoch` optimizer steps, each accumulated over
  `ctrl.gradient_accumulation_steps` batches of `ctrl.batch_size`; the row holds the steps'
  mean metrics."""
  c = config.ctrl
  accum, B = int(c.gradient_accumulation_steps), int(c.batch_size)
  data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, parallel.DATA_AXIS))
  if c.method == "ctrl":
    reward = dict((r.name, r) for _, r in make_rewards(config, policy))["ctrl_log_likelihood"]
    loss_fn = make_backprop_loss(  # the reward checked as every reward is (shape, info dict)
        policy, config, lambda images, ids, meta: call_reward(reward, images, ids, meta))
  else:
    loss_fn = make_cfg_loss(policy, config)
  step_fn = make_train_step(loss_fn, optimizer, mesh)

  def host_batch(rng):
    if c.method == "ctrl":
      contexts = policy.prompt_fn(rng, accum * B)
      ids = policy.tokenize(contexts)
      labels = policy.prompt_metadata(contexts)["control_label"]
      return ids.reshape((accum, B) + ids.shape[1:]), labels.reshape(accum, B, -1)
    images, labels = _labelled_batches(policy, rng, accum * B)
    return images.reshape((accum, B) + images.shape[1:]), labels.reshape(accum, B, -1)

  def epoch_fn(epoch, state):
    t0 = time.time()
    epoch_key = jax.random.fold_in(state.rng, epoch)
    sums = None
    for s in range(int(c.steps_per_epoch)):
      batch = jax.device_put(host_batch(np.random.default_rng([config.seed, epoch, s])), data)
      keys = jax.random.split(jax.random.fold_in(epoch_key, s), accum)
      state, metrics = step_fn(state, frozen, batch, keys)
      sums = metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)
    row = {k: float(v) / int(c.steps_per_epoch) for k, v in jax.device_get(sums).items()}
    return state, {**row, "epoch_time_s": time.time() - t0,
                   "optimizer_step": int(state.step)}, None

  return epoch_fn
