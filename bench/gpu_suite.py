"""One command for a day with a GPU: every check and benchmark, each part in its own process.

  python bench/gpu_suite.py                       # every part, on a CUDA GPU
  python bench/gpu_suite.py --parts check gemm    # some parts
  python bench/gpu_suite.py --dry-run             # every part in its CPU smoke form
  python bench/gpu_suite.py --backend tpu         # the same day on a TPU (its own parts)

Parts, in order: env (device, versions, copy bandwidth, dispatch floor), check (every kernel
against the XLA reference on the device: bench/gpu_check.py), attention, gemm (the kernel
benchmarks), tune (`fdjax tune` for the llama-2-7b and llama-3-8b presets), e2e (bench/e2e.py
at batch 1 and 8), speculative (bench/speculative.py: plain, n-gram and draft-model decoding
of the bundled model side by side, to speculative_gpu), moe (bench/moe.py: the expert
strategies on a Qwen3-30B-A3B-shaped layer with bf16, int8 and int4 experts, to moe_gpu,
moe_int8_gpu and moe_int4_gpu). A part that fails or overruns its time budget is reported and
the rest still run. Results go to bench/results/ (tuned tables to fdjax/ops/tables/), one log per part to
<results>/logs/, and a summary table to gpu_suite.{json,md}.

With --backend tpu (`python -m fdjax bench gpu --backend tpu`): env, check (every Mosaic
kernel on the chip against XLA, and timed against it: bench/tpu_check.py), tune (`fdjax
tune` picks the Mosaic GEMV / flat GEMM on a TPU and writes the generation's table), e2e
(fdjax with "auto" and with XLA only); summary to tpu_suite.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PARTS = ("env", "check", "attention", "gemm", "tune", "e2e", "speculative", "moe")
TPU_PARTS = ("env", "check", "tune", "e2e")
# Per part, on the device only: the check's many small programs compile without XLA's
# autotuning (it picks among algorithms that compute the same products; the check is not timed)
PART_XLA_FLAGS = {"check": "--xla_gpu_autotune_level=0"}
BUDGET_S = {"env": 120, "check": 420, "attention": 420, "gemm": 420, "tune": 600, "e2e": 600,
            "speculative": 600, "moe": 420}


def _commands(part, dry, results, tables, backend="gpu"):
  """The command lines of one part (full form, or the CPU smoke form with `dry`) for the
  backend's day."""
  py = [sys.executable]
  rd = ["--results-dir", results]
  b = lambda name: os.path.join(ROOT, "bench", name)
  if backend == "tpu" and part == "check":
    return [py + [b("tpu_check.py")] + (["--smoke"] if dry else []) + rd]
  if backend == "tpu" and part == "e2e" and not dry:
    return [py + [b("e2e.py"), "--models", "llama-3-8b", "--impls", "fdjax-auto", "fdjax-xla",
                  "--batch", "1", "8", "--prompt-len", "128", "--new-tokens", "128",
                  "--repeats", "3"] + rd]
  if part == "env":
    return [py + [b("gpu_suite.py"), "--env-only", "--results-dir", results]]
  if part == "check":
    return [py + [b("gpu_check.py")] + (["--smoke"] if dry else []) + rd]
  if part == "attention":
    return [py + [b("attention.py")] + (["--smoke"] if dry else []) + rd]
  if part == "gemm":
    return [py + [b("gemm.py")] + (["--smoke"] if dry else []) + rd]
  if part == "tune":
    if dry:
      return [py + ["-m", "fdjax", "tune", "--preset", "random-tiny", "--ms", "1", "2",
                    "--iters", "1", "--allow-cpu", "--out", os.path.join(tables, "dry.json")]]
    return [py + ["-m", "fdjax", "tune", "--preset", p] + (["--out", os.path.join(
        tables, "tuned.json")] if tables else []) for p in ("llama-2-7b", "llama-3-8b")]
  if part == "e2e":
    if dry:
      return [py + [b("e2e.py"), "--cpu", "--impls", "fdjax-auto", "fdjax-xla", "hf-eager",
                    "--batch", "2", "--prompt-len", "16", "--new-tokens", "4", "--repeats", "1"]
              + rd]
    return [py + [b("e2e.py"), "--models", "llama-2-7b", "--batch", "1", "8", "--prompt-len",
                  "128", "--new-tokens", "128", "--repeats", "3"] + rd]
  if part == "speculative":  # plain / n-gram / draft decoding of the bundled model
    return [py + [b("speculative.py")] + (["--quick", "--draft", "random"] if dry else [
        "--out", "speculative_gpu"]) + rd]
  if part == "moe":  # bf16 experts, then int8 / int4 ones (the quantized grouped kernel)
    if dry:
      return [py + [b("moe.py"), "--quick"] + rd,
              py + [b("moe.py"), "--quick", "--quantize", "int4"] + rd]
    return [py + [b("moe.py"), "--out", "moe_gpu"] + rd] + [
        py + [b("moe.py"), "--quantize", m, "--out", f"moe_{m}_gpu"] + rd
        for m in ("int8", "int4")]
  raise ValueError(f"unknown part {part!r}; parts: {', '.join(PARTS)}")


def _run_part(part, cmds, budget, log_path, env):
  t0 = time.perf_counter()
  status = "ok"
  with open(log_path, "w") as log:
    for cmd in cmds:
      left = budget - (time.perf_counter() - t0)
      log.write(f"$ {' '.join(cmd)}\n")
      log.flush()
      if left <= 0:
        status = "timeout"
        break
      try:
        r = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                           timeout=left)
      except subprocess.TimeoutExpired:
        status = "timeout"
        break
      if r.returncode:
        status = f"failed (exit {r.returncode})"
  seconds = time.perf_counter() - t0
  with open(log_path) as fh:
    tail = fh.read()[-1500:]
  return {"part": part, "status": status, "seconds": seconds, "log": os.path.basename(log_path),
          "tail": tail}


