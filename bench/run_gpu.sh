#!/usr/bin/env bash
# One call on the GPU machine: build the package, run the GPU tests, run benchmarks.
#   bash bench/run_gpu.sh [pytest target ...] -- [benchmark ...]
# A benchmark is a script path, with its arguments in the same quoted word:
#   bash bench/run_gpu.sh tests/ops -- bench/bench_sampler_step.py "bench/bench_attention.py --no-ws"
# Logs and result JSON go to $OUT (when set) so they come back from the device machine.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/spiral_rt_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then  # wheels the machine lacks (diffusers, nvtx, av, fa3-fwd), carried along
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
if [ -d .whl/site_fp16 ]; then
  # installed packages whose safetensors were packed for the carry limit (bench/carry_pack.py: MiniLM's
  # 91 MB at fp16, or with int8 word embeddings): copied into the import path and widened back to fp32
  mkdir -p /tmp/site && cp -r .whl/site_fp16/. /tmp/site/ && export PYTHONPATH=/tmp/site
  python3 bench/carry_pack.py unpack /tmp/site
fi
tests=(); benches=(); seen_sep=0
for a in "$@"; do
  if [ "$a" = "--" ]; then seen_sep=1; elif [ $seen_sep = 0 ]; then tests+=("$a"); else benches+=("$a"); fi
done
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
start=$(date +%s)
python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s"
python3 -c "import spiral_rt._C as C; print('native:', C.build_info())"
status=0
if [ ${#tests[@]} -gt 0 ]; then
  python3 -m pytest -m gpu -q -p no:cacheprovider "${tests[@]}" 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
  status=${PIPESTATUS[0]}
fi
for b in "${benches[@]}"; do
  echo "== $b"
  script=${b%% *}
  if [ "$script" = "-m" ]; then rest=${b#-m }; script=${rest%% *}; fi  # "-m package.module args": log named after the module
  python3 $b 2>&1 | tee "$OUT/$(basename -- "$script" .py).log" | grep -v '^{' | tail -30
done
echo "gpu tests exit status: $status; total $(( $(date +%s) - start )) s"
exit $status
