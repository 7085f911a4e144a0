"""Continuous batching: which requests run in each iteration, and in which shapes.

Each iteration (`Scheduler.step`)
  1. retires cancelled requests (their pages go back to the pool, full pages of what they
     wrote into the prefix cache),
  2. admits waiting requests while a batch row and the pages for prompt + max_tokens are free
     (the prefix cache serves what it holds of a prompt; on a mesh, each request runs on one
     data replica's pages: fdjax.engine.admission),
  3. prefills one chunk of up to `prefill_rows` admitted prompts (a long prompt takes several
     iterations, decode steps of the others run in between),
  4. runs decode steps for every request past its prompt: one step per call while requests
     wait to be admitted or are being prefilled (so they join quickly), `steps_per_call`
     steps per host round trip when nothing waits,
  5. hands each request its new text (fdjax.engine.detokenize: stop strings cut it, EOS and
     max_tokens end it).

Every shape is bucketed by steps' rules: rows to powers of two (on a mesh, each replica's
block of rows: batch.rows_of), prefill chunks by steps.chunk_bucket (powers of two from
steps.MIN_CHUNK, quarter octaves past steps.FINE_CHUNK) up to `prefill_chunk`, page-table
widths to powers of two up to the context; fdjax.engine.compiled lists them all (`shapes()`)
and compiles them (`warmup()`), after which no load recompiles anything.
"""
from __future__ import annotations

import collections
import time

import numpy as np

from fdjax.engine import admission, compiled, detokenize, steps
from fdjax.engine.batch import history, row_sampling, rows_of, table
from fdjax.engine.decoders import PlainDecoder
from fdjax.engine.request import Event, Request, TokenLogprob
from fdjax.engine.steps import pow2
from fdjax.ops import checks


class Scheduler:

  def __init__(self, runner, tokenizer, eos, *, max_batch, max_model_len, prefill_chunk,
               prefill_rows, steps_per_call, decoder=None):
    self.runner, self.tokenizer, self.eos = runner, tokenizer, eos
    self.max_batch, self.max_model_len = max_batch, max_model_len
    # on a mesh, each data replica runs its own requests on its own pages (Request.replica)
    self.replicas = len(runner.kv.pools)
    self.per_replica = checks.cdiv(max_batch, self.replicas)  # the most requests it runs
    self.prefill_chunk = pow2(prefill_chunk, steps.MIN_CHUNK)
    self.prefill_rows = min(pow2(prefill_rows), pow2(max_batch))
    self.steps_per_call = steps_per_call
    # plain decode steps, or speculative rounds (fdjax.engine.decoders)
    self.decoder = decoder or PlainDecoder(runner, steps_per_call)
    self.waiting: collections.deque[Request] = collections.deque()
    self.active: list[Request] = []

  def width(self, tokens: int) -> int:
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
               or (self.waiting and len(self.active) < self.max_batch)
               or any(r.constraint is not None for r in decoding))  # a mask per step
      self._decode(decoding, 1 if hurry else self.steps_per_call)
    return bool(prefilling or decoding)

  def _admit(self):
    admission.admit(self.waiting, self.active, self.runner.kv, self.decoder, self.max_batch,
                    self.per_replica)

  def _prefill(self, chosen):
    reqs = rows_of(chosen, self.replicas)  # None: an empty row
    rows = len(reqs)
    pieces = [r.prompt[r.computed:r.computed + self.prefill_chunk] if r else [] for r in reqs]
    chunk = steps.chunk_bucket(max(len(p) for p in pieces), self.prefill_chunk)
    lengths = np.array([r.computed if r else 0 for r in reqs], np.int32)
    ids, n = steps.pack(pieces, rows, chunk)
    width = self.width(max([chunk] + [r.computed + len(p) for r, p in zip(reqs, pieces)
                                      if r]))
    targets = None
    if any(r.prompt_logprobs for r in chosen):  # each position's next prompt token
      targets = steps.pack([r.prompt[r.computed + 1:r.computed + len(p) + 1] if r else []
                            for r, p in zip(reqs, pieces)], rows, chunk, fill=-1)[0]
    out = self.runner.prefill(self.runner.cache(table(reqs, rows, width), lengths), ids, n,
                              targets=targets)
    if targets is not None:
      _keep_prompt_logprobs(reqs, pieces, [steps.to_host(a) for a in out[2]])
    for r, p in zip(reqs, pieces):
      if r:
        r.computed += len(p)
    ready = [r is not None and r.computed == len(r.prompt) for r in reqs]
    if not any(ready):
      return
    for r, now in zip(reqs, ready):
      if now:  # requests that start the same way (n > 1) share its pages from now on
        self.runner.kv.pools[r.replica].publish(r.pages, r.prompt)
    self.decoder.prefilled([r for r, now in zip(reqs, ready) if now], width)
    sampling = row_sampling(reqs, rows, self.runner.vocab_size)
    first = self.runner.first(out[1], np.ones(rows, bool), 2, out_len=1, rows=sampling,
                              positions=lengths + n,
                              tokens=history(reqs, rows, self.max_model_len, False))
    tokens = steps.to_host(first.out)[:, 0]
    lp = _row_logprobs(first, reqs)
    for i, r in enumerate(reqs):
      if not ready[i]:
        continue
      if r.max_tokens == 0:  # the prompt's logprobs only (echo)
        self.finish(r, "length")
      else:
        r.state = "decode"
        self._accept(r, [int(tokens[i])],
                     lp and r.logprobs and _logprobs(lp, i, [int(tokens[i])], step=0))

  def _decode(self, decoding, n_steps):
    reqs = rows_of(decoding, self.replicas)  # None: an empty row
    rows = len(reqs)
    first, lengths, max_new = (np.zeros(rows, np.int32) for _ in range(3))
    per_call = n_steps * self.decoder.per_step  # the most tokens a row gets
    for i, r in enumerate(reqs):
      if r:
        first[i], lengths[i] = r.tokens[-1], r.cached_len
        max_new[i] = min(per_call, r.max_tokens - len(r.tokens)) + 1
    # Rows that end early keep stepping (their writes past their pages are dropped), so the
    # table covers every row's length after `n_steps` steps.
    width = self.width(max(r.cached_len for r in decoding) + per_call)
    loop = self.decoder.call(reqs, first, table(reqs, rows, width), lengths, max_new,
                             row_sampling(reqs, rows, self.runner.vocab_size),
                             history(reqs, rows, self.max_model_len), n_steps)
    out, lp = steps.to_host(loop.out), _row_logprobs(loop, reqs)
    for i, r in enumerate(reqs):
      if r is None:
        continue
      new = [int(t) for t in out[i, 1:] if t >= 0]
      self._accept(r, new, lp and r.logprobs and _logprobs(lp, i, new, step=1))

  def _accept(self, req: Request, new: list[int], logprobs=None):
    """Takes a request's new tokens (with their logprobs when it asked), ends it on EOS, a
    stop string or max_tokens, and tells it the text that is now certain."""
    now, gap = _stamp(req)
    new, end, error = _advance(req, new)
    if error:  # the request's grammar refused a token: it alone ends
      return self.finish(req, "error", error=error)
    count, reason, delta = detokenize.accept(req, new, self.tokenizer, self.eos, end)
    logprobs = (logprobs or [])[:count]
    if reason:
      self.finish(req, reason, delta, count, now, gap=gap, logprobs=logprobs)
    else:
      req.emit(Event(delta, count, None, len(req.prompt), len(req.tokens), now, gap,
                     logprobs=logprobs, prompt_logprobs=_prompt_logprobs(req)))

  def finish(self, req, reason, delta="", count=0, now=None, gap=0.0, logprobs=(), error=None):
    if req.state == "done":
      return
    if req in self.active:
      self.active.remove(req)
      self.runner.kv.pools[req.replica].finish(req.pages,
                                               (req.prompt + req.tokens)[:req.cached_len])
      self.decoder.release(req)
    req.state, req.finish_reason = "done", reason
    req.emit(Event(delta, count, reason, len(req.prompt), len(req.tokens),
                   now or time.perf_counter(), gap, error=error, logprobs=list(logprobs),
                   prompt_logprobs=_prompt_logprobs(req)))

  def fail_all(self, message: str):
    """Ends every request with an error (their pages released, not cached)."""
    for req in list(self.waiting) + list(self.active):
      if req in self.active:
        self.active.remove(req)
        self.runner.kv.pools[req.replica].release(req.pages)
        self.decoder.release(req)
      req.state, req.finish_reason = "done", "error"
      req.emit(Event("", 0, "error", len(req.prompt), len(req.tokens), time.perf_counter(),
                     error=message))
    self.waiting.clear()

  def shapes(self) -> compiled.Shapes:
    return compiled.shapes(self)

  def warmup(self, progress=None):
    """Compiles every shape of shapes(); progress(done, total) after each."""
    compiled.compile_all(self, progress)


