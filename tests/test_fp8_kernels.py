"""FP8 e4m3 conversion: bit-exact with PyTorch over every BF16 and FP16 input, several scales."""

from __future__ import annotations

import numpy as np
import pytest
from dqfast import _core

torch = pytest.importorskip("torch")

SCALES = [1.0, 0.5, 2.0**-7, 1.0 / 448.0, 3.0e-4, 0.0123, 7.77, 1.0e-6]


def _all_bf16() -> torch.Tensor:
    return torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)


def _all_f16() -> torch.Tensor:
    return torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16).view(torch.float16)


def _ours(w: torch.Tensor, dtype: str, scale: float, **kw) -> np.ndarray:
    raw = w.contiguous().view(torch.uint8).numpy().tobytes()
    return np.frombuffer(_core.quantize_e4m3(raw, dtype, [scale], w.numel(), **kw), dtype=np.uint8)


def _bytes(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.uint8).numpy()


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("kind", ["BF16", "F16"])
def test_exact_rounding_matches_torch_clamp_then_cast(kind: str, scale: float) -> None:
    w = _all_bf16() if kind == "BF16" else _all_f16()
    s = torch.tensor(scale, dtype=torch.float32)
    ref = _bytes((w.float() / s).clamp(-448, 448).to(torch.float8_e4m3fn))
    got = _ours(w, kind, float(s))
    nan = torch.isnan(w).numpy()
    # Non-NaN inputs: every byte identical.
    np.testing.assert_array_equal(got[~nan], ref[~nan])
    # NaN inputs stay NaN (0x7F/0xFF), never a number.
    assert np.all((got[nan] & 0x7F) == 0x7F)


@pytest.mark.parametrize("scale", SCALES)
def test_default_matches_torch_plain_cast(scale: float) -> None:
    """The issue's reference, ``(w.float() / scale).to(float8_e4m3fn)`` without a clamp: current
    PyTorch CPU casts saturate (overflow and inf give ±448), which is what our default does."""
    w = _all_bf16()
    s = torch.tensor(scale, dtype=torch.float32)
    ref = _bytes((w.float() / s).to(torch.float8_e4m3fn))
    got = _ours(w, "BF16", float(s))
    nan = torch.isnan(w).numpy()
    np.testing.assert_array_equal(got[~nan], ref[~nan])


def test_non_saturating_mode_is_the_c10_scalar_cast() -> None:
    """``saturation='none'`` keeps c10's scalar rule: |x| > 464 rounds to the NaN code."""
    x = np.array([448.0, 464.0, 464.5, 479.0, 480.0, -1e6, np.inf], dtype=np.float32)
    got = np.frombuffer(_core.quantize_e4m3(x.tobytes(), "F32", [1.0], x.size, saturation="none"), dtype=np.uint8)
    assert got.tolist() == [0x7E, 0x7E, 0x7F, 0x7F, 0x7F, 0xFF, 0x7F]


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("kind", ["BF16", "F16"])
def test_modelopt_rounding_matches_source_dtype_division(kind: str, scale: float) -> None:
    """ModelOpt's export divides the BF16 weight by a 0-dim float32 scale (quotient stays BF16)."""
    w = _all_bf16() if kind == "BF16" else _all_f16()
    s = torch.tensor(scale, dtype=torch.float32)
    q = w / s
    assert q.dtype == w.dtype  # the double rounding this mode reproduces
    finite = torch.isfinite(q) & (q.float().abs() <= 448)
    ref = _bytes(q.to(torch.float8_e4m3fn))
    got = _ours(w, kind, float(s), rounding="modelopt")
    m = finite.numpy()
    np.testing.assert_array_equal(got[m], ref[m])
    # And with saturation, out-of-range quotients clamp to ±448 instead of NaN.
    got_sat = _ours(w, kind, float(s), rounding="modelopt")
    big = (~torch.isnan(q) & (q.float().abs() > 448)).numpy()
    assert np.all((got_sat[big] & 0x7F) == 0x7E)


def test_float32_inputs_random_and_edge_values() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.cat(
        [
            torch.randn(200_000, generator=g) * 3,
            torch.tensor([0.0, -0.0, 448.0, -448.0, 464.0, 470.0, 480.0, 1e-9, -1e-9, 2.0**-9, 2.0**-10, 1.5 * 2.0**-10]),
        ]
    )
    for scale in (1.0, 0.01, 1 / 448):
        s = torch.tensor(scale, dtype=torch.float32)
        ref = _bytes((w / s).clamp(-448, 448).to(torch.float8_e4m3fn))
        np.testing.assert_array_equal(_ours(w, "F32", float(s)), ref)


def test_per_row_scales_match_torch_broadcast() -> None:
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(64, 96, generator=g) * torch.logspace(-3, 1, 64).unsqueeze(1)).to(torch.bfloat16)
    amax = w.float().abs().amax(dim=1)
    scales = amax / 448.0
    ref = _bytes((w.float() / scales.unsqueeze(1)).clamp(-448, 448).to(torch.float8_e4m3fn)).reshape(-1)
    raw = w.view(torch.uint8).numpy().tobytes()
    got = np.frombuffer(_core.quantize_e4m3(raw, "BF16", scales.tolist(), 96), dtype=np.uint8)
    np.testing.assert_array_equal(got, ref)


def test_e4m3_decode_matches_torch_for_every_byte() -> None:
    b = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    ref = b.view(torch.float8_e4m3fn).float().numpy()
    got = np.frombuffer(_core.e4m3_to_f32(b.numpy().tobytes()), dtype=np.float32)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    ok = ~np.isnan(ref)
    np.testing.assert_array_equal(got[ok].view(np.uint32), ref[ok].view(np.uint32))


def test_amax_and_scale_formula() -> None:
    g = torch.Generator().manual_seed(2)
    w = (torch.randn(4096, generator=g) * 5).to(torch.bfloat16)
    raw = w.view(torch.uint8).numpy().tobytes()
    assert _core.amax(raw, "BF16") == w.float().abs().max().item()
    amax = w.float().abs().max()
    assert _core.fp8_scale_from_amax(float(amax)) == (amax / 448.0).item()
    w[17] = float("nan")
    assert np.isnan(_core.amax(w.view(torch.uint8).numpy().tobytes(), "BF16"))
