r"""DiffusionNFT on Stable Diffusion 3.5 Medium, ocr reward (NVlabs/DiffusionNFT's
`sd3_ocr` at global batch sizes; `ddpo_jax.recipes.sd3_nft_config` lists the
hyperparameters and their source).

  python -m ddpo_jax.main --config=configs/sd3_nft_ocr.py --workdir=/tmp/sd3_nft_ocr \
      --config.prompt_fn_kwargs.path=PROMPTS.txt --config.reward.server_url=URL

Variants: `:full` (full transformer fine-tuning), `:runlocal` (seconds on a CPU; add
--config.model.pretrained_path=TINY_SD3_PIPELINE_DIR).
"""

from ddpo_jax import recipes


def get_config(arg=None):
  return recipes.sd3_nft_config("ocr", arg)
