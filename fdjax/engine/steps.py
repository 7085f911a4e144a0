"""The jitted steps every driver runs (generate's loop and the serving engine alike), the
state the decode loop carries, and the rules both size their calls by.

- `prefill_step`: one chunk of every row's prompt into the paged cache.
- `first_token`: every row's first new token from its prompt's last logits.
- `initial_state`: the loop's state for tokens already chosen (a served request's latest).
- per-row sampling (served requests, sampling.RowSampling): each row's own settings,
  penalties and logit bias, and its logprobs recorded on device (`RowState`).
- `decode_steps`: decode steps on device in one `lax.while_loop` until a step count or
  every row is done.

Shapes are bucketed (rows and page-table widths to powers of two, prefill chunks by
`chunk_bucket`) so calls of similar size reuse the compiled code; `TRACE_COUNT` counts the
traces.
"""
from __future__ import annotations

import collections
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fdjax.engine import sampling
from fdjax.engine.sampling import sample, sample_rows
from fdjax.ops import checks, dispatch

# How many times each jitted function was traced (tests use it to check that bucketing
# avoids recompiles).
TRACE_COUNT: collections.Counter = collections.Counter()
MIN_CHUNK = 16  # the shortest prefill chunk compiled
FINE_CHUNK = 256  # longer chunks grow by quarters of an octave, not doublings


class LoopState(NamedTuple):
  """What the decode loop carries from step to step (a pytree)."""
  step: jax.Array   # int32 []: tokens out so far per row (out[:, :step] written)
  out: jax.Array    # int32 [B, out_len]: each row's tokens, -1 after it is done
  done: jax.Array   # bool [B]: at EOS, at its max_new tokens, or not an active row
  last: jax.Array   # int32 [B]: each row's latest token, the next step's input (0 when done)
  key: jax.Array    # the PRNG key of the next step
  rows: "RowState | None" = None  # per-row sampling's state (served requests), else None


class RowState(NamedTuple):
  """What per-row sampling carries: the tokens the penalties count, and the logprobs of
  every token out (logprob [B, out_len], top_ids / top [B, out_len, K]; zeros unless some
  row asks for them)."""
  history: sampling.History
  logprob: jax.Array
  top_ids: jax.Array
  top: jax.Array

  @classmethod
  def start(cls, history, out_len: int) -> "RowState":
    b, v = history.counts.shape
    k = sampling.top_width(v)
    return cls(history, jnp.zeros((b, out_len), jnp.float32),
               jnp.zeros((b, out_len, k), jnp.int32), jnp.zeros((b, out_len, k), jnp.float32))

  def put(self, step, lp: sampling.Logprobs) -> "RowState":
    return self._replace(logprob=self.logprob.at[:, step].set(lp.chosen),
                         top_ids=self.top_ids.at[:, step].set(lp.top_ids),
                         top=self.top.at[:, step].set(lp.top))


# ----------------------------------------------------------------------------- the rules

def pow2(n: int, minimum: int = 1) -> int:
  """The bucket of a count: the next power of two, at least `minimum`."""
  return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def table_width(tokens: int, page_size: int) -> int:
  """The page-table width (entries per row) for rows reaching `tokens` tokens."""
  return pow2(checks.cdiv(tokens, page_size))


def chunk_bucket(tokens: int, cap: int) -> int:
  """The prefill chunk for pieces of up to `tokens` prompt tokens, at most `cap`: the next
  power of two from MIN_CHUNK up to FINE_CHUNK, then the next quarter of an octave (320,
  384, 448, 512, 640, ...), so a long prompt pads by at most a quarter, not almost double.
  A chunk's linears and queries cost in proportion to its length: a 1100-token prompt took
  433 ms to its first token in a chunk of 2048 and 1024 tokens 187 ms (58.5M Llama,
  bfloat16, 2-core Xeon). Three more programs an octave, compiled as generate meets them;
  the serving engine's chunks (128 by default) stay powers of two."""
  bucket = pow2(tokens, MIN_CHUNK)
  if bucket > FINE_CHUNK:
    half, quarter = bucket // 2, bucket // 8
    bucket = half + -(-(tokens - half) // quarter) * quarter
  return min(cap, bucket)


def chunk_buckets(cap: int) -> list[int]:
  """Every chunk chunk_bucket gives under `cap` (the serving engine compiles them all)."""
  return sorted({chunk_bucket(t, cap) for t in range(1, cap + 1)})


def eos_ids(value) -> tuple[int, ...]:
  """An EOS setting (None, one id, or several) as a sorted tuple of ids; ValueError for
  anything else (a string such as a tokenizer's eos_token is not an id)."""
  if value is None:
    return ()
  is_id = lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, bool)
  values = [value] if is_id(value) else list(value) if isinstance(
      value, (list, tuple, np.ndarray)) else None
  if values is None or not all(is_id(v) for v in values):
    raise ValueError(f"eos_token_id must be a token id or a list of token ids, got "
                     f"{value!r:.60}")
  return tuple(sorted({int(v) for v in values}))


