"""Linear layers of decoding side by side, one run: GEMV, the flat GEMM (Triton's, and Mosaic
GPU's as fdjax-mosaic-flat), the dispatch choice, XLA's dot and torch.matmul (cuBLAS), for
M = 1..64 on the Llama-2-7B and Llama-3-8B shapes;
then the same weights as int8 and int4 (fdjax.ops.quant): the quantized GEMV / flat GEMM /
dispatch against XLA's dequantize-then-dot ("xla-int8"), with the bytes each call moves.

  python bench/gemm.py            # on a GPU
  python bench/gemm.py --smoke    # tiny shapes on any backend (checks the script)
"""
from __future__ import annotations

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench import common  # noqa: E402
from fdjax.ops import dispatch, quant, reference, selection  # noqa: E402
from fdjax.tuning import timing, tune
from pallas_kernels.mosaic_gpu import flat_gemm as mosaic_flat_gemm  # noqa: E402
from pallas_kernels.mosaic_gpu import quantized_gemm as mosaic_quantized  # noqa: E402
from pallas_kernels.triton import flat_gemm as fg  # noqa: E402
from pallas_kernels.triton import gemv as gv  # noqa: E402

# [N, K] as the paper lists them (QKV, O, FFN up, FFN down); fdjax's weight is [K, N].
SHAPES = {
    "llama-2-7b": [(12288, 4096), (4096, 4096), (11008, 4096), (4096, 11008)],
    "llama-3-8b": [(6144, 4096), (4096, 4096), (14336, 4096), (4096, 14336)],
}
MS = [1, 2, 4, 8, 16, 32, 64]
QUANTIZATIONS = (None, "int8", "int4")


