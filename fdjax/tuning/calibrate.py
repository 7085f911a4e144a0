"""Choosing FlashDecoding++'s unified max value phi per layer from sample prompts.

The async softmax is exact for a row whose largest score m satisfies
LO <= m - phi <= HI (pallas_kernels/common/async_softmax.py). Calibration records, per layer,
the range [a, b] of the rows' largest scores over sample prompts and centres it in that
window: phi = (a + b) / 2 - (LO + HI) / 2. If the range is wider than the window, phi keeps
the top inside (overflow is the failure that matters; low rows fall back to the guarded
recompute). The result is stored in the checkpoint's fdjax.json (`softmax_phi`), which
`load_pretrained` reads.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from fdjax.io import checkpoint
from fdjax.ops import dispatch
from pallas_kernels.common.async_softmax import HI, LO

SAMPLE_TEXTS = [
    "The quick brown fox jumps over the lazy dog. Meanwhile, in another part of the forest, "
    "the owls were holding their annual meeting about the price of mice.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n"
    "    return a\n\nprint([fibonacci(i) for i in range(10)])\n",
    "In 1905 Albert Einstein published four papers that changed physics: on the photoelectric "
    "effect, Brownian motion, special relativity and the equivalence of mass and energy.",
    "import json, os\n\nclass Config:\n    def __init__(self, path):\n        with open(path) as "
    "fh:\n            self.data = json.load(fh)\n",
]


def choose_phi(low: float, high: float) -> float:
  if high - low <= HI - LO:
    return (low + high) / 2 - (LO + HI) / 2
  return high - HI


def score_ranges(model, prompt: list[int]) -> np.ndarray:
  """[layers, 2]: per layer, the (min, max) over the prompt's query rows of each row's
  largest attention score, from one forward pass on XLA with every attention layer sowing
  its scores (models.llama.Attention.record_scores)."""
  attention = [layer.attn for layer in model.layers]
  for a in attention:
    a.record_scores = True
  try:
    with dispatch.using("xla"):
      _, sown = nnx.capture(model, nnx.Intermediate)(jnp.asarray([prompt], jnp.int32))
  finally:
    for a in attention:
      a.record_scores = False
  ranges = []
  for i in range(len(attention)):
    sown_i = sown["layers"][i]["attn"]["score_row_max"].get_value()  # one per call
    m = np.concatenate([np.ravel(x) for x in sown_i])
    m = m[np.isfinite(m)]
    ranges.append((float(m.min()), float(m.max())))
  return np.asarray(ranges)


def calibrate(model, prompts: list[list[int]]) -> dict:
  """Runs each prompt through the model (XLA path, eagerly) and returns the phi record."""
  if not prompts:
    raise ValueError("calibrate: no prompts")
  context = model.config.max_position_embeddings
  longest = max(len(p) for p in prompts)
  if longest > context:  # past the context, positions (an absolute table's) are not the model's
    raise ValueError(f"calibrate: a prompt of {longest} tokens is longer than the model's "
                     f"context of {context} (--prompt-len)")
  ranges = None
  for p in prompts:
    layer_ranges = score_ranges(model, p)
    ranges = layer_ranges if ranges is None else np.stack(
        [np.minimum(ranges[:, 0], layer_ranges[:, 0]),
         np.maximum(ranges[:, 1], layer_ranges[:, 1])], axis=1)
  return {"phi": [choose_phi(lo, hi) for lo, hi in ranges.tolist()],
          "row_max_range": ranges.tolist(), "window": [LO, HI], "num_prompts": len(prompts)}


def save(path: str, record: dict) -> str:
  """Stores phi (and the record it came from) in the checkpoint's fdjax.json."""
  return checkpoint.write_meta(path, softmax_phi=record["phi"], calibration=record)


def sample_prompts(tokenizer, vocab_size: int, num: int, length: int, seed: int = 0):
  """The built-in sample texts through the tokenizer, or random ids without one."""
  if tokenizer is not None:
    prompts = [tokenizer.encode(t)[:length] for t in SAMPLE_TEXTS]
    return [p for p in prompts if p][:num]
  rng = np.random.default_rng(seed)
  return [rng.integers(0, vocab_size, length).tolist() for _ in range(num)]
