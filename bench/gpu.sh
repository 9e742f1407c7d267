#!/usr/bin/env bash
# Full-size figures on one lent GPU, in one go (35 s of work on an H200, plus start-up; hard limit 7.5 minutes):
#   1. FLUX.1-dev-size (12B, random bf16 weights made on the GPU) prompt-training step at 1024x1024, with and
#      without activation checkpointing: s/step, MFU, peak memory;
#   2. Wan2.1-1.3B-size bridge sampling of a 33-frame 480x832 clip, 20 steps: seconds.
# Writes gpu.json and gpu.md into $OUT if set, else bench/results/. Extra arguments go to bench/gpu.py
# (e.g. --repeats 9; --smoke runs tiny configs anywhere).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader || true
"$PYTHON" -c "import torch, einops, safetensors; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
exec timeout 450 "$PYTHON" bench/gpu.py "$@"
