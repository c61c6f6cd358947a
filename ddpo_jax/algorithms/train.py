"""DDPO's compiled programs: sample trajectories (with log-probs and device rewards), and update
with any of `ddpo_jax.algorithms` (PPO, SF, RWR, ...); the train state, the optimizer, the shardings (the loop that runs them
epoch by epoch is `ddpo_jax.trainer.loop`).

`make_sample_fn`: one program per batch of `sample.batch_size`: prompt encoding, the DDIM chain
with log-probs, decoding and device rewards. `make_update_fn`: one program per epoch: shuffle,
per-sample timestep subsampling, gradient accumulation over K timesteps ×
`gradient_accumulation_steps` minibatches, one optimizer step per group. Both run under one
device mesh (`config.mesh`: data × fsdp) with explicit shardings; the train state is donated to
the update. Batch sizes are global (all devices of all hosts together); the PyTorch
reference's are per GPU.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from ddpo_jax import algorithms, config_schema
from ddpo_jax.numerics import diffusion, flow, parallel
from ddpo_jax.pipelines.policy import Policy
from ddpo_jax.rewards import Reward, call_reward, check_terms
from ddpo_jax.tasks import dynamics as dynamics_lib

@flax.struct.dataclass
class TrainState:
  step: jax.Array  # optimizer steps taken, int32 scalar
  params: Any  # the trainable denoiser params
  opt_state: Any
  rng: jax.Array  # base PRNG key of the run; epoch e uses fold_in(rng, e)
  # `train.ema.enabled`: the weight EMA of `params` (same tree, shapes and dtypes), updated in
  # the update program (`ema_update`); sample / export / evaluation read it. Else None.
  ema_params: Any = None
  # train.algorithm 'nft': DiffusionNFT's old policy (same tree as `params`), the one the
  # epoch's samples are drawn with and v_old; updated once per epoch (`make_old_policy_fn`).
  # Else None.
  old_params: Any = None


def keeps_old_params(config) -> bool:
  """Whether the train state carries an old (sampling) policy: `Algorithm.keeps_old_params`."""
  return algorithms.get(config.train.algorithm).keeps_old_params


def new_train_state(config, params, opt_state, rng, step=None) -> TrainState:
  """A train state at its start: `ema_params` and `old_params` (when the config keeps them)
  are copies of `params` (the state is donated to the update, so they may not share buffers).

  Args:
    params: the trainable tree; opt_state: `optimizer.init(params)`; rng: a PRNG key;
    step: int32 scalar (default 0).
  """
  copy = lambda t: jax.tree.map(lambda x: x.copy() if hasattr(x, "copy") else x, t)  # noqa: E731
  return TrainState(step=jnp.zeros((), jnp.int32) if step is None else step, params=params,
                    opt_state=opt_state, rng=rng,
                    ema_params=copy(params) if config.train.ema.enabled else None,
                    old_params=copy(params) if keeps_old_params(config) else None)


def ema_decay_at(step, decay: float):
  """flow_grpo's `EMAModuleWrapper.get_current_decay`: min((1 + step) / (10 + step), decay),
  `step` the optimizer steps taken (int32 scalar or Python int). float32."""
  s = jnp.asarray(step, jnp.float32)
  return jnp.minimum((1.0 + s) / (10.0 + s), jnp.float32(decay))


def ema_update(ema_params, params, step, decay: float, interval: int, calls: int = 1):
  """The weight EMA after optimizer step `step` (the steps taken, counting this one):

      if (step + 1) % interval == 0:  ema <- params + d^calls (ema - params),
      d = min((1 + step) / (10 + step), decay)

  as `EMAModuleWrapper.step(params, step)` called `calls` times with the same params and step
  (flow_grpo's train_sd3.py calls it once per minibatch: `gradient_accumulation_steps` calls
  per optimizer step; DiffusionNFT's train_nft_sd3.py once per optimizer step). Leaves keep
  their dtype; the arithmetic is float32 (or wider).

  Args:
    ema_params, params: the same pytree; step: int32 scalar; decay in [0, 1); interval >= 1;
    calls >= 1 (static).
  """
  d = ema_decay_at(step, decay) ** calls
  keep = jnp.where((step + 1) % interval == 0, d, jnp.float32(1.0))

  def one(e, p):
    dtype = jnp.promote_types(e.dtype, jnp.float32)
    return (p.astype(dtype) + keep * (e.astype(dtype) - p.astype(dtype))).astype(e.dtype)
  return jax.tree.map(one, ema_params, params)


NFT_DECAY_TYPES = {0: (0, 0.0, 0.0), 1: (0, 0.001, 0.5), 2: (75, 0.0075, 0.999)}


def nft_old_decay(step, decay_type: int):
  """DiffusionNFT's `return_decay(step, decay_type)` (scripts/train_nft_sd3.py): with (flat,
  uprate, uphold) = (0, 0, 0), (0, 0.001, 0.5), (75, 0.0075, 0.999) for types 0, 1, 2:
  0 below step `flat`, else min((step - flat) uprate, uphold). `step`: the optimizer steps
  taken (int32 scalar or int). float32 scalar."""
  flat, uprate, uphold = NFT_DECAY_TYPES[int(decay_type)]
  s = jnp.asarray(step, jnp.float32)
  return jnp.where(s < flat, 0.0, jnp.minimum((s - flat) * uprate, uphold)).astype(jnp.float32)


def sampling_params(state: TrainState):
  """The params the epoch's samples are drawn with: the old policy when the state keeps one
  (DiffusionNFT: its "old" adapter samples), else the trained params."""
  return state.params if state.old_params is None else state.old_params


def sampler_runs_reference(config) -> bool:
  """Whether the sampling program also runs the pre-trained model (each step's KL and the
  reference step means in the trajectory): the KL penalty (`train.kl_coef` > 0) or flow_grpo's
  KL term (`train.kl_beta` > 0 with a policy-gradient algorithm)."""
  t = config.train
  return t.kl_coef > 0 or (t.kl_beta > 0 and algorithms.get(t.algorithm).supports_kl_penalty)


def validate_shared_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError for a config that does not fit the schema (`config_schema.validate`:
  unknown or missing keys, values outside their choices or valid ranges) or names a reward
  term that cannot be built (`rewards.check_terms`: an unknown name, an empty path key it needs,
  a remote term without a server): DDPO's and CTRL's `validate_config`."""
  config_schema.validate(config)
  # Every reward term can be built; a task's own reward names (CTRL's) are known with its policy.
  check_terms(config, task_rewards=None if config.mode == "ctrl" else ())
  t = config.train
  if config.mode != "ddpo" and (t.ema.enabled or t.kl_beta > 0 or t.drop_zero_advantage):
    raise ValueError(f"config.mode={config.mode!r}: train.ema.enabled, train.kl_beta and "
                     "train.drop_zero_advantage are DDPO's (config.mode='ddpo')")


