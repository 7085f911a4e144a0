"""The jitted decode loop on the paged KV cache: the prompts prefilled (in chunks, after
whatever the prefix cache already holds), then every decode step on device inside one
`lax.while_loop` (no host round trip per token), for a ragged batch of prompts.

Shapes are bucketed (batch, prompt chunk, page-table width and output buffer to powers of
two) so calls of similar size reuse the compiled code.
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

from fdjax import dispatch, paging
from fdjax import kv_cache as kvc
from fdjax.sampling import Sampler, sample, sample_rows

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


def pack(pieces, rows: int, width: int):
  """Ragged token lists as (ids [rows, width] int32, right-padded with 0; n [rows], each
  list's length; rows past the lists are empty)."""
  ids = np.zeros((rows, width), np.int32)
  n = np.zeros((rows,), np.int32)
  for i, piece in enumerate(pieces):
    ids[i, :len(piece)] = piece
    n[i] = len(piece)
  return ids, n


@functools.partial(jax.jit, static_argnames=("graphdef", "impl"), donate_argnums=(4, 5))
def prefill_step(graphdef, state, ids, n, cache, last, *, impl):
  """One chunk of every row's prompt (row b: its first n[b] tokens of ids) into the cache;
  `last` keeps each row's logits at its latest token."""
  TRACE_COUNT["prefill"] += 1
  model = nnx.merge(graphdef, state)
  with dispatch.using(impl):
    logits, cache = model(ids, cache=cache, lengths=n, last_only=True)
  return cache, jnp.where((n > 0)[:, None], logits[:, 0], last)


def _pick(logits, key, sampler, rows, positions):
  """The next token of every row: one static Sampler for all, or each row's own (rows, a
  sampling.RowSampling, drawing the token at positions[b])."""
  if rows is None:
    return sample(logits, key, sampler)
  return sample_rows(logits, rows, positions)


@functools.partial(jax.jit, static_argnames=("sampler",))
def first_token(logits, key, rows=None, positions=None, *, sampler=None):
  """The token after the prompt, from the prefill's last logits."""
  TRACE_COUNT["first"] += 1
  key, sub = jax.random.split(key)
  return _pick(logits, sub, sampler, rows, positions), key


@functools.partial(jax.jit, static_argnames=("graphdef", "sampler", "out_len", "impl"),
                   donate_argnums=(3,))
def decode_steps(graphdef, state, first, cache, key, eos_ids, max_new, active, rows=None, *,
                 sampler=None, out_len, impl):
  """Decode steps on device after each row's token `first` (its K/V not yet in the cache):
  out[:, 0] = first, then one token per step until a row's EOS or its max_new[b] tokens
  (max_new: a scalar or one per row, `first` counted), for rows with `active` set, until
  every row is done. Returns (out [B, out_len], -1 past each row's end; steps; cache)."""
  TRACE_COUNT["decode"] += 1
  model = nnx.merge(graphdef, state)
  b = first.shape[0]
  max_new = jnp.broadcast_to(max_new, (b,))
  out = jnp.full((b, out_len), -1, jnp.int32).at[:, 0].set(first)
  done = ~active | jnp.isin(first, eos_ids) | (max_new <= 1)

  def cond(carry):
    step, _, done, _, _, _ = carry
    return (step < jnp.max(max_new)) & ~jnp.all(done)

  def body(carry):
    step, out, done, tok, cache, key = carry
    with dispatch.using(impl):
      logits, cache = model(tok[:, None], cache=cache)
    key, sub = jax.random.split(key)
    nxt = _pick(logits[:, 0], sub, sampler, rows, cache.lengths)
    out = out.at[:, step].set(jnp.where(done, -1, nxt))
    done = done | jnp.isin(nxt, eos_ids) | (step + 1 >= max_new)
    return step + 1, out, done, jnp.where(done, 0, nxt), cache, key

  step, out, _, _, cache, _ = jax.lax.while_loop(
      cond, body, (jnp.int32(1), out, done, first, cache, key))
  return out, step, cache


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


def generate(model, prompts, *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, eos_token_id=None,
             seed: int = 0, max_cache_len: int | None = None, page_size: int = 64,
             prefill_chunk: int | None = None, kv: paging.KVStore | None = None
             ) -> GenerationResult:
  """Generates up to `max_new_tokens` for each prompt (a list of token-id lists).

  The KV cache is paged: `page_size` tokens per page, a prompt prefilled `prefill_chunk`
  tokens at a time (None: at once). `kv`, a paging.KVStore, keeps the cache and its prefix
  cache across calls (prompts that start with pages it has seen are not recomputed; its own
  page size applies); without one, a cache just big enough for this batch is made. Tokens are the same whatever
  page_size, prefill_chunk and kv are.
  """
  cfg = model.config
  _check_prompts(prompts, cfg.vocab_size)
  if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
  for name, value in (("prefill_chunk", prefill_chunk), ("page_size", page_size)):
    if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
      raise ValueError(f"{name} must be a positive integer, got {value!r}")
  sampler = Sampler(temperature, top_k, top_p).validate(cfg.vocab_size)
  eos = [] if eos_token_id is None else (
      [eos_token_id] if isinstance(eos_token_id, (int, np.integer)) else list(eos_token_id))
  longest = max(len(p) for p in prompts)
  need = longest + max_new_tokens
  limit = cfg.max_position_embeddings
  if cfg.sliding_window is not None:
    limit = min(limit, cfg.sliding_window)
  if max_cache_len is not None and need > max_cache_len:
    raise ValueError(f"prompt of {longest} tokens plus max_new_tokens={max_new_tokens} is "
                     f"longer than the cache ({max_cache_len} entries)")
  if need > limit:
    raise ValueError(f"prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds "
                     f"the model's context of {limit} tokens")
  if kv is None:
    pages = sum(-(-(len(p) + max_new_tokens) // page_size) for p in prompts)
    kv = paging.KVStore(cfg, pow2(pages), page_size, model.dtype)
  kv.check_for(model)

  b, bp = len(prompts), pow2(len(prompts))
  rows = []
  try:
    for p in prompts:
      rows.append(kv.pool.allocate(list(p), len(p) + max_new_tokens))
    out, steps, prefill_s, decode_s = _run(model, kv, prompts, rows, bp, max_new_tokens,
                                           sampler, eos, seed, prefill_chunk)
  except BaseException:
    for pages, _ in rows:
      kv.pool.release(pages)
    raise
  tokens = []
  for p, (pages, _), row in zip(prompts, rows, out[:b, :max_new_tokens]):
    row = row[row >= 0].tolist()
    hits = [i for i, tok in enumerate(row) if tok in eos]
    tokens.append(row[:hits[0] + 1] if hits else row)
    kv.pool.finish(pages, list(p) + tokens[-1][:-1])  # the last token's K/V is never written
  return GenerationResult(tokens=tokens, prompt_tokens=sum(len(p) for p in prompts),
                          prefill_s=prefill_s, decode_s=decode_s, decode_steps=steps - 1)


def _run(model, kv, prompts, rows, bp, max_new_tokens, sampler, eos, seed, prefill_chunk):
  """Prefill in chunks, then the decode loop, on kv's pages; (tokens [bp, out_len], steps,
  prefill seconds, decode seconds)."""
  cfg = model.config
  graphdef, state = nnx.split(model)
  impl = dispatch.current()
  table = paging.page_table([pages for pages, _ in rows], bp,
                            pow2(max(len(pages) for pages, _ in rows)))
  cached = np.zeros((bp,), np.int32)
  cached[:len(rows)] = [n_cached for _, n_cached in rows]
  todo = [list(p)[n_cached:] for p, (_, n_cached) in zip(prompts, rows)]
  chunk = prefill_chunk or pow2(max(len(t) for t in todo), 16)
  cache = kvc.KVCache(kv.k, kv.v, jnp.asarray(table), jnp.asarray(cached))
  last = jnp.zeros((bp, cfg.vocab_size), jnp.float32)

  t0 = time.perf_counter()
  for c in range(0, max(len(t) for t in todo), chunk):
    ids, n = pack([t[c:c + chunk] for t in todo], bp, chunk)
    cache, last = prefill_step(graphdef, state, jnp.asarray(ids), jnp.asarray(n), cache, last,
                               impl=impl)
  first, key = first_token(last, jax.random.key(seed), sampler=sampler)
  first.block_until_ready()
  t1 = time.perf_counter()
  out, steps, cache = decode_steps(graphdef, state, first, cache, key,
                                   jnp.asarray(eos or [-1], jnp.int32), jnp.int32(max_new_tokens),
                                   jnp.asarray(np.arange(bp) < len(prompts)), sampler=sampler,
                                   out_len=pow2(max_new_tokens), impl=impl)
  out = np.asarray(out)
  t2 = time.perf_counter()
  kv.k, kv.v = cache.k, cache.v
  return out, int(steps), t1 - t0, t2 - t1
