"""Every rule that picks a kernel, in one place (after vLLM's attention selector); each
choice carries its reason, and a fallback to XLA is logged once per reason.

* Attention (decode, prefill, CoPE) on a CUDA GPU, first that takes the call (each kernel
  states what it takes), by the GPU and the JAX installed:
  1. on Hopper (compute capability 9.x), the Mosaic GPU kernel (pallas_kernels/mosaic_gpu/:
     decode attention, contiguous and paged, bfloat16 / float16, head_dim 64, 128 or 256): the
     Pallas backend JAX keeps, written for sm_90a's TMA and WGMMA. Not yet timed on hardware
     against Triton: the GPU suite will say which is faster, and this rule follows it;
  2. the Triton kernel, where this JAX still has Pallas's Triton backend (deprecated since
     0.11): every op, float32 / bfloat16, power-of-two head_dim;
  3. XLA, with both reasons.
  On a TPU the Mosaic kernels (pallas_kernels/tpu/) for decode (contiguous and paged) and
  prefill under the same head_dim / dtype rule; CoPE has no TPU kernel and runs XLA there.
* Linear layers (FlashDecoding++'s heuristic dataflow): per device kind and weight shape
  [K, N], GEMV below M1, the flat GEMM below M2, XLA's dot (the vendor GEMM) from M2, with
  crossovers and kernel settings from a tuned table (JSON in fdjax/ops/tables/ and $FDJAX_TABLES,
  written by `fdjax tune`) or the analytic fallback. M is static under jit: no run-time cost.
  Int8 / int4 weights (fdjax.ops.quant) have entries of their own ("KxN:int8"), their kernels
  the quantized GEMV and flat GEMM; the analytic fallback is the same for them. On a TPU
  the tables are per generation (device kind "TPU v5 lite", "TPU v6 lite", "TPU v5"), the
  kernels the Mosaic GEMV (VPU) and flat GEMM (MXU); quantized weights run XLA there. On a
  Hopper GPU the table's "flat" runs the Mosaic GPU flat GEMM where it takes the call (x in
  bfloat16 / float16, M <= 64, N a multiple of 64; int8 / int4 weights too, K a multiple of
  128) unless the entry says "backend": "pallas" (Triton); the GEMV runs Triton, and where
  this JAX has no Triton the Mosaic flat GEMM at every M it takes, else XLA.
* Paged decode attention on the CPU (`cpu_paged_decode`): XLA, reading the pages in place
  where every row owns its own consecutive run of them, else gathering them first; on
  float32 pages the weights times the values as a multiply and a sum.
* Prefill attention and CoPE's on the CPU (`cpu_prefill`): from 64 queries a row,
  FlashDecoding++'s asynchronous softmax over blocks of keys (fdjax.ops.cpu_attention: a
  block's scores stay in the cache, keys it cannot see are never read); shorter chunks, and
  batches whose scores all fit in the cache, the reference.
* The KV cache's dtype on the CPU (`cpu_kv_cache`): float32 pages for a bfloat16 model where
  attention reads them in place (the same values; XLA:CPU would convert bfloat16 pages to
  float32 for every attention); gathered pages keep the model's dtype.
* Linear layers on the CPU (`cpu_linear`): XLA, in the form XLA:CPU runs fastest: int8
  weights as an int8 x int8 dot with the activations quantized in groups of 128 where the
  processor has VNNI, one bfloat16 row padded to two (impl="xla" is the plain reference).
* Mixture-of-experts layers (`moe`): by tokens per expert, the grouped GEMM over expert tiles
  of 8 to 128 rows or every expert on every token, by the bytes each reads and the rows it
  multiplies, or, where `fdjax tune --moe` measured the layer's shape on this device (the
  table's "moe" section), by which of the two took less time at the nearest token count
  measured at or above. On Hopper the grouped tiles' products run the Mosaic GPU grouped GEMM
  (tiles up to 64 rows, bfloat16 / float16); elsewhere XLA (no Triton or TPU kernel).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re

import jax

from fdjax.ops import cpu_attention, quant
from fdjax.ops import cpu_linear as cpu_linear_lib
from fdjax.ops import moe as moe_lib
from fdjax.ops.kernels import (
  mosaic_decode,
  mosaic_flat_gemm,
  mosaic_grouped,
  mosaic_grouped_quantized,
  mosaic_quantized,
  tpu_flat_gemm,
  tpu_shared,
  triton_flat_gemm,
  triton_gemv,
  triton_shared,
)
from pallas_kernels.common import async_softmax, tiling

log = logging.getLogger("fdjax")
TABLE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tables")


@dataclasses.dataclass(frozen=True)
class Choice:
  impl: str  # attention: "pallas" | "pallas_mosaic" | "xla"; linear: "gemv" | "flat" |
             # "flat_mosaic" | "xla"
  reason: str
  settings: object = None   # the linear kernel's Settings

  def __str__(self):
    return f"{self.impl} ({self.reason})"


@functools.lru_cache(maxsize=None)
def _log_fallback(op: str, reason: str):
  log.info("%s: XLA instead of the Pallas kernel: %s", op, reason)


GPU = ("cuda", "gpu")
# The Pallas backend of each kind of kernel (describe() names it per op).
BACKENDS = {"pallas": "Pallas Triton: deprecated by JAX since 0.11, to be replaced by Mosaic GPU",
            "pallas_mosaic": "Pallas Mosaic GPU, sm_90a",
            "tpu": "Pallas Mosaic TPU"}
TPU_OPS = ("decode_attention", "paged_decode_attention", "prefill_attention", "linear")
MOSAIC_OPS = ("decode_attention", "paged_decode_attention")  # attention with a Mosaic GPU kernel
HOPPER = 9  # the compute capability (major) the Mosaic GPU kernels are written for


def has_triton() -> bool:
  """Whether this JAX still has Pallas's Triton backend (deprecated since 0.11)."""
  return triton_shared.AVAILABLE


