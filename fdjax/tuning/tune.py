"""The offline half of FlashDecoding++'s heuristic dataflow: `fdjax tune` profiles GEMV, the
flat GEMM and XLA's dot per weight shape [K, N] over M, fits the crossovers M1 and M2, and
writes the table `fdjax.ops.selection` reads at run time (per device kind: on a TPU the Mosaic
GEMV and flat GEMM of pallas_kernels/tpu/, with their own candidate tiles; on a Hopper GPU the
Mosaic GPU flat GEMM is timed beside Triton's, and the entry's "backend" names the faster).
Every candidate is compiled before it is timed, on a GPU with spills made errors
(fdjax.tuning.aot.compile); one the compiler refuses is dropped, with its reason. Every timing
is fdjax.tuning.timing's (rotating random inputs, no L2 reuse). `fdjax tune --moe` times a
mixture-of-experts layer's two strategies by tokens instead (tune_moe: the table's "moe").
"""
from __future__ import annotations

import functools
import json
import os
import time

import jax
import jax.numpy as jnp

from fdjax.ops import quant, reference, selection
from fdjax.tuning import aot, timing
from pallas_kernels.mosaic_gpu import flat_gemm as mosaic_flat_gemm
from pallas_kernels.tpu import flat_gemm as tpu_flat_gemm
from pallas_kernels.tpu import gemv as tpu_gemv
from pallas_kernels.triton import flat_gemm as triton_flat_gemm
from pallas_kernels.triton import gemv as triton_gemv
from pallas_kernels.triton import quantized_gemm as triton_quantized

GEMV_CONFIGS = [{"block_n": bn, "block_k": bk, "split_k": sk, "num_stages": 3}
                for bn in (128, 256) for bk in (64, 128) for sk in (2, 4, 8)]
FLAT_CONFIGS = [{"block_n": bn, "block_k": bk, "split_k": sk, "num_stages": st}
                for bn in (64, 128) for bk in (128,) for sk in (1, 2, 4) for st in (2, 4)]
# TPU: tiles of w (multiples of 128); the grid's per-step cost favours large ones
TPU_CONFIGS = [{"block_n": bn, "block_k": bk} for bn in (256, 512, 1024)
               for bk in (512, 1024, 2048)]
PROFILE_MS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


def _time(fn, sets, iters):
  """Seconds per call of fn, compiled on its own for the first set before any timing (on a
  GPU a spill is a compile error: aot.CompileError, and the candidate is never timed)."""
  aot.compile(jax.jit(fn).lower(*sets[0]), strict=jax.default_backend() == "gpu")
  return timing.seconds_per_call(fn, sets, calls=iters)


def _best(kernel, settings_cls, configs, sets, iters, interpret, progress=print):
  best = None
  for c in configs:
    try:
      t = _time(functools.partial(kernel, interpret=interpret, settings=settings_cls(**c)),
                sets, iters)
    except Exception as e:  # refused by the compiler (shared memory, spills) or the lowering
      progress(f"  dropped {kernel.__name__} {c}: {aot.reason(e)}")
      continue
    if best is None or t < best[0]:
      best = (t, c)
  if best is None:
    raise ValueError(f"no configuration of {kernel.__name__} compiled for x "
                     f"{sets[0][0].shape} w {sets[0][1].shape}")
  return best


def kernels(quantization: str | None = None, kind: str | None = None) -> dict:
  """{"gemv": fn(x, w, settings=, interpret=), "flat": ...}: the kernels dispatch.linear runs
  for a float weight, or for one quantized to "int8" / "int4" (w: a QuantizedWeight), on a
  device of `kind` (default: this process's; a TPU's are the Mosaic ones)."""
  if selection.is_tpu(kind or selection.device_kind()):
    if quantization is not None:
      raise ValueError(f"tune: no Mosaic TPU kernel for {quantization} weights (XLA runs them)")
    return {"gemv": tpu_gemv.gemv, "flat": tpu_flat_gemm.flat_gemm}
  if quantization is None:
    return {"gemv": triton_gemv.gemv, "flat": triton_flat_gemm.flat_gemm}
  def wrap(kernel):
    def run(x, w, **kw):
      return kernel(x, w.values, w.scales, bits=w.bits, **kw)
    run.__name__ = f"{kernel.__name__}_{quantization}"
    return run
  return {"gemv": wrap(triton_quantized.gemv), "flat": wrap(triton_quantized.flat_gemm)}


def random_weights(k: int, n: int, count: int, dtype, quantization: str | None = None,
                   seed: int = 0) -> list:
  """`count` random [K, N] weights in `dtype`, quantized to `quantization` if given."""
  key = jax.random.key(seed)
  ws = [jax.random.normal(jax.random.fold_in(key, i), (k, n), jnp.float32).astype(dtype)
        for i in range(count)]
  return ws if quantization is None else [quant.quantize(w, quantization) for w in ws]


