"""The jitted steps every driver runs (generate's loop and the serving engine alike), the
state the decode loop carries, and the rules both size their calls by.

- `prefill_step`: one chunk of every row's prompt into the paged cache.
- `first_token`: every row's first new token from its prompt's last logits.
- `initial_state`: the loop's state for tokens already chosen (a served request's latest).
- `decode_steps`: decode steps on device in one `lax.while_loop` until a step count or
  every row is done.

Shapes are bucketed to powers of two (rows, prefill chunks from MIN_CHUNK, page-table
widths) so calls of similar size reuse the compiled code; `TRACE_COUNT` counts the traces.
"""
from __future__ import annotations

import collections
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fdjax.engine.sampling import sample, sample_rows
from fdjax.ops import checks, dispatch

# How many times each jitted function was traced (tests use it to check that bucketing
# avoids recompiles).
TRACE_COUNT: collections.Counter = collections.Counter()
MIN_CHUNK = 16  # the shortest prefill chunk compiled


class LoopState(NamedTuple):
  """What the decode loop carries from step to step (a pytree)."""
  step: jax.Array   # int32 []: tokens out so far per row (out[:, :step] written)
  out: jax.Array    # int32 [B, out_len]: each row's tokens, -1 after it is done
  done: jax.Array   # bool [B]: at EOS, at its max_new tokens, or not an active row
  last: jax.Array   # int32 [B]: each row's latest token, the next step's input (0 when done)
  key: jax.Array    # the PRNG key of the next step


# ----------------------------------------------------------------------------- the rules

def pow2(n: int, minimum: int = 1) -> int:
  """The bucket of a count: the next power of two, at least `minimum`."""
  return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def table_width(tokens: int, page_size: int) -> int:
  """The page-table width (entries per row) for rows reaching `tokens` tokens."""
  return pow2(checks.cdiv(tokens, page_size))


def chunk_bucket(tokens: int, cap: int) -> int:
  """The prefill chunk for pieces of up to `tokens` prompt tokens, at most `cap`."""
  return min(cap, pow2(tokens, MIN_CHUNK))


def eos_ids(value) -> tuple[int, ...]:
  """An EOS setting (None, one id, or several) as a sorted tuple of ids."""
  if value is None:
    return ()
  values = [value] if isinstance(value, (int, np.integer)) else list(value)
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


def pack(pieces, rows: int, width: int):
  """Ragged token lists as (ids [rows, width] int32, right-padded with 0; n [rows], each
  list's length; rows past the lists are empty)."""
  ids = np.zeros((rows, width), np.int32)
  n = np.zeros((rows,), np.int32)
  for i, piece in enumerate(pieces):
    ids[i, :len(piece)] = piece
    n[i] = len(piece)
  return ids, n


# ---------------------------------------------------------------------------- the steps

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


def initial_state(first, key, eos, active, max_new, *, out_len) -> LoopState:
  """The loop's state after each row's token `first` (its K/V not yet in the cache), out[:, 0]
  = first. A row is done from the start when not `active`, at EOS, or when max_new (a scalar
  or one per row, `first` counted) is 1."""
  out = jnp.full((first.shape[0], out_len), -1, jnp.int32).at[:, 0].set(first)
  done = ~active | jnp.isin(first, eos) | (max_new <= 1)
  return LoopState(jnp.int32(1), out, done, first, key)


initial_state_jit = jax.jit(initial_state, static_argnames=("out_len",))


@functools.partial(jax.jit, static_argnames=("sampler", "out_len"))
def first_token(logits, key, eos, active, max_new, rows=None, positions=None, *,
                sampler=None, out_len) -> LoopState:
  """Every row's first new token, from its prompt's last logits (one `sampler` for all, or
  each row's own `rows` drawing at `positions`): the decode loop's starting state."""
  TRACE_COUNT["first"] += 1
  key, sub = jax.random.split(key)
  return initial_state(_pick(logits, sub, sampler, rows, positions), key, eos, active,
                       max_new, out_len=out_len)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampler", "impl", "target"),
                   donate_argnums=(3,))
def decode_steps(graphdef, state, loop: LoopState, cache, eos, max_new, stop, rows=None, *,
                 sampler=None, impl, target=None):
  """Decode steps on device from `loop` until `stop` tokens are out or every row is done (at
  EOS or its max_new tokens: a scalar or one per row); one `sampler` for all rows, or each
  row's own `rows` (sampling.RowSampling). Returns the state to go on from and the cache."""
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
    nxt = _pick(logits[:, 0], sub, sampler, rows, cache.lengths)
    out = loop.out.at[:, loop.step].set(jnp.where(loop.done, -1, nxt))
    done = loop.done | jnp.isin(nxt, eos) | (loop.step + 1 >= max_new)
    return LoopState(loop.step + 1, out, done, jnp.where(done, 0, nxt), key), cache

  return jax.lax.while_loop(cond, body, (loop, cache))
