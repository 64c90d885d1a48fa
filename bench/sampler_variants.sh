#!/usr/bin/env bash
# Run on the GPU machine from the repository root: bash bench/sampler_variants.sh (prints one line per variant and batch).
# Build sampler-step variants (sed over a copy of csrc) and time each with the harness.
cd "$(dirname "$0")/.."
build() {  # name, sed expressions...
  local name=$1; shift
  local d=/tmp/sv/$name; mkdir -p $d; cp csrc/*.cu csrc/*.h $d/
  for e in "$@"; do sed -i "$e" $d/sampler_step.cu $d/philox.h; done
  nvcc -O3 -std=c++17 --expt-relaxed-constexpr -arch=sm_90a -I$d -o $d/bench bench/sampler_harness.cu $d/sampler_step.cu > $d/build.log 2>&1 || { echo "$name build failed"; tail -5 $d/build.log; }
  nvcc -O3 -std=c++17 --expt-relaxed-constexpr -arch=sm_90a -I$d --resource-usage -c -o $d/k.o $d/sampler_step.cu 2>&1 | grep -A3 "Compiling entry.*nv_bfloat16Lb1ELNS_9NoiseModeE2EEEv" | grep -E "spill|registers" | tr -s ' ' | tr '\n' ' ' > $d/regs.txt
}
FAST='s/const float r2 = -2.0f \* logf(u32_to_unit_open(a));/#if defined(__CUDA_ARCH__)\n  const float r2 = -2.0f * __logf(u32_to_unit_open(a));\n#else\n  const float r2 = -2.0f * logf(u32_to_unit_open(a));\n#endif/'
build base &
build fastlog "$FAST" &
build u4b3 's/constexpr int kUnroll = 2;/constexpr int kUnroll = 4;/' 's/constexpr int kMinBlocksPerSM = 4;/constexpr int kMinBlocksPerSM = 3;/' &
build fast_u4b3 "$FAST" 's/constexpr int kUnroll = 2;/constexpr int kUnroll = 4;/' 's/constexpr int kMinBlocksPerSM = 4;/constexpr int kMinBlocksPerSM = 3;/' &
build fast_b5 "$FAST" 's/constexpr int kMinBlocksPerSM = 4;/constexpr int kMinBlocksPerSM = 5;/' &
build fast_u1b8 "$FAST" 's/constexpr int kUnroll = 2;/constexpr int kUnroll = 1;/' 's/constexpr int kMinBlocksPerSM = 4;/constexpr int kMinBlocksPerSM = 8;/' &
build u3b3 's/constexpr int kUnroll = 2;/constexpr int kUnroll = 3;/' 's/constexpr int kMinBlocksPerSM = 4;/constexpr int kMinBlocksPerSM = 3;/' &
build fast_u3b3 "$FAST" 's/constexpr int kUnroll = 2;/constexpr int kUnroll = 3;/' 's/constexpr int kMinBlocksPerSM = 4;/constexpr int kMinBlocksPerSM = 3;/' &
wait
for v in base fastlog u3b3 fast_u3b3 u4b3 fast_u4b3 fast_b5 fast_u1b8; do
  echo "$v: $(cat /tmp/sv/$v/regs.txt)"
  for b in 8 16; do printf "%-10s " $v; /tmp/sv/$v/bench $b; done
done
