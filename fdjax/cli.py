"""The command line: `python -m fdjax generate PROMPT ...` and friends."""
from __future__ import annotations

import argparse
import os
import sys


def _positive(text: str) -> int:
  """An argparse type: an integer of at least 1 (a count, a size, a length)."""
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
  return value


def _load(args):
  """(model, tokenizer, label) from --model DIR, --preset NAME, or the bundled model."""
  import jax.numpy as jnp

  from fdjax.io import loading
  loaded = loading.load(args.model, preset=args.preset,
                        dtype=None if args.dtype is None else jnp.dtype(args.dtype),
                        quantize=getattr(args, "quantize", None), mesh=_mesh(args),
                        seed=args.seed)
  return loaded.model, loaded.tokenizer, loaded.label, loaded.path


CLI_SAMPLING = {"temperature": 0.8, "top_k": 40}  # fdjax generate's, for the bundled model


def _generate_sampling(args, path) -> dict:
  """temperature, top_k, top_p, min_p and repetition_penalty for `fdjax generate`: the flags
  given, then the model's generation_config.json where it recommends any sampling (what it
  leaves out: off), else CLI_SAMPLING (no penalty); its repetition_penalty applies either way,
  as in transformers' generate."""
  from fdjax.io import generation_config
  recommended = generation_config.sampling_defaults(path)
  names = ("temperature", "top_k", "top_p", "min_p")
  defaults = {k: v for k, v in recommended.items() if k in names} or CLI_SAMPLING
  if "repetition_penalty" in recommended:
    defaults = {**defaults, "repetition_penalty": recommended["repetition_penalty"]}
  names += ("repetition_penalty",)
  return generation_config.resolve({k: getattr(args, k) for k in names}, defaults, names)


def _devices(args):
  """Before the command starts JAX, for a mesh (--tp / --dp): joins the other hosts'
  processes where the environment describes a multi-host job (fdjax.io.mesh.initialize);
  else asks for tp * dp CPU devices (fdjax.io.mesh.cpu_devices: on a CPU, the cores split
  among them; a count set in XLA_FLAGS stays)."""
  tp, dp = getattr(args, "tp", 1), getattr(args, "dp", 1)
  if tp * dp > 1:
    from fdjax.io import mesh as meshes
    if not meshes.initialize():
      meshes.cpu_devices(tp * dp)


def _mesh(args):
  """The mesh --tp / --dp ask for (None: one device); main's _devices has made the
  devices."""
  tp, dp = getattr(args, "tp", 1), getattr(args, "dp", 1)
  from fdjax.io import mesh as meshes
  meshes.initialize()
  return None if (tp, dp) == (1, 1) else meshes.make_mesh(tp=tp, dp=dp)


def _mesh_args(p):
  p.add_argument("--tp", type=int, default=1, help="tensor-parallel devices (the mesh's "
                 "\"model\" axis)")
  p.add_argument("--dp", type=int, default=1, help="data-parallel replicas splitting the "
                 "batch (the mesh's \"data\" axis); tp * dp must be the device count (on a "
                 "CPU, the cores are split into tp * dp devices)")


def cmd_generate(args):
  from fdjax import runtime
  if args.command_buffers:
    runtime.enable_command_buffers()
  runtime.use_compile_cache(args.compile_cache)
  from fdjax.engine.decode_loop import generate
  from fdjax.ops import dispatch
  model, tok, label, path = _load(args)
  ids = tok.encode(args.prompt)
  if not ids:
    raise ValueError("the prompt encodes to no tokens")
  eos = tok.eos_token_id if args.eos_token_id is None else args.eos_token_id
  spec = _speculation(args, model, tok)
  res = generate(model, [ids], max_new_tokens=args.max_new_tokens,
                 **_generate_sampling(args, path), eos_token_id=eos, seed=args.seed,
                 page_size=args.page_size, prefill_chunk=args.prefill_chunk, speculative=spec)
  from fdjax.engine.detokenize import continuation  # keeps the space before the first word
  print(args.prompt + continuation(tok, ids, res.tokens[0]))  # (SentencePiece strips it)
  from models import quantize as quantization
  local = getattr(model, "local", model)  # on a mesh: what each device runs (local shapes)
  q = quantization.of(local)
  impls = "; ".join(f"{op}={how}" for op, how in dispatch.describe(
      local.config, dtype=model.dtype, quantization=q and q.method).items())
  where = f", mesh dp={model.dp} tp={model.tp}" if local is not model else ""
  drafts = (f"speculative={spec.label} drafted={res.drafted} accepted={res.accepted} "
            if spec else "")
  print(f"[model {label}{f', {q.method} weights' if q else ''}{where}] "
        f"prompt_tokens={res.prompt_tokens} new_tokens={res.new_tokens} "
        f"prefill_ms={res.prefill_s * 1e3:.1f} decode_tok_s={res.decode_tokens_per_s:.1f} "
        f"(first call: compiling included, or loading from a compile cache) "
        f"{drafts}impl: {impls}")


