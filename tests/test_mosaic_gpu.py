"""Mosaic GPU kernels (pallas_kernels/mosaic_gpu/) in Mosaic GPU's interpret mode on the CPU,
with its race detector, against float64: the flat GEMM over the small M of decoding, and split-KV
decode attention with the asynchronous softmax over contiguous and paged caches (ragged
lengths, GQA 1 / 4 / 8, caches off the block multiples, shuffled, shared and garbage page-table
entries, windows, soft-caps, and scores that send the guard to the online softmax)."""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from fdjax.ops import dispatch, kv_cache, quant, reference, selection
from pallas_kernels.common.async_softmax import HI
from pallas_kernels.mosaic_gpu import decode_attention as mda
from pallas_kernels.mosaic_gpu import flat_gemm as mfg
from pallas_kernels.mosaic_gpu import quantized_gemm as mq
from pallas_kernels.mosaic_gpu import shared as mshared
from pallas_kernels.triton import shared as triton_shared
from tests.helpers import np_decode_attention, record_gpu_races, rel_err
from tests.test_attention_kernels import _check_low_precision, _f64, _inputs
from tests.test_paged import LENGTHS, PS, _paged_case

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
  assert (4096 // s.block_n) * s.split_k >= 2 * mshared.H100_SMS // 2
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


@pytest.mark.parametrize("method,m,k,n,settings", [
    ("int8", 1, 512, 128, None),                                   # decode, batch 1 (defaults)
    ("int8", 13, 384, 192, mq.Settings(stages=2, split_k=2)),      # M off the 8-row padding
    ("int4", 5, 512, 128, mq.Settings(stages=2, split_k=2)),       # two groups a program
    ("int4", 64, 384, 64, mq.Settings(stages=3, split_k=1)),       # the largest M, 3 groups
])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_quantized_flat_gemm_against_float64(method, m, k, n, settings, dtype, monkeypatch):
  """int8 / int4 weights (fdjax.ops.quant's format): against x @ the dequantized weight in
  float64, within twice the error of XLA's dequantize-then-dot in the same dtype."""
  races = record_gpu_races(monkeypatch)
  rng = np.random.default_rng(m + k + n)
  x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32).astype(dtype)
  w = quant.quantize(jnp.asarray(rng.standard_normal((k, n)), jnp.float32), method, dtype)
  exact = np.asarray(quant.dequantize(w, jnp.float32), np.float64)
  want = np.asarray(x, np.float64) @ exact
  out = mq.flat_gemm(x, w.values, w.scales, bits=w.bits, settings=settings, interpret=DETECT)
  assert out.dtype == dtype and out.shape == (m, n)
  got = np.asarray(out, np.float64)
  base = np.max(np.abs(np.asarray(jnp.dot(x, quant.dequantize(w)), np.float64) - want))
  assert np.all(np.isfinite(got)) and np.max(np.abs(got - want)) <= 2 * base + 1e-6
  assert races == []
  np.testing.assert_array_equal(  # dispatch runs the same kernel (at its default settings)
      np.asarray(dispatch.linear(x, w, impl="pallas_mosaic_interpret"), np.float32),
      np.asarray(mq.flat_gemm(x, w.values, w.scales, bits=w.bits, interpret=True), np.float32))


def test_quantized_flat_gemm_refuses_what_it_cannot_take():
  rng = np.random.default_rng(0)
  w = quant.quantize(jnp.asarray(rng.standard_normal((256, 128)), jnp.float32), "int4",
                     jnp.bfloat16)
  x = jnp.ones((3, 256), jnp.bfloat16)
  with pytest.raises(ValueError, match="float32 is not bfloat16 or float16"):
    w32 = quant.quantize(jnp.ones((256, 128)), "int4", jnp.float32)
    mq.flat_gemm(x.astype(jnp.float32), w32.values, w32.scales, bits=4, interpret=True)
  with pytest.raises(ValueError, match="M=65 is more than 64"):
    mq.flat_gemm(jnp.ones((65, 256), jnp.bfloat16), w.values, w.scales, bits=4, interpret=True)
  odd = quant.quantize(jnp.ones((200, 128)), "int8", jnp.bfloat16)
  with pytest.raises(ValueError, match="K=200 is not a multiple of 128"):
    mq.flat_gemm(jnp.ones((3, 200), jnp.bfloat16), odd.values, odd.scales, bits=8,
                 interpret=True)
  with pytest.raises(ValueError, match="int4 weights for K=256 must be values"):
    mq.flat_gemm(x, w.values[:100], w.scales, bits=4, interpret=True)
  # a program's int4 scale rows come in one TMA copy: at most 256 (K = 32768 a program)
  assert mq.unsupported(1, 2 ** 15, 128, jnp.bfloat16, 4, mq.Settings(split_k=1)) is None
  assert "257 int4 scale rows" in mq.unsupported(1, 257 * 128, 128, jnp.bfloat16, 4,
                                                 mq.Settings(split_k=1))
  assert mq.unsupported(1, 257 * 128, 128, jnp.bfloat16, 8, mq.Settings(split_k=1)) is None


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


