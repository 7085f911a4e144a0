"""FlashDecoding++'s heuristic dataflow: per device and per weight shape [K, N], which of
GEMV, the flat GEMM and XLA's dot (the vendor GEMM) runs a linear layer, by M.

A table holds, per "KxN", the crossovers M1 (GEMV -> flat GEMM) and M2 (flat GEMM -> XLA)
and the kernels' block settings: M < M1 takes GEMV, M1 <= M < M2 the flat GEMM, M >= M2
XLA. M is static under jit, so the choice costs nothing at run time. Tables are JSON files
in fdjax/tables/ (and in $FDJAX_TABLES, a directory, if set), one per device kind, written by
`python -m fdjax tune`. Shapes and devices no table covers get the analytic fallback below.
"""
from __future__ import annotations

import functools
import json
import os
import re
import time

import jax
import jax.numpy as jnp

from fdjax import reference, timing
from pallas_kernels import flat_gemm as fg
from pallas_kernels import gemv as gv

TABLE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tables")
NUM_SMS = 132  # H100 SXM; the analytic split-K aims at two programs per SM


def device_kind() -> str:
  return jax.devices()[0].device_kind


def slug(kind: str) -> str:
  return re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-")


def _table_files():
  dirs = [TABLE_DIR] + ([os.environ["FDJAX_TABLES"]] if os.environ.get("FDJAX_TABLES") else [])
  for d in dirs:
    if os.path.isdir(d):
      for f in sorted(os.listdir(d)):
        if f.endswith(".json"):
          yield os.path.join(d, f)


@functools.lru_cache(maxsize=None)
def tables() -> dict:
  """{device kind: {"KxN": entry}} from every table file."""
  out = {}
  for file in _table_files():
    with open(file) as fh:
      t = json.load(fh)
    out.setdefault(t["device"], {}).update(t["shapes"])
  return out


def reload():
  tables.cache_clear()