def _speculation(args, model, tok):
  """The Speculation --speculative / --draft-model / --num-speculative-tokens ask for."""
  import jax.numpy as jnp

  from fdjax.engine import speculative
  return speculative.from_flags(args.speculative, args.draft_model, args.num_speculative_tokens,
                                model, tok, quantize=getattr(args, "quantize", None),
                                dtype=None if args.dtype is None else jnp.dtype(args.dtype))


def _speculative_args(p):
  p.add_argument("--speculative", metavar="SPEC", help="speculative decoding: ngram:k=K,n=N "
                 "(prompt lookup) or draft:k=K (with --draft-model)")
  p.add_argument("--draft-model", metavar="DIR", help="a smaller checkpoint with the target's "
                 "tokenizer that drafts tokens (implies --speculative draft:k=4)")
  p.add_argument("--num-speculative-tokens", type=int, metavar="K", help="tokens drafted per "
                 "round (k; default 4)")


def cmd_calibrate(args):
  from fdjax.io import checkpoint, tokenizer
  from fdjax.tuning import calibrate
  model = checkpoint.load_pretrained(args.model)
  try:
    tok = tokenizer.load_tokenizer(args.model)
  except ValueError:
    tok = None
  length = min(args.prompt_len, model.config.max_position_embeddings)  # the model's context
  prompts = calibrate.sample_prompts(tok, model.config.vocab_size, args.num_prompts, length,
                                     args.seed)
  record = calibrate.calibrate(model, prompts)
  for i, (phi, (lo, hi)) in enumerate(zip(record["phi"], record["row_max_range"])):
    print(f"layer {i}: row-max scores in [{lo:.2f}, {hi:.2f}] -> phi = {phi:.2f}")
  print(f"wrote {calibrate.save(args.model, record)}")


def cmd_tune(args):
  import jax

  from fdjax.io import checkpoint
  from fdjax.tuning import tune
  from models import presets
  on_cpu = jax.default_backend() == "cpu"
  if on_cpu and not args.allow_cpu and not args.moe:
    raise ValueError("tune profiles GPU or TPU kernels; on a CPU they only run in interpret "
                     "mode and the timings mean nothing (pass --allow-cpu to do it anyway)")
  if bool(args.model) == bool(args.preset):
    raise ValueError("give exactly one of --model DIR and --preset NAME")
  cfg = presets.get(args.preset) if args.preset else checkpoint.load_config(args.model)
  if args.moe:
    print("wrote " + tune.tune_moe(cfg, args.tokens or tune.MOE_TOKENS, dtype=args.dtype,
                                   iters=args.iters, out=args.out, quantization=args.quantize))
    return
  ms = args.ms or [m for m in tune.PROFILE_MS if m <= args.max_m]
  print("wrote " + tune.tune_model(cfg, ms, dtype=args.dtype, iters=args.iters, out=args.out,
                                   quantization=args.quantize))


def cmd_train(args):
  from fdjax.training import train
  train.train_and_save(**{k: v for k, v in vars(args).items() if k not in ("command", "fn")})


def cmd_bench(args):
  import runpy
  name = {"gpu": "gpu_suite", "check": "gpu_check", "kernels": "kernels_h100"}.get(args.name,
                                                                              args.name)
  script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench",
                        f"{name}.py")
  if not os.path.exists(script):
    raise ValueError(f"no benchmark script {script} (run from a checkout of fdjax)")
  sys.argv = [script] + args.rest
  runpy.run_path(script, run_name="__main__")


