"""The flow configs' key values against the reference repositories' configs, written here as
literals with the file and function each comes from (ddpo_jax/configs/sd3_*.py, ddpo_jax/configs/flux_pickscore.py,
ddpo_jax/config_base.py)."""
import re

import pytest

from ddpo_jax import config_base
from helpers import load_config

# flow_grpo, config/grpo.py; GPUs 32, per-GPU batch 9 (`sample.train_batch_size`):
# global sampling call = 9 * 32 = 288.
FLOW_GRPO_FAST = {
    # pickscore_sd3_fast_nocfg
    "pickscore": dict(num_steps=10, guidance_scale=1, cfg=False, noise_level=0.8,
                      sde_window_size=3, sde_window_range=(0, 10 // 2), sde_type="cps",
                      clip_range=1e-5, beta=0, num_image_per_prompt=18,
                      # int(64 / (32 * 9 / 18))
                      num_batches_per_epoch=4, same_latent=False),
    # geneval_sd3_fast_nocfg
    "geneval": dict(num_steps=10, guidance_scale=1, cfg=False, noise_level=0.8,
                    sde_window_size=3, sde_window_range=(0, 10 // 2), sde_type="cps",
                    clip_range=1e-5, beta=0, num_image_per_prompt=24,
                    # int(48 / (32 * 9 / 24))
                    num_batches_per_epoch=4, same_latent=False),
}


@pytest.mark.parametrize("task", sorted(FLOW_GRPO_FAST))
def test_sd3_fast_recipe_is_flow_grpo_fast_nocfg(task):
  ref = FLOW_GRPO_FAST[task]
  c = load_config(f"sd3_fast_{task}")
  s, t = c.sample, c.train
  assert s.num_steps == ref["num_steps"]
  assert s.guidance_scale == ref["guidance_scale"] and t.cfg == ref["cfg"]
  assert s.sampler == ref["sde_type"] and s.noise_level == ref["noise_level"]
  assert s.sde_window_size == ref["sde_window_size"]
  assert s.sde_window_schedule == "random"
  assert tuple(s.sde_window_range) == ref["sde_window_range"]
  assert t.clip_range == ref["clip_range"] and t.kl_beta == ref["beta"]
  assert s.group_size == ref["num_image_per_prompt"]
  assert s.same_noise_per_group == ref["same_latent"]
  assert s.batch_size == 9 * 32 and s.num_batches_per_epoch == ref["num_batches_per_epoch"]
  # train_sd3_fast.py: num_train_timesteps = sde_window_size (every window step is trained);
  # gradient_accumulation_steps = num_batches_per_epoch // 2
  assert t.timestep_fraction == 1.0
  assert t.batch_size == 9 * 32 and t.gradient_accumulation_steps == 4 // 2
  assert s.group_std == "global"  # global_std = True
  assert c.model.lora.rank == 32 and c.model.lora.alpha == 64.0  # train_sd3_fast.py LoraConfig
  assert s.prompt_sampling == "epoch_unique"  # DistributedKRepeatSampler


# flow_grpo config/grpo.py: train.beta of pickscore_sd3 / general_ocr_sd3 / geneval_sd3
@pytest.mark.parametrize("task,beta", [("pickscore", 0.01), ("ocr", 0.04), ("geneval", 0.04)])
def test_sd3_flow_grpo_kl_beta(task, beta):
  """config/grpo.py: train.beta per task and train.ema = True (train_sd3.py's EMAModuleWrapper
  decay 0.9, update_step_interval 8); train_sd3.py drops zero-advantage samples."""
  t = load_config(f"sd3_{task}").train
  assert t.kl_beta == beta
  assert t.ema.enabled and t.ema.decay == 0.9 and t.ema.update_interval == 8
  assert t.drop_zero_advantage


# NVlabs/DiffusionNFT config/nft.py `_get_config(base_model="sd3", n_gpus=8, ...)`:
# bsz 9, num_image_per_prompt 24, num_groups 48 -> n_batch_per_epoch 48 * 24 // (8 * 9) = 16;
# gradient_step_per_epoch 1 (pickscore, geneval) or 2 (sd3_ocr).
NFT = {
    "pickscore": dict(beta=1.0, decay_type=1, accumulation=16),
    "geneval": dict(beta=1.0, decay_type=1, accumulation=16),
    "ocr": dict(beta=0.1, decay_type=2, accumulation=8),
}


@pytest.mark.parametrize("task", sorted(NFT))
def test_sd3_nft_recipe_is_diffusion_nft(task):
  ref = NFT[task]
  c = load_config(f"sd3_nft_{task}")
  s, t = c.sample, c.train
  # config/nft.py: solver="dpm2" (deterministic); train_nft_sd3.py: EMA decay 0.9 every step
  assert t.algorithm == "nft" and s.sampler == "dpm2"
  assert t.ema.enabled and t.ema.decay == 0.9 and t.ema.update_interval == 1
  assert not t.drop_zero_advantage
  assert c.model.resolution == 512 and s.num_steps == 10
  assert s.guidance_scale == 1.0 and not t.cfg
  assert s.group_size == 24 and s.batch_size == 8 * 9 and s.num_batches_per_epoch == 16
  assert s.batch_size * s.num_batches_per_epoch // s.group_size == 48
  assert t.batch_size == 8 * 9 and t.gradient_accumulation_steps == ref["accumulation"]
  assert t.nft_beta == ref["beta"] and t.nft_decay_type == ref["decay_type"]
  assert t.kl_beta == 1e-4  # _get_config: config.train.beta = 0.0001
  assert t.timestep_fraction == 0.99 and t.learning_rate == 3e-4 and t.adv_clip_max == 5
  assert s.group_std == "global"  # config/base.py: sample.global_std = True
  # scripts/train_nft_sd3.py `main`: LoraConfig(r=32, lora_alpha=64) on the attention projections
  assert c.model.lora.rank == 32 and c.model.lora.alpha == 64.0
  assert tuple(c.model.lora.targets) == config_base.SD3_LORA_TARGETS


# flow_grpo scripts/train_flux.py `main`: LoraConfig(r=64, lora_alpha=128, target_modules=...)
FLUX_REFERENCE_TARGETS = [
    "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
    "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
    "ff_context.net.2"]


def _peft_matches(name, keys):
  """PEFT's rule for a list of target_modules: the module name is a key or ends with '.' + key."""
  return any(name == k or name.endswith("." + k) for k in keys)


def _flax_path(name):
  """A diffusers module name as ddpo_jax's Flax module path: 'transformer_blocks.0.ff.net.0.proj'
  -> 'transformer_blocks_0/ff/net_0/proj' (the naming of ddpo_jax/models/mmdit.py, flux.py)."""
  return re.sub(r"\.(\d+)", r"_\1", name).replace(".", "/")


def test_flux_lora_targets_are_flow_grpo_train_flux():
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  c = load_config("flux_pickscore")
  assert c.model.lora.rank == 64 and c.model.lora.alpha == 128.0
  model = diffusers.FluxTransformer2DModel(
      patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=8,
      num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=32,
      guidance_embeds=True, axes_dims_rope=(2, 2, 4))
  linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
  reference = {n for n in linear if _peft_matches(n, FLUX_REFERENCE_TARGETS)}
  ours = {n for n in linear
          if any(re.search(p, _flax_path(n)) for p in c.model.lora.targets)}
  assert ours == reference
  assert any(".ff_context.net.2" in n for n in reference)  # the feed-forward ones are in it
  assert any(n.startswith("single_transformer_blocks.") for n in reference)


@pytest.mark.parametrize("name", ["sd3_pickscore", "sd3_ocr", "sd3_geneval", "flux_pickscore",
                                  "sd3_nft_pickscore"])
def test_flow_recipes_draw_prompts_without_replacement(name):
  """flow_grpo (flow_grpo/sampler.py) and DiffusionNFT (scripts/train_nft_sd3.py) draw each
  epoch's prompts with `DistributedKRepeatSampler`; DDPO's recipes keep ddpo-pytorch's draws
  with replacement."""
  assert load_config(name).sample.prompt_sampling == "epoch_unique"
  assert load_config("sd_aesthetic").sample.prompt_sampling == "with_replacement"
