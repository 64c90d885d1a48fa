#!/usr/bin/env bash
# Several world-GRPO settings in one GPU call: each trains from the shipped weights for MINUTES, then
# is evaluated plan-only on the public goal set (bench_world.py --modes grpo) at SEEDS.
#   [SEEDS=0,1,2] bash bench/world_grpo_sweep.sh MINUTES "LABEL::GRPO ARGS" ["LABEL::GRPO ARGS" ...]
# LABEL names the run's files (letters, digits, - and _). Each setting's GRPO log comes back as
# $OUT/sweep_LABEL_log.jsonl and its trainer state (adapters, Adam moments) as $OUT/sweep_LABEL_state.tar;
# a later call resumes LABEL from grpo_state/LABEL (here: mkdir -p grpo_state && tar -xf
# sweep_LABEL_state.tar -C grpo_state, then carry grpo_state). The evaluations are merged (as rows
# labelled "LABEL: GRPO ARGS") into the tree's bench/results/world.json, which comes back as
# $OUT/world.json. Keep MINUTES x settings plus ~40 s of evaluation a seed and setting under the
# call's limit (the build takes ~1 minute); at most 3 settings a call (8 files come back).
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_env.sh
minutes=${1:?usage: world_grpo_sweep.sh MINUTES "LABEL::GRPO ARGS" ...}
shift
seeds=${SEEDS:-0}
status=0
for spec in "$@"; do
  label=${spec%%::*}
  args=${spec#*::}
  run=/tmp/sweep-$label
  if [ -d "grpo_state/$label" ] && [ ! -f "$run/trainer/trainer.json" ]; then
    mkdir -p "$run" && cp -r "grpo_state/$label" "$run/trainer"
  fi
  echo "== $label: $args"
  # shellcheck disable=SC2086  # the settings' arguments are split on purpose
  python3 -m spiral_rt.world.grpo --out "$run" --iterations 5000 --time-limit-min "$minutes" --no-progress $args \
    2>&1 | tail -2 || status=1
  cp "$run/log.jsonl" "$OUT/sweep_${label}_log.jsonl" 2>/dev/null
  [ -d "$run/trainer" ] && tar -cf "$OUT/sweep_${label}_state.tar" -C "$run/trainer" --transform "s,^\.,$label," .
  python3 bench/bench_world.py --modes grpo --grpo-weights "$run/world.safetensors" --seed "$seeds" --no-ground-truth \
    --label "$label: $args" --merge bench/results/world.json 2>&1 | grep -v '^{' | tail -3 || status=1
done
exit $status