def cmd_serve(args):
  import dataclasses

  from fdjax.serving import server
  server.check_dependencies()
  import jax.numpy as jnp

  from fdjax import runtime
  from fdjax.serving import auth, cors
  from fdjax.serving.limits import Limits
  cache = runtime.use_compile_cache(args.compile_cache)
  print(f"fdjax serve: compiled programs kept in {cache} (--compile-cache DIR|off)"
        if cache else "fdjax serve: no compilation cache (--compile-cache off)", flush=True)
  server.serve(args.model, host=args.host, port=args.port,
               served_model_name=args.served_model_name,
               dtype=None if args.dtype is None else jnp.dtype(args.dtype),
               quantize=args.quantize, warmup=args.warmup, mesh=_mesh(args),
               log_level=args.log_level, strict_fields=args.strict_fields,
               logprobs_mode=args.logprobs_mode, generation_config=args.generation_config,
               max_stored_responses=args.max_stored_responses,
               reasoning_parser=args.reasoning_parser, pooling=args.pooling,
               cors=cors.Cors(args.allowed_origins, args.allowed_methods,
                              args.allowed_headers, args.allow_credentials),
               api_keys=auth.keys_from(args.api_key, os.environ),
               metrics_require_key=args.metrics_require_key,
               limits=Limits(**{f.name: getattr(args, "max_" + f.name)
                                for f in dataclasses.fields(Limits)}),
               max_batch=args.max_batch, max_queue=args.max_queue,
               page_size=args.page_size, num_pages=args.num_pages,
               max_model_len=args.max_model_len, prefill_chunk=args.prefill_chunk,
               steps_per_call=args.steps_per_call, speculative=args.speculative,
               draft_model=args.draft_model, num_speculative_tokens=args.num_speculative_tokens)


def _json_list(text: str) -> tuple[str, ...]:
  """An argparse type: a JSON list of strings (fdjax.serving.cors.json_list)."""
  from fdjax.serving import cors
  try:
    return cors.json_list(text)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from None


def _cors_args(p):
  """vLLM's CORS flags (fdjax.serving.cors): JSON lists, the default any."""
  p.add_argument("--allowed-origins", type=_json_list, default=("*",), metavar="JSON",
                 help="browser origins that may call the API, a JSON list (default "
                 "'[\"*\"]': any; '[]': none)")
  p.add_argument("--allowed-methods", type=_json_list, default=("*",), metavar="JSON",
                 help="their allowed methods (default '[\"*\"]')")
  p.add_argument("--allowed-headers", type=_json_list, default=("*",), metavar="JSON",
                 help="their allowed request headers (default '[\"*\"]')")
  p.add_argument("--allow-credentials", action="store_true",
                 help="let browsers send cookies and credentials cross-origin")


def _limit_args(p):
  """--max-<limit> for every field of fdjax.serving.limits.Limits, its default the default."""
  import dataclasses

  from fdjax.serving.limits import Limits, flag
  for f in dataclasses.fields(Limits):
    p.add_argument(f"--max-{flag(f.name)}", dest=f"max_{f.name}", type=int, default=f.default,
                   help=f"request limit (default {f.default})")


def _model_args(p):
  p.add_argument("--model", help="model directory (Hugging Face or fdjax checkpoint)")
  p.add_argument("--preset", help="a named random-weight model shape instead of --model")
  p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
  p.add_argument("--seed", type=int, default=0)


def _quantize_arg(p):
  p.add_argument("--quantize", choices=["int8", "int4"],
                 help="weight-only quantization of the linear layers and a mixture of "
                 "experts' experts (at load; a checkpoint saved quantized is used as it is)")


def _compile_cache_arg(p, why):
  p.add_argument("--compile-cache", default="default", metavar="DIR|off", help="JAX's "
                 "persistent compilation cache (default: $FDJAX_COMPILE_CACHE, else "
                 f"~/.cache/fdjax/xla): {why}")


