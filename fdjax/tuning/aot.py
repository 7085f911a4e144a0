"""Compiling for a described GPU or TPU with no GPU or TPU present, and what the compiler
reports.

TPU (targets "v5e", "v6e", "v5p"): libtpu compiles for a TPU it is only told about
(`topologies.get_topology_desc`, one chip), Mosaic kernels included, so a block that does not
fit the chip's VMEM is refused here ("would exceed memory"). It needs libtpu (the one the
installed jax pins: `pip install "jax[tpu]"`, the `tpu` extra) and JAX_PLATFORMS=cpu; trace
inside `on(target)` (the chip's mesh set: nothing then asks the CPU for a TPU generation).
`tpu_resources` reads each Mosaic kernel's scoped VMEM from the compiled HLO.

GPU (target "h100"):

XLA compiles for a GPU it is only told about (`jax.experimental.topologies` with a target
description, fdjax/tuning/targets/<name>.txtpb; the H100's is cut down from XLA's own `h100_sxm`
spec): Pallas' Triton kernels go through Triton's compiler and `ptxas -arch=sm_90a` as they
would on the device, so a kernel that overflows shared memory or spills registers fails here
(COMPILE_OPTIONS makes a spill an error). It needs the CUDA plugin at the installed jax's
version and a CUDA 13 ptxas: `pip install "jax[cuda13-local]" nvidia-cuda-nvcc` (the `h100`
extra; it keeps the jax that is there), and JAX_PLATFORMS=cpu set before jax is imported
(else the plugin looks for a driver). Trace and lower inside `on(target)`: the described
GPU's mesh set, which is what jax (0.11 on) asks Pallas' Triton lowering for when no GPU is
present.

`resources` reads, from a compile's dump (`xla_dump_to`), each kernel's launch (grid,
threads, shared memory: XLA's thunk sequence) and its registers and spills (`ptxas -v` on
the PTX), and how many of its programs fit on one SM by each.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import importlib.util
import os
import re
import shutil
import subprocess

import jax
from jax.experimental import topologies
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fdjax.ops import checks
from pallas_kernels.tpu import shared as tpu
from pallas_kernels.triton import shared

TARGETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "targets")
ARCH = {"h100": "sm_90a"}
COMPILE_OPTIONS = {"xla_gpu_fail_ptx_compilation_on_register_spilling": True}
# The registers, spills and code a target's compile reports are those of XLA's default
# optimization level whatever XLA_FLAGS say (the test suite lowers it for its CPU programs:
# tests/conftest.py); at level 0 a Triton kernel's PTX took more registers (56 -> 64).
FULL_OPTIMIZATION = {"xla_backend_optimization_level": 3}
INSTALL = 'pip install "jax[cuda13-local]" nvidia-cuda-nvcc  (pip install -e ".[h100]")'
TPU_INSTALL = 'pip install "jax[tpu]"  (the libtpu the installed jax pins; pip install -e ".[tpu]")'
PLUGINS = ("jax_plugins.xla_cuda13", "jax_plugins.xla_cuda12")  # either CUDA's plugin compiles
TPUS = tuple(tpu.GENERATIONS)  # "v5e", "v6e", "v5p"


class CompileError(ValueError):
  """A computation the compiler refuses for the target (shared memory, registers, ...)."""


def ptxas() -> str | None:
  """The ptxas XLA uses: in the CUDA directory jax hands it ($CUDA_ROOT, else the
  nvidia-cuda-nvcc package's), else on PATH. (XLA's choice, not the first on PATH:
  another CUDA's ptxas may count registers differently.)"""
  try:
    from jax._src.lib import cuda_path  # what jax passes XLA as its CUDA directory
  except ImportError:
    cuda_path = None
  path = os.path.join(cuda_path, "bin", "ptxas") if cuda_path else ""
  return path if os.access(path, os.X_OK) else shutil.which("ptxas")


def _package_versions(names) -> dict[str, str]:
  """jax's version and those of the installed packages among `names`."""
  import importlib.metadata as md
  out = {"jax": jax.__version__}
  for name in names:
    try:
      out[name] = md.version(name)
    except md.PackageNotFoundError:
      pass
  return out


def versions() -> dict[str, str]:
  """What compiles for the described GPU: jax, jaxlib, the CUDA plugin, ptxas."""
  out = _package_versions(("jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt",
                           "jax-cuda12-plugin", "jax-cuda12-pjrt", "nvidia-cuda-nvcc",
                           "nvidia-cuda-nvcc-cu12"))
  if ptxas():
    r = subprocess.run([ptxas(), "--version"], capture_output=True, text=True, timeout=60)
    out["ptxas"] = next((line.split("release ")[-1] for line in r.stdout.splitlines()
                         if "release " in line), "unknown")
  return out


def unavailable(target: str = "h100") -> str | None:
  """Why this process cannot compile for the described GPU or TPU, or None if it can."""
  if target in TPUS:
    if importlib.util.find_spec("libtpu") is None:
      return f"libtpu is not installed ({TPU_INSTALL})"
    if jax.default_backend() != "cpu":
      return f"the default backend is {jax.default_backend()}, not cpu (set JAX_PLATFORMS=cpu)"
    return None
  def found(name):
    try:
      return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # no jax_plugins package at all
      return False
  if not any(found(p) for p in PLUGINS):
    return f"the CUDA plugin is not installed ({INSTALL})"
  if ptxas() is None:
    return f"ptxas is not installed ({INSTALL})"
  if jax.default_backend() != "cpu":
    return f"the default backend is {jax.default_backend()}, not cpu (set JAX_PLATFORMS=cpu)"
  return None


def _target_text(target: str) -> str:
  path = os.path.join(TARGETS, f"{target}.txtpb")
  if not os.path.exists(path):
    known = sorted(f[:-len(".txtpb")] for f in os.listdir(TARGETS) if f.endswith(".txtpb"))
    raise ValueError(f"no GPU description {path}; known targets: {known}")
  with open(path) as fh:
    return fh.read()


@functools.lru_cache(maxsize=None)
def facts(target: str = "h100") -> dict[str, int]:
  """The target description's integer fields (core_count, shared_memory_per_core, ...)."""
  return {k: int(v) for k, v in re.findall(r"^\s*(\w+): (\d+)\s*$", _target_text(target), re.M)}


@functools.lru_cache(maxsize=None)
def sharding(target: str = "h100") -> NamedSharding:
  """All of a computation on the described GPU or TPU chip (one device)."""
  why = unavailable(target)
  if why:
    raise RuntimeError(f"cannot compile for a described {target}: {why}")
  if target in TPUS:
    # libtpu takes a lock file so that one process per host drives the TPUs; compiling for
    # a described one drives none, so several processes (tests, benchmarks) may share it
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    gen = tpu.GENERATIONS[target]
    one_chip = gen.topology.split(":")[0] + ":" + "x".join(
        "1" for _ in gen.topology.split(":")[1].split("x"))
    topo = topologies.get_topology_desc(topology_name=one_chip, platform="tpu",
                                        chips_per_host_bounds=(1, 1, 1))
  else:
    topo = topologies.get_topology_desc(platform="cuda", target_config=_target_text(target),
                                        topology="1x1x1")
  return NamedSharding(topologies.make_mesh(topo, (1,), ("d",)), P())


def devices(target: str = "h100", topology: str = "1x1x8") -> list:
  """The described GPUs of a topology "slices x hosts x devices per host" (for a mesh;
  fdjax.make_mesh(tp=..., devices=aot.devices())): nothing runs on them, they compile."""
  why = unavailable()
  if why:
    raise RuntimeError(f"cannot compile for a described GPU: {why}")
  return list(topologies.get_topology_desc(platform="cuda", target_config=_target_text(target),
                                           topology=topology).devices)


def abstract(shape, dtype, target: str = "h100") -> jax.ShapeDtypeStruct:
  """An input of the given shape and dtype placed on the described GPU or TPU (no data)."""
  return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding(target))