def validate_config(config: ml_collections.ConfigDict, mesh) -> None:
  """Raises ValueError for impossible values, before anything is compiled: DDPO's one
  validation entry point (`loop.train_and_evaluate` calls it once, before building the model;
  CTRL's "ddpo" solver through `trainer.ctrl.validate_config`). In order:

    `validate_shared_config` (the schema, the reward terms, the DDPO-only keys);
    `_check_sampler` (the sampler against the algorithm: log-probs, eps regression, SDE noise);
    `_check_batches` (groups, device and optimizer-step divisibility);
    `algorithm.validate` (the algorithm's own conditions, `ddpo_jax.algorithms`);
    `_check_update_terms` (the KL penalty, flow_grpo's KL term, the zero-advantage filter);
    `_check_sde_options` (SDE windows, shared group noise, the trained steps).
  """
  validate_shared_config(config)
  algorithm = algorithms.get(config.train.algorithm)
  _check_sampler(config, algorithm)
  samples_per_epoch, samples_per_step = _check_batches(config, mesh)
  algorithm.validate(config, samples_per_epoch, samples_per_step)
  _check_update_terms(config, algorithm)
  _check_sde_options(config)


def _check_sampler(config, algorithm) -> None:
  """The sampler against the algorithm: step log-probs, eps regression, the flow SDE's noise."""
  s, t = config.sample, config.train
  if s.sampler == "ddim" and not s.eta > 0:
    raise ValueError(f"sample.eta={s.eta}: DDPO needs eta > 0 (the log-probability of a "
                     "deterministic DDIM step is undefined)")
  if s.sampler in dynamics_lib.DETERMINISTIC_SAMPLERS and algorithm.needs_log_probs:
    raise ValueError(f"sample.sampler={s.sampler!r} has no step log-probabilities; "
                     f"train.algorithm={t.algorithm!r} needs them (use 'sde' / 'cps', or "
                     "train.algorithm 'nft')")
  if s.sampler == "dpm2" and int(s.sde_window_size):
    raise ValueError(f"sample.sampler='dpm2' is deterministic: sample.sde_window_size="
                     f"{s.sde_window_size} needs 'sde' or 'cps'")
  if s.sampler not in ("ddim", "dpm2"):
    flow.check_sde(s.sampler, float(s.noise_level))
  if s.sampler != "ddim":
    if algorithm.uses_denoising_loss:
      raise ValueError(f"sample.sampler={s.sampler!r}: train.algorithm={t.algorithm!r} is an "
                       "eps regression, written for DDIM; the flow samplers train with 'ppo', "
                       "'sf' or 'nft'")


