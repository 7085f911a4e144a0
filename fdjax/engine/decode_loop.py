"""The jitted decode loop on the paged KV cache: the prompts prefilled (in chunks, after
whatever the prefix cache already holds), then every decode step on device inside one
`lax.while_loop` (no host round trip per token), for a ragged batch of prompts.

Shapes are bucketed (batch, page-table width and output buffer to powers of two, the prompt
chunk by steps.chunk_bucket) so calls of similar size reuse the compiled code.

When every layer has a sliding window W (Mistral), keys more than W positions back are never
read again: a sequence then holds only the pages it still reads. Pages are taken as it grows
and the ones wholly before its window given back, between prefill chunks and between decode
segments of `page_size` steps (the loop returns to the host once per segment), so a sequence
of any length lives in about (W + page_size) / page_size + 2 pages.
"""
from __future__ import annotations

import dataclasses
import math
import time
import weakref

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fdjax.engine import paging, sampling, spec_steps, steps
from fdjax.engine import speculative as speculative_
from fdjax.engine.runner import Runner
from fdjax.engine.sampling import RowSampling, Sampler, Settings
from fdjax.engine.steps import pow2
from fdjax.io import mesh as meshes
from fdjax.ops import checks, dispatch
from fdjax.ops import kv_cache as kvc


@dataclasses.dataclass
class GenerationResult:
  tokens: list[list[int]]  # each row's new tokens, up to and including its EOS
  prompt_tokens: int
  prefill_s: float
  decode_s: float
  decode_steps: int        # decode steps the loop ran (after the prefill's first token)
  drafted: int = 0         # speculative decoding: drafts proposed, and accepted
  accepted: int = 0

  @property
  def acceptance_rate(self) -> float:
    return self.accepted / self.drafted if self.drafted else 0.0

  @property
  def new_tokens(self) -> int:
    return sum(len(t) for t in self.tokens)

  @property
  def decode_tokens_per_s(self) -> float:
    """Tokens produced by the decode loop (all rows) per second of decode time."""
    produced = self.new_tokens - len(self.tokens)
    return produced / self.decode_s if self.decode_s > 0 else 0.0


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
    if value is not None or name == "max_new_tokens":
      checks.positive_int("generate", name, value)
  need = longest + max_new_tokens
  if max_cache_len is not None and need > max_cache_len:
    raise ValueError(f"prompt of {longest} tokens plus max_new_tokens={max_new_tokens} is "
                     f"longer than the cache ({max_cache_len} entries)")
  if need > cfg.max_position_embeddings:
    raise ValueError(f"prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds "
                     f"the model's context of {cfg.max_position_embeddings} tokens")
  pages = steps.table_width(need, page_size)
  return Buckets(batch=checks.cdiv(pow2(batch), replicas) * replicas, pages=pages,
                 out=pow2(max_new_tokens),
                 chunk=steps.chunk_bucket(longest, min(prefill_chunk or pages * page_size,
                                                     pages * page_size)))


