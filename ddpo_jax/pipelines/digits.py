"""The built-in digits task: scikit-learn's 8×8 handwritten digits, no downloads.

A small class-conditional pixel-space model with a learned prompt-embedding table in place of
CLIP is pre-trained on the digits training split; prompts are the class names ("a handwritten
3"), the empty prompt "" is the unconditional branch for classifier-free guidance. Images are
NHWC float32 in [0, 1] (pixel value / 16); the diffusion variable is the image scaled to
[-1, 1], shape (8, 8, 1). `model.denoiser` picks the model:

* "unet": the project's `UNet2DConditionModel`, noise-predicting (DDPM's denoising score
  matching on a linear beta schedule): DDPO's DDIM sampler.
* "mmdit": the SD3 `SD3Transformer2DModel` (2×2 patches, the prompt embedding as the one text
  token and as the pooled vector), velocity-predicting (rectified flow,
  `flow.flow_matching_loss_terms`): the flow samplers of Flow-GRPO / CPS / DiffusionNFT.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import time
import uuid
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ddpo_jax.models import classifier, lora as lora_lib, adapters
from ddpo_jax.models.mmdit import MMDiTConfig, SD3Transformer2DModel
from ddpo_jax.models.unet import UNet2DConditionModel, UNetConfig
from ddpo_jax.models.weights import host_random_params
from ddpo_jax.numerics import checksums, diffusion, flow
from ddpo_jax.pipelines.denoiser import Denoiser
from ddpo_jax.pipelines.policy import Policy
from ddpo_jax.tasks.digits_data import load_digits_split

NUM_CLASSES = 10
PROMPTS = ("",) + tuple(f"a handwritten {d}" for d in range(NUM_CLASSES))
_PROMPT_IDS = {p: i for i, p in enumerate(PROMPTS)}
IMAGE_SHAPE = (8, 8, 1)
def tokenize(prompts: Sequence[str]) -> np.ndarray:
  """Prompts -> ids (N, 1) int32 into `PROMPTS`; raises on a prompt the model does not know."""
  unknown = sorted({p for p in prompts if p not in _PROMPT_IDS})
  if unknown:
    raise ValueError(f"digits model does not know prompts {unknown}; known: {list(PROMPTS)}")
  return np.asarray([[_PROMPT_IDS[p]] for p in prompts], np.int32)


def prompt_fn(rng: np.random.Generator, n: int) -> list[str]:
  """Draws n prompts uniformly over the 10 classes."""
  return [PROMPTS[l + 1] for l in rng.integers(0, NUM_CLASSES, size=n)]


def prompt_metadata(prompts: Sequence[str]) -> dict[str, np.ndarray]:
  """{"class_label": (n,) int32}: the class each prompt asks for (−1 for the empty prompt)."""
  return {"class_label": tokenize(prompts)[:, 0] - 1}


class PromptEmbedding(nn.Module):
  """The digits model's "text encoder": ids (N, L) -> context (N, L, dim)."""
  dim: int

  @nn.compact
  def __call__(self, ids: jax.Array) -> jax.Array:
    return nn.Embed(len(PROMPTS), self.dim, name="token_embedding")(ids)


def unet_config(model_config: ml_collections.ConfigDict) -> UNetConfig:
  """The digits UNet: two resolutions (8×8, 4×4); attention at 4×4 only (cheap on a CPU)."""
  channels = tuple(model_config.channels)
  return UNetConfig.from_dict({
      "sample_size": IMAGE_SHAPE[0],
      "in_channels": IMAGE_SHAPE[2],
      "out_channels": IMAGE_SHAPE[2],
      "block_out_channels": list(channels),
      "layers_per_block": model_config.layers_per_block,
      "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
      "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
      "attention_head_dim": model_config.attention_heads,
      "cross_attention_dim": model_config.context_dim,
      "norm_num_groups": model_config.norm_num_groups,
  })


