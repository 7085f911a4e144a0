"""The benchmarks' CPU forms run end to end and write the promised fields (no timing is
asserted: these only keep the scripts from rotting)."""
import json
import os
import subprocess
import sys

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


def test_attention_bench_smoke(tmp_path):
  _run("attention.py", tmp_path, "--smoke")
  rows = _rows(tmp_path, "attention_smoke")
  assert (tmp_path / "attention_smoke.svg").exists()
  assert {r["impl"] for r in rows} >= {"fdjax-async", "fdjax-sync", "xla"}
  assert {r["op"] for r in rows} == {"decode", "prefill"}
  for r in rows:
    for f in COMMON + ["op", "impl", "batch", "q_heads", "kv_heads", "head_dim", "kv_len", "us",
                       "gbps", "bw_fraction"]:
      assert f in r, (f, r)
    assert r["us"] > 0 and 0 < r["bw_fraction"]


def test_gemm_bench_smoke(tmp_path):
  _run("gemm.py", tmp_path, "--smoke")
  rows = _rows(tmp_path, "gemm_smoke")
  assert {r["impl"] for r in rows} >= {"fdjax-gemv", "fdjax-flat", "fdjax-auto", "xla"}
  for r in rows:
    for f in COMMON + ["op", "impl", "m", "n", "k", "dtype", "us", "gbps", "bw_fraction"]:
      assert f in r, (f, r)
  assert "measured M1" in (tmp_path / "gemm_smoke.md").read_text()


def test_e2e_bench_cpu_form_via_cli(tmp_path):
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  r = subprocess.run([sys.executable, "-m", "fdjax", "bench", "e2e", "--cpu", "--impls",
                      "fdjax-auto", "fdjax-xla", "hf-eager", "--batch", "2", "--prompt-len",
                      "16", "--new-tokens", "6", "--repeats", "1", "--results-dir",
                      str(tmp_path)], capture_output=True, text=True, env=env, cwd=ROOT,
                     timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  rows = _rows(tmp_path, "e2e_cpu")
  assert {r["impl"] for r in rows} == {"fdjax-auto", "fdjax-xla", "hf-eager"}
  for row in rows:
    assert "error" not in row, row
    for f in COMMON + ["torch_version", "model", "impl", "batch", "prompt_len", "new_tokens",
                       "ttft_ms", "decode_ms_per_token", "decode_tokens_per_s"]:
      assert f in row, (f, row)
    if row["impl"].startswith("fdjax"):
      assert row["roofline_fraction"] > 0
  auto = next(r for r in rows if r["impl"] == "fdjax-auto")
  assert auto["breakdown_linear_ms"] > 0 and auto["breakdown_attention_ms"] > 0


def test_cope_tasks_bench_smoke(tmp_path):
  _run("cope_tasks.py", tmp_path, "--steps", "4", "--tasks", "selective_copy", "--pes",
       "rope", "cope", "--seeds", "0", "--eval-n", "8")
  rows = _rows(tmp_path, "cope_tasks")
  assert {(r["pe"], r["split"]) for r in rows} == {
      (pe, s) for pe in ("rope", "cope") for s in ("id", "ood_dense", "ood_sparse")}


def test_committed_cope_tasks_results_have_the_promised_fields():
  with open(os.path.join(ROOT, "bench", "results", "cope_tasks.json")) as fh:
    data = json.load(fh)
  rows = data["rows"]
  assert data["command"].startswith("python bench/cope_tasks.py")
  assert {r["task"] for r in rows} == {"flipflop", "selective_copy", "counting"}
  assert {r["pe"] for r in rows} == {"absolute", "rope", "cope"}
  assert len({r["seed"] for r in rows}) >= 2
  for r in rows:
    assert r["split"] == "id" or r["split"].startswith("ood")
    assert 0.0 <= r["error"] <= 1.0
