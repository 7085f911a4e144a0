"""A Llama-family decoder in Flax NNX: RMSNorm, SwiGLU, grouped-query attention, any position
encoding of models/positions.py, tied or untied embeddings, optional q/k/v bias (Qwen2).
The other families are configuration (models/config.py), not copies: per-head q/k norms
(Qwen3, Gemma 3), RMSNorm scaling by (1 + weight), GeGLU, norms after attention and MLP,
scaled embeddings, the query scale and soft-capping (Gemma 2 / 3), sliding-window layers
with their own RoPE base (Mistral, Qwen2/3, Gemma 2 / 3, Phi-3), and mixture-of-experts MLPs
(Mixtral, Qwen2-MoE, Qwen3-MoE: models/moe.py) in the layers the config makes sparse.

Every projection and every attention goes through `fdjax.ops.dispatch`; this file never picks
a kernel. Weights are laid out [in, out] (the `linear` op's [K, N]), with q/k/v fused into
one [H, (Hq + 2 Hkv) D] matrix and gate/up into one [H, 2F] matrix: four weight shapes
per layer, the four FlashDecoding++ tunes for.

Calling conventions (input_ids [B, T] int):
  model(ids)                          -> logits [B, T, V] (float32), causal, no cache
  model(ids, lengths=l)               -> the same for a right-padded ragged batch
  model(ids, cache=c, lengths=l)      -> (logits, cache): row b's first l[b] tokens (default
                                         all T) go after its c.lengths[b] cached ones (a
                                         prompt, the next chunk of one, or with T == 1 a
                                         decode step on the paged kernel); they are written
                                         to the cache, whose lengths grow by l
  last_only=True                      -> logits of each row's last valid token only [B, 1, V]
  hidden=True                         -> the final norm's output [B, T (or 1), H] (float32)
                                         instead of the logits (what embeddings pool)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fdjax.ops import dispatch
from fdjax.ops import kv_cache as kvc
from models import layout, moe, parallel, positions
from models.config import MLP_ACTIVATIONS, ModelConfig


def _normal(rngs, shape, dtype, std=0.02):
  return nnx.Param((std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype))


def _param(rngs, spec, dtype):
  """A position encoding's parameter from its (name, shape, init) spec, or None."""
  if spec is None:
    return None
  _, shape, init = spec
  return _normal(rngs, shape, dtype) if init == "normal" else nnx.Param(jnp.zeros(shape, dtype))


class RMSNorm(nnx.Module):
  """x / rms(x) * weight over the last axis; with an offset (Gemma's 1), * (offset + weight)
  in float32, rounded once (as Gemma computes it)."""

  def __init__(self, dim, eps, dtype, offset=0.0):
    self.weight = nnx.Param(jnp.full((dim,), 1.0 - offset, dtype))
    self.eps = eps
    self.offset = offset

  def __call__(self, x):
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    if self.offset:
      return (xf * (self.offset + self.weight[...].astype(jnp.float32))).astype(x.dtype)
    return self.weight[...] * xf.astype(x.dtype)


def _norm(cfg, dim, dtype, present=True):
  """The config's RMSNorm over `dim`, or None where the family has none."""
  return RMSNorm(dim, cfg.rms_norm_eps, dtype, cfg.norm_offset) if present else None


def _apply(norm, x):
  return x if norm is None else norm(x)


