"""Training with optax: AdamW, linear warm-up then cosine decay, global-norm clipping, a
jitted train step, periodic evaluation, a progress line with loss and throughput, and
checkpoints in the format `load_pretrained` reads.

Data comes as a function `batch(rng) -> (ids [B, T + 1] int32, mask [B, T] float32)`: the
model predicts ids[:, 1:] from ids[:, :-1] and the loss is averaged where mask is 1.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fdjax.io import checkpoint
from fdjax.ops import checks, dispatch
from fdjax.training import data, tasks
from models import ModelConfig, Transformer


@dataclasses.dataclass
class TrainConfig:
  steps: int = 1000
  lr: float = 3e-3
  warmup: int = 100
  weight_decay: float = 0.1
  clip: float = 1.0
  eval_every: int = 200
  eval_batches: int = 4
  seed: int = 0
  progress: bool = True

  def __post_init__(self):
    # a negative rate trained the model away from the data (and was saved), a negative
    # warm-up stretched the decay, a zero clip never moved the weights
    checks.finite_number("train", "lr", self.lr)
    checks.finite_number("train", "weight_decay", self.weight_decay, zero=True)
    checks.finite_number("train", "clip", self.clip)
    if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
      raise ValueError(f"train: warmup must be an integer >= 0, got {self.warmup!r}")


def optimizer(tc: TrainConfig):
  """AdamW on a warm-up to lr then a cosine down to lr / 10; the warm-up takes at most half
  the steps (a longer one would leave no decay: `fdjax train` says when it is cut)."""
  warmup = min(tc.warmup, tc.steps // 2)
  schedule = optax.warmup_cosine_decay_schedule(0.0, tc.lr, warmup, max(tc.steps, warmup + 1),
                                                end_value=tc.lr * 0.1)
  return optax.chain(optax.clip_by_global_norm(tc.clip),
                     optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=tc.weight_decay))


def _loss(graphdef, params, rest, ids, mask):
  model = nnx.merge(graphdef, params, rest)
  logits = model(ids[:, :-1])
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:])
  return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0)


@functools.partial(jax.jit, static_argnames=("graphdef", "tx"), donate_argnums=(1, 3))
def train_step(graphdef, params, rest, opt_state, ids, mask, *, tx):
  loss, grads = jax.value_and_grad(_loss, argnums=1)(graphdef, params, rest, ids, mask)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss, optax.tree.norm(grads)


@functools.partial(jax.jit, static_argnames=("graphdef", "impl"))
def eval_loss(graphdef, params, rest, ids, mask, impl="auto"):
  """_loss, jitted per dispatch.current() (`impl`), so a `dispatch.using` block retraces."""
  del impl
  return _loss(graphdef, params, rest, ids, mask)


def evaluate(model, batch_fn, n_batches, seed=1234) -> float:
  """Mean masked next-token loss (nats) over n_batches fresh batches."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  rng = np.random.default_rng(seed)
  losses = [float(eval_loss(graphdef, params, rest, *map(jnp.asarray, batch_fn(rng)),
                            impl=dispatch.current()))
            for _ in range(n_batches)]
  return float(np.mean(losses))


def train(model, batch_fn, tc: TrainConfig, eval_fn=None, log=None) -> list[dict]:
  """Trains `model` in place. eval_fn(model) -> dict is called every tc.eval_every steps and
  at the end. Returns the history (one dict per log point)."""
  tx = optimizer(tc)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  opt_state = tx.init(params)
  rng = np.random.default_rng(tc.seed)
  history, t0, tokens, last = [], time.perf_counter(), 0, {}
  for step in range(1, tc.steps + 1):
    ids, mask = batch_fn(rng)
    params, opt_state, loss, gnorm = train_step(graphdef, params, rest, opt_state,
                                                jnp.asarray(ids), jnp.asarray(mask), tx=tx)
    tokens += ids.shape[0] * (ids.shape[1] - 1)
    if step % 10 == 0 or step == tc.steps:
      loss = float(loss)
      if not math.isfinite(loss):
        raise FloatingPointError(f"train: loss became {loss} at step {step}")
      rate = tokens / (time.perf_counter() - t0)
      last = {"step": step, "loss": loss, "grad_norm": float(gnorm), "tokens_per_s": rate}
      if tc.progress:
        eta = (tc.steps - step) * (time.perf_counter() - t0) / step
        bar = "#" * int(30 * step / tc.steps)
        sys.stderr.write(f"\r[{bar:<30}] {step}/{tc.steps} loss {loss:.4f} "
                         f"{rate:,.0f} tok/s eta {eta:.0f}s ")
        sys.stderr.flush()
    if eval_fn is not None and (step % tc.eval_every == 0 or step == tc.steps):
      nnx.update(model, params)
      last = {**last, "step": step, **eval_fn(model)}
      if tc.progress:
        sys.stderr.write(f"\n  eval @ {step}: " + " ".join(
            f"{k}={v:.4f}" for k, v in last.items() if isinstance(v, float)) + "\n")
    if last and last.get("step") == step:
      history.append(dict(last))
      if log:
        log(history[-1])
  nnx.update(model, params)
  if tc.progress:
    sys.stderr.write("\n")
  return history


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _predict(graphdef, state, ids):
  return jnp.argmax(nnx.merge(graphdef, state)(ids), axis=-1)


