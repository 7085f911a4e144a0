"""Backend-aware dispatch: one public function per op, one choice of kernel per backend.

Every op takes `impl`:
  "auto"             what fdjax.ops.selection's rules pick: the XLA reference on a CPU; on a
                     CUDA GPU the Mosaic GPU kernel (Hopper) or the Triton kernel for the
                     calls they take; the Mosaic kernel on a TPU (for `linear`, GEMV / flat
                     GEMM / XLA by the device's table and M); decided where the computation
                     is lowered (`lax.platform_dependent`), so one jitted function serves all.
  "xla"              the plain-XLA reference (fdjax.ops.reference).
  "pallas"           the Pallas (Triton) kernel, compiled for the GPU.
  "pallas_interpret" the same kernel run by the Pallas interpreter (any backend, slow;
                     this is how the tests check kernels on a CPU).
  "pallas_tpu"       the Mosaic TPU kernel (pallas_kernels/tpu/), compiled for the TPU.
  "pallas_tpu_interpret"  the same kernel in TPU interpret mode (any backend, slow), with
                     its DMAs and semaphores simulated and the race detector on.
  "pallas_mosaic"    the Mosaic GPU kernel (pallas_kernels/mosaic_gpu/: so far decode
                     attention, contiguous and paged, the flat GEMM of `linear` on float,
                     int8 and int4 weights, and the grouped GEMM of `moe` on float, int8
                     and int4 experts; bfloat16 / float16), compiled for a Hopper GPU;
                     an op with no Mosaic GPU kernel yet refuses it. "auto" takes it on
                     Hopper where it takes the call.
  "pallas_mosaic_interpret"  the same kernel in Mosaic GPU's interpret mode (any backend).
"""
from __future__ import annotations

import contextlib
import functools
import math
import threading

import jax
import jax.numpy as jnp

from fdjax.ops import checks, cpu_attention, cpu_linear, quant, reference, selection
from fdjax.ops import moe as moe_lib
from fdjax.ops.kernels import (
  mosaic_decode,
  mosaic_flat_gemm,
  mosaic_grouped,
  mosaic_grouped_quantized,
  mosaic_quantized,
  tpu_decode,
  tpu_flat_gemm,
  tpu_gemv,
  tpu_prefill,
  triton_cope,
  triton_decode,
  triton_prefill,
  triton_quantized,
)
from fdjax.ops.kernels import triton_flat_gemm as flat_gemm
from fdjax.ops.kernels import triton_gemv as gemv
from fdjax.ops.kernels import triton_shared as shared
from pallas_kernels.common import async_softmax

IMPLS = ("auto", "xla", "pallas", "pallas_interpret", "pallas_tpu", "pallas_tpu_interpret",
         "pallas_mosaic", "pallas_mosaic_interpret")
TARGETS = ("cuda", "tpu", "tpu:v5e", "tpu:v6e", "tpu:v5p")
_override = threading.local()


@contextlib.contextmanager
def using(impl: str):
  """Within this block every op called with impl="auto" (the model's calls) runs `impl`
  instead: e.g. `with dispatch.using("xla"):` for the XLA-only baseline, or
  "pallas_interpret" to check the kernels through a whole model on a CPU."""
  checks.choice("dispatch.using", "impl", impl, IMPLS)
  old = getattr(_override, "impl", None)
  _override.impl = impl
  try:
    yield
  finally:
    _override.impl = old


def current() -> str:
  """The implementation "auto" stands for here (set by `using`). Jitted callers pass it as a
  static argument, so a function traced under one override is not reused under another."""
  return getattr(_override, "impl", None) or "auto"


@contextlib.contextmanager
def lowering_for(platform: str | None):
  """Within this block "auto" keeps its choice for `platform` ("cuda"; "tpu", or
  "tpu:v5e" / "tpu:v6e" / "tpu:v5p" to size the TPU kernels and pick the linear table of
  that generation) even on a host whose only backend is the CPU, which otherwise traces the
  XLA path alone: for compiling ahead of time for a described GPU or TPU (fdjax.tuning.aot). For
  "cuda" with no GPU here and no described one in context, the kernels lower for an H100
  (pallas_kernels.triton.shared.described_gpu). None: no change. Jitted callers pass
  `lowering_target()` as a static argument, as they do `current()`."""
  if platform is not None:
    checks.choice("dispatch.lowering_for", "platform", platform, TARGETS)
  old = getattr(_override, "target", None)
  _override.target = platform or old
  try:
    with shared.described_gpu() if platform == "cuda" else contextlib.nullcontext():
      yield
  finally:
    _override.target = old


