"""The jitted decode loop on the paged KV cache: the prompts prefilled (in chunks, after
whatever the prefix cache already holds), then every decode step on device inside one
`lax.while_loop` (no host round trip per token), for a ragged batch of prompts.

Shapes are bucketed (batch, prompt chunk, page-table width and output buffer to powers of
two) so calls of similar size reuse the compiled code.

When every layer has a sliding window W (Mistral), keys more than W positions back are never
read again: a sequence then holds only the pages it still reads. Pages are taken as it grows
and the ones wholly before its window given back, between prefill chunks and between decode
segments of `page_size` steps (the loop returns to the host once per segment), so a sequence
of any length lives in about (W + page_size) / page_size + 2 pages.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fdjax.ops import dispatch
from fdjax.engine import paging
from fdjax.io import mesh as meshes
from fdjax.ops import kv_cache as kvc
from fdjax.engine.sampling import Sampler, sample, sample_rows

# How many times each jitted function was traced (tests use it to check that bucketing
# avoids recompiles).
TRACE_COUNT: collections.Counter = collections.Counter()


@dataclasses.dataclass
class GenerationResult:
  tokens: list[list[int]]  # each row's new tokens, up to and including its EOS
  prompt_tokens: int
  prefill_s: float
  decode_s: float
  decode_steps: int        # decode steps the loop ran (after the prefill's first token)

  @property
  def new_tokens(self) -> int:
    return sum(len(t) for t in self.tokens)

  @property
  def decode_tokens_per_s(self) -> float:
    """Tokens produced by the decode loop (all rows) per second of decode time."""
    produced = self.new_tokens - len(self.tokens)
    return produced / self.decode_s if self.decode_s > 0 else 0.0


def pow2(n: int, minimum: int = 1) -> int:
  return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def to_host(x) -> np.ndarray:
  """A device array's value on the host; one spanning other processes' devices too (a
  multi-host mesh) is gathered from them."""
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def pack(pieces, rows: int, width: int):
  """Ragged token lists as (ids [rows, width] int32, right-padded with 0; n [rows], each
  list's length; rows past the lists are empty)."""
  ids = np.zeros((rows, width), np.int32)
  n = np.zeros((rows,), np.int32)
  for i, piece in enumerate(pieces):
    ids[i, :len(piece)] = piece
    n[i] = len(piece)
  return ids, n


@functools.partial(jax.jit, static_argnames=("graphdef", "impl", "target"),
                   donate_argnums=(4, 5))
def prefill_step(graphdef, state, ids, n, cache, last, *, impl, target=None):
  """One chunk of every row's prompt (row b: its first n[b] tokens of ids) into the cache;
  `last` keeps each row's logits at its latest token."""
  TRACE_COUNT["prefill"] += 1
  model = nnx.merge(graphdef, state)
  with dispatch.using(impl), dispatch.lowering_for(target):
    logits, cache = model(ids, cache=cache, lengths=n, last_only=True)
  return cache, jnp.where((n > 0)[:, None], logits[:, 0], last)


def _pick(logits, key, sampler, rows, positions):
  """The next token of every row: one static Sampler for all, or each row's own (rows, a
  sampling.RowSampling, drawing the token at positions[b])."""
  if rows is None:
    return sample(logits, key, sampler)
  return sample_rows(logits, rows, positions)


def start(first, key, eos_ids, active, max_new, *, out_len):
  """The decode loop's state after each row's token `first` (its K/V not yet in the cache):
  (step, tokens out [B, out_len] with out[:, 0] = first, done, last token, key). A row is
  done from the start when not `active`, at EOS, or when max_new (a scalar or one per row,
  `first` counted) is 1."""
  out = jnp.full((first.shape[0], out_len), -1, jnp.int32).at[:, 0].set(first)
  done = ~active | jnp.isin(first, eos_ids) | (max_new <= 1)
  return jnp.int32(1), out, done, first, key


@functools.partial(jax.jit, static_argnames=("sampler", "out_len"))
def first_token(logits, key, eos_ids, active, max_new, rows=None, positions=None, *,
                sampler=None, out_len):
  """Every row's first new token, from its prompt's last logits (one `sampler` for all, or
  each row's own `rows` drawing at `positions`): the decode loop's starting state."""
  TRACE_COUNT["first"] += 1
  key, sub = jax.random.split(key)
  return start(_pick(logits, sub, sampler, rows, positions), key, eos_ids, active, max_new,
               out_len=out_len)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampler", "impl", "target"),
                   donate_argnums=(3,))
