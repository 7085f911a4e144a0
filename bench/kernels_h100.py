"""The kernels' resource table, compiled for the H100 with no GPU (fdjax.tuning.aot): per kernel,
shape and setting, registers per thread, spill bytes, shared memory, grid, and how many
programs fit on one SM by registers and by shared memory.

  python bench/kernels_h100.py                # -> bench/results/kernels_h100.{json,md}
  python -m fdjax bench kernels
  python bench/kernels_h100.py --only default # the default settings only

Shapes: Llama-2-7B (MHA) and Llama-3-8B (GQA) attention at head_dim 128, and head_dim 64
(Llama-3.2-1B's GQA, and MHA); batch 1 to 64 and KV 1 to 32k; the four linear shapes of both
models at M = 1 to 64; CoPE at head_dim 64 and 128; bfloat16 (the models' dtype) and
float32. `DEFAULTS` (every kernel with its default settings, through its dispatch op with
impl="pallas") is also what tests/test_h100_compile.py compiles; `ALTERNATIVES` are other
settings (tune's candidates, other blocks, the planted over-sized ones) for the table only.
Needs the CUDA plugin and ptxas (fdjax.tuning.aot says how to install them).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compiling for a described GPU: no driver

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench import common  # noqa: E402
from fdjax.ops import dispatch, quant
from fdjax.tuning import aot, tune  # noqa: E402
from models import presets
from pallas_kernels.mosaic_gpu import decode_attention as mda  # noqa: E402
from pallas_kernels.mosaic_gpu import flat_gemm as mfg  # noqa: E402
from pallas_kernels.mosaic_gpu import grouped_gemm as mgg  # noqa: E402
from pallas_kernels.mosaic_gpu import grouped_quantized_gemm as mgq  # noqa: E402
from pallas_kernels.mosaic_gpu import quantized_gemm as mq  # noqa: E402
from pallas_kernels.triton import cope_attention as ck  # noqa: E402
from pallas_kernels.triton import decode_attention as dk  # noqa: E402
from pallas_kernels.triton import flat_gemm as fg  # noqa: E402
from pallas_kernels.triton import gemv as gv  # noqa: E402
from pallas_kernels.triton import prefill_attention as pk  # noqa: E402

BF16, F32, I32 = jnp.bfloat16, jnp.float32, jnp.int32
# Attention heads: (query heads, KV heads, head_dim).
HEADS = {"llama-2-7b": (32, 32, 128), "llama-3-8b": (32, 8, 128), "llama-3.2-1b": (32, 8, 64),
         "mha-d64": (32, 32, 64)}
DECODE = [(1, 1), (1, 32768), (8, 4097), (64, 4096), (8, 32768)]  # (batch, KV length)
PREFILL = [(1, 17), (4, 1000), (1, 8192)]                # (batch, prompt length)
COPE = [(1, 17, 17), (2, 1000, 1000), (8, 1, 4097), (1, 1, 32768)]  # (batch, queries, keys)
PAGED = [(8, 64, 64), (32, 16, 16), (4, 512, 64)]  # (batch, pages per row, page size)
CHUNKS = [(2, 512, 4096)]                           # (batch, chunk, cached keys before it)
# Sliding windows and soft-capping: (heads, {window, softcap}) of the models that use them.
WINDOWED = {"mistral-7b w4096": ((32, 8, 128), dict(window=4096)),
            "gemma-2-9b w4096 cap50": ((16, 8, 256), dict(window=4096, softcap=50.0)),
            "gemma-3-1b w512": ((4, 1, 256), dict(window=512))}
MS = (1, 2, 3, 8, 16, 17, 32, 64)
NPOS = 64


@dataclasses.dataclass(frozen=True)
class Case:
  kernel: str
  shape: str
  dtype: str
  setting: str   # "default" or the knobs set
  fn: object     # called on `args` placed on the device
  args: tuple    # ((shape, dtype), ...)

  def __str__(self):
    return f"{self.kernel} {self.shape} {self.dtype} {self.setting}"

  def lower(self, place, target="h100"):
    """Lowered for the described `target` (place: fdjax.tuning.aot.abstract)."""
    with aot.on(target):
      return jax.jit(self.fn).lower(*(place(s, d) for s, d in self.args))


def _heads(name):
  """(hq, hkv, d, the ops' window / softcap arguments) of a HEADS or WINDOWED name."""
  if name in WINDOWED:
    return (*WINDOWED[name][0], WINDOWED[name][1])
  return (*HEADS[name], {})


def _named(op, impl):
  """A case's kernel column: the op, with the impl where it is the Mosaic GPU one."""
  return f"{op} ({impl})" if impl.startswith("pallas_mosaic") else op


def _decode(name, b, s, dtype, settings=None, impl="pallas"):
  hq, hkv, d, opts = _heads(name)
  if settings is None:
    fn = lambda q, k, v, n: dispatch.decode_attention(q, k, v, n, impl=impl, **opts)
  else:
    fn = lambda q, k, v, n: dk.decode_attention(q, k, v, n, sm_scale=d ** -0.5,
                                                settings=settings)
  return Case(_named("decode_attention", impl), f"{name} B={b} S={s}", jnp.dtype(dtype).name,
              _label(settings), fn, (((b, hq, d), dtype), ((b, s, hkv, d), dtype),
                                     ((b, s, hkv, d), dtype), ((b,), I32)))


def _paged(name, b, pages, page_size, dtype, impl="pallas"):
  hq, hkv, d, opts = _heads(name)
  fn = lambda q, kp, vp, table, n: dispatch.paged_decode_attention(q, kp, vp, table, n,
                                                                   impl=impl, **opts)
  pool = ((hkv, b * pages, page_size, d), dtype)  # heads-major, as fdjax.ops.kv_cache
  return Case(_named("paged_decode_attention", impl), f"{name} B={b} pages={pages}x{page_size}",
              jnp.dtype(dtype).name, "default", fn,
              (((b, hq, d), dtype), pool, pool, ((b, pages), I32), ((b,), I32)))


def _chunk(name, b, t, cached, dtype, impl="pallas"):
  hq, hkv, d = HEADS[name]
  fn = lambda q, k, v, n, start: dispatch.prefill_attention(q, k, v, lengths=n, q_start=start,
                                                            impl=impl)
  kv = ((b, cached + t, hkv, d), dtype)
  return Case("prefill_attention", f"{name} B={b} T={t} after {cached}", jnp.dtype(dtype).name,
              "default", fn, (((b, t, hq, d), dtype), kv, kv, ((b,), I32), ((b,), I32)))


def _prefill(name, b, t, dtype, settings=None, impl="pallas"):
  hq, hkv, d, opts = _heads(name)
  if settings is None:
    fn = lambda q, k, v, n: dispatch.prefill_attention(q, k, v, lengths=n, impl=impl,
                                                       **opts)
  else:
    fn = lambda q, k, v, n: pk.prefill_attention(q, k, v, n, sm_scale=d ** -0.5,
                                                 settings=settings)
  return Case("prefill_attention", f"{name} B={b} T={t}", jnp.dtype(dtype).name,
              _label(settings), fn, (((b, t, hq, d), dtype), ((b, t, hkv, d), dtype),
                                     ((b, t, hkv, d), dtype), ((b,), I32)))


def _cope(name, b, t, s, dtype, settings=None, gates="key"):
  """gates: the official code's variants too, "value" (v as the gate keys) or "separate"
  (gate keys of their own, one more operand)."""
  hq, hkv, d = HEADS[name]
  if settings is None:
    fn = lambda q, k, v, e, n, *g: dispatch.cope_attention(  # noqa: E731
        q, k, v, e, lengths=n, impl="pallas", gate_keys=v if gates == "value" else
        (g[0] if g else None))
  else:
    fn = lambda q, k, v, e, n: ck.cope_attention(q, k, v, e, n, sm_scale=d ** -0.5,
                                                 settings=settings)
  kv = ((b, s, hkv, d), dtype)
  return Case("cope_attention", f"{name} B={b} T={t} S={s}" + (
      f" {gates} gates" if gates != "key" else ""), jnp.dtype(dtype).name, _label(settings),
      fn, (((b, t, hq, d), dtype), kv, kv, ((NPOS, d), dtype), ((b,), I32))
      + ((kv,) if gates == "separate" else ()))


def _linear(label, m, k, n, dtype, kernel=None, settings=None, impl="pallas"):
  if kernel is None:
    name, fn = _named("linear", impl), lambda x, w: dispatch.linear(x, w, impl=impl)
  else:
    name, fn = kernel.__name__, lambda x, w: kernel(x, w, settings=settings)
  return Case(name, f"{label} M={m} K={k} N={n}", jnp.dtype(dtype).name, _label(settings), fn,
              (((m, k), dtype), ((k, n), dtype)))


def _quantized(label, m, k, n, method, impl="pallas"):
  """dispatch.linear on a weight quantized to `method` (int8 / int4), bfloat16 x."""
  vshape, sshape = quant.stored_shapes(method, k, n)
  vdtype = jnp.int8 if method == "int8" else jnp.uint8
  fn = lambda x, values, scales: dispatch.linear(
      x, quant.from_stored(values, scales, method, k), impl=impl)
  return Case(_named(f"linear {method}", impl), f"{label} M={m} K={k} N={n}", "bfloat16",
              "default", fn,
              (((m, k), BF16), (vshape, vdtype), (sshape, BF16)))


def _grouped(label, rows, tiles, k, n, experts=128):
  """The Mosaic GPU grouped GEMM on a mixture of experts' tiles, bfloat16."""
  fn = lambda x, e, w: mgg.grouped_gemm(x, e, w)
  return Case("moe grouped_gemm (pallas_mosaic)", f"{label} rows={rows} tiles={tiles} K={k} "
              f"N={n}", "bfloat16", "default", fn,
              (((tiles, rows, k), BF16), ((tiles,), I32), ((experts, k, n), BF16)))


def _grouped_quantized(label, rows, tiles, k, n, method, experts=128):
  """The Mosaic GPU grouped GEMM on int8 / int4 experts (bfloat16 x and scales)."""
  bits = quant.bits_of(method)
  vshape, sshape = quant.stored_shapes(method, k, n)
  fn = lambda x, e, values, scales: mgq.grouped_gemm(x, e, values, scales, bits=bits)
  return Case(f"moe grouped_gemm {method} (pallas_mosaic)", f"{label} rows={rows} "
              f"tiles={tiles} K={k} N={n}", "bfloat16", "default", fn,
              (((tiles, rows, k), BF16), ((tiles,), I32),
               ((experts,) + vshape, jnp.int8 if bits == 8 else jnp.uint8),
               ((experts,) + sshape, BF16)))


def _label(settings):
  if settings is None:
    return "default"
  return " ".join(f"{f}={v}" for f, v in vars(settings).items() if v is not None)


def linear_shapes():
  """{(K, N): "model name"} of the two models' four weight shapes (O is shared)."""
  out = {}
  for model in ("llama-2-7b", "llama-3-8b"):
    for name, kn in presets.get(model).linear_shapes().items():
      out[kn] = out.get(kn, f"{model} {name}")
  return out


def defaults(dtypes=(BF16, F32)) -> list[Case]:
  """Every kernel at every shape with its default settings, through its dispatch op.
  float32 at the first and the largest shape of each head layout (and every linear shape
  at M = 1, 16, 64), bfloat16 everywhere."""
  cases = []
  for dtype in dtypes:
    full = dtype == BF16
    for name in HEADS:
      cases += [_decode(name, b, s, dtype) for b, s in (DECODE if full else DECODE[::3])]
      cases += [_prefill(name, b, t, dtype) for b, t in (PREFILL if full else PREFILL[::2])]
      cases += [_cope(name, *bts, dtype) for bts in (COPE if full else COPE[1:3])]
      cases += [_paged(name, *bpp, dtype) for bpp in (PAGED if full else PAGED[:1])]
      cases += [_chunk(name, *btc, dtype) for btc in CHUNKS]
    for name in WINDOWED if full else ():
      cases += [_decode(name, 8, 8192, dtype), _paged(name, 8, 128, 64, dtype),
                _prefill(name, 1, 8192, dtype)]
    for (k, n), label in linear_shapes().items():
      cases += [_linear(label, m, k, n, dtype) for m in (MS if full else (1, 16, 64))]
      if full:
        cases += [_quantized(label, m, k, n, method) for method in ("int8", "int4")
                  for m in (1, 4, 16, 64)]
  return cases


MOSAIC = "pallas_mosaic"


def mosaic_defaults() -> list[Case]:
  """The Mosaic GPU kernels at their default settings (impl="pallas_mosaic"), bfloat16: decode
  attention, contiguous and paged, at the decode shapes of every head layout it takes (cache
  lengths a multiple of 8: not 1 or 4097, which the kernel refuses) and at Mistral's and
  Gemma's (head_dim 256, windows, soft-cap); the flat GEMM at every linear shape of
  both models, at each M the kernel pads differently (x is padded to a multiple of 8 rows:
  M = 1 stands for 1 to 8, one compiled kernel), and on int8 / int4 weights at M = 1, 16, 64;
  the grouped GEMM of Qwen3-30B-A3B's experts at every tile size auto gives it (8 to 64), and
  on int8 / int4 experts at the smallest and largest tiles."""
  cases = []
  for name in HEADS:
    cases += [_decode(name, b, s, BF16, impl=MOSAIC) for b, s in DECODE if s % 8 == 0]
    cases += [_paged(name, *bpp, BF16, impl=MOSAIC) for bpp in PAGED]
  for name in WINDOWED:  # Mistral's window; Gemma's head_dim 256 with its window and soft-cap
    cases += [_decode(name, 8, 8192, BF16, impl=MOSAIC),
              _paged(name, 8, 128, 64, BF16, impl=MOSAIC)]
  for (k, n), label in linear_shapes().items():
    cases += [_linear(label, m, k, n, BF16, impl=MOSAIC) for m in (1, 16, 17, 32, 64)]
    cases += [_quantized(label, m, k, n, method, impl=MOSAIC) for method in ("int8", "int4")
              for m in (1, 16, 64)]
  cfg = presets.get("qwen3-30b-a3b")  # its experts' two products, tiles of 8 / 16 / 64 rows
  h, f = cfg.hidden_size, cfg.moe_intermediate_size
  for (k, n), part in (((h, 2 * f), "gate_up"), ((f, h), "down")):
    cases += [_grouped(f"qwen3-30b-a3b {part}", rows, tiles, k, n)
              for rows, tiles in ((8, 8), (16, 71), (32, 135), (64, 135))]
    cases += [_grouped_quantized(f"qwen3-30b-a3b {part}", rows, tiles, k, n, method)
              for method in ("int8", "int4") for rows, tiles in ((8, 8), (64, 135))]
  return cases


def _mosaic_launch(case: Case) -> tuple[tuple, int]:
  """(grid, threads) of a Mosaic GPU case, from its settings (Mosaic GPU's dump has no launch
  record): one warpgroup (128 threads) a program; decode attention at head_dim 256 two."""
  if case.kernel.startswith("moe grouped_gemm"):
    (tiles, _, _), _, (_, _, n), *_ = (shape for shape, _ in case.args)
    return (n // mgg.Settings().block_n, tiles, 1), 128
  if case.kernel.startswith("linear int"):  # the quantized flat GEMM, over the stored rows
    (_, _), (rows, n), _ = (shape for shape, _ in case.args)
    s = mq.Settings.default(rows, n)
    return (n // s.block_n, s.split_k, 1), 128
  if case.kernel.startswith("linear"):
    (m, k), (_, n) = (shape for shape, _ in case.args)
    s = mfg.Settings.default(k, n)
    return (n // s.block_n, s.split_k, 1), 128
  (b, hq, d), kv = (shape for shape, _ in case.args[:2])
  paged = len(case.args) == 5
  hkv, page_size = (kv[0], kv[2]) if paged else (kv[2], kv[1])
  max_keys = page_size * (case.args[3][0][1] if paged else 1)
  window = _heads(case.shape.split(" B=")[0])[3].get("window")
  _, n_split = mda.splits(max_keys, window, mda.settings_for(b, hkv, max_keys, d, window))
  return (b, hkv, n_split), 128 * mda.warpgroups(d)


def oversized() -> list[Case]:
  """Settings the compiler must refuse for the H100: a flat GEMM whose 4-stage pipeline of
  512 x 512 tiles needs 1.6 MB of shared memory, and CoPE at 64 x 64, which spills."""
  return [_linear("llama-2-7b o", 16, 4096, 4096, BF16, fg.flat_gemm,
                  fg.Settings(block_n=512, block_k=512, num_stages=4)),
          _cope("llama-3-8b", 2, 1000, 1000, BF16,
                ck.Settings(block_q=64, block_k=64, num_warps=4, num_stages=2))]


def alternatives() -> list[Case]:
  """Other settings at one shape per kernel: tune's candidates, other blocks and warps."""
  cases = [_linear("llama-2-7b o", 1, 4096, 4096, BF16, gv.gemv, gv.Settings(**c))
           for c in tune.GEMV_CONFIGS]
  cases += [_linear("llama-2-7b o", m, 4096, 4096, BF16, fg.flat_gemm, fg.Settings(**c))
            for m in (16, 64) for c in tune.FLAT_CONFIGS]
  cases += [_decode("llama-3-8b", 8, 4097, BF16, dk.Settings(block_k=bk, num_warps=w))
            for bk, w in ((64, 4), (256, 4), (128, 8))]
  cases += [_prefill("llama-3-8b", 4, 1000, BF16, pk.Settings(block_q=bq, block_k=bk,
                                                              num_warps=w))
            for bq, bk, w in ((32, 32, 4), (128, 64, 4), (128, 64, 8), (128, 128, 8))]
  cases += [_cope("llama-3-8b", 2, 1000, 1000, BF16, ck.Settings(block_q=bq, block_k=bk,
                                                                 num_warps=w))
            for bq, bk, w in ((16, 16, 4), (32, 64, 4), (64, 32, 4), (64, 64, 8))]
  return cases + oversized()


def measure(case: Case) -> list[dict]:
  """One row per kernel the case launches: compiled strictly (a spill is an error); a
  refused case is compiled again leniently to show what it would use."""
  row = {"kernel": case.kernel, "shape": case.shape, "dtype": case.dtype,
         "setting": case.setting}
  if "pallas_mosaic" in case.kernel:
    return _measure_mosaic(case, row)
  with tempfile.TemporaryDirectory(prefix="fdjax_aot_") as dump:
    t0 = time.perf_counter()
    try:
      aot.compile(case.lower(aot.abstract), dump_to=dump)
      row["status"] = "ok"
    except aot.CompileError as e:
      row["status"] = str(e).replace("refused by the compiler: ", "refused: ")
      try:
        aot.compile(case.lower(aot.abstract), dump_to=dump, strict=False)
      except aot.CompileError:
        pass
    row["compile_s"] = time.perf_counter() - t0
    kernels = aot.resources(dump)
  if not kernels:
    return [row]
  return [{**row, "launch": k.name, "grid": "x".join(map(str, k.grid)), "programs": k.programs,
           "threads": k.threads, "registers": k.registers, "spill_stores": k.spill_stores,
           "spill_loads": k.spill_loads, "shared_kb": k.shared_bytes / 1024,
           "per_sm_regs": k.per_sm_by_registers(), "per_sm_shared": k.per_sm_by_shared(),
           "per_sm": min(k.per_sm_by_registers(), k.per_sm_by_shared())} for k in kernels]


def _measure_mosaic(case: Case, row: dict) -> list[dict]:
  """measure() for a Mosaic GPU kernel: lowered and compiled inside aot.mosaic_dump (its
  resources are written at lowering, its ptxas report at compiling)."""
  with tempfile.TemporaryDirectory(prefix="fdjax_mosaic_") as dump:
    t0 = time.perf_counter()
    with aot.mosaic_dump(dump):
      try:
        aot.compile(case.lower(aot.abstract))
        row["status"] = "ok"
      except aot.CompileError as e:
        row["status"] = str(e).replace("refused by the compiler: ", "refused: ")
    row["compile_s"] = time.perf_counter() - t0
    kernels = aot.mosaic_resources(dump)
  grid, threads = _mosaic_launch(case)
  out = []
  for mk in kernels:
    k = aot.Kernel(mk.name, grid, threads, mk.shared_bytes, mk.registers, mk.spill_stores,
                   mk.spill_loads)
    if k.spill_stores or k.spill_loads:
      row["status"] = "refused: spills"
    launch = re.sub(r"_\d+$", "", mk.name)  # the compile's counter off the kernel's name
    out.append({**row, "launch": launch, "grid": "x".join(map(str, grid)),
                "programs": k.programs, "threads": threads, "registers": k.registers,
                "spill_stores": k.spill_stores, "spill_loads": k.spill_loads,
                "shared_kb": k.shared_bytes / 1024, "per_sm_regs": k.per_sm_by_registers(),
                "per_sm_shared": k.per_sm_by_shared(),
                "per_sm": min(k.per_sm_by_registers(), k.per_sm_by_shared())})
  return out or [row]


COLUMNS = ["kernel", "shape", "dtype", "setting", "status", "launch", "grid", "threads",
           "registers", "spill_stores", "spill_loads", "shared_kb", "per_sm_regs",
           "per_sm_shared", "per_sm"]
NOTES = """Compiled for the H100 SXM (sm_90a; fdjax/tuning/targets/h100.txtpb) on a CPU-only host by
XLA with `xla_gpu_fail_ptx_compilation_on_register_spilling` (fdjax.tuning.aot): "ok" means Triton and
ptxas compiled it without spilling and within shared memory. registers: per thread, spill
bytes per thread (stores / loads) and shared memory per program from `ptxas -v` on XLA's PTX
and XLA's launch record; per_sm_regs / per_sm_shared: programs one SM holds by its 64K
registers (allocated per warp in units of 256) and by its 228 KB of shared memory (plus 1 KB
reserved per program), at most 32; per_sm is the smaller. A refused row shows what a lenient
compile of the same setting uses. `default` rows go through the dispatch op with
impl="pallas" (for linear: GEMV or the flat GEMM by the analytic table); these are what
tests/test_h100_compile.py compiles. Rows whose kernel says "(pallas_mosaic)" are the Mosaic GPU
kernels (pallas_kernels/mosaic_gpu/: decode attention, whose async and online launches are
both in the program, and the flat GEMM): compiled by Mosaic GPU's own pipeline (MLIR -> PTX ->
ptxas for sm_90a), registers and spills from its ptxas report, shared memory from the launch
its compile log records plus ptxas's static part; grid from its settings, one warpgroup (128
threads) a program."""


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--only", choices=["default", "alternatives"])
  ap.add_argument("--results-dir")
  ap.add_argument("--update", metavar="KERNEL",
                  help="measure only the cases whose kernel starts with this and put their rows "
                  "into the committed table in place of the old ones (each row keeps its own "
                  "command and date)")
  args = ap.parse_args()
  why = aot.unavailable()
  if why:
    raise SystemExit(f"bench/kernels_h100.py: cannot compile for the H100 here: {why}")
  cases = ([] if args.only == "alternatives" else defaults() + mosaic_defaults()) + (
      [] if args.only == "default" else alternatives())
  kept = []
  if args.update:
    cases = [c for c in cases if c.kernel.startswith(args.update)]
    with open(os.path.join(args.results_dir or common.RESULTS, "kernels_h100.json")) as fh:
      kept = [r for r in json.load(fh)["rows"] if not r["kernel"].startswith(args.update)]
  target = {"target": f"{aot.sharding().mesh.devices.flat[0].device_kind} "
                      f"({aot.ARCH['h100']}, described: no GPU)",
            "compiler": ", ".join(f"{k} {v}" for k, v in aot.versions().items())}
  rows = []
  for i, case in enumerate(cases):
    got = [{**target, **r} for r in measure(case)]
    rows += got
    print(f"[{i + 1}/{len(cases)}] {case}: {got[0]['status']} " + " ".join(
        f"{r['launch']}: {r['registers']} registers, {r['spill_stores']} B spilled, "
        f"{r['shared_kb']:.0f} KB shared" for r in got if "launch" in r), flush=True)
  env = common.environment()
  rows = kept + [{**env, **r} for r in rows]
  notes = f"Target: {target['target']}; compiled by {target['compiler']}.\n\n{NOTES}"
  print(common.write_results("kernels_h100", rows, COLUMNS, notes=notes,
                             results_dir=args.results_dir))


if __name__ == "__main__":
  main()
