"""CTRL: add a new conditional control y to a pre-trained diffusion model from offline
(image, label) pairs (Zhao et al., arXiv 2406.12120; docs/algorithms.md §4).

Pieces:
- `ctrl.data`: offline labelled datasets (NumPy arrays, image folders with a labels file,
  tensorflow-datasets, the built-in digits class / stroke-thickness labels);
- `ctrl.classifiers`: the offline classifier p̂(y | x) (cross-entropy + temperature scaling,
  saved with Orbax) and the noise-conditional classifier of the classifier-guidance baseline;
- `ctrl.policy`: the augmented model (zero-initialised control-embedding tables, one per
  control, each with a null row, added to the UNet's time embedding) as a `Policy`, plus the two
  baselines (classifier-free guidance on the labels, classifier guidance) as policies;
- `trainer.ctrl`: the solvers (direct backpropagation through the DDIM chain, or DDPO's PPO
  update with terminal reward log p̂(y | x_0) and a per-step KL penalty) and the baselines'
  training, all writing the same Orbax checkpoints as DDPO runs;
- `trainer.ctrl_evaluate`: accuracy of the requested label by a judge that is never the training
  classifier, and sample diversity.

Contexts: a CTRL sample is conditioned on a prompt c and labels y = (y_1, ..., y_M), one per
control. Where the DDPO machinery expects a prompt string, the pair is written
"PROMPT||y=3:2" (`format_context`), so per-prompt statistics are kept per (c, y).
"""
