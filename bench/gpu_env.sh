# Sourced by the device scripts (run_gpu.sh, train_world_gpu.sh): the carried wheels and packed
# packages on the import path, then the editable build; logs go to $OUT.
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/spiral_rt_out}
if [ -z "${SPIRAL_RT_COMMIT:-}" ] && [ -s .whl/commit ]; then
  # the device's copy of the tree has a stale git history: the commit the caller wrote there labels the results
  export SPIRAL_RT_COMMIT=$(cat .whl/commit)
fi
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then  # wheels the machine lacks (diffusers, nvtx, av, fa3-fwd), carried along
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
if [ -d .whl/site_fp16 ]; then
  # installed packages whose safetensors were packed for the carry limit (bench/carry_pack.py: MiniLM's
  # 91 MB at fp16, or with int8 word embeddings): copied into the import path and widened back to fp32
  mkdir -p /tmp/site && cp -r .whl/site_fp16/. /tmp/site/ && export PYTHONPATH=/tmp/site
  python3 bench/carry_pack.py unpack /tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
build_start=$(date +%s)
python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
rm -f "$OUT/build.log"  # kept only when the build fails: the call returns at most 8 files
echo "build: $(( $(date +%s) - build_start )) s"
python3 -c "import spiral_rt._C as C; print('native:', C.build_info())"
