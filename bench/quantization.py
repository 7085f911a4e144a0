"""What weight-only int8 / int4 cost in accuracy and save in memory (any backend; the XLA path
on a CPU, which computes exactly what the kernels do: dequantized weights times x), and, on a
CPU with VNNI, int8 weights as "auto" runs them there (int8-w8a8: x quantized too, in groups
of 128 entries, or 64 / 32 where K is not a multiple of 128).

  python bench/quantization.py            # the committed results (2-core CPU: ~10 minutes)
  python bench/quantization.py --smoke    # a quick check of the script

1. The bundled model (fdjax/default_model, byte-level CoPE): held-out bits per byte on the
   standard library's held-out files, as `fdjax train` evaluates it (fdjax.training.train.evaluate,
   the same batches for every variant), the logits' error and greedy agreement with the
   float model over 64 new tokens.
2. A random Llama-style model (RoPE, GQA, SwiGLU; weights of std 1 / sqrt(fan-in), so the
   logits are spread, not near-uniform): the same logits and greedy measures; and the error
   of one quantized matmul on normal weights, for scale.
3. Memory: the bytes of a model's arrays, bfloat16 against quantize="int4" (and "int8"),
   loaded from a checkpoint; Llama-2-7B's from its arrays' shapes (nnx.eval_shape).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import fdjax  # noqa: E402
from bench import common  # noqa: E402
from fdjax.io import loading  # noqa: E402
from fdjax.ops import dispatch, quant, selection  # noqa: E402
from fdjax.training import data, train  # noqa: E402
from models import ModelConfig, Transformer, presets  # noqa: E402
from models import quantize as mq  # noqa: E402

METHODS = ("int8", "int4")
W8A8 = "int8-w8a8"  # int8 weights as "auto" runs them on a CPU with VNNI (fdjax.ops.cpu_linear)
W4A8 = "int4-w4a8"  # int4 weights as "auto" runs them there: unpacked, the same int8 dot


def variants():
  """(row label, quantize method, impl): the float model and the weight-only methods as the
  kernels compute them (impl "xla": dequantized weights times x), and, where this CPU has
  VNNI, int8 and int4 weights as "auto" runs them here: the int8 x int8 dot, x quantized in
  groups."""
  out = [("float", None, "xla")]
  for m in METHODS:
    out.append((m, m, "xla"))
    if jax.default_backend() == "cpu" and selection.cpu_linear(
        1, 128, jnp.float32, m).settings.group:
      out.append(({"int8": W8A8, "int4": W4A8}[m], m, "auto"))
  return out


def greedy(model, prompts, new_tokens):
  return fdjax.generate(model, prompts, max_new_tokens=new_tokens, temperature=0.0).tokens


def logit_metrics(got, want) -> dict:
  """How far quantized logits [..., V] are from the float model's."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return {"logits_max_rel_err": float(np.max(np.abs(got - want)) / np.max(np.abs(want))),
          "logits_rel_l2": float(np.linalg.norm(got - want) / np.linalg.norm(want)),
          "logits_argmax_agree": float(np.mean(got.argmax(-1) == want.argmax(-1)))}


def top2_margin(logits) -> float:
  """Median gap between the two largest logits of a position, in units of that position's
  logit standard deviation: how little noise flips a greedy choice."""
  top = np.sort(np.asarray(logits, np.float64), axis=-1)
  return float(np.median((top[..., -1] - top[..., -2]) / top.std(axis=-1)))


def agreement(got, want) -> dict:
  """Position-wise equal fraction of greedy continuations, and the mean number of tokens
  equal before the first difference."""
  same = [np.asarray(a) == np.asarray(b) for a, b in zip(got, want)]
  first = [int(np.argmin(s)) if not s.all() else len(s) for s in same]
  return {"greedy_agree": float(np.mean(np.concatenate(same))),
          "greedy_tokens_before_first_difference": float(np.mean(first))}


def compare(label, make, ids, prompts, args, extra=None) -> list[dict]:
  """Rows for the float model and each quantized one (make(method) -> model): logits on `ids`
  against the float model's, greedy continuations of `prompts`, bytes, and extra(model)."""
  rows, base = [], None
  for name, method, impl in variants():
    model = make(method)
    with dispatch.using(impl):
      # the forward as one compiled program (eagerly each operation compiles on its own)
      logits = np.asarray(nnx.jit(lambda m, x: m(x))(model, ids))
      tokens = greedy(model, prompts, args.new_tokens)
      row = {"model": label, "method": name, "bytes": mq.weight_bytes(model)["total"],
             **(extra(model) if extra else {})}
    if base is None:
      base = logits, tokens
      row["top2_margin"] = top2_margin(logits)
    else:
      row.update(logit_metrics(logits, base[0]), **agreement(tokens, base[1]))
    rows.append(row)
    print(row, flush=True)
  return rows


