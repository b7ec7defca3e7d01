"""Triton kernels for the runtime (imported lazily; needs triton and, for speed, a GPU).

* `fp8_quant_per_token`: one pass per row -> amax, scale = amax/448, e4m3 cast (fused, so the
  activation is read once and written once instead of 3-4 eager kernels).
* `fp8_quant_static`: x / input_scale, clamp, e4m3 cast in one elementwise kernel.
* `nvfp4_w4a16_matmul`: Y = X @ dequant(W)^T with W packed E2M1 + e4m3 block scales,
  dequantized in registers (weights stay 4.5 bits/element in memory).
* `nvfp4_to_e4m3`: NVFP4 weight -> transient e4m3 weight with one float32 scale per output
  channel (the W4A8 path: an FP8 GEMM instead of a BF16 one on GPUs without FP4 tensor cores).

Divisions use div_rn so the bytes match the float32 torch reference exactly.

Launches go through `_Launcher`: Triton's own `kernel[grid](...)` spends ~15-30 us of host time
per call binding and specializing arguments; the launcher keys the compiled kernel on the same
specialization facts (dtype, 16-byte alignment of each pointer, int divisibility/size, constexpr
values) and calls Triton's C launcher directly. The first call of each key goes through Triton.
`DQFAST_TRITON_FAST_LAUNCH=0` turns this off.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import quant as Q

E4M3_MAX = tl.constexpr(Q.E4M3_MAX)
MIN_AMAX = tl.constexpr(Q.MIN_AMAX)
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _arg_spec(v) -> tuple:
    # The facts Triton specializes a compiled kernel on (see triton.runtime.jit): pointer dtype and
    # 16-byte alignment; int divisibility by 16, ==1, and 32/64-bit width. Finer is safe, coarser not.
    if isinstance(v, torch.Tensor):
        return (v.dtype, v.data_ptr() % 16 == 0)
    if isinstance(v, bool) or v is None:
        return (type(v), v)
    if isinstance(v, int):
        return (int, v % 16 == 0, v == 1, -(2**31) <= v < 2**31)
    return (type(v),)


class _Launcher:
    """Low-host-overhead launcher for one @triton.jit kernel whose constexpr parameters all come
    after its runtime parameters. Call as `launcher(grid, *runtime_args, **constexprs_and_options)`."""

    def __init__(self, fn) -> None:
        self.fn = fn
        self.cache: dict = {}
        self.enabled = os.environ.get("DQFAST_TRITON_FAST_LAUNCH", "1") != "0" and not _INTERPRET
        self.fast_calls = 0
        try:
            from triton import knobs  # Triton >= 3.4
            from triton.runtime import driver

            self._knobs, self._driver = knobs, driver
            params = list(fn.params)
            n_rt = sum(not p.is_constexpr for p in params)
            if any(p.is_constexpr for p in params[:n_rt]):
                self.enabled = False  # a constexpr between runtime args: positional order would differ
            self._constexpr_names = [p.name for p in params[n_rt:]]
        except Exception:  # an older/newer Triton without these internals: plain launches
            self.enabled = False

    def __call__(self, grid: tuple, *args, **meta):
        if not self.enabled:
            return self.fn[grid](*args, **meta)
        # Call sites pass the keyword arguments in a fixed order, so no sorting: another order
        # would only be a cache miss (a launch through Triton), never a wrong kernel.
        key = (tuple(map(_arg_spec, args)), tuple(meta.items()))
        hit = self.cache.get(key)
        if hit is None:
            kernel = self.fn[grid](*args, **meta)  # compiles/launches through Triton; returns the kernel
            if kernel is not None:
                self.cache[key] = (kernel, tuple(meta[n] for n in self._constexpr_names))
            return kernel
        kernel, constexprs = hit
        drv = self._driver.active
        stream = drv.get_current_stream(drv.get_current_device())
        g1 = grid[1] if len(grid) > 1 else 1
        g2 = grid[2] if len(grid) > 2 else 1
        if _hooks_idle():
            # Tensors as integer addresses: Triton's C launcher would call data_ptr() and query
            # the driver about each pointer (callers pass CUDA tensors only).
            full = (*(a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args), *constexprs)
            kernel.run(grid[0], g1, g2, stream, kernel.function, kernel.packed_metadata, None, None, None, *full)
        else:
            full = (*args, *constexprs)
            knobs = self._knobs.runtime
            kernel.run(
                grid[0],
                g1,
                g2,
                stream,
                kernel.function,
                kernel.packed_metadata,
                kernel.launch_metadata(grid, stream, *full),
                knobs.launch_enter_hook,
                knobs.launch_exit_hook,
                *full,
            )
        self.fast_calls += 1
        return kernel


@triton.jit
def _quant_row(x_ptr, q_ptr, s_ptr, row, K, stride_x, stride_q, BLOCK_K: tl.constexpr, ONE_PASS: tl.constexpr):
    # One row -> amax, scale = amax / 448, e4m3(x / scale); shared by the per-token kernel and
    # the W4A8 prepare kernel.
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
    _quant_row(x_ptr, q_ptr, s_ptr, tl.program_id(0).to(tl.int64), K, stride_x, stride_q, BLOCK_K, ONE_PASS)


@triton.jit
def _fp8_quant_static_kernel(x_ptr, q_ptr, s_ptr, numel, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    scale = tl.load(s_ptr)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    q = tl.clamp(tl.math.div_rn(x, scale), -E4M3_MAX, E4M3_MAX)
    tl.store(q_ptr + offs, q.to(tl.float8e4nv), mask=mask)


_ROW = _Launcher(_fp8_quant_row_kernel)
_STATIC = _Launcher(_fp8_quant_static_kernel)


def fp8_quant_per_token(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] (bf16/fp16/fp32, unit stride along K) -> (e4m3 [M, K], float32 scales [M, 1])."""
    m, k = x2d.shape
    if x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x2d.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x2d.device)
    if m == 0:
        return q, s
    block, one_pass = _row_block(k)
    warps = 4 if block <= 2048 else (8 if block <= 8192 else 16)
    _ROW((m,), x2d, q, s, k, x2d.stride(0), q.stride(0), BLOCK_K=block, ONE_PASS=one_pass, num_warps=warps)
    return q, s