def _check_batches(config, mesh) -> tuple[int, int]:
  """Whole groups per batch, batches that divide over the devices, whole optimizer steps per
  epoch; returns (samples per epoch, samples per optimizer step)."""
  s, t = config.sample, config.train
  if s.batch_size % int(s.group_size):
    raise ValueError(f"sample.group_size={s.group_size} must divide "
                     f"sample.batch_size={s.batch_size} (each batch holds whole groups)")
  if int(s.group_size) > 1 and config.per_prompt_stat_tracking.enabled:
    raise ValueError(f"sample.group_size={s.group_size} gives group-relative advantages; "
                     "set per_prompt_stat_tracking.enabled=False (the two normalise the "
                     "rewards differently)")
  parallel.check_divisible("sample.batch_size", s.batch_size, mesh)
  parallel.check_divisible("train.batch_size", t.batch_size, mesh)
  total = s.batch_size * s.num_batches_per_epoch
  group = t.batch_size * t.gradient_accumulation_steps
  if total % group:
    raise ValueError(
        f"samples per epoch (sample.batch_size*sample.num_batches_per_epoch={total}) must be a "
        f"multiple of train.batch_size*train.gradient_accumulation_steps={group}")
  return total, group


def _check_update_terms(config, algorithm) -> None:
  """The update's optional terms: the KL penalty, flow_grpo's KL term, the zero-advantage
  filter."""
  s, t = config.sample, config.train
  if t.kl_coef < 0 or (t.kl_coef > 0 and not algorithm.supports_kl_penalty):
    with_kl = [n for n in algorithms.names() if algorithms.get(n).supports_kl_penalty]
    raise ValueError(f"train.kl_coef={t.kl_coef}: the KL penalty needs kl_coef >= 0 and a "
                     f"train.algorithm among {with_kl} (got {t.algorithm!r})")
  if t.kl_coef > 0 and not t.cfg and float(s.guidance_scale) != 1.0:
    raise ValueError(
        f"train.kl_coef={t.kl_coef} with train.cfg=False and sample.guidance_scale="
        f"{s.guidance_scale}: the KL penalty compares the sampled (guided) steps, so the update "
        "must recompute them with guidance too (train.cfg=True), or sample without it")
  if t.kl_beta > 0:
    if algorithm.supports_kl_penalty and s.sampler not in ("sde", "cps"):
      raise ValueError(
          f"train.kl_beta={t.kl_beta} with sample.sampler={s.sampler!r}: flow_grpo's KL term "
          "(docs/algorithms.md §3.5) divides by the flow SDE's std; use sample.sampler 'sde' or "
          "'cps' (train.kl_coef is the KL penalty of any stochastic sampler)")
    if not algorithm.supports_kl_penalty and t.algorithm != "nft":
      raise ValueError(f"train.kl_beta={t.kl_beta}: the direct KL term is flow_grpo's (ppo / "
                       f"sf on 'sde' / 'cps') and DiffusionNFT's ('nft'), not {t.algorithm!r}'s")
    if algorithm.supports_kl_penalty and not t.cfg and float(s.guidance_scale) != 1.0:
      raise ValueError(
          f"train.kl_beta={t.kl_beta} with train.cfg=False and sample.guidance_scale="
          f"{s.guidance_scale}: the KL term compares the sampled (guided) step means, so the "
          "update must recompute them with guidance too (train.cfg=True), or sample without it")
  if t.drop_zero_advantage and not isinstance(algorithm, algorithms.PolicyGradient):
    raise ValueError(f"train.drop_zero_advantage is flow_grpo's sample filter of the policy "
                     f"gradient (ppo / sf), not {t.algorithm!r}'s")


def _check_sde_options(config) -> None:
  """SDE windows, noise shared within a group, at least one trained step per sample."""
  s, t = config.sample, config.train
  dynamics_lib.check_sde_window(s)
  if s.same_noise_per_group and (s.sampler == "ddim" or int(s.group_size) < 2):
    raise ValueError("sample.same_noise_per_group needs a flow sampler and sample.group_size > 1 "
                     f"(got sampler {s.sampler!r}, group_size {s.group_size})")
  if dynamics_lib.trained_steps_per_sample(s, t.timestep_fraction) < 1:
    raise ValueError("sample.num_steps (or sample.sde_window_size) * train.timestep_fraction "
                     "must be at least 1")


