"""FlashInfer dispatch and input preparation, on CPU with a fake `flashinfer` module that records
what it is given and computes the documented result in float (FlashInfer itself needs a GPU:
its FP8 paths were validated and timed on an H200, docs/runtime.md; `mm_fp4` needs SM100 and was
never executed)."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from dqfast.runtime import flashinfer_gemm as FI
from dqfast.runtime import linear as L
from dqfast.runtime import quant as Q


def _fp8_mm(a: torch.Tensor, b_kn: torch.Tensor) -> torch.Tensor:
    return a.float() @ b_kn.float()


@pytest.fixture
def fake_flashinfer(monkeypatch):
    calls: list[tuple] = []
    fi = types.ModuleType("flashinfer")

    def bmm_fp8(A, B, A_scale, B_scale, dtype, out=None, backend="cublas"):
        calls.append(("bmm_fp8", backend, tuple(A.shape), tuple(B.shape), B.stride()[1:], dtype))
        out.copy_((_fp8_mm(A[0], B[0]) * A_scale * B_scale).to(dtype).unsqueeze(0))
        return out

    class SegmentGEMMWrapper:
        def __init__(self, workspace, backend="auto"):
            calls.append(("segment_init", backend, workspace.numel()))

        def run(self, x, weights, batch_size, weight_column_major, out=None, seg_indptr=None):
            calls.append(("segment_run", batch_size, weight_column_major, tuple(weights.shape), seg_indptr.tolist()))
            out.copy_(_fp8_mm(x, weights[0].t()).to(out.dtype))  # e4m3 x e4m3 -> bf16, no scales
            return out

    fi.bmm_fp8 = bmm_fp8
    gemm = types.ModuleType("flashinfer.gemm")
    gemm.SegmentGEMMWrapper = SegmentGEMMWrapper
    fi.gemm = gemm
    monkeypatch.setitem(sys.modules, "flashinfer", fi)
    monkeypatch.setitem(sys.modules, "flashinfer.gemm", gemm)
    for f in (FI._gemm_jit_module, FI._segment_gemm, FI._workspace, FI._indptr):
        f.cache_clear()
    monkeypatch.setattr(FI, "_gemm_jit_module", lambda: None)  # no JIT module on CPU: public API
    yield fi, calls
    for f in (FI._segment_gemm, FI._workspace, FI._indptr):
        f.cache_clear()


@pytest.fixture
def cpu_quant(monkeypatch):
    """The Triton activation quantization replaced by its torch reference (same bytes on GPU)."""
    from dqfast.runtime import triton_kernels as TK

    monkeypatch.setattr(TK, "fp8_quant_static", lambda x, s: Q.quantize_fp8(x, s))


def _layer(bias: bool = True, per_channel: bool = False, backend: str = "flashinfer") -> L.Fp8Linear:
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48, bias=bias)
    return L.fp8_linear_from_float(lin, per_channel=per_channel, input_scale=0.02, backend=backend)


@pytest.mark.parametrize("backend", ["flashinfer", "flashinfer_cudnn", "flashinfer_cutlass"])
@pytest.mark.parametrize("bias", [True, False])
def test_flashinfer_backends_match_emulation(fake_flashinfer, cpu_quant, monkeypatch, backend, bias) -> None:
    _, calls = fake_flashinfer
    monkeypatch.setattr(L, "_capability", lambda device: (9, 0))
    mod = _layer(bias=bias, backend=backend)
    x = torch.randn(2, 10, 64).to(torch.bfloat16)
    y = mod(x)
    ref = mod.forward_emulation(x)
    assert y.shape == (2, 10, 48) and y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), ref.float(), rtol=2e-2, atol=2e-2)
    if backend == "flashinfer_cutlass":  # SM90: CUTLASS grouped GEMM, one group, weight [1, N, K] column-major
        assert ("segment_init", "sm90", FI.SEGMENT_WORKSPACE_BYTES) in calls
        assert ("segment_run", 1, True, (1, 48, 64), [0, 20]) in calls
    else:  # bmm_fp8: A [1, M, K], B the [1, K, N] column-major view of the [N, K] weight
        name = "cudnn" if backend == "flashinfer_cudnn" else "cublas"
        assert calls == [("bmm_fp8", name, (1, 20, 64), (1, 64, 48), (1, 64), torch.bfloat16)]


def test_cutlass_on_sm100_uses_bmm_fp8_cutlass(fake_flashinfer, cpu_quant, monkeypatch) -> None:
    _, calls = fake_flashinfer
    monkeypatch.setattr(L, "_capability", lambda device: (10, 0))
    mod = _layer(backend="flashinfer_cutlass")
    x = torch.randn(5, 64).to(torch.bfloat16)
    assert torch.allclose(mod(x).float(), mod.forward_emulation(x).float(), rtol=2e-2, atol=2e-2)
    assert calls[0][:2] == ("bmm_fp8", "cutlass")


def test_cutlass_refuses_other_architectures(fake_flashinfer, cpu_quant, monkeypatch) -> None:
    monkeypatch.setattr(L, "_capability", lambda device: (8, 9))
    with pytest.raises(NotImplementedError, match="SM89"):
        _layer(backend="flashinfer_cutlass")(torch.randn(4, 64).to(torch.bfloat16))


@pytest.mark.parametrize("per_channel, static", [(True, True), (False, False)])
def test_flashinfer_refuses_per_channel_and_per_token(fake_flashinfer, cpu_quant, monkeypatch, per_channel, static) -> None:
    torch.manual_seed(0)
    mod = L.fp8_linear_from_float(
        torch.nn.Linear(64, 48), per_channel=per_channel, input_scale=0.02 if static else None, backend="flashinfer"
    )
    if not static:
        from dqfast.runtime import triton_kernels as TK

        monkeypatch.setattr(TK, "fp8_quant_per_token", lambda x: (Q.quantize_fp8(x, Q.per_token_scale(x)), Q.per_token_scale(x)))
    with pytest.raises(NotImplementedError, match="static per-tensor"):
        mod(torch.randn(4, 64).to(torch.bfloat16))


class _FakeJitModule:
    """bmm_fp8's JIT entry points as flashinfer 0.7.4 calls them: (A, B, out, A_scale, B_scale,
    workspace[, algo_buffer[, algo_index]]); three algorithms exist for every problem."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def _fill(self, out, sa, sb, value):
        out.fill_(value * float(sa) * float(sb))

    def bmm_fp8(self, a, b, out, sa, sb, ws):
        self.calls.append(("heuristic", tuple(a.shape), tuple(b.shape), ws.numel()))
        self._fill(out, sa, sb, 1.0)

    def bmm_fp8_get_algos(self, a, b, out, sa, sb, ws, buf):
        self.calls.append(("get_algos", tuple(a.shape), buf.numel(), buf.device.type))
        return 3

    def bmm_fp8_run_with_algo(self, a, b, out, sa, sb, ws, buf, idx):
        self.calls.append(("algo", idx))
        self._fill(out, sa, sb, 10.0 + idx)


