"""Tiny random PyTorch diffusers / transformers models and a tiny SD pipeline directory.

Test-only helpers (they import torch, diffusers and transformers). Everything is built locally
from random weights: nothing is downloaded.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch

TINY_MAX_LENGTH = 16


def _seeded(seed):
  torch.manual_seed(seed)


def _randomize_(model: torch.nn.Module, seed: int, std: float = 0.2) -> torch.nn.Module:
  """Fills every parameter with N(0, std^2) noise (norm scales around 1) so that no branch of the
  model is a trivial zero/identity (diffusers zero-initialises nothing, but e.g. GroupNorm
  weights are all ones): parity tests then exercise every parameter."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g) * std
      if name.endswith("weight") and p.ndim == 1:  # norm scales
        p.copy_(1.0 + noise)
      else:
        p.copy_(noise)
  return model.eval()


# ----------------------------------------------------------------------------------------------
# UNets
# ----------------------------------------------------------------------------------------------
def unet_sd1_kwargs(**overrides) -> dict:
  """SD-1-style tiny UNet: conv 1x1 projections, one head count for every block."""
  kw = dict(
      sample_size=8, in_channels=4, out_channels=4,
      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
      block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=32,
      attention_head_dim=2, norm_num_groups=8)
  kw.update(overrides)
  return kw


def unet_sd2_kwargs(**overrides) -> dict:
  """SD-2-style tiny UNet: linear projections, per-block `attention_head_dim` (= head counts),
  upcast_attention, three resolutions."""
  kw = dict(
      sample_size=8, in_channels=4, out_channels=4,
      down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
      block_out_channels=(32, 64, 64), layers_per_block=1, cross_attention_dim=24,
      attention_head_dim=(2, 4, 8), use_linear_projection=True, upcast_attention=True,
      norm_num_groups=16, flip_sin_to_cos=True, freq_shift=0)
  kw.update(overrides)
  return kw


def unet_pixel_class_kwargs(**overrides) -> dict:
  """Tiny pixel-space UNet (1 channel, 8x8) with class conditioning (`num_class_embeds`)."""
  kw = dict(
      sample_size=8, in_channels=1, out_channels=1,
      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
      block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=16,
      attention_head_dim=4, norm_num_groups=8, num_class_embeds=10,
      flip_sin_to_cos=False, freq_shift=1)
  kw.update(overrides)
  return kw


def unet_variants_kwargs(**overrides) -> dict:
  """Less common options: per-block only_cross_attention / layers_per_block, two transformer
  layers per block, mid_block_scale_factor, center_input_sample, time_embedding_dim."""
  kw = unet_sd1_kwargs(only_cross_attention=(True, False), layers_per_block=(1, 2),
                       transformer_layers_per_block=2, mid_block_scale_factor=1.5,
                       center_input_sample=True, time_embedding_dim=48)
  kw.update(overrides)
  return kw


def unet_sdxl_kwargs(**overrides) -> dict:
  """SDXL-style tiny UNet: `text_time` added embeddings (pooled text 24 + 6 time ids x 8
  sinusoids), DownBlock2D first, linear projections, per-block head counts and transformer
  depths."""
  kw = dict(
      sample_size=8, in_channels=4, out_channels=4,
      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
      block_out_channels=(32, 64, 64), layers_per_block=2, cross_attention_dim=40,
      attention_head_dim=(2, 4, 8), transformer_layers_per_block=(1, 1, 2),
      use_linear_projection=True, norm_num_groups=16, addition_embed_type="text_time",
      addition_time_embed_dim=8, projection_class_embeddings_input_dim=24 + 6 * 8)
  kw.update(overrides)
  return kw


def unet_sdxl_nested_kwargs(**overrides) -> dict:
  """SDXL-style tiny UNet with one transformer depth per layer (nested
  `transformer_layers_per_block`, the up blocks' from `reverse_transformer_layers_per_block`)."""
  kw = unet_sdxl_kwargs(transformer_layers_per_block=((1, 1), (1, 2), (2, 1)),
                        reverse_transformer_layers_per_block=((2, 1, 1), (1, 2, 1), (1, 1, 1)))
  kw.update(overrides)
  return kw


def make_torch_unet(kwargs: dict, seed: int = 0):
  """A random `diffusers.UNet2DConditionModel` in eval mode."""
  from diffusers import UNet2DConditionModel
  _seeded(seed)
  return _randomize_(UNet2DConditionModel(**kwargs), seed)


