"""One process of tests/test_sharding.py's two-process job (jax.distributed on 127.0.0.1,
each process 2 CPU devices, JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
set): loads the checkpoint onto a mesh over both processes' 4 devices, each process reading
only its devices' slices, and prints the greedy tokens as JSON (and the serving engine's
refusal of a mesh over both). Argument: a JSON
{"path": ..., "prompts": [...], "new": N, "meshes": [[dp, tp], ...]}."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fdjax  # noqa: E402
from fdjax.io import mesh as meshes  # noqa: E402


def main():
  spec = json.loads(sys.argv[1])
  assert meshes.initialize(), "the environment describes no multi-process job"
  import jax
  from flax import nnx

  from fdjax.engine import core as eng  # (makes a key: after initialize)
  from fdjax.io.tokenizer import ByteTokenizer
  out = {"process": jax.process_index(), "processes": jax.process_count(),
         "devices": jax.device_count(), "local_devices": jax.local_device_count()}
  for dp, tp in spec["meshes"]:
    model = fdjax.load_pretrained(spec["path"], mesh=fdjax.make_mesh(tp=tp, dp=dp))
    out[f"dp={dp} tp={tp}"] = fdjax.generate(model, spec["prompts"], max_new_tokens=spec["new"],
                                             page_size=4).tokens
    out[f"dp={dp} tp={tp} bytes here"] = sum(  # what this process's devices hold
        s.data.nbytes for leaf in jax.tree.leaves(nnx.state(model))
        for s in leaf.addressable_shards)
  try:  # serving from a mesh over both processes is refused
    eng.Engine(model, ByteTokenizer())
  except ValueError as e:
    out["serve_refused"] = str(e)
  print("JSON" + json.dumps(out), flush=True)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
