"""Every Pallas kernel against the XLA reference, on the device it runs on.

  python bench/gpu_check.py            # compiled kernels, realistic shapes (a CUDA GPU)
  python bench/gpu_check.py --smoke    # interpret mode, small shapes, one case per kernel

Fresh random inputs for every case (never zeros), ragged lengths, GQA ratios including a
group of 7, head dims 64 / 128 / 256, sizes off the block multiples, sliding windows (a paged
cache whose pages before the window were given back) and soft-capping, and the adversarial
cases of the async softmax's guard. The reference is fdjax.ops.reference on float32 inputs at
HIGHEST precision. float32 kernels must be within 1e-5 relative (2e-5 for the flat GEMM and
GEMV, whose float32 sums run in another order); bfloat16 kernels within 2x the error of the
same computation done plainly in bfloat16 by XLA (FlashAttention's rule). NaN or inf never
passes. Writes gpu_check{,_smoke}.{json,md}; exits 1 if any case fails.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from fdjax.ops import dispatch, kv_cache, quant, reference, selection  # noqa: E402
from fdjax.tuning import tune
from pallas_kernels.mosaic_gpu import decode_attention as mda  # noqa: E402
from pallas_kernels.mosaic_gpu import flat_gemm as mfg  # noqa: E402
from pallas_kernels.mosaic_gpu import quantized_gemm as mq  # noqa: E402
from pallas_kernels.triton import cope_attention as ck  # noqa: E402
from pallas_kernels.triton import decode_attention as dk  # noqa: E402
from pallas_kernels.triton import flat_gemm as fg  # noqa: E402
from pallas_kernels.triton import gemv as gv  # noqa: E402
from pallas_kernels.triton import prefill_attention as pk  # noqa: E402

F32_LIMIT = 1e-5
GEMM_F32_LIMIT = 2e-5
CASE_S = 150  # a case still running after this (compile included) is taken as hung
#               (--case-seconds: the lease's script gives less, so one hang costs little)


def rel_err(got, want) -> float:
  got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
  want = np.asarray(jnp.asarray(want, jnp.float32), np.float64)
  if not np.all(np.isfinite(got)):
    return float("inf")
  return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def _randn(key, shape, dtype, scale=1.0):
  return (jax.random.normal(key, shape, jnp.float32) * scale).astype(dtype)


def _f32(*xs):
  return [x.astype(jnp.float32) for x in xs]


def _judge(out, want, dtype, naive=None, f32_limit=F32_LIMIT):
  """(error, limit, ok): float32 against f32_limit; bf16 against 2x the naive bf16 error."""
  err = rel_err(out, want)
  if dtype == jnp.float32:
    limit = f32_limit
  else:
    limit = 2 * rel_err(naive, want) + 1e-6
  return err, limit, bool(err <= limit)


# ---------------------------------------------------------- plain bf16 computations (naive)

def _naive_cope(q, k, v, pos_emb, lengths, scale):
  """The reference's formulas with every intermediate rounded to bf16."""
  rnd = lambda x: x.astype(jnp.bfloat16).astype(jnp.float32)
  out = reference.cope_attention(rnd(q.astype(jnp.float32)), k.astype(jnp.float32),
                                 v.astype(jnp.float32), pos_emb.astype(jnp.float32), lengths,
                                 scale)
  return out.astype(jnp.bfloat16)


# ------------------------------------------------------------------------------- cases