def generate(model, prompts, *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, min_p: float = 0.0,
             repetition_penalty: float = 1.0, eos_token_id=None,
             seed: int = 0, max_cache_len: int | None = None, page_size: int = 64,
             prefill_chunk: int | None = None, kv: paging.KVStore | None = None,
             mesh=None, speculative=None) -> GenerationResult:
  """Generates up to `max_new_tokens` for each prompt (a list of token-id lists), greedy at
  temperature 0, else sampled after top_k, top_p and min_p (a token less likely than min_p
  times the likeliest is cut).

  repetition_penalty: as transformers' `generate` applies it (before the temperature and the
  filters, greedy too): the logit of every token in the row's prompt or already generated is
  divided by it where positive, else multiplied by it; 1 is off. With a penalty each row
  draws from its own seed (from `seed`), as speculative decoding does.

  The KV cache is paged: `page_size` tokens per page, a prompt prefilled `prefill_chunk`
  tokens at a time (None: at once). `kv`, a paging.KVStore, keeps the cache and its prefix
  cache across calls (prompts that start with pages it has seen are not recomputed; its own
  page size applies); without one, a cache just big enough for this batch is made. Tokens
  are the same whatever page_size, prefill_chunk and kv are.

  mesh: a jax.sharding.Mesh (fdjax.make_mesh) to run on, the model put on it if it is not
  already (better: load it there, load_pretrained(mesh=)); a model on a mesh runs on its own.
  The last model put on a mesh stays there for the next call (one more copy of its weights
  while it lives), unless its parameters have changed.
  The batch is padded to a multiple of the mesh's data replicas, which split it.

  speculative: speculative decoding (fdjax.engine.speculative: `{"method": "ngram", "k": 4,
  "n": 3}`, `{"method": "draft", "model": draft_model, "k": 4}` or `"ngram:k=4,n=3"`). Greedy
  tokens are those of plain decoding; sampled ones follow the same distribution (not the same
  draws: each row then samples with its own seed from `seed`).
  """
  model = _on_mesh(model, mesh)
  cfg = model.config
  spec = speculative_.prepare(speculative, model)
  steps.check_prompts(prompts, cfg.vocab_size)
  # numpy integers are welcome: the shapes below are computed with Python's ints
  max_new_tokens, page_size, prefill_chunk = (
      int(v) if isinstance(v, np.integer) else v
      for v in (max_new_tokens, page_size, prefill_chunk))
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or \
      not -2 ** 63 <= seed < 2 ** 63:
    raise ValueError(f"generate: seed must be an integer in [-2**63, 2**63) (an int64), "
                     f"got {seed!r}")
  page_size = page_size if kv is None else kv.page_size
  longest = max(len(p) for p in prompts)
  replicas = getattr(model, "dp", 1)
  shapes = buckets(cfg, len(prompts), longest, max_new_tokens, max_cache_len, page_size,
                   prefill_chunk, replicas)
  bp = shapes.batch
  sampler = Sampler(temperature, top_k, top_p, min_p).validate(cfg.vocab_size)
  penalty = _repetition_penalty(repetition_penalty)
  eos = steps.eos_ids(eos_token_id)
  if any(not 0 <= t < cfg.vocab_size for t in eos):
    raise ValueError(f"generate: eos_token_id {eos_token_id!r} is outside the vocabulary "
                     f"[0, {cfg.vocab_size})")
  need = longest + max_new_tokens
  # With a window in every layer and sequences longer than it, pages are given back as they
  # fall out of it (and taken as needed); otherwise every row's pages are taken up front.
  window = cfg.windowed if cfg.windowed is not None and need > cfg.windowed else None
  if spec is not None:  # speculation keeps each row's pages from the start, and its table
    window = None       # addresses a round's k + 1 positions
    shapes = dataclasses.replace(shapes, pages=max(shapes.pages,
                                                   steps.table_width(spec.k + 1, page_size)))
  # Where attention reads a row's own consecutive pages in place (the CPU), a cache made here
  # gives each row a run of the table's width, so that row b owns pages b * W .. b * W + W - 1.
  own_run = (kv is None and window is None and spec is None
             and dispatch.reads_own_pages_in_place(cfg, model.dtype))
  if kv is None:
    at_once = max(prefill_chunk or longest, page_size)  # tokens one call writes per row
    kv = paging.KVStore.for_model(model, _pool_size([
        shapes.pages if own_run else
        _pages(len(p) + max_new_tokens, page_size) if window is None else
        min(_pages(len(p) + max_new_tokens, page_size), live_pages(window, at_once, page_size))
        for p in prompts], bp, replicas), page_size, in_place=own_run)
  kv.check_for(model)

  b = len(prompts)
  rows = []
  try:
    for i, p in enumerate(prompts):  # windowed: pages are taken as it grows (_Pages.table)
      total = (shapes.pages * page_size if own_run else
               len(p) + max_new_tokens if window is None else 1)
      rows.append(kv.pool_of(i, bp).allocate(list(p), total))
    if spec is None:
      out, n_steps, prefill_s, decode_s = _run(model, kv, prompts, rows, shapes,
                                               max_new_tokens, sampler, penalty, eos, seed,
                                               window)
      drafted = accepted = 0
    else:
      out, n_steps, prefill_s, decode_s, drafted, accepted = _run_speculative(
          model, kv, prompts, rows, shapes, max_new_tokens, sampler, penalty, eos, seed, spec)
  except BaseException:
    for i, (pages, _) in enumerate(rows):
      kv.pool_of(i, bp).release(pages)
    raise
  tokens = []
  for i, (p, (pages, _), row) in enumerate(zip(prompts, rows, out[:b, :max_new_tokens])):
    tokens.append(steps.until_eos(row[row >= 0].tolist(), eos))
    # the last token's K/V is never written
    kv.pool_of(i, bp).finish(pages, list(p) + tokens[-1][:-1])
  return GenerationResult(tokens=tokens, prompt_tokens=sum(len(p) for p in prompts),
                          prefill_s=prefill_s, decode_s=decode_s, decode_steps=n_steps - 1,
                          drafted=drafted, accepted=accepted)


