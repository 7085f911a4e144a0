"""Causal flash attention for prefill with FlashDecoding++'s asynchronous softmax (Pallas,
Triton).

Grid (batch, query head, query block). A program loads its [block_q, D] queries once and
walks the keys of its KV head (GQA: query head h reads KV head h // group) in blocks of
`block_k`, only up to the last key any of its rows may see (causal, and the row's length).
In "async" mode each block adds exp(s - phi) against the unified max value phi with no
rescaling of the accumulator; rows the guard (async_softmax.py) flags are recomputed in
the same jitted function by the same kernel in "online" mode, for the flagged query blocks
only. Lengths that are not multiples of the blocks are masked on load and store. A chunk of
a prompt after cached keys is the same call with the queries' first position `q_start`.

With a sliding window W a query at position p sees keys p - W < j <= p: a program's loop
starts at the block of its first query's oldest visible key, so it reads about W + block_q
keys whatever the prompt's length. Gemma's soft-capping, softcap * tanh(s / softcap), is
applied to the scaled scores before the softmax.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.common import async_softmax as asm
from pallas_kernels.common import tiling
from pallas_kernels.triton import shared
from pallas_kernels.triton.shared import plgpu

# block_q * block_k * head_dim by dtype size: 64 x 64 at head_dim 128 in bfloat16 (194
# registers; 64 x 64 at 256 spills), 16 x 32 at 128 and 32 x 32 at 64 in float32.
TILE_LIMITS = {2: 1 << 19, 4: 1 << 16}


@dataclasses.dataclass(frozen=True)
class Settings:
  """The kernel's knobs; None takes `default`'s value for the shapes."""
  block_q: int | None = None
  block_k: int | None = None
  num_warps: int | None = None
  num_stages: int | None = None

  @classmethod
  def default(cls, t: int, s: int, head_dim: int = 128, dtype=jnp.bfloat16) -> "Settings":
    """64 x 64 blocks (fewer for short prompts or few keys), shrunk to TILE_LIMITS; 8 warps
    beyond head_dim 128 (head_dim 256's 32 x 64 blocks spill at 4 warps when compiled for
    the H100 by jax 0.12's Triton and CUDA 13's ptxas)."""
    block_q, block_k = shared.fit_blocks(min(64, max(16, pl.next_power_of_2(t))),
                                         min(64, max(16, pl.next_power_of_2(s))), head_dim,
                                         dtype, TILE_LIMITS)
    return cls(block_q=block_q, block_k=block_k, num_warps=8 if head_dim > 128 else 4,
               num_stages=2)


def _kernel(lengths_ref, start_ref, phi_ref, active_ref, q_ref, k_ref, v_ref, o_ref, l_ref,
            m_ref, *, sm_scale, block_q, block_k, group, causal, online, window, softcap):
  b, h, qb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  t = q_ref.shape[1]
  f32 = q_ref.dtype == jnp.float32
  hk = h // group
  length = lengths_ref[b]
  q_first = qb * block_q
  q_rows = q_first + jnp.arange(block_q) < t
  q_pos = start_ref[b] + q_first + jnp.arange(block_q)  # absolute positions of the queries
  q = plgpu.load(q_ref.at[b, pl.ds(q_first, block_q), h, :], mask=q_rows[:, None], other=0.0)
  kv_end = jnp.minimum(length, start_ref[b] + q_first + block_q) if causal else length
  n_blocks = jnp.where(active_ref[b, h, qb] != 0, pl.cdiv(kv_end, block_k), 0)
  # the first block holding a key the block's first query still sees (0 without a window)
  first_block = 0 if window is None else jnp.maximum(
      start_ref[b] + q_first - window + 1, 0) // block_k
  phi = phi_ref[0]

  def body(j, carry):
    acc, l, m = carry
    k_pos = j * block_k + jnp.arange(block_k)
    k_ok = k_pos < length
    k = plgpu.load(k_ref.at[b, pl.ds(j * block_k, block_k), hk, :], mask=k_ok[:, None],
                   other=0.0)
    v = plgpu.load(v_ref.at[b, pl.ds(j * block_k, block_k), hk, :], mask=k_ok[:, None],
                   other=0.0)
    s = asm.cap(plgpu.dot(q, k, trans_b=True, allow_tf32=not f32) * sm_scale, softcap)
    mask = k_ok[None, :]
    if causal:
      mask = mask & (k_pos[None, :] <= q_pos[:, None])
    if window is not None:
      mask = mask & (q_pos[:, None] - k_pos[None, :] < window)
    s = jnp.where(mask, s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    if online:
      m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
      p = jnp.exp(s - m_safe[:, None])
      alpha = jnp.exp(m - m_safe)
      acc = acc * alpha[:, None]
      l = l * alpha
    else:
      p = jnp.exp(s - phi)
    p = p.astype(v.dtype)  # rounded once: numerator and denominator see the same weights
    acc = acc + plgpu.dot(p, v, allow_tf32=not f32)
    return acc, l + jnp.sum(p.astype(jnp.float32), axis=1), m_new

  d = q.shape[-1]
  init = (jnp.zeros((block_q, d), jnp.float32), jnp.zeros((block_q,), jnp.float32),
          jnp.full((block_q,), -jnp.inf, jnp.float32))
  acc, l, m = jax.lax.fori_loop(first_block, n_blocks, body, init)
  out = acc / jnp.where(l > 0, l, 1.0)[:, None]
  plgpu.store(o_ref.at[b, pl.ds(q_first, block_q), h, :], out.astype(o_ref.dtype),
              mask=q_rows[:, None])
  l_ref[b, h, pl.ds(q_first, block_q)] = l
  m_ref[b, h, pl.ds(q_first, block_q)] = m


def _run(q, k, v, lengths, start, phi, active, *, sm_scale, settings, causal, online, window,
         softcap, interpret):
  b, t, hq, d = q.shape
  block_q = settings.block_q
  nq = pl.cdiv(t, block_q)
  kernel = functools.partial(_kernel, sm_scale=sm_scale, block_q=block_q,
                             block_k=settings.block_k, group=hq // k.shape[2], causal=causal,
                             online=online, window=window, softcap=softcap)
  stat = jax.ShapeDtypeStruct((b, hq, nq * block_q), jnp.float32)
  return shared.call(
      kernel, (lengths, start, phi, active, q, k, v), grid=(b, hq, nq),
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), stat, stat], settings=settings,
      interpret=interpret, name="fdjax_prefill_online" if online else "fdjax_prefill_async")


@asm.jitted
def prefill_attention(q, k, v, lengths=None, *, sm_scale, q_start=None, causal=True, phi=None,
                      window=None, softcap=None, mode="async", settings: Settings | None = None,
                      interpret=False, return_stats=False, select=False):
  """q [B, T, Hq, D]; k, v [B, S, Hkv, D]; lengths [B] or None = valid keys; query i of row b
  at position q_start[b] + i (default 0; a chunk of a prompt after S' cached keys starts at
  S'); `window` W: each query sees its last W keys (causal only); `softcap`: scores
  soft-capped -> [B, T, Hq, D] (and stats). `select` as asm.guarded's (asm.jitted sets it
  by select_guard)."""
  asm.check_call("prefill_attention", q, mode, window, softcap, causal)
  b, t, hq, d = q.shape
  s = k.shape[1]
  settings = tiling.fill(settings, Settings.default(t, s, d, q.dtype))
  block_q = settings.block_q
  nq = pl.cdiv(t, block_q)
  lengths = asm.row_lengths(lengths, b, s)
  start = jnp.zeros((b,), jnp.int32) if q_start is None else q_start.astype(jnp.int32)
  phi = asm.phi_operand(phi)
  run = functools.partial(_run, q, k, v, lengths, start, phi, sm_scale=sm_scale,
                          settings=settings, causal=causal, window=window, softcap=softcap,
                          interpret=interpret)

  def run_async():
    out, l, m = run(jnp.ones((b, hq, nq), jnp.int32), online=False)
    return out, asm.needs_recompute(m[:, :, :t].transpose(0, 2, 1),
                                    l[:, :, :t].transpose(0, 2, 1), out.astype(jnp.float32),
                                    phi[0])  # [B, T, Hq]

  def run_online(flags):  # only the query blocks holding a flagged row run
    if flags is None:
      active = jnp.ones((b, hq, nq), bool)
    else:
      per_block = jnp.pad(flags, ((0, 0), (0, nq * block_q - t), (0, 0)))
      active = jnp.any(per_block.reshape(b, nq, block_q, hq), axis=2).transpose(0, 2, 1)
    return run(active.astype(jnp.int32), online=True)[0]

  out, flags = asm.guarded(mode, run_async, run_online, jnp.zeros((b, t, hq), bool),
                           select)
  return (out, asm.stats(flags)) if return_stats else out
