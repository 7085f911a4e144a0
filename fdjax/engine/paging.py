"""Host-side bookkeeping of a paged KV cache: which page belongs to whom, and the prefix cache.

A pool of `num_pages` pages of `page_size` tokens. Every page has a reference count: the
sequences using it. A sequence's prompt is looked up page by page in the prefix cache, where
each full page is keyed by a hash of (the previous page's key, the page's token ids), so a
key names the whole prefix up to that page; cached pages a new sequence starts with are
shared (count + 1) and only the rest of its prompt is computed. When a sequence ends, the
full pages of what it wrote are registered in the prefix cache and its counts drop; a page
nobody uses returns to the free list, unless it is cached: then it stays, evictable, and the
least recently used of those is taken when the free list runs dry. Running out of pages is a
PoolExhausted error, never an overwrite.

With a sliding window in every layer a sequence can also hold only the pages it still
reads: `grow` adds pages as it lengthens, `drop_leading` gives back those wholly before its
window (their entries become kv_cache.NO_PAGE, which every list and table here skips).
"""
from __future__ import annotations

import collections
import hashlib

import jax.numpy as jnp
import numpy as np

from fdjax.ops import checks, dispatch
from fdjax.ops import kv_cache as kvc


class PoolExhausted(RuntimeError):
  """Not enough free (or evictable) pages for a request."""