# ------------------------------------------------------------------------ decode attention

D = 64  # the smallest head_dim the kernel takes (one 128-byte swizzled row of bfloat16)


@pytest.mark.parametrize("dtype,hq,hkv,mode,kw", [
    (jnp.bfloat16, 8, 2, "async", {}),                        # GQA 4, three splits
    (jnp.bfloat16, 4, 4, "online", {"window": 20, "softcap": 2.0}),  # MHA
    (jnp.float16, 8, 1, "async", {"window": 9}),              # GQA 8 in float16
    (jnp.bfloat16, 8, 1, "online", {"softcap": 30.0}),
])
def test_decode_matches_float64(dtype, hq, hkv, mode, kw, monkeypatch):
  races = record_gpu_races(monkeypatch)
  rng = np.random.default_rng(hq * 10 + hkv)
  s = 88  # not a multiple of the block (64) nor of the split (TMA needs 8-row tiles)
  q, k, v = _inputs(rng, (3, hq, D), (3, s, hkv, D), dtype)
  lengths = jnp.asarray([1, 33, s], jnp.int32)
  out, stats = mda.decode_attention(q, k, v, lengths, sm_scale=D ** -0.5, mode=mode,
                                    settings=mda.Settings(num_splits=3, stages=2),
                                    interpret=DETECT, return_stats=True, **kw)
  assert out.shape == q.shape and out.dtype == dtype
  want = np_decode_attention(*_f64(q, k, v), np.asarray(lengths), D ** -0.5, **kw)
  _check_low_precision(out, want, reference.decode_attention(q, k, v, lengths, D ** -0.5,
                                                               plain=True, **kw))
  assert int(stats["recomputed_rows"]) == 0  # ordinary scores take the async path
  assert races == []


@pytest.mark.parametrize("mode", ["async", "online"])
def test_decode_at_head_dim_256_matches_float64(mode, monkeypatch):
  """Gemma's head_dim: the [64, 256] float32 accumulator is half a thread's registers; the
  online softmax rescales it and hands it back to the MMA (no second accumulator)."""
  races = record_gpu_races(monkeypatch)
  rng = np.random.default_rng(256)
  d, s = 256, 72
  q, k, v = _inputs(rng, (2, 4, d), (2, s, 2, d), jnp.bfloat16)
  lengths = jnp.asarray([s, 29], jnp.int32)
  kw = {"softcap": 50.0} if mode == "online" else {}
  out = mda.decode_attention(q, k, v, lengths, sm_scale=d ** -0.5, mode=mode,
                             settings=mda.Settings(num_splits=2, stages=2), interpret=DETECT,
                             **kw)
  want = np_decode_attention(*_f64(q, k, v), np.asarray(lengths), d ** -0.5, **kw)
  _check_low_precision(out, want, reference.decode_attention(q, k, v, lengths, d ** -0.5,
                                                               plain=True, **kw))
  assert races == []


def test_decode_default_settings_a_block_past_the_cache_end(monkeypatch):
  """64-key blocks over a 104-entry cache: the last block reads past the cache's end (TMA
  fills what lies outside the array) and weighs it 0."""
  races = record_gpu_races(monkeypatch)
  rng = np.random.default_rng(5)
  q, k, v = _inputs(rng, (2, 4, D), (2, 104, 2, D), jnp.bfloat16)
  lengths = jnp.asarray([104, 61], jnp.int32)
  out = mda.decode_attention(q, k, v, lengths, sm_scale=D ** -0.5, interpret=DETECT)
  _check_low_precision(out, np_decode_attention(*_f64(q, k, v), np.asarray(lengths), D ** -0.5),
                       reference.decode_attention(q, k, v, lengths, D ** -0.5, plain=True))
  assert races == []


