"""Causal flash attention for prefill with FlashDecoding++'s asynchronous softmax (Pallas,
Mosaic TPU).

q, k, v are laid out head-major ([B, H, T, D]: one transpose of the prompt, small next to
the attention's T^2 work) so a block is a (rows, D) tile. Grid (batch, query head, query
block, key block); the key-block axis is "arbitrary": a float32 accumulator in VMEM and the
row sums and maxima (outputs resident across it) carry from block to block, and the result
is written at the last one. GQA: query head h reads KV head h // group. A key block no
query of the block may see (past the causal diagonal or the row's length, or before a
sliding window) is skipped, and its index map repeats a block already in VMEM, so no copy
is issued for it. In "async" mode each block adds exp(s - phi) against the unified max
value phi without rescaling; rows the guard flags (../async_softmax.py) are recomputed by
the same kernel in "online" mode, for the flagged (row, head, query block)s only. A chunk
of a prompt after cached keys is the same call with the queries' first position `q_start`.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import async_softmax as asm
from pallas_kernels.tpu import shared


@dataclasses.dataclass(frozen=True)
class Settings:
  """The kernel's knobs; None takes `default`'s value for the shapes."""
  block_q: int | None = None  # query rows per program (a multiple of 16, or all of T)
  block_k: int | None = None  # keys per grid step (a multiple of 128, or all of S)

  @classmethod
  def default(cls, t: int, s: int, head_dim: int = 128, dtype=jnp.bfloat16,
              generation: str | None = None) -> "Settings":
    """256 query rows and 512 keys (the whole prompt when shorter): a [256, 512] float32
    score tile is 512 KiB, and the MXU sees 256-row operands (v6e's array is 256 wide)."""
    del head_dim, dtype, generation  # the tiles fit VMEM many times over at any of them
    return cls(block_q=t if t <= 256 else 256, block_k=s if s <= 512 else 512)


def _kernel(lengths_ref, start_ref, active_ref, phi_ref, q_ref, k_ref, v_ref, o_ref, l_ref,
            m_ref, acc_ref, *, sm_scale, block_q, block_k, causal, online, window, softcap):
  b, h, qb, j = (pl.program_id(i) for i in range(4))
  length = lengths_ref[b]
  q0 = start_ref[b] + qb * block_q  # absolute position of the block's first query
  first, end = visible_blocks(length, q0, block_q, block_k, causal, window)

  @pl.when(j == 0)
  def _():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)

  @pl.when((active_ref[b, h, qb] != 0) & (j >= first) & (j < end))
  def _():
    k_pos = j * block_k + jax.lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
    q_pos = q0 + jax.lax.broadcasted_iota(jnp.int32, (block_q, 1), 0)
    mask = k_pos < length
    if causal:
      mask = mask & (k_pos <= q_pos)
    if window is not None:
      mask = mask & (q_pos - k_pos < window)
    s = shared.dot(q_ref[...], k_ref[...], trans_b=True)
    s = jnp.where(mask, asm.cap(s * sm_scale, softcap), -jnp.inf)
    row_ok = j * block_k + jax.lax.broadcasted_iota(jnp.int32, (block_k, 1), 0) < length
    v = jnp.where(row_ok, v_ref[...], 0)  # the edge block's padding holds anything
    m_prev = m_ref[...]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    if online:
      m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
      p = jnp.exp(s - m_safe)
      alpha = jnp.exp(m_prev - m_safe)
      acc_ref[...] = acc_ref[...] * alpha
      l_ref[...] = l_ref[...] * alpha
    else:
      p = jnp.exp(s - phi_ref[0])
    p = p.astype(v.dtype)  # rounded once: numerator and denominator see the same weights
    acc_ref[...] += shared.dot(p, v)
    l_ref[...] += jnp.sum(p.astype(jnp.float32), axis=1, keepdims=True)
    m_ref[...] = m_new

  @pl.when(j == pl.num_programs(3) - 1)
  def _():
    l = l_ref[...]
    o_ref[...] = (acc_ref[...] / jnp.where(l > 0, l, 1.0)).astype(o_ref.dtype)


def visible_blocks(length, q0, block_q, block_k, causal, window):
  """[first, end) of the key blocks a query block starting at position q0 may see: up to its
  last query (causal) and the row's length, from its first query's oldest visible key."""
  kv_end = jnp.minimum(length, q0 + block_q) if causal else length
  first = 0 if window is None else jnp.maximum(q0 - window + 1, 0) // block_k
  return first, pl.cdiv(kv_end, block_k)


