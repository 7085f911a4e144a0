"""Attention kernels side by side, one run: decode (split-KV) and prefill.

  python bench/attention.py            # the full grid, on a GPU
  python bench/attention.py --smoke    # tiny shapes on any backend (checks the script)

impl names: fdjax-async (ours, unified max value), fdjax-sync (ours with the online softmax:
the paper's ablation), fdjax-paged64 (fdjax-async through a page table of 64-entry pages), the
same three on Mosaic GPU as fdjax-mosaic-* (pallas_kernels/mosaic_gpu/, Hopper), jax-flashdecoding (jax.experimental.pallas.ops.gpu.decode_attention),
jax-flashattention (jax.experimental.pallas.ops.gpu.attention, prefill), xla (the reference),
cudnn (jax.nn.dot_product_attention, implementation="cudnn"). On a CPU the Pallas kernels
run in interpret mode and the third-party GPU kernels are skipped: such timings say nothing
about speed.
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
from fdjax.ops import reference  # noqa: E402
from fdjax.tuning import timing
from pallas_kernels.mosaic_gpu import decode_attention as mda  # noqa: E402
from pallas_kernels.triton import decode_attention as dk  # noqa: E402
from pallas_kernels.triton import prefill_attention as pk  # noqa: E402


def decode_impls(on_gpu, sm_scale):
  interpret = not on_gpu
  impls = {
      "fdjax-async": lambda q, k, v, n: dk.decode_attention(q, k, v, n, sm_scale=sm_scale,
                                                            interpret=interpret),
      "fdjax-sync": lambda q, k, v, n: dk.decode_attention(q, k, v, n, sm_scale=sm_scale,
                                                           mode="online", interpret=interpret),
      "fdjax-paged64": lambda q, k, v, n: _paged(q, k, v, n, sm_scale, 64, interpret),
      "fdjax-mosaic-async": lambda q, k, v, n: mda.decode_attention(
          q, k, v, n, sm_scale=sm_scale, interpret=interpret),
      "fdjax-mosaic-sync": lambda q, k, v, n: mda.decode_attention(
          q, k, v, n, sm_scale=sm_scale, mode="online", interpret=interpret),
      "fdjax-mosaic-paged64": lambda q, k, v, n: _paged(q, k, v, n, sm_scale, 64, interpret,
                                                        mda),
      "xla": lambda q, k, v, n: reference.decode_attention(q, k, v, n, sm_scale),
      "xla-sdpa": lambda q, k, v, n: jax.nn.dot_product_attention(
          q[:, None], k, v, scale=sm_scale, key_value_seq_lengths=n,
          implementation="xla")[:, 0],
  }
  if on_gpu:
    from jax.experimental.pallas.ops.gpu import decode_attention as jax_fd
    impls["jax-flashdecoding"] = lambda q, k, v, n: jax_fd.gqa(q, k, v, kv_seq_len=n,
                                                               sm_scale=sm_scale)
    impls["cudnn"] = lambda q, k, v, n: jax.nn.dot_product_attention(
        q[:, None], k, v, scale=sm_scale, key_value_seq_lengths=n,
        implementation="cudnn")[:, 0]
  return impls


def _paged(q, k, v, n, sm_scale, page_size, interpret, kernels=dk):
  """The cache's bytes as a heads-major pool [Hkv, B * S / page_size, page_size, D] of pages
  (row b's in order): what the paged kernel's page-table indirection costs. A free reshape, not
  a transpose, so nothing but the kernel is timed: the pool holds the same random values in
  other places, and only finiteness is checked here (the tests check the numbers)."""
  b, s, hkv, d = k.shape
  if s % page_size:
    raise ValueError(f"kv_len {s} is not a multiple of the page size {page_size}")
  pages = lambda x: x.reshape(hkv, b * s // page_size, page_size, d)
  table = jnp.arange(b * s // page_size, dtype=jnp.int32).reshape(b, s // page_size)
  return kernels.paged_decode_attention(q, pages(k), pages(v), table, n, sm_scale=sm_scale,
                                        interpret=interpret)


def prefill_impls(on_gpu, sm_scale):
  interpret = not on_gpu
  impls = {
      "fdjax-async": lambda q, k, v: pk.prefill_attention(q, k, v, sm_scale=sm_scale,
                                                          interpret=interpret),
      "fdjax-sync": lambda q, k, v: pk.prefill_attention(q, k, v, sm_scale=sm_scale,
                                                         mode="online", interpret=interpret),
      "xla": lambda q, k, v: reference.prefill_attention(q, k, v, None, True, sm_scale),
      "xla-sdpa": lambda q, k, v: jax.nn.dot_product_attention(
          q, k, v, scale=sm_scale, is_causal=True, implementation="xla"),
  }
  if on_gpu:
    from jax.experimental.pallas.ops.gpu import attention as jax_fa
    impls["jax-flashattention"] = lambda q, k, v: jax_fa.mha(
        q, jnp.repeat(k, q.shape[2] // k.shape[2], 2), jnp.repeat(v, q.shape[2] // k.shape[2], 2),
        segment_ids=None, sm_scale=sm_scale, causal=True)
    impls["cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, scale=sm_scale, is_causal=True, implementation="cudnn")
  return impls


def _measure(fn, arg_sets, iters, what=""):
  """(seconds per call, None) or (None, why) for fn on the rotating arg_sets. A call that
  never returns (a GPU kernel waiting forever) ends the process (common.watchdog): the rows
  so far are in its output, one per line."""
  f = jax.jit(fn)
  with common.watchdog(what):
    try:
      out = f(*arg_sets[0])
      jax.block_until_ready(out)
    except Exception as e:  # a baseline that does not take this shape: record why
      return None, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    if not np.all(np.isfinite(np.asarray(out.astype(jnp.float32)))):
      return None, "non-finite output"
    return timing.seconds_per_call(f, arg_sets, calls=iters), None


def _random_sets(key, shapes, dtype, extra=()):
  """Enough sets of random arrays of `shapes` (plus fixed `extra` arguments) that one
  rotation is several times the L2 cache."""
  set_bytes = sum(int(np.prod(s)) for s in shapes) * jnp.dtype(dtype).itemsize
  sets = []
  for i in range(timing.sets_needed(set_bytes)):
    keys = jax.random.split(jax.random.fold_in(key, i), len(shapes))
    sets.append(tuple(jax.random.normal(kk, s, jnp.float32).astype(dtype)
                      for kk, s in zip(keys, shapes)) + tuple(extra))
  return sets


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--smoke", action="store_true")
  ap.add_argument("--iters", type=int, default=30, help="calls per timed round")
  ap.add_argument("--batch", type=int, nargs="+")
  ap.add_argument("--kv-len", type=int, nargs="+")
  ap.add_argument("--prefill-len", type=int, nargs="+")
  ap.add_argument("--results-dir")
  ap.add_argument("--from-log", nargs=2, metavar=("LOG", "ENV_JSON"),
                  help="rebuild the results of a run cut off before writing them")
  args = ap.parse_args()
  if args.from_log:
    return print(from_log(*args.from_log, args.results_dir))
  on_gpu = jax.default_backend() == "gpu"
  if args.smoke:
    timing.smoke()
    # one decode shape (GQA 4): the smoke form checks the script
    d, q_heads, kv_list, batches, kv_lens, pre_lens, iters = 64, 4, [1], [2], [128], [48], 2
  else:
    d, q_heads, kv_list, batches, kv_lens, pre_lens, iters = (
        128, 32, [32, 8], [1, 8, 32], [1024, 4096, 16384], [1024, 4096], args.iters)
  batches, kv_lens, pre_lens = args.batch or batches, args.kv_len or kv_lens, (
      args.prefill_len or pre_lens)
  bw = timing.copy_bandwidth_gbps(1 << 30 if on_gpu else 1 << 24)
  floor = timing.dispatch_floor()
  print(f"device {common.device_name()}: measured copy bandwidth {bw:.0f} GB/s, dispatch floor "
        f"{floor * 1e6:.1f} us per call", flush=True)
  dtype = jnp.bfloat16
  scale = d ** -0.5
  rows = []
  key = jax.random.key(0)
  for hkv in kv_list:
    for b in batches:
      for s in kv_lens:
        key, sub = jax.random.split(key)
        n = jnp.full((b,), s, jnp.int32)
        sets = _random_sets(sub, [(b, q_heads, d), (b, s, hkv, d), (b, s, hkv, d)], dtype, (n,))
        nbytes = 2 * b * s * hkv * d * 2 + 2 * b * q_heads * d * 2
        shape = dict(op="decode", batch=b, q_heads=q_heads, kv_heads=hkv, head_dim=d, kv_len=s)
        for name, fn in decode_impls(on_gpu, scale).items():
          t, err = _measure(fn, sets, iters, f"{name} {shape}")
          row = {**shape, "impl": name, "dtype": "bfloat16"}
          if t is None:
            row["error"] = err
          else:
            row.update(us=t * 1e6, gbps=nbytes / t / 1e9, bw_fraction=nbytes / t / 1e9 / bw)
          rows.append(row)
          print(row, flush=True)
        del sets
  for hkv in kv_list:
    for t_len in pre_lens:
      key, sub = jax.random.split(key)
      b = 1
      sets = _random_sets(sub, [(b, t_len, q_heads, d), (b, t_len, hkv, d), (b, t_len, hkv, d)],
                          dtype)
      nbytes = (2 * b * t_len * q_heads * d + 2 * b * t_len * hkv * d) * 2
      flops = 4 * b * q_heads * t_len * t_len * d / 2  # causal
      shape = dict(op="prefill", batch=b, q_heads=q_heads, kv_heads=hkv, head_dim=d,
                   kv_len=t_len, q_len=t_len)
      for name, fn in prefill_impls(on_gpu, scale).items():
        t, err = _measure(fn, sets, iters, f"{name} {shape}")
        row = {**shape, "impl": name, "dtype": "bfloat16"}
        if t is None:
          row["error"] = err
        else:
          row.update(us=t * 1e6, gbps=nbytes / t / 1e9, bw_fraction=nbytes / t / 1e9 / bw,
                     tflops=flops / t / 1e12)
        rows.append(row)
        print(row, flush=True)
      del sets

  print(write(rows, bw, floor, on_gpu, d, q_heads, args.smoke, args.results_dir))


TIMED = ("Times: fdjax.tuning.timing.seconds_per_call (the calls run in a loop inside one "
         "compiled program over rotating random inputs, so the host's dispatch is paid once "
         "per round; median of rounds).")


def write(rows, bw, floor, on_gpu, d, q_heads, smoke, results_dir, env=None, timed=TIMED):
  """Ratios against each baseline of the same shape, the targets' summary, and the results
  (attention{,_smoke}.{json,md,svg}); `env`: the measuring run's, when rebuilt from its log;
  `timed`: how it timed."""
  def key_of(r):
    return (r["op"], r["batch"], r["kv_heads"], r["kv_len"])
  by_shape = {}
  for r in rows:
    by_shape.setdefault(key_of(r), {})[r["impl"]] = r.get("us")
  for r in rows:  # both backends' async kernels against every other impl of the shape
    if r["impl"] in ("fdjax-async", "fdjax-mosaic-async") and r.get("us"):
      for other, us in by_shape[key_of(r)].items():
        if other != r["impl"] and us:
          r[f"speedup_vs_{other}"] = us / r["us"]
  decode = [r for r in rows if r["op"] == "decode" and r["impl"] == "fdjax-async"]
  size = lambda n: f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)
  groups = [f"b{r['batch']} h{r['kv_heads']} {size(r['kv_len'])}" for r in decode]
  series = {}
  for name in dict.fromkeys(r["impl"] for r in rows if r["op"] == "decode"):
    series[name] = [by_shape[key_of(r)].get(name) or float("nan") for r in decode]
  device = env["device"] if env else common.device_name()
  plot = common.svg_bars(f"decode attention, bf16, D={d}, {q_heads} query heads ({device})",
                         groups, series, "microseconds (lower is better)")
  cols = ["op", "impl", "batch", "q_heads", "kv_heads", "kv_len", "us", "gbps", "bw_fraction",
          "tflops", "speedup_vs_jax-flashdecoding", "speedup_vs_jax-flashattention",
          "speedup_vs_xla-sdpa", "speedup_vs_cudnn", "speedup_vs_fdjax-async", "error"]
  notes = (f"Measured copy bandwidth in this run: {bw:.0f} GB/s; dispatch floor "
           f"{floor * 1e6:.1f} us per call from Python. {timed} xla = fdjax's float32 "
           "reference; xla-sdpa = jax.nn.dot_product_attention(implementation='xla') in bf16.")
  mosaic = [r for r in rows if r["impl"] == "fdjax-mosaic-async" and r.get("us")]
  vs = [r["speedup_vs_fdjax-async"] for r in mosaic if "speedup_vs_fdjax-async" in r]
  if vs:
    notes += (f"\n\nMosaic GPU against Triton (fdjax-mosaic-async over fdjax-async, the same "
              f"math): geometric mean {float(np.exp(np.mean(np.log(vs)))):.2f}x over "
              f"{len(vs)} shapes (min {min(vs):.2f}, max {max(vs):.2f}).")
  long = [r for r in decode if r["kv_len"] >= 4096 and r.get("us")]
  if long:
    fracs = [r["bw_fraction"] for r in long]
    notes += (f"\n\nTargets (decode, KV >= 4k, fdjax-async): bandwidth fraction median "
              f"{np.median(fracs):.2f} (min {min(fracs):.2f}, max {max(fracs):.2f}; target 0.85)")
    vs = [r["speedup_vs_jax-flashdecoding"] for r in long if "speedup_vs_jax-flashdecoding" in r]
    if vs:
      notes += (f"; speed-up over JAX's Pallas decode attention: geometric mean "
                f"{float(np.exp(np.mean(np.log(vs)))):.2f}x over {len(vs)} shapes "
                f"(min {min(vs):.2f}, max {max(vs):.2f}; target > 1).")
  if not on_gpu:
    notes += (" Not a GPU: the Pallas kernels ran in interpret mode, so these timings say "
              "nothing about speed.")
  return common.write_results("attention_smoke" if smoke else "attention", rows, cols, notes,
                              results_dir=results_dir, plot=plot, env=env)


def from_log(path, env_json, results_dir):
  """Rebuilds the results of a GPU run cut off before it wrote them (the suite's budget), from
  the rows its log printed, with the device, versions and date of `env_json` (that lease's
  gpu_env.json) and the command the log names."""
  import ast
  import json
  rows, bw, floor, command = [], float("nan"), float("nan"), None
  with open(path) as fh:
    for line in fh:
      if line.startswith("{'op'"):
        rows.append(ast.literal_eval(line))
      elif line.startswith("device ") and "copy bandwidth" in line:
        bw = float(line.split("copy bandwidth ")[1].split()[0])
        floor = float(line.split("dispatch floor ")[1].split()[0]) * 1e-6
      elif line.startswith("$ ") and command is None:
        argv = line[2:].split()
        command = " ".join(["python"] + [os.path.relpath(a, common.ROOT) if a.startswith("/")
                                         and "bench/" in a else a for a in argv[1:]])
  with open(env_json) as fh:
    env = {k: v for k, v in json.load(fh)["rows"][0].items()
           if k in ("device", "jax_version", "torch_version", "date")}
  env["command"] = (f"{command or 'python bench/attention.py'} (cut off by its time budget; "
                    f"rebuilt with python bench/attention.py --from-log)")
  decode = next(r for r in rows if r["op"] == "decode")
  return write(rows, bw, floor, True, decode["head_dim"], decode["q_heads"], False,
               results_dir, env, EARLIER_TIMING)


EARLIER_TIMING = (
    "Times: calls back to back from Python over rotating random inputs, median of rounds: the "
    "timing before the in-program loop, so every time near the dispatch floor is the host's, "
    "not the device's (only the largest shapes, well above it, measure the kernels).")


if __name__ == "__main__":
  main()
