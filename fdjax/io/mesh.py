"""Many devices: the mesh (axes "data" and "model"), a model's parameters built straight
into it slice by slice, and joining the processes of several hosts (jax.distributed).

"model" is tensor parallelism (models/parallel.py: what each device holds and the
collectives), "data" independent replicas splitting the batch (models/sharded.py: the model
under shard_map). `build` makes each parameter with `jax.make_array_from_callback`: a device
asks `read` only for the checkpoint slices its block is made of (models/layout.py's
`shard_pieces`), so no process ever holds a whole tensor it does not keep. int8 / int4
weights are read as saved (their values' and scales' slices: `quantized_pieces`) or quantized
on the mesh as they load, each device's part the same numbers as one device's model.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fdjax.ops import checks, quant
from models import layout, parallel, quantize
from models.llama import Transformer
from models.parallel import DATA, MODEL
from models.sharded import ShardedTransformer

AXES = (DATA, MODEL)
# jax.distributed's own variables, or a cluster it detects (SLURM, Open MPI, Kubernetes...).
DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
CLUSTER_ENV = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES")


def make_mesh(tp: int = 1, dp: int = 1, devices=None) -> Mesh:
  """A (dp, tp) mesh with axes ("data", "model") over `devices` (default: every device of
  every process), which must number exactly tp * dp. A "model" group is consecutive
  devices (on one host where the hosts' devices allow)."""
  checks.positive_int("make_mesh", "tp", tp)
  checks.positive_int("make_mesh", "dp", dp)
  devices = list(jax.devices() if devices is None else devices)
  if tp * dp != len(devices):
    raise ValueError(f"make_mesh: tp * dp = {tp} * {dp} = {tp * dp} does not match the "
                     f"{len(devices)} devices (for N CPU devices: fdjax.cpu_devices(N) "
                     f"before JAX starts, or XLA_FLAGS=--xla_force_host_platform_"
                     f"device_count=N)")
  return Mesh(np.asarray(devices, dtype=object).reshape(dp, tp), AXES)


def cpu_devices(n: int) -> bool:
  """Asks JAX for `n` CPU devices, so that a mesh of them uses the host's cores: XLA:CPU runs
  a program's loops and its element-wise work on one thread (only its matmuls and very large
  top-level operations spread over the cores), and each device runs its programs on a thread
  of its own. Call it before JAX starts (before any array or jax.devices()); `fdjax generate`
  / `serve` do it for --tp / --dp. Leaves the count alone, and returns False, where one was
  set (jax_num_cpu_devices, or XLA_FLAGS' --xla_force_host_platform_device_count) or JAX has
  started; True where it set it. On a host with accelerators they stay the default devices:
  the CPU devices are only the host's."""
  checks.positive_int("cpu_devices", "n", n)
  if (jax.config.jax_num_cpu_devices != -1
      or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")):
    return False
  try:
    jax.config.update("jax_num_cpu_devices", n)
  except RuntimeError:  # JAX has started: its devices are what they are
    return False
  return True


def check_mesh(mesh) -> Mesh:
  if not isinstance(mesh, Mesh):
    raise ValueError(f"mesh must be a jax.sharding.Mesh (fdjax.make_mesh), got "
                     f"{type(mesh).__name__}")
  missing = [a for a in AXES if a not in mesh.axis_names]
  extra = [a for a in mesh.axis_names if a not in AXES]
  if missing or extra:
    raise ValueError(f"mesh: axes {tuple(mesh.axis_names)} lack {missing} / have unknown "
                     f"{extra}; fdjax's mesh has exactly {AXES} (fdjax.make_mesh)")
  return mesh


def build(cfg, dtype, mesh, read=None, quantization=None, stored=False) -> ShardedTransformer:
  """The model with config `cfg` on `mesh`, each parameter made from the checkpoint slices
  `read(name, axis, start, stop)` returns (a numpy array; rows past the tensor's end zero);
  without `read`, abstract (jax.ShapeDtypeStruct parameters with their shardings: to lower
  and compile for described devices, fdjax.tuning.aot).

  `quantization` (models.quantize.Quantization): the weights it covers are int8 / int4, read
  as stored (`stored`: `read` gives their values and NAME_scale scales, as a checkpoint saved
  quantized holds them) or quantized as they load from the float ones. Either way each
  device's values and scales are its block of the one-device model's (the same numbers: an
  int8 weight split by input rows keeps every column's one scale on every device)."""
  check_mesh(mesh)
  tp = mesh.shape[MODEL]
  local_cfg = parallel.local_config(cfg, tp)
  if quantization is not None:
    quantize.check_split(cfg, tp, quantization)
  local = nnx.eval_shape(lambda: Transformer(
      local_cfg, rngs=nnx.Rngs(0), dtype=dtype, tp=parallel.Parallel(MODEL, tp, cfg.vocab_size)))
  local.dtype = dtype
  for e, mine in zip(layout.layout(cfg), layout.layout(local_cfg)):
    method = quantization.method if quantization and quantization.covers(e) else None
    axis = e.split_axis
    if method is None or not stored or read is None:
      # to quantize: the checkpoint's own values, as on one device
      value = _array(mesh, mine.shape, axis, None if read is None else lambda device, e=e: (
          layout.assemble(e, [read(*piece) for piece in layout.shard_pieces(e, cfg, tp,
                                                                            device)])),
          dtype if method is None or read is None else None)
      if method is not None:
        value = _quantized(value, method, dtype, mesh, mine.shape, axis)
    else:
      value = _stored(e, cfg, tp, mesh, mine.shape, axis, method, dtype, read)
    layout.param_at(local, e.param).set_value(value)
  specs = tuple(leaf.sharding.spec for leaf in jax.tree.leaves(nnx.state(local)))
  return ShardedTransformer(local, cfg, mesh, specs)


def _split(mesh, axis, ndim):
  """The sharding of an `ndim`-dimensional array split over "model" along `axis` (None:
  whole on each device)."""
  return NamedSharding(mesh, P(*[MODEL if i == axis else None for i in range(ndim)]))


def _array(mesh, local_shape, axis, block, dtype):
  """A global array of devices' blocks of `local_shape`, split over "model" along `axis`
  (None: whole on each): `block(device)` gives device `device`'s (read once per process,
  whatever the data replicas) in `dtype` (None: as read); without `block`, abstract."""
  tp = mesh.shape[MODEL]
  shape = tuple(s * tp if i == axis else s for i, s in enumerate(local_shape))
  where = _split(mesh, axis, len(shape))
  if block is None:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=where)
  read_once = {}

  def callback(index):
    device = 0 if axis is None else (index[axis].start or 0) // local_shape[axis]
    if device not in read_once:
      got = block(device)
      read_once[device] = got if dtype is None else got.astype(dtype)
    return read_once[device][tuple(slice(None) if i == axis else s
                                   for i, s in enumerate(index))]

  return jax.make_array_from_callback(shape, where, callback)


def _parts(method, local_shape, axis):
  """A weight of `local_shape` per device, split along `axis`, quantized to `method`:
  (local shape, split axis) of its values and of its scales. Split by output columns, both
  split alike; by input rows, the values by rows, int4's scales by groups of rows, int8's
  (one per column) whole on each device."""
  *experts, k, n = local_shape
  values, scales = quant.stored_shapes(method, k, n)
  values, scales = tuple(experts) + values, tuple(experts) + scales
  if axis is None or axis == len(local_shape) - 1:
    scale_axis = None if axis is None else len(scales) - 1
  else:
    scale_axis = None if method == "int8" else len(scales) - 2
  return (values, axis), (scales, scale_axis)


def _quantized(value, method, dtype, mesh, local_shape, axis):
  """A float weight on the mesh (or its abstract shape) quantized there, as
  `fdjax.ops.quant.quantize` quantizes it on one device (from the checkpoint's own values,
  scales in `dtype`), each device left holding its own part."""
  (_, v_axis), (s_shape, s_axis) = _parts(method, local_shape, axis)
  bits, k = quant.bits_of(method), local_shape[-2]
  shardings = quant.QuantizedWeight(_split(mesh, v_axis, len(local_shape)),
                                    _split(mesh, s_axis, len(s_shape)), bits, value.shape[-2])
  if isinstance(value, jax.ShapeDtypeStruct):
    q = jax.eval_shape(lambda w: quant.quantize(w, method, dtype), value)
    q = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                     q, shardings)
  else:
    q = _quantizer(method, jnp.dtype(dtype), shardings)(value)
  return quant.QuantizedWeight(q.values, q.scales, bits, k)


