"""One mixture-of-experts layer's experts, every strategy of fdjax.ops.moe side by side in one
run: what each reads of the expert weights per decode step and how long it takes on this
machine, against the dense computation (every expert on every token) and XLA's ragged_dot.

  python bench/moe.py            # the committed table: a Qwen3-30B-A3B-shaped layer, bf16
  python bench/moe.py --quantize int8   # its experts int8 (moe_int8; int4: moe_int4)
  python bench/moe.py --quick    # a smoke run on a small layer

Qwen3-30B-A3B: hidden 2048, 128 experts of width 768, 8 per token. Per batch (tokens in one
decode step) the router's logits come from random hidden states and a random router (near
uniform routing, as a trained router's load balancing aims for). Columns:
  expert_MB_read   what the strategy as XLA runs it reads of the expert weights (a gather
                   copies each pair's matrices; the grouped form reads one expert per tile,
                   up to its static tile count; dense and ragged_dot read all experts);
  kernel_MB_read   what a grouped kernel reading each expert that got a token once reads
                   (FlashDecoding++'s flat GEMM over ragged groups; experts with no token
                   are never read);
  rows             rows multiplied (pairs, plus padding to the strategy's tile);
  rows_pad64       rows a kernel padding each expert's group to 64 multiplies (vLLM's fused
                   MoE before PRs 55225 / 47593).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import common  # noqa: E402

COLUMNS = ["batch", "strategy", "auto", "ms", "vs_dense", "expert_MB_read", "kernel_MB_read",
           "dense_MB_read", "experts_touched", "rows", "rows_pad64"]


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--hidden", type=int, default=2048)
  ap.add_argument("--experts", type=int, default=128)
  ap.add_argument("--width", type=int, default=768)
  ap.add_argument("--top-k", type=int, default=8)
  ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--iters", type=int, default=10)
  ap.add_argument("--max-gather-gb", type=float, default=2.0,
                  help="skip the gather strategy where its weight copy would be larger")
  ap.add_argument("--quantize", choices=["int8", "int4"], default=None,
                  help="the experts quantized (each alone; scales in --dtype): XLA dequantizes "
                       "what it reads, the Mosaic GPU kernel reads the stored bytes")
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--out", default=None, help="results name (default moe, moe_int8, moe_int4)")
  ap.add_argument("--results-dir", default=None)
  args = ap.parse_args(argv)
  if args.quick:
    args.hidden, args.experts, args.width, args.top_k, args.batch, args.iters = (
        128, 16, 64, 4, [1, 8], 2)

  import jax
  import jax.numpy as jnp

  from fdjax.ops import dispatch, moe, quant, selection

  h, e, f, k = args.hidden, args.experts, args.width, args.top_k
  dtype = jnp.dtype(args.dtype)
  keys = jax.random.split(jax.random.key(0), 4)
  w_gate_up = (jax.random.normal(keys[0], (e, h, 2 * f), jnp.float32) * 0.02).astype(dtype)
  w_down = (jax.random.normal(keys[1], (e, f, h), jnp.float32) * 0.02).astype(dtype)
  router = jax.random.normal(keys[2], (h, e), jnp.float32) * 0.02
  if args.quantize:
    w_gate_up, w_down = (quant.quantize(w, args.quantize) for w in (w_gate_up, w_down))
  bits = quant.bits_of(args.quantize) if args.quantize else None
  itemsize = bits / 8 if bits else dtype.itemsize
  expert_bytes = 3 * h * f * itemsize  # the values; int8 / int4 scales add < 1%
  mb = lambda n_experts: n_experts * expert_bytes / 1e6
  rows = []
  for t in args.batch:
    x = jax.random.normal(jax.random.fold_in(keys[3], t), (t, h), jnp.float32)
    weights, experts = moe.route(x @ router, k, True)
    x = x.astype(dtype)
    counts = np.bincount(np.asarray(experts).reshape(-1), minlength=e)
    touched = int((counts > 0).sum())
    pick = selection.moe(t, k, e, itemsize, jax.default_backend())
    tile = pick.settings or selection.MOE_MIN_TILE
    read = {"dense": e, "ragged": e, "gather": t * k,
            "grouped": moe.tile_count(t * k, e, tile),
            "grouped (mosaic)": moe.tile_count(t * k, e, min(tile, 64))}
    multiplied = {"dense": t * e, "ragged": t * k, "gather": t * k,
                  "grouped": int((-(-counts // tile)).sum()) * tile,
                  "grouped (mosaic)": int((-(-counts // min(tile, 64))).sum()) * min(tile, 64)}
    base = None
    strategies = ["dense", "ragged", "gather", "grouped"]
    if (jax.default_backend() == "gpu" and selection.not_hopper() is None
        and selection.moe_unsupported(min(tile, 64), h, f, dtype, bits) is None):
      strategies.append("grouped (mosaic)")  # the kernel, at the same tile (up to 64 rows)
    for strategy in strategies:
      row = dict(batch=t, strategy=strategy + (f" (tile {tile})" if strategy == "grouped" else ""),
                 auto="yes" if pick.impl == strategy.split()[0] and "mosaic" not in strategy
                 else "",
                 expert_MB_read=mb(read[strategy]), kernel_MB_read=mb(touched),
                 dense_MB_read=mb(e), experts_touched=touched, rows=multiplied[strategy],
                 rows_pad64=int((-(-counts // 64)).sum()) * 64)
      copy = t * k * 3 * h * f * dtype.itemsize  # gather's copies (quantized: dequantized)
      if strategy == "gather" and copy > args.max_gather_gb * 1e9:
        row["ms"] = "not run (copy too large)"
      else:
        rows_k = min(tile, 64)
        kernel = dict(tile=rows_k, matmul=dispatch.mosaic_tile_matmul)
        fn = jax.jit(functools.partial(moe.run, strategy.split()[0], activation=jax.nn.silu,
                                       **(kernel if "mosaic" in strategy else dict(tile=tile))))
        call = lambda: fn(x, weights, experts, w_gate_up, w_down).block_until_ready()  # noqa: E731
        row["ms"] = 1e3 * common.median_seconds(call, warmup=1, iters=args.iters)
        base = base or row["ms"]
        row["vs_dense"] = base / row["ms"]
      rows.append(row)
      print(json.dumps(row), flush=True)
  weights = f"{args.quantize} (scales {args.dtype})" if args.quantize else args.dtype
  notes = (f"One layer's experts: hidden {h}, {e} experts of width {f}, top-{k}, {weights} "
           f"weights ({mb(1):.2f} MB an expert, {mb(e):.0f} MB all). ms: median of "
           f"{args.iters} calls after a warm-up, XLA's strategies (and on a Hopper GPU the "
           f"Mosaic GPU grouped GEMM's tiles, `grouped (mosaic)`); vs_dense: dense's time over "
           f"this one's. auto: the strategy fdjax.ops.selection.moe picks at this batch "
           f"(on the CPU, XLA's). kernel_MB_read: what the grouped kernel reads.")
  out = args.out or "moe" + (f"_{args.quantize}" if args.quantize else "")
  print(common.write_results(out, rows, COLUMNS, notes=notes,
                            results_dir=args.results_dir))


if __name__ == "__main__":
  main()
