"""A batch's per-row inputs to the device calls, built from its requests (rows past them are
empty): the page table, the sampling settings, and the tokens the penalties read."""
from __future__ import annotations

import numpy as np

from fdjax.engine import paging, steps
from fdjax.engine.sampling import RowSampling, Settings


def table(reqs, rows, width):
  return paging.page_table([r.pages for r in reqs], rows, width)


def row_sampling(reqs, rows) -> RowSampling:
  return RowSampling.of([r.settings() for r in reqs] + [Settings()] * (rows - len(reqs)),
                        [len(r.prompt) for r in reqs] + [0] * (rows - len(reqs)))


def history(reqs, rows, length, generated=True):
  """Each row's tokens so far [rows, length] (-1 past them) when a row's penalties read
  them, else [rows, 1] (one compiled program each way)."""
  if not any(r.needs_history for r in reqs):
    return np.full((rows, 1), -1, np.int32)
  return steps.pack([r.prompt + (r.tokens if generated else []) for r in reqs], rows, length,
                    fill=-1)[0]
