"""The CoPE paper's synthetic tasks at a CPU scale: absolute PE, RoPE and CoPE (and the
official code's CoPE variants), each trained from scratch with several seeds; error rates
per split, mean and standard deviation over the seeds, beside the paper's.

  python -m fdjax bench cope_tasks [--seeds 0 1 2] [--steps 1000] [--workers 2]

Runs go side by side, one process per core (--workers). Scale (paper -> here): 4 layers /
width 256 / 10k steps -> 2 layers / width 64 / 1000 steps of 32 sequences. Flip-Flop: 48
instruction pairs instead of 256, p(ignore) 0.8 in distribution, 0.98 (ood_sparse) and 0.1
(ood_dense) out of it, Liu et al.'s splits. Selective copy: 4 tokens among 16 blanks in
distribution, 8 (ood_dense) and 32 (ood_sparse) out of it (paper: 16 among 256 / 128 / 512).
Counting: 3 to 20 statements over 1, 3 or 5 variables (paper: 3 to 512, no
out-of-distribution split); ood_long, ours: 21 to 40 statements, longer than any training
sequence. The paper reports the mean of 3 seeds with no spread; its RoPE column is its
relative-PE result for counting.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import queue
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bench import common  # noqa: E402
from fdjax.training import tasks, train  # noqa: E402
from models import ModelConfig, Transformer  # noqa: E402

# The paper's tables (error %): (task, split) -> (absolute, RoPE or relative, CoPE)
PAPER = {
    ("flipflop", "id"): (6.8, 1.8, 0.0), ("flipflop", "ood_sparse"): (21.7, 20.3, 4.9),
    ("selective_copy", "id"): (16.9, 40.1, 0.0),
    ("selective_copy", "ood_dense"): (25.6, 100.0, 0.0),
    ("selective_copy", "ood_sparse"): (85.2, 100.0, 0.0),
    ("counting1", "id"): (5.3, 1.1, 0.0), ("counting3", "id"): (67.6, 17.8, 1.2),
    ("counting5", "id"): (71.5, 22.4, 7.4),
}
PAPER_COLUMN = {"absolute": 0, "rope": 1, "cope": 2}
# A table row: its ModelConfig overrides (the variants are the official code's options).
ENCODINGS = {
    "absolute": dict(position_encoding="absolute"),
    "rope": dict(position_encoding="rope"),
    "cope": dict(position_encoding="cope"),
    "cope_pos_scaled": dict(position_encoding="cope", cope_pos_scaled=True),
    "cope_sep_key": dict(position_encoding="cope", cope_gates="separate"),
    "cope_val_gates": dict(position_encoding="cope", cope_gates="value"),
    "cope_rope": dict(position_encoding="cope_rope"),
}
BASELINES = ("absolute", "rope")
# Instruction pairs per Flip-Flop sequence (paper: 256; the docstring says 48). At 24 (an
# earlier table) a read far from its write is common in training too (0.9^23 = 9 % of final
# reads have no write between), so the sparse split was not out of distribution: RoPE and
# CoPE both scored 0. At 48, 0.9^47 = 0.7 %.
FLIPFLOP_PAIRS = 48
TASKS = ("flipflop", "selective_copy", "counting1", "counting3", "counting5")


def task_of(name: str, flipflop_pairs: int):
  if name.startswith("counting"):
    return tasks.get("counting", int(name[len("counting"):]))
  return tasks.FlipFlop(flipflop_pairs) if name == "flipflop" else tasks.get(name)


def model_for(task, encoding, seed, *, layers, hidden, heads, npos_max):
  """A fresh float32 model for a task: `layers` of width `hidden`, positions long enough for
  its longest split, an ENCODINGS row's position encoding."""
  lengths = [task.sample(np.random.default_rng(0), 1, s)[0].shape[1] for s in task.splits]
  cfg = ModelConfig(vocab_size=task.vocab_size, hidden_size=hidden,
                    intermediate_size=hidden * 11 // 4, num_layers=layers, num_heads=heads,
                    num_kv_heads=heads, head_dim=hidden // heads, npos_max=npos_max,
                    max_position_embeddings=max(lengths) + 1, **ENCODINGS[encoding])
  return Transformer(cfg, rngs=nnx.Rngs(seed), dtype=jnp.float32)