def on(target: str = "h100"):
  """Context to trace and lower in for a described GPU or TPU: its one-device mesh set (the
  GPU or TPU that Pallas' lowerings ask the mesh in context for when there is none here)."""
  return jax.set_mesh(sharding(target).mesh)


def compile(lowered, *, dump_to: str | None = None, strict: bool = True):
  """lowered.compile() at XLA's default optimization level, with spills made errors
  (`strict`: a GPU flag a TPU ignores) and the dump written to `dump_to`; a refusal (a spill,
  shared memory, a TPU's VMEM) is raised as CompileError with the compiler's reason."""
  # xla_dump_emitter_re: XLA (jax 0.11 on) writes the kernels' PTX into the dump only when
  # the regex matches "ptx" (".*" dumps every pass's IR too: 20 MB and 7 s a compile);
  # resources() reads the PTX
  dump = dict(xla_dump_to=dump_to, xla_dump_emitter_re="ptx") if dump_to else {}
  options = dict(FULL_OPTIMIZATION, **(COMPILE_OPTIONS if strict else {}), **dump)
  try:
    return lowered.compile(compiler_options=options)
  except jax.errors.JaxRuntimeError as e:
    raise CompileError(f"refused by the compiler: {reason(e)}") from e


def reason(error: Exception) -> str:
  """The compiler's message, without XLA's stack of contexts."""
  text = str(error).strip()
  return text.split(", context:")[0].splitlines()[0][:500]