def decode_steps(graphdef, state, carry, cache, eos_ids, max_new, stop, rows=None, *,
                 sampler=None, impl, target=None):
  """Decode steps on device from `carry` (start's state) until `stop` tokens are out or every
  row is done (at EOS or its max_new tokens: a scalar or one per row); one `sampler` for all
  rows, or each row's own `rows` (sampling.RowSampling). Returns the state to go on from and
  the cache."""
  TRACE_COUNT["decode"] += 1
  model = nnx.merge(graphdef, state)

  def cond(loop):
    step, _, done, _, _, _ = loop
    return (step < stop) & ~jnp.all(done)

  def body(loop):
    step, out, done, tok, cache, key = loop
    with dispatch.using(impl), dispatch.lowering_for(target):
      logits, cache = model(tok[:, None], cache=cache)
    key, sub = jax.random.split(key)
    nxt = _pick(logits[:, 0], sub, sampler, rows, cache.lengths)
    out = out.at[:, step].set(jnp.where(done, -1, nxt))
    done = done | jnp.isin(nxt, eos_ids) | (step + 1 >= max_new)
    return step + 1, out, done, jnp.where(done, 0, nxt), cache, key

  step, out, done, tok, key = carry
  step, out, done, tok, cache, key = jax.lax.while_loop(
      cond, body, (step, out, done, tok, cache, key))
  return (step, out, done, tok, key), cache


def _check_prompts(prompts, vocab_size):
  if not isinstance(prompts, (list, tuple)) or not prompts:
    raise ValueError("prompts must be a non-empty list of token-id lists")
  for i, p in enumerate(prompts):
    if len(p) == 0:
      raise ValueError(f"prompt {i} is empty")
    arr = np.asarray(p)
    if not np.issubdtype(arr.dtype, np.integer) or arr.ndim != 1:
      raise ValueError(f"prompt {i} must be a flat list of integer token ids")
    bad = arr[(arr < 0) | (arr >= vocab_size)]
    if bad.size:
      raise ValueError(f"prompt {i} has token id {int(bad[0])} outside the vocabulary "
                       f"[0, {vocab_size})")


@dataclasses.dataclass(frozen=True)
class Buckets:
  """The padded shapes one generate call compiles for."""
  batch: int      # rows, a power of two
  chunk: int      # prompt tokens per prefill call
  pages: int      # page-table entries per row, a power of two
  out: int        # output buffer per row, a power of two


