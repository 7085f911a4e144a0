"""Admission: which waiting requests join the running batch, and on which data replica.

A request is admitted, in arrival order, once a batch row and the pages for its prompt and
max_tokens are free (the prefix cache serves what it holds of the prompt; a speculative
draft model's pages are taken first: they are not shared). A request that cannot be admitted
holds up those behind it, so none is starved; one whose sibling (n > 1) is not yet prefilled
waits for it, to share its prompt's pages.

On a mesh with data replicas each request runs on one replica, on that replica's pages, for
as long as it runs (Request.replica): the least busy replica with the pages free, where one
whose prefix cache holds part of the prompt counts as running one request fewer (every
replica's block of batch rows is as long as the fullest one's, so a cache hit is not worth
more), and among those as busy the one that holds most of it. Each replica runs up to its
share of max_batch (`per_replica`).
"""
from __future__ import annotations

from fdjax.engine import paging


def admit(waiting, active, kv, decoder, max_batch: int, per_replica: int):
  """Moves the requests that can start now from `waiting` (a deque, oldest first) to `active`,
  each with its pages on its replica of `kv` (a paging.KVStore) and its state "prefill"."""
  for req in list(waiting):
    if len(active) >= max_batch:
      return
    if req.after is not None and req.after.state in ("new", "waiting", "prefill"):
      continue  # its sibling's prompt pages come first: it will share them (n > 1)
    if not any(_take(req, replica, kv, decoder)
               for replica in replicas_for(req, active, kv.pools, per_replica)):
      return  # it waits for pages (request.check made sure it fits an empty pool)
    waiting.remove(req)
    req.state = "prefill"
    active.append(req)


def replicas_for(req, active, pools, per_replica: int) -> list[int]:
  """The data replicas (their PagePools: `pools`) that could run `req` beside the `active`
  requests, the best first."""
  busy = [0] * len(pools)
  for r in active:
    busy[r.replica] += 1
  open_ = [i for i in range(len(pools)) if busy[i] < per_replica]
  if len(pools) == 1 or req.prompt_logprobs:  # (computed in full: no prefix cache)
    return sorted(open_, key=lambda i: busy[i])
  cached = [pool.cached_tokens(req.prompt) for pool in pools]
  return sorted(open_, key=lambda i: (busy[i] - (cached[i] > 0), -cached[i]))


def _take(req, replica: int, kv, decoder) -> bool:
  """Gives `req` its pages on `replica` (a draft model's first), False where they are not
  free."""
  req.replica = replica
  if not decoder.admit(req):
    return False
  try:
    req.pages, req.computed = kv.pools[replica].allocate(
        req.prompt, len(req.prompt) + req.max_tokens, reuse=not req.prompt_logprobs)
    req.cached_prompt = req.computed  # its prompt tokens the prefix cache held
  except paging.PoolExhausted:
    decoder.release(req)
    return False
  return True
