"""Run by tests/test_sharding.py in a subprocess with 8 CPU devices (XLA_FLAGS): loads each
checkpoint on one device and on each (dp, tp) mesh, and prints one JSON object: per case the
logits' error against one device, both generations, what each device holds, and the errors
bad meshes raise; and the same for int8 / int4 weights on a mesh (quantized as they load, saved
quantized, or an in-memory quantized model sharded). Argument: a JSON {"models": {name: [path,
[[dp, tp], ...]]}, "interpret": [name, dp, tp] (that case also generates with the Pallas
kernels, interpreted), "quantized": [[name, method, lm_head, dp, tp], ...], "paths": {name:
path} (checkpoints only the quantized cases use, or the draft model), "speculative": the draft's
name in "paths" (speculative decoding on meshes, with the Llama-3 style target)}."""
import contextlib
import io
import json
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fdjax  # noqa: E402
from fdjax import cli  # noqa: E402
from fdjax.engine import core as eng  # noqa: E402
from fdjax.io import checkpoint  # noqa: E402
from fdjax.io import mesh as meshes  # noqa: E402
from fdjax.io.tokenizer import ByteTokenizer  # noqa: E402
from fdjax.ops import dispatch, quant  # noqa: E402
from models import layout, parallel  # noqa: E402
from models import quantize as quantization  # noqa: E402
from tests import models_util  # noqa: E402

NEW = 10


def prompts_for(vocab, seed):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, vocab, n).tolist() for n in (11, 5, 17)]


def holdings(model):
  """What each device holds: bytes of its parameter shards, and the shard shapes of the
  first layer's wqkv and wo, the LM head and the KV pages."""
  per_device = {}
  for leaf in jax.tree.leaves(nnx.state(model)):
    for s in leaf.addressable_shards:
      per_device[str(s.device)] = per_device.get(str(s.device), 0) + s.data.nbytes
  local_cfg = parallel.local_config(model.config, model.tp)
  itemsize = jnp.dtype(model.dtype).itemsize
  q = quantization.of(model)
  want = sum(int(np.prod(e.shape)) * itemsize if not (q and q.covers(e)) else
             max(e.experts, 1) * quant.weight_nbytes(*e.shape[-2:], model.dtype, q.method)
             for e in layout.layout(local_cfg))
  kv = fdjax.KVStore.for_model(model, num_pages=4, page_size=4)
  shapes = lambda p: sorted({tuple(s.data.shape) for s in  # noqa: E731 (int8 / int4: values)
                              getattr(p[...], "values", p[...]).addressable_shards})
  attn = model.local.layers[0].attn
  return dict(bytes=sorted(set(per_device.values())), devices=len(per_device), want=want,
              whole=sum(int(np.prod(e.shape)) for e in layout.layout(model.config)) * itemsize,
              wqkv=shapes(attn.wqkv), wo=shapes(attn.wo),
              lm_head=shapes(model.local.lm_head), pages=shapes(kv.k[0]),
              vocab=model.config.vocab_size,
              local=dict(heads=local_cfg.num_heads, kv_heads=local_cfg.num_kv_heads,
                         head_dim=local_cfg.head_dim))


def error(fn):
  try:
    fn()
  except ValueError as e:
    return str(e)
  return None


def serve(engine, prompts, max_tokens=7):
  """The engine's requests for `prompts`, run to the end."""
  reqs = [eng.Request(p, max_tokens) for p in prompts]
  for r in reqs:
    engine.submit(r)
  while not engine.idle():
    engine.step()
  return reqs


def pools_after(kv):
  """Each data replica's pages in use (its bookkeeping checked)."""
  for pool in kv.pools:
    pool.check()
  return [pool.pages_in_use for pool in kv.pools]


def engine_case(path, devices):
  """`fdjax serve`'s engine on a tp=4 mesh, and on (dp, tp) = (2, 2) with six requests for
  its four rows (two per replica: some wait) and then one that starts like a request of the
  second replica (its prefix is cached there): each request's tokens, and generate's alone
  on one device; on the replicas, where each request ran and their pools' pages after."""
  one = fdjax.load_pretrained(path)
  vocab = one.config.vocab_size
  alone = lambda prompts: [fdjax.generate(one, [p], max_new_tokens=7).tokens[0]  # noqa: E731
                           for p in prompts]
  model = fdjax.load_pretrained(path, mesh=fdjax.make_mesh(tp=4, devices=devices[:4]))
  args = dict(max_batch=4, page_size=4, max_model_len=64, prefill_chunk=16, steps_per_call=4)
  prompts = prompts_for(vocab, 3)
  engine = eng.Engine(model, ByteTokenizer(), **args)
  out = dict(tokens=[r.tokens for r in serve(engine, prompts)], alone=alone(prompts),
             pages_in_use=pools_after(engine.kv))
  dp2 = fdjax.load_pretrained(path, mesh=fdjax.make_mesh(tp=2, dp=2, devices=devices[:4]))
  engine = eng.Engine(dp2, ByteTokenizer(), **args)
  prompts = prompts_for(vocab, 3) + prompts_for(vocab, 4)
  reqs = serve(engine, prompts)
  source = next(r for r in reqs if r.replica == 1 and len(r.prompt) > 8)
  hits = [pool.prefix_hit_tokens for pool in engine.kv.pools]
  follow = source.prompt + [1, 2, 3]
  (later,) = serve(engine, [follow])
  out["dp"] = dict(tokens=[r.tokens for r in reqs + [later]], alone=alone(prompts + [follow]),
                   replicas=[r.replica for r in reqs], later_replica=later.replica,
                   later_hits=[pool.prefix_hit_tokens - h
                               for pool, h in zip(engine.kv.pools, hits)],
                   pages_in_use=pools_after(engine.kv))
  return out


