"""The benchmarks' CPU forms run end to end and write the promised fields (no timing is
asserted: these only keep the scripts from rotting)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

# The benchmarks' CPU forms take minutes: they run apart from the README's test command, in
# .ci/run's second step, beside the compile and many-device tests.
pytestmark = pytest.mark.bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ["device", "jax_version", "date", "command"]


def _run(script, tmp_path, *args):
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), *args,
                      "--results-dir", str(tmp_path)], capture_output=True, text=True, env=env,
                     cwd=ROOT, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  return r


def _rows(tmp_path, name):
  with open(tmp_path / f"{name}.json") as fh:
    data = json.load(fh)
  assert data["command"] and data["rows"]
  assert (tmp_path / f"{name}.md").exists()
  return data["rows"]


def test_gpu_suite_reports_a_failing_part_and_goes_on(tmp_path):
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_suite.py"), "--dry-run",
                      "--parts", "gemm", "env", "--extra", "gemm=--no-such-flag",
                      "--results-dir", str(tmp_path)], capture_output=True, text=True, env=env,
                     cwd=ROOT, timeout=600)
  assert r.returncode == 1
  rows = {row["part"]: row for row in _rows(tmp_path, "gpu_suite_dry")}
  assert rows["gemm"]["status"].startswith("failed") and rows["env"]["status"] == "ok"


def test_tpu_suite_check_part_in_its_cpu_form(tmp_path):
  """`python -m fdjax bench gpu --backend tpu`'s check part, dry: every Mosaic kernel on
  tiny shapes in TPU interpret mode against XLA; the TPU day has its own parts."""
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  r = subprocess.run([sys.executable, "-m", "fdjax", "bench", "gpu", "--backend", "tpu",
                      "--dry-run", "--parts", "check", "--results-dir", str(tmp_path)],
                     capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  assert [row["part"] for row in _rows(tmp_path, "tpu_suite_dry")] == ["check"]
  rows = _rows(tmp_path, "tpu_check_smoke")
  assert {row["case"].split()[0] for row in rows} == {"decode", "prefill", "linear"}
  assert all(row["ok"] and row["impl"] == "pallas_tpu_interpret" for row in rows)
  r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_suite.py"), "--backend",
                      "tpu", "--parts", "gemm"], capture_output=True, text=True, env=env,
                     cwd=ROOT, timeout=600)
  assert r.returncode != 0 and "no part ['gemm'] on the tpu" in r.stderr


def test_timing_rotates_inputs_and_reports_per_call():
  import jax
  import jax.numpy as jnp

  from fdjax.tuning import timing
  seen = []
  def fn(x):
    seen.append(x.shape)  # traced once per shape
    return x * 2.0
  sets = [(jnp.ones((4,)) * i,) for i in range(3)]
  t = timing.seconds_per_call(jax.jit(fn), sets, calls=6, rounds=2)
  assert t > 0 and seen == [(4,)]
  assert timing.sets_needed(1 << 30) == 1 and timing.sets_needed(1 << 20) == 8
  with pytest.raises(ValueError, match="at least one"):
    timing.seconds_per_call(jax.jit(fn), [])


def test_timing_in_a_smoke_form_is_one_warm_up_and_one_round_on_one_set(monkeypatch):
  import jax
  import jax.numpy as jnp

  from fdjax.tuning import timing
  runs = []
  def fn(x):
    jax.debug.callback(lambda v: runs.append(float(v)), x[0])  # once per call, as it runs
    return x * 2.0
  sets = [(jnp.ones((4,)) * (i + 1),) for i in range(3)]
  monkeypatch.setattr(timing, "SMOKE", True)
  assert timing.seconds_per_call(jax.jit(fn), sets, calls=2) > 0
  assert runs == [1.0] * 4  # (one warm-up + one round) x 2 calls, each on the first set
  monkeypatch.setattr(timing, "SMOKE", False)
  runs.clear()
  timing.seconds_per_call(jax.jit(fn), sets, calls=2, rounds=2, warmup=1)
  assert sorted(runs) == [1.0] * 3 + [2.0] * 3 + [3.0] * 3  # 3 runs of one rotation


def test_decode_rate_times_more_runs_while_the_difference_is_not_positive(monkeypatch):
  """bench.common.decode_rate on a clock the test moves: each run takes the time its list
  gives; a noisy start (runs of 1 as long as runs of N) is outlasted by more runs, and a
  machine that never settles is an error, never a negative or infinite rate."""
  from bench import common
  clock = [0.0]
  monkeypatch.setattr(common.time, "perf_counter", lambda: clock[0])
  def generate_taking(times):
    it = {n: iter(ts) for n, ts in times.items()}
    def generate(n):
      clock[0] += next(it[n])
    return generate
  # warm-up, then three of each (1-token runs as slow as the 16-token ones), then a pair
  rate = common.decode_rate(generate_taking({16: [9, 5, 5, 5, 4], 1: [9, 5, 5, 5, 1]}), 16,
                            rows=2)
  assert rate() == 2 * 15 / (4 - 1)
  noisy = common.decode_rate(generate_taking({16: [1] * 11, 1: [1] * 11}), 16, tries=10)
  with pytest.raises(RuntimeError, match="timing noise: the least of 10 runs of 16 tokens"):
    noisy()


def test_cope_tasks_bench_smoke(tmp_path):
  _run("cope_tasks.py", tmp_path, "--steps", "4", "--tasks", "selective_copy",
       "--encodings", "cope", "--variants", "cope_sep_key", "--variant-tasks",
       "selective_copy", "--seeds", "0", "1", "--eval-n", "8")
  rows = _rows(tmp_path, "cope_tasks")
  assert {(r["task_row"], r["encoding"], r["split"], r["seed"]) for r in rows} == {
      ("selective_copy", e, s, seed) for e in ("cope", "cope_sep_key")
      for s in ("id", "ood_dense", "ood_sparse") for seed in (0, 1)}
  with open(tmp_path / "cope_tasks.md") as fh:
    md = fh.read()
  assert "cope lowest beyond spread" in md and " ± " in md


def test_cope_counting_curve_smoke(tmp_path):
  _run("cope_counting.py", tmp_path, "--steps", "4", "--every", "2", "--variables", "3")
  rows = _rows(tmp_path, "cope_counting")
  assert [r["step"] for r in rows] == [2, 4]
  assert all(0 < r["guess_error_id"] < 1 and 0 <= r["error_id"] <= 1 for r in rows)


def test_cope_tasks_verdict_needs_the_spread_to_separate():
  from bench import cope_tasks
  assert cope_tasks.verdict({"cope": (1.0, 0.5), "absolute": (9.0, 1.0), "rope": (5.0, 2.0)}) \
      == "yes"
  assert cope_tasks.verdict({"cope": (1.0, 0.5), "absolute": (9.0, 1.0), "rope": (2.0, 1.0)}) \
      == "no: rope within the spread"
  assert cope_tasks.verdict({"cope": (3.0, 0.5), "rope": (2.0, 0.1)}) == \
      "no: rope lower beyond the spread"
  assert cope_tasks.verdict({"cope": (0.01, 0.02), "rope": (0.0, 0.0)}) == \
      "no: rope within the spread"
  assert cope_tasks.spread([0.1, 0.3]) == pytest.approx((20.0, 14.142135), rel=1e-6)


def test_quantization_bench_smoke(tmp_path):
  _run("quantization.py", tmp_path, "--smoke")
  rows = _rows(tmp_path, "quantization_smoke")
  parts = {(r["part"], r["method"]) for r in rows}
  assert parts >= {(p, m) for p in ("bundled", "random") for m in ("float", "int8", "int4")}
  assert parts >= {(p, m) for p in ("one linear", "memory") for m in ("int8", "int4")}
  for r in rows:
    if r["part"] in ("bundled", "random") and r["method"] != "float":
      for f in ("logits_rel_l2", "greedy_agree", "greedy_tokens_before_first_difference"):
        assert f in r, (f, r)


def test_committed_quantization_results_have_the_promised_fields():
  with open(os.path.join(ROOT, "bench", "results", "quantization.json")) as fh:
    data = json.load(fh)
  assert data["command"] == "python bench/quantization.py"
  rows = {(r["part"], r["method"]): r for r in data["rows"]}
  for m in ("int8", "int4"):
    assert rows[("bundled", m)]["held_out_bits_per_byte"] > 0
    assert rows[("random", m)]["greedy_agree"] >= 0 and rows[("random", m)]["logits_rel_l2"] > 0
  int4 = [r for r in data["rows"] if r["part"] == "memory" and r["method"] == "int4"]
  assert int4 and all(0.25 < r["linear_fraction"] < 0.27 for r in int4)


def test_committed_cope_tasks_results_have_the_promised_fields():
  with open(os.path.join(ROOT, "bench", "results", "cope_tasks.json")) as fh:
    data = json.load(fh)
  rows = data["rows"]
  assert data["command"].startswith(("python bench/cope_tasks.py", "python -m fdjax bench"))
  assert {r["task_row"] for r in rows} == {"flipflop", "selective_copy", "counting1",
                                           "counting3", "counting5"}
  assert {r["encoding"] for r in rows} >= {"absolute", "rope", "cope"}
  assert {r["split"] for r in rows if r["task_row"] == "flipflop"} == {
      "id", "ood_sparse", "ood_dense"}
  assert len({r["seed"] for r in rows}) >= 3
  for r in rows:
    assert r["split"] == "id" or r["split"].startswith("ood")
    assert 0.0 <= r["error"] <= 1.0


def test_serve_bench_smoke(tmp_path):
  """bench/serve.py's quick form: a fdjax server process under Poisson arrivals."""
  pytest.importorskip("openai")
  _run("serve.py", tmp_path, "--quick", "--baseline", "none")
  rows = _rows(tmp_path, "serve_cpu_quick")
  assert [r["server"] for r in rows] == ["fdjax serve"]
  assert rows[0]["failed"] == 0 and rows[0]["output_tokens_per_s"] > 0
  assert rows[0]["same_text_as_fdjax"] == "6/6"