# ------------------------------------------------------------------------ resources

@dataclasses.dataclass(frozen=True)
class Kernel:
  """One compiled kernel's launch and resources."""
  name: str
  grid: tuple[int, int, int]
  threads: int          # per program (block)
  shared_bytes: int     # per program
  registers: int        # per thread
  spill_stores: int     # bytes per thread
  spill_loads: int

  @property
  def programs(self) -> int:
    return self.grid[0] * self.grid[1] * self.grid[2]

  def per_sm_by_registers(self, target: str = "h100") -> int:
    """Programs one SM holds by its register file (registers are given out per warp in
    units of 256, and by its thread and block limits)."""
    unit = shared.SM90_REGISTER_UNIT
    per_warp = checks.cdiv(max(self.registers, 1) * 32, unit) * unit
    warps = facts(target)["registers_per_core_limit"] // per_warp
    fit = warps // checks.cdiv(self.threads, 32)
    return min(fit, facts(target)["threads_per_core_limit"] // self.threads,
               shared.SM90_MAX_PROGRAMS_PER_SM)

  def per_sm_by_shared(self, target: str = "h100") -> int:
    """Programs one SM holds by its shared memory (each also takes the 1 KB the system
    reserves per program, in 128-byte units)."""
    if self.shared_bytes == 0:
      return shared.SM90_MAX_PROGRAMS_PER_SM
    unit = shared.SM90_SHARED_UNIT
    per_program = checks.cdiv(self.shared_bytes, unit) * unit + shared.SM90_SHARED_RESERVED
    return min(facts(target)["shared_memory_per_core"] // per_program,
               shared.SM90_MAX_PROGRAMS_PER_SM)


# A launch in XLA's thunk sequence dump, as jaxlib 0.11-0.12.0 writes it ("] NAME grid: [x, y,
# z] threads: [x, y, z] shared_memory: N bytes") and as 0.12.1 does ("kernel=NAME, ...,
# launch dimensions=blocks: {x, y, z}, threads/block: {x, y, z}, ..., shmem_bytes=N").
_LAUNCH = re.compile(
    r"\] (\S+) grid: \[(\d+), (\d+), (\d+)\] threads: \[(\d+), (\d+), (\d+)\]"
    r"\s+shared_memory: (\d+) bytes"
    r"|kernel=([^,\s]+),.*?blocks: \{(\d+), (\d+), (\d+)\}, threads/block: \{(\d+), (\d+), (\d+)\}"
    r".*?shmem_bytes=(\d+)")


def launches(dump_dir: str) -> list[tuple]:
  """(kernel, grid, threads, shared bytes) of every launch in XLA's thunk sequences in the
  dump (XLA names one compiled kernel launched with several grids once)."""
  out = []
  for file in sorted(glob.glob(os.path.join(dump_dir, "*thunk_sequence.txt"))):
    with open(file) as fh:
      for m in _LAUNCH.finditer(fh.read()):
        g = m.groups()[:8] if m.group(1) else m.groups()[8:]
        out.append((g[0], tuple(int(x) for x in g[1:4]), int(g[4]) * int(g[5]) * int(g[6]),
                    int(g[7])))
  return out


def ptx_usage(ptx_file: str, arch: str) -> dict[str, tuple[int, int, int]]:
  """{entry: (registers, spill store bytes, spill load bytes)} from `ptxas -v`."""
  binary = ptxas()
  if binary is None:
    raise RuntimeError(f"ptxas is not installed ({INSTALL})")
  r = subprocess.run([binary, "-v", f"-arch={arch}", ptx_file, "-o", os.devnull],
                     capture_output=True, text=True, timeout=300)
  if r.returncode:
    raise RuntimeError(f"ptxas failed on {ptx_file}: {r.stderr[-2000:]}")
  out = {}
  for block in r.stderr.split("Compiling entry function '")[1:]:
    name = block.split("'", 1)[0]
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", block)
    regs = re.search(r"Used (\d+) registers", block)
    out[name] = (int(regs.group(1)) if regs else 0,
                 int(spill.group(1)) if spill else 0, int(spill.group(2)) if spill else 0)
  return out


