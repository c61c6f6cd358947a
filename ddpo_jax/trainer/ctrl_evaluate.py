r"""Evaluates a CTRL (or baseline) run: is the requested label there, and is there variety?

    python -m ddpo_jax.ctrl.evaluate --workdir=W --num=300 [--step=S]

Samples `--num` images cycling through every label combination, then reports
- `<control>_accuracy`: fraction whose label, judged by the control's *judge*, equals the
  requested one. Judges (`ctrl.judges`) never are the training classifier: digits class → an
  SVC trained on the held-out split only; digits stroke thickness → the pixel rule itself
  (`ctrl.data.thickness_level`); levels sampled from the pre-trained model (JPEG size,
  aesthetic score) → the image's real JPEG size / aesthetic score bucketed by the data's
  stored cut points (`ctrl.sampled_data`); other sources register a judge in `judges.JUDGES`;
- `joint_accuracy` (all controls right at once, multi-control runs);
- `<control>_classifier_accuracy`: the same under the training classifier p̂ (the gap to the
  judge's shows reward over-optimisation);
- `diversity`: mean pairwise L2 distance (pixels in [0, 1]) between samples that asked for the
  same labels, averaged over label combinations; `data_diversity`: the same statistic of the
  labelled data of the first control (per class), for scale.
Writes WORKDIR/eval.json.
"""
from __future__ import annotations

import itertools
import json
import os
import jax
import numpy as np

from ddpo_jax.ctrl.controls import controls_from_config, parse_context
from ddpo_jax.ctrl.judges import make_judge
from ddpo_jax.trainer.runs import restore_run
from ddpo_jax.trainer.sample import sample_images


def mean_pairwise_distance(images: np.ndarray) -> float:
  """Mean L2 distance over all pairs i < j of images (N, ...) (as float, pixels as given)."""
  if len(images) < 2:
    return float("nan")
  x = images.reshape(len(images), -1).astype(np.float64)
  sq = (x ** 2).sum(1)
  d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0.0)
  iu = np.triu_indices(len(x), 1)
  return float(np.sqrt(d2[iu]).mean())


def label_combinations(controls) -> list[str]:
  """Every label combination as a spec "a:b:..." (first control slowest)."""
  return [":".join(map(str, combo))
          for combo in itertools.product(*[range(c.num_classes) for c in controls])]


def evaluate_run(workdir: str, num: int, seed: int = 0, step: int | None = None,
                 batch_size: int = 256) -> dict:
  """Samples `num` images of the run cycling through all label combinations and scores them
  (see the module docstring). Returns the metrics and writes WORKDIR/eval.json."""
  config, policy, params, step_ = restore_run(workdir, step)
  controls = controls_from_config(config)
  specs = label_combinations(controls)
  images, contexts = sample_images(config, policy, params, num, seed=seed, batch_size=batch_size,
                                   labels=specs)
  labels = np.asarray([parse_context(c)[1] for c in contexts], np.int32)
  result = {"step": int(step_), "num_samples": int(num), "method": config.ctrl.method,
            "solver": config.ctrl.solver if config.ctrl.method == "ctrl" else "",
            "num_labelled": {c.name: len(policy.ctrl.datasets[c.name]) for c in controls}}
  joint = np.ones(len(images), bool)
  x = images.astype(np.float32) / 255.0
  for i, c in enumerate(controls):
    clf = policy.ctrl.classifiers[c.name]
    pred = np.asarray(jax.device_get(clf.log_probs(x))).argmax(-1)
    result[f"{c.name}_classifier_accuracy"] = float((pred == labels[:, i]).mean())
    judge = make_judge(config.ctrl.conditions[c.name].data, config, workdir)
    if judge is not None:
      ok = judge(images) == labels[:, i]
      result[f"{c.name}_accuracy"] = float(ok.mean())
      joint &= ok
  if len(controls) > 1:
    result["joint_accuracy"] = float(joint.mean())
  per_combo = [mean_pairwise_distance(x[(labels == np.asarray(
      [int(v) for v in s.split(":")])).all(1)]) for s in specs]
  result["diversity"] = float(np.nanmean(per_combo))
  ds = policy.ctrl.datasets[controls[0].name]
  result["data_diversity"] = float(np.nanmean([mean_pairwise_distance(ds.images[ds.labels == k])
                                               for k in range(controls[0].num_classes)]))
  with open(os.path.join(workdir, "eval.json"), "w") as f:
    json.dump(result, f, indent=1)
  return result


def main(argv):
  from absl import flags
  del argv
  f = flags.FLAGS
  result = evaluate_run(f.workdir, f.num, seed=f.seed, step=f.step)
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  from absl import app, flags
  flags.DEFINE_string("workdir", None, "A CTRL run directory.", required=True)
  flags.DEFINE_integer("num", 300, "Number of samples (cycled over all label combinations).")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
  app.run(main)