def lowering_target() -> str | None:
  """The platform set by `lowering_for`, or None."""
  return getattr(_override, "target", None)


def _platform() -> str:
  """The platform "auto" decides for here: the lowering target, else the default backend
  ("cpu", "gpu", "tpu"; a target's ":v6e" dropped)."""
  return (lowering_target() or jax.default_backend()).split(":")[0]


def reads_own_pages_in_place(config, dtype) -> bool:
  """Whether a model of `config` and `dtype`, as "auto" runs here now, reads a decode step's
  pages where they lie when each row owns its own consecutive run of them
  (selection.cpu_paged_decode's rule, on the CPU, for paged_decode_attention and
  paged_cope_decode_attention alike): a caller laying out a cache then gives each row its own
  run of pages."""
  return (current() == "auto" and _platform() == "cpu"
          and selection.cpu_paged_decode(kv_cache_dtype(dtype, True)).settings.get(
              "in_place", False))


def kv_cache_dtype(dtype, in_place: bool = False):
  """The dtype a model of `dtype` keeps its KV cache pages in, as "auto" runs here now, for
  pages attention reads in place (`in_place`: rows' own runs) or gathers:
  selection.cpu_kv_cache's on the CPU (float32 for bfloat16 in place), elsewhere the model's."""
  if current() == "auto" and _platform() == "cpu":
    return jnp.dtype(selection.cpu_kv_cache(dtype, in_place).settings["dtype"])
  return jnp.dtype(dtype)


def tpu_kind() -> str:
  """The TPU device kind the TPU kernels are sized and tabled for here (selection.tpu_kind of
  the lowering target)."""
  return selection.tpu_kind(lowering_target())


def _run(op, impl, xla_fn, pallas_fn, tpu_fn=None, head_dim=None, dtype=None, page_size=None,
         mosaic_fn=None, max_pages=2, gpu_auto_fn=None, mosaic_takes=None, cpu_fn=None,
         group=1):
  """Calls xla_fn(), pallas_fn(interpret) (Triton), tpu_fn(interpret) (Mosaic TPU; None: the
  op has none) or mosaic_fn(interpret) (Mosaic GPU; None: the op has none yet) as `impl` says.
  Under "auto" the rules of fdjax.ops.selection decide, per platform at lowering time
  (attention ops pass head_dim, dtype, their keys' page size and pages a row, and their query
  heads per KV head; what no
  kernel takes goes to XLA on every backend). gpu_auto_fn(): what "auto" runs on a CUDA GPU
  for an op with its own rule (linear: the table); mosaic_takes(): whether its Mosaic GPU
  kernel takes this call (ops with no head_dim; None: it does; under `using`, XLA runs what it
  does not take; asked only there, so a CPU run never imports the kernel);
  cpu_fn(): what "auto" runs on the CPU for an op with a CPU rule of its own (linear, paged
  decode attention), else xla_fn."""
  checks.choice(op, "impl", impl, IMPLS)

  def takes(family):  # whether the kernels of `family` take this call
    if head_dim is None:
      if family == "pallas_mosaic":
        return mosaic_fn is not None and (mosaic_takes is None or mosaic_takes())
      return family != "pallas_tpu" or tpu_fn is not None
    if family == "pallas_tpu":
      return tpu_fn is not None and selection.attention(op, head_dim, dtype, "tpu", page_size,
                                                        max_pages).impl == "pallas"
    if family == "pallas_mosaic":
      return selection.mosaic_unsupported(op, head_dim, dtype, page_size, max_pages,
                                          group) is None
    return selection.triton_unsupported(op, head_dim, dtype, page_size, max_pages) is None

  if impl == "auto":
    impl = current()
    if impl != "auto" and not takes(impl.removesuffix("_interpret")):
      impl = "xla"
  if impl == "xla":
    return xla_fn()
  if impl in ("pallas", "pallas_interpret"):
    if not selection.has_triton():
      raise ValueError(f"{op}: this JAX has no Pallas Triton backend (impl {impl!r}); use "
                       f"impl='auto', 'pallas_mosaic' or 'xla'")
    return pallas_fn(impl == "pallas_interpret")
  if impl in ("pallas_tpu", "pallas_tpu_interpret"):
    if tpu_fn is None:
      raise ValueError(f"{op}: there is no Mosaic TPU kernel for this op (impl {impl!r}); "
                       f"use impl='auto' or 'xla'")
    return tpu_fn(impl == "pallas_tpu_interpret")
  if impl in ("pallas_mosaic", "pallas_mosaic_interpret"):
    if mosaic_fn is None:
      raise ValueError(f"{op}: there is no Mosaic GPU kernel for this op yet (impl {impl!r}); "
                       f"use impl='pallas' (Triton), 'auto' or 'xla'")
    return mosaic_fn(impl == "pallas_mosaic_interpret")
  # A CPU-only host lowers for a GPU or TPU only inside `lowering_for`: elsewhere it skips
  # tracing the kernel branches at all; a GPU or TPU host traces its own platform's only.
  platform = _platform()
  platform = "cuda" if platform == "gpu" else platform
  if platform == "cuda":
    if gpu_auto_fn is not None:
      kernel = gpu_auto_fn
    else:
      chosen = selection.attention(op, head_dim, dtype, "cuda", page_size, max_pages,
                                   group).impl
      run = {"pallas": pallas_fn, "pallas_mosaic": mosaic_fn}.get(chosen)
      kernel = None if run is None else (lambda: run(False))
  elif platform == "tpu" and takes("pallas_tpu"):
    kernel = lambda: tpu_fn(False)  # noqa: E731
  else:
    kernel = None
  on_cpu = xla_fn if cpu_fn is None else cpu_fn
  if kernel is None:
    return on_cpu() if platform == "cpu" else xla_fn()
  return jax.lax.platform_dependent(cpu=on_cpu, **{platform: kernel}, default=xla_fn)