def _row_block(k: int) -> tuple[int, bool]:
    """Per-token quantization's block along K: the whole row in registers up to 16384, else two
    passes of 4096."""
    block = triton.next_power_of_2(k)
    return (block, True) if block <= 16384 else (4096, False)


def fp8_quant_static(x2d: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """[M, K] -> e4m3 [M, K] with a fixed float32 scale (0-dim/1-element tensor on x's device)."""
    if not x2d.is_contiguous():
        x2d = x2d.contiguous()
    q = torch.empty(x2d.shape, dtype=torch.float8_e4m3fn, device=x2d.device)
    n = x2d.numel()
    if n:
        _STATIC(((n + 4095) // 4096,), x2d, q, scale, n, BLOCK=4096, num_warps=8)
    return q


@triton.jit
def _e2m1_to_f32(codes):
    # Place (exp, mant) bits into an fp16 at bits 10..9: fp16 value * 2^14 is the E2M1 value,
    # subnormal code 1 (0.5) included, so no lookup table is needed.
    bits = ((codes & 7).to(tl.uint16) << 9) | ((codes & 8).to(tl.uint16) << 12)
    return bits.to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _nvfp4_tile(w_ptr, s_ptr, N, stride_wn, stride_sn, pid_n, pid_k, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Tile (pid_n, pid_k) of a packed NVFP4 weight: its rows and row mask, the E2M1 values * 2^-14
    # [BLOCK_N, BLOCK_K // 16, 16] and the block scales [BLOCK_N, BLOCK_K // 16], both float32.
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    kb = pid_k * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
    ks = pid_k * (BLOCK_K // 16) + tl.arange(0, BLOCK_K // 16)
    packed = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + kb[None, :], mask=mask_n[:, None], other=0)
    scales = tl.load(s_ptr + offs_n[:, None].to(tl.int64) * stride_sn + ks[None, :], mask=mask_n[:, None], other=0.0).to(tl.float32)
    codes = tl.reshape(tl.join(packed & 0xF, packed >> 4), (BLOCK_N, BLOCK_K))
    return offs_n, mask_n, tl.reshape(_e2m1_to_f32(codes), (BLOCK_N, BLOCK_K // 16, 16)), scales


@triton.jit
def _store_rows(o_ptr, w, offs_n, mask_n, stride_on, pid_k, BLOCK_K: tl.constexpr):
    # w [BLOCK_N, BLOCK_K] (already in o's dtype) into rows offs_n, K tile pid_k, of o.
    ko = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    tl.store(o_ptr + offs_n[:, None].to(tl.int64) * stride_on + ko[None, :], w, mask=mask_n[:, None])


def _fit_block_k(k: int, bk: int) -> int:
    """The GEMM kernels' K step: `bk` halved (down to 32) until it divides K."""
    while bk > 32 and k % bk:
        bk //= 2
    if k % bk:
        raise ValueError(f"K={k} must be a multiple of 32")
    return bk


@triton.jit
def _grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # This program's output tile, visited in groups of GROUP_M tile-rows (grouped ordering: the
    # programs running together share W tiles in L2); its row and column offsets and masks.
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
    return offs_m, offs_n, offs_m < M, offs_n < N


@triton.jit
def _gemm_epilogue(
    acc, s, ws_ptr, b_ptr, y_ptr, offs_m, offs_n, mask_m, mask_n, stride_ym, PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr
):
    # Y tile = acc * (s * ws) + bias in Y's dtype; ws is one float32 per output channel or one
    # value, s a scalar (1.0 where there is none: the product is then exact).
    if PER_CHANNEL:
        acc = acc * (s * tl.load(ws_ptr + offs_n, mask=mask_n, other=0.0))[None, :]
    else:
        acc = acc * (s * tl.load(ws_ptr))
    if HAS_BIAS:
        acc = acc + tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


_GROUP_M = 8  # _grouped_tile's tile-rows per group, for every GEMM launch


def _gemm_launch(m: int, n: int, bm: int, bn: int, bk: int, nw: int, ns: int) -> tuple[tuple[int], dict]:
    """A _grouped_tile GEMM's 1-D grid and its tile keywords (constexprs and launch options) for
    the config (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)."""
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    return grid, {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": _GROUP_M, "num_warps": nw, "num_stages": ns}


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
    offs_m, offs_n, mask_m, mask_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
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
    _gemm_epilogue(acc, 1.0, gs_ptr, b_ptr, y_ptr, offs_m, offs_n, mask_m, mask_n, stride_ym, PER_CHANNEL_GS, HAS_BIAS)


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
    pid_k = tl.program_id(1)
    offs_n, mask_n, vals, scales = _nvfp4_tile(w_ptr, s_ptr, N, stride_wn, stride_sn, tl.program_id(0), pid_k, BLOCK_N, BLOCK_K)
    scales = scales * 16384.0
    if PER_CHANNEL_GS:
        gs = tl.load(gs_ptr + offs_n, mask=mask_n, other=0.0)
        scales = scales * gs[:, None]
    else:
        scales = scales * tl.load(gs_ptr)
    w = tl.reshape(vals * scales[:, :, None], (BLOCK_N, BLOCK_K))
    _store_rows(o_ptr, w.to(o_ptr.dtype.element_ty), offs_n, mask_n, stride_on, pid_k, BLOCK_K)


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
    bk = _fit_block_k(k, bk)
    y = torch.empty((m, n), dtype=x2d.dtype, device=x2d.device)
    if m == 0:
        return y
    gs = global_scale.float().reshape(-1)
    grid, tile = _gemm_launch(m, n, bm, bn, bk, nw, ns)
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
        **tile,
    )
    return y


@triton.jit
def _to_e4m3_tile(
    w_ptr, s_ptr, inv_ptr, o_ptr, N, stride_wn, stride_sn, stride_on, pid_n, pid_k, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr
):
    # o[n, k] = e4m3(e2m1[n, k] * block_scale[n, k // 16] * inv[n]); inv[n] = 448 / (6 * max_j block_scale[n, j])
    offs_n, mask_n, vals, scales = _nvfp4_tile(w_ptr, s_ptr, N, stride_wn, stride_sn, pid_n, pid_k, BLOCK_N, BLOCK_K)
    inv = tl.load(inv_ptr + offs_n, mask=mask_n, other=0.0)
    # (e2m1 * 2^-14 as fp16) * (block scale * inv * 2^14): products rounded once, in float32
    scales = scales * inv[:, None] * 16384.0
    w = tl.clamp(tl.reshape(vals * scales[:, :, None], (BLOCK_N, BLOCK_K)), -E4M3_MAX, E4M3_MAX)
    _store_rows(o_ptr, w.to(tl.float8e4nv), offs_n, mask_n, stride_on, pid_k, BLOCK_K)


def nvfp4_to_e4m3_in_graph(packed: torch.Tensor, block_scale: torch.Tensor, inv_row_scale: torch.Tensor) -> torch.Tensor:
    """`nvfp4_to_e4m3` for torch.compile: the kernel launched through Triton's `kernel[grid]`,
    which Dynamo records as a user-defined Triton kernel, so Inductor's generated code launches it
    (no custom-op dispatch in Python per call, no Python launcher cache to trace)."""
    return _to_e4m3(packed, block_scale, inv_row_scale, in_graph=True)


@triton.jit
def _nvfp4_to_e4m3_kernel(
    w_ptr,
    s_ptr,
    inv_ptr,
    o_ptr,
    N,
    K,
    stride_wn,
    stride_sn,
    stride_on,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    _to_e4m3_tile(w_ptr, s_ptr, inv_ptr, o_ptr, N, stride_wn, stride_sn, stride_on, tl.program_id(0), tl.program_id(1), BLOCK_N, BLOCK_K)


@triton.jit
def _w4a8_prepare_kernel(
    w_ptr,
    s_ptr,
    inv_ptr,
    o_ptr,
    x_ptr,
    q_ptr,
    qs_ptr,
    N,
    K,
    stride_wn,
    stride_sn,
    stride_on,
    stride_x,
    stride_q,
    W_PROGRAMS,
    K_TILES,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ROW_BLOCK: tl.constexpr,
    ONE_PASS: tl.constexpr,
):
    # Both inputs of a W4A8 GEMM in ONE launch (an eager call then costs two launches, this and
    # the GEMM): the first W_PROGRAMS programs convert weight tiles, the rest quantize one
    # activation row each.
    pid = tl.program_id(0)
    if pid < W_PROGRAMS:
        _to_e4m3_tile(w_ptr, s_ptr, inv_ptr, o_ptr, N, stride_wn, stride_sn, stride_on, pid // K_TILES, pid % K_TILES, BLOCK_N, BLOCK_K)
    else:
        _quant_row(x_ptr, q_ptr, qs_ptr, (pid - W_PROGRAMS).to(tl.int64), K, stride_x, stride_q, ROW_BLOCK, ONE_PASS)


_TO_E4M3 = _Launcher(_nvfp4_to_e4m3_kernel)
_W4A8_PREP = _Launcher(_w4a8_prepare_kernel)


def nvfp4_to_e4m3(packed: torch.Tensor, block_scale: torch.Tensor, inv_row_scale: torch.Tensor) -> torch.Tensor:
    """Packed NVFP4 [N, K/2] + e4m3 block scales -> e4m3 [N, K] (see quant.nvfp4_to_e4m3 for the
    reference numerics; the global scale stays outside, in the GEMM's per-channel weight scale)."""
    return _to_e4m3(packed, block_scale, inv_row_scale, in_graph=False)


def _to_e4m3(packed: torch.Tensor, block_scale: torch.Tensor, inv_row_scale: torch.Tensor, in_graph: bool) -> torch.Tensor:
    # The one launch of _nvfp4_to_e4m3_kernel for both entry points; only the launch mechanism
    # differs (Triton's kernel[grid], which Dynamo can record, or the _Launcher cache).
    n, kh = packed.shape
    k = kh * 2
    block_k = _fit_block_k(k, 128)
    out = torch.empty((n, k), dtype=torch.float8_e4m3fn, device=packed.device)
    grid = ((n + 63) // 64, k // block_k)
    args = (packed, block_scale, inv_row_scale, out, n, k, packed.stride(0), block_scale.stride(0), out.stride(0))
    if in_graph:
        _nvfp4_to_e4m3_kernel[grid](*args, BLOCK_N=64, BLOCK_K=block_k, num_warps=4)
    else:
        _TO_E4M3(grid, *args, BLOCK_N=64, BLOCK_K=block_k, num_warps=4)
    return out


def w4a8_prepare(
    packed: torch.Tensor, block_scale: torch.Tensor, inv_row_scale: torch.Tensor, x2d: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`nvfp4_to_e4m3(packed, block_scale, inv_row_scale)` and `fp8_quant_per_token(x2d)` in one
    launch (the same bytes): returns (e4m3 weight [N, K], e4m3 activation [M, K], scales [M, 1])."""
    n, kh = packed.shape
    k = kh * 2
    m = x2d.shape[0]
    if x2d.shape[1] != k:
        raise ValueError(f"shape mismatch: x {tuple(x2d.shape)}, weight {tuple(packed.shape)}")
    if x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    block_k = _fit_block_k(k, 128)
    dev = packed.device
    out = torch.empty((n, k), dtype=torch.float8_e4m3fn, device=dev)
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=dev)
    qs = torch.empty((m, 1), dtype=torch.float32, device=dev)
    k_tiles = k // block_k
    w_programs = (n + 63) // 64 * k_tiles
    row_block, one_pass = _row_block(k)
    _W4A8_PREP(
        (w_programs + m,),
        packed,
        block_scale,
        inv_row_scale,
        out,
        x2d,
        q,
        qs,
        n,
        k,
        packed.stride(0),
        block_scale.stride(0),
        out.stride(0),
        x2d.stride(0),
        q.stride(0),
        w_programs,
        k_tiles,
        BLOCK_N=64,
        BLOCK_K=block_k,
        ROW_BLOCK=row_block,
        ONE_PASS=one_pass,
        num_warps=4 if row_block <= 4096 else 8,
    )
    return out, q, qs


class W4a8PrepareCall:
    """`w4a8_prepare` for one weight (packed codes, block scales, inverse row scales: their
    addresses) and one activation signature (shape, dtype, device, 16-byte alignment), with the
    launch arguments worked out once (as Fp8FusedCall): per call three allocations and one C launch."""

    __slots__ = ("x_shape", "x_dtype", "dev", "aligned", "ptrs", "ints", "meta", "grid0", "n", "k", "kernel", "launch_kw")

    def __init__(self, packed: torch.Tensor, block_scale: torch.Tensor, inv_row_scale: torch.Tensor, x2d: torch.Tensor) -> None:
        n, kh = packed.shape
        k = kh * 2
        m = x2d.shape[0]
        block_k = _fit_block_k(k, 128)
        k_tiles = k // block_k
        w_programs = (n + 63) // 64 * k_tiles
        row_block, one_pass = _row_block(k)
        self.x_shape, self.x_dtype, self.dev = x2d.shape, x2d.dtype, x2d.get_device()
        self.aligned = x2d.data_ptr() % 16 == 0
        self.ptrs = (packed.data_ptr(), block_scale.data_ptr(), inv_row_scale.data_ptr())
        self.n, self.k = n, k
        # runtime ints after the 7 pointers: N, K, strides (weight, scales, e4m3 weight, x, q), W_PROGRAMS, K_TILES
        self.ints = (n, k, packed.stride(0), block_scale.stride(0), k, x2d.stride(0), k, w_programs, k_tiles)
        self.meta = (64, block_k, row_block, one_pass)
        self.launch_kw = {
            "BLOCK_N": 64,
            "BLOCK_K": block_k,
            "ROW_BLOCK": row_block,
            "ONE_PASS": one_pass,
            "num_warps": 4 if row_block <= 4096 else 8,
        }
        self.grid0 = w_programs + m
        self.kernel = None

    @staticmethod
    def applicable(x2d: torch.Tensor) -> bool:
        """On a GPU (or the interpreter), rows with unit stride along K, at least one row."""
        return (x2d.is_cuda or _INTERPRET) and x2d.dim() == 2 and x2d.stride(1) == 1 and x2d.shape[0] > 0

    def matches(self, x2d: torch.Tensor, packed: torch.Tensor, block_scale: torch.Tensor, inv_row_scale: torch.Tensor) -> bool:
        return (
            x2d.shape == self.x_shape
            and x2d.dtype == self.x_dtype
            and x2d.get_device() == self.dev
            and x2d.stride(1) == 1
            and x2d.stride(0) == self.ints[5]
            and (not self.aligned or x2d.data_ptr() % 16 == 0)
            and packed.data_ptr() == self.ptrs[0]
            and block_scale.data_ptr() == self.ptrs[1]
            and inv_row_scale.data_ptr() == self.ptrs[2]
        )

    def __call__(
        self, x2d: torch.Tensor, packed: torch.Tensor, block_scale: torch.Tensor, inv_row_scale: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dev = x2d.device
        m = self.x_shape[0]
        out = torch.empty((self.n, self.k), dtype=torch.float8_e4m3fn, device=dev)
        q = torch.empty((m, self.k), dtype=torch.float8_e4m3fn, device=dev)
        qs = torch.empty((m, 1), dtype=torch.float32, device=dev)
        kernel = self.kernel
        if kernel is None or not _hooks_idle():
            i = self.ints
            k = _w4a8_prepare_kernel[(self.grid0,)](packed, block_scale, inv_row_scale, out, x2d, q, qs, *i, **self.launch_kw)
            if kernel is None and _c_launchable(k):
                self.kernel = k
            return out, q, qs
        p = self.ptrs
        _run_c(
            kernel,
            self.grid0,
            self.dev,
            p[0],
            p[1],
            p[2],
            out.data_ptr(),
            x2d.data_ptr(),
            q.data_ptr(),
            qs.data_ptr(),
            *self.ints,
            *self.meta,
        )
        return out, q, qs


@triton.jit
def _fp8_linear_static_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    ws_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_ym,
    PER_CHANNEL_WS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Y = (e4m3(X / s) @ W^T) * s * ws + bias in ONE launch: the activation is quantized in
    # registers as its tiles are loaded (once per N tile), so an eager call costs one kernel
    # launch instead of quantize + GEMM. X / s is the correctly rounded quotient, as div_rn gives
    # it (the same e4m3 bytes as fp8_quant_static), but from a multiply and two FMAs: q = x * (1/s)
    # is within an ulp, r = x - q * s is exact, q + r * (1/s) rounds correctly (Markstein's
    # theorem; 1/s rounded to nearest). div_rn itself in this loop made the kernel 2.5-7x slower
    # on the H200 (benches/gpu/results/h200/run8).
    offs_m, offs_n, mask_m, mask_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    s = tl.load(s_ptr)
    inv = tl.math.div_rn(1.0, s)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, K // BLOCK_K):
        a = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0).to(tl.float32)
        q = a * inv
        q = tl.fma(tl.fma(-q, s, a), inv, q)
        a8 = tl.clamp(q, -E4M3_MAX, E4M3_MAX).to(tl.float8e4nv)
        b = tl.load(w_ptrs, mask=mask_n[:, None], other=0.0)
        acc = tl.dot(a8, tl.trans(b), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    _gemm_epilogue(acc, s, ws_ptr, b_ptr, y_ptr, offs_m, offs_n, mask_m, mask_n, stride_ym, PER_CHANNEL_WS, HAS_BIAS)


_FP8_LINEAR = _Launcher(_fp8_linear_static_kernel)


_FP8_FUSED_ENV = os.environ.get("DQFAST_FP8_FUSED_CONFIG")  # read at import: this sits on the per-call path


def fp8_linear_static_config(m: int, n: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) by rows; DQFAST_FP8_FUSED_CONFIG
    ("bm,bn,bk,warps,stages", read when the module is imported) overrides."""
    if _FP8_FUSED_ENV:
        bm, bn, bk, nw, ns = (int(v) for v in _FP8_FUSED_ENV.split(","))
        return bm, bn, bk, nw, ns
    # Measured on the H200 (run 8 "crossover", 9 configs x 18 shapes): few rows and narrow N want
    # BLOCK_M = 16 (padded rows are quantized and multiplied too) with a long K step; the rest
    # 64 x 128 tiles.
    if m <= 16 or (m <= 128 and n <= 4096):
        return 16, 64, 256, 4, 3
    return 64, 128, 128, 4, 3


# When Fp8Linear's `triton` back end takes the one-launch kernel (static scales) instead of
# quantize + _scaled_mm: where the kernel's GPU time stays under the host time of the second
# launch (~15-25 us per launch on the H200 machine), i.e. few rows, and a K short enough that the
# few programs' sequential K loop stays short (run 8 "crossover": at M = 64 and K = 12288 it
# already loses). DQFAST_FP8_FUSED_MAX_M=<rows> replaces the rule by a row limit (read at import).
ONE_LAUNCH_ALWAYS_M = 16
ONE_LAUNCH_MAX_K = 4096
ONE_LAUNCH_MAX_MN = 1_600_000
_FUSED_ENV = os.environ.get("DQFAST_FP8_FUSED_MAX_M")
FUSED_MAX_M: int | None = int(_FUSED_ENV) if _FUSED_ENV else None


def one_launch_wins(m: int, k: int, n: int) -> bool:
    """Whether an eager [m, k] x [k, n] FP8 Linear should take the one-launch kernel."""
    if FUSED_MAX_M is not None:
        return m <= FUSED_MAX_M
    return m <= ONE_LAUNCH_ALWAYS_M or (k <= ONE_LAUNCH_MAX_K and m * n <= ONE_LAUNCH_MAX_MN)


def fp8_linear_static(
    x2d: torch.Tensor,
    weight: torch.Tensor,
    input_scale: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    config: tuple[int, int, int, int, int] | None = None,
) -> torch.Tensor:
    """Fused static-scale FP8 Linear: x2d [M, K] bf16/fp16, weight e4m3 [N, K], input_scale float32
    0-dim, weight_scale float32 0-dim or [N]; K must be a multiple of 32."""
    m, k = x2d.shape
    n = weight.shape[0]
    bm, bn, bk, nw, ns = config or fp8_linear_static_config(m, n)
    bk = _fit_block_k(k, bk)
    if not x2d.is_contiguous():
        x2d = x2d.contiguous()
    y = torch.empty((m, n), dtype=out_dtype, device=x2d.device)
    if m == 0:
        return y
    grid, tile = _gemm_launch(m, n, bm, bn, bk, nw, ns)
    _FP8_LINEAR(
        grid,
        x2d,
        weight,
        input_scale,
        weight_scale,
        bias if bias is not None else weight_scale,
        y,
        m,
        n,
        k,
        x2d.stride(0),
        weight.stride(0),
        y.stride(0),
        PER_CHANNEL_WS=weight_scale.numel() > 1,
        HAS_BIAS=bias is not None,
        **tile,
    )
    return y


def _hooks_idle() -> bool:
    """No Triton launch hook is set (profilers set them): a launch then needs no launch metadata.
    Triton <= 3.6 keeps a hook or None, newer versions a HookChain with a `calls` list."""
    rt = _RUNTIME_KNOBS
    if rt is None:
        return False
    for h in (rt.launch_enter_hook, rt.launch_exit_hook):
        if h is not None and getattr(h, "calls", True):
            return False
    return True


try:
    from triton import knobs as _knobs

    _RUNTIME_KNOBS = _knobs.runtime
except Exception:  # an older Triton: Fp8FusedCall always launches through Triton
    _RUNTIME_KNOBS = None


def _c_launchable(kernel) -> bool:
    """Whether a kernel that Triton just launched (the first call of a cached call object) can be
    kept and re-launched through its C launcher (not under the interpreter, nor on an older Triton)."""
    return _RUNTIME_KNOBS is not None and not _INTERPRET and kernel is not None and hasattr(kernel, "packed_metadata")


def _run_c(kernel, grid0: int, dev: int, *args) -> None:
    """Re-launch a kept kernel (see :func:`_c_launchable`) on a 1-D grid through Triton's C
    launcher, with integer addresses for tensors and no launch hooks (the caller checked
    :func:`_hooks_idle`): the cached call objects' fast path."""
    kernel.run(grid0, 1, 1, torch._C._cuda_getCurrentRawStream(dev), kernel.function, kernel.packed_metadata, None, None, None, *args)


class Fp8FusedCall:
    """`fp8_linear_static` for one input signature (shape, dtype, device, 16-byte alignment of
    the input) and one set of module tensors, with everything but the output allocation and the
    launch worked out once. The module's tensors go to the C launcher as integer addresses
    (Triton's launcher otherwise calls `data_ptr()` and a CUDA pointer query per tensor), and the
    kernel reads the scales and bias on the device, so in-place edits of them need no rebuild;
    `matches` sees a replaced or moved tensor (another address). The first call launches through
    Triton (compiling it, and fixing the specialization the later calls reuse)."""

    __slots__ = (
        "x_shape",
        "x_dtype",
        "dev",
        "aligned",
        "ptrs",
        "tensors",
        "out_shape",
        "out_dtype",
        "meta",
        "ints",
        "grid0",
        "kernel",
        "launch_kw",
    )

    def __init__(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        input_scale: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None,
        out_dtype: torch.dtype,
    ) -> None:
        k = x.shape[-1]
        m = x.numel() // k
        n = weight.shape[0]
        bm, bn, bk, nw, ns = fp8_linear_static_config(m, n)
        bk = _fit_block_k(k, bk)
        self.x_shape, self.x_dtype, self.dev = x.shape, x.dtype, x.get_device()
        self.aligned = x.data_ptr() % 16 == 0
        self.tensors = (weight, input_scale, weight_scale, bias)
        self.ptrs = tuple(0 if t is None else t.data_ptr() for t in self.tensors)
        self.out_shape, self.out_dtype = (*x.shape[:-1], n), out_dtype
        self.ints = (m, n, k, k, weight.stride(0), n)
        self.meta = (weight_scale.numel() > 1, bias is not None, bm, bn, bk, _GROUP_M)
        grid, tile = _gemm_launch(m, n, bm, bn, bk, nw, ns)
        self.grid0 = grid[0]
        self.launch_kw = {"PER_CHANNEL_WS": self.meta[0], "HAS_BIAS": self.meta[1], **tile}
        self.kernel = None

    @staticmethod
    def applicable(x: torch.Tensor, weight: torch.Tensor, any_m: bool = False) -> bool:
        """Inputs the fused kernel takes (on a GPU or the interpreter, bf16/fp16, contiguous, K a
        multiple of 32, at least one row) and, unless any_m, where it wins (one_launch_wins)."""
        k = x.shape[-1]
        m = x.numel() // max(k, 1)
        return (
            x.dtype in (torch.bfloat16, torch.float16)
            and (x.is_cuda or _INTERPRET)
            and x.is_contiguous()
            and k % 32 == 0
            and m > 0
            and weight.is_contiguous()
            and (any_m or one_launch_wins(m, k, weight.shape[0]))
        )

    def matches(
        self, x: torch.Tensor, weight: torch.Tensor, input_scale: torch.Tensor | None, weight_scale: torch.Tensor, bias: torch.Tensor | None
    ) -> bool:
        return (
            x.shape == self.x_shape
            and x.dtype == self.x_dtype
            and x.get_device() == self.dev
            and x.is_contiguous()
            and (not self.aligned or x.data_ptr() % 16 == 0)
            and weight.data_ptr() == self.ptrs[0]
            and input_scale is not None
            and input_scale.data_ptr() == self.ptrs[1]
            and weight_scale.data_ptr() == self.ptrs[2]
            and (0 if bias is None else bias.data_ptr()) == self.ptrs[3]
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.empty(self.out_shape, dtype=self.out_dtype, device=x.device)
        kernel = self.kernel
        if kernel is None or not _hooks_idle():
            w, s, ws, b = self.tensors
            k = _fp8_linear_static_kernel[(self.grid0,)](x, w, s, ws, b if b is not None else ws, y, *self.ints, **self.launch_kw)
            if kernel is None and _c_launchable(k):
                self.kernel = k
            return y
        p = self.ptrs
        _run_c(
            kernel,
            self.grid0,
            self.dev,
            x.data_ptr(),
            p[0],
            p[1],
            p[2],
            p[3] or p[2],
            y.data_ptr(),
            *self.ints,
            *self.meta,
        )
        return y
