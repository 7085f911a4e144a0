"""What every benchmark shares: the environment record, timing, the copy bandwidth, and
writing results (JSON rows + a Markdown table) under bench/results/."""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import threading
import time

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
RESULTS = os.path.join(ROOT, "bench", "results")


# The x86 flags that decide how XLA:CPU, PyTorch and llama.cpp run a decode step, as named in
# a CPU's description (the projects' machines have changed under them between runs).
CPU_FEATURES = {"avx512f": "AVX-512", "avx512_bf16": "bf16", "avx512_vnni": "VNNI",
                "amx_bf16": "AMX bf16", "amx_int8": "AMX int8"}


def cpu_description() -> str:
  """"x86_64, <model name>, <features>, N cores" from /proc/cpuinfo where there is one (the
  flags as fdjax.ops.selection reads them for its CPU rules)."""
  from fdjax.ops import selection
  model = ""
  try:
    with open("/proc/cpuinfo") as fh:
      model = next((line.partition(":")[2].strip() for line in fh
                    if line.partition(":")[0].strip() == "model name"), "")
  except OSError:
    pass
  flags = selection.cpu_flags()
  features = " ".join(name for flag, name in CPU_FEATURES.items() if flag in flags)
  parts = [platform.processor() or platform.machine(), model, features,
           f"{os.cpu_count()} cores"]
  return ", ".join(p for p in parts if p)


def device_name() -> str:
  d = jax.devices()[0]
  if d.platform == "cpu":
    return f"cpu ({cpu_description()})"
  return d.device_kind


def command() -> str:
  """The command line as run from the repository root: paths inside the checkout relative to
  it (`python -m fdjax bench ...` runs bench/*.py by absolute path), no machine path."""
  rel = lambda a: (os.path.relpath(a, ROOT) if os.path.isabs(a)
                   and os.path.abspath(a).startswith(ROOT + os.sep) else a)
  return shlex.join(["python"] + [rel(a) for a in sys.argv])  # quoted as a shell reads it


def environment() -> dict:
  env = {"device": device_name(), "jax_version": jax.__version__,
         "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
         "command": command()}
  try:
    import torch
    env["torch_version"] = torch.__version__
  except ImportError:
    pass
  return env


HANG_S = 120  # a kernel's call (compile included) still running after this is taken as hung


@contextlib.contextmanager
def watchdog(what: str, seconds: float = HANG_S, before_exit=None):
  """Ends the process (exit 3) if the block runs longer than `seconds`: a GPU kernel that
  waits on a barrier nothing completes never returns, and the suite's next parts should still
  run. `before_exit` (e.g. writing the rows so far) runs first; the hang is printed."""
  def expire():
    print(f"HUNG: {what} still running after {seconds:.0f} s; ending this process",
          flush=True)
    try:
      if before_exit is not None:
        before_exit()
    finally:
      os._exit(3)
  timer = threading.Timer(seconds, expire)
  timer.daemon = True
  timer.start()
  try:
    yield
  finally:
    timer.cancel()