def _repetition_penalty(value) -> float:
  """generate's repetition_penalty as a float; ValueError unless a finite number > 0."""
  if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
      or not (math.isfinite(value) and value > 0):
    raise ValueError(f"generate: repetition_penalty must be a finite number > 0 (1: off), "
                     f"got {value!r}")
  return float(value)


def _row_sampling(prompts, bp: int, sampler: Sampler, penalty: float, seed: int):
  """Per-row sampling for the batch (each row its own seed, from `seed`, the penalty and
  sampler's settings), its prompts [bp, a power of two] (-1 past each: the width bucketed, as
  the jitted calls that take it are) and their lengths [bp]."""
  seeds = np.random.SeedSequence(seed % 2**64).generate_state(bp)  # (a negative seed too)
  prompt_ids, lens = steps.pack(prompts, bp, pow2(max(len(p) for p in prompts)), fill=-1)
  rows = RowSampling.of([Settings(sampler.temperature, sampler.top_k, sampler.top_p, int(s),
                                  repetition_penalty=penalty, min_p=sampler.min_p)
                         for s in seeds], lens)
  return rows, prompt_ids, lens


def _on_mesh(model, mesh):
  """The model on `mesh` (None: as it is); a model not on one is put there (meshes.shard),
  as it was by the last call where its parameters are the same arrays (_PLACED)."""
  if mesh is None:
    return model
  if getattr(model, "mesh", None) is not None:
    if model.mesh != mesh:
      raise ValueError("generate: the model is on another mesh than the one given")
    return model
  leaves = jax.tree.leaves(nnx.state(model))
  if (_PLACED and _PLACED["model"]() is model and _PLACED["mesh"] == mesh
      and len(_PLACED["leaves"]) == len(leaves)
      and all(r() is x for r, x in zip(_PLACED["leaves"], leaves))):
    return _PLACED["placed"]
  placed = meshes.shard(model, mesh)
  _PLACED.clear()
  _PLACED.update(model=weakref.ref(model, lambda _: _PLACED.clear()), mesh=mesh,
                 leaves=[weakref.ref(x) for x in leaves], placed=placed)
  return placed


# The last model generate put on a mesh (_on_mesh), kept for the next call: putting a model
# there reads every weight (a third of a second for 58.5M parameters on a CPU). Used again
# while the model's parameters are the same arrays (a model updated in between, trained or
# quantized, is put there again); dropped with the model or when another takes its place.
_PLACED: dict = {}


def _pool_size(row_pages, rows: int, replicas: int) -> int:
  """Pages for each data replica's pool (each replica's rows take pages from its own) when
  row i of `rows` takes row_pages[i]: the most any replica's rows take, as a power of two."""
  need = [0] * replicas
  for i, n in enumerate(row_pages):
    need[paging.replica_of(i, rows, replicas)] += n
  return pow2(max(need))


