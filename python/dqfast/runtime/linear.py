"""FP8 and NVFP4 Linear modules with selectable GEMM back ends.

Back ends (env vars override the automatic choice; an explicit constructor argument wins):
  DQFAST_FP8_GEMM_BACKEND = auto | emulation | scaled_mm | triton | flashinfer
    scaled_mm: eager torch activation quantization + torch._scaled_mm (cuBLASLt/CUTLASS, SM89+)
    triton:    fused Triton activation quantization + torch._scaled_mm
    compile:   plain torch ops + torch._scaled_mm, for torch.compile to fuse (also taken
               automatically whenever the module is being compiled)
    flashinfer: flashinfer.bmm_fp8 (static per-tensor scales only)
  DQFAST_FP4_GEMM_BACKEND = auto | emulation | emulation_w4a16 | triton | flashinfer
    triton:     W4A16 on Hopper and older (input_scale unused): below DQFAST_W4A16_DEQUANT_MIN_M
                rows the fused Triton dequant-GEMM (triton_fused), from there on a Triton
                dequantize into a transient bf16 weight + cuBLAS GEMM (triton_dequant)
    flashinfer: flashinfer.mm_fp4 (SM100+, W4A4)
    emulation:  dequantize + float32 matmul, W4A4 activation fake-quant (CPU reference)
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Sequence

import torch
from torch import nn

from . import quant as Q

FP8_BACKENDS = ("auto", "emulation", "scaled_mm", "triton", "flashinfer", "compile")
FP4_BACKENDS = ("auto", "emulation", "emulation_w4a16", "triton", "triton_fused", "triton_dequant", "flashinfer")


@functools.cache
def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _capability(device: torch.device) -> tuple[int, int]:
    if device.type != "cuda":
        return (0, 0)
    return torch.cuda.get_device_capability(device)


def resolve_fp8_backend(requested: str | None, device: torch.device) -> str:
    """Pick the FP8 path: explicit request, else env var, else by device capability."""
    choice = (requested or os.environ.get("DQFAST_FP8_GEMM_BACKEND") or "auto").lower()
    if choice not in FP8_BACKENDS:
        raise ValueError(f"unknown FP8 backend {choice!r}; choose from {FP8_BACKENDS}")
    if choice != "auto":
        return choice
    if _capability(device) >= (8, 9):
        return "triton" if _has_module("triton") else "scaled_mm"
    return "emulation"


def resolve_fp4_backend(requested: str | None, device: torch.device) -> str:
    """Pick the NVFP4 path: FP4 GEMM on SM100+, W4A16 Triton on other GPUs, else emulation."""
    choice = (requested or os.environ.get("DQFAST_FP4_GEMM_BACKEND") or "auto").lower()
    if choice not in FP4_BACKENDS:
        raise ValueError(f"unknown FP4 backend {choice!r}; choose from {FP4_BACKENDS}")
    if choice != "auto":
        return choice
    cap = _capability(device)
    if cap >= (10, 0) and _has_module("flashinfer"):
        return "flashinfer"
    if cap >= (8, 0) and _has_module("triton"):
        return "triton"
    return "emulation"


def _flatten(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _shard_slices(sizes: Sequence[int] | None, n: int) -> list[slice]:
    if not sizes:
        return [slice(0, n)]
    out, start = [], 0
    for size in sizes:
        out.append(slice(start, start + size))
        start += size
    if start != n:
        raise ValueError(f"shard sizes {list(sizes)} do not add up to {n}")
    return out


class _ActQuantCache:
    """Remembers the last quantized activation so sibling Linears fed the same tensor
    (to_q/to_k/to_v) quantize it once. It holds a reference to the input, so while cached
    its storage cannot be freed and reused; the shared version counter catches in-place
    edits, and (address, shape, strides) identify the same view."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.src: torch.Tensor | None = None
        self.value: tuple | None = None

    @staticmethod
    def _key(x: torch.Tensor, mode: tuple) -> tuple:
        # Tensors made under torch.inference_mode have no version counter (reading _version
        # raises), so an in-place edit of one between sibling calls goes unseen; models that do
        # that must set DQFAST_SHARE_ACT_QUANT=0.
        version = -1 if x.is_inference() else x._version
        return (x.data_ptr(), x.device, tuple(x.shape), x.stride(), x.dtype, version, mode)

    def get(self, x: torch.Tensor, mode: tuple) -> tuple | None:
        if self.src is not None and self.key == self._key(x, mode):
            return self.value
        return None

    def put(self, x: torch.Tensor, mode: tuple, value: tuple) -> None:
        self.src, self.key, self.value = x, self._key(x, mode), value

    def clear(self) -> None:
        self.src = self.key = self.value = None