def _attention_checks(op, q, k, v, q_rank, paged=False):
  """q's rank, dtypes, k and v alike, q and k's batch and head_dim, and the GQA ratio (k:
  [B, S, Hkv, D], or a heads-major page pool [Hkv, P, page_size, D] when `paged`)."""
  checks.rank(op, "q", q, q_rank)
  checks.rank(op, "k", k, 4)
  checks.float_dtype(op, "q", q)
  checks.same_dtype(op, q=q, k=k, v=v)
  if k.shape != v.shape:
    raise ValueError(f"{op}: k and v must have the same shape, got {k.shape} and {v.shape}")
  if not paged and q.shape[0] != k.shape[0]:
    raise ValueError(f"{op}: batch of q ({q.shape[0]}) and k ({k.shape[0]}) differ")
  if q.shape[-1] != k.shape[-1]:
    raise ValueError(f"{op}: head_dim of q ({q.shape[-1]}) and k ({k.shape[-1]}) differ")
  checks.gqa(op, q.shape[-2], k.shape[0] if paged else k.shape[2])


def _check_pages_of_rows(op, page_table, lengths, batch, page_size):
  """A paged op's page table (an integer [B, max_pages]) and lengths (1 <= lengths <= what
  the table addresses)."""
  checks.rank(op, "page_table", page_table, 2)
  if not jnp.issubdtype(page_table.dtype, jnp.integer) or page_table.shape[0] != batch:
    raise ValueError(f"{op}: page_table must be an integer [B={batch}, max_pages] array, "
                     f"got {page_table.dtype}{tuple(page_table.shape)}")
  checks.int_vector(op, "lengths", lengths, batch)
  checks.in_range(op, "lengths", lengths, 1, page_table.shape[1] * page_size)


def _check_pos_emb(op, pos_emb, head_dim):
  if getattr(pos_emb, "ndim", None) != 2 or pos_emb.shape[0] < 1:
    raise ValueError(f"{op}: pos_emb must be [npos_max >= 1, head_dim], got "
                     f"{getattr(pos_emb, 'shape', None)}")
  if pos_emb.shape[1] != head_dim:
    raise ValueError(f"{op}: pos_emb width ({pos_emb.shape[1]}) must equal head_dim "
                     f"({head_dim})")


def _check_start(op, q_start, batch, most):
  if q_start is not None:
    checks.int_vector(op, "q_start", q_start, batch)
    checks.in_range(op, "q_start", q_start, 0, most)


def _on_tpu(pallas, kernels):
  """An op's `pallas(interpret, kernels=, **more)` as its Mosaic TPU kernel, sized for the
  TPU generation being lowered for."""
  def run(interpret):
    return pallas(interpret, kernels=kernels,
                  generation=selection.tpu_generation(tpu_kind()))
  return run


def _scale(sm_scale, d):
  return 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)


