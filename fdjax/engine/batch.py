"""A batch's rows and their per-row inputs to the device calls: which request each row holds
(`rows_of`: on a mesh, each data replica's requests in its own block of rows), the page
table, the sampling settings (with the grammars' bitmasks), and the tokens the penalties read.

A batch is a list of its rows' requests, None for an empty row; rows past the list are empty
too."""
from __future__ import annotations

import numpy as np

from fdjax.engine import grammar, paging, steps
from fdjax.engine.sampling import RowSampling, Settings


def rows_of(reqs, replicas: int = 1) -> list:
  """The rows of a batch of `reqs`: data replica r's requests (Request.replica) in block r of
  the rows, which a mesh splits among its replicas in order (paging.replica_of), every block
  as many rows as the fullest one's power of two; None: an empty row. One replica: the
  requests in order, then empty rows up to a power of two."""
  per = [[] for _ in range(replicas)]
  for r in reqs:
    per[r.replica].append(r)
  block = steps.pow2(max(len(p) for p in per))
  return [p[i] if i < len(p) else None for p in per for i in range(block)]


def live(reqs, rows) -> np.ndarray:
  """[rows] bool: the rows that hold a request."""
  return np.array([r is not None for r in reqs] + [False] * (rows - len(reqs)), bool)


def table(reqs, rows, width):
  return paging.page_table([r.pages if r else [] for r in reqs], rows, width)


def row_sampling(reqs, rows, vocab_size=None) -> RowSampling:
  """The rows' sampling settings, with their grammars' bitmasks when a row has one."""
  reqs = list(reqs) + [None] * (rows - len(reqs))
  return RowSampling.of([r.settings() if r else Settings() for r in reqs],
                        [len(r.prompt) if r else 0 for r in reqs],
                        grammar.masks([r and r.constraint for r in reqs], rows, vocab_size)
                        if vocab_size else None)


def history(reqs, rows, length, generated=True):
  """Each row's tokens so far [rows, length] (-1 past them) when a row's penalties read
  them, else [rows, 1] (one compiled program each way)."""
  if not any(r.needs_history for r in reqs if r):
    return np.full((rows, 1), -1, np.int32)
  return steps.pack([r.prompt + (r.tokens if generated else []) if r else [] for r in reqs],
                    rows, length, fill=-1)[0]
