"""FlashInfer FP8 GEMMs for `Fp8Linear` (optional dependency, imported lazily).

Per-call cost matters at diffusion sizes (M = 1024 layers run in ~30 us), so the cuBLASLt path
calls bmm_fp8's loaded JIT module directly instead of `flashinfer.bmm_fp8`, whose wrapper checks
the problem, builds a runner and consults FlashInfer's autotuner on every call. The direct call
takes the same arguments the wrapper passes (flashinfer 0.7.4 `get_gemm_module`); if that
internal entry point is missing, the public API is used instead.

On SM90 FlashInfer has no CUTLASS GEMM with per-tensor FP8 scales (`bmm_fp8(backend="cutlass")`
and `mm_fp8(backend="cutlass")` require SM100+); its CUTLASS SM90 grouped GEMM (`SegmentGEMMWrapper`,
backend "sm90") multiplies e4m3 operands into bf16 without scales, so `gemm_cutlass` runs it
with one group and applies input_scale * weight_scale and the bias in one `addcmul` after it.
"""

from __future__ import annotations

import functools

import torch

WORKSPACE_BYTES = 32 * 1024 * 1024
SEGMENT_WORKSPACE_BYTES = 128 * 1024 * 1024  # FlashInfer's recommended size for segment GEMM


@functools.cache
def _workspace(device: torch.device, nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, device=device)


@functools.cache
def _direct_bmm_fp8():
    """bmm_fp8's cuBLASLt entry point of the JIT module (args: a, b, out, scale_a, scale_b,
    workspace), or None when this FlashInfer lays its internals out differently."""
    try:
        from flashinfer.jit.gemm import gen_gemm_module

        fn = gen_gemm_module().build_and_load().bmm_fp8
    except Exception:
        return None
    return fn


def bmm_fp8(xq: torch.Tensor, w_t3: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor, out_dtype: torch.dtype, backend: str) -> torch.Tensor:
    """[M, K] e4m3 @ w_t3 ([1, K, N] column-major view of the [N, K] weight) -> [M, N]."""
    m, n = xq.shape[0], w_t3.shape[2]
    out = torch.empty((1, m, n), dtype=out_dtype, device=xq.device)
    ws = _workspace(xq.device, WORKSPACE_BYTES)
    direct = _direct_bmm_fp8() if backend == "cublas" else None
    if direct is not None:
        direct(xq.unsqueeze(0), w_t3, out, sa, sb, ws)
    else:
        import flashinfer

        flashinfer.bmm_fp8(xq.unsqueeze(0), w_t3, sa, sb, out_dtype, out=out, backend=backend)
    return out.view(m, n)


@functools.cache
def _segment_gemm(device: torch.device):
    from flashinfer.gemm import SegmentGEMMWrapper

    return SegmentGEMMWrapper(_workspace(device, SEGMENT_WORKSPACE_BYTES), backend="sm90")


@functools.cache
def _indptr(m: int, device: torch.device) -> torch.Tensor:
    return torch.tensor([0, m], dtype=torch.int64, device=device)


def gemm_cutlass(
    xq: torch.Tensor, w3: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype, capability: tuple[int, int]
) -> torch.Tensor:
    """CUTLASS FP8 GEMM: y = alpha * (xq @ w^T) + bias; w3 is the [1, N, K] weight, alpha 0-dim float32."""
    if capability >= (10, 0):
        import flashinfer

        m, n = xq.shape[0], w3.shape[1]
        out = torch.empty((1, m, n), dtype=out_dtype, device=xq.device)
        one = torch.ones((), dtype=torch.float32, device=xq.device)
        flashinfer.bmm_fp8(xq.unsqueeze(0), w3.transpose(1, 2), alpha, one, out_dtype, out=out, backend="cutlass")
        y = out.view(m, n)
        return y.add_(bias) if bias is not None else y
    if capability[0] != 9:
        raise NotImplementedError(f"FlashInfer CUTLASS FP8 GEMM: no kernel for SM{capability[0]}{capability[1]}")
    raw = torch.empty((xq.shape[0], w3.shape[1]), dtype=torch.bfloat16, device=xq.device)
    _segment_gemm(xq.device).run(xq, w3, 1, True, out=raw, seg_indptr=_indptr(xq.shape[0], xq.device))
    if bias is None:
        return raw.mul_(alpha) if out_dtype == torch.bfloat16 else (raw * alpha).to(out_dtype)
    return torch.addcmul(bias.to(raw.dtype), raw, alpha).to(out_dtype)
