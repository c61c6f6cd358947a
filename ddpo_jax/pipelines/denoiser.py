"""The Denoiser: the one interface every model family gives the samplers and the update.

A model family (the digits UNet and MMDiT in `ddpo_jax.pipelines.digits`; SD 1.x/2.x, SDXL, SD3/3.5 and
FLUX.1 in `ddpo_jax.pipelines.sd`) wraps its network in a `Denoiser`, which declares what the network
predicts and converts the dynamics' time into the network's own convention inside. The
dynamics (`ddpo_jax.tasks.dynamics`: DDIM chains for "eps", flow chains for "velocity"), the trainer
and CTRL's augmentation (`ddpo_jax.ctrl.policy`, a Denoiser wrapping another) only ever call a
Denoiser: none of them names a UNet, a transformer, a timestep scale or a family.

Call convention, `denoiser(params, x, time, cond, labels=None, added_time_emb=None)`:
  params: the network's params (a plain tree or `models.adapters.LoraAdapted`).
  x: (B, *latent_shape) latents of any rank (images (B, H, W, C); video (B, F, H, W, C)).
  time: (B,) the dynamics' time: for "eps" the integer DDPM timestep t in
    [0, num_train_timesteps), int32; for "velocity" the flow's sigma in [0, 1], float32 (the
    network is called at `time_scale` · sigma, e.g. diffusers' 1000 sigma).
  cond: the encoded prompt, an array or a pytree of arrays with the batch on axis 0
    (`Policy.encode_prompts`; SDXL's {"context", "text_embeds"}).
  labels: (B,) or (B, M) int32 class / control labels, or None (families without labels
    refuse them).
  added_time_emb: (B, time_embed_dim) float, added to a UNet's time embedding (CTRL's control
    embedding), or None.
  returns: (B, *latent_shape) float32, the predicted noise ("eps") or velocity ("velocity").
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

# What a denoiser predicts -> the time its dynamics pass it.
PREDICTIONS = {"eps": "integer DDPM timestep", "velocity": "flow sigma in [0, 1]"}


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: jit may key on it
class Denoiser:
  """A model family's denoising network seen by the samplers and the update (module docstring).

  Attributes:
    prediction: "eps" (noise; DDIM dynamics) or "velocity" (flow matching; flow dynamics).
    network: (params, x, model_time (B,), cond, labels, added_time_emb) -> (B, *latent_shape)
      float32, in the family's own time convention: model_time = time for "eps",
      `time_scale` · sigma for "velocity". Jitted once here, so every call inside one traced
      program with the same input types reuses one trace.
    latent_shape: the shape of one sample's latent, e.g. (H, W, C).
    scheduler_config: the diffusers scheduler config of the family's noise schedule (DDPM
      betas for "eps"; the flow's shift for "velocity").
    flow_sigmas: "velocity" only: num_steps -> sigmas (num_steps + 1,) float32 ending in 0,
      the family's inference schedule at `latent_shape` (SD3's shift, FLUX's resolution-
      dependent shift); None for "eps".
    time_scale: "velocity" only: the network's timestep per unit sigma (1000 for diffusers'
      transformers).
    time_embed_dim: width of `added_time_emb` the network accepts (0: none).
    labels_key: the `Policy.prompt_metadata` entry the samplers pass as `labels` (CTRL's
      "control_label"); None: no labels.
    null_labels: (M,) int32 labels of the unconditional half of prompt guidance (CTRL's null
      controls), or None: the same labels in both halves (`diffusion.guided_eps`).
  """
  prediction: str
  network: Callable[..., jax.Array]
  latent_shape: tuple[int, ...]
  scheduler_config: dict
  flow_sigmas: Callable[[int], np.ndarray] | None = None
  time_scale: float = 1000.0
  time_embed_dim: int = 0
  labels_key: str | None = None
  null_labels: np.ndarray | None = None

  def __post_init__(self):
    if self.prediction not in PREDICTIONS:
      raise ValueError(f"Denoiser.prediction={self.prediction!r}; choose from "
                       f"{', '.join(repr(p) for p in PREDICTIONS)}")
    if (self.prediction == "velocity") != (self.flow_sigmas is not None):
      raise ValueError("Denoiser: a 'velocity' denoiser needs flow_sigmas, an 'eps' one has none")
    object.__setattr__(self, "latent_shape", tuple(int(d) for d in self.latent_shape))
    if not hasattr(self.network, "lower"):
      object.__setattr__(self, "network", jax.jit(self.network))

  def __call__(self, params: Any, x: jax.Array, time: jax.Array, cond: Any,
               labels: jax.Array | None = None, added_time_emb: jax.Array | None = None):
    """The prediction (B, *latent_shape) float32 at the dynamics' `time` (module docstring)."""
    if self.prediction == "velocity":
      time = self.time_scale * jnp.asarray(time, jnp.float32)
    return self.network(params, x, time, cond, labels, added_time_emb)

  def wrap(self, network: Callable[..., jax.Array], **changes) -> "Denoiser":
    """A denoiser with the same prediction, schedule and shapes around another `network` (in
    this one's model-time convention, e.g. calling `self.network` inside): CTRL's
    augmentation, LoRA merged for sampling. `changes` replace other fields."""
    return dataclasses.replace(self, network=network, **changes)
