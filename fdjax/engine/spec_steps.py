"""Speculative decoding on device: each round drafts up to k tokens per row (n-gram lookup in
the row's own tokens, or a draft model on its own paged cache), the target model runs every
row's latest token and its drafts, k + 1 positions, in one call through the chunked-prefill
path over the paged cache, and each row keeps the drafts it accepts plus one token of the
target's own. Rounds run inside one `lax.while_loop` (no host round trip).

Acceptance (Leviathan et al. 2023; Chen et al. 2023): a greedy row keeps a draft while it is
the target's argmax, then takes the argmax; so its tokens are exactly those of plain decoding.
A sampling row keeps draft d at position i with probability min(1, p_i(d) / q_i(d)), and at
the first rejection draws from the normalised (p_i - q_i)+, or from p_k when all k are kept
(the bonus token); its tokens then follow the target's distribution p exactly. p and q are
the distributions each row samples from: its penalties, logit bias, min_tokens' EOS ban,
grammar mask, temperature, top-k and top-p applied to the target's and the draft's logits
alike. An n-gram draft is a q with all its mass on the drafted token.

A round in which no row has a draft (n-gram found no match) is a plain decode step.

A rejected position's K/V was written but is past the row's length once it is set back, and
is overwritten by what comes next: rolling back is setting `lengths`. Pages are the row's own
up to its max_new tokens; writes past them are dropped (kv_cache.NO_PAGE).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from fdjax.engine import sampling, steps
from fdjax.ops import dispatch

_DRAFT, _ACCEPT, _RESIDUAL = 0, 1000, 1001  # key salts


class SpecState(NamedTuple):
  """What the speculative loop carries from round to round (a pytree)."""
  count: jax.Array    # int32 [B]: tokens out per row (out[b, :count[b]] written)
  out: jax.Array      # int32 [B, out_len]: each row's tokens, -1 past them
  done: jax.Array     # bool [B]
  last: jax.Array     # int32 [B]: each row's latest token, its K/V not yet cached
  seq: jax.Array      # int32 [B, S]: each row's tokens, prompt then generated (n-gram reads it)
  seq_len: jax.Array  # int32 [B]: tokens in seq (last is seq[b, seq_len[b] - 1])
  k_row: jax.Array    # int32 [B]: the most drafts each row takes a round (0: not speculating)
  drafted: jax.Array  # int32 [B]: drafts proposed to each row so far
  accepted: jax.Array  # int32 [B]: drafts each row accepted so far
  verified: jax.Array  # int32 [B]: rounds each row took part in
  rounds: jax.Array   # int32 []: rounds run
  rows: steps.RowState


def start(loop: steps.LoopState, prompts, prompt_lens, k_row, *, seq_len: int) -> SpecState:
  """The speculative state after the first token (a LoopState from steps.first_token with
  per-row sampling): prompts [B, P] (-1 past each row's prompt_lens)."""
  b = loop.out.shape[0]
  seq = jnp.full((b, seq_len), -1, jnp.int32).at[:, :prompts.shape[1]].set(prompts)
  rows_b = jnp.arange(b)
  seq = seq.at[rows_b, prompt_lens].set(loop.out[:, 0], mode="drop")
  count = jnp.where(loop.out[:, 0] >= 0, 1, 0).astype(jnp.int32)
  zeros = jnp.zeros((b,), jnp.int32)
  return SpecState(count, loop.out, loop.done, loop.last, seq, prompt_lens + count,
                   jnp.asarray(k_row, jnp.int32), zeros, zeros, zeros, jnp.int32(0), loop.rows)


start_jit = jax.jit(start, static_argnames=("seq_len",))


# ------------------------------------------------------------------------- proposers

def ngram_propose(seq, seq_len, k: int, n: int, min_n: int = 1):
  """Each row's drafts [B, k] and how many are real [B]: the tokens that followed the latest
  earlier occurrence of the row's last m tokens (the longest m from n down to min_n that has
  one), at most k and no further than the row's end."""
  b, s = seq.shape
  j = jnp.arange(s)
  cont = jnp.full((b,), -1, jnp.int32)  # where the continuation starts
  for m in range(n, min_n - 1, -1):
    suffix = jnp.take_along_axis(seq, jnp.maximum(seq_len[:, None] - m + jnp.arange(m), 0),
                                 axis=1)  # [B, m]
    windows = jnp.stack([jnp.take(seq, jnp.minimum(j + i, s - 1), axis=1) for i in range(m)],
                        axis=-1)  # [B, S, m]: the m tokens from each position
    match = (jnp.all(windows == suffix[:, None, :], axis=-1)
             & (j[None, :] + m < seq_len[:, None]) & (seq_len[:, None] > m))
    latest = jnp.max(jnp.where(match, j[None, :], -1), axis=1)
    cont = jnp.where((cont < 0) & (latest >= 0), latest + m, cont)
  count = jnp.where(cont >= 0, jnp.minimum(k, seq_len - cont), 0)
  drafts = jnp.take_along_axis(seq, jnp.clip(cont[:, None] + jnp.arange(k), 0, s - 1), axis=1)
  return jnp.where(jnp.arange(k)[None, :] < count[:, None], drafts, 0), count


def _keys(rows, position, salt):
  """One PRNG key per row for the round at `position` [B] and a purpose `salt`."""
  return jax.vmap(lambda s, p: jax.random.fold_in(jax.random.fold_in(jax.random.key(s), p),
                                                  salt))(rows.seed, position)


def _draw(x, rows, keys):
  """Tokens [B] from adjusted logits x [B, V]: each row's argmax when greedy, else drawn from
  its filtered distribution; and that distribution's log-probabilities [B, V] (an all-greedy
  batch skips the sort: its log-probabilities are x's own, which no greedy row reads)."""
  greedy = sampling.argmax(x)

  def sample(x):
    filtered = sampling.filter_rows(x, rows)
    drawn = jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)
    return (jnp.where(rows.temperature > 0, drawn, greedy),
            jax.nn.log_softmax(filtered, axis=-1))

  return jax.lax.cond(jnp.any(rows.temperature > 0), sample,
                      lambda x: (greedy, jax.nn.log_softmax(x, axis=-1)), x)


