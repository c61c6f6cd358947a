r"""CTRL on Stable Diffusion with two controls: aesthetic level × JPEG-size level
(docs/algorithms.md §4).

Labels y = (aesthetic level, JPEG level), 4 levels each, written "a:j" (e.g. --labels=3:0 = the
most aesthetic quarter and the most compressible quarter). Each control has its OWN offline pair
dataset (y1 ⊥ y2 | x, so no jointly labelled images are needed): 2048 samples of the pre-trained
SD-1.5 each (512×512, 50 DDIM steps, eta 1, CFG 5; prompts: the 45 simple animals of the
aesthetic task; different sampling seeds), one labelled by the LAION aesthetic score (CLIP
ViT-L/14 + MLP, `reward.clip_path` / `reward.aesthetic_mlp_path`) cut at its quartiles, the other
by JPEG size (kB, quality 95) cut at its quartiles (`ddpo_jax.ctrl.sampled_data`; cached in
WORKDIR/offline_data/{aesthetic,jpeg}.npz). Reward: log p̂_a(y1 | x) + log p̂_j(y2 | x), each a
SmallCNN on 64×64 resized images trained on its own dataset. Judges: the real aesthetic score
and the real JPEG size, bucketed by each dataset's cut points (`joint_accuracy` in eval.json).

Solver and hyperparameters as ddpo_jax/configs/ctrl_sd_compressibility.py: direct backpropagation with
random truncation, LoRA lr 1e-3 + table lr 1e-2, weight decay 0.1, clip 5, reward weight 0.1, KL
weight 0.01 MEAN-reduced over the latent dims (α = 0.1 per mean-reduced KL ≈ 6.1e-6 on the exact
KL; --config.ctrl.kl_reduction=sum for the exact KL).

  DDPO_JAX_ASSETS=/path/to/assets python -m ddpo_jax.main \
      --config=ctrl_sd_multitask --workdir=/tmp/ctrl_sd_multi \
      --config.model.pretrained_path=/data/stable-diffusion-v1-5 \
      --config.reward.aesthetic_mlp_path=/path/to/sac+logos+ava1-l14-linearMSE.pth
  python -m ddpo_jax.sample --workdir=/tmp/ctrl_sd_multi --labels=3:0,0:3 --num=16

Variants as ddpo_jax/configs/ctrl_sd_compressibility.py (`nN`, `cfg`, `cg`, `ddpo`, `runlocal`; the
latter also needs --config.reward.clip_path=DIR of a CLIP vision tower with projection_dim 768).
"""
from ddpo_jax import config_base
from ddpo_jax.config_schema import condition

NUM_LEVELS = 4


def get_config(arg=None):
  config = config_base.ctrl_sd_base("simple_animals")
  config.ctrl.controls = ("aesthetic", "jpeg")
  aesthetic = config.ctrl.conditions.aesthetic = condition(
      "sampled_aesthetic_levels", NUM_LEVELS, name="aesthetic", path="", num_images=2048,
      sample_seed=1, batch_size=0)
  jpeg = config.ctrl.conditions.jpeg = condition(
      "sampled_jpeg_levels", NUM_LEVELS, name="jpeg", path="", num_images=2048, sample_seed=2,
      batch_size=0, quality=95)
  for cond in (aesthetic, jpeg):
    cond.classifier.input_size = 64
  jpeg.classifier.augment_noise = 0.0  # pixel noise changes the JPEG size
  # runlocal: 32 evaluation samples = 2 per label combination
  variants = config_base.ctrl_sd_variants(runlocal_eval_samples=32)
  return config_base.apply_variants(config, arg, variants, "CTRL")