def gpu_major() -> int:
  """The compute capability (major) of the GPU kernels are lowered for: this process's first
  GPU's, else the described H100's (9: compiling ahead of time on a host with no GPU)."""
  for d in jax.devices():
    if d.platform == "gpu" and getattr(d, "compute_capability", None):
      return int(str(d.compute_capability).split(".")[0])
  return HOPPER


def not_hopper() -> str | None:
  """Why this GPU cannot run the Mosaic GPU kernels (None: it is a Hopper)."""
  major = gpu_major()
  return None if major == HOPPER else (
      f"its kernels are written for sm_90a, this GPU is sm_{major}x")


def _async_softmax_unsupported(head_dim: int, dtype, page_size: int | None,
                               max_pages: int) -> str | None:
  """Why the Triton and Mosaic TPU attention kernels cannot take this call (their one rule)."""
  why = async_softmax.unsupported(head_dim, dtype)
  if not why and page_size is not None and tiling.block_for_pages(page_size, max_pages) is None:
    why = f"page size {page_size} is not a multiple of 16"
  return why


def triton_unsupported(op: str, head_dim: int, dtype, page_size: int | None = None,
                       max_pages: int = 2) -> str | None:
  """Why the Triton kernel cannot take this attention call (None: it can)."""
  if not has_triton():
    return "this JAX has no Pallas Triton backend"
  return _async_softmax_unsupported(head_dim, dtype, page_size, max_pages)


def mosaic_unsupported(op: str, head_dim: int, dtype, page_size: int | None = None,
                       max_pages: int = 2, group: int = 1) -> str | None:
  """Why the Mosaic GPU kernel cannot take this attention call (None: it can); group: query
  heads per KV head."""
  if op not in MOSAIC_OPS:
    return f"no Mosaic GPU kernel for {op} yet"
  why = mosaic_decode.unsupported(head_dim, dtype, group)
  if not why and page_size is not None:
    pieces = mosaic_decode.pieces(page_size, max_pages, mosaic_decode.BLOCK_K)
    why = pieces if isinstance(pieces, str) else None
  return why


def attention(op: str, head_dim: int, dtype, platform: str, page_size: int | None = None,
              max_pages: int = 2, group: int = 1) -> Choice:
  """Which implementation "auto" runs for an attention op on `platform` (its keys in pages of
  `page_size` entries, `max_pages` a row; a contiguous cache of S: S and 1; `group` query
  heads per KV head). impl "pallas" is
  the Triton kernel on a CUDA GPU, the Mosaic kernel on a TPU; "pallas_mosaic" the Mosaic
  GPU kernel (the module's docstring gives the rule)."""
  if platform == "tpu" and op not in TPU_OPS:
    return Choice("xla", f"tpu: no Mosaic TPU kernel for {op}")
  if platform not in GPU + ("tpu",):
    return Choice("xla", f"{platform}: the Pallas kernels are compiled for CUDA GPUs and TPUs")
  if platform == "tpu":
    why = _async_softmax_unsupported(head_dim, dtype, page_size, max_pages)
    if why:
      _log_fallback(op, why)
      return Choice("xla", why)
    return Choice("pallas", "Mosaic TPU async-softmax kernel: unified max value, guarded "
                  "recompute")
  what = "fused CoPE kernel" if op == "cope_attention" else (
      "async-softmax kernel: unified max value, guarded recompute")
  mosaic = not_hopper() or mosaic_unsupported(op, head_dim, dtype, page_size, max_pages,
                                              group)
  if mosaic is None:
    return Choice("pallas_mosaic", f"Mosaic GPU {what}; TMA pipeline, WGMMA")
  triton = triton_unsupported(op, head_dim, dtype, page_size, max_pages)
  if triton is None:
    return Choice("pallas", f"{what}; not Mosaic GPU: {mosaic}")
  why = f"Mosaic GPU: {mosaic}; Triton: {triton}"
  _log_fallback(op, why)
  return Choice("xla", why)


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
def _section(name: str) -> dict:
  """{device kind: {key: entry}} from one section of every table file: "shapes" (the linear
  layers', fdjax tune) or "moe" (fdjax tune --moe)."""
  out = {}
  for file in _table_files():
    with open(file) as fh:
      t = json.load(fh)
    out.setdefault(t["device"], {}).update(t.get(name, {}))
  return out


