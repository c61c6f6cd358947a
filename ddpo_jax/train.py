"""DDPO training: sample trajectories, reward them, update with PPO (or SF / RWR), checkpoint.

One epoch = `sample.num_batches_per_epoch` calls of the compiled sampling program (prompt
encoding, the DDIM chain with log-probs, decoding and device rewards), host rewards on a thread
pool overlapping with sampling, advantages from the per-prompt stat tracker, then
`train.num_inner_epochs` calls of the compiled update program (shuffle, per-sample timestep
subsampling, gradient accumulation over K timesteps × `gradient_accumulation_steps`
minibatches, one optimizer step per group). Both programs run under one device mesh
(`config.mesh`: data × fsdp) with explicit shardings, are compiled ahead of time before the
first epoch, and the train state is donated to the update.

Multi-host: every process draws the same global prompts, samples and rewards its own rows
(`parallel.process_rows`) and gathers all rewards, so the stat tracker and advantages are the
same everywhere; the update is one program over all devices; checkpoints are written by Orbax
from all processes. Batch sizes are global (all devices of all hosts together); the PyTorch
reference's are per GPU.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm

from ddpo_jax import checkpoints, diffusion, parallel, rl
from ddpo_jax.policy import Policy, build_policy
from ddpo_jax.rewards import Reward, make_rewards, to_uint8

ALGORITHMS = ("ppo", "sf", "rwr", "rwr_sparse")


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # optimizer steps taken, int32 scalar
  params: Any  # the trainable denoiser params
  opt_state: Any
  rng: jax.Array  # base PRNG key of the run; epoch e uses fold_in(rng, e)


def validate_shared_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError for impossible values of the sections every trainer reads (the
  optimizer, the sampler's guidance, checkpoint retention): DDPO's and CTRL's `validate_config`."""
  t = config.train
  checks = [("train.learning_rate", t.learning_rate, ">= 0", t.learning_rate >= 0),
            ("train.control_learning_rate", t.get("control_learning_rate", 0.0), ">= 0",
             t.get("control_learning_rate", 0.0) >= 0),
            ("train.max_grad_norm", t.max_grad_norm, "> 0 (the global-norm clip)",
             t.max_grad_norm > 0),
            ("train.adam_epsilon", t.adam_epsilon, "> 0", t.adam_epsilon > 0),
            ("sample.guidance_scale", config.sample.guidance_scale, ">= 0 (1: no guidance)",
             config.sample.guidance_scale >= 0),
            ("keep_checkpoints", config.keep_checkpoints, ">= 0 (0 keeps all)",
             int(config.keep_checkpoints) >= 0)]
  for name, value, rule, ok in checks:
    if not ok:
      raise ValueError(f"{name}={value} must be {rule}")


def validate_config(config: ml_collections.ConfigDict, mesh) -> None:
  """Raises ValueError for impossible values, before anything is compiled."""
  validate_shared_config(config)
  s, t = config.sample, config.train
  if t.algorithm == "ppo" and not t.clip_range > 0:
    raise ValueError(f"train.clip_range={t.clip_range} must be > 0 (the PPO ratio clip, 1 ± ε)")
  if not s.eta > 0:
    raise ValueError(f"sample.eta={s.eta}: DDPO needs eta > 0 (the log-probability of a "
                     "deterministic DDIM step is undefined)")
  if not 0 < t.timestep_fraction <= 1:
    raise ValueError(f"train.timestep_fraction={t.timestep_fraction} must lie in (0, 1]")
  if t.algorithm not in ALGORITHMS:
    raise ValueError(f"train.algorithm={t.algorithm!r}; choose one of {ALGORITHMS}")
  for name, value in [("sample.batch_size", s.batch_size), ("train.batch_size", t.batch_size),
                      ("sample.num_batches_per_epoch", s.num_batches_per_epoch),
                      ("sample.num_steps", s.num_steps), ("num_epochs", config.num_epochs),
                      ("train.gradient_accumulation_steps", t.gradient_accumulation_steps),
                      ("train.num_inner_epochs", t.num_inner_epochs), ("save_freq", config.save_freq)]:
    if int(value) < 1:
      raise ValueError(f"{name}={value} must be a positive integer")
  parallel.check_divisible("sample.batch_size", s.batch_size, mesh)
  parallel.check_divisible("train.batch_size", t.batch_size, mesh)
  total = s.batch_size * s.num_batches_per_epoch
  group = t.batch_size * t.gradient_accumulation_steps
  if total % group:
    raise ValueError(
        f"samples per epoch (sample.batch_size*sample.num_batches_per_epoch={total}) must be a "
        f"multiple of train.batch_size*train.gradient_accumulation_steps={group}")
  if t.algorithm == "sf" and (total != group or int(t.num_inner_epochs) != 1):
    # DDPO-SF's gradient is the score-function gradient at the sampling params: a second step
    # on the same samples would be off-policy without an importance weight (that is DDPO-IS).
    raise ValueError(
        f"train.algorithm='sf' takes one optimizer step per data collection (DDPO-SF, Black et "
        f"al. 2023, section 4.2): set train.batch_size*train.gradient_accumulation_steps={group} "
        f"equal to the samples per epoch (sample.batch_size*sample.num_batches_per_epoch="
        f"{total}) and train.num_inner_epochs=1 (got {t.num_inner_epochs})")
  if t.kl_coef < 0 or (t.kl_coef > 0 and t.algorithm not in ("ppo", "sf")):
    raise ValueError(f"train.kl_coef={t.kl_coef}: the KL penalty needs kl_coef >= 0 and "
                     f"train.algorithm 'ppo' or 'sf' (got {t.algorithm!r})")
  if t.kl_coef > 0 and not t.cfg and float(s.guidance_scale) != 1.0:
    raise ValueError(
        f"train.kl_coef={t.kl_coef} with train.cfg=False and sample.guidance_scale="
        f"{s.guidance_scale}: the KL penalty compares the sampled (guided) steps, so the update "
        "must recompute them with guidance too (train.cfg=True), or sample without it")
  if int(s.num_steps * t.timestep_fraction) < 1:
    raise ValueError("sample.num_steps * train.timestep_fraction must be at least 1")


