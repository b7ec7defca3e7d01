"""FP8 and NVFP4 Linear modules with selectable GEMM back ends.

Back ends (env vars override the automatic choice; an explicit constructor argument wins):
  DQFAST_FP8_GEMM_BACKEND = auto | autotune | emulation | scaled_mm | triton | compile |
                            flashinfer | flashinfer_cudnn | flashinfer_cutlass
    auto:      the measured winner from the on-disk autotune cache (autotune.py) if this GPU and
               shape were tuned, else `triton` on SM89+ (else `scaled_mm`, else emulation)
    autotune:  like auto, but times every runnable back end on a shape's first call and caches it
    scaled_mm: eager torch activation quantization + torch._scaled_mm (cuBLASLt/CUTLASS, SM89+)
    triton:    fused Triton activation quantization + torch._scaled_mm (bias in the GEMM epilogue);
               with a static input scale and few rows (triton_kernels.one_launch_wins) the
               one-launch kernel of triton_fused instead
    triton_fused: one Triton kernel quantizes the activation tiles in registers and runs the FP8
               GEMM + scale + bias epilogue: one launch per call (static input scales only), through
               a call object cached per input signature (triton_kernels.Fp8FusedCall)
    compile:   plain torch ops + torch._scaled_mm, for torch.compile to fuse (also taken
               automatically whenever the module is being compiled)
    flashinfer*: Triton activation quantization + a FlashInfer FP8 GEMM (static per-tensor
               scales, no shards): `flashinfer` = bmm_fp8's cuBLASLt GEMM called through the
               loaded JIT module (no per-call Python dispatch; `flashinfer@<i>` = its i-th
               cuBLASLt algorithm, what autotune records), `flashinfer_cudnn` = bmm_fp8
               backend="cudnn", `flashinfer_cutlass` = bmm_fp8 backend="cutlass" on SM100+, and on
               SM90 FlashInfer's CUTLASS SM90 grouped GEMM (e4m3 -> bf16, one group) with the
               scales and bias applied by one elementwise kernel after it
  DQFAST_FP4_GEMM_BACKEND = auto | emulation | emulation_w4a16 | triton | w4a8 | flashinfer
    triton:     W4A16 on Hopper and older (input_scale unused): below DQFAST_W4A16_DEQUANT_MIN_M
                rows the fused Triton dequant-GEMM (triton_fused), from there on a Triton
                dequantize into a transient bf16 weight + cuBLAS GEMM (triton_dequant)
    w4a8:       SM89+: NVFP4 weight -> transient e4m3 weight (Triton, per-channel scale), per-token
                FP8 activations (both in one launch unless a sibling quantized the activation),
                row-wise-scaled torch._scaled_mm (FP8 tensor cores)
    flashinfer: flashinfer.mm_fp4 (SM100+, W4A4)
    emulation:  dequantize + float32 matmul, W4A4 activation fake-quant (CPU reference)
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Sequence
from typing import cast

import torch
from torch import nn

from . import quant as Q

FLASHINFER_FP8_BACKENDS = ("flashinfer", "flashinfer_cudnn", "flashinfer_cutlass")
# What autotune times, in order of preference on equal times (the heuristic default first).
FP8_TUNABLE = ("triton", "triton_fused", "scaled_mm", *FLASHINFER_FP8_BACKENDS)
FP8_BACKENDS = ("auto", "autotune", "emulation", "compile", *FP8_TUNABLE)
FP4_BACKENDS = ("auto", "emulation", "emulation_w4a16", "triton", "triton_fused", "triton_dequant", "w4a8", "flashinfer")


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
    algo = choice.partition("flashinfer@")[2]  # flashinfer@<i>: bmm_fp8 with cuBLASLt algorithm i
    if choice not in FP8_BACKENDS and not (choice.startswith("flashinfer@") and algo.isdigit()):
        raise ValueError(f"unknown FP8 backend {choice!r}; choose from {FP8_BACKENDS} or flashinfer@<index>")
    if choice != "auto":
        return choice
    return _fp8_default(device)


def _fp8_default(device: torch.device) -> str:
    if _capability(device) >= (8, 9):
        return "triton" if _has_module("triton") else "scaled_mm"
    return "emulation"


def fp8_candidates(device: torch.device, static_per_tensor: bool, static: bool | None = None) -> tuple[str, ...]:
    """The back ends autotune may time for a layer on `device`: triton_fused needs static input
    scales, FlashInfer needs to be installed and static per-tensor scales with no shards."""
    if _capability(device) < (8, 9):
        return ()
    static = static_per_tensor if static is None else static
    out = ["triton"] if _has_module("triton") else []
    if static and _has_module("triton"):
        out.append("triton_fused")
    out.append("scaled_mm")
    if static_per_tensor and _has_module("flashinfer") and _has_module("triton"):
        out += FLASHINFER_FP8_BACKENDS
    return tuple(out)


def resolve_fp4_backend(requested: str | None, device: torch.device) -> str:
    """Pick the NVFP4 path: FP4 GEMM on SM100+, W4A8 (FP8 GEMM) on SM89-SM99, W4A16 Triton on
    SM80-SM88, else emulation."""
    choice = (requested or os.environ.get("DQFAST_FP4_GEMM_BACKEND") or "auto").lower()
    if choice not in FP4_BACKENDS:
        raise ValueError(f"unknown FP4 backend {choice!r}; choose from {FP4_BACKENDS}")
    if choice != "auto":
        return choice
    cap = _capability(device)
    if cap >= (10, 0) and _has_module("flashinfer"):
        return "flashinfer"
    if cap >= (8, 9) and _has_module("triton"):
        return "w4a8"  # FP8 tensor cores: faster than BF16 (docs/runtime.md has the measured cost in accuracy)
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


@torch.library.custom_op("dqfast::nvfp4_to_e4m3", mutates_args=())
def _nvfp4_to_e4m3_op(packed: torch.Tensor, block_scale: torch.Tensor, inv_row_scale: torch.Tensor) -> torch.Tensor:
    """NVFP4 -> e4m3 weight (quant.nvfp4_to_e4m3 numerics): the Triton kernel on CUDA, torch on CPU."""
    if packed.is_cuda and _has_module("triton"):
        from . import triton_kernels as TK

        return TK.nvfp4_to_e4m3(packed, block_scale, inv_row_scale)
    return Q.nvfp4_to_e4m3(packed, block_scale, inv_row_scale)


@_nvfp4_to_e4m3_op.register_fake
def _(packed: torch.Tensor, block_scale: torch.Tensor, inv_row_scale: torch.Tensor) -> torch.Tensor:
    return packed.new_empty((packed.shape[0], packed.shape[1] * 2), dtype=torch.float8_e4m3fn)


# Nvfp4Linear.forward_traceable's NVFP4 -> e4m3 conversion on a GPU: the Triton kernel inside the
# compiled graph (True) or the opaque custom op above (False; what run 4 measured).
W4A8_CONVERSION_IN_GRAPH = True
# Read once: Dynamo cannot trace importlib's find_spec (a graph break inside forward_traceable).
_TRITON_INSTALLED = _has_module("triton")


def _bufs(mod: nn.Module) -> dict[str, torch.Tensor]:
    """The module's buffer dict, read directly (nn.Module.__getattr__ costs host time per name);
    typed without torch's `| None` (the runtime's layers register no None buffers)."""
    return cast("dict[str, torch.Tensor]", mod._buffers)


_ENV_DATA = getattr(os.environ, "_data", None)  # CPython's live bytes-keyed dict behind os.environ


def _env_raw(name: str):
    """os.environ.get(name) as an opaque value for equality tests (bytes on POSIX, else str), read
    per eager call: the public mapping re-encodes the key on every lookup (~1-3 us); the live
    dict it writes through is read directly when present."""
    if _ENV_DATA is not None and os.name == "posix":
        return _ENV_DATA.get(os.fsencode(name) if name not in _ENV_KEYS else _ENV_KEYS[name])
    return os.environ.get(name)


_ENV_KEYS = {n: os.fsencode(n) for n in ("DQFAST_SHARE_ACT_QUANT", "DQFAST_FP8_GEMM_BACKEND", "DQFAST_FP4_GEMM_BACKEND")}


def _ver(t: torch.Tensor) -> int:
    """A tensor's version counter; tensors made under torch.inference_mode have none (reading it
    raises), so for them only replacement (a new id) is seen, not an in-place edit."""
    return -1 if t.is_inference() else t._version


def _capturing(x: torch.Tensor) -> bool:
    """True while a CUDA graph is being captured on x's device (nothing may sync or time then)."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def _share_act_quant() -> bool:
    return _env_raw("DQFAST_SHARE_ACT_QUANT") not in (b"0", "0")


