"""A model's device calls on a paging.KVStore's pages: the one caller of the jitted steps
(fdjax.engine.steps), for `generate` and the serving engine alike. Each call donates the
store's K/V pools and the store keeps the ones it returns."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from fdjax.engine import spec_steps, steps
from fdjax.ops import dispatch
from fdjax.ops import kv_cache as kvc


@functools.cache
def _unused_key():
  """Per-row sampling (sampling.RowSampling) keys each row on its own seed and position; the
  loop still carries a key, this one (made on first use: importing fdjax starts no JAX
  backend, so fdjax.cpu_devices can still act)."""
  return jax.random.key(0)


class Runner:

  def __init__(self, model, kv, eos: tuple[int, ...] = ()):
    self.model = model
    self.graphdef, self.state = nnx.split(model)
    self.kv, self.vocab_size = kv, model.config.vocab_size
    self.eos, self.eos_ids = eos, steps.eos_array(eos)
    # Which ops run where, as the caller has it now (dispatch.using / lowering_for).
    self.static = dict(impl=dispatch.current(), target=dispatch.lowering_target())

  def cache(self, table, lengths) -> kvc.KVCache:
    """The store's pools under a page table [rows, width] and rows' cached lengths."""
    return kvc.KVCache(self.kv.k, self.kv.v, jnp.asarray(table), jnp.asarray(lengths))

  def prefill(self, cache, ids, n, last=None, targets=None):
    """One chunk of every row's prompt (ids [rows, chunk], n [rows] of them real) into the
    cache: (the cache, each row's logits at its latest token, else `last`'s), and with
    `targets` (each position's next prompt token, -1: none) their logprobs third."""
    if last is None:
      last = jnp.zeros((ids.shape[0], self.vocab_size), jnp.float32)
    out = steps.prefill_step(self.graphdef, self.state, jnp.asarray(ids), jnp.asarray(n), cache,
                             last, None if targets is None else jnp.asarray(targets),
                             **self.static)
    self.kv.k, self.kv.v = out[0].k, out[0].v
    return out

  def first(self, last, active, max_new, *, out_len, key=None, sampler=None, rows=None,
            positions=None, tokens=None) -> steps.LoopState:
    """The loop's state after every row's first token from its prompt's `last` logits: one
    `sampler` for all rows (with `key`), or each row's own `rows` (sampling.RowSampling)
    drawing at `positions`, with `tokens` [rows, T] its prompt (-1 past the end)."""
    return steps.first_token(last, _unused_key() if key is None else key, self.eos_ids,
                             jnp.asarray(active), jnp.asarray(max_new), _device(rows),
                             None if positions is None else jnp.asarray(positions, jnp.int32),
                             None if tokens is None else jnp.asarray(tokens),
                             sampler=sampler, out_len=out_len)

  def from_tokens(self, tokens, active, max_new, *, out_len, rows=None,
                  history=None) -> steps.LoopState:
    """The loop's state for tokens already chosen (each row's latest, its K/V not cached);
    with per-row `rows`, `history` [rows, T] holds each row's tokens so far (-1 past the
    end)."""
    return steps.initial_state_jit(jnp.asarray(tokens), _unused_key(), self.eos_ids,
                                   jnp.asarray(active), jnp.asarray(max_new), _device(rows),
                                   None if history is None else jnp.asarray(history),
                                   out_len=out_len,
                                   vocab_size=None if rows is None else self.vocab_size)

  def decode(self, loop: steps.LoopState, cache, max_new, stop: int, *, sampler=None,
             rows=None):
    """Decode steps on device until `stop` tokens are out or every row is done:
    (the loop's state, the cache)."""
    loop, cache = steps.decode_steps(self.graphdef, self.state, loop, cache, self.eos_ids,
                                     jnp.asarray(max_new), jnp.int32(stop), _device(rows),
                                     sampler=sampler, **self.static)
    self.kv.k, self.kv.v = cache.k, cache.v
    return loop, cache


  def speculate(self, state, cache, max_new, stop: int, spec, *, rows, draft=None, dcache=None):
    """Speculative rounds on device (spec_steps.spec_decode) until `stop` rounds have run or
    every row is done, drafting by spec.method (with `draft`, the draft model's Runner, and
    `dcache` its cache): (the state, the cache, the draft's cache)."""
    dargs = {} if draft is None else dict(dstate=draft.state, dcache=dcache)
    state, cache, dcache = spec_steps.spec_decode(
        self.graphdef, self.state, state, cache, self.eos_ids, jnp.asarray(max_new),
        jnp.int32(stop), _device(rows), **dargs,
        dgraph=None if draft is None else draft.graphdef, k=spec.k, n=spec.n,
        min_n=spec.low, **self.static)
    self.kv.k, self.kv.v = cache.k, cache.v
    if draft is not None:
      draft.kv.k, draft.kv.v = dcache.k, dcache.v
    return state, cache, dcache


def _device(rows):
  return None if rows is None else type(rows)(*(jnp.asarray(a) for a in rows))