@functools.lru_cache(maxsize=64)
def _quantizer(method, dtype, shardings):
  """quant.quantize jitted to leave its result in `shardings` (one program for every layer's
  weight of a shape)."""
  return jax.jit(functools.partial(quant.quantize, method=method, dtype=dtype),
                 out_shardings=shardings)


def _stored(e, cfg, tp, mesh, local_shape, axis, method, dtype, read):
  """A weight saved quantized, each device's values and scales read from the checkpoint's
  slices of them (layout.quantized_pieces)."""
  (v_shape, v_axis), (s_shape, s_axis) = _parts(method, local_shape, axis)

  def part(which, part_dtype):
    def block(device):
      pieces = layout.quantized_pieces(e, layout.shard_pieces(e, cfg, tp, device),
                                       method)[which]
      return layout.assemble(e, [read(*piece) for piece in pieces])
    return _array(mesh, (v_shape, s_shape)[which], (v_axis, s_axis)[which], block, part_dtype)

  return quant.QuantizedWeight(part(0, None), part(1, dtype), quant.bits_of(method),
                               local_shape[-2])


def padded_slice(tensor_slice, shape, axis, start, stop):
  """Rows start:stop along `axis` of a tensor read through `tensor_slice[index]` (a
  safetensors slice or a numpy array), zeros past its end."""
  index = [slice(None)] * len(shape)
  index[axis] = slice(start, min(stop, shape[axis]))
  x = np.asarray(tensor_slice[tuple(index)])
  if stop > shape[axis]:
    pad = [(0, 0)] * len(shape)
    pad[axis] = (0, stop - max(start, shape[axis]))
    x = np.pad(x, pad)
  return x