@pytest.mark.parametrize("hq,hkv,window", [(8, 2, None), (4, 4, 20), (8, 1, None)])
def test_paged_decode_matches_the_gathered_cache(hq, hkv, window, monkeypatch):
  """Shuffled page ids, a page shared by two rows, garbage table entries past each row's
  pages; with a window the pages wholly before it are given back (NO_PAGE) and filled with
  NaN: the kernel never reads them."""
  races = record_gpu_races(monkeypatch)
  rng = np.random.default_rng(7 + hq + hkv)
  q, kp, vp, table, n, kf, vf = _paged_case(rng, hq, hkv, jnp.bfloat16, LENGTHS, d=D)
  if window is not None:
    gone = np.zeros(table.shape, bool)
    for i, length in enumerate(LENGTHS):
      gone[i, :max(0, length - window) // PS] = True
    nan_pages = np.unique(np.asarray(table)[gone])
    nan_pages = nan_pages[~np.isin(nan_pages, np.asarray(table)[~gone])]
    assert nan_pages.size
    table = jnp.where(jnp.asarray(gone), kv_cache.NO_PAGE, table)
    kp, vp = (x.at[:, nan_pages].set(jnp.nan) for x in (kp, vp))
  out = mda.paged_decode_attention(q, kp, vp, table, n, sm_scale=D ** -0.5, window=window,
                                   settings=mda.Settings(num_splits=2), interpret=DETECT)
  want = np_decode_attention(*_f64(q, kf, vf), np.asarray(n), D ** -0.5, window)
  _check_low_precision(out, want, reference.decode_attention(q, kf, vf, n, D ** -0.5,
                                                               window=window, plain=True))
  assert races == []


@pytest.mark.parametrize("case", ["scores_x1e4", "phi_far_too_high"])
def test_decode_guard_recovers_every_row(case):
  rng = np.random.default_rng(11)
  q, k, v = _inputs(rng, (2, 8, D), (2, 64, 2, D), jnp.bfloat16)
  q = q * (1e4 if case == "scores_x1e4" else 1.0)
  lengths = jnp.asarray([64, 50], jnp.int32)
  out, stats = mda.decode_attention(q, k, v, lengths, sm_scale=D ** -0.5,
                                    phi=1e4 if case == "phi_far_too_high" else None,
                                    settings=mda.Settings(num_splits=4, stages=2),
                                    interpret=True, return_stats=True)
  want = np_decode_attention(*_f64(q, k, v), np.asarray(lengths), D ** -0.5)
  _check_low_precision(out, want, reference.decode_attention(q, k, v, lengths, D ** -0.5,
                                                               plain=True))
  assert int(stats["recomputed_rows"]) == 16  # every query head of every row


def test_decode_guard_one_huge_score_recomputes_only_its_group(guard_form):
  rng = np.random.default_rng(12)
  q, k, v = _inputs(rng, (2, 8, D), (2, 64, 2, D), jnp.bfloat16)
  lengths = jnp.asarray([64, 50], jnp.int32)
  k = k.at[1, 40, 0].set(q[1, 0] * 40.0)  # key 40 of row 1, KV head 0: far above phi + HI
  assert float(jnp.dot(q[1, 0], k[1, 40, 0], preferred_element_type=jnp.float32)) * D ** -0.5 > HI
  out, stats = mda.decode_attention(q, k, v, lengths, sm_scale=D ** -0.5,
                                    settings=mda.Settings(num_splits=4, stages=2),
                                    interpret=True, return_stats=True)
  want = np_decode_attention(*_f64(q, k, v), np.asarray(lengths), D ** -0.5)
  _check_low_precision(out, want, reference.decode_attention(q, k, v, lengths, D ** -0.5,
                                                               plain=True))
  assert 1 <= int(stats["recomputed_rows"]) <= 4  # at most the 4 query heads of that group


def test_decode_guard_window_is_float16s_where_the_weights_are_float16():
  """The weights exp(s - phi) meet V in the input's dtype: in float16 a row whose scores sit
  15 below phi keeps almost none of their bits (float16 ends at exp(-16.6); its normals at
  exp(-9.7)), so the guard's float16 window flags the row and the online pass gets it right.
  In bfloat16 (float32's exponent) the same row is inside the window and exact."""
  rng = np.random.default_rng(13)
  q = np.zeros((1, 4, D), np.float32)
  q[..., 0] = 1.0  # each query head's score of key j is k[j, 0]
  k = rng.standard_normal((1, 64, 1, D)).astype(np.float32)
  k[..., 0] = -15.0 - np.abs(rng.standard_normal((1, 64, 1))) * 1.5
  v = rng.standard_normal((1, 64, 1, D)).astype(np.float32)
  lengths = jnp.asarray([64], jnp.int32)
  for dtype, recomputed in ((jnp.float16, 4), (jnp.bfloat16, 0)):
    qd, kd, vd = (jnp.asarray(x, dtype) for x in (q, k, v))
    out, stats = mda.decode_attention(qd, kd, vd, lengths, sm_scale=1.0,
                                      settings=mda.Settings(num_splits=1, stages=2),
                                      interpret=True, return_stats=True)
    want = np_decode_attention(*_f64(qd, kd, vd), np.asarray(lengths), 1.0)
    _check_low_precision(out, want, reference.decode_attention(qd, kd, vd, lengths, 1.0,
                                                                 plain=True))
    assert int(stats["recomputed_rows"]) == recomputed


def test_decode_default_settings_fill_the_gpu_within_shared_memory():
  s = mda.Settings.default(1, 8, 4096)  # Llama-3-8B at batch 1: 8 KV heads
  assert s.block_k == 64 and 2 <= s.stages <= 4
  assert s.num_splits == 16  # 256 keys a split at least (33 splits would fill 2 x 132 SMs)
  assert mda.Settings.default(64, 8, 4096).num_splits == 1  # 512 programs fill it already
  for d in mda.HEAD_DIMS:
    s = mda.Settings.default(1, 8, 4096, head_dim=d)
    assert (s.stages * 2 * s.block_k + 2 * mda.ROWS) * d * 2 <= mda.SMEM_BUDGET


def test_decode_refuses_what_it_cannot_take():
  q, k, v = _inputs(np.random.default_rng(0), (1, 4, D), (1, 32, 2, D), jnp.bfloat16)
  n = jnp.asarray([32])
  with pytest.raises(ValueError, match="float32 is not bfloat16 or float16"):
    mda.decode_attention(*(x.astype(jnp.float32) for x in (q, k, v)), n, sm_scale=1.0,
                         interpret=True)
  with pytest.raises(ValueError, match="head_dim 32 is not 64, 128 or 256"):
    mda.decode_attention(q[..., :32], k[..., :32], v[..., :32], n, sm_scale=1.0, interpret=True)
  with pytest.raises(ValueError, match="head_dim 192 is not 64, 128 or 256"):
    wide = [jnp.concatenate([x] * 3, axis=-1) for x in (q, k, v)]
    mda.decode_attention(*wide, n, sm_scale=1.0, interpret=True)
  with pytest.raises(ValueError, match="the cache length 77 is not a multiple of 8"):
    long = jnp.concatenate([k] * 3, axis=1)[:, :77]
    mda.decode_attention(q, long, long, n, sm_scale=1.0, interpret=True)
  pages = jnp.moveaxis(jnp.concatenate([k] * 3, axis=1)[:, :48], 2, 0)  # a page of 48 entries
  with pytest.raises(ValueError, match="page size 48 neither divides nor is a multiple"):
    mda.paged_decode_attention(q, pages, pages, jnp.zeros((1, 2), jnp.int32), n, sm_scale=1.0,
                               interpret=True)
  with pytest.raises(ValueError, match="block_k 96 is not a multiple of 64"):
    mda.decode_attention(q, k, v, n, sm_scale=1.0, settings=mda.Settings(block_k=96),
                         interpret=True)
  with pytest.raises(ValueError, match="unknown mode"):
    mda.decode_attention(q, k, v, n, sm_scale=1.0, mode="sync", interpret=True)
  with pytest.raises(ValueError, match="window must be a positive integer"):
    mda.decode_attention(q, k, v, n, sm_scale=1.0, window=0, interpret=True)


def test_dispatch_runs_the_mosaic_flat_gemm():
  x, w, want = _xw(4, 256, 128, jnp.bfloat16)
  out = dispatch.linear(x, w, impl="pallas_mosaic_interpret")
  _within_twice_xla(out, x, w, want)
  x3 = x.reshape(2, 2, 256)  # leading dims are M
  np.testing.assert_array_equal(np.asarray(dispatch.linear(x3, w, impl="pallas_mosaic_interpret")),
                                np.asarray(out).reshape(2, 2, 128))
  with pytest.raises(ValueError, match="Mosaic GPU.*float32"):
    dispatch.linear(x.astype(jnp.float32), w.astype(jnp.float32), impl="pallas_mosaic_interpret")
  q = jnp.ones((1, 8, 4, 64), jnp.bfloat16)
  with pytest.raises(ValueError, match="no Mosaic GPU kernel"):
    dispatch.prefill_attention(q, q, q, impl="pallas_mosaic_interpret")


def test_dispatch_runs_the_mosaic_decode_attention():
  """Both decode ops through dispatch, as a model calls them, equal to XLA's within bfloat16's
  rounding; the kernel's refusals reach the caller."""
  rng = np.random.default_rng(3)
  q, kp, vp, table, n, kf, vf = _paged_case(rng, 8, 2, jnp.bfloat16, LENGTHS, d=D)
  for impl in ("pallas_mosaic_interpret", "xla"):
    paged = dispatch.paged_decode_attention(q, kp, vp, table, n, impl=impl)
    flat = dispatch.decode_attention(q, kf, vf, n, impl=impl)
    if impl == "xla":
      break
    mosaic = (paged, flat)
  want = np_decode_attention(*_f64(q, kf, vf), np.asarray(n), D ** -0.5)
  for got in mosaic:
    _check_low_precision(got, want, paged)
  with pytest.raises(ValueError, match="Mosaic GPU.*head_dim 16"):
    dispatch.decode_attention(q[..., :16], kf[..., :16], vf[..., :16], n,
                              impl="pallas_mosaic_interpret")
  # 71 query heads on one KV head (Falcon-7B) are more than one MMA's rows: under `using`,
  # XLA runs it (auto on a GPU: Triton), where the kernel would refuse it at trace time.
  q71, k1, v1 = _inputs(rng, (1, 71, D), (1, 32, 1, D), jnp.bfloat16)
  with dispatch.using("pallas_mosaic_interpret"):
    got = dispatch.decode_attention(q71, k1, v1, jnp.asarray([20], jnp.int32))
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(
      dispatch.decode_attention(q71, k1, v1, jnp.asarray([20], jnp.int32), impl="xla"),
      np.float32))


