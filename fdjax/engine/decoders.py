"""How the serving scheduler's decode calls run: plain decode steps (`PlainDecoder`), or
speculative rounds (`SpeculativeDecoder`: n-gram or draft-model drafts verified by the target
in one call, fdjax.engine.spec_steps). Both take the batch as the scheduler builds it and
return a state whose `out` [rows, out_len] holds each row's latest token then its new ones
(-1 past them) and whose `rows` its logprobs; the scheduler does not know which ran.

A speculative draft model keeps its own paged cache: each request holds pages there too
(taken on admission, no prefix reuse), the draft prefills a prompt once the target has, and
before each round the draft's lengths are set to the target's, so what it holds is always
what the target holds.
"""
from __future__ import annotations

import numpy as np

from fdjax.engine import paging, spec_steps, steps
from fdjax.engine.batch import live, rows_of
from fdjax.engine.runner import Runner


def speculative(runner, spec, steps_per_call: int, prefill_chunk: int):
  """The engine's SpeculativeDecoder for `spec` (None: None, plain decoding); a draft model
  gets a Runner on a pool as large as the target's (on a mesh, as many data replicas' pools:
  a request's draft pages lie in its replica's)."""
  if spec is None:
    return None
  draft = None
  if spec.model is not None:
    kv = runner.kv
    draft = Runner(spec.model, paging.KVStore.for_model(spec.model, kv.pool.num_pages,
                                                        kv.page_size), runner.eos)
  return SpeculativeDecoder(runner, spec, steps_per_call, prefill_chunk, draft)


class PlainDecoder:
  per_step = 1       # the most tokens a step yields a row
  draft = None       # no second model to prefill

  def __init__(self, runner, steps_per_call: int):
    self.runner, self.out_len = runner, steps_per_call + 1

  def admit(self, req) -> bool:
    return True

  def prefilled(self, reqs, width):
    pass

  def release(self, req):
    pass

  def call(self, reqs, first, page_table, lengths, max_new, sampling, tokens, n_steps):
    loop = self.runner.from_tokens(first, max_new > 0, max_new, out_len=self.out_len,
                                   rows=sampling, history=tokens)
    loop, _ = self.runner.decode(loop, self.runner.cache(page_table, lengths), max_new,
                                 int(max_new.max()), rows=sampling)
    return loop


class SpeculativeDecoder:
  """`spec` (speculative.Speculation) in the engine; `draft`, the draft model's Runner on its
  own KVStore (method "draft"). A request with a grammar drafts nothing (its mask is known
  one token at a time); every other request drafts up to spec.k tokens a round."""

  def __init__(self, runner, spec, steps_per_call: int, prefill_chunk: int, draft=None):
    self.runner, self.spec, self.draft = runner, spec, draft
    self.per_step = spec.k + 1
    self.out_len = steps_per_call * self.per_step + 1
    self.prefill_chunk = prefill_chunk
    self.drafted = self.accepted = self.verified = 0  # totals, for the metrics

  def admit(self, req) -> bool:
    """Takes the request's pages in the draft's pool; False when they are not free."""
    if self.draft is None:
      return True
    try:
      req.draft_pages = self.draft.kv.pools[req.replica].allocate(
          req.prompt, len(req.prompt) + req.max_tokens, reuse=False)[0]
    except paging.PoolExhausted:
      return False
    return True

  def release(self, req):
    if self.draft is not None and req.draft_pages:
      self.draft.kv.pools[req.replica].release(req.draft_pages)
      req.draft_pages = []

  def prefilled(self, reqs, width):
    """The draft prefills the prompts the target has just finished (`width`: the page-table
    width of the target's call, which covers them)."""
    if self.draft is None or not reqs:
      return
    longest = max(len(r.prompt) for r in reqs)
    reqs = rows_of(reqs, len(self.draft.kv.pools))  # None: an empty row
    rows = len(reqs)
    for c in range(0, longest, self.prefill_chunk):
      pieces = [r.prompt[c:c + self.prefill_chunk] if r else [] for r in reqs]
      chunk = steps.chunk_bucket(max(len(p) for p in pieces), self.prefill_chunk)
      ids, n = steps.pack(pieces, rows, chunk)
      done = np.array([min(c, len(r.prompt)) if r else 0 for r in reqs], np.int32)
      table = paging.page_table([r.draft_pages if r else [] for r in reqs], rows,
                                max(width, steps.table_width(chunk, self.draft.kv.page_size)))
      self.draft.prefill(self.draft.cache(table, done), ids, n)

  def call(self, reqs, first, page_table, lengths, max_new, sampling, tokens, n_steps):
    """n_steps speculative rounds (each row's max_new counts its latest token)."""
    rows = len(first)
    loop = self.runner.from_tokens(first, max_new > 0, max_new, out_len=self.out_len,
                                   rows=sampling, history=tokens)
    # n-gram lookup reads each row's tokens so far, as many as the page table addresses (its
    # width: no shape of its own); the draft model needs none of them
    width = page_table.shape[1] * self.runner.kv.page_size if self.draft is None else 1
    if self.draft is None:  # each row's tokens but the latest (the state appends it)
      seq, _ = steps.pack([(r.prompt + r.tokens)[:-1] if r else [] for r in reqs], rows, width,
                          fill=-1)
    else:
      seq = np.full((rows, 1), -1, np.int32)
    k_row = np.zeros(rows, np.int32)
    k_row[:len(reqs)] = [0 if r is None or r.constraint is not None else self.spec.k
                         for r in reqs]
    state = spec_steps.start_jit(loop, seq, lengths, k_row, seq_len=width)
    dcache = None
    if self.draft is not None:
      dcache = self.draft.cache(paging.page_table([r.draft_pages if r else [] for r in reqs], rows,
                                                  page_table.shape[1]), lengths)
    state, _, _ = self.runner.speculate(state, self.runner.cache(page_table, lengths), max_new,
                                        n_steps, self.spec, rows=sampling, draft=self.draft,
                                        dcache=dcache)
    held = live(reqs, rows)
    self.drafted += int(steps.to_host(state.drafted)[held].sum())
    self.accepted += int(steps.to_host(state.accepted)[held].sum())
    self.verified += int(steps.to_host(state.verified)[held].sum())
    return state
