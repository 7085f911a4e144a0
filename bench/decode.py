"""Decode speed of fdjax against Hugging Face transformers (eager PyTorch), same random
model, same machine, one run.

  python bench/decode.py [--layers 8 --hidden 512 ...] [--batch 1 4] [--new-tokens 64]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import fdjax  # noqa: E402
from bench import common  # noqa: E402


def hf_decode_tokens_per_s(hf, prompts, new_tokens, iters):
  """Decode tokens/s of HF generate: (time for N tokens - time for 1) / (N - 1) steps."""
  ids = torch.tensor(prompts)
  def run(n):
    t0 = time.perf_counter()
    with torch.no_grad():
      hf.generate(ids, do_sample=False, max_new_tokens=n, min_new_tokens=n)
    return time.perf_counter() - t0
  run(2)
  t_n = np.median([run(new_tokens) for _ in range(iters)])
  t_1 = np.median([run(1) for _ in range(iters)])
  return len(prompts) * (new_tokens - 1) / (t_n - t_1)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--layers", type=int, default=8)
  ap.add_argument("--hidden", type=int, default=512)
  ap.add_argument("--heads", type=int, default=8)
  ap.add_argument("--kv-heads", type=int, default=8)
  ap.add_argument("--intermediate", type=int, default=1408)
  ap.add_argument("--vocab", type=int, default=32000)
  ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
  ap.add_argument("--prompt-len", type=int, default=64)
  ap.add_argument("--new-tokens", type=int, default=64)
  ap.add_argument("--iters", type=int, default=3)
  ap.add_argument("--name", default="decode_cpu")
  args = ap.parse_args()

  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(
      vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
      num_hidden_layers=args.layers, num_attention_heads=args.heads,
      num_key_value_heads=args.kv_heads, max_position_embeddings=4096)
  hf = transformers.LlamaForCausalLM(cfg).eval()
  hf.generation_config.eos_token_id = None
  hf.generation_config.pad_token_id = 0
  params = sum(p.numel() for p in hf.parameters())
  with tempfile.TemporaryDirectory() as d:
    hf.save_pretrained(d)
    model = fdjax.load_pretrained(d)

  rows = []
  rng = np.random.default_rng(0)
  for b in args.batch:
    prompts = rng.integers(0, args.vocab, (b, args.prompt_len)).tolist()
    run = lambda: fdjax.generate(model, prompts, max_new_tokens=args.new_tokens)
    run()  # compile
    results = [run() for _ in range(args.iters)]
    ours = float(np.median([r.decode_tokens_per_s for r in results]))
    theirs = hf_decode_tokens_per_s(hf, prompts, args.new_tokens, args.iters)
    shape = dict(params_m=round(params / 1e6, 1), batch=b, prompt_len=args.prompt_len,
                 new_tokens=args.new_tokens, dtype="float32")
    rows.append({**shape, "impl": "fdjax-auto", "decode_tokens_per_s": ours,
                 "prefill_ms": float(np.median([r.prefill_s for r in results])) * 1e3,
                 "speedup_vs_hf": ours / theirs})
    rows.append({**shape, "impl": "hf-eager", "decode_tokens_per_s": theirs,
                 "speedup_vs_hf": 1.0})
    print(rows[-2], rows[-1], flush=True)
  table = common.write_results(
      args.name, rows, ["impl", "params_m", "batch", "prompt_len", "new_tokens",
                        "decode_tokens_per_s", "prefill_ms", "speedup_vs_hf"])
  print(table)


if __name__ == "__main__":
  main()
