"""Split-KV decode attention with FlashDecoding++'s asynchronous softmax on Mosaic GPU, over a
paged KV cache (a contiguous cache is one page per row).

Grid (batch, KV head, KV split). One program holds every query head of a GQA group, padded to
the 64 rows of Hopper's warpgroup MMA (WGMMA), and walks its split of the row's keys in blocks
of `block_k`: each block's page is looked up in the row's page table (a block never crosses a
page: block_k divides the page size) and brought into shared memory by a TMA copy, `stages`
blocks ahead of the MMAs (FlashDecoding++'s double buffering; the copies of K and V have their
own barriers, so the scores start as soon as K has landed). Scores are q [64, D] @ K^T; the
weights p go through shared memory to the second MMA, p [64, block_k] @ V. Only the row's own keys
are read: the trip count is the split's share of [first visible key, length), a number known
only at run time, so the pipeline is written out by hand (a static `emit_pipeline` would walk
the longest row's blocks).

At head_dim 256 (Gemma's) the program is two warpgroups, each holding half of the output's
columns: a [64, 128] float32 accumulator each, as at head_dim 128 (one warpgroup's
[64, 256] would take 128 of a thread's 255 registers and spill with the scores beside it).
Both compute the same scores (the first MMA is repeated: memory, not MMA, bounds decoding),
each multiplies its half of V; warpgroup 0 issues the copies and refills a slot only when
both have arrived at its `done` barrier, and both meet at `finished` before the output's
scope reuses the shared memory.

Decoding is bound by memory: the padded group costs MMA work (64 rows however small the group)
but no bytes. At head_dim 128 a key moves 512 bytes and costs 64 x 128 x 4 FLOP, 64 FLOP per
byte, a fifth of what an H100's tensor cores do per byte of HBM bandwidth.

"async" mode accumulates exp(s - phi) against the unified max value phi (see
common/async_softmax.py), and the wrapper sums the splits; the guard's flagged groups are
recomputed by the same kernel in "online" mode (the synchronised softmax), inside the same
jitted function, as the Triton kernel does. Sliding windows and soft-capping as there.

Page pools are heads-major, [Hkv, P, page_size, D] (fdjax.ops.kv_cache): a piece of one head's
keys is one contiguous run. A contiguous cache [B, S, Hkv, D] is read as it is.

Keys past the row's length in its last block are read (a TMA copy moves whole blocks) and
weighted by exactly 0: they must be finite, which a cache that starts zeroed and is written
only with keys and values is.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.common import async_softmax as asm
from pallas_kernels.common import tiling
from pallas_kernels.common.tiling import key_span, split_range
from pallas_kernels.mosaic_gpu import shared

DTYPES = (jnp.bfloat16, jnp.float16)  # WGMMA reads K transposed from shared memory: 16-bit only
ROWS = 64         # the query rows of one MMA: a GQA group is padded to this
BLOCK_K = 64      # keys per step: the MMA's K for p @ V, one 128-byte swizzled row of p
HEAD_DIMS = (64, 128, 256)
WG_COLS = 128     # output columns per warpgroup: head_dim 256 takes two warpgroups
OUT_ROWS = 8      # partial outputs keep the group's rows rounded up to this (not 64)
SMEM_BUDGET = 200 * 1024  # of Hopper's 227 KB of dynamic shared memory per block


@dataclasses.dataclass(frozen=True)
class Settings:
  """The kernel's knobs; None takes `default`'s value for the shapes."""
  block_k: int | None = None      # keys per pipeline step (a multiple of 64)
  num_splits: int | None = None   # KV splits per (row, KV head)
  stages: int | None = None       # key blocks in flight (TMA copies ahead of the MMAs)

  @classmethod
  def default(cls, batch: int, kv_heads: int, kv_len: int, head_dim: int = 128,
              block_k: int = BLOCK_K, sms: int = shared.H100_SMS) -> "Settings":
    """64-key blocks; as many stages (2 to 4) as shared memory holds; enough splits to fill
    the GPU about twice over, each >= 256 keys."""
    per_stage = 2 * block_k * head_dim * 2
    stages = max(2, min(4, (SMEM_BUDGET - ROWS * head_dim * 2) // per_stage))
    splits = pl.cdiv(2 * sms, batch * kv_heads)
    splits = max(1, min(splits, pl.cdiv(kv_len, max(256, block_k))))
    return cls(block_k=block_k, num_splits=splits, stages=stages)


def unsupported(head_dim: int, dtype, group: int = 1) -> str | None:
  """Why the kernel cannot take this head_dim / dtype / number of query heads per KV head
  (None: it can)."""
  if group > ROWS:
    return (f"{group} query heads per KV head is more than {ROWS} (a GQA group is one MMA's "
            "rows)")
  if jnp.dtype(dtype) not in [jnp.dtype(d) for d in DTYPES]:
    return f"dtype {jnp.dtype(dtype).name} is not bfloat16 or float16 (WGMMA's transposed operands)"
  if head_dim not in HEAD_DIMS:
    return (f"head_dim {head_dim} is not 64, 128 or 256 (a 128-byte swizzled row at least; "
            f"at most {WG_COLS} output columns per warpgroup, two warpgroups)")
  return None


def warpgroups(head_dim: int) -> int:
  """Warpgroups per program: one per WG_COLS output columns."""
  return max(1, head_dim // WG_COLS)


def pieces(page_size: int, max_pages: int, block_k: int) -> int | str:
  """How many TMA copies bring one key block in (one per page when pages are smaller than
  the block), or why the page size does not fit the block."""
  if block_k % BLOCK_K:
    return f"block_k {block_k} is not a multiple of {BLOCK_K}"
  if page_size % 8:
    what = "cache length" if max_pages == 1 else "page size"
    return (f"the {what} {page_size} is not a multiple of 8 (a TMA copy into WGMMA's layout "
            f"moves whole 8-row tiles)")
  if max_pages == 1 or page_size % block_k == 0:
    return 1  # contiguous (one page per row), or pages of whole blocks
  if block_k % page_size == 0:
    return block_k // page_size  # one copy per page
  return (f"the page size {page_size} neither divides nor is a multiple of the {block_k}-key "
          f"block (take 8, 16, 32 or a multiple of {block_k})")


def _kernel(lengths_gmem, table_gmem, phi_gmem, active_gmem, q_gmem, k_gmem, v_gmem,
            o_gmem, l_gmem, m_gmem, *, sm_scale, block_k, n_pieces, split_len, stages, online,
            window, softcap, heads_major):
  b, h, split = (jax.lax.axis_index(a) for a in ("b", "h", "s"))
  dtype, d = q_gmem.dtype, q_gmem.shape[-1]
  n_wg = warpgroups(d)
  cols = d // n_wg  # this warpgroup's output columns
  wg = jax.lax.axis_index("wg") if n_wg > 1 else 0
  lead = pl.when(wg == 0) if n_wg > 1 else (lambda f: f())  # warpgroup 0's part
  num_pages, page_size = k_gmem.shape[1:3] if heads_major else k_gmem.shape[:2]
  lo, start, end = split_range(lengths_gmem[b], split, split_len, block_k, window)
  n_blocks = jnp.where(active_gmem[b, h] != 0, pl.cdiv(jnp.maximum(end - start, 0), block_k), 0)
  phi = phi_gmem[0]

  rows = block_k // n_pieces  # keys per copy: the block, or one page of it

  def piece(j, i):
    """Where piece i of key block j lives: its index into K or V ((KV head, page, entries)
    heads-major, (page, entries, KV head) in a contiguous cache's layout). A piece wholly
    outside the row's visible keys (a page before the window, which may be gone, or past
    the row's last page) is read from a page of the row instead: finite, and weighed 0."""
    first = start + j * block_k + i * rows
    key = jnp.clip(first, lo, end - 1)
    page = jnp.clip(table_gmem[b, key // page_size], 0, num_pages - 1)
    entries = pl.ds(first % page_size, rows)
    return (h, page, entries) if heads_major else (page, entries, h)

  def attend(q_smem, k_smem, v_smem, p_smem, q_bar, k_bar, v_bar, *sync):
    def fetch(j, slot):  # by warpgroup 0: one copy per piece (and per warpgroup's V columns)
      for i in range(n_pieces):
        at, into = piece(j, i), pl.ds(i * rows, rows)
        plgpu.copy_gmem_to_smem(k_gmem.at[at], k_smem.at[slot, into], k_bar.at[slot])
        for w in range(n_wg):
          plgpu.copy_gmem_to_smem(v_gmem.at[(*at, pl.ds(w * cols, cols))],
                                  v_smem.at[slot, w, into], v_bar.at[slot])

    @lead
    def _():
      plgpu.copy_gmem_to_smem(q_gmem.at[b, h], q_smem, q_bar)
      for i in range(stages):
        pl.when(i < n_blocks)(functools.partial(fetch, i, i))

    plgpu.barrier_wait(q_bar)
    v_mine, p_mine = v_smem.at[:, wg], p_smem.at[wg]

    def body(acc_ref, j, carry):
      l, m, acc = carry
      slot = jax.lax.rem(j, stages)
      plgpu.barrier_wait(k_bar.at[slot])

      def scores(s_ref):
        plgpu.wgmma(s_ref, q_smem, k_smem.at[slot].T)
        return s_ref[...]

      s = pl.run_scoped(scores, plgpu.ACC((ROWS, block_k), jnp.float32))
      s = asm.cap(s * sm_scale, softcap)
      key = start + j * block_k + plgpu.broadcasted_iota(
          jnp.int32, (ROWS, block_k), 1, layout=plgpu.Layout.WGMMA)
      s = jnp.where((key < end) & (key >= lo), s, -jnp.inf)
      m_new = jnp.maximum(m, s.max(axis=1))
      if online:  # synchronised: rescale what came before to the new running max
        p = jnp.exp(s - jax.lax.broadcast_in_dim(m_new, s.shape, [0]))
        alpha = jnp.exp(m - m_new)
        acc = acc * jax.lax.broadcast_in_dim(alpha, acc.shape, [0])
        l = l * alpha
      else:  # async: one fixed phi, no rescale
        p = jnp.exp(s - phi)
      p = p.astype(dtype)  # the weights rounded once: numerator and denominator agree
      l = l + p.astype(jnp.float32).sum(axis=1)
      p_mine[...] = p
      plgpu.commit_smem()  # the MMA reads p from shared memory through the async proxy
      plgpu.barrier_wait(v_bar.at[slot])
      if online:
        def weighted(pv_ref):
          plgpu.wgmma(pv_ref, p_mine, v_mine.at[slot])
          return pv_ref[...]

        acc = acc + pl.run_scoped(weighted, plgpu.ACC((ROWS, cols), jnp.float32))
      else:  # nothing to rescale: the MMA adds p @ V into its accumulator in place
        plgpu.wgmma(acc_ref, p_mine, v_mine.at[slot])
        plgpu.wgmma_wait(0)  # p's buffer and the slot are refilled next
      refill = functools.partial(fetch, j + stages, slot)
      if n_wg > 1:  # the slot is refilled once every warpgroup is done with it
        done = sync[0]
        plgpu.barrier_arrive(done.at[slot])

        def refill(refill=refill):
          plgpu.barrier_wait(done.at[slot])
          refill()
      pl.when((j + stages < n_blocks) & (wg == 0))(refill)
      return l, m_new, acc

    per_row = plgpu.Layout.WGMMA.reduce(1)
    init = (plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), per_row),
            plgpu.layout_cast(jnp.full((ROWS,), -jnp.inf, jnp.float32), per_row),
            plgpu.layout_cast(jnp.zeros((ROWS, cols), jnp.float32), plgpu.Layout.WGMMA)
            if online else ())
    if online:
      l, m, acc = jax.lax.fori_loop(0, n_blocks, functools.partial(body, None), init)
    else:
      def in_place(acc_ref):  # the async output lives in the MMA's accumulator throughout
        l, m, _ = jax.lax.fori_loop(0, n_blocks, functools.partial(body, acc_ref), init)
        return acc_ref[...], l, m

      acc, l, m = pl.run_scoped(in_place, plgpu.ACC((ROWS, cols), jnp.float32))
    if n_wg > 1:  # every warpgroup past its last read before `write` reuses the memory
      finished = sync[1]
      plgpu.barrier_arrive(finished)
      plgpu.barrier_wait(finished)
    return acc, l, m

  every = dict(collective_axes="wg") if n_wg > 1 else {}  # one allocation for the program
  acc, l, m = pl.run_scoped(
      attend, plgpu.SMEM((ROWS, d), dtype, transforms=shared.transforms(d, dtype)),
      plgpu.SMEM((stages, block_k, d), dtype, transforms=shared.transforms(d, dtype)),
      plgpu.SMEM((stages, n_wg, block_k, cols), dtype, transforms=shared.transforms(cols, dtype)),
      plgpu.SMEM((n_wg, ROWS, block_k), dtype, transforms=shared.transforms(block_k, dtype)),
      plgpu.Barrier(), plgpu.Barrier(num_arrivals=n_pieces, num_barriers=stages),
      plgpu.Barrier(num_arrivals=n_pieces * n_wg, num_barriers=stages),
      *([plgpu.Barrier(num_arrivals=n_wg, num_barriers=stages),  # done: a slot's reads
         plgpu.Barrier(num_arrivals=n_wg)] if n_wg > 1 else []), **every)  # finished

  def write(o_smem, l_smem, m_smem):
    g = o_gmem.shape[4]
    o_smem.at[wg][...] = acc
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem.at[wg, pl.ds(0, g)], o_gmem.at[b, h, split, wg])

    @lead
    def _():  # the row statistics: the same in every warpgroup
      l_smem[...] = l
      m_smem[...] = m
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(l_smem.at[pl.ds(0, g)], l_gmem.at[b, h, split])
      plgpu.copy_smem_to_gmem(m_smem.at[pl.ds(0, g)], m_gmem.at[b, h, split])

    plgpu.wait_smem_to_gmem(0)

  pl.run_scoped(write, plgpu.SMEM((n_wg, ROWS, cols), jnp.float32),
                plgpu.SMEM((ROWS,), jnp.float32), plgpu.SMEM((ROWS,), jnp.float32), **every)


