"""Prefill on the CPU, side by side in one run: the attention op alone, then a whole prompt's
time to first token.

* op: fdjax's "auto" (fdjax.ops.selection.cpu_prefill: the asynchronous softmax over blocks
  of keys, fdjax.ops.cpu_attention, from 64 queries a row), the XLA reference it replaces
  (fdjax.ops.reference), JAX's own jax.nn.dot_product_attention (implementation "xla") and
  PyTorch's scaled_dot_product_attention (what transformers' "sdpa" attention calls), on
  the same inputs; each one's largest error against float64 beside its time.
* ttft: fdjax.generate's prefill (one new token) of a random Llama (bench.common's model)
  against transformers' forward of the same model on the same prompt (the last position's
  logits only, logits_to_keep=1), timed in turn round by round. On a host of several cores,
  fdjax also runs tensor parallel over the cores as CPU devices (fdjax.cpu_devices: XLA:CPU
  runs a program's loops and element-wise work on one thread, each device on its own).
* op-cope: CoPE attention alone in float32, fdjax's "auto" (the same blocks, positions
  carried from each block's last key down), the reference, and bench/torch_cope.py's.
* ttft-cope: the same for the bundled CoPE model (byte-level: a prompt of N bytes is N
  tokens, here the start of this repository's fdjax/ops sources) against the PyTorch CoPE
  decoder of bench/torch_cope.py (transformers has no CoPE model), float32.

  python bench/prefill_cpu.py [--iters 7] [--dtypes float32 bfloat16] [--parts op ...] [--smoke]
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

# batch, queries a row, cached keys before them, query heads, KV heads, head_dim, and spare
# keys past each row's length (generate's page run: the tokens still to come, rounded up)
OP_SHAPES = [(16, 256, 0, 8, 2, 64, 0), (1, 2048, 0, 16, 4, 64, 0),
             (1, 256, 1792, 32, 8, 128, 0), (16, 64, 448, 8, 2, 64, 0),
             (4, 512, 0, 32, 8, 128, 0),
             # bench/e2e.py's CPU model: prompts of 128 and 256 in their page runs
             (4, 128, 0, 8, 2, 32, 128), (1, 128, 0, 8, 2, 32, 1920), (2, 256, 0, 8, 2, 32, 256),
             (1, 128, 384, 8, 2, 32, 0), (2, 128, 0, 8, 8, 64, 128)]
SMOKE_SHAPES = [(2, 64, 0, 4, 2, 16, 0), (1, 64, 64, 4, 2, 16, 0), (1, 64, 0, 4, 2, 16, 64)]
TTFT_PROMPTS = [512, 1100, 2048]  # 1100: a length off the buckets (its chunk: 1280)
PARTS = ["op", "op-cope", "ttft", "ttft-cope"]
COPE_PROMPTS = [256, 1024, 2000]  # bytes: the bundled model's tokens
COPE_SHAPES = [(8, 256, 4), (1, 1024, 4), (1, 2048, 8)]  # batch, queries, heads


def _ms(fn, iters):
  """Median milliseconds of fn() after one warm-up call."""
  return 1e3 * common.median_seconds(fn, warmup=1, iters=iters)


def op_rows(shapes, dtypes, iters):
  import torch
  import torch.nn.functional as F
  rows = []
  for b, t, cached, hq, hkv, d, spare in shapes:
    s = t + cached + spare
    rng = np.random.default_rng(b * t + s + hq + d)
    host = [rng.standard_normal(shape).astype(np.float32)
            for shape in ((b, t, hq, d), (b, s, hkv, d), (b, s, hkv, d))]
    lengths = jnp.full((b,), t + cached, jnp.int32)
    q_start = jnp.full((b,), cached, jnp.int32)
    scale = d ** -0.5
    with jax.enable_x64(True):
      want = np.asarray(reference.prefill_attention(
          *(jnp.asarray(x, jnp.float64) for x in host), lengths, True, scale,
          q_start=q_start))
    visible = np.arange(s)[None, :] <= cached + np.arange(t)[:, None]  # [T, S], causal
    plain = cached == 0 and spare == 0  # a prompt alone: the libraries' causal masks
    for dtype in dtypes:
      q, k, v = (jnp.asarray(x, dtype) for x in host)
      tq, tk, tv = (torch.from_numpy(x).to(getattr(torch, dtype)).transpose(1, 2)
                    for x in host)
      tk, tv = (x.repeat_interleave(hq // hkv, dim=1) for x in (tk, tv))
      mask = torch.from_numpy(visible)
      jax_sdpa = None
      if plain:  # jax.nn's causal mask puts query i at key i
        jax_sdpa = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, scale=scale, is_causal=True, implementation="xla"))
      impls = {
          "fdjax-auto": jax.jit(lambda q, k, v: dispatch.prefill_attention(
              q, k, v, lengths=lengths, q_start=q_start, sm_scale=scale)),
          "xla-reference": jax.jit(lambda q, k, v: reference.prefill_attention(
              q, k, v, lengths, True, scale, q_start=q_start)),
          "jax-sdpa": jax_sdpa,
          "torch-sdpa": lambda *_: F.scaled_dot_product_attention(
              tq, tk, tv, is_causal=True, scale=scale) if plain else
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
                     "cached": cached, "spare_keys": spare, "heads": f"{hq}/{hkv}",
                     "head_dim": d, "ms": ms,
                     "max_abs_err_vs_f64": float(np.max(np.abs(out() - want)))})
      base = next(r["ms"] for r in group if r["impl"] == "xla-reference")
      rows += [{**r, "speedup_vs_xla_reference": base / r["ms"]} for r in group]
  return rows


def ttft_rows(args, prompts, dtypes, iters):
  import torch
  hf32 = common.random_llama(args)
  rows = []
  tp = _cores_tp(args)
  with tempfile.TemporaryDirectory() as d:
    hf32.save_pretrained(d)
    for dtype in dtypes:
      dt = None if dtype == "float32" else dtype
      models = {"fdjax": fdjax.load_pretrained(d, dtype=dt)}
      if tp > 1:
        mesh = fdjax.make_mesh(tp=tp, devices=jax.devices()[:tp])
        models[f"fdjax-tp{tp} ({tp} CPU devices)"] = fdjax.load_pretrained(d, dtype=dt,
                                                                           mesh=mesh)
      hf = hf32 if dtype == "float32" else copy.deepcopy(hf32).to(torch.bfloat16)
      for n in prompts:
        prompt = list(np.random.default_rng(n).integers(0, args.vocab, n))
        ids = torch.tensor([prompt])

        def ours(model):
          return lambda: fdjax.generate(model, [prompt], max_new_tokens=1, temperature=0.0)

        def theirs():
          with torch.no_grad():
            return hf(input_ids=ids, logits_to_keep=1).logits

        timers = {name: ours(model) for name, model in models.items()}
        for fn in timers.values():
          fn()
        theirs()
        times = interleaved({**{name: _rate(fn) for name, fn in timers.items()},
                             "hf-eager": _rate(theirs)}, iters)
        want = int(torch.argmax(theirs()[0, -1]))
        for name, ts in times.items():
          got = want if name == "hf-eager" else int(timers[name]().tokens[0][0])
          rows.append({"part": "ttft", "impl": name, "dtype": dtype, "batch": 1,
                       "queries": n, "cached": 0, "heads": f"{args.heads}/{args.kv_heads}",
                       "head_dim": args.hidden // args.heads, "ms": float(np.median(ts)),
                       "speedup_vs_hf": float(np.median(np.asarray(times["hf-eager"])
                                                        / np.asarray(ts))),
                       "same_first_token": got == want})
  return rows


def _cores_tp(args) -> int:
  """The most CPU devices (main asked for one a core) tensor parallelism can split the
  random Llama's heads over: 1 where there is one."""
  n = len(jax.devices("cpu"))
  return max(t for t in range(1, n + 1) if args.heads % t == 0 and args.kv_heads % t == 0)


