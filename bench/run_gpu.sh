#!/usr/bin/env bash
# One call on the GPU machine: build the package, run the GPU tests, run benchmarks.
#   bash bench/run_gpu.sh [pytest target ...] -- [benchmark ...]
# A benchmark is a script path, with its arguments in the same quoted word (shell-quoted inside it
# where an argument has spaces: the word is run through eval):
#   bash bench/run_gpu.sh tests/ops -- bench/bench_sampler_step.py "bench/bench_attention.py --no-ws"
# One log ($OUT/run.log: the tests, then each benchmark under a "== name" header) and the result JSON
# go to $OUT (when set), so they come back from the device machine, which returns at most 8 files.
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_env.sh
start=$build_start
tests=(); benches=(); seen_sep=0
for a in "$@"; do
  if [ "$a" = "--" ]; then seen_sep=1; elif [ $seen_sep = 0 ]; then tests+=("$a"); else benches+=("$a"); fi
done
status=0
log="$OUT/run.log"
if [ ${#tests[@]} -gt 0 ]; then
  echo "== pytest -m gpu ${tests[*]}" >> "$log"
  python3 -m pytest -m gpu -q -p no:cacheprovider "${tests[@]}" 2>&1 | tee -a "$log" | tail -25
  status=${PIPESTATUS[0]}
fi
for b in "${benches[@]}"; do
  echo "== $b" | tee -a "$log"
  eval "python3 $b" 2>&1 | tee -a "$log" | grep -v '^{' | tail -30
done
echo "gpu tests exit status: $status; total $(( $(date +%s) - start )) s"
exit $status