def mmdit_config(model_config: ml_collections.ConfigDict) -> MMDiTConfig:
  """The digits MMDiT: 2×2 patches (a 4×4 grid), `model.mmdit_layers` joint blocks of
  `model.attention_heads` × `model.mmdit_head_dim`, the prompt embedding as text."""
  heads, head_dim = model_config.attention_heads, model_config.mmdit_head_dim
  return MMDiTConfig(sample_size=IMAGE_SHAPE[0], patch_size=2, in_channels=IMAGE_SHAPE[2],
                     out_channels=IMAGE_SHAPE[2], num_layers=model_config.mmdit_layers,
                     attention_head_dim=head_dim, num_attention_heads=heads,
                     joint_attention_dim=model_config.context_dim,
                     caption_projection_dim=heads * head_dim,
                     pooled_projection_dim=model_config.context_dim,
                     pos_embed_max_size=IMAGE_SHAPE[0] // 2)


def is_flow(model_config) -> bool:
  """Whether the digits model is the velocity-predicting MMDiT (else the noise-predicting UNet)."""
  if model_config.denoiser not in ("unet", "mmdit"):
    raise ValueError(f"model.denoiser={model_config.denoiser!r}; choose 'unet' or 'mmdit'")
  return model_config.denoiser == "mmdit"


def scheduler_config(model_config) -> dict:
  """The DDPM schedule of the UNet, or the rectified flow's (sigma linear in t, no shift)."""
  if is_flow(model_config):
    return {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
            "shift": 1.0}
  return {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
          "num_train_timesteps": 1000, "steps_offset": 1, "set_alpha_to_one": False,
          "prediction_type": "epsilon"}


def _modules(model_config, compute_dtype=jnp.float32):
  """(denoiser module, prompt embedding, network (params, x, t, context, class_labels,
  added_time_emb) -> prediction (N, 8, 8, 1) float32, at the network's own time: the integer
  timestep (UNet) or 1000 sigma (MMDiT); `denoiser.Denoiser`'s `network`). The params may
  be a plain tree or a `models.adapters.LoraAdapted` (LoRA, applied unmerged); the denoiser's
  activations are in `compute_dtype`."""
  enc = PromptEmbedding(dim=model_config.context_dim)
  if is_flow(model_config):
    net = SD3Transformer2DModel(config=mmdit_config(model_config), dtype=compute_dtype)

    def fn(p, x, t, context, class_labels, added_time_emb):
      if class_labels is not None or added_time_emb is not None:
        raise ValueError("the digits MMDiT takes no class labels or added time embeddings")
      return adapters.apply(net, p, x, t, context, context[:, 0]).astype(jnp.float32)
  else:
    net = UNet2DConditionModel(config=unet_config(model_config), dtype=compute_dtype)

    def fn(p, x, t, context, class_labels, added_time_emb):
      out = adapters.apply(net, p, x, t, context, class_labels, added_time_emb)
      return out.astype(jnp.float32)
  return net, enc, fn


def _denoiser(model_config, compute_dtype=jnp.float32) -> tuple[nn.Module, nn.Module, Denoiser]:
  """(denoiser module, prompt embedding, `Denoiser`): the UNet as an "eps" denoiser on the
  DDPM schedule, or the MMDiT as a "velocity" one on the rectified flow (no shift)."""
  net, enc, network = _modules(model_config, compute_dtype)
  schedule = scheduler_config(model_config)
  if is_flow(model_config):
    sigmas = flow.FlowSchedule.from_config(schedule).sigmas
    return net, enc, Denoiser(prediction="velocity", network=network, latent_shape=IMAGE_SHAPE,
                              scheduler_config=schedule, flow_sigmas=lambda n: sigmas(n)[0])
  return net, enc, Denoiser(prediction="eps", network=network, latent_shape=IMAGE_SHAPE,
                            scheduler_config=schedule, time_embed_dim=net.config.time_embed_dim)


def abstract_params(model_config) -> dict:
  """The {"unet", "text_encoder"} parameter tree as `jax.ShapeDtypeStruct`s (float32); "unet"
  holds the denoiser of either kind (the trained tree's name in every family)."""
  net, enc, _ = _modules(model_config)

  def init(key):
    k1, k2 = jax.random.split(key)
    ctx = enc.init(k2, jnp.zeros((1, 1), jnp.int32))["params"]
    x = jnp.zeros((1,) + IMAGE_SHAPE)
    context = jnp.zeros((1, 1, model_config.context_dim))
    if is_flow(model_config):
      u = net.init(k1, x, jnp.zeros((1,)), context, context[:, 0])
    else:
      u = net.init(k1, x, jnp.zeros((1,), jnp.int32), context)
    return {"unet": u["params"], "text_encoder": ctx}

  return jax.eval_shape(init, jax.random.PRNGKey(0))


def init_params(model_config, key: jax.Array) -> dict:
  """Random {"unet", "text_encoder"} float32 params for `model_config`, from `key` (concrete).

  Drawn on the host (`host_random_params`, flax's default initialiser distributions): flax's
  `init` run eagerly compiles one small program per parameter shape (26 s on a 2-core CPU for
  the default model)."""
  return host_random_params(abstract_params(model_config), key)


def pretrain(model_config, seed: int, log=print) -> dict:
  """Pre-trains the class-conditional digits model by denoising score matching (the UNet) or
  rectified flow matching (the MMDiT).

  Classifier-free: a prompt is replaced by "" with probability `pretrain.uncond_prob`. With
  probability `pretrain.label_noise` a prompt names a random class instead of the true one
  (noisy captions, as in web-scale data), so the pre-trained model follows its prompts only
  partly: the gap DDPO's prompt-alignment reward closes.
  Returns the EMA parameters {"unet", "text_encoder"}.
  """
  cfg = model_config.pretrain
  _, enc, denoiser = _denoiser(model_config)
  images, labels = load_digits_split("train")
  x_all = jnp.asarray(images * 2.0 - 1.0)
  y_all = jnp.asarray(labels)
  if is_flow(model_config):
    loss_terms = flow.flow_matching_loss_terms
  else:
    alphas_cumprod = diffusion.NoiseSchedule.from_config(
        scheduler_config(model_config)).alphas_cumprod

    def loss_terms(fn, p, key, x0, context):
      return diffusion.denoising_loss_terms(fn, p, key, x0, context, None, alphas_cumprod)
  key = jax.random.PRNGKey(seed)
  params = init_params(model_config, key)
  tx = optax.chain(
      optax.clip_by_global_norm(1.0),
      optax.adamw(optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, min(100, cfg.steps // 10), cfg.steps,
                                                     cfg.learning_rate * 0.05),
                  weight_decay=1e-4))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, ema, opt_state, key):
    k_idx, k_drop, k_loss = jax.random.split(key, 3)
    idx = jax.random.randint(k_idx, (cfg.batch_size,), 0, x_all.shape[0])
    k_drop, k_noise, k_label = jax.random.split(k_drop, 3)
    labels = y_all[idx]
    # Noisy captions (like web data): a fraction of prompts name a random class.
    noisy = jax.random.uniform(k_noise, labels.shape) < cfg.label_noise
    labels = jnp.where(noisy, jax.random.randint(k_label, labels.shape, 0, NUM_CLASSES), labels)
    ids = jnp.where(jax.random.uniform(k_drop, labels.shape) < cfg.uncond_prob, 0, labels + 1)

    def loss_fn(p):
      context = enc.apply({"params": p["text_encoder"]}, ids[:, None])
      return loss_terms(denoiser, p["unet"], k_loss, x_all[idx], context).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    ema = jax.tree.map(lambda e, p: cfg.ema_decay * e + (1 - cfg.ema_decay) * p, ema, params)
    return params, ema, opt_state, loss

  ema = params
  losses = []
  for i in range(cfg.steps):
    params, ema, opt_state, loss = step(params, ema, opt_state, jax.random.fold_in(key, i))
    if (i + 1) % max(1, cfg.steps // 10) == 0:
      losses.append(float(loss))
      log(f"pretrain step {i + 1}/{cfg.steps}: loss {losses[-1]:.4f}")
  return ema


# Part of every cache key: bump it when the same settings would train different parameters
# (2: random initialisation drawn on the host, `host_random_params`).
_CACHE_VERSION = 2


def _cache_dir(kind: str, spec: dict) -> str:
  """`$DDPO_JAX_CACHE/{kind}_{hash of spec}` (default cache root ~/.cache/ddpo_jax)."""
  text = json.dumps({**spec, "cache_version": _CACHE_VERSION}, sort_keys=True, default=str)
  digest = hashlib.sha256(text.encode()).hexdigest()[:12]
  root = os.environ.get("DDPO_JAX_CACHE", os.path.expanduser("~/.cache/ddpo_jax"))
  return os.path.join(root, f"{kind}_{digest}")


@contextlib.contextmanager
def _exclusive(path: str):
  """Holds an exclusive lock on `path`/.lock (created if absent; `path` must exist) while the
  block runs: one process at a time makes a cache entry; the others wait and then load it.
  Where the lock file cannot be made (a read-only directory, e.g. a `model.pretrained_dir`
  written before checksums existed), the block runs unlocked: nothing can be written there."""
  try:
    f = open(os.path.join(path, ".lock"), "a")
  except OSError:
    yield
    return
  with f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _load_verified(path: str, abstract, what: str, log):
  """The params saved at `path`/params, checked against `path`/checksums.json; None if there
  are none, or if they are damaged (then moved aside to `path`/params.damaged-TIME, said)."""
  import orbax.checkpoint as ocp
  params_dir, sums_file = os.path.join(path, "params"), os.path.join(path, "checksums.json")
  if not os.path.isdir(params_dir):
    return None
  log(f"loading {what} from {path}")
  try:
    params = ocp.StandardCheckpointer().restore(params_dir, abstract)
    problem = None
  except Exception as e:  # noqa: BLE001 (unreadable files are damage)
    params, problem = None, f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
  if problem is None and os.path.isfile(sums_file):
    with open(sums_file) as f:
      saved = json.load(f)
    bad = checksums.checksum_mismatches(saved, params)
    if bad:
      problem = f"{len(bad)} arrays differ from {sums_file}: {', '.join(bad[:3])}"
  elif problem is None:
    log(f"{what} in {path} has no checksums.json (made before checksums): loaded unverified")
  if problem is None:
    return params
  aside = f"{params_dir}.damaged-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
  os.replace(params_dir, aside)
  log(f"{what} in {path} is damaged ({problem}); moved it to {aside} and making it again")
  return None


def _load_or_make(path: str, abstract, make, what: str, log) -> dict:
  """The params tree saved at `path`/params (shapes of `abstract`), else `make()` saved there.

  Restores onto this process's first device (not the device that saved it: in a multi-process
  run that device may belong to another process). The arrays' checksums
  (`checksums.state_checksums`) are written to `path`/checksums.json after them and checked
  on every load: a damaged cache is moved aside (`path`/params.damaged-TIME, never deleted),
  said, and made again. A cache from before checksums loads unverified (said).

  Runs started together (a seed sweep) that all find no entry make it once: making holds a
  lock (`path`/.lock), and the others wait, then load it. The processes of one multi-process
  run all make it (Orbax's save is collective there: every process takes part, so none may
  wait on a lock), each writing the checksums through its own temporary file. Orbax writes to
  a temporary directory and renames it on success, so an interrupted save leaves no `params`
  directory and the next run makes them again instead of loading junk."""
  import orbax.checkpoint as ocp
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), abstract)
  params_dir, sums_file = os.path.join(path, "params"), os.path.join(path, "checksums.json")
  # A finished entry (params and checksums) loads without the lock; params without checksums
  # may be an entry still being written: the lock below waits for its writer.
  if os.path.isfile(sums_file):
    params = _load_verified(path, abstract, what, log)
    if params is not None:
      return params
  os.makedirs(path, exist_ok=True)  # for the lock, the save and the checksums alike
  with _exclusive(path) if jax.process_count() == 1 else contextlib.nullcontext():
    params = _load_verified(path, abstract, what, log)  # made while this process waited
    if params is not None:
      return params
    params = make()
    ckptr = ocp.StandardCheckpointer()
    try:
      ckptr.save(params_dir, jax.device_get(params))  # host arrays: any topology
      ckptr.wait_until_finished()
    except (ValueError, FileExistsError):
      if not os.path.isdir(params_dir):
        raise
      # A writer that does not take the lock (a filesystem without flock) saved the same
      # params while this one made them: theirs stays; this run goes on with its own.
      log(f"{what}: another run saved {params_dir} meanwhile; kept it, using this run's own")
      return params
    tmp = f"{sums_file}.tmp.{os.getpid()}.{uuid.uuid4().hex[:8]}"  # this writer's own
    with open(tmp, "w") as f:
      json.dump(checksums.state_checksums(params), f)
    os.replace(tmp, sums_file)
  return params


