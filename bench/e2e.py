"""End-to-end decoding: fdjax against Hugging Face transformers with the roofline, one run.

  python bench/e2e.py                 # Llama-2-7B and Llama-3-8B shapes, random bf16, a GPU
  python bench/e2e.py --cpu           # a small model on this machine

impls: fdjax-auto (dispatch's choice), fdjax-xla (XLA only), hf-eager (transformers, eager
PyTorch), hf-compile (transformers with a static cache and torch.compile: the gpt-fast
recipe). On a GPU, fdjax also runs with Pallas calls in XLA command buffers
(fdjax-auto-cmdbuf). Each group runs in its own process (JAX and PyTorch do not share the
GPU's memory well, and XLA_FLAGS are per process). Roofline: (weight bytes + KV bytes read
per step) / measured copy bandwidth. The breakdown times a step's linear layers and its
attention on their own; "other" is the rest of the step.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CPU_MODEL = dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_layers=4,
                 num_heads=8, num_kv_heads=2, head_dim=32, max_position_embeddings=2048)


def _configs(args):
  from models import ModelConfig, presets
  if args.cpu:
    return {"small-gqa": ModelConfig(**CPU_MODEL)}
  configs = {name: presets.get(name) for name in args.models}
  moe = [name for name, cfg in configs.items() if cfg.num_experts]
  if moe:  # its roofline and HF baseline are a dense Llama's: bench/moe.py times experts
    raise SystemExit(f"e2e: {moe} are mixtures of experts, which this benchmark does not "
                     f"model (bench/moe.py times their experts)")
  return configs


def _kv_bytes(cfg, b, ctx, itemsize):
  return 2 * cfg.num_layers * b * ctx * cfg.num_kv_heads * cfg.head_dim * itemsize


def _param_bytes(cfg, itemsize):
  h, d, f, v = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size, cfg.vocab_size
  per_layer = h * (cfg.num_heads + 2 * cfg.num_kv_heads) * d + cfg.num_heads * d * h + 3 * h * f
  return itemsize * (cfg.num_layers * (per_layer + 2 * h) + 2 * v * h + h)


# ------------------------------------------------------------------------------ fdjax

def _breakdown(model, b, ctx, iters):
  """(linear ms, attention ms) of one decode step, each timed on its own."""
  import jax
  import jax.numpy as jnp

  from bench import common
  from fdjax.ops import dispatch
  cfg, dt = model.config, model.dtype
  key = jax.random.key(1)
  x = jax.random.normal(key, (b, cfg.hidden_size), dt)
  xo = jax.random.normal(key, (b, cfg.num_heads * cfg.head_dim), dt)
  xf = jax.random.normal(key, (b, cfg.intermediate_size), dt)
  weights = [(l.attn.wqkv[...], l.attn.wo[...], l.mlp.w_gate_up[...], l.mlp.w_down[...])
             for l in model.layers]
  head = model.lm_head[...]

  @jax.jit
  def linears(weights, head):
    outs = [dispatch.linear(x, head)]
    for wqkv, wo, wgu, wd in weights:
      outs += [dispatch.linear(x, wqkv), dispatch.linear(xo, wo), dispatch.linear(x, wgu),
               dispatch.linear(xf, wd)]
    return outs

  kc = jax.random.normal(key, (b, ctx, cfg.num_kv_heads, cfg.head_dim), dt)
  qs = jax.random.normal(key, (cfg.num_layers, b, cfg.num_heads, cfg.head_dim), dt)
  lengths = jnp.full((b,), ctx, jnp.int32)

  @jax.jit
  def attention(qs, kc):
    return [dispatch.decode_attention(qs[i], kc, kc, lengths) for i in range(cfg.num_layers)]

  t_lin = common.median_seconds(lambda: jax.block_until_ready(linears(weights, head)),
                                iters=iters)
  t_att = common.median_seconds(lambda: jax.block_until_ready(attention(qs, kc)), iters=iters)
  return t_lin * 1e3, t_att * 1e3


def worker_fdjax(args, impls):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  import fdjax
  from fdjax.ops import dispatch
  from fdjax.tuning import timing
  from models import Transformer
  on_gpu = jax.default_backend() == "gpu"
  bw = timing.copy_bandwidth_gbps(1 << 30 if on_gpu else 1 << 24)
  dtype = jnp.bfloat16 if on_gpu else jnp.float32
  rows = []
  for name, cfg in _configs(args).items():
    model = Transformer(cfg, rngs=nnx.Rngs(0), dtype=dtype)
    itemsize = jnp.dtype(dtype).itemsize
    for impl in impls:
      for b in args.batch:
        for p in args.prompt_len:
          rng = np.random.default_rng(b * 1000 + p)
          prompts = rng.integers(0, cfg.vocab_size, (b, p)).tolist()
          run = lambda n=args.new_tokens: fdjax.generate(model, prompts, max_new_tokens=n)
          with dispatch.using("xla" if impl == "fdjax-xla" else "auto"):
            run(), run(1)  # compile
            res = [run() for _ in range(args.repeats)]
            first = [_wall(run, 1) for _ in range(args.repeats)]
          step_s = float(np.median([r.decode_s / max(r.decode_steps, 1) for r in res]))
          ctx = p + args.new_tokens // 2
          step_bytes = _param_bytes(cfg, itemsize) + _kv_bytes(cfg, b, ctx, itemsize)
          row = dict(model=name, impl=impl + args.tag, batch=b, prompt_len=p,
                     new_tokens=args.new_tokens, dtype=str(jnp.dtype(dtype)),
                     ttft_ms=float(np.median(first)) * 1e3,
                     prefill_ms=float(np.median([r.prefill_s for r in res])) * 1e3,
                     decode_ms_per_token=step_s * 1e3, decode_tokens_per_s=b / step_s,
                     roofline_fraction=step_bytes / step_s / 1e9 / bw, copy_gbps=bw)
          if impl == "fdjax-auto" and not args.tag and not args.quick:
            with dispatch.using("auto"):
              lin, att = _breakdown(model, b, ctx, max(3, args.repeats))
            row.update(breakdown_linear_ms=lin, breakdown_attention_ms=att,
                       breakdown_other_ms=max(step_s * 1e3 - lin - att, 0.0))
          rows.append(row)
          print(json.dumps(row), flush=True)
    del model
  return rows


def _wall(fn, *args) -> float:
  """Seconds of one call of fn(*args), as worker_hf times transformers' generate."""
  t0 = time.perf_counter()
  fn(*args)
  return time.perf_counter() - t0


