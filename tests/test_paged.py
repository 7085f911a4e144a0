"""The paged KV cache: paged decode attention (XLA and the kernel), chunked prefill into a
non-empty cache, the page pool and its prefix cache, and generate on top of them."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import fdjax
from fdjax.engine import paging
from fdjax.ops import dispatch, kv_cache, reference
from pallas_kernels.triton import decode_attention as dk
from tests.helpers import np_decode_attention, rel_err
from tests.models_util import forward, tiny_model

D = 16
PS = 16  # page size


def _paged_case(rng, hq, hkv, dtype, lengths, max_pages=4, num_pages=13, scale_q=1.0, d=D):
  """Random pages, a page table of shuffled ids with one page shared by two rows and garbage
  past each row's last page, and the same cache gathered contiguously."""
  b = len(lengths)
  mk = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32).astype(dtype)
  q = mk(b, hq, d) * scale_q
  k_pages, v_pages = mk(hkv, num_pages, PS, d), mk(hkv, num_pages, PS, d)
  ids = rng.permutation(num_pages)
  table = np.empty((b, max_pages), np.int64)
  for i in range(b):
    table[i] = ids[(i * 3) % num_pages:][:max_pages] if i else ids[:max_pages]
  table[1, 0] = table[0, 0]  # rows 0 and 1 share their first page (a shared prefix)
  for i, n in enumerate(lengths):
    used = -(-n // PS)
    table[i, used:] = rng.choice([-7, num_pages, 2 ** 30, 3], max_pages - used)  # garbage
  table = jnp.asarray(table, jnp.int32)
  n = jnp.asarray(lengths, jnp.int32)
  k_flat = reference.gather_pages(k_pages, table)  # garbage entries only past the lengths
  v_flat = reference.gather_pages(v_pages, table)
  return q, k_pages, v_pages, table, n, k_flat, v_flat


LENGTHS = [1, PS, PS + 1, 4 * PS, 37]  # one key, a page edge, past it, full, ragged


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (8, 1)])  # GQA 1, 4, 8
def test_paged_decode_equals_decode_on_the_gathered_cache(hq, hkv, dtype):
  rng = np.random.default_rng(hq * 7 + hkv)
  q, kp, vp, table, n, kf, vf = _paged_case(rng, hq, hkv, dtype, LENGTHS)
  scale = D ** -0.5
  want64 = np_decode_attention(*[np.asarray(jnp.asarray(x, jnp.float32), np.float64)
                                 for x in (q, kf, vf)], np.asarray(n), scale)
  xla = dispatch.paged_decode_attention(q, kp, vp, table, n, impl="xla")
  kern, stats = dk.paged_decode_attention(q, kp, vp, table, n, sm_scale=scale, interpret=True,
                                          settings=dk.Settings(num_splits=3), return_stats=True)
  assert kern.shape == q.shape and kern.dtype == dtype
  if dtype == jnp.float32:
    want = dispatch.decode_attention(q, kf, vf, n, impl="xla")
    assert rel_err(xla, want) < 1e-5 and rel_err(kern, want) < 1e-5
    assert rel_err(kern, want64) < 1e-5 and rel_err(xla, want64) < 1e-5
    assert int(stats["recomputed_rows"]) == 0
  else:
    naive = reference.decode_attention(q, kf, vf, n, scale, plain=True)
    base = np.max(np.abs(np.asarray(naive, np.float64) - want64))
    for got in (xla, kern):
      assert np.all(np.isfinite(np.asarray(got, np.float32)))
      assert np.max(np.abs(np.asarray(got, np.float64) - want64)) <= 2 * base + 1e-6


@pytest.mark.parametrize("dtype,heads,window", [(jnp.float32, (8, 2), 20),
                                                (jnp.bfloat16, (4, 4), 9)])
