"""Learning curves of the CoPE paper's counting task with several variables at a CPU scale:
does more training, depth or a smaller learning rate take it past the error of guessing?

  python -m fdjax bench cope_counting --pe cope --variables 3 --steps 4000 --lr 1e-3
  python -m fdjax bench cope_counting --from-log LOG   # the results from runs' JSON lines

Each run prints one JSON line per evaluation (the error in and out of distribution on 256
fresh sequences) and, with --name, adds its curve to bench/results/NAME.{json,md}.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from bench import common, cope_tasks  # noqa: E402
from fdjax.training import tasks, train  # noqa: E402

FIELDS = ("pe", "variables", "layers", "hidden", "lr", "steps", "seed")


def guess_error(task, n=20000) -> float:
  """The error of always answering the most frequent count of the training distribution."""
  ids, _ = task.sample(np.random.default_rng(123), n, "id")
  return 1.0 - np.bincount(ids[:, -1]).max() / n


def curve(a) -> list[dict]:
  task = tasks.get("counting", a.variables)
  model = cope_tasks.model_for(task, a.pe, a.seed, layers=a.layers, hidden=a.hidden,
                               heads=a.heads, npos_max=64)
  tc = train.TrainConfig(steps=a.steps, lr=a.lr, warmup=a.steps // 10, eval_every=a.every,
                         seed=a.seed, progress=False)
  t0 = time.perf_counter()
  errors = lambda m: {s: train.task_error(m, task, s, n=256, seed=1000) for s in task.splits}
  history = train.train(model, lambda rng: task.sample(rng, a.batch, "id"), tc,
                        eval_fn=errors)
  guess = guess_error(task)
  return [{**{f: getattr(a, f) for f in FIELDS}, "step": h["step"], "loss": h.get("loss"),
           "error_id": h["id"], "error_ood_long": h["ood_long"], "guess_error_id": guess,
           "seconds": time.perf_counter() - t0} for h in history if "id" in h]


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--pe", default="cope", choices=list(cope_tasks.ENCODINGS))
  ap.add_argument("--variables", type=int, default=3)
  ap.add_argument("--steps", type=int, default=4000)
  ap.add_argument("--lr", type=float, default=1e-3)
  ap.add_argument("--layers", type=int, default=2)
  ap.add_argument("--hidden", type=int, default=64)
  ap.add_argument("--heads", type=int, default=4)
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--every", type=int, default=500)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--name", default="cope_counting")
  ap.add_argument("--results-dir")
  ap.add_argument("--from-log", help="rebuild the results from the JSON lines of earlier runs")
  a = ap.parse_args()
  if a.from_log:
    with open(a.from_log) as fh:
      rows = [json.loads(line) for line in fh if line.startswith("{")]
  else:
    rows = curve(a)
    for r in rows:
      print(json.dumps(r), flush=True)
  runs = collections.OrderedDict()
  for r in rows:
    runs.setdefault(tuple(r[f] for f in FIELDS), []).append(r)
  lines = [f"- {dict(zip(FIELDS, key))}: error in distribution by step " + ", ".join(
      f"{r['step']}: {100 * r['error_id']:.1f} %" for r in curve_rows) +
      f" (always the most frequent count: {100 * curve_rows[0]['guess_error_id']:.1f} %)"
      for key, curve_rows in runs.items()]
  print(common.write_results(a.name, rows, list(FIELDS) + [
      "step", "loss", "error_id", "error_ood_long", "guess_error_id", "seconds"],
      notes="## Curves\n\n" + "\n".join(lines), results_dir=a.results_dir))


if __name__ == "__main__":
  main()