# ---------------------------------------------------------------------- Hugging Face

def worker_hf(args, impls):
  import numpy as np
  import torch
  import transformers
  on_gpu = torch.cuda.is_available()
  dev = "cuda" if on_gpu else "cpu"
  dtype = torch.bfloat16 if on_gpu else torch.float32
  rows = []
  for name, cfg in _configs(args).items():
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position_embeddings)
    with torch.device(dev):
      model = transformers.LlamaForCausalLM(hf_cfg).to(dtype).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    for impl in impls:
      if impl == "hf-compile":
        model.generation_config.cache_implementation = "static"
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
      for b in args.batch:
        for p in args.prompt_len:
          ids = torch.randint(0, cfg.vocab_size, (b, p), device=dev)
          def timed(n):
            if on_gpu:
              torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.no_grad():
              model.generate(ids, do_sample=False, max_new_tokens=n, min_new_tokens=n)
            if on_gpu:
              torch.cuda.synchronize()
            return time.perf_counter() - t0
          row = dict(model=name, impl=impl, batch=b, prompt_len=p, new_tokens=args.new_tokens,
                     dtype=str(dtype).replace("torch.", ""))
          try:
            timed(args.new_tokens)  # warm-up (and compile)
            full = float(np.median([timed(args.new_tokens) for _ in range(args.repeats)]))
            first = float(np.median([timed(1) for _ in range(args.repeats)]))
          except Exception as e:  # "where it works"
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
            continue
          step = (full - first) / (args.new_tokens - 1)
          row.update(ttft_ms=first * 1e3, decode_ms_per_token=step * 1e3,
                     decode_tokens_per_s=b / step)
          rows.append(row)
          print(json.dumps(row), flush=True)
    del model
  return rows


# -------------------------------------------------------------------------- driver