_UNET_ONLY = ("channels", "layers_per_block", "norm_num_groups")
_MMDIT_ONLY = ("denoiser", "mmdit_layers", "mmdit_head_dim")
_FINE_TUNING_ONLY = ("dtype", "compute_dtype", "lora")


def _cache_spec(model_config) -> dict:
  """The model settings that decide the pre-trained params: those of the chosen denoiser (a
  UNet's cache key is the same as before `model.denoiser` existed), not how it is fine-tuned
  (its dtypes, LoRA): pre-training runs in float32."""
  drop = (_UNET_ONLY if is_flow(model_config) else _MMDIT_ONLY) + _FINE_TUNING_ONLY
  return {k: v for k, v in model_config.to_dict().items() if k not in drop}


def pretrained_path(model_config, seed: int) -> str:
  """The directory of the pre-trained digits params: `model.pretrained_dir`, or the cache entry
  keyed by the model config and `seed` (it holds params/ and checksums.json)."""
  if model_config.pretrained_dir:
    return os.path.abspath(os.path.expanduser(model_config.pretrained_dir))
  return _cache_dir("digits_pretrained", {"model": _cache_spec(model_config), "seed": seed})


def weight_files(model_config) -> tuple[str, list[str]]:
  """(directory, ["checksums.json"]) of the pre-trained digits model of `model_config`: the
  params are verified against the checksums when loaded, so fingerprinting that file
  (`families.base_weights`) covers the weights."""
  return pretrained_path(model_config, model_config.pretrain.seed), ["checksums.json"]


