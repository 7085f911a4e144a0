"""A model on a mesh: the decoder of models/llama.py run per device under `jax.shard_map`.

`ShardedTransformer` is called like `Transformer` (same arguments, same results, global
shapes) and holds one `Transformer` built for the LOCAL config (models/parallel.py) whose
parameters are global arrays laid out device by device: each device's block of a parameter
is exactly the local model's parameter, so inside shard_map the ordinary model runs on local
shapes, `fdjax.ops.dispatch` picks kernels for them and the Pallas kernels run unchanged. Batch
rows are split over the "data" axis; the KV cache's pages over "data" too (each replica its
own pool, page ids local to it) and its KV heads over "model"; the page table and lengths
follow the batch rows.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fdjax.ops import kv_cache as kvc
from models.parallel import DATA, MODEL

PAGES = P(MODEL, DATA, None, None)  # [Hkv, P, page_size, D]: device's heads, replica's pages


def cache_specs(num_layers: int) -> kvc.KVCache:
  return kvc.KVCache((PAGES,) * num_layers, (PAGES,) * num_layers, P(DATA, None), P(DATA))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _zeros(shape, dtype, count, sharding):
  return tuple(jax.lax.with_sharding_constraint(jnp.zeros(shape, dtype), sharding)
               for _ in range(count))


class ShardedTransformer(nnx.Module):

  def __init__(self, local, config, mesh, specs: tuple):
    self.local = local      # the per-device model (its parameters: the global arrays)
    self.config = config    # the whole model's config
    self.dtype = local.dtype
    self.mesh = mesh
    self.specs = specs      # PartitionSpec of each of local's state leaves, in tree order

  @property
  def tp(self) -> int:
    return self.mesh.shape[MODEL]

  @property
  def dp(self) -> int:
    return self.mesh.shape[DATA]

  def pages(self, num_pages: int, page_size: int, keys: bool = False) -> jax.ShapeDtypeStruct:
    """One layer's value (keys: key) pages, `num_pages` per replica, sharded by KV head."""
    cfg = self.local.config
    shape = (self.tp * cfg.num_kv_heads, self.dp * num_pages, page_size,
             cfg.key_cache_dim if keys else cfg.head_dim)
    return jax.ShapeDtypeStruct(shape, self.dtype, sharding=NamedSharding(self.mesh, PAGES))

  def empty_pages(self, num_pages: int, page_size: int) -> tuple[tuple, tuple]:
    """Zeroed key and value page pools (`pages`), one per layer."""
    layers = self.config.num_layers
    return tuple(_zeros(like.shape, like.dtype, layers, like.sharding)
                 for like in (self.pages(num_pages, page_size, keys) for keys in (True, False)))

  def __call__(self, input_ids, *, cache: kvc.KVCache | None = None, lengths=None,
               last_only: bool = False, hidden: bool = False):
    if input_ids.ndim != 2 or input_ids.shape[0] % self.dp:
      raise ValueError(f"sharded model: input_ids must be [B, T] with B a multiple of "
                       f"dp={self.dp}, got shape {tuple(input_ids.shape)}")
    b, t = input_ids.shape
    n = jnp.full((b,), t, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)
    graphdef, state = nnx.split(self.local)
    return _forward(graphdef, state, input_ids, n, cache, mesh=self.mesh, specs=self.specs,
                    last_only=last_only, hidden=hidden)


@functools.partial(jax.jit, static_argnames=("graphdef", "mesh", "specs", "last_only",
                                             "hidden"))
def _forward(graphdef, state, ids, n, cache, *, mesh, specs, last_only, hidden=False):
  """The local model on every device of `mesh` (jitted: shard_map run eagerly would dispatch
  op by op; inside generate's jitted steps it is inlined)."""
  def run(state, ids, n, cache):
    model = nnx.merge(graphdef, state)
    return model(ids, cache=cache, lengths=n, last_only=last_only, hidden=hidden)

  state_specs = jax.tree.unflatten(jax.tree.structure(state), specs)
  kv_specs = None if cache is None else cache_specs(len(cache.k))
  out = jax.shard_map(run, mesh=mesh, in_specs=(state_specs, P(DATA), P(DATA), kv_specs),
                      out_specs=P(DATA) if cache is None else (P(DATA), kv_specs),
                      check_vma=False)(state, ids, n, cache)
  if jax.process_count() > 1:  # every process reads the logits (and what it samples)
    logits = jax.lax.with_sharding_constraint(out if cache is None else out[0],
                                              NamedSharding(mesh, P()))
    out = logits if cache is None else (logits, out[1])
  return out