def _split_k(programs_n: int, k: int, block_k: int) -> int:
  return int(max(1, min(-(-2 * NUM_SMS // programs_n), k // (4 * block_k))))


def analytic(k: int, n: int) -> dict:
  """The fallback: GEMV for M <= 2 (a 16-row tensor-core tile would be >= 7/8 padding),
  the flat GEMM up to M = 64, XLA from 65 (where the vendor GEMM's 64-row tiles stop
  wasting work); split-K so that N x K programs fill the GPU about twice."""
  return {"m1": 3, "m2": 65, "source": "analytic",
          "gemv": {"block_n": 128, "block_k": 64, "split_k": _split_k(-(-n // 128), k, 64)},
          "flat": {"block_n": 64, "block_k": 128, "split_k": _split_k(-(-n // 64), k, 128),
                   "num_stages": 2}}


def entry(k: int, n: int, kind: str | None = None) -> dict:
  kind = kind or device_kind()
  return tables().get(kind, {}).get(f"{k}x{n}") or analytic(k, n)


def choose(m: int, k: int, n: int, kind: str | None = None) -> tuple[str, dict]:
  """("gemv" | "flat" | "xla", kernel settings) for x [m, k] @ w [k, n]."""
  e = entry(k, n, kind)
  if m < e["m1"] and m <= gv.MAX_M:
    return "gemv", e["gemv"]
  if m < e["m2"]:
    return "flat", e["flat"]
  return "xla", {}


def run_linear(x, w, *, interpret=False):
  """x [M, K] @ w [K, N] with the implementation the table picks for this M."""
  which, params = choose(x.shape[0], *w.shape)
  if which == "gemv":
    return gv.gemv(x, w, interpret=interpret, **params)
  if which == "flat":
    return fg.flat_gemm(x, w, interpret=interpret, **params)
  return reference.linear(x, w)


def describe() -> str:
  kind = device_kind()
  n = len(tables().get(kind, {}))
  return f"gemv|flat|xla by M ({n} tuned shapes for {kind}, analytic otherwise)"


# ------------------------------------------------------------------------------ tuning

GEMV_CONFIGS = [{"block_n": bn, "block_k": bk, "split_k": sk, "num_stages": 3}
                for bn in (128, 256) for bk in (64, 128) for sk in (2, 4, 8)]
FLAT_CONFIGS = [{"block_n": bn, "block_k": bk, "split_k": sk, "num_stages": st}
                for bn in (64, 128) for bk in (128,) for sk in (1, 2, 4) for st in (2, 4)]
PROFILE_MS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


def _time(fn, sets, iters):
  return timing.seconds_per_call(jax.jit(fn), sets, calls=iters)


def _best(kernel, configs, sets, iters, interpret):
  best = None
  for c in configs:
    try:
      t = _time(functools.partial(kernel, interpret=interpret, **c), sets, iters)
    except Exception:  # a config the compiler refuses (shared memory, registers, ...): dropped
      continue
    if best is None or t < best[0]:
      best = (t, c)
  if best is None:
    raise ValueError(f"no configuration of {kernel.__name__} compiled for x "
                     f"{sets[0][0].shape} w {sets[0][1].shape}")
  return best


def tune_shape(k: int, n: int, ms=PROFILE_MS, *, dtype=jnp.bfloat16, iters=20, interpret=False,
               gemv_configs=None, flat_configs=None, progress=print) -> dict:
  """Profiles one [K, N] weight shape over `ms` and returns its table entry. Weights rotate
  over enough random copies that they do not sit in the L2 cache between calls."""
  key = jax.random.key(k * 7919 + n)
  n_sets = 1 if interpret else timing.sets_needed(k * n * jnp.dtype(dtype).itemsize)
  ws = [jax.random.normal(jax.random.fold_in(key, i), (k, n), jnp.float32).astype(dtype)
        for i in range(n_sets)]
  def sets(m):
    return [(jax.random.normal(jax.random.fold_in(key, 1000 * m + i), (m, k),
                               jnp.float32).astype(dtype), w) for i, w in enumerate(ws)]
  gemv_cfg = _best(gv.gemv, gemv_configs or GEMV_CONFIGS, sets(1), iters, interpret)[1]
  flat_cfg = _best(fg.flat_gemm, flat_configs or FLAT_CONFIGS, sets(min(16, max(ms))), iters,
                   interpret)[1]
  profile = []
  for i, m in enumerate(ms):
    xs = sets(m)
    row = {"m": m,
           "flat_us": _time(functools.partial(fg.flat_gemm, interpret=interpret, **flat_cfg),
                            xs, iters) * 1e6,
           "xla_us": _time(reference.linear, xs, iters) * 1e6}
    if m <= gv.MAX_M:
      row["gemv_us"] = _time(functools.partial(gv.gemv, interpret=interpret, **gemv_cfg), xs,
                             iters) * 1e6
    profile.append(row)
    progress(f"  [{k}x{n}] M={m} ({i + 1}/{len(ms)}) " + " ".join(
        f"{name}={row[name]:.1f}us" for name in ("gemv_us", "flat_us", "xla_us") if name in row))
  m1, m2 = fit_crossovers(profile)
  return {"m1": int(m1), "m2": int(m2), "source": "measured", "gemv": gemv_cfg,
          "flat": flat_cfg, "profile": profile}


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


def weight_shapes(cfg) -> dict:
  """The model's four linear-layer weight shapes (K, N), as fdjax lays them out."""
  h, d = cfg.hidden_size, cfg.head_dim
  return {"qkv": (h, (cfg.num_heads + 2 * cfg.num_kv_heads) * d),
          "o": (cfg.num_heads * d, h),
          "gate_up": (h, 2 * cfg.intermediate_size),
          "down": (cfg.intermediate_size, h)}


def write_table(entries: dict, path: str | None = None, kind: str | None = None) -> str:
  """Merges {"KxN": entry} into the device's table file and returns its path."""
  kind = kind or device_kind()
  path = path or os.path.join(TABLE_DIR, f"{slug(kind)}.json")
  table = {"device": kind, "shapes": {}}
  if os.path.exists(path):
    with open(path) as fh:
      table = json.load(fh)
  table["device"] = kind
  table["shapes"].update(entries)
  table["jax_version"] = jax.__version__
  table["date"] = time.strftime("%Y-%m-%d")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as fh:
    json.dump(table, fh, indent=1)
  reload()
  return path
