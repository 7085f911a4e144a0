"""Fused CoPE attention (contextual position encoding, Golovneva et al. 2024) in one pass
(Pallas, Triton).

No fused CoPE kernel is known elsewhere: positions p_ij = sum_{k=j..i} g_ik are a reverse
cumulative sum of the gates from the query back, so libraries materialise the whole
[T, S] gate matrix. Walking the key blocks from the newest to the oldest makes one pass
enough: each query row carries the sum of the gates of the keys already visited (all newer
than the current block), and inside a block the reverse cumulative sum is a product with an
upper-triangular matrix of ones (one tensor-core dot). The position logit z_i(p), linear
interpolation of z_i[n] = q_i . e[n] between floor(p) and ceil(p), equals
sum_n z_i[n] max(0, 1 - |p - n|): a short loop over only the integer positions the block's
p spans, reading z (precomputed, [T, npos] per head) one column at a time. The softmax is
the online (synchronised) one.

Grid (batch, query head, query block); GQA maps query head h to KV head h // group. Query i
sits at absolute position q_start[b] + i (default S - T); keys at or past the row's length
are masked.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.common import async_softmax as asm
from pallas_kernels.common import tiling
from pallas_kernels.triton import prefill_attention, shared
from pallas_kernels.triton.shared import plgpu

# block_q * block_k * head_dim by dtype size: 32 x 32 at head_dim 128 in bfloat16; in
# float32 16 x 16 at 128 (16 x 32 spills in a decode step) and 16 x 32 at 64.
TILE_LIMITS = {2: 1 << 17, 4: 1 << 15}


class Settings(prefill_attention.Settings):
  """The prefill kernel's knobs, with CoPE's defaults."""

  @classmethod
  def default(cls, t: int, s: int, head_dim: int = 128, dtype=jnp.bfloat16,
              gated: bool = False) -> "Settings":
    """32 x 32 (fewer for short inputs), shrunk to TILE_LIMITS: at 64 x 64 the score, gate,
    position and logit tiles live together and the kernel spills (255 registers). Gates
    from keys of their own in float32 take 8 warps: with 4, the described H100's ptxas
    spills at 16 x 16 (255 registers; 8 warps: 178, none spilled)."""
    block_q, block_k = shared.fit_blocks(min(32, max(16, pl.next_power_of_2(t))),
                                         min(32, max(16, pl.next_power_of_2(s))), head_dim,
                                         dtype, TILE_LIMITS)
    warps = 8 if gated and jnp.dtype(dtype).itemsize == 4 else 4
    return cls(block_q=block_q, block_k=block_k, num_warps=warps, num_stages=2)


def _kernel(lengths_ref, start_ref, q_ref, k_ref, v_ref, z_ref, *refs, sm_scale, block_q,
            block_k, group, npos, gated):
  gk_ref, o_ref = refs if gated else (None, refs[0])
  b, h, qb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  t = q_ref.shape[1]
  f32 = q_ref.dtype == jnp.float32
  hk = h // group
  length = lengths_ref[b]
  q_first = qb * block_q
  rows_ok = q_first + jnp.arange(block_q) < t
  q_pos = start_ref[b] + q_first + jnp.arange(block_q)
  q = plgpu.load(q_ref.at[b, pl.ds(q_first, block_q), h, :], mask=rows_ok[:, None], other=0.0)
  kv_end = jnp.minimum(length, start_ref[b] + q_first + block_q)
  n_blocks = pl.cdiv(jnp.maximum(kv_end, 0), block_k)
  idx = jnp.arange(block_k)
  upper = (idx[:, None] >= idx[None, :]).astype(jnp.float32)  # reverse cumsum as a dot

  def body(jj, carry):
    acc, l, m, gate_sum = carry
    j = n_blocks - 1 - jj  # newest block first
    k_pos = j * block_k + idx
    k_ok = k_pos < length
    k = plgpu.load(k_ref.at[b, pl.ds(j * block_k, block_k), hk, :], mask=k_ok[:, None],
                   other=0.0)
    v = plgpu.load(v_ref.at[b, pl.ds(j * block_k, block_k), hk, :], mask=k_ok[:, None],
                   other=0.0)
    s = plgpu.dot(q, k, trans_b=True, allow_tf32=not f32) * sm_scale
    mask = k_ok[None, :] & (k_pos[None, :] <= q_pos[:, None])
    gs = s
    if gated:  # the gates' own keys (the values, or a projection of their own)
      gk = plgpu.load(gk_ref.at[b, pl.ds(j * block_k, block_k), hk, :], mask=k_ok[:, None],
                      other=0.0)
      gs = plgpu.dot(q, gk, trans_b=True, allow_tf32=not f32) * sm_scale
    g = jnp.where(mask, jax.nn.sigmoid(gs), 0.0)
    pos = gate_sum[:, None] + plgpu.dot(g, upper, allow_tf32=False)
    pos = jnp.minimum(pos, npos - 1.0)
    gate_sum = gate_sum + jnp.sum(g, axis=1)

    def add_position(n, zp):
      z = plgpu.load(z_ref.at[b, pl.ds(q_first, block_q), h, n], mask=rows_ok, other=0.0)
      return zp + z[:, None] * jnp.maximum(0.0, 1.0 - jnp.abs(pos - n.astype(jnp.float32)))

    n_lo = jnp.floor(jnp.min(pos)).astype(jnp.int32)
    n_hi = jnp.minimum(jnp.ceil(jnp.max(pos)).astype(jnp.int32), npos - 1)
    zp = jax.lax.fori_loop(n_lo, n_hi + 1, add_position, jnp.zeros_like(s))
    logits = jnp.where(mask, s + zp, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(logits, axis=1))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    p = jnp.exp(logits - m_safe[:, None]).astype(v.dtype)
    alpha = jnp.exp(m - m_safe)
    acc = acc * alpha[:, None] + plgpu.dot(p, v, allow_tf32=not f32)
    return acc, l * alpha + jnp.sum(p.astype(jnp.float32), axis=1), m_new, gate_sum

  d = q.shape[-1]
  init = (jnp.zeros((block_q, d), jnp.float32), jnp.zeros((block_q,), jnp.float32),
          jnp.full((block_q,), -jnp.inf, jnp.float32), jnp.zeros((block_q,), jnp.float32))
  acc, l, _, _ = jax.lax.fori_loop(0, n_blocks, body, init)
  out = acc / jnp.where(l > 0, l, 1.0)[:, None]
  plgpu.store(o_ref.at[b, pl.ds(q_first, block_q), h, :], out.astype(o_ref.dtype),
              mask=rows_ok[:, None])


@asm.jitted
def cope_attention(q, k, v, pos_emb, lengths=None, *, sm_scale, q_start=None, gate_keys=None,
                   pos_scale=1.0, settings: Settings | None = None, interpret=False):
  """q [B, T, Hq, D]; k, v [B, S, Hkv, D]; pos_emb [npos, D]; lengths [B] valid keys; query i
  of row b at position q_start[b] + i (default S - T) -> [B, T, Hq, D]. gate_keys [B, S, Hkv,
  D] (the values, or keys of their own) replace k in the gates; the position logits are
  q . e[n] * pos_scale."""
  asm.check_inputs("cope_attention", q)
  b, t, hq, d = q.shape
  s = k.shape[1]
  npos = pos_emb.shape[0]
  settings = tiling.fill(settings, Settings.default(t, s, q.shape[-1], q.dtype,
                                                    gated=gate_keys is not None))
  block_q = settings.block_q
  lengths = jnp.full((b,), s, jnp.int32) if lengths is None else jnp.clip(
      lengths.astype(jnp.int32), 0, s)
  start = (jnp.full((b,), s - t, jnp.int32) if q_start is None
           else q_start.astype(jnp.int32))
  z = jnp.einsum("bthd,nd->bthn", q.astype(jnp.float32), pos_emb.astype(jnp.float32),
                 precision=jax.lax.Precision.HIGHEST) * pos_scale  # Appendix B: unscaled
  gated = gate_keys is not None
  kernel = functools.partial(_kernel, sm_scale=sm_scale, block_q=block_q,
                             block_k=settings.block_k, group=hq // k.shape[2], npos=npos,
                             gated=gated)
  inputs = (lengths, start, q, k, v, z) + ((gate_keys,) if gated else ())
  return shared.call(kernel, inputs, grid=(b, hq, pl.cdiv(t, block_q)),
                     out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype), settings=settings,
                     interpret=interpret, name="fdjax_cope")