def make_optimizer(train_config, learning_rates=None) -> optax.GradientTransformation:
  """Global-norm clip, then AdamW.

  `learning_rates` ({top-level key of the params: rate}, `Policy.learning_rates`) trains those
  subtrees at their own rate and every other subtree at `train.learning_rate`; empty or None:
  one rate for all.
  """
  def adamw(lr):
    return optax.adamw(lr, b1=train_config.adam_beta1, b2=train_config.adam_beta2,
                       eps=train_config.adam_epsilon, weight_decay=train_config.adam_weight_decay,
                       mu_dtype=train_config.adam_mu_dtype or None)

  rates = dict(learning_rates or {})
  if not rates:
    inner = adamw(train_config.learning_rate)
  else:
    if "rest" in rates:
      raise ValueError("learning_rates: 'rest' names the subtrees at train.learning_rate")
    def labels(params):
      return {k: jax.tree.map(lambda _, k=k: k if k in rates else "rest", v)
              for k, v in params.items()}
    inner = optax.multi_transform({**{k: adamw(lr) for k, lr in rates.items()},
                                   "rest": adamw(train_config.learning_rate)}, labels)
  return optax.chain(optax.clip_by_global_norm(train_config.max_grad_norm), inner)


def make_sample_fn(policy: Policy, config, device_rewards: list[tuple[float, Reward]], mesh):
  """Compiles `sample(unet_params, frozen, key, prompt_ids, metadata) -> (Trajectory, images, rewards)`.

  `images` are (B,h,w,c) float32 in [0, 1]; `rewards` maps each device reward's name to
  (rewards (B,), info). Prompt ids / metadata come sharded over the data axis. With
  `train.kl_coef` > 0 the trajectory also carries each step's KL to the pre-trained model
  (`frozen["reference_unet"]`) and that model's step means, for the KL-penalised update (one
  more UNet call per step); so it does with `train.kl_beta` > 0 and a policy-gradient algorithm.
  `unet_params` are `sampling_params(state)`: the old policy for DiffusionNFT.
  """
  denoiser = policy.denoiser
  dynamics = dynamics_lib.make_dynamics(denoiser, config.sample)
  guidance = float(config.sample.guidance_scale)
  use_kl = sampler_runs_reference(config)

  def sample(unet_params, frozen, key, prompt_ids, metadata):
    params = {**frozen, "unet": unet_params}
    context = policy.encode_prompts(params, prompt_ids)
    uncond = policy.encode_uncond(params)
    traj = dynamics.sample(
        denoiser, policy.assemble_denoiser(unet_params, frozen), key, context, uncond,
        guidance_scale=guidance,
        class_labels=metadata[denoiser.labels_key] if denoiser.labels_key else None,
        reference_params=(policy.assemble_denoiser(frozen["reference_unet"], frozen)
                          if use_kl else None),
        kl_reduction=config.train.kl_reduction, sde_steps=metadata.get("sde_steps"))
    images = policy.decode(params, traj.next_latents[:, -1])
    # checked here, while traced: each (rewards (B,), info dict), or an error naming the reward
    rewards = {r.name: call_reward(r, images, prompt_ids, metadata) for _, r in device_rewards}
    return traj, images, rewards

  data, repl = parallel.data_sharding(mesh), parallel.replicated(mesh)
  params_sh, frozen_sh, _ = model_shardings(policy, config, None, mesh)
  return jax.jit(sample, in_shardings=(params_sh, frozen_sh, repl, data, data), out_shardings=data)