def cope_op_rows(shapes, iters):
  """CoPE attention alone, float32: fdjax's "auto", the reference, and bench/torch_cope.py's
  attention (the bundled model's decoder: head_dim 64, 64 positions)."""
  import torch

  from bench.torch_cope import CopeDecoder
  from fdjax.io import loading
  theirs = CopeDecoder(loading.DEFAULT_MODEL_DIR)
  d, npos = theirs.head_dim, theirs.npos
  rows = []
  for b, t, h in shapes:
    rng = np.random.default_rng(b * t + h)
    host = [rng.standard_normal(shape).astype(np.float32)
            for shape in ((b, t, h, d), (b, t, h, d), (b, t, h, d))]
    e = (rng.standard_normal((npos, d)) * 0.5).astype(np.float32)
    lengths = jnp.full((b,), t, jnp.int32)
    scale = d ** -0.5
    with jax.enable_x64(True):
      want = np.asarray(reference.cope_attention(
          *(jnp.asarray(x, jnp.float64) for x in host), jnp.asarray(e, jnp.float64), lengths,
          scale))
    q, k, v = (jnp.asarray(x) for x in host)
    tq, tk, tv = (torch.from_numpy(x).transpose(1, 2) for x in host)
    te = torch.from_numpy(e)
    fns = {"fdjax-auto": jax.jit(lambda q, k, v: dispatch.cope_attention(
               q, k, v, jnp.asarray(e), lengths=lengths, sm_scale=scale)),
           "xla-reference": jax.jit(lambda q, k, v: reference.cope_attention(
               q, k, v, jnp.asarray(e), lengths, scale))}
    group = []
    for name, fn in fns.items():
      ms = _ms(lambda fn=fn: fn(q, k, v).block_until_ready(), iters)
      err = float(np.max(np.abs(np.asarray(fn(q, k, v)) - want)))
      group.append({"impl": name, "ms": ms, "max_abs_err_vs_f64": err})
    with torch.no_grad():
      ms = _ms(lambda: theirs._attend(tq, tk, tv, te, 0), iters)
      err = float(np.max(np.abs(theirs._attend(tq, tk, tv, te, 0).transpose(1, 2).numpy()
                                - want)))
    group.append({"impl": "torch-cope", "ms": ms, "max_abs_err_vs_f64": err})
    base = group[1]["ms"]
    rows += [{"part": "op-cope", "dtype": "float32", "batch": b, "queries": t, "cached": 0,
              "heads": f"{h}/{h}", "head_dim": d, **r,
              "speedup_vs_xla_reference": base / r["ms"]} for r in group]
  return rows