def _keep_prompt_logprobs(reqs, pieces, lp):
  """Adds a prefill chunk's prompt logprobs (lp: logprob, top_ids, top [rows, chunk, ...])
  to the requests that asked for them."""
  for i, (r, p) in enumerate(zip(reqs, pieces)):
    if r and r.prompt_logprobs:
      if r.prompt_lp is None:
        r.prompt_lp = [TokenLogprob(r.prompt[0], None, [])]
      r.prompt_lp += _logprobs(lp, i, r.prompt[r.computed + 1:r.computed + len(p) + 1])


def _stamp(req):
  """(now, seconds since the request's previous tokens or its submission), now its latest."""
  now = time.perf_counter()
  gap = now - (req.t_last or req.t_submit)
  req.t_first, req.t_last = req.t_first or now, now
  return now, gap


def _advance(req, new):
  """(the tokens a request takes, whether its grammar is complete, an error or None)."""
  if req.constraint is None:
    return new, False, None
  try:
    return *req.constraint.advance(new), None
  except RuntimeError as e:
    return new, False, str(e)


def _row_logprobs(loop, reqs):
  """The loop's logprobs on the host (logprob, top_ids, top), or None when no row asked."""
  if not any(r.logprobs for r in reqs if r):
    return None
  return tuple(steps.to_host(a) for a in (loop.rows.logprob, loop.rows.top_ids, loop.rows.top))


def _logprobs(lp, row, tokens, step=None) -> list[TokenLogprob]:
  """TokenLogprobs of a row's `tokens`, from a loop's (logprob [B, out], top_ids, top) at
  steps from `step` on, or a prefill's (logprob [B, chunk], ...) from position 0."""
  chosen, top_ids, top = (a[row] for a in lp)
  at = step or 0
  return [TokenLogprob(t, float(chosen[at + j]), list(zip(top_ids[at + j].tolist(),
                                                          top[at + j].tolist())))
          for j, t in enumerate(tokens)]


def _prompt_logprobs(req):
  """The prompt's logprobs, handed out once, with the request's first event."""
  lp, req.prompt_lp = req.prompt_lp, None
  return lp