def draft_propose(dmodel, dcache, last, rows, hist, start_pos, eos, k: int):
  """k tokens per row from the draft model decoding ahead on its own cache from `last` (k + 1
  forward steps: the last writes the k-th draft's K/V, so a row that keeps all k is in step),
  drawn as each row samples: (drafts [B, k], their distributions' log-probabilities
  [B, k, V], the draft's cache)."""

  def step(carry, i):
    x, dcache, counts = carry
    logits, dcache = dmodel(x[:, None], cache=dcache)
    position = start_pos + 1 + i
    adjusted = sampling.adjust(logits[:, 0], rows, hist._replace(counts=counts), position, eos)
    token, logq = _draw(adjusted, rows, _keys(rows, start_pos, _DRAFT + i))
    counts = sampling.record(hist._replace(counts=counts), token, token >= 0).counts
    return (token, dcache, counts), (token, logq)

  (_, dcache, _), (drafts, logq) = jax.lax.scan(step, (last, dcache, hist.counts),
                                                jnp.arange(k + 1))
  return drafts[:k].T, jnp.swapaxes(logq[:k], 0, 1), dcache


# ------------------------------------------------------------------------ acceptance

class Verdict(NamedTuple):
  tokens: jax.Array   # int32 [B, k + 1]: the accepted drafts then the target's own token
  accepted: jax.Array  # int32 [B]: drafts kept (tokens holds accepted + 1)
  logprobs: sampling.Logprobs  # of each of tokens, as the target's distribution gives them


def _repeat(tree, times):
  return jax.tree.map(lambda a: None if a is None else jnp.repeat(a, times, axis=0), tree)