def test_paged_decode_with_a_window_needs_no_page_before_it(dtype, heads, window):
  """Pages wholly before each row's window given back (NO_PAGE in the table): the kernel
  and the XLA path still give the windowed attention of the contiguous cache; the kernel
  does not even read those pages (filled with NaN, they change nothing)."""
  rng = np.random.default_rng(window)
  q, kp, vp, table, n, kf, vf = _paged_case(rng, *heads, dtype, LENGTHS)
  gone = np.zeros(table.shape, bool)
  for i, length in enumerate(LENGTHS):
    gone[i, :max(0, length - window) // PS] = True  # pages wholly before the window
  assert gone.sum() >= 2
  nan_pages = np.unique(np.asarray(table)[gone])
  nan_pages = nan_pages[~np.isin(nan_pages, np.asarray(table)[~gone])]  # not still in use
  assert nan_pages.size
  table = jnp.where(jnp.asarray(gone), kv_cache.NO_PAGE, table)
  scale = D ** -0.5
  want = np_decode_attention(*[np.asarray(jnp.asarray(x, jnp.float32), np.float64)
                               for x in (q, kf, vf)], np.asarray(n), scale, window)
  xla = dispatch.paged_decode_attention(q, kp, vp, table, n, window=window, impl="xla")
  kp, vp = (x.at[:, nan_pages].set(jnp.nan) for x in (kp, vp))
  kern = dk.paged_decode_attention(q, kp, vp, table, n, sm_scale=scale, window=window,
                                   interpret=True, settings=dk.Settings(num_splits=2))
  if dtype == jnp.float32:
    assert rel_err(kern, want) < 1e-5 and rel_err(xla, want) < 1e-5
  else:
    naive = reference.decode_attention(q, kf, vf, n, scale, window=window, plain=True)
    base = np.max(np.abs(np.asarray(naive, np.float64) - want))
    for got in (kern, xla):
      assert np.all(np.isfinite(np.asarray(got, np.float32)))
      assert np.max(np.abs(np.asarray(got, np.float64) - want)) <= 2 * base + 1e-6


@pytest.mark.parametrize("case", ["scores_x1e4", "phi_far_too_low"])
def test_paged_decode_guard_recomputes_and_stays_finite(case, guard_form):
  rng = np.random.default_rng(3)
  q, kp, vp, table, n, kf, vf = _paged_case(rng, 8, 2, jnp.float32, LENGTHS,
                                            scale_q=1e4 if case == "scores_x1e4" else 1.0)
  out, stats = dk.paged_decode_attention(q, kp, vp, table, n, sm_scale=D ** -0.5,
                                         phi=-1e4 if case == "phi_far_too_low" else None,
                                         interpret=True, return_stats=True)
  assert np.all(np.isfinite(np.asarray(out)))
  assert rel_err(out, reference.decode_attention(q, kf, vf, n, D ** -0.5)) < 1e-5
  assert int(stats["recomputed_rows"]) > 0


def test_paged_decode_refuses_bad_input():
  rng = np.random.default_rng(4)
  q, kp, vp, table, n, _, _ = _paged_case(rng, 4, 2, jnp.float32, [3, 5])
  with pytest.raises(ValueError, match=r"lengths \[0\] out of range \[1, 64\]"):
    dispatch.paged_decode_attention(q, kp, vp, table, jnp.asarray([0, 5]))
  with pytest.raises(ValueError, match="lengths .65. out of range"):
    dispatch.paged_decode_attention(q, kp, vp, table, jnp.asarray([65, 5]))
  with pytest.raises(ValueError, match="page_table must be an integer"):
    dispatch.paged_decode_attention(q, kp, vp, table.astype(jnp.float32), n)
  with pytest.raises(ValueError, match="page_table must be an integer"):
    dispatch.paged_decode_attention(q, kp, vp, table[:1], n)
  with pytest.raises(ValueError, match="page size 24 is not a multiple of 16|divisible by 16"):
    dk.paged_decode_attention(q, kp[:, :, :12].repeat(2, 2), vp[:, :, :12].repeat(2, 2), table,
                              n, sm_scale=0.25, interpret=True)


def _own_runs(rng, hq, hkv, dtype, lengths, width=4):
  """Random pages in a pool of rows x width, row b owning pages b * width .. + width - 1 (in
  order), with garbage ids in the entries past each row's keys."""
  b = len(lengths)

  def mk(*s):
    return jnp.asarray(rng.standard_normal(s), jnp.float32).astype(dtype)

  q, kp, vp = mk(b, hq, D), mk(hkv, b * width, PS, D), mk(hkv, b * width, PS, D)
  table = np.arange(b * width).reshape(b, width)
  for i, n in enumerate(lengths):
    used = -(-n // PS)
    table[i, used:] = rng.choice([-7, b * width, 2 ** 30, 0], width - used)
  return q, kp, vp, jnp.asarray(table, jnp.int32), jnp.asarray(lengths, jnp.int32)


def test_which_rows_own_their_pages():
  own = np.arange(12).reshape(3, 4)
  n = jnp.asarray([64, 17, 1])  # 4, 2 and 1 pages used
  check = lambda t, lengths=n, p=12: bool(reference.rows_own_their_pages(  # noqa: E731
      jnp.asarray(t, jnp.int32), lengths, p, PS))
  assert check(own)
  past = own.copy()
  past[1, 2:], past[2, 1:] = [5, kv_cache.NO_PAGE], [3, -1, 0]  # only past the keys
  assert check(past)
  swapped = own.copy()
  swapped[0, [1, 2]] = swapped[0, [2, 1]]
  assert not check(swapped)
  other = own.copy()
  other[1, 1] = 9  # a used entry holding another row's page
  assert not check(other)
  assert not check(past, jnp.asarray([64, 17, 20]))  # row 2 now reads page 3 (not its 9)
  gone = own.copy()
  gone[0, 0] = kv_cache.NO_PAGE  # given back before a window: never read
  assert check(gone)


@pytest.mark.parametrize("dtype,heads,window,softcap", [(jnp.float32, (8, 2), None, None),
                                                         (jnp.float32, (4, 4), 20, 30.0),
                                                         (jnp.bfloat16, (8, 1), None, None)])
def test_pages_read_in_place_give_the_gathered_attention(dtype, heads, window, softcap):
  """"auto" on the CPU reads a row that owns its consecutive pages in place: the same
  result as the gathered copy, and where rows do not own theirs (shuffled ids, a shared
  page) it gathers."""
  rng = np.random.default_rng(11)
  q, kp, vp, table, n = _own_runs(rng, *heads, dtype, LENGTHS)
  scale = D ** -0.5
  assert bool(reference.rows_own_their_pages(table, n, kp.shape[1], PS))
  gathered = reference.paged_decode_attention(q, kp, vp, table, n, scale, window=window,
                                              softcap=softcap)
  auto = jax.jit(lambda *a: dispatch.paged_decode_attention(*a, window=window,
                                                            softcap=softcap))
  got = auto(q, kp, vp, table, n)
  assert got.dtype == dtype
  tol = 1e-6 if dtype == jnp.float32 else 1e-2
  assert rel_err(got, gathered) < tol
  # A used entry outside the pool shows which path ran: the gather clips it to the last
  # page, the in-place view reads the row's own.
  probe = table.at[0, 0].set(kv_cache.NO_PAGE)
  own_page = reference.paged_decode_attention(q, kp, vp, table, n, scale, window=window,
                                              softcap=softcap, in_place=True)
  assert rel_err(auto(q, kp, vp, probe, n)[0], own_page[0]) < tol
  clipped = reference.paged_decode_attention(q, kp, vp, probe, n, scale, window=window,
                                             softcap=softcap)
  assert rel_err(clipped[0], own_page[0]) > 10 * tol
  # Shuffled pages and a shared one: gathered, as the reference does
  q, kp, vp, table, n, kf, vf = _paged_case(rng, *heads, dtype, LENGTHS, num_pages=20)
  got = auto(q, kp[:, :20], vp[:, :20], table, n)
  want = dispatch.decode_attention(q, kf, vf, n, window=window, softcap=softcap, impl="xla")
  assert rel_err(got, want) < tol


def test_generate_on_the_cpu_gives_each_row_its_own_run_of_pages(monkeypatch):
  """A ragged batch on the CPU: each row owns its table's width of consecutive pages (so its
  attention reads them in place), with the same tokens as the gathered XLA path."""
  from fdjax.engine import decode_loop
  tables = []
  real = decode_loop._Pages.table

  def table_kept(self, *a, **k):
    out = real(self, *a, **k)
    tables.append(np.asarray(out))  # (the device array is donated to the step)
    return out

  monkeypatch.setattr(decode_loop._Pages, "table", table_kept)
  model = _model("rope")
  prompts = [list(range(3, 40)), [5, 9], list(range(60, 79))]  # 37, 2 and 19 tokens
  got = fdjax.generate(model, prompts, max_new_tokens=9, page_size=16).tokens
  table = tables[-1]
  width = table.shape[1]
  assert np.array_equal(table[:3], np.arange(3 * width).reshape(3, width))
  with dispatch.using("xla"):  # the plain reference: pages as each row needs them, gathered
    tables.clear()
    assert fdjax.generate(model, prompts, max_new_tokens=9, page_size=16).tokens == got
  assert not np.array_equal(tables[-1][:3], table[:3])


@pytest.mark.parametrize("pe", ["rope", "cope"])
def test_a_bfloat16_model_keeps_float32_pages_on_the_cpu(monkeypatch, pe):
  """selection.cpu_kv_cache: on the CPU a bf16 model's pages read in place (generate's own
  runs, CoPE's too) are float32 (the same values, read with no converted copy), gathered ones
  (the engine's pool) bf16. A decode step attends in its cache's dtype (queries and the CoPE
  table cast to it), with the logits a bf16 cache gives; a chunk narrows the pages it
  gathers back to the model's dtype (exact) and attends in it, with a bf16 cache's very
  logits; the same greedy tokens."""
  from fdjax.ops import selection
  model = tiny_model(seed=11, dtype=jnp.bfloat16, position_encoding=pe, head_dim=16)
  if pe == "cope":
    for layer in model.layers:
      layer.attn.pos_emb[...] = jax.random.normal(jax.random.key(1), layer.attn.pos_emb.shape,
                                                  jnp.bfloat16)
  assert paging.KVStore.for_model(model, 4, 16, in_place=True).dtype == jnp.float32
  assert paging.KVStore.for_model(model, 4, 16).dtype == jnp.bfloat16  # gathered pages
  with dispatch.using("xla"):  # the plain reference keeps the model's dtype
    assert paging.KVStore.for_model(model, 4, 16, in_place=True).dtype == jnp.bfloat16
  described = selection.describe(model.config, platform="cpu", dtype="bfloat16")
  assert "read in place are float32" in described["kv_cache"]
  decode_op = "paged_cope_decode_attention" if pe == "cope" else "paged_decode_attention"
  assert "multiply + sum" in described[decode_op]
  assert "float32" not in selection.describe(platform="cpu", dtype="float16")["kv_cache"]

  rng = np.random.default_rng(8)
  ids = jnp.asarray(rng.integers(0, 97, (2, 12)), jnp.int32)
  lengths = jnp.asarray([12, 7], jnp.int32)
  logits = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    cache = kv_cache.init_cache(model.config, 2, 32, dtype, page_size=16)
    first, cache = forward(model, ids, cache=cache, lengths=lengths)  # prefill: gathered cache
    step, cache = forward(model, ids[:, :1], cache=cache, lengths=jnp.ones(2, jnp.int32))
    assert cache.k[0].dtype == dtype
    logits[dtype] = [np.asarray(first[0]), np.asarray(first[1, :7]), np.asarray(step)]
  for got, want in zip(logits[jnp.float32], logits[jnp.bfloat16]):
    assert np.isfinite(got).all() and rel_err(got, want) < 1e-2

  made = []
  real = paging.KVStore.for_model.__func__
  monkeypatch.setattr(paging.KVStore, "for_model", classmethod(
      lambda cls, *a, **k: made.append(real(cls, *a, **k)) or made[-1]))
  prompts = [list(range(3, 30)), [5, 9], list(range(60, 79))]
  got = fdjax.generate(model, prompts, max_new_tokens=8, page_size=16).tokens
  assert [kv.dtype for kv in made] == [jnp.float32]
  with dispatch.using("xla"):
    assert fdjax.generate(model, prompts, max_new_tokens=8, page_size=16).tokens == got
  assert made[-1].dtype == jnp.bfloat16


@pytest.mark.parametrize("pe", ["rope", "cope"])
def test_a_chunk_over_wider_pages_attends_in_the_models_dtype(monkeypatch, pe):
  """A bf16 model's chunk over float32 pages (values the model wrote) attends in bfloat16,
  as over bf16 pages: the same logits to the bit, in cpu_attention's blocks too, where the
  weights meet V in the input's dtype (float32 pages there took its float32 form)."""
  from fdjax.ops import selection
  monkeypatch.setattr(selection, "CPU_PREFILL_MIN_QUERIES", 1)
  monkeypatch.setattr(selection, "CPU_PREFILL_CACHED_QUERIES", 0)  # the blocks at any size
  model = tiny_model(seed=3, dtype=jnp.bfloat16, position_encoding=pe, head_dim=16)
  ids = jnp.asarray(np.random.default_rng(2).integers(0, 97, (2, 20)), jnp.int32)
  lengths = jnp.asarray([20, 13], jnp.int32)
  got = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    cache = kv_cache.init_cache(model.config, 2, 64, dtype, page_size=16)
    _, cache = forward(model, ids[:, :9], cache=cache, lengths=jnp.asarray([9, 6], jnp.int32))
    logits, _ = forward(model, ids[:, 9:], cache=cache, lengths=lengths - jnp.asarray([9, 6]))
    got[dtype] = np.asarray(logits)
  assert np.isfinite(got[jnp.bfloat16]).all()
  np.testing.assert_array_equal(got[jnp.float32], got[jnp.bfloat16])


def test_a_cache_narrower_than_the_model_is_refused():
  model = _model("rope")  # float32
  cache = kv_cache.init_cache(model.config, 1, 32, jnp.bfloat16, page_size=16)
  with pytest.raises(ValueError, match="bfloat16 for a float32 model.*model's or wider"):
    model(jnp.ones((1, 4), jnp.int32), cache=cache)
  half = tiny_model(seed=11, dtype=jnp.float16, head_dim=16)  # as wide, another precision
  cache = kv_cache.init_cache(half.config, 1, 32, jnp.bfloat16, page_size=16)
  with pytest.raises(ValueError, match="bfloat16 for a float16 model"):
    half(jnp.ones((1, 4), jnp.int32), cache=cache)


def test_a_store_of_wider_pages_serves_its_model_under_any_impl():
  model = tiny_model(seed=11, dtype=jnp.bfloat16, head_dim=16)
  kv = paging.KVStore.for_model(model, 8, 16, in_place=True)  # float32 on the CPU
  prompts = [[5, 6, 7, 8], [9, 10]]
  got = fdjax.generate(model, prompts, max_new_tokens=4, kv=kv).tokens
  with dispatch.using("xla"):
    assert fdjax.generate(model, prompts, max_new_tokens=4, kv=kv).tokens == got
  with pytest.raises(ValueError, match="made for another model"):
    fdjax.generate(tiny_model(seed=11, head_dim=16), prompts, max_new_tokens=4,
                   kv=paging.KVStore.for_model(model, 8, 16))  # bf16 pages, float32 model


# ------------------------------------------------------------------- chunked prefill

@pytest.mark.parametrize("impl", ["xla", "pallas_interpret"])
def test_prefill_chunk_after_cached_keys_equals_the_whole_prompt(impl):
  rng = np.random.default_rng(5)
  b, s, hq, hkv = 2, 40, 4, 2
  mk = lambda *sh: jnp.asarray(rng.standard_normal(sh), jnp.float32)
  q, k, v = mk(b, s, hq, D), mk(b, s, hkv, D), mk(b, s, hkv, D)
  full = dispatch.prefill_attention(q, k, v, impl="xla")
  start = jnp.asarray([9, 30], jnp.int32)  # rows continue from different cached lengths
  qs = jnp.stack([q[0, 9:19], q[1, 30:40]])
  got = dispatch.prefill_attention(qs, k, v, lengths=start + 10, q_start=start, impl=impl)
  assert rel_err(got[0], full[0, 9:19]) < 1e-5 and rel_err(got[1], full[1, 30:40]) < 1e-5
  e = mk(8, D)
  full_c = dispatch.cope_attention(q, k, v, e, impl="xla")
  got_c = dispatch.cope_attention(qs, k, v, e, lengths=start + 10, q_start=start, impl=impl)
  assert rel_err(got_c[0], full_c[0, 9:19]) < 1e-5 and rel_err(got_c[1], full_c[1, 30:40]) < 1e-5


def _model(pe):
  model = tiny_model(seed=11, position_encoding=pe, head_dim=16)
  if pe == "cope":  # the tables start at zero: make the positions matter
    for layer in model.layers:
      layer.attn.pos_emb[...] = jax.random.normal(jax.random.key(1), layer.attn.pos_emb.shape)
  return model


@pytest.mark.parametrize("pe", ["rope", "cope"])
def test_chunked_prefill_gives_the_full_forward_logits(pe):
  model = _model(pe)
  rng = np.random.default_rng(6)
  t = 23
  ids = rng.integers(0, 97, (2, t)).astype(np.int32)
  lengths = np.array([t, 17], np.int32)
  full = np.asarray(forward(model, jnp.asarray(ids)))
  step = nnx.jit(lambda m, piece, cache, n: m(piece, cache=cache, lengths=n))  # (eager: 30 s)
  for chunk in (1, 7, t):
    cache = kv_cache.init_cache(model.config, 2, 32, jnp.float32, page_size=16)
    got = []
    for c in range(0, t, chunk):
      n = np.clip(lengths - c, 0, chunk).astype(np.int32)
      piece = np.zeros((2, chunk), np.int32)
      piece[:, :ids[:, c:c + chunk].shape[1]] = ids[:, c:c + chunk]
      logits, cache = step(model, jnp.asarray(piece), cache, jnp.asarray(n))
      got.append(np.asarray(logits))
    got = np.concatenate(got, axis=1)
    for row in range(2):
      assert rel_err(got[row, :lengths[row]], full[row, :lengths[row]]) < 1e-5, (chunk, row)
    np.testing.assert_array_equal(cache.lengths, lengths)


@pytest.mark.parametrize("pe", ["rope", "cope"])
def test_generate_is_the_same_whatever_the_pages_and_chunks(pe):
  model = _model(pe)
  prompts = [list(range(3, 40)), [5, 9], list(range(60, 79))]
  want = fdjax.generate(model, prompts, max_new_tokens=9).tokens
  for page_size, chunk in [(16, 1), (16, 7), (32, None), (64, 5)]:
    assert fdjax.generate(model, prompts, max_new_tokens=9, page_size=page_size,
                          prefill_chunk=chunk).tokens == want, (page_size, chunk)


# -------------------------------------------------------------------- prefix cache

def test_a_shared_prefix_is_not_recomputed_and_changes_nothing():
  model = _model("rope")
  rng = np.random.default_rng(7)
  system = rng.integers(0, 97, 3 * PS).tolist()  # three full pages
  first, second = system + [1, 2, 3], system + rng.integers(0, 97, 10).tolist()
  kv = paging.KVStore.for_model(model, num_pages=16, page_size=PS)
  fdjax.generate(model, [first], max_new_tokens=4, kv=kv)
  assert kv.pool.prefix_hit_tokens == 0
  got = fdjax.generate(model, [second], max_new_tokens=6, kv=kv).tokens
  assert kv.pool.prefix_hit_tokens == 3 * PS  # only the last 10 tokens were prefilled
  assert got == fdjax.generate(model, [second], max_new_tokens=6).tokens
  kv.pool.check()
  assert kv.pool.pages_in_use == 0


def test_a_continued_conversation_reuses_what_it_generated():
  model = _model("cope")
  kv = paging.KVStore.for_model(model, num_pages=8, page_size=PS)
  prompt = list(range(1, 30))
  reply = fdjax.generate(model, [prompt], max_new_tokens=12, kv=kv).tokens[0]
  follow = prompt + reply + [7, 7, 7]
  got = fdjax.generate(model, [follow], max_new_tokens=5, kv=kv).tokens
  assert kv.pool.prefix_hit_tokens == 2 * PS  # 40 tokens written: two full pages
  assert got == fdjax.generate(model, [follow], max_new_tokens=5).tokens


def test_running_out_of_pages_is_a_clear_error_and_leaks_nothing():
  model = _model("rope")
  kv = paging.KVStore.for_model(model, num_pages=3, page_size=PS)
  with pytest.raises(paging.PoolExhausted, match="needs 4 more pages; 3 of 3"):
    fdjax.generate(model, [list(range(40))], max_new_tokens=20, kv=kv)
  with pytest.raises(paging.PoolExhausted, match=r"needs \d+ more pages; \d+ of 3 are"):
    fdjax.generate(model, [[1] * 20, [2] * 20], max_new_tokens=10, kv=kv)
  kv.pool.check()
  assert kv.pool.pages_available == 3
  with pytest.raises(ValueError, match="made for another model"):
    fdjax.generate(tiny_model(seed=1), [[1]], max_new_tokens=2, kv=kv)


def test_pages_before_a_window_are_given_back_and_never_cached():
  pool = paging.PagePool(6, 4)
  pages, _ = pool.allocate(list(range(5)), 1)  # lazily: one page now
  assert len(pages) == 1
  pool.grow(pages, 14)
  assert len(pages) == 4 and pool.pages_available == 2
  assert pool.drop_leading(pages, 2) == 2 and pages[:2] == [kv_cache.NO_PAGE] * 2
  assert pool.drop_leading(pages, 3) == 1  # the first two are gone already
  pool.grow(pages, 24)  # pages 4 and 5 of the sequence, from the ones given back
  assert len(pages) == 6 and pool.pages_available == 3
  with pytest.raises(paging.PoolExhausted, match="growing to 44 tokens needs 5 more pages; "
                     "3 of 6"):
    pool.grow(pages, 44)
  pool.finish(pages, list(range(24)))  # its first page is gone: no prefix is cached
  assert not pool.cached and pool.pages_available == 6
  pool.check()


def test_a_windowed_model_generates_far_past_its_pool():
  """Window 16, pages of 4, a pool of 7 pages (28 tokens): 200-token sequences, ragged, in
  chunks; tokens equal the whole sequence's own greedy choices, and the pool ends whole."""
  model = tiny_model(seed=12, head_dim=16, sliding_window=16)
  assert model.config.windowed == 16
  kv = paging.KVStore.for_model(model, num_pages=2 * 7, page_size=4)
  prompts = [list(range(1, 40)), [3, 1, 4]]
  out = fdjax.generate(model, prompts, max_new_tokens=160, kv=kv, prefill_chunk=8).tokens
  for p, got in zip(prompts, out):
    seq = jnp.asarray([p + got])
    assert np.argmax(np.asarray(forward(model, seq))[0, len(p) - 1:-1], -1).tolist() == got
  kv.pool.check()
  assert kv.pool.pages_available == kv.pool.num_pages
  small = paging.KVStore.for_model(model, num_pages=5, page_size=4)
  with pytest.raises(paging.PoolExhausted,  # a window's worth of pages per row is needed
                     match=r"needs \d+ more pages; \d+ of 5 are available"):
    fdjax.generate(model, prompts, max_new_tokens=20, kv=small)
  small.pool.check()  # it failed midway: its pages are back, its pools still usable
  assert small.pool.pages_available == 5
  assert fdjax.generate(model, [[3, 1, 4]], max_new_tokens=4, kv=small).tokens == [out[1][:4]]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["start", "end", "cancel", "window"]),
                          st.integers(0, 3), st.integers(1, 70)), max_size=40))
