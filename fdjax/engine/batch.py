"""A batch's per-row inputs to the device calls, built from its requests (rows past them are
empty): the page table, the sampling settings (with the grammars' bitmasks), and the tokens
the penalties read."""
from __future__ import annotations

import numpy as np

from fdjax.engine import grammar, paging, steps
from fdjax.engine.sampling import RowSampling, Settings


def table(reqs, rows, width):
  return paging.page_table([r.pages for r in reqs], rows, width)


def row_sampling(reqs, rows, vocab_size=None) -> RowSampling:
  """The rows' sampling settings, with their grammars' bitmasks when a row has one."""
  pad = rows - len(reqs)
  constraints = [r.constraint for r in reqs] + [None] * pad
  return RowSampling.of([r.settings() for r in reqs] + [Settings()] * pad,
                        [len(r.prompt) for r in reqs] + [0] * pad,
                        grammar.masks(constraints, rows, vocab_size) if vocab_size else None)


def history(reqs, rows, length, generated=True):
  """Each row's tokens so far [rows, length] (-1 past them) when a row's penalties read
  them, else [rows, 1] (one compiled program each way)."""
  if not any(r.needs_history for r in reqs):
    return np.full((rows, 1), -1, np.int32)
  return steps.pack([r.prompt + (r.tokens if generated else []) for r in reqs], rows, length,
                    fill=-1)[0]
