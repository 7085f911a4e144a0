"""On a TPU: every Mosaic kernel at the models' shapes, compiled for the chip, checked
against the XLA reference on random inputs and timed against XLA's own computation.

  python bench/tpu_check.py            # on a TPU -> bench/results/tpu_check.{json,md}
  python bench/tpu_check.py --smoke    # tiny shapes in TPU interpret mode (any host)

Part "check" of `python -m fdjax bench gpu --backend tpu`. Tolerances as the tests': float32
within 1e-5 relative of the XLA reference at HIGHEST precision (the MXU's float32 passes),
bfloat16 within 2x the plain bfloat16 computation's error against float32. A row that fails
makes the script exit 1.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from bench.kernels_h100 import HEADS  # noqa: E402
from fdjax.ops import dispatch  # noqa: E402
from fdjax.tuning import timing

BF16, F32 = jnp.bfloat16, jnp.float32


def cases(smoke: bool):
  """(name, op, arrays factory, dtype): decode, paged decode, prefill, linear."""
  heads = {"tiny": (4, 2, 32)} if smoke else {k: HEADS[k] for k in ("llama-3-8b", "llama-2-7b")}
  decode = [(2, 40)] if smoke else [(1, 4096), (8, 4097), (64, 2048)]
  prefill = [(1, 40)] if smoke else [(1, 2048), (4, 1000)]
  linear = [(32, 64, 128)] if smoke else [(m, 4096, n) for n in (4096, 14336) for m in (1, 8, 64)]
  out = []
  for name, (hq, hkv, d) in heads.items():
    for b, s in decode:
      for dtype in (BF16, F32):
        def make(key, b=b, s=s, hq=hq, hkv=hkv, d=d, dtype=dtype):
          ks = jax.random.split(key, 3)
          return (jax.random.normal(ks[0], (b, hq, d), dtype),
                  jax.random.normal(ks[1], (b, s, hkv, d), dtype),
                  jax.random.normal(ks[2], (b, s, hkv, d), dtype),
                  jax.random.randint(key, (b,), 1, s + 1))
        out.append((f"decode {name} B={b} S={s}", dispatch.decode_attention, make, dtype))
    for b, t in prefill:
      def make(key, b=b, t=t, hq=hq, hkv=hkv, d=d):
        ks = jax.random.split(key, 3)
        return (jax.random.normal(ks[0], (b, t, hq, d), BF16),
                jax.random.normal(ks[1], (b, t, hkv, d), BF16),
                jax.random.normal(ks[2], (b, t, hkv, d), BF16))
      out.append((f"prefill {name} B={b} T={t}", dispatch.prefill_attention, make, BF16))
  for m, k, n in linear:
    def make(key, m=m, k=k, n=n):
      return (jax.random.normal(key, (m, k), BF16),
              jax.random.normal(jax.random.fold_in(key, 1), (k, n), BF16))
    out.append((f"linear M={m} K={k} N={n}", dispatch.linear, make, BF16))
  return out


def check(name, op, make, dtype, impl, iters):
  args = make(jax.random.key(0))
  run = jax.jit(functools.partial(op, impl=impl))
  got = np.asarray(run(*args), np.float64)
  xla = jax.jit(functools.partial(op, impl="xla"))
  want = np.asarray(jax.jit(lambda *a: op(*(x.astype(F32) if x.dtype == dtype else x
                                             for x in a), impl="xla"))(*args), np.float64)
  err = float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))
  if dtype == F32:
    ok = err < 1e-5
  else:
    base = float(np.max(np.abs(np.asarray(xla(*args), np.float64) - want)) /
                 max(np.max(np.abs(want)), 1e-30))
    ok = err <= 2 * base + 1e-6
  ok = ok and bool(np.all(np.isfinite(got)))
  smoke = impl.endswith("interpret")  # the plumbing only: one round, one call
  sets = [make(jax.random.key(i)) for i in range(1 if smoke else 4)]
  timed = dict(calls=iters, rounds=1, warmup=1) if smoke else dict(calls=iters)
  kernel_us = timing.seconds_per_call(run, sets, **timed) * 1e6
  xla_us = timing.seconds_per_call(xla, sets, **timed) * 1e6
  return {"case": name, "dtype": jnp.dtype(dtype).name, "impl": impl, "rel_err": err,
          "ok": ok, "kernel_us": kernel_us, "xla_us": xla_us, "speedup": xla_us / kernel_us}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--smoke", action="store_true", help="tiny shapes, TPU interpret mode")
  ap.add_argument("--iters", type=int, default=20)
  ap.add_argument("--results-dir")
  args = ap.parse_args()
  if not args.smoke and jax.default_backend() != "tpu":
    raise SystemExit(f"bench/tpu_check.py: needs a TPU (backend is {jax.default_backend()}); "
                     f"--smoke runs the kernels in TPU interpret mode instead")
  impl = "pallas_tpu_interpret" if args.smoke else "pallas_tpu"
  iters = 1 if args.smoke else args.iters
  rows = []
  for name, op, make, dtype in cases(args.smoke):
    rows.append(check(name, op, make, dtype, impl, iters))
    r = rows[-1]
    print(f"{name} {r['dtype']}: {'ok' if r['ok'] else 'FAILED'} rel_err={r['rel_err']:.2e} "
          f"kernel {r['kernel_us']:.1f} us, XLA {r['xla_us']:.1f} us", flush=True)
  print(common.write_results("tpu_check_smoke" if args.smoke else "tpu_check", rows,
                             ["case", "dtype", "impl", "ok", "rel_err", "kernel_us", "xla_us",
                              "speedup"], results_dir=args.results_dir))
  sys.exit(0 if all(r["ok"] for r in rows) else 1)


if __name__ == "__main__":
  main()
