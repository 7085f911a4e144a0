"""Every kernel, and generate's whole prefill and decode loop, compiled for a described H100
with no GPU (fdjax.tuning.aot): Triton's compiler and ptxas run as on the device, and a kernel that
spills registers or overflows shared memory fails here.

Needs the CUDA plugin and ptxas (`pip install -e ".[h100]"`: jax[cuda13-local] at the installed
jax's version and nvidia-cuda-nvcc; .ci/run installs them). Without them these tests skip and say why,
except where FDJAX_REQUIRE_H100=1 (set by .ci/run): there they fail.
"""
import dataclasses
import functools
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bench import kernels_h100 as kernels
from fdjax.engine import decode_loop
from fdjax.ops import dispatch
from fdjax.tuning import aot
from models import presets
from models.llama import Transformer

# Compiling for a described H100 / TPU takes minutes: CI runs these files in steps of their
# own (jax 0.12 and 0.11.2), apart from the README's test command.
pytestmark = pytest.mark.compile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def h100():
  why = aot.unavailable()
  if why and os.environ.get("FDJAX_REQUIRE_H100") == "1":
    pytest.fail(f"FDJAX_REQUIRE_H100=1, but this process cannot compile for the H100: {why}")
  if why:
    pytest.skip(f"cannot compile for the H100 here: {why}")
  return aot.abstract


def _default_cases():
  """The Triton kernels' default cases to compile: all of them with FDJAX_ALL_KERNEL_CASES=1;
  else each kernel's first case per model and every sixth of the rest, 65 of 238 (.ci/run's
  compile step; the committed table, checked below, holds every case, bench/kernels_h100.py
  compiles them all)."""
  cases = kernels.defaults()
  if os.environ.get("FDJAX_ALL_KERNEL_CASES") == "1":
    return cases
  first = {}
  for c in cases:
    first.setdefault((c.kernel, c.shape.split()[0]), str(c))
  return [c for i, c in enumerate(cases) if i % 6 == 0 or str(c) in first.values()]


@pytest.mark.parametrize("case", _default_cases(), ids=str)
def test_every_default_setting_compiles_without_spills(h100, case):
  aot.compile(case.lower(h100))  # raises CompileError on a spill or a shared-memory overflow


@pytest.mark.parametrize("gates", ["value", "separate"])
@pytest.mark.parametrize("dtype", [kernels.BF16, kernels.F32])
def test_cope_gate_variants_compile_without_spills(h100, gates, dtype, tmp_path):
  """The official code's gate variants load one more key tile (the values again, or keys of
  their own): at the default blocks, the longest prompt and the decode step still fit."""
  for bts in kernels.COPE[1:3]:
    case = kernels._cope("llama-3-8b", *bts, dtype, gates=gates)
    aot.compile(case.lower(h100), dump_to=str(tmp_path))  # raises on a spill


def test_an_oversized_flat_gemm_is_refused_for_shared_memory(h100):
  gemm, _ = kernels.oversized()
  with pytest.raises(aot.CompileError, match="Shared memory size limit exceeded: requested"):
    aot.compile(gemm.lower(h100))


def test_cope_at_64x64_is_refused_for_spilling(h100, tmp_path):
  _, cope = kernels.oversized()
  with pytest.raises(aot.CompileError, match="register spilling"):
    aot.compile(cope.lower(h100))
  aot.compile(cope.lower(h100), dump_to=str(tmp_path), strict=False)  # what it would use
  (k,) = aot.resources(str(tmp_path))
  assert k.name == "fdjax_cope" and k.registers == 255 and k.spill_stores > 0


