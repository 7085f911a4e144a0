"""Speculative decoding against plain decoding, side by side in one run: the bundled model as
the target, drafting by n-gram lookup and by a small draft model trained with `fdjax train`
on the same data (the Python standard library's sources, byte-level).

  python bench/speculative.py                 # the committed table (trains the draft if absent)
  python bench/speculative.py --quick         # a smoke run (repeating code, greedy, batch 1)

Prompts: code that repeats itself (a function, then call sites that follow one pattern) and
code that does not (openings of definitions). Greedy and sampled (temperature 0.8, top-k 40)
decoding; batch 1 and 4. Per row: decode tokens/s (median of --iters calls after a warm-up),
the speed-up over plain decoding in the same setting, the drafts' acceptance rate, and the
mean tokens a round yields (accepted drafts + 1; plain decoding: 1).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import common  # noqa: E402

COLUMNS = ["prompts", "sampling", "batch", "method", "decode_tokens_per_s", "speedup",
           "acceptance", "tokens_per_round", "new_tokens"]

DRAFT_TRAIN = ["--data", "stdlib", "--steps", "800", "--batch", "16", "--seq-len", "256",
               "--lr", "0.003", "--warmup", "80", "--layers", "1", "--hidden", "128", "--heads",
               "2", "--intermediate", "352", "--pe", "cope"]

REPEATING = [
    "def parse_header(line, sep=':'):\n    key, _, value = line.partition(sep)\n"
    "    return key.strip().lower(), value.strip()\n\nheaders = {}\n"
    "key, value = parse_header(lines[0])\nheaders[key] = value\n"
    "key, value = parse_header(lines[1])\nheaders[key] = value\n"
    "key, value = parse_header(lines[2])\nheaders[key] = value\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n"
    "    def __add__(self, other):\n        return Point(self.x + other.x, self.y + other.y)\n\n"
    "    def __sub__(self, other):\n        return Point(self.x - other.x, self.y - other.y)\n\n"
    "    def __mul__(self, other):\n",
    "import os\n\ndef read(path):\n    with open(os.path.join(ROOT, path)) as f:\n"
    "        return f.read()\n\nconfig = read('config.txt')\nnames = read('names.txt')\n"
    "values = read('values.txt')\nheader = read('header.txt')\n",
    "    if self.verbose:\n        self.log('start')\n    self.step()\n"
    "    if self.verbose:\n        self.log('step')\n    self.step()\n"
    "    if self.verbose:\n        self.log('stop')\n",
]
FRESH = ["def fibonacci(n):\n", "class HTTPServer(socketserver.TCPServer):\n",
         "import collections\n\n\ndef most_common_words(text, n=10):\n",
         "    def __repr__(self):\n"]


def _draft(path: str) -> str:
  """The draft checkpoint at `path`, trained there first when it is not."""
  if not os.path.exists(os.path.join(path, "config.json")):
    print(f"training the draft model into {path} ...", flush=True)
    subprocess.run([sys.executable, "-m", "fdjax", "train", *DRAFT_TRAIN, "--out", path],
                   check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
  return path


def _measure(model, prompts, spec, temperature, max_new, iters):
  import fdjax
  kw = dict(max_new_tokens=max_new, temperature=temperature, top_k=40 if temperature else None,
            speculative=spec)
  fdjax.generate(model, prompts, seed=0, **kw)  # compile
  runs = [fdjax.generate(model, prompts, seed=i, **kw) for i in range(iters)]
  tps = statistics.median(r.decode_tokens_per_s for r in runs)
  drafted = sum(r.drafted for r in runs)
  produced = sum(r.new_tokens - len(r.tokens) for r in runs)
  rounds = sum(r.decode_steps for r in runs) * len(prompts)
  return dict(decode_tokens_per_s=tps, acceptance=sum(r.accepted for r in runs) / drafted
              if drafted else "", tokens_per_round=produced / rounds if rounds else 0.0,
              new_tokens=statistics.median(r.new_tokens for r in runs))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--draft", default=os.path.join(os.path.expanduser("~"), ".cache", "fdjax",
                                                  "bench-draft-model"),
                  help="the draft checkpoint (trained there with fdjax train when absent), or "
                  "'random': an untrained 1-layer model (a smoke run)")
  ap.add_argument("--k", type=int, default=4)
  ap.add_argument("--max-new-tokens", type=int, default=128)
  ap.add_argument("--iters", type=int, default=5)
  ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--out", default="speculative")
  ap.add_argument("--results-dir", default=None)
  args = ap.parse_args(argv)
  if args.quick:
    args.max_new_tokens, args.iters, args.batch = 24, 1, [1]

  from fdjax.engine import speculative
  from fdjax.io import loading
  target = loading.load(None)
  tok = target.tokenizer
  if args.draft == "random":
    import dataclasses

    from flax import nnx

    from models import Transformer
    small = dataclasses.replace(target.model.config, num_layers=1, hidden_size=64,
                                intermediate_size=128, num_heads=2, num_kv_heads=2, head_dim=32)
    draft = target._replace(model=Transformer(small, rngs=nnx.Rngs(0)))
  else:
    draft = loading.load(_draft(args.draft))
  methods = {"plain": None, f"ngram k={args.k} n=3": {"method": "ngram", "k": args.k, "n": 3},
             f"draft k={args.k}": {"method": "draft", "k": args.k, "model": draft.model}}
  speculative.check_draft(speculative.parse(methods[f"draft k={args.k}"]), target.model, tok,
                          draft.tokenizer)
  rows = []
  t0 = time.perf_counter()
  prompt_sets = (("repeating code", REPEATING), ("fresh code", FRESH))
  for name, texts in prompt_sets[:1] if args.quick else prompt_sets:
    for temperature in (0.0,) if args.quick else (0.0, 0.8):
      for batch in args.batch:
        prompts = [tok.encode(texts[i % len(texts)]) for i in range(batch)]
        base = None
        for method, spec in methods.items():
          r = _measure(target.model, prompts, spec, temperature, args.max_new_tokens, args.iters)
          base = base or r["decode_tokens_per_s"]
          rows.append(dict(prompts=name, sampling="greedy" if temperature == 0 else
                           "T=0.8 top-k 40", batch=batch, method=method,
                           speedup=r["decode_tokens_per_s"] / base, **r))
          print(json.dumps(rows[-1]), flush=True)
  size = lambda m: f"{speculative.param_count(m) / 1e6:.2f}M"
  notes = (f"Target: the bundled model ({size(target.model)} parameters). Draft: "
           f"`python -m fdjax train {' '.join(DRAFT_TRAIN)}` ({size(draft.model)} "
           f"parameters), the same data. {args.max_new_tokens} new tokens a row, median of "
           f"{args.iters} calls after a warm-up (seeds 0..{args.iters - 1}); tokens/s count the "
           f"decode phase (after the prompt's first token); speedup: over `plain` in the same "
           f"prompts / sampling / batch. acceptance: drafts kept / drafts proposed; "
           f"tokens_per_round: tokens a verification round yields per row. Whole run: "
           f"{time.perf_counter() - t0:.0f} s.")
  print(common.write_results(args.out, rows, COLUMNS, notes=notes,
                            results_dir=args.results_dir))


if __name__ == "__main__":
  main()