def shard(model, mesh) -> ShardedTransformer:
  """An in-memory model (Transformer) put on a mesh, each device given its slices."""
  if not isinstance(model, Transformer) or model.tp is not None:
    raise ValueError("shard: expected an unsharded models.Transformer")
  tensors = layout.to_hf_tensors(model)  # a quantized weight: its values and its scales
  q = quantize.of(model)
  return build(model.config, model.dtype, mesh,
               lambda name, axis, start, stop: padded_slice(
                   tensors[name], tensors[name].shape, axis, start, stop),
               quantization=q, stored=q is not None)


def distributed_env() -> bool:
  """Whether the environment describes a multi-process job jax.distributed can join."""
  return (all(v in os.environ for v in DISTRIBUTED_ENV)
          or any(v in os.environ for v in CLUSTER_ENV))


def initialize(**kwargs) -> bool:
  """Joins the job's processes with `jax.distributed.initialize` (one process per host, each
  then sees every host's devices in jax.devices()) when the environment describes one
  (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID, or a cluster jax detects)
  or `kwargs` are given (coordinator_address=, num_processes=, process_id=); returns whether
  it did. Call it before anything touches a device."""
  if jax.distributed.is_initialized():
    return True
  if not kwargs and not distributed_env():
    return False
  if not kwargs and all(v in os.environ for v in DISTRIBUTED_ENV):
    kwargs = dict(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                  num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                  process_id=int(os.environ["JAX_PROCESS_ID"]))
  if "cpu" in (jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS") or ""):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices talk
  jax.distributed.initialize(**kwargs)
  return True
