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


def _blocks(q, k, v, block_q, block_k):
  """q as [B, nq, Hkv, G * bq, D] (a block's rows query-major within each query head), k and
  v as [B, Hkv, nk * bk, D], padded to whole blocks."""
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  g = hq // hkv
  nq, nk = -(-t // block_q), -(-s // block_k)
  qb = jnp.pad(q, ((0, 0), (0, nq * block_q - t), (0, 0), (0, 0)))
  qb = qb.reshape(b, nq, block_q, hkv, g, d).transpose(0, 1, 3, 4, 2, 5)
  qb = qb.reshape(b, nq, hkv, g * block_q, d)

  def keys(x):
    return jnp.pad(x, ((0, 0), (0, nk * block_k - s), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
  return qb, keys(k), keys(v)


def _forward(q, k, v, lengths, q_start, causal, sm_scale, window, softcap, phi, block_q,
             block_k):
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  g = hq // hkv
  bq, bk = min(block_q, t), min(block_k, s)
  nq = -(-t // bq)
  acc_t = jnp.promote_types(q.dtype, jnp.float32)
  weights_t = q.dtype if jnp.dtype(q.dtype).itemsize < 4 else acc_t
  phi = async_softmax.DEFAULT_PHI if phi is None else phi
  lo_bound, hi_bound = async_softmax.window(weights_t)
  qb, kb, vb = _blocks(q, k, v, bq, bk)
  lengths = jnp.full((b,), s, jnp.int32) if lengths is None else lengths.astype(jnp.int32)
  q_start = (jnp.full((b,), s - t, jnp.int32) if q_start is None
             else q_start.astype(jnp.int32))
  rows = jnp.arange(g * bq) % bq  # each block row's query within the block

  def block(args):
    r, i = args
    qi, ki, vi, length = qb[r, i], kb[r], vb[r], lengths[r]
    first = q_start[r] + i * bq
    q_pos = first + rows
    last = first + bq - 1
    # the keys some query of the block sees: [lo, hi); every query sees [lo_all, hi_all)
    hi = jnp.minimum(length, last + 1) if causal else length
    hi_all = jnp.minimum(length, first + 1) if causal else length
    lo = jnp.maximum(first - window + 1, 0) if window else 0
    lo_all = jnp.maximum(last - window + 1, 0) if window else 0
    j0, j3 = lo // bk, (hi + bk - 1) // bk
    j1 = jnp.clip((lo_all + bk - 1) // bk, j0, j3)
    j2 = jnp.clip(hi_all // bk, j1, j3)

    def scores(j):
      kj = lax.dynamic_slice_in_dim(ki, j * bk, bk, 1)
      sc = jnp.einsum("hrd,hkd->hrk", qi, kj, preferred_element_type=acc_t) * sm_scale
      return sc if softcap is None else softcap * jnp.tanh(sc / softcap)

    def visible(j):
      k_pos = j * bk + jnp.arange(bk)
      seen = k_pos[None, :] < length
      if causal:
        seen &= k_pos[None, :] <= q_pos[:, None]
      if window:
        seen &= k_pos[None, :] > q_pos[:, None] - window
      return seen[None]

    def add(j, carry, masked):
      acc, den = carry
      w = jnp.exp(scores(j) - phi)
      if masked:
        w = jnp.where(visible(j), w, 0.0)
      w = w.astype(weights_t)
      vj = lax.dynamic_slice_in_dim(vi, j * bk, bk, 1)
      return (acc + jnp.einsum("hrk,hkd->hrd", w, vj, preferred_element_type=acc_t),
              den + jnp.sum(w.astype(acc_t), axis=-1))

    carry = (jnp.zeros((hkv, g * bq, d), acc_t), jnp.zeros((hkv, g * bq), acc_t))
    carry = lax.fori_loop(j0, j1, functools.partial(_flip, add, True), carry)
    carry = lax.fori_loop(j1, j2, functools.partial(_flip, add, False), carry)
    acc, den = lax.fori_loop(j2, j3, functools.partial(_flip, add, True), carry)
    out = acc / jnp.where(den > 0, den, 1.0)[..., None]

    # how many keys each row sees: the guard's n, and no key at all: nothing to redo
    seen = jnp.minimum(q_pos + 1, length) if causal else jnp.broadcast_to(length, q_pos.shape)
    if window:
      seen = seen - jnp.maximum(q_pos - window + 1, 0)
    seen = jnp.maximum(seen, 0).astype(acc_t)[None]
    trusted = ((den >= seen * math.exp(lo_bound)) & (den <= math.exp(hi_bound))
               & jnp.all(jnp.isfinite(out), axis=-1))
    flags = (seen > 0) & ~trusted

    def online(out):
      def step(j, carry):
        acc, den, top = carry
        sc = jnp.where(visible(j), scores(j), -jnp.inf)
        new = jnp.maximum(top, jnp.max(sc, axis=-1))
        base = jnp.where(jnp.isfinite(new), new, 0.0)
        w = jnp.exp(sc - base[..., None]).astype(weights_t)
        scale = jnp.where(jnp.isfinite(top), jnp.exp(top - base), 0.0)
        vj = lax.dynamic_slice_in_dim(vi, j * bk, bk, 1)
        return (acc * scale[..., None]
                + jnp.einsum("hrk,hkd->hrd", w, vj, preferred_element_type=acc_t),
                den * scale + jnp.sum(w.astype(acc_t), axis=-1), new)
      sums, total, _ = lax.fori_loop(j0, j3, step, (jnp.zeros_like(acc), jnp.zeros_like(den),
                                                    jnp.full(den.shape, -jnp.inf, acc_t)))
      exact = sums / jnp.where(total > 0, total, 1.0)[..., None]
      return jnp.where(flags[..., None], exact, out)

    return lax.cond(jnp.any(flags), online, lambda out: out, out)

  blocks = lax.map(block, (jnp.repeat(jnp.arange(b), nq), jnp.tile(jnp.arange(nq), b)))
  out = blocks.reshape(b, nq, hkv, g, bq, d).transpose(0, 1, 4, 2, 3, 5)
  return out.reshape(b, nq * bq, hq, d)[:, :t].astype(q.dtype)


def _flip(add, masked, j, carry):
  return add(j, carry, masked)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9, 10, 11))
def _attention(q, k, v, lengths, q_start, causal, sm_scale, window, softcap, phi, block_q,
               block_k):
  return _forward(q, k, v, lengths, q_start, causal, sm_scale, window, softcap, phi, block_q,
                  block_k)


def _fwd(q, k, v, lengths, q_start, causal, sm_scale, window, softcap, phi, block_q, block_k):
  out = _forward(q, k, v, lengths, q_start, causal, sm_scale, window, softcap, phi, block_q,
                 block_k)
  return out, (q, k, v, lengths, q_start)


def _bwd(causal, sm_scale, window, softcap, phi, block_q, block_k, res, g):
  q, k, v, lengths, q_start = res
  _, pullback = jax.vjp(lambda q, k, v: reference.prefill_attention(
      q, k, v, lengths, causal, sm_scale, q_start=q_start, window=window, softcap=softcap),
      q, k, v)
  return (*pullback(g), None, None)


_attention.defvjp(_fwd, _bwd)


def prefill_attention(q, k, v, lengths, causal, sm_scale, *, q_start=None, window=None,
                      softcap=None, phi=None, block_q=BLOCK_Q, block_k=BLOCK_K):
  """reference.prefill_attention's arguments and result (q [B, T, Hq, D]; k, v
  [B, S, Hkv, D]; lengths [B] or None; query i of row b at q_start[b] + i, default the last
  T of S), computed as the module docstring says; `phi`: the unified max value (None:
  async_softmax.DEFAULT_PHI)."""
  return _attention(q, k, v, lengths, q_start, causal, float(sm_scale), window, softcap,
                    None if phi is None else float(phi), block_q, block_k)
