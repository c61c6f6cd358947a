r"""Flow-GRPO on Stable Diffusion 3.5 Medium with three rewards: PickScore (weight 1.0, on device),
the OCR reward (0.5) and the GenEval reward (0.5), each behind its own reward server; otherwise
ddpo_jax/configs/sd3_pickscore.py (`ddpo_jax.config_base.sd3_flow_grpo_base` lists the shared
hyperparameters and their source; the KL weight is pickscore's). The trained reward is 1.0 *
pickscore + 0.5 * remote_ocr + 0.5 * remote_geneval (flow_grpo's multi-reward weighted sum);
metrics.jsonl logs each term (pickscore_mean, remote_ocr_mean, remote_geneval_mean), their numeric
info (remote_ocr_edit_distance_mean, remote_geneval_strict_accuracy_mean, ...) and their sum
(reward_mean). docs/rewards.md explains hosting the scorers (installs, the GenEval checkpoint and
specs).

  # the OCR scorer machine
  python -m ddpo_jax.rewards.server --scorer=ocr --host=0.0.0.0 --port=8085
  # the GenEval scorer machine: specs looked up by prompt in the JSONL, MASK2FORMER.pth the
  # Mask2Former checkpoint of docs/rewards.md
  python -m ddpo_jax.rewards.server --scorer=geneval --host=0.0.0.0 --port=8086 \
      --scorer_kwargs='{"metadata_path": "/data/geneval/train_metadata.jsonl",
                        "engine_kwargs": {"checkpoint": "/data/MASK2FORMER.pth"}}'
  # the trainer; every prompt must suit both scorers: quote the text to render (OCR) and have
  # its GenEval spec in the server's JSONL, e.g. 'a photo of a red car and a sign that says "OPEN"'
  python -m ddpo_jax.main --config=sd3_multi_reward --workdir=/tmp/sd3_multi \
      --config.prompt_fn_kwargs.path=/data/multi_reward_prompts.txt \
      --config.reward.pickscore_path=/data/PickScore_v1 \
      --config.reward.clip_tokenizer_path=/data/CLIP-ViT-H-14-laion2B-s32B-b79K \
      --config.reward.server_urls.ocr=http://OCR_HOST:8085 \
      --config.reward.server_urls.geneval=http://GENEVAL_HOST:8086

Both URLs are '' here: a run that does not set them stops with a ValueError naming the key when
its rewards are built, before the first epoch. Other weights: --config.reward.weights.remote_ocr=0.2
(0: logged, not trained on). Another remote term: add "remote_NAME" to reward.weights and NAME to
reward.server_urls in a config file of your own (a mapping gains keys there, not on the command
line).

Variants: `:full` (full transformer fine-tuning), `:runlocal` (seconds on a CPU; add
--config.model.pretrained_path=TINY_SD3_PIPELINE_DIR).
"""

import ml_collections

from ddpo_jax import config_base


def get_config(arg=None):
  config = config_base.sd3_flow_grpo_base()
  config.reward.weights = ml_collections.ConfigDict(
      {"pickscore": 1.0, "remote_ocr": 0.5, "remote_geneval": 0.5})
  config.reward.server_urls = ml_collections.ConfigDict({"ocr": "", "geneval": ""})
  # flow_grpo's KL weight `train.beta` of `pickscore_sd3`, in its units
  config.train.kl_beta = 0.01
  return config_base.apply_variants(config, arg, config_base.FLOW_VARIANTS, "SD3 Flow-GRPO")