# ----------------------------------------------------------------------------------------------
# VAE
# ----------------------------------------------------------------------------------------------
def vae_kwargs(**overrides) -> dict:
  kw = dict(
      in_channels=3, out_channels=3,
      down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
      up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
      block_out_channels=(16, 32), layers_per_block=1, latent_channels=4,
      norm_num_groups=8, sample_size=16)
  kw.update(overrides)
  return kw


def make_torch_vae(kwargs: dict | None = None, seed: int = 1):
  """A random `diffusers.AutoencoderKL` in eval mode."""
  from diffusers import AutoencoderKL
  _seeded(seed)
  return _randomize_(AutoencoderKL(**(kwargs or vae_kwargs())), seed, std=0.1)


# ----------------------------------------------------------------------------------------------
# CLIP text encoder and tokenizer
# ----------------------------------------------------------------------------------------------
def text_config_kwargs(**overrides) -> dict:
  kw = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=TINY_MAX_LENGTH, projection_dim=32,
            hidden_act="quick_gelu", layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2,
            pad_token_id=1)
  kw.update(overrides)
  return kw


def make_torch_text_encoder(kwargs: dict | None = None, seed: int = 2):
  """A random `transformers.CLIPTextModel` in eval mode."""
  from transformers import CLIPTextConfig, CLIPTextModel
  _seeded(seed)
  model = CLIPTextModel(CLIPTextConfig(**(kwargs or text_config_kwargs())))
  return _randomize_(model, seed, std=0.1)


def _bytes_to_unicode() -> list[str]:
  """GPT-2 / CLIP byte -> printable unicode table (256 characters)."""
  bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1)))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return [chr(c) for c in cs]


def write_tiny_tokenizer_files(directory: str) -> tuple[str, str]:
  """Writes a minimal CLIP byte-level BPE vocab.json / merges.txt (a few merges) to `directory`."""
  os.makedirs(directory, exist_ok=True)
  chars = _bytes_to_unicode()
  vocab_list = chars + [c + "</w>" for c in chars]
  merges = [("a", "t</w>"), ("c", "at</w>"), ("d", "o"), ("do", "g</w>"), ("t", "h"),
            ("th", "e</w>")]
  vocab_list += [a + b for a, b in merges]
  vocab_list += ["<|startoftext|>", "<|endoftext|>"]
  vocab = {tok: i for i, tok in enumerate(vocab_list)}
  vocab_path = os.path.join(directory, "vocab.json")
  merges_path = os.path.join(directory, "merges.txt")
  with open(vocab_path, "w", encoding="utf-8") as f:
    json.dump(vocab, f, ensure_ascii=False)
  with open(merges_path, "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  return vocab_path, merges_path


def make_tiny_tokenizer(directory: str, max_length: int = TINY_MAX_LENGTH):
  """A `transformers.CLIPTokenizer` over the tiny vocabulary (~520 tokens)."""
  from transformers import CLIPTokenizer
  vocab_path, merges_path = write_tiny_tokenizer_files(directory)
  return CLIPTokenizer(vocab=vocab_path, merges=merges_path, model_max_length=max_length)


# ----------------------------------------------------------------------------------------------
# Scheduler and the whole pipeline
# ----------------------------------------------------------------------------------------------
SD_DDIM_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                      beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                      steps_offset=1)


def make_ddim_scheduler():
  from diffusers import DDIMScheduler
  return DDIMScheduler(**SD_DDIM_CONFIG)


