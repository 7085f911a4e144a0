"""Many devices: the mesh (axes "data" and "model"), a model's parameters built straight
into it slice by slice, and joining the processes of several hosts (jax.distributed).

"model" is tensor parallelism (models/parallel.py: what each device holds and the
collectives), "data" independent replicas splitting the batch (models/sharded.py: the model
under shard_map). `build` makes each parameter with `jax.make_array_from_callback`: a device
asks `read` only for the checkpoint slices its block is made of (models/layout.py's
`shard_pieces`), so no process ever holds a whole tensor it does not keep.
"""
from __future__ import annotations

import os

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fdjax.ops import checks
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
                     f"{len(devices)} devices (set XLA_FLAGS=--xla_force_host_platform_"
                     f"device_count=N to get N CPU devices)")
  return Mesh(np.asarray(devices, dtype=object).reshape(dp, tp), AXES)


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


def build(cfg, dtype, mesh, read=None) -> ShardedTransformer:
  """The model with config `cfg` on `mesh`, each parameter made from the checkpoint slices
  `read(name, axis, start, stop)` returns (a numpy array; rows past the tensor's end zero);
  without `read`, abstract (jax.ShapeDtypeStruct parameters with their shardings: to lower
  and compile for described devices, fdjax.tuning.aot)."""
  check_mesh(mesh)
  tp = mesh.shape[MODEL]
  local_cfg = parallel.local_config(cfg, tp)
  local = nnx.eval_shape(lambda: Transformer(
      local_cfg, rngs=nnx.Rngs(0), dtype=dtype, tp=parallel.Parallel(MODEL, tp, cfg.vocab_size)))
  local.dtype = dtype
  for e, mine in zip(layout.layout(cfg), layout.layout(local_cfg)):
    axis = e.split_axis
    shape = tuple(s * tp if i == axis else s for i, s in enumerate(mine.shape))
    where = NamedSharding(mesh, P(*[MODEL if i == axis else None for i in range(len(shape))]))
    if read is None:
      layout.param_at(local, e.param).set_value(jax.ShapeDtypeStruct(shape, dtype,
                                                                     sharding=where))
      continue

    read_once = {}  # a block is read once per process, whatever the data replicas

    def block(index, e=e, axis=axis, size=mine.shape[axis or 0], read_once=read_once):
      device = 0 if axis is None else (index[axis].start or 0) // size
      if device not in read_once:
        parts = [read(name, ax, start, stop)
                 for name, ax, start, stop in layout.shard_pieces(e, cfg, tp, device)]
        read_once[device] = layout.assemble(e, parts).astype(dtype)
      return read_once[device][tuple(slice(None) if i == axis else s
                                     for i, s in enumerate(index))]

    value = jax.make_array_from_callback(shape, where, block)
    layout.param_at(local, e.param).set_value(value)
  specs = tuple(leaf.sharding.spec for leaf in jax.tree.leaves(nnx.state(local)))
  return ShardedTransformer(local, cfg, mesh, specs)


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
  if quantize.of(model) is not None:
    raise ValueError(f"shard: the model is quantized ({quantize.of(model).method}); quantized "
                     f"weights on a mesh are not implemented")
  tensors = layout.to_hf_tensors(model)
  return build(model.config, model.dtype, mesh,
               lambda name, axis, start, stop: padded_slice(
                   tensors[name], tensors[name].shape, axis, start, stop))


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