def resources(dump_dir: str, prefix: str = "fdjax_", target: str = "h100") -> list[Kernel]:
  """Every distinct launch of a kernel whose name starts with `prefix` in a compile's dump,
  with its registers and spills."""
  usage = {}
  for ptx in sorted(glob.glob(os.path.join(dump_dir, "*.ptx"))):
    with open(ptx) as fh:
      if f".entry {prefix}" in fh.read():
        usage.update(ptx_usage(ptx, ARCH[target]))
  out = []
  for name, grid, threads, shared_bytes in launches(dump_dir):
    if name.startswith(prefix) and name in usage:
      k = Kernel(name, grid, threads, shared_bytes, *usage[name])
      out += [] if k in out else [k]
  return out


# ------------------------------------------------------------- Mosaic GPU resources

@contextlib.contextmanager
def mosaic_dump(dump_dir: str):
  """Within this block, lowering a Mosaic GPU kernel writes its resources (the shared memory
  it allocates) and compiling it (its custom call compiles to PTX and runs ptxas for sm_90a,
  GPU or not) its PTX and ptxas report, into `dump_dir` (an existing folder); lower and
  compile inside it. The nvidia-cuda-nvcc package's ptxas comes first on PATH, where the
  plugin looks for one. A kernel the process compiled before is not compiled (nor dumped)
  again."""
  dump_dir = os.path.abspath(dump_dir)
  binary = ptxas()
  saved = {k: os.environ.get(k) for k in ("MOSAIC_GPU_DUMP_TO", "PATH")}
  os.environ["MOSAIC_GPU_DUMP_TO"] = dump_dir
  if binary:
    os.environ["PATH"] = os.path.dirname(binary) + os.pathsep + os.environ.get("PATH", "")
  try:
    yield dump_dir
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


@dataclasses.dataclass(frozen=True)
class MosaicKernel:
  """One compiled Mosaic GPU kernel's resources (per thread: registers, spills; per program:
  shared memory, the scratch Mosaic allocates and ptxas's static part)."""
  name: str
  registers: int
  spill_stores: int
  spill_loads: int
  shared_bytes: int


def mosaic_resources(dump_dir: str, prefix: str = "fdjax_") -> list[MosaicKernel]:
  """Every Mosaic GPU kernel whose name starts with `prefix` that the process compiled inside
  a mosaic_dump folder: registers and spills from its ptxas report, shared memory from the
  launch its compile log records (the dynamic size, scratch and barriers) plus ptxas's static
  part. A kernel served from the compile cache (the process compiled the same one before) has
  no report and is left out. (The lowering's resources.txt is not read: lowering and compiling
  number kernels apart, and a cache hit puts the two out of step.)"""
  out = []
  for report in sorted(glob.glob(os.path.join(dump_dir, f"{prefix}*.ptxas"))):
    stem = report[:-len(".ptxas")]
    with open(report, errors="replace") as fh:
      text = fh.read()
    with open(stem + ".mlir-passes.log", errors="replace") as fh:
      launch = re.findall(r"dynamic_shared_memory_size %c(\d+)_i32", fh.read())
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    static = re.search(r"Used \d+ registers.*?(\d+) bytes smem", text)
    out.append(MosaicKernel(os.path.basename(stem), int(regs.group(1)),
                            int(spill.group(1)), int(spill.group(2)),
                            int(launch[-1]) + (int(static.group(1)) if static else 0)))
  return out


# --------------------------------------------------------------------- TPU resources

_TPU_CALL = re.compile(r"%(fdjax_tpu_\w+?)(?:\.\d+)? = .*?custom_call_target=\"tpu_custom_call\""
                       r".*?\"used_scoped_memory_configs\":\[(.*?)\]")


def tpu_resources(compiled) -> dict[str, int]:
  """{kernel: scoped VMEM bytes} of every fdjax Mosaic kernel in a program compiled for a
  TPU (what libtpu reserved for its blocks, their second buffers and its scratch), the
  largest where a kernel appears more than once."""
  out = {}
  for name, configs in _TPU_CALL.findall(compiled.as_text()):
    size = sum(int(x) for x in re.findall(r'"size":"(\d+)"', configs))
    out[name] = max(out.get(name, 0), size)
  return out


def code_bytes(compiled) -> int:
  """Bytes of code the compiler generated for the program (TPU: its bundles)."""
  return int(compiled.memory_analysis().generated_code_size_in_bytes)


def tpu_versions() -> dict[str, str]:
  """What compiles for the described TPU: jax, jaxlib, libtpu."""
  return _package_versions(("jaxlib", "libtpu"))