def cli_text(tp, dp, *extra):
  """What `fdjax generate --tp --dp` prints (the bundled model, greedy)."""
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    rc = cli.main(["generate", "def f(x):", "--max-new-tokens", "12", "--temperature", "0",
                   "--page-size", "8", "--tp", str(tp), "--dp", str(dp), *extra])
  return [rc] + buf.getvalue().splitlines()


def forward(model, ids):
  """model(ids) as one fresh compiled program (tests.models_util.forward: eagerly each
  operation compiles on its own, for every mesh), as numpy."""
  return np.asarray(models_util.forward(model, ids))


def rel(got, want):
  """The largest difference over the largest |want|; inf where got is not finite (a NaN
  would pass any `<=` bound it is compared with)."""
  got = np.asarray(got)
  if not np.all(np.isfinite(got)):
    return float("inf")
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def quantized_case(path, method, lm_head, dp, tp, devices):
  """int8 / int4 weights on a (dp, tp) mesh against the same quantized model on one device,
  both through XLA's weight-only form (on the CPU, `auto` quantizes activations in groups
  that follow each device's K): quantized as it loads, loaded saved quantized, and the
  one-device model sharded; the tokens and what each device holds."""
  q = dict(quantize=method, quantize_lm_head=lm_head)
  one = fdjax.load_pretrained(path, **q)
  mesh = fdjax.make_mesh(tp=tp, dp=dp, devices=devices[:tp * dp])
  saved = tempfile.mkdtemp()
  checkpoint.save_pretrained(one, saved)
  ids = jnp.asarray(np.random.default_rng(1).integers(0, one.config.vocab_size, (4, 13)))
  prompts = prompts_for(one.config.vocab_size, 2)
  gen = dict(max_new_tokens=NEW, page_size=4, prefill_chunk=8)
  with dispatch.using("xla"):
    want = forward(one, ids)
    model = fdjax.load_pretrained(path, mesh=mesh, **q)
    got = forward(model, ids)
    case = dict(rel=rel(got, want), finite=bool(np.all(np.isfinite(got))),
                saved=rel(forward(fdjax.load_pretrained(saved, mesh=mesh), ids), want),
                sharded=rel(forward(meshes.shard(one, mesh), ids), want),
                method=str(quantization.of(model) and quantization.of(model).method),
                tokens=fdjax.generate(one, prompts, **gen).tokens,
                mesh_tokens=fdjax.generate(model, prompts, **gen).tokens, **holdings(model))
    case["float_bytes"] = holdings(fdjax.load_pretrained(path, mesh=mesh))["want"]
  return case


def speculative_case(path, draft_path, devices):
  """Speculative decoding on meshes, greedy: n-gram drafts, and a one-device draft model put
  on the target's mesh (the target itself: it proposes what a one-device self-draft does), at
  (dp, tp) = (2, 2), each replica its own draft pages; the serving engine at (2, 2) with the
  self-draft; each against plain decoding on one device. A draft that cannot be split as many ways
  as the target is refused."""
  one = fdjax.load_pretrained(path)
  rng = np.random.default_rng(5)
  motif = rng.integers(0, one.config.vocab_size, 9).tolist()
  prompts = [motif * 3 + motif[:2], rng.integers(0, one.config.vocab_size, 6).tolist(),
             motif + [3, 1] + motif]
  gen = dict(max_new_tokens=NEW, page_size=4)
  self_draft = {"method": "draft", "k": 3, "model": one}
  alone = fdjax.generate(one, prompts, speculative=self_draft, **gen)
  out = {"plain": fdjax.generate(one, prompts, **gen).tokens, "runs": {},
         "self_draft_alone": [alone.drafted, alone.accepted]}
  model = fdjax.load_pretrained(path, mesh=fdjax.make_mesh(tp=2, dp=2, devices=devices[:4]))
  for name, spec in (("ngram", "ngram:k=3,n=2"), ("self-draft", self_draft)):
    res = fdjax.generate(model, prompts, speculative=spec, **gen)
    out["runs"][name] = dict(tokens=res.tokens, drafted=res.drafted, accepted=res.accepted)
  draft = fdjax.load_pretrained(draft_path)
  engine = eng.Engine(fdjax.load_pretrained(path, mesh=fdjax.make_mesh(tp=2, dp=2,
                                                                      devices=devices[:4])),
                      ByteTokenizer(), max_batch=4, page_size=4, max_model_len=64,
                      prefill_chunk=16, steps_per_call=4,
                      speculative=self_draft)
  reqs = serve(engine, prompts, 9)  # the first token, then two rounds of k + 1 = 4
  out["engine"] = [r.tokens for r in reqs]
  out["alone"] = [fdjax.generate(one, [p], max_new_tokens=9).tokens[0] for p in prompts]
  out["engine_drafted"] = engine.scheduler.decoder.drafted
  out["engine_accepted"] = engine.scheduler.decoder.accepted
  out["engine_replicas"] = [r.replica for r in reqs]
  out["engine_pages"] = [pools_after(engine.kv), pools_after(engine.scheduler.decoder.draft.kv)]
  out["split_refused"] = error(lambda: fdjax.generate(
      fdjax.load_pretrained(path, mesh=fdjax.make_mesh(tp=8, devices=devices)), prompts,
      speculative={"method": "draft", "model": draft}, **gen))
  return out