def _run(q, k, v, lengths, start, phi, active, *, sm_scale, settings, causal, online, window,
         softcap, interpret):
  """q [B, Hq, T, D], k, v [B, Hkv, S, D] -> out [B, Hq, T, D], row sums and maxima
  [B, Hq, T, 1]."""
  b, hq, t, d = q.shape
  group = hq // k.shape[1]
  block_q, block_k = settings.block_q, settings.block_k
  nq, nk = pl.cdiv(t, block_q), pl.cdiv(k.shape[2], block_k)

  def kv_index(bi, h, qb, j, lengths_ref, start_ref, active_ref):
    first, end = visible_blocks(lengths_ref[bi], start_ref[bi] + qb * block_q, block_q,
                                block_k, causal, window)
    return bi, h // group, jnp.clip(j, first, jnp.maximum(end - 1, first)), 0

  rows = pl.BlockSpec((None, None, block_q, d), lambda bi, h, qb, j, *_: (bi, h, qb, 0))
  kv = pl.BlockSpec((None, None, block_k, d), kv_index)
  stat = pl.BlockSpec((None, None, block_q, 1), lambda bi, h, qb, j, *_: (bi, h, qb, 0))
  kernel = functools.partial(_kernel, sm_scale=sm_scale, block_q=block_q, block_k=block_k,
                             causal=causal, online=online, window=window, softcap=softcap)
  stat_shape = jax.ShapeDtypeStruct((b, hq, t, 1), jnp.float32)
  return shared.call(
      kernel, (phi, q, k, v), scalars=(lengths, start, active), grid=(b, hq, nq, nk),
      in_specs=[shared.smem(), rows, kv, kv], out_specs=[rows, stat, stat],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), stat_shape, stat_shape],
      scratch=[pltpu.VMEM((block_q, d), jnp.float32)],
      semantics=("parallel", "parallel", "parallel", "arbitrary"), interpret=interpret,
      name="fdjax_tpu_prefill_online" if online else "fdjax_tpu_prefill_async")


def check_blocks(settings, t, s):
  for name, block, full, unit in (("block_q", settings.block_q, t, 16),
                                  ("block_k", settings.block_k, s, 128)):
    if block != full and block % unit:
      raise ValueError(f"prefill_attention: {name} {block} must be a multiple of {unit} or "
                       f"the whole axis ({full})")


@asm.jitted
def prefill_attention(q, k, v, lengths=None, *, sm_scale, q_start=None, causal=True, phi=None,
                      window=None, softcap=None, mode="async", settings: Settings | None = None,
                      generation: str | None = None, interpret=False, return_stats=False):
  """q [B, T, Hq, D]; k, v [B, S, Hkv, D] -> [B, T, Hq, D] (and stats), as
  pallas_kernels.triton.prefill_attention.prefill_attention; `generation`, `interpret` as the TPU
  decode kernel's."""
  asm.check_call("prefill_attention", q, mode, window, softcap, causal)
  b, t, hq, d = q.shape
  s = k.shape[1]
  settings = shared.fill(settings, Settings.default(t, s, d, q.dtype, generation))
  settings = Settings(block_q=min(settings.block_q, t), block_k=min(settings.block_k, s))
  check_blocks(settings, t, s)
  nq = pl.cdiv(t, settings.block_q)
  lengths = asm.row_lengths(lengths, b, s)
  start = jnp.zeros((b,), jnp.int32) if q_start is None else q_start.astype(jnp.int32)
  phi = asm.phi_operand(phi)
  heads_first = functools.partial(jnp.transpose, axes=(0, 2, 1, 3))
  run = functools.partial(_run, heads_first(q), heads_first(k), heads_first(v), lengths, start,
                          phi, sm_scale=sm_scale, settings=settings, causal=causal,
                          window=window, softcap=softcap, interpret=interpret)

  def run_async():
    out, l, m = run(jnp.ones((b, hq, nq), jnp.int32), online=False)
    return out, asm.needs_recompute(m[..., 0], l[..., 0], out.astype(jnp.float32), phi[0])

  def run_online(flags):  # [B, Hq, T]: only the query blocks holding a flagged row run
    if flags is None:
      active = jnp.ones((b, hq, nq), bool)
    else:
      per_block = jnp.pad(flags, ((0, 0), (0, 0), (0, nq * settings.block_q - t)))
      active = jnp.any(per_block.reshape(b, hq, nq, settings.block_q), axis=3)
    return run(active.astype(jnp.int32), online=True)[0]

  out, flags = asm.guarded(mode, run_async, run_online, jnp.zeros((b, hq, t), bool))
  out = heads_first(out)
  return (out, asm.stats(flags)) if return_stats else out
