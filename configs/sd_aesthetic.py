r"""Stable Diffusion DDPO, LAION aesthetic score (paper §6.1; the torch port's `aesthetic`).

Reward: the LAION aesthetic MLP (`sac+logos+ava1-l14-linearMSE.pth`) on the L2-normalised CLIP
ViT-L/14 image embedding, computed on the device in the sampling program; prompts: the 45
simple animals (`simple_animals.txt`). 200 epochs × 256 samples; optimizer steps of 128 samples
(8 × 16 accumulated, as the torch port's 8 GPUs × 4 × 4), 2 per epoch; stat tracking buffer 32,
min 16. Otherwise as configs/sd_compressibility.py (LoRA rank 4, lr 3e-4, 50 steps, CFG 5).

  DDPO_JAX_ASSETS=/path/to/assets python -m ddpo_jax.main \
      --config=configs/sd_aesthetic.py --workdir=/tmp/sd_aesthetic \
      --config.reward.aesthetic_mlp_path=/path/to/sac+logos+ava1-l14-linearMSE.pth

(`reward.clip_path` defaults to the Hub id openai/clip-vit-large-patch14; a local directory
works too.) Variants: `:full`, `:runlocal` (the latter also needs --config.reward.clip_path=DIR
of a CLIP vision tower with projection_dim 768).
"""

from ddpo_jax import recipes


def get_config(arg=None):
  return recipes.sd_task_config("aesthetic", arg)
