"""Where a CPU decode step's time goes, op by op, from XLA's own profiler: generate's decode
loop (bench/decode.py's 58.5M Llama: 8 layers, hidden 512, MLP 1408, vocabulary 32000) run
under jax.profiler.trace at each batch; every event XLA:CPU records for an instruction of the
decode-loop program (its thunks: a fusion, a dot, a scatter ...) is summed by what the
instruction computes, read from the compiled program's HLO, and divided by the decode steps.

  python bench/decode_trace.py [--batch 1 4 16] [--dtype float32 bfloat16 int8 int4]

(int8 / int4: the float32 model with its linear weights quantized, as "auto" runs them on
this CPU: fdjax.ops.cpu_linear's int8 x int8 dot where the processor has VNNI.)

Categories (first that applies to the instruction, or to what its fusion computes):
  LM head          a dot whose output is [B, vocabulary]
  linears          the other dots with a 2-D output (q/k/v, o, gate/up, down), and the
                   integer dots of quantized weights (int32 out, per group of K)
  attention dots   the dots of scores and weights x values (rank > 2), and the multiply and
                   sum that stands for the second on float32 pages (selection.cpu_paged_decode)
  K/V gather       a gather from the [KV heads, pages, page_size, head_dim] pools: each row's
                   pages made contiguous per head (whole pages: nothing is transposed)
  cache write      a scatter (the step's new key and value into their pages)
  softmax          exp of attention's scores ([B, H, 1, S] and up)
  SiLU             exp or logistic elsewhere (the MLP's gate)
  norms            rsqrt (RMSNorm)
  sampling         reductions over the vocabulary (argmax, top-k / top-p)
  other            the rest (the embedding row, RoPE, the softmax's max and sum, residual
                   adds, copies, the loop's own bookkeeping)
Thread time, not wall time: XLA:CPU runs an instruction on its worker threads, so ms_per_step
sums what every thread spent; the step's wall time is the last column.
"""
from __future__ import annotations

import argparse
import collections
import functools
import glob
import gzip
import json
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402

SHAPE = dict(layers=8, hidden=512, heads=8, kv_heads=8, head_dim=64, intermediate=1408,
             vocab=32000)
CATEGORIES = ["LM head", "linears", "attention dots", "K/V gather", "cache write", "softmax",
              "SiLU", "norms", "sampling", "other"]
# Instructions that run other computations (lax.cond's branches, a loop's body): the profiler
# records their span and each instruction they run, so only the latter are counted.
CONTAINERS = ("conditional", "while", "call")
COLUMNS = ["dtype", "batch", "category", "ms_per_step", "pct", "instructions", "example"]
_CALLED = re.compile(r"calls=%?([\w.-]+)")


def _instruction(line: str):
  """(name, shape, opcode, rest) of an HLO instruction line, or None."""
  left, eq, right = line.strip().removeprefix("ROOT ").partition(" = ")
  if not eq or " " in left:
    return None
  if right.startswith("("):  # a tuple shape: up to its closing parenthesis
    depth = 0
    for i, ch in enumerate(right):
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        break
    shape, right = right[:i + 1], right[i + 1:].lstrip()
  else:
    shape, _, right = right.partition(" ")
  opcode, paren, rest = right.partition("(")
  return (left.lstrip("%"), re.sub(r"\{[^}]*\}", "", shape), opcode, rest) if paren else None


def computations(hlo: str) -> dict[str, list[tuple]]:
  """{computation: [(name, shape, opcode, rest of line)]} of an HLO module's text."""
  out, current = {}, None
  for line in hlo.splitlines():
    if line and not line[0].isspace() and line.rstrip().endswith("{"):
      name = line.removeprefix("ENTRY ").split()[0].lstrip("%")
      current = out.setdefault(name, [])
    elif current is not None and (ins := _instruction(line)):
      current.append(ins)
  return out


