"""Mixture-of-experts in plain XLA: route each token to its top-k experts, run those experts'
gated MLPs, and sum their outputs weighted by the router.

x [T, H]; router logits [T, E]; expert weights w_gate_up [E, H, 2F] (gate then up, fused along
the last axis as the dense MLP's) and w_down [E, F, H]. Four ways to compute the same thing,
which differ in how many expert matrices they read and how many rows they multiply
(fdjax.ops.selection.moe picks one by tokens per expert, FlashDecoding++'s heuristic dataflow
applied to experts):

  "dense"    every expert on every token, the outputs combined with a [T, E] matrix of routing
             weights (zero for the experts a token did not pick): reads all E experts, T x E
             rows. The reference (float64 in the tests), and the cheapest for long prompts
             over few experts.
  "gather"   one GEMV per (token, expert) pair: each pair's expert matrices gathered, T x k
             matrices read, no padded rows (the dataflow of a GEMV kernel per pair; as XLA
             runs it on the CPU, M = 1 products slower than the grouped tiles).
  "grouped"  pairs sorted by expert and cut into tiles of `tile` rows (8 to 128, not 64 as
             vLLM's fused MoE pads), each tile one expert's GEMM: what the grouped flat GEMM
             kernels compute. An expert with no token has no tile. The tile count is a static
             upper bound (cdiv(T k, tile) + min(E, T k) - 1); tiles past the real ones compute
             masked rows.
  "ragged"   pairs sorted by expert and XLA's `lax.ragged_dot` over the groups.

Expert weights may be int8 / int4 (fdjax.ops.quant.QuantizedWeight, stacked per expert): XLA
dequantizes what a strategy reads (every expert for "dense" and "ragged", the gathered
experts of the pairs or tiles otherwise) to x's dtype and multiplies as for float weights; a
Pallas grouped GEMM reads the stored bytes.

Every strategy accumulates in float32 (float64 for float64 inputs), applies the activation to
the gate in that precision, rounds the hidden activations to x's dtype once (as a dense MLP
does between its two linears), and combines in float32.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from fdjax.ops import checks, quant

STRATEGIES = ("dense", "gather", "grouped", "ragged")
HIGHEST = jax.lax.Precision.HIGHEST


def route(logits, top_k: int, normalize: bool):
  """Router logits [T, E] -> (weights [T, k] float32, experts [T, k] int32): a softmax over all
  experts in float32, the k most probable, renormalised to sum to 1 with `normalize`
  (Mixtral always; Qwen's norm_topk_prob)."""
  probs = jax.nn.softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)
  weights, experts = jax.lax.top_k(probs, top_k)
  if normalize:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return weights, experts.astype(jnp.int32)


def _acc_dtype(x):
  return jnp.promote_types(x.dtype, jnp.float32)


def _mlp_hidden(gate_up, activation, dtype):
  """act(gate) * up of a fused [..., 2F] product, rounded to the activations' dtype."""
  f = gate_up.shape[-1] // 2
  return (activation(gate_up[..., :f]) * gate_up[..., f:]).astype(dtype)


def _whole(w, dtype):
  """Every expert's weight as an array (a quantized one dequantized to `dtype`)."""
  return quant.dequantize(w, dtype) if isinstance(w, quant.QuantizedWeight) else w


def _take(w, index, dtype):
  """The experts' weights at `index` (w[index]; a quantized one's dequantized to `dtype`)."""
  if isinstance(w, quant.QuantizedWeight):
    return quant.dequantize(quant.take(w, index), dtype)
  return w[index]


def dense(x, weights, experts, w_gate_up, w_down, activation):
  e = w_gate_up.shape[0]
  acc = _acc_dtype(x)
  w_gate_up, w_down = _whole(w_gate_up, x.dtype), _whole(w_down, x.dtype)
  gu = jnp.einsum("th,ehf->etf", x, w_gate_up, precision=HIGHEST, preferred_element_type=acc)
  out = jnp.einsum("etf,efh->eth", _mlp_hidden(gu, activation, x.dtype), w_down,
                   precision=HIGHEST, preferred_element_type=acc)
  combine = jnp.sum(jax.nn.one_hot(experts, e, dtype=acc) * weights[..., None].astype(acc),
                    axis=1)  # [T, E]
  return jnp.einsum("te,eth->th", combine, out, precision=HIGHEST).astype(x.dtype)


def gather(x, weights, experts, w_gate_up, w_down, activation):
  acc = _acc_dtype(x)
  gu = jnp.einsum("th,tkhf->tkf", x, _take(w_gate_up, experts, x.dtype), precision=HIGHEST,
                  preferred_element_type=acc)
  out = jnp.einsum("tkf,tkfh->tkh", _mlp_hidden(gu, activation, x.dtype),
                   _take(w_down, experts, x.dtype),
                   precision=HIGHEST, preferred_element_type=acc)
  return jnp.einsum("tk,tkh->th", weights.astype(acc), out, precision=HIGHEST).astype(x.dtype)


