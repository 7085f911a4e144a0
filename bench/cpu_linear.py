"""The linear layers of one CPU decode step in each form XLA:CPU could run them, to ground the
rule of fdjax.ops.selection.cpu_linear.

  python bench/cpu_linear.py            # M = 1, 4, 16
  python bench/cpu_linear.py --quick    # M = 1, 2, small weights: a smoke run

Times the 32 linear layers of bench/decode_trace's 8-layer model (q/k/v 512x1536, o 512x512,
gate/up 512x2816, down 1408x512: 25 M weights) chained in one program, as a decode step reads
them, for x of M rows:

  float32, bfloat16   XLA's dot as fdjax.ops.reference writes it, x unpadded and padded to
                      two rows
  int8                int8 weights (one scale per output column, float32 x): the reference's
                      dequantize-then-dot, and fdjax.ops.cpu_linear's int8 x int8 dot with x
                      quantized in groups of 128 or with one scale per row (a group of K),
                      unpadded and padded to two rows
  int4                int4 weights (two per byte, one scale per 128 rows of K): dequantize-
                      then-dot, and the int8 x int8 dot on the bytes unpacked on the fly, x in
                      the weights' groups of 128, unpadded and padded to two rows
  auto                what dispatch.linear runs under "auto" here, with its reason

Two sets of weights alternate (together several times the L2). GB/s: the weights' bytes over
the time. Timed with fdjax.tuning.timing (calls in a loop inside one program), median of rounds.
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
from fdjax.ops import cpu_linear, dispatch, quant, reference, selection  # noqa: E402
from fdjax.tuning import timing  # noqa: E402

SHAPES = [(512, 1536), (512, 512), (512, 2816), (1408, 512)] * 8
QUICK_SHAPES = [(128, 256), (256, 128)] * 2
COLUMNS = ["weights", "m", "form", "ms", "GB_per_s", "speedup_vs_reference", "reason"]


def forms():
  """{(weights, form): fn(x [M, K], w) -> [M, N]}."""
  out = {}
  for dt in ("float32", "bfloat16"):
    out[(dt, "reference")] = reference.linear
    out[(dt, "rows padded to 2")] = lambda x, w: cpu_linear.linear(x, w, cpu_linear.Form(2))
  out[("int8", "reference")] = reference.linear
  for group in (0, 128):  # 0: one scale per row of x
    what = f"groups of {group}" if group else "per row"
    for rows in (1, 2):
      name = f"int8 dot, x {what}" + (", rows padded to 2" if rows == 2 else "")
      out[("int8", name)] = functools.partial(_int8, rows=rows, group=group)
  out[("int4", "reference")] = reference.linear
  for rows in (1, 2):
    name = "int4 dot, x groups of 128" + (", rows padded to 2" if rows == 2 else "")
    out[("int4", name)] = functools.partial(_int8, rows=rows, group=128)
  return out


def _int8(x, w, rows, group):
  return cpu_linear.linear(x, w, cpu_linear.Form(rows, group or w.values.shape[0]))


def _chain(fn):
  """The layers in sequence, each fed a slice of one x (all layers read their weight once)."""
  def run(x, ws):
    acc = jnp.zeros((), jnp.float32)
    for w in ws:
      acc = acc + jnp.sum(fn(x[:, :w.shape[0]], w).astype(jnp.float32))
    return acc
  return jax.jit(run)


def _weights(kind, shapes, seed):
  ks = jax.random.split(jax.random.key(seed), len(shapes))
  ws = [jax.random.normal(k, s, jnp.float32) * 0.05 for k, s in zip(ks, shapes)]
  if kind in ("int8", "int4"):
    return [quant.quantize(w, kind) for w in ws]
  return [w.astype(kind) for w in ws]


def measure(m, shapes, iters):
  rows = []
  k_max = max(k for k, _ in shapes)
  weights = {kind: [_weights(kind, shapes, s) for s in range(2)]
             for kind in ("float32", "bfloat16", "int8", "int4")}
  for kind, ws in weights.items():
    xdt = "bfloat16" if kind == "bfloat16" else "float32"
    sets = [(jax.random.normal(jax.random.key(10 + i), (m, k_max), jnp.float32).astype(xdt), w)
            for i, w in enumerate(ws)]
    nbytes = sum(quant.nbytes(w) for w in ws[0])
    fns = {f: fn for (kd, f), fn in forms().items() if kd == kind}
    fns["auto"] = dispatch.linear
    base = None
    for form, fn in fns.items():
      ms = timing.seconds_per_call(_chain(fn), sets, calls=iters) * 1e3
      base = base or ms
      reason = ""
      if form == "auto":
        quantized = kind if kind.startswith("int") else None
        reason = selection.cpu_linear(m, k_max, xdt, quantized).reason
      rows.append({"weights": kind, "m": m, "form": form, "ms": ms,
                   "GB_per_s": nbytes / ms / 1e6, "speedup_vs_reference": base / ms,
                   "reason": reason})
      print(rows[-1], flush=True)
  return rows


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--m", type=int, nargs="+", default=[1, 4, 16])
  ap.add_argument("--iters", type=int, default=10)
  ap.add_argument("--quick", action="store_true", help="M = 1, 2, small weights: a smoke run")
  ap.add_argument("--results-dir")
  args = ap.parse_args()
  ms, shapes, iters = ([1, 2], QUICK_SHAPES, 2) if args.quick else (args.m, SHAPES, args.iters)
  if args.quick:
    timing.smoke()
  rows = [r for m in ms for r in measure(m, shapes, iters)]
  vnni = ", ".join(f for f in selection.VNNI if f in selection.cpu_flags()) or "no VNNI"
  notes = (f"{len(shapes)} linear layers ({sum(k * n for k, n in shapes) / 1e6:.1f} M weights) "
           "chained in one program, x of M rows (float32; bfloat16 for bfloat16 weights), on "
           f"this CPU ({vnni}). GB_per_s: the weights' bytes over the time. "
           "speedup_vs_reference: against XLA's dot as fdjax.ops.reference writes it (int8, "
           "int4: dequantize, then the dot). auto: dispatch.linear under \"auto\", with the reason of "
           "fdjax.ops.selection.cpu_linear.")
  name = "cpu_linear" + ("_quick" if args.quick else "")
  print(common.write_results(name, rows, COLUMNS, notes, results_dir=args.results_dir))


if __name__ == "__main__":
  main()