def model_shardings(policy: Policy, config, optimizer, mesh):
  """(trainable params, frozen params, TrainState) shardings under `parallel.PARAM_RULES`.

  With `mesh.fsdp` = 1 each is the replicated sharding (a pytree prefix that fits any tree);
  with fsdp > 1 they are full pytrees of shardings built from `policy.params` (the state's
  only when `optimizer` is given).
  """
  repl = parallel.replicated(mesh)
  if mesh.shape.get(parallel.FSDP_AXIS, 1) == 1:
    return repl, repl, repl
  min_size = parallel.fsdp_min_size(config)
  def shapes(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  unet, frozen = shapes(policy.params["unet"]), shapes(frozen_params(policy, config))
  state = None
  if optimizer is not None:
    state = parallel.param_shardings(jax.eval_shape(
        lambda p: new_train_state(config, p, optimizer.init(p), jax.random.PRNGKey(0)), unet),
        mesh, min_size)
  return (parallel.param_shardings(unet, mesh, min_size),
          parallel.param_shardings(frozen, mesh, min_size), state)


def trained_step_indices(key: jax.Array, window: jax.Array, K: int, in_order: bool) -> jax.Array:
  """(N, K) int32: the K timesteps each of N trajectories is trained on, among its `window`
  ((N, T) bool: the steps that may be trained, an SDE window or all T).

  `in_order` (the flow samplers, as flow_grpo's train_sd3.py `range(num_train_timesteps)`):
  the first K steps of the window, ascending, so with timestep_fraction < 1 the last steps are
  never trained. Otherwise (DDIM, as ddpo-pytorch): K of the window's steps drawn at random,
  independently per trajectory (`key`)."""
  n, T = window.shape
  if in_order:
    order = jnp.arange(T, dtype=jnp.float32)[None, :] + 2.0 * T * ~window
    return jnp.argsort(order, axis=1)[:, :K].astype(jnp.int32)
  keys = jax.random.split(key, n)
  return jax.vmap(lambda k, w: jnp.argsort(jax.random.uniform(k, (T,)) + 2.0 * ~w)[:K])(
      keys, window).astype(jnp.int32)


def make_update_fn(policy: Policy, config, optimizer, mesh):
  """Compiles `update(state, frozen, traj, advantages, adv_scales, rewards, key) -> (state, metrics)`.

  `frozen` holds the non-trained params (`frozen_params`; its `reference_unet` is the
  sampler's, unused here). `advantages` (N,) are the normalised terminal
  advantages, `adv_scales` (N,) the factor each sample's reward was scaled by to get them
  (both from `rl.advantages`), `rewards` (N,) the raw rewards (RWR weights).

  The algorithm (`train.algorithm`, one of `ddpo_jax.algorithms`) says which trajectory fields
  the batch carries and gives the loss of one micro-step (`algorithms.base`), reading its typed
  hyperparameters (`Algorithm.hyperparameters(config)`, built here once, outside jit). The
  pieces: `_micro_batches` (shuffle, trained steps, micro-batches), `_update_frozen` (the
  fixed denoisers the loss reads), `_gradient_fn` (the micro-step gradient, per batch shard),
  `accumulated_step` (one optimizer step), the weight EMA; one `lax.scan` over the steps.

  KL penalty (`train.kl_coef` = α > 0, `algorithms.PolicyGradient`: PPO / SF): the objective is E[r] − α E[Σ_t KL_t], KL_t
  between the policy's and the pre-trained model's step at the sampled x_t
  (docs/algorithms.md §3.5). Its
  gradient has two parts, both on the advantages' scale: the score-function part, with the
  KL of the later steps in each step's return (`rl.kl_penalised_advantages`, from
  `traj.kl` as sampled), and the direct part, α · scale · ∇KL_t / D at the given x_t (D =
  latent dims: the log-prob is mean-reduced, so the score-function part carries 1/D too),
  against the reference step mean the sampler stored (`traj.reference_means`), so the update
  never runs the pre-trained model.
  The update's gradient is then the exact gradient of the objective times scale / (T · D)
  (tests/test_ctrl_gmm.py checks it against backpropagation through the chain).

  One call is one inner epoch over the whole batch of N trajectories: shuffle; per sample K =
  int(T·timestep_fraction) trained timesteps (DDIM: the first K of an independent permutation
  of its T; the flow samplers: its first K in order, or its SDE window's first K, as
  flow_grpo; DiffusionNFT: K of a per-sample permutation, as its train_nft_sd3.py); minibatches
  of `train.batch_size`; gradients averaged over K timesteps × `gradient_accumulation_steps`
  minibatches, then one optimizer step, then (`train.ema.enabled`) the weight EMA
  (`ema_update`, docs/algorithms.md §3.6). `state` is donated. DiffusionNFT's v_old is
  `state.old_params`, which this program never changes (`make_old_policy_fn` does, once per
  epoch), so several inner epochs all regress against the sampling policy.

  Communication: with the params replicated (`mesh.fsdp` = 1) and S > 1 batch shards, each
  shard accumulates the gradient of its own rows of every micro-batch (a `vmap` over a leading
  shard axis laid out over the devices), and the S partial sums are reduced once per optimizer
  step rather than once per micro-step (K × `gradient_accumulation_steps` times fewer
  all-reduces). With fsdp > 1 the gradient is reduce-scattered per micro-step, as the sharded
  accumulator needs. The RWR algorithms' denoising noise then depends on S (one key per shard).
  """
  tc = config.train
  algorithm = algorithms.get(tc.algorithm)
  hp = algorithm.hyperparameters(config)  # the algorithm's settings, fixed before tracing
  dynamics = dynamics_lib.make_dynamics(policy.denoiser, config.sample)
  layout = MicroBatchLayout(
      num_steps=config.sample.num_steps,
      trained_steps=dynamics_lib.trained_steps_per_sample(config.sample, tc.timestep_fraction),
      batch_size=tc.batch_size, accumulation=tc.gradient_accumulation_steps,
      in_order=config.sample.sampler != "ddim" and algorithm.flow_timesteps_in_order)
  ema, ema_calls = tc.ema, algorithm.ema_calls_per_step(config)
  guidance = float(config.sample.guidance_scale) if tc.cfg else 1.0
  _, frozen_sh, state_sh = model_shardings(policy, config, optimizer, mesh)
  per_shard = parallel.num_batch_shards(mesh) > 1 and mesh.shape.get(parallel.FSDP_AXIS, 1) == 1
  grad_fn = _gradient_fn(policy, algorithm, hp, dynamics, guidance, mesh, per_shard)

  def like_params(grads):  # gradients laid out like the params (fsdp: reduce-scattered)
    if not isinstance(state_sh, TrainState):
      return grads
    return jax.lax.with_sharding_constraint(grads, state_sh.params)
  shard_spec = jax.sharding.NamedSharding(mesh, parallel.batch_spec(mesh))
  accumulator_layout = ((lambda g: jax.lax.with_sharding_constraint(g, shard_spec))
                        if per_shard else like_params)

  def update(state: TrainState, frozen, traj: diffusion.Trajectory, advantages, adv_scales,
             rewards, key):
    k_perm, k_time, k_loss = jax.random.split(key, 3)
    batches, extra_metrics = _micro_batches(algorithm, hp, layout, mesh, traj, advantages,
                                            adv_scales, rewards, k_perm, k_time)
    uncond = policy.encode_uncond({**frozen, "unet": state.params})
    frozen = _update_frozen(policy, algorithm, config, state, frozen)

    def opt_step(state, xs):
      step_batches, step_key = xs
      keys = jax.random.split(step_key, layout.accumulation * layout.trained_steps)
      state, metrics = accumulated_step(
          state, optimizer, lambda p, x: grad_fn(p, frozen, uncond, *x), (step_batches, keys),
          accumulator_layout=accumulator_layout, per_shard=per_shard, constrain=like_params)
      if ema.enabled:  # the weight EMA, in this program: no extra dispatch or host sync
        state = state.replace(ema_params=ema_update(state.ema_params, state.params, state.step,
                                                    ema.decay, ema.update_interval, ema_calls))
      return state, metrics

    steps = jax.tree.leaves(batches)[0].shape[0]
    state, metrics = jax.lax.scan(opt_step, state, (batches, jax.random.split(k_loss, steps)))
    return state, {**jax.tree.map(jnp.mean, metrics), **extra_metrics}

  data, repl = parallel.data_sharding(mesh), parallel.replicated(mesh)
  return jax.jit(update, in_shardings=(state_sh, frozen_sh, data, data, data, data, repl),
                 out_shardings=(state_sh, repl), donate_argnums=(0,))


@dataclasses.dataclass(frozen=True)
class MicroBatchLayout:
  """How the update cuts an epoch's N trajectories into micro-batches (`_micro_batches`).

  num_steps: T, the sampled steps per trajectory.
  trained_steps: K, the steps trained per trajectory (`dynamics.trained_steps_per_sample`).
  batch_size: mb, the trajectories of one minibatch (`train.batch_size`).
  accumulation: minibatches per optimizer step (`train.gradient_accumulation_steps`).
  in_order: train each trajectory's first K steps of its window in order (flow_grpo), else K
    at random (`trained_step_indices`).
  """
  num_steps: int
  trained_steps: int
  batch_size: int
  accumulation: int
  in_order: bool


def _micro_batches(algorithm, hp, layout: MicroBatchLayout, mesh, traj: diffusion.Trajectory,
                   advantages, adv_scales, rewards, k_perm, k_time) -> tuple[dict, dict]:
  """The update's micro-batches of one inner epoch: `algorithm.batch_fields` plus the
  conditioning, shuffled (`k_perm`), each trajectory's K trained steps picked (`k_time`), cut
  into S = N / (mb · accumulation) optimizer steps of accumulation · K micro-batches of mb.

  Returns:
    ({field: (S, accumulation · K, mb, ...)} sharded over mb on the batch axes, the
    algorithm's epoch metrics).
  """
  T, K = layout.num_steps, layout.trained_steps
  mb, accum = layout.batch_size, layout.accumulation
  n = traj.log_probs.shape[0]
  perm = jax.random.permutation(k_perm, n)
  per_step, per_sample, extra_metrics = algorithm.batch_fields(traj, advantages, adv_scales,
                                                               rewards, hp)
  per_sample = {**per_sample, "context": traj.context, "class_labels": traj.class_labels}
  per_step = jax.tree.map(lambda x: x[perm], per_step)
  per_sample = jax.tree.map(lambda x: x[perm], per_sample)
  window = (jnp.ones((n, T), bool) if traj.trained_steps is None
            else traj.trained_steps[perm])
  t_idx = trained_step_indices(k_time, window, K, in_order=layout.in_order)

  def take_time(x):  # (N, T, ...) -> (N, K, ...)
    idx = t_idx.reshape(t_idx.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)
  per_step = jax.tree.map(take_time, per_step)

  steps = n // (mb * accum)
  data_spec = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(None, None, parallel.batch_spec(mesh)[0]))

  def to_micro(x, per_time):  # -> (steps, accum*K, mb, ...)
    if per_time:  # (N, K, ...) -> (steps, accum, mb, K, ...) -> (steps, accum, K, mb, ...)
      x = x.reshape((steps, accum, mb, K) + x.shape[2:])
      x = jnp.moveaxis(x, 3, 2)
    else:  # (N, ...) -> (steps, accum, K, mb, ...) by broadcasting over K
      x = x.reshape((steps, accum, 1, mb) + x.shape[1:])
      x = jnp.broadcast_to(x, (steps, accum, K, mb) + x.shape[4:])
    x = x.reshape((steps, accum * K, mb) + x.shape[4:])
    return jax.lax.with_sharding_constraint(x, data_spec)

  batches = {**jax.tree.map(lambda x: to_micro(x, True), per_step),
             **jax.tree.map(lambda x: to_micro(x, False), per_sample)}
  return batches, extra_metrics


