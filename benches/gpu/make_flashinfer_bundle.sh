#!/usr/bin/env bash
# FlashInfer bundle for benches/gpu/run_all.sh (FI_BUNDLE=DEST_DIR), made where pip reaches the registry.
# Same idea as ../shared/tools/flashinfer-bundle.sh (trimmed flashinfer-python + apache-tvm-ffi wheel), with what
# the runtime's GEMM back ends need on SM90: the CUTLASS SM90 grouped-GEMM sources (group_gemm_sm90.cu,
# flashinfer_gemm_sm90_binding.cu, group_gemm_sm90_kernel_inst.jinja), the cuDNN frontend wheel (bmm_fp8
# backend="cudnn"), gzip instead of xz (xz took >10 min on a 2-core machine), and the kernel sources of
# unrelated packages (MoE, attention, experimental: ~100 MB in 0.7.4) left out. Measured: ~45 MB in all.
# usage: make_flashinfer_bundle.sh DEST_DIR [FLASHINFER_VERSION]
set -euo pipefail
DEST=$(mkdir -p "$1" && cd "$1" && pwd); V=${2:-0.7.4}
KEEP_CU="bmm_fp8.cu group_gemm.cu flashinfer_gemm_binding.cu group_gemm_sm90.cu flashinfer_gemm_sm90_binding.cu"
T=$(mktemp -d); trap 'rm -rf "$T"' EXIT
pipdl() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 -d "$T" "$@"; }
pipdl "flashinfer-python==$V" "apache-tvm-ffi<0.2,>=0.1.11" nvidia-cudnn-frontend
cp "$T"/apache_tvm_ffi*.whl "$T"/nvidia_cudnn_frontend*.whl "$DEST/"
mkdir "$T/x"; (cd "$T/x" && python3 -m zipfile -e "$T"/flashinfer_python-*.whl .)
cd "$T/x"
SKIP='^flashinfer/(experimental|moe_ep|fused_moe|gdn_kernels|cake_[a-z0-9_]*|prims_ts|comm|attention|cute_dsl)/.*\.(h|hpp|cuh|inc|cu)$'
{ find flashinfer -type f \( -name '*.py' -o -name '*.json' -o -name '*.h' -o -name '*.hpp' -o -name '*.cuh' -o -name '*.inc' \) -not -path 'flashinfer/data/*'
  find flashinfer/data/include flashinfer/data/cutlass flashinfer/data/cccl flashinfer/data/spdlog -type f
  find flashinfer/data/csrc -maxdepth 1 -type f \( -name '*.h' -o -name '*.cuh' -o -name '*.hpp' \)
  for f in $KEEP_CU; do find flashinfer/data/csrc -name "$f"; done
  echo flashinfer/data/csrc/group_gemm_sm90_kernel_inst.jinja
  find . -maxdepth 1 -name '*.dist-info' -type d | sed 's#^\./##'
} | grep -v -E "$SKIP" | sort -u > "$T/list"
tar -czf "$DEST/flashinfer-trim.tar.gz" -T "$T/list"
du -sh "$DEST"/*
