"""Prefill on the CPU, side by side in one run: the attention op alone, then a whole prompt's
time to first token.

* op: fdjax's "auto" (fdjax.ops.selection.cpu_prefill: the asynchronous softmax over blocks
  of keys, fdjax.ops.cpu_attention, from 64 queries a row), the XLA reference it replaces
  (fdjax.ops.reference), JAX's own jax.nn.dot_product_attention (implementation "xla") and
  PyTorch's scaled_dot_product_attention (what transformers' "sdpa" attention calls), on
  the same inputs; each one's largest error against float64 beside its time.
* ttft: fdjax.generate's prefill (one new token) of a random Llama (bench.common's model)
  against transformers' forward of the same model on the same prompt (the last position's
  logits only, logits_to_keep=1), timed in turn round by round.

  python bench/prefill_cpu.py [--iters 7] [--dtypes float32 bfloat16] [--smoke]
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import fdjax  # noqa: E402
from bench import common  # noqa: E402
from bench.decode import interleaved  # noqa: E402
from fdjax.ops import dispatch, reference  # noqa: E402

# batch, queries a row, cached keys before them, query heads, KV heads, head_dim
OP_SHAPES = [(16, 256, 0, 8, 2, 64), (1, 2048, 0, 16, 4, 64), (1, 256, 1792, 32, 8, 128),
             (16, 64, 448, 8, 2, 64), (4, 512, 0, 32, 8, 128)]
SMOKE_SHAPES = [(2, 64, 0, 4, 2, 16), (1, 64, 64, 4, 2, 16)]
TTFT_PROMPTS = [512, 2048]


def _ms(fn, iters):
  fn()
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return float(np.median(times)) * 1e3


def op_rows(shapes, dtypes, iters):
  import torch
  import torch.nn.functional as F
  rows = []
  for b, t, cached, hq, hkv, d in shapes:
    s = t + cached
    rng = np.random.default_rng(b * t + s + hq + d)
    host = [rng.standard_normal(shape).astype(np.float32)
            for shape in ((b, t, hq, d), (b, s, hkv, d), (b, s, hkv, d))]
    lengths = jnp.full((b,), s, jnp.int32)
    q_start = jnp.full((b,), cached, jnp.int32)
    scale = d ** -0.5
    with jax.enable_x64(True):
      want = np.asarray(reference.prefill_attention(
          *(jnp.asarray(x, jnp.float64) for x in host), lengths, True, scale,
          q_start=q_start))
    visible = np.arange(s)[None, :] <= cached + np.arange(t)[:, None]  # [T, S], causal
    for dtype in dtypes:
      q, k, v = (jnp.asarray(x, dtype) for x in host)
      tq, tk, tv = (torch.from_numpy(x).to(getattr(torch, dtype)).transpose(1, 2)
                    for x in host)
      tk, tv = (x.repeat_interleave(hq // hkv, dim=1) for x in (tk, tv))
      mask = torch.from_numpy(visible)
      jax_sdpa = None
      if cached == 0:  # jax.nn's causal mask puts query i at key i
        jax_sdpa = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, scale=scale, is_causal=True, implementation="xla"))
      impls = {
          "fdjax-auto": jax.jit(lambda q, k, v: dispatch.prefill_attention(
              q, k, v, lengths=lengths, q_start=q_start, sm_scale=scale)),
          "xla-reference": jax.jit(lambda q, k, v: reference.prefill_attention(
              q, k, v, lengths, True, scale, q_start=q_start)),
          "jax-sdpa": jax_sdpa,
          "torch-sdpa": lambda *_: F.scaled_dot_product_attention(
              tq, tk, tv, is_causal=True, scale=scale) if cached == 0 else
          F.scaled_dot_product_attention(tq, tk, tv, attn_mask=mask, scale=scale),
      }
      group = []
      for name, fn in impls.items():
        if fn is None:
          continue
        if name.startswith("torch"):
          run = fn
          out = lambda: fn().transpose(1, 2).float().numpy()  # noqa: E731
        else:
          run = lambda fn=fn: fn(q, k, v).block_until_ready()  # noqa: E731
          out = lambda fn=fn: np.asarray(fn(q, k, v).astype(jnp.float32))  # noqa: E731
        ms = _ms(run, iters)
        group.append({"part": "op", "impl": name, "dtype": dtype, "batch": b, "queries": t,
                     "cached": cached, "heads": f"{hq}/{hkv}", "head_dim": d, "ms": ms,
                     "max_abs_err_vs_f64": float(np.max(np.abs(out() - want)))})
      base = next(r["ms"] for r in group if r["impl"] == "xla-reference")
      rows += [{**r, "speedup_vs_xla_reference": base / r["ms"]} for r in group]
  return rows


def ttft_rows(args, prompts, dtypes, iters):
  import torch
  hf32 = common.random_llama(args)
  rows = []
  with tempfile.TemporaryDirectory() as d:
    hf32.save_pretrained(d)
    for dtype in dtypes:
      model = fdjax.load_pretrained(d, dtype=None if dtype == "float32" else dtype)
      hf = hf32 if dtype == "float32" else copy.deepcopy(hf32).to(torch.bfloat16)
      for n in prompts:
        prompt = list(np.random.default_rng(n).integers(0, args.vocab, n))
        ids = torch.tensor([prompt])

        def ours():
          return fdjax.generate(model, [prompt], max_new_tokens=1, temperature=0.0)

        def theirs():
          with torch.no_grad():
            return hf(input_ids=ids, logits_to_keep=1).logits

        ours()
        theirs()

        def rate(fn):
          def once():
            t = time.perf_counter()
            fn()
            return 1e3 * (time.perf_counter() - t)
          return once
        times = interleaved({"fdjax": rate(ours), "hf-eager": rate(theirs)}, iters)
        first = [int(ours().tokens[0][0]), int(torch.argmax(theirs()[0, -1]))]
        for name, ts in times.items():
          rows.append({"part": "ttft", "impl": name, "dtype": dtype, "batch": 1,
                       "queries": n, "cached": 0, "heads": f"{args.heads}/{args.kv_heads}",
                       "head_dim": args.hidden // args.heads, "ms": float(np.median(ts)),
                       "speedup_vs_hf": float(np.median(np.asarray(times["hf-eager"])
                                                        / np.asarray(ts))),
                       "same_first_token": first[0] == first[1]})
  return rows


def main():
  ap = argparse.ArgumentParser()
  common.llama_args(ap)
  ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                  choices=["float32", "bfloat16"])
  ap.add_argument("--iters", type=int, default=7)
  ap.add_argument("--smoke", action="store_true", help="tiny shapes (checks the script)")
  ap.add_argument("--name", default="prefill_cpu")
  ap.add_argument("--results-dir", default=None)
  args = ap.parse_args()
  if args.smoke:
    args.layers, args.hidden, args.heads, args.kv_heads, args.intermediate = 2, 64, 4, 2, 128
    args.vocab, args.iters = 512, 2
  rows = op_rows(SMOKE_SHAPES if args.smoke else OP_SHAPES, args.dtypes, args.iters)
  rows += ttft_rows(args, [64, 80] if args.smoke else TTFT_PROMPTS, args.dtypes, args.iters)
  columns = ["part", "impl", "dtype", "batch", "queries", "cached", "heads", "head_dim", "ms",
             "speedup_vs_xla_reference", "speedup_vs_hf", "max_abs_err_vs_f64",
             "same_first_token"]
  notes = (
      "op: causal prefill attention, every row full (lengths = cached + queries); queries "
      "after `cached` keys are a chunk of a longer prompt (jax.nn.dot_product_attention has "
      "no offset for them, so no jax-sdpa row; PyTorch takes the mask). fdjax-auto is what "
      "dispatch runs on the CPU (fdjax.ops.selection.cpu_prefill). ms: median of --iters "
      "calls after one warm-up; max_abs_err_vs_f64 against the float64 reference on the same "
      "inputs. ttft: one prompt's prefill and first token on a random Llama "
      f"({args.layers} layers, hidden {args.hidden}, {args.heads}/{args.kv_heads} heads, "
      f"vocabulary {args.vocab}): fdjax.generate(max_new_tokens=1, greedy) against "
      "transformers' eager forward (logits_to_keep=1) in PyTorch, timed in turn round by "
      "round; speedup_vs_hf the median of the rounds' ratios.")
  print(common.write_results(args.name, rows, columns, notes, args.results_dir))


if __name__ == "__main__":
  main()