def _pages(tokens: int, page_size: int) -> int:
  return checks.cdiv(tokens, page_size)


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

  def table(self, lengths=None, upto=None, width=None):
    """The page table [bp, width] for rows with `lengths` tokens cached about to write up to
    `upto` tokens (windowed only; a row given None as upto does not grow); `width` entries of
    it (None: all)."""
    ps = self.kv.page_size
    if self.window is not None and lengths is not None:
      for i, (pages, _) in enumerate(self.rows):
        pool = self.kv.pool_of(i, self.bp)
        pool.drop_leading(pages, max(0, (int(lengths[i]) - self.window + 1) // ps))
        if upto[i] is not None:
          pool.grow(pages, min(int(upto[i]), self.totals[i]))
    return jnp.asarray(paging.page_table([pages for pages, _ in self.rows], self.bp,
                                         self.width)[:, :width])


def prefill_width(tokens: int, page_size: int, width: int) -> int:
  """The page-table entries a prefill chunk takes when its rows reach `tokens` tokens (at
  least the chunk's length): those pages only (a power of two of them, as the serving
  engine's widths, at most the table's `width`). The chunk's keys are its table's pages,
  gathered; past the prompt they are keys no query sees, which the reference attention
  scores and masks (a prompt of 128 with 32 tokens to come has a run of 256)."""
  return min(steps.table_width(tokens, page_size), width)


def _prefill(runner, prompts, rows, shapes, pages, window):
  """Every row's prompt, past what the prefix cache holds, into the cache in chunks: (the
  cache, each row's logits at its last prompt token)."""
  bp = shapes.batch
  cached, left = np.zeros((bp,), np.int32), np.zeros((bp,), np.int32)
  todo = [list(p)[n_cached:] for p, (_, n_cached) in zip(prompts, rows)]
  for i, (_, n_cached) in enumerate(rows):
    cached[i], left[i] = n_cached, len(todo[i])
  chunk = shapes.chunk  # no longer than the page table addresses
  cache, last = runner.cache(pages.table(), cached), None
  for c in range(0, max(len(t) for t in todo), chunk):
    ids, n = steps.pack([t[c:c + chunk] for t in todo], bp, chunk)
    before = cached + np.minimum(c, left)
    if window is not None:
      cache = cache._replace(page_table=pages.table(before, before + n))
    else:  # the pages up to the chunk's last token (and at least the chunk's length)
      width = prefill_width(max(int(np.max(before + n)), chunk), runner.kv.page_size,
                            shapes.pages)
      if width != cache.page_table.shape[1]:
        cache = cache._replace(page_table=pages.table(width=width))
    cache, last = runner.prefill(cache, ids, n, last)
  if cache.page_table.shape[1] != shapes.pages:  # the decode steps take the whole table
    cache = cache._replace(page_table=pages.table())
  return cache, last


def _run(model, kv, prompts, rows, shapes, max_new_tokens, sampler, penalty, eos, seed,
         window):
  """Prefill in chunks, then the decode loop (in segments of page_size steps when pages are
  given back behind a `window`), on kv's pages; (tokens [bp, out_len], steps, prefill seconds,
  decode seconds). One `sampler` for every row, or with a repetition `penalty` (not 1) the
  per-row sampling that counts each row's tokens."""
  runner = Runner(model, kv, eos)
  bp = shapes.batch
  pages = _Pages(kv, rows, [len(p) + max_new_tokens for p in prompts], bp, shapes.pages, window)
  t0 = time.perf_counter()
  cache, last = _prefill(runner, prompts, rows, shapes, pages, window)
  max_new = jnp.int32(max_new_tokens)
  active = np.arange(bp) < len(prompts)
  if penalty == 1.0:
    per_row = None
    loop = runner.first(last, active, max_new, out_len=shapes.out, key=sampling.seed_key(seed),
                        sampler=sampler)
  else:
    per_row, prompt_ids, lens = _row_sampling(prompts, bp, sampler, penalty, seed)
    loop = runner.first(last, active, max_new, out_len=shapes.out, rows=per_row,
                        positions=lens, tokens=prompt_ids)
  loop.last.block_until_ready()
  t1 = time.perf_counter()
  segment = max_new_tokens if window is None else kv.page_size
  while True:
    if window is not None:
      lengths, done = steps.to_host(cache.lengths), steps.to_host(loop.done)
      cache = cache._replace(page_table=pages.table(
          lengths, [None if d else n + segment for d, n in zip(done, lengths)]))
    stop = min(max_new_tokens, int(steps.to_host(loop.step)) + segment)
    loop, cache = runner.decode(loop, cache, max_new, stop,
                                sampler=sampler if per_row is None else None, rows=per_row)
    if stop >= max_new_tokens or bool(np.all(steps.to_host(loop.done))):
      break
  out = steps.to_host(loop.out)
  t2 = time.perf_counter()
  return out, int(steps.to_host(loop.step)), t1 - t0, t2 - t1


def _run_speculative(model, kv, prompts, rows, shapes, max_new_tokens, sampler, penalty, eos,
                     seed, spec):
  """_run with speculative decoding (spec_steps): every row samples as `sampler` and the
  repetition `penalty` say with its own seed; (tokens, rounds, prefill s, decode s, drafts
  proposed, drafts accepted)."""
  bp, b = shapes.batch, len(prompts)
  totals = [len(p) + max_new_tokens for p in prompts]
  runner = Runner(model, kv, eos)
  pages = _Pages(kv, rows, totals, bp, shapes.pages, None)
  draft = dkv = drows = dcache = None
  if spec.method == "draft":  # on a mesh, each data replica's rows in its own pool
    dkv = paging.KVStore.for_model(
        spec.model, _pool_size([_pages(t, kv.page_size) for t in totals], bp, len(kv.pools)),
        kv.page_size)
    draft = Runner(spec.model, dkv, eos)
    drows = [dkv.pool_of(i, bp).allocate(list(p), t, reuse=False)
             for i, (p, t) in enumerate(zip(prompts, totals))]
  try:
    t0 = time.perf_counter()
    cache, last = _prefill(runner, prompts, rows, shapes, pages, None)
    if draft is not None:
      dcache, _ = _prefill(draft, prompts, drows, shapes,
                           _Pages(dkv, drows, totals, bp, shapes.pages, None), None)
    row_sampling, prompt_ids, lens = _row_sampling(prompts, bp, sampler, penalty, seed)
    max_new = jnp.int32(max_new_tokens)
    loop = runner.first(last, np.arange(bp) < b, max_new, out_len=shapes.out, rows=row_sampling,
                        positions=lens, tokens=prompt_ids)
    state = spec_steps.start_jit(loop, jnp.asarray(prompt_ids), jnp.asarray(lens),
                                 np.full((bp,), spec.k, np.int32),
                                 seq_len=pow2(int(lens.max()) + max_new_tokens + spec.k + 1))
    state.last.block_until_ready()
    t1 = time.perf_counter()
    state, cache, dcache = runner.speculate(state, cache, max_new, max_new_tokens, spec,
                                            rows=row_sampling, draft=draft, dcache=dcache)
    out = steps.to_host(state.out)
    t2 = time.perf_counter()
  finally:
    if draft is not None:
      for i, (pages_, _) in enumerate(drows):
        dkv.pool_of(i, bp).release(pages_)
  live = np.arange(bp) < b
  return (out, int(steps.to_host(state.rounds)) + 1, t1 - t0, t2 - t1,
          int(steps.to_host(state.drafted)[live].sum()),
          int(steps.to_host(state.accepted)[live].sum()))


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
  windowed = cfg.windowed is not None and prompt_len + max_new_tokens > cfg.windowed
  if on_mesh:  # (fdjax.io.mesh.build without read): parameters and pages keep their shardings
    params = state
    pages = tuple((model.pages(b * shapes.pages // dp, page_size, keys),) * cfg.num_layers
                  for keys in (True, False))
  else:
    params = like(state)
    # (as generate makes them: float32 for bf16 where the CPU reads rows' own runs in place)
    in_place = not windowed and dispatch.reads_own_pages_in_place(cfg, model.dtype)
    pages = like(jax.eval_shape(lambda: kvc.empty_pages(
        cfg, b * shapes.pages, page_size, dispatch.kv_cache_dtype(model.dtype, in_place))))
  cache = kvc.KVCache(*pages, place((b, shapes.pages), jnp.int32), rows)
  # the first chunk's table: its own pages (prefill_width), all of them behind a window
  width = shapes.pages if windowed else prefill_width(shapes.chunk, page_size, shapes.pages)
  prefill = steps.prefill_step.lower(graphdef, params, place((b, shapes.chunk), jnp.int32),
                                     rows, cache._replace(page_table=place((b, width), jnp.int32)),
                                     place((b, cfg.vocab_size), jnp.float32), **static)
  loop = steps.LoopState(place((), jnp.int32), place((b, shapes.out), jnp.int32),
                         place((b,), jnp.bool_), rows,
                         like(jax.eval_shape(lambda: jax.random.key(0))))
  sampler = Sampler(temperature, top_k, top_p).validate(cfg.vocab_size)
  decode = steps.decode_steps.lower(graphdef, params, loop, cache, place((1,), jnp.int32),
                              place((), jnp.int32), place((), jnp.int32), sampler=sampler,
                              **static)
  return prefill, decode