def test_resources_report_the_launch_and_registers(h100, tmp_path):
  case = kernels._linear("llama-2-7b o", 16, 4096, 4096, jnp.bfloat16)
  aot.compile(case.lower(h100), dump_to=str(tmp_path))
  (k,) = aot.resources(str(tmp_path))
  # default flat GEMM at M=16: 64-column tiles of w, K split to fill 132 SMs about twice
  assert k.name == "fdjax_flat_gemm" and k.grid == (4096 // 64, 5, 1) and k.threads == 128
  assert 0 < k.registers <= 255 and k.spill_stores == k.spill_loads == 0
  # Triton keeps num_stages - 1 = 1 set of a 16 x 128 tile of x and a 128 x 64 tile of w
  assert k.shared_bytes == (16 * 128 + 128 * 64) * 2


@pytest.mark.parametrize("preset,batch,prompt_len", [("llama-2-7b", 1, 100),
                                                     ("llama-3-8b", 16, 512)])
def test_generate_compiles_with_the_kernels(h100, preset, batch, prompt_len):
  """The jitted prefill and decode loop of a 7B/8B model in bfloat16 with impl="auto": no
  weight is materialised (nnx.eval_shape), and the CUDA branch takes the kernels selection
  picks for an H100: Mosaic GPU decode attention and flat GEMM, Triton prefill and GEMV. Two
  of the model's layers: every layer is the same program, and ptxas takes about a minute for
  all 32 here."""
  cfg = dataclasses.replace(presets.get(preset), num_layers=2)
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16))
  with aot.on("h100"), dispatch.lowering_for("cuda"):
    prefill, decode = decode_loop.lower(model, batch=batch, prompt_len=prompt_len,
                                        max_new_tokens=64, place=h100)
  prefill_hlo = aot.compile(prefill).as_text()
  decode_hlo = aot.compile(decode).as_text()
  linear = "fdjax_gemv" if batch < 3 else "fdjax_mgpu_flat_gemm"  # the analytic table's M1 = 3
  assert "fdjax_prefill_async" in prefill_hlo and "fdjax_prefill_online" in prefill_hlo
  assert "fdjax_mgpu_decode_async" in decode_hlo and "fdjax_mgpu_decode_online" in decode_hlo
  assert "fdjax_decode_async" not in decode_hlo  # not the Triton kernel as well
  assert linear in decode_hlo and linear in prefill_hlo  # decode steps; the last prompt token


def test_the_llama_3_8b_decode_program_lowers_with_the_mosaic_gpu_kernels(h100):
  """The whole llama-3-8b decode loop (all 32 layers) with impl="pallas_mosaic", lowered for a
  described H100: every decode attention and every linear the Mosaic kernel takes (the flat
  GEMM, M <= 64) is a Mosaic GPU call; no Triton kernel anywhere."""
  model = nnx.eval_shape(lambda: Transformer(presets.get("llama-3-8b"), rngs=nnx.Rngs(0),
                                             dtype=jnp.bfloat16))
  with aot.on("h100"), dispatch.lowering_for("cuda"), dispatch.using("pallas_mosaic"):
    _, decode = decode_loop.lower(model, batch=8, prompt_len=100, max_new_tokens=64,
                                  place=h100)
  hlo = decode.as_text()
  assert _runs(hlo, "fdjax_mgpu_decode_async") >= 32 and "fdjax_mgpu_flat_gemm" in hlo
  assert "mosaic_gpu" in hlo and "triton" not in hlo.lower()


def _runs(text: str, name: str) -> int:
  """How many times a lowered program's `name` runs: its occurrences in each function, times
  the calls of that function (a jitted wrapper, such as the attention kernels', is one
  private function called once per layer), from main down. A function starts a line (a
  Mosaic kernel's own module is a string inside its custom call's line)."""
  starts = list(re.finditer(r"^\s*func\.func (?:public |private )?@([\w$.]+)", text, re.M))
  funcs = {m.group(1): text[m.start():(starts[i + 1].start() if i + 1 < len(starts) else None)]
           for i, m in enumerate(starts)}

  @functools.cache
  def times(f):
    return 1 if f == "main" else sum(body.count(f"call @{f}(") * times(g)
                                     for g, body in funcs.items() if f"call @{f}(" in body)
  return sum(body.count(name) * times(f) for f, body in funcs.items())