def torch_matmul():
  """A timer for torch.matmul (cuBLAS), or None without a CUDA torch."""
  try:
    import torch
  except ImportError:
    return None
  if not torch.cuda.is_available():
    return None
  def run(x_shape, w_shape, calls, n_sets):
    """Seconds per torch.matmul over `n_sets` rotating fresh random bf16 operand sets:
    back-to-back calls between two CUDA events, median of 5 rounds (as fdjax.tuning.timing)."""
    sets = [(torch.randn(x_shape, dtype=torch.bfloat16, device="cuda"),
             torch.randn(w_shape, dtype=torch.bfloat16, device="cuda")) for _ in range(n_sets)]
    for xt, wt in sets:
      torch.matmul(xt, wt)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
      start.record()
      for i in range(calls):
        xt, wt = sets[i % n_sets]
        torch.matmul(xt, wt)
      end.record()
      torch.cuda.synchronize()
      times.append(start.elapsed_time(end) / 1e3 / calls)
    times.sort()
    return times[len(times) // 2]
  return run


def shape_rows(model, k, n, quantization, ms, key, dtype, iters, interpret, bw, torch_run,
               fits) -> list[dict]:
  """The rows of one [K, N] weight, float or quantized to "int8" / "int4" (then its kernels,
  and XLA's dequantize-then-dot as "xla"), over every M; appends the fitted M1 / M2 to fits."""
  n_sets = timing.sets_needed(quant.weight_nbytes(k, n, dtype, quantization))
  ws = tune.random_weights(k, n, n_sets, dtype, quantization, seed=k + n)
  e = selection.entry(k, n, quantization=quantization)
  kernels = tune.kernels(quantization)
  suffix = f"-{quantization}" if quantization else ""
  impls = {
      "fdjax-gemv": functools.partial(kernels["gemv"], interpret=interpret,
                                      settings=gv.Settings(**e["gemv"])),
      "fdjax-flat": functools.partial(kernels["flat"], interpret=interpret,
                                      settings=fg.Settings(**e["flat"])),
      "fdjax-auto": (functools.partial(dispatch.linear, impl="pallas_interpret")
                     if interpret else dispatch.linear),
      "xla": reference.linear,
  }
  if quantization is None and mosaic_flat_gemm.unsupported(1, k, n, dtype) is None:
    impls["fdjax-mosaic-flat"] = functools.partial(mosaic_flat_gemm.flat_gemm,
                                                   interpret=interpret)
  elif quantization and selection.mosaic_linear_unsupported(1, k, n, dtype, quantization) is None:
    impls["fdjax-mosaic-flat"] = lambda x, w: mosaic_quantized.flat_gemm(
        x, w.values, w.scales, bits=w.bits, interpret=interpret)
  rows, profile = [], []
  for m in ms:
    sets = [(jax.random.normal(jax.random.fold_in(key, 1000 + 10 * m + i), (m, k),
                               jnp.float32).astype(dtype), w) for i, w in enumerate(ws)]
    itemsize = jnp.dtype(dtype).itemsize
    nbytes = quant.weight_nbytes(k, n, dtype, quantization) + (m * k + m * n) * itemsize
    shape = dict(op="linear", model=model, m=m, n=n, k=k, dtype=jnp.dtype(dtype).name,
                 quantization=quantization or "none", bytes_per_call=nbytes)
    times = {}
    for name, fn in impls.items():
      if (name == "fdjax-gemv" and m > gv.MAX_M) or (name == "fdjax-mosaic-flat"
                                                      and m > mosaic_flat_gemm.MAX_M):
        continue
      with common.watchdog(f"{name}{suffix} {shape}"):  # a kernel that never returns
        times[name] = timing.seconds_per_call(jax.jit(fn), sets, calls=iters)
    if torch_run is not None and quantization is None:
      times["torch"] = torch_run((m, k), (k, n), iters, n_sets)
    for name, t in times.items():
      row = {**shape, "impl": name + suffix, "us": t * 1e6, "gbps": nbytes / t / 1e9,
             "bw_fraction": nbytes / t / 1e9 / bw}
      if name == "fdjax-auto":
        row["auto_choice"] = selection.linear(m, k, n, quantization=quantization, dtype=dtype,
                                              gpu_auto=not interpret).impl
        row["speedup_vs_xla"] = times["xla"] / t
        if "torch" in times:
          row["speedup_vs_torch"] = times["torch"] / t
      rows.append(row)
      print(row, flush=True)
    profile.append({"m": m, "flat_us": times["fdjax-flat"] * 1e6, "xla_us": times["xla"] * 1e6,
                    **({"gemv_us": times["fdjax-gemv"] * 1e6} if "fdjax-gemv" in times
                       else {})})
  m1, m2 = tune.fit_crossovers(profile)
  fits.append(f"{model} [N, K] = [{n}, {k}]{suffix}: measured M1 = {m1}, M2 = {m2} (table in "
              f"use: M1 = {e['m1']}, M2 = {e['m2']}, {e['source']})")
  return rows


def quantized_notes(rows) -> str:
  """Per quantization, on the Llama-2-7B shapes at M <= 16: fdjax-auto against XLA's
  dequantize-then-dot and against the float dot, and the bandwidth its quantized bytes reach."""
  def median(xs):
    return sorted(xs)[len(xs) // 2]
  out = ""
  for q in QUANTIZATIONS[1:]:
    auto = [r for r in rows if r["impl"] == f"fdjax-auto-{q}" and r["m"] <= 16
            and r["model"] == "llama-2-7b"]
    if not auto:
      continue
    same = lambda r, impl: next(x["us"] for x in rows if x["impl"] == impl and  # noqa: E731
                                (x["m"], x["n"], x["k"]) == (r["m"], r["n"], r["k"]))
    out += (f"\n\n{q} (Llama-2-7B shapes, M <= 16, fdjax-auto-{q}; bytes = the quantized "
            f"weight + x + y): against XLA's dequantize-then-dot median "
            f"{median([r['speedup_vs_xla'] for r in auto]):.2f}x (slowest "
            f"{min(r['speedup_vs_xla'] for r in auto):.2f}x); against the bf16 XLA dot median "
            f"{median([same(r, 'xla') / r['us'] for r in auto]):.2f}x; quantized bytes at "
            f"median {median([r['gbps'] for r in auto]):.0f} GB/s "
            f"({median([r['bw_fraction'] for r in auto]):.2f} of the copy bandwidth).")
  return out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--smoke", action="store_true")
  ap.add_argument("--iters", type=int, default=30, help="calls per timed round")
  ap.add_argument("--models", nargs="+", choices=sorted(SHAPES))
  ap.add_argument("--m", type=int, nargs="+")
  ap.add_argument("--quantizations", nargs="+", choices=["none", "int8", "int4"],
                  help="which weights (default: all three)")
  ap.add_argument("--results-dir")
  args = ap.parse_args()
  on_gpu = jax.default_backend() == "gpu"
  shapes, ms, iters = ((({"tiny": [(96, 64), (64, 192)]}), [1, 2, 3], 2) if args.smoke
                       else ({m: SHAPES[m] for m in args.models or SHAPES}, args.m or MS,
                             args.iters))
  interpret = not on_gpu
  if args.smoke:
    timing.smoke()
  bw = timing.copy_bandwidth_gbps(1 << 30 if on_gpu else 1 << 24)
  floor = timing.dispatch_floor()
  print(f"device {common.device_name()}: measured copy bandwidth {bw:.0f} GB/s, dispatch floor "
        f"{floor * 1e6:.1f} us per call", flush=True)
  torch_run = torch_matmul() if on_gpu else None
  dtype = jnp.bfloat16
  rows, fits = [], []
  key = jax.random.key(0)
  for model, nk in shapes.items():
    for n, k in nk:
      key, kw = jax.random.split(key)
      for q in QUANTIZATIONS if not args.quantizations else [
          None if q == "none" else q for q in args.quantizations]:
        qms = [1, 3] if args.smoke and q else ms  # smoke: one GEMV and one flat GEMM size
        rows += shape_rows(model, k, n, q, qms, kw, dtype, iters, interpret, bw, torch_run, fits)
  auto = [r for r in rows if r["impl"] == "fdjax-auto"]
  groups = [f"{r['n']}x{r['k']} M{r['m']}" for r in auto]
  series = {name: [next((r["us"] for r in rows if r["impl"] == name and r["m"] == a["m"]
                         and r["n"] == a["n"] and r["k"] == a["k"] and r["model"] == a["model"]),
                        float("nan")) for a in auto]
            for name in ["fdjax-auto", "xla", "torch", "fdjax-gemv", "fdjax-flat",
                         "fdjax-auto-int8", "fdjax-auto-int4"]}
  plot = common.svg_bars(f"decode linear layers, bf16 ({common.device_name()})", groups, series,
                         "microseconds (lower is better)")
  notes = (f"Measured copy bandwidth in this run: {bw:.0f} GB/s; dispatch floor "
           f"{floor * 1e6:.1f} us per call from Python. Times: JAX's calls in a loop inside "
           "one compiled program over rotating random inputs (fdjax.tuning.timing: the host's "
           "dispatch paid once per round); torch's launched back to back between CUDA events "
           "(its launch costs less than these kernels take); median of rounds."
           "\n\n" + "\n".join(f"- {f}" for f in fits))
  small = [r for r in auto if r["m"] <= 16 and r["model"] == "llama-2-7b"]
  if small:
    worst = min(small, key=lambda r: r["speedup_vs_xla"])
    notes += (f"\n\nTargets (Llama-2-7B shapes, M <= 16, fdjax-auto): slowest against XLA "
              f"{worst['speedup_vs_xla']:.2f}x (M={worst['m']}, {worst['n']}x{worst['k']}; "
              f"target >= 1); bandwidth fraction median "
              f"{sorted(r['bw_fraction'] for r in small)[len(small) // 2]:.2f} (target 0.85).")
  notes += quantized_notes(rows)
  if not on_gpu:
    notes += "\n\nNot a GPU: the kernels ran in interpret mode; these timings say nothing."
  cols = ["model", "impl", "m", "n", "k", "bytes_per_call", "us", "gbps", "bw_fraction",
          "auto_choice", "speedup_vs_xla", "speedup_vs_torch"]
  print(common.write_results("gemm_smoke" if args.smoke else "gemm", rows, cols, notes,
                             results_dir=args.results_dir, plot=plot))


if __name__ == "__main__":
  main()
