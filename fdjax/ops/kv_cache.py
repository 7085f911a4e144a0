"""The KV cache: paged, an explicit pytree passed into the model and returned by it.

Per layer a page pool for keys and one for values, heads-major [Hkv, num_pages, page_size, D]
(the layout every paged decode kernel reads: a page of one KV head is one contiguous run of
page_size x D values, so gathering a row's pages copies whole runs and the attention's dots
find each head's keys contiguous, with no transpose: on the CPU a decode step's attention
took 0.44 ms a layer against 1.6 ms token-major, at batch 16 and 128 keys; TPU's paged
attention uses the same layout); per sequence row a page table [B, max_pages] (int32
page ids: token i of row b lives in entry i % page_size of page page_table[b, i //
page_size]) and `lengths` [B], how many of its tokens are cached. Which page belongs to whom
is decided on the host (fdjax.engine.paging); a contiguous cache is the special case of each row
owning consecutive pages (`init_cache`). Table entries a row does not own hold NO_PAGE:
writes there are dropped, never landing in another row's page.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fdjax.ops import checks, reference

NO_PAGE = 2 ** 30  # a page id past any pool: writes through it are dropped


class KVCache(NamedTuple):
  k: tuple                # per layer [Hkv, P, page_size, D]
  v: tuple
  page_table: jax.Array   # [B, max_pages] int32
  lengths: jax.Array      # [B] int32: cached tokens of each row

  @property
  def page_size(self) -> int:
    return self.k[0].shape[2]

  @property
  def max_len(self) -> int:
    """The most tokens a row's page table can address."""
    return self.page_table.shape[1] * self.page_size


def empty_pages(config, num_pages: int, page_size: int, dtype) -> tuple[tuple, tuple]:
  """Zeroed key and value page pools, one per layer (a key entry is config.key_cache_dim
  wide: CoPE's own gate keys travel beside the keys)."""
  return _zeros(config.num_layers, config.num_kv_heads, num_pages, page_size,
                (config.key_cache_dim, config.head_dim), jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=range(6))
def _zeros(layers, heads, num_pages, page_size, widths, dtype):
  """empty_pages' pools made in one call: one dispatch, not two a layer (generate makes a
  cache each call: 0.66 -> 0.03 ms for a 4-layer model's on the CPU)."""
  return tuple(tuple(jnp.zeros((heads, num_pages, page_size, w), dtype) for _ in range(layers))
               for w in widths)


def init_cache(config, batch: int, max_len: int, dtype, page_size: int | None = None) -> KVCache:
  """An empty cache in which row b owns its own consecutive pages (page_size default: 64,
  or max_len if smaller)."""
  page_size = page_size or min(64, max_len)
  per_row = checks.cdiv(max_len, page_size)
  k, v = empty_pages(config, batch * per_row, page_size, dtype)
  table = jnp.arange(batch * per_row, dtype=jnp.int32).reshape(batch, per_row)
  return KVCache(k, v, table, jnp.zeros((batch,), jnp.int32))


def write(pages, new, page_table, start, n):
  """pages with each row's first n[b] new entries [B, T, Hkv, D] written at positions
  start[b] .. start[b] + n[b] - 1 (the rest of `new` is padding and writes nothing)."""
  b, t = new.shape[:2]
  page_size, max_pages = pages.shape[2], page_table.shape[1]
  pos = start[:, None] + jnp.arange(t)[None, :]
  page = jnp.take_along_axis(page_table, jnp.minimum(pos // page_size, max_pages - 1), axis=1)
  keep = (jnp.arange(t)[None, :] < n[:, None]) & (pos < max_pages * page_size)
  page = jnp.where(keep, page, NO_PAGE)
  return pages.at[:, page, pos % page_size].set(jnp.moveaxis(new, 2, 0).astype(pages.dtype),
                                                mode="drop")


def gather(pages, page_table):
  """Each row's cached entries, contiguous: [B, max_pages * page_size, Hkv, D]."""
  return reference.gather_pages(pages, page_table)