def categorize(hlo: str, vocab: int, pool_shape: str) -> dict[str, tuple[str, str]]:
  """{instruction name: (category, its shape)} for every instruction of the module."""
  comps = computations(hlo)

  @functools.cache
  def ops(name):  # every (shape, opcode, rest) a computation runs, the ones it calls too
    found = []
    for _, shape, opcode, rest in comps.get(name, ()):
      found.append((shape, opcode, rest))
      for called in _CALLED.findall(rest):
        found += ops(called)
    return tuple(found)
  cats = {}
  for comp in comps.values():
    for name, shape, opcode, rest in comp:
      if opcode in CONTAINERS:
        cats[name] = (None, shape)  # its branch's or body's own instructions are recorded
        continue
      inner = [(shape, opcode, rest)] + [o for c in _CALLED.findall(rest) for o in ops(c)]
      codes = {o for _, o, _ in inner}
      dots = [s for s, o, _ in inner if o == "dot"]
      if dots:
        out = dots[-1]
        dims = out.split("[", 1)[1].split("]", 1)[0].split(",") if "[" in out else []
        cat = ("LM head" if dims and dims[-1] == str(vocab) else
               "linears" if len(dims) == 2 or out.startswith("s32") else "attention dots")
      elif {"multiply", "reduce"} <= codes and shape.count(",") >= 3:
        cat = "attention dots"  # float32 pages' weights x values as a multiply and a sum
      elif "gather" in codes and any(pool_shape in sh for sh, _, _ in inner):
        cat = "K/V gather"
      elif "scatter" in codes:
        cat = "cache write"
      elif codes & {"exponential", "logistic"}:  # attention's weights [B, H, 1, S], or SiLU
        cat = "softmax" if shape.count(",") >= 3 else "SiLU"
      elif "rsqrt" in codes:
        cat = "norms"
      elif (any(o.startswith("reduce") for o in codes)  # reduce, reduce-window
            and any(f",{vocab}]" in sh for sh, _, _ in inner)):
        cat = "sampling"
      else:
        cat = "other"
      cats[name] = (cat, shape)
  return cats


def measure(dtype: str, batches: list[int]) -> list[dict]:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  import fdjax
  from fdjax.engine import decode_loop
  from models import ModelConfig, Transformer
  s = SHAPE
  cfg = ModelConfig(vocab_size=s["vocab"], hidden_size=s["hidden"],
                    intermediate_size=s["intermediate"], num_layers=s["layers"],
                    num_heads=s["heads"], num_kv_heads=s["kv_heads"], head_dim=s["head_dim"],
                    max_position_embeddings=4096)
  quantized = dtype in ("int8", "int4")
  model = Transformer(cfg, rngs=nnx.Rngs(0), dtype=jnp.float32 if quantized else jnp.dtype(dtype))
  if quantized:
    model = fdjax.quantize(model, dtype)
  rows = []
  for b in batches:
    prompts = np.random.default_rng(b).integers(0, s["vocab"], (b, 64)).tolist()
    run = lambda: fdjax.generate(model, prompts, max_new_tokens=64)  # noqa: E731
    run()
    _, decode = decode_loop.lower(model, batch=b, prompt_len=64, max_new_tokens=64)
    hlo = decode.compile().as_text()
    pages = decode_loop.buckets(cfg, b, 64, 64).pages * b
    pool = f"[{s['kv_heads']},{pages},64,{s['head_dim']}]"
    cats = categorize(hlo, s["vocab"], pool)
    with tempfile.TemporaryDirectory() as d:
      jax.profiler.start_trace(d)
      res = run()
      jax.profiler.stop_trace()
      trace = json.load(gzip.open(glob.glob(os.path.join(d, "**", "*.trace.json.gz"),
                                            recursive=True)[0]))
    steps = res.decode_steps
    total = collections.Counter()
    names = collections.defaultdict(set)
    for e in trace["traceEvents"]:
      args = e.get("args") or {}
      if e.get("ph") != "X" or args.get("hlo_module") != "jit_decode_steps":
        continue
      op = args.get("hlo_op", e["name"])
      cat, shape = cats.get(op, ("other", "?"))
      if cat is None:
        continue
      total[cat] += e["dur"] / 1e3
      names[cat].add((op, shape))
    busy = sum(total.values())
    step_ms = 1e3 * res.decode_s / steps
    for cat in CATEGORIES:
      if not total[cat]:
        continue
      example = sorted(names[cat], key=lambda n: n[0])[0]
      rows.append(dict(dtype=dtype, batch=b, category=cat, ms_per_step=total[cat] / steps,
                       pct=100 * total[cat] / busy, instructions=len(names[cat]),
                       example=f"{example[0]}: {example[1]}"))
    rows.append(dict(dtype=dtype, batch=b, category="step (wall)", ms_per_step=step_ms,
                     pct=None, instructions=None,
                     example=f"{b / step_ms * 1e3:.0f} tokens/s; threads busy "
                             f"{busy / steps:.1f} ms per step"))
    print(json.dumps(rows[-1]), flush=True)
  return rows


def main():
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16])
  ap.add_argument("--dtype", nargs="+", default=["float32"])
  ap.add_argument("--results-dir", default=None)
  args = ap.parse_args()
  rows = []
  for dtype in args.dtype:
    rows += measure(dtype, args.batch)
  notes = ("Thread time per decode step by what each XLA:CPU instruction of generate's decode "
           "loop computes (see the script's docstring), from jax.profiler's trace of one "
           "generate call (prompt 64, 64 new tokens, pages of 64) after one that compiled; "
           "`example` is one instruction of the category with its output shape.")
  print(common.write_results("decode_trace_cpu", rows, COLUMNS, notes=notes,
                             results_dir=args.results_dir))


if __name__ == "__main__":
  main()
