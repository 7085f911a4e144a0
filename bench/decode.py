"""Decode speed of fdjax against Hugging Face transformers (eager PyTorch), same random
model, same machine, one run; with --also-python, fdjax under another interpreter (another
jax) on the same checkpoint, in the same run, row beside row.

  python bench/decode.py [--layers 8 --hidden 512 ...] [--batch 1 4] [--new-tokens 64]
      [--also-python PATH ...]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import fdjax  # noqa: E402
from bench import common, llamacpp  # noqa: E402


def hf_timer(hf, prompts, new_tokens):
  """A function timing HF generate once (common.decode_rate)."""
  import torch
  ids = torch.tensor(prompts)
  def generate(n):
    with torch.no_grad():
      hf.generate(ids, do_sample=False, max_new_tokens=n, min_new_tokens=n)
  return common.decode_rate(generate, new_tokens, len(prompts))


def interleaved(timers: dict, iters: int) -> dict:
  """{name: [tokens/s of each round]}: `iters` rounds, each timing every one of `timers` once
  in turn, so that all of them see the machine alike (on a shared 2-core VM its speed drifts
  by up to 1.8x between minutes: timed one after another, a ratio would carry the drift)."""
  out = {name: [] for name in timers}
  for _ in range(iters):
    for name, once in timers.items():
      out[name].append(once())
  return out


# Each dtype as fdjax loads it (load_pretrained's dtype, quantize) and as Hugging Face users
# get it in PyTorch (int8: torch.ao's quantize_dynamic, W8A8 with per-row activation scales, on
# every linear layer but the LM head, which fdjax does not quantize either).
DTYPES = {"float32": (None, None), "bfloat16": ("bfloat16", None), "int8": (None, "int8")}


def hf_variant(hf, dtype):
  """The float32 HF model as `dtype` (a copy; float32: itself)."""
  import copy

  import torch
  if dtype == "float32":
    return hf
  if dtype == "bfloat16":
    return copy.deepcopy(hf).to(torch.bfloat16)
  from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic
  spec = {name: default_dynamic_qconfig for name, m in hf.named_modules()
          if isinstance(m, torch.nn.Linear) and name != "lm_head"}
  return quantize_dynamic(copy.deepcopy(hf), spec, dtype=torch.qint8)


def llamacpp_timer(hf, d, dtype, prompts, new_tokens):
  """(llama.cpp's timer (bench/llamacpp.py) on the float32 `hf` written as GGUF in `dtype`
  under the directory d, None), or (None, why not). In float32 its greedy tokens must be
  HF's, else the conversion is wrong (in bfloat16 and int8, a random model's near-tied
  logits let greedy choices part from float32's: the same writer, the tensors rounded)."""
  import torch
  path = os.path.join(d, f"model-{dtype}.gguf")
  llamacpp.write_gguf(hf, path, dtype)
  llm = llamacpp.load(path, n_ctx=len(prompts[0]) + new_tokens)
  with torch.no_grad():
    want = hf.generate(torch.tensor(prompts[:1]), do_sample=False, max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens)[0, len(prompts[0]):].tolist()
  got = llamacpp.greedy(llm, prompts[0], new_tokens)
  if dtype == "float32" and got != want:
    return None, f"llama.cpp's greedy tokens differ from HF's: {got[:8]} against {want[:8]}"
  return llamacpp.timer(llm, prompts[0], new_tokens), None


def hf_compiled(hf):
  """A copy of `hf` as PyTorch users make it fast: a static cache and torch.compile of its
  forward (bench/e2e.py's hf-compile, gpt-fast's recipe); compiled on its first call."""
  import copy

  import torch
  torch._dynamo.reset()  # each copy compiles afresh: the copies share forward's code object,
  # whose compiled variants (and their limit) would pile up across dtypes and batches
  compiled = copy.deepcopy(hf)
  compiled.generation_config.cache_implementation = "static"
  compiled.forward = torch.compile(compiled.forward, mode="reduce-overhead", fullgraph=True)
  return compiled


