"""Many devices (fdjax.io.mesh, models/parallel.py, models/sharded.py): tensor parallelism over
"model" and data-parallel replicas over "data" give the single-device logits (float32,
1e-5 relative) and greedy tokens, loaded from Hugging Face checkpoints straight onto the
mesh; each device holds only its shard; bad meshes are clear ValueErrors. The multi-device
work runs in one subprocess with 8 CPU devices (tests/sharded_run.py)."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from fdjax.io import mesh as meshes
from models import layout, parallel
from tests.models_util import tiny_config

# Apart from the README's command (its 15 minutes): CI runs them with the compile tests.
pytestmark = pytest.mark.multidevice
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL = os.path.join(ROOT, "fdjax", "default_model")  # CoPE, 4 heads: tp up to 4
COPE = [[1, 4], [2, 2]]
ALL = [[1, 1], [1, 4], [2, 4]]  # tp = 2: Qwen2's and CoPE's cases; tp = 8: Llama-2's, Qwen2-MoE's
# Llama-2's 8 KV heads split evenly at every tp: its cases other than tp=8 add nothing that
# Llama-3's (2 KV heads: repeated from tp=4), Qwen2's and CoPE's (tp=2) do not cover.
EVEN = [[1, 8]]
VOCAB = 211  # not a multiple of 2: the LM head's vocabulary is padded
FAMILIES = {
    # Llama-2 style: multi-head attention (8 KV heads)
    "llama2": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
               dict(num_key_value_heads=8), EVEN),
    # Llama-3 style: 2 KV heads, fewer than 4 or 8 devices (KV heads repeated)
    "llama3": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
               dict(num_key_value_heads=2, rope_theta=500000.0), ALL),
    # fused qkv / gate_up checkpoint tensors, a sliding window in every layer (pages given back)
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM,
             dict(num_key_value_heads=2, sliding_window=8, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2), [[2, 4]]),
    # tied embeddings (a vocabulary-split table for the lookup too), q/k/v bias
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
              dict(num_key_value_heads=4, tie_word_embeddings=True), [[2, 2]]),
    # a mixture of experts (4 experts of width 32, top-2), a shared expert (48) and a dense
    # layer, over 8 devices: every expert split 8 ways
    "qwen2-moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM,
                  dict(num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                       moe_intermediate_size=32, shared_expert_intermediate_size=48,
                       mlp_only_layers=[1]), [[1, 8]]),
}


def _flags(flag):
  """The session's XLA_FLAGS (tests/conftest.py's) and `flag`."""
  return (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()


# int8 / int4 weights on a mesh: [checkpoint, method, the LM head too, dp, tp]. Qwen2-MoE 8
# ways (experts split by column and by row: int8's per-column scales whole on each device),
# Llama-3 style over data replicas, and int4 (the LM head too) where each device's input rows
# are whole groups of 128: "wide" (hidden 256, MLP 512) at tp=2.
QUANTIZED = [["qwen2-moe", "int8", False, 1, 8], ["llama3", "int8", False, 2, 4],
             ["wide", "int4", True, 1, 2]]
WIDE = dict(hidden_size=256, intermediate_size=512)
# the draft model of speculative decoding on a mesh: one layer, 4 heads (so tp up to 4)
DRAFT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)


def _hf_checkpoint(name, path, **sizes):
  cfg_cls, model_cls, extra, _ = FAMILIES[name]
  torch.manual_seed(len(name))
  sizes = dict(dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=8), **sizes)
  hf = model_cls(cfg_cls(vocab_size=VOCAB, max_position_embeddings=128, **sizes, **extra))
  with torch.no_grad():
    for p in hf.parameters():  # larger than the default init: logits far from uniform
      p.normal_(0.0, 0.15)
  hf.save_pretrained(path, max_shard_size="100KB" if name == "llama2" else "1GB")
  return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  models = {name: [_hf_checkpoint(name, str(tmp_path_factory.mktemp(name))), fam[3]]
            for name, fam in FAMILIES.items()}
  models["cope"] = [DEFAULT_MODEL, COPE]
  paths = {"wide": _hf_checkpoint("llama3", str(tmp_path_factory.mktemp("wide")), **WIDE),
           "draft": _hf_checkpoint("llama3", str(tmp_path_factory.mktemp("draft")), **DRAFT)}
  spec = {"models": models, "interpret": ["llama3", 2, 4], "quantized": QUANTIZED,
          "paths": paths, "speculative": "draft"}
  env = {**os.environ, "XLA_FLAGS": _flags("--xla_force_host_platform_device_count=8"),
         "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
  r = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "sharded_run.py"),
                      json.dumps(spec)], capture_output=True, text=True, env=env, cwd=ROOT,
                     timeout=900)
  assert r.returncode == 0, r.stderr[-4000:]
  out = json.loads(r.stdout.split("JSON", 1)[1])
  assert out["devices"] == 8
  out["paths"] = {name: m[0] for name, m in models.items()}
  return out


CASES = [f"{name} dp={dp} tp={tp}" for name, fam in FAMILIES.items() for dp, tp in fam[3]] + [
    f"cope dp={dp} tp={tp}" for dp, tp in COPE]


@pytest.mark.parametrize("case", CASES)
def test_same_logits_and_tokens_as_one_device(run, case):
  c = run["cases"][case]
  assert c["finite"] and c["rel"] <= 1e-5, c["rel"]
  assert c["sharded"] == c["tokens"]
  assert all(len(t) == 10 for t in c["tokens"])
  assert c["embed_err"] <= 1e-5  # fdjax.embed: its own cache on the mesh


@pytest.mark.parametrize("case", CASES)
def test_each_device_holds_only_its_shard(run, case):
  c = run["cases"][case]
  tp = int(case.split("tp=")[1])
  dp = int(case.split("dp=")[1].split()[0])
  assert c["devices"] == dp * tp
  assert c["bytes"] == [c["want"]]  # every device the same: its local model, no more
  heads, kv, d = c["local"]["heads"], c["local"]["kv_heads"], c["local"]["head_dim"]
  assert len(c["wqkv"]) == 1 and c["wqkv"][0][1] == (heads + 2 * kv) * d
  assert len(c["wo"]) == 1 and c["wo"][0][0] == heads * d
  assert c["pages"] == [[kv, 4, 4, d]]  # the device's KV heads, each replica's 4 pages
  assert c["lm_head"] == [[64 if "cope" not in case else 256, -(-c["vocab"] // tp)]]
  if tp > 1:
    assert c["want"] < c["whole"] * 0.75


def test_kv_heads_are_repeated_below_tp(run):
  c = run["cases"]["qwen2-moe dp=1 tp=8"]  # 2 KV heads, 8 devices: each keeps the one it reads
  assert c["local"] == {"heads": 1, "kv_heads": 1, "head_dim": 8}
  assert run["cases"]["llama3 dp=1 tp=4"]["local"]["kv_heads"] == 1
  assert run["cases"]["llama2 dp=1 tp=8"]["local"]["kv_heads"] == 1  # 8 KV heads split evenly
  assert run["cases"]["qwen2 dp=2 tp=2"]["local"]["kv_heads"] == 2


def test_pallas_kernels_run_per_device_under_shard_map(run):
  c = run["cases"]["llama3 dp=2 tp=4"]
  assert c["interpreted"] == c["tokens"]


def test_the_serving_engine_runs_on_a_tensor_parallel_mesh(run):
  e = run["engine"]
  assert e["tokens"] == e["alone"] and all(len(t) == 7 for t in e["tokens"])
  assert e["pages_in_use"] == [0]


def test_the_serving_engine_runs_each_request_on_one_data_replica(run):
  """(dp, tp) = (2, 2), max_batch 4: six requests share the two replicas (two rows each, the
  rest wait), each on its replica's pages, the tokens one device's; a later request that
  starts like one the second replica ran goes there and reads its cached pages; every page
  is given back."""
  e = run["engine"]["dp"]
  assert e["tokens"] == e["alone"] and all(len(t) == 7 for t in e["tokens"])
  assert sorted(e["replicas"]) == [0, 0, 0, 1, 1, 1]
  assert e["later_replica"] == 1 and e["later_hits"][0] == 0 and e["later_hits"][1] >= 8
  assert e["pages_in_use"] == [0, 0]


def test_the_command_line_generates_the_same_text_on_a_mesh(run):
  one, mesh = run["cli"]["tp=1 dp=1"], run["cli"]["tp=4 dp=2"]
  assert one[0] == mesh[0] == 0
  text = "\n".join(one[1:-1])  # the prompt and the greedy continuation
  assert text == "\n".join(mesh[1:-1]) and len(text) > len("def f(x):") + 5
  assert "mesh dp=2 tp=4" in mesh[-1] and "mesh" not in one[-1]


def test_two_processes_joined_by_jax_distributed_generate_one_process_tokens(run):
  """Two processes on 127.0.0.1 (2 CPU devices each, gloo collectives) load the Llama-3
  style checkpoint onto a 4-device mesh spanning both, tp=4 and (dp, tp) = (2, 2), and
  generate greedily: the tokens of one process on one device. The serving engine refuses
  such a mesh (each process would run its own scheduler)."""
  path = run["paths"]["llama3"]
  prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7], [100, 50, 25, 12, 6]]
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  spec = json.dumps({"path": path, "prompts": prompts, "new": 8, "meshes": [[1, 4], [2, 2]]})
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "tests", "multihost_run.py"), spec],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
      env={**os.environ, "XLA_FLAGS": _flags("--xla_force_host_platform_device_count=2"),
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT,
           "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
           "JAX_PROCESS_ID": str(i)}) for i in range(2)]
  outs = []
  for p in procs:
    stdout, stderr = p.communicate(timeout=600)
    assert p.returncode == 0, stderr[-3000:]
    outs.append(json.loads(stdout.split("JSON", 1)[1]))
  import fdjax
  want = fdjax.generate(fdjax.load_pretrained(path), prompts, max_new_tokens=8,
                        page_size=4).tokens
  cfg = fdjax.load_pretrained(path).config
  for i, out in enumerate(outs):
    assert (out["process"], out["processes"], out["devices"], out["local_devices"]) == (i, 2, 4, 2)
    for dp, tp in [[1, 4], [2, 2]]:
      assert out[f"dp={dp} tp={tp}"] == want
      local = parallel.local_config(cfg, tp)
      mine = 2 * 4 * sum(int(np.prod(e.shape)) for e in layout.layout(local))  # float32
      assert out[f"dp={dp} tp={tp} bytes here"] == mine
    assert "the model's mesh spans 2 processes; serving from a multi-host" in out["serve_refused"]


def test_the_command_line_splits_a_cpu_into_the_devices_a_mesh_asks_for(run):
  """`fdjax generate --tp 2` on a CPU with no device count set: the CLI asks JAX for two CPU
  devices (fdjax.io.mesh.cpu_devices) before anything starts it, and prints the text of one
  device (sharded_run.py's, the same command)."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if "force_host_platform_device_count" not in f)
  r = subprocess.run([sys.executable, "-m", "fdjax", "generate", "def f(x):",
                      "--max-new-tokens", "12", "--temperature", "0", "--page-size", "8",
                      "--tp", "2"], capture_output=True, text=True, env=env, cwd=ROOT,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  one, two = run["cli"]["tp=1 dp=1"][1:], r.stdout.splitlines()
  assert one[:-1] == two[:-1] and len("\n".join(one[:-1])) > len("def f(x):") + 5
  assert "mesh dp=1 tp=2" in two[-1] and "mesh" not in one[-1]


def test_cpu_devices_leaves_a_started_jax_and_a_count_given_alone(monkeypatch):
  import jax
  jax.devices()  # this process's JAX has started
  before = jax.config.jax_num_cpu_devices
  assert meshes.cpu_devices(2) is False and jax.config.jax_num_cpu_devices == before
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=3")
  assert meshes.cpu_devices(2) is False and jax.config.jax_num_cpu_devices == before
  with pytest.raises(ValueError, match="n must be a positive integer"):
    meshes.cpu_devices(0)


def test_bad_meshes_are_clear_errors(run):
  e = run["errors"]
  assert "tp=8 does not divide the model's num_heads (4)" in e["tp_8_for_4_heads"]
  assert "lack ['data']" in e["axis_missing"]
  assert "tp * dp = 3 * 1 = 3 does not match the 8 devices" in e["device_count"]
  assert "must be a jax.sharding.Mesh" in e["not_a_mesh"]
  assert ("int4 on a mesh: tp=4 leaves each device 16 of model.layers.0.self_attn.o_proj."
          "weight's 64 input rows, not whole groups of 128") in e["int4_groups_cut"]


Q_CASES = [f"{name} {method} dp={dp} tp={tp}" for name, method, _, dp, tp in QUANTIZED]


@pytest.mark.parametrize("case", Q_CASES)
def test_quantized_weights_on_a_mesh_give_one_device_numbers(run, case):
  """Quantized as it loads, loaded from a checkpoint saved quantized, and an in-memory
  quantized model sharded: the same quantized model as on one device (logits within 1e-5,
  the same greedy tokens)."""
  c = run["cases"][case]
  assert c["method"] == case.split()[1]
  assert c["finite"] and all(c[k] <= 1e-5 for k in ("rel", "saved", "sharded")), c
  assert c["mesh_tokens"] == c["tokens"] and all(len(t) == 10 for t in c["tokens"])


@pytest.mark.parametrize("case", Q_CASES)
def test_each_device_holds_only_its_part_of_the_quantized_weights(run, case):
  c = run["cases"][case]
  tp = int(case.split("tp=")[1])
  assert c["devices"] == tp * int(case.split("dp=")[1].split()[0])
  assert c["bytes"] == [c["want"]]  # every device: its local quantized model, no more
  assert c["want"] < c["float_bytes"] * (0.5 if "int4" in case else 0.6)
  if "int4" in case:  # values: two rows of K per byte; the LM head is quantized too
    assert c["wo"] == [[256 // tp // 2, 256]] and c["lm_head"] == [[128, -(-VOCAB // tp)]]


def test_the_command_line_generates_int8_on_a_mesh_as_on_one_device(run):
  out = run["cli"]["int8 tp=4 dp=2"]
  assert out[0] == 0 and "int8 weights, mesh dp=2 tp=4" in out[-1]
  assert "\n".join(out[1:-1]) == run["cli"]["int8 alone"]


def test_what_each_device_takes_of_a_checkpoint():
  cfg = tiny_config(num_heads=8, num_kv_heads=2, head_dim=4, intermediate_size=24,
                    vocab_size=10, fused_checkpoint=True)
  entries = {e.param: e for e in layout.layout(cfg)}
  qkv = entries[("layers", 0, "attn", "wqkv")]
  name = qkv.names[0]  # fused: q (32 rows), k (8), v (8)
  # device 3 of 4: q heads 6, 7; both read KV head 1 (rows 4..8 of k and of v)
  assert layout.shard_pieces(qkv, cfg, 4, 3) == [(name, 0, 24, 32), (name, 0, 36, 40),
                                                 (name, 0, 44, 48)]
  gate_up = entries[("layers", 0, "mlp", "w_gate_up")]
  assert layout.shard_pieces(gate_up, cfg, 4, 1) == [(gate_up.names[0], 0, 6, 12),
                                                     (gate_up.names[0], 0, 30, 36)]
  down = entries[("layers", 0, "mlp", "w_down")]
  assert layout.shard_pieces(down, cfg, 4, 2) == [(down.names[0], 1, 12, 18)]
  assert down.split_axis == 0 and qkv.split_axis == 1
  head = entries[("lm_head",)]  # 10 words over 4 devices: 3 each, the last 1 padded
  assert layout.shard_pieces(head, cfg, 4, 3) == [("lm_head.weight", 0, 9, 12)]
  x = np.arange(20.0).reshape(10, 2)
  assert np.array_equal(meshes.padded_slice(x, x.shape, 0, 9, 12),
                        [[18.0, 19.0], [0.0, 0.0], [0.0, 0.0]])


def test_what_each_device_takes_of_a_quantized_checkpoint():
  """The values and NAME_scale slices that make a device's part of a weight saved quantized:
  output rows alike; input rows: int8's scales whole, int4's by groups of 128 (two rows per
  byte); a split that cuts an int4 group is refused."""
  cfg = tiny_config(num_heads=8, num_kv_heads=2, head_dim=32, hidden_size=256,
                    intermediate_size=512, vocab_size=10)
  entries = {e.param: e for e in layout.layout(cfg)}
  down = entries[("layers", 0, "mlp", "w_down")]
  name, scale = down.names[0], down.names[0] + layout.SCALE_SUFFIX
  rows = layout.shard_pieces(down, cfg, 2, 1)  # device 1 of 2: input rows 256..512
  assert rows == [(name, 1, 256, 512)]
  assert layout.quantized_pieces(down, rows, "int8") == ([(name, 1, 256, 512)],
                                                          [(scale, 0, 0, 256)])
  assert layout.quantized_pieces(down, rows, "int4") == ([(name, 1, 128, 256)],
                                                          [(scale, 1, 2, 4)])
  gate_up = entries[("layers", 0, "mlp", "w_gate_up")]
  cols = layout.shard_pieces(gate_up, cfg, 2, 1)  # by output rows: values and scales alike
  values, scales = layout.quantized_pieces(gate_up, cols, "int4")
  assert values == cols and scales == [(n + layout.SCALE_SUFFIX, 0, a, b) for n, _, a, b in cols]
  with pytest.raises(ValueError, match="input rows 64:128 cut int4's groups of 128"):
    layout.quantized_pieces(down, [(name, 1, 64, 128)], "int4")
  from models import quantize as quantization
  quantization.check_split(cfg, 2, quantization.Quantization("int4"))  # 128 rows each: whole
  quantization.check_split(cfg, 4, quantization.Quantization("int8"))
  with pytest.raises(ValueError, match="tp=4 leaves each device 64 of model.layers.0.self_attn"
                                       ".o_proj.weight's 256 input rows"):
    quantization.check_split(cfg, 4, quantization.Quantization("int4"))


def test_a_model_that_cannot_be_split_is_refused():
  cfg = tiny_config(num_heads=6, num_kv_heads=3, intermediate_size=80)
  with pytest.raises(ValueError, match=r"tp=4 does not divide the model's num_heads \(6\)"):
    parallel.local_config(cfg, 4)
  with pytest.raises(ValueError, match="num_kv_heads \\(3\\) is neither a multiple nor a "
                                       "divisor of tp=2"):
    parallel.local_config(tiny_config(num_heads=6, num_kv_heads=3, intermediate_size=80), 2)
  with pytest.raises(ValueError, match=r"does not divide the model's intermediate_size \(80\)"):
    parallel.local_config(tiny_config(num_heads=6, num_kv_heads=6, intermediate_size=80), 3)
  with pytest.raises(ValueError, match="tp must be a positive integer"):
    meshes.make_mesh(tp=0)
  olmo2 = tiny_config(qk_norm=True, qk_norm_whole=True, pre_norms=False, sandwich_norms=True)
  with pytest.raises(ValueError, match="tp=2 for a model whose q/k norm spans all its heads"):
    parallel.local_config(olmo2, 2)


def test_speculative_decoding_on_a_mesh_gives_plain_decoding_tokens(run):
  """Greedy, at (dp, tp) = (2, 2): n-gram drafts, and a one-device draft put on the target's
  mesh (the target itself, which drafts and keeps what it does on one device); the tokens of
  plain decoding on one device."""
  s = run["speculative"]
  for name, r in s["runs"].items():
    assert r["tokens"] == s["plain"] and r["drafted"] > 0, name
    assert all(len(t) == 10 for t in r["tokens"])
  self_draft = s["runs"]["self-draft"]
  assert [self_draft["drafted"], self_draft["accepted"]] == s["self_draft_alone"]
  assert self_draft["accepted"] > 0


def test_the_serving_engine_speculates_with_a_draft_model_on_a_mesh(run):
  """At (dp, tp) = (2, 2), the one-device target as its own draft (put on the mesh): each
  request's draft pages on its replica, like its own, so the draft proposes what the target
  picks (a draft reading another row's or replica's pages would be refused)."""
  s = run["speculative"]
  assert s["engine"] == s["alone"] and s["engine_drafted"] > 0
  assert s["engine_accepted"] == s["engine_drafted"]
  assert set(s["engine_replicas"]) == {0, 1}
  assert s["engine_pages"] == [[0, 0], [0, 0]]


def test_a_draft_that_cannot_be_split_like_the_target_is_refused(run):
  assert ("speculative: the draft model cannot be put on the target's mesh: tensor "
          "parallelism: tp=8 does not divide the model's num_heads (4)"
          in run["speculative"]["split_refused"])
