"""Stable Diffusion (1.x / 2.x, SDXL; the SD3 / SD3.5 MMDiT, the FLUX.1 transformer, the T5
encoder) models in Flax, loaded from diffusers/transformers checkpoints.

Conventions at this public interface:
- Every image and latent tensor is NHWC (channels last): UNet input/output (B, H, W, C),
  VAE images (B, H, W, 3) in [-1, 1] and latents (B, H/8, W/8, 4), CLIP pixels (B, 224, 224, 3).
- A "params" tree is the inner Flax dict (`module.apply({"params": params}, ...)`).
- Parameters load from the standard diffusers directory layout (model_index.json, unet/, vae/,
  text_encoder/, tokenizer/, scheduler/; SDXL also text_encoder_2/, tokenizer_2/; SD3 / FLUX.1
  transformer/ and their CLIP and T5 encoders, `flow_pipeline`) or a
  transformers CLIP directory, through one key
  table per model (`weights.py`); no PyTorch is needed at run time.

Main entry points: `load_pipeline`, `save_pipeline`, `init_pipeline`, `load_clip_vision`.
"""
from ddpo_jax.models.attention import dot_product_attention
from ddpo_jax.models.clip import (
    CLIP_MEAN, CLIP_STD, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig,
    CLIPVisionModelWithProjection, ClipVision, clip_preprocess, clip_text_from_torch,
    clip_text_to_torch, clip_vision_from_torch, clip_vision_to_torch, init_clip_text_params,
    init_clip_vision_params, load_clip_text, load_clip_vision)
from ddpo_jax.models.flow_pipeline import FlowPipeline
from ddpo_jax.models.flux import (
    FluxConfig, FluxTransformer2DModel, flux_from_torch, flux_to_torch, image_ids, pack_latents,
    unpack_latents)
from ddpo_jax.models.mmdit import (
    MMDiTConfig, SD3Transformer2DModel, init_mmdit_params, mmdit_from_torch, mmdit_to_torch)
from ddpo_jax.models.pipeline import (
    Pipeline, PipelineLoadError, init_pipeline, load_pipeline, save_pipeline, sd15_configs,
    sdxl_time_ids)
from ddpo_jax.models.t5 import T5Config, T5EncoderModel, t5_from_torch, t5_to_torch
from ddpo_jax.models.unet import (
    UNet2DConditionModel, UNetConfig, init_unet_params, unet_from_torch, unet_to_torch)
from ddpo_jax.models.vae import (
    AutoencoderKL, VAEConfig, init_vae_params, vae_from_torch, vae_to_torch)
from ddpo_jax.models.weights import WeightLoadingError