# ------------------------------------------------------------------------ what auto picks

def test_auto_on_a_gpu_takes_mosaic_on_hopper_then_triton_then_xla(monkeypatch):
  """The rule in fdjax.ops.selection, for a described H100 (no GPU here: Hopper), and what it
  says when a kernel does not take the call."""
  att = selection.attention
  c = att("paged_decode_attention", 128, "bfloat16", "cuda", 64, 32)
  assert c.impl == "pallas_mosaic" and "TMA pipeline, WGMMA" in c.reason
  assert att("decode_attention", 64, "float16", "cuda", 4096, 1).impl == "pallas_mosaic"
  assert att("paged_decode_attention", 128, "bfloat16", "cuda", 16, 8).impl == "pallas_mosaic"
  assert att("decode_attention", 256, "bfloat16", "cuda", 8192, 1).impl == "pallas_mosaic"  # Gemma
  for args, why in [
      ((128, "float32", "cuda", 4096, 1), "dtype float32 is not bfloat16 or float16"),
      ((32, "bfloat16", "cuda", 4096, 1), "head_dim 32 is not 64, 128 or 256"),
      ((128, "bfloat16", "cuda", 48, 8), "the page size 48 neither divides"),
      ((128, "bfloat16", "cuda", 4097, 1), "the cache length 4097 is not a multiple of 8"),
      ((64, "bfloat16", "cuda", 4096, 1, 71), "71 query heads per KV head is more than 64")]:
    c = att("paged_decode_attention", *args)  # the last: Falcon-7B's 71 on one KV head
    assert c.impl == "pallas" and f"not Mosaic GPU: {why}" in c.reason, c
  c = att("paged_decode_attention", 128, "bfloat16", "cuda", 24, 8)
  assert c.impl == "xla" and "Mosaic GPU: the page size 24 neither divides" in c.reason
  assert "Triton: page size 24 is not a multiple of 16" in c.reason
  assert att("prefill_attention", 128, "bfloat16", "cuda").impl == "pallas"  # no Mosaic one yet
  monkeypatch.setattr(selection, "gpu_major", lambda: 8)  # an A100
  c = att("decode_attention", 128, "bfloat16", "cuda", 4096, 1)
  assert c.impl == "pallas" and "written for sm_90a, this GPU is sm_8x" in c.reason


