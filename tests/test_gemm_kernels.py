"""Flat GEMM and GEMV kernels (interpret mode) against float64, and the heuristic dataflow."""
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdjax.ops import cpu_linear, dispatch, selection
from fdjax.tuning import tune
from pallas_kernels.mosaic_gpu import flat_gemm as mfg
from pallas_kernels.triton import flat_gemm as fg
from pallas_kernels.triton import gemv as gv
from tests.helpers import cuda_text, rel_err, spy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = [(3, 1000, 1234), (1, 64, 96), (17, 300, 50), (64, 128, 256), (8, 33, 17)]


def _xw(m, k, n, dtype, seed=0):
  rng = np.random.default_rng(seed + m + k + n)
  x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32).astype(dtype)
  w = jnp.asarray(rng.standard_normal((k, n)), jnp.float32).astype(dtype)
  return x, w, np.asarray(x, np.float64) @ np.asarray(w, np.float64)


@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_flat_gemm_float32(m, k, n, split_k):
  x, w, want = _xw(m, k, n, jnp.float32)
  out = fg.flat_gemm(x, w, settings=fg.Settings(block_n=32, block_k=64, split_k=split_k),
                     interpret=True)
  assert out.shape == (m, n) and out.dtype == jnp.float32
  assert rel_err(out, want) < 1e-5


@pytest.mark.parametrize("split_k", [1, 4])
@pytest.mark.parametrize("m,k,n", [s for s in SHAPES if s[0] <= gv.MAX_M])
def test_gemv_float32(m, k, n, split_k):
  x, w, want = _xw(m, k, n, jnp.float32)
  out = gv.gemv(x, w, settings=gv.Settings(block_n=64, block_k=32, split_k=split_k),
                interpret=True)
  assert out.shape == (m, n)
  assert rel_err(out, want) < 1e-5


@pytest.mark.parametrize("kernel", ["flat", "gemv"])
def test_bfloat16_within_twice_xla_error(kernel):
  m, k, n = 3, 1000, 1234
  x, w, want = _xw(m, k, n, jnp.bfloat16)
  fn, settings = (fg.flat_gemm, fg.Settings) if kernel == "flat" else (gv.gemv, gv.Settings)
  out = fn(x, w, settings=settings(split_k=2), interpret=True)
  assert out.dtype == jnp.bfloat16
  err = np.max(np.abs(np.asarray(out, np.float64) - want))
  base = np.max(np.abs(np.asarray(jnp.dot(x, w), np.float64) - want))  # XLA in bf16
  assert err <= 2 * base + 1e-6
  assert rel_err(np.asarray(out, np.float32), want) < 1e-2


def test_kernels_refuse_bad_input():
  x = jnp.ones((2, 8), jnp.float32)
  with pytest.raises(ValueError, match="expected x"):
    fg.flat_gemm(x, jnp.ones((8,), jnp.float32), interpret=True)
  with pytest.raises(ValueError, match="expected x"):
    gv.gemv(x, jnp.ones((9, 4), jnp.float32), interpret=True)
  with pytest.raises(ValueError, match="share one of"):
    fg.flat_gemm(x.astype(jnp.int32), jnp.ones((8, 4), jnp.int32), interpret=True)
  with pytest.raises(ValueError, match="at most 8"):
    gv.gemv(jnp.ones((9, 8)), jnp.ones((8, 4)), interpret=True)


# ------------------------------------------------------------------ the heuristic dataflow

@pytest.fixture
def table(tmp_path, monkeypatch):
  """A table for this device with M1 = 3 and M2 = 6 for the [64, 80] weight."""
  entry = {"m1": 3, "m2": 6, "source": "test",
           "gemv": {"block_n": 32, "block_k": 32, "split_k": 2},
           "flat": {"block_n": 32, "block_k": 32, "split_k": 1, "num_stages": 2}}
  with open(tmp_path / "t.json", "w") as fh:
    json.dump({"device": selection.device_kind(), "shapes": {"64x80": entry}}, fh)
  monkeypatch.setenv("FDJAX_TABLES", str(tmp_path))
  selection.reload()
  yield entry
  monkeypatch.delenv("FDJAX_TABLES")
  selection.reload()


def test_dispatch_follows_the_table(table, monkeypatch):
  gemv_calls, flat_calls = spy(monkeypatch, gv, "gemv"), spy(monkeypatch, fg, "flat_gemm")
  for m, expected in [(1, "gemv"), (2, "gemv"), (3, "flat"), (5, "flat"), (6, "xla"),
                      (40, "xla")]:
    assert selection.linear(m, 64, 80).impl == expected
    gemv_calls.clear()
    flat_calls.clear()
    x, w, want = _xw(m, 64, 80, jnp.float32)
    out = dispatch.linear(x, w, impl="pallas_interpret")
    assert rel_err(out, want) < 1e-5
    assert (len(gemv_calls), len(flat_calls)) == {"gemv": (1, 0), "flat": (0, 1),
                                                  "xla": (0, 0)}[expected]
  # an untuned shape gets the analytic fallback
  assert selection.entry(64, 81)["source"] == "analytic"
  assert selection.linear(1, 64, 81).impl == "gemv"
  assert selection.linear(64, 64, 81).impl == "flat"
  assert selection.linear(65, 64, 81).impl == "xla"


