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
def _gemm_jit_module():
    """bmm_fp8's loaded JIT module (entry points bmm_fp8, bmm_fp8_get_algos, bmm_fp8_run_with_algo,
    as flashinfer 0.7.4's gemm_base calls them), or None when this FlashInfer lays its internals
    out differently (then the public API is used)."""
    try:
        from flashinfer.jit.gemm import gen_gemm_module

        mod = gen_gemm_module().build_and_load()
        for name in ("bmm_fp8", "bmm_fp8_get_algos", "bmm_fp8_run_with_algo"):
            getattr(mod, name)
    except Exception:
        return None
    return mod


ALGO_BYTES = 64  # sizeof(cublasLtMatmulAlgo_t), as FlashInfer's _CUBLASLT_ALGO_BYTES
MAX_ALGOS = 8  # cuBLASLt heuristic candidates kept per problem (it lists them best-guess first)
_ALGOS: dict[tuple, tuple[torch.Tensor, int]] = {}


def _algos(mod, a3: torch.Tensor, b3: torch.Tensor, out: torch.Tensor, sa, sb, ws) -> tuple[torch.Tensor, int]:
    key = (tuple(a3.shape), tuple(b3.shape), b3.stride(), a3.dtype, out.dtype, a3.device)
    hit = _ALGOS.get(key)
    if hit is None:
        buf = torch.empty(MAX_ALGOS * ALGO_BYTES, dtype=torch.uint8)  # host memory, as FlashInfer passes it
        hit = _ALGOS[key] = (buf, int(mod.bmm_fp8_get_algos(a3, b3, out, sa, sb, ws, buf)))
    return hit


def cublas_tactics(m: int, w_t3: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor, out_dtype: torch.dtype) -> int:
    """How many cuBLASLt algorithms bmm_fp8 can run for an [m, K] x [K, N] problem (0 without
    the JIT module): autotune times each as back end `flashinfer@<index>`."""
    mod = _gemm_jit_module()
    if mod is None:
        return 0
    k, n = w_t3.shape[1], w_t3.shape[2]
    a3 = torch.empty((1, m, k), dtype=torch.float8_e4m3fn, device=w_t3.device)
    out = torch.empty((1, m, n), dtype=out_dtype, device=w_t3.device)
    return _algos(mod, a3, w_t3, out, sa, sb, _workspace(w_t3.device, WORKSPACE_BYTES))[1]


def bmm_fp8(
    xq: torch.Tensor, w_t3: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor, out_dtype: torch.dtype, backend: str, tactic: int = -1
) -> torch.Tensor:
    """[M, K] e4m3 @ w_t3 ([1, K, N] column-major view of the [N, K] weight) -> [M, N].
    backend "cublas" with tactic >= 0 runs that cuBLASLt algorithm (if it exists for this exact
    problem; else the heuristic's first, as FlashInfer's own runner does)."""
    m, n = xq.shape[0], w_t3.shape[2]
    out = torch.empty((1, m, n), dtype=out_dtype, device=xq.device)
    ws = _workspace(xq.device, WORKSPACE_BYTES)
    mod = _gemm_jit_module() if backend == "cublas" else None
    if mod is not None:
        a3 = xq.unsqueeze(0)
        if tactic >= 0:
            buf, count = _algos(mod, a3, w_t3, out, sa, sb, ws)
            if tactic < count:
                mod.bmm_fp8_run_with_algo(a3, w_t3, out, sa, sb, ws, buf, tactic)
                return out.view(m, n)
        mod.bmm_fp8(a3, w_t3, out, sa, sb, ws)
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
