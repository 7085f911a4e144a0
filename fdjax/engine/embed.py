"""Embeddings from a decoder: each prompt's final hidden states (after the model's last norm)
pooled into one vector, as vLLM's pooling runner and sentence-transformers make them from a
causal LM (Qwen3-Embedding, e5-mistral, gte-Qwen2: the last token's state, normalized).

pooling: "last" (the last token's state: what a causal model has read the whole text by),
"mean" (the average over the prompt's tokens) or "cls" (the first token's). normalize: to unit
length (cosine similarity is then a dot product), as OpenAI's embeddings are. dimensions:
Matryoshka truncation, the first `dimensions` entries, normalized again.

A batch whose prompts fit one chunk runs as one causal forward with no cache; longer prompts
are prefilled in chunks into a KV cache made for the batch, as generation prefills them, so a
prompt as long as the model's context costs a chunk's attention at a time, not its length
squared. Shapes are bucketed (rows and page-table width to powers of two, the chunk to 16,
32, 64, then multiples of 32: at most a third of it padding) so batches of similar size
reuse the compiled programs.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fdjax.engine import steps
from fdjax.ops import checks, dispatch
from fdjax.ops import kv_cache as kvc

POOLINGS = ("last", "mean", "cls")
MAX_ROWS = 16           # prompts per batch
MAX_BATCH_TOKENS = 16384  # rows x padded length per batch
CHUNK = 256             # prefill chunk (tokens per row per call)
PAGE_SIZE = 64


def embed(model, prompts, *, pooling: str = "last", normalize: bool = True,
          dimensions: int | None = None) -> np.ndarray:
  """Token-id lists -> their embeddings [len(prompts), hidden (or dimensions)] float32."""
  cfg = model.config
  if pooling not in POOLINGS:
    raise ValueError(f"embed: pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
  steps.check_prompts(prompts, cfg.vocab_size)
  prompts = [[int(t) for t in p] for p in prompts]
  for i, p in enumerate(prompts):
    if len(p) > cfg.max_position_embeddings:
      raise ValueError(f"embed: prompt {i} has {len(p)} tokens, more than the model's context "
                       f"of {cfg.max_position_embeddings}")
  if dimensions is not None and not 1 <= dimensions <= cfg.hidden_size:
    raise ValueError(f"embed: dimensions must be in [1, {cfg.hidden_size}], got {dimensions}")
  out = np.zeros((len(prompts), cfg.hidden_size), np.float32)
  for rows in _batches([len(p) for p in prompts], getattr(model, "dp", 1)):
    out[rows] = _pooled(model, [prompts[i] for i in rows], pooling)
  if dimensions is not None:
    out = out[:, :dimensions]
  if normalize:
    norm = np.linalg.norm(out, axis=-1, keepdims=True)
    out = out / np.maximum(norm, 1e-12)
  return out


def _length_bucket(n: int) -> int:
  """The padded length of a chunk of n tokens: 16, 32, 64, then the next multiple of 32, at
  most CHUNK (at most a third of a chunk padding; HF's eager forward pads a batch to its
  longest, and so no single prompt)."""
  return min(CHUNK, steps.pow2(n, steps.MIN_CHUNK) if n <= 64 else -(-n // 32) * 32)


def _batches(lengths, dp: int = 1):
  """Prompt indices in batches: sorted by length, at most MAX_ROWS rows and MAX_BATCH_TOKENS
  padded tokens each (a longer prompt alone)."""
  order = sorted(range(len(lengths)), key=lambda i: lengths[i])
  batch = []
  for i in order:
    # the longest so far (sorted), padded: one chunk, else the cache's pages
    n = lengths[i]
    width = _length_bucket(n) if n <= CHUNK else steps.table_width(n, PAGE_SIZE) * PAGE_SIZE
    if batch and (len(batch) == MAX_ROWS or _rows(len(batch) + 1, dp) * width
                  > MAX_BATCH_TOKENS):
      yield batch
      batch = []
    batch.append(i)
  if batch:
    yield batch


def _rows(n: int, dp: int) -> int:
  """The rows a batch of n prompts runs as: a power of two, a multiple of the data replicas."""
  return checks.cdiv(steps.pow2(n), dp) * dp


def _cache(model, rows: int, width: int) -> kvc.KVCache:
  """An empty cache in which each row owns `width` pages of its own (on a mesh: in its data
  replica's pool, page ids local to it)."""
  if getattr(model, "mesh", None) is None:
    return kvc.init_cache(model.config, rows, width * PAGE_SIZE,
                          dispatch.kv_cache_dtype(model.dtype), PAGE_SIZE)
  per_replica = rows // model.dp
  table = np.tile(np.arange(per_replica * width, dtype=np.int32).reshape(per_replica, width),
                  (model.dp, 1))
  k, v = model.empty_pages(per_replica * width, PAGE_SIZE)
  return kvc.KVCache(k, v, jnp.asarray(table), jnp.zeros((rows,), jnp.int32))


def _pooled(model, prompts, pooling: str) -> np.ndarray:
  """The pooled (not normalized) final states of a batch's prompts [len(prompts), hidden]."""
  if pooling == "cls":  # (causal: the first token's state is the same after any chunk)
    prompts = [p[:CHUNK] for p in prompts]
  longest = max(len(p) for p in prompts)
  rows = _rows(len(prompts), getattr(model, "dp", 1))
  chunk = _length_bucket(longest)
  cache = _cache(model, rows, steps.table_width(longest, PAGE_SIZE)) if longest > chunk else None
  graphdef, state = nnx.split(model)
  static = dict(impl=dispatch.current(), target=dispatch.lowering_target())
  acc = jnp.zeros((rows, model.config.hidden_size), jnp.float32)
  for c in range(0, longest, chunk):
    ids, n = steps.pack([p[c:c + chunk] for p in prompts], rows, chunk)
    acc, cache = _chunk(graphdef, state, jnp.asarray(ids), jnp.asarray(n), cache, acc,
                        pooling=pooling, **static)
  acc = np.asarray(acc)[:len(prompts)]
  if pooling == "mean":
    acc = acc / np.asarray([len(p) for p in prompts], np.float32)[:, None]
  return acc


@functools.partial(jax.jit, static_argnames=("graphdef", "pooling", "impl", "target"),
                   donate_argnums=(4, 5))
def _chunk(graphdef, state, ids, n, cache, acc, *, pooling, impl, target=None):
  """One chunk of every row's prompt (row b: its first n[b] tokens of ids) into the cache
  (None: the whole prompts, no cache), and its pooled state so far `acc` updated: last, the
  state at the row's latest token; mean, the sum of its tokens' states; cls, the first
  state (its one chunk)."""
  steps.TRACE_COUNT["embed"] += 1
  model = nnx.merge(graphdef, state)
  with dispatch.using(impl), dispatch.lowering_for(target):
    out = model(ids, cache=cache, lengths=n, last_only=pooling == "last", hidden=True)
  h, cache = out if cache is not None else (out, None)
  if pooling == "last":
    acc = jnp.where((n > 0)[:, None], h[:, 0], acc)
  elif pooling == "mean":
    mask = jnp.arange(ids.shape[1])[None, :] < n[:, None]
    acc = acc + jnp.sum(jnp.where(mask[..., None], h, 0.0), axis=1)
  else:
    acc = h[:, 0]
  return acc, cache
