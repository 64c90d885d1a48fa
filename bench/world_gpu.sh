#!/usr/bin/env bash
# The bundled world's GRPO post-training and benchmark in one call on the GPU machine.
#   [GRPO_ARGS="--lr 5e-4 ..."] bash bench/world_gpu.sh MINUTES [bench_world.py arguments...]
# Needs the shipped weights in the tree (spiral_rt/world/model/weights/world.safetensors) and MiniLM
# carried in .whl packed with bench/carry_pack.py --int8-embeddings (both fit the 64 MiB limit).
# 1. python -m spiral_rt.world.grpo for MINUTES of wall time (the world critic's reward);
# 2. bench_world.py: open / plan / closed with the shipped weights, and "grpo" (plan only) with the
#    post-trained ones.
# world.json (written to $OUT by the bench) and the GRPO log come back; the post-trained weights in
# 15 MB parts.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/spiral_rt_out}
minutes=${1:?usage: world_gpu.sh MINUTES [bench_world.py arguments]}
shift
bash bench/run_gpu.sh -- "-m spiral_rt.world.grpo --out /tmp/world-grpo --iterations 5000 --time-limit-min $minutes --no-progress ${GRPO_ARGS:-}" \
  "bench/bench_world.py --grpo-weights /tmp/world-grpo/world.safetensors $*"
status=$?
cp /tmp/world-grpo/log.jsonl "$OUT/grpo_log.jsonl" 2>/dev/null
cp /tmp/world-grpo/summary.json "$OUT/grpo_summary.json" 2>/dev/null
if [ -f /tmp/world-grpo/world.safetensors ]; then
  split -b 15M /tmp/world-grpo/world.safetensors "$OUT/world-grpo.safetensors.part-"
fi
exit $status