def load_or_pretrain(model_config, seed: int, log=print) -> dict:
  """Loads the pre-trained digits params from the cache (`model.pretrained_dir`, or one keyed
  by the model config and seed), pre-training them first if absent."""
  path = pretrained_path(model_config, seed)

  def make():
    log(f"no pre-trained digits model at {path}: pre-training one "
        f"({model_config.pretrain.steps} steps)")
    return pretrain(model_config, seed, log=log)

  return _load_or_make(path, abstract_params(model_config), make, "pre-trained digits model", log)


def make_policy(config, abstract: bool = False) -> Policy:
  """The digits policy: the pre-trained denoiser in `model.dtype` (trained whole, or frozen
  beside LoRA factors when `model.lora.enabled`), activations in `model.compute_dtype`.
  `abstract`: params are `jax.ShapeDtypeStruct`s (nothing is pre-trained or loaded)."""
  model_config = config.model
  # .get: runs saved before these keys existed are float32 without LoRA
  _, enc, denoiser = _denoiser(model_config, jnp.dtype(model_config.get("compute_dtype",
                                                                       "float32")))
  params = (abstract_params(model_config) if abstract
            else load_or_pretrain(model_config, model_config.pretrain.seed))
  dtype = jnp.dtype(model_config.get("dtype", "float32"))
  params = {**params, "unet": jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, dtype) if abstract else x.astype(dtype),
      params["unet"])}
  params, assemble = lora_lib.adapted_policy_params(params, model_config)
  flow_model = is_flow(model_config)
  if flow_model and config.mode == "ctrl":
    raise ValueError("model.denoiser='mmdit': CTRL's control embedding is the UNet's "
                     "(model.denoiser='unet')")

  def encode_prompts(p, ids):
    return enc.apply({"params": p["text_encoder"]}, ids)

  def decode(p, x0):
    return jnp.clip(x0 / 2.0 + 0.5, 0.0, 1.0)

  def encode_images(p, images):
    return images.astype(jnp.float32) * 2.0 - 1.0

  return Policy(params=params, denoiser=denoiser, tokenize=tokenize,
                encode_prompts=encode_prompts, decode=decode, encode_images=encode_images,
                assemble_denoiser=assemble, prompt_fn=prompt_fn, prompt_metadata=prompt_metadata)


