"""Triton kernels for the runtime (imported lazily; needs triton and, for speed, a GPU).

* `fp8_quant_per_token`: one pass per row -> amax, scale = amax/448, e4m3 cast (fused, so the
  activation is read once and written once instead of 3-4 eager kernels).
* `fp8_quant_static`: x / input_scale, clamp, e4m3 cast in one elementwise kernel.
* `nvfp4_w4a16_matmul`: Y = X @ dequant(W)^T with W packed E2M1 + e4m3 block scales,
  dequantized in registers (weights stay 4.5 bits/element in memory).

Divisions use div_rn so the bytes match the float32 torch reference exactly.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

E4M3_MAX = tl.constexpr(448.0)
MIN_AMAX = tl.constexpr(1e-12)
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _fp8_quant_row_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    K,
    stride_x,
    stride_q,
    BLOCK_K: tl.constexpr,
    ONE_PASS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    q_row = q_ptr + row * stride_q
    offs = tl.arange(0, BLOCK_K)
    if ONE_PASS:
        mask = offs < K
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=0)
        scale = tl.math.div_rn(tl.maximum(amax, MIN_AMAX), E4M3_MAX)
        q = tl.clamp(tl.math.div_rn(x, scale), -E4M3_MAX, E4M3_MAX)
        tl.store(q_row + offs, q.to(tl.float8e4nv), mask=mask)
    else:
        acc = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            mask = (k0 + offs) < K
            x = tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32)
            acc = tl.maximum(acc, tl.abs(x))
        amax = tl.max(acc, axis=0)
        scale = tl.math.div_rn(tl.maximum(amax, MIN_AMAX), E4M3_MAX)
        for k0 in range(0, K, BLOCK_K):
            mask = (k0 + offs) < K
            x = tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32)
            q = tl.clamp(tl.math.div_rn(x, scale), -E4M3_MAX, E4M3_MAX)
            tl.store(q_row + k0 + offs, q.to(tl.float8e4nv), mask=mask)
    tl.store(s_ptr + row, scale)


@triton.jit
def _fp8_quant_static_kernel(x_ptr, q_ptr, s_ptr, numel, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    scale = tl.load(s_ptr)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    q = tl.clamp(tl.math.div_rn(x, scale), -E4M3_MAX, E4M3_MAX)
    tl.store(q_ptr + offs, q.to(tl.float8e4nv), mask=mask)


def fp8_quant_per_token(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] (bf16/fp16/fp32, unit stride along K) -> (e4m3 [M, K], float32 scales [M, 1])."""
    m, k = x2d.shape
    if x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x2d.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x2d.device)
    if m == 0:
        return q, s
    block = triton.next_power_of_2(k)
    one_pass = block <= 16384
    if not one_pass:
        block = 4096
    warps = 4 if block <= 2048 else (8 if block <= 8192 else 16)
    _fp8_quant_row_kernel[(m,)](x2d, q, s, k, x2d.stride(0), q.stride(0), BLOCK_K=block, ONE_PASS=one_pass, num_warps=warps)
    return q, s