def env_only(results):
  """The env part: device, versions, measured copy bandwidth and dispatch floor."""
  import jax

  from bench import common
  from fdjax.tuning import timing
  info = common.environment()
  on_gpu = jax.default_backend() in ("gpu", "tpu")  # an accelerator: a 2 GB copy
  info["jaxlib_version"] = __import__("jaxlib").__version__
  for mod in ("flax", "triton", "transformers", "libtpu"):
    try:
      info[f"{mod}_version"] = __import__(mod).__version__
    except ImportError:
      pass
  try:
    info["nvidia_smi"] = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm,"
         "clocks.max.mem,power.limit", "--format=csv,noheader"], capture_output=True,
        text=True, timeout=30).stdout.strip()
  except (OSError, subprocess.TimeoutExpired):
    info["nvidia_smi"] = "unavailable"
  info["copy_gbps"] = timing.copy_bandwidth_gbps(1 << 31 if on_gpu else 1 << 24)
  info["dispatch_floor_us"] = timing.dispatch_floor() * 1e6
  info["num_devices"] = len(jax.devices())
  print(common.write_results("gpu_env", [info], ["device", "nvidia_smi", "jax_version",
                                                  "jaxlib_version", "copy_gbps",
                                                  "dispatch_floor_us"],
                             results_dir=results))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--backend", choices=["gpu", "tpu"], default="gpu")
  ap.add_argument("--parts", nargs="+", choices=PARTS)
  ap.add_argument("--dry-run", action="store_true", help="every part in its CPU smoke form")
  ap.add_argument("--budget", nargs="+", default=[], metavar="[PART=]SECONDS",
                  help="time budget of every part, or of one part (default: each part's own)")
  ap.add_argument("--extra", nargs="+", default=[], metavar="PART=ARGS",
                  help="more arguments for a part's commands, e.g. gemm='--models llama-2-7b'")
  ap.add_argument("--results-dir", help="default: bench/results")
  ap.add_argument("--tables-dir", help="where tune writes (default: fdjax/ops/tables)")
  ap.add_argument("--cache-dir", help="JAX persistent compilation cache for every part")
  ap.add_argument("--env-only", action="store_true", help=argparse.SUPPRESS)
  args = ap.parse_args()
  parts = TPU_PARTS if args.backend == "tpu" else PARTS
  args.parts = args.parts or list(parts)
  if set(args.parts) - set(parts):
    raise SystemExit(f"gpu_suite: no part {sorted(set(args.parts) - set(parts))} on the "
                     f"{args.backend}; its parts: {', '.join(parts)}")
  from bench import common
  results = os.path.abspath(args.results_dir or common.RESULTS)
  if args.env_only:
    return env_only(results)
  tables = os.path.abspath(args.tables_dir) if args.tables_dir else None
  if args.dry_run and tables is None:
    tables = os.path.join(results, "tables")
  os.makedirs(os.path.join(results, "logs"), exist_ok=True)
  if tables:
    os.makedirs(tables, exist_ok=True)
  env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
         "PYTHONUNBUFFERED": "1"}
  if args.dry_run:
    env["JAX_PLATFORMS"] = "cpu"
  if args.cache_dir:
    env.update(JAX_COMPILATION_CACHE_DIR=os.path.abspath(args.cache_dir),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  budgets = dict(BUDGET_S)
  for item in args.budget:
    part, _, secs = item.rpartition("=")
    budgets.update({part: float(secs)} if part else {p: float(secs) for p in PARTS})
  extra = {}
  for item in args.extra:
    part, _, more = item.partition("=")
    if part not in PARTS:
      raise SystemExit(f"gpu_suite: --extra names no part: {item!r}")
    extra[part] = shlex.split(more)
  summary = []
  for part in args.parts:
    cmds = [c + extra.get(part, []) for c in _commands(part, args.dry_run, results, tables,
                                                       args.backend)]
    budget = budgets[part]
    print(f"[gpu_suite] {part}: {len(cmds)} command(s), budget {budget:.0f} s", flush=True)
    part_env = env
    if part in PART_XLA_FLAGS and not args.dry_run and args.backend == "gpu":
      part_env = {**env, "XLA_FLAGS": f"{env.get('XLA_FLAGS', '')} {PART_XLA_FLAGS[part]}".strip()}
    row = _run_part(part, cmds, budget, os.path.join(results, "logs", f"{part}.log"), part_env)
    print(f"[gpu_suite] {part}: {row['status']} in {row['seconds']:.0f} s", flush=True)
    if row["status"] != "ok":
      print(row["tail"], flush=True)
    summary.append(row)
  name = ("tpu_suite" if args.backend == "tpu" else "gpu_suite") + (
      "_dry" if args.dry_run else "")
  table = common.write_results(
      name, [{k: v for k, v in r.items() if k != "tail"} for r in summary],
      ["part", "status", "seconds", "log"],
      notes="Each part's full output is in logs/<part>.log beside this file.",
      results_dir=results)
  print(table)
  with open(os.path.join(results, "logs", "tails.json"), "w") as fh:
    json.dump({r["part"]: r["tail"] for r in summary}, fh, indent=1)
  sys.exit(0 if all(r["status"] == "ok" for r in summary) else 1)


if __name__ == "__main__":
  main()