class Attention(nnx.Module):

  def __init__(self, cfg: ModelConfig, layer: int, *, rngs, dtype, tp=None):
    self.cfg = cfg
    self.tp = tp  # parallel.Parallel: this is one device's share of the heads
    self.layer = layer
    self.phi = None if cfg.softmax_phi is None else cfg.softmax_phi[layer]
    # Set by fdjax.tuning.calibrate: a whole-prompt call sows each query row's largest score
    # (nnx.Intermediate "score_row_max"), the range phi is chosen from.
    self.record_scores = False
    qkv_out = sum(layout.qkv_sizes(cfg))
    self.wqkv = _normal(rngs, (cfg.hidden_size, qkv_out), dtype)
    self.bqkv = nnx.Param(jnp.zeros((qkv_out,), dtype)) if cfg.qkv_bias else None
    whole = cfg.qk_norm_whole  # one norm over every head's q (k) together: OLMo 2
    self.q_norm = _norm(cfg, cfg.head_dim * (cfg.num_heads if whole else 1), dtype, cfg.qk_norm)
    self.k_norm = _norm(cfg, cfg.head_dim * (cfg.num_kv_heads if whole else 1), dtype,
                        cfg.qk_norm)
    self.wo = _normal(rngs, (cfg.num_heads * cfg.head_dim, cfg.hidden_size), dtype)
    self.pos_emb = _param(rngs, positions.get(cfg.position_encoding).layer_param(cfg), dtype)

  def __call__(self, x, pos, start, n, layer_cache, page_table):
    cfg = self.cfg
    pe = positions.get(cfg.position_encoding)
    b, t, _ = x.shape
    qkv = dispatch.linear(x, self.wqkv[...])
    if self.bqkv is not None:
      qkv = qkv + self.bqkv[...]
    parts = layout.split_last(qkv, layout.qkv_sizes(cfg))
    if cfg.qk_norm_whole:
      parts = [self.q_norm(parts[0]), self.k_norm(parts[1]), *parts[2:]]
    q, k, v, *gate_k = (y.reshape(b, t, -1, cfg.head_dim) for y in parts)
    if not cfg.qk_norm_whole:
      q, k = _apply(self.q_norm, q), _apply(self.k_norm, k)
    q, k = pe.rotate(cfg, self.layer, q, k, pos)
    attend = dict(phi=self.phi, table=None if self.pos_emb is None else self.pos_emb[...],
                  sm_scale=cfg.attn_scale, window=cfg.window(self.layer),
                  softcap=cfg.attn_softcap, **pe.options(cfg))
    if self.record_scores and layer_cache is None:
      self.sow(nnx.Intermediate, "score_row_max", dispatch.score_row_max(
          q, k, lengths=n, sm_scale=attend["sm_scale"], window=attend["window"],
          softcap=attend["softcap"]))
    if gate_k:  # CoPE's own gate keys, rotated as keys are, travel as the keys' second half
      k = jnp.concatenate([k, pe.rotate(cfg, self.layer, gate_k[0], gate_k[0], pos)[1]], -1)

    if layer_cache is None:
      o = pe.attend(q, k, v, n, q_start=None, **attend)
    else:
      kc, vc = (kvc.write(pages, new, page_table, start, n)
                for pages, new in zip(layer_cache, (k, v)))
      layer_cache = (kc, vc)
      # The cache may be wider than the model (float32 pages of a bfloat16 model on the CPU:
      # dispatch.kv_cache_dtype), holding the model's values exactly. A decode step reads the
      # pages where they lie, in the cache's dtype; a chunk gathers them anyway, so the gather
      # narrows them back (exact) and the chunk attends in the model's dtype, as it does with
      # no cache (XLA:CPU's blocked bfloat16 attention is about twice its float32 one).
      if jnp.promote_types(q.dtype, kc.dtype) != kc.dtype:
        raise ValueError(f"KV cache pages of {jnp.dtype(kc.dtype).name} for a "
                         f"{jnp.dtype(q.dtype).name} model: the cache's dtype must be the "
                         "model's or wider")
      if t == 1:
        q = q.astype(kc.dtype)
        if attend["table"] is not None:
          attend["table"] = attend["table"].astype(kc.dtype)
        o = pe.attend_pages(q, kc, vc, page_table, start + n, **attend)
      else:
        o = pe.attend(q, kvc.gather(kc, page_table).astype(q.dtype),
                      kvc.gather(vc, page_table).astype(q.dtype), start + n, q_start=start,
                      **attend)
      o = o.astype(x.dtype)
    o = dispatch.linear(o.reshape(b, t, -1), self.wo[...])
    return parallel.reduce(o, self.tp), layer_cache


class MLP(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs, dtype, tp=None, size=None):
    self.tp = tp
    f = size or cfg.intermediate_size
    self.w_gate_up = _normal(rngs, (cfg.hidden_size, 2 * f), dtype)
    self.w_down = _normal(rngs, (f, cfg.hidden_size), dtype)
    self.activation = cfg.mlp_activation

  def __call__(self, x):
    gate, up = layout.split_last(dispatch.linear(x, self.w_gate_up[...]),
                                 [self.w_down.shape[0]] * 2)
    return parallel.reduce(
        dispatch.linear(MLP_ACTIVATIONS[self.activation](gate) * up, self.w_down[...]), self.tp)