def settings_for(batch: int, kv_heads: int, max_keys: int, head_dim: int, window=None,
                 settings: Settings | None = None) -> Settings:
  """The settings a call runs with: `settings`' fields, the rest from `default` for the keys
  a row's splits cover (max_keys: what the page table addresses)."""
  block_k = (settings and settings.block_k) or BLOCK_K
  return tiling.fill(settings, Settings.default(batch, kv_heads,
                                                key_span(max_keys, window, block_k), head_dim,
                                                block_k))


def splits(max_keys: int, window, settings: Settings) -> tuple[int, int]:
  """(keys per split, splits) of a row: the launch grid is (batch, KV heads, splits)."""
  span = key_span(max_keys, window, settings.block_k)
  split_len = pl.cdiv(pl.cdiv(span, settings.num_splits), settings.block_k) * settings.block_k
  return split_len, pl.cdiv(span, split_len)


def _partials(q, k, v, lengths, table, phi, active, *, g_out, n_pieces, sm_scale, settings,
              online, window, softcap, interpret, heads_major):
  b, hkv, _, d = q.shape
  split_len, n_split = splits(table.shape[1] * k.shape[2 if heads_major else 1], window,
                              settings)

  def body(*refs):
    _kernel(*refs, sm_scale=sm_scale, block_k=settings.block_k, n_pieces=n_pieces,
            split_len=split_len, stages=settings.stages, online=online, window=window,
            softcap=softcap, heads_major=heads_major)

  body.__name__ = "fdjax_mgpu_decode_online" if online else "fdjax_mgpu_decode_async"
  n_wg = warpgroups(d)
  stat = jax.ShapeDtypeStruct((b, hkv, n_split, g_out), jnp.float32)
  threads = dict(num_threads=n_wg, thread_name="wg") if n_wg > 1 else {}
  o, l, m = plgpu.kernel(
      body,
      out_type=(jax.ShapeDtypeStruct((b, hkv, n_split, n_wg, g_out, d // n_wg), jnp.float32),
                stat, stat),
      grid=(b, hkv, n_split), grid_names=("b", "h", "s"), **threads,
      **shared.interpret_kwargs(interpret),
  )(lengths, table, phi, active, q, k, v)
  # each warpgroup's columns side by side: [B, Hkv, splits, rows, D]
  return jnp.moveaxis(o, 3, 4).reshape(b, hkv, n_split, g_out, d), l, m


def decode_attention(q, k_cache, v_cache, lengths, **kwargs):
  """q [B, Hq, D]; caches [B, S, Hkv, D]; lengths [B] -> [B, Hq, D] (and stats): the paged
  kernel with one page of S entries per row, read in the caches' own (token-major) layout.
  Keyword arguments as paged_decode_attention."""
  table = jnp.arange(q.shape[0], dtype=jnp.int32)[:, None]
  return _attend(q, k_cache, v_cache, table, lengths, heads_major=False, **kwargs)


def paged_decode_attention(q, k_pages, v_pages, page_table, lengths, **kwargs):
  """q [B, Hq, D]; pages [Hkv, P, page_size, D] (heads-major: a piece of one head's keys is
  one contiguous run for its TMA copy); page_table [B, max_pages] int; lengths [B] -> [B, Hq,
  D] (and stats), as the Triton kernel of the same name."""
  return _attend(q, k_pages, v_pages, page_table, lengths, heads_major=True, **kwargs)


@asm.jitted
def _attend(q, k_pages, v_pages, page_table, lengths, *, heads_major, sm_scale, phi=None,
            window=None, softcap=None, mode="async", settings: Settings | None = None,
            interpret=False, return_stats=False, select=False):
  """Either entry point: pages [Hkv, P, page_size, D] if heads_major, else [P, page_size,
  Hkv, D]; `select` as asm.guarded's (asm.jitted sets it by select_guard)."""
  asm.check_mode("decode_attention", mode)
  asm.check_options("decode_attention", window, softcap)
  b, hq, d = q.shape
  hkv, page_size = ((k_pages.shape[0], k_pages.shape[2]) if heads_major else
                    (k_pages.shape[2], k_pages.shape[1]))
  g = hq // hkv
  why = unsupported(d, q.dtype, g)
  if why:
    raise ValueError(f"decode_attention (Mosaic GPU): {why}")
  s = page_table.shape[1] * page_size
  settings = settings_for(b, hkv, s, d, window, settings)
  n_pieces = pieces(page_size, page_table.shape[1], settings.block_k)
  if isinstance(n_pieces, str):
    raise ValueError(f"paged_decode_attention (Mosaic GPU): {n_pieces}")
  g_out = pl.cdiv(g, OUT_ROWS) * OUT_ROWS
  qg = jnp.pad(q.reshape(b, hkv, g, d), ((0, 0), (0, 0), (0, ROWS - g), (0, 0)))
  lengths = asm.row_lengths(lengths, b, s)
  phi = asm.phi_operand(phi)
  run = functools.partial(_partials, qg, k_pages, v_pages, lengths,
                          page_table.astype(jnp.int32), phi, g_out=g_out, n_pieces=n_pieces,
                          sm_scale=sm_scale, settings=settings, window=window, softcap=softcap,
                          interpret=interpret, heads_major=heads_major)
  return asm.guarded_groups(run, phi, mode, b, hkv, g, g_out, q.dtype, return_stats,
                            select, weights_dtype=q.dtype)  # p is rounded to q's dtype
