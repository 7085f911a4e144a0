"""Serving under load: Poisson arrivals against `fdjax serve` and against Hugging Face's own
server (`transformers serve --continuous-batching`) on the same model and machine, both
driven over HTTP with the official openai client (streamed completions, greedy).

  python bench/serve.py                      # the CPU run whose results are committed
  python bench/serve.py --quick --baseline none   # a smoke run (the tests use it)

The model: a random-weight Llama checkpoint with a Llama-3-style byte-level BPE tokenizer
(bench/tiny_llama3.py; width 256, 4 layers, GQA 4:2, 512 tokens, no EOS so every request
writes exactly its output length), unless --model names one. Workload per rate: --requests
arrivals with exponential gaps (Poisson), prompt lengths uniform in --prompt-len tokens
(slices of standard-library source), output lengths uniform in --output-len, same seed for
every server. Reported per server and rate: output tokens/s over the run (first send to last
token), time to first token p50/p99, inter-token latency p50/p99 (each request's (last token
- first token) / (tokens - 1): the time per output token after the first), the p99 gap
between streamed chunks, and how many greedy texts equal fdjax's.

Each server runs in its own process, is warmed up first (fdjax: `--warmup` compiles every
shape; transformers: a few requests), then every rate runs in turn. If `transformers serve`
cannot start here (it needs `transformers[serving]` and accelerate: `pip install -e
".[bench]"`), the baseline is transformers `generate` called request by request in arrival
order (no batching), timed the same way; its texts are decoded as the servers answer, without
special tokens.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import common  # noqa: E402

COLUMNS = ["server", "rate_rps", "requests", "duration_s", "output_tokens_per_s", "ttft_p50_ms",
           "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "chunk_gap_p99_ms", "no_text_streamed",
           "same_text_as_fdjax", "same_but_trailing_fffd", "compiles_during_run"]


def _bare(text):
  """A text without its trailing U+FFFD: what decoding gives for bytes at the end that never
  complete a character (a byte-level model's tokens can stop inside one)."""
  return None if text is None else text.rstrip("\ufffd")


# --------------------------------------------------------------------------- workload

def workload(tokenizer_path, rates, n, prompt_len, output_len, seed):
  """{rate: [(arrival s, prompt text, max_tokens)]}: Poisson arrivals, random lengths."""
  from tokenizers import Tokenizer

  from bench.tiny_llama3 import _corpus
  tok = Tokenizer.from_file(os.path.join(tokenizer_path, "tokenizer.json"))
  ids = tok.encode("\n".join(_corpus()), add_special_tokens=False).ids
  rng = np.random.default_rng(seed)
  out = {}
  for rate in rates:
    arrivals = np.cumsum(rng.exponential(1.0 / rate, n))
    arrivals -= arrivals[0]
    reqs = []
    for t in arrivals:
      length = int(rng.integers(prompt_len[0], prompt_len[1] + 1))
      start = int(rng.integers(0, len(ids) - length))
      reqs.append((float(t), tok.decode(ids[start:start + length]),
                   int(rng.integers(output_len[0], output_len[1] + 1))))
    out[rate] = reqs
  return out


def _summary(name, rate, results, t_start):
  ok = [r for r in results if r["error"] is None]
  end = max(r["end"] for r in ok) if ok else t_start
  tokens = sum(r["tokens"] for r in ok)
  # A request whose text is only incomplete characters (a random model can write those)
  # streams nothing before its end: it counts in the throughput, not in the latencies.
  ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
  itl = [r["itl"] for r in ok if r["itl"] is not None]
  gaps = [g for r in ok for g in r["gaps"]]
  pct = lambda xs, q: float(np.percentile(xs, q)) * 1e3 if xs else float("nan")
  row = {"server": name, "rate_rps": rate, "requests": len(results), "failed":
         len(results) - len(ok), "no_text_streamed": len(ok) - len(ttft),
         "duration_s": end - t_start,
         "output_tokens_per_s": tokens / (end - t_start) if end > t_start else 0.0,
         "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99), "itl_p50_ms": pct(itl, 50),
         "itl_p99_ms": pct(itl, 99), "chunk_gap_p99_ms": pct(gaps, 99)}
  return row, [r["text"] for r in results]


# ---------------------------------------------------------------- over HTTP (openai)

async def _one(client, model, prompt, max_tokens, t_start, arrival):
  await asyncio.sleep(max(0.0, t_start + arrival - time.perf_counter()))
  sent = time.perf_counter()
  times, text, tokens = [], "", None
  try:
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                             temperature=0, stream=True,
                                             stream_options={"include_usage": True})
    async for chunk in stream:
      if chunk.choices and chunk.choices[0].text:
        times.append(time.perf_counter())
        text += chunk.choices[0].text
      if chunk.usage:
        tokens = chunk.usage.completion_tokens
  except Exception as e:  # noqa: BLE001 - a failed request is counted, not fatal
    return dict(error=f"{type(e).__name__}: {e}", text=None, end=time.perf_counter())
  tokens = tokens or max_tokens  # no EOS: every request writes max_tokens
  return dict(error=None, text=text, tokens=tokens, ttft=times[0] - sent if times else None,
              itl=(times[-1] - times[0]) / (tokens - 1) if tokens > 1 and len(times) > 1
              else None,
              gaps=list(np.diff(times)), end=times[-1] if times else time.perf_counter())