def accept(logits, drafts, count, logq, rows, hist, start_pos, eos) -> Verdict:
  """The verdict on every row's drafts [B, k] (count [B] of them real) from the target's
  logits [B, k + 1, V] at the row's latest token and each draft; logq [B, k, V] the draft's
  log-probabilities (None: n-gram, all mass on the draft)."""
  b, t, v = logits.shape
  k = t - 1
  prev = jnp.concatenate([jnp.zeros((b, 1, v), jnp.int32),
                          jnp.cumsum(jax.nn.one_hot(drafts, v, dtype=jnp.int32), axis=1)], 1)
  reps = _repeat(rows, t)
  position = (start_pos[:, None] + 1 + jnp.arange(t)).reshape(-1)
  hist_t = sampling.History((hist.counts[:, None] + prev).reshape(b * t, v),
                            jnp.repeat(hist.prompt, t, axis=0))
  x = sampling.adjust(logits.reshape(b * t, v), reps, hist_t, position, eos)
  greedy = sampling.argmax(x).reshape(b, t)
  real = jnp.arange(k)[None, :] < count[:, None]
  greedy_ok = (drafts == greedy[:, :k]) & real
  kept = lambda ok: jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)

  def sample(x):
    """(accepted drafts, the token after them) of every row as sampling rows take them."""
    logp = jax.nn.log_softmax(sampling.filter_rows(x, reps), axis=-1).reshape(b, t, v)
    p_d = jnp.take_along_axis(logp[:, :k], drafts[..., None], axis=-1)[..., 0]
    q_d = 0.0 if logq is None else jnp.take_along_axis(logq, drafts[..., None], axis=-1)[..., 0]
    u = jax.vmap(lambda key: jax.random.uniform(key, (k,)))(_keys(rows, start_pos, _ACCEPT))
    ok = jnp.where((rows.temperature > 0)[:, None], jnp.log(u) < p_d - q_d, greedy_ok) & real
    a = kept(ok)
    # The token after the accepted run: from (p - q)+ at a rejection, from p after all drafts.
    p_a = jnp.exp(jnp.take_along_axis(logp, a[:, None, None], axis=1)[:, 0])
    at = jnp.minimum(a, k - 1)
    if logq is None:
      q_a = jax.nn.one_hot(jnp.take_along_axis(drafts, at[:, None], 1)[:, 0], v,
                           dtype=p_a.dtype)
    else:
      q_a = jnp.exp(jnp.take_along_axis(logq, at[:, None, None], axis=1)[:, 0])
    residual = jnp.where((a < count)[:, None], jnp.maximum(p_a - q_a, 0.0), p_a)
    residual = jnp.where(jnp.sum(residual, -1, keepdims=True) > 0, residual, p_a)
    drawn = jax.vmap(jax.random.categorical)(_keys(rows, start_pos, _RESIDUAL),
                                             jnp.log(residual)).astype(jnp.int32)
    return a, drawn

  # an all-greedy batch skips the sorts and draws
  a, drawn = jax.lax.cond(jnp.any(rows.temperature > 0), sample,
                          lambda x: (kept(greedy_ok), jnp.zeros((b,), jnp.int32)), x)
  last = jnp.where(rows.temperature > 0, drawn,
                   jnp.take_along_axis(greedy, a[:, None], axis=1)[:, 0])
  j = jnp.arange(t)[None, :]
  padded = jnp.concatenate([drafts, jnp.zeros((b, 1), jnp.int32)], axis=1)
  tokens = jnp.where(j < a[:, None], padded, jnp.where(j == a[:, None], last[:, None], -1))
  lp = sampling.logprobs(x, reps, jnp.maximum(tokens, 0).reshape(-1),
                         raw=logits.reshape(b * t, v))
  lp = jax.tree.map(lambda y: y.reshape(b, t, *y.shape[1:]), lp)
  return Verdict(tokens, a, lp)


# ---------------------------------------------------------------------------- the loop

def _scatter(buffer, count, values, keep):
  """buffer [B, L, ...] with values [B, T, ...] written at count[b] + j where keep[b, j]."""
  b, t = keep.shape
  at = jnp.where(keep, count[:, None] + jnp.arange(t)[None, :], buffer.shape[1])
  return buffer.at[jnp.arange(b)[:, None], at].set(values.astype(buffer.dtype), mode="drop")