def bundled(args) -> list[dict]:
  _, held_out = data.split_files(data.stdlib_files())
  batches = data.byte_batches(data.read_bytes(held_out), args.eval_batch, args.eval_len)
  rng = np.random.default_rng(5)
  ids = jnp.asarray(batches(rng)[0][:4, :-1])
  text = data.read_bytes(held_out)
  starts = rng.integers(0, text.size - args.prompt_len, args.prompts)
  prompts = [text[s:s + args.prompt_len].astype(int).tolist() for s in starts]
  def bits_per_byte(model):
    return {"held_out_bits_per_byte":
            train.evaluate(model, batches, args.eval_batches) / math.log(2)}
  rows = compare("default_model (byte-level CoPE, 3.4M, float32)",
                 lambda method: fdjax.load_pretrained(loading.DEFAULT_MODEL_DIR, quantize=method),
                 ids, prompts, args, bits_per_byte)
  for r in rows:
    r.update(part="bundled", held_out_files=len(held_out))
    r["bpb_change_pct"] = 100 * (r["held_out_bits_per_byte"]
                                 / rows[0]["held_out_bits_per_byte"] - 1)
  return rows


def random_llama(cfg: ModelConfig, seed: int = 0, dtype=jnp.float32) -> Transformer:
  """A Llama-style model with weights of std 1 / sqrt(fan-in) (embeddings std 1)."""
  model = Transformer(cfg, rngs=nnx.Rngs(seed), dtype=dtype)
  key = jax.random.key(seed + 1)
  for i, (_, var) in enumerate(nnx.iter_graph(model)):
    if isinstance(var, nnx.Param) and var[...].ndim == 2:
      std = 1.0 if var is model.embed else var[...].shape[0] ** -0.5
      var[...] = (std * jax.random.normal(jax.random.fold_in(key, i), var[...].shape)
                  ).astype(dtype)
  return model


def random_model(args) -> list[dict]:
  cfg = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                    intermediate_size=args.intermediate, num_layers=args.layers, num_heads=8,
                    num_kv_heads=2, head_dim=args.hidden // 8, max_position_embeddings=512)
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (4, 64)))
  prompts = [rng.integers(0, cfg.vocab_size, args.prompt_len).tolist()
             for _ in range(args.prompts)]
  label = (f"random Llama-style {cfg.num_layers}x{cfg.hidden_size} (GQA 8/2, vocab "
           f"{cfg.vocab_size}), float32")
  rows = compare(label, lambda method: _quantized(random_llama(cfg), method), ids, prompts,
                 args)
  return [{**r, "part": "random"} for r in rows]