async def _drive(url, model, reqs):
  import openai
  client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0,
                              timeout=600)
  t_start = time.perf_counter() + 0.2
  results = await asyncio.gather(*(_one(client, model, p, m, t_start, a) for a, p, m in reqs))
  await client.close()
  return list(results), t_start


def _wait_up(url, proc, timeout):
  import httpx2
  deadline = time.time() + timeout
  while time.time() < deadline:
    if proc.poll() is not None:
      raise RuntimeError(f"the server exited ({proc.returncode})")
    try:
      if httpx2.get(url + "/v1/models", timeout=2).status_code == 200:
        return
    except httpx2.TransportError:
      pass
    time.sleep(0.5)
  raise RuntimeError("the server did not come up")


def _traced(url):
  """fdjax serve's fdjax_traced_programs gauge, None for a server without it."""
  import httpx2
  for line in httpx2.get(url + "/metrics", timeout=10).text.splitlines():
    if line.startswith("fdjax_traced_programs "):
      return int(float(line.split()[1]))
  return None


def run_http(name, cmd, url, model, work, warm, log_file):
  """Starts a server process, warms it up, runs every rate; the rows and texts."""
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  with open(log_file, "w") as log:
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
      t0 = time.time()
      _wait_up(url, proc, 900)
      asyncio.run(_drive(url, model, [(0.0, p, m) for _, p, m in warm]))
      print(f"[{name}] up and warm in {time.time() - t0:.0f} s", flush=True)
      rows, texts = [], {}
      traced = _traced(url)
      for rate, reqs in work.items():
        results, t_start = asyncio.run(_drive(url, model, reqs))
        row, texts[rate] = _summary(name, rate, results, t_start)
        if traced is not None:  # fdjax: programs compiled while this rate ran
          row["compiles_during_run"], traced = _traced(url) - traced, _traced(url)
        rows.append(row)
        print(f"[{name}] rate {rate}: {row['output_tokens_per_s']:.0f} tok/s, ttft p50 "
              f"{row['ttft_p50_ms']:.0f} ms, itl p50 {row['itl_p50_ms']:.1f} ms "
              f"({row['failed']} failed)", flush=True)
      return rows, texts
    finally:
      proc.terminate()
      try:
        proc.wait(60)
      except subprocess.TimeoutExpired:
        proc.kill()


# ------------------------------------------------------- request by request (generate)

def run_generate(path, work, warm):
  """transformers generate, one request at a time in arrival order (the fallback baseline)."""
  import torch
  import transformers
  from transformers.generation.streamers import BaseStreamer
  torch.set_num_threads(os.cpu_count())
  tok = transformers.AutoTokenizer.from_pretrained(path)
  model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

  class Clock(BaseStreamer):
    def __init__(self):
      self.times, self.prompt_seen = [], False

    def put(self, value):
      if self.prompt_seen:
        self.times.append(time.perf_counter())
      self.prompt_seen = True

    def end(self):
      pass

  def generate(prompt, max_tokens, clock=None):
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
      out = model.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                           do_sample=False, streamer=clock, pad_token_id=0)
    # as the servers answer (the OpenAI API's text leaves special tokens out)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

  for _, p, m in warm:
    generate(p, m)
  rows, texts = [], {}
  for rate, reqs in work.items():
    t_start, results = time.perf_counter(), []
    for arrival, prompt, max_tokens in reqs:
      time.sleep(max(0.0, t_start + arrival - time.perf_counter()))
      clock = Clock()
      text = generate(prompt, max_tokens, clock)
      t = clock.times
      results.append(dict(error=None, text=text, tokens=len(t), ttft=t[0] - t_start - arrival,
                          itl=(t[-1] - t[0]) / (len(t) - 1) if len(t) > 1 else None,
                          gaps=list(np.diff(t)), end=t[-1]))
    row, texts[rate] = _summary("transformers generate (one by one)", rate, results, t_start)
    rows.append(row)
  return rows, texts


# -------------------------------------------------------------------------------- main