def test_committed_serve_results_compare_with_transformers():
  with open(os.path.join(ROOT, "bench", "results", "serve_cpu.json")) as fh:
    data = json.load(fh)
  rows = data["rows"]
  assert data["command"].startswith("python bench/serve.py")
  assert {r["server"] for r in rows} == {"fdjax serve", "transformers serve"}
  fdjax_rows = [r for r in rows if r["server"] == "fdjax serve"]
  assert len(fdjax_rows) >= 4 and all(r["failed"] == 0 for r in rows)
  assert all(r["compiles_during_run"] == 0 for r in fdjax_rows)  # warmed up: no recompiles


def test_decode_trace_names_what_each_instruction_of_the_decode_loop_computes(monkeypatch):
  """bench/decode_trace.py's reading of the compiled decode loop (the profile's categories):
  a tiny model's loop at batch 2 has its LM head, linears, attention dots, the K/V gather from
  the page pools, the cache write, norms and the argmax, each where they should be."""
  from bench import decode_trace
  from fdjax.engine import decode_loop
  from tests.models_util import tiny_model
  model = tiny_model(num_kv_heads=2)
  cfg = model.config
  _, decode = decode_loop.lower(model, batch=2, prompt_len=8, max_new_tokens=8)
  pages = decode_loop.buckets(cfg, 2, 8, 8).pages * 2
  pool = f"[{cfg.num_kv_heads},{pages},64,{cfg.head_dim}]"  # heads-major, fdjax.ops.kv_cache
  cats = decode_trace.categorize(decode.compile().as_text(), cfg.vocab_size, pool)
  found = {}
  for name, (cat, shape) in cats.items():
    found.setdefault(cat, []).append(shape)
  assert set(found) >= {"LM head", "linears", "attention dots", "K/V gather", "cache write",
                        "norms", "sampling", "other"}, sorted(found)
  assert all(s.endswith(f",{cfg.vocab_size}]") for s in found["LM head"])
  assert all(s.count(",") == 1 for s in found["linears"])  # [B, N]
  # each KV head's rows' keys, [Hkv, B, ...]
  assert all(s.startswith(f"f32[{cfg.num_kv_heads},2,") for s in found["K/V gather"])
  # int8 weights as "auto" runs them on a CPU with VNNI: the integer dots count as linears
  import fdjax
  from fdjax.ops import selection
  monkeypatch.setattr(selection, "cpu_flags", lambda: frozenset({"avx512_vnni"}))
  quantized = fdjax.quantize(tiny_model(num_kv_heads=2, hidden_size=64, intermediate_size=256),
                             "int8")  # the down projection: K = 256, two groups of 128
  _, decode = decode_loop.lower(quantized, batch=2, prompt_len=8, max_new_tokens=8)
  cats = decode_trace.categorize(decode.compile().as_text(), cfg.vocab_size, pool)
  shapes = [(cat, shape) for cat, shape in cats.values() if shape.startswith("s32[")]
  assert any(cat == "linears" and shape.count(",") == 2 for cat, shape in shapes), shapes
  assert all(cat != "attention dots" for cat, _ in shapes)