def test_page_pool_never_leaks_nor_double_books(ops):
  """Sequences start (sharing prompt prefixes drawn from 4 families), end (their pages
  enter the prefix cache), are cancelled, or move on under a sliding window (grow, give back
  their first pages); afterwards every page is back in the pool, and meanwhile no page is
  held by two sequences unless it is a cached prefix page."""
  pool = paging.PagePool(24, 8)
  families = [list(range(f * 100, f * 100 + 80)) for f in range(4)]
  live = []
  for op, family, length in ops:
    if op == "window" and live:  # a windowed sequence moves on: grows, gives back its head
      pages, prompt = live[family % len(live)]
      try:
        pool.grow(pages, len(pages) * 8 + length % 9)
      except paging.PoolExhausted:
        pass
      pool.drop_leading(pages, length % 4)
    elif op == "start":
      prompt = families[family][:length]
      try:
        pages, cached = pool.allocate(prompt, length + 5)
      except paging.PoolExhausted:
        continue
      assert cached % 8 == 0 and cached < length
      live.append((pages, prompt))
    elif live:
      pages, prompt = live.pop(family % len(live))
      if op == "end":
        pool.finish(pages, prompt)
      else:
        pool.release(pages)
    pool.check()
    owners = {}
    for pages, _ in live:
      for p in pages:
        if p != kv_cache.NO_PAGE:
          owners[p] = owners.get(p, 0) + 1
    for p, count in owners.items():
      assert count == pool.refs[p]
      assert count == 1 or p in pool.key_of  # shared only as a cached prefix page
  for pages, _ in live:
    pool.release(pages)
  pool.check()
  assert pool.pages_in_use == 0 and pool.pages_available == 24
