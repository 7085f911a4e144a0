"""Split-KV decode attention with FlashDecoding++'s asynchronous softmax (Pallas, Triton),
over a paged KV cache (a contiguous cache is one page per row).

Grid (batch, KV head, KV split). One program holds every query head of a GQA group and
walks its split of the row's keys in blocks of `block_k`, looking each block's page up in
the row's page table (a block never crosses a page: block_k divides the page size), up to
the row's own length (the cache past it, and page-table entries past its last page, are
never read). In "async" mode it accumulates exp(s - phi) against the
unified max value phi (see async_softmax.py) and the splits are summed; rows the guard
flags are recomputed, inside the same jitted function, by the same kernel in "online" mode
(the synchronised FlashDecoding softmax) for the flagged (row, KV head) groups only.

Page pools are heads-major, [Hkv, P, page_size, D] (fdjax.ops.kv_cache): a block of one
head's keys is one contiguous run. A contiguous cache [B, S, Hkv, D] is read as it is.

MHA (a group of one query head) uses a vector product on the plain cores; larger groups
use the tensor-core dot with the group padded to the dot's minimum of 16 rows.

With a sliding window W the query (at position length - 1) sees the last W keys: every
row's splits cover only [max(0, length - W), length) (from the block holding its first key),
so a step reads about W keys whatever the row's length, and pages before the window are
never touched (they may be gone: kv_cache.NO_PAGE). Soft-capping, softcap * tanh(s /
softcap), applies to the scaled scores.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.common import async_softmax as asm
from pallas_kernels.common import tiling
from pallas_kernels.common.tiling import key_span, page_block, split_range
from pallas_kernels.triton import shared
from pallas_kernels.triton.shared import plgpu

# 16 rows (a group padded to the dot's minimum, or one MHA head) * block_k * head_dim by
# dtype size: 128 keys up to head_dim 256 in bfloat16; in float32 32 keys at head_dim 128
# (128 spill) and 64 at 64.
TILE_LIMITS = {2: 1 << 19, 4: 1 << 16}


@dataclasses.dataclass(frozen=True)
class Settings:
  """The kernel's knobs; None takes `default`'s value for the shapes."""
  block_k: int | None = None      # keys per loop step
  num_splits: int | None = None   # KV splits per (row, KV head)
  num_warps: int | None = None
  num_stages: int | None = None

  @classmethod
  def default(cls, batch: int, kv_heads: int, kv_len: int, head_dim: int = 128,
              dtype=jnp.bfloat16, block_k: int = 128) -> "Settings":
    """128-key blocks (at most the page's; shrunk to TILE_LIMITS for the group's 16 rows);
    enough splits to fill the GPU about twice over, each >= 256 keys."""
    block_k = min(block_k, max(16, pl.next_power_of_2(kv_len)))
    _, block_k = shared.fit_blocks(shared.DOT_MIN_ROWS, block_k, head_dim, dtype, TILE_LIMITS)
    splits = pl.cdiv(2 * shared.num_sms(), batch * kv_heads)
    splits = max(1, min(splits, pl.cdiv(kv_len, max(256, block_k))))
    return cls(block_k=block_k, num_splits=splits, num_warps=4, num_stages=2)


def _scores(q, k, f32):
  if q.ndim == 1:  # one query head: [D] . [BK, D] on the plain cores
    return jnp.sum(k.astype(jnp.float32) * q.astype(jnp.float32)[None, :], axis=1)
  return plgpu.dot(q, k, trans_b=True, allow_tf32=not f32)


def _weighted_values(p, v, f32):
  """(p @ v, sum(p)) with p rounded once to v's dtype for both, so the numerator and the
  denominator see the same weights (a single key then gives exactly v, in bf16 too)."""
  p = p.astype(v.dtype)
  if p.ndim == 1:
    pv = jnp.sum(p.astype(jnp.float32)[:, None] * v.astype(jnp.float32), axis=0)
  else:
    pv = plgpu.dot(p, v, allow_tf32=not f32)
  return pv, jnp.sum(p.astype(jnp.float32), axis=-1)


def _kernel(lengths_ref, table_ref, phi_ref, active_ref, q_ref, k_ref, v_ref, o_ref, l_ref,
            m_ref, *, sm_scale, block_k, split_len, online, vector, window, softcap,
            heads_major):
  b, h, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  f32 = q_ref.dtype == jnp.float32
  lo, start, end = split_range(lengths_ref[b], split, split_len, block_k, window)
  n_blocks = jnp.where(active_ref[b, h] != 0, pl.cdiv(jnp.maximum(end - start, 0), block_k), 0)
  phi = phi_ref[0]
  q = q_ref[b, h, 0, :] if vector else q_ref[b, h, :, :]
  rows = () if vector else (q.shape[0],)
  d = q.shape[-1]
  num_pages, page_size = k_ref.shape[1:3] if heads_major else k_ref.shape[:2]

  def body(j, carry):
    acc, l, m = carry
    first = start + j * block_k
    valid = (first + jnp.arange(block_k) < end) & (first + jnp.arange(block_k) >= lo)
    page = jnp.clip(table_ref[b, first // page_size], 0, num_pages - 1)
    entries = pl.ds(first % page_size, block_k)
    at = (h, page, entries) if heads_major else (page, entries, h, slice(None))
    k = plgpu.load(k_ref.at[at], mask=valid[:, None], other=0.0)
    v = plgpu.load(v_ref.at[at], mask=valid[:, None], other=0.0)
    s = asm.cap(_scores(q, k, f32) * sm_scale, softcap)
    s = jnp.where(valid if vector else valid[None, :], s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    if online:  # synchronised: rescale what came before to the new running max
      pv, p_sum = _weighted_values(jnp.exp(s - jnp.expand_dims(m_new, -1)), v, f32)
      alpha = jnp.exp(m - m_new)
      return acc * jnp.expand_dims(alpha, -1) + pv, l * alpha + p_sum, m_new
    pv, p_sum = _weighted_values(jnp.exp(s - phi), v, f32)  # async: one fixed phi, no rescale
    return acc + pv, l + p_sum, m_new

  init = (jnp.zeros(rows + (d,), jnp.float32), jnp.zeros(rows, jnp.float32),
          jnp.full(rows, -jnp.inf, jnp.float32))
  acc, l, m = jax.lax.fori_loop(0, n_blocks, body, init)
  if vector:
    o_ref[b, h, split, 0, :] = acc
    l_ref[b, h, split, pl.ds(0, 1)] = l[None]
    m_ref[b, h, split, pl.ds(0, 1)] = m[None]
  else:
    o_ref[b, h, split, :, :] = acc
    l_ref[b, h, split, :] = l
    m_ref[b, h, split, :] = m


def _partials(q, k, v, lengths, table, phi, active, *, sm_scale, settings, online, window,
              softcap, interpret, heads_major):
  b, hkv, g_pad, d = q.shape
  block_k = settings.block_k
  # the longest row the page table can address, or with a window the span it sees
  span = key_span(table.shape[1] * k.shape[2 if heads_major else 1], window, block_k)
  split_len = pl.cdiv(pl.cdiv(span, settings.num_splits), block_k) * block_k
  n_split = pl.cdiv(span, split_len)
  kernel = functools.partial(_kernel, sm_scale=sm_scale, block_k=block_k, split_len=split_len,
                             online=online, vector=(g_pad == 1), window=window,
                             softcap=softcap, heads_major=heads_major)
  stat = jax.ShapeDtypeStruct((b, hkv, n_split, g_pad), jnp.float32)
  return shared.call(
      kernel, (lengths, table, phi, active, q, k, v), grid=(b, hkv, n_split),
      out_shape=[jax.ShapeDtypeStruct((b, hkv, n_split, g_pad, d), jnp.float32), stat, stat],
      settings=settings, interpret=interpret,
      name="fdjax_decode_online" if online else "fdjax_decode_async")


def decode_attention(q, k_cache, v_cache, lengths, **kwargs):
  """q [B, Hq, D]; caches [B, S, Hkv, D]; lengths [B] -> [B, Hq, D] (and stats): the paged
  kernel with one page of S entries per row, read in the caches' own (token-major) layout.
  Keyword arguments as paged_decode_attention."""
  table = jnp.arange(q.shape[0], dtype=jnp.int32)[:, None]
  return _attend(q, k_cache, v_cache, table, lengths, heads_major=False, **kwargs)


def paged_decode_attention(q, k_pages, v_pages, page_table, lengths, **kwargs):
  """q [B, Hq, D]; pages [Hkv, P, page_size, D] (heads-major); page_table [B, max_pages]
  int; lengths [B] -> [B, Hq, D] (and stats). Row b's key i lives at page_table[b, i //
  page_size], entry i % page_size. Keyword arguments:

  sm_scale; phi (the unified max value; None: asm's default); `window` W: the query sees
  (and the kernel reads) the last W keys only; `softcap`: scores soft-capped; mode "async":
  unified max value phi with the guarded recompute, "online": the synchronised softmax only
  (the FlashDecoding baseline / the paper's ablation); settings; interpret; return_stats.
  """
  return _attend(q, k_pages, v_pages, page_table, lengths, heads_major=True, **kwargs)


@asm.jitted
def _attend(q, k_pages, v_pages, page_table, lengths, *, heads_major, sm_scale, phi=None,
            window=None, softcap=None, mode="async", settings: Settings | None = None,
            interpret=False, return_stats=False, select=False):
  """Either entry point: pages [Hkv, P, page_size, D] if heads_major, else [P, page_size,
  Hkv, D]; `select` as asm.guarded's (asm.jitted sets it by select_guard)."""
  asm.check_call("decode_attention", q, mode, window, softcap)
  b, hq, d = q.shape
  hkv, page_size = ((k_pages.shape[0], k_pages.shape[2]) if heads_major else
                    (k_pages.shape[2], k_pages.shape[1]))
  s = page_table.shape[1] * page_size
  block_k = page_block(page_size, page_table.shape[1])
  g = hq // hkv
  g_pad = 1 if g == 1 else max(shared.DOT_MIN_ROWS, pl.next_power_of_2(g))
  settings = tiling.fill(settings, Settings.default(b, hkv, key_span(s, window, block_k), d,
                                                    q.dtype, block_k))
  if page_table.shape[1] > 1 and page_size % settings.block_k:
    raise ValueError(f"paged_decode_attention: block_k {settings.block_k} does not divide the "
                     f"page size {page_size}")
  qg = q.reshape(b, hkv, g, d)
  if g_pad != g:
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, g_pad - g), (0, 0)))
  lengths = asm.row_lengths(lengths, b, s)
  phi = asm.phi_operand(phi)
  run = functools.partial(_partials, qg, k_pages, v_pages, lengths,
                          page_table.astype(jnp.int32), phi, sm_scale=sm_scale,
                          settings=settings, window=window, softcap=softcap,
                          interpret=interpret, heads_major=heads_major)
  return asm.guarded_groups(run, phi, mode, b, hkv, g, g_pad, q.dtype, return_stats,
                            select)
