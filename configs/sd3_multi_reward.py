r"""Flow-GRPO on Stable Diffusion 3.5 Medium with two rewards: PickScore (weight 1.0, on device)
plus a remote scorer (weight 0.5), e.g. the OCR reward behind the reward server; otherwise
configs/sd3_pickscore.py (`ddpo_jax.recipes.sd3_flow_grpo_config` lists the hyperparameters and
their source). The trained reward is 1.0 * pickscore + 0.5 * remote; metrics.jsonl logs each
term (pickscore_mean, remote_mean, remote_edit_distance_mean) and their sum (reward_mean).
docs/rewards.md explains hosting the scorer.

  # the scorer machine
  python -m ddpo_jax.rewards.server --scorer=ocr --host=0.0.0.0 --port=8085
  # the trainer; OCR prompts quote the text to render ('A sign that says "OPEN"')
  python -m ddpo_jax.main --config=configs/sd3_multi_reward.py --workdir=/tmp/sd3_multi \
      --config.prompt_fn_kwargs.path=/data/flow_grpo/dataset/ocr/train.txt \
      --config.reward.pickscore_path=/data/PickScore_v1 \
      --config.reward.clip_tokenizer_path=/data/CLIP-ViT-H-14-laion2B-s32B-b79K \
      --config.reward.server_url=http://SCORER_HOST:8085

Other weights: --config.reward.weights.remote=0.2. One remote term only: `reward.server_url`
names one server (docs/rewards.md, "Several rewards").

Variants: `:full` (full transformer fine-tuning), `:runlocal` (seconds on a CPU; add
--config.model.pretrained_path=TINY_SD3_PIPELINE_DIR).
"""

import ml_collections

from ddpo_jax import recipes


def get_config(arg=None):
  config = recipes.sd3_flow_grpo_config("pickscore", arg)
  config.reward.weights = ml_collections.ConfigDict({"pickscore": 1.0, "remote": 0.5})
  return config
