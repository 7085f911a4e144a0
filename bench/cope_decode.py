"""Decode speed of a CoPE model on the CPU: fdjax as "auto" runs it, the same with every op
on its plain XLA reference (`dispatch.using("xla")`: each row's pages gathered into a
contiguous copy and CoPE's token-major reference, the path "auto" took before CoPE's decode
step read its pages in place), and a PyTorch CoPE decoder (bench/torch_cope.py: the paper's
Appendix B as the official code writes it, eager, a preallocated cache), timed in turn, one
run each per round; the bundled model by default, or a random-weight CoPE model of a given
shape. Transformers has no CoPE model.

  python bench/cope_decode.py [--model DIR | --layers 8 --hidden 512 ...] [--batch 1 8]
      [--new-tokens 128] [--iters 5]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import fdjax  # noqa: E402
from bench import common, decode  # noqa: E402
from fdjax.ops import dispatch  # noqa: E402


def random_cope(d, args):
  """A random-weight CoPE checkpoint of the given shape saved in d (a non-zero position
  table, so that positions matter)."""
  import jax.numpy as jnp
  from flax import nnx

  from fdjax.io import checkpoint
  from models import ModelConfig, Transformer
  cfg = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                    intermediate_size=args.intermediate, num_layers=args.layers,
                    num_heads=args.heads, num_kv_heads=args.kv_heads,
                    head_dim=args.hidden // args.heads, max_position_embeddings=4096,
                    position_encoding="cope", npos_max=args.npos_max)
  model = Transformer(cfg, rngs=nnx.Rngs(0), dtype=jnp.float32)
  for i, layer in enumerate(model.layers):
    layer.attn.pos_emb[...] = 0.5 * jax.random.normal(jax.random.key(i),
                                                      layer.attn.pos_emb.shape)
  checkpoint.save_pretrained(model, d)


def fdjax_timer(model, prompts, new_tokens, impl):
  """A function timing one fdjax.generate under dispatch.using(impl) (decode tokens/s,
  generate's own decode time), after a call that compiles; and its greedy tokens."""
  def run():
    with dispatch.using(impl):
      return fdjax.generate(model, prompts, max_new_tokens=new_tokens)
  tokens = run().tokens
  return (lambda: run().decode_tokens_per_s), tokens


def main():
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--model", help="a CoPE checkpoint (default: the bundled model, unless a "
                  "shape is given with --layers)")
  ap.add_argument("--layers", type=int)
  ap.add_argument("--hidden", type=int, default=512)
  ap.add_argument("--heads", type=int, default=8)
  ap.add_argument("--kv-heads", type=int, default=8)
  ap.add_argument("--intermediate", type=int, default=1408)
  ap.add_argument("--vocab", type=int, default=32000)
  ap.add_argument("--npos-max", type=int, default=64)
  ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
  ap.add_argument("--prompt-len", type=int, default=64)
  ap.add_argument("--new-tokens", type=int, default=128)
  ap.add_argument("--iters", type=int, default=5)
  ap.add_argument("--name", default="cope_decode_cpu")
  ap.add_argument("--results-dir")
  args = ap.parse_args()
  if args.model and args.layers:
    raise ValueError("give --model or a shape (--layers ...), not both")
  import torch
  from flax import nnx

  from bench import torch_cope
  torch.manual_seed(0)
  with tempfile.TemporaryDirectory() as d:
    if args.layers:
      random_cope(d, args)
      model_dir, label = d, f"random CoPE, {args.layers} layers, hidden {args.hidden}"
    else:
      model_dir = args.model or os.path.join(common.ROOT, "fdjax", "default_model")
      label = "the bundled model" if not args.model else os.path.basename(args.model)
    model = fdjax.load_pretrained(model_dir)
    vocab = model.config.vocab_size
    baseline = torch_cope.CopeDecoder(model_dir)
    params = sum(x.size for x in jax.tree.leaves(nnx.state(model))) / 1e6
    rows = []
    for b in args.batch:
      prompts = np.random.default_rng(b).integers(0, vocab, (b, args.prompt_len)).tolist()
      timers, tokens = {}, {}
      for impl in ("auto", "xla"):
        timers[f"fdjax-{impl}"], tokens[impl] = fdjax_timer(model, prompts, args.new_tokens,
                                                            impl)
      tokens["torch"] = baseline.generate(prompts, args.new_tokens)
      # The same model: the greedy tokens agree (a random model's near-tied logits may part
      # late; the first 16 of each row must agree)
      for name in ("xla", "torch"):
        for got, want in zip(tokens[name], tokens["auto"]):
          if got[:16] != want[:16]:
            raise RuntimeError(f"{name}'s greedy tokens differ from fdjax-auto's: {got[:16]} "
                               f"against {want[:16]}")
      timers["torch-eager"] = common.decode_rate(
          lambda n: baseline.generate(prompts, n), args.new_tokens, b)
      tps = decode.interleaved(timers, args.iters)
      shape = dict(model=label, params_m=round(params, 2), batch=b,
                   prompt_len=args.prompt_len, new_tokens=args.new_tokens)
      for name, runs in tps.items():
        ratios = {other: float(np.median([x / y for x, y in zip(runs, tps[other])]))
                  for other in tps if other != name}
        mine = tokens[{"fdjax-auto": "auto", "fdjax-xla": "xla", "torch-eager": "torch"}[name]]
        agree = float(np.mean([g == w for got, want in zip(mine, tokens["auto"])
                               for g, w in zip(got, want)]))
        rows.append({**shape, "impl": name, "decode_tokens_per_s": float(np.median(runs)),
                     "speedup_vs_torch": ratios.get("torch-eager", 1.0),
                     "speedup_vs_fdjax_xla": ratios.get("fdjax-xla", 1.0),
                     "greedy_agreement": agree})
        print(rows[-1], flush=True)
  notes = ("fdjax-auto: fdjax.generate as it runs by default (on the CPU a CoPE decode step "
           "reads each row's own pages in place, per KV head: dispatch.paged_cope_decode_"
           "attention); fdjax-xla: the same under dispatch.using(\"xla\") (pages gathered into "
           "a contiguous copy, CoPE's token-major reference); torch-eager: bench/torch_cope.py "
           "(PyTorch, float32, a preallocated cache; decode tokens/s from (time for N tokens - "
           "time for 1) / (N - 1) steps). fdjax: generate's own decode time. The three are "
           "timed in turn, --iters rounds; speedups are the medians of the rounds' ratios. "
           "greedy_agreement: the fraction of greedy tokens equal to fdjax-auto's (float32 "
           "sums in another order can part a near-tie late in a sequence).")
  print(common.write_results(
      args.name, rows, ["model", "params_m", "batch", "prompt_len", "new_tokens", "impl",
                        "decode_tokens_per_s", "speedup_vs_torch", "speedup_vs_fdjax_xla",
                        "greedy_agreement"],
      notes, results_dir=args.results_dir))


if __name__ == "__main__":
  main()