def test_decode_bench_tiny(tmp_path):
  """bench/decode.py on a one-layer model: fdjax and Hugging Face eager side by side in each
  dtype, and what an fdjax step reads, over the machine's read bandwidth; llama.cpp's row at
  batch 1, timed where llama-cpp-python is installed, else the reason. 16 new tokens: the
  15 steps a rate is taken over (N tokens' time less 1 token's) outlast the timing noise of a
  loaded machine (with 3, the suite once failed here under load)."""
  _run("decode.py", tmp_path, "--layers", "1", "--hidden", "64", "--heads", "2",
       "--kv-heads", "2", "--intermediate", "128", "--vocab", "256", "--batch", "1", "2",
       "--iters", "1", "--new-tokens", "16", "--prompt-len", "8", "--dtypes", "float32", "int8",
       "--llamacpp", "--name", "decode_tiny")
  rows = _rows(tmp_path, "decode_tiny")
  assert [(r["impl"].split(" ")[0], r["dtype"], r["batch"]) for r in rows] == [
      ("fdjax-auto", "float32", 1), ("hf-eager", "float32", 1), ("llama.cpp", "float32", 1),
      ("fdjax-auto", "int8", 1), ("hf-eager", "int8", 1), ("llama.cpp", "int8", 1),
      ("fdjax-auto", "float32", 2), ("hf-eager", "float32", 2), ("fdjax-auto", "int8", 2),
      ("hf-eager", "int8", 2)]
  ours = [r for r in rows if r["impl"].startswith("fdjax")]
  assert all(r["decode_tokens_per_s"] > 0 and r["roofline_pct"] > 0 for r in ours)
  assert all(r["read_GB_per_s"] > 0 for r in ours)
  assert all(0 < r["min_speedup_vs_hf"] <= r["speedup_vs_hf"] for r in ours)
  # int8 weights: about a quarter of the float32 linears' bytes, the embedding left out
  assert ours[1]["step_MB"] < 0.6 * ours[0]["step_MB"]
  llama = [r for r in rows if r["impl"].startswith("llama.cpp")]
  from bench import llamacpp
  if llamacpp.available():
    assert all(r["error"] == llamacpp.available() for r in llama)
  else:
    assert all(r["decode_tokens_per_s"] > 0 and not r.get("error") for r in llama)
    assert all(r["speedup_vs_llamacpp"] > 0 for r in ours if r["batch"] == 1)


