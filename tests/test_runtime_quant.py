"""Reference quantization math vs independently derived expectations."""

from __future__ import annotations

import torch
from dqfast.runtime import quant as Q

TABLE = torch.tensor(Q.E2M1_VALUES, dtype=torch.float64)


def brute_force_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Nearest table magnitude, ties to the even code index, clamp at 6 (independent of
    the bound table used by e2m1_encode)."""
    ax = x.double().abs().clamp(max=6.0)
    dist = (ax[:, None] - TABLE[None, :]).abs()
    best = dist.min(dim=1, keepdim=True).values
    cand = dist == best
    # among tied candidates prefer the even index
    idx = torch.where(cand.sum(1) > 1, torch.argmax((cand & (torch.arange(8) % 2 == 0)).int(), dim=1), torch.argmax(cand.int(), dim=1))
    return torch.where(x < 0, -TABLE[idx], TABLE[idx])


def test_e2m1_encode_matches_brute_force_on_random_and_boundaries() -> None:
    g = torch.Generator().manual_seed(0)
    rnd = torch.randn(20000, generator=g) * 3
    mids = (TABLE[1:] + TABLE[:-1]) / 2
    edges = torch.cat([mids, -mids, TABLE, -TABLE, torch.tensor([6.5, 100.0, -7.0])]).float()
    for x in (rnd, edges):
        got = Q.e2m1_decode(Q.e2m1_encode(x)).double()
        assert torch.equal(got, brute_force_e2m1(x)), (x[got != brute_force_e2m1(x)])[:5]


def test_pack_low_nibble_is_even_element() -> None:
    codes = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    packed = Q.pack_e2m1(codes)
    assert packed.tolist() == [[0x21, 0x0F]]
    assert torch.equal(Q.unpack_e2m1(packed), codes)
    assert Q.swap_nibbles(packed).tolist() == [[0x12, 0xF0]]


def test_fp8_quantize_saturates_and_rounds_like_torch() -> None:
    x = torch.tensor([0.0, 1.0, -500.0, 448.0, 1000.0, 3.3])
    q = Q.quantize_fp8(x, torch.tensor(1.0)).float()
    assert q.tolist()[:5] == [0.0, 1.0, -448.0, 448.0, 448.0]
    assert q[5] == torch.tensor(3.3).to(torch.float8_e4m3fn).float()


def test_nvfp4_quantize_picks_nearest_code_per_block() -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 64, generator=g)
    packed, s, gs = Q.nvfp4_quantize(w)
    assert packed.shape == (8, 32) and s.shape == (8, 4) and packed.dtype == torch.uint8
    assert torch.isclose(gs, w.abs().max() / 2688)
    # block scale recipe, recomputed independently
    blocks = w.reshape(8, 4, 16)
    expect_s = (blocks.abs().amax(-1) / (6 * gs)).to(torch.float8_e4m3fn)
    assert torch.equal(s.view(torch.uint8), expect_s.view(torch.uint8))
    x = blocks / (s.float()[..., None] * gs)
    got = Q.e2m1_decode(Q.unpack_e2m1(packed)).reshape(8, 4, 16).double()
    assert torch.equal(got.flatten(), brute_force_e2m1(x.flatten()))
    deq = Q.nvfp4_dequantize(packed, s, gs)
    rel = (deq - w).norm() / w.norm()
    assert 0.02 < rel < 0.15


def test_zero_block_gets_unit_scale() -> None:
    w = torch.zeros(2, 32)
    w[0, 20] = 1.0
    _, s, _ = Q.nvfp4_quantize(w)
    assert s.float()[0, 0] == 1.0 and s.float()[1, 0] == 1.0


def test_swizzle_128x4_matches_offset_formula() -> None:
    rows, cols = 130, 6
    s = torch.randint(0, 120, (rows, cols), dtype=torch.uint8)
    out = Q.swizzle_block_scales_128x4(s).flatten()
    pc = 8
    assert out.numel() == 256 * pc
    for r, c in [(0, 0), (1, 0), (31, 3), (32, 0), (127, 5), (128, 1), (129, 5), (77, 2)]:
        off = (r // 128) * (pc // 4) * 512 + (c // 4) * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4
        assert out[off] == s[r, c]
    assert int(out.sum()) == int(s.sum())  # padding is zero


def test_clamp_nan_e4m3() -> None:
    raw = torch.tensor([0x7F, 0xFF, 0x38, 0x7E], dtype=torch.uint8)
    fixed, n = Q.clamp_nan_e4m3(raw.view(torch.float8_e4m3fn))
    assert n == 2
    assert fixed.view(torch.uint8).tolist() == [0x7E, 0x7E, 0x38, 0x7E]
    assert not torch.isnan(fixed.float()).any()


def test_runtime_nvfp4_quantizer_matches_the_rust_oracle() -> None:
    """runtime.quant.nvfp4_quantize (torch, runs on the GPU too) against dqfast.ops.quantize_nvfp4
    (the Rust core): the same packed codes, block-scale bytes and global scale, byte for byte, on
    random data of several ranges, zero blocks, tiny and saturating values, bf16 and float32."""
    import numpy as np
    from dqfast import ops

    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for scale in (1.0, 3e-3, 250.0):
            w = torch.randn(48, 320) * scale
            w[0, :16] = 0  # an all-zero block
            w[1, :6] = torch.tensor([1e-30, -1e-30, 0.5, -0.0, 2.75, -5.0]) * scale
            w[2, 16:32] = torch.linspace(-6, 6, 16) * scale  # values on E2M1 grid points and ties
            w = w.to(dtype)
            packed, s, gs = Q.nvfp4_quantize(w)
            ref = ops.quantize_nvfp4(w)
            assert np.array_equal(packed.numpy(), np.asarray(ref.weight))
            assert np.array_equal(s.view(torch.uint8).numpy(), np.asarray(ref.weight_scale))
            assert float(gs) == float(ref.weight_scale_2)


def test_runtime_constants_are_the_rust_cores() -> None:
    from dqfast import _core

    assert Q.E4M3_MAX == _core.E4M3_MAX == 448.0
    assert Q.NVFP4_BLOCK == _core.NVFP4_GROUP == 16
    assert Q.E2M1_MAX * Q.E4M3_MAX == _core.NVFP4_BOUND