def cope_ttft_rows(prompts, iters):
  import glob

  from bench.torch_cope import CopeDecoder
  from fdjax.io import loading
  model = fdjax.load_pretrained(loading.DEFAULT_MODEL_DIR)
  theirs_model = CopeDecoder(loading.DEFAULT_MODEL_DIR)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  text = "".join(open(f).read() for f in sorted(glob.glob(os.path.join(root, "fdjax/ops/*.py"))))
  cfg = model.config
  rows = []
  for n in prompts:
    prompt = list(text.encode()[:n])

    def ours():
      return int(fdjax.generate(model, [prompt], max_new_tokens=1, temperature=0.0).tokens[0][0])

    def theirs():
      return theirs_model.generate([prompt], 1)[0][0]

    first = [ours(), theirs()]
    times = interleaved({"fdjax": _rate(ours), "torch-cope": _rate(theirs)}, iters)
    for name, ts in times.items():
      rows.append({"part": "ttft-cope", "impl": name, "dtype": "float32", "batch": 1,
                   "queries": n, "cached": 0, "heads": f"{cfg.num_heads}/{cfg.num_kv_heads}",
                   "head_dim": cfg.head_dim, "ms": float(np.median(ts)),
                   "speedup_vs_hf": float(np.median(np.asarray(times["torch-cope"])
                                                    / np.asarray(ts))),
                   "same_first_token": first[0] == first[1]})
  return rows