@functools.lru_cache(maxsize=4)
def reward_classifier(seed: int = 0, log=print):
  """The digit classifier of the reward: a SmallCNN trained on the training split (600 AdamW
  steps, pixel noise 0.05), cached on disk beside the pre-trained model."""
  settings = {"seed": seed, "augment_noise": 0.05}
  module = classifier.SmallCNN(num_classes=NUM_CLASSES)
  abstract = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1,) + IMAGE_SHAPE))
  path = _cache_dir("digits_reward_classifier", settings)

  def make():
    images, labels = load_digits_split("train")
    log(f"no digits reward classifier at {path}: training one")
    return classifier.train_classifier(images, labels, NUM_CLASSES, **settings).params

  params = _load_or_make(path, abstract["params"], make, "the digits reward classifier", log)
  return classifier.Classifier(module=module, params=params)


@functools.lru_cache(maxsize=1)
def heldout_classifier():
  """An independent judge: scikit-learn SVC trained on the held-out split only."""
  from sklearn.svm import SVC
  images, labels = load_digits_split("heldout")
  return SVC(C=10.0, gamma="scale").fit(images.reshape(len(images), -1), labels)


def heldout_accuracy_metric():
  """Host metric: 1 where the held-out SVC's prediction equals the prompted class."""
  judge = heldout_classifier()

  def fn(images_uint8, prompts, metadata):
    x = images_uint8.reshape(len(images_uint8), -1).astype(np.float32) / 255.0
    correct = (judge.predict(x) == metadata["class_label"]).astype(np.float32)
    return correct, {}
  return fn