def main():
  spec = json.loads(sys.argv[1])
  devices = jax.devices()
  out = {"devices": len(devices), "cases": {}, "errors": {}}
  t0 = time.perf_counter()
  for name, (path, meshes_) in spec["models"].items():
    one = fdjax.load_pretrained(path)
    vocab = one.config.vocab_size
    ids = jnp.asarray(np.random.default_rng(1).integers(0, vocab, (4, 13)))
    want = forward(one, ids)
    prompts = prompts_for(vocab, 2)
    gen = dict(max_new_tokens=NEW, page_size=4, prefill_chunk=8)
    tokens = fdjax.generate(one, prompts, **gen).tokens
    embedded = fdjax.embed(one, prompts, pooling="mean")
    for dp, tp in meshes_:
      mesh = fdjax.make_mesh(tp=tp, dp=dp, devices=devices[:tp * dp])
      model = fdjax.load_pretrained(path, mesh=mesh)
      got = forward(model, ids)
      case = dict(rel=float(np.max(np.abs(got - want)) / np.max(np.abs(want))),
                  finite=bool(np.all(np.isfinite(got))), tokens=tokens,
                  sharded=fdjax.generate(model, prompts, **gen).tokens, **holdings(model),
                  embed_err=float(np.max(np.abs(
                      fdjax.embed(model, prompts, pooling="mean") - embedded))))
      if spec.get("interpret") == [name, dp, tp]:
        with dispatch.using("pallas_interpret"):
          case["interpreted"] = fdjax.generate(model, prompts, **gen).tokens
      out["cases"][f"{name} dp={dp} tp={tp}"] = case
      print(name, dp, tp, f"{time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
  out["engine"] = engine_case(spec["models"]["llama3"][0], devices)
  out["cli"] = {f"tp={tp} dp={dp}": cli_text(tp, dp) for tp, dp in [(1, 1), (4, 2)]}
  paths = {name: m[0] for name, m in spec["models"].items()} | spec.get("paths", {})
  for name, method, lm_head, dp, tp in spec.get("quantized", []):
    out["cases"][f"{name} {method} dp={dp} tp={tp}"] = quantized_case(
        paths[name], method, lm_head, dp, tp, devices)
    print(name, method, dp, tp, f"{time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
  if "speculative" in spec:
    out["speculative"] = speculative_case(spec["models"]["llama3"][0],
                                          spec["paths"][spec["speculative"]], devices)
    print("speculative", f"{time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
  path = spec["models"]["cope"][0]
  with dispatch.using("xla"):  # the bundled model int8 on tp=4 x dp=2, as one device's
    one = fdjax.load_pretrained(path, quantize="int8")
    tok = ByteTokenizer()
    alone = fdjax.generate(one, [tok.encode("def f(x):")], max_new_tokens=12, page_size=8,
                           eos_token_id=tok.eos_token_id).tokens[0]
    out["cli"]["int8 tp=4 dp=2"] = cli_text(4, 2, "--quantize", "int8")
    out["cli"]["int8 alone"] = "def f(x):" + tok.decode(alone)
  out["errors"] = {
      "tp_8_for_4_heads": error(lambda: fdjax.load_pretrained(path, mesh=fdjax.make_mesh(8))),
      "axis_missing": error(lambda: fdjax.load_pretrained(path, mesh=jax.sharding.Mesh(
          np.asarray(devices[:2]).reshape(1, 2), ("batch", "model")))),
      "device_count": error(lambda: fdjax.make_mesh(tp=3)),
      "not_a_mesh": error(lambda: meshes.check_mesh("model")),
      "int4_groups_cut": error(lambda: fdjax.load_pretrained(
          spec["models"]["llama3"][0], quantize="int4", mesh=fdjax.make_mesh(4, 2))),
  }
  print("JSON" + json.dumps(out))


if __name__ == "__main__":
  main()