def test_a_mixture_of_experts_decode_program_lowers_for_an_h100(h100):
  """Qwen3-30B-A3B's decode loop (two of its 48 layers, bfloat16, batch 4) lowered for a
  described H100 under auto: Mosaic GPU decode attention, the router's top-k, and the
  experts' tiles of 8 rows by the Mosaic GPU grouped GEMM."""
  cfg = dataclasses.replace(presets.get("qwen3-30b-a3b"), num_layers=2)
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16))
  with aot.on("h100"), dispatch.lowering_for("cuda"):
    _, decode = decode_loop.lower(model, batch=4, prompt_len=100, max_new_tokens=64,
                                  place=h100)
  hlo = decode.as_text()
  assert "fdjax_mgpu_decode_async" in hlo and "top_k" in hlo.lower()
  assert "fdjax_mgpu_grouped_gemm" in hlo


def test_outside_lowering_for_a_cpu_host_traces_xla_alone(h100):
  cfg = presets.get("llama-3-8b")
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16))
  _, decode = decode_loop.lower(model, batch=1, prompt_len=16, max_new_tokens=2, place=h100)
  assert "fdjax_" not in decode.as_text()


def test_the_committed_table_has_every_default_case_without_spills():
  with open(os.path.join(ROOT, "bench", "results", "kernels_h100.json")) as fh:
    rows = json.load(fh)["rows"]
  default = [r for r in rows if r["setting"] == "default"]
  assert {(r["kernel"], r["shape"], r["dtype"]) for r in default} == {
      (c.kernel, c.shape, c.dtype) for c in kernels.defaults() + kernels.mosaic_defaults()}
  assert all(r["status"] == "ok" and r["spill_stores"] == 0 and r["per_sm"] >= 1
             for r in default), [r for r in default if r["status"] != "ok"]
  refused = {(r["kernel"], r["setting"]) for r in rows if r["status"].startswith("refused")}
  assert {(c.kernel, c.setting) for c in kernels.oversized()} <= refused


def test_programs_per_sm_follow_the_sm90_rules():
  k = aot.Kernel("k", (1, 1, 1), threads=128, shared_bytes=81920, registers=190,
                 spill_stores=0, spill_loads=0)
  # 190 registers -> 192 per thread (256 per warp) = 6144 per warp: 10 warps = 2 programs
  assert k.per_sm_by_registers() == 2
  # (80 KB + 1 KB reserved) per program in 228 KB
  assert k.per_sm_by_shared() == 2
  small = aot.Kernel("k", (1, 1, 1), threads=128, shared_bytes=0, registers=16,
                     spill_stores=0, spill_loads=0)
  assert small.per_sm_by_registers() == 16 and small.per_sm_by_shared() == 32  # 2048 threads


def test_launches_are_read_from_either_thunk_dump_format(tmp_path):
  # jaxlib 0.11-0.12.0's line, then 0.12.1's (both seen on this project's machines)
  (tmp_path / "a.thunk_sequence.txt").write_text(
      "kKernel [source | next=002] fdjax_gemv grid: [4, 2, 1] threads: [128, 1, 1] "
      "shared_memory: 1024 bytes\n")
  (tmp_path / "b.thunk_sequence.txt").write_text(
      "001: kCustomKernel [source       | next=002 (1)] kernel=fdjax_flat_gemm, profile_"
      "annotation=pallas_call.1, launch dimensions=blocks: {64, 5, 1}, threads/block: {128, 1,"
      " 1}, cluster_dim=nullopt, shmem_bytes=20480, use_pdl=true\n002: kCustomKernel [prev=001 "
      "(1) | sink        ] kernel=loop_reduce_fusion, profile_annotation=loop_reduce_fusion, "
      "launch dimensions=blocks: {256, 1, 1}, threads/block: {64, 2, 1}, cluster_dim=nullopt, "
      "shmem_bytes=0, use_pdl=true\n")
  assert aot.launches(str(tmp_path)) == [("fdjax_gemv", (4, 2, 1), 128, 1024),
                                         ("fdjax_flat_gemm", (64, 5, 1), 128, 20480),
                                         ("loop_reduce_fusion", (256, 1, 1), 128, 0)]