def tune_shape(k: int, n: int, ms=PROFILE_MS, *, dtype=jnp.bfloat16, iters=20, interpret=False,
               gemv_configs=None, flat_configs=None, progress=print,
               quantization: str | None = None) -> dict:
  """Profiles one [K, N] weight shape (quantized to `quantization` or not) over `ms` and
  returns its table entry. Weights rotate over enough random copies that they do not sit in
  the L2 cache between calls."""
  key = jax.random.key(k * 7919 + n)
  n_sets = 1 if interpret else timing.sets_needed(quant.weight_nbytes(k, n, dtype, quantization))
  ws = random_weights(k, n, n_sets, dtype, quantization, seed=k * 7919 + n)
  def sets(m):
    return [(jax.random.normal(jax.random.fold_in(key, 1000 * m + i), (m, k),
                               jnp.float32).astype(dtype), w) for i, w in enumerate(ws)]
  kernel = kernels(quantization)
  classes = selection.settings_classes(selection.device_kind())
  tpu = selection.is_tpu(selection.device_kind())
  gemv_cfg = _best(kernel["gemv"], classes["gemv"],
                   gemv_configs or (TPU_CONFIGS if tpu else GEMV_CONFIGS), sets(1), iters,
                   interpret, progress)[1]
  flat_cfg = _best(kernel["flat"], classes["flat"],
                   flat_configs or (TPU_CONFIGS if tpu else FLAT_CONFIGS),
                   sets(min(16, max(ms))), iters, interpret, progress)[1]
  flat = functools.partial(kernel["flat"], interpret=interpret,
                           settings=classes["flat"](**flat_cfg))
  gemv = functools.partial(kernel["gemv"], interpret=interpret,
                           settings=classes["gemv"](**gemv_cfg))
  mosaic = functools.partial(mosaic_flat_gemm.flat_gemm, interpret=interpret)
  on_gpu = not tpu and quantization is None and selection.not_hopper() is None
  profile = []
  for i, m in enumerate(ms):
    xs = sets(m)
    row = {"m": m, "flat_us": _time(flat, xs, iters) * 1e6,
           "xla_us": _time(reference.linear, xs, iters) * 1e6}
    if m <= triton_gemv.MAX_M:
      row["gemv_us"] = _time(gemv, xs, iters) * 1e6
    if on_gpu and mosaic_flat_gemm.unsupported(m, k, n, dtype) is None:
      row["mosaic_flat_us"] = _time(mosaic, xs, iters) * 1e6
    profile.append(row)
    progress(f"  [{selection.key(k, n, quantization)}] M={m} ({i + 1}/{len(ms)}) " + " ".join(
        f"{name}={row[name]:.1f}us" for name in ("gemv_us", "flat_us", "mosaic_flat_us",
                                                 "xla_us") if name in row))
  backend = flat_backend(profile)
  m1, m2 = fit_crossovers([{**r, "flat_us": r.get("mosaic_flat_us", r["flat_us"])}
                           if backend == "pallas_mosaic" else r for r in profile])
  entry = {"m1": int(m1), "m2": int(m2), "source": "measured", "gemv": gemv_cfg,
           "flat": flat_cfg, "profile": profile}
  return {**entry, "backend": backend} if backend else entry


def flat_backend(profile: list[dict]) -> str | None:
  """Which flat GEMM the table's "flat" runs on a Hopper GPU: "pallas_mosaic" (Mosaic GPU)
  where it took less time than Triton's over the M it was timed at, else "pallas"; None where
  it was not timed (a TPU, a GPU before Hopper, quantized weights, a shape it does not take).
  A CPU (--allow-cpu, the GPU suite's dry run) times both in interpret mode, as a Hopper
  would be timed: its "backend" exercises the path, it measures nothing."""
  both = [r for r in profile if "mosaic_flat_us" in r]
  if not both:
    return None
  mosaic = sum(r["mosaic_flat_us"] for r in both)
  return "pallas_mosaic" if mosaic < sum(r["flat_us"] for r in both) else "pallas"


def fit_crossovers(profile: list[dict]) -> tuple[int, int]:
  """(M1, M2) minimising the summed time of the implementation the three regions pick over
  every profiled M (GEMV below M1, the flat GEMM below M2, XLA from M2): the best table of
  this form for the measurements, and not thrown off by one noisy point."""
  ms = [r["m"] for r in profile]
  cuts = ms + [ms[-1] + 1]
  best = None
  for i, m1 in enumerate(cuts):
    for m2 in cuts[i:]:
      total = sum(r.get("gemv_us", float("inf")) if r["m"] < m1 else
                  r["flat_us"] if r["m"] < m2 else r["xla_us"] for r in profile)
      if best is None or total < best[0]:
        best = (total, m1, m2)
  return best[1], best[2]