def make_optimizer(train_config) -> optax.GradientTransformation:
  """Global-norm clip, then AdamW.

  With `train.control_learning_rate` > 0 (CTRL runs), the params' top-level "control" subtree
  (the control-embedding tables) is trained at that rate and every other subtree at
  `train.learning_rate`; otherwise one rate for all.
  """
  def adamw(lr):
    return optax.adamw(lr, b1=train_config.adam_beta1, b2=train_config.adam_beta2,
                       eps=train_config.adam_epsilon, weight_decay=train_config.adam_weight_decay,
                       mu_dtype=train_config.get("adam_mu_dtype") or None)

  control_lr = train_config.get("control_learning_rate", 0.0)
  if not control_lr:
    inner = adamw(train_config.learning_rate)
  else:
    def labels(params):
      return {k: jax.tree.map(lambda _, k=k: "control" if k == "control" else "rest", v)
              for k, v in params.items()}
    inner = optax.multi_transform({"control": adamw(control_lr),
                                   "rest": adamw(train_config.learning_rate)}, labels)
  return optax.chain(optax.clip_by_global_norm(train_config.max_grad_norm), inner)


def _schedule(policy: Policy, num_steps: int):
  """(NoiseSchedule, DDIM timesteps (T,), previous timesteps (T,)) of the policy."""
  sched = diffusion.NoiseSchedule.from_config(policy.scheduler_config)
  return (sched, *sched.ddim_timesteps(num_steps))


def make_sample_fn(policy: Policy, config, device_rewards: list[tuple[float, Reward]], mesh):
  """Compiles `sample(unet_params, frozen, key, prompt_ids, metadata) -> (Trajectory, images, rewards)`.

  `images` are (B,h,w,c) float32 in [0, 1]; `rewards` maps each device reward's name to
  (rewards (B,), info). Prompt ids / metadata come sharded over the data axis. With
  `train.kl_coef` > 0 the trajectory also carries each step's KL to the pre-trained model
  (`frozen["reference_unet"]`) and that model's step means, for the KL-penalised update (one
  more UNet call per step).
  """
  sched, timesteps, prev = _schedule(policy, config.sample.num_steps)
  uncond_ids = jnp.asarray(policy.tokenize([""]))
  guidance = float(config.sample.guidance_scale)
  use_kl = config.train.kl_coef > 0

  def sample(unet_params, frozen, key, prompt_ids, metadata):
    params = {**frozen, "unet": unet_params}
    context = policy.encode_prompts(params, prompt_ids)
    uncond = policy.encode_prompts(params, uncond_ids)
    traj = diffusion.sample_trajectory(
        policy.eps_fn, policy.assemble_unet(unet_params, frozen), key, context, uncond,
        alphas_cumprod=sched.alphas_cumprod,
        timesteps=timesteps, prev_timesteps=prev, latent_shape=policy.latent_shape,
        eta=config.sample.eta, guidance_scale=guidance,
        class_labels=metadata.get("control_label"),
        uncond_class_labels=policy.null_class_labels,
        final_alpha_cumprod=sched.final_alpha_cumprod,
        reference_params=(policy.assemble_unet(frozen["reference_unet"], frozen)
                          if use_kl else None),
        kl_reduction=config.train.kl_reduction)
    images = policy.decode(params, traj.next_latents[:, -1])
    rewards = {r.name: r.fn(images, prompt_ids, metadata) for _, r in device_rewards}
    return traj, images, rewards

  data, repl = parallel.data_sharding(mesh), parallel.replicated(mesh)
  params_sh, frozen_sh, _ = _model_shardings(policy, config, None, mesh)
  return jax.jit(sample, in_shardings=(params_sh, frozen_sh, repl, data, data), out_shardings=data)


