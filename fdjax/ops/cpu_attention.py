"""Prefill attention as XLA:CPU runs it fastest (the form fdjax.ops.selection.cpu_prefill
picks): FlashDecoding++'s asynchronous softmax over blocks of keys, in plain XLA.

The reference (fdjax.ops.reference.prefill_attention) builds every score of a batch at once,
[B, Hkv, G, T, S] in float32, and passes over it five times (mask, max, exp, sum, divide):
tens of megabytes that leave the caches, and XLA:CPU's row reductions run at ~2 G values/s.
Here each row's queries go in blocks of `block_q` (lax.map over row x block), and each block
walks the keys in blocks of `block_k` (a fori_loop), so a block's scores stay in the cache:

* Keys a block cannot see are never read: the loop runs only over the key blocks from the
  block's first visible key (its sliding window) to its last (causality and the row's
  length), so a causal prompt costs half its square and a short row of a padded batch only
  its own length. Key blocks every query of the block sees whole run unmasked.
* Queries at or past their row's length are a chunk's padding (a prompt padded to its
  bucket): they get zeros, and a block of nothing else is skipped. (The reference attends
  them to the row's keys; no caller reads them, and a padded query attends to every key.
  CoPE's form computes them as its reference does.)
* No running max. With the layer's unified max value phi (async_softmax.DEFAULT_PHI unless
  calibrated), each key block adds exp(s - phi) @ V and the sum of exp(s - phi) to the
  block's accumulators: no max-reduction, no rescaling, the paper's asynchronous softmax.
  The weights meet V in the input's dtype (bfloat16 weights, as FlashAttention and
  PyTorch's CPU kernel take them), accumulated in float32.
* The guard. A row is exact while its largest score m stays in [phi + LO, phi + HI]
  (pallas_kernels/common/async_softmax.py). The row's sum l of n visible weights bounds it
  without a max: exp(m - phi) <= l <= n exp(m - phi), so l in [n exp(LO), exp(HI)] with a
  finite output proves the window. A block with a row outside it is recomputed with the
  online softmax (running max), under lax.cond: free on the CPU when no row is flagged.

CoPE (cope_attention) runs in the same blocks: a query's position for a key sums the gates
from that key to the query, so each block walks its keys from the last one it sees down,
carrying each row's sum of the gates passed, and interpolates the block's position logits
q . e once computed.

Gradients are the reference's (a custom VJP that differentiates the reference): training
takes this forward pass and the reference's backward one.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from fdjax.ops import reference
from pallas_kernels.common import async_softmax

BLOCK_Q = 128
BLOCK_K = 128


def _layout(q, keys, lengths, q_start, block_q, block_k):
  """The blocks: q as [B, nq, Hkv, G * bq, D] (a block's rows query-major within each query
  head), each of `keys` ([B, S, Hkv, width]) as [B, Hkv, nk * bk, width], padded to whole
  blocks; lengths and q_start as int32 (None: S and S - T); (bq, bk)."""
  b, t, hq, d = q.shape
  s, hkv = keys[0].shape[1], keys[0].shape[2]
  bq, bk = _even(t, block_q), min(block_k, s)
  nq, nk = -(-t // bq), -(-s // bk)
  qb = jnp.pad(q, ((0, 0), (0, nq * bq - t), (0, 0), (0, 0)))
  qb = qb.reshape(b, nq, bq, hkv, hq // hkv, d).transpose(0, 1, 3, 4, 2, 5)
  qb = qb.reshape(b, nq, hkv, hq // hkv * bq, d)
  keys = [jnp.pad(x, ((0, 0), (0, nk * bk - s), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
          for x in keys]
  lengths = jnp.full((b,), s, jnp.int32) if lengths is None else lengths.astype(jnp.int32)
  q_start = (jnp.full((b,), s - t, jnp.int32) if q_start is None
             else q_start.astype(jnp.int32))
  return qb, keys, lengths, q_start, bq, bk


def _even(t, block):
  """Blocks of at most `block` (but at least 8) rows that cut t into even parts, a multiple
  of 8 each where t allows: 160 queries in blocks of 128 are two of 80, not 128 + 32 padded
  to 128."""
  if t <= block:
    return t
  rows = -(-t // -(-t // block))  # t over the fewest blocks, rounded up
  return min(block, -(-rows // 8) * 8)


def _each_block(block, q, qb, bq):
  """block(row, query block) -> [Hkv, G * bq, D] over every block (lax.map: one at a time,
  so its scores stay in the cache), as [B, T, Hq, D] in q's dtype."""
  b, t, hq, d = q.shape
  nq, hkv = qb.shape[1], qb.shape[2]
  out = lax.map(lambda ri: block(*ri), (jnp.repeat(jnp.arange(b), nq),
                                        jnp.tile(jnp.arange(nq), b)))
  out = out.reshape(b, nq, hkv, hq // hkv, bq, d).transpose(0, 1, 4, 2, 3, 5)
  return out.reshape(b, nq * bq, hq, d)[:, :t].astype(q.dtype)


def _dtypes(q):
  """(accumulation dtype, the weights' dtype as they meet V): float32 (float64 for float64),
  and the input's own dtype where it is narrower (bfloat16 / float16)."""
  acc = jnp.promote_types(q.dtype, jnp.float32)
  return acc, (q.dtype if jnp.dtype(q.dtype).itemsize < 4 else acc)


def _visible(j, bk, q_pos, length, causal=True, window=None):
  """[1, rows, bk]: which keys of key block j each query row sees."""
  k_pos = j * bk + jnp.arange(bk)
  seen = k_pos[None, :] < length
  if causal:
    seen &= k_pos[None, :] <= q_pos[:, None]
  if window:
    seen &= k_pos[None, :] > q_pos[:, None] - window
  return seen[None]


def _slice(x, j, bk):
  return lax.dynamic_slice_in_dim(x, j * bk, bk, 1)


def _async_add(acc, den, w, vj, weights_t):
  """The asynchronous softmax's partial sums: w = exp(logits - phi) (0 where unseen)."""
  w = w.astype(weights_t)
  return (acc + jnp.einsum("hrk,hkd->hrd", w, vj, preferred_element_type=acc.dtype),
          den + jnp.sum(w.astype(acc.dtype), axis=-1))


def _online_add(acc, den, top, logits, vj, weights_t):
  """The online softmax's step: logits -inf where unseen; top the running max."""
  new = jnp.maximum(top, jnp.max(logits, axis=-1))
  base = jnp.where(jnp.isfinite(new), new, 0.0)
  scale = jnp.where(jnp.isfinite(top), jnp.exp(top - base), 0.0)
  w = jnp.exp(logits - base[..., None]).astype(weights_t)
  return (acc * scale[..., None]
          + jnp.einsum("hrk,hkd->hrd", w, vj, preferred_element_type=acc.dtype),
          den * scale + jnp.sum(w.astype(acc.dtype), axis=-1), new)


def _divide(acc, den):
  return acc / jnp.where(den > 0, den, 1.0)[..., None]


def _untrusted(den, out, seen, weights_t):
  """The guard: rows that see a key (seen [1, rows] > 0) whose sum den of `seen` weights
  exp(s - phi) does not prove m - phi inside the window (exp(m - phi) <= den <= seen *
  exp(m - phi)), or whose output is not finite."""
  lo, hi = async_softmax.window(weights_t)
  trusted = ((den >= seen * math.exp(lo)) & (den <= math.exp(hi))
             & jnp.all(jnp.isfinite(out), axis=-1))
  return (seen > 0) & ~trusted


def _recompute(flags, out, online):
  """The flagged rows from online() (the block again, in the online softmax): the async
  kernels' scheme (async_softmax.guarded), under lax.cond, so a block with no flagged row
  costs nothing more."""
  return async_softmax.guarded("async", lambda: (out, flags), lambda _: online(), None)[0]


def _forward(q, k, v, lengths, q_start, causal, sm_scale, window, softcap, phi, block_q,
             block_k):
  hkv, d = k.shape[2], q.shape[-1]
  acc_t, weights_t = _dtypes(q)
  phi = async_softmax.DEFAULT_PHI if phi is None else phi
  qb, (kb, vb), lengths, q_start, bq, bk = _layout(q, [k, v], lengths, q_start, block_q,
                                                   block_k)
  rows = jnp.arange(qb.shape[3]) % bq  # each block row's query within the block

  def block(r, i):
    qi, ki, vi, length = qb[r, i], kb[r], vb[r], lengths[r]
    first = q_start[r] + i * bq
    q_pos = first + rows
    last = first + bq - 1
    # the keys some query of the block sees: [lo, hi); every query sees [lo_all, hi_all)
    hi = jnp.minimum(length, last + 1) if causal else length
    hi_all = jnp.minimum(length, first + 1) if causal else length
    lo = jnp.maximum(first - window + 1, 0) if window else 0
    lo_all = jnp.maximum(last - window + 1, 0) if window else 0
    j0 = lo // bk
    j3 = jnp.where(first < length, (hi + bk - 1) // bk, j0)  # a block of padding: nothing
    j1 = jnp.clip((lo_all + bk - 1) // bk, j0, j3)
    j2 = jnp.clip(hi_all // bk, j1, j3)

    def scores(j):
      sc = jnp.einsum("hrd,hkd->hrk", qi, _slice(ki, j, bk),
                      preferred_element_type=acc_t) * sm_scale
      return sc if softcap is None else softcap * jnp.tanh(sc / softcap)

    def visible(j):
      return _visible(j, bk, q_pos, length, causal, window)

    def add(masked):
      def step(j, carry):
        w = jnp.exp(scores(j) - phi)
        w = jnp.where(visible(j), w, 0.0) if masked else w
        return _async_add(*carry, w, _slice(vi, j, bk), weights_t)
      return step

    zeros = (jnp.zeros((hkv, qb.shape[3], d), acc_t), jnp.zeros((hkv, qb.shape[3]), acc_t))
    carry = lax.fori_loop(j0, j1, add(True), zeros)
    carry = lax.fori_loop(j1, j2, add(False), carry)
    acc, den = lax.fori_loop(j2, j3, add(True), carry)
    out = _divide(acc, den)

    # how many keys each row sees: the guard's n, and no key at all: nothing to redo
    seen = jnp.minimum(q_pos + 1, length) if causal else jnp.broadcast_to(length, q_pos.shape)
    if window:
      seen = seen - jnp.maximum(q_pos - window + 1, 0)
    live = q_pos < length  # the rest is padding: zeros, never recomputed
    seen = jnp.where(live, jnp.maximum(seen, 0), 0)
    out = jnp.where(live[None, :, None], out, 0.0)
    flags = _untrusted(den, out, seen.astype(acc_t)[None], weights_t)

    def online():
      def step(j, carry):
        logits = jnp.where(visible(j), scores(j), -jnp.inf)
        return _online_add(*carry, logits, _slice(vi, j, bk), weights_t)
      top = jnp.full(zeros[1].shape, -jnp.inf, acc_t)
      return _divide(*lax.fori_loop(j0, j3, step, (*zeros, top))[:2])

    return _recompute(flags, out, online)

  return _each_block(block, q, qb, bq)


def _cope_forward(q, k, v, gate_keys, pos_emb, lengths, q_start, sm_scale, pos_scale,
                  block_q, block_k):
  """CoPE (reference.cope_attention's arithmetic) in the same blocks. A query's position
  for key j sums the gates of keys j..itself, so each block walks its keys from the last
  one it sees down to the first, carrying each row's sum of the gates already passed; the
  position logits z = q . e * pos_scale of a block's queries are computed once."""
  hkv, d = k.shape[2], q.shape[-1]
  npos = pos_emb.shape[0]
  acc_t, weights_t = _dtypes(q)
  phi = async_softmax.DEFAULT_PHI
  keys = [k, v] + ([] if gate_keys is None else [gate_keys])
  qb, keys, lengths, q_start, bq, bk = _layout(q, keys, lengths, q_start, block_q, block_k)
  kb, vb, gb = keys[0], keys[1], keys[-1]
  rows = jnp.arange(qb.shape[3]) % bq

  def block(r, i):
    qi, ki, vi, gi, length = qb[r, i], kb[r], vb[r], gb[r], lengths[r]
    q_pos = q_start[r] + i * bq + rows
    n = (jnp.minimum(length, q_start[r] + (i + 1) * bq) + bk - 1) // bk
    z = jnp.einsum("hrd,nd->hrn", qi, pos_emb.astype(qi.dtype),
                   preferred_element_type=acc_t) * pos_scale
    dz = jnp.concatenate([z[..., 1:] - z[..., :-1], jnp.zeros_like(z[..., :1])], axis=-1)
    table = jnp.stack([z, dz], axis=-1)  # [h, rows, npos, 2]: one gather, floor and ceil

    def logits(j, passed):
      """Key block j's logits (-inf where unseen) and the gates' sums with it passed."""
      seen = _visible(j, bk, q_pos, length)
      s = jnp.einsum("hrd,hkd->hrk", qi, _slice(ki, j, bk),
                     preferred_element_type=acc_t) * sm_scale
      gs = s if gate_keys is None else jnp.einsum(
          "hrd,hkd->hrk", qi, _slice(gi, j, bk), preferred_element_type=acc_t) * sm_scale
      gates = jnp.where(seen, jax.nn.sigmoid(gs), 0.0)
      pos = lax.cumsum(gates, axis=2, reverse=True) + passed[..., None]
      pos = jnp.minimum(pos, npos - 1)
      lo = jnp.floor(pos)
      pair = jnp.take_along_axis(table, lo.astype(jnp.int32)[..., None], axis=2)
      out = s + pair[..., 0] + (pos - lo) * pair[..., 1]
      return jnp.where(seen, out, -jnp.inf), passed + jnp.sum(gates, axis=-1)

    def walk(add, carry):  # key blocks n - 1 down to 0, the gates' sums carried
      def step(it, carry):
        j = n - 1 - it
        x, passed = logits(j, carry[-1])
        return (*add(*carry[:-1], x, _slice(vi, j, bk), weights_t), passed)
      return lax.fori_loop(0, n, step, carry)

    zeros = (jnp.zeros((hkv, qb.shape[3], d), acc_t), jnp.zeros((hkv, qb.shape[3]), acc_t))
    acc, den, _ = walk(lambda acc, den, x, vj, wt: _async_add(acc, den, jnp.exp(x - phi), vj,
                                                                wt),
                       (*zeros, zeros[1]))
    out = _divide(acc, den)
    seen = jnp.maximum(jnp.minimum(q_pos + 1, length), 0).astype(acc_t)[None]
    flags = _untrusted(den, out, seen, weights_t)

    def online():
      top = jnp.full(zeros[1].shape, -jnp.inf, acc_t)
      return _divide(*walk(_online_add, (*zeros, top, zeros[1]))[:2])

    return _recompute(flags, out, online)

  return _each_block(block, q, qb, bq)


def _reference_cope(q, k, v, gate_keys, pos_emb, lengths, q_start, sm_scale, pos_scale,
                    block_q, block_k):
  return reference.cope_attention(q, k, v, pos_emb, lengths, sm_scale, q_start=q_start,
                                  gate_keys=gate_keys, pos_scale=pos_scale)


def _reference_attention(q, k, v, lengths, q_start, causal, sm_scale, window, softcap, phi,
                         block_q, block_k):
  return reference.prefill_attention(q, k, v, lengths, causal, sm_scale, q_start=q_start,
                                     window=window, softcap=softcap)


FORMS = {"attention": (_forward, _reference_attention),
         "cope": (_cope_forward, _reference_cope)}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def _with_reference_gradients(form, arrays, ints, how):
  """FORMS[form]'s forward pass, its gradients the reference's: arrays (the differentiable
  operands) + ints (lengths, q_start) + how (the static options) are the form's arguments."""
  return FORMS[form][0](*arrays, *ints, *how)


def _fwd(form, arrays, ints, how):
  return FORMS[form][0](*arrays, *ints, *how), (arrays, ints)


def _bwd(form, how, res, g):
  arrays, ints = res
  _, pullback = jax.vjp(lambda *a: FORMS[form][1](*a, *ints, *how), *arrays)
  return pullback(g), None


_with_reference_gradients.defvjp(_fwd, _bwd)


def prefill_attention(q, k, v, lengths, causal, sm_scale, *, q_start=None, window=None,
                      softcap=None, phi=None, block_q=BLOCK_Q, block_k=BLOCK_K):
  """reference.prefill_attention's arguments and result (q [B, T, Hq, D]; k, v
  [B, S, Hkv, D]; lengths [B] or None; query i of row b at q_start[b] + i, default the last
  T of S), computed as the module docstring says (queries at or past their row's length,
  padding, get zeros); `phi`: the unified max value (None: async_softmax.DEFAULT_PHI)."""
  how = (causal, float(sm_scale), window, softcap, None if phi is None else float(phi),
         block_q, block_k)
  return _with_reference_gradients("attention", (q, k, v), (lengths, q_start), how)


def cope_attention(q, k, v, pos_emb, lengths, sm_scale, *, q_start=None, gate_keys=None,
                   pos_scale=1.0, block_q=BLOCK_Q, block_k=BLOCK_K):
  """reference.cope_attention's arguments and result, in the blocks of prefill_attention
  (the asynchronous softmax with async_softmax.DEFAULT_PHI and its guard). Unlike
  prefill_attention, its padding queries are computed as the reference computes them."""
  return _with_reference_gradients("cope", (q, k, v, gate_keys, pos_emb), (lengths, q_start),
                                   (float(sm_scale), float(pos_scale), block_q, block_k))
