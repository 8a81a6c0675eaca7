#!/usr/bin/env bash
# On one GPU machine, in one go (the lent GPU keeps nothing between calls): a bench-91m byte model and a
# subword drafter trained on the shipped corpus, the speculative-decoding benchmark on those two models
# (bf16: the speed; then a shorter float32 run: greedy outputs identical), then the robustness study and
# the trainer's throughput. The speculative table comes first so that a time limit cannot cut it.
# Outputs go to ${OUT:-runs/gpu}.
#   bash benchmarks/gpu_speculative_suite.sh [BYTE_SECONDS] [DRAFT_STEPS]
# The drafter trains for a number of steps, not seconds: on the 1.8 MB corpus it overfits within a minute
# (70 s: held-out 3.49 bits/byte; 200 steps, ~7 epochs: 1.56).
# SPECULATIVE_ONLY=1 stops after the speculative tables (when device time is short).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=src
OUT=${OUT:-runs/gpu}; mkdir -p "$OUT"; RUNS=/tmp/mambabyte-runs; mkdir -p "$RUNS"
BYTE_SECONDS=${1:-150}; DRAFT_STEPS=${2:-200}
mb() { python3 -m mambabyte.cli "$@"; }
CORPUS=src/mambabyte/corpus

mb train --data $CORPUS/train --valid-data $CORPUS/valid --preset bench-91m --out $RUNS/byte --overwrite \
   --batch-size 16 --seq-len 2048 --lr 1e-3 --warmup-steps 50 --max-time "$BYTE_SECONDS" --eval-every 0 \
   --save-every 0 --quiet 2>&1 | tee "$OUT/byte_train.txt"
mb tokenizer train --data $CORPUS/train --vocab-size 4096 --out $RUNS/tok | tee "$OUT/tokenizer.txt"
mb train --data $CORPUS/train --valid-data $CORPUS/valid --preset draft-wide --tokenizer $RUNS/tok --out $RUNS/draft \
   --overwrite --batch-size 32 --seq-len 512 --lr 2e-3 --warmup-steps 30 --max-steps "$DRAFT_STEPS" --eval-every 0 \
   --save-every 0 --quiet 2>&1 | tee "$OUT/draft_train.txt"
python3 benchmarks/speculative.py $RUNS/byte/checkpoint $RUNS/draft/checkpoint --draft-len 2 1 3 --phases 2>&1 \
   | tee "$OUT/speculative.txt"
python3 benchmarks/speculative.py $RUNS/byte/checkpoint $RUNS/draft/checkpoint --dtype float32 --prompts 4 \
   --max-bytes 128 --draft-len 2 2>&1 | tee "$OUT/speculative_fp32.txt"
[ -n "${SPECULATIVE_ONLY:-}" ] && exit 0
mb robustness --byte $RUNS/byte/checkpoint --subword $RUNS/draft/checkpoint --data $CORPUS/valid \
   --max-bytes 65536 --markdown "$OUT/robustness.md" --plot "$OUT/robustness.png" --quiet 2>&1 | tee "$OUT/robustness.txt"
python3 benchmarks/train.py --device cuda 2>&1 | tee "$OUT/train_cuda.txt"
