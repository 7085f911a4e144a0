"""CoPE attention: the XLA op and the fused Pallas kernel against a straightforward float64
implementation of the paper's Appendix B formulas."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fdjax
from fdjax.ops import dispatch, kv_cache
from pallas_kernels.triton import cope_attention as ck
from tests.helpers import cuda_text, rel_err, spy
from tests.models_util import forward, tiny_model


def np_cope(q, k, v, e, lengths, scale, gate_keys=None, pos_scaled=False):
  """Loops over heads, queries and keys, exactly as Appendix B reads; with the official
  code's variants (facebookresearch/RAM projects/cope/src/cope/context_position.py) where
  asked: gates from gate_keys (the values, or keys of their own), and the position logit
  added before the scale (its default) instead of after (the appendix, its --cope-nodiv)."""
  q, k, v, e = (np.asarray(x, np.float64) for x in (q, k, v, e))
  gk = k if gate_keys is None else np.asarray(gate_keys, np.float64)
  b, t, hq, d = q.shape
  s_len, hkv = k.shape[1], k.shape[2]
  npos = e.shape[0]
  out = np.zeros((b, t, hq, d))
  for bi in range(b):
    n_valid = s_len if lengths is None else int(lengths[bi])
    for h in range(hq):
      kh, vh = k[bi, :, h // (hq // hkv)], v[bi, :, h // (hq // hkv)]
      gh = gk[bi, :, h // (hq // hkv)]
      for i in range(t):
        qi = q[bi, i, h]
        a = s_len - t + i  # the query's absolute position
        keys = [j for j in range(s_len) if j <= a and j < n_valid]
        if not keys:
          continue
        dots = {j: qi @ kh[j] for j in keys}
        g = {j: 1 / (1 + math.exp(-(qi @ gh[j]) * scale)) for j in keys}
        z = e @ qi  # z_i[n] = q_i . e[n]
        logits = []
        for j in keys:
          p = min(sum(g[m] for m in keys if m >= j), npos - 1)
          lo, hi = math.floor(p), math.ceil(p)
          w = p - lo
          zp = w * z[hi] + (1 - w) * z[lo]
          logits.append((dots[j] + zp) * scale if pos_scaled else dots[j] * scale + zp)
        logits = np.array(logits)
        pr = np.exp(logits - logits.max())
        pr /= pr.sum()
        out[bi, i, h] = pr @ vh[keys]
  return out


def _case(seed, b, t, s, hq, hkv, d, npos, q_scale=1.0, dtype=jnp.float32, lengths=None):
  """Random q, k, v, position table and lengths (drawn in [1, s] unless given)."""
  rng = np.random.default_rng(seed)
  mk = lambda shape, sc=1.0: jnp.asarray(rng.standard_normal(shape) * sc, jnp.float32).astype(dtype)
  arrays = (mk((b, t, hq, d), q_scale), mk((b, s, hkv, d)), mk((b, s, hkv, d)), mk((npos, d), 0.5))
  drawn = rng.integers(1, s + 1, b)
  return (*arrays, jnp.asarray(drawn if lengths is None else lengths, jnp.int32))


CASES = {  # name: (b, t, s, hq, hkv, d, npos, q_scale, lengths): each row's valid keys, so
    # "ragged" is ragged and a chunk's queries (the last t of s) lie inside its rows
    "prompt_gqa_ragged": (2, 21, 21, 4, 2, 16, 8, 1.0, (21, 13)),
    "decode_step_against_cache": (3, 1, 40, 4, 1, 16, 16, 1.0, (40, 17, 1)),
    "gates_near_1_positions_hit_clamp": (2, 30, 30, 2, 2, 16, 4, 30.0, (30, 23)),
    "gates_near_0_and_1_mixed": (1, 17, 17, 2, 1, 16, 64, 30.0, (17,)),
    "chunk_of_queries": (2, 5, 33, 2, 2, 16, 8, 1.0, (33, 31)),
}


@pytest.mark.parametrize("name", CASES)
def test_cope_matches_the_formulas(name):
  b, t, s, hq, hkv, d, npos, q_scale, lens = CASES[name]
  q, k, v, e, lengths = _case(len(name), b, t, s, hq, hkv, d, npos, q_scale, lengths=lens)
  want = np_cope(q, k, v, e, np.asarray(lengths), 0.3)
  got_xla = dispatch.cope_attention(q, k, v, e, lengths=lengths, sm_scale=0.3)
  assert rel_err(got_xla, want) < 1e-5
  got_kernel = dispatch.cope_attention(q, k, v, e, lengths=lengths, sm_scale=0.3,
                                       impl="pallas_interpret")
  assert rel_err(got_kernel, want) < 1e-5


VARIANTS = {  # name: (gate keys: None / "value" / "separate", position logits before the
    # scale, one of CASES)
    "official_default_logits_before_scale": (None, True, "prompt_gqa_ragged"),
    "value_gates": ("value", False, "decode_step_against_cache"),
    "separate_gate_keys": ("separate", False, "chunk_of_queries"),
    "separate_gate_keys_logits_before_scale": ("separate", True, "prompt_gqa_ragged"),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_cope_variants_match_the_formulas_in_float64(variant):
  gates, pos_scaled, name = VARIANTS[variant]
  b, t, s, hq, hkv, d, npos, _, lens = CASES[name]
  q, k, v, e, lengths = _case(len(name) + len(variant), b, t, s, hq, hkv, d, npos, 3.0,
                              lengths=lens)
  gk = {None: None, "value": v,
        "separate": jnp.asarray(np.random.default_rng(7).standard_normal(k.shape), k.dtype)}[gates]
  want = np_cope(q, k, v, e, np.asarray(lengths), 0.3, gate_keys=gk, pos_scaled=pos_scaled)
  # the variant changes the answer: it is not the appendix form by another name
  assert rel_err(np_cope(q, k, v, e, np.asarray(lengths), 0.3), want) > 1e-3
  jax.config.update("jax_enable_x64", True)
  try:
    x64 = [jnp.asarray(np.asarray(x), jnp.float64) for x in (q, k, v, e)]
    gk64 = x64[2] if gates == "value" else None if gk is None else jnp.asarray(gk, jnp.float64)
    from fdjax.ops import reference  # (dispatch takes float32 / bfloat16 / float16)
    got = reference.cope_attention(*x64, lengths, 0.3, None, gk64, 0.3 if pos_scaled else 1.0)
    assert got.dtype == jnp.float64 and rel_err(got, want) < 1e-12
  finally:
    jax.config.update("jax_enable_x64", False)
  for impl in ("xla", "pallas_interpret"):
    got = dispatch.cope_attention(q, k, v, e, lengths=lengths, sm_scale=0.3, gate_keys=gk,
                                  pos_scaled=pos_scaled, impl=impl)
    assert rel_err(got, want) < 1e-5, impl


def test_cope_case_really_reaches_the_clamp_and_saturates_gates():
  b, t, s, hq, hkv, d, npos, q_scale, lens = CASES["gates_near_1_positions_hit_clamp"]
  assert lens[0] == s  # row 0 is whole: the triangle below is all its queries and keys
  q, k, _, _, _ = _case(len("gates_near_1_positions_hit_clamp"), b, t, s, hq, hkv, d, npos,
                        q_scale)
  sc = np.einsum("bthd,bshd->bhts", np.asarray(q), np.asarray(k)) * 0.3
  gates = 0.5 * (1 + np.tanh(sc / 2))  # sigmoid, without overflow
  assert (gates > 0.999).mean() > 0.2 and (gates < 0.001).mean() > 0.2
  pos = np.flip(np.cumsum(np.flip(np.tril(gates[0, 0]), -1), -1), -1)
  assert pos.max() > npos - 1  # clamped


@pytest.mark.parametrize("separate", [False, True], ids=["key_gates", "separate_gate_keys"])
def test_cope_kernel_bfloat16(separate):
  q, k, v, e, lengths = _case(5, 2, 24, 24, 4, 2, 32, 16, 1.0, jnp.bfloat16)
  gk = (k + jnp.asarray(np.random.default_rng(4).standard_normal(k.shape), k.dtype)
        if separate else None)
  want = np_cope(*(np.asarray(x, np.float32) for x in (q, k, v, e)), np.asarray(lengths), 0.2,
                 gate_keys=None if gk is None else np.asarray(gk, np.float32),
                 pos_scaled=separate)
  out = dispatch.cope_attention(q, k, v, e, lengths=lengths, sm_scale=0.2, gate_keys=gk,
                                pos_scaled=separate, impl="pallas_interpret")
  assert out.dtype == jnp.bfloat16
  base = dispatch.cope_attention(q, k, v, e, lengths=lengths, sm_scale=0.2, gate_keys=gk,
                                 pos_scaled=separate, impl="xla")  # XLA, bf16 in/out
  err = np.max(np.abs(np.asarray(out, np.float64) - want))
  assert err <= 2 * np.max(np.abs(np.asarray(base, np.float64) - want)) + 1e-6
  assert rel_err(np.asarray(out, np.float32), want) < 1e-2


def test_gradients_flow_through_the_gates():
  """Finite differences of a scalar loss against jax.grad, for q (which moves the gates,
  the positions and the interpolation weights) and the position table."""
  jax.config.update("jax_enable_x64", True)
  try:
    q, k, v, e, lengths = _case(9, 1, 6, 6, 2, 1, 8, 4, 2.0)
    q, k, v, e = (x.astype(jnp.float64) for x in (q, k, v, e))
    from fdjax.ops import reference
    loss = jax.jit(lambda q, e: jnp.sum(reference.cope_attention(q, k, v, e, lengths, 0.5) ** 2))
    gq, ge = jax.jit(jax.grad(loss, argnums=(0, 1)))(q, e)
    rng = np.random.default_rng(0)
    for _ in range(4):
      dq = jnp.asarray(rng.standard_normal(q.shape))
      de = jnp.asarray(rng.standard_normal(e.shape))
      eps = 1e-6
      fd = (loss(q + eps * dq, e + eps * de) - loss(q - eps * dq, e - eps * de)) / (2 * eps)
      an = jnp.sum(gq * dq) + jnp.sum(ge * de)
      assert abs(float(fd - an)) <= 1e-6 * max(1.0, abs(float(an)))
    # the gates' path alone: separate gate keys reach the output only through the gates, so
    # their gradient is that path's, and it is not zero and matches finite differences
    gk = k + jnp.asarray(rng.standard_normal(k.shape))
    gate_loss = jax.jit(lambda g: jnp.sum(
        reference.cope_attention(q, k, v, e, lengths, 0.5, None, g) ** 2))
    gg = jax.grad(gate_loss)(gk)
    assert float(jnp.max(jnp.abs(gg))) > 1e-3
    dg = jnp.asarray(rng.standard_normal(gk.shape))
    fd = (gate_loss(gk + 1e-6 * dg) - gate_loss(gk - 1e-6 * dg)) / 2e-6
    an = jnp.sum(gg * dg)
    assert abs(float(fd - an)) <= 1e-6 * max(1.0, abs(float(an)))
  finally:
    jax.config.update("jax_enable_x64", False)


@pytest.mark.parametrize("variant", [
    {}, dict(cope_gates="separate", cope_pos_scaled=True), dict(cope_gates="value"),
    dict(position_encoding="cope_rope")], ids=["appendix", "separate_keys_scaled",
                                               "value_gates", "cope_rope"])
def test_model_with_cope_decodes_like_the_full_forward(monkeypatch, variant):
  model = tiny_model(seed=5, **{"position_encoding": "cope", "npos_max": 8, "head_dim": 16,
                                **variant})
  for layer in model.layers:  # a non-zero position table, so positions matter
    layer.attn.pos_emb[...] = jax.random.normal(jax.random.key(1), layer.attn.pos_emb.shape)
  rng = np.random.default_rng(2)
  seqs = rng.integers(0, 97, (2, 14)).astype(np.int32)
  lengths = np.array([6, 9], np.int32)
  full = np.asarray(forward(model, jnp.asarray(seqs)))
  cache = kv_cache.init_cache(model.config, 2, 16, jnp.float32)
  prompt = np.where(np.arange(9)[None] < lengths[:, None], seqs[:, :9], 0)
  logits, cache = nnx.jit(lambda m, *a: m(a[0], cache=a[1], lengths=a[2], last_only=True))(
      model, jnp.asarray(prompt), cache, jnp.asarray(lengths))
  assert rel_err(logits[:, 0], full[np.arange(2), lengths - 1]) < 1e-5
  step = nnx.jit(lambda m, ids, cache: m(ids, cache=cache))  # (eager: 15-20 s a variant)
  for i in range(4):
    logits, cache = step(model, jnp.asarray(seqs[np.arange(2), lengths + i][:, None]), cache)
    assert rel_err(logits[:, 0], full[np.arange(2), lengths + i]) < 1e-5
  if variant.get("cope_gates") not in (None, "separate"):
    return  # (the fused kernel's own cases cover value gates; RoPE changes no kernel input)
  want = fdjax.generate(model, [seqs[0, :6].tolist()], max_new_tokens=4).tokens
  calls = spy(monkeypatch, ck, "cope_attention")
  with dispatch.using("pallas_interpret"):
    got = fdjax.generate(model, [seqs[0, :6].tolist()], max_new_tokens=4).tokens
  assert got == want and calls  # the fused kernel ran, for the prefill and the decode steps


@pytest.mark.parametrize("args,msg", [
    (dict(gate_keys=jnp.ones((2, 9, 2, 16))), r"gate_keys must be shaped and typed as k"),
    (dict(gate_keys=jnp.ones((2, 10, 2, 16), jnp.bfloat16)), r"gate_keys must be shaped"),
    (dict(pos_scaled="yes"), "pos_scaled must be True or False"),
    (dict(pos_emb=jnp.ones((0, 16))), r"npos_max >= 1"),
    (dict(pos_emb=jnp.ones((8, 12))), "pos_emb width"),
    (dict(lengths=jnp.asarray([3, 11], jnp.int32)), r"lengths \[11\] out of range"),
    (dict(lengths=jnp.asarray([-1, 3], jnp.int32)), r"lengths \[-1\] out of range"),
])
def test_cope_bad_input(args, msg):
  q = jnp.ones((2, 4, 2, 16))
  k = jnp.ones((2, 10, 2, 16))
  kw = dict(pos_emb=jnp.ones((8, 16)), lengths=None) | args
  with pytest.raises(ValueError, match=msg):
    dispatch.cope_attention(q, k, k, kw.pop("pos_emb"), **kw)


def test_config_refuses_npos_below_one():
  with pytest.raises(ValueError, match="npos_max"):
    tiny_model(position_encoding="cope", npos_max=0)


@pytest.mark.parametrize("overrides,msg", [
    (dict(position_encoding="cope", cope_gates="query"), "unknown cope_gates 'query'"),
    (dict(position_encoding="rope", cope_gates="value"), "apply to CoPE attention"),
    (dict(position_encoding="rope", cope_pos_scaled=True), "apply to CoPE attention"),
    (dict(position_encoding="cope", cope_pos_scaled=1), "cope_pos_scaled must be true or"),
])
def test_config_refuses_bad_cope_variants(overrides, msg):
  with pytest.raises(ValueError, match=msg):
    tiny_model(**overrides)


def test_separate_gate_keys_are_a_checkpoint_tensor_and_a_cache_half(tmp_path):
  """The gate key projection saves and loads under its own name, and the cache's key pages
  are twice as wide; CoPE + RoPE differs from CoPE (the rotation reaches the scores)."""
  from fdjax.io import checkpoint
  model = tiny_model(seed=3, position_encoding="cope", cope_gates="separate", head_dim=16)
  cfg = model.config
  assert cfg.key_cache_dim == 32
  k_pages, v_pages = kv_cache.empty_pages(cfg, 3, 4, jnp.float32)
  assert k_pages[0].shape[-1] == 32 and v_pages[0].shape[-1] == 16
  checkpoint.save_pretrained(model, tmp_path)
  from safetensors.numpy import load_file
  names = load_file(str(tmp_path / "model.safetensors"))
  gate = names["model.layers.0.self_attn.cope_key_proj.weight"]
  assert gate.shape == (cfg.num_kv_heads * 16, cfg.hidden_size)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 97, (1, 12)), jnp.int32)
  loaded = checkpoint.load_pretrained(tmp_path)
  want = forward(model, ids)
  assert rel_err(forward(loaded, ids), want) < 1e-6
  rope = tiny_model(seed=3, position_encoding="cope_rope", cope_gates="separate", head_dim=16)
  assert rel_err(forward(rope, ids), want) > 1e-3


def test_cope_kernel_lowers_for_cuda():
  spec = jax.ShapeDtypeStruct
  bf = jnp.bfloat16
  text = cuda_text(jax.jit(functools.partial(ck.cope_attention, sm_scale=0.1)),
      spec((2, 300, 8, 64), bf), spec((2, 300, 2, 64), bf), spec((2, 300, 2, 64), bf),
      spec((64, 64), bf), spec((2,), jnp.int32))
  assert "fdjax_cope" in text


def _cope_pages(rng, k, v, layout, page_size=4):
  """Contiguous caches k, v [B, S, Hkv, width] as heads-major page pools and a page table:
  "own" (row b owns pages b * W .. b * W + W - 1, as generate lays them out on the CPU, so
  they are read in place) or "shuffled" (shuffled ids, and garbage past each row's keys:
  gathered)."""
  b, s, hkv, _ = k.shape
  width = s // page_size
  ids = np.arange(b * width) if layout == "own" else rng.permutation(b * width)
  table = ids.reshape(b, width)
  pages = lambda x: jnp.moveaxis(x, 2, 0).reshape(  # noqa: E731
      hkv, b * width, page_size, x.shape[-1])[:, np.argsort(ids)]
  return pages(k), pages(v), table


@pytest.mark.parametrize("gates,pos_scaled,heads,layout", [
    ("key", False, (4, 4), "own"), ("key", True, (8, 2), "shuffled"),
    ("value", False, (8, 1), "own"), ("separate", True, (4, 2), "own"),
    ("separate", False, (4, 4), "shuffled")])
def test_paged_cope_decode_matches_the_formulas(gates, pos_scaled, heads, layout):
  """A decode step of CoPE over a paged cache as the CPU runs it under "auto" (per KV head,
  pages read in place where each row owns its run, else gathered): Appendix B's loops on
  the gathered cache (the query at position lengths - 1), in float32 and in float64; gates
  saturated and positions past the clamp (q scaled up, npos_max 8)."""
  from fdjax.ops import reference
  hq, hkv = heads
  rng = np.random.default_rng(len(gates) + hq + hkv)
  b, s, d, npos = 3, 40, 16, 8
  q, k, v, e, _ = _case(hq * 7 + hkv, b, 1, s, hq, hkv, d, npos, q_scale=3.0)
  lengths = jnp.asarray([1, 23, 40], jnp.int32)  # one key, ragged, full
  gk = jnp.asarray(rng.standard_normal(k.shape), jnp.float32) if gates == "separate" else None
  keys = k if gk is None else jnp.concatenate([k, gk], -1)  # the cache's [key, gate key]
  kp, vp, table = _cope_pages(rng, keys, v, layout)
  table = np.where(np.arange(table.shape[1])[None] * 4 < np.asarray(lengths)[:, None], table,
                   2 ** 30 if layout == "own" else -3)  # garbage past each row's keys
  table = jnp.asarray(table, jnp.int32)
  assert bool(reference.rows_own_their_pages(table, lengths, kp.shape[1], 4)) == (
      layout == "own")
  want = np_cope(q, k, v, e, np.asarray(lengths), 0.3,
                 gate_keys={"key": None, "value": v, "separate": gk}[gates],
                 pos_scaled=pos_scaled)[:, 0]
  assert rel_err(np_cope(q, k, v, e, np.asarray(lengths), 0.3)[:, 0], want) > 1e-3 or (
      gates == "key" and not pos_scaled)  # a variant changes the answer
  run = jax.jit(lambda *a, impl="auto": dispatch.paged_cope_decode_attention(
      *a, sm_scale=0.3, gates=gates, pos_scaled=pos_scaled, impl=impl), static_argnames="impl")
  got = run(q[:, 0], kp, vp, table, lengths, e)
  assert got.shape == (b, hq, d) and rel_err(got, want) < 1e-5
  assert rel_err(run(q[:, 0], kp, vp, table, lengths, e, impl="xla"), want) < 1e-5
  jax.config.update("jax_enable_x64", True)
  try:
    x64 = [jnp.asarray(np.asarray(x), jnp.float64) for x in (q[:, 0], kp, vp)]
    for in_place in (False, True):
      got64 = reference.paged_cope_decode_attention(
          *x64, table, lengths, jnp.asarray(np.asarray(e), jnp.float64), 0.3, gates=gates,
          pos_scale=0.3 if pos_scaled else 1.0, in_place=in_place, weighted_sum="reduce")
      assert got64.dtype == jnp.float64 and rel_err(got64, want) < 1e-12
  finally:
    jax.config.update("jax_enable_x64", False)
  if layout == "own":  # a used entry outside the pool: the in-place view reads the row's own
    probe = table.at[2, 0].set(kv_cache.NO_PAGE)  # page, the gather clips the id
    assert rel_err(run(q[:, 0], kp, vp, probe, lengths, e)[2], want[2]) < 1e-5
    assert rel_err(run(q[:, 0], kp, vp, probe, lengths, e, impl="xla")[2], want[2]) > 1e-3


def test_paged_cope_decode_in_bfloat16_is_within_twice_the_plain_error():
  """bfloat16 pages: the error against float64 at most twice the plain XLA cope_attention's
  on the same (bfloat16) gathered cache, in place and gathered."""
  rng = np.random.default_rng(4)
  q, k, v, e, _ = _case(9, 2, 1, 32, 8, 2, 16, 8, q_scale=2.0, dtype=jnp.bfloat16)
  lengths = jnp.asarray([32, 13], jnp.int32)
  want = np_cope(q, k, v, e, np.asarray(lengths), 0.25)[:, 0]
  plain = dispatch.cope_attention(q, k, v, e, lengths=lengths, q_start=lengths - 1,
                                  sm_scale=0.25, impl="xla")[:, 0]
  for layout in ("own", "shuffled"):
    kp, vp, table = _cope_pages(rng, k, v, layout)
    got = dispatch.paged_cope_decode_attention(q[:, 0], kp, vp, jnp.asarray(table, jnp.int32),
                                               lengths, e, sm_scale=0.25)
    assert got.dtype == jnp.bfloat16
    assert rel_err(got, want) <= 2 * rel_err(plain, want) + 1e-6, layout


@pytest.mark.parametrize("args,msg", [
    (dict(gates="query"), "unknown gates 'query'"),
    (dict(gates="separate"), r"k_pages must be \[Hkv, P, page_size, 32\]"),
    (dict(v_pages=jnp.ones((2, 6, 4, 8))), r"v_pages \[Hkv, P, page_size, 16\]"),
    (dict(q=jnp.ones((2, 3, 16))), r"query heads \(3\) must be a multiple of KV heads \(2\)"),
    (dict(lengths=jnp.asarray([3, 13], jnp.int32)), r"lengths \[13\] out of range"),
    (dict(page_table=jnp.zeros((2, 3))), "page_table must be an integer"),
    (dict(pos_emb=jnp.ones((8, 12))), "pos_emb width"),
    (dict(q=jnp.ones((2, 4, 16), jnp.bfloat16)), "dtype"),
])
def test_paged_cope_decode_bad_input(args, msg):
  kw = dict(q=jnp.ones((2, 4, 16)), k_pages=jnp.ones((2, 6, 4, 16)),
            v_pages=jnp.ones((2, 6, 4, 16)), page_table=jnp.zeros((2, 3), jnp.int32),
            lengths=jnp.asarray([3, 12], jnp.int32), pos_emb=jnp.ones((8, 16))) | args
  with pytest.raises(ValueError, match=msg):
    args = [kw.pop(n) for n in ("q", "k_pages", "v_pages", "page_table", "lengths", "pos_emb")]
    dispatch.paged_cope_decode_attention(*args, **kw)