def test_embed_bench_tiny(tmp_path):
  """bench/embed.py on a one-layer model: fdjax.embed and transformers' backbone side by side
  on the same texts, the same embeddings (within float32 rounding), tokens per second each."""
  _run("embed.py", tmp_path, "--layers", "1", "--hidden", "64", "--heads", "2",
       "--kv-heads", "2", "--intermediate", "128", "--vocab", "256", "--texts", "1", "3",
       "--min-len", "4", "--max-len", "40", "--iters", "1", "--dtypes", "float32",
       "--name", "embed_tiny")
  rows = _rows(tmp_path, "embed_tiny")
  assert [(r["impl"], r["texts"]) for r in rows] == [("fdjax", 1), ("hf-eager", 1),
                                                      ("fdjax", 3), ("hf-eager", 3)]
  assert all(r["tokens_per_s"] > 0 for r in rows)
  ours = [r for r in rows if r["impl"] == "fdjax"]
  assert all(r["max_abs_diff_vs_hf"] < 1e-5 and r["speedup_vs_hf"] > 0 for r in ours)


def test_prefill_bench_smoke(tmp_path):
  """bench/prefill_cpu.py's smoke run: every attention implementation timed on the same
  inputs with its float64 error (ours, the reference, PyTorch's within float32 rounding),
  then fdjax's and transformers' time to first token with the same first token, and the
  bundled CoPE model's against the PyTorch CoPE decoder."""
  _run("prefill_cpu.py", tmp_path, "--smoke", "--dtypes", "float32", "--name", "prefill_smoke")
  rows = _rows(tmp_path, "prefill_smoke")
  ops = [r for r in rows if r["part"] == "op"]
  assert {r["impl"] for r in ops} == {"fdjax-auto", "xla-reference", "jax-sdpa", "torch-sdpa"}
  # no offset or lengths there
  assert not any(r["impl"] == "jax-sdpa" and (r["cached"] or r["spare_keys"]) for r in ops)
  assert {r["spare_keys"] for r in ops} == {0, 64}
  assert all(r["ms"] > 0 and r["max_abs_err_vs_f64"] < 1e-5 and r["speedup_vs_xla_reference"] > 0
             for r in ops)
  ttft = [r for r in rows if r["part"] == "ttft"]
  # on several cores, also tensor parallel over two of them as CPU devices (4/2 heads: tp 2)
  names = ["fdjax"] + (["fdjax-tp2 (2 CPU devices)"] if (os.cpu_count() or 1) > 1 else [])
  assert [(r["impl"], r["queries"]) for r in ttft] == [
      (name, n) for n in (64, 80) for name in names + ["hf-eager"]]
  assert all(r["same_first_token"] and r["speedup_vs_hf"] > 0 for r in ttft)
  cope_ops = [r for r in rows if r["part"] == "op-cope"]
  assert [r["impl"] for r in cope_ops] == ["fdjax-auto", "xla-reference", "torch-cope"]
  assert all(r["max_abs_err_vs_f64"] < 1e-4 for r in cope_ops)
  cope = [r for r in rows if r["part"] == "ttft-cope"]
  assert [r["impl"] for r in cope] == ["fdjax", "torch-cope"]
  assert all(r["same_first_token"] and r["ms"] > 0 for r in cope)