def run_one(task, encoding, seed, steps, args):
  model = model_for(task, encoding, seed, layers=args.layers, hidden=args.hidden,
                    heads=args.heads, npos_max=args.npos_max)
  tc = train.TrainConfig(steps=steps, lr=args.lr, warmup=steps // 10, eval_every=steps + 1,
                         seed=seed, progress=False)
  t0 = time.perf_counter()
  history = train.train(model, lambda rng: task.sample(rng, args.batch, "id"), tc)
  seconds = time.perf_counter() - t0
  errors = {s: train.task_error(model, task, s, n=args.eval_n, seed=1000 + seed)
            for s in task.splits}
  return errors, history[-1]["loss"], seconds


def run_pinned(cores: queue.Queue, argv: list[str]) -> dict:
  """One run in a child process pinned to one free core: on this 2-core machine two runs side
  by side, one core each, finish sooner than one after the other on both."""
  core = cores.get()
  try:
    r = subprocess.run([sys.executable, os.path.abspath(__file__), *argv], capture_output=True,
                       text=True, preexec_fn=lambda: os.sched_setaffinity(0, {core}))
  finally:
    cores.put(core)
  if r.returncode:
    raise RuntimeError(f"cope_tasks {' '.join(argv)} failed:\n{r.stderr[-3000:]}")
  return json.loads(r.stdout.strip().splitlines()[-1])