_ACT_CACHE = _ActQuantCache()


def _share_act_quant() -> bool:
    return os.environ.get("DQFAST_SHARE_ACT_QUANT", "1") != "0"


class Fp8Linear(nn.Module):
    """y = x @ W^T with W float8_e4m3fn [N, K] and float32 weight_scale (0-dim or [N]).

    input_scale: float32 0-dim (static activation scale), or a per-shard vector with
    `shard_sizes` for fused layers whose shards were calibrated separately, or None for
    dynamic per-token scales (amax_row / 448).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        per_channel: bool = False,
        static_input_scale: bool = True,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
        backend: str | None = None,
        shard_sizes: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.per_channel = per_channel
        self.backend_request = backend
        self.shard_sizes = list(shard_sizes) if shard_sizes else None
        n_shards = len(self.shard_sizes) if self.shard_sizes else 0
        self.register_buffer("weight", torch.zeros((out_features, in_features), dtype=torch.float8_e4m3fn, device=device))
        self.register_buffer("weight_scale", torch.ones((out_features,) if per_channel else (), dtype=torch.float32, device=device))
        if static_input_scale:
            self.register_buffer("input_scale", torch.ones((n_shards,) if n_shards else (), dtype=torch.float32, device=device))
        else:
            self.input_scale = None
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        self._scaled_mm_bias_ok = True

    def extra_repr(self) -> str:
        mode = "static" if self.input_scale is not None else "per-token"
        wmode = "per-channel" if self.per_channel else "per-tensor"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, weight={wmode}, act={mode}"

    @property
    def backend(self) -> str:
        return resolve_fp8_backend(self.backend_request, self.weight.device)

    # -- reference ---------------------------------------------------------------------------
    def dequantized_weight(self) -> torch.Tensor:
        ws = self.weight_scale.float()
        return self.weight.float() * (ws[:, None] if ws.dim() == 1 else ws)

    def _fake_quant_input(self, x2d: torch.Tensor, input_scale: torch.Tensor | None) -> torch.Tensor:
        if input_scale is None:
            return Q.fp8_fake_quant(x2d, Q.per_token_scale(x2d))
        return Q.fp8_fake_quant(x2d, input_scale)

    def forward_emulation(self, x: torch.Tensor) -> torch.Tensor:
        x2d = _flatten(x)
        w = self.dequantized_weight()
        outs = []
        for i, rows in enumerate(_shard_slices(self.shard_sizes, self.out_features)):
            s = None
            if self.input_scale is not None:
                s = self.input_scale[i] if self.input_scale.dim() == 1 else self.input_scale
            outs.append(self._fake_quant_input(x2d, s) @ w[rows].t())
        y = torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    # -- GPU paths ---------------------------------------------------------------------------
    def _host_scale(self, scale: torch.Tensor) -> float:
        # The static scale as a Python float, read once (one sync) and re-read only when the
        # buffer changes; used to share one quantized activation among equal-scale siblings.
        key = (scale.data_ptr(), scale._version)
        cached = self.__dict__.get("_host_scale_cache")
        if cached is None or cached[0] != key:
            cached = (key, float(scale))
            self.__dict__["_host_scale_cache"] = cached
        return cached[1]

    def _quantize_input(self, x2d: torch.Tensor, scale: torch.Tensor | None, fused: bool):
        mode = ("tok",) if scale is None else ("static", self._host_scale(scale))
        if fused and _share_act_quant():
            hit = _ACT_CACHE.get(x2d, mode)
            if hit is not None:
                return hit
        if fused:
            from . import triton_kernels as TK

            if scale is None:
                value = TK.fp8_quant_per_token(x2d)
            else:
                value = (TK.fp8_quant_static(x2d, scale), scale)
            if _share_act_quant():
                _ACT_CACHE.put(x2d, mode, value)
            return value
        if scale is None:
            s = Q.per_token_scale(x2d)
            return Q.quantize_fp8(x2d, s), s
        return Q.quantize_fp8(x2d, scale), scale

    def _row_weight_scale(self, ws: torch.Tensor, rows: slice) -> torch.Tensor:
        # [1, N] float32 weight scale for row-wise _scaled_mm, built once per weight_scale version.
        key = (rows.start, rows.stop, self.weight_scale.data_ptr(), self.weight_scale._version)
        cache = self.__dict__.setdefault("_row_scale_cache", {})
        if key not in cache:
            n = rows.stop - rows.start
            cache[key] = ws.reshape(1, -1).expand(1, n).contiguous()
        return cache[key]

    def _scaled_mm(self, xq, x_scale, w_rows: slice, bias, out_dtype):
        w = self.weight[w_rows]
        ws = self.weight_scale[w_rows] if self.weight_scale.dim() == 1 else self.weight_scale
        rowwise = x_scale.numel() > 1 or ws.numel() > 1
        if rowwise:
            # cuBLAS/CUTLASS row-wise scaling needs both scales as vectors and a bf16 output.
            sa = x_scale.reshape(-1, 1).expand(xq.shape[0], 1).contiguous()
            sb = self._row_weight_scale(ws, w_rows)
            out_dtype = torch.bfloat16
        else:
            sa, sb = x_scale.reshape(()), ws.reshape(())
        if bias is not None and self._scaled_mm_bias_ok:
            try:
                return torch._scaled_mm(
                    xq, w.t(), scale_a=sa, scale_b=sb, bias=bias.to(out_dtype), out_dtype=out_dtype, use_fast_accum=True
                )
            except RuntimeError:
                self._scaled_mm_bias_ok = False
        y = torch._scaled_mm(xq, w.t(), scale_a=sa, scale_b=sb, out_dtype=out_dtype, use_fast_accum=True)
        return y + bias.to(y.dtype) if bias is not None else y

    def _forward_flashinfer(self, x2d: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        import flashinfer  # noqa: PLC0415 - optional dependency

        if self.input_scale is None or self.input_scale.dim() or self.weight_scale.dim() or self.shard_sizes:
            raise NotImplementedError("flashinfer bmm_fp8 path takes per-tensor static scales only")
        xq, _ = self._quantize_input(x2d, self.input_scale, fused=_has_module("triton"))
        y = flashinfer.bmm_fp8(xq.unsqueeze(0), self.weight.t().unsqueeze(0), self.input_scale, self.weight_scale, out_dtype).squeeze(0)
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def forward_traceable(self, x: torch.Tensor) -> torch.Tensor:
        """The GPU path in plain torch ops (divide, clamp, cast, ``_scaled_mm``), no Python-side
        caches or host syncs: under ``torch.compile`` the activation quantization then fuses into
        the kernel that produced ``x`` (a norm, a modulation, a GELU). Taken automatically while
        compiling; ``backend="compile"`` forces it in eager mode too."""
        x2d = _flatten(x)
        out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        outs = []
        for i, rows in enumerate(_shard_slices(self.shard_sizes, self.out_features)):
            w = self.weight[rows]
            ws = self.weight_scale[rows] if self.weight_scale.dim() == 1 else self.weight_scale
            if self.input_scale is None:
                xs = (x2d.float().abs().amax(dim=1, keepdim=True) / 448.0).clamp(min=1e-12)
            else:
                xs = self.input_scale[i] if self.input_scale.dim() == 1 else self.input_scale
            xq = (x2d.float() / xs).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
            if xs.numel() > 1 or ws.numel() > 1:
                sa = xs.reshape(-1, 1).expand(x2d.shape[0], 1).contiguous().float()
                sb = ws.float().reshape(1, -1).expand(1, w.shape[0]).contiguous()
                y = torch._scaled_mm(xq, w.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16, use_fast_accum=True)
            else:
                y = torch._scaled_mm(xq, w.t(), scale_a=xs.reshape(()), scale_b=ws.reshape(()), out_dtype=out_dtype, use_fast_accum=True)
            if self.bias is not None:
                y = y + self.bias[rows].to(y.dtype)
            outs.append(y)
        y = torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # Decided before any backend lookup: keep the traced graph free of host-side logic.
            return self.forward_traceable(x) if x.is_cuda else self.forward_emulation(x)
        backend = self.backend
        if backend == "emulation":
            return self.forward_emulation(x)
        if backend == "compile":
            return self.forward_traceable(x)
        x2d = _flatten(x)
        out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        if backend == "flashinfer":
            y = self._forward_flashinfer(x2d, out_dtype)
        else:
            fused = backend == "triton"
            outs = []
            shards = _shard_slices(self.shard_sizes, self.out_features)
            for i, rows in enumerate(shards):
                scale = None
                if self.input_scale is not None:
                    scale = self.input_scale[i] if self.input_scale.dim() == 1 else self.input_scale
                xq, xs = self._quantize_input(x2d, scale, fused)
                bias = self.bias[rows] if self.bias is not None else None
                outs.append(self._scaled_mm(xq, xs, rows, bias, out_dtype))
            y = torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


class Nvfp4Linear(nn.Module):
    """y = x @ W^T with W packed E2M1 [N, K/2], e4m3 block scales [N, K/16] and a float32
    global weight_scale_2 (0-dim, or [N] for fused shards with different global scales)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
        backend: str | None = None,
        act_quant: bool = True,
        shard_sizes: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if in_features % Q.NVFP4_BLOCK:
            raise ValueError(f"in_features={in_features} is not a multiple of 16")
        self.in_features = in_features
        self.out_features = out_features
        self.backend_request = backend
        self.act_quant = act_quant
        self.shard_sizes = list(shard_sizes) if shard_sizes else None
        n_shards = len(self.shard_sizes) if self.shard_sizes else 0
        self.register_buffer("weight", torch.zeros((out_features, in_features // 2), dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.zeros((out_features, in_features // 16), dtype=torch.float8_e4m3fn, device=device))
        self.register_buffer("weight_scale_2", torch.ones((out_features,) if n_shards else (), dtype=torch.float32, device=device))
        self.register_buffer("input_scale", torch.ones((n_shards,) if n_shards else (), dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        self._fi_cache: tuple | None = None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    @property
    def backend(self) -> str:
        return resolve_fp4_backend(self.backend_request, self.weight.device)

    def dequantized_weight(self) -> torch.Tensor:
        return Q.nvfp4_dequantize(self.weight, self.weight_scale, self.weight_scale_2)

    def forward_emulation(self, x: torch.Tensor, act_quant: bool | None = None) -> torch.Tensor:
        act_quant = self.act_quant if act_quant is None else act_quant
        x2d = _flatten(x).float()
        w = self.dequantized_weight()
        outs = []
        for i, rows in enumerate(_shard_slices(self.shard_sizes, self.out_features)):
            xin = x2d
            if act_quant:
                s = self.input_scale[i] if self.input_scale.dim() == 1 else self.input_scale
                xin = Q.nvfp4_fake_quant_activation(x2d, s)
            outs.append(xin @ w[rows].t())
        y = torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def _forward_flashinfer(self, x2d: torch.Tensor) -> torch.Tensor:
        import flashinfer  # noqa: PLC0415 - optional dependency

        if self.shard_sizes:
            raise NotImplementedError("flashinfer mm_fp4 path needs one global scale per layer")
        if self._fi_cache is None:
            # Load-time transform: 128x4 swizzled block scales; N, K padding is left to
            # flashinfer (DiT dims are multiples of 32).
            sf = Q.swizzle_block_scales_128x4(self.weight_scale)
            alpha = (self.input_scale * self.weight_scale_2).reshape(1).float()
            gsa = (1.0 / self.input_scale).reshape(1).float()
            self._fi_cache = (sf, alpha, gsa)
        sf, alpha, gsa = self._fi_cache
        xq, xs = flashinfer.fp4_quantize(x2d, gsa, 16, False, True)
        return flashinfer.mm_fp4(xq, self.weight.t(), xs, sf.t(), alpha, torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backend = self.backend
        if backend == "emulation":
            return self.forward_emulation(x)
        if backend == "emulation_w4a16":
            return self.forward_emulation(x, act_quant=False)
        x2d = _flatten(x)
        if backend.startswith("triton"):
            from . import triton_kernels as TK

            xin = x2d if x2d.dtype in (torch.bfloat16, torch.float16) else x2d.to(torch.bfloat16)
            if backend == "triton":
                min_m = int(os.environ.get("DQFAST_W4A16_DEQUANT_MIN_M", "256"))
                backend = "triton_dequant" if xin.shape[0] >= min_m else "triton_fused"
            bias = self.bias.to(xin.dtype) if self.bias is not None else None
            if backend == "triton_dequant":
                y = TK.nvfp4_dequant_matmul(xin, self.weight, self.weight_scale, self.weight_scale_2, bias)
            else:
                y = TK.nvfp4_w4a16_matmul(xin, self.weight, self.weight_scale, self.weight_scale_2, bias)
        elif backend == "flashinfer":
            y = self._forward_flashinfer(x2d)
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
        else:
            raise ValueError(backend)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


# -- construction from float weights and fused shards ---------------------------------------


def fp8_linear_from_float(
    linear: nn.Linear,
    per_channel: bool = False,
    input_scale: float | torch.Tensor | None = None,
    backend: str | None = None,
) -> Fp8Linear:
    """Quantize an nn.Linear to an Fp8Linear (input_scale None -> dynamic per-token)."""
    n, k = linear.weight.shape
    dtype = linear.weight.dtype if linear.weight.is_floating_point() else torch.bfloat16
    mod = Fp8Linear(
        k,
        n,
        bias=linear.bias is not None,
        per_channel=per_channel,
        static_input_scale=input_scale is not None,
        dtype=dtype,
        device=linear.weight.device,
        backend=backend,
    )
    q, s = Q.fp8_quantize_weight(linear.weight.detach(), per_channel=per_channel)
    mod.weight.copy_(q)
    mod.weight_scale.copy_(s)
    if input_scale is not None:
        mod.input_scale.copy_(torch.as_tensor(input_scale, dtype=torch.float32))
    if linear.bias is not None:
        mod.bias.data.copy_(linear.bias.detach())
    return mod


def nvfp4_linear_from_float(
    linear: nn.Linear,
    input_scale: float | torch.Tensor = 1.0,
    backend: str | None = None,
) -> Nvfp4Linear:
    n, k = linear.weight.shape
    dtype = linear.weight.dtype if linear.weight.is_floating_point() else torch.bfloat16
    mod = Nvfp4Linear(k, n, bias=linear.bias is not None, dtype=dtype, device=linear.weight.device, backend=backend)
    packed, s, gs = Q.nvfp4_quantize(linear.weight.detach())
    mod.weight.copy_(packed)
    mod.weight_scale.copy_(s)
    mod.weight_scale_2.copy_(gs)
    mod.input_scale.copy_(torch.as_tensor(input_scale, dtype=torch.float32))
    if linear.bias is not None:
        mod.bias.data.copy_(linear.bias.detach())
    return mod


def fuse_fp8_linears(shards: Sequence[Fp8Linear]) -> Fp8Linear:
    """Concatenate FP8 shards (e.g. q, k, v) along N without requantizing.

    Each shard keeps its bytes; per-tensor weight scales become one per-channel vector, so
    the result is exact. Static input scales that differ stay per shard (the GPU path then
    quantizes the activation once per distinct scale); equal ones collapse to one.
    """
    first = shards[0]
    k = first.in_features
    if any(s.in_features != k for s in shards):
        raise ValueError("shards must share in_features")
    if any((s.input_scale is None) != (first.input_scale is None) for s in shards):
        raise ValueError("cannot fuse static and dynamic activation scaling")
    sizes = [s.out_features for s in shards]
    has_bias = any(s.bias is not None for s in shards)
    dtype = next((s.bias.dtype for s in shards if s.bias is not None), torch.bfloat16)
    in_scales = None
    same_in = True
    if first.input_scale is not None:
        in_scales = torch.stack([s.input_scale.reshape(()) for s in shards])
        same_in = bool((in_scales == in_scales[0]).all())
    fused = Fp8Linear(
        k,
        sum(sizes),
        bias=has_bias,
        per_channel=True,
        static_input_scale=in_scales is not None,
        dtype=dtype,
        device=first.weight.device,
        backend=first.backend_request,
        shard_sizes=None if same_in else sizes,
    )
    fused.weight.copy_(torch.cat([s.weight for s in shards]))
    fused.weight_scale.copy_(torch.cat([s.weight_scale.float().expand(s.out_features) for s in shards]))
    if in_scales is not None:
        fused.input_scale.copy_(in_scales[0] if same_in else in_scales)
    if has_bias:
        fused.bias.data.copy_(
            torch.cat(
                [
                    s.bias.detach().to(dtype) if s.bias is not None else torch.zeros(s.out_features, dtype=dtype, device=s.weight.device)
                    for s in shards
                ]
            )
        )
    return fused


def fuse_nvfp4_linears(shards: Sequence[Nvfp4Linear]) -> Nvfp4Linear:
    """Concatenate NVFP4 shards along N exactly: block scales and codes untouched, each
    shard's weight_scale_2 kept as a per-channel vector (never max over shards)."""
    first = shards[0]
    k = first.in_features
    if any(s.in_features != k for s in shards):
        raise ValueError("shards must share in_features")
    sizes = [s.out_features for s in shards]
    has_bias = any(s.bias is not None for s in shards)
    dtype = next((s.bias.dtype for s in shards if s.bias is not None), torch.bfloat16)
    fused = Nvfp4Linear(
        k,
        sum(sizes),
        bias=has_bias,
        dtype=dtype,
        device=first.weight.device,
        backend=first.backend_request,
        act_quant=first.act_quant,
        shard_sizes=sizes,
    )
    fused.weight.copy_(torch.cat([s.weight for s in shards]))
    fused.weight_scale.copy_(torch.cat([s.weight_scale for s in shards]))
    fused.weight_scale_2.copy_(torch.cat([s.weight_scale_2.float().reshape(1).expand(s.out_features) for s in shards]))
    fused.input_scale.copy_(torch.stack([s.input_scale.reshape(()) for s in shards]))
    if has_bias:
        fused.bias.data.copy_(
            torch.cat(
                [
                    s.bias.detach().to(dtype) if s.bias is not None else torch.zeros(s.out_features, dtype=dtype, device=s.weight.device)
                    for s in shards
                ]
            )
        )
    return fused