def sort_pairs(experts, num_experts: int):
  """The (token, expert) pairs sorted by expert: (order [P] of the flattened pairs, the token
  of each sorted pair [P], pairs per expert [E])."""
  flat = experts.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  tokens = (order // experts.shape[1]).astype(jnp.int32)
  counts = jnp.zeros((num_experts,), jnp.int32).at[flat].add(1)
  return order, tokens, counts


def tile_count(pairs: int, num_experts: int, tile: int) -> int:
  """The most tiles `pairs` sorted pairs over `num_experts` experts can need: each nonempty
  expert's last tile may be partial."""
  return max(0, min(pairs, checks.cdiv(pairs, tile) + min(num_experts, pairs) - 1))


def tiles(experts, num_experts: int, tile: int):
  """The grouped strategy's tiles: (expert of each tile [N], -1 for a tile past the real ones;
  sorted-pair index of each tile row [N, tile]; whether the row holds a pair [N, tile]), plus
  the sort (order, tokens)."""
  pairs = experts.size
  order, tokens, counts = sort_pairs(experts, num_experts)
  n = tile_count(pairs, num_experts, tile)
  per_expert = checks.cdiv(counts, tile)  # tiles per expert
  tile_end = jnp.cumsum(per_expert)
  first_pair = jnp.cumsum(counts) - counts
  i = jnp.arange(n, dtype=jnp.int32)
  expert = jnp.minimum(jnp.searchsorted(tile_end, i, side="right"), num_experts - 1)
  row0 = (i - (tile_end[expert] - per_expert[expert])) * tile  # the tile's first row in its expert
  rows = row0[:, None] + jnp.arange(tile, dtype=jnp.int32)[None, :]
  valid = (i[:, None] < tile_end[-1]) & (rows < counts[expert][:, None])
  index = jnp.where(valid, first_pair[expert][:, None] + rows, 0)
  expert = jnp.where(i < tile_end[-1], expert, -1)
  return expert.astype(jnp.int32), index, valid, order, tokens


GATHER_BYTES = 256 * 2**20  # the most expert weights tile_matmul copies at once


def tile_matmul(rows, expert, w):
  """Each tile's rows [N, R, K] times its expert's weight (w [E, K, M], float or quantized;
  expert [N], -1 for an empty tile) -> [N, R, M] in the accumulation dtype: XLA, on gathered
  (dequantized) copies of the tiles' experts, GATHER_BYTES of them at a time (a long prompt's
  hundreds of tiles would otherwise copy gigabytes); an empty tile's product is garbage,
  dropped by the caller. The Pallas kernels have this signature."""
  acc = _acc_dtype(rows)

  def product(r, e):
    return jnp.einsum("...rk,...km->...rm", r,
                      _take(w, jnp.clip(e, 0, w.shape[0] - 1), rows.dtype),
                      precision=HIGHEST, preferred_element_type=acc)

  chunk = max(1, GATHER_BYTES // (w.shape[1] * w.shape[2] * rows.dtype.itemsize))
  if rows.shape[0] <= chunk:
    return product(rows, expert)
  return jax.lax.map(lambda a: product(*a), (rows, expert), batch_size=chunk)


def grouped(x, weights, experts, w_gate_up, w_down, activation, tile: int = 8, matmul=None):
  """`matmul`: tile_matmul's signature (a Pallas grouped GEMM), default XLA's."""
  e = w_gate_up.shape[0]
  acc = _acc_dtype(x)
  matmul = matmul or tile_matmul
  expert, index, valid, order, tokens = tiles(experts, e, tile)
  rows = jnp.where(valid[..., None], x[tokens[index]], 0)  # [N, tile, H]
  gu = matmul(rows, expert, w_gate_up).astype(acc)
  out = matmul(_mlp_hidden(gu, activation, x.dtype), expert, w_down).astype(acc)
  pair = order[index]  # the flattened (token, k) pair of each tile row
  w = jnp.where(valid, weights.reshape(-1)[pair].astype(acc), 0)
  out = jnp.where(valid[..., None], out, 0)  # an empty tile's rows may be anything
  y = jnp.zeros((x.shape[0], x.shape[1]), acc).at[tokens[index].reshape(-1)].add(
      (w[..., None] * out).reshape(-1, x.shape[1]))
  return y.astype(x.dtype)


def ragged(x, weights, experts, w_gate_up, w_down, activation):
  e = w_gate_up.shape[0]
  acc = _acc_dtype(x)
  order, tokens, counts = sort_pairs(experts, e)
  w_gate_up, w_down = _whole(w_gate_up, x.dtype), _whole(w_down, x.dtype)
  gu = jax.lax.ragged_dot(x[tokens], w_gate_up, counts, precision=HIGHEST,
                          preferred_element_type=acc)
  out = jax.lax.ragged_dot(_mlp_hidden(gu, activation, x.dtype), w_down, counts,
                           precision=HIGHEST, preferred_element_type=acc)
  w = weights.reshape(-1)[order].astype(acc)
  y = jnp.zeros(x.shape, acc).at[tokens].add(w[:, None] * out)
  return y.astype(x.dtype)


def run(strategy: str, x, weights, experts, w_gate_up, w_down, activation, tile: int = 8,
        matmul=None):
  """The experts' combined output [T, H] by `strategy` (one of STRATEGIES; "grouped"'s tile
  products by `matmul`, default XLA's)."""
  fn = {"dense": dense, "gather": gather, "ragged": ragged,
        "grouped": functools.partial(grouped, tile=tile, matmul=matmul)}[strategy]
  return fn(x, weights, experts, w_gate_up, w_down, activation)