class _QuantLinear(nn.Module):
    """What the FP8 and NVFP4 layers share: their sizes, the requested back end, the output rows
    of fused shards that keep their own scales (``shard_sizes``), and an optional bias."""

    bias: nn.Parameter | None

    def __init__(self, in_features: int, out_features: int, backend: str | None, shard_sizes: Sequence[int] | None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.backend_request = backend
        self.shard_sizes = list(shard_sizes) if shard_sizes else None

    @property
    def _n_shards(self) -> int:
        """Shards with their own scales (0: one set of scales for the whole layer)."""
        return len(self.shard_sizes) if self.shard_sizes else 0

    def _add_bias(self, bias: bool, dtype: torch.dtype, device: torch.device | str | None) -> None:
        self.bias = nn.Parameter(torch.zeros(self.out_features, dtype=dtype, device=device), requires_grad=False) if bias else None

    def _emulated_output(self, outs: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The float32 outputs of each shard's rows end to end, plus the bias, in ``x``'s dtype and shape."""
        y = torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


class Fp8Linear(_QuantLinear):
    """y = x @ W^T with W float8_e4m3fn [N, K] and float32 weight_scale (0-dim or [N]).

    input_scale: float32 0-dim (static activation scale), or a per-shard vector with
    `shard_sizes` for fused layers whose shards were calibrated separately, or None for
    dynamic per-token scales (amax_row / 448).
    """

    # Registered buffers / parameter (nn.Module.__getattr__ would type them `Tensor | Module`).
    weight: torch.Tensor
    weight_scale: torch.Tensor
    input_scale: torch.Tensor | None

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
        super().__init__(in_features, out_features, backend, shard_sizes)
        self.per_channel = per_channel
        n_shards = self._n_shards
        self.register_buffer("weight", torch.zeros((out_features, in_features), dtype=torch.float8_e4m3fn, device=device))
        self.register_buffer("weight_scale", torch.ones((out_features,) if per_channel else (), dtype=torch.float32, device=device))
        if static_input_scale:
            self.register_buffer("input_scale", torch.ones((n_shards,) if n_shards else (), dtype=torch.float32, device=device))
        else:
            self.input_scale = None
        self._add_bias(bias, dtype, device)
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
        return self._emulated_output(outs, x)

    # -- GPU paths ---------------------------------------------------------------------------
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
                xs = (x2d.float().abs().amax(dim=1, keepdim=True) / Q.E4M3_MAX).clamp(min=Q.MIN_AMAX)
            else:
                xs = self.input_scale[i] if self.input_scale.dim() == 1 else self.input_scale
            xq = (x2d.float() / xs).clamp(-Q.E4M3_MAX, Q.E4M3_MAX).to(torch.float8_e4m3fn)
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

    # -- eager GPU fast path ------------------------------------------------------------------
    def _resolved_backend(self) -> str:
        # Resolved once per (request, env value): the env var is re-read (cheap) so switching it
        # between calls still works, but the capability query is not repeated.
        key = (self.backend_request, _env_raw("DQFAST_FP8_GEMM_BACKEND"), _bufs(self)["weight"].device)
        cached = self.__dict__.get("_backend_cache")
        if cached is None or cached[0] != key:
            choice = resolve_fp8_backend(self.backend_request, self.weight.device)
            env = os.environ.get("DQFAST_FP8_GEMM_BACKEND")
            if (self.backend_request or env or "auto").lower() == "auto" and choice != "emulation":
                choice = "auto"  # resolved per shape: the autotune cache, else the default
            cached = (key, choice)
            self.__dict__["_backend_cache"] = cached
        return cached[1]

    def _plan(self, out_dtype: torch.dtype) -> _Fp8Plan:
        """Everything a call needs that depends only on the module's tensors (views, scale
        shapes, cast bias, host copy of the static scale), rebuilt when any of them changes."""
        # Read from the module's dicts directly (nn.Module.__getattr__ costs ~1 us per name);
        # a replaced tensor changes its id, an in-place edit (load_state_dict, copy_) its version.
        bufs = _bufs(self)
        w, ws = bufs["weight"], bufs["weight_scale"]
        ins = bufs["input_scale"] if "input_scale" in bufs else self.__dict__.get("input_scale")
        b = self._parameters.get("bias")
        key = (
            out_dtype,
            id(w),
            _ver(w),
            id(ws),
            _ver(ws),
            None if ins is None else (id(ins), _ver(ins)),
            None if b is None else (id(b), _ver(b)),
        )
        plans = self.__dict__.setdefault("_plans", {})
        plan = plans.get(out_dtype)
        if plan is None or plan.key != key:
            plan = plans[out_dtype] = _Fp8Plan(self, out_dtype, key)
        return plan

    def _gemm(self, plan: _Fp8Plan, sh: _Fp8Shard, xq: torch.Tensor, xs: torch.Tensor, backend: str) -> torch.Tensor:
        if backend in ("triton", "scaled_mm"):
            if xs.numel() > 1 or sh.rowwise:
                # cuBLAS/CUTLASS row-wise scaling needs both scales as vectors and a bf16 output.
                sa = xs.reshape(-1, 1)
                sa = sa if sa.shape[0] == xq.shape[0] else sa.expand(xq.shape[0], 1).contiguous()
                return self._scaled_mm_call(xq, sh.wt, sa, sh.sb_row, sh.bias_bf16, torch.bfloat16)
            return self._scaled_mm_call(xq, sh.wt, sh.sa, sh.sb, sh.bias, plan.out_dtype)
        from . import flashinfer_gemm as FI

        s_a, s_b, alpha = sh.sa, sh.sb, sh.alpha
        if not plan.flashinfer_ok or s_a is None or s_b is None or alpha is None:
            raise NotImplementedError(f"{backend}: FlashInfer FP8 GEMMs take static per-tensor scales and no shards")
        if backend == "flashinfer_cutlass":
            return FI.gemm_cutlass(xq, sh.w3, alpha, sh.bias, plan.out_dtype, _capability(xq.device))
        if backend == "flashinfer_cudnn":
            y = FI.bmm_fp8(xq, sh.wt3, s_a, s_b, plan.out_dtype, "cudnn")
        else:  # "flashinfer" or "flashinfer@<cuBLASLt algorithm index>" (chosen by autotune)
            y = FI.bmm_fp8(xq, sh.wt3, s_a, s_b, plan.out_dtype, "cublas", int(backend[11:]) if backend[10:11] == "@" else -1)
        return y.add_(sh.bias) if sh.bias is not None else y

    def _scaled_mm_call(self, xq, wt, sa, sb, bias, out_dtype):
        if bias is not None and self._scaled_mm_bias_ok:
            try:
                return torch._scaled_mm(xq, wt, scale_a=sa, scale_b=sb, bias=bias, out_dtype=out_dtype, use_fast_accum=True)
            except RuntimeError:
                self._scaled_mm_bias_ok = False
        y = torch._scaled_mm(xq, wt, scale_a=sa, scale_b=sb, out_dtype=out_dtype, use_fast_accum=True)
        return y.add_(bias) if bias is not None else y

    def _run(self, x2d: torch.Tensor, out_dtype: torch.dtype, backend: str, share: bool) -> torch.Tensor:
        plan = self._plan(out_dtype)
        fused = backend != "scaled_mm"
        outs = []
        if backend == "triton_fused":
            from . import triton_kernels as TK

            for sh in plan.shards:
                if sh.sa is None:
                    raise NotImplementedError("triton_fused: static input scales only (per-token scales need a row pass first)")
                outs.append(TK.fp8_linear_static(x2d, sh.w, sh.sa, sh.ws_flat, sh.bias, out_dtype))
            return torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]
        for sh in plan.shards:
            xq, xs = self._quantize(x2d, sh, fused, share)
            outs.append(self._gemm(plan, sh, xq, xs, backend))
        return torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]

    def _quantize(self, x2d: torch.Tensor, sh: _Fp8Shard, fused: bool, share: bool):
        if not fused:
            if sh.sa is None:
                s = Q.per_token_scale(x2d)
                return Q.quantize_fp8(x2d, s), s
            return Q.quantize_fp8(x2d, sh.sa), sh.sa
        from . import triton_kernels as TK

        mode = sh.mode
        if share:
            hit = _ACT_CACHE.get(x2d, mode)
            if hit is not None:
                return hit
        value = TK.fp8_quant_per_token(x2d) if sh.sa is None else (TK.fp8_quant_static(x2d, sh.sa), sh.sa)
        if share:
            _ACT_CACHE.put(x2d, mode, value)
        return value

    def _tuned_backend(self, x2d: torch.Tensor, out_dtype: torch.dtype, measure: bool) -> str:
        """auto/autotune: the cached measured winner for this GPU and shape bucket; on a miss the
        heuristic default (auto, or during CUDA-graph capture) or a measurement (autotune)."""
        from . import autotune as AT

        bucket = AT.m_bucket(x2d.shape[0])
        memo = self.__dict__.setdefault("_tuned", {})
        hit = memo.get((bucket, out_dtype, measure))
        if hit is not None:
            return hit
        dev = x2d.device
        static_pt = self.input_scale is not None and self.input_scale.dim() == 0 and self.weight_scale.dim() == 0 and not self.shard_sizes
        cands = fp8_candidates(dev, static_pt, self.input_scale is not None)
        if "flashinfer" in cands:
            # bmm_fp8's cuBLASLt algorithms are candidates of their own: its heuristic's first
            # pick is up to ~30% slower than torch._scaled_mm's on some H200 shapes.
            from . import flashinfer_gemm as FI

            sh = self._plan(out_dtype).shards[0]
            n_algos = 0
            if sh.sa is not None and sh.sb is not None:  # static per-tensor: fp8_candidates checked it
                try:
                    n_algos = FI.cublas_tactics(x2d.shape[0], sh.wt3, sh.sa, sh.sb, out_dtype)
                except Exception:
                    n_algos = 0
            cands = cands + tuple(f"flashinfer@{i}" for i in range(n_algos))
        default = _fp8_default(dev)
        if not cands:
            return default
        key = AT.shape_key(
            x2d.shape[0],
            self.in_features,
            self.out_features,
            "pc" if self.weight_scale.dim() else "pt",
            "tok" if self.input_scale is None else ("static" if not self.shard_sizes else "static_shards"),
            out_dtype,
        )
        tuner = AT.tuner_for(dev)
        choice = tuner.lookup(key, cands)
        if choice is None:
            if not measure or _capturing(x2d):
                return default  # not memoized: a later eager call may still tune
            xs = x2d.detach()
            choice = tuner.tune(key, {b: functools.partial(self._run, xs, out_dtype, b, False) for b in cands})
        memo[(bucket, out_dtype, measure)] = choice
        return choice

    def _fused_applies(self, x: torch.Tensor, any_m: bool = False) -> bool:
        """`triton` takes the one-launch kernel where it wins (triton_kernels.one_launch_wins: few
        rows), `triton_fused` (any_m) always: static input scale, one shard, an input and weight
        the kernel takes."""
        if self.input_scale is None or self.shard_sizes or not _has_module("triton"):
            return False
        from . import triton_kernels as TK

        return TK.Fp8FusedCall.applicable(x, self.weight, any_m) and self.weight_scale.dtype == torch.float32

    def _make_fused_call(self, x: torch.Tensor, out_dtype: torch.dtype):
        from . import triton_kernels as TK

        bufs = _bufs(self)
        fc = TK.Fp8FusedCall(x, bufs["weight"], bufs["input_scale"], bufs["weight_scale"], self._parameters.get("bias"), out_dtype)
        self.__dict__["_fused_call"] = (fc, self.backend_request, _env_raw("DQFAST_FP8_GEMM_BACKEND"))
        return fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # Decided before any backend lookup: keep the traced graph free of host-side logic.
            return self.forward_traceable(x) if x.is_cuda else self.forward_emulation(x)
        fast = self.__dict__.get("_fused_call")
        if fast is not None:
            # The one-launch path at small M (`triton`, static scales): taken while the input
            # signature, the module's tensors and the back-end request are those it was made for.
            fc, request, env = fast
            bufs = _bufs(self)
            if (
                self.backend_request == request
                and _env_raw("DQFAST_FP8_GEMM_BACKEND") == env
                and fc.matches(x, bufs["weight"], bufs.get("input_scale"), bufs["weight_scale"], self._parameters.get("bias"))
            ):
                return fc(x)
        backend = self._resolved_backend()
        x2d = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        if backend == "auto" or backend == "autotune":
            backend = self._tuned_backend(x2d, out_dtype, backend == "autotune")
        if backend == "emulation":
            return self.forward_emulation(x)
        if backend == "compile":
            return self.forward_traceable(x)
        if (backend == "triton" or backend == "triton_fused") and self._fused_applies(x, backend == "triton_fused"):
            return self._make_fused_call(x, out_dtype)(x)
        y = self._run(x2d, out_dtype, backend, _share_act_quant())
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y if x.dim() == 2 else y.view(*x.shape[:-1], self.out_features)


class _Fp8Shard:
    """Per-shard views and scales of an Fp8Linear, in the shapes each GEMM wants."""

    __slots__ = ("w", "wt", "wt3", "w3", "sa", "sb", "sb_row", "ws_flat", "alpha", "bias", "bias_bf16", "rowwise", "mode")

    def __init__(self, mod: Fp8Linear, rows: slice, idx: int, out_dtype: torch.dtype) -> None:
        w = self.w = mod.weight[rows]
        self.wt = w.t()
        self.wt3 = self.wt.unsqueeze(0)  # [1, K, N] column-major, as bmm_fp8 takes it
        self.w3 = w.unsqueeze(0)  # [1, N, K], as the SM90 segment GEMM takes it
        ws = mod.weight_scale[rows] if mod.weight_scale.dim() == 1 else mod.weight_scale
        ws = ws.float()
        self.rowwise = ws.numel() > 1
        self.sb = ws.reshape(()) if not self.rowwise else None
        self.sb_row = ws.reshape(1, -1).expand(1, rows.stop - rows.start).contiguous()
        self.ws_flat = ws.reshape(-1) if self.rowwise else ws.reshape(())
        sa = None
        if mod.input_scale is not None:
            sa = (mod.input_scale[idx] if mod.input_scale.dim() == 1 else mod.input_scale).float().reshape(())
        self.sa = sa
        # The static scale as a Python float (one host read, at plan time) names the activation
        # quantization that sibling layers may share.
        self.mode = ("tok",) if sa is None else ("static", float(sa))
        self.alpha = (sa * self.sb) if (sa is not None and self.sb is not None) else None
        bias = mod.bias[rows] if mod.bias is not None else None
        self.bias = bias.to(out_dtype) if bias is not None else None
        self.bias_bf16 = bias.to(torch.bfloat16) if bias is not None else None


class _Fp8Plan:
    __slots__ = ("key", "out_dtype", "shards", "flashinfer_ok")

    def __init__(self, mod: Fp8Linear, out_dtype: torch.dtype, key: tuple) -> None:
        self.key = key
        self.out_dtype = out_dtype
        slices = _shard_slices(mod.shard_sizes, mod.out_features)
        self.shards = [_Fp8Shard(mod, rows, i, out_dtype) for i, rows in enumerate(slices)]
        self.flashinfer_ok = len(self.shards) == 1 and self.shards[0].alpha is not None


class Nvfp4Linear(_QuantLinear):
    """y = x @ W^T with W packed E2M1 [N, K/2], e4m3 block scales [N, K/16] and a float32
    global weight_scale_2 (0-dim, or [N] for fused shards with different global scales)."""

    # Registered buffers / parameter (nn.Module.__getattr__ would type them `Tensor | Module`).
    weight: torch.Tensor
    weight_scale: torch.Tensor
    weight_scale_2: torch.Tensor
    input_scale: torch.Tensor

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
        if in_features % Q.NVFP4_BLOCK:
            raise ValueError(f"in_features={in_features} is not a multiple of 16")
        super().__init__(in_features, out_features, backend, shard_sizes)
        self.act_quant = act_quant
        n_shards = self._n_shards
        self.register_buffer("weight", torch.zeros((out_features, in_features // 2), dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.zeros((out_features, in_features // 16), dtype=torch.float8_e4m3fn, device=device))
        self.register_buffer("weight_scale_2", torch.ones((out_features,) if n_shards else (), dtype=torch.float32, device=device))
        self.register_buffer("input_scale", torch.ones((n_shards,) if n_shards else (), dtype=torch.float32, device=device))
        self._add_bias(bias, dtype, device)
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
        return self._emulated_output(outs, x)

    def w4a8_weight_scale(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inv_row_scale [N], per-channel FP8 weight scale [1, N]) of the W4A8 path, cached per
        version of the block and global scales (no host sync)."""
        plan = self._w4a8_plan()
        return plan[1], plan[2]

    def _w4a8_plan(self) -> tuple:
        """(key, inv_row_scale, FP8 weight scale, bf16 bias or None), rebuilt when the block or
        global scales or the bias are replaced or edited in place (module dicts read directly:
        nn.Module.__getattr__ costs host time per name)."""
        bufs = _bufs(self)
        sb, gs, b = bufs["weight_scale"], bufs["weight_scale_2"], self._parameters.get("bias")
        key = (sb.data_ptr(), _ver(sb), gs.data_ptr(), _ver(gs), None if b is None else (b.data_ptr(), _ver(b)))
        cached = self.__dict__.get("_w4a8_scale")
        if cached is None or cached[0] != key:
            inv = Q.nvfp4_e4m3_inv_row_scale(sb)
            ws = (gs.float().reshape(-1) / inv).reshape(1, -1).expand(1, self.out_features).contiguous()
            cached = (key, inv, ws, None if b is None else b.to(torch.bfloat16))
            self.__dict__["_w4a8_scale"] = cached
        return cached

    def forward_w4a8_emulation(self, x: torch.Tensor) -> torch.Tensor:
        """CPU reference of the W4A8 path: e4m3 weight from quant.nvfp4_to_e4m3, per-token e4m3
        activations, float32 matmul."""
        x2d = _flatten(x).float()
        inv, ws = self.w4a8_weight_scale()
        w = Q.nvfp4_to_e4m3(self.weight, self.weight_scale, inv).float() * ws.reshape(-1, 1)
        return self._emulated_output([Q.fp8_fake_quant(x2d, Q.per_token_scale(x2d)) @ w.t()], x)

    def _forward_w4a8(self, x2d: torch.Tensor) -> torch.Tensor:
        from . import triton_kernels as TK

        _, inv, ws, bias = self._w4a8_plan()
        bufs = _bufs(self)
        packed, sb = bufs["weight"], bufs["weight_scale"]
        # Per-token FP8 activations, quantized once for sibling layers fed the same tensor (the
        # same cache and numerics as Fp8Linear's per-token path); the e4m3 weight is transient,
        # one layer call. Both in one launch when the activation is not cached, through a call
        # object cached per input signature (TK.W4a8PrepareCall).
        share = _share_act_quant()
        hit = _ACT_CACHE.get(x2d, ("tok",)) if share else None
        if hit is None:
            prep = self.__dict__.get("_w4a8_prep")
            if prep is None or not prep.matches(x2d, packed, sb, inv):
                prep = TK.W4a8PrepareCall(packed, sb, inv, x2d) if TK.W4a8PrepareCall.applicable(x2d) else None
                self.__dict__["_w4a8_prep"] = prep
            w8, xq, xs = prep(x2d, packed, sb, inv) if prep is not None else TK.w4a8_prepare(packed, sb, inv, x2d)
            if share:
                _ACT_CACHE.put(x2d, ("tok",), (xq, xs))
        else:
            w8 = TK.nvfp4_to_e4m3(packed, sb, inv)
            xq, xs = hit
        return torch._scaled_mm(xq, w8.t(), scale_a=xs, scale_b=ws, bias=bias, out_dtype=torch.bfloat16, use_fast_accum=True)

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

    def forward_traceable(self, x: torch.Tensor) -> torch.Tensor:
        """The GPU path in plain torch ops for torch.compile (Inductor fuses the weight
        conversion into one kernel and the activation quantization into its producer): W4A8
        (NVFP4 -> e4m3 weight, per-token FP8 activations, row-wise `_scaled_mm`) when the
        backend request is w4a8 or auto, else W4A16 (dequantize to bf16, F.linear)."""
        x2d = _flatten(x)
        if (self.backend_request or "auto") in ("w4a8", "auto"):
            inv = Q.nvfp4_e4m3_inv_row_scale(self.weight_scale)
            ws = (self.weight_scale_2.float().reshape(-1) / inv).reshape(1, -1).expand(1, self.out_features).contiguous()
            # Our Triton kernel, not Inductor's own code for the unpack + lookup + scale + cast
            # (several times slower, measured on the whole FLUX model): on a GPU as a user-defined
            # Triton kernel inside the graph (launched by Inductor's code: less host time per
            # call than the custom op, whose Python dispatch made the compiled model host-bound;
            # W4A8_CONVERSION_IN_GRAPH = False takes the custom op), elsewhere the custom op.
            if W4A8_CONVERSION_IN_GRAPH and x.is_cuda and _TRITON_INSTALLED:
                from . import triton_kernels as TK

                w8 = TK.nvfp4_to_e4m3_in_graph(self.weight, self.weight_scale, inv)
            else:
                w8 = torch.ops.dqfast.nvfp4_to_e4m3(self.weight, self.weight_scale, inv)
            xs = Q.per_token_scale(x2d)
            xq = Q.quantize_fp8(x2d, xs)
            bias = self.bias.to(torch.bfloat16) if self.bias is not None else None
            y = torch._scaled_mm(xq, w8.t(), scale_a=xs, scale_b=ws, bias=bias, out_dtype=torch.bfloat16, use_fast_accum=True)
        else:
            xin = x2d if x2d.dtype in (torch.bfloat16, torch.float16) else x2d.to(torch.bfloat16)
            w = self.dequantized_weight().to(xin.dtype)
            y = torch.nn.functional.linear(xin, w, self.bias.to(xin.dtype) if self.bias is not None else None)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self.forward_traceable(x) if x.is_cuda else self.forward_emulation(x)
        # Resolved once per (request, env value, device): the capability query costs host time.
        key = (self.backend_request, _env_raw("DQFAST_FP4_GEMM_BACKEND"), _bufs(self)["weight"].device)
        cached = self.__dict__.get("_backend_cache")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_backend_cache"] = (key, self.backend)
        backend = cached[1]
        if backend == "emulation":
            return self.forward_emulation(x)
        if backend == "emulation_w4a16":
            return self.forward_emulation(x, act_quant=False)
        x2d = _flatten(x)
        if backend == "w4a8":
            y = self._forward_w4a8(x2d)
        elif backend.startswith("triton"):
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
    if input_scale is not None and mod.input_scale is not None:  # built with static_input_scale
        mod.input_scale.copy_(torch.as_tensor(input_scale, dtype=torch.float32))
    if linear.bias is not None and mod.bias is not None:  # built with bias=linear.bias is not None
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
    if linear.bias is not None and mod.bias is not None:  # built with bias=linear.bias is not None
        mod.bias.data.copy_(linear.bias.detach())
    return mod


def _fused_dims(shards: Sequence[Fp8Linear] | Sequence[Nvfp4Linear]) -> tuple[int, list[int], bool, torch.dtype]:
    """(in_features, each shard's out_features, any bias, the bias dtype) of shards fused along N."""
    k = shards[0].in_features
    if any(s.in_features != k for s in shards):
        raise ValueError("shards must share in_features")
    dtype = next((s.bias.dtype for s in shards if s.bias is not None), torch.bfloat16)
    return k, [s.out_features for s in shards], any(s.bias is not None for s in shards), dtype


def _copy_fused_bias(fused: Fp8Linear | Nvfp4Linear, shards: Sequence[Fp8Linear] | Sequence[Nvfp4Linear], dtype: torch.dtype) -> None:
    """The shards' biases end to end (zeros for a shard without one) into ``fused.bias``."""
    if fused.bias is not None:  # built with bias=has_bias
        fused.bias.data.copy_(
            torch.cat(
                [
                    s.bias.detach().to(dtype) if s.bias is not None else torch.zeros(s.out_features, dtype=dtype, device=s.weight.device)
                    for s in shards
                ]
            )
        )


def fuse_fp8_linears(shards: Sequence[Fp8Linear]) -> Fp8Linear:
    """Concatenate FP8 shards (e.g. q, k, v) along N without requantizing.

    Each shard keeps its bytes; per-tensor weight scales become one per-channel vector, so
    the result is exact. Static input scales that differ stay per shard (the GPU path then
    quantizes the activation once per distinct scale); equal ones collapse to one.
    """
    first = shards[0]
    k, sizes, has_bias, dtype = _fused_dims(shards)
    if any((s.input_scale is None) != (first.input_scale is None) for s in shards):
        raise ValueError("cannot fuse static and dynamic activation scaling")
    in_scales = None
    same_in = True
    if first.input_scale is not None:  # then every shard has one (checked above)
        in_scales = torch.stack([s.input_scale.reshape(()) for s in shards if s.input_scale is not None])
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
    if in_scales is not None and fused.input_scale is not None:
        fused.input_scale.copy_(in_scales[0] if same_in else in_scales)
    _copy_fused_bias(fused, shards, dtype)
    return fused


def fuse_nvfp4_linears(shards: Sequence[Nvfp4Linear]) -> Nvfp4Linear:
    """Concatenate NVFP4 shards along N exactly: block scales and codes untouched, each
    shard's weight_scale_2 kept as a per-channel vector (never max over shards)."""
    first = shards[0]
    k, sizes, has_bias, dtype = _fused_dims(shards)
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
    _copy_fused_bias(fused, shards, dtype)
    return fused
