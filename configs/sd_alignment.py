r"""Stable Diffusion DDPO, prompt-image alignment (paper §6.1; the torch port's
`prompt_image_alignment`).

Prompts "a(n) ANIMAL ACTIVITY" (45 simple animals × the activities of `activities.txt`); reward
from a reward server (`python -m ddpo_jax.rewards.server --scorer=llava_bertscore ...`, LLaVA's
answer to "what is going on in this image?" scored by BERTScore recall against "The image
contains PROMPT") at `reward.server_url`, queried by a thread pool while the device keeps
sampling. 200 epochs × 288 samples (32 × 9); optimizer steps of 144 samples (8 × 18
accumulated, as the torch port's 6 GPUs × 4 × 6), 2 per epoch; stat tracking buffer 32, min 16.

  python -m ddpo_jax.rewards.server --scorer=llava_bertscore --port=8000 \
      --scorer_kwargs='{"model": "llava-hf/llava-1.5-7b-hf"}' &   # on a GPU host (docs/rewards.md)
  DDPO_JAX_ASSETS=/path/to/assets python -m ddpo_jax.main \
      --config=configs/sd_alignment.py --workdir=/tmp/sd_alignment \
      --config.reward.server_url=http://127.0.0.1:8000

Variants: `:full`, `:runlocal` (the tests run the latter against a `--scorer=brightness` server).
"""

from ddpo_jax import recipes


def get_config(arg=None):
  return recipes.sd_task_config("alignment", arg)
