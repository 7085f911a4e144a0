"""Choosing FlashDecoding++'s unified max value phi per layer from sample prompts.

The async softmax is exact for a row whose largest score m satisfies
LO <= m - phi <= HI (pallas_kernels/async_softmax.py). Calibration records, per layer,
the range [a, b] of the rows' largest scores over sample prompts and centres it in that
window: phi = (a + b) / 2 - (LO + HI) / 2. If the range is wider than the window, phi keeps
the top inside (overflow is the failure that matters; low rows fall back to the guarded
recompute). The result lives beside the checkpoint in fdjax_phi.json, which
`load_pretrained` reads.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np

from fdjax import dispatch
from pallas_kernels.async_softmax import HI, LO

PHI_FILE = "fdjax_phi.json"

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


def calibrate(model, prompts: list[list[int]]) -> dict:
  """Runs each prompt through the model (XLA path, eagerly) and returns the phi record."""
  ranges = None
  with dispatch.using("xla"), dispatch.record_scores() as rec:
    for p in prompts:
      rec.clear()
      model(jnp.asarray([p], jnp.int32))
      layer_ranges = np.asarray(rec)  # [layers, 2]
      ranges = layer_ranges if ranges is None else np.stack(
          [np.minimum(ranges[:, 0], layer_ranges[:, 0]),
           np.maximum(ranges[:, 1], layer_ranges[:, 1])], axis=1)
  return {"phi": [choose_phi(lo, hi) for lo, hi in ranges.tolist()],
          "row_max_range": ranges.tolist(), "window": [LO, HI], "num_prompts": len(prompts)}


def save(path: str, record: dict) -> str:
  file = os.path.join(path, PHI_FILE)
  with open(file, "w") as fh:
    json.dump(record, fh, indent=2)
  return file


def apply_saved(path: str, cfg):
  """cfg with softmax_phi from path/fdjax_phi.json, if the file exists."""
  file = os.path.join(path, PHI_FILE)
  if not os.path.exists(file):
    return cfg
  with open(file) as fh:
    phi = json.load(fh)["phi"]
  return dataclasses.replace(cfg, softmax_phi=tuple(phi))


def sample_prompts(tokenizer, vocab_size: int, num: int, length: int, seed: int = 0):
  """The built-in sample texts through the tokenizer, or random ids without one."""
  if tokenizer is not None:
    prompts = [tokenizer.encode(t)[:length] for t in SAMPLE_TEXTS]
    return [p for p in prompts if p][:num]
  rng = np.random.default_rng(seed)
  return [rng.integers(0, vocab_size, length).tolist() for _ in range(num)]
