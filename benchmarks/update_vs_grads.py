#!/usr/bin/env python
r"""The compiled DDPO update against the sum of its micro-step gradients taken one by one.

  python benchmarks/update_vs_grads.py [--style=sd2] [--lora] [--conv=ours|lax]

A tiny random SD pipeline (tests/tiny_models.py; `--style=sd2`: linear projections, three UNet
levels, per-level heads; `sd1`: conv projections, two levels), 16x16x4 latents (32 px), 77-token
prompts, float32. 32 trajectories of 20 DDIM steps (CFG 5) go through `train.make_update_fn`:
minibatch 8, all 20 timesteps, no accumulation, i.e. 80 PPO micro-steps (each a gradient of
the guided step, 16 UNet rows) in 4 AdamW steps. Prints the update's wall time (best of
`--repeats` calls after the first), one standalone micro-step gradient (best of 5, a jitted
`jax.grad` of the same PPO loss on one minibatch at one timestep) and their ratio
update / (80 x gradient): 1 means the loop costs nothing beyond its gradients.
`--conv=lax` uses `lax.conv_general_dilated` instead of `ddpo_jax.models.conv` (the old code).
`--steps=T` changes the 20 DDIM steps (4 T micro-steps; the tests run T = 2).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))  # tiny_models
if REPO not in sys.path:
  sys.path.insert(0, REPO)


def tiny_pipeline(style: str, directory: str) -> str:
  """Writes (once) the tiny random diffusers pipeline of `style` to `directory`."""
  if os.path.exists(os.path.join(directory, "model_index.json")):
    return directory
  from diffusers import StableDiffusionPipeline
  from tiny_models import (make_ddim_scheduler, make_tiny_tokenizer, make_torch_text_encoder,
                           make_torch_unet, make_torch_vae, text_config_kwargs,
                           unet_sd1_kwargs, unet_sd2_kwargs, vae_kwargs)
  tokenizer = make_tiny_tokenizer(directory + ".tokenizer", max_length=77)
  unet = (unet_sd2_kwargs(sample_size=16) if style == "sd2"
          else unet_sd1_kwargs(sample_size=16, attention_head_dim=8))
  text = text_config_kwargs(vocab_size=len(tokenizer), max_position_embeddings=77,
                            hidden_size=unet["cross_attention_dim"])
  pipe = StableDiffusionPipeline(
      vae=make_torch_vae(vae_kwargs(sample_size=32)), text_encoder=make_torch_text_encoder(text),
      tokenizer=tokenizer, unet=make_torch_unet(unet), scheduler=make_ddim_scheduler(),
      safety_checker=None, feature_extractor=None, requires_safety_checker=False)
  pipe.save_pretrained(directory, safe_serialization=True)
  return directory


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--style", choices=("sd1", "sd2"), default="sd2")
  p.add_argument("--lora", action="store_true", help="LoRA rank 4 instead of the full UNet")
  p.add_argument("--conv", choices=("ours", "lax"), default="ours")
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--steps", type=int, default=20,
                 help="DDIM steps per trajectory (all trained: 4 x steps micro-steps)")
  p.add_argument("--cache_dir", default=os.path.join(tempfile.gettempdir(), "ddpo_jax_bench"))
  args = p.parse_args(argv)

  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax import lax

  import ddpo_jax.models.unet as unet_lib
  from ddpo_jax.algorithms import train
  from ddpo_jax.numerics import diffusion, parallel, rl
  from ddpo_jax.trainer.families import build_policy
  if args.conv == "lax":
    unet_lib.conv_general_dilated = lax.conv_general_dilated

  from ddpo_jax.configs import sd_compressibility
  config = sd_compressibility.get_config(None if args.lora else "full")
  config.model.pretrained_path = tiny_pipeline(
      args.style, os.path.join(args.cache_dir, f"update_vs_grads_{args.style}"))
  config.model.resolution = 32
  config.model.compute_dtype = "float32"
  config.model.lora.rank, config.model.lora.alpha = 4, 4.0
  config.train.adam_mu_dtype = ""
  config.prompt_fn = "list"
  config.prompt_fn_kwargs.prompts = ("cat", "dog")
  config.sample.num_steps = args.steps
  config.sample.batch_size = 16
  config.sample.num_batches_per_epoch = 2
  config.train.batch_size = 8
  config.train.gradient_accumulation_steps = 1
  config.train.timestep_fraction = 1.0
  mesh = parallel.make_mesh()
  policy = build_policy(config, "")
  optimizer = train.make_optimizer(config.train)
  sample_fn = train.make_sample_fn(policy, config, [], mesh)
  update_fn = train.make_update_fn(policy, config, optimizer, mesh)
  frozen = train.frozen_params(policy, config)
  ids = jnp.asarray(policy.tokenize(["cat", "dog"] * 8))
  trajs = [sample_fn(policy.params["unet"], frozen, jax.random.PRNGKey(i), ids, {})[0]
           for i in range(2)]
  traj = jax.tree.map(lambda *x: jnp.concatenate(x), *trajs)
  n = traj.log_probs.shape[0]
  trainable = jax.tree.map(jnp.copy, policy.params["unet"])
  state = train.TrainState(step=jnp.zeros((), jnp.int32), params=trainable,
                           opt_state=optimizer.init(trainable), rng=jax.random.PRNGKey(0))
  adv, scales = (jnp.asarray(a, jnp.float32) for a in
                 rl.advantages(np.arange(n, dtype=np.float32), None, rl.AdvantageSettings()))

  times = []
  for i in range(args.repeats + 1):
    t0 = time.perf_counter()
    state, metrics = update_fn(state, frozen, traj, adv, scales, adv, jax.random.PRNGKey(i))
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  update_s = min(times[1:])

  sched = diffusion.NoiseSchedule.from_config(policy.denoiser.scheduler_config)
  uncond = policy.encode_uncond({**frozen, "unet": state.params})
  mb, t = config.train.batch_size, 3
  batch = (traj.latents[:mb, t], traj.times[:mb, t], traj.next_times[:mb, t],
           traj.next_latents[:mb, t], traj.context[:mb], traj.log_probs[:mb, t])

  def micro_loss(params, batch):
    latents, ts, prev, nxt, ctx, old = batch
    log_prob, _, _ = diffusion.step_log_prob(
        policy.denoiser, policy.assemble_denoiser(params, frozen), latents, ts, prev, nxt, ctx, uncond,
        guidance_scale=float(config.sample.guidance_scale), class_labels=None,
        alphas_cumprod=sched.alphas_cumprod, final_alpha_cumprod=sched.final_alpha_cumprod,
        eta=config.sample.eta)
    return rl.ppo_clipped_loss(log_prob, old, adv[:mb], config.train.clip_range,
                               config.train.adv_clip_max)[0]

  grad = jax.jit(jax.grad(micro_loss))
  jax.block_until_ready(grad(state.params, batch))
  grad_times = []
  for _ in range(5):
    t0 = time.perf_counter()
    jax.block_until_ready(grad(state.params, batch))
    grad_times.append(time.perf_counter() - t0)
  micro_s = min(grad_times)
  micro_steps = n // mb * config.sample.num_steps
  print(f"{args.style} {'LoRA' if args.lora else 'full'} conv={args.conv}, load "
        f"{'/'.join(f'{v:.1f}' for v in os.getloadavg())}: update {update_s:.2f} s (first call "
        f"{times[0]:.2f} s); one micro-step gradient {micro_s * 1e3:.1f} ms x {micro_steps} = "
        f"{micro_s * micro_steps:.2f} s; ratio {update_s / (micro_s * micro_steps):.2f}")


if __name__ == "__main__":
  main()