def test_direct_cublas_calls_and_tactics(monkeypatch) -> None:
    mod = _FakeJitModule()
    FI._workspace.cache_clear()
    FI._ALGOS.clear()
    monkeypatch.setattr(FI, "_gemm_jit_module", lambda: mod)
    xq = torch.zeros(7, 32, dtype=torch.float8_e4m3fn)
    w_t3 = torch.zeros(16, 32, dtype=torch.float8_e4m3fn).t().unsqueeze(0)
    sa, sb = torch.tensor(0.5), torch.tensor(0.25)
    y = FI.bmm_fp8(xq, w_t3, sa, sb, torch.bfloat16, "cublas")
    assert y.shape == (7, 16) and float(y[0, 0]) == 0.125
    assert mod.calls == [("heuristic", (1, 7, 32), (1, 32, 16), FI.WORKSPACE_BYTES)]
    assert FI.cublas_tactics(7, w_t3, sa, sb, torch.bfloat16) == 3
    assert float(FI.bmm_fp8(xq, w_t3, sa, sb, torch.bfloat16, "cublas", tactic=2)[0, 0]) == 12 * 0.125
    assert float(FI.bmm_fp8(xq, w_t3, sa, sb, torch.bfloat16, "cublas", tactic=5)[0, 0]) == 0.125  # not listed: heuristic
    assert [c for c in mod.calls if c[0] == "get_algos"] == [("get_algos", (1, 7, 32), FI.MAX_ALGOS * FI.ALGO_BYTES, "cpu")]  # cached
    FI._workspace.cache_clear()
    FI._ALGOS.clear()


def test_autotune_times_each_cublas_algorithm(monkeypatch, tmp_path, cpu_quant) -> None:
    from dqfast.runtime import autotune as AT

    mod = _FakeJitModule()
    FI._workspace.cache_clear()
    FI._ALGOS.clear()
    monkeypatch.setattr(FI, "_gemm_jit_module", lambda: mod)
    monkeypatch.setattr(L, "_capability", lambda device: (9, 0))
    monkeypatch.setattr(L, "_has_module", lambda name: name in ("triton", "flashinfer"))
    ran: list[str] = []
    real_run = L.Fp8Linear._run

    def run(self, x2d, out_dtype, backend, share):
        ran.append(backend)
        if backend.startswith("flashinfer"):
            return real_run(self, x2d, out_dtype, backend, share)
        return torch.zeros(x2d.shape[0], self.out_features, dtype=out_dtype)

    monkeypatch.setattr(L.Fp8Linear, "_run", run)
    times = {"flashinfer@1": 0.01}

    def timer(fn):
        fn()
        return times.get(ran[-1], 1.0)

    tuner = AT.Autotuner(tmp_path / "c.json", timer=timer)
    monkeypatch.setattr(AT, "tuner_for", lambda device: tuner)
    layer = _layer(backend="autotune")
    y = layer(torch.randn(4, 64).to(torch.bfloat16))
    entry = tuner.entries["M16_K64_N48_wpt_astatic_bfloat16"]
    assert entry["backend"] == "flashinfer@1" and {"flashinfer@0", "flashinfer@1", "flashinfer@2", "flashinfer"} <= set(entry["times_ms"])
    assert ran[-1] == "flashinfer@1" and ("algo", 1) in mod.calls and y.shape == (4, 48)
    FI._workspace.cache_clear()
    FI._ALGOS.clear()


