"""Property tests (hypothesis) for the sampling filters and the linear op's shapes."""
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fdjax.engine.sampling import filter_logits
from fdjax.ops import dispatch
from tests.helpers import rel_err
from tests.models_util import compiled


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), vocab=st.integers(2, 60), top_k=st.integers(1, 70),
       top_p=st.floats(0.01, 1.0))
def test_filters_keep_exactly_the_top_k_and_the_nucleus(seed, vocab, top_k, top_p):
  logits = np.random.default_rng(seed).standard_normal(vocab).astype(np.float32) * 3
  k = min(top_k, vocab)
  kept = np.isfinite(np.asarray(compiled(filter_logits, jnp.asarray(logits)[None], k, None))[0])
  assert kept.sum() == k and set(np.flatnonzero(kept)) == set(np.argsort(-logits)[:k])
  kept = np.isfinite(np.asarray(compiled(filter_logits, jnp.asarray(logits)[None], None,
                                         top_p))[0])
  p = np.exp(logits - logits.max())
  p /= p.sum()
  order = np.argsort(-logits)
  mass_kept = p[kept].sum()
  assert kept[order[0]]                          # the best token always stays
  assert mass_kept >= min(top_p, 1.0) - 1e-5     # the nucleus holds at least p
  smallest = p[kept].min()
  assert mass_kept - smallest < top_p + 1e-5     # and no token more than it needs


@settings(max_examples=25, deadline=None)
@given(lead=st.lists(st.integers(1, 4), min_size=0, max_size=3), k=st.integers(1, 40),
       n=st.integers(1, 40), seed=st.integers(0, 1000))
def test_linear_any_leading_shape(lead, k, n, seed):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((*lead, k)).astype(np.float32)
  w = rng.standard_normal((k, n)).astype(np.float32)
  y = dispatch.linear(x, w)
  assert y.shape == (*lead, n)
  assert rel_err(y, x.astype(np.float64) @ w.astype(np.float64)) < 1e-5
