"""The KV cache and the jitted decode loop."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fdjax
from fdjax.engine import decode_loop, steps
from fdjax.ops import kv_cache
from tests.helpers import rel_err
from tests.models_util import forward, tiny_model


@pytest.mark.parametrize("pe", ["rope", "none"])
def test_decoding_with_cache_equals_full_forward(pe):
  model = tiny_model(position_encoding=pe)
  rng = np.random.default_rng(0)
  lengths = np.array([9, 5, 13], np.int32)
  seqs = rng.integers(0, 97, (3, 20)).astype(np.int32)
  full = np.asarray(forward(model, jnp.asarray(seqs)))  # [B, 20, V], causal
  prompt = np.where(np.arange(16)[None] < lengths[:, None], seqs[:, :16], 0)
  cache = kv_cache.init_cache(model.config, 3, 32, jnp.float32)
  logits, cache = forward(model, jnp.asarray(prompt), cache=cache,
                          lengths=jnp.asarray(lengths), last_only=True)
  want = full[np.arange(3), lengths - 1]
  assert rel_err(logits[:, 0], want) < 1e-5
  step = jax.jit(lambda tok, c: model(tok, cache=c))
  for i in range(4):  # feed each row's true next tokens at its own position
    tok = seqs[np.arange(3), lengths + i][:, None]
    logits, cache = step(jnp.asarray(tok), cache)
    assert rel_err(logits[:, 0], full[np.arange(3), lengths + i]) < 1e-5
  np.testing.assert_array_equal(cache.lengths, lengths + 4)


def test_ragged_batch_rows_equal_running_alone():
  model = tiny_model(seed=3)
  rng = np.random.default_rng(5)
  prompts = [rng.integers(0, 97, n).tolist() for n in (3, 17, 1, 8, 30)]
  batch = fdjax.generate(model, prompts, max_new_tokens=12).tokens
  for p, got in zip(prompts, batch):
    assert got == fdjax.generate(model, [p], max_new_tokens=12).tokens[0]
    assert len(got) == 12


def test_similar_sizes_do_not_recompile():
  model = tiny_model(seed=4)
  fdjax.generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=5)
  before = dict(steps.TRACE_COUNT)
  fdjax.generate(model, [[7, 8, 9, 10, 11], [1]], max_new_tokens=6)  # same buckets
  assert dict(steps.TRACE_COUNT) == before
  fdjax.generate(model, [[1] * 40], max_new_tokens=5)  # a bigger prompt bucket: retraces
  assert steps.TRACE_COUNT["prefill"] == before["prefill"] + 1


def test_long_prompts_pad_to_the_next_quarter_octave():
  """steps.chunk_bucket: powers of two up to FINE_CHUNK, then quarters of an octave, so a
  chunk pads a long prompt by less than a quarter of itself; generate's whole-prompt chunk
  (a 1100-token prompt in 1280, not 2048) and the serving engine's list of chunks
  (compiled.shapes) follow it."""
  cap = 1 << 14
  got = [steps.chunk_bucket(t, cap) for t in range(1, 5000)]
  assert got == sorted(got) and all(b >= t for t, b in enumerate(got, 1))
  assert all(b == steps.pow2(t, steps.MIN_CHUNK) for t, b in enumerate(got, 1)
             if t <= steps.FINE_CHUNK)
  assert all(b - t < b / 4 for t, b in enumerate(got, 1) if t > steps.FINE_CHUNK)
  assert steps.chunk_bucket(1100, cap) == 1280 and steps.chunk_bucket(1100, 1024) == 1024
  assert steps.chunk_buckets(128) == [16, 32, 64, 128]
  assert steps.chunk_buckets(1024) == [16, 32, 64, 128, 256, 320, 384, 448, 512, 640, 768,
                                       896, 1024]
  cfg = tiny_model(seed=4).config
  cfg = type(cfg)(**{**cfg.__dict__, "max_position_embeddings": 4096})
  assert decode_loop.buckets(cfg, 1, 1100, 8).chunk == 1280
  assert decode_loop.buckets(cfg, 1, 1100, 8, prefill_chunk=512).chunk == 512


def test_eos_stops_each_row_and_is_included():
  model = tiny_model(seed=6)
  prompts = [[5, 6, 7], [9, 1, 2, 3]]
  free = fdjax.generate(model, prompts, max_new_tokens=10).tokens
  eos = free[0][3]
  stopped = fdjax.generate(model, prompts, max_new_tokens=10, eos_token_id=eos).tokens
  assert stopped[0] == free[0][:free[0].index(eos) + 1]
  cut = free[1].index(eos) + 1 if eos in free[1] else 10
  assert stopped[1] == free[1][:cut]


def test_result_has_timings():
  res = fdjax.generate(tiny_model(), [[1, 2, 3]], max_new_tokens=8)
  assert res.prompt_tokens == 3 and res.new_tokens == 8
  assert res.prefill_s > 0 and res.decode_s > 0 and res.decode_tokens_per_s > 0
  assert res.decode_steps == 7


@pytest.mark.parametrize("kwargs,msg", [
    (dict(prompts=[[1] * 250], max_new_tokens=10), "exceeds the model's context of 256"),
    (dict(prompts=[[1] * 30], max_new_tokens=10, max_cache_len=32), "longer than the cache"),
    (dict(prompts=[[1, 2], []], max_new_tokens=4), "prompt 1 is empty"),
    (dict(prompts=[], max_new_tokens=4), "non-empty list"),
    (dict(prompts=[[1, 97]], max_new_tokens=4), "token id 97 outside the vocabulary"),
    (dict(prompts=[[1, -1]], max_new_tokens=4), "token id -1 outside"),
    (dict(prompts=[[1]], max_new_tokens=0), "max_new_tokens must be a positive"),
    (dict(prompts=[[1]], max_new_tokens=3, temperature=-1.0), "temperature"),
    (dict(prompts=[[1]], max_new_tokens=3, temperature=1.0, top_p=1.5), "top_p"),
    (dict(prompts=[[1]], max_new_tokens=3, temperature=1.0, top_k=0), "top_k"),
    (dict(prompts=[1, 2, 3], max_new_tokens=3), "prompt 0 is int 1: wrap a single prompt"),
    (dict(prompts=np.ones((2, 3), np.int32), max_new_tokens=3), "lists, got ndarray"),
    (dict(prompts=[[1]], max_new_tokens=3, temperature=float("inf")), "temperature must be a "
     "finite number"),
    (dict(prompts=[[1]], max_new_tokens=3, seed=2 ** 64), "seed must be an integer in"),
    (dict(prompts=[[1]], max_new_tokens=3, eos_token_id=[2, 97]), "eos_token_id \\[2, 97\\] "
     "is outside the vocabulary"),
    (dict(prompts=[[1]], max_new_tokens=3, speculative={"method": "draft", "model": "/ckpt"}),
     "model must be a loaded model, got the path '/ckpt'"),
    # a tokenizer's eos_token (text) is not an id; "12" was read as ids 1 and 2
    (dict(prompts=[[1]], max_new_tokens=3, eos_token_id="12"), "eos_token_id must be a token "
     "id or a list of token ids, got '12'"),
    (dict(prompts=[[1]], max_new_tokens=3, eos_token_id=2.0), "eos_token_id must be a token"),
    (dict(prompts=[[1]], max_new_tokens=3, temperature=None), "temperature must be a number"),
    (dict(prompts=[[1]], max_new_tokens=3, temperature=1.0, min_p=None), "min_p must be a "
     "number"),
    (dict(prompts=[[1]], max_new_tokens=3, repetition_penalty=0), "repetition_penalty must "
     "be a finite number > 0 \\(1: off\\), got 0"),
    (dict(prompts=[[1]], max_new_tokens=3, repetition_penalty=float("nan")),
     "repetition_penalty"),
    (dict(prompts=[[1]], max_new_tokens=3, repetition_penalty="1.2"), "repetition_penalty"),
    (dict(prompts=[[1]], max_new_tokens=3, repetition_penalty=True), "repetition_penalty"),
])
def test_bad_generate_input_is_a_clear_value_error(kwargs, msg):
  model = tiny_model()
  with pytest.raises(ValueError, match=msg):
    fdjax.generate(model, **kwargs)


def test_every_bit_of_a_seed_counts_and_32_bit_seeds_draw_as_before():
  """jax.random.key keeps a seed's low 32 bits without x64: seeds 5 and 2**32 + 5 (or 5 -
  2**32) drew the same tokens. generate's key is made from all 64 (sampling.seed_key), the
  key of a seed below 2**32 unchanged."""
  import jax

  from fdjax.engine import sampling
  model = tiny_model()
  draw = lambda seed: fdjax.generate(model, [[1, 2, 3]], max_new_tokens=12, temperature=1.0,
                                     seed=seed).tokens[0]
  draws = [draw(s) for s in (5, 2 ** 32 + 5, 5 - 2 ** 32)]
  assert draws[0] != draws[1] and draws[0] != draws[2] and draws[1] != draws[2]
  for seed in (0, 5, 2 ** 32 - 1):
    assert (jax.random.key_data(sampling.seed_key(seed)) ==
            jax.random.key_data(jax.random.key(seed))).all()


def test_cli_sampling_flags_out_of_range_are_refused_not_turned_off():
  """resolve (fdjax.io.generation_config) turns top_k 0 / -1 and top_p 1 into "off"; other
  values out of range reach the sampler, which names them (`fdjax generate --top-p 1.5` ran
  with top_p off)."""
  from fdjax.io import generation_config
  got = generation_config.resolve({"top_p": 1.5, "top_k": -5}, {})
  assert got["top_p"] == 1.5 and got["top_k"] == -5
  assert generation_config.resolve({"top_p": 1.0, "top_k": -1}, {})["top_k"] is None
  model = tiny_model()
  for name, value in (("top_p", 1.5), ("top_k", -5)):
    kept = generation_config.resolve({name: value}, {}, (name,))
    with pytest.raises(ValueError, match=name):
      fdjax.generate(model, [[1]], max_new_tokens=2, temperature=1.0, **kept)


def test_numpy_integers_are_taken_where_ints_are():
  model = tiny_model()
  want = fdjax.generate(model, [[1, 2, 3]], max_new_tokens=5, page_size=16).tokens
  assert fdjax.generate(model, [np.asarray([1, 2, 3])], max_new_tokens=np.int64(5),
                        page_size=np.int32(16), seed=np.uint32(0)).tokens == want


def test_model_rejects_bad_input_ids():
  model = tiny_model()
  with pytest.raises(ValueError, match="input_ids"):
    model(jnp.ones((2, 3), jnp.float32))


def test_the_batch_1_decode_loop_is_not_one_single_threaded_kernel():
  """jax 0.11+'s XLA:CPU compiles a while loop that touches under 1 GiB a step into one
  single-threaded kernel (a call marked xla_cpu_small_call), which ran the batch-1 decode
  loop's matmuls on one core, 1.5x slower on 2 cores; fdjax's import sets the old limit
  (fdjax.runtime.keep_cpu_loops_threaded). Read from the compiled program: no timing."""
  model = tiny_model(seed=1, num_kv_heads=4)  # MHA: GQA's loop holds an op the pass refuses
  _, decode = decode_loop.lower(model, batch=1, prompt_len=8, max_new_tokens=8)
  cfg = model.config
  hlo = decode.compile().as_text()
  assert "while(" in hlo
  page = f"f32[{cfg.num_kv_heads},{decode_loop.buckets(cfg, 1, 8, 8, None, 64, None, 1).pages}," \
         f"64,{cfg.head_dim}]"
  assert page in hlo
  hoisted = [line for line in hlo.splitlines() if 'xla_cpu_small_call="true"' in line]
  assert not [line for line in hoisted if page in line]  # the loop carrying the cache


def test_an_xla_flag_is_added_once_and_a_named_setting_wins(monkeypatch):
  """fdjax.runtime.add_xla_flag: the one place the package and the tests add to XLA_FLAGS."""
  from fdjax import runtime
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_thunk_runtime=true")
  runtime.enable_command_buffers()
  runtime.enable_command_buffers()
  assert os.environ["XLA_FLAGS"] == ("--xla_cpu_use_thunk_runtime=true "
                                     + runtime.COMMAND_BUFFER_FLAG)
  runtime.keep_cpu_loops_threaded()
  assert os.environ["XLA_FLAGS"].endswith(" " + runtime.CPU_LOOP_FLAG)
  mine = "--xla_backend_extra_options=xla_cpu_small_while_loop_byte_threshold=7"
  monkeypatch.setenv("XLA_FLAGS", mine)
  runtime.keep_cpu_loops_threaded()
  assert os.environ["XLA_FLAGS"] == mine
  monkeypatch.delenv("XLA_FLAGS")
  runtime.add_xla_flag("--xla_backend_optimization_level=1", unless="optimization_level")
  assert os.environ["XLA_FLAGS"] == "--xla_backend_optimization_level=1"


def test_a_plain_model_stays_on_its_mesh_while_its_weights_are_the_same(monkeypatch):
  """generate(plain_model, mesh=) puts the model on the mesh once: the next call with the
  same weights finds it there; weights changed in between are put there again."""
  from flax import nnx
  model = tiny_model(seed=2)
  mesh = fdjax.make_mesh(tp=1, dp=1)
  placed = []
  shard = decode_loop.meshes.shard
  monkeypatch.setattr(decode_loop.meshes, "shard",
                      lambda m, mesh: placed.append(m) or shard(m, mesh))
  prompts = [[5, 9, 2, 40], [7, 1]]
  run = lambda **kw: fdjax.generate(model, prompts, max_new_tokens=6, **kw).tokens
  first, again = run(mesh=mesh), run(mesh=mesh)
  assert first == again == run() and placed == [model]
  for _, var in nnx.iter_graph(model):  # new weights: the LM head's logits negated
    if isinstance(var, nnx.Param) and var[...].shape == (48, 97):
      var[...] = -var[...]
  changed = run(mesh=mesh)
  assert changed == run() and changed != first and placed == [model, model]
  assert run(mesh=mesh) == changed and len(placed) == 2


def test_a_prefill_chunk_gathers_only_the_pages_it_reaches(monkeypatch):
  """generate's prefill attends over the pages up to each chunk's last token (a power of two
  of them, at least the chunk's), not the rows' whole runs, which hold the tokens to come as
  well; the decode steps take the whole table. Ragged prompts of 10 and 40 in chunks of 16,
  pages of 4, 100 tokens to come (runs of 64 pages): chunks over 4, 8 and 16 pages, and the
  tokens are the full forward's greedy ones."""
  from fdjax.engine import runner
  model = tiny_model(seed=4)
  widths = {"prefill": [], "decode": []}
  for name in widths:
    def spy(self, *args, _name=name, _orig=getattr(runner.Runner, name), **kw):
      cache = args[0] if _name == "prefill" else args[1]
      widths[_name].append(cache.page_table.shape[1])
      return _orig(self, *args, **kw)
    monkeypatch.setattr(runner.Runner, name, spy)
  rng = np.random.default_rng(2)
  prompts = [rng.integers(0, 97, n).tolist() for n in (10, 40)]
  out = fdjax.generate(model, prompts, max_new_tokens=100, page_size=4, prefill_chunk=16).tokens
  assert widths["prefill"] == [4, 8, 16]
  assert widths["decode"] and set(widths["decode"]) == {64}
  for p, got in zip(prompts, out):
    assert len(got) == 100
    seq = jnp.asarray([p + got])
    assert np.argmax(np.asarray(forward(model, seq))[0, len(p) - 1:-1], -1).tolist() == got
