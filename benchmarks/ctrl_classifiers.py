r"""CTRL's offline digits classifiers p̂(y | x), as the digits configs train them, scored on the
held-out split: accuracy, NLL (nats per example) and ECE after temperature scaling, per task,
label budget and random-shift augmentation. Produces the classifier table in docs/results.md.

  python benchmarks/ctrl_classifiers.py --tasks=class,thickness,multi --budgets=100,300,all \
      --shifts=0,1

Each classifier is trained exactly as `python -m ddpo_jax.main --config=ctrl_digits_TASK`
trains it (`ddpo_jax.ctrl.policy.classifier_kwargs` of the config's condition; the data and label
budget of `ddpo_jax.ctrl.data.load_dataset`), with `classifier.augment_shift` set as given; the
validation part is the 20% held out of the labelled data, the test set the 359 images of the
digits "heldout" split (never used to train or calibrate). A few seconds per classifier on a CPU.
"""
import argparse
import importlib
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from ddpo_jax.ctrl import classifiers, data  # noqa: E402
from ddpo_jax.ctrl.policy import classifier_kwargs  # noqa: E402


def load_config(task: str, budget: str):
  module = importlib.import_module(f"ddpo_jax.configs.ctrl_digits_{task}")
  return module.get_config("" if budget == "all" else f"n{budget}")


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--tasks", default="class,thickness,multi")
  p.add_argument("--budgets", default="100,300,all")
  p.add_argument("--shifts", default="0,1", help="classifier.augment_shift values to compare")
  args = p.parse_args()
  print("| task | control | labels (train/val) | shift | held-out accuracy | NLL | ECE | T |")
  print("|---|---|---|---|---|---|---|---|")
  for task in args.tasks.split(","):
    for budget in args.budgets.split(","):
      config = load_config(task, budget)
      for name in config.ctrl.controls:
        cond = config.ctrl.conditions[name]
        ds = data.load_dataset(cond.data)
        test = data.load_dataset({"source": cond.data.source, "split": "heldout"})
        for shift in args.shifts.split(","):
          kw = classifier_kwargs(cond.classifier)
          kw["augment_shift"] = int(shift)
          clf, report = classifiers.train_offline_classifier(ds, **kw)
          ev = classifiers.evaluate_classifier(clf, test.images, test.labels)
          print(f"| {task} | {name} | {budget} ({report['num_train']}/{report['num_val']}) | "
                f"{shift} | {ev['accuracy']:.3f} | {ev['nll']:.3f} | {ev['ece']:.3f} | "
                f"{report['temperature']:.2f} |", flush=True)


if __name__ == "__main__":
  main()