def buckets(cfg, batch: int, longest: int, max_new_tokens: int,
            max_cache_len: int | None = None, page_size: int = 64,
            prefill_chunk: int | None = None, replicas: int = 1) -> Buckets:
  """The shapes for `batch` prompts of up to `longest` tokens and `max_new_tokens` more
  (the batch a multiple of a mesh's data `replicas`, which split it), refusing (ValueError)
  what exceeds the cache or the model's context."""
  for name, value in (("max_new_tokens", max_new_tokens), ("prefill_chunk", prefill_chunk),
                      ("page_size", page_size)):
    if (value is not None or name == "max_new_tokens") and (
        not isinstance(value, (int, np.integer)) or value < 1):
      raise ValueError(f"{name} must be a positive integer, got {value!r}")
  need = longest + max_new_tokens
  if max_cache_len is not None and need > max_cache_len:
    raise ValueError(f"prompt of {longest} tokens plus max_new_tokens={max_new_tokens} is "
                     f"longer than the cache ({max_cache_len} entries)")
  if need > cfg.max_position_embeddings:
    raise ValueError(f"prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds "
                     f"the model's context of {cfg.max_position_embeddings} tokens")
  pages = pow2(_pages(need, page_size))
  return Buckets(batch=-(-pow2(batch) // replicas) * replicas, pages=pages,
                 out=pow2(max_new_tokens),
                 chunk=min(prefill_chunk or pow2(longest, 16), pages * page_size))


def generate(model, prompts, *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, eos_token_id=None,
             seed: int = 0, max_cache_len: int | None = None, page_size: int = 64,
             prefill_chunk: int | None = None, kv: paging.KVStore | None = None,
             mesh=None) -> GenerationResult:
  """Generates up to `max_new_tokens` for each prompt (a list of token-id lists).

  The KV cache is paged: `page_size` tokens per page, a prompt prefilled `prefill_chunk`
  tokens at a time (None: at once). `kv`, a paging.KVStore, keeps the cache and its prefix
  cache across calls (prompts that start with pages it has seen are not recomputed; its own
  page size applies); without one, a cache just big enough for this batch is made. Tokens
  are the same whatever page_size, prefill_chunk and kv are.

  mesh: a jax.sharding.Mesh (fdjax.make_mesh) to run on, the model put on it if it is not
  already (better: load it there, load_pretrained(mesh=)); a model on a mesh runs on its own.
  The batch is padded to a multiple of the mesh's data replicas, which split it.
  """
  model = _on_mesh(model, mesh)
  cfg = model.config
  _check_prompts(prompts, cfg.vocab_size)
  page_size = page_size if kv is None else kv.page_size
  longest = max(len(p) for p in prompts)
  replicas = getattr(model, "dp", 1)
  shapes = buckets(cfg, len(prompts), longest, max_new_tokens, max_cache_len, page_size,
                   prefill_chunk, replicas)
  bp = shapes.batch
  sampler = Sampler(temperature, top_k, top_p).validate(cfg.vocab_size)
  eos = [] if eos_token_id is None else (
      [eos_token_id] if isinstance(eos_token_id, (int, np.integer)) else list(eos_token_id))
  need = longest + max_new_tokens
  # With a window in every layer and sequences longer than it, pages are given back as they
  # fall out of it (and taken as needed); otherwise every row's pages are taken up front.
  window = cfg.windowed if cfg.windowed is not None and need > cfg.windowed else None
  if kv is None:
    at_once = max(prefill_chunk or longest, page_size)  # tokens one call writes per row
    pages = [0] * replicas  # each data replica's rows take pages from its own pool
    for i, p in enumerate(prompts):
      pages[paging.replica_of(i, bp, replicas)] += (
          _pages(len(p) + max_new_tokens, page_size) if window is None else
          min(_pages(len(p) + max_new_tokens, page_size), live_pages(window, at_once, page_size)))
    kv = paging.KVStore.for_model(model, pow2(max(pages)), page_size)
  kv.check_for(model)

  b = len(prompts)
  rows = []
  try:
    for i, p in enumerate(prompts):  # windowed: pages are taken as it grows (_Pages.table)
      rows.append(kv.pool_of(i, bp).allocate(list(p), len(p) + max_new_tokens
                                             if window is None else 1))
    out, steps, prefill_s, decode_s = _run(model, kv, prompts, rows, shapes, max_new_tokens,
                                           sampler, eos, seed, window)
  except BaseException:
    for i, (pages, _) in enumerate(rows):
      kv.pool_of(i, bp).release(pages)
    raise
  tokens = []
  for i, (p, (pages, _), row) in enumerate(zip(prompts, rows, out[:b, :max_new_tokens])):
    row = row[row >= 0].tolist()
    hits = [j for j, tok in enumerate(row) if tok in eos]
    tokens.append(row[:hits[0] + 1] if hits else row)
    # the last token's K/V is never written
    kv.pool_of(i, bp).finish(pages, list(p) + tokens[-1][:-1])
  return GenerationResult(tokens=tokens, prompt_tokens=sum(len(p) for p in prompts),
                          prefill_s=prefill_s, decode_s=decode_s, decode_steps=steps - 1)


def _on_mesh(model, mesh):
  """The model on `mesh` (None: as it is)."""
  if mesh is None:
    return model
  if getattr(model, "mesh", None) is not None:
    if model.mesh != mesh:
      raise ValueError("generate: the model is on another mesh than the one given")
    return model
  return meshes.shard(model, mesh)


def _pages(tokens: int, page_size: int) -> int:
  return -(-tokens // page_size)


def live_pages(window: int, at_once: int, page_size: int) -> int:
  """The most pages a sequence holds at a time when those wholly before its window are given
  back as it goes: the pages of its W - 1 older keys and of the `at_once` tokens one call
  writes (a prefill chunk, a decode segment), plus one where they straddle a page edge."""
  return _pages(window - 1 + at_once, page_size) + 1


class _Pages:
  """The page table of a batch's rows on kv's pool. Without a window every row's pages are
  all there from the start; with one (every layer windowed), `table` gives back each row's
  pages wholly before the window of its next query and takes pages up to what the next call
  writes."""

  def __init__(self, kv, rows, totals, bp, width, window):
    self.kv, self.rows, self.totals, self.bp, self.window = kv, rows, totals, bp, window
    self.width = width

  def table(self, lengths=None, upto=None):
    """The page table [bp, width] for rows with `lengths` tokens cached about to write up to
    `upto` tokens (windowed only; a row given None as upto does not grow)."""
    ps = self.kv.page_size
    if self.window is not None and lengths is not None:
      for i, (pages, _) in enumerate(self.rows):
        pool = self.kv.pool_of(i, self.bp)
        pool.drop_leading(pages, max(0, (int(lengths[i]) - self.window + 1) // ps))
        if upto[i] is not None:
          pool.grow(pages, min(int(upto[i]), self.totals[i]))
    return jnp.asarray(paging.page_table([pages for pages, _ in self.rows], self.bp,
                                         self.width))


def _run(model, kv, prompts, rows, shapes, max_new_tokens, sampler, eos, seed, window):
  """Prefill in chunks, then the decode loop (in segments of page_size steps when pages are
  given back behind a `window`), on kv's pages; (tokens [bp, out_len], steps, prefill seconds,
  decode seconds)."""
  cfg = model.config
  graphdef, state = nnx.split(model)
  static = dict(impl=dispatch.current(), target=dispatch.lowering_target())
  bp = shapes.batch
  pages = _Pages(kv, rows, [len(p) + max_new_tokens for p in prompts], bp, shapes.pages, window)
  cached, left = np.zeros((bp,), np.int32), np.zeros((bp,), np.int32)
  todo = [list(p)[n_cached:] for p, (_, n_cached) in zip(prompts, rows)]
  for i, (_, n_cached) in enumerate(rows):
    cached[i], left[i] = n_cached, len(todo[i])
  chunk = shapes.chunk  # no longer than the page table addresses
  cache = kvc.KVCache(kv.k, kv.v, pages.table(), jnp.asarray(cached))
  last = jnp.zeros((bp, cfg.vocab_size), jnp.float32)

  t0 = time.perf_counter()
  try:  # the calls donate the pools: kv keeps the ones they returned, even after a failure
    for c in range(0, max(len(t) for t in todo), chunk):
      ids, n = pack([t[c:c + chunk] for t in todo], bp, chunk)
      if window is not None:
        before = cached + np.minimum(c, left)
        cache = cache._replace(page_table=pages.table(before, before + n))
      cache, last = prefill_step(graphdef, state, jnp.asarray(ids), jnp.asarray(n), cache,
                                   last, **static)
    eos_ids = jnp.asarray(eos or [-1], jnp.int32)
    max_new = jnp.int32(max_new_tokens)
    carry = first_token(last, jax.random.key(seed), eos_ids,
                        jnp.asarray(np.arange(bp) < len(prompts)), max_new, sampler=sampler,
                        out_len=shapes.out)
    carry[3].block_until_ready()
    t1 = time.perf_counter()
    segment = max_new_tokens if window is None else kv.page_size
    while True:
      if window is not None:
        lengths, done = to_host(cache.lengths), to_host(carry[2])
        cache = cache._replace(page_table=pages.table(
            lengths, [None if d else n + segment for d, n in zip(done, lengths)]))
      stop = min(max_new_tokens, int(to_host(carry[0])) + segment)
      carry, cache = decode_steps(graphdef, state, carry, cache, eos_ids, max_new,
                                  jnp.int32(stop), sampler=sampler, **static)
      if stop >= max_new_tokens or bool(np.all(to_host(carry[2]))):
        break
    out = to_host(carry[1])
    t2 = time.perf_counter()
  finally:
    kv.k, kv.v = cache.k, cache.v
  return out, int(to_host(carry[0])), t1 - t0, t2 - t1


def lower(model, *, batch: int, prompt_len: int, max_new_tokens: int, place=None,
          temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
          page_size: int = 64, prefill_chunk: int | None = None):
  """A prefill chunk and a decode segment as `generate` compiles them for `batch` prompts of
  up to `prompt_len` tokens, lowered (not run) on abstract inputs: (prefill, decode)
  `Lowered`s.

  `model` may be abstract (`nnx.eval_shape(lambda: Transformer(...))`: no weight is
  materialised); `place(shape, dtype)` makes each abstract input (a ShapeDtypeStruct with a
  sharding, e.g. fdjax.tuning.aot.abstract for a described GPU); default: no sharding."""
  place = place or jax.ShapeDtypeStruct
  cfg = model.config
  on_mesh = getattr(model, "mesh", None) is not None
  dp = model.dp if on_mesh else 1
  shapes = buckets(cfg, batch, prompt_len, max_new_tokens, None, page_size, prefill_chunk, dp)
  graphdef, state = nnx.split(model)
  like = lambda tree: jax.tree.map(lambda a: place(a.shape, a.dtype), tree)
  static = dict(impl=dispatch.current(), target=dispatch.lowering_target())
  b = shapes.batch
  rows = place((b,), jnp.int32)
  if on_mesh:  # (fdjax.io.mesh.build without read): parameters and pages keep their shardings
    params, one = state, model.pages(b * shapes.pages // dp, page_size)
    pages = ((one,) * cfg.num_layers,) * 2
  else:
    params = like(state)
    pages = like(jax.eval_shape(lambda: kvc.empty_pages(cfg, b * shapes.pages, page_size,
                                                        model.dtype)))
  cache = kvc.KVCache(*pages, place((b, shapes.pages), jnp.int32), rows)
  prefill = prefill_step.lower(graphdef, params, place((b, shapes.chunk), jnp.int32),
                               rows, cache, place((b, cfg.vocab_size), jnp.float32), **static)
  carry = (place((), jnp.int32), place((b, shapes.out), jnp.int32), place((b,), jnp.bool_), rows,
           like(jax.eval_shape(lambda: jax.random.key(0))))
  sampler = Sampler(temperature, top_k, top_p).validate(cfg.vocab_size)
  decode = decode_steps.lower(graphdef, params, carry, cache, place((1,), jnp.int32),
                              place((), jnp.int32), place((), jnp.int32), sampler=sampler,
                              **static)
  return prefill, decode