def test_linear_auto_on_a_gpu_and_a_table_that_says_triton(monkeypatch, tmp_path):
  lin = functools.partial(selection.linear, kind="cpu", gpu_auto=True)
  assert lin(8, 4096, 4096, dtype="bfloat16").impl == "flat_mosaic"
  assert lin(1, 4096, 4096, dtype="bfloat16").impl == "gemv"  # Triton's GEMV below M1
  assert lin(8, 4096, 4096, dtype="float32").impl == "flat"
  assert lin(8, 4096, 4096, dtype="bfloat16", quantization="int8").impl == "flat_mosaic"
  assert lin(8, 4000, 4096, dtype="bfloat16", quantization="int4").impl == "flat"  # K % 128
  assert lin(8, 4096, 4000, dtype="bfloat16").impl == "flat"  # N not a multiple of 64
  assert lin(128, 4096, 4096, dtype="bfloat16").impl == "xla"
  assert selection.linear(8, 4096, 4096, kind="cpu").impl == "flat"  # impl="pallas": Triton
  entry = {**selection.analytic(4096, 4096), "source": "tuned", "backend": "pallas"}
  (tmp_path / "t.json").write_text(json.dumps({"device": "cpu",
                                               "shapes": {"4096x4096": entry}}))
  monkeypatch.setenv("FDJAX_TABLES", str(tmp_path))
  selection.reload()
  try:
    assert lin(8, 4096, 4096, dtype="bfloat16").impl == "flat"  # the table's winner: Triton
    assert lin(8, 4096, 11008, dtype="bfloat16").impl == "flat_mosaic"  # no entry: the rule
  finally:
    monkeypatch.delenv("FDJAX_TABLES")
    selection.reload()


