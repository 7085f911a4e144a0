"""Mosaic GPU kernels (pallas_kernels/mosaic_gpu/) in Mosaic GPU's interpret mode on the CPU,
with its race detector, against float64: the flat GEMM over the small M of decoding."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from fdjax.ops import dispatch
from pallas_kernels.mosaic_gpu import flat_gemm as mfg
from tests.helpers import record_gpu_races, rel_err

DETECT = plgpu.InterpretGPUParams(detect_races=True)


def _xw(m, k, n, dtype, seed=0):
  rng = np.random.default_rng(seed + 7 * m + k + n)
  x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32).astype(dtype)
  w = jnp.asarray(rng.standard_normal((k, n)), jnp.float32).astype(dtype)
  return x, w, np.asarray(x, np.float64) @ np.asarray(w, np.float64)


def _within_twice_xla(out, x, w, want):
  """FlashAttention's rule: at most twice the error of XLA's dot in the same dtype."""
  assert out.dtype == x.dtype and out.shape == want.shape
  got = np.asarray(out, np.float64)
  assert np.all(np.isfinite(got))
  err = np.max(np.abs(got - want))
  base = np.max(np.abs(np.asarray(jnp.dot(x, w), np.float64) - want))
  assert err <= 2 * base + 1e-6, (err, base)


@pytest.mark.parametrize("m,k,n,settings", [
    (1, 512, 128, None),                                      # decode, batch 1 (defaults)
    (3, 256, 192, mfg.Settings(stages=2, split_k=1)),         # a 2-stage pipeline, 3 blocks
    (13, 384, 64, mfg.Settings(stages=3, split_k=2)),         # M off the 8-row padding
    (64, 256, 128, mfg.Settings(stages=4, split_k=1)),        # the largest M, 4 in flight
    (8, 1024, 64, mfg.Settings(block_k=128, stages=2, split_k=4)),
])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_flat_gemm_against_float64(m, k, n, settings, dtype, monkeypatch):
  races = record_gpu_races(monkeypatch)
  x, w, want = _xw(m, k, n, dtype)
  out = mfg.flat_gemm(x, w, settings=settings, interpret=DETECT)
  _within_twice_xla(out, x, w, want)
  assert rel_err(np.asarray(out, np.float32), want) < 1e-2
  assert races == []


def test_split_k_is_deterministic_and_agrees_with_one_program():
  x, w, _ = _xw(5, 512, 128, jnp.bfloat16)
  one = mfg.flat_gemm(x, w, settings=mfg.Settings(split_k=1, stages=2), interpret=True)
  split = [mfg.flat_gemm(x, w, settings=mfg.Settings(split_k=4, stages=2), interpret=True)
           for _ in range(2)]
  np.testing.assert_array_equal(np.asarray(split[0]), np.asarray(split[1]))
  np.testing.assert_allclose(np.asarray(one, np.float32), np.asarray(split[0], np.float32),
                             rtol=2e-2, atol=2e-2)


def test_default_settings_fill_the_gpu_with_split_k():
  s = mfg.Settings.default(4096, 4096)  # Llama-2-7B's q / o projection
  assert (s.block_n, s.block_k) == (64, 64)
  assert (4096 // s.block_n) * s.split_k >= 2 * mfg.H100_SMS // 2
  assert (4096 // s.block_k) % s.split_k == 0 and 1 <= s.stages <= 4
  assert mfg.Settings.default(4096, 28672).split_k == 1  # 448 column blocks fill it already


def test_flat_gemm_refuses_what_it_cannot_take():
  x, w, _ = _xw(3, 256, 128, jnp.bfloat16)
  with pytest.raises(ValueError, match="float32 is not bfloat16 or float16"):
    mfg.flat_gemm(x.astype(jnp.float32), w.astype(jnp.float32), interpret=True)
  with pytest.raises(ValueError, match="M=65 is more than 64"):
    mfg.flat_gemm(jnp.ones((65, 256), jnp.bfloat16), w, interpret=True)
  with pytest.raises(ValueError, match="N=100 is not a multiple of block_n=64"):
    mfg.flat_gemm(x, w[:, :100], interpret=True)
  with pytest.raises(ValueError, match="K=200 is not a multiple"):
    mfg.flat_gemm(x[:, :200], w[:200], interpret=True)
  with pytest.raises(ValueError, match="expected x"):
    mfg.flat_gemm(x, w[None], interpret=True)


def test_the_race_detector_catches_a_planted_race(monkeypatch):
  """A kernel that reads a shared-memory block before waiting on the barrier of the TMA copy
  that fills it: the interpreter's detector must see the copy and the read race."""
  races = record_gpu_races(monkeypatch)

  def copy_then_read(wait_first, x_gmem, o_gmem, smem, barrier):
    plgpu.copy_gmem_to_smem(x_gmem, smem, barrier)
    if wait_first:
      plgpu.barrier_wait(barrier)
    o_gmem[...] = smem[...] + 1.0
    if not wait_first:  # the planted race: the read above did not wait for the copy
      plgpu.barrier_wait(barrier)

  x = jnp.arange(8 * 128, dtype=jnp.float32).reshape(8, 128)
  for wait_first in (True, False):
    out = plgpu.kernel(functools.partial(copy_then_read, wait_first),
                       out_type=jax.ShapeDtypeStruct(x.shape, x.dtype),
                       scratch_types=[plgpu.SMEM(x.shape, x.dtype), plgpu.Barrier()],
                       interpret=DETECT)(x)
    if wait_first:
      np.testing.assert_array_equal(np.asarray(out), np.asarray(x) + 1)
      assert races == [], "a correct kernel was flagged"
  assert races, "the planted race went unseen"


def test_dispatch_runs_the_mosaic_flat_gemm():
  x, w, want = _xw(4, 256, 128, jnp.bfloat16)
  out = dispatch.linear(x, w, impl="pallas_mosaic_interpret")
  _within_twice_xla(out, x, w, want)
  x3 = x.reshape(2, 2, 256)  # leading dims are M
  np.testing.assert_array_equal(np.asarray(dispatch.linear(x3, w, impl="pallas_mosaic_interpret")),
                                np.asarray(out).reshape(2, 2, 128))
  with pytest.raises(ValueError, match="Mosaic GPU.*float32"):
    dispatch.linear(x.astype(jnp.float32), w.astype(jnp.float32), impl="pallas_mosaic_interpret")
  q = jnp.ones((1, 4, 64), jnp.bfloat16)
  with pytest.raises(ValueError, match="no Mosaic GPU kernel"):
    dispatch.decode_attention(q, jnp.ones((1, 8, 4, 64), jnp.bfloat16),
                              jnp.ones((1, 8, 4, 64), jnp.bfloat16), jnp.asarray([8]),
                              impl="pallas_mosaic_interpret")
