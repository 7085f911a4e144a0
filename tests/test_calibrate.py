"""Choosing phi: calibration records each layer's score range and load_pretrained uses it."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import fdjax
from fdjax.ops import dispatch
from fdjax.tuning import calibrate
from pallas_kernels.common.async_softmax import HI, LO
from tests.models_util import tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_choose_phi_centres_the_range_and_keeps_the_top_when_too_wide():
  phi = calibrate.choose_phi(-3.0, 5.0)
  assert np.isclose((phi + LO + phi + HI) / 2, 1.0)  # window centred on the range
  wide = calibrate.choose_phi(-500.0, 400.0)
  assert np.isclose(wide + HI, 400.0)  # the top stays inside


def test_calibrate_records_every_layer_and_load_uses_it(tmp_path):
  model = tiny_model(seed=1, head_dim=16, num_layers=3)
  fdjax.save_pretrained(model, tmp_path)
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  r = subprocess.run([sys.executable, "-m", "fdjax", "calibrate", "--model", str(tmp_path),
                      "--num-prompts", "2", "--prompt-len", "24"], capture_output=True,
                     text=True, env=env, cwd=ROOT, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  meta = json.loads((tmp_path / "fdjax.json").read_text())  # the checkpoint's own fdjax config
  rec = meta["calibration"]
  assert meta["softmax_phi"] == rec["phi"]
  assert len(rec["phi"]) == 3 and rec["num_prompts"] == 2
  for (lo, hi), phi in zip(rec["row_max_range"], rec["phi"]):
    assert lo <= hi and phi + LO <= lo and hi <= phi + HI
  loaded = fdjax.load_pretrained(tmp_path)
  assert loaded.config.softmax_phi == tuple(rec["phi"])
  # the recorded range is the real one: recompute layer 0's row maxima directly
  prompts = calibrate.sample_prompts(None, 97, 2, 24)
  scores = calibrate.score_ranges(loaded, prompts[0])
  assert scores.shape == (3, 2) and rec["row_max_range"][0][0] <= scores[0][0]
  # and the model generates the same with its calibrated phi through the kernels
  want = fdjax.generate(loaded, [[1, 2, 3]], max_new_tokens=3).tokens
  with dispatch.using("pallas_interpret"):
    got = fdjax.generate(loaded, [[1, 2, 3]], max_new_tokens=3).tokens
  assert got == want


def test_the_sown_score_range_is_the_attention_layers_own():
  """One layer, no position encoding: the range calibrate reads equals the row maxima of
  q.k / sqrt(D) computed here from the layer's own projections (GQA, causal)."""
  model = tiny_model(seed=3, head_dim=16, num_layers=1, position_encoding="none")
  cfg = model.config
  ids = np.asarray([[5, 9, 2, 77, 31, 8, 40]], np.int32)
  got = calibrate.score_ranges(model, ids[0].tolist())
  attn = model.layers[0].attn
  h = model.layers[0].attn_norm(model.embed[...][ids])
  qkv = np.asarray(h @ attn.wqkv[...], np.float64)[0]
  nq, nk = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  q = qkv[:, :nq].reshape(-1, cfg.num_heads, cfg.head_dim)
  k = qkv[:, nq:nq + nk].reshape(-1, cfg.num_kv_heads, cfg.head_dim)
  k = np.repeat(k, cfg.num_heads // cfg.num_kv_heads, axis=1)
  s = np.einsum("thd,shd->hts", q, k) / np.sqrt(cfg.head_dim)
  t = len(ids[0])
  s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf).max(-1)
  assert got.shape == (1, 2)
  np.testing.assert_allclose(got[0], [s.min(), s.max()], rtol=1e-4)
  assert not attn.record_scores  # switched off again


def test_calibrate_refuses_prompts_past_the_models_context():
  model = tiny_model()
  context = model.config.max_position_embeddings
  with pytest.raises(ValueError, match=f"a prompt of {context + 1} tokens is longer than the "
                                       f"model's context of {context}"):
    calibrate.calibrate(model, [[1, 2], [3] * (context + 1)])
  with pytest.raises(ValueError, match="no prompts"):
    calibrate.calibrate(model, [])