# one case in CI (ptxas takes about a minute per program here); ("llama-3-8b", 1, 8, "1x1x8")
# passed too when this was built: 2.28 GB of arguments per device
@pytest.mark.parametrize("preset,dp,tp,topology", [("llama-2-7b", 2, 4, "1x2x4")])
def test_the_sharded_decode_loop_compiles_for_eight_h100s(h100, preset, dp, tp, topology):
  """generate's decode loop on a (dp, tp) mesh of 8 described H100s (one host of 8, or two
  of 4): the kernels run per device under shard_map, with an all-reduce after the o and down
  projections and an all-gather of the vocabulary-split logits; each device's arguments are
  its parameter shards and its KV pages, nothing more."""
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from fdjax.io import mesh as meshes
  from models import layout, parallel
  cfg = dataclasses.replace(presets.get(preset), num_layers=2)  # each layer the same program
  mesh = meshes.make_mesh(tp=tp, dp=dp, devices=aot.devices("h100", topology))
  model = meshes.build(cfg, jnp.bfloat16, mesh)  # abstract: shapes and shardings only
  place = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype,
                                                    sharding=NamedSharding(mesh, P()))
  with jax.set_mesh(mesh), dispatch.lowering_for("cuda"):
    _, decode = decode_loop.lower(model, batch=16, prompt_len=512, max_new_tokens=64,
                                  place=place)
  compiled = aot.compile(decode)
  hlo = compiled.as_text()
  for op in ("fdjax_mgpu_decode_async", "fdjax_mgpu_flat_gemm", "all-reduce", "all-gather"):
    assert op in hlo, op
  local = parallel.local_config(cfg, tp)
  params = sum(int(np.prod(e.shape)) for e in layout.layout(local)) * 2
  pages = 16 * 16 // dp  # 16 rows of 16 pages (576 tokens in pages of 64), split by replica
  kv = 2 * cfg.num_layers * pages * 64 * local.num_kv_heads * local.head_dim * 2
  assert params + kv <= compiled.memory_analysis().argument_size_in_bytes <= params + kv + 2**20


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_the_sharded_decode_loop_lowers_with_quantized_weights_for_eight_h100s(h100, method):
  """Llama-3-8B's int8 / int4 weights on tp=8 described H100s: each device's linears run the
  quantized Mosaic GPU flat GEMM on its own part of the values and scales (int8's per-column
  scales of the row-split o and down projections whole on each device). Lowered, not
  compiled: the quantized kernels' own compiles (tests/test_quantization.py's) cover ptxas."""
  from fdjax.io import mesh as meshes
  from models import quantize as quantization
  cfg = dataclasses.replace(presets.get("llama-3-8b"), num_layers=2)
  mesh = meshes.make_mesh(tp=8, devices=aot.devices("h100", "1x1x8"))
  model = meshes.build(cfg, jnp.bfloat16, mesh, quantization=quantization.Quantization(method))
  attn = model.local.layers[0].attn
  hidden, heads = cfg.hidden_size, cfg.num_heads * cfg.head_dim
  wo, down = attn.wo[...], model.local.layers[0].mlp.w_down[...]
  rows = 1 if method == "int8" else 2  # int4: two rows of K per byte
  assert wo.k == heads // 8 and wo.values.shape == (heads // rows, hidden)
  assert wo.values.sharding.spec == jax.sharding.PartitionSpec("model", None)
  assert down.k == cfg.intermediate_size // 8
  # int8: one scale per column, whole on each device; int4: per 128 rows, split with them
  assert wo.scales.sharding.spec == (jax.sharding.PartitionSpec(None) if method == "int8" else
                                     jax.sharding.PartitionSpec("model", None))
  place = lambda shape, dtype: jax.ShapeDtypeStruct(
      shape, dtype, sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  with jax.set_mesh(mesh), dispatch.lowering_for("cuda"):
    _, decode = decode_loop.lower(model, batch=16, prompt_len=512, max_new_tokens=64,
                                  place=place)
  text = decode.as_text()
  bits = method[3:]
  for op in (f"fdjax_mgpu_flat_gemm_int{bits}", "fdjax_mgpu_decode_async", "all_reduce",
             "all_gather"):
    assert op in text, op


@pytest.mark.parametrize("m,k,n", [(1, 4096, 4096), (16, 4096, 11008), (64, 11008, 4096)])
def test_the_mosaic_flat_gemm_compiles_for_sm90a_without_spills(h100, tmp_path, m, k, n):
  """Mosaic GPU's whole pipeline (MLIR -> PTX -> ptxas for sm_90a) with no GPU, on
  Llama-2-7B's projections at decode M: no spill, shared memory within the H100's."""
  fn = jax.jit(lambda x, w: dispatch.linear(x, w, impl="pallas_mosaic"))
  with aot.mosaic_dump(str(tmp_path)):  # lowering writes the resources, compiling the rest
    with aot.on("h100"):
      lowered = fn.lower(h100((m, k), jnp.bfloat16), h100((k, n), jnp.bfloat16))
    assert "mosaic_gpu" in lowered.as_text()
    aot.compile(lowered)
  [kernel] = aot.mosaic_resources(str(tmp_path))
  assert kernel.name.startswith("fdjax_mgpu_flat_gemm")
  assert (kernel.spill_stores, kernel.spill_loads) == (0, 0)
  assert 0 < kernel.registers <= 255
  assert 0 < kernel.shared_bytes <= 227 * 1024  # what a block may opt in to on sm_90


@pytest.mark.parametrize("case", [c for c in kernels.mosaic_defaults() if c.shape in (
    "llama-3-8b B=4 pages=512x64", "llama-3-8b B=32 pages=16x16", "mistral-7b w4096 B=8 S=8192",
    "llama-3.2-1b B=64 S=4096", "gemma-2-9b w4096 cap50 B=8 pages=128x64")], ids=str)
def test_the_mosaic_decode_attention_compiles_for_sm90a_without_spills(h100, case):
  """Both launches of the guarded kernel (async, and the online recompute) through Mosaic GPU's
  whole pipeline for sm_90a: paged (pages of 64, and of 16 copied four to a block),
  windowed, soft-capped, head_dim 64, 128 and 256; no spill, shared memory within the H100's."""
  rows = kernels.measure(case)
  assert {r["launch"] for r in rows} == {"fdjax_mgpu_decode_async", "fdjax_mgpu_decode_online"}
  for r in rows:
    assert r["status"] == "ok" and (r["spill_stores"], r["spill_loads"]) == (0, 0), r
    assert 0 < r["registers"] <= 255 and 0 < r["shared_kb"] <= 227 and r["per_sm"] >= 1


@pytest.mark.parametrize("case", [c for c in kernels.mosaic_defaults()
                                  if c.kernel.startswith("moe grouped_gemm")], ids=str)
def test_the_mosaic_grouped_gemm_compiles_for_sm90a_without_spills(h100, case):
  """The experts' grouped GEMM (Qwen3-30B-A3B's two products, at tiles of 8, 16, 32 and 64
  rows: every size auto gives it; on int8 / int4 experts at 8 and 64) through Mosaic GPU's whole pipeline for sm_90a: no spill,
  shared memory within the H100's."""
  [row] = kernels.measure(case)
  launch = "fdjax_mgpu_grouped_gemm" + ("_quantized" if " int" in case.kernel else "")
  assert row["status"] == "ok" and row["launch"] == launch, row
  assert (row["spill_stores"], row["spill_loads"]) == (0, 0)
  assert 0 < row["registers"] <= 255 and 0 < row["shared_kb"] <= 227 and row["per_sm"] >= 1


NO_TRITON = """
import sys
sys.modules["jax.experimental.pallas.triton"] = None  # a JAX without Pallas's Triton backend
import jax, jax.numpy as jnp
from fdjax.ops import dispatch, selection
from fdjax.tuning import aot
assert not selection.has_triton()
h = aot.abstract
bf = jnp.bfloat16
with aot.on("h100"), dispatch.lowering_for("cuda"):
  decode = jax.jit(lambda q, k, v, n: dispatch.decode_attention(q, k, v, n)).lower(
      h((2, 32, 128), bf), h((2, 4096, 8, 128), bf), h((2, 4096, 8, 128), bf), h((2,), jnp.int32))
  gemv = jax.jit(lambda x, w: dispatch.linear(x, w)).lower(h((1, 4096), bf), h((4096, 4096), bf))
  prefill = jax.jit(lambda q: dispatch.prefill_attention(q, q, q)).lower(h((1, 64, 8, 128), bf))
print(*["mosaic_gpu" in x.as_text() for x in (decode, gemv, prefill)])
print(dispatch.describe(platform="cuda")["prefill_attention"])
"""


def test_a_jax_without_triton_lowers_the_mosaic_kernels(h100):
  """Importing fdjax where `jax.experimental.pallas.triton` cannot be imported (a future JAX):
  "auto" on an H100 still takes the Mosaic GPU kernels (decode attention; the flat GEMM at
  M = 1, where Triton's GEMV would be), and prefill, which has none, runs XLA and says why."""
  r = subprocess.run([sys.executable, "-c", NO_TRITON], capture_output=True, text=True,
                     cwd=ROOT, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 0, r.stderr[-3000:]
  lines = r.stdout.strip().splitlines()
  assert lines[-2] == "True True False"
  assert lines[-1] == ("xla (Mosaic GPU: no Mosaic GPU kernel for prefill_attention yet; "
                       "Triton: this JAX has no Pallas Triton backend)")


@pytest.mark.parametrize("case", [c for c in kernels.mosaic_defaults()
                                  if c.kernel.startswith("linear int") and " M=16 " in c.shape
                                  and "llama-2-7b" in c.shape], ids=str)
def test_the_mosaic_quantized_flat_gemm_compiles_for_sm90a_without_spills(h100, case):
  """int8 / int4 weights dequantized in the K loop of the Mosaic GPU flat GEMM, at Llama-2-7B's
  projections: no spill, shared memory within the H100's."""
  [row] = kernels.measure(case)
  assert row["launch"] == f"fdjax_mgpu_flat_gemm_{case.kernel.split()[1]}"
  assert row["status"] == "ok" and (row["spill_stores"], row["spill_loads"]) == (0, 0), row
  assert 0 < row["registers"] <= 255 and 0 < row["shared_kb"] <= 227 and row["per_sm"] >= 1


@pytest.mark.parametrize("impl,kernel", [("pallas_mosaic", "fdjax_mgpu_decode"),
                                         ("pallas", "fdjax_decode")])
def test_the_gpu_guard_selects_instead_of_branching(h100, impl, kernel):
  """Decode attention lowered for an H100 (Mosaic GPU and Triton) holds the guard's online
  pass but no conditional: XLA:GPU runs a conditional by blocking the host on its predicate,
  which would stall the GPU once per layer (async_softmax.select_guard; on the H200, 81 us a
  call against the online path's 47). Interpret mode's cond is tested with guard_form."""
  bf = jnp.bfloat16
  with aot.on("h100"), dispatch.lowering_for("cuda"), dispatch.using(impl):
    text = jax.jit(lambda q, k, v, n: dispatch.decode_attention(q, k, v, n)).lower(
        h100((2, 32, 128), bf), h100((2, 4096, 8, 128), bf), h100((2, 4096, 8, 128), bf),
        h100((2,), jnp.int32)).as_text()
  assert f"{kernel}_async" in text and f"{kernel}_online" in text
  assert "stablehlo.case" not in text and "stablehlo.if" not in text