def _update_frozen(policy: Policy, algorithm, config, state: TrainState, frozen: dict) -> dict:
  """`frozen` plus the fixed denoisers the loss reads, assembled once per update (e.g. LoRA
  merged), not in every micro-step: "sampling_unet" (`needs_sampling_params`: the params the
  samples were drawn with, the old policy when the state keeps one) and
  "reference_assembled" (`needs_reference_params`: the pre-trained model)."""
  if algorithm.needs_sampling_params:
    if algorithm.keeps_old_params and state.old_params is None:
      raise ValueError(f"train.algorithm={algorithm.name!r} samples with an old policy: build "
                       "the train state with train.new_train_state (old_params)")
    frozen = {**frozen, "sampling_unet": policy.assemble_denoiser(sampling_params(state), frozen)}
  if algorithm.needs_reference_params(config):
    frozen = {**frozen, "reference_assembled": policy.assemble_denoiser(frozen["reference_unet"],
                                                                       frozen)}
  return frozen


def _step_model(policy: Policy, dynamics, guidance: float, uncond, sampling_params=None,
                reference_params=None) -> algorithms.StepModel:
  """The policy's step computations with the update's guidance (`train.cfg`)."""
  denoiser = policy.denoiser

  def step_log_prob(unet_params, batch):
    return dynamics.step_log_prob(denoiser, unet_params, batch, uncond, guidance_scale=guidance)

  def guided_eps(p, x, t, context, labels):
    return diffusion.guided_eps(denoiser, p, x, t, context, uncond, guidance, labels,
                                denoiser.null_labels)

  def denoising_loss_terms(unet_params, batch, key):
    return diffusion.denoising_loss_terms(guided_eps, unet_params, key, batch["x0"],
                                          batch["context"], batch["class_labels"],
                                          dynamics.schedule.alphas_cumprod)

  def velocity(p, x, sigma, context):
    return diffusion.guided_eps(denoiser, p, x, sigma, context, uncond, guidance)
  return algorithms.StepModel(step_log_prob, denoising_loss_terms, velocity, sampling_params,
                              reference_params)


