"""Fp8Linear / Nvfp4Linear emulation against plain float references, fused shards, backends."""

from __future__ import annotations

import pytest
import torch
from dqfast.runtime import (
    Fp8Linear,
    Nvfp4Linear,
    fp8_linear_from_float,
    fuse_fp8_linears,
    fuse_nvfp4_linears,
    nvfp4_linear_from_float,
    resolve_fp4_backend,
    resolve_fp8_backend,
)
from dqfast.runtime import quant as Q
from torch import nn


def _linear(k: int, n: int, seed: int, scale: float = 1.0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.mul_(scale)
    return lin


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _e4m3_round(v: torch.Tensor) -> torch.Tensor:
    """float64 -> nearest e4m3 value, by searching the table of all 256 codes (independent
    of the torch cast used by the module), saturating at 448, ties to even mantissa."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).double()
    finite = codes[torch.isfinite(codes)]
    table, _ = torch.sort(torch.unique(finite))
    v = v.clamp(-448, 448)
    d = (v.flatten()[:, None] - table[None, :]).abs()
    best = d.min(1, keepdim=True).values
    cand = d == best
    mant_even = torch.arange(256, dtype=torch.int32)[torch.isfinite(codes)] % 2 == 0
    # map sorted table back to its code parity
    order = torch.sort(finite).indices
    parity = mant_even[order]
    _, uniq_idx = torch.unique(finite[order], return_inverse=True)
    par_u = torch.zeros(table.numel(), dtype=torch.bool)
    par_u[uniq_idx] = parity
    pick = torch.where(cand.sum(1) > 1, torch.argmax((cand & par_u[None, :]).int(), 1), torch.argmax(cand.int(), 1))
    return table[pick].reshape(v.shape)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("static", [False, True])
def test_fp8_emulation_matches_float64_fake_quant_reference(per_channel: bool, static: bool) -> None:
    lin = _linear(64, 48, seed=0)
    x = torch.randn(3, 7, 64) * 2
    in_scale = float(x.abs().max() / 448) * 0.7 if static else None  # 0.7: some saturation
    mod = fp8_linear_from_float(lin, per_channel=per_channel, input_scale=in_scale, backend="emulation")
    y = mod(x)
    # independent float64 reference
    w = lin.weight.detach().double()
    ws = (w.abs().amax(1, keepdim=True) if per_channel else w.abs().max()) / 448
    wq = _e4m3_round(w / ws) * ws
    x2 = x.double().reshape(-1, 64)
    xs = torch.tensor(in_scale, dtype=torch.float64) if static else x2.abs().amax(1, keepdim=True) / 448
    xq = _e4m3_round(x2 / xs) * xs
    ref = (xq @ wq.t() + lin.bias.detach().double()).reshape(3, 7, 48)
    assert _rel(y, ref) < 1e-5
    # and it is a decent approximation of the unquantized layer
    assert _rel(y, lin(x).detach()) < 0.08


def test_fp8_emulation_keeps_bf16_io() -> None:
    lin = _linear(32, 16, seed=1).to(torch.bfloat16)
    mod = fp8_linear_from_float(lin, input_scale=0.01, backend="emulation")
    y = mod(torch.randn(4, 32, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and y.shape == (4, 16)


def test_nvfp4_emulation_matches_float_reference() -> None:
    lin = _linear(64, 32, seed=2)
    x = torch.randn(10, 64)
    in_scale = float(x.abs().max() / 2688)
    mod = nvfp4_linear_from_float(lin, input_scale=in_scale, backend="emulation")
    w_deq = Q.nvfp4_dequantize(mod.weight, mod.weight_scale, mod.weight_scale_2).double()
    ref16 = x.double() @ w_deq.t() + lin.bias.detach().double()
    assert _rel(mod.forward_emulation(x, act_quant=False), ref16) < 1e-6
    # W4A4: activations fake-quantized per 16 with global scale 1/input_scale
    xb = x.double().reshape(10, 4, 16)
    sb = (xb.abs().amax(-1) / 6 / in_scale).float().clamp(2**-9, 448).to(torch.float8_e4m3fn).double()
    xdq = (
        torch.tensor(
            [
                [float(v) for v in row]
                for row in Q.e2m1_decode(Q.e2m1_encode((xb / (sb[..., None] * in_scale)).reshape(10, 64).float())).tolist()
            ],
            dtype=torch.float64,
        ).reshape(10, 4, 16)
        * sb[..., None]
        * in_scale
    )
    ref4 = xdq.reshape(10, 64) @ w_deq.t() + lin.bias.detach().double()
    y = mod(x)
    assert _rel(y, ref4) < 1e-6
    full = lin(x).detach()
    assert _rel(mod.forward_emulation(x, act_quant=False), full) < 0.2
    assert _rel(y, full) < 0.3
    assert _rel(y, full) > _rel(mod.forward_emulation(x, act_quant=False), full)


def test_fused_fp8_shards_are_exact_with_different_scales() -> None:
    x = torch.randn(5, 64)
    shards = [
        fp8_linear_from_float(_linear(64, 16, seed=s, scale=f), input_scale=si, backend="emulation")
        for s, f, si in [(0, 1.0, 0.01), (1, 8.0, 0.02), (2, 0.1, 0.005)]
    ]
    fused = fuse_fp8_linears(shards)
    expect = torch.cat([m(x) for m in shards], dim=-1)
    assert torch.equal(fused(x), expect)
    assert torch.equal(fused.weight.view(torch.uint8), torch.cat([m.weight.view(torch.uint8) for m in shards]))


def test_fused_fp8_equal_input_scales_collapse_to_one() -> None:
    shards = [fp8_linear_from_float(_linear(32, 16, seed=s), input_scale=0.01, backend="emulation") for s in range(3)]
    fused = fuse_fp8_linears(shards)
    assert fused.shard_sizes is None and fused.input_scale.dim() == 0
    x = torch.randn(4, 32)
    assert torch.equal(fused(x), torch.cat([m(x) for m in shards], dim=-1))


def test_fused_nvfp4_shards_keep_per_shard_global_scale() -> None:
    x = torch.randn(6, 64)
    shards = [
        nvfp4_linear_from_float(_linear(64, 16, seed=s, scale=f), input_scale=float(x.abs().max() / 2688), backend="emulation")
        for s, f in [(0, 1.0), (1, 10.0), (2, 0.05)]
    ]
    fused = fuse_nvfp4_linears(shards)
    expect = torch.cat([m(x) for m in shards], dim=-1)
    assert torch.allclose(fused(x), expect, rtol=1e-6, atol=1e-6)
    # the max()-of-global-scales shortcut (without rescaling block scales) is visibly wrong
    naive = fuse_nvfp4_linears(shards)
    naive.weight_scale_2.fill_(max(float(m.weight_scale_2) for m in shards))
    assert _rel(naive(x), expect) > 0.5


def test_backend_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.delenv("DQFAST_FP8_GEMM_BACKEND", raising=False)
    monkeypatch.delenv("DQFAST_FP4_GEMM_BACKEND", raising=False)
    assert resolve_fp8_backend(None, cpu) == "emulation"
    assert resolve_fp4_backend(None, cpu) == "emulation"
    monkeypatch.setenv("DQFAST_FP8_GEMM_BACKEND", "scaled_mm")
    monkeypatch.setenv("DQFAST_FP4_GEMM_BACKEND", "emulation_w4a16")
    assert resolve_fp8_backend(None, cpu) == "scaled_mm"
    assert resolve_fp4_backend(None, cpu) == "emulation_w4a16"
    assert resolve_fp8_backend("emulation", cpu) == "emulation"
    monkeypatch.setenv("DQFAST_FP8_GEMM_BACKEND", "bogus")
    with pytest.raises(ValueError, match="bogus"):
        resolve_fp8_backend(None, cpu)


def test_env_backend_switches_nvfp4_activation_quant(monkeypatch: pytest.MonkeyPatch) -> None:
    mod = nvfp4_linear_from_float(_linear(32, 16, seed=3), input_scale=0.002)
    x = torch.randn(3, 32)
    monkeypatch.setenv("DQFAST_FP4_GEMM_BACKEND", "emulation_w4a16")
    a = mod(x)
    monkeypatch.setenv("DQFAST_FP4_GEMM_BACKEND", "emulation")
    b = mod(x)
    assert torch.equal(a, mod.forward_emulation(x, act_quant=False)) and not torch.equal(a, b)


def test_module_shapes_and_dtypes() -> None:
    f = Fp8Linear(64, 32)
    assert f.weight.dtype == torch.float8_e4m3fn and f.weight_scale.shape == () and f.input_scale.shape == ()
    assert Fp8Linear(64, 32, per_channel=True, static_input_scale=False).weight_scale.shape == (32,)
    n = Nvfp4Linear(64, 32)
    assert n.weight.shape == (32, 32) and n.weight.dtype == torch.uint8
    assert n.weight_scale.shape == (32, 4) and n.weight_scale.dtype == torch.float8_e4m3fn
    with pytest.raises(ValueError):
        Nvfp4Linear(40, 32)