def write_table(entries: dict, path: str | None = None, kind: str | None = None,
                section: str = "shapes") -> str:
  """Merges {"KxN": entry} (or, in the "moe" section, {moe_key: entry}) into the device's
  table file and returns its path."""
  kind = kind or selection.device_kind()
  path = path or os.path.join(selection.TABLE_DIR, f"{selection.slug(kind)}.json")
  table = {"device": kind, "shapes": {}}
  if os.path.exists(path):
    with open(path) as fh:
      table = json.load(fh)
  table["device"] = kind
  table.setdefault(section, {}).update(entries)
  table["jax_version"] = jax.__version__
  table["date"] = time.strftime("%Y-%m-%d")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as fh:
    json.dump(table, fh, indent=1)
  selection.reload()
  return path


def tune_model(cfg, ms, *, dtype="bfloat16", iters=20, out=None, progress=None,
               quantization: str | None = None) -> str:
  """Tunes the four weight shapes of a model config (quantized to `quantization`: their
  "KxN:int8" / "KxN:int4" entries) and writes the device's table (or `out`). On a CPU the
  kernels run interpreted with one candidate each: a check of the plumbing, not a
  measurement."""
  progress = progress or (lambda s: print(s, flush=True))
  on_cpu = jax.default_backend() == "cpu"
  small = dict(gemv_configs=GEMV_CONFIGS[:1], flat_configs=FLAT_CONFIGS[:1]) if on_cpu else {}
  shapes = cfg.linear_shapes()
  entries = {}
  for i, (name, (k, n)) in enumerate(shapes.items()):
    progress(f"[{i + 1}/{len(shapes)}] {name}: K={k} N={n}, M={list(ms)}")
    e = tune_shape(k, n, ms, dtype=jnp.dtype(dtype), iters=iters, interpret=on_cpu,
                   progress=progress, quantization=quantization, **small)
    progress(f"  -> M1={e['m1']} M2={e['m2']} gemv={e['gemv']} flat={e['flat']}"
             + (f" flat backend={e['backend']}" if "backend" in e else ""))
    entries[selection.key(k, n, quantization)] = e
  return write_table(entries, out)


MOE_TOKENS = (1, 2, 4, 8, 16, 32, 64)


def tune_moe(cfg, tokens=MOE_TOKENS, *, dtype="bfloat16", iters=10, out=None, progress=None,
             quantization: str | None = None, seed: int = 0) -> str:
  """Times a mixture-of-experts layer of `cfg`'s shape (random experts, quantized to
  `quantization` or not; random routing) both ways selection.moe chooses between, the grouped
  tiles and every expert on every token, at each token count (dispatch.moe as "auto" runs it:
  on Hopper the tiles go through the Mosaic GPU grouped GEMM), and writes the layer's entry
  into the device's table (or `out`): selection.moe follows it from then on. Unlike the linear
  kernels' tuning, on a CPU this measures what runs there (XLA)."""
  from fdjax.ops import dispatch
  progress = progress or (lambda s: print(s, flush=True))
  if not cfg.num_experts:
    raise ValueError("tune --moe: the model has no mixture-of-experts layer")
  e, h, f, k = (cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size,
                cfg.experts_per_token)
  dtype = jnp.dtype(dtype)
  key = jax.random.key(seed)
  w_gate_up = (jax.random.normal(jax.random.fold_in(key, 1), (e, h, 2 * f)) * 0.02).astype(dtype)
  w_down = (jax.random.normal(jax.random.fold_in(key, 2), (e, f, h)) * 0.02).astype(dtype)
  if quantization:
    w_gate_up, w_down = quant.quantize(w_gate_up, quantization), quant.quantize(w_down,
                                                                               quantization)
  def layer(strategy):  # the experts are arguments: constants would be copied into the program
    return jax.jit(lambda x, r, wgu, wd: dispatch.moe(x, r, wgu, wd, top_k=k,
                                                      normalize=cfg.norm_topk_prob,
                                                      strategy=strategy))
  runs = {s: layer(s) for s in ("grouped", "dense")}
  name = selection.moe_key(e, h, f, k, quantization)
  profile = []
  for i, t in enumerate(tokens):
    sets = [(jax.random.normal(jax.random.fold_in(key, 100 * t + j), (t, h)).astype(dtype),
             jax.random.normal(jax.random.fold_in(key, 100 * t + j + 50), (t, e)),
             w_gate_up, w_down) for j in range(2)]
    row = {"tokens": int(t)}
    for strategy, fn in runs.items():
      row[f"{strategy}_ms"] = timing.seconds_per_call(fn, sets, calls=iters) * 1e3
    row["tile"] = selection.moe_tile(t, k, e)
    profile.append(row)
    progress(f"  [{name}] {t} tokens ({i + 1}/{len(tokens)}): grouped tiles of {row['tile']} "
             f"{row['grouped_ms']:.3f} ms, every expert {row['dense_ms']:.3f} ms")
  entry = {"source": "measured", "dtype": dtype.name, "profile": profile}
  return write_table({name: entry}, out, section="moe")