def tables() -> dict:
  """{device kind: {"KxN": entry}} from every table file."""
  return _section("shapes")


def moe_tables() -> dict:
  """{device kind: {moe_key: entry}} from the table files' "moe" sections."""
  return _section("moe")


def reload():
  _section.cache_clear()


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
           quantization: str | None = None, dtype=None, gpu_auto: bool = False) -> Choice:
  """GEMV, the flat GEMM or XLA for x [m, k] @ w [k, n] (w quantized to `quantization`:
  "int8" / "int4", or not), with the kernel's settings, on a device of this kind (default:
  this process's first device). `gpu_auto`: what "auto" runs on a CUDA GPU (x of `dtype`),
  where the flat GEMM may be the Mosaic GPU one ("flat_mosaic") and a JAX without Triton has
  no GEMV; otherwise the Triton kernels (impl="pallas")."""
  kind = kind or device_kind()
  if is_tpu(kind) and quantization:
    return Choice("xla", f"tpu: no Mosaic TPU kernel for {quantization} weights")
  e = entry(k, n, kind, quantization)
  where = f"M={m}, {e['source']} M1={e['m1']} M2={e['m2']} for {key(k, n, quantization)}"
  classes = settings_classes(kind)
  if m < e["m1"] and m <= triton_gemv.MAX_M:
    choice = Choice("gemv", where, classes["gemv"](**e["gemv"]))
  elif m < e["m2"]:
    choice = Choice("flat", where, classes["flat"](**e["flat"]))
  else:
    return Choice("xla", where)
  return _linear_on_gpu(choice, m, k, n, dtype, quantization, e) if gpu_auto else choice


def cpu_paged_decode(dtype) -> Choice:
  """How XLA:CPU runs paged decode attention on pages of `dtype` under "auto":
  * where every row owns its own consecutive pages of a pool of rows x table width (as
    `generate` lays out its cache on the CPU), the pages are read where they lie (a view,
    checked at run time by reference.rows_own_their_pages), else gathered into a copy first.
    The copy was 7-12 % of a decode step of the benchmark model (bench/results/
    decode_trace_cpu.md before this rule: K/V gather); reading in place gave 4-22 % more
    tokens/s at batch 4 and 16 in float32, nothing measurable at batch 1. CoPE's decode step
    (dispatch.paged_cope_decode_attention) reads its pages the same way, per KV head: it had
    gathered them token-major and XLA:CPU then copied each layer's values transposed
    ([B, H, D, S]), 1.9 ms of a 4.5 ms batch-8 step of the bundled model (bench/results/
    cope_decode_cpu.md: fdjax against its XLA path and a PyTorch CoPE decoder);
  * float32 pages: the weights times the values as a multiply and a sum over the keys rather
    than XLA:CPU's batched dot, which moved 13 GB/s there (8 layers' attention at batch 16,
    128 keys: 3.5 against 5.2 ms; batch 4: 0.63 against 0.78 ms; the decode step 3-14 % more
    tokens/s at batch 4 and 16). bfloat16 pages keep the dot (the sum lost 22 % at batch 16).
  Measured on a 2-core Xeon, jax 0.12, processes alternated."""
  reason = "cpu: rows that own consecutive pages read in place, other rows' pages gathered"
  if jax.numpy.dtype(dtype) == jax.numpy.float32:
    return Choice("xla", reason + "; weights x values as multiply + sum",
                  {"in_place": True, "weighted_sum": "reduce"})
  return Choice("xla", reason, {"in_place": True})


CPU_PREFILL_MIN_QUERIES = 64
CPU_PREFILL_CACHED_SCORES = 14 << 20  # bytes of float32 scores the reference keeps in cache
CPU_PREFILL_CACHED_QUERIES = 256  # ... up to this many queries a row
CPU_PREFILL_WIDE_QUERIES = 128  # from this many queries a row, the blocks whatever the scores
CPU_PREFILL_WIDE_KEYS = 2  # ... where the keys are at least this many times the queries
CPU_PREFILL_BLOCK_SCORES = 4 << 20  # bytes of a block's float32 scores (cpu_blocks)
# (block_q, block_k), largest first; the last, cpu_attention's own, also where none fits
CPU_PREFILL_BLOCKS = ((256, 256), (256, 128), (cpu_attention.BLOCK_Q, cpu_attention.BLOCK_K))
_CPU_BLOCKED = "cpu: the asynchronous softmax over blocks of keys (fdjax.ops.cpu_attention)"


