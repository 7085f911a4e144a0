"""The jitted decode loop: one prefill, then every decode step on device inside one
`lax.while_loop` (no host round trip per token), for a ragged batch of prompts.

Shapes are bucketed (batch and prompt length to powers of two, the cache to a multiple of
64, the output buffer to a power of two) so calls of similar size reuse the compiled code.
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

from fdjax import dispatch
from fdjax import kv_cache as kvc
from fdjax.sampling import Sampler, sample

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


def _pow2(n: int, minimum: int = 1) -> int:
  return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


@functools.partial(jax.jit, static_argnames=("graphdef", "sampler", "cache_len", "impl",
                                             "target"))
def _prefill(graphdef, state, ids, lengths, key, *, sampler, cache_len, impl, target):
  TRACE_COUNT["prefill"] += 1
  model = nnx.merge(graphdef, state)
  cache = kvc.init_cache(model.config, ids.shape[0], cache_len, model.dtype)
  with dispatch.using(impl), dispatch.lowering_for(target):
    logits, cache = model(ids, cache=cache, lengths=lengths, last_only=True)
  key, sub = jax.random.split(key)
  return sample(logits[:, 0], sub, sampler), cache, key


# No donation: the cache is consumed by the loop, whose carry XLA updates in place.
@functools.partial(jax.jit, static_argnames=("graphdef", "sampler", "out_len", "impl",
                                             "target"))
def _decode(graphdef, state, first, cache, key, eos_ids, max_new, active, *, sampler, out_len,
            impl, target):
  TRACE_COUNT["decode"] += 1
  model = nnx.merge(graphdef, state)
  b = first.shape[0]
  out = jnp.full((b, out_len), -1, jnp.int32).at[:, 0].set(first)
  done = ~active | jnp.isin(first, eos_ids)

  def cond(carry):
    step, _, done, _, _, _ = carry
    return (step < max_new) & ~jnp.all(done)

  def body(carry):
    step, out, done, tok, cache, key = carry
    with dispatch.using(impl), dispatch.lowering_for(target):
      logits, cache = model(tok[:, None], cache=cache)
    key, sub = jax.random.split(key)
    nxt = sample(logits[:, 0], sub, sampler)
    out = out.at[:, step].set(jnp.where(done, -1, nxt))
    done = done | jnp.isin(nxt, eos_ids)
    return step + 1, out, done, jnp.where(done, 0, nxt), cache, key

  step, out, *_ = jax.lax.while_loop(cond, body, (jnp.int32(1), out, done, first, cache, key))
  return out, step


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
  prompt: int     # prompt tokens per row
  cache: int      # KV-cache entries per row
  out: int        # output buffer per row, a power of two


def buckets(cfg, batch: int, longest: int, max_new_tokens: int,
            max_cache_len: int | None = None) -> Buckets:
  """The shapes for `batch` prompts of up to `longest` tokens and `max_new_tokens` more,
  refusing (ValueError) what exceeds the cache or the model's context."""
  if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
  need = longest + max_new_tokens
  limit = cfg.max_position_embeddings
  if cfg.sliding_window is not None:
    limit = min(limit, cfg.sliding_window)
  if max_cache_len is not None:
    if need > max_cache_len:
      raise ValueError(f"prompt of {longest} tokens plus max_new_tokens={max_new_tokens} is "
                       f"longer than the cache ({max_cache_len} entries)")
    limit = min(limit, max_cache_len)
  if need > limit:
    raise ValueError(f"prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds "
                     f"the model's context of {limit} tokens")
  cache_len = max_cache_len or min(_round_up(need, 64), limit)
  return Buckets(batch=_pow2(batch), prompt=min(_pow2(longest, 16), cache_len), cache=cache_len,
                 out=_pow2(max_new_tokens))


def generate(model, prompts, *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, eos_token_id=None,
             seed: int = 0, max_cache_len: int | None = None) -> GenerationResult:
  """Generates up to `max_new_tokens` for each prompt (a list of token-id lists)."""
  cfg = model.config
  _check_prompts(prompts, cfg.vocab_size)
  shapes = buckets(cfg, len(prompts), max(len(p) for p in prompts), max_new_tokens,
                   max_cache_len)
  sampler = Sampler(temperature, top_k, top_p).validate(cfg.vocab_size)
  eos = [] if eos_token_id is None else (
      [eos_token_id] if isinstance(eos_token_id, (int, np.integer)) else list(eos_token_id))

  b, bp = len(prompts), shapes.batch
  ids = np.zeros((bp, shapes.prompt), np.int32)
  lengths = np.ones((bp,), np.int32)
  for i, p in enumerate(prompts):
    ids[i, :len(p)] = p
    lengths[i] = len(p)
  active = np.arange(bp) < b
  graphdef, state = nnx.split(model)
  static = dict(sampler=sampler, impl=dispatch.current(), target=dispatch.lowering_target())

  t0 = time.perf_counter()
  first, cache, key = _prefill(graphdef, state, jnp.asarray(ids), jnp.asarray(lengths),
                               jax.random.key(seed), cache_len=shapes.cache, **static)
  first.block_until_ready()
  t1 = time.perf_counter()
  out, steps = _decode(graphdef, state, first, cache, key,
                       jnp.asarray(eos or [-1], jnp.int32), jnp.int32(max_new_tokens),
                       jnp.asarray(active), out_len=shapes.out, **static)
  out = np.asarray(out)
  t2 = time.perf_counter()

  tokens = []
  for row in out[:b, :max_new_tokens]:
    row = row[row >= 0].tolist()
    hits = [i for i, tok in enumerate(row) if tok in eos]
    tokens.append(row[:hits[0] + 1] if hits else row)
  return GenerationResult(tokens=tokens, prompt_tokens=sum(len(p) for p in prompts),
                          prefill_s=t1 - t0, decode_s=t2 - t1, decode_steps=int(steps) - 1)


def lower(model, *, batch: int, prompt_len: int, max_new_tokens: int, place=None,
          temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
          max_cache_len: int | None = None):
  """The prefill and the decode loop `generate` compiles for `batch` prompts of up to
  `prompt_len` tokens, lowered (not run) on abstract inputs: (prefill, decode) `Lowered`s.

  `model` may be abstract (`nnx.eval_shape(lambda: Transformer(...))`: no weight is
  materialised); `place(shape, dtype)` makes each abstract input (a ShapeDtypeStruct with a
  sharding, e.g. fdjax.aot.abstract for a described GPU); default: no sharding."""
  place = place or jax.ShapeDtypeStruct
  cfg = model.config
  shapes = buckets(cfg, batch, prompt_len, max_new_tokens, max_cache_len)
  graphdef, state = nnx.split(model)
  like = lambda tree: jax.tree.map(lambda a: place(a.shape, a.dtype), tree)
  static = dict(sampler=Sampler(temperature, top_k, top_p).validate(cfg.vocab_size),
                impl=dispatch.current(), target=dispatch.lowering_target())
  rows = place((shapes.batch,), jnp.int32)
  prefill_args = (like(state), place((shapes.batch, shapes.prompt), jnp.int32), rows,
                  like(jax.eval_shape(lambda: jax.random.key(0))))
  prefill = _prefill.lower(graphdef, *prefill_args, cache_len=shapes.cache, **static)
  first, cache, key = like(jax.eval_shape(
      functools.partial(_prefill, graphdef, cache_len=shapes.cache, **static), *prefill_args))
  decode = _decode.lower(graphdef, like(state), first, cache, key, place((1,), jnp.int32),
                         place((), jnp.int32), place((shapes.batch,), jnp.bool_),
                         out_len=shapes.out, **static)
  return prefill, decode
