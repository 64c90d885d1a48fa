#!/usr/bin/env bash
# Run on the GPU machine from the repository root: bash bench/sampler_variants.sh [BASE_REV]
# Builds sampler-step variants (sed over a copy of csrc; "base" is csrc at BASE_REV when given)
# and times each with bench/sampler_harness.cu: one line per variant, batch and noise mode.
cd "$(dirname "$0")/.."
build() {  # name, sed expressions... (the sources come from csrc, sampler_step.cu from $KERNEL_REV if set)
  local name=$1; shift
  local d=/tmp/sv/$name; mkdir -p $d; cp csrc/*.cu csrc/*.h $d/
  [ -n "$KERNEL_REV" ] && git show "$KERNEL_REV:csrc/sampler_step.cu" > $d/sampler_step.cu
  for e in "$@"; do sed -i "$e" $d/sampler_step.cu $d/philox.h; done
  nvcc -O3 -std=c++17 --expt-relaxed-constexpr -arch=sm_90a -I$d -o $d/bench bench/sampler_harness.cu $d/sampler_step.cu > $d/build.log 2>&1 || { echo "$name build failed"; tail -5 $d/build.log; }
  nvcc -O3 -std=c++17 --expt-relaxed-constexpr -arch=sm_90a -I$d --resource-usage -c -o $d/k.o $d/sampler_step.cu 2>&1 | grep -A3 "Compiling entry.*nv_bfloat16Lb1ELNS_9NoiseModeE2EEEv" | grep -E "spill|registers" | tr -s ' ' | tr '\n' ' ' > $d/regs.txt
}
FAST='s/const float r2 = -2.0f \* logf(u32_to_unit_open(a));/#if defined(__CUDA_ARCH__)\n  const float r2 = -2.0f * __logf(u32_to_unit_open(a));\n#else\n  const float r2 = -2.0f * logf(u32_to_unit_open(a));\n#endif/'
U() { echo "s/constexpr int kUnroll = [0-9];/constexpr int kUnroll = $1;/"; }
BL() { echo "s/constexpr int kMinBlocksPerSM = [0-9];/constexpr int kMinBlocksPerSM = $1;/"; }
VARIANTS=${VARIANTS:-"cur fast u3b3 fast_u3b3 u1b8 b5"}
if [ -n "$1" ]; then
  KERNEL_REV=$1 build base &
  VARIANTS="base $VARIANTS"
fi
build cur &
build fast "$FAST" &
build u3b3 "$(U 3)" "$(BL 3)" &
build fast_u3b3 "$FAST" "$(U 3)" "$(BL 3)" &
build u1b8 "$(U 1)" "$(BL 8)" &
build b5 "$(BL 5)" &
wait
for v in $VARIANTS; do
  echo "$v: $(cat /tmp/sv/$v/regs.txt)"
  for b in 8 16; do for noise in 2 0; do printf "%-10s " $v; /tmp/sv/$v/bench $b $noise; done; done
done