def cpu_prefill(queries: int, keys: int = 0, batch: int = 1, heads: int = 1,
                cope: bool = False) -> Choice:
  """How XLA:CPU runs prefill attention, and CoPE's, over `queries` queries a row against
  `keys` keys (batch rows, query heads) under "auto": fdjax.ops.cpu_attention
  (FlashDecoding++'s asynchronous softmax over blocks of keys, the blocks' sizes by the heads:
  cpu_blocks; reading only the keys a block sees), or the reference where it is as fast: below
  CPU_PREFILL_MIN_QUERIES queries, and up to CPU_PREFILL_CACHED_QUERIES where all its float32
  scores (batch x heads x queries x keys) fit in CPU_PREFILL_CACHED_SCORES: the reference
  takes them in one pass, while they stay in the cache, and falls off a cliff past it.
  CoPE's reference (`cope`) makes about four score-sized float32 arrays (scores, gates,
  positions, their gathers), so its scores count four times: a quarter of the line.
  Against the reference, bfloat16 / float32 ms of one jitted call (bench/results/
  prefill_cpu.md, a 2-core Xeon, jax 0.12): a causal prompt of 2048 (16 / 4 heads, head_dim
  64) 1380 -> 53 / 1350 -> 95; 16 prompts of 256 (8 / 2 heads, 32 MiB of scores) 59 -> 21 /
  61 -> 26; a chunk of 256 after 1792 cached keys (32 / 8 heads, head_dim 128) 283 -> 30 /
  293 -> 58. Near the line it moves with the machine: 16 chunks of 64 after 448 keys (16 MiB)
  32 -> 13 / 28 -> 17 in that run, 17 -> 13 / 17 -> 19 and 25 -> 11 / 26 -> 16 in two
  before. Where the reference stays ahead or even (one-off runs): 16 prompts
  of 160 (8 heads, 12.5 MiB) 12 / 14 ms against 19 / 21; 4 of 128 (32 heads, head_dim 128,
  8 MiB) 11 / 16 against 9 / 17; 4 rows of 5 queries against 1024 keys, float32, 12 against
  25. Past the cache it is not close: one prompt of 1024 (8 heads, 32 MiB) 119 / 124 against
  9 / 13 (512, 8 MiB: 8 / 8 against 4 / 4). CoPE, float32: 8 prompts of 256 (4 heads) 42 ->
  24; a prompt of 1024 167 -> 28; 2048 (8 heads) 1400 -> 201.

  Those cases had as many keys as queries (a prompt alone). A chunk after cached keys has more,
  and so has a table rounded up to a power of two pages (the serving engine's, generate's): keys a
  fresh prompt's queries never see, whose scores the reference computes and masks and the blocks
  skip (generate's prefill took each row's whole run, the tokens to come too, until 2026-12-08:
  decode_loop.prefill_width). From CPU_PREFILL_WIDE_QUERIES queries with CPU_PREFILL_WIDE_KEYS
  times as many keys the blocks run whatever the scores. Reference -> blocks, float32 / bfloat16
  ms of the op alone (a one-off script: jitted reference.prefill_attention against
  cpu_attention.prefill_attention, best of two medians of 15; a 2-core AMD EPYC, jax 0.12): 8 / 2
  heads of 32 (bench/e2e.py's CPU model), 4 prompts of 128 in 256 keys 3.96 -> 2.40 / 4.65 ->
  1.83, one 1.30 -> 0.60 / 1.32 -> 0.47, in 2048 keys 8.13 -> 0.45 / 11.24 -> 0.76; 2 prompts of
  256 in 512 keys 10.7 -> 1.54 / 12.4 -> 1.57; 4 of 200 in 512 9.80 -> 2.88 / 11.6 -> 3.06; a
  chunk of 128 after 384 cached keys 3.91 -> 1.10 / 3.01 -> 0.82; 32 / 8 heads of 128, one prompt
  of 128 in 256 keys 6.67 -> 2.21 / 6.27 -> 2.19; the one loss, in float32, 8 / 8 heads of 64, 2
  prompts of 128 in 256 keys 1.98 -> 2.31 / 1.84 -> 1.47. CoPE (float32, the bundled model's 4
  heads of 64): 4 prompts of 128 in 256 keys 6.70 -> 4.15, one 1.81 -> 1.02. Below 128 queries it
  goes both ways (8 prompts of 64 in 128 keys 1.71 -> 1.93, CoPE 3.25 -> 3.92; 4 of 64 in 256 1.60
  -> 1.39), and with fewer spare keys too (2 of 128 in 192, 8 / 8 heads of 64: 2.48 -> 3.18), so
  those keep the cache rule. Most of these shapes are in one run in
  bench/results/prefill_cpu_op_epyc.md (`bench/prefill_cpu.py --parts op`, spare_keys the page
  run's); there the 8 / 8 heads case lost in bfloat16 too, 1.78 -> 1.91."""
  scores = (16 if cope else 4) * batch * heads * queries * keys
  if queries < CPU_PREFILL_MIN_QUERIES:
    return Choice("xla", f"cpu: the reference (fewer than {CPU_PREFILL_MIN_QUERIES} queries)")
  wide = queries >= CPU_PREFILL_WIDE_QUERIES and keys >= CPU_PREFILL_WIDE_KEYS * queries
  if not wide and queries <= CPU_PREFILL_CACHED_QUERIES and scores <= CPU_PREFILL_CACHED_SCORES:
    return Choice("xla", f"cpu: the reference (its {scores >> 20} MiB of scores fit the "
                  "cache)")
  bq, bk = CPU_PREFILL_BLOCKS[-1] if cope else cpu_blocks(heads)
  why = f" (keys at least {CPU_PREFILL_WIDE_KEYS}x the queries)" if wide else ""
  return Choice("xla", _CPU_BLOCKED + why, {"block_q": bq, "block_k": bk})


