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
