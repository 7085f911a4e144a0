"""Plain-XLA reference implementations of every fdjax op.

These are the CPU path of `fdjax.ops.dispatch` and the reference every Pallas kernel is
tested against. They compute in float32 (softmax and accumulation) whatever the input
dtype, and return the input dtype.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fdjax.ops import quant

HIGHEST = jax.lax.Precision.HIGHEST


def _acc(x, plain=False):
  """x in the accumulation dtype: float32, or float64 when given float64; with `plain`, x's
  own dtype (the plain computation in a low precision: the baseline a kernel's error in that
  precision is judged against, FlashAttention's rule)."""
  return x if plain else x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _einsum(spec, a, b, plain):
  if plain:
    return jnp.einsum(spec, a, b, preferred_element_type=a.dtype)
  return jnp.einsum(spec, a, b, precision=HIGHEST)


def _capped(s, softcap):
  """Gemma's attention-logit soft-capping, softcap * tanh(s / softcap), or s as it is."""
  return s if softcap is None else softcap * jnp.tanh(s / softcap)


def _masked_softmax_attention(s, mask, v_fn):
  """softmax over the last axis of scores `s` where `mask`, then `v_fn(p)`.

  Rows with no valid key get zeros, never NaN.
  """
  s = jnp.where(mask, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.where(mask, jnp.exp(s - m), 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(denom > 0, denom, 1.0)
  return v_fn(p)


def query_positions(b, t, s, q_start):
  """[B, T] absolute positions of the queries: q_start[b] + i (default: the last T of S)."""
  start = jnp.full((b,), s - t, jnp.int32) if q_start is None else q_start
  return start[:, None] + jnp.arange(t)[None, :]


def _mask(q_pos, s, lengths, causal, window=None):
  """[B, T, S]: key j visible to query i (j <= its position p if causal, j < lengths[b], and
  with a sliding window W, p - j < W: the last W keys, as Hugging Face counts them)."""
  k_pos = jnp.arange(s)[None, None, :]
  mask = jnp.broadcast_to(k_pos <= q_pos[:, :, None] if causal else True,
                          (q_pos.shape[0], q_pos.shape[1], s))
  if lengths is not None:
    mask = mask & (k_pos < lengths[:, None, None])
  if window is not None:
    mask = mask & (q_pos[:, :, None] - k_pos < window)
  return mask


def gather_heads(pages, page_table):
  """A paged cache [Hkv, P, page_size, D] (heads-major, fdjax.ops.kv_cache) seen contiguously
  per row and KV head: [Hkv, B, max_pages * page_size, D]; whole pages are copied, nothing
  is transposed (page ids out of range, in entries no valid key uses, are clipped)."""
  rows = pages[:, jnp.clip(page_table, 0, pages.shape[1] - 1)]
  return rows.reshape(pages.shape[0], page_table.shape[0], -1, pages.shape[-1])


def gather_pages(pages, page_table):
  """A paged cache [Hkv, P, page_size, D] as a contiguous one, [B, max_pages * page_size,
  Hkv, D] (the layout of prefill's keys and of decode_attention's caches)."""
  return jnp.moveaxis(gather_heads(pages, page_table), 0, 2)


def decode_attention(q, k_cache, v_cache, lengths, sm_scale, *, window=None, softcap=None,
                     plain=False):
  """q [B, Hq, D]; caches [B, S, Hkv, D]; lengths [B] valid entries -> [B, Hq, D]. The
  query sits at position lengths - 1; with a window W it sees the last W entries only."""
  return _decode(q, jnp.moveaxis(k_cache, 2, 0), jnp.moveaxis(v_cache, 2, 0), lengths,
                 sm_scale, window, softcap, plain)


def paged_decode_attention(q, k_pages, v_pages, page_table, lengths, sm_scale, *, window=None,
                           softcap=None, plain=False, in_place=False, weighted_sum="dot"):
  """decode_attention over a paged cache: pages [Hkv, P, page_size, D], page_table [B,
  max_pages]; keyword arguments as decode_attention.

  in_place: where the pool holds B x max_pages pages, check at run time whether each row
  owns its own consecutive run of them (rows_own_their_pages) and if so read the pages where
  they lie, as one [Hkv, B, max_pages * page_size, D] view, instead of gathering a copy (the
  same keys, so the same result; the CPU's path: the copy was a tenth of a decode step).
  weighted_sum: as _times_v's."""
  return _read_pages(lambda k, v: _decode(q, k, v, lengths, sm_scale, window, softcap, plain,
                                          weighted_sum),
                     k_pages, v_pages, page_table, lengths, in_place)


def _read_pages(attend, k_pages, v_pages, page_table, lengths, in_place):
  """attend(k, v) on a paged cache's keys and values seen per KV head and row, [Hkv, B,
  max_pages * page_size, width]: gathered into a copy, or with `in_place` (a pool of B x
  max_pages pages) read where they lie when every row owns its own consecutive run of them,
  checked at run time (rows_own_their_pages)."""
  gathered = lambda: attend(gather_heads(k_pages, page_table),  # noqa: E731
                            gather_heads(v_pages, page_table))
  hkv, p, page_size, _ = k_pages.shape
  b, width = page_table.shape
  if not in_place or p != b * width:
    return gathered()
  view = lambda pages: pages.reshape(hkv, b, width * page_size, pages.shape[-1])  # noqa: E731
  return jax.lax.cond(rows_own_their_pages(page_table, lengths, p, page_size),
                      lambda: attend(view(k_pages), view(v_pages)), gathered)


def rows_own_their_pages(page_table, lengths, num_pages, page_size):
  """Whether row b's keys lie in pages b * W .. b * W + W - 1 of a pool of `num_pages` (W the
  table's width), in order: every entry a key of the row uses (below lengths[b]) holds its
  own page. Entries past a row's keys, and ids outside the pool (no page), are not looked at:
  no valid key reads them."""
  b, width = page_table.shape
  own = jnp.arange(b * width, dtype=page_table.dtype).reshape(b, width)
  used = ((jnp.arange(width)[None, :] * page_size < lengths[:, None])
          & (page_table >= 0) & (page_table < num_pages))
  return jnp.all(jnp.where(used, page_table == own, True))


def _decode(q, k, v, lengths, sm_scale, window, softcap, plain, weighted_sum="dot"):
  """decode_attention on heads-major keys and values [Hkv, B, S, D]: the KV head and the row
  lead both operands of both dots (their batch dimensions), so XLA moves no key."""
  b, hq, d = q.shape
  hkv, _, s_len, _ = k.shape
  qf = jnp.moveaxis(_acc(q, plain).reshape(b, hkv, hq // hkv, d), 1, 0)
  s = _capped(_einsum("hbgd,hbsd->hbgs", qf, _acc(k, plain), plain) * sm_scale, softcap)
  mask = _mask((lengths - 1)[:, None], s_len, lengths, True, window)[None]
  o = _masked_softmax_attention(s, mask, _times_v(v, weighted_sum, plain))
  return jnp.moveaxis(o, 0, 1).reshape(b, hq, d).astype(q.dtype)


def _times_v(v, weighted_sum, plain=False):
  """The weights [Hkv, B, G, S] times heads-major values [Hkv, B, S, D] -> [Hkv, B, G, D]: a
  batched dot, or with weighted_sum "reduce" a multiply and a sum over the keys (each key's
  D values a contiguous vector; XLA:CPU's dot moved float32 values at 13 GB/s there)."""
  if weighted_sum == "reduce" and not plain:
    return lambda p: jnp.sum(p[..., None] * _acc(v)[:, :, None], axis=3)
  return lambda p: _einsum("hbgs,hbsd->hbgd", p, _acc(v, plain), plain)


def prefill_attention(q, k, v, lengths, causal, sm_scale, *, q_start=None, window=None,
                      softcap=None, plain=False):
  """q [B, T, Hq, D]; k, v [B, S, Hkv, D]; lengths [B] or None = valid keys; query i of row b
  at position q_start[b] + i (default 0: S == T, a prompt on its own); `window`: each query
  sees its last W keys; `softcap`: scores soft-capped -> [B, T, Hq, D]."""
  b, t, hq, d = q.shape
  hkv = k.shape[2]
  g = hq // hkv
  qf = _acc(q, plain).reshape(b, t, hkv, g, d)
  s = _capped(_einsum("bthgd,bshd->bhgts", qf, _acc(k, plain), plain) * sm_scale, softcap)
  q_pos = query_positions(b, t, t, q_start)
  mask = _mask(q_pos, k.shape[1], lengths, causal, window)[:, None, None]
  o = _masked_softmax_attention(
      s, mask, lambda p: _einsum("bhgts,bshd->bthgd", p, _acc(v, plain), plain))
  return o.reshape(b, t, hq, d).astype(q.dtype)


def linear(x, w):
  """x [M, K] @ w [K, N] with float32 accumulation, returned in x's dtype. A quantized w is
  dequantized to x's dtype first (XLA's dequantize-then-dot)."""
  if isinstance(w, quant.QuantizedWeight):
    w = quant.dequantize(w, x.dtype)
  acc = jnp.promote_types(x.dtype, jnp.float32)
  return jnp.dot(x, w, precision=HIGHEST, preferred_element_type=acc).astype(x.dtype)


def score_row_max(q, k, lengths, causal, sm_scale, q_start=None, window=None, softcap=None):
  """Each query row's largest (masked) attention score [B, T, Hq] (calibration of phi)."""
  b, t, hq, d = q.shape
  hkv = k.shape[2]
  qf = _acc(q).reshape(b, t, hkv, hq // hkv, d)
  s = _capped(jnp.einsum("bthgd,bshd->bthgs", qf, _acc(k), precision=HIGHEST) * sm_scale,
              softcap)
  q_pos = query_positions(b, t, t, q_start)
  mask = _mask(q_pos, k.shape[1], lengths, causal, window)
  if lengths is not None:  # padding query rows do not count
    mask = mask & (q_pos[:, :, None] < lengths[:, None, None])
  s = jnp.where(mask[:, :, None, None, :], s, -jnp.inf)
  return jnp.max(s, axis=-1).reshape(b, t, hq)


def cope_attention(q, k, v, pos_emb, lengths, sm_scale, q_start=None, gate_keys=None,
                   pos_scale=1.0):
  """Contextual Position Encoding attention (Golovneva et al. 2024, Appendix B).

  q [B, T, Hq, D]; k, v [B, S, Hkv, D]; pos_emb [npos_max, D] (shared by the heads);
  lengths [B] or None = valid keys per row. Query i of row b sits at absolute position
  q_start[b] + i (default S - T: T = S is a prompt, T = 1 a decode step, and a chunk of a
  prompt after the cached part starts at the cache's length).
  s = q.k * sm_scale (causal, lengths); gates g = sigmoid(s), 0 where masked (with
  gate_keys [B, S, Hkv, D]: sigmoid(q.gate_key * sm_scale), the official code's variants);
  positions p_ij = sum_{k=j..i} g_ik, clamped to npos_max - 1; z_i[n] = q_i . e[n] *
  pos_scale (1: the appendix; sm_scale: the official code's default); logits s_ij +
  lerp(z_i, p_ij) between floor and ceil; softmax; times v.
  """
  b, t, hq, d = q.shape
  s_len, hkv = k.shape[1], k.shape[2]
  qf = _acc(q).reshape(b, t, hkv, hq // hkv, d)
  s = jnp.einsum("bthgd,bshd->bhgts", qf, _acc(k), precision=HIGHEST) * sm_scale
  mask = _mask(query_positions(b, t, s_len, q_start), s_len, lengths, True)[:, None, None]
  gs = s if gate_keys is None else jnp.einsum(
      "bthgd,bshd->bhgts", qf, _acc(gate_keys), precision=HIGHEST) * sm_scale
  z = jnp.einsum("bthgd,nd->bhgtn", qf, _acc(pos_emb), precision=HIGHEST) * pos_scale
  o = _masked_softmax_attention(
      _cope_logits(s, gs, z, mask), mask,
      lambda p: jnp.einsum("bhgts,bshd->bthgd", p, _acc(v), precision=HIGHEST))
  return o.reshape(b, t, hq, d).astype(q.dtype)


def _cope_logits(s, gs, z, mask):
  """CoPE's logits from the scores `s` and gate scores `gs` [..., S] (keys last), the
  position logits z [..., npos_max] (the same leading axes) and the mask [..., S]
  (broadcasting): gates sigmoid(gs) (0 where masked), positions their reverse cumulative sum
  clamped to npos_max - 1, and s + z interpolated between the positions' floor and ceil."""
  npos = z.shape[-1]
  gates = jnp.where(mask, jax.nn.sigmoid(gs), 0.0)
  pos = jax.lax.cumsum(gates, axis=gates.ndim - 1, reverse=True)  # sum over keys j..end
  pos = jnp.minimum(pos, npos - 1)
  # (z[n], z[n + 1] - z[n]) side by side, so one gather serves floor and ceil
  dz = jnp.concatenate([z[..., 1:] - z[..., :-1], jnp.zeros_like(z[..., :1])], axis=-1)
  lo = jnp.floor(pos)
  pair = jnp.take_along_axis(jnp.stack([z, dz], -1), lo.astype(jnp.int32)[..., None], axis=-2)
  return s + pair[..., 0] + (pos - lo) * pair[..., 1]


def paged_cope_decode_attention(q, k_pages, v_pages, page_table, lengths, pos_emb, sm_scale, *,
                                gates="key", pos_scale=1.0, in_place=False,
                                weighted_sum="dot"):
  """cope_attention of one query per row, at position lengths - 1, over a paged cache, per KV
  head as paged_decode_attention reads it (nothing transposed): q [B, Hq, D]; k_pages [Hkv,
  P, page_size, D], or [.., 2 * D] of [key, gate key] with gates "separate"; v_pages [Hkv,
  P, page_size, D]; page_table [B, max_pages]; lengths [B]; pos_emb [npos_max, D]. The gates
  are sigmoid(q . gate key * sm_scale), the gate key the key ("key"), the value ("value") or
  the entry's second half ("separate"); pos_scale as cope_attention's. in_place,
  weighted_sum: as paged_decode_attention's. -> [B, Hq, D] in q's dtype."""
  b, hq, d = q.shape

  def attend(k, v):  # [Hkv, B, S, width]
    hkv, _, s_len, _ = k.shape
    g = hq // hkv
    qf = jnp.moveaxis(_acc(q).reshape(b, hkv, g, d), 1, 0)
    if gates == "separate":  # [q, 0] and [0, q] against [key, gate key]: one dot, no slice
      zero = jnp.zeros_like(qf)
      both = jnp.concatenate([jnp.concatenate([qf, zero], -1),
                              jnp.concatenate([zero, qf], -1)], axis=2)
      both = jnp.einsum("hbgd,hbsd->hbgs", both, _acc(k), precision=HIGHEST) * sm_scale
      s, gs = both[:, :, :g], both[:, :, g:]
    else:
      s = jnp.einsum("hbgd,hbsd->hbgs", qf, _acc(k), precision=HIGHEST) * sm_scale
      gs = s if gates == "key" else jnp.einsum(
          "hbgd,hbsd->hbgs", qf, _acc(v), precision=HIGHEST) * sm_scale
    z = jnp.einsum("hbgd,nd->hbgn", qf, _acc(pos_emb), precision=HIGHEST) * pos_scale
    # The logits and the softmax on rows [Hkv * B * G, S]: XLA:CPU's fused loops over the
    # 4-D [Hkv, B, G, S] (G = 1 a size-1 axis) copied between layouts within the fusion and
    # took about a quarter longer (batch 16, 256 keys)
    rows = hkv * b * g
    mask = jnp.broadcast_to((jnp.arange(s_len)[None, :] < lengths[:, None])[None, :, None],
                            s.shape).reshape(rows, s_len)
    logits = _cope_logits(s.reshape(rows, s_len), gs.reshape(rows, s_len),
                          z.reshape(rows, -1), mask)
    times_v = _times_v(v, weighted_sum)
    o = _masked_softmax_attention(logits, mask,
                                  lambda p: times_v(p.reshape(hkv, b, g, s_len)))
    return jnp.moveaxis(o, 0, 1).reshape(b, hq, d).astype(q.dtype)

  return _read_pages(attend, k_pages, v_pages, page_table, lengths, in_place)