def _gradient_fn(policy: Policy, algorithm, hp, dynamics, guidance: float, mesh,
                 per_shard: bool):
  """`grad(params, frozen, uncond, micro_batch, key) -> (grads, metrics)` of
  `algorithm.loss` on one micro-batch (one trained timestep per sample), jitted.

  per_shard (params replicated, S > 1 batch shards): each device takes the gradient of its own
  rows, a leading (S, ...) axis laid out over the devices, reduced once per optimizer step
  (`accumulated_step`); the key is split into one per shard.
  """
  def micro_loss(unet_params, frozen, uncond, batch, key):
    unet_params = policy.assemble_denoiser(unet_params, frozen)  # e.g. LoRA factors beside the base
    sampling = frozen["sampling_unet"] if algorithm.needs_sampling_params else None
    model = _step_model(policy, dynamics, guidance, uncond, sampling,
                        frozen.get("reference_assembled"))
    return algorithm.loss(model, unet_params, batch, key, hp)

  local_grad_fn = jax.grad(micro_loss, has_aux=True)
  if not per_shard:
    grad_fn = local_grad_fn
  else:  # each device: the gradient of its own rows -> (S, ...) laid out over devices
    shards = parallel.num_batch_shards(mesh)
    batch_spec = parallel.batch_spec(mesh)
    P = jax.sharding.PartitionSpec

    def local_grads(params, frozen, uncond, batch, key):
      return jax.tree.map(lambda x: x[None], local_grad_fn(params, frozen, uncond, batch, key[0]))

    shard_grad_fn = jax.shard_map(local_grads, mesh=mesh,
                                  in_specs=(P(), P(), P(), batch_spec, batch_spec),
                                  out_specs=batch_spec, check_vma=False)

    def grad_fn(params, frozen, uncond, batch, key):
      return shard_grad_fn(params, frozen, uncond, batch, jax.random.split(key, shards))

  # One trace of the gradient: `accumulated_step` asks for its output shapes (`eval_shape`) and
  # then calls it in the micro-step scan with the same input types; as a jitted function the
  # second use reuses the first trace (about 1 s per trace of the tiny UNet's gradient on a
  # CPU) and XLA inlines it, so the compiled program is the same.
  return jax.jit(grad_fn)


