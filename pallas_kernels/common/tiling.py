"""How the kernels of every backend cut their work into blocks: the keys a decode split
covers, the key block a KV page allows, and a kernel's settings with their defaults filled in.
Plain Python and jax.numpy, so a Triton, Mosaic GPU or Mosaic TPU kernel uses the same rule."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax.experimental import pallas as pl


def key_span(s: int, window: int | None, block_k: int) -> int:
  """How many key positions one row's splits together cover: the whole cache, or with a
  window the W keys plus the block-alignment slack before them."""
  return s if window is None else min(s, pl.cdiv(window, block_k) * block_k + block_k)


def split_range(length, split, split_len, block_k, window):
  """(first visible key, start, end) of one split's keys for a row of `length` keys: the
  splits tile [first visible key rounded down to a block, length) in split_len steps."""
  lo = 0 if window is None else jnp.maximum(length - window, 0)
  start = lo // block_k * block_k + split * split_len
  return lo, start, jnp.minimum(start + split_len, length)


def block_for_pages(page_size: int, max_pages: int) -> int | None:
  """The largest key block (a power of two, 16 to 128) that never crosses a page, or None.
  With one page per row any block does (the last one is masked)."""
  if max_pages == 1:
    return min(128, max(16, pl.next_power_of_2(page_size)))
  block = page_size & -page_size  # the largest power of two dividing page_size
  return min(block, 128) if block >= 16 else None


def page_block(page_size: int, max_pages: int) -> int:
  """block_for_pages, or a ValueError naming the page size it cannot take."""
  block_k = block_for_pages(page_size, max_pages)
  if block_k is None:
    raise ValueError(f"paged_decode_attention: the kernel needs a page size divisible by 16, "
                     f"got {page_size}")
  return block_k


def fill(settings, default):
  """A kernel's settings with every field left None taken from `default` (both are the
  kernel's frozen Settings dataclass)."""
  given = {f: v for f, v in vars(settings).items() if v is not None} if settings else {}
  return dataclasses.replace(default, **given)
