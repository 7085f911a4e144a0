#!/usr/bin/env bash
# One lent GPU, about 15 minutes of device time: the GPU suite cut to fit one call of the
# device tool (under 10 minutes), the most wanted evidence first. Run from the repository root
# on the device machine; what it measured comes back as $OUT/results.tgz (bench/results/ with
# every part's log, and any tuned table) plus $OUT/suite.log.
#
#   bash bench/gpu_lease.sh            # TOTAL=540 seconds for the suite, then the archive
#
# Order and budgets (seconds), from the first H200 lease (bench/results/H200_NOTES.md), where a
# check case took 2 to 13 s (compiles) and the 7B end-to-end run did not finish in 140 s:
#   env 30        device, versions, copy bandwidth, dispatch floor
#   check 150     every kernel against XLA on the device, Mosaic GPU first (26 cases took
#                 150 s there; 38 now), then Triton's as far as the budget goes; a case
#                 still running after 45 s (compile included) is recorded as hung and the
#                 rest go on (the head_dim-256 and heads-major paged cases have not run on
#                 a GPU yet)
#   attention 110 decode at 4k and 16k keys, batch 1 and 8, MHA and GQA 4; prefill at 4k
#   gemm 70       Llama-2-7B's four weights at M = 1 and 16, bf16 and int8
#   e2e 155       Llama-2-7B-shaped random bf16 model at batch 1, fdjax auto against Hugging
#                 Face eager (--quick: no command-buffer variant, no breakdown)
# A part that runs out of budget or hangs is cut off (its log keeps the rows so far; `python
# bench/attention.py --from-log` rebuilds that table) and the next one runs. What this leaves
# out (tune, speculative, moe, more shapes) waits for another lease; `python -m fdjax bench
# gpu` runs it all.
set -u
OUT=${OUT:-/tmp/gpu_lease_out}
TOTAL=${TOTAL:-540}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=$(command -v python3 || command -v python)
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv \
  > "$OUT/suite.log" 2>&1
"$PY" -c 'import jax; print("jax", jax.__version__, jax.devices())' >> "$OUT/suite.log" 2>&1
timeout "$TOTAL" "$PY" bench/gpu_suite.py --parts env check attention gemm e2e \
  --budget env=30 check=150 attention=110 gemm=70 e2e=155 \
  --extra "check=--case-seconds 45" \
          "attention=--batch 1 8 --kv-len 4096 16384 --prefill-len 4096 --iters 20" \
          "gemm=--models llama-2-7b --m 1 16 --quantizations none int8 --iters 20" \
          "e2e=--batch 1 --prompt-len 128 --new-tokens 64 --repeats 2 --impls fdjax-auto hf-eager --quick" \
  2>&1 | tee -a "$OUT/suite.log"
echo "suite exit: ${PIPESTATUS[0]}" | tee -a "$OUT/suite.log"
tar czf "$OUT/results.tgz" bench/results fdjax/ops/tables 2>> "$OUT/suite.log"
ls -la "$OUT"