def spread(errs: list[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (0 for one seed), in %."""
  mean = 100 * statistics.fmean(errs)
  return mean, (100 * statistics.stdev(errs) if len(errs) > 1 else 0.0)


def verdict(cells: dict) -> str:
  """Whether CoPE's error is the lowest by more than the spread: its mean + std below every
  baseline's mean - std; else which baseline it does not beat so."""
  if "cope" not in cells or not any(b in cells for b in BASELINES):
    return ""
  m, s = cells["cope"]
  ties = [b for b in BASELINES if b in cells and not m + s < cells[b][0] - cells[b][1]]
  if not ties:
    return "yes"
  lower = [b for b in ties if cells[b][0] + cells[b][1] < m - s]
  return "no: " + (f"{', '.join(lower)} lower beyond the spread" if lower else
                   f"{', '.join(ties)} within the spread")


def summarize(rows, names, encodings):
  out = []
  keys = sorted({(r["task_row"], r["split"]) for r in rows},
                key=lambda k: (names.index(k[0]), k[1] != "id", k[1]))
  for task_row, split in keys:
    line = {"task": task_row.replace("counting", "counting ") + (
        " var" if task_row.startswith("counting") else ""), "split": split}
    cells = {}
    for enc in encodings:
      errs = [r["error"] for r in rows if (r["task_row"], r["split"], r["encoding"]) ==
              (task_row, split, enc)]
      if errs:
        cells[enc] = spread(errs)
        line[enc] = f"{cells[enc][0]:.1f} ± {cells[enc][1]:.1f}"
      paper = PAPER.get((task_row, split))
      if enc in PAPER_COLUMN:
        line[f"{enc} (paper)"] = "" if paper is None else f"{paper[PAPER_COLUMN[enc]]:.1f}"
    line["cope lowest beyond spread"] = verdict(cells)
    out.append(line)
  cols = ["task", "split"] + [c for enc in encodings for c in (
      [enc, f"{enc} (paper)"] if enc in PAPER_COLUMN else [enc])] + ["cope lowest beyond spread"]
  return out, cols


def write(rows, args, encodings, seconds, env=None):
  """bench/results/NAME.{json,md}: the rows and their summary (env: the measuring run's)."""
  rows.sort(key=lambda r: (args.tasks.index(r["task_row"]), encodings.index(r["encoding"]),
                           r["seed"], r["split"]))
  summary, cols = summarize(rows, args.tasks, encodings)
  seeds = sorted({r["seed"] for r in rows})
  notes = (f"## Summary\n\n{common.markdown_table(summary, cols)}\n\nError %, mean ± "
           f"standard deviation over seeds {seeds}; \"cope lowest beyond spread\": CoPE's "
           "mean + std below each baseline's mean - std. Variants (official code, "
           "facebookresearch/RAM projects/cope): cope_pos_scaled adds the position logits "
           "before the 1/sqrt(d) scale (its default; fdjax's cope follows the paper's "
           "appendix, after), cope_sep_key gates with keys of a projection of their own, "
           "cope_val_gates with the values, cope_rope is CoPE on RoPE-rotated q and k (the "
           f"code's combination is with learned relative positions). {len(rows)} rows in "
           f"{seconds / 60:.1f} min.\n\n" + (__doc__ or "").split("\n\n")[-1].strip())
  common.write_results(args.name, rows, ["task_row", "split", "encoding", "seed", "error",
                                         "final_train_loss", "steps", "train_seconds"],
                       notes=notes, results_dir=args.results_dir, env=env)


def rewrite(path, args):
  """The summary again from a results file's rows (the measuring run's environment kept)."""
  with open(path) as fh:
    rows = json.load(fh)["rows"]
  keys = ("device", "jax_version", "date", "command", "torch_version")
  env = {k: rows[0][k] for k in keys if k in rows[0]}
  rows = [{k: v for k, v in r.items() if k not in keys} for r in rows]
  minutes = float(args.minutes) if args.minutes else 0.0
  tasks_seen = [t for t in TASKS if any(r["task_row"] == t for r in rows)]
  encodings = [e for e in ENCODINGS if any(r["encoding"] == e for r in rows)]
  args.tasks = tasks_seen
  write(rows, args, encodings, 60 * minutes, env)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=1000)
  ap.add_argument("--counting-steps", type=int, help="counting's steps (default: --steps)")
  ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  ap.add_argument("--encodings", nargs="+", default=["absolute", "rope", "cope"],
                  choices=list(ENCODINGS))
  ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
  ap.add_argument("--variants", nargs="*",
                  default=["cope_pos_scaled", "cope_sep_key", "cope_val_gates", "cope_rope"],
                  choices=list(ENCODINGS), help="extra rows, on --variant-tasks only")
  ap.add_argument("--variant-tasks", nargs="*", default=["selective_copy"],
                  choices=list(TASKS))
  ap.add_argument("--flipflop-pairs", type=int, default=FLIPFLOP_PAIRS)
  ap.add_argument("--layers", type=int, default=2)
  ap.add_argument("--hidden", type=int, default=64)
  ap.add_argument("--heads", type=int, default=4)
  ap.add_argument("--npos-max", type=int, default=64)
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--lr", type=float, default=3e-3)
  ap.add_argument("--eval-n", type=int, default=256)
  ap.add_argument("--results-dir")
  ap.add_argument("--name", default="cope_tasks")
  ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                  help="runs side by side, each in a process of its own on one core")
  ap.add_argument("--run-one", nargs=3, metavar=("TASK", "ENCODING", "SEED"),
                  help=argparse.SUPPRESS)  # a worker's run: prints its result as JSON
  ap.add_argument("--rewrite", help="a results JSON whose summary to write again")
  ap.add_argument("--minutes", help="with --rewrite: the measuring run's minutes")
  args = ap.parse_args()
  if args.rewrite:
    return rewrite(args.rewrite, args)
  if args.run_one:
    task_row, enc, seed = args.run_one
    steps = args.steps
    if task_row.startswith("counting") and args.counting_steps:
      steps = args.counting_steps
    errors, loss, seconds = run_one(task_of(task_row, args.flipflop_pairs), enc, int(seed),
                                    steps, args)
    print(json.dumps({"errors": errors, "loss": loss, "seconds": seconds, "steps": steps}))
    return
  encodings = list(dict.fromkeys(args.encodings + args.variants))
  runs = [(t, enc, seed) for t in args.tasks for enc in args.encodings for seed in args.seeds]
  runs += [(t, enc, seed) for t in args.variant_tasks if t in args.tasks
           for enc in args.variants if enc not in args.encodings for seed in args.seeds]
  # what a worker needs besides its run: every option but these
  own = {"--workers", "--results-dir", "--name", "--tasks", "--encodings", "--variants",
         "--variant-tasks", "--seeds", "--rewrite", "--minutes"}
  passed = [a for a, v in vars(args).items()
            if "--" + a.replace("_", "-") not in own and a != "run_one" and v is not None]
  common_argv = [x for a in passed for x in ("--" + a.replace("_", "-"), str(getattr(args, a)))]
  cores = queue.Queue()
  for core in sorted(os.sched_getaffinity(0))[:max(1, args.workers)]:
    cores.put(core)
  rows, t_start = [], time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(max(1, args.workers)) as pool:
    futures = {pool.submit(run_pinned, cores, ["--run-one", t, enc, str(seed)] + common_argv):
               (t, enc, seed) for t, enc, seed in runs}
    for done in concurrent.futures.as_completed(futures):
      task_row, enc, seed = futures[done]
      r = done.result()
      for split, err in r["errors"].items():
        rows.append({"task_row": task_row, "split": split, "encoding": enc, "seed": seed,
                     "error": err, "final_train_loss": r["loss"], "steps": r["steps"],
                     "train_seconds": round(r["seconds"], 1)})
        print(rows[-1], flush=True)
      # after every run, so that a run cut short leaves what it measured
      write(rows, args, encodings, time.perf_counter() - t_start)
  print(f"{len(runs)} runs in {(time.perf_counter() - t_start) / 60:.1f} min")


if __name__ == "__main__":
  main()
