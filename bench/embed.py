"""Embedding throughput of fdjax (fdjax.embed, what /v1/embeddings runs) against Hugging Face
transformers (eager PyTorch: the backbone's forward on the padded batch, the last token's
state, normalized, as sentence-transformers pools a decoder), same random model, same
machine, same texts, timed in turn round by round.

  python bench/embed.py [--layers 8 --hidden 512 ...] [--texts 32] [--min-len 32]
      [--max-len 256] [--dtypes float32 bfloat16] [--iters 5]
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import fdjax  # noqa: E402
from bench import common  # noqa: E402
from bench.decode import interleaved  # noqa: E402


def hf_embed(hf, prompts):
  """transformers' embeddings of `prompts` [N, H]: one padded batch (right padding, the
  attention mask), each row's last real token's state, normalized."""
  import torch
  width = max(len(p) for p in prompts)
  ids = torch.zeros((len(prompts), width), dtype=torch.long)
  mask = torch.zeros((len(prompts), width), dtype=torch.long)
  for i, p in enumerate(prompts):
    ids[i, :len(p)] = torch.tensor(p)
    mask[i, :len(p)] = 1
  with torch.no_grad():
    h = hf.model(input_ids=ids, attention_mask=mask).last_hidden_state
    last = h[torch.arange(len(prompts)), mask.sum(1) - 1].float()
    return torch.nn.functional.normalize(last, dim=-1).numpy()


def rate(fn, tokens: int):
  """A function returning tokens per second of one call of fn."""
  def once():
    t = time.perf_counter()
    fn()
    return tokens / (time.perf_counter() - t)
  return once


def main():
  ap = argparse.ArgumentParser()
  common.llama_args(ap)
  ap.add_argument("--texts", type=int, nargs="+", default=[1, 32])
  ap.add_argument("--min-len", type=int, default=32)
  ap.add_argument("--max-len", type=int, default=256)
  ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                  choices=["float32", "bfloat16"])
  ap.add_argument("--iters", type=int, default=5)
  ap.add_argument("--name", default="embed_cpu")
  ap.add_argument("--results-dir")
  args = ap.parse_args()

  import torch
  hf32 = common.random_llama(args)
  params = sum(p.numel() for p in hf32.parameters())
  rows = []
  with tempfile.TemporaryDirectory() as d:
    hf32.save_pretrained(d)
    for dtype in args.dtypes:
      hf = hf32 if dtype == "float32" else copy.deepcopy(hf32).to(torch.bfloat16)
      model = fdjax.load_pretrained(d, dtype=None if dtype == "float32" else dtype)
      for n in args.texts:
        rng = np.random.default_rng(n)
        prompts = [rng.integers(1, args.vocab, rng.integers(args.min_len, args.max_len + 1))
                   .tolist() for _ in range(n)]
        tokens = sum(len(p) for p in prompts)
        ours = fdjax.embed(model, prompts)  # compiles
        theirs = hf_embed(hf, prompts)
        err = float(np.max(np.abs(ours - theirs)))
        tps = interleaved({"fdjax": rate(lambda: fdjax.embed(model, prompts), tokens),
                           "hf-eager": rate(lambda: hf_embed(hf, prompts), tokens)},
                          args.iters)
        ratio = [a / b for a, b in zip(tps["fdjax"], tps["hf-eager"])]
        for impl in ("fdjax", "hf-eager"):
          rows.append({"impl": impl, "dtype": dtype, "params_m": round(params / 1e6, 1),
                       "texts": n, "tokens": tokens, "tokens_per_s": float(np.median(tps[impl])),
                       "texts_per_s": float(np.median(tps[impl])) * n / tokens,
                       "speedup_vs_hf": float(np.median(ratio)) if impl == "fdjax" else 1.0,
                       "min_speedup_vs_hf": float(np.min(ratio)) if impl == "fdjax" else None,
                       "max_abs_diff_vs_hf": err if impl == "fdjax" else None})
        print(rows[-2], file=sys.stderr, flush=True)
  notes = (f"A random Llama ({args.layers} layers, hidden {args.hidden}, vocabulary {args.vocab}: "
           f"{params / 1e6:.1f}M parameters); N texts of {args.min_len} to {args.max_len} tokens "
           "(uniform), each embedded as its last token's final state, normalized. fdjax: "
           "fdjax.embed (the prompts sorted by length into batches of up to 16, each one causal "
           "forward where it fits a chunk of 256 tokens, else prefilled in chunks into a cache "
           "of its own); HF eager: the backbone's forward on the "
           "whole right-padded batch with its attention mask, in PyTorch. The two are timed in "
           "turn, --iters rounds; tokens/s are medians, speedup_vs_hf the median of the rounds' "
           "ratios (min: the lowest); max_abs_diff_vs_hf: the largest difference of an "
           "embedding's entry between the two (bfloat16: each in its own bfloat16).")
  print(common.write_results(args.name, rows,
                             ["impl", "dtype", "params_m", "texts", "tokens", "tokens_per_s",
                              "texts_per_s", "speedup_vs_hf", "min_speedup_vs_hf",
                              "max_abs_diff_vs_hf"], notes, results_dir=args.results_dir))


if __name__ == "__main__":
  main()
