"""Every program the serving engine runs: its shapes (the scheduler's buckets: rows to
powers of two (on a mesh, each data replica's block of rows), prefill chunks
(steps.chunk_bucket's, up to the engine's), page-table widths to powers of two up to the
context), and compiling them all before serving (`--warmup`), after which no load
recompiles anything."""
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
  draft_prefill: tuple = ()  # a speculative draft model's prefill shapes

  def count(self) -> int:
    return len(self.decode) + len(self.prefill) + len(self.first) + len(self.draft_prefill)


def shapes(scheduler) -> Shapes:
  s = scheduler
  widths = sorted({s.width(t) for t in range(1, s.max_model_len + 1)})
  per_call = s.steps_per_call * s.decoder.per_step
  # a call's table covers each row's cached tokens (at least 1) and what the call writes
  decode_widths = sorted({s.width(t) for t in range(1 + s.decoder.per_step,
                                                    s.max_model_len + per_call + 1)})
  # rows: each data replica's block (batch.rows_of) a power of two up to its share
  rows = [s.replicas << i for i in range(pow2(s.per_replica).bit_length())]
  chunks = steps.chunk_buckets(s.prefill_chunk)
  pre_rows = [r for r in rows if r <= s.replicas * s.prefill_rows]
  prefill = tuple((r, c, w) for r, c, w in itertools.product(pre_rows, chunks, widths)
                  if w >= s.width(c))
  return Shapes(decode=tuple(itertools.product(rows, decode_widths)), prefill=prefill,
                first=tuple(pre_rows), draft_prefill=prefill if s.decoder.draft else ())


def compile_all(scheduler, progress=None):
  """Runs every shape of shapes(scheduler) once on empty rows (writes go nowhere: every
  page-table entry is NO_PAGE), calling progress(done, total) after each."""
  s, run = scheduler, scheduler.runner
  plan, zeros = shapes(s), lambda *shape: np.zeros(shape, np.int32)
  calls = [lambda rows=rows, width=width: s.decoder.call(
      [], zeros(rows), table([], rows, width), zeros(rows), np.ones(rows, np.int32),
      row_sampling([], rows), history([], rows, s.max_model_len), 1)
      for rows, width in plan.decode]
  for runner, prefills in ((run, plan.prefill), (s.decoder.draft, plan.draft_prefill)):
    calls += [lambda runner=runner, rows=rows, chunk=chunk, width=width: runner.prefill(
        runner.cache(table([], rows, width), zeros(rows)), zeros(rows, chunk), zeros(rows))
        for rows, chunk, width in prefills]
  calls += [lambda rows=rows: run.first(
      jnp.zeros((rows, run.vocab_size), jnp.float32), np.ones(rows, bool), 2, out_len=1,
      rows=row_sampling([], rows), positions=zeros(rows),
      tokens=history([], rows, s.max_model_len))
      for rows in plan.first]
  for done, call in enumerate(calls, 1):
    call()
    if progress is not None:
      progress(done, len(calls))