def cpu_blocks(heads: int) -> tuple[int, int]:
  """cpu_attention's (block_q, block_k) for `heads` query heads: the largest of CPU_PREFILL_BLOCKS
  whose float32 scores (a block's heads x block_q x block_k: each KV head's query heads together)
  fit CPU_PREFILL_BLOCK_SCORES, else its smallest. Larger blocks mean fewer trips through XLA:CPU's
  loops, whose every step runs on one thread; past about 4 MiB the scores leave the cache. bfloat16
  / float32 ms of the op alone against blocks of 128 x 128 (one-off script, a 2-core Xeon, jax
  0.12): a causal prompt of 2048, 8 / 8 heads (the benchmark model's) 43.1 -> 27.8 / 57.7 -> 44.1
  (256 x 256); 16 / 4 heads 57.2 -> 53.6 / 97.3 -> 75.4 (256 x 256); a chunk of 256 after 1792 keys,
  32 / 8 heads of 128, 36.8 -> 30.0 / 61.8 -> 55.6 (256 x 128); 16 chunks of 64 after 448 keys 14.2
  -> 10.8 / 18.1 -> 14.2; the one loss, 4 prompts of 512 with 32 heads of 128, 69.9 -> 74.9 / 115.1
  -> 118.2 (256 x 128). CoPE keeps 128 x 128 (its blocks hold about four score-sized arrays)."""
  return next((b for b in CPU_PREFILL_BLOCKS if 4 * heads * b[0] * b[1]
               <= CPU_PREFILL_BLOCK_SCORES), CPU_PREFILL_BLOCKS[-1])


def cpu_kv_cache(dtype, in_place: bool) -> Choice:
  """The dtype a model of `dtype` keeps its paged KV cache in on the CPU under "auto"
  (settings["dtype"]): float32 for a bfloat16 model whose pages attention reads in place
  (`in_place`: generate's own runs, cpu_paged_decode), else the model's. XLA:CPU computes a
  bfloat16 attention's dots in float32 and so converts the pages it reads, every layer, every
  step: a float32 copy of each layer's keys and values (16 fusions, about 2.9 ms of a ~17 ms
  batch-16 step of the benchmark model). A bfloat16 key or value widens to float32 exactly,
  so float32 pages hold the same numbers, are read where they lie, and take the float32 form
  of cpu_paged_decode; the model casts a decode step's queries to the cache's dtype and the
  attention's output back. A prefill chunk, which gathers its pages anyway, narrows them
  back to bfloat16 in the gather (exact) and attends in bfloat16: cpu_attention's bf16 blocks
  are about twice its float32 ones (a 2048-token prompt's first token 700 -> 518 ms on the
  benchmark model). Costs twice the pages' memory. One generate call (prompt 64, 64 new, the
  58.5M model, processes alternated): batch 16 1421-1656 -> 1903-2238 tokens/s, batch 4
  level (849-938 against 809-996); the same tokens. Pages that are gathered (the serving
  engine's shared pool) keep bfloat16: gathering float32 pages moves twice the bytes, and
  the engine ran 16 requests of 64 + 64 tokens at 768-1026 tokens/s with them against
  957-1216 with bfloat16 ones. Measured on a 2-core Xeon, jax 0.12."""
  d = jax.numpy.dtype(dtype)
  if d == jax.numpy.bfloat16 and in_place:
    return Choice("xla", "cpu: a bfloat16 model's pages read in place are float32 (the same "
                  "values; XLA:CPU reads them with no converted copy)", {"dtype": "float32"})
  return Choice("xla", f"cpu: pages in the model's dtype ({d.name})"
                + ("" if in_place or d != jax.numpy.bfloat16 else
                   "; gathered pages: float32 would move twice the bytes"), {"dtype": d.name})


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset:
  """This processor's feature flags (Linux's /proc/cpuinfo; empty where there is none)."""
  try:
    with open("/proc/cpuinfo") as fh:
      for line in fh:
        if line.startswith("flags"):
          return frozenset(line.split(":", 1)[1].split())
  except OSError:
    pass
  return frozenset()


VNNI = ("avx512_vnni", "avx_vnni", "amx_int8")  # x86 int8 dot-product instructions


