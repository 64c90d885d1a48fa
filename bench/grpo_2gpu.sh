#!/usr/bin/env bash
# GRPO across the GPUs of one host (issue 7's multi-GPU check), in one call on an nvidia-h200-x2
# machine (carry .whl with MiniLM packed, as for bench/world_gpu.sh):
#   bash bench/grpo_2gpu.sh [RANKS]
# 1. the bundled world: `torchrun -m spiral_rt.world.grpo`: every rank rolls out its own goal
#    (prefix, fork, G members, critic), rewards are gathered, gradients all-reduced (DDP);
# 2. Wan2.1-1.3B with random weights at 832x480: one `spiral-rt rollout` batch per rank (each on its
#    own GPU, at the same time), then `torchrun ... spiral-rt train-grpo`, one step over both.
# Logs and the runs' summaries come back in $OUT; the last lines print a short table.
set -uo pipefail
cd "$(dirname "$0")/.."
ranks=${1:-2}
source bench/gpu_env.sh
OUT=${OUT:-/tmp/spiral_rt_out}
nvidia-smi -L
status=0

echo "== world GRPO on $ranks ranks"
t0=$(date +%s)
timeout 240 torchrun --standalone --nproc_per_node "$ranks" -m spiral_rt.world.grpo --out /tmp/world-grpo-ddp \
  --iterations 8 --group-size 8 --no-progress > "$OUT/world_grpo_ddp.log" 2>&1 || status=1
world_s=$(( $(date +%s) - t0 ))
tail -5 "$OUT/world_grpo_ddp.log"
cp /tmp/world-grpo-ddp/log.jsonl "$OUT/world_grpo_ddp.jsonl" 2>/dev/null

echo "== Wan2.1-1.3B (random weights): one rollout batch per rank, then train-grpo on $ranks ranks"
t0=$(date +%s)
goals=("move the red circle to the left, then make it grow" "make the blue square smaller, then move it up")
pids=()
for r in $(seq 0 $(( ranks - 1 ))); do
  # one seed for every rank: it is also the random weights' seed, and train-grpo checks they match
  CUDA_VISIBLE_DEVICES=$r timeout 240 spiral-rt rollout "${goals[$(( r % 2 ))]}" --random-weights --config wan2.1-t2v-1.3b \
    --group-size 4 --chunks 3 --fork-chunk 1 --seed 7 --planner none --critic world \
    --out /tmp/wan-rollout-$r --no-frames --no-progress > "$OUT/wan_rollout_$r.log" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || status=1; done
rollout_s=$(( $(date +%s) - t0 ))
batches=$(for r in $(seq 0 $(( ranks - 1 ))); do printf '/tmp/wan-rollout-%s ' "$r"; done)
t0=$(date +%s)
timeout 240 torchrun --standalone --nproc_per_node "$ranks" -m spiral_rt.cli train-grpo --batches $batches \
  --random-weights --config wan2.1-t2v-1.3b --out /tmp/wan-grpo-ddp --steps 1 --lora-rank 16 \
  --gradient-checkpointing --micro-batch-size 2 --no-progress > "$OUT/wan_train_ddp.log" 2>&1 || status=1
train_s=$(( $(date +%s) - t0 ))
tail -5 "$OUT/wan_train_ddp.log"
cp /tmp/wan-grpo-ddp/log.jsonl "$OUT/wan_train_ddp.jsonl" 2>/dev/null
for r in $(seq 0 $(( ranks - 1 ))); do cp /tmp/wan-rollout-$r/summary.json "$OUT/wan_rollout_${r}_summary.json" 2>/dev/null; done

echo "stage                         seconds"
echo "world GRPO, 8 iterations      $world_s"
echo "Wan rollouts (one per rank)   $rollout_s"
echo "Wan train-grpo, 1 step        $train_s"
echo "exit status: $status"
exit $status