def page_keys(tokens, page_size: int) -> list[bytes]:
  """The prefix-cache key of every full page of `tokens`."""
  keys, prev = [], b""
  for i in range(len(tokens) // page_size):
    page = np.asarray(tokens[i * page_size:(i + 1) * page_size], np.int64).tobytes()
    prev = hashlib.blake2b(prev + page, digest_size=16).digest()
    keys.append(prev)
  return keys


class PagePool:

  def __init__(self, num_pages: int, page_size: int):
    if num_pages < 1 or page_size < 1:
      raise ValueError(f"PagePool: num_pages and page_size must be >= 1, got {num_pages}, "
                       f"{page_size}")
    self.num_pages, self.page_size = num_pages, page_size
    self.free = collections.deque(range(num_pages))
    self.refs = [0] * num_pages
    self.cached: dict[bytes, int] = {}        # prefix key -> page
    self.key_of: dict[int, bytes] = {}        # page -> its prefix key
    self.evictable = collections.OrderedDict()  # cached pages nobody uses, oldest first
    self.prefix_hit_tokens = 0

  # ----------------------------------------------------------------------- counts

  @property
  def pages_in_use(self) -> int:
    return sum(1 for r in self.refs if r > 0)

  @property
  def pages_available(self) -> int:
    return len(self.free) + len(self.evictable)

  def _take(self) -> int:
    if self.free:
      page = self.free.popleft()
    elif self.evictable:
      page, _ = self.evictable.popitem(last=False)
      del self.cached[self.key_of.pop(page)]
    else:
      raise PoolExhausted(f"all {self.num_pages} KV pages are in use")
    self.refs[page] = 1
    return page

  def _use(self, page: int):
    if self.refs[page] == 0:
      self.evictable.pop(page)
    self.refs[page] += 1

  def release(self, pages):
    """Drops one reference to each page; unused pages return to the pool (cached ones stay
    cached, evictable)."""
    for page in pages:
      if page == kvc.NO_PAGE:  # given back already (drop_leading)
        continue
      if self.refs[page] < 1:
        raise ValueError(f"PagePool: page {page} released more often than taken")
      self.refs[page] -= 1
      if self.refs[page] == 0:
        if page in self.key_of:
          self.evictable[page] = None
        else:
          self.free.append(page)

  # ------------------------------------------------------------------- sequences

  def allocate(self, prompt, total_tokens: int, reuse: bool = True) -> tuple[list[int], int]:
    """Pages for a sequence of `total_tokens` starting with `prompt` (fewer than the prompt:
    only its cached pages, or one; `grow` adds the rest): (its page ids, how many leading
    prompt tokens are already cached; none when not `reuse`). At least the prompt's last
    token is always left to compute (its logits start the generation)."""
    need = checks.cdiv(total_tokens, self.page_size)
    reuse = self._cached_pages(prompt) if reuse else []
    if need - len(reuse) > len(self.free) + len(self.evictable) - sum(
        1 for p in reuse if self.refs[p] == 0):
      raise PoolExhausted(f"a sequence of {total_tokens} tokens needs {need - len(reuse)} more "
                          f"pages; {self.pages_available} of {self.num_pages} are available")
    for page in reuse:
      self._use(page)
    pages = reuse + [self._take() for _ in range(need - len(reuse))]
    self.prefix_hit_tokens += len(reuse) * self.page_size
    return pages, len(reuse) * self.page_size

  def _cached_pages(self, prompt) -> list[int]:
    """The pages of the prefix cache that hold the leading full pages of `prompt` (but its
    last token, which is always computed)."""
    pages = []
    for key in page_keys(prompt[:len(prompt) - 1], self.page_size):
      if key not in self.cached:
        break
      pages.append(self.cached[key])
    return pages

  def cached_tokens(self, prompt) -> int:
    """How many leading tokens of `prompt` the prefix cache holds now (as allocate would
    reuse them)."""
    return len(self._cached_pages(prompt)) * self.page_size

  def grow(self, pages: list, total_tokens: int):
    """Appends pages to a live sequence's list (in place) until it holds `total_tokens`."""
    need = checks.cdiv(total_tokens, self.page_size) - len(pages)
    if need > self.pages_available:
      raise PoolExhausted(f"a sequence growing to {total_tokens} tokens needs {need} more "
                          f"pages; {self.pages_available} of {self.num_pages} are available")
    pages.extend(self._take() for _ in range(need))

  def drop_leading(self, pages: list, n: int) -> int:
    """Gives back the first `n` pages of a live sequence (no query will read their tokens
    again: they lie wholly before its sliding window); their entries in `pages` become
    kv_cache.NO_PAGE. Returns how many were released now."""
    n = min(n, len(pages))
    gone = [page for page in pages[:n] if page != kvc.NO_PAGE]
    self.release(gone)
    pages[:n] = [kvc.NO_PAGE] * n
    return len(gone)

  def publish(self, pages, written_tokens):
    """Enters the full pages of tokens a live sequence has written (its whole prompt, once
    prefilled) in the prefix cache, so that sequences that start the same way share them while
    it runs (the pages stay its own)."""
    for page, key in zip(pages, page_keys(written_tokens, self.page_size)):
      if page == kvc.NO_PAGE:  # a prefix needs every page from the first
        break
      if key not in self.cached and page not in self.key_of:
        self.cached[key] = page
        self.key_of[page] = key

  def finish(self, pages, written_tokens):
    """A sequence ends: the full pages of the tokens whose K/V it wrote (prompt and
    generated, in order, up to a page it gave back) enter the prefix cache, and its pages
    are released."""
    self.publish(pages, written_tokens)
    self.release(pages)

  def check(self):
    """Invariants (tests call it): every page is free, evictable or referenced, exactly one."""
    free, evictable = set(self.free), set(self.evictable)
    used = {p for p, r in enumerate(self.refs) if r > 0}
    assert len(free) == len(self.free), "a page is free twice"
    assert not (free & evictable) and not (free & used) and not (evictable & used)
    assert free | evictable | used == set(range(self.num_pages)), "a page is lost"
    assert evictable <= set(self.key_of) and set(self.cached.values()) == set(self.key_of)


def page_table(pages_per_row, rows: int, width: int) -> np.ndarray:
  """A [rows, width] int32 page table: row i's pages (as many as fit), NO_PAGE elsewhere."""
  table = np.full((rows, width), kvc.NO_PAGE, np.int32)
  for i, pages in enumerate(pages_per_row):
    table[i, :min(len(pages), width)] = pages[:width]
  return table


def replica_of(row: int, rows: int, replicas: int) -> int:
  """The data replica that holds row `row` of a batch of `rows` (a multiple of `replicas`):
  the rows are split among the replicas in order."""
  return row * replicas // rows


class KVStore:
  """A model's paged KV cache that outlives one `generate` call: the key and value page pools
  on the device, and their host bookkeeping (the PagePool, with its prefix cache).

  For a model on a mesh (models/sharded.py) the pages are sharded by KV head, and each data
  replica has its own `num_pages` pages and PagePool (`pools`; a batch's rows are split among
  the replicas in order, `pool_of`)."""

  def __init__(self, config, num_pages: int, page_size: int = 64, dtype=jnp.float32, *,
               mesh=None, replicas: int = 1, pages=None):
    self.config, self.dtype, self.mesh = config, jnp.dtype(dtype), mesh
    self.pools = [PagePool(num_pages, page_size) for _ in range(replicas)]
    self.k, self.v = pages or kvc.empty_pages(config, num_pages, page_size, self.dtype)

  @classmethod
  def for_model(cls, model, num_pages: int, page_size: int = 64, *,
                in_place: bool = False) -> "KVStore":
    """The store for `model`; on a mesh, `num_pages` per data replica, sharded as it reads.
    `in_place`: each row will own a consecutive run of pages that attention reads where they
    lie (generate on the CPU), which may take a wider dtype (dispatch.kv_cache_dtype)."""
    if getattr(model, "mesh", None) is None:
      return cls(model.config, num_pages, page_size,
                 dispatch.kv_cache_dtype(model.dtype, in_place))
    return cls(model.config, num_pages, page_size, model.dtype, mesh=model.mesh,
               replicas=model.dp, pages=model.empty_pages(num_pages, page_size))

  @property
  def pool(self) -> PagePool:
    """The page pool (of the first data replica when there are several)."""
    return self.pools[0]

  def pool_of(self, row: int, rows: int) -> PagePool:
    """The pool of row `row` of a batch of `rows` (a multiple of the replicas)."""
    return self.pools[replica_of(row, rows, len(self.pools))]

  @property
  def page_size(self) -> int:
    return self.pool.page_size

  @property
  def pages_total(self) -> int:
    """Pages in every data replica's pool together."""
    return sum(p.num_pages for p in self.pools)

  @property
  def pages_in_use(self) -> int:
    return sum(p.pages_in_use for p in self.pools)

  @property
  def prefix_hit_tokens(self) -> int:
    return sum(p.prefix_hit_tokens for p in self.pools)

  def check_for(self, model):
    if (model.config != self.config
        or jnp.promote_types(model.dtype, self.dtype) != self.dtype  # (wider pages: fine)
        or getattr(model, "mesh", None) != self.mesh):
      raise ValueError("KVStore: made for another model (config, dtype or mesh differ); its "
                       "pages hold that model's keys and values")