def build_parser():
  parser = argparse.ArgumentParser(prog="fdjax", description=__doc__)
  sub = parser.add_subparsers(dest="command", required=True)
  g = sub.add_parser("generate", help="generate text from a prompt")
  g.add_argument("prompt")
  _model_args(g)
  g.add_argument("--max-new-tokens", type=_positive, default=128)
  # Sampling by default (seeded, so repeatable): greedy decoding of a small byte-level model
  # tends to repeat one byte (the bundled one keeps indenting). --temperature 0 is greedy.
  # A checkpoint's generation_config.json, where it recommends sampling, replaces the
  # defaults (as in transformers' generate and vLLM).
  g.add_argument("--temperature", type=float, help="0 is greedy (default: the model's "
                 "generation_config.json, else 0.8; seeded: repeatable)")
  g.add_argument("--top-k", type=int, help="(default: generation_config.json's, else 40)")
  g.add_argument("--top-p", type=float, help="(default: generation_config.json's, else 1)")
  g.add_argument("--min-p", type=float, help="cut tokens less likely than this times the "
                 "likeliest (default: generation_config.json's, else 0)")
  g.add_argument("--repetition-penalty", type=float, help="divide the logits of the tokens "
                 "already in the text by this where positive, else multiply (transformers'; "
                 "default: generation_config.json's, else 1: off)")
  g.add_argument("--eos-token-id", type=int)
  g.add_argument("--page-size", type=_positive, default=64, help="KV-cache page size in tokens")
  g.add_argument("--prefill-chunk", type=_positive, help="prefill the prompt this many tokens at a "
                 "time (default: at once)")
  _quantize_arg(g)
  _speculative_args(g)
  g.add_argument("--command-buffers", action="store_true",
                 help="put Pallas calls into XLA command buffers (GPU; see fdjax/runtime.py)")
  _mesh_args(g)
  _compile_cache_arg(g, "a second run loads what the first compiled")
  g.set_defaults(fn=cmd_generate)
  s = sub.add_parser("serve", help="an OpenAI-compatible server (continuous batching, "
                     "streaming, chat templates)")
  s.add_argument("--model", help="model directory (default: the bundled model)")
  s.add_argument("--host", default="127.0.0.1")
  s.add_argument("--port", type=int, default=8000)
  s.add_argument("--served-model-name", help="the name clients pass as `model` (default: "
                 "the directory's name; fdjax-default for the bundled model)")
  s.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
  _quantize_arg(s)
  s.add_argument("--max-batch", type=int, default=16, help="requests decoded together "
                 "(with --dp, shared among the data replicas)")
  s.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond the "
                 "batch; more are refused with 429")
  s.add_argument("--page-size", type=int, default=16, help="KV-cache page size in tokens")
  s.add_argument("--num-pages", type=int, help="KV-cache pages, in each data replica with "
                 "--dp (default: its share of max-batch full contexts)")
  s.add_argument("--max-model-len", type=int, help="context per request (default: the "
                 "model's)")
  s.add_argument("--prefill-chunk", type=int, default=128, help="prompt tokens per prefill "
                 "step")
  s.add_argument("--steps-per-call", type=int, default=8, help="decode steps per host round "
                 "trip when no request waits")
  _speculative_args(s)
  s.add_argument("--warmup", action="store_true", help="compile every batch/chunk shape "
                 "first (the port opens at once; /health answers 503 until done)")
  _compile_cache_arg(s, "a second start loads what the first compiled")
  s.add_argument("--generation-config", default="auto", metavar="auto|vllm|DIR",
                 help="the sampling a request leaves out (temperature, top_p, top_k, min_p, "
                 "repetition_penalty; max_tokens of chat): auto, the model's "
                 "generation_config.json, as vLLM; vllm, OpenAI's neutral defaults; or the "
                 "generation_config.json of DIR")
  s.add_argument("--logprobs-mode", default="raw_logprobs",
                 help="what returned logprobs are of: the model's distribution (raw_logprobs, "
                 "vLLM's default) or the one each token was drawn from, after the penalties, "
                 "logit_bias, temperature, top_k and top_p (processed_logprobs); *_logits: "
                 "the logits instead")
  s.add_argument("--reasoning-parser", choices=["deepseek_r1", "qwen3"],
                 help="split a thinking model's <think> reasoning off its answer: chat's "
                 "reasoning_content (and reasoning), the Responses API's reasoning item "
                 "(vLLM's flag)")
  s.add_argument("--pooling", choices=["last", "mean", "cls"],
                 help="how /v1/embeddings pools a text's final hidden states (default: the "
                 "checkpoint's sentence-transformers modules.json, else the last token's); "
                 "normalized unless those files leave their Normalize module out")
  s.add_argument("--max-stored-responses", type=int, default=1000, metavar="N",
                 help="Responses API answers kept in memory for previous_response_id and GET "
                 "/v1/responses/{id} (the newest N; default 1000)")
  s.add_argument("--strict-fields", action="store_true", help="refuse the client extras "
                 "fdjax ignores by default (store, metadata, user, service_tier, ...: "
                 "fdjax.serving.api.IGNORED)")
  s.add_argument("--api-key", action="append", metavar="KEY", help="a key clients must "
                 "send as 'Authorization: Bearer KEY' on /v1 (repeatable; also "
                 "$FDJAX_API_KEY)")
  s.add_argument("--metrics-require-key", action="store_true", help="/metrics needs a key too")
  _cors_args(s)
  _limit_args(s)
  s.add_argument("--log-level", default="info")
  _mesh_args(s)
  s.set_defaults(fn=cmd_serve)
  c = sub.add_parser("calibrate", help="choose the async softmax's phi per layer")
  c.add_argument("--model", required=True)
  c.add_argument("--num-prompts", type=_positive, default=4)
  c.add_argument("--prompt-len", type=_positive, default=256)
  c.add_argument("--seed", type=int, default=0)
  c.set_defaults(fn=cmd_calibrate)
  t = sub.add_parser("tune", help="profile GEMV / flat GEMM / XLA crossovers per weight shape")
  t.add_argument("--model")
  t.add_argument("--preset")
  t.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
  t.add_argument("--max-m", type=_positive, default=64)
  t.add_argument("--ms", type=_positive, nargs="+", help="the M values to profile (default: "
                 "tune.PROFILE_MS up to --max-m)")
  t.add_argument("--iters", type=_positive, default=20)
  t.add_argument("--quantize", choices=["int8", "int4"],
                 help="tune the int8 / int4 kernels (table keys KxN:int8 / KxN:int4)")
  t.add_argument("--out", help="table file (default: fdjax/ops/tables/<device>.json)")
  t.add_argument("--allow-cpu", action="store_true")
  t.add_argument("--moe", action="store_true", help="time the model's mixture-of-experts layer "
                 "(the grouped tiles against every expert on every token) by tokens instead, "
                 "and write the table's \"moe\" entry (real timings on a CPU too: XLA runs it)")
  t.add_argument("--tokens", type=_positive, nargs="+", help="with --moe: the token counts to time "
                 "(default: 1 2 4 8 16 32 64)")
  t.set_defaults(fn=cmd_tune)
  tr = sub.add_parser("train", help="train a model with optax (byte-level text or a task)")
  tr.add_argument("--data", required=True, dest="data_name",
                  choices=["stdlib", "files", "flipflop", "selective_copy", "counting"])
  tr.add_argument("--files", nargs="*")
  tr.add_argument("--variables", type=_positive, default=1, help="counting: 1, 3 or 5")
  tr.add_argument("--out", required=True)
  tr.add_argument("--steps", type=_positive, default=1000)
  tr.add_argument("--batch", type=_positive, default=16)
  tr.add_argument("--seq-len", type=_positive, default=256)
  tr.add_argument("--lr", type=float, default=3e-3)
  tr.add_argument("--warmup", type=int, default=100)
  tr.add_argument("--layers", type=_positive, default=4)
  tr.add_argument("--hidden", type=_positive, default=256)
  tr.add_argument("--heads", type=_positive, default=4)
  tr.add_argument("--kv-heads", type=_positive)
  tr.add_argument("--intermediate", type=_positive, default=704)
  tr.add_argument("--pe", default="cope", choices=["cope", "cope_rope", "rope", "none",
                                                   "absolute"])
  tr.add_argument("--npos-max", type=_positive, default=64)
  tr.add_argument("--cope-gates", default="key", choices=["key", "value", "separate"],
                  help="CoPE's gates from the keys (the paper), the values or keys of their own")
  tr.add_argument("--cope-pos-scaled", action="store_true",
                  help="CoPE's position logits added before the 1/sqrt(d) scale (the official "
                       "code's default) instead of after (the paper's appendix)")
  tr.add_argument("--max-len", type=_positive, default=2048)
  tr.add_argument("--tie", action="store_true", help="tie input and output embeddings")
  tr.add_argument("--eval-every", type=_positive, default=250)
  tr.add_argument("--eval-batches", type=_positive, default=8)
  tr.add_argument("--seed", type=int, default=0)
  tr.set_defaults(fn=cmd_train)
  bn = sub.add_parser("bench", help="run a benchmark from bench/ (gpu: the whole GPU suite, "
                      "check: every kernel against the reference, kernels: every kernel's "
                      "registers and shared memory compiled for the H100, serve: the server "
                      "under load, e2e, ...)")
  bn.add_argument("name", choices=["gpu", "check", "kernels", "e2e", "attention", "gemm",
                                   "decode", "cope_tasks", "cope_counting", "serve",
                                   "quantization", "paged_memory"])
  bn.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own arguments")
  bn.set_defaults(fn=cmd_bench)
  return parser


def main(argv=None):
  args = build_parser().parse_args(argv)
  try:
    _devices(args)
    args.fn(args)
  except (ValueError, OSError) as e:  # bad input, or a path that cannot be read or written
    print(f"fdjax: error: {e}", file=sys.stderr)
    return 2
  return 0
