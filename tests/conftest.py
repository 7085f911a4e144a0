import os
import sys

import pytest

# The repository root on the path, so `tests.helpers` and the packages import from a checkout.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The tests' programs are tiny and compiled by the thousand: XLA's LLVM at optimization level 1
# compiles them faster (tests/test_engine.py 81 -> 54 s, tests/test_speculative.py 180 ->
# 161 s, one process), which keeps the README's test command inside its 15 minutes on 2
# cores. The numbers are XLA's own either way (no fast math at any level; dots are library
# calls). Not level 0: there jax.grad of CoPE's reference (its interpolation under the
# softmax, float64) came out NaN where eager, level 1 and the default agree (jax 0.12.0.1,
# XLA:CPU's fused loops; its forward was exact). Subprocesses (the CLI, servers, the
# benchmarks' smoke forms) inherit it. Compiles for a described H100 or TPU pin the default
# level (fdjax.tuning.aot.FULL_OPTIMIZATION): their registers and spills are the real ones.
# An XLA_FLAGS that names a level keeps it.
from fdjax import runtime  # noqa: E402  (after the path above; starts no backend)

# The dev extra's packages (transformers, torch, openai, lm-eval, ...) are imported through
# pytest.importorskip, so a checkout without them still runs the rest. With
# FDJAX_REQUIRE_DEV=1 (set by .ci/run) a missing one fails its tests instead of skipping them.
if os.environ.get("FDJAX_REQUIRE_DEV") == "1":
  import importlib

  pytest.importorskip = lambda modname, *args, **kwargs: importlib.import_module(modname)

runtime.add_xla_flag("--xla_backend_optimization_level=1", unless="xla_backend_optimization_level")

# The CLI's persistent compilation cache (fdjax generate / serve in subprocesses): one
# directory for the whole session, made by the first process (pytest, or xdist's controller,
# whose workers inherit it), so each `python -m fdjax ...` loads what an earlier one compiled
# for the same program and nothing lands in the user's ~/.cache. The tests' own processes
# keep JAX's default (no persistent cache).
_SESSION_CACHE = "FDJAX_TEST_SESSION_CACHE"
if _SESSION_CACHE not in os.environ:
  import tempfile
  os.environ[_SESSION_CACHE] = os.environ["FDJAX_COMPILE_CACHE"] = tempfile.mkdtemp(
      prefix="fdjax-test-xla-")


def pytest_unconfigure(config):
  if not hasattr(config, "workerinput"):  # the process that made it
    import shutil
    shutil.rmtree(os.environ.get(_SESSION_CACHE, ""), ignore_errors=True)


# The files that take longest (minutes each on 2 cores) go first: the README's command runs
# whole files on two workers (pytest-xdist --dist loadfile), which take them in this order,
# so the long ones start early and both workers finish at about the same time.
# (The benchmark and compile files run in CI's other steps, with the same rule; the GPU
# suite's dry run is two fixtures, one per file, of two or three minutes each.)
LONGEST_FIRST = ("test_bench_gpu_suite.py", "test_bench_gpu_suite_decode.py", "test_bench.py",
                 "test_mosaic_gpu.py", "test_h100_compile.py", "test_sharding.py",
                 "test_server.py", "test_engine.py", "test_speculative.py",
                 "test_structured_output.py", "test_quantization.py", "test_attention_kernels.py",
                 "test_tpu_kernels.py", "test_paged.py", "test_hf_parity.py", "test_openai_api.py",
                 "test_cope.py", "test_tool_calls.py", "test_moe.py", "test_tpu_compile.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order kept within


# Each compiled XLA:CPU program holds about nine memory maps until it is freed, and jax keeps
# every program it compiled. A test worker that compiles several thousand of them reaches
# Linux's vm.max_map_count (65530) and the next compile dies with SIGSEGV inside LLVM (seen in
# the full suite as crashes in `backend_compile_and_load`; half of tests/test_speculative.py
# alone leaves 17 000 maps). After any test, a worker holding more than MAX_MAPS drops jax's
# caches, which frees the programs no live object holds.
MAX_MAPS = 30000


def _maps() -> int:
  try:
    with open("/proc/self/maps") as fh:
      return sum(1 for _ in fh)
  except OSError:  # not Linux
    return 0


@pytest.fixture(autouse=True)
def _free_compiled_programs():
  yield
  if _maps() > MAX_MAPS:
    import gc

    import jax
    jax.clear_caches()
    gc.collect()


@pytest.fixture(params=["cond", "select"])
def guard_form(request, monkeypatch):
  """Both forms of the async softmax's guard in interpret mode: lax.cond (what the CPU runs)
  and the branchless select a GPU compiles (async_softmax.select_guard)."""
  from pallas_kernels.common import async_softmax
  monkeypatch.setattr(async_softmax, "SELECT_IN_INTERPRET", request.param == "select")
  return request.param
