#!/usr/bin/env bash
# Every CPU benchmark of bench/RESULTS.md, one after the other (about 45 minutes with 1 thread).
# Usage: bash bench/run_all.sh [THREADS]   (default: all visible cores). JSON results land in bench/results/;
# the tables are printed and copied to bench/results/run_all.log. Re-run on a quiet machine for final figures.
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${1:-$(nproc)}
PYTHON=${PYTHON:-python}
mkdir -p bench/results
{
  "$PYTHON" bench/train_step.py --backbone flux --threads "$THREADS" --repeats 11
  "$PYTHON" bench/train_step.py --backbone wan --threads "$THREADS" --repeats 11
  "$PYTHON" bench/train_step.py --backbone flux --threads "$THREADS" --repeats 5 --checkpointing --variants ours,diffusers
  # long paired eager runs: the steadiest ours/diffusers time ratio on a shared machine
  "$PYTHON" bench/train_step.py --backbone flux --threads "$THREADS" --repeats 25 --variants ours,diffusers --no-memory \
    --json bench/results/train_step_flux_long.json
  "$PYTHON" bench/train_step.py --backbone wan --threads "$THREADS" --repeats 25 --variants ours,diffusers --no-memory \
    --json bench/results/train_step_wan_long.json
  "$PYTHON" bench/flops.py --threads "$THREADS" --repeats 9 --profile
  "$PYTHON" bench/sampler.py --threads "$THREADS" --repeats 7
} 2>&1 | grep --line-buffered -v -e "should be kept in float32" -e "^USDT:" | tee bench/results/run_all.log
