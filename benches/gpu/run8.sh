#!/usr/bin/env bash
# Run 8 (docs/runtime.md): kernel checks (no FlashInfer bundle), host time per call, one- vs
# two-launch FP8 by rows, and the whole FLUX.1-dev-sized model (NVFP4 W4A8 / FP8 / BF16, eager and
# compiled). Needs diffusers importable (DIT_WHEELS=DIR of wheels, installed to /tmp/site).
# Everything lands in R (default /tmp/run8) and, tarred, in $OUT/run8.tgz when OUT is set.
# Needs python/dqfast/_core.abi3.so beside the sources (the runtime's constants come from it).
set -uo pipefail
R=${R:-/tmp/run8}
mkdir -p "$R"
if [ -n "${DIT_WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$DIT_WHEELS"/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=python:$PYTHONPATH PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv > "$R/device.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" >> "$R/device.txt" 2>&1
nproc >> "$R/device.txt"; cat "$R/device.txt"
timeout "${CHECK_S:-240}" python3 benches/gpu/check_kernels.py --out "$R" > "$R/check.log" 2>&1
echo "check exit $?"; grep -E "^FAIL|checks:" "$R/check.log" | cut -c1-300
timeout "${BENCH_S:-200}" python3 benches/gpu/bench_linear.py --out "$R" --no-shapes --no-stack --no-graphs --crossover > "$R/bench.log" 2>&1
echo "bench exit $?"; grep -E "^host us" "$R/bench.log" | cut -c1-1500
timeout "${DIT_S:-240}" python3 benches/gpu/bench_dit.py --out "$R/dit" --only "${DIT_ONLY:-bf16,nvfp4_w4a8_all,fp8_triton_static_all,bf16_repeat,bf16_compiled,nvfp4_w4a8_all_compiled,nvfp4_w4a8_all_compiled_custom_op}" > "$R/dit.log" 2>&1
echo "dit exit $?"; tail -15 "$R/dit/dit.md" 2>/dev/null
[ -n "${OUT:-}" ] && tar -czf "$OUT/run8.tgz" -C "$R" .
exit 0