def _round(model, dmodel, s: SpecState, cache, dcache, eos, max_new, rows, k, n, min_n):
  start_pos = cache.lengths
  live = ~s.done
  hist = s.rows.history
  if dmodel is None:
    drafts, count = ngram_propose(s.seq, s.seq_len, k, n, min_n)
    logq = None
  else:
    dcache = dcache._replace(lengths=start_pos)
    drafts, logq, dcache = draft_propose(dmodel, dcache, s.last, rows, hist, start_pos, eos, k)
    count = jnp.full_like(s.count, k)
  count = jnp.where(live, jnp.minimum(count, s.k_row), 0)
  ids = jnp.concatenate([s.last[:, None], drafts], axis=1)

  def verify(cache):
    return model(ids, cache=cache, lengths=jnp.where(live, k + 1, 0))

  def step(cache):  # no row has a draft: a plain decode step (its logits at position 0)
    logits, cache = model(ids[:, :1], cache=cache)
    return jnp.pad(logits, ((0, 0), (0, k), (0, 0))), cache

  logits, cache = jax.lax.cond(jnp.any(count > 0), verify, step, cache)
  verdict = accept(logits, drafts, count, logq, rows, hist, start_pos, eos)

  got = verdict.accepted + 1  # tokens the round yields each row
  j = jnp.arange(k + 1)[None, :]
  within = j < got[:, None]
  ends = jnp.isin(verdict.tokens, eos) & ~rows.ignore_eos[:, None] & within
  first_end = jnp.min(jnp.where(ends, j, k + 1), axis=1)
  n_out = jnp.minimum(jnp.minimum(got, first_end + 1), max_new - s.count)
  n_out = jnp.where(live, n_out, 0)
  keep = j < n_out[:, None]
  done = s.done | jnp.any(ends & keep, axis=1) | (s.count + n_out >= max_new)
  tokens = verdict.tokens
  newest = jnp.take_along_axis(tokens, jnp.maximum(n_out - 1, 0)[:, None], axis=1)[:, 0]

  row_state = s.rows._replace(history=sampling.record(hist, jnp.maximum(tokens, 0), keep))
  lp = verdict.logprobs
  row_state = row_state._replace(logprob=_scatter(row_state.logprob, s.count, lp.chosen, keep),
                                 top_ids=_scatter(row_state.top_ids, s.count, lp.top_ids, keep),
                                 top=_scatter(row_state.top, s.count, lp.top, keep))
  cache = cache._replace(lengths=jnp.where(live, start_pos + got, start_pos))
  if dcache is not None:
    dcache = dcache._replace(lengths=cache.lengths)
  used = jnp.minimum(verdict.accepted, n_out)
  return SpecState(s.count + n_out, _scatter(s.out, s.count, tokens, keep), done,
                   jnp.where(done, 0, newest), _scatter(s.seq, s.seq_len, tokens, keep),
                   s.seq_len + n_out, s.k_row, s.drafted + count,
                   s.accepted + jnp.where(live, used, 0), s.verified + live.astype(jnp.int32),
                   s.rounds + 1, row_state), cache, dcache


@functools.partial(jax.jit, static_argnames=("graphdef", "dgraph", "k", "n", "min_n", "impl",
                                             "target"),
                   donate_argnums=(3, 9))
def spec_decode(graphdef, state, s: SpecState, cache, eos, max_new, stop, rows, dstate=None,
                dcache=None, *, dgraph=None, k: int, n: int = 3, min_n: int = 3, impl,
                target=None):
  """Speculative rounds on device from `s` until `stop` rounds have run or every row is done
  (at EOS or its max_new tokens: a scalar or one per row); each row samples as `rows`
  (sampling.RowSampling) says. Drafts by n-gram lookup (n) or, with `dgraph` / `dstate` /
  `dcache`, by the draft model. Returns (the state, the cache, the draft's cache)."""
  steps.TRACE_COUNT["spec"] += 1
  model = nnx.merge(graphdef, state)
  dmodel = None if dgraph is None else nnx.merge(dgraph, dstate)

  def cond(carry):
    s = carry[0]
    return (s.rounds < stop) & ~jnp.all(s.done)

  def body(carry):
    s, cache, dcache = carry
    with dispatch.using(impl), dispatch.lowering_for(target):
      return _round(model, dmodel, s, cache, dcache, eos, max_new, rows, k, n, min_n)

  return jax.lax.while_loop(cond, body, (s, cache, dcache))