def task_error(model, task, split: str, n: int = 256, seed: int = 99, batch: int = 64) -> float:
  """The task's error rate on n fresh sequences of `split` (teacher-forced greedy)."""
  graphdef, state = nnx.split(model)
  rng = np.random.default_rng(seed)
  errs, counts = [], []
  for i in range(0, n, batch):
    ids, mask = task.sample(rng, min(batch, n - i), split)
    pred = np.asarray(_predict(graphdef, state, jnp.asarray(ids[:, :-1])))
    errs.append(task.error(pred, ids, mask))
    counts.append(len(ids))
  return float(np.average(errs, weights=counts))


def train_and_save(*, data_name, out, steps=1000, batch=16, seq_len=256, lr=3e-3, warmup=100,
                   layers=4, hidden=256, heads=4, kv_heads=None, intermediate=704, pe="cope",
                   npos_max=64, max_len=2048, tie=False, eval_every=250, eval_batches=8,
                   seed=0, files=None, variables=1, cope_gates="key", cope_pos_scaled=False):
  """`fdjax train`: a model trained on byte-level text (the standard library's sources or
  `files`) or on one of the CoPE paper's tasks, saved to `out` with its training record."""
  args = dict(locals())
  for name in ("steps", "batch", "seq_len", "layers", "hidden", "heads", "intermediate",
               "npos_max", "max_len", "eval_every", "eval_batches"):
    checks.positive_int("train", name, args[name])
  tc = TrainConfig(steps=steps, lr=lr, warmup=warmup, eval_every=eval_every,
                   eval_batches=eval_batches, seed=seed)
  checkpoint.prepare_save(out)  # before training: a bad --out fails now, not after it
  if data_name in tasks.TASKS:
    task = tasks.get(data_name, variables)
    vocab = task.vocab_size
    batch_fn = lambda rng: task.sample(rng, batch, "id")
    seq_len = batch_fn(np.random.default_rng(0))[0].shape[1]
    meta = {"task": data_name, "variables": variables}
    eval_fn = lambda model: {f"error_{s}": task_error(model, task, s, n=128)
                             for s in task.splits}
  else:
    files = data.stdlib_files() if data_name == "stdlib" else files
    if not files:
      raise ValueError("--data files needs --files F [F ...]")
    train_files, test_files = data.split_files(files)
    held = data.read_bytes(test_files) if train_files else np.zeros((0,), np.uint8)
    if held.size < seq_len + 2:  # no file held out, every file, or too few bytes for a batch
      print(f"data: no held-out split ({len(test_files)} of {len(files)} file(s) held out, "
            f"{held.size} bytes, a batch needs {seq_len + 2}): the evaluation loss is the "
            f"training data's (train_loss)", flush=True)
      train_files, test_files = files, []
    batch_fn = data.byte_batches(data.read_bytes(train_files), batch, seq_len, "training data")
    eval_batch = data.byte_batches(held, batch, seq_len) if test_files else batch_fn
    split = "held_out" if test_files else "train"
    vocab = 256
    meta = {"tokenizer": "bytes", "data": data_name, "train_files": len(train_files),
            "held_out_files": len(test_files)}
    def eval_fn(model):
      loss = evaluate(model, eval_batch, eval_batches)
      return {f"{split}_loss": loss, f"{split}_bits_per_byte": loss / math.log(2)}
  cfg = ModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                    num_layers=layers, num_heads=heads, num_kv_heads=kv_heads or heads,
                    head_dim=hidden // heads, position_encoding=pe, npos_max=npos_max,
                    max_position_embeddings=max(max_len, seq_len + 1), tie_word_embeddings=tie,
                    cope_gates=cope_gates, cope_pos_scaled=cope_pos_scaled)
  model = Transformer(cfg, rngs=nnx.Rngs(seed), dtype=jnp.float32)
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))
  print(f"model: {n_params / 1e6:.2f}M parameters, {cfg.position_encoding} positions; "
        f"data: {data_name}, batch {batch} x {seq_len}", flush=True)
  if warmup > steps // 2:
    print(f"warm-up: {steps // 2} steps, half of --steps {steps} (not --warmup {warmup})",
          flush=True)
  history = train(model, batch_fn, tc, eval_fn=eval_fn)
  meta["training"] = {"args": args, "parameters": int(n_params), "final": history[-1],
                      "history": history}
  checkpoint.save_pretrained(model, out, extra_config=meta)
  print(json.dumps(history[-1]))
  print(f"saved to {out}")
  return model, history