def cpu_linear(m: int, k: int, dtype, quantization: str | None = None,
               flags: frozenset | None = None) -> Choice:
  """How XLA:CPU runs x [m, k] @ w under "auto" (fdjax.ops.cpu_linear), measured on this
  project's 2-core AMD EPYC (AVX-512 bf16, VNNI; no AMX), jax 0.12, the 8-layer benchmark
  model's 32 linears chained in one program (bench/results/cpu_linear.md):
  * int8 weights, k a multiple of 32, where the processor has VNNI (`flags`: default this
    one's): the int8 x int8 dot with x quantized in groups of 128 (else 64, 32: the largest
    that divides k; W8A8 dynamic): 2.3-2.6 ms
    against 8.9-9.4 ms for dequantize-then-dot at M = 1 (float32 weights: 3.1-3.8 ms), 4.5-7.3
    against 12.6-14.1 ms at M = 16 (float32: 7.5-8.2 ms);
  * one bfloat16 row: padded to two rows (4.0-4.3 against 10.2-11.5 ms; float32 one row is
    fastest unpadded). The int8 dot pads a single row too (2.6 against 9.2 ms);
  * int4 weights, k a multiple of 128, with VNNI: unpacked to int8 on the fly, the same dot
    with x in the weights' groups of 128 (W4A8 dynamic): 2.9-3.5 ms against 9.5 at M = 1,
    5.4-6.1 against 23 at M = 16;
  * otherwise XLA's dot as the reference writes it (quantized weights dequantized first)."""
  flags = cpu_flags() if flags is None else flags
  dtype = jax.numpy.dtype(dtype)
  if quantization in ("int8", "int4"):
    vnni = [f for f in VNNI if f in flags]
    if quantization == "int8":
      group, need, what = cpu_linear_lib.group_for(k), 32, "int8 x int8 dot"
    else:
      need = quant.GROUP
      group, what = (need if k % need == 0 else 0), "int4 unpacked to int8, int8 x int8 dot"
    if vnni and group:
      return Choice("xla", f"cpu: {what} on {vnni[0]}, activations quantized in groups of "
                    f"{group}", cpu_linear_lib.Form(rows=2 if m == 1 else 1, group=group))
    why = (f"K {k} is not a multiple of {need}" if vnni else "no VNNI on this processor")
    return Choice("xla", f"cpu: {why}: {quantization} weights dequantized, then a float dot",
                  cpu_linear_lib.Form())
  if m == 1 and dtype == jax.numpy.bfloat16 and not quantization:
    return Choice("xla", "cpu: one bfloat16 row padded to two (XLA:CPU's one-row bf16 dot is "
                  "slower)", cpu_linear_lib.Form(rows=2))
  return Choice("xla", "cpu: XLA's dot", cpu_linear_lib.Form())


def mosaic_linear_unsupported(m: int, k: int, n: int, dtype,
                              quantization: str | None = None) -> str | None:
  """Why the Mosaic GPU flat GEMM (float, or int8 / int4 weights) cannot take x [m, k] @ w
  [k, n] (None: it can)."""
  if quantization:
    return mosaic_quantized.unsupported(m, k, n, dtype, quant.bits_of(quantization))
  return mosaic_flat_gemm.unsupported(m, k, n, dtype)


def _linear_on_gpu(choice: Choice, m, k, n, dtype, quantization, e) -> Choice:
  """The table's choice as "auto" runs it on a CUDA GPU: the Mosaic GPU flat GEMM for "flat"
  on Hopper where it takes the call (and the entry does not say "backend": "pallas"), and for
  "gemv" too where this JAX has no Triton; else Triton, else XLA."""
  mosaic = not_hopper() or mosaic_linear_unsupported(m, k, n, dtype or "bfloat16",
                                                      quantization)
  wanted = choice.impl == "flat" and e.get("backend", "pallas_mosaic") == "pallas_mosaic"
  if mosaic is None and (wanted or not has_triton()):
    return Choice("flat_mosaic", f"{choice.reason}; Mosaic GPU flat GEMM: TMA pipeline, WGMMA")
  if has_triton():
    return choice
  return Choice("xla", f"{choice.reason}; Mosaic GPU: {mosaic}; Triton: this JAX has no Pallas "
                f"Triton backend")


# ------------------------------------------------------------------- mixture of experts

MOE_MIN_TILE, MOE_MAX_TILE = 8, 128  # rows per expert tile of the grouped strategy
# FLOP per byte of expert weights at which multiplying a row costs what reading costs: a
# GPU's and a TPU's peak ratio (H100 bf16 ~ 989 TFLOP/s / 3.35 TB/s; v5e 197 / 0.82); on the
# CPU what bench/results/moe.md shows XLA doing (a Qwen3-30B-A3B decode step of 64 tokens:
# grouped tiles of 8, 1.5x the bytes and 1/8 the rows of every expert on every token, 358 ms
# against 432; at 100 the rule picks the tiles there, and every expert on every token only
# where the tiles would read more than 2x its bytes).
MOE_BALANCE = {"cpu": 100, "cuda": 300, "gpu": 300, "tpu": 240}