def step_bytes(model, batch, prompt_len, new_tokens) -> int:
  """What a decode step reads: every weight but the embedding table (one row of it per
  token), as stored (int8: values and scales), and the cache's keys and values in the
  cache's dtype: on the CPU, where generate reads each row's own pages in place, the table's
  whole width (page_size 64) every step; elsewhere the generation's middle (prompt + half
  the new tokens a row)."""
  from flax import nnx

  from fdjax.engine import steps
  from fdjax.ops import dispatch, quant
  cfg = model.config
  item = jax.numpy.dtype(model.dtype).itemsize
  embed = cfg.vocab_size * cfg.hidden_size * item
  in_place = dispatch.reads_own_pages_in_place(cfg, model.dtype)
  keys = (steps.table_width(prompt_len + new_tokens, 64) * 64 if in_place else
          prompt_len + new_tokens // 2)
  kv_item = dispatch.kv_cache_dtype(model.dtype, in_place).itemsize
  cache = 2 * cfg.num_layers * batch * keys * cfg.num_kv_heads * cfg.head_dim * kv_item
  return quant.nbytes(nnx.state(model)) - embed + batch * cfg.hidden_size * item + cache


def fdjax_timer(model_dir, batch, vocab, prompt_len, new_tokens, dtype="float32"):
  """(a function timing fdjax.generate once: (decode tokens/s, prefill ms); what a decode
  step reads, step_bytes) for the checkpoint loaded as `dtype` (DTYPES), after a call that
  compiles; the prompts are seeded, the same in every interpreter."""
  load_dtype, quantize = DTYPES[dtype]
  model = fdjax.load_pretrained(model_dir, dtype=load_dtype, quantize=quantize)
  prompts = np.random.default_rng(batch).integers(0, vocab, (batch, prompt_len)).tolist()
  def run():
    return fdjax.generate(model, prompts, max_new_tokens=new_tokens)
  run()  # compile
  def once():
    r = run()
    return r.decode_tokens_per_s, r.prefill_s * 1e3
  return once, step_bytes(model, batch, prompt_len, new_tokens)


def fdjax_decode(model_dir, batch, vocab, prompt_len, new_tokens, iters, dtype="float32"):
  """(decode tokens/s, prefill ms) of fdjax.generate: medians of `iters` runs (fdjax_timer)."""
  once, _ = fdjax_timer(model_dir, batch, vocab, prompt_len, new_tokens, dtype)
  runs = [once() for _ in range(iters)]
  return tuple(float(np.median([r[i] for r in runs])) for i in range(2))


def other_interpreter(python, model_dir, args, batch):
  """fdjax_decode under another Python (its own jax), on this tree: (jax version, tok/s,
  prefill ms)."""
  code = ("import json, sys, jax; from bench import decode; "
          f"r = decode.fdjax_decode({model_dir!r}, {batch}, {args.vocab}, {args.prompt_len}, "
          f"{args.new_tokens}, {args.iters}); print(json.dumps([jax.__version__, *r]))")
  env = {**os.environ, "PYTHONPATH": common.ROOT, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([python, "-c", code], env=env, cwd=common.ROOT, capture_output=True,
                       text=True, timeout=1800)
  if out.returncode:
    raise RuntimeError(f"{python} failed: {out.stderr[-2000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  ap = argparse.ArgumentParser()
  common.llama_args(ap)
  ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
  ap.add_argument("--prompt-len", type=int, default=64)
  ap.add_argument("--new-tokens", type=int, default=64)
  ap.add_argument("--iters", type=int, default=3)
  ap.add_argument("--name", default="decode_cpu")
  ap.add_argument("--results-dir")
  ap.add_argument("--also-python", nargs="*", default=[],
                  help="other interpreters (e.g. a venv with another jax) to time fdjax under "
                       "(float32)")
  ap.add_argument("--dtypes", nargs="+", default=["float32"], choices=list(DTYPES),
                  help="each run by fdjax and by HF eager in the same dtype")
  ap.add_argument("--hf-compile", action="store_true",
                  help="also HF with a static cache and torch.compile, in each dtype (where "
                       "it compiles: a dtype it does not is a row with the error)")
  ap.add_argument("--llamacpp", action="store_true",
                  help="also llama.cpp (llama-cpp-python) at batch 1, in each dtype, on the "
                       "model written as GGUF (bench/llamacpp.py; a row with the error where "
                       "it is not installed)")
  args = ap.parse_args()

  # (torch here, not above: --also-python's interpreters import this module without it)
  hf = common.random_llama(args)
  hf.generation_config.eos_token_id = None
  hf.generation_config.pad_token_id = 0
  params = sum(p.numel() for p in hf.parameters())
  rows = []
  read_bandwidth = common.read_bandwidth_timer()  # timed in each round: it drifts too
  hfs = {dtype: hf_variant(hf, dtype) for dtype in args.dtypes}
  with tempfile.TemporaryDirectory() as d:
    hf.save_pretrained(d)
    for b in args.batch:
      prompts = np.random.default_rng(b).integers(0, args.vocab, (b, args.prompt_len)).tolist()
      for dtype in args.dtypes:
        start = len(rows)
        ours_once, nbytes = fdjax_timer(d, b, args.vocab, args.prompt_len, args.new_tokens,
                                        dtype)
        prefills = []
        def fdjax_once():
          tokens_per_s, prefill = ours_once()
          prefills.append(prefill)
          return tokens_per_s
        timers = {"fdjax": fdjax_once, "read": read_bandwidth,  # the roofline, right after
                  "hf-eager": hf_timer(hfs[dtype], prompts, args.new_tokens)}
        compile_error = None
        llama_error = None
        if args.llamacpp and b == 1:
          llama_error = llamacpp.available()
          if not llama_error:
            timers["llama.cpp"], llama_error = llamacpp_timer(hf, d, dtype, prompts,
                                                              args.new_tokens)
        if args.hf_compile:
          try:
            timers["hf-compile"] = hf_timer(hf_compiled(hfs[dtype]), prompts, args.new_tokens)
          except Exception as e:  # "where it runs"
            compile_error = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        tps = interleaved(timers, args.iters)
        med = {name: float(np.median(v)) for name, v in tps.items()}
        def ratios(a, b):  # round by round
          return [x / y for x, y in zip(tps[a], tps[b])]
        ours, prefill_ms = med["fdjax"], float(np.median(prefills))
        shape = dict(params_m=round(params / 1e6, 1), batch=b, prompt_len=args.prompt_len,
                     new_tokens=args.new_tokens, dtype=dtype)
        gbps = nbytes * ours / b / 1e9  # bytes a step over the step's time
        roofline = [nbytes * t / b / r for t, r in zip(tps["fdjax"], tps["read"])]  # by round
        rows.append({**shape, "impl": f"fdjax-auto (jax {jax.__version__})",
                     "decode_tokens_per_s": ours, "prefill_ms": prefill_ms,
                     "speedup_vs_hf": float(np.median(ratios("fdjax", "hf-eager"))),
                     "min_speedup_vs_hf": min(ratios("fdjax", "hf-eager")),
                     "step_MB": nbytes / 1e6,
                     "GB_per_s": gbps, "read_GB_per_s": med["read"] / 1e9,
                     "roofline_pct": 100 * float(np.median(roofline))})
        for python in args.also_python if dtype == "float32" else ():
          version, other, pre = other_interpreter(python, d, args, b)
          rows.append({**shape, "impl": f"fdjax-auto (jax {version})",
                       "decode_tokens_per_s": other, "prefill_ms": pre,
                       "speedup_vs_hf": other / med["hf-eager"]})
        rows.append({**shape, "impl": "hf-eager", "decode_tokens_per_s": med["hf-eager"],
                     "speedup_vs_hf": 1.0})
        if args.hf_compile:
          row = {**shape, "impl": "hf-compile"}
          if compile_error:
            row["error"] = compile_error
          else:
            row.update(decode_tokens_per_s=med["hf-compile"],
                       speedup_vs_hf=float(np.median(ratios("hf-compile", "hf-eager"))))
            rows[start]["speedup_vs_hf_compile"] = float(
                np.median(ratios("fdjax", "hf-compile")))
          rows.append(row)
        if args.llamacpp and b == 1:
          row = {**shape, "impl": "llama.cpp"}
          if llama_error:
            row["error"] = llama_error
          else:
            import llama_cpp
            row.update(impl=f"llama.cpp (llama-cpp-python {llama_cpp.__version__})",
                       decode_tokens_per_s=med["llama.cpp"],
                       speedup_vs_hf=float(np.median(ratios("llama.cpp", "hf-eager"))))
            rows[start]["speedup_vs_llamacpp"] = float(np.median(ratios("fdjax", "llama.cpp")))
          rows.append(row)
        print(*rows[start:], flush=True)
  notes = ("Each dtype side by side: fdjax loads the checkpoint with load_pretrained's dtype / "
           "quantize (int8: float32 activations, int8 linear weights; on this CPU the int8 x "
           "int8 dot of fdjax.ops.cpu_linear); HF eager is the same model in PyTorch (bfloat16: "
           ".to(torch.bfloat16); int8: torch.ao quantize_dynamic on every linear but the LM "
           "head). speedup_vs_hf: against HF eager in the same dtype, same batch; "
           "hf-compile (--hf-compile): HF with a static cache and torch.compile of its forward "
           "(mode reduce-overhead, fullgraph), compiled in the run before timing, and "
           "speedup_vs_hf_compile fdjax's against it. The implementations are timed in turn, "
           "--iters rounds of one run each, so that each round's ratio sees the machine alike: "
           "speedups are the median of the rounds' ratios, min_speedup_vs_hf the lowest. "
           "Decode tokens/s: medians of the rounds; HF: (time for N tokens - time for 1) / "
           "(N - 1) steps; fdjax: generate's own decode time (after the prefill). step_MB: "
           "what an fdjax decode step reads (every weight but the embedding table, as stored, "
           "one embedding row a token, and the keys and values at the generation's middle); "
           "GB_per_s: that over the step's time; read_GB_per_s: this machine's read bandwidth "
           "(jnp.sum of a 256 MiB float32 array), measured in each round right after fdjax's "
           "run, median of the rounds; roofline_pct: the median over the rounds of the step's "
           "GB/s over that round's read bandwidth.")
  columns = ["impl", "dtype", "params_m", "batch", "prompt_len", "new_tokens",
             "decode_tokens_per_s", "prefill_ms", "speedup_vs_hf", "min_speedup_vs_hf", "step_MB",
             "GB_per_s", "read_GB_per_s", "roofline_pct"]
  if args.hf_compile:
    columns += ["speedup_vs_hf_compile"]
  if args.llamacpp:
    columns += ["speedup_vs_llamacpp"]
  if args.hf_compile or args.llamacpp:
    columns += ["error"]
  table = common.write_results(args.name, rows, columns, notes, results_dir=args.results_dir)
  print(table)


if __name__ == "__main__":
  main()