def test_cpu_auto_runs_the_cpu_rule_and_traces_no_kernel(table, monkeypatch):
  """With a tuned table present, "auto" on the CPU runs fdjax.ops.cpu_linear's XLA form (its
  own rule) and never reaches the GPU table or a kernel."""
  for module, name in [(selection, "linear"), (fg, "flat_gemm"), (gv, "gemv"),
                       (mfg, "flat_gemm")]:
    monkeypatch.setattr(module, name, lambda *a, _n=name, **k: pytest.fail(f"{_n} on the CPU"))
  cpu = spy(monkeypatch, cpu_linear, "linear")
  x, w, want = _xw(4, 64, 80, jnp.float32)
  assert rel_err(jax.jit(dispatch.linear)(x, w), want) < 1e-5
  assert cpu == ["linear"]


def test_fit_crossovers_minimises_total_time():
  prof = [{"m": 1, "gemv_us": 5, "flat_us": 9, "xla_us": 20},
          {"m": 2, "gemv_us": 6, "flat_us": 8, "xla_us": 20},
          {"m": 3, "gemv_us": 9, "flat_us": 8.5, "xla_us": 20},
          {"m": 4, "gemv_us": 12, "flat_us": 9, "xla_us": 8},
          {"m": 5, "flat_us": 9, "xla_us": 9.5},  # one noisy point: not worth a region of its own
          {"m": 6, "flat_us": 11, "xla_us": 8}]
  assert tune.fit_crossovers(prof) == (3, 4)


def test_the_flat_backend_is_the_faster_over_the_ms_both_were_timed_at():
  prof = [{"m": 1, "flat_us": 9, "mosaic_flat_us": 7}, {"m": 16, "flat_us": 10,
                                                        "mosaic_flat_us": 11},
          {"m": 100, "flat_us": 30}]  # M > 64: the Mosaic flat GEMM does not take it
  assert tune.flat_backend(prof) == "pallas_mosaic"  # 18 us against 19
  prof[1]["mosaic_flat_us"] = 13
  assert tune.flat_backend(prof) == "pallas"
  assert tune.flat_backend([{"m": 1, "flat_us": 9}]) is None  # not timed: no entry


def test_tune_compiles_each_candidate_first_and_drops_a_refused_one(monkeypatch):
  from fdjax.tuning import aot, timing
  real_compile, compiled = aot.compile, []
  def compile_refusing_the_first(lowered, **kw):
    if not compiled:
      compiled.append(None)
      raise aot.CompileError("refused by the compiler: RESOURCE_EXHAUSTED: Shared memory size "
                             "limit exceeded")
    compiled.append(real_compile(lowered, **kw))
    return compiled[-1]
  timed = []
  real_time = timing.seconds_per_call
  monkeypatch.setattr(aot, "compile", compile_refusing_the_first)
  monkeypatch.setattr(timing, "seconds_per_call",
                      lambda fn, *a, **k: timed.append(fn) or real_time(fn, *a, **k))
  x, w, _ = _xw(1, 64, 80, jnp.float32)
  configs = [{"block_n": 32, "block_k": 32, "split_k": 1},
             {"block_n": 16, "block_k": 16, "split_k": 2}]
  said = []
  _, best = tune._best(gv.gemv, gv.Settings, configs, [(x, w)], 1, True, said.append)
  assert best == configs[1]
  assert len(said) == 1 and "dropped gemv" in said[0] and "Shared memory size" in said[0]
  assert len(timed) == 1 and len(compiled) == 2  # only the candidate that compiled was timed


def test_tune_refuses_cpu_without_flag():
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  r = subprocess.run([sys.executable, "-m", "fdjax", "tune", "--preset", "random-tiny"],
                     capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
  assert r.returncode == 2 and "interpret" in r.stderr


@pytest.mark.parametrize("split_k", [1, 4])
def test_gemm_kernels_lower_for_cuda(split_k):
  spec = jax.ShapeDtypeStruct
  for fn, settings in ((fg.flat_gemm, fg.Settings), (gv.gemv, gv.Settings)):
    text = cuda_text(jax.jit(functools.partial(fn, settings=settings(split_k=split_k))),
        spec((4, 4096), jnp.bfloat16), spec((4096, 11008), jnp.bfloat16)
    )
    assert "fdjax_" in text