def eos_array(eos: tuple[int, ...]) -> jax.Array:
  """The ids the loop stops at (-1, which no token is, when there are none)."""
  return jnp.asarray(eos or (-1,), jnp.int32)


def until_eos(tokens: list[int], eos: tuple[int, ...]) -> list[int]:
  """A row's tokens up to and including its first EOS."""
  for i, t in enumerate(tokens):
    if t in eos:
      return tokens[:i + 1]
  return tokens


def to_host(x) -> np.ndarray:
  """A device array's value on the host; one spanning other processes' devices too (a
  multi-host mesh) is gathered from them."""
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def check_prompts(prompts, vocab_size: int):
  """ValueError naming the prompt at fault unless `prompts` is a non-empty list of non-empty
  flat lists of token ids in [0, vocab_size) (generate's and embed's rule)."""
  if not isinstance(prompts, (list, tuple)) or not prompts:
    got = "an empty list" if isinstance(prompts, (list, tuple)) else type(prompts).__name__
    raise ValueError(f"prompts must be a non-empty list of token-id lists, got {got}")
  for i, p in enumerate(prompts):
    if not isinstance(p, (list, tuple, np.ndarray)):
      raise ValueError(f"prompts must be a list of token-id lists (one list per prompt); "
                       f"prompt {i} is {type(p).__name__} {p!r:.40}: wrap a single prompt as "
                       f"[ids]")
    if len(p) == 0:
      raise ValueError(f"prompt {i} is empty")
    arr = np.asarray(p)
    if not np.issubdtype(arr.dtype, np.integer) or arr.ndim != 1:
      raise ValueError(f"prompt {i} must be a flat list of integer token ids")
    bad = arr[(arr < 0) | (arr >= vocab_size)]
    if bad.size:
      raise ValueError(f"prompt {i} has token id {int(bad[0])} outside the vocabulary "
                       f"[0, {vocab_size})")


def pack(pieces, rows: int, width: int, fill: int = 0):
  """Ragged token lists as (ids [rows, width] int32, right-padded with `fill`; n [rows], each
  list's length; rows past the lists are empty)."""
  ids = np.full((rows, width), fill, np.int32)
  n = np.zeros((rows,), np.int32)
  for i, piece in enumerate(pieces):
    ids[i, :len(piece)] = piece
    n[i] = len(piece)
  return ids, n


# ---------------------------------------------------------------------------- the steps

@functools.partial(jax.jit, static_argnames=("graphdef", "impl", "target"),
                   donate_argnums=(4, 5))
def prefill_step(graphdef, state, ids, n, cache, last, targets=None, *, impl, target=None):
  """One chunk of every row's prompt (row b: its first n[b] tokens of ids) into the cache;
  `last` keeps each row's logits at its latest token. With `targets` [rows, chunk] (the
  prompt's next token at each position, -1 where there is none) it also returns the
  logprobs of those tokens (sampling.prompt_logprobs), from the logits of every position."""
  TRACE_COUNT["prefill" if targets is None else "prefill_logprobs"] += 1
  model = nnx.merge(graphdef, state)
  with dispatch.using(impl), dispatch.lowering_for(target):
    logits, cache = model(ids, cache=cache, lengths=n, last_only=targets is None)
  if targets is None:
    return cache, jnp.where((n > 0)[:, None], logits[:, 0], last)
  at_last = logits[jnp.arange(ids.shape[0]), jnp.maximum(n - 1, 0)]
  return (cache, jnp.where((n > 0)[:, None], at_last, last),
          sampling.prompt_logprobs(logits, targets))