# -- mm_fp4 (SM100+) input preparation ----------------------------------------------------------


def _swizzle_reference(s: torch.Tensor) -> torch.Tensor:
    """FlashInfer / CUTLASS 128x4 block-scale layout, element by element: rows padded to 128 and
    columns to 4 (flashinfer.quantization.fp4_quantization._compute_swizzled_layout_sf_size), each
    128x4 tile stored as 32 rows x (4 row groups of 32) x 4 columns, tiles in row-major order."""
    rows, cols = s.shape
    pr, pc = -(-rows // 128) * 128, -(-cols // 4) * 4
    out = torch.zeros(pr * pc, dtype=torch.uint8)
    for r in range(rows):
        for c in range(cols):
            tile = (r // 128) * (pc // 4) + c // 4
            out[tile * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4] = s[r, c]
    return out


@pytest.mark.parametrize("rows, cols", [(128, 4), (200, 7), (33, 192), (300, 12)])
def test_swizzle_matches_documented_layout(rows, cols) -> None:
    s = torch.randint(1, 255, (rows, cols), dtype=torch.uint8)
    got = Q.swizzle_block_scales_128x4(s)
    assert got.shape == (-(-rows // 128) * 128, -(-cols // 4) * 4)
    assert torch.equal(got.flatten(), _swizzle_reference(s))
    e4 = Q.swizzle_block_scales_128x4(s.view(torch.float8_e4m3fn))
    assert e4.dtype == torch.float8_e4m3fn and torch.equal(e4.view(torch.uint8), got)


def test_mm_fp4_call_preparation(monkeypatch) -> None:
    """Nvfp4Linear's flashinfer path: activation quantized with global scale 1/input_scale and
    16-element blocks into the 128x4 layout; weight passed as the [K/2, N] column-major view,
    its block scales swizzled once at first use and transposed; alpha = input_scale * weight_scale_2."""
    got = {}
    fi = types.ModuleType("flashinfer")

    def fp4_quantize(x, global_scale, sf_vec_size, use_ue8m0, is_sf_swizzled_layout):
        got["quant"] = (tuple(x.shape), float(global_scale), sf_vec_size, use_ue8m0, is_sf_swizzled_layout)
        return torch.zeros(x.shape[0], x.shape[1] // 2, dtype=torch.uint8), torch.zeros(1, dtype=torch.uint8)

    def mm_fp4(a, b, a_descale, b_descale, alpha, out_dtype):
        got["mm"] = (tuple(a.shape), tuple(b.shape), b.stride(), b_descale, float(alpha), out_dtype)
        return torch.zeros(a.shape[0], b.shape[1], dtype=out_dtype)

    fi.fp4_quantize, fi.mm_fp4 = fp4_quantize, mm_fp4
    monkeypatch.setitem(sys.modules, "flashinfer", fi)
    torch.manual_seed(0)
    mod = L.nvfp4_linear_from_float(torch.nn.Linear(64, 40), input_scale=0.125, backend="flashinfer")
    y = mod(torch.randn(3, 64).to(torch.bfloat16))
    assert y.shape == (3, 40)
    assert got["quant"] == ((3, 64), 8.0, 16, False, True)
    a_shape, b_shape, b_stride, b_sf, alpha, dtype = got["mm"]
    assert a_shape == (3, 32) and b_shape == (32, 40) and b_stride == (1, 32)  # column-major [K/2, N]
    assert alpha == pytest.approx(0.125 * float(mod.weight_scale_2)) and dtype == torch.bfloat16
    assert torch.equal(b_sf.t().contiguous().view(torch.uint8).flatten(), _swizzle_reference(mod.weight_scale.view(torch.uint8)))
    with pytest.raises(NotImplementedError, match="one global scale"):
        L.fuse_nvfp4_linears([mod, mod])(torch.randn(3, 64).to(torch.bfloat16))


def test_algorithm_backend_names() -> None:
    cpu = torch.device("cpu")
    assert L.resolve_fp8_backend("flashinfer@3", cpu) == "flashinfer@3"
    for bad in ("flashinfer@", "flashinfer@x", "cudnn@1"):
        with pytest.raises(ValueError, match="unknown FP8 backend"):
            L.resolve_fp8_backend(bad, cpu)