def test_a_jax_without_triton_still_gets_kernels(monkeypatch):
  monkeypatch.setattr(triton_shared, "AVAILABLE", False)
  assert not selection.has_triton()
  lin = functools.partial(selection.linear, kind="cpu", gpu_auto=True)
  assert lin(1, 4096, 4096, dtype="bfloat16").impl == "flat_mosaic"  # no GEMV: the flat GEMM
  c = lin(8, 4096, 4096, dtype="float32")
  assert c.impl == "xla" and "Triton: this JAX has no Pallas Triton backend" in c.reason
  assert lin(8, 4096, 4096, dtype="bfloat16", quantization="int4").impl == "flat_mosaic"
  assert lin(8, 4000, 4096, dtype="bfloat16", quantization="int4").impl == "xla"
  assert selection.attention("decode_attention", 128, "bfloat16", "cuda").impl == "pallas_mosaic"
  c = selection.attention("decode_attention", 128, "float32", "cuda")
  assert c.impl == "xla" and "Triton: this JAX has no Pallas Triton backend" in c.reason
  q, k, v = _inputs(np.random.default_rng(0), (1, 4, D), (1, 32, 2, D), jnp.float32)
  with pytest.raises(ValueError, match="this JAX has no Pallas Triton backend"):
    dispatch.decode_attention(q, k, v, jnp.asarray([32]), impl="pallas_interpret")
  with dispatch.using("pallas_interpret"):  # the override falls back to XLA, as for shapes
    np.testing.assert_allclose(np.asarray(dispatch.decode_attention(q, k, v, jnp.asarray([32]))),
                               np.asarray(dispatch.decode_attention(q, k, v, jnp.asarray([32]),
                                                                    impl="xla")), rtol=1e-6)


# ------------------------------------------------------------- the grouped GEMM (experts)