def _rate(fn):
  """A function returning the milliseconds of one call of fn."""
  def once():
    t = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - t)
  return once


def main():
  ap = argparse.ArgumentParser()
  common.llama_args(ap)
  ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                  choices=["float32", "bfloat16"])
  ap.add_argument("--iters", type=int, default=7)
  ap.add_argument("--parts", nargs="+", default=PARTS, choices=PARTS)
  ap.add_argument("--smoke", action="store_true", help="tiny shapes (checks the script)")
  ap.add_argument("--name", default="prefill_cpu")
  ap.add_argument("--results-dir", default=None)
  args = ap.parse_args()
  if "ttft" in args.parts:
    fdjax.cpu_devices(os.cpu_count() or 1)  # before JAX starts: one CPU device a core
  if args.smoke:
    args.layers, args.hidden, args.heads, args.kv_heads, args.intermediate = 2, 64, 4, 2, 128
    args.vocab, args.iters = 512, 2
  rows = []
  if "op" in args.parts:
    rows += op_rows(SMOKE_SHAPES if args.smoke else OP_SHAPES, args.dtypes, args.iters)
  if "op-cope" in args.parts:
    rows += cope_op_rows([(1, 64, 2)] if args.smoke else COPE_SHAPES, args.iters)
  if "ttft" in args.parts:
    rows += ttft_rows(args, [64, 80] if args.smoke else TTFT_PROMPTS, args.dtypes, args.iters)
  if "ttft-cope" in args.parts:
    rows += cope_ttft_rows([64] if args.smoke else COPE_PROMPTS, args.iters)
  columns = ["part", "impl", "dtype", "batch", "queries", "cached", "spare_keys", "heads",
             "head_dim", "ms",
             "speedup_vs_xla_reference", "speedup_vs_hf", "max_abs_err_vs_f64",
             "same_first_token"]
  notes = (
      "op: causal prefill attention, each row's length cached + queries; queries after "
      "`cached` keys are a chunk of a longer prompt, spare_keys more keys past the length "
      "are those of generate's page run, which no query sees (jax.nn.dot_product_attention "
      "has no offset and no lengths here, so no jax-sdpa row; PyTorch takes the mask). "
      "fdjax-auto is what "
      "dispatch runs on the CPU (fdjax.ops.selection.cpu_prefill). ms: median of --iters "
      "calls after one warm-up; max_abs_err_vs_f64 against the float64 reference on the same "
      "inputs. ttft: one prompt's prefill and first token on a random Llama "
      f"({args.layers} layers, hidden {args.hidden}, {args.heads}/{args.kv_heads} heads, "
      f"vocabulary {args.vocab}): fdjax.generate(max_new_tokens=1, greedy) against "
      "transformers' eager forward (logits_to_keep=1) in PyTorch, timed in turn round by "
      "round; speedup_vs_hf the median of the rounds' ratios; fdjax-tpN: the model "
      "loaded tensor parallel over N CPU devices, one a core (fdjax.cpu_devices: XLA:CPU "
      "runs a program's loops and element-wise work on one thread, each device on its own; "
      "`fdjax generate --tp N` does this). ttft-cope: the bundled CoPE "
      "model (byte-level) against bench/torch_cope.py's PyTorch CoPE decoder (eager, its "
      "prompt in one call), the same way; speedup_vs_hf is against that decoder there.")
  print(common.write_results(args.name, rows, columns, notes, args.results_dir))


if __name__ == "__main__":
  main()