def make_torch_pipeline(tmp_dir: str, *, unet_kwargs: dict | None = None, seed: int = 0):
  """A tiny random `diffusers.StableDiffusionPipeline` (no safety checker)."""
  from diffusers import StableDiffusionPipeline
  tokenizer = make_tiny_tokenizer(os.path.join(tmp_dir, "_tokenizer_src"))
  text_kwargs = text_config_kwargs(vocab_size=len(tokenizer))
  unet_kwargs = unet_kwargs or unet_sd1_kwargs(cross_attention_dim=text_kwargs["hidden_size"],
                                               layers_per_block=1)
  return StableDiffusionPipeline(
      vae=make_torch_vae(seed=seed + 1),
      text_encoder=make_torch_text_encoder(text_kwargs, seed=seed + 2),
      tokenizer=tokenizer,
      unet=make_torch_unet(unet_kwargs, seed=seed),
      scheduler=make_ddim_scheduler(),
      safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def save_tiny_pipeline(directory: str, *, seed: int = 0, **kwargs) -> str:
  """Writes a tiny diffusers SD pipeline (safetensors) to `directory`; returns the directory.

  Layout: model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/.
  """
  os.makedirs(directory, exist_ok=True)
  scratch = os.path.join(directory + ".src")
  os.makedirs(scratch, exist_ok=True)
  pipe = make_torch_pipeline(scratch, seed=seed, **kwargs)
  pipe.save_pretrained(directory, safe_serialization=True)
  return directory


def make_torch_text_encoder_2(kwargs: dict, seed: int = 3):
  """A random `transformers.CLIPTextModelWithProjection` (SDXL's text_encoder_2) in eval mode."""
  from transformers import CLIPTextConfig, CLIPTextModelWithProjection
  _seeded(seed)
  return _randomize_(CLIPTextModelWithProjection(CLIPTextConfig(**kwargs)), seed, std=0.1)


def make_torch_sdxl_pipeline(tmp_dir: str, *, seed: int = 0):
  """A tiny random `diffusers.StableDiffusionXLPipeline`: text encoders of widths 32 and 24
  (context 56), the second with projection 16, so the UNet's added embedding takes
  16 + 6 x 8 features; both tokenizers over the tiny vocabulary (the second pads with "!", as
  SDXL's)."""
  from diffusers import StableDiffusionXLPipeline
  tokenizer = make_tiny_tokenizer(os.path.join(tmp_dir, "_tokenizer_src"))
  tokenizer_2 = make_tiny_tokenizer(os.path.join(tmp_dir, "_tokenizer_2_src"))
  tokenizer_2.pad_token = "!"
  text_kwargs = text_config_kwargs(vocab_size=len(tokenizer))
  text_2_kwargs = text_config_kwargs(vocab_size=len(tokenizer), hidden_size=24,
                                     intermediate_size=48, num_attention_heads=3,
                                     num_hidden_layers=3, projection_dim=16, hidden_act="gelu")
  unet_kwargs = unet_sdxl_kwargs(cross_attention_dim=32 + 24, layers_per_block=1,
                                 transformer_layers_per_block=(1, 1, 2),
                                 projection_class_embeddings_input_dim=16 + 6 * 8)
  return StableDiffusionXLPipeline(
      vae=make_torch_vae(seed=seed + 1),
      text_encoder=make_torch_text_encoder(text_kwargs, seed=seed + 2),
      text_encoder_2=make_torch_text_encoder_2(text_2_kwargs, seed=seed + 3),
      tokenizer=tokenizer, tokenizer_2=tokenizer_2,
      unet=make_torch_unet(unet_kwargs, seed=seed),
      scheduler=make_ddim_scheduler(), force_zeros_for_empty_prompt=True)


def save_tiny_sdxl_pipeline(directory: str, *, seed: int = 0) -> str:
  """Writes a tiny diffusers SDXL pipeline (safetensors) to `directory`; returns the directory."""
  os.makedirs(directory, exist_ok=True)
  scratch = os.path.join(directory + ".src")
  os.makedirs(scratch, exist_ok=True)
  make_torch_sdxl_pipeline(scratch, seed=seed).save_pretrained(directory, safe_serialization=True)
  return directory


def to_nchw(x) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def to_nhwc(t: torch.Tensor) -> np.ndarray:
  return t.detach().numpy().transpose(0, 2, 3, 1)


# ----------------------------------------------------------------------------------------------
# Flow-matching pipelines: SD3 / SD3.5 and FLUX.1 (16-channel VAE, T5 encoder and tokenizer)
# ----------------------------------------------------------------------------------------------
T5_WORDS = ("a", "an", "the", "photo", "of", "cat", "dog", "red", "blue", "on", "in", "digit")


def make_tiny_t5_tokenizer():
  """A `transformers.T5TokenizerFast` (a Unigram model, T5's special ids pad 0, eos 1, unk 2)
  over a few words and the letters, built offline."""
  from transformers import T5TokenizerFast
  vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
  vocab += [("▁" + w, -1.0 - 0.1 * i) for i, w in enumerate(T5_WORDS)]
  vocab += [(c, -10.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
  return T5TokenizerFast(vocab=vocab, extra_ids=0)


def make_torch_t5(vocab_size: int, d_model: int, seed: int):
  """A random `transformers.T5EncoderModel` (gated-gelu, as T5 v1.1) in eval mode, weights
  ~ N(0, 0.1^2): at 0.2 the unscaled attention of a random T5 is so sharp that float32
  round-off reaches 7e-5 on |h| up to 4 in each implementation (Flax and PyTorch float32 against
  PyTorch float64) and the two differ by up to 1.3e-4 on some prompts; at 0.1 by about 4e-5."""
  from transformers import T5Config, T5EncoderModel
  _seeded(seed)
  config = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=48, num_layers=2,
                    num_heads=2, feed_forward_proj="gated-gelu",
                    relative_attention_num_buckets=8, relative_attention_max_distance=20)
  return _randomize_(T5EncoderModel(config), seed, std=0.1)


def flow_vae_kwargs(**overrides) -> dict:
  """SD3's / FLUX's VAE layout, tiny: 16 latent channels, no quant convs, a shift factor."""
  return vae_kwargs(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                    scaling_factor=1.5305, shift_factor=0.0609, **overrides)


def make_torch_sd3_pipeline(tmp_dir: str, *, seed: int = 0, with_t5: bool = True):
  """A tiny random `diffusers.StableDiffusion3Pipeline` (SD3.5-style transformer: QK RMS-norm,
  a dual-attention first block): CLIP encoders of widths 32 and 24 with projections 16 and 12
  (pooled 28), T5 of width 64 (= joint_attention_dim), shift-3 flow schedule."""
  from diffusers import (FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                         StableDiffusion3Pipeline)
  tokenizer = make_tiny_tokenizer(os.path.join(tmp_dir, "_tokenizer_src"))
  tokenizer_2 = make_tiny_tokenizer(os.path.join(tmp_dir, "_tokenizer_2_src"))
  clip_1 = text_config_kwargs(vocab_size=len(tokenizer), projection_dim=16)
  clip_2 = text_config_kwargs(vocab_size=len(tokenizer), hidden_size=24, intermediate_size=48,
                              num_attention_heads=3, num_hidden_layers=3, projection_dim=12,
                              hidden_act="gelu")
  t5_tokenizer = make_tiny_t5_tokenizer()
  _seeded(seed)
  transformer = _randomize_(SD3Transformer2DModel(
      sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8,
      num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=16,
      pooled_projection_dim=28, out_channels=16, pos_embed_max_size=8, qk_norm="rms_norm",
      dual_attention_layers=(0,)), seed, std=0.1)
  return StableDiffusion3Pipeline(
      transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
      vae=make_torch_vae(flow_vae_kwargs(), seed=seed + 1),
      text_encoder=make_torch_text_encoder_2(clip_1, seed=seed + 2), tokenizer=tokenizer,
      text_encoder_2=make_torch_text_encoder_2(clip_2, seed=seed + 3), tokenizer_2=tokenizer_2,
      text_encoder_3=make_torch_t5(len(t5_tokenizer), 64, seed + 4) if with_t5 else None,
      tokenizer_3=t5_tokenizer if with_t5 else None)


def make_torch_flux_pipeline(tmp_dir: str, *, seed: int = 0, guidance_embeds: bool = True):
  """A tiny random `diffusers.FluxPipeline` (FLUX.1-dev-style with `guidance_embeds`, else
  schnell-style): CLIP-L of width 32 (pooled 32), T5 of width 24, one double- and one
  single-stream block, FLUX.1-dev's dynamically shifted schedule."""
  from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
  tokenizer = make_tiny_tokenizer(os.path.join(tmp_dir, "_tokenizer_src"))
  t5_tokenizer = make_tiny_t5_tokenizer()
  _seeded(seed)
  # Weights ~ N(0, 0.1^2), as tests/test_flux.py explains (the guidance sinusoid's arguments).
  transformer = _randomize_(FluxTransformer2DModel(
      patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=8,
      num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=32,
      guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4)), seed, std=0.1)
  scheduler = FlowMatchEulerDiscreteScheduler(
      shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
      base_image_seq_len=256, max_image_seq_len=4096)
  return FluxPipeline(
      transformer=transformer, scheduler=scheduler,
      vae=make_torch_vae(flow_vae_kwargs(), seed=seed + 1),
      text_encoder=make_torch_text_encoder(text_config_kwargs(vocab_size=len(tokenizer)),
                                           seed=seed + 2), tokenizer=tokenizer,
      text_encoder_2=make_torch_t5(len(t5_tokenizer), 24, seed + 3), tokenizer_2=t5_tokenizer)


def save_tiny_flow_pipeline(directory: str, family: str, *, seed: int = 0, **kwargs) -> str:
  """Writes a tiny diffusers SD3 (`family="sd3"`) or FLUX (`"flux"`) pipeline to `directory`."""
  os.makedirs(directory, exist_ok=True)
  scratch = os.path.join(directory + ".src")
  os.makedirs(scratch, exist_ok=True)
  make = {"sd3": make_torch_sd3_pipeline, "flux": make_torch_flux_pipeline}[family]
  make(scratch, seed=seed, **kwargs).save_pretrained(directory, safe_serialization=True)
  return directory
