"""Process-level XLA settings, applied before JAX starts its backends."""
from __future__ import annotations

import os

# jax issue 27988: XLA leaves Pallas' Triton custom calls out of command buffers (CUDA
# graphs) by default, so a decode step of many small kernels pays a launch for each.
COMMAND_BUFFER_FLAG = "--legacy_command_buffer_custom_call_targets=__gpu$xla.gpu.triton"


def add_xla_flag(flag: str, unless: str | None = None) -> None:
  """Appends `flag` to this process's XLA_FLAGS unless they already contain `unless` (default:
  the flag itself), so a setting the user named wins. XLA reads XLA_FLAGS when its first
  backend starts: call this before any computation. Child processes inherit it."""
  flags = os.environ.get("XLA_FLAGS", "")
  if (unless or flag) not in flags:
    os.environ["XLA_FLAGS"] = (flags + " " + flag).strip()


def enable_command_buffers() -> None:
  """Adds the flag that puts Pallas calls into XLA command buffers. Must run before the first
  computation (XLA reads XLA_FLAGS once). XLA aborts on a flag it does not know, so this is
  opt-in (`--command-buffers`) until it is verified on the JAX version in use."""
  add_xla_flag(COMMAND_BUFFER_FLAG)


# jax 0.11 on: XLA:CPU's SmallWhileLoopHoistingPass compiles every while loop that touches
# less than `xla_cpu_small_while_loop_byte_threshold` bytes per iteration (about 1 KiB up to
# jax 0.10, 1 GiB from 0.11) into one single-threaded kernel. That takes in generate's whole
# batch-1 decode loop (a 58.5M model touches ~170 MB a step): its matmuls run inline on one
# core instead of as separate ops the runtime spreads over the cores, 1.4-1.5x slower on 2
# cores. (Batch >= 2 writes the cache with a scatter, which the pass refuses.) 1024 is the old
# limit. XLA skips xla_* keys when it hands the extra options to LLVM (the GPU and TPU
# compile tests run with it set).
CPU_LOOP_FLAG = "--xla_backend_extra_options=xla_cpu_small_while_loop_byte_threshold=1024"


def keep_cpu_loops_threaded() -> None:
  """Adds CPU_LOOP_FLAG to XLA_FLAGS unless they set the threshold already (a second
  --xla_backend_extra_options adds to the first's keys). XLA reads XLA_FLAGS when its first
  backend starts: fdjax's import does this, so in a process that ran a JAX computation
  before importing fdjax, it comes too late (and jax's own default stays)."""
  add_xla_flag(CPU_LOOP_FLAG, unless="xla_cpu_small_while_loop_byte_threshold")


def default_compile_cache() -> str:
  """Where the CLI keeps compiled programs: $FDJAX_COMPILE_CACHE, else fdjax/xla under the
  user's cache directory ($XDG_CACHE_HOME, else ~/.cache)."""
  if os.environ.get("FDJAX_COMPILE_CACHE"):
    return os.environ["FDJAX_COMPILE_CACHE"]
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "fdjax", "xla")


def use_compile_cache(path: str | None) -> str | None:
  """JAX's persistent compilation cache in `path` ("default": default_compile_cache(); "off"
  or None: none, even where JAX_COMPILATION_CACHE_DIR names one), every program kept however
  quickly it compiled (a server's warm-up is many small ones). Returns the directory used.
  A program compiled once is then loaded from disk by later processes with the same JAX,
  backend and flags: `fdjax generate`'s second run skips most of the first one's compiling."""
  import jax
  if path is None or path == "off":
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  path = default_compile_cache() if path == "default" else path
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path