def test_cpu_results_name_the_processor_and_its_features():
  """bench.common's CPU description: the cores, and each listed feature the processor has."""
  from bench import common
  from fdjax.ops import selection
  description, flags = common.cpu_description(), selection.cpu_flags()
  assert description.endswith(f", {os.cpu_count()} cores")
  assert all(name in description for flag, name in common.CPU_FEATURES.items() if flag in flags)
  if "avx512f" not in flags:
    assert "AVX-512" not in description


def test_decode_bench_times_the_implementations_in_turn():
  """bench/decode.py's rounds: every implementation once a round, in turn, each one's
  results in the order of the rounds."""
  from bench import decode
  calls = []
  def timer(name):
    def once():
      calls.append(name)
      return float(len(calls))
    return once
  out = decode.interleaved({"a": timer("a"), "b": timer("b"), "c": timer("c")}, 3)
  assert calls == ["a", "b", "c"] * 3
  assert out == {"a": [1.0, 4.0, 7.0], "b": [2.0, 5.0, 8.0], "c": [3.0, 6.0, 9.0]}


def test_cpu_linear_quick(tmp_path):
  """bench/cpu_linear.py's smoke run: every form of the CPU's linear timed, "auto" with the
  rule's reason."""
  _run("cpu_linear.py", tmp_path, "--quick")
  rows = _rows(tmp_path, "cpu_linear_quick")
  assert {(r["weights"], r["form"]) for r in rows} >= {
      ("float32", "reference"), ("bfloat16", "rows padded to 2"),
      ("int8", "int8 dot, x groups of 128"), ("int8", "auto"),
      ("int4", "int4 dot, x groups of 128"), ("int4", "auto")}
  assert all(r["ms"] > 0 and r["GB_per_s"] > 0 for r in rows)
  assert all(r["reason"].startswith("cpu:") for r in rows if r["form"] == "auto")


def _rope(x, pairs):
  """x [D] rotated at position 3 with pairs (i, j) turning by 10000^(-2k/D), k their index."""
  d = x.shape[-1]
  out = x.copy()
  for k, (i, j) in enumerate(pairs):
    a = 3 * 10000.0 ** (-2 * k / d)
    out[i] = x[i] * np.cos(a) - x[j] * np.sin(a)
    out[j] = x[j] * np.cos(a) + x[i] * np.sin(a)
  return out


