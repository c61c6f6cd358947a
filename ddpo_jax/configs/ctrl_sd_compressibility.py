r"""CTRL on Stable Diffusion: add y = JPEG-size level (4 levels) to SD-1.5 (docs/algorithms.md §4).

Offline data: 2048 images sampled from the pre-trained model itself (512×512, 50 DDIM steps, eta
1, CFG 5; prompts: the 398 ImageNet animals of the compressibility task), each labelled by its
real JPEG size (kB, PIL quality 95) cut at the 25/50/75% quantiles: level 0 = the 25% most
compressible, level 3 = the 25% largest files (`ddpo_jax.ctrl.sampled_data`; cached once in
WORKDIR/offline_data/jpeg.npz with the cut points). p̂(y | x): a SmallCNN on 64×64 resized
images (no noise augmentation: noise changes JPEG size), temperature-calibrated. The judge of
`eval.json` is the real JPEG size of each new sample bucketed by the same cut points.

Solver: the reference's direct backpropagation through the 50-step chain with random
truncation; LoRA (rank 4) + the control table, AdamW (LoRA lr 1e-3, table lr 1e-2, weight decay
0.1), grad-norm clip 5, reward weight 0.1, KL weight 0.01 with the KL MEAN-reduced over the
64×64×4 latent dims, as the reference code: α = kl_weight / reward_weight = 0.1 per mean-reduced
KL, i.e. α = 0.1 / 16384 ≈ 6.1e-6 on the exact (summed) KL, nearly unregularised (use
--config.ctrl.kl_reduction=sum for the theory's KL with the same α = 0.1). 20 epochs × 10
optimizer steps of 32 chains (4 × 8 accumulated); UNet blocks rematerialised.

  DDPO_JAX_ASSETS=/path/to/assets python -m ddpo_jax.main \
      --config=ctrl_sd_compressibility --workdir=/tmp/ctrl_sd_jpeg \
      --config.model.pretrained_path=/data/stable-diffusion-v1-5
  python -m ddpo_jax.sample --workdir=/tmp/ctrl_sd_jpeg --labels=0,1,2,3 --num=16

Variants (`--config=ctrl_sd_compressibility:VARIANT`, comma-separated): `n512` etc.
(label budget), `cfg` / `cg` (the baselines on the same sampled data), `ddpo` (the PPO solver),
`runlocal` (seconds on a CPU against a tiny pipeline: add --config.model.pretrained_path=DIR).
"""
from ddpo_jax import config_base
from ddpo_jax.config_schema import condition

NUM_LEVELS = 4


def get_config(arg=None):
  config = config_base.ctrl_sd_base("imagenet_animals")
  config.ctrl.controls = ("jpeg",)
  jpeg = config.ctrl.conditions.jpeg = condition(
      "sampled_jpeg_levels", NUM_LEVELS, name="jpeg", path="", num_images=2048, sample_seed=0,
      batch_size=0, quality=95)
  jpeg.classifier.input_size = 64
  jpeg.classifier.augment_noise = 0.0
  variants = config_base.ctrl_sd_variants(runlocal_eval_samples=8)  # runlocal: 2 per level
  return config_base.apply_variants(config, arg, variants, "CTRL")
