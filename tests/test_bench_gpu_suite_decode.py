"""The other half of the GPU suite's dry run (tests/test_bench_gpu_suite.py runs env and
check): the benchmarks of decoding and its kernels (attention, gemm, e2e, speculative, moe)
and `fdjax tune`, in their CPU forms, checked for the promised fields (no timing is
asserted)."""
import json

import pytest

from tests.test_bench import COMMON, _rows
from tests.test_bench_gpu_suite import run_parts

pytestmark = pytest.mark.bench  # as tests/test_bench.py: apart from the README's command

PARTS = ["attention", "gemm", "tune", "e2e", "speculative", "moe"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
  return run_parts(tmp_path_factory, PARTS)


def test_attention_bench_smoke(dry_run):
  rows = _rows(dry_run, "attention_smoke")
  assert (dry_run / "attention_smoke.svg").exists()
  assert {r["impl"] for r in rows} >= {"fdjax-async", "fdjax-sync", "xla", "xla-sdpa",
                                       "fdjax-mosaic-async", "fdjax-mosaic-sync",
                                       "fdjax-mosaic-paged64"}
  mosaic = [r for r in rows if r["impl"] == "fdjax-mosaic-async"]
  assert mosaic and all(r["speedup_vs_fdjax-async"] > 0 for r in mosaic)
  assert {r["op"] for r in rows} == {"decode", "prefill"}
  for r in rows:
    for f in COMMON + ["op", "impl", "batch", "q_heads", "kv_heads", "head_dim", "kv_len", "us",
                       "gbps", "bw_fraction"]:
      assert f in r, (f, r)
    assert r["us"] > 0 and 0 < r["bw_fraction"]


def test_gemm_bench_smoke(dry_run):
  rows = _rows(dry_run, "gemm_smoke")
  assert {r["impl"] for r in rows} >= {f"{impl}{q}" for impl in ("fdjax-gemv", "fdjax-flat",
                                                                 "fdjax-auto", "xla")
                                       for q in ("", "-int8", "-int4")}
  assert {r["k"] for r in rows if r["impl"] == "fdjax-mosaic-flat"} == {192}  # 64-multiples
  for r in rows:
    for f in COMMON + ["op", "impl", "m", "n", "k", "dtype", "quantization", "bytes_per_call",
                       "us", "gbps", "bw_fraction"]:
      assert f in r, (f, r)
  # bytes moved per call: int8 about half of bf16, int4 about a quarter (same shape and M)
  by = {(r["quantization"], r["n"], r["k"], r["m"]): r["bytes_per_call"] for r in rows}
  for (q, n, k, m), b in by.items():
    if q != "none":
      assert b < (0.6 if q == "int8" else 0.4) * by[("none", n, k, m)], (q, n, k, m)
  assert "measured M1" in (dry_run / "gemm_smoke.md").read_text()


def test_tune_part_writes_a_table_dispatch_reads(dry_run, monkeypatch):
  """`fdjax tune` (random-tiny, M = 1 and 2): every linear shape measured, and the selection
  module reads the table from $FDJAX_TABLES: crossovers in range, the Mosaic GPU flat GEMM
  timed beside Triton's where it takes the shape (K 352: not)."""
  import jax.numpy as jnp

  from fdjax.ops import selection
  from models import presets
  from pallas_kernels.mosaic_gpu import flat_gemm as mosaic_flat_gemm
  assert "M1=" in (dry_run / "logs" / "tune.log").read_text()
  monkeypatch.setenv("FDJAX_TABLES", str(dry_run / "tables"))
  selection.reload()
  try:
    shapes = presets.get("random-tiny").linear_shapes().values()
    assert len(json.loads((dry_run / "tables" / "dry.json").read_text())["shapes"]) == len(shapes)
    for k, n in shapes:
      e = selection.entry(k, n)
      assert e["source"] == "measured" and 1 <= e["m1"] <= e["m2"] <= 3
      assert [p["m"] for p in e["profile"]] == [1, 2]
      takes = mosaic_flat_gemm.unsupported(1, k, n, jnp.bfloat16) is None
      assert (e.get("backend") in ("pallas", "pallas_mosaic")) == takes, (k, n, e)
      assert all(("mosaic_flat_us" in p) == takes for p in e["profile"])
  finally:
    monkeypatch.delenv("FDJAX_TABLES")
    selection.reload()

def test_e2e_bench_cpu_form(dry_run):
  rows = _rows(dry_run, "e2e_cpu")
  assert {r["impl"] for r in rows} == {"fdjax-auto", "fdjax-xla", "hf-eager"}
  for row in rows:
    assert "error" not in row, row
    for f in COMMON + ["torch_version", "model", "impl", "batch", "prompt_len", "new_tokens",
                       "ttft_ms", "decode_ms_per_token", "decode_tokens_per_s"]:
      assert f in row, (f, row)
    if row["impl"].startswith("fdjax"):  # ttft_ms a whole call's wall time, as HF's
      assert row["roofline_fraction"] > 0 and 0 < row["prefill_ms"]
  auto = next(r for r in rows if r["impl"] == "fdjax-auto")
  assert auto["breakdown_linear_ms"] > 0 and auto["breakdown_attention_ms"] > 0


def test_speculative_bench_smoke(dry_run):
  """bench/speculative.py's quick form (the GPU suite's speculative part, dry): plain, n-gram
  and draft decoding of the bundled model (an untrained draft) side by side."""
  rows = _rows(dry_run, "speculative")
  assert {r["method"] for r in rows} == {"plain", "ngram k=4 n=3", "draft k=4"}
  assert {r["prompts"] for r in rows} == {"repeating code"}  # the quick form's one set
  for r in rows:
    assert r["decode_tokens_per_s"] > 0 and r["tokens_per_round"] >= 1.0
    assert (r["acceptance"] == "") == (r["method"] == "plain")


def test_moe_bench_smoke(dry_run):
  """bench/moe.py's quick form (the GPU suite's moe part, dry): every strategy at each batch,
  the one auto picks marked, bytes read no more than the dense computation's where the
  strategy reads only routed experts."""
  rows = _rows(dry_run, "moe")
  assert {r["batch"] for r in rows} == {1, 8}
  for batch in (1, 8):
    mine = [r for r in rows if r["batch"] == batch]
    assert [r["strategy"].split()[0] for r in mine] == ["dense", "ragged", "gather", "grouped"]
    assert sum(r["auto"] == "yes" for r in mine) == 1
    assert all(r["ms"] > 0 and r["kernel_MB_read"] <= r["dense_MB_read"] for r in mine)
  int4 = _rows(dry_run, "moe_int4")  # the same layer's experts int4: a quarter of the bytes
  assert [r["strategy"].split()[0] for r in int4] == [r["strategy"].split()[0] for r in rows]
  for q, r in zip(int4, rows):
    assert q["ms"] > 0 and q["dense_MB_read"] == pytest.approx(r["dense_MB_read"] / 4, rel=1e-3)
