"""Where the CPU's paged decode attention spends its time: the gather, or the layout the dots need.

  python bench/attention_layout_cpu.py            # batch 1, 4, 16 at decode_trace's shape
  python bench/attention_layout_cpu.py --quick    # batch 2, a smoke run

bench/decode_trace.py found a third of the batch-16 CPU decode step in one fused loop: the K/V
pages gathered from the pools [P, page, Hkv, D] and, fused in, transposed to [B, Hkv, S, D]
for the batched attention dots. This times one decode step's attention (8 layers in one
program, float32, XLA) four ways, to say which half costs:

  paged        today's XLA path: pages[page_table] -> [B, S, Hkv, D], dots batched over (b, h)
  no-gather    the same dots on the pool read as the rows' contiguous cache (no gather at all;
               pages allocated in row order)
  heads-major  a pool laid out [Hkv, P, page, D]: the gather gives [Hkv, B, S, D], each row's
               keys of a head contiguous; dots batched over (b, h)
  heads-major-hb  the same pool with the dots batched over (h, b), the pool's own order

Every variant computes the same attention (checked against `paged` before timing). Timed with
fdjax.tuning.timing (calls in a loop inside one program), median of rounds.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from bench.decode_trace import SHAPE  # noqa: E402
from fdjax.tuning import timing  # noqa: E402

PAGE, PAGES = 64, 2  # decode_trace's run: prompt 64 + 64 new tokens, pages of 64


def _attend(q, k, v, n, batch_dims):
  """q [B, Hkv, g, D]; k, v [B, Hkv, S, D] ("bh") or [Hkv, B, S, D] ("hb") -> [B, Hkv, g, D]."""
  d = q.shape[-1]
  if batch_dims == "hb":
    q = q.transpose(1, 0, 2, 3)
  s = jnp.einsum("xygd,xysd->xygs", q, k) * d ** -0.5
  lengths = n[None, :] if batch_dims == "hb" else n[:, None]
  s = jnp.where(jnp.arange(k.shape[2]) < lengths[..., None, None], s, -jnp.inf)
  out = jnp.einsum("xygs,xysd->xygd", jax.nn.softmax(s, axis=-1), v)
  return out.transpose(1, 0, 2, 3) if batch_dims == "hb" else out


def variants(b, hkv, g, d):
  s = PAGE * PAGES
  def rows(x):  # [B * pages, page, H, D] -> [B, H, S, D]
    return x.reshape(b, s, hkv, d).transpose(0, 2, 1, 3)

  def paged(q, kp, vp, table, n):
    return _attend(q, rows(kp[table]), rows(vp[table]), n, "bh")

  def no_gather(q, kp, vp, table, n):
    return _attend(q, rows(kp[:b * PAGES]), rows(vp[:b * PAGES]), n, "bh")

  def heads_major(batch_dims):
    def run(q, kh, vh, table, n):
      k, v = (x[:, table].reshape(hkv, b, s, d) for x in (kh, vh))
      if batch_dims == "bh":
        k, v = k.transpose(1, 0, 2, 3), v.transpose(1, 0, 2, 3)
      return _attend(q, k, v, n, batch_dims)
    return run

  return {"paged": (paged, False), "no-gather": (no_gather, False),
          "heads-major": (heads_major("bh"), True), "heads-major-hb": (heads_major("hb"), True)}


def measure(b, iters):
  layers, hq, hkv, d = SHAPE["layers"], SHAPE["heads"], SHAPE["kv_heads"], SHAPE["head_dim"]
  g = hq // hkv
  pool_pages = b * PAGES + 3
  key = jax.random.key(b)
  sets = []
  for i in range(2):  # two input sets: the pools alone are several times the L2
    ks = jax.random.split(jax.random.fold_in(key, i), 4)
    q = jax.random.normal(ks[0], (layers, b, hkv, g, d), jnp.float32)
    kp, vp = (jax.random.normal(kk, (layers, pool_pages, PAGE, hkv, d), jnp.float32)
              for kk in ks[1:3])
    table = jax.random.permutation(ks[3], pool_pages)[:b * PAGES].reshape(b, PAGES)
    n = jnp.full((b,), PAGE * PAGES - 1, jnp.int32)
    sets.append((q, kp, vp, table.astype(jnp.int32), n))
  rows, want = [], None
  for name, (fn, heads_first) in variants(b, hkv, g, d).items():
    if heads_first:
      args = [(q, kp.transpose(0, 3, 1, 2, 4), vp.transpose(0, 3, 1, 2, 4), t, n)
              for q, kp, vp, t, n in sets]
    else:
      args = sets
    step = jax.jit(lambda q, kp, vp, t, n, fn=fn: sum(
        fn(q[i], kp[i], vp[i], t, n) for i in range(layers)))
    got = np.asarray(step(*args[0]))
    if name == "paged":
      want = got
    elif name != "no-gather":  # no-gather reads other pages (row order): a timing, not a check
      err = np.max(np.abs(got - want)) / np.max(np.abs(want))
      if not err < 1e-5:
        raise SystemExit(f"attention_layout_cpu: {name} differs from paged by {err:.2e}")
    ms = timing.seconds_per_call(step, args, calls=iters) * 1e3
    rows.append({"batch": b, "variant": name, "ms_per_step": ms})
    print(rows[-1], flush=True)
  base = rows[0]["ms_per_step"]
  for r in rows:
    r["speedup_vs_paged"] = base / r["ms_per_step"]
  return rows


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16])
  ap.add_argument("--iters", type=int, default=10)
  ap.add_argument("--quick", action="store_true", help="batch 2, few calls: a smoke run")
  ap.add_argument("--results-dir")
  args = ap.parse_args()
  batches, iters = ([2], 2) if args.quick else (args.batch, args.iters)
  rows = [r for b in batches for r in measure(b, iters)]
  s = SHAPE
  notes = (f"One decode step's attention: {s['layers']} layers, {s['heads']} query heads, "
           f"{s['kv_heads']} KV heads, head_dim {s['head_dim']}, {PAGES} pages of {PAGE} keys a "
           "row (decode_trace's shape and run), float32, XLA on this CPU. ms_per_step: "
           "fdjax.tuning.timing.seconds_per_call (calls in a loop inside one program over two "
           "random input sets), median of rounds.")
  name = "attention_layout_cpu" + ("_quick" if args.quick else "")
  print(common.write_results(name, rows, ["batch", "variant", "ms_per_step",
                                          "speedup_vs_paged"], notes,
                             results_dir=args.results_dir))


if __name__ == "__main__":
  main()
