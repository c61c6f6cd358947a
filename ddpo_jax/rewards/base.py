"""The reward term type every reward module returns (`ddpo_jax.rewards` documents `fn`'s two
calling conventions: device rewards and host rewards)."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence


@dataclasses.dataclass(frozen=True)
class Reward:
  """A named reward term. See the `ddpo_jax.rewards` docstring for `fn`'s two calling
  conventions.

  `prompt_metadata`: optional host function, prompts -> dict of (n, ...) NumPy arrays the
  trainer merges into the sampled batch's metadata (e.g. a CLIP reward's own token ids,
  "clip_ids"), for a device reward whose text tokenizer is not the policy's.
  """
  name: str
  fn: Callable[..., tuple[Any, dict]]
  on_device: bool
  prompt_metadata: Callable[[Sequence[str]], dict] | None = None
