#!/usr/bin/env bash
# One device call: kernel checks against emulation, then benchmarks. Results land in $OUT.
set -uo pipefail
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
export PYTHONPATH=python PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv > "$OUT/device.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())" >> "$OUT/device.txt" 2>&1
python3 -c "import flashinfer; print('flashinfer', flashinfer.__version__)" >> "$OUT/device.txt" 2>&1 || echo "flashinfer: not importable" >> "$OUT/device.txt"
cat "$OUT/device.txt"
python3 benches/gpu/check_kernels.py --out "$OUT" 2>&1 | tee "$OUT/check.log"
python3 benches/gpu/bench_linear.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log"