def _pick(logits, key, sampler, rows, positions, history, eos):
  """The next token of every row: one static Sampler for all, or each row's own (rows, a
  sampling.RowSampling, drawing the token at positions[b] from its adjusted logits); the
  second is its logprobs then (None with a Sampler)."""
  if rows is None:
    return sample(logits, key, sampler), None
  x = sampling.adjust(logits, rows, history, positions, eos)
  token = sample_rows(x, rows, positions)
  return token, sampling.logprobs(x, rows, token, raw=logits)


def _ends(token, eos, rows):
  """Whether each row's token ends it (EOS, unless the row ignores EOS)."""
  hit = jnp.isin(token, eos)
  return hit if rows is None else hit & ~rows.ignore_eos


def initial_state(first, key, eos, active, max_new, rows=None, tokens=None, *, out_len,
                  vocab_size=None) -> LoopState:
  """The loop's state after each row's token `first` (its K/V not yet in the cache), out[:, 0]
  = first. A row is done from the start when not `active`, at EOS, or when max_new (a scalar
  or one per row, `first` counted) is 1. With per-row `rows` (sampling.RowSampling), `tokens`
  [B, T] are each row's tokens so far, `first` the last of them (-1 past the end): what its
  penalties count."""
  out = jnp.full((first.shape[0], out_len), -1, jnp.int32).at[:, 0].set(first)
  done = ~active | _ends(first, eos, rows) | (max_new <= 1)
  row_state = None
  if rows is not None:
    row_state = RowState.start(sampling.history(tokens, rows, vocab_size), out_len)
  return LoopState(jnp.int32(1), out, done, first, key, row_state)


initial_state_jit = jax.jit(initial_state, static_argnames=("out_len", "vocab_size"))


@functools.partial(jax.jit, static_argnames=("sampler", "out_len"))
def first_token(logits, key, eos, active, max_new, rows=None, positions=None, tokens=None, *,
                sampler=None, out_len) -> LoopState:
  """Every row's first new token, from its prompt's last logits: one `sampler` for all, or
  each row's own `rows` drawing at `positions`, `tokens` [B, T] its prompt (-1 past the end),
  what its penalties count. The decode loop's starting state."""
  TRACE_COUNT["first"] += 1
  key, sub = jax.random.split(key)
  vocab = logits.shape[-1]
  history = None if rows is None else sampling.history(tokens, rows, vocab)
  first, lp = _pick(logits, sub, sampler, rows, positions, history, eos)
  loop = initial_state(first, key, eos, active, max_new, rows, tokens, out_len=out_len,
                       vocab_size=vocab)
  if rows is None:
    return loop
  return loop._replace(rows=RowState.start(sampling.record(history, first, active),
                                           out_len).put(0, lp))


@functools.partial(jax.jit, static_argnames=("graphdef", "sampler", "impl", "target"),
                   donate_argnums=(3,))
def decode_steps(graphdef, state, loop: LoopState, cache, eos, max_new, stop, rows=None, *,
                 sampler=None, impl, target=None):
  """Decode steps on device from `loop` until `stop` tokens are out or every row is done (at
  EOS or its max_new tokens: a scalar or one per row); one `sampler` for all rows, or each
  row's own `rows` (sampling.RowSampling, with loop.rows its state). Returns the state to go
  on from and the cache."""
  TRACE_COUNT["decode"] += 1
  model = nnx.merge(graphdef, state)

  def cond(carry):
    loop, _ = carry
    return (loop.step < stop) & ~jnp.all(loop.done)

  def body(carry):
    loop, cache = carry
    with dispatch.using(impl), dispatch.lowering_for(target):
      logits, cache = model(loop.last[:, None], cache=cache)
    key, sub = jax.random.split(loop.key)
    nxt, lp = _pick(logits[:, 0], sub, sampler, rows, cache.lengths,
                    None if rows is None else loop.rows.history, eos)
    out = loop.out.at[:, loop.step].set(jnp.where(loop.done, -1, nxt))
    done = loop.done | _ends(nxt, eos, rows) | (loop.step + 1 >= max_new)
    row_state = loop.rows
    if rows is not None:
      row_state = row_state._replace(
          history=sampling.record(row_state.history, nxt, ~loop.done)).put(loop.step, lp)
    return LoopState(loop.step + 1, out, done, jnp.where(done, 0, nxt), key, row_state), cache

  return jax.lax.while_loop(cond, body, (loop, cache))
