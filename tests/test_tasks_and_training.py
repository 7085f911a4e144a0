"""The synthetic tasks' generators, training with optax, and the train -> save -> load ->
generate round trip."""
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fdjax
from fdjax.training import data, tasks, train
from models import ModelConfig, Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_flipflop_reads_repeat_the_last_write():
  t = tasks.get("flipflop")
  rng = np.random.default_rng(0)
  ids, mask = t.sample(rng, 50, "id")
  reads = 0
  for row, m in zip(ids, mask):
    last = None
    for i in range(0, len(row), 2):
      if row[i] == tasks.FF_W:
        last = row[i + 1]
      if row[i] == tasks.FF_R:
        assert row[i + 1] == last and m[i] == 1
        reads += 1
    assert m.sum() == (row[::2] == tasks.FF_R).sum()
  assert reads > 50
  ood, _ = t.sample(rng, 50, "ood_sparse")
  assert (ood[:, ::2] == tasks.FF_I).mean() > (ids[:, ::2] == tasks.FF_I).mean() + 0.1
  dense, _ = t.sample(rng, 50, "ood_dense")
  assert (dense[:, ::2] == tasks.FF_I).mean() < 0.2 < (ids[:, ::2] == tasks.FF_I).mean() - 0.4


def test_selective_copy_answers_are_the_data_in_order():
  t = tasks.get("selective_copy")
  rng = np.random.default_rng(1)
  for split, blanks in t.splits.items():
    ids, mask = t.sample(rng, 20, split)
    sep = t.to_copy + blanks
    for row in ids:
      data_tokens = row[:sep][row[:sep] != t.BLANK]
      assert row[sep] == t.SEP and list(row[sep + 1:]) == list(data_tokens)
      assert (row[:sep] == t.BLANK).sum() == blanks
    assert mask[:, sep:].all() and not mask[:, :sep].any()


def test_counting_answer_is_the_count_since_the_last_reset():
  for variables in (1, 3, 5):
    t = tasks.get("counting", variables)
    rng = np.random.default_rng(variables)
    ids, mask = t.sample(rng, 30, "id")
    assert mask[:, -1].all() and mask.sum() == 30
    for row in ids:
      toks = list(row)
      asked = toks[-3]
      count = 0
      for i, tok in enumerate(toks[:-4]):
        if tok == asked and toks[i + 1] == t.EQ:
          count = 0
        if tok == asked and toks[i + 1] == t.INC:
          count += 1
      assert toks[-1] == t.NUM0 + count
    long, _ = t.sample(rng, 2, "ood_long")
    assert long.shape[1] > ids.shape[1]


def test_training_lowers_the_loss_on_a_task():
  t = tasks.get("flipflop")
  cfg = ModelConfig(vocab_size=t.vocab_size, hidden_size=32, intermediate_size=64, num_layers=1,
                    num_heads=2, num_kv_heads=2, head_dim=16, position_encoding="cope",
                    npos_max=16, max_position_embeddings=128)
  model = Transformer(cfg, rngs=nnx.Rngs(0), dtype=jnp.float32)
  batch = lambda rng: t.sample(rng, 16, "id")
  before = train.evaluate(model, batch, 2)
  hist = train.train(model, batch, train.TrainConfig(steps=60, lr=1e-2, warmup=5,
                                                     eval_every=1000, progress=False))
  after = train.evaluate(model, batch, 2)
  assert after < before - 0.1, (before, after)
  assert hist[-1]["step"] == 60 and np.isfinite(hist[-1]["loss"])
  assert 0.0 <= train.task_error(model, t, "id", n=32) <= 1.0


def test_byte_batches_and_split():
  files = data.stdlib_files()
  tr, te = data.split_files(files)
  assert te and tr and not set(tr) & set(te)
  batch = data.byte_batches(data.read_bytes(te[:3]), 4, 32)
  ids, mask = batch(np.random.default_rng(0))
  assert ids.shape == (4, 33) and mask.shape == (4, 32) and ids.max() < 256


@pytest.mark.parametrize("field,value,msg", [
    ("lr", -0.01, "lr must be a finite number above 0"), ("lr", float("nan"), "lr must"),
    ("weight_decay", -1.0, "weight_decay must be a finite number at least 0"),
    ("clip", 0.0, "clip must be a finite number above 0"),
    ("warmup", -5, "warmup must be an integer >= 0"), ("warmup", 2.5, "warmup must")])
def test_bad_training_settings_are_refused_by_name(field, value, msg):
  with pytest.raises(ValueError, match=msg):
    train.TrainConfig(**{field: value})


def test_files_with_no_usable_held_out_split_train_on_all_and_say_so(tmp_path, capsys):
  # d/f5.txt is the one file and falls in the held-out bucket; d/f36.txt (5 bytes) is held
  # out beside a training file: both refused ("data has 0 / 5 bytes"); and one training file
  # was evaluated on itself and reported as held_out_loss
  (tmp_path / "d").mkdir()
  rng = np.random.default_rng(0)
  big = bytes(rng.integers(32, 127, 6000).astype(np.uint8))
  for name, size in (("f5.txt", 6000), ("f36.txt", 5), ("f1.txt", 6000)):
    (tmp_path / "d" / name).write_bytes(big[:size])
  held = lambda *names: data.split_files([str(tmp_path / "d" / n) for n in names])[1]
  assert len(held("f5.txt")) == 1 and len(held("f36.txt", "f1.txt")) == 1
  assert held("f1.txt") == []
  small = dict(steps=2, batch=2, seq_len=32, layers=1, hidden=32, heads=2, intermediate=64,
               eval_every=2, eval_batches=1)
  for i, names in enumerate([("f5.txt",), ("f36.txt", "f1.txt"), ("f1.txt",)]):
    out = tmp_path / f"out{i}"
    train.train_and_save(data_name="files", out=str(out), files=[
        str(tmp_path / "d" / n) for n in names], **small)
    meta = json.loads((out / "fdjax.json").read_text())
    assert meta["train_files"] == len(names) and meta["held_out_files"] == 0
    assert set(meta["training"]["final"]) >= {"train_loss", "train_bits_per_byte"}
    assert "held_out_loss" not in meta["training"]["final"]
    assert "no held-out split" in capsys.readouterr().out


def test_train_save_load_generate_round_trip(tmp_path):
  out = tmp_path / "model"
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  run = lambda *a: subprocess.run([sys.executable, "-m", "fdjax", *a], capture_output=True,
                                  text=True, env=env, cwd=ROOT, timeout=600)
  r = run("train", "--data", "stdlib", "--out", str(out), "--steps", "12", "--batch", "2",
          "--seq-len", "32", "--layers", "1", "--hidden", "32", "--heads", "2",
          "--intermediate", "64", "--eval-every", "6", "--eval-batches", "1")
  assert r.returncode == 0, r.stderr[-2000:]
  meta = json.loads((out / "fdjax.json").read_text())
  assert meta["tokenizer"] == "bytes"
  assert len(meta["training"]["history"]) >= 2
  assert "held_out_bits_per_byte" in meta["training"]["final"]
  model = fdjax.load_pretrained(out)
  assert model.config.position_encoding == "cope"
  r = run("generate", "def f(x):", "--model", str(out), "--max-new-tokens", "8")
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.startswith("def f(x):") and "new_tokens=8" in r.stdout
