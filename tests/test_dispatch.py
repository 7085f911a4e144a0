"""The XLA reference ops against independent float64 numpy references, and dispatch's checks."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdjax.ops import dispatch
from tests.helpers import np_decode_attention, np_prefill_attention, rel_err


def _rand(rng, shape, dtype=np.float32, scale=1.0):
  return (rng.standard_normal(shape) * scale).astype(dtype)


@pytest.mark.parametrize("b,hq,hkv,s,d", [(3, 4, 4, 37, 16), (2, 8, 2, 64, 32), (1, 8, 1, 5, 8)])
def test_decode_attention_xla_matches_numpy(b, hq, hkv, s, d):
  rng = np.random.default_rng(b * 100 + s)
  q, k, v = _rand(rng, (b, hq, d)), _rand(rng, (b, s, hkv, d)), _rand(rng, (b, s, hkv, d))
  lengths = rng.integers(1, s + 1, size=b).astype(np.int32)
  lengths[0] = s
  out = jax.jit(lambda *a: dispatch.decode_attention(*a, impl="auto"))(q, k, v, lengths)
  chex.assert_shape(out, (b, hq, d))
  chex.assert_type(out, jnp.float32)
  want = np_decode_attention(q, k, v, lengths, d ** -0.5)
  assert rel_err(out, want) < 1e-5


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("b,t,hq,hkv,d", [(2, 13, 4, 2, 16), (3, 8, 2, 2, 8)])
def test_prefill_attention_xla_matches_numpy(b, t, hq, hkv, d, causal):
  rng = np.random.default_rng(t)
  q, k, v = _rand(rng, (b, t, hq, d)), _rand(rng, (b, t, hkv, d)), _rand(rng, (b, t, hkv, d))
  lengths = rng.integers(1, t + 1, size=b).astype(np.int32)
  out = dispatch.prefill_attention(q, k, v, lengths=lengths, causal=causal, sm_scale=0.3)
  want = np_prefill_attention(q, k, v, lengths, causal, 0.3)
  assert rel_err(out, want) < 1e-5
  out2 = dispatch.prefill_attention(q, k, v, causal=causal, impl="xla")
  assert rel_err(out2, np_prefill_attention(q, k, v, None, causal, d ** -0.5)) < 1e-5


def test_linear_matches_numpy_and_keeps_leading_dims():
  rng = np.random.default_rng(1)
  x, w = _rand(rng, (2, 3, 100)), _rand(rng, (100, 37))
  y = dispatch.linear(x, w)
  chex.assert_shape(y, (2, 3, 37))
  assert rel_err(y, x.astype(np.float64) @ w.astype(np.float64)) < 1e-5
  xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
  yb = dispatch.linear(xb, wb)
  chex.assert_type(yb, jnp.bfloat16)
  assert rel_err(yb, np.asarray(xb, np.float64) @ np.asarray(wb, np.float64)) < 1e-2


def test_auto_under_jit_reports_cpu_choice():
  assert all(v.startswith("xla (cpu") for v in dispatch.describe(platform="cpu").values())


q3 = np.ones((2, 4, 8), np.float32)
k4 = np.ones((2, 16, 2, 8), np.float32)
lens = np.array([3, 4], np.int32)


@pytest.mark.parametrize("call,msg", [
    (lambda: dispatch.decode_attention(q3[0], k4, k4, lens), "q must have rank 3"),
    (lambda: dispatch.decode_attention(q3, k4[..., :4], k4[..., :4], lens), "head_dim"),
    (lambda: dispatch.decode_attention(np.ones((2, 3, 8), np.float32), k4, k4, lens),
     "multiple of KV heads"),
    (lambda: dispatch.decode_attention(q3, k4, k4, lens.astype(np.float32)), "integer"),
    (lambda: dispatch.decode_attention(q3, k4, k4, lens[:1]), "shape (2,)"),
    (lambda: dispatch.decode_attention(q3.astype(np.int32), k4, k4, lens), "float32"),
    (lambda: dispatch.decode_attention(q3, k4.astype(jnp.bfloat16), k4, lens), "dtype"),
    (lambda: dispatch.decode_attention(q3, k4, k4[:, :8], lens), "same shape"),
    (lambda: dispatch.decode_attention(q3, k4, k4, lens, impl="cuda"), "unknown impl"),
    (lambda: dispatch.prefill_attention(np.ones((2, 5, 4, 8), np.float32), k4, k4), "length"),
    (lambda: dispatch.linear(q3, np.ones((8,), np.float32)), "w must have rank 2"),
    (lambda: dispatch.linear(q3, np.ones((7, 3), np.float32)), "must equal w's K"),
    (lambda: dispatch.linear(q3.astype(np.int32), np.ones((8, 3), np.int32)), "float32"),
])
def test_bad_input_is_a_clear_value_error(call, msg):
  with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
    call()


# ----------------------------------------------------- the backends' kernels, imported lazily

HEAVY = ("jax.experimental.pallas.mosaic_gpu", "jax.experimental.pallas.tpu",
         "jax.experimental.pallas.triton")


def test_a_cpu_generation_imports_no_gpu_or_tpu_pallas_backend():
  """`python -m fdjax generate` on the CPU (the bundled model, the README's command) never
  takes a GPU or TPU branch, so Mosaic GPU, Mosaic TPU and Triton are never imported (~1.2 s
  of its start); the ops layer still holds their modules, and `impl=` one loads it."""
  import os
  import subprocess
  import sys
  code = (
      "import runpy, sys\n"
      "sys.argv = ['fdjax', 'generate', 'hi', '--max-new-tokens', '2', '--compile-cache', 'off']\n"
      "try:\n  runpy.run_module('fdjax', run_name='__main__')\n"
      "except SystemExit as e:\n  assert not e.code, e.code\n"
      f"print('LOADED', [m for m in {HEAVY!r} if m in sys.modules])\n"
      "from fdjax.ops import dispatch\n"
      "dispatch.mosaic_flat_gemm.MAX_M\n"
      "print('AFTER', 'jax.experimental.pallas.mosaic_gpu' in sys.modules)\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-3000:]
  assert "new_tokens=2" in out.stdout
  assert "LOADED []" in out.stdout and "AFTER True" in out.stdout, out.stdout[-2000:]


def test_kernels_module_runs_the_module_on_first_use_and_is_what_import_gives(tmp_path,
                                                                              monkeypatch):
  """Named: not run; the first read runs it once, threads that read together all wait for that
  one run (a slow module: importlib's LazyLoader on Python 3.12.1 let the others see it
  half-made); `import` gives the same object."""
  import importlib
  import sys
  import threading

  from fdjax.ops import kernels
  (tmp_path / "lazy_pkg").mkdir()
  (tmp_path / "lazy_pkg" / "__init__.py").write_text("")
  (tmp_path / "lazy_pkg" / "mod.py").write_text(
      "import sys, time\nsys.lazy_pkg_runs += 1\ntime.sleep(0.3)\nX = 7\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.setattr(sys, "lazy_pkg_runs", 0, raising=False)
  try:
    mod = kernels.module("lazy_pkg.mod")
    assert sys.lazy_pkg_runs == 0  # named, not run
    seen, start = [], threading.Barrier(8)

    def read():
      start.wait()
      try:
        seen.append(mod.X)
      except AttributeError as e:
        seen.append(e)

    threads = [threading.Thread(target=read) for _ in range(8)]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
    assert seen == [7] * 8 and sys.lazy_pkg_runs == 1
    assert importlib.import_module("lazy_pkg.mod") is mod
    from lazy_pkg import mod as again
    assert again is mod and kernels.module("lazy_pkg.mod") is mod
    assert mod.X == 7 and sys.lazy_pkg_runs == 1  # once
    with pytest.raises(AttributeError, match="Y"):
      mod.Y
    with pytest.raises(ModuleNotFoundError, match="lazy_pkg.nothing"):
      kernels.module("lazy_pkg.nothing")
  finally:
    for name in ("lazy_pkg.mod", "lazy_pkg"):
      sys.modules.pop(name, None)