def test_llamacpp_rope_rows_turn_hf_rotary_halves_into_adjacent_pairs():
  """bench/llamacpp.rope_rows: a head's q from the permuted rows, rotated llama.cpp's way
  (pairs 2k, 2k + 1), is HF's q rotated HF's way (pairs k, k + D/2), in the permuted order:
  scores q . k are the same under both."""
  from bench import llamacpp
  rng = np.random.default_rng(0)
  heads, d, inner = 3, 8, 5
  w, x = rng.standard_normal((heads * d, inner)), rng.standard_normal(inner)
  hf = (w @ x).reshape(heads, d)
  ours = (llamacpp.rope_rows(w, heads) @ x).reshape(heads, d)
  for h in range(heads):
    hf_rot = _rope(hf[h], [(k, k + d // 2) for k in range(d // 2)])
    ll_rot = _rope(ours[h], [(2 * k, 2 * k + 1) for k in range(d // 2)])
    order = [i for k in range(d // 2) for i in (k, k + d // 2)]
    np.testing.assert_allclose(ll_rot, hf_rot[order], rtol=1e-12)
  with pytest.raises(KeyError):
    llamacpp.gguf_name("model.layers.0.self_attn.rotary_emb.weight")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_llamacpp_gguf_holds_the_hf_model(tmp_path, dtype):
  """bench/llamacpp.write_gguf read back with gguf's reader: llama.cpp's names, the Llama's
  hyperparameters, no tokenizer, and every tensor HF's (q and k rows permuted) in the type
  asked: float32 exactly, bfloat16 within its rounding, Q8_0 linears within half a step of
  their block's scale, which Q8_0 stores as float16 (norms float32; in int8 the embedding and
  LM head too)."""
  import gguf
  import torch
  import transformers

  from bench import llamacpp
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=128)
  hf = transformers.LlamaForCausalLM(cfg).eval()
  path = str(tmp_path / "m.gguf")
  llamacpp.write_gguf(hf, path, dtype)
  reader = gguf.GGUFReader(path)
  field = lambda k: reader.fields[k].contents()  # noqa: E731
  assert field("general.architecture") == "llama"
  assert field("llama.block_count") == 2 and field("llama.attention.head_count_kv") == 2
  assert field("tokenizer.ggml.model") == "none"
  tensors = {t.name: t for t in reader.tensors}
  state = hf.state_dict()
  assert set(tensors) == {llamacpp.gguf_name(n) for n in state}
  types = gguf.GGMLQuantizationType
  for hf_name, t in state.items():
    name = llamacpp.gguf_name(hf_name)
    want = t.float().numpy()
    if name.endswith(("attn_q.weight", "attn_k.weight")):
      want = llamacpp.rope_rows(want, 4 if "attn_q" in name else 2)
    got = tensors[name]
    kind = (types.F32 if want.ndim == 1 or dtype == "float32" else types.BF16
            if dtype == "bfloat16" else
            types.Q8_0 if name.split(".")[-2] in llamacpp.LINEARS else types.F32)
    assert got.tensor_type == kind, (name, got.tensor_type)
    values = gguf.quants.dequantize(got.data, got.tensor_type).reshape(want.shape)
    if kind == types.F32:
      np.testing.assert_array_equal(values, want)
    elif kind == types.BF16:
      np.testing.assert_allclose(values, want, rtol=2**-8)
    else:
      blocks = np.abs(want.reshape(want.shape[0], -1, 32)).max(-1, keepdims=True) / 127
      err = np.abs(values - want).reshape(blocks.shape[0], -1, 32)
      # half a step, and the scale's float16 rounding (2^-11) times the 127 steps at most
      assert np.all(err <= blocks * (0.5 + 127 * 2.0**-11) * (1 + 1e-6)), name


def test_cope_decode_bench_tiny(tmp_path):
  """bench/cope_decode.py on a one-layer random CoPE model: fdjax as "auto" runs it, fdjax on
  its XLA references and the PyTorch CoPE decoder, side by side, their greedy tokens checked
  against each other before they are timed."""
  _run("cope_decode.py", tmp_path, "--layers", "1", "--hidden", "64", "--heads", "2",
       "--kv-heads", "1", "--intermediate", "128", "--vocab", "256", "--npos-max", "8",
       "--batch", "1", "2", "--iters", "1", "--new-tokens", "16", "--prompt-len", "8",
       "--name", "cope_tiny")
  rows = _rows(tmp_path, "cope_tiny")
  assert [(r["impl"], r["batch"]) for r in rows] == [
      (impl, b) for b in (1, 2) for impl in ("fdjax-auto", "fdjax-xla", "torch-eager")]
  assert all(r["decode_tokens_per_s"] > 0 and r["speedup_vs_torch"] > 0 for r in rows)
  assert all(r["greedy_agreement"] == 1.0 for r in rows)