def one_linear(args) -> list[dict]:
  """The error of one x @ w with w of independent normal entries, the error each quantized
  layer adds."""
  rng = np.random.default_rng(0)
  k, n = args.hidden * 8, args.hidden * 8
  x = jnp.asarray(rng.standard_normal((64, k)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
  want = np.asarray(x @ w, np.float64)
  rows = []
  for name, method, impl in variants()[1:]:
    got = np.asarray(dispatch.linear(x, quant.quantize(w, method), impl=impl), np.float64)
    rows.append({"part": "one linear", "model": f"x [64, {k}] @ w [{k}, {n}], w ~ N(0, 1)",
                 "method": name,
                 "out_rel_l2": float(np.linalg.norm(got - want) / np.linalg.norm(want))})
    print(rows[-1], flush=True)
  return rows


def memory(args) -> list[dict]:
  rows = []
  cfg = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                    intermediate_size=args.intermediate, num_layers=args.layers, num_heads=8,
                    num_kv_heads=2, head_dim=args.hidden // 8, max_position_embeddings=512)
  with tempfile.TemporaryDirectory() as path:
    fdjax.save_pretrained(random_llama(cfg, dtype=jnp.bfloat16), path)
    plain = mq.weight_bytes(fdjax.load_pretrained(path))
    for method in METHODS:
      q = mq.weight_bytes(fdjax.load_pretrained(path, quantize=method))
      rows.append(_memory_row(f"random Llama-style {cfg.num_layers}x{cfg.hidden_size}, bf16, "
                              "loaded from a checkpoint", method, plain, q))
  big = presets.get("llama-2-7b")
  abstract = lambda method: nnx.eval_shape(  # noqa: E731
      lambda: _quantized(Transformer(big, rngs=nnx.Rngs(0), dtype=jnp.bfloat16), method))
  plain = mq.weight_bytes(abstract(None))
  for method in METHODS:
    rows.append(_memory_row("llama-2-7b, bf16 (from the arrays' shapes: nnx.eval_shape)",
                            method, plain, mq.weight_bytes(abstract(method))))
  for r in rows:
    print(r, flush=True)
  return rows


def _quantized(model, method):
  return model if method is None else fdjax.quantize(model, method)


def _memory_row(model, method, plain, q):
  return {"part": "memory", "model": model, "method": method,
          "linear_bytes_bf16": plain["linear"], "linear_bytes": q["linear"],
          "linear_fraction": q["linear"] / plain["linear"], "total_bytes_bf16": plain["total"],
          "total_bytes": q["total"], "total_fraction": q["total"] / plain["total"]}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--smoke", action="store_true")
  ap.add_argument("--results-dir")
  args = ap.parse_args()
  small = dict(eval_batches=1, eval_batch=2, eval_len=64, prompts=2, prompt_len=16,
               new_tokens=8, vocab=256, hidden=64, intermediate=160, layers=2)
  full = dict(eval_batches=64, eval_batch=16, eval_len=256, prompts=8, prompt_len=64,
              new_tokens=64, vocab=2048, hidden=512, intermediate=1408, layers=4)
  vars(args).update(small if args.smoke else full)
  rows = bundled(args) + random_model(args) + one_linear(args) + memory(args)
  bpb = {r["method"]: r for r in rows if r["part"] == "bundled"}
  margins = {r["part"]: r["top2_margin"] for r in rows if "top2_margin" in r}
  notes = (
      f"Bundled model: held-out bits per byte over {args.eval_batches} batches of "
      f"{args.eval_batch} x {args.eval_len} bytes from the standard library's held-out files "
      f"(the same batches for each variant; `fdjax train` evaluated the first 16 of them: "
      f"1.89). " + "; ".join(f"{m}: {r['held_out_bits_per_byte']:.4f} "
                             f"({r['bpb_change_pct']:+.2f} %)" for m, r in bpb.items())
      + ". Quantized as load_pretrained(quantize=...) does: every linear layer (q/k/v, o, "
      "gate/up, down), not the embedding, norms, CoPE tables or LM head.\n\n"
      f"Logits: 4 sequences of 64 (random) / 256 (bundled) tokens, teacher-forced, against the "
      f"float model's (max |diff| / max |float|, L2 ratio, argmax agreement per position). "
      f"Greedy: {args.prompts} prompts of {args.prompt_len} tokens, {args.new_tokens} new "
      f"tokens each; the fraction of positions equal to the float model's continuation and "
      f"the mean count of tokens before the first difference (one flipped choice sends the "
      f"rest of a continuation elsewhere). top2_margin: the float model's median gap between "
      f"its two largest logits, in logit standard deviations (bundled "
      f"{margins.get('bundled', float('nan')):.2f}, random "
      f"{margins.get('random', float('nan')):.2f}): the smaller, the less noise flips a "
      f"greedy choice. One quantized matmul on normal weights is off by "
      + ", ".join(f"{r['method']} {100 * r['out_rel_l2']:.1f} %" for r in rows
                  if r["part"] == "one linear")
      + f" of the output's norm (one linear); the random model chains {4 * args.layers} "
      f"quantized matmuls ({args.layers} layers x q/k/v, o, gate/up, down; its LM head stays "
      f"float); logits_rel_l2 of the random model: "
      + ", ".join(f"{r['method']} {100 * r['logits_rel_l2']:.2f} %" for r in rows
                  if r["part"] == "random" and "logits_rel_l2" in r)
      + "; of the trained bundled model: "
      + ", ".join(f"{r['method']} {100 * r['logits_rel_l2']:.2f} %" for r in rows
                  if r["part"] == "bundled" and "logits_rel_l2" in r) + ".\n\n"
      "Memory: bytes of the model's arrays (fdjax.ops.quant.nbytes over its state); linear = the "
      "layers' linear weights (what is quantized), total = every array (the embedding, norms "
      "and LM head stay bf16). int4 stores 4 bits per weight plus one bf16 scale per 128 input "
      "rows: 0.258 of bf16; int8 8 bits plus one scale per output column: ~0.5.")
  cols = ["part", "model", "method", "held_out_bits_per_byte", "bpb_change_pct",
          "logits_max_rel_err", "logits_rel_l2", "out_rel_l2", "logits_argmax_agree",
          "top2_margin",
          "greedy_agree", "greedy_tokens_before_first_difference", "linear_fraction",
          "total_fraction", "total_bytes"]
  print(common.write_results("quantization_smoke" if args.smoke else "quantization", rows, cols,
                             notes, results_dir=args.results_dir))


if __name__ == "__main__":
  main()