@pytest.mark.parametrize("rows,k,n,experts,stages", [
    (8, 128, 64, [2, -1, 0, 2, 9], 2),   # an empty tile, an expert read twice, one past E
    (16, 256, 128, [1, 0], 4),           # four K steps in flight
    (64, 64, 192, [3], 1),               # the largest tile, one K step
])
def test_grouped_gemm_against_float64(rows, k, n, experts, stages, monkeypatch):
  """Each tile times its own expert's weight; an empty tile (-1) is left alone; bf16 within
  twice XLA's bf16 error."""
  from pallas_kernels.mosaic_gpu import grouped_gemm as mgg
  races = record_gpu_races(monkeypatch)
  rng = np.random.default_rng(rows + k + n)
  x = jnp.asarray(rng.standard_normal((len(experts), rows, k)), jnp.float32).astype(jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((4, k, n)), jnp.float32).astype(jnp.bfloat16)
  out = np.asarray(mgg.grouped_gemm(x, jnp.asarray(experts, jnp.int32), w,
                                    settings=mgg.Settings(stages=stages), interpret=DETECT))
  assert races == [] and out.shape == (len(experts), rows, n)
  with pytest.raises(ValueError, match="experts must be integers"):
    mgg.grouped_gemm(x, jnp.asarray(experts, jnp.float32), w, interpret=True)
  for t, e in enumerate(experts):
    if e < 0:
      continue
    e = min(e, 3)  # past the last expert: the last, as XLA's gather clamps
    want = np.asarray(x[t], np.float64) @ np.asarray(w[e], np.float64)
    base = np.max(np.abs(np.asarray(jnp.dot(x[t], w[e]), np.float64) - want))
    assert np.max(np.abs(out[t] - want)) <= 2 * base + 1e-6


@pytest.mark.parametrize("method,rows,k,n,experts,stages", [
    ("int8", 8, 128, 64, [2, -1, 0, 2, 9], 2),  # an empty tile, an expert twice, one past E
    ("int4", 16, 384, 128, [1, 3], 2),          # three groups, two in flight
    ("int8", 64, 256, 64, [0], 4),              # the largest tile
])
def test_grouped_quantized_gemm_against_float64(method, rows, k, n, experts, stages,
                                                monkeypatch):
  """int8 / int4 experts read as their stored bytes: each tile against its expert's
  dequantized weight in float64, within twice XLA's dequantize-then-dot bf16 error (an empty
  tile's rows are undefined: not compared); no race."""
  from pallas_kernels.mosaic_gpu import grouped_quantized_gemm as mgq
  races = record_gpu_races(monkeypatch)
  rng = np.random.default_rng(rows + k + n)
  x = jnp.asarray(rng.standard_normal((len(experts), rows, k)), jnp.float32).astype(jnp.bfloat16)
  w = quant.quantize(jnp.asarray(rng.standard_normal((4, k, n)), jnp.float32), method,
                     jnp.bfloat16)
  out = np.asarray(mgq.grouped_gemm(x, jnp.asarray(experts, jnp.int32), w.values, w.scales,
                                    bits=w.bits, settings=mgq.Settings(stages=stages),
                                    interpret=DETECT))
  assert races == [] and out.shape == (len(experts), rows, n)
  exact = np.asarray(quant.dequantize(w, jnp.float32), np.float64)
  for t, e in enumerate(experts):
    if e < 0:
      continue
    e = min(e, 3)  # past the last expert: the last, as XLA's gather clamps
    want = np.asarray(x[t], np.float64) @ exact[e]
    base = np.max(np.abs(np.asarray(jnp.dot(x[t], quant.dequantize(w)[e]), np.float64) - want))
    assert np.all(np.isfinite(out[t])) and np.max(np.abs(out[t] - want)) <= 2 * base + 1e-6


