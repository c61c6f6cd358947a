"""Scorers hosted by the reward server (`python -m ddpo_jax.rewards.server --scorer=NAME`).

A scorer is a callable `(images, prompts, metadata) -> (rewards, info)`:
  images: (B, H, W, 3) uint8 NumPy array (decoded JPEGs; a list of arrays if sizes differ);
  prompts: list of B str;  metadata: dict (per-sample entries are lists of B values);
  rewards: B floats;  info: {name: B values (numbers or str)}.

Built-ins (`BUILTIN`, name -> factory called with the server's --scorer_kwargs):
  brightness       cheap and deterministic (tests): mean pixel value / 255; info: prompt_length.
  fail_on_prompt   as brightness, but raises on a batch containing the trigger prompt (tests).
  llava_bertscore  the DDPO prompt-alignment reward: a vision-language model answers "what is
                   going on in this image?", and the reward is the BERTScore recall of
                   "The image contains PROMPT" against the answer (kvablack/LLaVA-server:
                   LLaVA + BERTScore with microsoft/deberta-xlarge-mnli). Needs torch and
                   transformers with real weights (a local directory or a Hub id).
  ocr              flow_grpo's OCR reward: 1 - capped edit distance / length between the text an
                   OCR engine reads and the prompt's quoted text (`ddpo_jax.rewards.ocr`;
                   PaddleOCR by default, any `engine="MODULE:ATTR"`).
  geneval          GenEval's object / count / colour / position checks on an object detector's
                   output, flow_grpo's reward (`ddpo_jax.rewards.geneval`; Mask2Former by
                   default, any `engine="MODULE:ATTR"`).
docs/rewards.md shows how to host each.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import numpy as np

from ddpo_jax.rewards import geneval, ocr

Scorer = Callable[[Any, Sequence[str], dict], tuple[Any, dict]]


# ----------------------------------------------------------------------------------------------
# Test scorers
# ----------------------------------------------------------------------------------------------

def brightness(images, prompts, metadata):
  """Reward = mean pixel value / 255 of each image (float64); info: prompt lengths (chars)."""
  del metadata
  rewards = [float(np.mean(np.asarray(img, np.float64))) / 255.0 for img in images]
  return rewards, {"prompt_length": [len(p) for p in prompts]}


def make_brightness() -> Scorer:
  return brightness


def make_fail_on_prompt(trigger: str = "FAIL") -> Scorer:
  """`brightness`, but raises RuntimeError on a batch in which some prompt equals `trigger`."""
  def scorer(images, prompts, metadata):
    if trigger in prompts:
      raise RuntimeError(f"fail_on_prompt: got the trigger prompt {trigger!r}")
    return brightness(images, prompts, metadata)
  return scorer


# ----------------------------------------------------------------------------------------------
# BERTScore
# ----------------------------------------------------------------------------------------------

# Layer used by the `bert_score` package for some models (its `model2layers`).
BERTSCORE_LAYERS = {
    "microsoft/deberta-xlarge-mnli": 40,
    "microsoft/deberta-large-mnli": 18,
    "microsoft/deberta-base-mnli": 9,
    "roberta-large": 17,
    "bert-base-uncased": 9,
}


def greedy_cosine(cand_emb: np.ndarray, cand_mask: np.ndarray, cand_weight: np.ndarray,
                  ref_emb: np.ndarray, ref_mask: np.ndarray, ref_weight: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """BERTScore greedy matching (`bert_score.utils.greedy_cos_idf`), NumPy.

  Args:
    cand_emb: (B, Lc, D) candidate token embeddings; ref_emb: (B, Lr, D) reference ones.
    cand_mask, ref_mask: (B, L) 1 for real tokens (special tokens included), 0 for padding.
    cand_weight, ref_weight: (B, L) token weights (idf, or 1; 0 for [CLS]/[SEP] and padding).

  Returns:
    precision, recall, f1: (B,) float64. Precision averages, over candidate tokens, the best
    cosine similarity with a reference token; recall the reverse. As `bert_score`, padded pairs
    count as similarity 0 in the max, and a sentence with no weighted token scores 0.
  """
  def unit(x):
    x = np.asarray(x, np.float64)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norm == 0, 1.0, norm)  # zero (padding) vectors stay zero, not NaN
  sim = np.einsum("bcd,brd->bcr", unit(cand_emb), unit(ref_emb))
  sim = sim * (np.asarray(cand_mask, np.float64)[:, :, None] *
               np.asarray(ref_mask, np.float64)[:, None, :])
  word_precision = sim.max(axis=2)
  word_recall = sim.max(axis=1)
  cw, rw = np.asarray(cand_weight, np.float64), np.asarray(ref_weight, np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    precision = (word_precision * cw).sum(1) / cw.sum(1)
    recall = (word_recall * rw).sum(1) / rw.sum(1)
    f1 = 2 * precision * recall / (precision + recall)
  empty = (cw.sum(1) == 0) | (rw.sum(1) == 0)
  precision[empty] = 0.0
  recall[empty] = 0.0
  return precision, recall, np.nan_to_num(np.where(empty, 0.0, f1), nan=0.0)


class BertScore:
  """BERTScore (Zhang et al. 2020) as the `bert_score` package's `BERTScorer(model)` without
  idf or baseline rescaling (the LLaVA-server setting): token embeddings of layer `num_layers`
  (hidden_states[num_layers]), [CLS]/[SEP] excluded from the averages, greedy cosine matching.

  Args:
    model: a transformers encoder (local directory or Hub id), e.g.
      "microsoft/deberta-xlarge-mnli".
    num_layers: the hidden-state layer; None = `BERTSCORE_LAYERS[model]` if known, else the last.
    device: torch device ("cuda", "cpu"); None = cuda if available.
    batch_size: sentences per forward pass.
    add_prefix_space: encode with a leading space (`bert_score` does so for the slow GPT-2 /
      RoBERTa tokenizer classes only; LLaVA-server's fast DeBERTa tokenizer gets none).
  """

  def __init__(self, model: str, num_layers: int | None = None, device: str | None = None,
               batch_size: int = 64, add_prefix_space: bool = False):
    if not model:
      raise ValueError("BertScore: `model` (a directory or Hub id) is required")
    if num_layers is not None and num_layers < 0:
      raise ValueError(f"BertScore: num_layers must be >= 0, got {num_layers}")
    import torch
    import transformers
    self._torch = torch
    self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    self.tokenizer = transformers.AutoTokenizer.from_pretrained(model)
    self.model = transformers.AutoModel.from_pretrained(model).to(self.device).eval()
    n_hidden = getattr(self.model.config, "num_hidden_layers", None)
    if num_layers is None:
      num_layers = BERTSCORE_LAYERS.get(os.fspath(model).rstrip("/"), n_hidden)
    if n_hidden is not None and num_layers > n_hidden:
      raise ValueError(f"BertScore: num_layers {num_layers} > the model's {n_hidden} layers")
    self.num_layers = num_layers
    # Tokenizers without a saved limit report a huge model_max_length: bound it by the model.
    self.max_length = min(self.tokenizer.model_max_length,
                          getattr(self.model.config, "max_position_embeddings", None) or 512)
    self.batch_size = batch_size
    self.add_prefix_space = add_prefix_space
    self._special = {i for i in (self.tokenizer.cls_token_id, self.tokenizer.sep_token_id)
                     if i is not None}

  def _encode(self, sentence: str) -> list[int]:
    """Token ids with the special tokens ("" -> just [CLS] [SEP]), truncated to the model."""
    sentence = sentence.strip()
    kw = {"add_prefix_space": True} if self.add_prefix_space and sentence else {}
    return self.tokenizer.encode(sentence, add_special_tokens=True, truncation=True,
                                 max_length=self.max_length, **kw)

  def embed(self, sentences: Sequence[str]):
    """-> (embeddings (B, L, D) float32, mask (B, L), weights (B, L)) NumPy, zero-padded."""
    torch = self._torch
    ids = [self._encode(s) for s in sentences]
    length = max((len(i) for i in ids), default=0)
    pad = self.tokenizer.pad_token_id or 0
    tokens = np.full((len(ids), length), pad, np.int64)
    mask = np.zeros((len(ids), length), np.int64)
    for b, seq in enumerate(ids):
      tokens[b, :len(seq)] = seq
      mask[b, :len(seq)] = 1
    weights = mask * ~np.isin(tokens, list(self._special))
    outs = []
    with torch.no_grad():
      for s in range(0, len(ids), self.batch_size):
        out = self.model(input_ids=torch.from_numpy(tokens[s:s + self.batch_size]).to(
            self.device), attention_mask=torch.from_numpy(mask[s:s + self.batch_size]).to(
                self.device), output_hidden_states=True)
        outs.append(out.hidden_states[self.num_layers].float().cpu().numpy())
    embeds = np.concatenate(outs) if outs else np.zeros((0, length, 1), np.float32)
    return embeds, mask, weights.astype(np.float64)

  def __call__(self, candidates: Sequence[str], references: Sequence[str]):
    """-> (precision, recall, f1), each (B,) float64."""
    if len(candidates) != len(references):
      raise ValueError(f"BertScore: {len(candidates)} candidates but {len(references)} "
                       "references")
    if not candidates:
      return tuple(np.zeros((0,)) for _ in range(3))
    ce, cm, cw = self.embed(candidates)
    re_, rm, rw = self.embed(references)
    return greedy_cosine(ce, cm, cw, re_, rm, rw)


# ----------------------------------------------------------------------------------------------
# Vision-language captioning (LLaVA and other transformers image-text-to-text models)
# ----------------------------------------------------------------------------------------------

class VlmAnswerer:
  """Answers one question about each image with a transformers image-text-to-text model
  (`AutoModelForImageTextToText`, e.g. "llava-hf/llava-1.5-7b-hf"), greedy decoding.

  Args:
    model: local directory or Hub id of the model and its processor (with a chat template).
    device: torch device; None = cuda if available.
    dtype: "float16", "bfloat16" or "float32".
    max_new_tokens: answer length cap (64, as LLaVA-server).
  """

  def __init__(self, model: str, device: str | None = None, dtype: str = "float16",
               max_new_tokens: int = 64):
    if not model:
      raise ValueError("VlmAnswerer: `model` (a directory or Hub id) is required")
    if dtype not in ("float16", "bfloat16", "float32"):
      raise ValueError(f"VlmAnswerer: dtype must be float16, bfloat16 or float32, got {dtype!r}")
    if max_new_tokens < 1:
      raise ValueError(f"VlmAnswerer: max_new_tokens must be >= 1, got {max_new_tokens}")
    import torch
    import transformers
    self._torch = torch
    self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    self.dtype = getattr(torch, dtype)
    self.processor = transformers.AutoProcessor.from_pretrained(model)
    tokenizer = getattr(self.processor, "tokenizer", None)
    if tokenizer is not None:
      tokenizer.padding_side = "left"  # batched generation continues every row at its end
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # renamed in 4.56
    self.model = transformers.AutoModelForImageTextToText.from_pretrained(
        model, **{dtype_key: self.dtype}).to(self.device).eval()
    self.max_new_tokens = max_new_tokens

  def __call__(self, images, question: str) -> list[str]:
    """images: sequence of (H, W, 3) uint8 -> one stripped answer per image."""
    from PIL import Image
    torch = self._torch
    pil = [Image.fromarray(np.asarray(img, np.uint8)) for img in images]
    conversation = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": question}]}]
    prompt = self.processor.apply_chat_template(conversation, add_generation_prompt=True)
    inputs = self.processor(images=pil, text=[prompt] * len(pil), return_tensors="pt",
                            padding=True).to(self.device, self.dtype)
    with torch.inference_mode():
      out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
    answers = self.processor.batch_decode(out[:, inputs["input_ids"].shape[1]:],
                                          skip_special_tokens=True)
    return [a.strip() for a in answers]


QUESTION = "Answer concisely: what is going on in this image?"
ANSWER_TEMPLATE = "The image contains {prompt}"


class LlavaBertScore:
  """Prompt-alignment scorer: reward = BERTScore recall of `ANSWER_TEMPLATE.format(prompt)`
  (the reference) against the VLM's answer to `question` (the candidate).

  Info: "precision", "f1" (BERTScore) and "answers" (the VLM's text), one per image.

  Args:
    model: VLM directory or Hub id (e.g. "llava-hf/llava-1.5-7b-hf"); required.
    bert_model: BERTScore encoder (default microsoft/deberta-xlarge-mnli, layer 40).
    bert_layer: its hidden-state layer (None: the `bert_score` default for known models).
    device, dtype, max_new_tokens: see `VlmAnswerer`.
    question, answer_template: the query, and the reference text with a "{prompt}" field.
    batch_size: images per VLM forward pass.
    answerer, bertscore: prebuilt callables replacing the VLM / BERTScore (tests, reuse).
  """

  def __init__(self, model: str | None = None, bert_model: str = "microsoft/deberta-xlarge-mnli",
               bert_layer: int | None = None, device: str | None = None,
               dtype: str = "float16", max_new_tokens: int = 64, question: str = QUESTION,
               answer_template: str = ANSWER_TEMPLATE, batch_size: int = 16,
               answerer: Callable | None = None, bertscore: Callable | None = None):
    if answerer is None and not model:
      raise ValueError("llava_bertscore: `model` (a local directory or Hub id of a transformers "
                       "image-text-to-text model, e.g. llava-hf/llava-1.5-7b-hf) is required")
    if "{prompt}" not in answer_template:
      raise ValueError(f"llava_bertscore: answer_template must contain '{{prompt}}', got "
                       f"{answer_template!r}")
    if not question.strip():
      raise ValueError("llava_bertscore: `question` is empty")
    if batch_size < 1:
      raise ValueError(f"llava_bertscore: batch_size must be >= 1, got {batch_size}")
    self.question = question
    self.answer_template = answer_template
    self.batch_size = batch_size
    self.answerer = answerer or VlmAnswerer(model, device, dtype, max_new_tokens)
    self.bertscore = bertscore or BertScore(bert_model, bert_layer, device)

  def __call__(self, images, prompts, metadata):
    del metadata
    if len(images) != len(prompts):
      raise ValueError(f"llava_bertscore: {len(images)} images but {len(prompts)} prompts")
    answers = []
    for s in range(0, len(images), self.batch_size):
      answers.extend(self.answerer(images[s:s + self.batch_size], self.question))
    references = [self.answer_template.format(prompt=p) for p in prompts]
    precision, recall, f1 = self.bertscore(answers, references)
    return (np.asarray(recall, np.float64).tolist(),
            {"precision": np.asarray(precision).tolist(), "f1": np.asarray(f1).tolist(),
             "answers": list(answers)})


BUILTIN: dict[str, Callable[..., Scorer]] = {
    "brightness": make_brightness,
    "fail_on_prompt": make_fail_on_prompt,
    "llava_bertscore": LlavaBertScore,
    "ocr": ocr.make_ocr_scorer,
    "geneval": geneval.make_geneval_scorer,
}