def decode_attention(q, k_cache, v_cache, lengths, *, sm_scale=None, phi=None, window=None,
                     softcap=None, impl="auto"):
  """Attention of one new query per sequence against its KV cache.

  q [B, Hq, D]; k_cache, v_cache [B, S, Hkv, D]; lengths [B] int = valid cache entries
  of each row (1 <= lengths <= S). GQA when Hq is a multiple of Hkv. `phi` is the
  unified max value of the async-softmax kernel (ignored by the XLA path). `window` W
  (sliding-window attention): the query, at position lengths - 1, sees only the last W
  entries, and the kernel reads only those. `softcap`: scores become softcap * tanh(s /
  softcap) (Gemma). Returns [B, Hq, D] in q's dtype.
  """
  op = "decode_attention"
  _attention_checks(op, q, k_cache, v_cache, 3)
  checks.int_vector(op, "lengths", lengths, q.shape[0])
  async_softmax.check_options(op, window, softcap)
  scale = _scale(sm_scale, q.shape[-1])
  extra = dict(window=window, softcap=softcap)

  def pallas(interpret, kernels=triton_decode, **more):
    return kernels.decode_attention(q, k_cache, v_cache, lengths, sm_scale=scale, phi=phi,
                                    interpret=interpret, **extra, **more)

  return _run(op, impl, lambda: reference.decode_attention(q, k_cache, v_cache, lengths, scale,
                                                           **extra),
              pallas, _on_tpu(pallas, tpu_decode), q.shape[-1], q.dtype, k_cache.shape[1],
              mosaic_fn=lambda interpret: pallas(interpret, kernels=mosaic_decode), max_pages=1,
              group=q.shape[1] // k_cache.shape[2])


def paged_decode_attention(q, k_pages, v_pages, page_table, lengths, *, sm_scale=None, phi=None,
                           window=None, softcap=None, impl="auto"):
  """decode_attention over a paged KV cache.

  q [B, Hq, D]; k_pages, v_pages [Hkv, P, page_size, D] (heads-major, as
  fdjax.ops.kv_cache lays them out); page_table [B, max_pages] int: row
  b's key i is entry i % page_size of page page_table[b, i // page_size] (entries past a
  row's last page, and with a `window` those of pages wholly before it, are ignored,
  whatever they hold: such pages may have been given back); lengths [B] int, 1 <= lengths
  <= max_pages * page_size. `window`, `softcap` as decode_attention. Returns [B, Hq, D] in
  q's dtype.
  """
  op = "paged_decode_attention"
  _attention_checks(op, q, k_pages, v_pages, 3, paged=True)
  _check_pages_of_rows(op, page_table, lengths, q.shape[0], k_pages.shape[2])
  async_softmax.check_options(op, window, softcap)
  scale = _scale(sm_scale, q.shape[-1])
  extra = dict(window=window, softcap=softcap)

  def pallas(interpret, kernels=triton_decode, **more):
    return kernels.paged_decode_attention(q, k_pages, v_pages, page_table, lengths,
                                          sm_scale=scale, phi=phi, interpret=interpret,
                                          **extra, **more)

  def xla(**how):  # how: the CPU's form (selection.cpu_paged_decode); none: the reference
    return reference.paged_decode_attention(q, k_pages, v_pages, page_table, lengths, scale,
                                            **how, **extra)

  return _run(op, impl, xla, pallas, _on_tpu(pallas, tpu_decode), q.shape[-1], q.dtype,
              k_pages.shape[2], max_pages=page_table.shape[1],
              mosaic_fn=lambda interpret: pallas(interpret, kernels=mosaic_decode),
              cpu_fn=lambda: xla(**selection.cpu_paged_decode(k_pages.dtype).settings),
              group=q.shape[1] // k_pages.shape[0])


def prefill_attention(q, k, v, *, lengths=None, q_start=None, causal=True, sm_scale=None,
                      phi=None, window=None, softcap=None, impl="auto"):
  """Self-attention over a (padded) prompt, or a chunk of one after cached keys.

  q [B, T, Hq, D]; k, v [B, S, Hkv, D]; lengths [B] int or None = valid keys of each row
  (keys at or past it are masked; query rows past it are padding, never NaN); q_start [B]
  int or None: query i of row b sits at position q_start[b] + i (None: 0, and S == T).
  `window` W (causal only): the query at position p sees keys p - W < j <= p, the last W,
  as Hugging Face counts them. `softcap`: scores become softcap * tanh(s / softcap).
  Returns [B, T, Hq, D] in q's dtype.
  """
  op = "prefill_attention"
  _attention_checks(op, q, k, v, 4)
  if q_start is None and q.shape[1] != k.shape[1]:
    raise ValueError(f"{op}: q length ({q.shape[1]}) and k length ({k.shape[1]}) differ; "
                     "a chunk after cached keys needs q_start")
  if lengths is not None:
    checks.int_vector(op, "lengths", lengths, q.shape[0])
    checks.in_range(op, "lengths", lengths, 0, k.shape[1])
  _check_start(op, q_start, q.shape[0], k.shape[1] - 1)
  async_softmax.check_options(op, window, softcap, causal)
  scale = _scale(sm_scale, q.shape[-1])
  extra = dict(q_start=q_start, window=window, softcap=softcap)

  def pallas(interpret, kernels=triton_prefill, **more):
    return kernels.prefill_attention(q, k, v, lengths, causal=causal, sm_scale=scale, phi=phi,
                                     interpret=interpret, **extra, **more)

  def on_cpu():  # selection.cpu_prefill: the key-blocked asynchronous form, or the reference
    blocks = selection.cpu_prefill(
        q.shape[1], k.shape[1], batch=q.shape[0], heads=q.shape[2]).settings
    if blocks is None:
      return reference.prefill_attention(q, k, v, lengths, causal, scale, **extra)
    return cpu_attention.prefill_attention(q, k, v, lengths, causal, scale, phi=phi, **extra,
                                           **blocks)

  return _run(op, impl, lambda: reference.prefill_attention(q, k, v, lengths, causal, scale,
                                                            **extra),
              pallas, _on_tpu(pallas, tpu_prefill), q.shape[-1], q.dtype, cpu_fn=on_cpu)


def score_row_max(q, k, *, lengths=None, sm_scale=None, window=None, softcap=None):
  """Each query row's largest causal attention score [B, T, Hq] (-inf for padding rows past
  `lengths`), as prefill_attention scores them (arguments alike, q and k of one length): what
  calibrating phi measures (fdjax.tuning.calibrate). XLA on every platform."""
  op = "score_row_max"
  _attention_checks(op, q, k, k, 4)
  if q.shape[1] != k.shape[1]:
    raise ValueError(f"{op}: q length ({q.shape[1]}) and k length ({k.shape[1]}) differ")
  if lengths is not None:
    checks.int_vector(op, "lengths", lengths, q.shape[0])
  async_softmax.check_options(op, window, softcap, True)
  return reference.score_row_max(q, k, lengths, True, _scale(sm_scale, q.shape[-1]),
                                 window=window, softcap=softcap)


def cope_attention(q, k, v, pos_emb, *, lengths=None, q_start=None, sm_scale=None,
                   gate_keys=None, pos_scaled=False, impl="auto"):
  """CoPE attention (contextual position encoding, Golovneva et al. 2024, Appendix B).

  q [B, T, Hq, D]; k, v [B, S, Hkv, D] with T <= S, query i of row b at absolute position
  q_start[b] + i (default S - T; T = 1: a decode step against a cache); pos_emb [npos_max,
  D], the layer's position table shared by its heads; lengths [B] or None = valid keys.
  The official code's variants: gate_keys [B, S, Hkv, D] (e.g. v, or keys of their own) give
  the gates sigmoid(q.gate_key * sm_scale) in place of sigmoid(q.k * sm_scale); pos_scaled
  adds the position logits before the scale, (q.k + z) * sm_scale, not q.k * sm_scale + z.
  Returns [B, T, Hq, D] in q's dtype.
  """
  op = "cope_attention"
  _attention_checks(op, q, k, v, 4)
  t, s = q.shape[1], k.shape[1]
  if t > s:
    raise ValueError(f"{op}: more queries ({t}) than keys ({s})")
  _check_pos_emb(op, pos_emb, q.shape[-1])
  if lengths is not None:
    checks.int_vector(op, "lengths", lengths, q.shape[0])
    checks.in_range(op, "lengths", lengths, 0, s)
  _check_start(op, q_start, q.shape[0], s - t)
  if gate_keys is not None and (getattr(gate_keys, "shape", None) != k.shape
                                or gate_keys.dtype != k.dtype):
    raise ValueError(f"{op}: gate_keys must be shaped and typed as k {k.shape} {k.dtype}, got "
                     f"{getattr(gate_keys, 'shape', None)} {getattr(gate_keys, 'dtype', None)}")
  if not isinstance(pos_scaled, bool):
    raise ValueError(f"{op}: pos_scaled must be True or False, got {pos_scaled!r}")
  scale = _scale(sm_scale, q.shape[-1])
  pos_scale = scale if pos_scaled else 1.0  # (q.k + z) * scale = q.k * scale + z * scale

  def pallas(interpret):
    return triton_cope.cope_attention(q, k, v, pos_emb, lengths, sm_scale=scale, q_start=q_start,
                                      gate_keys=gate_keys, pos_scale=pos_scale,
                                      interpret=interpret)

  def on_cpu():  # selection.cpu_prefill: the key-blocked asynchronous form, or the reference
    blocks = selection.cpu_prefill(t, s, batch=q.shape[0], heads=q.shape[2],
                                    cope=True).settings
    if blocks is None:
      return reference.cope_attention(q, k, v, pos_emb, lengths, scale, q_start, gate_keys,
                                      pos_scale)
    return cpu_attention.cope_attention(q, k, v, pos_emb, lengths, scale, q_start=q_start,
                                        gate_keys=gate_keys, pos_scale=pos_scale, **blocks)

  return _run(op, impl, lambda: reference.cope_attention(
      q, k, v, pos_emb, lengths, scale, q_start, gate_keys, pos_scale), pallas, None,
      q.shape[-1], q.dtype, cpu_fn=on_cpu)


def paged_cope_decode_attention(q, k_pages, v_pages, page_table, lengths, pos_emb, *,
                                sm_scale=None, gates="key", pos_scaled=False, impl="auto"):
  """A CoPE decode step over a paged cache: cope_attention of one query per row, at position
  lengths - 1, against the row's first `lengths` keys.

  q [B, Hq, D]; k_pages [Hkv, P, page_size, D] (heads-major, as fdjax.ops.kv_cache lays them
  out), or [.., 2 * D] entries of [key, gate key] with gates "separate"; v_pages [Hkv, P,
  page_size, D]; page_table, lengths as paged_decode_attention's; pos_emb [npos_max, D];
  gates: the keys that give the gates, "key" (the keys), "value" (the values, the official
  code's variant) or "separate" (each key entry's second half); pos_scaled as
  cope_attention's. Returns [B, Hq, D] in q's dtype.

  On the CPU under "auto" the pages are read per KV head where they lie
  (reference.paged_cope_decode_attention, in selection.cpu_paged_decode's form); elsewhere
  each row's pages are gathered and cope_attention runs as `impl` says (its fused Triton
  kernel on a GPU that takes it)."""
  op = "paged_cope_decode_attention"
  checks.choice(op, "gates", gates, ("key", "value", "separate"))
  checks.rank(op, "q", q, 3)
  for name, pages in (("k_pages", k_pages), ("v_pages", v_pages)):
    checks.rank(op, name, pages, 4)
  d = q.shape[-1]
  width = 2 * d if gates == "separate" else d
  if k_pages.shape[:3] != v_pages.shape[:3] or k_pages.shape[3] != width or v_pages.shape[3] != d:
    raise ValueError(f"{op}: k_pages must be [Hkv, P, page_size, {width}] and v_pages [Hkv, P, "
                     f"page_size, {d}] (head_dim {d}, gates {gates!r}), got {k_pages.shape} "
                     f"and {v_pages.shape}")
  checks.float_dtype(op, "q", q)
  checks.same_dtype(op, q=q, k_pages=k_pages, v_pages=v_pages)
  checks.gqa(op, q.shape[1], k_pages.shape[0])
  _check_pages_of_rows(op, page_table, lengths, q.shape[0], k_pages.shape[2])
  checks.choice(op, "impl", impl, IMPLS)
  _check_pos_emb(op, pos_emb, d)
  if impl == "auto" and current() == "auto" and _platform() == "cpu":
    scale = _scale(sm_scale, d)
    return reference.paged_cope_decode_attention(
        q, k_pages, v_pages, page_table, lengths, pos_emb, scale, gates=gates,
        pos_scale=scale if pos_scaled else 1.0,
        **selection.cpu_paged_decode(k_pages.dtype).settings)
  k, v = reference.gather_pages(k_pages, page_table), reference.gather_pages(v_pages, page_table)
  gate_keys = {"key": None, "value": v, "separate": k[..., d:]}[gates]
  return cope_attention(q[:, None], k[..., :d], v, pos_emb, lengths=lengths,
                        q_start=lengths - 1, sm_scale=sm_scale, gate_keys=gate_keys,
                        pos_scaled=pos_scaled, impl=impl)[:, 0]


def linear(x, w, *, impl="auto"):
  """x [..., K] @ w [K, N] -> [..., N], float32 accumulation, in x's dtype. w is a float
  array or a fdjax.ops.quant.QuantizedWeight (int8 / int4, its scales in x's dtype): the kernels
  read its quantized bytes and dequantize inside the K loop; XLA dequantizes, then dots."""
  op = "linear"
  quantized = isinstance(w, quant.QuantizedWeight)
  checks.rank(op, "w", w, 2)
  if x.ndim < 1:
    raise ValueError(f"{op}: x must have at least one dimension, got a scalar")
  checks.float_dtype(op, "x", x)
  if quantized and w.dtype != x.dtype:
    raise ValueError(f"{op}: the {w.method} weight's scales are {w.dtype}, x is {x.dtype}; "
                     f"they must match")
  if not quantized:
    checks.same_dtype(op, x=x, w=w)
  k, n = w.shape
  if x.shape[-1] != k:
    raise ValueError(f"{op}: x's last dimension ({x.shape[-1]}) must equal w's K ({k})")
  lead = x.shape[:-1]
  x2 = x.reshape(-1, k)  # M = the product of the leading dims

  def pallas(interpret, gpu_auto=False):
    choice = selection.linear(x2.shape[0], k, n, quantization=w.method if quantized else None,
                              dtype=x.dtype, gpu_auto=gpu_auto)
    if choice.impl == "xla":
      return reference.linear(x2, w)
    if choice.impl == "flat_mosaic":
      return on_mosaic_gpu(interpret)
    if quantized:
      kernel = {"gemv": triton_quantized.gemv, "flat": triton_quantized.flat_gemm}[choice.impl]
      return kernel(x2, w.values, w.scales, bits=w.bits, settings=choice.settings,
                    interpret=interpret)
    kernel = {"gemv": gemv.gemv, "flat": flat_gemm.flat_gemm}[choice.impl]
    return kernel(x2, w, settings=choice.settings, interpret=interpret)

  def on_tpu(interpret):
    kind = tpu_kind()
    choice = selection.linear(x2.shape[0], k, n, kind=kind,
                              quantization=w.method if quantized else None)
    if choice.impl == "xla":
      return reference.linear(x2, w)
    kernel = {"gemv": tpu_gemv.gemv, "flat": tpu_flat_gemm.flat_gemm}[choice.impl]
    return kernel(x2, w, settings=choice.settings, generation=selection.tpu_generation(kind),
                  interpret=interpret)

  def on_mosaic_gpu(interpret):
    if quantized:
      return mosaic_quantized.flat_gemm(x2, w.values, w.scales, bits=w.bits,
                                        interpret=interpret)
    return mosaic_flat_gemm.flat_gemm(x2, w, interpret=interpret)

  def mosaic_takes():
    return selection.mosaic_linear_unsupported(
        x2.shape[0], k, n, x.dtype, w.method if quantized else None) is None

  def on_cpu():
    choice = selection.cpu_linear(x2.shape[0], k, x.dtype, w.method if quantized else None)
    return cpu_linear.linear(x2, w, choice.settings)

  y = _run(op, impl, lambda: reference.linear(x2, w), pallas, on_tpu, mosaic_fn=on_mosaic_gpu,
           gpu_auto_fn=lambda: pallas(False, gpu_auto=True), mosaic_takes=mosaic_takes,
           cpu_fn=on_cpu)
  return y.reshape(*lead, n)


def moe(x, router_logits, w_gate_up, w_down, *, top_k: int, normalize: bool = True,
        activation=jax.nn.silu, strategy: str | None = None, impl="auto"):
  """A mixture-of-experts layer's expert computation: x [..., H] routed by router_logits
  [..., E] (softmax in float32, the top_k, renormalised with `normalize`) to the gated MLPs
  w_gate_up [E, H, 2F] (gate, up) and w_down [E, F, H], both float in x's dtype or both
  fdjax.ops.quant.QuantizedWeight of one method (each expert int8 / int4, scales in x's
  dtype); returns the weighted sum [..., H] in x's dtype. `strategy`
  (fdjax.ops.moe.STRATEGIES) overrides the rule of fdjax.ops.selection.moe. The one kernel is
  the Mosaic GPU grouped GEMM of the "grouped" strategy, float or quantized ("pallas_mosaic",
  "pallas_mosaic_interpret"; "auto" on Hopper where it takes the tiles); Triton and TPU
  kernels are refused (none), and "auto" under `using` one runs XLA."""
  op = "moe"
  checks.choice(op, "impl", impl, IMPLS)
  checks.rank(op, "w_gate_up", w_gate_up, 3)
  checks.rank(op, "w_down", w_down, 3)
  checks.float_dtype(op, "x", x)
  quantized = [isinstance(w, quant.QuantizedWeight) for w in (w_gate_up, w_down)]
  if quantized[0] != quantized[1] or (all(quantized) and w_gate_up.bits != w_down.bits):
    raise ValueError(f"{op}: w_gate_up and w_down must both be float or both quantized by one "
                     f"method, got {_weight_kind(w_gate_up)} and {_weight_kind(w_down)}")
  bits = w_gate_up.bits if quantized[0] else None
  dtypes = {name: jnp.dtype(a.dtype).name
            for name, a in (("x", x), ("w_gate_up", w_gate_up), ("w_down", w_down))}
  if len(set(dtypes.values())) > 1:
    raise ValueError(f"{op}: x and the expert weights (a quantized one's scales) must share "
                     f"one dtype, got {dtypes}")
  e, h, f2 = w_gate_up.shape
  if x.ndim < 1 or x.shape[-1] != h:
    raise ValueError(f"{op}: x's last dimension must equal w_gate_up's H ({h}), got "
                     f"x{tuple(x.shape)}")
  if f2 % 2 or w_down.shape != (e, f2 // 2, h):
    raise ValueError(f"{op}: w_gate_up [E, H, 2F] = {tuple(w_gate_up.shape)} needs w_down "
                     f"[E, F, H] = {(e, f2 // 2, h)}, got {tuple(w_down.shape)}")
  if router_logits.shape != x.shape[:-1] + (e,):
    raise ValueError(f"{op}: router_logits must be {x.shape[:-1] + (e,)} (x's tokens by "
                     f"{e} experts), got {tuple(router_logits.shape)}")
  if not (isinstance(top_k, int) and 1 <= top_k <= e):
    raise ValueError(f"{op}: top_k must be an integer in [1, {e}], got {top_k!r}")
  if strategy is not None:
    checks.choice(op, "strategy", strategy, moe_lib.STRATEGIES)
  x2 = x.reshape(-1, h)
  platform = _platform()
  itemsize = bits / 8 if bits else x.dtype.itemsize  # bytes an expert weight's element reads
  choice = selection.moe(x2.shape[0], top_k, e, itemsize, platform, hidden=h, width=f2 // 2,
                         quantization=f"int{bits}" if bits else None)
  tile = choice.settings or selection.MOE_MIN_TILE
  weights, experts = moe_lib.route(router_logits.reshape(-1, e), top_k, normalize)

  def run(how, rows, matmul=None):
    return moe_lib.run(how, x2, weights, experts, w_gate_up, w_down, activation, tile=rows,
                       matmul=matmul).reshape(x.shape)

  def on_mosaic(interpret):  # the grouped tiles (at most the kernel's 64 rows) by the kernel
    why = selection.moe_unsupported(rows, h, f2 // 2, x.dtype, bits)
    if why:
      raise ValueError(f"{op} (Mosaic GPU grouped GEMM): {why}")
    return run("grouped", rows, functools.partial(mosaic_tile_matmul, interpret=interpret))

  mosaic = ("pallas_mosaic", "pallas_mosaic_interpret")
  rows = min(tile, mosaic_grouped.MAX_ROWS)  # the kernel's tiles: at most 64 rows
  if impl == "auto" and current() != "auto":  # under `using`: what the kernel does not take
    takes = (current() in mosaic and strategy in (None, "grouped") and choice.impl == "grouped"
             and selection.moe_unsupported(rows, h, f2 // 2, x.dtype, bits) is None)
    impl = current() if takes else "xla"
  if impl in mosaic:
    if strategy not in (None, "grouped"):
      raise ValueError(f"{op}: impl {impl!r} runs the grouped strategy (its kernel's), not "
                       f"strategy={strategy!r}")
    return on_mosaic(impl == "pallas_mosaic_interpret")
  if impl not in ("auto", "xla"):
    raise ValueError(f"{op}: there is no {impl!r} kernel for the expert computation (only "
                     f"the Mosaic GPU grouped GEMM); use impl='auto', 'pallas_mosaic' or 'xla'")
  xla = functools.partial(run, strategy or choice.impl, tile)
  if impl == "xla" or strategy is not None or platform not in ("cuda", "gpu"):
    return xla()
  gpu = selection.moe_on_gpu(choice, h, f2 // 2, x.dtype, bits)
  if gpu.impl != "grouped_mosaic":
    return xla()
  return jax.lax.platform_dependent(cpu=xla, cuda=lambda: on_mosaic(False), default=xla)


def mosaic_tile_matmul(rows, experts, w, *, interpret=False):
  """fdjax.ops.moe.tile_matmul by the Mosaic GPU grouped GEMM: tiles [N, R, K] times their
  experts' weights w [E, K, M], float or a QuantizedWeight (read as its stored bytes)."""
  if isinstance(w, quant.QuantizedWeight):
    return mosaic_grouped_quantized.grouped_gemm(rows, experts, w.values, w.scales, bits=w.bits,
                                                 interpret=interpret)
  return mosaic_grouped.grouped_gemm(rows, experts, w, interpret=interpret)


def _weight_kind(w) -> str:
  return w.method if isinstance(w, quant.QuantizedWeight) else f"float {w.dtype}"


describe = selection.describe  # what "auto" runs per op, and why
