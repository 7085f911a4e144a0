"""The CoPE paper's synthetic tasks at a CPU scale: absolute PE, RoPE and CoPE, each trained
from scratch with several seeds; error rates per split beside the paper's.

  python bench/cope_tasks.py [--steps 1000] [--seeds 0 1]

Scale (paper -> here): 4 layers / width 256 / 10k steps -> 2 layers / width 64 / 1000 steps
of 32 sequences; Flip-Flop with 24 instruction pairs; selective copy of 4 tokens among
16 / 8 / 32 blanks (paper: 16 among 256 / 128 / 512); counting with 20 statements
(ood_long: 40) instead of up to 512.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bench import common  # noqa: E402
from fdjax.training import tasks, train  # noqa: E402
from models import ModelConfig, Transformer  # noqa: E402

# The paper's Table (error %): (task, split) -> (absolute, RoPE or relative, CoPE)
PAPER = {
    ("flipflop", "id"): (6.8, 1.8, 0.0), ("flipflop", "ood_sparse"): (21.7, 20.3, 4.9),
    ("selective_copy", "id"): (16.9, 40.1, 0.0), ("selective_copy", "ood_dense"): (25.6, 100.0, 0.0),
    ("selective_copy", "ood_sparse"): (85.2, 100.0, 0.0),
    ("counting1", "id"): (5.3, 1.1, 0.0), ("counting3", "id"): (67.6, 17.8, 1.2),
    ("counting5", "id"): (71.5, 22.4, 7.4),
}
PE_COLUMN = {"absolute": 0, "rope": 1, "cope": 2}


def run_one(task, pe, seed, args):
  lengths = [task.sample(np.random.default_rng(0), 1, s)[0].shape[1] for s in task.splits]
  cfg = ModelConfig(vocab_size=task.vocab_size, hidden_size=args.hidden,
                    intermediate_size=args.hidden * 11 // 4, num_layers=args.layers,
                    num_heads=args.heads, num_kv_heads=args.heads,
                    head_dim=args.hidden // args.heads, position_encoding=pe,
                    npos_max=args.npos_max, max_position_embeddings=max(lengths) + 1)
  model = Transformer(cfg, rngs=nnx.Rngs(seed), dtype=jnp.float32)
  tc = train.TrainConfig(steps=args.steps, lr=args.lr, warmup=args.steps // 10,
                         eval_every=args.steps + 1, seed=seed, progress=False)
  t0 = time.perf_counter()
  history = train.train(model, lambda rng: task.sample(rng, args.batch, "id"), tc)
  seconds = time.perf_counter() - t0
  errors = {s: train.task_error(model, task, s, n=args.eval_n, seed=1000 + seed)
            for s in task.splits}
  return errors, history[-1]["loss"], seconds


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=1000)
  ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
  ap.add_argument("--pes", nargs="+", default=["absolute", "rope", "cope"])
  ap.add_argument("--tasks", nargs="+",
                  default=["flipflop", "selective_copy", "counting1", "counting3", "counting5"])
  ap.add_argument("--layers", type=int, default=2)
  ap.add_argument("--hidden", type=int, default=64)
  ap.add_argument("--heads", type=int, default=4)
  ap.add_argument("--npos-max", type=int, default=64)
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--lr", type=float, default=3e-3)
  ap.add_argument("--eval-n", type=int, default=256)
  ap.add_argument("--results-dir")
  ap.add_argument("--name", default="cope_tasks")
  args = ap.parse_args()
  rows = []
  for tname in args.tasks:
    variables = int(tname[len("counting"):]) if tname.startswith("counting") else 1
    task = tasks.get("counting" if tname.startswith("counting") else tname, variables)
    for pe in args.pes:
      for seed in args.seeds:
        errors, loss, seconds = run_one(task, pe, seed, args)
        for split, err in errors.items():
          paper = PAPER.get((tname, split))
          rows.append({"task": task.name, "variables": variables if task.name == "counting"
                       else None, "split": split, "pe": pe, "seed": seed, "error": err,
                       "paper_error": None if paper is None else paper[PE_COLUMN[pe]] / 100,
                       "final_train_loss": loss, "steps": args.steps,
                       "train_seconds": seconds})
          print(rows[-1], flush=True)

  # the summary: mean over seeds, beside the paper
  summary = []
  keys = sorted({(r["task"], r["variables"], r["split"]) for r in rows},
                key=lambda k: (args.tasks.index(k[0] + (str(k[1]) if k[0] == "counting"
                                                       else "")), k[2] != "id", k[2]))
  for task, variables, split in keys:
    line = {"task": task + (f" ({variables} var)" if variables else ""), "split": split}
    for pe in args.pes:
      errs = [r["error"] for r in rows if (r["task"], r["variables"], r["split"], r["pe"]) ==
              (task, variables, split, pe)]
      paper = next((r["paper_error"] for r in rows if (r["task"], r["variables"], r["split"],
                                                        r["pe"]) == (task, variables, split, pe)),
                   None)
      line[f"{pe} (ours)"] = f"{100 * sum(errs) / len(errs):.1f}" + (
          f" [{', '.join(f'{100 * e:.1f}' for e in errs)}]" if len(errs) > 1 else "")
      line[f"{pe} (paper)"] = "" if paper is None else f"{100 * paper:.1f}"
    summary.append(line)
  cols = ["task", "split"] + [f"{pe} ({w})" for pe in args.pes for w in ("ours", "paper")]
  table = common.markdown_table(summary, cols)
  notes = ("Error %, mean over seeds [each seed]. The paper's RoPE column for counting is its "
           "relative-PE result. " + (__doc__ or "").split("\n\n")[-1].strip())
  print(common.write_results(args.name, rows, ["task", "variables", "split", "pe", "seed",
                                               "error", "paper_error", "final_train_loss",
                                               "train_seconds"],
                             notes=f"## Summary\n\n{table}\n\n{notes}",
                             results_dir=args.results_dir))


if __name__ == "__main__":
  main()
