"""The GPU suite's dry run (`python -m fdjax bench gpu --dry-run`: every part in its CPU form)
and the benchmarks it runs, checked for the promised fields (no timing is asserted). Apart
from tests/test_bench.py so that pytest-xdist's loadfile gives the dry run (minutes) workers
of its own: this file runs the parts env and check,
tests/test_bench_gpu_suite_decode.py the others (attention, gemm, tune, e2e, speculative,
moe), each on one of CI's two workers (beside this one, the H100 compile tests)."""
import os
import subprocess
import sys

import pytest

from bench import gpu_suite
from tests.test_bench import ROOT, _rows

pytestmark = pytest.mark.bench  # as tests/test_bench.py: apart from the README's command

PARTS = ["env", "check"]  # the rest: tests/test_bench_gpu_suite_decode.py


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
                                         "mosaic_flat_gemm", "mosaic_flat_gemm_int8",
                                         "mosaic_flat_gemm_int4", "linear (auto)",
                                         "mosaic_grouped_gemm"}
  assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
  guards = [r for r in rows if r["kernel"].endswith("_guard")]
  assert guards and all(r["recomputed_rows"] > 0 for r in guards)


def test_the_gpu_forms_case_list_builds_on_a_cpu():
  """bench/gpu_check.py's full (GPU) form, its cases made and not run: a case whose inputs
  cannot be built (a paged case needing more pages than its pool: the head_dim-256 one once)
  fails here, not in a lease's minutes."""
  from bench import gpu_check

  class Listing(gpu_check.Checker):
    def case(self, kernel, name, fn):
      self.rows.append((kernel, name))

  c = Listing(smoke=False)
  gpu_check.run_checks(c)
  kernels = [k for k, _ in c.rows]
  assert kernels.index("mosaic_decode") < kernels.index("decode_attention")  # Mosaic first
  assert kernels.count("mosaic_paged_decode") == 4
  assert {"mosaic_flat_gemm_int8", "mosaic_flat_gemm_int4"} <= set(kernels)
  with pytest.raises(ValueError, match="need 126 pages; the pool has 80"):
    c.paged(2, 4, 1, 256, 64, 80, [4000, 333], None)