def test_grouped_quantized_gemm_refuses_what_it_cannot_take():
  from pallas_kernels.mosaic_gpu import grouped_quantized_gemm as mgq
  w = quant.quantize(jnp.ones((2, 200, 64)), "int8", jnp.bfloat16)
  x, tiles = jnp.ones((1, 8, 200), jnp.bfloat16), jnp.zeros((1,), jnp.int32)
  with pytest.raises(ValueError, match="K=200 is not a multiple of 128"):
    mgq.grouped_gemm(x, tiles, w.values, w.scales, bits=8, interpret=True)
  w = quant.quantize(jnp.ones((2, 256, 64)), "int4", jnp.bfloat16)
  with pytest.raises(ValueError, match="tiles of 12 rows"):
    mgq.grouped_gemm(jnp.ones((1, 12, 256), jnp.bfloat16), tiles, w.values, w.scales, bits=4,
                     interpret=True)
  with pytest.raises(ValueError, match="int4 experts for K=256 must be values"):
    mgq.grouped_gemm(jnp.ones((1, 8, 256), jnp.bfloat16), tiles, w.values[:, :64], w.scales,
                     bits=4, interpret=True)
  with pytest.raises(ValueError, match="scales x's bfloat16"):
    mgq.grouped_gemm(jnp.ones((1, 8, 256), jnp.bfloat16), tiles, w.values,
                     w.scales.astype(jnp.float16), bits=4, interpret=True)


def test_moe_through_the_grouped_gemm_kernel():
  """dispatch.moe with the Mosaic GPU kernel (interpret mode) against float64: a decode-sized
  batch where most experts get no token and a skewed one where one expert takes every token
  over several tiles; and under `using`, what it does not take (float32) runs XLA."""
  from fdjax.ops import moe as moe_lib
  from tests.test_moe import _reference
  t, e, h, f = 21, 8, 128, 128  # K a multiple of the int4 group (128)
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal((t, h)), jnp.float32).astype(jnp.bfloat16)
  w_gate_up = jnp.asarray(rng.standard_normal((e, h, 2 * f)) * 0.2, jnp.float32).astype(x.dtype)
  w_down = jnp.asarray(rng.standard_normal((e, f, h)) * 0.2, jnp.float32).astype(x.dtype)
  skewed = np.full((t, e), -5.0, np.float32)
  skewed[:, 6], skewed[:, 1] = 5.0, 4.0  # every token: expert 6, then expert 1
  for logits in (jnp.asarray(rng.standard_normal((3, e)), jnp.float32), jnp.asarray(skewed)):
    xs = x[:logits.shape[0]]
    got = dispatch.moe(xs, logits, w_gate_up, w_down, top_k=2, impl="pallas_mosaic_interpret")
    weights, experts = moe_lib.route(logits, 2, True)
    want = _reference(xs, weights, experts, w_gate_up, w_down)
    xla = dispatch.moe(xs, logits, w_gate_up, w_down, top_k=2, impl="xla")
    err, base = (np.max(np.abs(np.asarray(a, np.float64) - want)) for a in (got, xla))
    assert got.dtype == jnp.bfloat16 and np.isfinite(err) and err <= 2 * base + 1e-3
  for method in ["int4"]:  # quantized experts through the quantized kernel (int8's: above)
    q_gate_up, q_down = (quant.quantize(w, method) for w in (w_gate_up, w_down))
    logits = jnp.asarray(skewed)
    got = dispatch.moe(x, logits, q_gate_up, q_down, top_k=2, impl="pallas_mosaic_interpret")
    weights, experts = moe_lib.route(logits, 2, True)
    want = _reference(x, weights, experts, quant.dequantize(q_gate_up, jnp.float32),
                      quant.dequantize(q_down, jnp.float32))
    xla = dispatch.moe(x, logits, q_gate_up, q_down, top_k=2, impl="xla")
    err, base = (np.max(np.abs(np.asarray(a, np.float64) - want)) for a in (got, xla))
    assert np.isfinite(err) and err <= 2 * base + 1e-3, (method, err, base)
  with pytest.raises(ValueError, match="float32 is not bfloat16"):
    dispatch.moe(x.astype(jnp.float32), jnp.asarray(skewed), w_gate_up.astype(jnp.float32),
                 w_down.astype(jnp.float32), top_k=2, impl="pallas_mosaic_interpret")
  args = (x.astype(jnp.float32), jnp.asarray(skewed), w_gate_up.astype(jnp.float32),
          w_down.astype(jnp.float32))
  with dispatch.using("pallas_mosaic_interpret"):  # what the kernel does not take: XLA
    y = dispatch.moe(*args, top_k=2)
  np.testing.assert_array_equal(y, dispatch.moe(*args, top_k=2, impl="xla"))
