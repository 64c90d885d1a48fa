#!/usr/bin/env bash
# The bundled world's GRPO post-training and benchmark in one call on the GPU machine.
#   [GRPO_ARGS="--lr 5e-4 ..."] [GRPO_OUT=/tmp/world-grpo] [RETURN_WEIGHTS=1] bash bench/world_gpu.sh MINUTES [bench_world.py arguments...]
# Needs the shipped weights in the tree (spiral_rt/world/model/weights/world.safetensors) and MiniLM
# carried in .whl packed with bench/carry_pack.py --int8-embeddings (both fit the 64 MiB limit).
# 1. python -m spiral_rt.world.grpo for MINUTES of wall time (the world critic's reward);
# 2. bench_world.py: open / plan / closed with the shipped weights, and "grpo" (plan only) with the
#    post-trained ones.
# world.json (written to $OUT by the bench), the GRPO log and the trainer state (grpo_state.tar: LoRA
# adapters and Adam moments, a few MB) come back; with RETURN_WEIGHTS=1 the post-trained weights too, in 15 MB
# parts (the state holds the adapters: the weights can be rebuilt here from it and the shipped file).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/spiral_rt_out}
run=${GRPO_OUT:-/tmp/world-grpo}  # a run's directory: an earlier call's state there is resumed
minutes=${1:?usage: world_gpu.sh MINUTES [bench_world.py arguments]}
shift
# resume: the run directory on a warm machine, else a trainer state returned by an earlier call, unpacked
# here as grpo_state/ (tar -xf grpo_state.tar) and carried (it is git-ignored)
if [ -d grpo_state ] && [ ! -f $run/trainer/trainer.json ]; then
  mkdir -p $run && cp -r grpo_state $run/trainer
fi
bash bench/run_gpu.sh -- "-m spiral_rt.world.grpo --out $run --iterations 5000 --time-limit-min $minutes --no-progress ${GRPO_ARGS:-}" \
  "bench/bench_world.py --grpo-weights $run/world.safetensors$(printf ' %q' "$@")"
status=$?
cp $run/log.jsonl "$OUT/grpo_log.jsonl" 2>/dev/null
cp $run/summary.json "$OUT/grpo_summary.json" 2>/dev/null
[ -d $run/trainer ] && tar -cf "$OUT/grpo_state.tar" -C $run/trainer --transform 's,^\.,grpo_state,' .
if [ "${RETURN_WEIGHTS:-0}" = 1 ] && [ -f $run/world.safetensors ]; then  # 2 files more (8 come back at most)
  split -b 15M $run/world.safetensors "$OUT/world-grpo.safetensors.part-"
fi
exit $status