def make_old_policy_fn(config, optimizer, policy: Policy, mesh):
  """Compiles `refresh(state) -> state`, DiffusionNFT's end of an epoch (train_nft_sd3.py, after
  the inner epochs): old <- d old + (1 - d) params with d = `nft_old_decay(state.step,
  train.nft_decay_type)`, `state.step` the optimizer steps taken so far; None when the config
  keeps no old policy. `state` is donated. Decay type 0 (d = 0) makes the old policy the
  current one, what ddpo_jax did before it kept one."""
  if not keeps_old_params(config):
    return None
  decay_type = int(config.train.nft_decay_type)
  _, _, state_sh = model_shardings(policy, config, optimizer, mesh)

  def refresh(state: TrainState) -> TrainState:
    d = nft_old_decay(state.step, decay_type)

    def one(old, p):
      dtype = jnp.promote_types(old.dtype, jnp.float32)
      return (old.astype(dtype) * d + p.astype(dtype) * (1.0 - d)).astype(old.dtype)
    return state.replace(old_params=jax.tree.map(one, state.old_params, state.params))

  return jax.jit(refresh, in_shardings=(state_sh,), out_shardings=state_sh, donate_argnums=(0,))


def accumulated_step(state: TrainState, optimizer: optax.GradientTransformation, grad_fn,
                     micro_batches, accumulator_layout=lambda g: g, per_shard: bool = False,
                     constrain=lambda g: g) -> tuple[TrainState, dict]:
  """One optimizer step from the mean gradient over micro-batches: the one gradient-accumulation
  routine of every trainer (DDPO's update, CTRL's backprop solver and CFG baseline).

  Args:
    state: the train state (its `params` are differentiated).
    optimizer: the optax transformation (`make_optimizer`).
    grad_fn: `(params, micro_batch) -> (grads, metrics)`; metrics a dict of scalars.
    micro_batches: a pytree whose leaves have a leading axis of M micro-batches, scanned over
      (one `lax.scan`: the gradient is traced once).
    accumulator_layout: the sharding constraint of the summed gradients (e.g. laid out like the
      params, or per batch shard).
    per_shard: `grad_fn` returns one gradient per batch shard (a leading shard axis); they are
      averaged once here, after the scan: one all-reduce per optimizer step.
    constrain: the sharding constraint of the final gradient (e.g. reduce-scattered for fsdp).

  Returns:
    (the state after the step, metrics: the micro-batches' mean metrics + `grad_norm`).
  """
  num_micro = jax.tree.leaves(micro_batches)[0].shape[0]

  def micro(acc, batch):
    return jax.tree.map(jnp.add, acc, grad_fn(state.params, batch)), None

  zeros = jax.eval_shape(grad_fn, state.params, jax.tree.map(lambda x: x[0], micro_batches))
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
  zeros = (accumulator_layout(zeros[0]), zeros[1])
  (grads, metrics), _ = jax.lax.scan(micro, zeros, micro_batches)
  if per_shard:  # the one gradient all-reduce of this optimizer step
    grads = jax.tree.map(lambda g: jnp.mean(g, axis=0), grads)
    metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)
  scale = 1.0 / num_micro
  grads = constrain(jax.tree.map(lambda g: g * scale, grads))
  metrics = jax.tree.map(lambda m: m * scale, metrics)
  metrics["grad_norm"] = optax.tree.norm(grads)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def frozen_params(policy: Policy, config) -> dict:
  """The params the update reads but never trains (+ the pre-trained UNet for the KL penalty)."""
  frozen = {k: v for k, v in policy.params.items() if k != "unet"}
  if config.train.kl_coef > 0 or config.train.kl_beta > 0:
    frozen["reference_unet"] = policy.params["unet"]
  return frozen


@jax.jit
def _all_finite(params) -> jax.Array:
  return jax.tree.reduce(jnp.logical_and, jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)), params))


def params_finite(params) -> bool:
  """Whether every parameter is finite (a collective when `params` span several processes); one
  compiled program (eagerly, two small programs per parameter shape)."""
  return bool(parallel.to_host(_all_finite(params)))
