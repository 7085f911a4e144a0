"""Split-KV decode attention with FlashDecoding++'s asynchronous softmax (Pallas, Mosaic
TPU), over a paged KV cache (a contiguous cache is one page per row).

A block of `block_k` keys is one (Hkv * block_k, D) tile of every KV head at once, a shape the
(8, 128) tiling takes for any Hkv, and the pipeline copies it HBM -> VMEM as one DMA while
the previous block is being used (the double buffer). A page pool is heads-major, [Hkv, P,
page_size, D] (fdjax.ops.kv_cache, and the layout of JAX's own TPU paged attention): the block
is [Hkv, block_k, D], one run per head, seen in the kernel as [Hkv * block_k, D] (block_k is
a multiple of 16: the merge keeps the tiling). A contiguous cache [B, S, Hkv, D] is seen as
[B, S * Hkv, D] (a free reshape), a block then [block_k * Hkv, D], key-major. The page
table and lengths are prefetched to SMEM; a block's index map looks its page up there and,
past the row's end, repeats the last block (no copy is issued for a block that does not
change).

Grid (batch, KV split, key block). A program holds all Hq queries of its row and scores
them against the whole block on the MXU ([Hq, D] x [Hkv * block_k, D]^T); scores of a query
against another KV head's keys are masked, so the one matmul serves every GQA group, with
no padding of a group to a tile. Decode is bound by reading the cache: the Hkv-fold extra
MXU work costs nothing next to the bytes. In "async" mode every block adds exp(s - phi)
against the unified max value phi with no rescaling (see ../async_softmax.py); the splits'
sums are added; rows the guard flags are recomputed by the same kernel in "online" mode
(the synchronised softmax), for the flagged batch rows only.

A sliding window W: a row's splits start at the block holding key length - W, so a step
reads about W keys. Softcap: softcap * tanh(s / softcap) on the scaled scores.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.common import async_softmax as asm
from pallas_kernels.common.tiling import key_span, page_block, split_range
from pallas_kernels.tpu import shared


@dataclasses.dataclass(frozen=True)
class Settings:
  """The kernel's knobs; None takes `default`'s value for the shapes."""
  block_k: int | None = None      # keys per grid step (a multiple of 16 dividing the page)
  num_splits: int | None = None   # KV splits per row ("parallel": across a chip's cores)

  @classmethod
  def default(cls, batch: int, kv_heads: int, kv_len: int, head_dim: int = 128,
              dtype=jnp.bfloat16, block_k: int = 512, generation: str | None = None
              ) -> "Settings":
    """The largest block (at most `block_k`, the page's) whose K and V tiles, double
    buffered (four tiles), stay within BLOCK_BUDGET; one split per TensorCore a row would
    otherwise leave idle (v5p's two cores at batch 1), each >= 1024 keys."""
    block_k = min(block_k, max(16, pl.next_power_of_2(kv_len)))
    tile = kv_heads * shared.round_up(head_dim, shared.LANES) * jnp.dtype(dtype).itemsize
    while block_k > 16 and 4 * block_k * tile > shared.BLOCK_BUDGET:
      block_k //= 2
    cores = shared.generation(generation).cores
    splits = max(1, min(pl.cdiv(cores, batch), pl.cdiv(kv_len, max(1024, block_k))))
    return cls(block_k=block_k, num_splits=splits)


def _kernel(lengths_ref, table_ref, active_ref, phi_ref, q_ref, k_ref, v_ref, o_ref, l_ref,
            m_ref, *, sm_scale, block_k, split_len, kv_heads, group, online, window, softcap,
            heads_major):
  b, split, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  lo, start, end = split_range(lengths_ref[b], split, split_len, block_k, window)
  first = start + j * block_k

  @pl.when(j == 0)
  def _():
    o_ref[...] = jnp.zeros(o_ref.shape, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)

  @pl.when((active_ref[b] != 0) & (first < end))
  def _():
    q = q_ref[...]
    n = kv_heads * block_k  # key i of head h: row h * block_k + i, or i * kv_heads + h
    k = k_ref[...].reshape(n, q.shape[-1])

    def key_and_head(row):
      if heads_major:
        return first + row % block_k, row // block_k
      return first + row // kv_heads, row % kv_heads
    key, col_head = key_and_head(jax.lax.broadcasted_iota(jnp.int32, (q.shape[0], n), 1))
    head = jax.lax.broadcasted_iota(jnp.int32, (q.shape[0], n), 0) // group
    ok = (col_head == head) & (key < end) & (key >= lo)
    s = shared.dot(q, k, trans_b=True)
    s = jnp.where(ok, asm.cap(s * sm_scale, softcap), -jnp.inf)
    # rows past the row's end may hold anything (the edge of a contiguous cache, a page no
    # one wrote): zero them, since 0 * NaN would still poison p @ v
    row_key, _ = key_and_head(jax.lax.broadcasted_iota(jnp.int32, (n, 1), 0))
    v = jnp.where(row_key < end, v_ref[...].reshape(n, q.shape[-1]), 0)
    m_prev = m_ref[...]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    if online:  # synchronised: rescale what came before to the new running max
      m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
      p = jnp.exp(s - m_safe)
      alpha = jnp.exp(m_prev - m_safe)
      o_ref[...] = o_ref[...] * alpha
      l_ref[...] = l_ref[...] * alpha
    else:  # async: one fixed phi, no rescale
      p = jnp.exp(s - phi_ref[0])
    p = p.astype(v.dtype)  # rounded once: numerator and denominator see the same weights
    o_ref[...] += shared.dot(p, v)
    l_ref[...] += jnp.sum(p.astype(jnp.float32), axis=1, keepdims=True)
    m_ref[...] = m_new


def _partials(q, k, v, lengths, table, phi, active, *, sm_scale, settings, online, window,
              softcap, interpret, heads_major):
  """Per split: numerators [B, n_split, Hq, D], denominators and row maxima [.., Hq, 1]."""
  b, hq, d = q.shape
  hkv, num_pages, page_size = ((k.shape[0], k.shape[1], k.shape[2]) if heads_major else
                               (k.shape[2], k.shape[0], k.shape[1]))
  block_k = settings.block_k
  span = key_span(table.shape[1] * page_size, window, block_k)
  split_len = pl.cdiv(pl.cdiv(span, settings.num_splits), block_k) * block_k
  n_split = pl.cdiv(span, split_len)
  per_page = pl.cdiv(page_size, block_k)

  def kv_index(bi, split, j, lengths_ref, table_ref, active_ref):
    length = lengths_ref[bi]
    _, start, _ = split_range(length, split, split_len, block_k, window)
    pos = jnp.minimum(start + j * block_k, jnp.maximum(length - 1, 0))  # past the end: repeat
    page = jnp.clip(table_ref[bi, pos // page_size], 0, num_pages - 1)  # NO_PAGE never read
    block = (pos % page_size) // block_k % per_page
    return (0, page, block, 0) if heads_major else (page, block, 0)

  if heads_major:
    kv = pl.BlockSpec((hkv, None, block_k, d), kv_index)
  else:  # [B, S * Hkv, D]: a block of block_k keys is block_k * Hkv rows
    kv = pl.BlockSpec((None, block_k * hkv, d), kv_index)
    k, v = (x.reshape(num_pages, page_size * hkv, d) for x in (k, v))
  stat = pl.BlockSpec((None, None, hq, 1), lambda bi, split, j, *_: (bi, split, 0, 0))
  kernel = functools.partial(_kernel, sm_scale=sm_scale, block_k=block_k, split_len=split_len,
                             kv_heads=hkv, group=hq // hkv, online=online, window=window,
                             softcap=softcap, heads_major=heads_major)
  return shared.call(
      kernel, (phi, q, k, v),
      scalars=(lengths, table, active), grid=(b, n_split, split_len // block_k),
      in_specs=[shared.smem(), pl.BlockSpec((None, hq, d), lambda bi, *_: (bi, 0, 0)), kv, kv],
      out_specs=[pl.BlockSpec((None, None, hq, d), lambda bi, split, j, *_: (bi, split, 0, 0)),
                 stat, stat],
      out_shape=[jax.ShapeDtypeStruct((b, n_split, hq, d), jnp.float32),
                 jax.ShapeDtypeStruct((b, n_split, hq, 1), jnp.float32),
                 jax.ShapeDtypeStruct((b, n_split, hq, 1), jnp.float32)],
      semantics=("parallel", "parallel", "arbitrary"), interpret=interpret,
      name="fdjax_tpu_decode_online" if online else "fdjax_tpu_decode_async")


def decode_attention(q, k_cache, v_cache, lengths, **kwargs):
  """q [B, Hq, D]; caches [B, S, Hkv, D]; lengths [B] -> [B, Hq, D] (and stats): the paged
  kernel with one page of S entries per row, read in the caches' own (token-major) layout.
  Keyword arguments as paged_decode_attention."""
  table = jnp.arange(q.shape[0], dtype=jnp.int32)[:, None]
  return _attend(q, k_cache, v_cache, table, lengths, heads_major=False, **kwargs)


def paged_decode_attention(q, k_pages, v_pages, page_table, lengths, **kwargs):
  """q [B, Hq, D]; pages [Hkv, P, page_size, D] (heads-major); page_table [B, max_pages] int;
  lengths [B] -> [B, Hq, D] (and stats), as
  pallas_kernels.triton.decode_attention.paged_decode_attention. Keyword arguments as there,
  and `generation` ("v5e", "v6e", "v5p"; None: v5e), which sizes the defaults; `interpret`:
  False (Mosaic), True (TPU interpret mode, race detector on) or a pltpu.InterpretParams."""
  return _attend(q, k_pages, v_pages, page_table, lengths, heads_major=True, **kwargs)


@asm.jitted
def _attend(q, k_pages, v_pages, page_table, lengths, *, heads_major, sm_scale, phi=None,
            window=None, softcap=None, mode="async", settings: Settings | None = None,
            generation: str | None = None, interpret=False, return_stats=False):
  """Either entry point: pages [Hkv, P, page_size, D] if heads_major, else [P, page_size,
  Hkv, D]."""
  asm.check_call("decode_attention", q, mode, window, softcap)
  b, hq, d = q.shape
  hkv, page_size = ((k_pages.shape[0], k_pages.shape[2]) if heads_major else
                    (k_pages.shape[2], k_pages.shape[1]))
  max_pages = page_table.shape[1]
  block_k = page_block(page_size, max_pages)  # the page sizes the kernels take: one rule
  s = max_pages * page_size
  settings = shared.fill(settings, Settings.default(
      b, hkv, key_span(s, window, block_k), d, q.dtype,
      block_k=page_size if max_pages > 1 else 512, generation=generation))
  if settings.block_k % 16 or (max_pages > 1 and page_size % settings.block_k):
    raise ValueError(f"paged_decode_attention: block_k {settings.block_k} must be a multiple "
                     f"of 16 dividing the page size {page_size}")
  phi = asm.phi_operand(phi)
  operands = (q, k_pages, v_pages, asm.row_lengths(lengths, b, s), page_table.astype(jnp.int32),
              phi)
  options = dict(sm_scale=sm_scale, settings=settings, window=window, softcap=softcap,
                 interpret=interpret, heads_major=heads_major)
  run = functools.partial(_partials, *operands, **options)

  def run_async():
    o, l, m = run(jnp.ones((b,), jnp.int32), online=False)
    return asm.combine_async(o, l[..., 0], m[..., 0], phi[0], axis=1)

  def run_online(flags):  # only the batch rows with a flagged head run
    active = jnp.ones((b,), bool) if flags is None else jnp.any(flags, axis=1)
    o, l, m = run(active.astype(jnp.int32), online=True)
    return asm.combine_online(o, l[..., 0], m[..., 0], axis=1)

  out, flags = asm.guarded(mode, run_async, run_online, jnp.zeros((b, hq), bool))
  out = out.astype(q.dtype)
  return (out, asm.stats(flags)) if return_stats else out