def _spawn(args, worker, impls, env_extra=None, tag=""):
  with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
    out = fh.name
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", worker, "--out", out,
         "--impls", *impls, "--batch", *map(str, args.batch),
         "--prompt-len", *map(str, args.prompt_len), "--new-tokens", str(args.new_tokens),
         "--repeats", str(args.repeats), "--models", *args.models] + (
             ["--cpu"] if args.cpu else []) + (["--quick"] if args.quick else [])
  if tag:
    cmd += ["--tag", tag]
  env = {**os.environ, "PYTHONPATH": ROOT, **(env_extra or {})}
  r = subprocess.run(cmd, env=env, text=True, capture_output=True)
  sys.stderr.write(r.stderr[-4000:] if r.returncode else "")
  if r.returncode:
    return [dict(impl=i + tag, error=f"worker exited {r.returncode}: "
                 f"{(r.stderr.strip().splitlines() or [''])[-1][:200]}") for i in impls]
  with open(out) as fh:
    rows = json.load(fh)
  os.unlink(out)
  return rows


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--cpu", action="store_true", help="the small CPU form")
  ap.add_argument("--models", nargs="+", default=["llama-2-7b", "llama-3-8b"])
  ap.add_argument("--batch", type=int, nargs="+")
  ap.add_argument("--prompt-len", type=int, nargs="+")
  ap.add_argument("--new-tokens", type=int)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--impls", nargs="+")
  ap.add_argument("--results-dir")
  ap.add_argument("--worker", choices=["fdjax", "hf"])
  ap.add_argument("--out")
  ap.add_argument("--tag", default="")
  ap.add_argument("--quick", action="store_true",
                  help="no command-buffer variant and no breakdown (each compiles the model "
                       "again: minutes for a 7B one on a GPU)")
  args = ap.parse_args()
  args.batch = args.batch or ([1, 4] if args.cpu else [1, 4, 8, 16])
  args.prompt_len = args.prompt_len or ([32, 128] if args.cpu else [128, 1024])
  args.new_tokens = args.new_tokens or (32 if args.cpu else 256)

  if args.worker:
    rows = (worker_fdjax if args.worker == "fdjax" else worker_hf)(args, args.impls)
    with open(args.out, "w") as fh:
      json.dump(rows, fh)
    return

  import jax

  from bench import common
  on_gpu = not args.cpu and jax.default_backend() == "gpu"
  impls = args.impls or ["fdjax-auto", "fdjax-xla", "hf-eager", "hf-compile"]
  ours = [i for i in impls if i.startswith("fdjax")]
  hf = [i for i in impls if i.startswith("hf")]
  rows = _spawn(args, "fdjax", ours) if ours else []
  if on_gpu and "fdjax-auto" in ours and not args.quick:
    from fdjax import runtime
    flags = (os.environ.get("XLA_FLAGS", "") + " " + runtime.COMMAND_BUFFER_FLAG).strip()
    rows += _spawn(args, "fdjax", ["fdjax-auto"], {"XLA_FLAGS": flags}, tag="-cmdbuf")
  if hf:
    rows += _spawn(args, "hf", hf)

  def base(r, impl):
    return next((o for o in rows if o.get("impl") == impl and o.get("model") == r.get("model")
                 and o.get("batch") == r.get("batch") and o.get("prompt_len") ==
                 r.get("prompt_len") and "decode_ms_per_token" in o), None)
  for r in rows:
    if r.get("impl", "").startswith("fdjax") and "decode_ms_per_token" in r:
      for other in ("hf-eager", "hf-compile", "fdjax-xla"):
        o = base(r, other)
        if o and other != r["impl"]:
          r[f"speedup_vs_{other}"] = o["decode_ms_per_token"] / r["decode_ms_per_token"]
  shown = [r for r in rows if r.get("impl") == "fdjax-auto" and "decode_ms_per_token" in r]
  groups = [f"{r['model']} b{r['batch']} p{r['prompt_len']}" for r in shown]
  series = {i: [(base(r, i) or {}).get("decode_tokens_per_s", float("nan")) for r in shown]
            for i in sorted({r.get("impl") for r in rows if r.get("impl")})}
  plot = common.svg_bars(f"decode tokens/s ({common.device_name()})", groups, series,
                         "tokens/s (higher is better)")
  cols = ["model", "impl", "batch", "prompt_len", "new_tokens", "ttft_ms", "prefill_ms",
          "decode_ms_per_token", "decode_tokens_per_s", "roofline_fraction",
          "speedup_vs_hf-eager", "speedup_vs_hf-compile", "breakdown_linear_ms",
          "breakdown_attention_ms", "breakdown_other_ms", "error"]
  bw = next((r["copy_gbps"] for r in rows if "copy_gbps" in r), float("nan"))
  notes = ("ttft_ms: the median wall time of a whole generate call for one new token, for "
           "every engine (fdjax's host work included: splitting the model, making the cache, "
           "dispatching); prefill_ms: fdjax's prefill and first token alone "
           "(GenerationResult.prefill_s, in the full runs). "
           f"Measured copy bandwidth: {bw:.0f} GB/s. roofline_fraction = (weight bytes + KV "
           "bytes read per decode step) / step time / copy bandwidth. The breakdown times one "
           "step's linear layers and attention on their own; other = step - both.")
  if args.cpu:
    notes += (" CPU form: the small model's weights fit in the CPU caches, so the fraction of "
              "the DRAM copy bandwidth can exceed 1; it is a roofline only for models larger "
              "than the caches.")
  print(common.write_results("e2e_cpu" if args.cpu else "e2e", rows, cols, notes,
                             results_dir=args.results_dir, plot=plot))


if __name__ == "__main__":
  main()