def _model_shardings(policy: Policy, config, optimizer, mesh):
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
        lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=optimizer.init(p),
                             rng=jax.random.PRNGKey(0)), unet), mesh, min_size)
  return (parallel.param_shardings(unet, mesh, min_size),
          parallel.param_shardings(frozen, mesh, min_size), state)


def make_update_fn(policy: Policy, config, optimizer, mesh):
  """Compiles `update(state, frozen, traj, advantages, adv_scales, rewards, key) -> (state, metrics)`.

  `frozen` holds the non-trained params (`frozen_params`; its `reference_unet` is the
  sampler's, unused here). `advantages` (N,) are the normalised terminal
  advantages, `adv_scales` (N,) the factor each sample's reward was scaled by to get them
  (`rl.normalize_advantages` / `PerPromptStatTracker.update` with `return_scale`), `rewards`
  (N,) the raw rewards (RWR weights).

  KL penalty (`train.kl_coef` = α > 0, PPO / SF): the objective is E[r] − α E[Σ_t KL_t], KL_t
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

  One call is one inner epoch over the whole batch of N trajectories: shuffle; per sample an
  independent permutation of its T timesteps of which the first K = int(T·timestep_fraction)
  are trained on; minibatches of `train.batch_size`; gradients averaged over K timesteps ×
  `gradient_accumulation_steps` minibatches, then one optimizer step. `state` is donated.

  Communication: with the params replicated (`mesh.fsdp` = 1) and S > 1 batch shards, each
  shard accumulates the gradient of its own rows of every micro-batch (a `vmap` over a leading
  shard axis laid out over the devices), and the S partial sums are reduced once per optimizer
  step rather than once per micro-step (K × `gradient_accumulation_steps` times fewer
  all-reduces). With fsdp > 1 the gradient is reduce-scattered per micro-step, as the sharded
  accumulator needs. The RWR algorithms' denoising noise then depends on S (one key per shard).
  """
  tc = config.train
  sched, _, _ = _schedule(policy, config.sample.num_steps)
  step_kw = dict(alphas_cumprod=sched.alphas_cumprod, final_alpha_cumprod=sched.final_alpha_cumprod,
                 eta=config.sample.eta)
  uncond_ids = jnp.asarray(policy.tokenize([""]))
  T = config.sample.num_steps
  K = int(T * tc.timestep_fraction)
  accum, mb = tc.gradient_accumulation_steps, tc.batch_size
  guidance = float(config.sample.guidance_scale) if tc.cfg else 1.0
  use_kl = tc.kl_coef > 0
  latent_dims = int(np.prod(policy.latent_shape))
  _, frozen_sh, state_sh = _model_shardings(policy, config, optimizer, mesh)
  shards = parallel.num_batch_shards(mesh)
  per_shard = shards > 1 and mesh.shape.get(parallel.FSDP_AXIS, 1) == 1
  shard_spec = jax.sharding.NamedSharding(mesh, parallel.batch_spec(mesh))

  def _constrain(grads):  # gradients laid out like the params (fsdp: reduce-scattered)
    if not isinstance(state_sh, TrainState):
      return grads
    return jax.lax.with_sharding_constraint(grads, state_sh.params)

  def micro_loss(unet_params, frozen, uncond, batch, key):
    """Loss of one minibatch at one chosen timestep per sample. Returns (loss, metrics)."""
    metrics = {}
    unet_params = policy.assemble_unet(unet_params, frozen)  # e.g. LoRA merged into the base
    if tc.algorithm in ("rwr", "rwr_sparse"):
      # With train.cfg the regression target is the guided eps, as in the original's RWR
      # (`train_cfg`: eps_u + w (eps_c - eps_u) against the noise).
      def eps_fn(p, x, t, context, labels):
        return diffusion.guided_eps(policy.eps_fn, p, x, t, context, uncond, guidance, labels,
                                    policy.null_class_labels)
      per_sample = diffusion.denoising_loss_terms(
          eps_fn, unet_params, key, batch["x0"], batch["context"],
          batch["class_labels"], sched.alphas_cumprod)
      loss = jnp.mean(batch["weights"] * per_sample)
      return loss, {"loss": loss}
    log_prob, mean, std = diffusion.step_log_prob(
        policy.eps_fn, unet_params, batch["latents"], batch["timesteps"],
        batch["prev_timesteps"], batch["next_latents"], batch["context"], uncond,
        guidance_scale=guidance, class_labels=batch["class_labels"],
        uncond_class_labels=policy.null_class_labels, **step_kw)
    if tc.algorithm == "ppo":
      loss, info = rl.ppo_clipped_loss(log_prob, batch["log_probs"], batch["advantages"],
                                       tc.clip_range, tc.adv_clip_max)
      metrics.update(approx_kl=info["approx_kl"], clipfrac=info["clipfrac"])
    else:  # "sf"
      loss = rl.score_function_loss(log_prob, batch["advantages"], tc.adv_clip_max)
      diff = log_prob - batch["log_probs"]
      metrics.update(approx_kl=0.5 * jnp.mean(diff ** 2), clipfrac=jnp.zeros(()))
    if use_kl:  # the reference's step mean at this x_t, as the sampler computed it
      kl = diffusion.gaussian_kl_shared_std(mean, batch["reference_means"], std,
                                            reduction=tc.kl_reduction)
      metrics["kl_to_pretrained"] = jnp.mean(kl)
      loss = loss + jnp.mean(batch["kl_weights"] * kl)
    metrics["loss"] = loss
    return loss, metrics

  grad_fn = local_grad_fn = jax.grad(micro_loss, has_aux=True)
  if per_shard:  # each device: the gradient of its own rows -> (S, ...) laid out over devices
    batch_spec = parallel.batch_spec(mesh)
    P = jax.sharding.PartitionSpec

    def local_grads(params, frozen, uncond, batch, key):
      return jax.tree.map(lambda x: x[None], local_grad_fn(params, frozen, uncond, batch, key[0]))

    shard_grad_fn = jax.shard_map(local_grads, mesh=mesh, in_specs=(P(), P(), P(), batch_spec, batch_spec),
                                  out_specs=batch_spec, check_vma=False)

    def grad_fn(params, frozen, uncond, batch, key):
      return shard_grad_fn(params, frozen, uncond, batch, jax.random.split(key, shards))

  # One trace of the gradient: `opt_step` asks for its output shapes (`eval_shape`) and then
  # calls it in the micro-step scan with the same input types; as a jitted function the second
  # use reuses the first trace (about 1 s per trace of the tiny UNet's gradient on a CPU) and
  # XLA inlines it, so the compiled program is the same.
  grad_fn = jax.jit(grad_fn)

  def update(state: TrainState, frozen, traj: diffusion.Trajectory, advantages, adv_scales,
             rewards, key):
    n = traj.log_probs.shape[0]
    k_perm, k_time, k_loss = jax.random.split(key, 3)
    perm = jax.random.permutation(k_perm, n)
    per_sample = {
        "latents": traj.latents, "next_latents": traj.next_latents,
        "timesteps": traj.timesteps, "prev_timesteps": traj.prev_timesteps,
        "log_probs": traj.log_probs,
    }
    shared = {"context": traj.context, "class_labels": traj.class_labels,
              "x0": traj.next_latents[:, -1]}
    extra_metrics = {}
    if use_kl:  # per-step advantages of r − α Σ KL, and the direct term's weight
      per_sample["reference_means"] = traj.reference_means
      per_sample["advantages"] = rl.kl_penalised_advantages(advantages, adv_scales, traj.kl,
                                                            tc.kl_coef)
      # `gaussian_log_prob` is mean-reduced over the D latent dims (DDPO's convention), so the
      # score-function part is 1/D of the exact one; the direct part gets the same 1/D.
      shared["kl_weights"] = tc.kl_coef * adv_scales / latent_dims
      extra_metrics["path_kl"] = jnp.mean(jnp.sum(traj.kl, axis=1))
    else:
      shared["advantages"] = advantages
    if tc.algorithm == "rwr":
      shared["weights"] = rl.rwr_weights(rewards, tc.rwr_beta)
    elif tc.algorithm == "rwr_sparse":
      shared["weights"] = rl.rwr_sparse_weights(rewards, tc.rwr_quantile)
    per_sample = jax.tree.map(lambda x: x[perm], per_sample)
    shared = jax.tree.map(lambda x: x[perm], shared)
    # Per sample, an independent permutation of its T timesteps; keep the first K.
    t_idx = jax.vmap(lambda k: jax.random.permutation(k, T)[:K])(jax.random.split(k_time, n))

    def take_time(x):  # (N, T, ...) -> (N, K, ...)
      idx = t_idx.reshape(t_idx.shape + (1,) * (x.ndim - 2))
      return jnp.take_along_axis(x, idx, axis=1)
    per_sample = jax.tree.map(take_time, per_sample)

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

    batches = {**jax.tree.map(lambda x: to_micro(x, True), per_sample),
               **jax.tree.map(lambda x: to_micro(x, False), shared)}
    uncond = policy.encode_prompts({**frozen, "unet": state.params}, uncond_ids)

    def opt_step(carry, xs):
      state = carry
      step_batches, step_key = xs

      def micro(acc, inp):
        batch, k = inp
        grads, metrics = grad_fn(state.params, frozen, uncond, batch, k)
        return jax.tree.map(jnp.add, acc, (grads, metrics)), None

      keys = jax.random.split(step_key, accum * K)
      zeros = jax.eval_shape(grad_fn, state.params, frozen, uncond,
                             jax.tree.map(lambda x: x[0], step_batches), keys[0])
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
      zeros = (jax.lax.with_sharding_constraint(zeros[0], shard_spec) if per_shard
               else _constrain(zeros[0]), zeros[1])
      (grads, metrics), _ = jax.lax.scan(micro, zeros, (step_batches, keys))
      if per_shard:  # the one gradient all-reduce of this optimizer step
        grads = jax.tree.map(lambda g: jnp.mean(g, axis=0), grads)
        metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)
      scale = 1.0 / (accum * K)
      grads = _constrain(jax.tree.map(lambda g: g * scale, grads))
      metrics = jax.tree.map(lambda m: m * scale, metrics)
      metrics["grad_norm"] = optax.tree.norm(grads)
      updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
      return state, metrics

    state, metrics = jax.lax.scan(opt_step, state, (batches, jax.random.split(k_loss, steps)))
    return state, {**jax.tree.map(jnp.mean, metrics), **extra_metrics}

  data, repl = parallel.data_sharding(mesh), parallel.replicated(mesh)
  return jax.jit(update, in_shardings=(state_sh, frozen_sh, data, data, data, data, repl),
                 out_shardings=(state_sh, repl), donate_argnums=(0,))