def _free_port():
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _transformers_serve():
  """The `transformers` command if its server can run here (its packages installed)."""
  exe = os.path.join(os.path.dirname(sys.executable), "transformers")
  try:
    from transformers.utils.import_utils import is_accelerate_available, is_serve_available
    ok = is_serve_available() and is_accelerate_available()
  except ImportError:
    ok = False
  return exe if ok and os.path.exists(exe) else None


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", help="a Llama checkpoint with tokenizer.json (default: a tiny "
                  "random one built by bench/tiny_llama3.py)")
  ap.add_argument("--rates", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0, 16.0],
                  help="arrival rates, requests per second")
  ap.add_argument("--requests", type=int, default=32, help="requests per rate")
  ap.add_argument("--prompt-len", type=int, nargs=2, default=[16, 128])
  ap.add_argument("--output-len", type=int, nargs=2, default=[16, 64])
  ap.add_argument("--max-batch", type=int, default=16)
  ap.add_argument("--baseline", choices=["auto", "transformers-serve", "generate", "none"],
                  default="auto")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--quick", action="store_true", help="a smoke run: a tiny model, one rate")
  ap.add_argument("--results-dir", default=common.RESULTS)
  args = ap.parse_args(argv)
  if args.quick:
    args.rates, args.requests, args.prompt_len, args.output_len = [4.0], 6, [4, 16], [2, 6]
  tmp = tempfile.mkdtemp(prefix="fdjax-serve-bench-")
  path = args.model
  if path is None:
    from bench.tiny_llama3 import build
    path = build(os.path.join(tmp, "model"), hidden=64 if args.quick else 256,
                 layers=2 if args.quick else 4, eos=False)
  name = "serve_cpu_quick" if args.quick else "serve_cpu"
  work = workload(path, args.rates, args.requests, args.prompt_len, args.output_len, args.seed)
  warm = [w for reqs in work.values() for w in reqs[:2]]
  max_len = args.prompt_len[1] + args.output_len[1] + 16

  port = _free_port()
  fdjax_cmd = [sys.executable, "-m", "fdjax", "serve", "--model", path, "--port", str(port),
               "--served-model-name", "bench", "--max-batch", str(args.max_batch),
               "--max-queue", str(args.requests * 2), "--max-model-len", str(max_len),
               "--log-level", "warning"] + ([] if args.quick else ["--warmup"])
  rows, texts = run_http("fdjax serve", fdjax_cmd, f"http://127.0.0.1:{port}", "bench", work,
                         warm, os.path.join(tmp, "fdjax.log"))

  baseline = args.baseline
  if baseline == "auto":
    baseline = "transformers-serve" if _transformers_serve() else "generate"
    if baseline == "generate":
      print("transformers serve cannot run here (it needs transformers[serving] and "
            "accelerate: pip install -e '.[bench]'); the baseline is transformers generate, "
            "request by request", flush=True)
  other = None
  if baseline == "transformers-serve":
    port = _free_port()
    cmd = [_transformers_serve() or "transformers", "serve", path, "--continuous-batching",
           "--device", "cpu", "--port", str(port), "--host", "127.0.0.1"]
    other = run_http("transformers serve", cmd, f"http://127.0.0.1:{port}", path, work, warm,
                     os.path.join(tmp, "transformers.log"))
  elif baseline == "generate":
    other = run_generate(path, work, warm)
  if other:
    rows += other[0]
  for row in rows:
    mine = texts[row["rate_rps"]]
    theirs = (texts if row["server"] == "fdjax serve" else other[1])[row["rate_rps"]]
    row["same_text_as_fdjax"] = f"{sum(a == b for a, b in zip(mine, theirs))}/{len(mine)}"
    row["same_but_trailing_fffd"] = (f"{sum(_bare(a) == _bare(b) for a, b in zip(mine, theirs))}"
                                     f"/{len(mine)}")

  groups = [f"{r:g} req/s" for r in args.rates]
  servers = list(dict.fromkeys(r["server"] for r in rows))
  series = {s: [r["output_tokens_per_s"] for r in rows if r["server"] == s] for s in servers}
  plot = common.svg_bars("Output tokens/s under Poisson arrivals (CPU, tiny random Llama)",
                         groups, series, "output tokens / s")
  notes = (f"CPU only ({common.device_name()}), a tiny random-weight Llama (bench/tiny_llama3.py"
           f"{'' if args.model else ': width 256, 4 layers'}), float32, greedy. "
           f"{args.requests} requests per rate, Poisson arrivals; prompt lengths uniform in "
           f"{args.prompt_len} tokens, output lengths uniform in {args.output_len} tokens. "
           "fdjax serve: --max-batch "
           f"{args.max_batch}, pages of 16, 8 decode steps per host round trip when nothing "
           "waits, every shape compiled before the run (--warmup). transformers serve: "
           "--continuous-batching on the CPU (PyTorch eager, its defaults). ttft: from sending "
           "to the first streamed text; itl: per request, (last token - first token) / "
           "(tokens - 1); chunk_gap: the time between streamed chunks (fdjax sends up to 8 "
           "tokens per chunk when nothing waits); no_text_streamed: requests whose text was only "
           "incomplete characters until the end (left out of the latencies); same_text_as_fdjax: "
           "greedy texts equal to fdjax's (fdjax's text is its tokens decoded without special "
           "tokens); same_but_trailing_fffd: equal once each text's trailing U+FFFD (bytes "
           "at the end that never complete a character, which the random byte-level model "
           "often writes) are left out; compiles_during_run: programs fdjax traced while the "
           "rate ran. Small-model CPU numbers: they measure the "
           "engines' scheduling and host overheads, not accelerator kernels.")
  print(common.write_results(name, rows, COLUMNS, notes, args.results_dir, plot))


if __name__ == "__main__":
  main()
