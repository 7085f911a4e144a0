"""The TPU kernels' resource table, compiled for TPU v5e, v6e and v5p with no TPU
(fdjax.tuning.aot, libtpu): per kernel, shape and setting, whether libtpu (Mosaic) accepts it, the
scoped VMEM it reserves for each Mosaic kernel, and the code generated for the program.

  python bench/kernels_tpu.py             # -> bench/results/kernels_tpu.{json,md}
  python -m fdjax bench kernels --backend tpu

`defaults(generation)` (every TPU kernel with its default settings, through its dispatch
op with impl="pallas_tpu", sized for that generation) is also what tests/test_tpu_compile.py
compiles; `oversized()` are blocks the compiler must refuse for VMEM (the second one on v5e
and v5p only, whose default scoped VMEM is half v6e's). Needs libtpu (fdjax.tuning.aot says how to
install it).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compiling for a described TPU: none here


from bench import common  # noqa: E402
from bench.kernels_h100 import BF16, F32, _chunk, _decode, _linear, _paged, _prefill, linear_shapes  # noqa: E402
from fdjax.ops import dispatch
from fdjax.tuning import aot  # noqa: E402
from pallas_kernels.tpu import flat_gemm as tfg  # noqa: E402

TPU = "pallas_tpu"
DECODE = [("llama-3-8b", 8, 4097), ("llama-2-7b", 1, 32768), ("llama-3.2-1b", 64, 4096),
          ("mha-d64", 1, 1)]
PREFILL = [("llama-3-8b", 4, 1000), ("llama-2-7b", 1, 8192), ("llama-3.2-1b", 1, 17)]
MS = (1, 16, 64)


def defaults(generation: str = "v5e", full: bool = True) -> list:
  """Every TPU kernel at its default settings for `generation`, through its dispatch op:
  decode (contiguous and paged), prefill (whole prompts and a chunk after cached keys),
  the linear layers' GEMV (M = 1, by the analytic table) and flat GEMM; bfloat16, and
  float32 at one shape of each. `full`=False: one shape per kernel and dtype."""
  del generation  # the same cases; dispatch sizes them for the generation lowered for
  pick = (lambda xs: xs) if full else (lambda xs: xs[:1])
  cases = [_decode(name, b, s, BF16, impl=TPU) for name, b, s in pick(DECODE)]
  cases += [_decode("llama-3-8b", 8, 4097, F32, impl=TPU),
            _paged("llama-3-8b", 8, 64, 64, BF16, impl=TPU)]
  cases += [_prefill(name, b, t, BF16, impl=TPU) for name, b, t in pick(PREFILL)]
  cases += [_prefill("llama-3-8b", 4, 1000, F32, impl=TPU),
            _chunk("llama-3-8b", 2, 512, 4096, BF16, impl=TPU)]
  for (k, n), label in pick(list(linear_shapes().items())):
    cases += [_linear(label, m, k, n, BF16, impl=TPU) for m in (MS if full else MS[:2])]
  return cases + [_linear("llama-2-7b o", 16, 4096, 4096, F32, impl=TPU)]


def v5p_cases() -> list:
  """Where v5p's defaults differ from v5e's (two cores): batch-1 decode (two KV splits) and
  the flat GEMM (block_n halved so both cores get N blocks)."""
  return [_decode("llama-2-7b", 1, 32768, BF16, impl=TPU),
          _linear("llama-2-7b o", 16, 4096, 4096, BF16, impl=TPU)]


def oversized() -> list:
  """A flat GEMM with 8192 x 8192 tiles of w (two 128 MiB buffers: past every generation's
  VMEM), and one with 2048 x 2048 (two 8 MiB buffers and x's: past the 16 MiB of scoped VMEM
  XLA gives a kernel by default on v5e and v5p, within v6e's 32 MiB)."""
  return [_linear("oversized", 16, 16384, 16384, BF16, tfg.flat_gemm,
                  tfg.Settings(block_n=8192, block_k=8192)),
          _linear("past-scoped-vmem", 16, 8192, 8192, BF16, tfg.flat_gemm,
                  tfg.Settings(block_n=2048, block_k=2048))]


def compile_case(case, generation: str):
  """The case lowered and compiled for the described chip: the compiled program."""
  with aot.on(generation), dispatch.lowering_for(f"tpu:{generation}"):
    lowered = case.lower(lambda shape, dtype: aot.abstract(shape, dtype, generation), generation)
  return aot.compile(lowered)


def measure(case, generation: str) -> list[dict]:
  row = {"generation": generation, "kernel": case.kernel, "shape": case.shape,
         "dtype": case.dtype, "setting": case.setting}
  t0 = time.perf_counter()
  try:
    compiled = compile_case(case, generation)
  except aot.CompileError as e:
    return [{**row, "status": str(e).replace("refused by the compiler: ", "refused: ")[:300],
             "compile_s": time.perf_counter() - t0}]
  row.update(status="ok", compile_s=time.perf_counter() - t0,
             code_kb=aot.code_bytes(compiled) / 1024)
  return [{**row, "launch": name, "vmem_kb": vmem / 1024}
          for name, vmem in sorted(aot.tpu_resources(compiled).items())] or [row]


COLUMNS = ["generation", "kernel", "shape", "dtype", "setting", "status", "launch", "vmem_kb",
           "code_kb"]
NOTES = """Compiled by libtpu for one chip of each generation (jax.experimental.topologies,
no TPU present; fdjax.tuning.aot) from the Mosaic kernels in pallas_kernels/tpu/. "ok": Mosaic and
XLA accepted it for that chip; a refusal is the compiler's message (VMEM). vmem_kb: the
scoped VMEM libtpu reserved for that Mosaic kernel (`used_scoped_memory_configs` of its
custom call in the compiled HLO; 0 when it fits in the compiler's default reservation);
code_kb: the generated code of the whole compiled program (its TPU bundles), from
`memory_analysis()`. `default` rows go through the dispatch op with impl="pallas_tpu"
sized for the generation (for linear: GEMV or the flat GEMM by the analytic TPU table);
these are what tests/test_tpu_compile.py compiles. Not run on a TPU: timings need one
(`python -m fdjax bench gpu --backend tpu`)."""


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--generations", default=",".join(aot.TPUS))
  ap.add_argument("--results-dir")
  args = ap.parse_args()
  why = aot.unavailable("v5e")
  if why:
    raise SystemExit(f"bench/kernels_tpu.py: cannot compile for a TPU here: {why}")
  rows = []
  for gen in args.generations.split(","):
    cases = defaults(gen) + oversized()
    for i, case in enumerate(cases):
      got = measure(case, gen)
      rows += got
      print(f"[{gen} {i + 1}/{len(cases)}] {case}: {got[0]['status']} " + " ".join(
          f"{r['launch']}: {r['vmem_kb']:.0f} KB VMEM" for r in got if "launch" in r),
          flush=True)
  compiler = ", ".join(f"{k} {v}" for k, v in aot.tpu_versions().items())
  print(common.write_results("kernels_tpu", rows, COLUMNS,
                             notes=f"Compiled by {compiler}.\n\n{NOTES}",
                             results_dir=args.results_dir))


if __name__ == "__main__":
  main()