def frozen_params(policy: Policy, config) -> dict:
  """The params the update reads but never trains (+ the pre-trained UNet for the KL penalty)."""
  frozen = {k: v for k, v in policy.params.items() if k != "unet"}
  if config.train.kl_coef > 0:
    frozen["reference_unet"] = policy.params["unet"]
  return frozen


class MetricsWriter:
  """WORKDIR/metrics.jsonl (one object per epoch) plus TensorBoard summaries."""

  def __init__(self, workdir: str, resume_epoch: int, log=print):
    self.path = os.path.join(workdir, "metrics.jsonl")
    # Drop rows of epochs after the checkpoint we resume from: they are recomputed. A last line
    # cut short by a crash (no newline, not valid JSON) is dropped too, and said.
    if os.path.exists(self.path):
      with open(self.path) as f:
        lines = f.read().split("\n")
      rows = []
      for i, line in enumerate(lines):
        if not line.strip():
          continue
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError:
          if any(l.strip() for l in lines[i + 1:]):
            raise ValueError(f"{self.path}: line {i + 1} is not valid JSON and is not the last "
                             f"line (not a write cut short by a crash): {line[:200]!r}")
          log(f"{self.path}: dropping its last line, cut short (not valid JSON): {line[:200]!r}")
      self._write_rows([row for row in rows if row["epoch"] < resume_epoch])
    # TensorBoard's writer is made on a thread: importing tensorboardX imports PyTorch when it
    # is installed (~1.5 s), which then overlaps the compilation that follows.
    pool = concurrent.futures.ThreadPoolExecutor(1)
    self._tb = pool.submit(_summary_writer, os.path.join(workdir, "tensorboard"))
    pool.shutdown(wait=False)

  @property
  def tb(self):
    return self._tb.result()

  def _write_rows(self, rows: list[dict]) -> None:
    tmp = self.path + ".tmp"  # replaced in one rename: a crash leaves the old or the new file
    with open(tmp, "w") as f:
      for row in rows:
        f.write(json.dumps(row) + "\n")
    os.replace(tmp, self.path)

  def keep_epochs_before(self, epoch: int) -> None:
    """Drops the rows of `epoch` and later (after a run stops: those past its last checkpoint)."""
    if os.path.exists(self.path):
      with open(self.path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
      self._write_rows([row for row in rows if row["epoch"] < epoch])

  def write(self, epoch: int, metrics: dict) -> None:
    row = {"epoch": epoch, **{k: float(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    for k, v in row.items():
      if k != "epoch":
        self.tb.add_scalar(k, v, epoch)
    self.tb.flush()

  def images(self, epoch: int, images_uint8: np.ndarray, workdir: str) -> str:
    grid = image_grid(images_uint8[:64])
    path = os.path.join(workdir, "samples", f"epoch_{epoch:05d}.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    from PIL import Image
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).resize(
        (grid.shape[1] * max(1, 256 // grid.shape[1]), grid.shape[0] * max(1, 256 // grid.shape[1])),
        Image.NEAREST).save(path)
    self.tb.add_image("samples", grid, epoch, dataformats="HWC")
    return path


def _summary_writer(logdir: str):
  from tensorboardX import SummaryWriter
  return SummaryWriter(logdir)


def image_grid(images: np.ndarray, pad: int = 1, cols: int | None = None) -> np.ndarray:
  """(N,H,W,C) uint8 -> one (rows*(H+pad), cols*(W+pad), C) uint8 grid, row-major.

  `cols` defaults to ceil(sqrt(N)).
  """
  n, h, w, c = images.shape
  cols = int(np.ceil(np.sqrt(n))) if cols is None else cols
  rows = int(np.ceil(n / cols))
  grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), np.uint8)
  for i, img in enumerate(images):
    r, q = divmod(i, cols)
    grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = img
  return grid


def _host_reward(reward: Reward, images, prompts, metadata):
  """A host reward of this process's rows; `images` is a global array (read locally here)."""
  rewards, info = reward.fn(to_uint8(parallel.local_rows(images)), prompts, metadata)
  numeric = {k: np.atleast_1d(np.asarray(v)) for k, v in info.items()}
  # Only numeric info is logged (a remote scorer may also return e.g. the VLM's answers).
  return np.asarray(rewards, np.float32), {k: v for k, v in numeric.items()
                                           if np.issubdtype(v.dtype, np.number)}


def enable_compilation_cache(path: str, log=print) -> None:
  """Turns on JAX's persistent compilation cache in `path` ("" = leave it off)."""
  if not path:
    return
  path = os.path.abspath(os.path.expanduser(path))
  os.makedirs(path, exist_ok=True)
  if jax.config.jax_compilation_cache_dir != path:
    from jax.experimental.compilation_cache import compilation_cache
    jax.config.update("jax_compilation_cache_dir", path)
    compilation_cache.reset_cache()  # takes effect even after earlier compilations
  log(f"persistent compilation cache: {path}")


def _abstract(x, sharding=None, batch: int | None = None):
  """ShapeDtypeStruct of an array (leading dim replaced by `batch` when given)."""
  shape = tuple(x.shape) if batch is None else (batch,) + tuple(x.shape[1:])
  return jax.ShapeDtypeStruct(shape, x.dtype, sharding=sharding if sharding is not None else
                              getattr(x, "sharding", None))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, log=print,
                       allow_config_change: tuple[str, ...] = ()) -> dict:
  """Runs (or resumes) DDPO training in `workdir`; returns the last epoch's metrics.

  Resuming restores the newest intact checkpoint (`checkpoints.RunCheckpoints`); its saved
  config must equal `config` except in `checkpoints.CHANGEABLE_ON_RESUME` and the keys (or
  fnmatch patterns) of `allow_config_change`. If the run stops on an error (a failed save
  included), metrics.jsonl is cut back to the epochs of the last committed checkpoint.

  In a multi-process run every process calls this with the same config and workdir (on a
  filesystem all hosts share); process 0 writes metrics, image grids and the log.
  """
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  main_process = parallel.is_main_process()
  if not main_process:
    log = lambda *a, **k: None  # noqa: E731
  enable_compilation_cache(config.get("compilation_cache_dir", ""), log)
  parallel.check_same_on_all_processes("config", config.to_json())
  mesh = parallel.make_mesh(config.get("mesh"))
  validate_config(config, mesh)
  policy = build_policy(config, workdir)
  terms = make_rewards(config, policy)
  device_terms = [(w, r) for w, r in terms if r.on_device]
  host_terms = [(w, r) for w, r in terms if not r.on_device]
  optimizer = make_optimizer(config.train)
  repl, data = parallel.replicated(mesh), parallel.data_sharding(mesh)
  params_sh, frozen_sh, state_sh = _model_shardings(policy, config, optimizer, mesh)

  if isinstance(params_sh, jax.sharding.Sharding):
    fsdp_note = ""
  else:
    leaves = list(zip(jax.tree.leaves(policy.params["unet"]), jax.tree.leaves(params_sh)))
    split = [x.size for x, sh in leaves if parallel.FSDP_AXIS in jax.tree.leaves(tuple(sh.spec))]
    fsdp_note = (f"; fsdp splits {len(split)} of {len(leaves)} trainable parameter arrays "
                 f"({sum(split) / max(1, sum(x.size for x, _ in leaves)):.0%} of the elements)")
  # `put` copies: the train state is donated to the update, the pre-trained params must survive.
  frozen = parallel.put(frozen_params(policy, config), frozen_sh)
  unet0 = parallel.put(policy.params["unet"], params_sh)
  opt_sh = state_sh.opt_state if isinstance(state_sh, TrainState) else repl
  state = TrainState(step=parallel.put(np.zeros((), np.int32), repl), params=unet0,
                     opt_state=jax.jit(optimizer.init, out_shardings=opt_sh)(unet0),
                     rng=parallel.put(jax.random.PRNGKey(config.seed), repl))
  tracker = rl.PerPromptStatTracker(config.per_prompt_stat_tracking.buffer_size,
                                    config.per_prompt_stat_tracking.min_count)

  ckpts = checkpoints.RunCheckpoints(workdir, config, allow_config_change, log)
  state, meta = ckpts.start(state, {"epoch": 0, "stat_tracker": tracker.state_dict()})
  tracker.load_state_dict(meta["stat_tracker"])
  start_epoch = int(meta["epoch"])
  writer = MetricsWriter(workdir, start_epoch, log) if main_process else None
  log(f"training on {parallel.describe_mesh(mesh)}{fsdp_note}")

  B, nb = config.sample.batch_size, config.sample.num_batches_per_epoch
  rows = parallel.process_rows(mesh, B)  # this process's rows of every sampled batch
  rows_epoch = parallel.process_rows(mesh, B * nb)  # ... and of the epoch's concatenation
  rng_host = np.asarray(parallel.to_host(state.rng))

  def local_batch(epoch, b):
    """(global prompts, this process's prompts, their metadata) of batch b of `epoch`."""
    prompts = policy.prompt_fn(np.random.default_rng([config.seed, epoch, b]), B)
    local = list(prompts[rows])
    return prompts, local, {k: np.asarray(v) for k, v in policy.prompt_metadata(local).items()}

  def put_key(*folds):
    key = rng_host
    for f in folds:
      key = jax.random.fold_in(key, f)
    return parallel.put(np.asarray(key), repl)

  # Ahead-of-time compilation of both programs (shapes from the first batch's host data).
  _, local0, meta0 = local_batch(start_epoch, 0)
  ids0 = policy.tokenize(local0)
  key_abs = _abstract(rng_host, repl)
  t0 = time.time()
  sample_fn = make_sample_fn(policy, config, device_terms, mesh).lower(
      state.params, frozen, key_abs, _abstract(ids0, data, B),
      {k: _abstract(v, data, B) for k, v in meta0.items()}).compile()
  t_compile_sample = time.time() - t0
  traj_abs = jax.tree.map(lambda x: _abstract(x, data, B * nb), sample_fn.out_info[0])
  t0 = time.time()
  update_fn = make_update_fn(policy, config, optimizer, mesh).lower(
      state, frozen, traj_abs, *[jax.ShapeDtypeStruct((B * nb,), jnp.float32, sharding=data)] * 3,
      key_abs).compile()
  t_compile_update = time.time() - t0
  log(f"compiled the sample step in {t_compile_sample:.1f} s and the update step in "
      f"{t_compile_update:.1f} s")
  concat = jax.jit(lambda trajs: jax.tree.map(lambda *xs: jnp.concatenate(xs), *trajs),
                   out_shardings=data)

  pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)
  last = {}
  try:
    for epoch in range(start_epoch, config.num_epochs):
      t0 = time.time()
      trajs, futures, all_prompts, dev_rewards = [], [], [], []
      grid_images = None  # the first batch's images, for the sample grid
      for b in tqdm.trange(nb, desc=f"epoch {epoch} sampling", leave=False,
                           disable=not (config.progress and main_process)):
        prompts, local, meta = local_batch(epoch, b)
        ids = parallel.to_global(policy.tokenize(local), mesh)
        meta_dev = parallel.to_global(meta, mesh)
        traj, images, rewards = sample_fn(state.params, frozen, put_key(epoch, b), ids, meta_dev)
        # Host rewards of this process's rows run on the pool while the device samples on.
        futures.append({r.name: pool.submit(_host_reward, r, images, local, meta)
                        for _, r in host_terms})
        trajs.append(traj)
        all_prompts.extend(prompts)
        dev_rewards.append(rewards)
        if grid_images is None:
          grid_images = images
      traj = concat(trajs)
      # The sampling program runs asynchronously: its time ends when its results are ready.
      jax.block_until_ready((traj, dev_rewards))
      t_sampled = time.time()

      total = np.zeros(B * nb, np.float32)
      epoch_metrics = {}
      for w, r in terms:  # every process gathers every reward, in the same order
        if r.on_device:
          parts = [parallel.to_host(d[r.name]) for d in dev_rewards]
        else:
          parts = [parallel.gather_rows(fs[r.name].result()) for fs in futures]
        values = np.concatenate([p[0] for p in parts]).astype(np.float32)
        if not np.all(np.isfinite(values)):
          raise FloatingPointError(f"epoch {epoch}: reward {r.name!r} returned NaN/inf; "
                                   "stopping without saving this epoch")
        total += w * values
        epoch_metrics[f"{r.name}_mean"] = values.mean()
        for k in parts[0][1]:
          epoch_metrics[f"{r.name}_{k}_mean"] = np.concatenate([np.asarray(p[1][k]).reshape(-1) for p in parts]).mean()

      if config.per_prompt_stat_tracking.enabled:
        advantages, scales = tracker.update(all_prompts, total, return_scale=True)
      else:
        advantages, scales = rl.normalize_advantages(total, return_scale=True)
      adv_dev, scale_dev = (parallel.to_global(a.astype(np.float32)[rows_epoch], mesh)
                            for a in (advantages, scales))
      rew_dev = parallel.to_global(total[rows_epoch], mesh)

      t_rewarded = time.time()  # host rewards (overlapping sampling until then), advantages
      for inner in range(config.train.num_inner_epochs):
        state, metrics = update_fn(state, frozen, traj, adv_dev, scale_dev, rew_dev,
                                   put_key(epoch, 10_000, inner))
      metrics = parallel.to_host(metrics)
      params_ok = _params_finite(state.params)
      t_updated = time.time()
      if not all(np.isfinite(v) for v in metrics.values()) or not params_ok:
        raise FloatingPointError(f"epoch {epoch}: non-finite loss or parameters ({metrics}); "
                                 "stopping without saving this epoch")
      n = B * nb
      last = {"reward_mean": total.mean(), "reward_std": total.std(),
              "reward_stderr": total.std() / np.sqrt(n), **epoch_metrics,
              **{k: v for k, v in metrics.items()},
              # Phase wall times (s); they add up to epoch_time_s (checkpointing and image
              # grids come after it).
              "samples_per_s": n / (t_updated - t0), "epoch_time_s": t_updated - t0,
              "sample_time_s": t_sampled - t0, "reward_time_s": t_rewarded - t_sampled,
              "train_time_s": t_updated - t_rewarded,
              "optimizer_step": int(parallel.to_host(state.step))}
      for k in ("approx_kl", "clipfrac"):
        last.setdefault(k, 0.0)
      ckpts.wait()  # a row is written only once the saves before it have committed
      if main_process:
        writer.write(epoch, last)
      log(f"epoch {epoch}: reward {last['reward_mean']:.4f} ± {last['reward_stderr']:.4f}  "
          f"loss {last['loss']:.4g}  approx_kl {last['approx_kl']:.3g}  clipfrac {last['clipfrac']:.3f}"
          f"  {last['samples_per_s']:.1f} samples/s")
      if main_process and config.log_image_freq and (
          epoch % config.log_image_freq == 0 or epoch + 1 == config.num_epochs):
        writer.images(epoch, to_uint8(parallel.local_rows(grid_images)), workdir)
      if (epoch + 1) % config.save_freq == 0 or epoch + 1 == config.num_epochs:
        ckpts.save(epoch + 1, state, {"epoch": epoch + 1, "stat_tracker": tracker.state_dict()})
    ckpts.close()
  except BaseException:
    committed = ckpts.abort()
    if writer is not None:  # epochs after the last committed step are retrained on resume
      writer.keep_epochs_before(0 if committed is None else committed)
    raise
  finally:
    pool.shutdown(wait=False)
  return {k: float(v) for k, v in last.items()}


@jax.jit
def _all_finite(params) -> jax.Array:
  return jax.tree.reduce(jnp.logical_and, jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)), params))


def _params_finite(params) -> bool:
  """Whether every parameter is finite (a collective when `params` span several processes); one
  compiled program (eagerly, two small programs per parameter shape)."""
  return bool(parallel.to_host(_all_finite(params)))
