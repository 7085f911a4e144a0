"""Every program the serving engine runs: its shapes (the scheduler's buckets: rows to
powers of two, prefill chunks from steps.MIN_CHUNK to the engine's, page-table widths to
powers of two up to the context), and compiling them all before serving (`--warmup`), after
which no load recompiles anything."""
from __future__ import annotations

import dataclasses
import itertools

import jax.numpy as jnp
import numpy as np

from fdjax.engine import steps
from fdjax.engine.batch import history, row_sampling, table
from fdjax.engine.steps import pow2


@dataclasses.dataclass(frozen=True)
class Shapes:
  """Every shape the engine runs (a compiled program each)."""
  decode: tuple        # (rows, page-table width)
  prefill: tuple       # (rows, chunk, page-table width)
  first: tuple         # rows

  def count(self) -> int:
    return len(self.decode) + len(self.prefill) + len(self.first)


def shapes(scheduler) -> Shapes:
  s = scheduler
  widths = sorted({s.width(t) for t in range(1, s.max_model_len + 1)})
  decode_widths = sorted({s.width(t) for t in range(1, s.max_model_len + s.steps_per_call + 1)})
  rows = [1 << i for i in range(pow2(s.max_batch).bit_length())]
  chunks = [c for c in (1 << i for i in range(s.prefill_chunk.bit_length()))
            if steps.MIN_CHUNK <= c <= s.prefill_chunk]
  pre_rows = [r for r in rows if r <= s.prefill_rows]
  return Shapes(decode=tuple(itertools.product(rows, decode_widths)),
                prefill=tuple((r, c, w) for r, c, w in itertools.product(pre_rows, chunks, widths)
                              if w >= s.width(c)),
                first=tuple(pre_rows))


def compile_all(scheduler, progress=None):
  """Runs every shape of shapes(scheduler) once on empty rows (writes go nowhere: every
  page-table entry is NO_PAGE), calling progress(done, total) after each."""
  s, run = scheduler, scheduler.runner
  plan, zeros = shapes(s), lambda *shape: np.zeros(shape, np.int32)
  calls = [lambda rows=rows, width=width: s.decode_call(
      zeros(rows), table([], rows, width), zeros(rows), np.ones(rows, np.int32),
      row_sampling([], rows), history([], rows, s.max_model_len))
      for rows, width in plan.decode]
  calls += [lambda rows=rows, chunk=chunk, width=width: run.prefill(
      run.cache(table([], rows, width), zeros(rows)), zeros(rows, chunk), zeros(rows))
      for rows, chunk, width in plan.prefill]
  calls += [lambda rows=rows: run.first(
      jnp.zeros((rows, run.vocab_size), jnp.float32), np.ones(rows, bool), 2, out_len=1,
      rows=row_sampling([], rows), positions=zeros(rows),
      tokens=history([], rows, s.max_model_len))
      for rows in plan.first]
  for done, call in enumerate(calls, 1):
    call()
    if progress is not None:
      progress(done, len(calls))