def moe_key(num_experts: int, hidden: int, width: int, top_k: int,
            quantization: str | None = None) -> str:
  """A mixture-of-experts layer's table key: "E128xH2048xF768xk8" (experts, hidden size, each
  expert's width, experts per token), ":int8" / ":int4" for quantized experts."""
  return (f"E{num_experts}xH{hidden}xF{width}xk{top_k}"
          + (f":{quantization}" if quantization else ""))


def moe(tokens: int, top_k: int, num_experts: int, itemsize: float = 2,
        platform: str = "cpu", *, hidden: int | None = None, width: int | None = None,
        quantization: str | None = None, kind: str | None = None) -> Choice:
  """How XLA runs the experts of a mixture-of-experts layer for `tokens` tokens, each routed
  to `top_k` of `num_experts` (fdjax.ops.moe), weights of `itemsize` bytes: by tokens per
  expert, the grouped GEMM with tiles sized by the mean (8 to 128 rows; it reads at most one
  expert per tile, never an expert with no token) or every expert on every token (each expert
  read once, tokens x experts rows).

  Measured, where the device's table has the layer (`hidden`, `width`, `quantization` given,
  and `platform` this process's, device `kind`): whichever took less time at the smallest
  token count measured at or above `tokens` (else the largest). Otherwise analytic: whichever
  costs less when reading an expert costs `itemsize` and multiplying a row of it
  2 / MOE_BALANCE[platform] (both per 3 H F).

  `settings` is the tile. The GEMV per (token, expert) pair ("gather") is not picked: on
  XLA:CPU its M = 1 products ran at half the grouped tiles' speed at batch 1. On a GPU
  `moe_on_gpu` then says who runs the tiles."""
  pairs = tokens * top_k
  per_expert = -(-pairs // num_experts)
  tile = moe_tile(tokens, top_k, num_experts)
  tiles = moe_lib.tile_count(pairs, num_experts, tile)
  shape = (f"{pairs} pairs over {num_experts} experts, ~{per_expert} per expert: tiles of "
           f"{tile}")
  measured = _moe_measured(tokens, top_k, num_experts, platform, hidden, width, quantization,
                           kind)
  if measured is not None:
    why = (f"{shape}; measured at {measured['tokens']} tokens (fdjax tune --moe): the tiles "
           f"{measured['grouped_ms']:.3g} ms, every expert {measured['dense_ms']:.3g} ms")
    if measured["dense_ms"] < measured["grouped_ms"]:
      return Choice("dense", why)
    return Choice("grouped", why, tile)
  row = 2 / MOE_BALANCE.get(platform, MOE_BALANCE["cpu"])
  grouped = tiles * itemsize + tiles * tile * row
  dense = num_experts * itemsize + tokens * num_experts * row
  why = (f"{shape}, at most {tiles} tiles' experts read and {tiles * tile} rows; every expert "
         f"on every token: {num_experts} read, {tokens * num_experts} rows")
  if dense < grouped:
    return Choice("dense", why)
  return Choice("grouped", why, tile)


def moe_tile(tokens: int, top_k: int, num_experts: int) -> int:
  """The grouped strategy's rows per expert tile: the mean tokens per expert rounded up to a
  power of two, from MOE_MIN_TILE to MOE_MAX_TILE."""
  per_expert = -(-tokens * top_k // num_experts)
  return min(max(MOE_MIN_TILE, 1 << (per_expert - 1).bit_length()), MOE_MAX_TILE)


def _moe_measured(tokens, top_k, num_experts, platform, hidden, width, quantization,
                  kind) -> dict | None:
  """The table's profile row moe() follows for this layer and token count, or None."""
  if hidden is None or width is None or platform != jax.default_backend():
    return None
  entry = moe_tables().get(kind or device_kind(), {}).get(
      moe_key(num_experts, hidden, width, top_k, quantization))
  if not entry or not entry.get("profile"):
    return None
  profile = sorted(entry["profile"], key=lambda r: r["tokens"])
  return next((r for r in profile if r["tokens"] >= tokens), profile[-1])


def moe_unsupported(tile: int, hidden: int, width: int, dtype,
                    bits: int | None = None) -> str | None:
  """Why the Mosaic GPU grouped GEMM (float experts, or int`bits` ones) cannot take both
  products of an expert (x [tile, H] @ [H, 2F], then [tile, F] @ [F, H]); None: it can."""
  if bits:
    return (mosaic_grouped_quantized.unsupported(tile, hidden, 2 * width, dtype, bits)
            or mosaic_grouped_quantized.unsupported(tile, width, hidden, dtype, bits))
  return (mosaic_grouped.unsupported(tile, hidden, 2 * width, dtype)
          or mosaic_grouped.unsupported(tile, width, hidden, dtype))


def moe_on_gpu(choice: Choice, hidden: int, width: int, dtype,
               bits: int | None = None) -> Choice:
  """What "auto" runs for a mixture of experts on a CUDA GPU: the grouped strategy's tile
  products by the Mosaic GPU grouped GEMM (over int`bits` experts with `bits`) on Hopper where
  it takes them ("grouped_mosaic", tiles of at most its 64 rows: `settings`), else the XLA
  strategy with the reason."""
  if choice.impl != "grouped":
    return choice
  rows = min(choice.settings, mosaic_grouped.MAX_ROWS)  # longer tiles: more tiles of 64
  why = not_hopper() or moe_unsupported(rows, hidden, width, dtype, bits)
  if why is None:
    weights = f"int{bits} experts dequantized in the K loop, " if bits else ""
    return Choice("grouped_mosaic", f"{choice.reason}; Mosaic GPU grouped GEMM: {weights}TMA "
                  f"pipeline, WGMMA, tiles of {rows}", rows)
  _log_fallback("moe", why)
  return Choice("grouped", f"{choice.reason}; XLA: Mosaic GPU {why}", choice.settings)


# ------------------------------------------------------------------------- describe

def describe(config=None, *, platform: str | None = None, batch: int = 1,
             dtype="bfloat16", quantization: str | None = None,
             kind: str | None = None) -> dict[str, str]:
  """What "auto" runs for each op of a model (no config: of a head_dim-128 model; its linear
  weights quantized to `quantization` or not) at this batch on `platform` ("tpu" also
  "tpu:v6e"; a TPU's or GPU's tables: of device `kind`, default this process's), with the
  reason, e.g. "xla (Mosaic GPU: head_dim 80 is not 64, 128 or 256 ...; Triton: head_dim 80
  is not a power of two >= 16)"; a kernel's entry also names its Pallas backend (BACKENDS), e.g.
  "pallas_mosaic (...) [Pallas Mosaic GPU, sm_90a]"."""
  platform = platform or jax.default_backend()
  if platform.startswith("tpu"):
    platform, kind = "tpu", kind or tpu_kind(platform)
  head_dim = 128 if config is None else config.head_dim
  group = 1 if config is None else config.num_heads // config.num_kv_heads
  cope = config is not None and config.cope
  ops = ["cope_attention"] if cope else ["prefill_attention", "decode_attention"]
  choices = {op: attention(op, head_dim, dtype, platform, group=group) for op in ops}
  bits = None if quantization is None else quant.bits_of(quantization)
  moe_itemsize = bits / 8 if bits else jax.numpy.dtype(dtype).itemsize
  layer = {} if config is None else dict(hidden=config.hidden_size,
                                          width=config.moe_intermediate_size,
                                          quantization=quantization, kind=kind)
  if config is not None and config.num_experts and platform not in GPU + ("tpu",):
    choices["moe"] = moe(batch, config.experts_per_token, config.num_experts, moe_itemsize,
                         platform, **layer)
  if platform not in GPU + ("tpu",):
    hidden = 4096 if config is None else config.hidden_size
    linear_choice = (cpu_linear(batch, hidden, dtype, quantization) if platform == "cpu"
                     else attention("linear", 0, dtype, platform))
    if platform == "cpu":  # as generate makes its cache (rows' own runs, read in place)
      kv = cpu_kv_cache(dtype, in_place=True)
      choices["kv_cache"] = kv
      decode_op = "paged_cope_decode_attention" if cope else "paged_decode_attention"
      choices[decode_op] = cpu_paged_decode(kv.settings["dtype"])
      choices[ops[0]] = Choice(
          "xla", f"{_CPU_BLOCKED} from "
          f"{CPU_PREFILL_MIN_QUERIES} queries a row; below, and where the reference's scores "
          f"fit the cache (unless from {CPU_PREFILL_WIDE_QUERIES} queries with "
          f"{CPU_PREFILL_WIDE_KEYS}x the keys), the reference")
    return {**{op: str(c) for op, c in choices.items()}, "linear": str(linear_choice)}
  if config is not None and config.num_experts:
    choices["moe"] = moe(batch, config.experts_per_token, config.num_experts, moe_itemsize,
                         platform, **layer)
    if platform in GPU:
      choices["moe"] = moe_on_gpu(choices["moe"], config.hidden_size,
                                  config.moe_intermediate_size, dtype, bits)
  shapes = {} if config is None else config.linear_shapes()
  choices.update({f"linear[{name}]": linear(batch, k, n, kind=kind, quantization=quantization,
                                            dtype=dtype, gpu_auto=platform in GPU)
                  for name, (k, n) in shapes.items()})
  out = {}
  for op, c in choices.items():
    if c.impl == "xla":
      out[op] = str(c)
    elif platform == "tpu":
      out[op] = f"{c} [{kind}] [{BACKENDS['tpu']}]"
    else:
      out[op] = f"{c} [{BACKENDS['pallas_mosaic' if 'mosaic' in c.impl else 'pallas']}]"
  return out
