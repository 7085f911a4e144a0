"""The GPU suite's dry run (`python -m fdjax bench gpu --dry-run`: every part in its CPU form)
and the benchmarks it runs, checked for the promised fields (no timing is asserted). Apart
from tests/test_bench.py so that pytest-xdist's loadfile gives the dry run (minutes) workers
of its own: this file runs the parts env, check and tune,
tests/test_bench_gpu_suite_decode.py the others (attention, gemm, e2e, speculative, moe):
about two and a half minutes each on 2 cores, each on one of CI's two workers."""
import json
import os
import subprocess
import sys

import pytest

from bench import gpu_suite
from tests.test_bench import ROOT, _rows

pytestmark = pytest.mark.bench  # as tests/test_bench.py: apart from the README's command

PARTS = ["env", "check", "tune"]  # the rest: tests/test_bench_gpu_suite_decode.py


def run_parts(tmp_path_factory, parts):
  """`python -m fdjax bench gpu --dry-run --parts PARTS` once: those parts of the GPU suite in
  their CPU form, each reported ok with a log of its own; -> the results folder."""
  out = tmp_path_factory.mktemp("gpu_suite")
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  r = subprocess.run([sys.executable, "-m", "fdjax", "bench", "gpu", "--dry-run",
                      "--parts", *parts, "--results-dir", str(out)], capture_output=True,
                     text=True, env=env, cwd=ROOT, timeout=1200)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  rows = _rows(out, "gpu_suite_dry")
  assert [r["part"] for r in rows] == parts
  assert all(r["status"] == "ok" for r in rows), rows
  for r in rows:
    assert (out / "logs" / r["log"]).stat().st_size > 0
  return out


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
  return run_parts(tmp_path_factory, PARTS)


def test_the_two_halves_of_the_dry_run_cover_every_part():
  from tests.test_bench_gpu_suite_decode import PARTS as REST
  assert sorted(PARTS + REST, key=gpu_suite.PARTS.index) == list(gpu_suite.PARTS)


def test_gpu_suite_dry_run_reports_the_device(dry_run):
  env = _rows(dry_run, "gpu_env")[0]
  assert env["copy_gbps"] > 0 and env["dispatch_floor_us"] > 0


def test_gpu_check_smoke_covers_every_kernel(dry_run):
  rows = _rows(dry_run, "gpu_check_smoke")
  assert {r["kernel"] for r in rows} >= {"decode_attention", "decode_guard", "paged_decode",
                                         "prefill_attention",
                                         "prefill_guard", "cope_attention", "flat_gemm", "gemv",
                                         "linear (dispatch)", "model", "mosaic_decode",
                                         "mosaic_paged_decode", "mosaic_decode_guard",
                                         "mosaic_flat_gemm", "linear (auto)",
                                         "mosaic_grouped_gemm"}
  assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
  guards = [r for r in rows if r["kernel"].endswith("_guard")]
  assert guards and all(r["recomputed_rows"] > 0 for r in guards)



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
