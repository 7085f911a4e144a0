"""What every benchmark shares: the environment record, timing, the copy bandwidth, and
writing results (JSON rows + a Markdown table) under bench/results/."""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def device_name() -> str:
  d = jax.devices()[0]
  if d.platform == "cpu":
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
  return d.device_kind


def environment() -> dict:
  env = {"device": device_name(), "jax_version": jax.__version__,
         "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
         "command": " ".join(["python"] + sys.argv)}
  try:
    import torch
    env["torch_version"] = torch.__version__
  except ImportError:
    pass
  return env


def median_seconds(fn, *, warmup: int = 3, iters: int = 20) -> float:
  """Median wall time of fn() (which must block until its result is ready)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def copy_bandwidth_gbps(nbytes: int = 1 << 28) -> float:
  """Measured device-to-device copy bandwidth (read + write bytes / time), GB/s."""
  x = jax.random.normal(jax.random.key(0), (nbytes // 4,), jnp.float32)
  copy = jax.jit(lambda a: a + 1.0)
  t = median_seconds(lambda: copy(x).block_until_ready(), warmup=3, iters=10)
  return 2 * nbytes / t / 1e9


def markdown_table(rows: list[dict], columns: list[str]) -> str:
  fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
  return "\n".join(lines)


def write_results(name: str, rows: list[dict], columns: list[str], notes: str = "") -> str:
  """Writes bench/results/NAME.json and NAME.md; returns the Markdown table."""
  os.makedirs(RESULTS, exist_ok=True)
  env = environment()
  rows = [{**env, **r} for r in rows]
  with open(os.path.join(RESULTS, f"{name}.json"), "w") as fh:
    json.dump({"command": env["command"], "rows": rows}, fh, indent=1)
  table = markdown_table(rows, columns)
  with open(os.path.join(RESULTS, f"{name}.md"), "w") as fh:
    fh.write(f"# {name}\n\n`{env['command']}` on {env['device']}, jax {env['jax_version']}"
             + (f", torch {env['torch_version']}" if "torch_version" in env else "")
             + f", {env['date']}\n\n{table}\n" + (f"\n{notes}\n" if notes else ""))
  return table