def median_seconds(fn, *, warmup: int = 3, iters: int = 20) -> float:
  """Median wall time of fn() (which must block until its result is ready): for calls long
  enough that the host's round trip does not matter (a whole generate); kernels are timed
  with fdjax.tuning.timing."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def read_bandwidth_timer(iters: int = 5):
  """A function measuring the bytes per second this machine reads, the roofline of a decode
  step that reads its weights: jnp.sum over a 256 MiB float32 array (past every cache),
  median of `iters`."""
  import jax.numpy as jnp
  read = jax.jit(jnp.sum)
  big = jax.random.normal(jax.random.key(0), (64 * 2**20,), jnp.float32)
  return lambda: big.nbytes / median_seconds(lambda: read(big).block_until_ready(), warmup=2,
                                             iters=iters)


def decode_rate(generate, new_tokens: int, rows: int = 1, tries: int = 10):
  """A function timing `generate(n)` (n new tokens for each of `rows` sequences) once:
  decode tokens/s from a run of N tokens and one of 1 ((N - 1) steps a row over the
  difference, so the prefill drops out), after a warm-up at both lengths (a static cache is
  sized, and compiled, by each). Each length's time is the least of its runs, three at
  first, more (in pairs, up to `tries`) while the difference is not positive: a tiny model's
  15 steps are milliseconds, and on a busy machine the least of three runs of 1 has come out
  above that of N, a negative rate. Past `tries` runs the machine is too noisy to time it:
  an error saying so, never a rate that is not one."""
  def run(n):
    t0 = time.perf_counter()
    generate(n)
    return time.perf_counter() - t0
  run(new_tokens)
  run(1)
  def once():
    longs, shorts = [run(new_tokens) for _ in range(3)], [run(1) for _ in range(3)]
    while min(longs) <= min(shorts) and len(longs) < tries:
      longs.append(run(new_tokens))
      shorts.append(run(1))
    if min(longs) <= min(shorts):
      raise RuntimeError(
          f"timing noise: the least of {len(longs)} runs of {new_tokens} tokens "
          f"({min(longs) * 1e3:.3f} ms) is not longer than that of {len(shorts)} runs of 1 "
          f"({min(shorts) * 1e3:.3f} ms); time more new tokens or on a quieter machine")
    return rows * (new_tokens - 1) / (min(longs) - min(shorts))
  return once


def markdown_table(rows: list[dict], columns: list[str]) -> str:
  fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
  return "\n".join(lines)


def svg_bars(title: str, groups: list[str], series: dict[str, list[float]], ylabel: str) -> str:
  """A grouped bar chart as a standalone SVG (no plotting library needed)."""
  colours = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1"]
  w, h, left, bottom, top = max(640, 60 * len(groups) * max(1, len(series)) // 2), 360, 60, 90, 40
  plot_w, plot_h = w - left - 20, h - bottom - top
  vmax = max([v for vs in series.values() for v in vs if v == v] + [1e-30])
  gw = plot_w / max(len(groups), 1)
  bw = gw * 0.8 / max(len(series), 1)
  out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
         f'font-size="11"><rect width="100%" height="100%" fill="white"/>',
         f'<text x="{w / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>',
         f'<text x="14" y="{top + plot_h / 2}" transform="rotate(-90 14 {top + plot_h / 2})" '
         f'text-anchor="middle">{ylabel}</text>',
         f'<line x1="{left}" y1="{top + plot_h}" x2="{w - 20}" y2="{top + plot_h}" stroke="black"/>']
  for i in range(5):
    y = top + plot_h - plot_h * i / 4
    out.append(f'<text x="{left - 4}" y="{y + 4}" text-anchor="end">{vmax * i / 4:.3g}</text>')
  for gi, g in enumerate(groups):
    x0 = left + gi * gw + gw * 0.1
    for si, (name, vals) in enumerate(series.items()):
      v = vals[gi] if gi < len(vals) and vals[gi] == vals[gi] else 0.0
      bh = plot_h * v / vmax
      out.append(f'<rect x="{x0 + si * bw:.1f}" y="{top + plot_h - bh:.1f}" width="{bw:.1f}" '
                 f'height="{bh:.1f}" fill="{colours[si % len(colours)]}"/>')
    cx = x0 + gw * 0.4
    out.append(f'<text x="{cx:.1f}" y="{top + plot_h + 12}" text-anchor="end" '
               f'transform="rotate(-40 {cx:.1f} {top + plot_h + 12})">{g}</text>')
  for si, name in enumerate(series):
    out.append(f'<rect x="{left + 10 + 130 * si}" y="{h - 16}" width="10" height="10" '
               f'fill="{colours[si % len(colours)]}"/><text x="{left + 24 + 130 * si}" '
               f'y="{h - 7}">{name}</text>')
  return "\n".join(out + ["</svg>"])


def write_results(name: str, rows: list[dict], columns: list[str], notes: str = "",
                  results_dir: str | None = None, plot: str | None = None,
                  env: dict | None = None) -> str:
  """Writes RESULTS/NAME.json, NAME.md (and NAME.svg if `plot` is an SVG string);
  returns the Markdown table. `env`: the measuring run's environment (default: this
  process's), for results rebuilt elsewhere from a run's log."""
  results_dir = results_dir or RESULTS
  os.makedirs(results_dir, exist_ok=True)
  env = env or environment()
  rows = [{**env, **r} for r in rows]
  if plot:
    with open(os.path.join(results_dir, f"{name}.svg"), "w") as fh:
      fh.write(plot)
  with open(os.path.join(results_dir, f"{name}.json"), "w") as fh:
    json.dump({"command": env["command"], "rows": rows}, fh, indent=1)
  table = markdown_table(rows, columns)
  with open(os.path.join(results_dir, f"{name}.md"), "w") as fh:
    fh.write(f"# {name}\n\n`{env['command']}` on {env['device']}, jax {env['jax_version']}"
             + (f", torch {env['torch_version']}" if "torch_version" in env else "")
             + f", {env['date']}\n\n{table}\n" + (f"\n{notes}\n" if notes else "")
             + (f"\n![{name}]({name}.svg)\n" if plot else ""))
  return table


def llama_args(ap):
  """The size flags of the random Llama the CPU benchmarks build (random_llama): by default
  58.5M parameters, 8 layers of hidden 512 and a 32000-token vocabulary."""
  ap.add_argument("--layers", type=int, default=8)
  ap.add_argument("--hidden", type=int, default=512)
  ap.add_argument("--heads", type=int, default=8)
  ap.add_argument("--kv-heads", type=int, default=8)
  ap.add_argument("--intermediate", type=int, default=1408)
  ap.add_argument("--vocab", type=int, default=32000)


def random_llama(args):
  """transformers' LlamaForCausalLM of llama_args' size, random (torch's seed 0), eval mode."""
  import torch
  import transformers
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(
      vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
      num_hidden_layers=args.layers, num_attention_heads=args.heads,
      num_key_value_heads=args.kv_heads, max_position_embeddings=4096)
  return transformers.LlamaForCausalLM(cfg).eval()
