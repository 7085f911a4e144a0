"""Every TPU kernel, and generate's whole prefill and decode loop, compiled by libtpu for a
described TPU v5e and v6e (and v5p, where the defaults differ: two cores) with no TPU
(fdjax.tuning.aot): Mosaic compiles each kernel as it would on the chip, and a block that does not
fit the chip's VMEM is refused here.

Needs libtpu (the one the installed jax pins: `pip install -e ".[tpu]"`; .ci/run installs it).
Without it these tests skip and say why, except where FDJAX_REQUIRE_TPU=1 (set by .ci/run):
there they fail.
"""
import dataclasses
import json
import os

import jax.numpy as jnp
import pytest
from flax import nnx

from bench import kernels_tpu
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
def tpu():
  why = aot.unavailable("v5e")
  if why and os.environ.get("FDJAX_REQUIRE_TPU") == "1":
    pytest.fail(f"FDJAX_REQUIRE_TPU=1, but this process cannot compile for a TPU: {why}")
  if why:
    pytest.skip(f"cannot compile for a TPU here: {why}")


@pytest.mark.parametrize("generation", ("v5e", "v6e"))
@pytest.mark.parametrize("case", kernels_tpu.defaults(full=False), ids=str)
def test_every_kernel_compiles_at_its_default_settings(tpu, generation, case):
  """Each kernel, in each dtype, at one shape (bench/kernels_tpu.py compiles them all for
  the three generations, and the committed table is checked below)."""
  compiled = kernels_tpu.compile_case(case, generation)  # raises CompileError if refused
  assert aot.tpu_resources(compiled), "no fdjax Mosaic kernel in the compiled program"


def test_v5p_where_its_defaults_differ(tpu):
  """v5p's two cores: batch-1 decode splits the keys in two, the flat GEMM halves block_n."""
  decode, linear = kernels_tpu.v5p_cases()
  assert aot.tpu_resources(kernels_tpu.compile_case(decode, "v5p"))
  assert aot.tpu_resources(kernels_tpu.compile_case(linear, "v5p"))


VMEM_REFUSAL = r"would exceed memory|ScopedVmemOom|Ran out of memory in memory space vmem"


@pytest.mark.parametrize("generation", aot.TPUS)
def test_oversized_blocks_are_refused_for_vmem(tpu, generation):
  past_all, past_scoped = kernels_tpu.oversized()
  with pytest.raises(aot.CompileError, match=VMEM_REFUSAL):
    kernels_tpu.compile_case(past_all, generation)
  if generation == "v6e":  # 2 x 8 MiB of w and x's blocks fit its 32 MiB of scoped VMEM
    vmem = aot.tpu_resources(kernels_tpu.compile_case(past_scoped, generation))
    assert vmem["fdjax_tpu_flat_gemm"] >= 2 * 2048 * 2048 * 2
  else:  # not v5e's and v5p's 16 MiB
    with pytest.raises(aot.CompileError, match=VMEM_REFUSAL):
      kernels_tpu.compile_case(past_scoped, generation)


@pytest.mark.parametrize("generation,batch", [("v5e", 1), ("v6e", 2)])
def test_generate_compiles_with_the_tpu_kernels(tpu, generation, batch):
  """llama-3-8b (two of its layers) in bfloat16 with impl="auto", lowered for the described
  chip: the TPU branch takes the Mosaic kernels for attention and the linear layers."""
  cfg = dataclasses.replace(presets.get("llama-3-8b"), num_layers=2)
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16))
  place = lambda shape, dtype: aot.abstract(shape, dtype, generation)
  with aot.on(generation), dispatch.lowering_for(f"tpu:{generation}"):
    prefill, decode = decode_loop.lower(model, batch=batch, prompt_len=40, max_new_tokens=8,
                                        place=place)
  prefill, decode = aot.compile(prefill), aot.compile(decode)
  linear = "fdjax_tpu_gemv" if batch == 1 else "fdjax_tpu_flat_gemm"  # analytic M1 = 2
  # the prompt's M = batch * 40 rows run XLA's dot; the last token's logits the kernel
  assert {"fdjax_tpu_prefill_async", "fdjax_tpu_prefill_online",
          linear} <= set(aot.tpu_resources(prefill))
  assert {"fdjax_tpu_decode_async", "fdjax_tpu_decode_online",
          linear} <= set(aot.tpu_resources(decode))


def test_outside_lowering_for_a_cpu_host_traces_xla_alone(tpu):
  cfg = dataclasses.replace(presets.get("llama-3-8b"), num_layers=1)
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16))
  place = lambda shape, dtype: aot.abstract(shape, dtype, "v5e")
  with aot.on("v5e"):
    _, decode = decode_loop.lower(model, batch=1, prompt_len=16, max_new_tokens=2, place=place)
  assert "fdjax_" not in decode.as_text()


def test_the_committed_table_has_every_default_case():
  with open(os.path.join(ROOT, "bench", "results", "kernels_tpu.json")) as fh:
    rows = json.load(fh)["rows"]
  for gen in aot.TPUS:
    default = [r for r in rows if r["generation"] == gen and r["setting"] == "default"]
    assert {(r["kernel"], r["shape"], r["dtype"]) for r in default} == {
        (c.kernel, c.shape, c.dtype) for c in kernels_tpu.defaults()}
    assert all(r["status"] == "ok" and r["code_kb"] > 0 for r in default)
    refused = {r["shape"] for r in rows if r["generation"] == gen and
               r["status"].startswith("refused")}
    assert refused == ({"oversized M=16 K=16384 N=16384"} if gen == "v6e" else
                       {"oversized M=16 K=16384 N=16384", "past-scoped-vmem M=16 K=8192 N=8192"})
