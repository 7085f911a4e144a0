"""The KV pool's layout on the CPU: one decode step's attention over the page pools, as
generate's decode loop runs it.

  python bench/attention_layout_cpu.py            # batch 1, 4, 16 at decode_trace's shape
  python bench/attention_layout_cpu.py --quick    # batch 2, a smoke run

bench/decode_trace.py found 42 % of the batch-16 CPU decode step in one fused loop: the K/V
pages gathered from pools laid out [P, page, Hkv, D] (token-major, fdjax's layout until then)
and, fused in, transposed to [B, Hkv, S, D] for the batched attention dots. This times one
decode step's attention (8 layers, float32, XLA) four ways:

  token-major     the pools before: pages[page_table] -> [B, S, Hkv, D], dots batched over
                  (b, h), so XLA transposes every key
  no-gather       the same dots on the token-major pool read as the rows' contiguous cache (no
                  gather at all; pages in row order): the relayout alone
  heads-major-bh  a pool [Hkv, P, page, D]: the gather gives [Hkv, B, S, D], each row's keys
                  of a head contiguous, then moved to (b, h) for the dots
  heads-major     the same pool, the dots batched over (h, b), the pool's own order: what
                  fdjax.ops.reference.paged_decode_attention (the CPU's path) does now

Each step first writes a new key and value into every layer's pools, as a decode step does,
so nothing can be hoisted out of the loop of steps: a loop over unchanging pools lets XLA
gather once (an earlier form of this script, whose table said batch 1 gained nothing). Every
variant but no-gather computes the same attention (checked against token-major before
timing). ms_per_step: a loop of --iters steps in one program, median of rounds.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from bench.decode_trace import SHAPE  # noqa: E402

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
  """{name: (attend(q, k_pool, v_pool, table, n), heads_major)}."""
  s = PAGE * PAGES
  def rows(x):  # [B * pages, page, H, D] -> [B, H, S, D]
    return x.reshape(b, s, hkv, d).transpose(0, 2, 1, 3)

  def token_major(q, kp, vp, table, n):
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

  return {"token-major": (token_major, False), "no-gather": (no_gather, False),
          "heads-major-bh": (heads_major("bh"), True), "heads-major": (heads_major("hb"), True)}


def _steps(fn, heads_major, steps, q, kps, vps, table, n):
  """`steps` decode steps: each writes a key and value (from the previous step's output) at
  entry step % PAGE of every row's first page in each layer, then attends in each layer."""
  def write(pool, new, i):  # new [B, Hkv, D]
    if heads_major:
      return pool.at[:, table[:, 0], i % PAGE].set(new.transpose(1, 0, 2))
    return pool.at[table[:, 0], i % PAGE].set(new)

  def step(i, carry):
    x, kps, vps = carry
    kps, vps, outs = list(kps), list(vps), []
    for layer in range(len(kps)):
      new = x[:, :, 0] * 0.5
      kps[layer], vps[layer] = write(kps[layer], new, i), write(vps[layer], -new, i)
      outs.append(fn(q[layer] + x, kps[layer], vps[layer], table, n))
    return sum(outs) * 1e-3, tuple(kps), tuple(vps)
  return jax.lax.fori_loop(0, steps, step, (jnp.zeros_like(q[0]), kps, vps))[0]


def measure(b, iters, rounds=5):
  layers, hq, hkv, d = SHAPE["layers"], SHAPE["heads"], SHAPE["kv_heads"], SHAPE["head_dim"]
  g = hq // hkv
  pool_pages = b * PAGES + 3
  ks = jax.random.split(jax.random.key(b), 4)
  q = jax.random.normal(ks[0], (layers, b, hkv, g, d), jnp.float32)
  kps, vps = ([jax.random.normal(jax.random.fold_in(kk, i), (pool_pages, PAGE, hkv, d),
                                 jnp.float32) for i in range(layers)] for kk in ks[1:3])
  table = jax.random.permutation(ks[3], pool_pages)[:b * PAGES].reshape(b, PAGES)
  table = table.astype(jnp.int32)
  n = jnp.full((b,), PAGE * PAGES - 1, jnp.int32)
  rows, want = [], None
  for name, (fn, heads_first) in variants(b, hkv, g, d).items():
    lay = (lambda x: x.transpose(2, 0, 1, 3)) if heads_first else (lambda x: x)
    pools = tuple(lay(x) for x in kps), tuple(lay(x) for x in vps)
    run = jax.jit(lambda q, kp, vp, steps, fn=fn, hm=heads_first: _steps(
        fn, hm, steps, q, kp, vp, table, n), static_argnums=3)
    got = np.asarray(run(q, *pools, 3))
    if name == "token-major":
      want = got
    elif name != "no-gather":  # no-gather reads other pages (row order): a timing, not a check
      err = np.max(np.abs(got - want)) / np.max(np.abs(want))
      if not err < 1e-5:
        raise SystemExit(f"attention_layout_cpu: {name} differs from token-major by {err:.2e}")
    jax.block_until_ready(run(q, *pools, iters))  # compiles
    times = []
    for _ in range(rounds):
      t0 = time.perf_counter()
      jax.block_until_ready(run(q, *pools, iters))
      times.append((time.perf_counter() - t0) / iters)
    rows.append({"batch": b, "variant": name, "ms_per_step": statistics.median(times) * 1e3})
    print(rows[-1], flush=True)
  base = rows[0]["ms_per_step"]
  for r in rows:
    r["speedup_vs_token_major"] = base / r["ms_per_step"]
  return rows


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16])
  ap.add_argument("--iters", type=int, default=32, help="decode steps in a timed loop")
  ap.add_argument("--quick", action="store_true", help="batch 2, few calls: a smoke run")
  ap.add_argument("--results-dir")
  args = ap.parse_args()
  batches, iters = ([2], 4) if args.quick else (args.batch, args.iters)
  rows = [r for b in batches for r in measure(b, iters)]
  s = SHAPE
  notes = (f"One decode step's attention: {s['layers']} layers, {s['heads']} query heads, "
           f"{s['kv_heads']} KV heads, head_dim {s['head_dim']}, {PAGES} pages of {PAGE} keys a "
           "row (decode_trace's shape and run), float32, XLA on this CPU. ms_per_step: a loop "
           f"of {iters} decode steps in one program, each writing a key and value into every "
           "layer's pools before attending (nothing hoisted), median of 5 rounds.")
  name = "attention_layout_cpu" + ("_quick" if args.quick else "")
  print(common.write_results(name, rows, ["batch", "variant", "ms_per_step",
                                          "speedup_vs_token_major"], notes,
                             results_dir=args.results_dir))


if __name__ == "__main__":
  main()
