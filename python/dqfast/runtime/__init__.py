"""Torch runtime for dqfast checkpoints: FP8 / NVFP4 Linear modules and a loader.

Requires torch (and safetensors for loading); Triton and FlashInfer are optional.
`CudaGraphRunner` replays a loaded model under CUDA graphs; `autotune` picks FP8 GEMM back ends
per GPU and shape (cached on disk).
"""

from .graphs import CudaGraphRunner
from .linear import (
    FP4_BACKENDS,
    FP8_BACKENDS,
    Fp8Linear,
    Nvfp4Linear,
    fp8_linear_from_float,
    fuse_fp8_linears,
    fuse_nvfp4_linears,
    nvfp4_linear_from_float,
    resolve_fp4_backend,
    resolve_fp8_backend,
)
from .loader import CheckpointMismatch, LoadReport, QuantSpec, load_quantized, read_quant_spec

__all__ = [
    "FP4_BACKENDS",
    "FP8_BACKENDS",
    "CheckpointMismatch",
    "CudaGraphRunner",
    "Fp8Linear",
    "LoadReport",
    "Nvfp4Linear",
    "QuantSpec",
    "fp8_linear_from_float",
    "fuse_fp8_linears",
    "fuse_nvfp4_linears",
    "load_quantized",
    "nvfp4_linear_from_float",
    "read_quant_spec",
    "resolve_fp4_backend",
    "resolve_fp8_backend",
]
