"""How long `fdjax serve` takes to start: a first start (empty compilation cache) and a
second (the cache the first filled), each with and without --warmup.

  python bench/serve_startup.py            # the bundled model at its defaults (committed)
  python bench/serve_startup.py --quick    # a smaller engine (a smoke run)

Per start: seconds until the port answers, until /health is 200 (after the warm-up, with
--warmup), and until a first completion (8 tokens) is answered, from launching the process;
and how many programs the cache holds after it. Each start is its own `python -m fdjax serve`
process on 127.0.0.1; the cache is a fresh directory per pair of starts.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import common  # noqa: E402

COLUMNS = ["start", "warmup", "port_open_s", "health_ok_s", "first_answer_s", "cached_programs"]


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def start_once(cache: str, warmup: bool, extra: list[str], timeout: float = 900.0) -> dict:
  import httpx2 as httpx
  import openai
  port = _free_port()
  cmd = [sys.executable, "-m", "fdjax", "serve", "--port", str(port), "--compile-cache", cache,
         *(["--warmup"] if warmup else []), *extra]
  env = {**os.environ, "PYTHONPATH": ROOT}
  t0 = time.perf_counter()
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  port_open = health = None
  try:
    while time.perf_counter() - t0 < timeout:
      if proc.poll() is not None:
        raise RuntimeError(f"fdjax serve exited with {proc.returncode}")
      try:
        r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
        port_open = port_open or time.perf_counter() - t0
        if r.status_code == 200:
          health = time.perf_counter() - t0
          break
      except httpx.TransportError:
        pass
      time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                           max_retries=0, timeout=timeout)
    client.completions.create(model="fdjax-default", prompt="import os\n", max_tokens=8,
                              temperature=0)
    answer = time.perf_counter() - t0
  finally:
    proc.terminate()
    proc.wait(60)
  return {"port_open_s": round(port_open, 2), "health_ok_s": round(health, 2),
          "first_answer_s": round(answer, 2), "cached_programs": len(os.listdir(cache))}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="a small engine (max-batch 2, context "
                 "64): a smoke run")
  p.add_argument("--out", default=None, help="results directory (default bench/results)")
  args = p.parse_args()
  extra = ["--max-batch", "2", "--max-model-len", "64", "--prefill-chunk", "16"] \
      if args.quick else []
  rows = []
  for warmup in (False, True):
    with tempfile.TemporaryDirectory() as cache:
      for start in ("first", "second"):
        row = {"start": start, "warmup": warmup, **start_once(cache, warmup, extra)}
        print(row, flush=True)
        rows.append(row)
  name = "serve_startup_quick" if args.quick else "serve_startup"
  print(common.write_results(name, rows, COLUMNS, notes=(
      "Seconds from launching `python -m fdjax serve` (the bundled model; "
      + ("a small engine" if args.quick else "default engine settings")
      + ") until the port answers, /health is 200, and a first 8-token completion is "
      "answered; a first start with an empty compilation cache, then a second with the cache "
      "the first filled."), results_dir=args.out))


if __name__ == "__main__":
  main()