def fp8_quant_static(x2d: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """[M, K] -> e4m3 [M, K] with a fixed float32 scale (0-dim/1-element tensor on x's device)."""
    x2d = x2d.contiguous()
    q = torch.empty(x2d.shape, dtype=torch.float8_e4m3fn, device=x2d.device)
    n = x2d.numel()
    if n:
        block = 4096
        _fp8_quant_static_kernel[(triton.cdiv(n, block),)](x2d, q, scale, n, BLOCK=block, num_warps=8)
    return q


@triton.jit
def _e2m1_to_f32(codes):
    # Place (exp, mant) bits into an fp16 at bits 10..9: fp16 value * 2^14 is the E2M1 value,
    # subnormal code 1 (0.5) included, so no lookup table is needed.
    bits = ((codes & 7).to(tl.uint16) << 9) | ((codes & 8).to(tl.uint16) << 12)
    return bits.to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _nvfp4_w4a16_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    gs_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_sn,
    stride_ym,
    PER_CHANNEL_GS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SWAP_AB: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    offs_kb = tl.arange(0, BLOCK_K // 2)
    offs_ks = tl.arange(0, BLOCK_K // 16)

    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_kb[None, :]
    s_ptrs = s_ptr + offs_n[:, None].to(tl.int64) * stride_sn + offs_ks[None, :]

    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, K // BLOCK_K):
        x = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
        packed = tl.load(w_ptrs, mask=mask_n[:, None], other=0)
        scales = tl.load(s_ptrs, mask=mask_n[:, None], other=0.0).to(tl.float32) * 16384.0
        codes = tl.reshape(tl.join(packed & 0xF, packed >> 4), (BLOCK_N, BLOCK_K))
        vals = tl.reshape(_e2m1_to_f32(codes), (BLOCK_N, BLOCK_K // 16, 16))
        w = tl.reshape(vals * scales[:, :, None], (BLOCK_N, BLOCK_K)).to(x.dtype)
        if SWAP_AB:
            acc = tl.dot(w, tl.trans(x), acc)
        else:
            acc = tl.dot(x, tl.trans(w), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K // 2
        s_ptrs += BLOCK_K // 16

    if SWAP_AB:
        acc = tl.trans(acc)
    if PER_CHANNEL_GS:
        gs = tl.load(gs_ptr + offs_n, mask=mask_n, other=0.0)
        acc = acc * gs[None, :]
    else:
        acc = acc * tl.load(gs_ptr)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _nvfp4_dequant_kernel(
    w_ptr,
    s_ptr,
    gs_ptr,
    o_ptr,
    N,
    K,
    stride_wn,
    stride_sn,
    stride_on,
    PER_CHANNEL_GS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    kb = pid_k * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
    ks = pid_k * (BLOCK_K // 16) + tl.arange(0, BLOCK_K // 16)
    packed = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + kb[None, :], mask=mask_n[:, None], other=0)
    scales = (
        tl.load(s_ptr + offs_n[:, None].to(tl.int64) * stride_sn + ks[None, :], mask=mask_n[:, None], other=0.0).to(tl.float32) * 16384.0
    )
    if PER_CHANNEL_GS:
        gs = tl.load(gs_ptr + offs_n, mask=mask_n, other=0.0)
        scales = scales * gs[:, None]
    else:
        scales = scales * tl.load(gs_ptr)
    codes = tl.reshape(tl.join(packed & 0xF, packed >> 4), (BLOCK_N, BLOCK_K))
    vals = tl.reshape(_e2m1_to_f32(codes), (BLOCK_N, BLOCK_K // 16, 16))
    w = tl.reshape(vals * scales[:, :, None], (BLOCK_N, BLOCK_K))
    ko = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    tl.store(o_ptr + offs_n[:, None].to(tl.int64) * stride_on + ko[None, :], w.to(o_ptr.dtype.element_ty), mask=mask_n[:, None])


def nvfp4_dequantize(
    packed: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Packed NVFP4 [N, K/2] -> [N, K] in `dtype` (global scale folded in, one rounding)."""
    n, kh = packed.shape
    k = kh * 2
    block_k = 128 if k % 128 == 0 else (64 if k % 64 == 0 else 32)
    if k % block_k:
        raise ValueError(f"K={k} must be a multiple of 32")
    out = torch.empty((n, k), dtype=dtype, device=packed.device)
    gs = global_scale.float().reshape(-1)
    grid = (triton.cdiv(n, 64), k // block_k)
    _nvfp4_dequant_kernel[grid](
        packed,
        block_scale,
        gs,
        out,
        n,
        k,
        packed.stride(0),
        block_scale.stride(0),
        out.stride(0),
        PER_CHANNEL_GS=gs.numel() > 1,
        BLOCK_N=64,
        BLOCK_K=block_k,
        num_warps=4,
    )
    return out


def nvfp4_dequant_matmul(
    x2d: torch.Tensor, packed: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Large-M path: dequantize the weight to a transient bf16 buffer, then a cuBLAS GEMM.
    Weight memory at rest stays NVFP4; the buffer lives for one layer call."""
    w = nvfp4_dequantize(packed, block_scale, global_scale, x2d.dtype)
    return torch.nn.functional.linear(x2d, w, bias)


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, SWAP_AB)
W4A16_CONFIGS: list[tuple[int, int, int, int, int, bool]] = [
    (128, 128, 64, 8, 4, False),
    (128, 256, 64, 8, 3, False),
    (128, 128, 128, 8, 3, False),
    (64, 128, 128, 4, 4, True),
    (128, 128, 64, 8, 4, True),
    (64, 64, 128, 4, 4, True),
    (16, 128, 128, 4, 4, True),
    (128, 256, 128, 8, 3, False),
    (256, 128, 64, 8, 3, False),
    (128, 128, 64, 4, 4, False),
]


def default_w4a16_config(m: int, n: int, k: int) -> tuple[int, int, int, int, int, bool]:
    """Heuristic tile choice; overridable with DQFAST_W4A16_CONFIG="bm,bn,bk,warps,stages,swap"."""
    env = os.environ.get("DQFAST_W4A16_CONFIG")
    if env:
        bm, bn, bk, nw, ns, sw = (int(v) for v in env.split(","))
        return bm, bn, bk, nw, ns, bool(sw)
    if m <= 32:
        cfg = (16, 128, 128, 4, 4, True)
    elif m <= 256:
        cfg = (64, 64, 128, 4, 4, True)
    else:
        cfg = (128, 128, 64, 8, 4, False)
    return cfg


def nvfp4_w4a16_matmul(
    x2d: torch.Tensor,
    packed: torch.Tensor,
    block_scale: torch.Tensor,
    global_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: tuple[int, int, int, int, int, bool] | None = None,
) -> torch.Tensor:
    """Y[M, N] = X[M, K] @ dequant(W)^T * global_scale (+ bias), in X's dtype (bf16/fp16)."""
    m, k = x2d.shape
    n = packed.shape[0]
    if packed.shape[1] * 2 != k or block_scale.shape != (n, k // 16):
        raise ValueError(f"shape mismatch: x {tuple(x2d.shape)}, weight {tuple(packed.shape)}, scales {tuple(block_scale.shape)}")
    if x2d.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError("W4A16 kernel takes bf16/fp16 activations")
    x2d = x2d.contiguous()
    bm, bn, bk, nw, ns, swap = config or default_w4a16_config(m, n, k)
    while bk > 32 and k % bk:
        bk //= 2
    if k % bk:
        raise ValueError(f"K={k} must be a multiple of 32")
    y = torch.empty((m, n), dtype=x2d.dtype, device=x2d.device)
    if m == 0:
        return y
    gs = global_scale.float().reshape(-1)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _nvfp4_w4a16_kernel[grid](
        x2d,
        packed,
        block_scale,
        gs,
        bias if bias is not None else gs,
        y,
        m,
        n,
        k,
        x2d.stride(0),
        packed.stride(0),
        block_scale.stride(0),
        y.stride(0),
        PER_CHANNEL_GS=gs.numel() > 1,
        HAS_BIAS=bias is not None,
        SWAP_AB=swap,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        GROUP_M=8,
        num_warps=nw,
        num_stages=ns,
    )
    return y
