"""Every rule that picks a kernel, in one place (after vLLM's attention selector); each
choice carries its reason, and a fallback to XLA is logged once per reason.

* Attention (decode, prefill, CoPE): the Pallas kernel on a CUDA GPU for the head dims and
  dtypes it takes (the kernel states what it takes: `async_softmax.unsupported`), else XLA.
* Linear layers (FlashDecoding++'s heuristic dataflow): per device kind and weight shape
  [K, N], GEMV below M1, the flat GEMM below M2, XLA's dot (the vendor GEMM) from M2, with
  crossovers and kernel settings from a tuned table (JSON in fdjax/tables/ and $FDJAX_TABLES,
  written by `fdjax tune`) or the analytic fallback. M is static under jit: no run-time cost.
  Int8 / int4 weights (fdjax.quant) have entries of their own ("KxN:int8"), their kernels
  the quantized GEMV and flat GEMM; the analytic fallback is the same for them.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re

import jax

from pallas_kernels import async_softmax
from pallas_kernels import decode_attention as dk
from pallas_kernels import flat_gemm as fg
from pallas_kernels import gemv as gv

log = logging.getLogger("fdjax")
TABLE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tables")


@dataclasses.dataclass(frozen=True)
class Choice:
  impl: str                 # attention: "pallas" | "xla"; linear: "gemv" | "flat" | "xla"
  reason: str
  settings: object = None   # the linear kernel's Settings

  def __str__(self):
    return f"{self.impl} ({self.reason})"


@functools.lru_cache(maxsize=None)
def _log_fallback(op: str, reason: str):
  log.info("%s: XLA instead of the Pallas kernel: %s", op, reason)


def attention(op: str, head_dim: int, dtype, platform: str, page_size: int | None = None
              ) -> Choice:
  """Which implementation "auto" runs for an attention op on `platform` (a paged cache: with
  pages of `page_size` entries)."""
  if platform not in ("cuda", "gpu"):
    return Choice("xla", f"{platform}: the Pallas kernels are compiled for CUDA GPUs")
  why = async_softmax.unsupported(head_dim, dtype)
  if not why and page_size is not None and dk.block_for_pages(page_size, 2) is None:
    why = f"page size {page_size} is not a multiple of 16"
  if why:
    _log_fallback(op, why)
    return Choice("xla", why)
  return Choice("pallas", "fused CoPE kernel" if op == "cope_attention" else
                "async-softmax kernel: unified max value, guarded recompute")


# ---------------------------------------------------------------------- linear tables

def device_kind() -> str:
  return jax.devices()[0].device_kind


def slug(kind: str) -> str:
  return re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-")


def _table_files():
  dirs = [TABLE_DIR] + ([os.environ["FDJAX_TABLES"]] if os.environ.get("FDJAX_TABLES") else [])
  for d in dirs:
    if os.path.isdir(d):
      for f in sorted(os.listdir(d)):
        if f.endswith(".json"):
          yield os.path.join(d, f)


@functools.lru_cache(maxsize=None)
def tables() -> dict:
  """{device kind: {"KxN": entry}} from every table file."""
  out = {}
  for file in _table_files():
    with open(file) as fh:
      t = json.load(fh)
    out.setdefault(t["device"], {}).update(t["shapes"])
  return out


def reload():
  tables.cache_clear()


def analytic(k: int, n: int) -> dict:
  """GEMV for M <= 2 (a 16-row tensor-core tile would be >= 7/8 padding), the flat GEMM to
  M = 64, XLA from 65 (the vendor GEMM's 64-row tiles stop wasting work); settings left to
  the kernels' defaults for the call's M and dtype. The same for int8 / int4 weights: XLA's
  dequantize-then-dot moves more bytes than its float dot, so the kernels reading quantized
  bytes win at least as far."""
  return {"m1": 3, "m2": 65, "source": "analytic",
          "gemv": dataclasses.asdict(gv.Settings()), "flat": dataclasses.asdict(fg.Settings())}


def key(k: int, n: int, quantization: str | None = None) -> str:
  """A weight's table key: "KxN", or "KxN:int8" / "KxN:int4" for a quantized one (its
  kernels and XLA's dequantize-then-dot have crossovers of their own)."""
  return f"{k}x{n}" + (f":{quantization}" if quantization else "")


def entry(k: int, n: int, kind: str | None = None, quantization: str | None = None) -> dict:
  kind = kind or device_kind()
  return tables().get(kind, {}).get(key(k, n, quantization)) or analytic(k, n)


def linear(m: int, k: int, n: int, kind: str | None = None,
           quantization: str | None = None) -> Choice:
  """GEMV, the flat GEMM or XLA for x [m, k] @ w [k, n] (w quantized to `quantization`:
  "int8" / "int4", or not), with the kernel's settings."""
  e = entry(k, n, kind, quantization)
  where = f"M={m}, {e['source']} M1={e['m1']} M2={e['m2']} for {key(k, n, quantization)}"
  if m < e["m1"] and m <= gv.MAX_M:
    return Choice("gemv", where, gv.Settings(**e["gemv"]))
  if m < e["m2"]:
    return Choice("flat", where, fg.Settings(**e["flat"]))
  return Choice("xla", where)


# ------------------------------------------------------------------------- describe

def describe(config=None, *, platform: str | None = None, batch: int = 1,
             dtype="bfloat16", quantization: str | None = None) -> dict[str, str]:
  """What "auto" runs for each op of a model (no config: of a head_dim-128 model; its linear
  weights quantized to `quantization` or not) at this batch on `platform`, with the reason,
  e.g. "xla (head_dim 80 is not a power of two >= 16)"."""
  platform = platform or jax.default_backend()
  head_dim = 128 if config is None else config.head_dim
  cope = config is not None and config.position_encoding == "cope"
  ops = ["cope_attention"] if cope else ["prefill_attention", "decode_attention"]
  out = {op: str(attention(op, head_dim, dtype, platform)) for op in ops}
  if platform not in ("cuda", "gpu"):
    return {**out, "linear": str(attention("linear", 0, dtype, platform))}
  shapes = {} if config is None else config.linear_shapes()
  return {**out, **{f"linear[{name}]": str(linear(batch, k, n, quantization=quantization))
                    for name, (k, n) in shapes.items()}}
