"""How many concurrent sequences of mixed lengths fit in a fixed KV-cache memory budget:
a contiguous cache (every sequence reserves the model's whole context) against fdjax's paged
cache (fdjax.engine.paging.PagePool: pages as a sequence needs them), with and without a shared
system prompt served from the prefix cache.

  python bench/paged_memory.py [--budget-gib 40] [--model llama-2-7b]

Sequences are drawn (seeded) until the next one no longer fits; the count is the number
admitted. The pool's own bookkeeping decides what fits, so this measures the allocator that
generate and the server use, not a formula.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from fdjax.engine import paging  # noqa: E402
from models import presets

WORKLOADS = {
    # name: (prompt lengths, output lengths) samplers
    "chat (prompt ~lognormal median 300, output 50-500)":
        lambda rng: (int(np.clip(rng.lognormal(np.log(300), 0.8), 8, 3000)),
                     int(rng.integers(50, 501))),
    "short (prompt 16-128, output 16-128)":
        lambda rng: (int(rng.integers(16, 129)), int(rng.integers(16, 129))),
    "long (prompt 1000-3000, output 200-1000)":
        lambda rng: (int(rng.integers(1000, 3001)), int(rng.integers(200, 1001))),
}


def admitted(pool_pages, page_size, workload, context, seed, system=0, shared=True):
  """Sequences admitted by a PagePool of pool_pages pages before one does not fit. With
  `system`, every prompt starts with a system prompt of that many tokens: the same one
  (`shared`: after a first request, served from the prefix cache) or each its own."""
  rng = np.random.default_rng(seed)
  pool = paging.PagePool(pool_pages, page_size)
  prefix = list(range(10 ** 6, 10 ** 6 + system))
  if system and shared:  # one finished request leaves the system prompt in the prefix cache
    pages, _ = pool.allocate(prefix + [1], system + 1)
    pool.finish(pages, prefix + [1])
  count = 0
  while True:
    prompt_len, out_len = workload(rng)
    prompt_len = min(prompt_len, context - out_len - system)
    if system and not shared:
      prefix = rng.integers(0, 32000, system).tolist()
    prompt = prefix + rng.integers(0, 32000, prompt_len).tolist()
    try:
      pool.allocate(prompt, len(prompt) + out_len)
    except paging.PoolExhausted:
      return count
    count += 1


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--budget-gib", type=float, default=40.0)
  ap.add_argument("--model", default="llama-2-7b")
  ap.add_argument("--system-prompt", type=int, default=512)
  ap.add_argument("--seeds", type=int, default=5)
  ap.add_argument("--results-dir")
  args = ap.parse_args()
  cfg = presets.get(args.model)
  token_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2  # K and V, bf16
  budget_tokens = int(args.budget_gib * 2 ** 30 // token_bytes)
  context = cfg.max_position_embeddings
  rows = []
  for name, workload in WORKLOADS.items():
    contiguous = budget_tokens // context
    row = {"workload": name, "model": args.model, "budget_gib": args.budget_gib,
           "kv_bytes_per_token": token_bytes, "contiguous": contiguous}
    for key, page_size, system, shared in [
        ("paged_16", 16, 0, True), ("paged_64", 64, 0, True),
        ("system_paged", 16, args.system_prompt, False),
        ("system_prefix_cached", 16, args.system_prompt, True)]:
      counts = [admitted(budget_tokens // page_size, page_size, workload, context, seed,
                         system, shared) for seed in range(args.seeds)]
      row[key] = float(np.median(counts))
      row[key + "_vs_contiguous"] = row[key] / max(contiguous, 1)
    rows.append(row)
    print(row, flush=True)
  cols = ["workload", "contiguous", "paged_16", "paged_16_vs_contiguous", "paged_64",
          "paged_64_vs_contiguous", "system_paged", "system_prefix_cached",
          "system_prefix_cached_vs_contiguous"]
  notes = (f"{args.model}: {token_bytes // 1024} KiB of bf16 K and V per token, "
           f"{args.budget_gib:g} GiB of KV cache = {budget_tokens} tokens; a contiguous "
           f"cache reserves the whole {context}-token context per sequence. Paged counts are "
           f"the median over {args.seeds} seeds of sequences admitted before the next did not "
           f"fit. paged_16 / paged_64: pages of 16 / 64 tokens. system_*: every prompt starts "
           f"with a {args.system_prompt}-token system prompt, each its own copy (system_paged) "
           "or the same one held once in the prefix cache (system_prefix_cached); pages of "
           "16.")
  print(common.write_results("paged_memory", rows, cols, notes, results_dir=args.results_dir))


if __name__ == "__main__":
  main()
