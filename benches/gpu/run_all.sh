#!/usr/bin/env bash
# One device call: kernel checks against emulation, then benchmarks. Results land in $OUT.
# The runtime reads its format constants from dqfast._core: have python/dqfast/_core.abi3.so there
# (an abi3 x86-64 build from `maturin develop` loads on the device's Python 3.12; run 8 did so).
#   FI_BUNDLE=DIR   a FlashInfer bundle made by ../shared/tools/flashinfer-bundle.sh (apache_tvm_ffi wheel,
#                   optional nvidia_cudnn_frontend wheel, flashinfer-trim.tar.gz or .tar.xz); unpacked to /tmp/fisite.
#                   DIR/fi-jit-cache.tar.gz, if present, restores FlashInfer's JIT builds of an earlier run.
#   CHECK_S / BENCH_S  time limits of the two steps (s); extra arguments go to bench_linear.py.
set -uo pipefail
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
export PYTHONPATH=python${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if [ -n "${FI_BUNDLE:-}" ]; then
  FISITE=/tmp/fisite
  mkdir -p "$FISITE" /tmp/fiws
  python3 -m pip install -q --no-index --no-deps --target "$FISITE" "$FI_BUNDLE"/*.whl
  for t in "$FI_BUNDLE"/flashinfer-trim.tar.*; do tar -xf "$t" -C "$FISITE"; done
  [ -f "$FI_BUNDLE/fi-jit-cache.tar.gz" ] && tar -xzf "$FI_BUNDLE/fi-jit-cache.tar.gz" -C /tmp/fiws
  export PYTHONPATH=$PYTHONPATH:$FISITE FLASHINFER_WORKSPACE_BASE=/tmp/fiws FLASHINFER_CUDA_ARCH_LIST=9.0a
  CUDA_HOME=$(dirname "$(dirname "$(which nvcc)")")
  export CUDA_HOME
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv > "$OUT/device.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())" >> "$OUT/device.txt" 2>&1
python3 -c "import flashinfer; print('flashinfer', flashinfer.__version__)" >> "$OUT/device.txt" 2>&1 || echo "flashinfer: not importable" >> "$OUT/device.txt"
python3 -c "import cudnn; print('cudnn frontend', cudnn.__version__, 'backend', cudnn.backend_version())" >> "$OUT/device.txt" 2>&1 || echo "cudnn frontend: not importable" >> "$OUT/device.txt"
cat "$OUT/device.txt"
timeout "${CHECK_S:-300}" python3 benches/gpu/check_kernels.py --out "$OUT" > "$OUT/check.log" 2>&1
echo "check exit $?"; grep -E "^FAIL|checks:" "$OUT/check.log" | cut -c1-400
if [ -d /tmp/fiws/.cache ]; then
  tar -czf "$OUT/fi-jit-cache.tar.gz" -C /tmp/fiws .cache && ls -la "$OUT/fi-jit-cache.tar.gz"
fi
timeout "${BENCH_S:-280}" python3 benches/gpu/bench_linear.py --out "$OUT" "$@" > "$OUT/bench.log" 2>&1
echo "bench exit $?"
