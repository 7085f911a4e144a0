"""Continuous batching: which requests run in each iteration, and in which shapes.

Each iteration (`Scheduler.step`)
  1. retires cancelled requests (their pages go back to the pool, full pages of what they
     wrote into the prefix cache),
  2. admits waiting requests while a batch row and the pages for prompt + max_tokens are free
     (the prefix cache serves what it holds of a prompt),
  3. prefills one chunk of up to `prefill_rows` admitted prompts (a long prompt takes several
     iterations, decode steps of the others run in between),
  4. runs decode steps for every request past its prompt: one step per call while requests
     wait to be admitted or are being prefilled (so they join quickly), `steps_per_call`
     steps per host round trip when nothing waits,
  5. hands each request its new text (fdjax.engine.detokenize: stop strings cut it, EOS and
     max_tokens end it).

Every shape is bucketed by steps' rules: rows to powers of two, prefill chunks to powers of
two from steps.MIN_CHUNK to `prefill_chunk`, page-table widths to powers of two up to the
context; `shapes()` lists them all and `warmup()` compiles them, after which no load
recompiles anything.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import time

import jax.numpy as jnp
import numpy as np

from fdjax.engine import detokenize, paging, steps
from fdjax.engine.request import Event, Request
from fdjax.engine.sampling import RowSampling
from fdjax.engine.steps import pow2


@dataclasses.dataclass(frozen=True)
class Shapes:
  """Every shape the engine runs (a compiled program each)."""
  decode: tuple        # (rows, page-table width)
  prefill: tuple       # (rows, chunk, page-table width)
  first: tuple         # rows

  def count(self) -> int:
    return len(self.decode) + len(self.prefill) + len(self.first)


class Scheduler:

  def __init__(self, runner, tokenizer, eos, *, max_batch, max_model_len, prefill_chunk,
               prefill_rows, steps_per_call):
    self.runner, self.tokenizer, self.eos = runner, tokenizer, eos
    self.max_batch, self.max_model_len = max_batch, max_model_len
    self.prefill_chunk = pow2(prefill_chunk, steps.MIN_CHUNK)
    self.prefill_rows = min(pow2(prefill_rows), pow2(max_batch))
    self.steps_per_call = steps_per_call
    self.waiting: collections.deque[Request] = collections.deque()
    self.active: list[Request] = []

  def _width(self, tokens: int) -> int:
    return steps.table_width(tokens, self.runner.kv.page_size)

  def step(self) -> bool:
    """One iteration; False when there was nothing it could run."""
    for req in [r for r in self.waiting if r.cancelled]:
      self.waiting.remove(req)
      self.finish(req, "cancelled")
    for req in [r for r in self.active if r.cancelled]:
      self.finish(req, "cancelled")
    self._admit()
    prefilling = [r for r in self.active if r.state == "prefill"]
    if prefilling:
      self._prefill(prefilling[:self.prefill_rows])
    decoding = [r for r in self.active if r.state == "decode"]
    if decoding:
      hurry = (any(r.state == "prefill" for r in self.active)
               or (self.waiting and len(self.active) < self.max_batch))
      self._decode(decoding, 1 if hurry else self.steps_per_call)
    return bool(prefilling or decoding)

  def _admit(self):
    pool = self.runner.kv.pool
    while self.waiting and len(self.active) < self.max_batch:
      req = self.waiting[0]
      try:
        req.pages, req.computed = pool.allocate(req.prompt, len(req.prompt) + req.max_tokens)
      except paging.PoolExhausted:
        return  # it waits for pages (request.check made sure it fits an empty pool)
      self.waiting.popleft()
      req.state = "prefill"
      self.active.append(req)

  def _prefill(self, reqs):
    rows = pow2(len(reqs))
    pieces = [r.prompt[r.computed:r.computed + self.prefill_chunk] for r in reqs]
    chunk = steps.chunk_bucket(max(len(p) for p in pieces), self.prefill_chunk)
    lengths = np.zeros(rows, np.int32)
    lengths[:len(reqs)] = [r.computed for r in reqs]
    ids, n = steps.pack(pieces, rows, chunk)
    width = self._width(max([chunk] + [r.computed + len(p) for r, p in zip(reqs, pieces)]))
    _, last = self.runner.prefill(self.runner.cache(_table(reqs, rows, width), lengths), ids, n)
    for r, p in zip(reqs, pieces):
      r.computed += len(p)
    if any(r.computed == len(r.prompt) for r in reqs):
      first = self.runner.first(last, np.ones(rows, bool), 2, out_len=1,
                                rows=_sampling(reqs, rows), positions=lengths + n).last
      first = steps.to_host(first)
      for i, r in enumerate(reqs):
        if r.computed == len(r.prompt):
          r.state = "decode"
          self._accept(r, [int(first[i])])

  def _decode(self, reqs, n_steps):
    rows = pow2(len(reqs))
    first, lengths, max_new = (np.zeros(rows, np.int32) for _ in range(3))
    for i, r in enumerate(reqs):
      first[i], lengths[i] = r.tokens[-1], r.cached_len
      max_new[i] = min(n_steps, r.max_tokens - len(r.tokens)) + 1
    # Rows that end early keep stepping (their writes past their pages are dropped), so the
    # table covers every row's length after `n_steps` steps.
    width = self._width(max(r.cached_len for r in reqs) + n_steps)
    out = self._decode_call(first, _table(reqs, rows, width), lengths, max_new,
                            _sampling(reqs, rows))
    for i, r in enumerate(reqs):
      self._accept(r, [int(t) for t in out[i, 1:] if t >= 0])

  def _decode_call(self, first, table, lengths, max_new, sampling):
    loop = self.runner.from_tokens(first, max_new > 0, max_new, out_len=self.steps_per_call + 1)
    loop, _ = self.runner.decode(loop, self.runner.cache(table, lengths), max_new,
                                 int(max_new.max()), rows=sampling)
    return steps.to_host(loop.out)

  def _accept(self, req: Request, new: list[int]):
    """Takes a request's new tokens, ends it on EOS, a stop string or max_tokens, and tells
    it the text that is now certain."""
    now = time.perf_counter()
    gap = now - (req.t_last or req.t_submit)
    req.t_first = req.t_first or now
    req.t_last = now
    count, reason, delta = detokenize.accept(req, new, self.tokenizer, self.eos)
    if reason:
      self.finish(req, reason, delta, count, now, gap=gap)
    else:
      req.emit(Event(delta, count, None, len(req.prompt), len(req.tokens), now, gap))

  def finish(self, req, reason, delta="", count=0, now=None, gap=0.0):
    if req.state == "done":
      return
    if req in self.active:
      self.active.remove(req)
      self.runner.kv.pool.finish(req.pages, (req.prompt + req.tokens)[:req.cached_len])
    req.state, req.finish_reason = "done", reason
    req.emit(Event(delta, count, reason, len(req.prompt), len(req.tokens),
                   now or time.perf_counter(), gap))

  def fail_all(self, message: str):
    """Ends every request with an error (their pages released, not cached)."""
    for req in list(self.waiting) + list(self.active):
      if req in self.active:
        self.active.remove(req)
        self.runner.kv.pool.release(req.pages)
      req.state, req.finish_reason = "done", "error"
      req.emit(Event("", 0, "error", len(req.prompt), len(req.tokens), time.perf_counter(),
                     error=message))
    self.waiting.clear()

  def shapes(self) -> Shapes:
    widths = sorted({self._width(t) for t in range(1, self.max_model_len + 1)})
    decode_widths = sorted({self._width(t) for t in
                            range(1, self.max_model_len + self.steps_per_call + 1)})
    rows = [1 << i for i in range(pow2(self.max_batch).bit_length())]
    chunks = [c for c in (1 << i for i in range(self.prefill_chunk.bit_length()))
              if steps.MIN_CHUNK <= c <= self.prefill_chunk]
    pre_rows = [r for r in rows if r <= self.prefill_rows]
    return Shapes(decode=tuple(itertools.product(rows, decode_widths)),
                  prefill=tuple((r, c, w) for r, c, w in itertools.product(pre_rows, chunks, widths)
                                if w >= self._width(c)),
                  first=tuple(pre_rows))

  def warmup(self):
    """Compiles every shape of shapes() (writes go nowhere: every table entry is NO_PAGE)."""
    shapes, run, zeros = self.shapes(), self.runner, lambda *s: np.zeros(s, np.int32)
    for rows, width in shapes.decode:
      self._decode_call(zeros(rows), _table([], rows, width), zeros(rows),
                        np.ones(rows, np.int32), _sampling([], rows))
    for rows, chunk, width in shapes.prefill:
      run.prefill(run.cache(_table([], rows, width), zeros(rows)), zeros(rows, chunk),
                  zeros(rows))
    for rows in shapes.first:
      run.first(jnp.zeros((rows, run.vocab_size), jnp.float32), np.ones(rows, bool), 2,
                out_len=1, rows=_sampling([], rows), positions=zeros(rows))


def _table(reqs, rows, width):
  return paging.page_table([r.pages for r in reqs], rows, width)


def _sampling(reqs, rows) -> RowSampling:
  settings = [(r.temperature, r.top_k, r.top_p, r.seed) for r in reqs]
  return RowSampling.of(settings + [(0.0, None, None, 0)] * (rows - len(reqs)))