class Checker:
  def __init__(self, smoke: bool, results_dir: str | None = None, only=(),
               case_s: float = CASE_S):
    self.smoke, self.case_s = smoke, case_s
    self.results_dir = results_dir
    self.only = only
    self.interpret = smoke
    self.impl = "pallas_interpret" if smoke else "pallas"
    self.rows = []
    self.key = jax.random.key(2026)

  def next_key(self):
    self.key, sub = jax.random.split(self.key)
    return sub

  def case(self, kernel, name, fn):
    if self.smoke and any(r["kernel"] == kernel for r in self.rows):
      return  # the smoke form (the CPU's interpret mode): one case per kernel
    if self.only and not any(o in f"{kernel} {name}" for o in self.only):
      return
    t0 = time.perf_counter()
    row = {"kernel": kernel, "case": name}
    def hung():  # the case never returned (a kernel waiting forever): record it, and the rest
      row.update(ok=False, error=f"hung: no result after {self.case_s} s",
                 seconds=time.perf_counter() - t0)
      self.rows.append(row)
      self.write()
    try:
      with (contextlib.nullcontext() if self.smoke else
            common.watchdog(f"{kernel} {name}", self.case_s, hung)):
        row.update(fn())
    except Exception as e:  # a crash is a failed case, reported; the rest still run
      traceback.print_exc()
      msg = str(e).strip().splitlines()
      row.update(ok=False, error=f"{type(e).__name__}: {(msg[0] if msg else '')[:200]}")
    row["seconds"] = time.perf_counter() - t0
    self.rows.append(row)
    status = "ok  " if row.get("ok") else "FAIL"
    print(f"{status} {kernel:18s} {name:58s} err={row.get('err', float('nan')):.2e} "
          f"limit={row.get('limit', float('nan')):.2e} {row.get('error', '')}", flush=True)
    if not self.smoke:  # the rows so far, in case a later case hangs or the budget ends
      self.write()

  def write(self) -> str:
    """Writes gpu_check{,_smoke}.{json,md} with the rows so far; returns the table."""
    failed = [r for r in self.rows if not r.get("ok")]
    notes = (f"{len(self.rows) - len(failed)} of {len(self.rows)} cases pass. err = max |out - "
             "ref| / max |ref| against fdjax.ops.reference on float32 inputs (HIGHEST "
             f"precision); limit = {F32_LIMIT:g} for float32 ({GEMM_F32_LIMIT:g} for the "
             "GEMMs), 2x the plain-bf16 XLA error for bfloat16. Guard cases must also show "
             "recomputed rows.")
    if self.smoke:
      notes += " Smoke form: interpret mode, small shapes."
    cols = ["kernel", "case", "dtype", "ok", "err", "limit", "recomputed_rows", "seconds",
            "error"]
    return common.write_results("gpu_check_smoke" if self.smoke else "gpu_check", self.rows,
                                cols, notes, results_dir=self.results_dir)

  # -- decode attention
  def decode(self, b, hq, hkv, d, s, lengths, dtype, mode="async", phi=None, q_scale=1.0,
             plant=False, window=None, softcap=None, kernels=dk):
    """decode_attention of `kernels` (the Triton module, or mda: Mosaic GPU's)."""
    def run():
      kq, kk, kv = jax.random.split(self.next_key(), 3)
      q = _randn(kq, (b, hq, d), dtype, q_scale)
      k = _randn(kk, (b, s, hkv, d), dtype)
      v = _randn(kv, (b, s, hkv, d), dtype)
      if plant:  # one key far above phi + HI for one group, in one split only (a key inside
        # the row: one past its length is masked, and the guard has nothing to catch)
        k = k.at[b - 1, lengths[b - 1] // 2, 0].set((q[b - 1, 0] * 40.0).astype(dtype))
      n = jnp.asarray(lengths, jnp.int32)
      scale = d ** -0.5
      extra = dict(window=window, softcap=softcap)
      out, stats = kernels.decode_attention(q, k, v, n, sm_scale=scale, phi=phi, mode=mode,
                                            interpret=self.interpret, return_stats=True,
                                            **extra)
      want = reference.decode_attention(*_f32(q, k, v), n, scale, **extra)
      naive = None if dtype == jnp.float32 else reference.decode_attention(
          q, k, v, n, scale, plain=True, **extra)
      err, limit, ok = _judge(out, want, dtype, naive)
      rec = int(stats["recomputed_rows"])
      adversarial = phi is not None or q_scale != 1.0 or plant
      if adversarial and mode == "async":
        ok = ok and rec > 0  # the guard must have fired
      if not adversarial and mode == "async" and (dtype == jnp.float32 or kernels is mda):
        ok = ok and rec == 0  # ordinary scores take the async path
      return dict(err=err, limit=limit, ok=ok, recomputed_rows=rec, dtype=jnp.dtype(dtype).name)
    return run

  def paged(self, b, hq, hkv, d, page_size, num_pages, lengths, dtype, window=None, kernels=dk):
    """Paged decode with shuffled page ids and garbage past each row's last page (with a
    window: the pages wholly before it given back, NO_PAGE in the table); `kernels` as
    decode's."""
    max_pages = -(-max(lengths) // page_size)
    if b * max_pages > num_pages:  # said when the case list is made, not on the device
      raise ValueError(f"paged case: {b} rows of {max_pages} pages need {b * max_pages} pages; "
                       f"the pool has {num_pages}")

    def run():
      kq, kk, kv, kp = jax.random.split(self.next_key(), 4)
      q = _randn(kq, (b, hq, d), dtype)
      k = _randn(kk, (hkv, num_pages, page_size, d), dtype)  # heads-major pools
      v = _randn(kv, (hkv, num_pages, page_size, d), dtype)
      ids = jax.random.permutation(kp, num_pages)[:b * max_pages].reshape(b, max_pages)
      n = jnp.asarray(lengths, jnp.int32)
      first = jnp.arange(max_pages)[None] * page_size
      used = first < n[:, None]
      if window is not None:
        used = used & (first + page_size > n[:, None] - window)
      table = jnp.where(used, ids, kv_cache.NO_PAGE).astype(jnp.int32)
      scale = d ** -0.5
      out = kernels.paged_decode_attention(q, k, v, table, n, sm_scale=scale, window=window,
                                           interpret=self.interpret)
      kf, vf = (reference.gather_pages(x, table) for x in (k, v))
      want = reference.decode_attention(*_f32(q, kf, vf), n, scale, window=window)
      naive = None if dtype == jnp.float32 else reference.decode_attention(
          q, kf, vf, n, scale, window=window, plain=True)
      err, limit, ok = _judge(out, want, dtype, naive)
      return dict(err=err, limit=limit, ok=ok, dtype=jnp.dtype(dtype).name)
    return run

  def prefill(self, b, t, hq, hkv, d, lengths, dtype, causal=True, mode="async", phi=None,
              window=None, softcap=None):
    def run():
      kq, kk, kv = jax.random.split(self.next_key(), 3)
      q = _randn(kq, (b, t, hq, d), dtype)
      k = _randn(kk, (b, t, hkv, d), dtype)
      v = _randn(kv, (b, t, hkv, d), dtype)
      n = jnp.asarray(lengths, jnp.int32)
      scale = d ** -0.5
      extra = dict(window=window, softcap=softcap)
      out, stats = pk.prefill_attention(q, k, v, n, sm_scale=scale, causal=causal, phi=phi,
                                        mode=mode, interpret=self.interpret, return_stats=True,
                                        **extra)
      want = reference.prefill_attention(*_f32(q, k, v), n, causal, scale, **extra)
      valid = (jnp.arange(t)[None, :] < n[:, None])[..., None, None]  # padding rows: any value
      out, want = jnp.where(valid, out.astype(jnp.float32), 0.0), jnp.where(valid, want, 0.0)
      naive = None
      if dtype != jnp.float32:
        naive = reference.prefill_attention(q, k, v, n, causal, scale, plain=True, **extra)
        naive = jnp.where(valid, naive.astype(jnp.float32), 0.0)
      err, limit, ok = _judge(out, want, dtype, naive)
      rec = int(stats["recomputed_rows"])
      if phi is not None:
        ok = ok and rec > 0
      return dict(err=err, limit=limit, ok=ok, recomputed_rows=rec, dtype=jnp.dtype(dtype).name)
    return run

  def cope(self, b, t, s, hq, hkv, d, npos, lengths, dtype, **blocks):
    def run():
      kq, kk, kv, ke = jax.random.split(self.next_key(), 4)
      q = _randn(kq, (b, t, hq, d), dtype)
      k = _randn(kk, (b, s, hkv, d), dtype)
      v = _randn(kv, (b, s, hkv, d), dtype)
      e = _randn(ke, (npos, d), dtype, 0.5)
      n = jnp.asarray(lengths, jnp.int32)
      scale = d ** -0.5
      out = ck.cope_attention(q, k, v, e, n, sm_scale=scale, interpret=self.interpret,
                              settings=ck.Settings(**blocks))
      want = reference.cope_attention(*_f32(q, k, v, e), n, scale)
      naive = None if dtype == jnp.float32 else _naive_cope(q, k, v, e, n, scale)
      err, limit, ok = _judge(out, want, dtype, naive)
      return dict(err=err, limit=limit, ok=ok, dtype=jnp.dtype(dtype).name)
    return run

  def gemm(self, which, m, k, n, dtype, quantization=None, **params):
    """GEMV / the flat GEMM / the Mosaic GPU flat GEMM ("mosaic_flat") / dispatch.linear
    (which "linear": impl="pallas"; "auto": what auto runs on this device) on a float weight,
    or on one quantized to "int8" / "int4" (then against x @ its dequantized values)."""
    def run():
      kx, kw = jax.random.split(self.next_key())
      x = _randn(kx, (m, k), dtype)
      w = _randn(kw, (k, n), dtype)
      if quantization:
        w = quant.quantize(w, quantization)
      kernels = tune.kernels(quantization)
      if which in kernels:
        settings = (fg.Settings if which == "flat" else gv.Settings)(**params)
        out = kernels[which](x, w, interpret=self.interpret, settings=settings)
      elif which == "mosaic_flat" and quantization:
        out = mq.flat_gemm(x, w.values, w.scales, bits=quant.bits_of(quantization),
                           interpret=self.interpret, settings=mq.Settings(**params))
      elif which == "mosaic_flat":
        out = mfg.flat_gemm(x, w, interpret=self.interpret, settings=mfg.Settings(**params))
      elif which == "auto" and self.smoke:  # on the CPU auto is XLA: run the GPU's choice
        choice = selection.linear(m, k, n, quantization=quantization, dtype=dtype,
                                  gpu_auto=True).impl
        impl = {"flat_mosaic": "pallas_mosaic_interpret", "xla": "xla"}.get(
            choice, "pallas_interpret")
        out = dispatch.linear(x, w, impl=impl)
      else:
        out = dispatch.linear(x, w, impl="auto" if which == "auto" else self.impl)
      exact, plain = ((quant.dequantize(w, jnp.float32), quant.dequantize(w)) if quantization
                      else (w, w))  # plain: XLA's dequantize-then-dot in the low precision
      want = reference.linear(*_f32(x, exact))
      naive = None if dtype == jnp.float32 else jnp.dot(x, plain, preferred_element_type=dtype)
      err, limit, ok = _judge(out, want, dtype, naive, GEMM_F32_LIMIT)
      return dict(err=err, limit=limit, ok=ok and out.shape == (m, n),
                  dtype=jnp.dtype(dtype).name)
    return run

  def moe(self, t, e, h, f, k, dtype, quantization=None):
    """dispatch.moe through the Mosaic GPU grouped GEMM (impl "pallas_mosaic"; interpret mode
    in smoke form) on float or int8 / int4 experts, against XLA's float32 computation on the
    same (dequantized) weights; the limit: twice XLA's error in `dtype`."""
    def run():
      kx, kr, kg, kd = jax.random.split(self.next_key(), 4)
      x = _randn(kx, (t, h), dtype)
      logits = jax.random.normal(kr, (t, e), jnp.float32)
      w_gate_up, w_down = _randn(kg, (e, h, 2 * f), dtype, 0.1), _randn(kd, (e, f, h), dtype, 0.1)
      if quantization:
        w_gate_up, w_down = (quant.quantize(w, quantization) for w in (w_gate_up, w_down))
      as_float = ((lambda w, dt: quant.dequantize(w, dt)) if quantization
                  else (lambda w, dt: w.astype(dt)))
      impl = "pallas_mosaic_interpret" if self.interpret else "pallas_mosaic"
      out = dispatch.moe(x, logits, w_gate_up, w_down, top_k=k, impl=impl)
      want = dispatch.moe(x.astype(jnp.float32), logits, as_float(w_gate_up, jnp.float32),
                          as_float(w_down, jnp.float32), top_k=k, impl="xla")
      naive = dispatch.moe(x, logits, as_float(w_gate_up, dtype), as_float(w_down, dtype),
                           top_k=k, impl="xla")
      err, limit, ok = _judge(out, want, dtype, naive)
      return dict(err=err, limit=limit, ok=ok and out.shape == (t, h),
                  dtype=jnp.dtype(dtype).name)
    return run

  def model(self, window=None):
    """A small random float32 model: greedy tokens through the kernels ("auto" on this
    device, "pallas_interpret" in smoke form) equal the XLA path's; the kernels really ran.
    With a window (every layer): pages of 16, generating past it, pages given back."""
    def run():
      from flax import nnx

      import fdjax
      from models import ModelConfig, Transformer
      cfg = ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2,
                        num_heads=8, num_kv_heads=2, head_dim=32, max_position_embeddings=512,
                        sliding_window=window)
      model = Transformer(cfg, rngs=nnx.Rngs(3), dtype=jnp.float32)
      prompts = [list(range(5, 40)), [7, 8, 9]]
      paging = {} if window is None else dict(page_size=16, prefill_chunk=16)
      with dispatch.using("xla"):
        want = fdjax.generate(model, prompts, max_new_tokens=12, **paging).tokens
      with dispatch.using("pallas_interpret" if self.smoke else "auto"):
        got = fdjax.generate(model, prompts, max_new_tokens=12, **paging).tokens
      mismatched = sum(a != b for a, bb in zip(got, want) for a, b in zip(a, bb))
      hlo = ""
      if not self.smoke:  # the decode step's compiled program must call the kernels
        graphdef, state = nnx.split(model)
        cache = kv_cache.init_cache(cfg, 2, 64, jnp.float32)
        step = jax.jit(lambda st, tok, c: nnx.merge(graphdef, st)(tok, cache=c)[0])
        hlo = step.lower(state, jnp.zeros((2, 1), jnp.int32), cache).as_text()
      took = self.smoke or ("fdjax_decode" in hlo and "fdjax_flat_gemm" in hlo + "fdjax_gemv")
      return dict(err=float(mismatched), limit=0.0, ok=mismatched == 0 and bool(took),
                  dtype="float32", kernels_in_hlo=bool(took))
    return run


def run_checks(c: Checker):
  mosaic_checks(c)  # first: the backend JAX keeps (a lease's budget may end the check early)
  f32, bf16 = jnp.float32, jnp.bfloat16
  if c.smoke:
    d, s, t, big = 32, 77, 37, 40
    dec = [(2, 8, 2, d, s, [s, 50]), (2, 7, 1, d, s, [20, s])]
  else:
    d, s, t, big = 128, 4100, 300, 1000
    dec = [(3, 8, 8, 128, 1000, [1, 517, 1000]),        # MHA: the vector path
           (2, 32, 8, 128, s, [s, 2049]),               # Llama-3 GQA 4
           (4, 28, 4, 128, 3001, [1, 3001, 100, 2500]),  # group of 7 (Qwen2-7B)
           (3, 8, 1, 64, 333, [333, 64, 1]),            # MQA, head_dim 64
           (2, 8, 2, 256, 700, [700, 129])]             # head_dim 256 (Gemma)
  for dtype in (f32, bf16):
    for b, hq, hkv, dd, ss, n in (dec[:1] if c.smoke and dtype == bf16 else dec):
      c.case("decode_attention", f"{jnp.dtype(dtype).name} B{b} Hq{hq} Hkv{hkv} D{dd} S{ss} "
             f"len{n[:3]}", c.decode(b, hq, hkv, dd, ss, n, dtype))
  for b, hq, hkv, dd, ss, n in dec[:1 if c.smoke else 3]:
    c.case("decode_attention", f"online f32 B{b} Hq{hq} Hkv{hkv} D{dd} S{ss}",
           c.decode(b, hq, hkv, dd, ss, n, f32, mode="online"))
  b, hq, hkv, dd, ss, n = dec[1]
  guards = [("scores x1e3", dict(q_scale=1e3)), ("phi=-1e4", dict(phi=-1e4)),
            ("phi=+1e4", dict(phi=1e4)), ("one huge score in one split", dict(plant=True))]
  for label, kw in (guards[1::2] if c.smoke else guards):
    c.case("decode_guard", f"f32 {label}", c.decode(b, hq, hkv, dd, ss, n, f32, **kw))
  c.case("decode_guard", "bf16 phi=-1e4", c.decode(b, hq, hkv, dd, ss, n, bf16, phi=-1e4))
  # sliding windows (Mistral's 4096 scaled to the shapes) and Gemma 2's soft-capping
  win = 20 if c.smoke else 1000
  windowed = ((f32, 50.0),) if c.smoke else ((f32, None), (bf16, None), (f32, 50.0))
  for dtype, softcap in windowed:
    c.case("decode_attention", f"{jnp.dtype(dtype).name} window{win} softcap{softcap} "
           f"B{b} Hq{hq} Hkv{hkv} D{dd} S{ss}",
           c.decode(b, hq, hkv, dd, ss, n, dtype, window=win, softcap=softcap))

  paged = ([(3, 8, 2, 32, 16, 24, [1, 16, 77])] if c.smoke else
           [(4, 32, 8, 128, 64, 400, [1, 64, 4000, 2777]), (3, 8, 8, 128, 16, 300, [17, 900, 5])])
  for dtype in (f32, bf16):
    for bb, hq, hkv, dd, ps, npages, n in ([] if c.smoke and dtype == bf16 else paged):
      c.case("paged_decode", f"{jnp.dtype(dtype).name} B{bb} Hq{hq} Hkv{hkv} D{dd} page{ps} "
             f"len{n}", c.paged(bb, hq, hkv, dd, ps, npages, n, dtype))
    bb, hq, hkv, dd, ps, npages, n = paged[0]
    c.case("paged_decode", f"{jnp.dtype(dtype).name} window{win} (pages before it given back) "
           f"B{bb} Hq{hq} Hkv{hkv} D{dd} page{ps} len{n}",
           c.paged(bb, hq, hkv, dd, ps, npages, n, dtype, window=win))

  pre = [(2, t, 8, 2, d, [t, t // 2 - 7]), (1, big, 4, 4, d, [big]), (2, t, 4, 1, 64, [t, 1])]
  for dtype in (f32, bf16):
    for causal in (True, False):
      for bb, tt, hq, hkv, dd, n in (pre[:2] if c.smoke and causal and dtype == f32 else
                                     [] if c.smoke and dtype == bf16 and not causal else
                                     pre[:1] if c.smoke else pre):
        c.case("prefill_attention", f"{jnp.dtype(dtype).name} causal={causal} B{bb} T{tt} "
               f"Hq{hq} Hkv{hkv} D{dd} len{n}", c.prefill(bb, tt, hq, hkv, dd, n, dtype, causal))
  for dtype, softcap in windowed:
    c.case("prefill_attention", f"{jnp.dtype(dtype).name} window{win // 2} softcap{softcap} "
           f"B{pre[0][0]} T{pre[0][1]}", c.prefill(*pre[0][:5], pre[0][5], dtype,
                                                   window=win // 2, softcap=softcap))
  c.case("prefill_attention", "online f32", c.prefill(*pre[0][:5], pre[0][5], f32, mode="online"))
  c.case("prefill_guard", "f32 phi=-1e4", c.prefill(*pre[0][:5], pre[0][5], f32, phi=-1e4))
  c.case("prefill_guard", "f32 phi=+1e4", c.prefill(*pre[0][:5], pre[0][5], f32, phi=1e4))

  cope = ([(2, 20, 20, 4, 2, 16, 8, [20, 11]), (2, 1, 40, 4, 4, 16, 8, [40, 17])] if c.smoke else
          [(2, 200, 200, 4, 2, 64, 64, [200, 77]), (3, 1, 700, 8, 2, 128, 64, [700, 1, 333]),
           (1, 130, 500, 4, 4, 128, 16, [500])])
  for dtype in (f32, bf16):
    for bb, tt, ss, hq, hkv, dd, npos, n in cope:
      c.case("cope_attention", f"{jnp.dtype(dtype).name} B{bb} T{tt} S{ss} Hq{hq} Hkv{hkv} "
             f"D{dd} npos{npos}", c.cope(bb, tt, ss, hq, hkv, dd, npos, n, dtype))

  shapes = [(100, 300)] if c.smoke else [(1000, 3000), (11008, 4096)]
  for dtype in (f32, bf16):
    for k, n in shapes:
      for m in ([20] if c.smoke else [1, 16, 33]):
        for sk in ((4,) if c.smoke else (1, 4)):  # smoke: one case per kernel and dtype
          c.case("flat_gemm", f"{jnp.dtype(dtype).name} M{m} K{k} N{n} split_k{sk}",
                 c.gemm("flat", m, k, n, dtype, split_k=sk))
      for m in ([2] if c.smoke else [1, 5]):
        for sk in ((8,) if c.smoke else (1, 8)):
          c.case("gemv", f"{jnp.dtype(dtype).name} M{m} K{k} N{n} split_k{sk}",
                 c.gemm("gemv", m, k, n, dtype, split_k=sk))
  if not c.smoke:
    c.case("flat_gemm", "bf16 M16 K4096 N4096 num_stages3 block_n128",
           c.gemm("flat", 16, 4096, 4096, bf16, num_stages=3, block_n=128))
  for m in ([1, 40] if c.smoke else [1, 2, 7, 16, 64, 100]):
    k, n = shapes[-1]
    c.case("linear (dispatch)", f"bf16 M{m} K{k} N{n}", c.gemm("linear", m, k, n, bf16))
  for q in ("int8", "int4"):  # weight-only quantized kernels, off the block and group sizes
    k, n = (300, 160) if c.smoke else (11008, 4096)
    for dtype in ((f32,) if c.smoke else (bf16,)):
      name = jnp.dtype(dtype).name
      for m in ([20] if c.smoke else [1, 16, 33]):
        c.case(f"flat_gemm_{q}", f"{name} M{m} K{k} N{n} split_k4",
               c.gemm("flat", m, k, n, dtype, q, split_k=4))
      for m in ([2] if c.smoke else [1, 5]):
        c.case(f"gemv_{q}", f"{name} M{m} K{k} N{n} split_k8",
               c.gemm("gemv", m, k, n, dtype, q, split_k=8))
    for m in ([5] if c.smoke else [1, 2, 7, 16, 64, 100]):
      c.case(f"linear (dispatch) {q}", f"bf16 M{m} K{k} N{n}",
             c.gemm("linear", m, k, n, bf16, q))
  if not c.smoke:  # in smoke form, only the windowed model (the same kernels, windowed)
    c.case("model", "greedy tokens, kernels vs XLA (f32 GQA model)", c.model())
  c.case("model", "greedy tokens, kernels vs XLA (f32 GQA model, window 16 in every layer)",
         c.model(window=16))


def mosaic_checks(c: Checker):
  """The Mosaic GPU kernels (pallas_kernels/mosaic_gpu/; Hopper): decode attention, contiguous
  and paged, in bfloat16 / float16 at head_dim 64, 128 and 256, and the flat GEMM; dispatch.linear
  under "auto", which takes the flat GEMM on Hopper (smoke form: the choice an H100 makes,
  run in interpret mode); the experts' grouped GEMM on bf16, int8 and int4 experts."""
  bf16, f16 = jnp.bfloat16, jnp.float16
  if c.smoke:
    dec = [(2, 8, 2, 64, 88, [88, 33])]
    paged = [(3, 8, 2, 64, 16, 24, [1, 16, 77])]
    gemms = [(20, 128, 192)]
    win = 20
  else:
    dec = [(2, 32, 8, 128, 4104, [4104, 2049]),        # Llama-3 GQA 4
           (4, 28, 4, 128, 3000, [1, 3000, 100, 2500]),  # a group of 7 (Qwen2-7B)
           (3, 8, 8, 128, 1000, [1, 517, 1000]),        # MHA
           (3, 8, 1, 64, 336, [336, 64, 1]),            # MQA, head_dim 64
           (2, 16, 8, 256, 2000, [2000, 777])]          # Gemma-2's head_dim 256: two warpgroups
    paged = [(4, 32, 8, 128, 64, 400, [1, 64, 4000, 2777]), (3, 8, 8, 128, 16, 300, [17, 900, 5]),
             (2, 4, 1, 256, 64, 160, [4000, 333])]      # Gemma-3-1B's heads (2 x 63 pages)
    gemms = [(m, 11008, 4096) for m in (1, 16, 33, 64)] + [(8, 4096, 14336)]
    win = 1000
  for b, hq, hkv, dd, ss, n in dec:
    c.case("mosaic_decode", f"bfloat16 B{b} Hq{hq} Hkv{hkv} D{dd} S{ss} len{n[:3]}",
           c.decode(b, hq, hkv, dd, ss, n, bf16, kernels=mda))
  b, hq, hkv, dd, ss, n = dec[0]
  extra = [("float16", dict(dtype=f16)), ("online bfloat16", dict(mode="online")),
           (f"bfloat16 window{win} softcap50", dict(window=win, softcap=50.0))]
  for label, kw in extra[:1] if c.smoke else extra:
    kw = {"dtype": bf16, **kw}
    c.case("mosaic_decode", f"{label} B{b} Hq{hq} Hkv{hkv} D{dd} S{ss}",
           c.decode(b, hq, hkv, dd, ss, n, kernels=mda, **kw))
  for label, kw in [("phi=-1e4", dict(phi=-1e4)), ("one huge score in one split",
                                                  dict(plant=True))][:1 if c.smoke else 2]:
    c.case("mosaic_decode_guard", f"bfloat16 {label}",
           c.decode(b, hq, hkv, dd, ss, n, bf16, kernels=mda, **kw))
  for bb, hq, hkv, dd, ps, npages, n in paged:
    c.case("mosaic_paged_decode", f"bfloat16 B{bb} Hq{hq} Hkv{hkv} D{dd} page{ps} len{n}",
           c.paged(bb, hq, hkv, dd, ps, npages, n, bf16, kernels=mda))
  bb, hq, hkv, dd, ps, npages, n = paged[0]
  c.case("mosaic_paged_decode", f"bfloat16 window{win} (pages before it given back) B{bb} "
         f"page{ps} len{n}", c.paged(bb, hq, hkv, dd, ps, npages, n, bf16, window=win,
                                     kernels=mda))
  for m, k, n in gemms:
    c.case("mosaic_flat_gemm", f"bfloat16 M{m} K{k} N{n}", c.gemm("mosaic_flat", m, k, n, bf16))
  m, k, n = gemms[0]
  c.case("mosaic_flat_gemm", f"float16 M{m} K{k} N{n}", c.gemm("mosaic_flat", m, k, n, f16))
  for q in ("int8", "int4"):  # the weight-only kernels auto takes on Hopper at M >= M1
    for m, k, n in ([(20, 256, 192)] if c.smoke else [(1, 11008, 4096), (16, 11008, 4096)]):
      c.case(f"mosaic_flat_gemm_{q}", f"bfloat16 M{m} K{k} N{n}",
             c.gemm("mosaic_flat", m, k, n, bf16, q))
  for m in ([1, 20] if c.smoke else [1, 2, 16, 64, 100]):
    c.case("linear (auto)", f"bfloat16 M{m} K{gemms[-1][1]} N{gemms[-1][2]}",
           c.gemm("auto", m, gemms[-1][1], gemms[-1][2], bf16))
  # the experts' grouped GEMM: Qwen3-30B-A3B's layer at decode batches (tiles of 8 and 16)
  moe = [(5, 8, 128, 128, 2)] if c.smoke else [(1, 128, 2048, 768, 8), (8, 128, 2048, 768, 8),
                                               (64, 128, 2048, 768, 8)]
  for t, e, h, f, k in moe:
    for q in (None, "int8", "int4"):
      c.case("mosaic_grouped_gemm", f"bfloat16{' ' + q if q else ''} experts T{t} E{e} H{h} "
             f"F{f} top{k}", c.moe(t, e, h, f, k, bf16, q))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--smoke", action="store_true")
  ap.add_argument("--results-dir")
  ap.add_argument("--only", nargs="+", default=[], metavar="TEXT",
                  help="only the cases whose kernel and name contain one of these")
  ap.add_argument("--case-seconds", type=float, default=CASE_S,
                  help=f"a case running longer (compile included) is recorded as hung and the "
                  f"rest go on (default {CASE_S})")
  args = ap.parse_args()
  if not args.smoke and jax.default_backend() != "gpu":
    raise SystemExit("gpu_check: no GPU here (use --smoke for the interpret-mode form)")
  c = Checker(args.smoke, args.results_dir, args.only, args.case_seconds)
  run_checks(c)
  failed = [r for r in c.rows if not r.get("ok")]
  print(c.write())
  print(f"gpu_check: {len(c.rows) - len(failed)}/{len(c.rows)} pass", flush=True)
  sys.exit(1 if failed else 0)


if __name__ == "__main__":
  main()
