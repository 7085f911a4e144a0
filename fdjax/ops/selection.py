"""Every rule that picks a kernel, in one place (after vLLM's attention selector); each
choice carries its reason, and a fallback to XLA is logged once per reason.

* Attention (decode, prefill, CoPE): the Pallas kernel on a CUDA GPU for the head dims and
  dtypes it takes (the kernel states what it takes: `async_softmax.unsupported`), else XLA.
  On a TPU the Mosaic kernels (pallas_kernels/tpu/) for decode (contiguous and paged) and
  prefill under the same rule; CoPE has no TPU kernel and runs XLA there.
* Linear layers (FlashDecoding++'s heuristic dataflow): per device kind and weight shape
  [K, N], GEMV below M1, the flat GEMM below M2, XLA's dot (the vendor GEMM) from M2, with
  crossovers and kernel settings from a tuned table (JSON in fdjax/ops/tables/ and $FDJAX_TABLES,
  written by `fdjax tune`) or the analytic fallback. M is static under jit: no run-time cost.
  Int8 / int4 weights (fdjax.ops.quant) have entries of their own ("KxN:int8"), their kernels
  the quantized GEMV and flat GEMM; the analytic fallback is the same for them. On a TPU
  the tables are per generation (device kind "TPU v5 lite", "TPU v6 lite", "TPU v5"), the
  kernels the Mosaic GEMV (VPU) and flat GEMM (MXU); quantized weights run XLA there.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re

import jax

from pallas_kernels.common import async_softmax, tiling
from pallas_kernels.tpu import flat_gemm as tpu_flat_gemm
from pallas_kernels.tpu import shared as tpu_shared
from pallas_kernels.triton import flat_gemm as triton_flat_gemm
from pallas_kernels.triton import gemv as triton_gemv

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


GPU = ("cuda", "gpu")
# Which Pallas backend each platform's kernels are written for (describe() says it per op).
BACKENDS = {"cuda": "Pallas Triton: deprecated by JAX since 0.11, to be replaced by Mosaic GPU",
            "tpu": "Pallas Mosaic TPU"}
TPU_OPS = ("decode_attention", "paged_decode_attention", "prefill_attention", "linear")


def attention(op: str, head_dim: int, dtype, platform: str, page_size: int | None = None
              ) -> Choice:
  """Which implementation "auto" runs for an attention op on `platform` (a paged cache: with
  pages of `page_size` entries). impl "pallas" is the platform's kernel: Triton on a CUDA
  GPU, Mosaic on a TPU."""
  if platform == "tpu" and op not in TPU_OPS:
    return Choice("xla", f"tpu: no Mosaic TPU kernel for {op}")
  if platform not in GPU + ("tpu",):
    return Choice("xla", f"{platform}: the Pallas kernels are compiled for CUDA GPUs and TPUs")
  why = async_softmax.unsupported(head_dim, dtype)
  if not why and page_size is not None and tiling.block_for_pages(page_size, 2) is None:
    why = f"page size {page_size} is not a multiple of 16"
  if why:
    _log_fallback(op, why)
    return Choice("xla", why)
  if platform == "tpu":
    return Choice("pallas", "Mosaic TPU async-softmax kernel: unified max value, guarded "
                  "recompute")
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


def is_tpu(kind: str) -> bool:
  return kind.startswith("TPU")


def analytic(k: int, n: int, kind: str = "") -> dict:
  """GEMV for M <= 2 (a 16-row tensor-core tile would be >= 7/8 padding), the flat GEMM to
  M = 64, XLA from 65 (the vendor GEMM's 64-row tiles stop wasting work); settings left to
  the kernels' defaults for the call's M and dtype. The same for int8 / int4 weights: XLA's
  dequantize-then-dot moves more bytes than its float dot, so the kernels reading quantized
  bytes win at least as far.

  On a TPU (not measured: `fdjax tune` on one writes the generation's table): the VPU GEMV
  at M = 1 only (its float32 multiply-adds per byte of w double with each row, and one row
  already takes about as long as the tile's copy on v5e), the flat GEMM to M = 64."""
  if is_tpu(kind):
    return {"m1": 2, "m2": 65, "source": "analytic",
            "gemv": dataclasses.asdict(tpu_flat_gemm.Settings()),
            "flat": dataclasses.asdict(tpu_flat_gemm.Settings())}
  return {"m1": 3, "m2": 65, "source": "analytic",
          "gemv": dataclasses.asdict(triton_gemv.Settings()),
          "flat": dataclasses.asdict(triton_flat_gemm.Settings())}


def key(k: int, n: int, quantization: str | None = None) -> str:
  """A weight's table key: "KxN", or "KxN:int8" / "KxN:int4" for a quantized one (its
  kernels and XLA's dequantize-then-dot have crossovers of their own)."""
  return f"{k}x{n}" + (f":{quantization}" if quantization else "")


def entry(k: int, n: int, kind: str | None = None, quantization: str | None = None) -> dict:
  kind = kind or device_kind()
  return tables().get(kind, {}).get(key(k, n, quantization)) or analytic(k, n, kind)


def settings_classes(kind: str) -> dict:
  """{"gemv": Settings, "flat": Settings} of the linear kernels run on this device kind."""
  if is_tpu(kind):
    return {"gemv": tpu_flat_gemm.Settings, "flat": tpu_flat_gemm.Settings}
  return {"gemv": triton_gemv.Settings, "flat": triton_flat_gemm.Settings}


def tpu_generation(kind: str) -> str:
  """The TPU generation ("v5e", "v6e", "v5p") of a device kind."""
  return tpu_shared.generation(kind).name


def tpu_kind(target: str | None = None) -> str:
  """The TPU device kind whose tables and facts the kernels use: that of a lowering target
  "tpu:v6e" (dispatch.lowering_for), else this process's device if it is a TPU, else v5e's."""
  if target and target.startswith("tpu:"):
    return tpu_shared.GENERATIONS[target[4:]].device_kind
  kind = device_kind()
  return kind if is_tpu(kind) else tpu_shared.GENERATIONS[tpu_shared.DEFAULT].device_kind


def linear(m: int, k: int, n: int, kind: str | None = None,
           quantization: str | None = None) -> Choice:
  """GEMV, the flat GEMM or XLA for x [m, k] @ w [k, n] (w quantized to `quantization`:
  "int8" / "int4", or not), with the kernel's settings, on a device of this kind (default:
  this process's first device)."""
  kind = kind or device_kind()
  if is_tpu(kind) and quantization:
    return Choice("xla", f"tpu: no Mosaic TPU kernel for {quantization} weights")
  e = entry(k, n, kind, quantization)
  where = f"M={m}, {e['source']} M1={e['m1']} M2={e['m2']} for {key(k, n, quantization)}"
  classes = settings_classes(kind)
  if m < e["m1"] and m <= triton_gemv.MAX_M:
    return Choice("gemv", where, classes["gemv"](**e["gemv"]))
  if m < e["m2"]:
    return Choice("flat", where, classes["flat"](**e["flat"]))
  return Choice("xla", where)


# ------------------------------------------------------------------------- describe

def describe(config=None, *, platform: str | None = None, batch: int = 1,
             dtype="bfloat16", quantization: str | None = None,
             kind: str | None = None) -> dict[str, str]:
  """What "auto" runs for each op of a model (no config: of a head_dim-128 model; its linear
  weights quantized to `quantization` or not) at this batch on `platform` ("tpu" also
  "tpu:v6e"; a TPU's or GPU's tables: of device `kind`, default this process's), with the
  reason, e.g. "xla (head_dim 80 is not a power of two >= 16)"; a kernel's entry also names
  its Pallas backend (BACKENDS), e.g. "pallas (...) [Pallas Triton: deprecated ...]"."""
  platform = platform or jax.default_backend()
  if platform.startswith("tpu"):
    platform, kind = "tpu", kind or tpu_kind(platform)
  head_dim = 128 if config is None else config.head_dim
  cope = config is not None and config.position_encoding == "cope"
  ops = ["cope_attention"] if cope else ["prefill_attention", "decode_attention"]
  out = {op: str(attention(op, head_dim, dtype, platform)) for op in ops}
  if platform not in GPU + ("tpu",):
    return {**out, "linear": str(attention("linear", 0, dtype, platform))}
  if platform == "tpu":
    out = {op: f"{how} [{kind}]" for op, how in out.items()}
  shapes = {} if config is None else config.linear_shapes()
  out.update({f"linear[{name}]": str(linear(batch, k, n, kind=kind, quantization=quantization))
              for name, (k, n) in shapes.items()})
  backend = BACKENDS["tpu" if platform == "tpu" else "cuda"]
  return {op: how if how.startswith("xla") else f"{how} [{backend}]" for op, how in out.items()}