class Block(nnx.Module):
  """Pre-norm attention and MLP, each with a residual; `sandwich_norms` (Gemma) also normalises
  each one's output before it joins the residual."""

  def __init__(self, cfg: ModelConfig, layer: int, *, rngs, dtype, tp=None):
    self.attn_norm = _norm(cfg, cfg.hidden_size, dtype, cfg.pre_norms)
    self.attn = Attention(cfg, layer, rngs=rngs, dtype=dtype, tp=tp)
    self.attn_post_norm = _norm(cfg, cfg.hidden_size, dtype, cfg.sandwich_norms)
    self.mlp_norm = _norm(cfg, cfg.hidden_size, dtype, cfg.pre_norms)
    if cfg.sparse(layer):
      shared = cfg.shared_expert_size and MLP(cfg, rngs=rngs, dtype=dtype, tp=tp,
                                              size=cfg.shared_expert_size)
      self.mlp = moe.SparseMLP(cfg, rngs=rngs, dtype=dtype, tp=tp, shared=shared or None)
    else:
      self.mlp = MLP(cfg, rngs=rngs, dtype=dtype, tp=tp)
    self.mlp_post_norm = _norm(cfg, cfg.hidden_size, dtype, cfg.sandwich_norms)
    self.residual_scale = cfg.residual_scale  # Granite's residual_multiplier

  def __call__(self, x, pos, start, n, layer_cache, page_table):
    scale = self.residual_scale
    h, layer_cache = self.attn(_apply(self.attn_norm, x), pos, start, n, layer_cache, page_table)
    h = _apply(self.attn_post_norm, h)
    x = x + (h if scale is None else h * scale)
    h = _apply(self.mlp_post_norm, self.mlp(_apply(self.mlp_norm, x)))
    return x + (h if scale is None else h * scale), layer_cache


class Transformer(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
               tp: parallel.Parallel | None = None):
    self.config = cfg
    self.dtype = jnp.dtype(dtype)
    # With tp (models/parallel.py), cfg is one device's share under shard_map: the
    # row-parallel projections are summed over tp.axis, the vocabulary is split across it.
    self.tp = tp
    # Tied models keep one [H, V] matrix: the output projection as it is, and the embedding
    # by gathering its columns (no per-step transpose of a vocab-sized matrix).
    self.lm_head = _normal(rngs, (cfg.hidden_size, cfg.vocab_size), dtype)
    self.embed = (None if cfg.tie_word_embeddings
                  else _normal(rngs, (cfg.vocab_size, cfg.hidden_size), dtype))
    self.pos_table = _param(rngs, positions.get(cfg.position_encoding).model_param(cfg), dtype)
    self.layers = nnx.List([Block(cfg, i, rngs=rngs, dtype=dtype, tp=tp)
                            for i in range(cfg.num_layers)])
    self.norm = _norm(cfg, cfg.hidden_size, dtype)

  def _embed(self, ids):
    if self.embed is None:
      x = parallel.take_rows(self.lm_head[...], ids, self.tp, axis=1).transpose(1, 2, 0)
    else:
      x = parallel.take_rows(self.embed[...], ids, self.tp, axis=0)
    scale = self.config.embed_scale  # Gemma: sqrt(hidden), rounded to the weights' dtype
    return x if scale is None else x * jnp.asarray(scale, x.dtype)

  def __call__(self, input_ids, *, cache: kvc.KVCache | None = None, lengths=None,
               last_only: bool = False, hidden: bool = False):
    cfg = self.config
    if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
      raise ValueError(f"model: input_ids must be an integer [B, T] array, got "
                       f"{input_ids.dtype}{tuple(input_ids.shape)}")
    b, t = input_ids.shape
    if cache is not None and t > cache.max_len:
      raise ValueError(f"model: {t} tokens are more than the cache holds ({cache.max_len})")
    start = jnp.zeros((b,), jnp.int32) if cache is None else cache.lengths
    n = jnp.full((b,), t, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)
    pos = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]

    x = positions.get(cfg.position_encoding).embed(
        self._embed(input_ids), pos, None if self.pos_table is None else self.pos_table[...])
    new_k, new_v = [], []
    table = None if cache is None else cache.page_table
    for i, layer in enumerate(self.layers):
      layer_cache = None if cache is None else (cache.k[i], cache.v[i])
      x, layer_cache = layer(x, pos, start, n, layer_cache, table)
      if cache is not None:
        new_k.append(layer_cache[0])
        new_v.append(layer_cache[1])
    if last_only:
      x = x[jnp.arange(b), jnp.maximum(n - 1, 0)][:, None]
    out = self.norm(x)
    if hidden:
      out = out.astype(jnp.float32)
    else:
      out = parallel.gather_logits(dispatch.linear(out, self.lm_head[...]),
                                   self.tp).astype(jnp.float32)
      if cfg.logit_divisor is not None:
        out = out / cfg.logit_divisor
      if cfg.final_softcap is not None:
        out = cfg.final_softcap * jnp.tanh(out / cfg.final_softcap)
    if cache is None:
      return out
    return out, cache._replace(k=tuple(new_k), v=tuple(new_v), lengths=start + n)
