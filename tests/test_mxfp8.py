"""MXFP8 weight-only kernel (``_core.block_quantize("mxfp8", ...)``) against two independent oracles.

* numpy, exact: the scale exponent is the smallest ``e`` with ``amax <= 448 * 2**e`` (read off
  ``np.frexp``, no logarithm) and elements round to the nearest e4m3 value, ties to the even code;
* torch: vLLM 0.30.0's reference rule written with torch ops in float32
  (``ceil(log2(amax / 448)) + 127``, clamped to 0..254, then an e4m3 cast of ``w / 2**(s - 127)``),
  which is what the kernel promises to reproduce byte for byte (docs/notes/sources.md §7).
"""

from __future__ import annotations

import numpy as np
import pytest
from dqfast import _core
from dqfast.errors import PlanError

try:
    import torch
except ImportError:  # the numpy oracle still runs
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")

BLOCK = _core.BLOCK_FORMATS["mxfp8"]["block"]


def _e4m3_grid() -> np.ndarray:
    """Values of the 127 non-negative finite e4m3 codes 0x00..0x7E, from the format's definition."""
    codes = np.arange(0x7F)
    e, m = codes >> 3, (codes & 7).astype(np.float64)
    return np.where(e == 0, m / 8 * 2.0**-6, (1 + m / 8) * np.exp2(e - 7.0))


GRID = _e4m3_grid()


def _ref_e4m3(x: np.ndarray) -> np.ndarray:
    """Nearest e4m3 code to float64 ``x`` (|x| <= 448 here), ties to the even code, sign kept."""
    a = np.abs(x)
    hi = np.clip(np.searchsorted(GRID, a), 1, len(GRID) - 1)
    lo = hi - 1
    d_lo, d_hi = a - GRID[lo], GRID[hi] - a
    code = np.where((d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0)), hi, lo)
    return (code | np.where(np.signbit(x), 0x80, 0)).astype(np.uint8)


def _ref_numpy(w: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    blocks = w.astype(np.float64).reshape(-1, BLOCK)
    amax = np.maximum(np.abs(blocks).max(axis=1), 2.0**-126)
    m, ex = np.frexp(amax)  # amax = m * 2**ex, m in [0.5, 1); 448 = 0.875 * 2**9
    e = np.clip(np.where(m <= 0.875, ex - 9, ex - 8), -127, 127)
    values = _ref_e4m3(blocks * np.exp2(-e.astype(np.float64))[:, None])
    return values.reshape(-1), (e + 127).astype(np.uint8)


def _ours(w: np.ndarray, dtype: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    v, s = _core.block_quantize("mxfp8", w.tobytes(), dtype, k)
    return np.frombuffer(v, dtype=np.uint8), np.frombuffer(s, dtype=np.uint8)


def _finite_f16_patterns() -> np.ndarray:
    x = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    return x[np.isfinite(x)]


def test_every_f16_value_matches_the_exact_numpy_reference() -> None:
    x = _finite_f16_patterns()
    rng = np.random.default_rng(0)
    for w in (x, rng.permutation(x)):  # sorted blocks, then blocks mixing every magnitude
        w = w[: len(w) // 64 * 64]
        got_v, got_s = _ours(w, "F16", 64)
        ref_v, ref_s = _ref_numpy(w, 64)
        np.testing.assert_array_equal(got_s, ref_s)
        np.testing.assert_array_equal(got_v, ref_v)


def test_f32_near_power_of_two_and_wide_range_match_numpy() -> None:
    rng = np.random.default_rng(1)
    w = (rng.standard_normal(1 << 16) * np.exp2(rng.integers(-40, 40, 1 << 16))).astype(np.float32)
    got_v, got_s = _ours(w, "F32", 256)
    ref_v, ref_s = _ref_numpy(w, 256)
    np.testing.assert_array_equal(got_s, ref_s)
    np.testing.assert_array_equal(got_v, ref_v)


def _vllm_rule(w: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """vLLM 0.30.0's MXFP8 reference semantics, restated with torch float32 ops."""
    x = w.float().reshape(-1, BLOCK)
    amax = x.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny)
    biased = (torch.ceil(torch.log2(amax / 448.0)) + 127.0).clamp(0, 254)
    q = (x / torch.exp2(biased - 127.0)[:, None]).to(torch.float8_e4m3fn)
    return q.view(torch.uint8).reshape(-1).numpy(), biased.to(torch.uint8).numpy()


def _all_bf16() -> torch.Tensor:
    x = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    return x[torch.isfinite(x)]


@needs_torch
@pytest.mark.parametrize("order", ["sorted", "shuffled"])
def test_every_bf16_value_matches_the_vllm_rule_in_torch(order: str) -> None:
    x = _all_bf16()
    if order == "shuffled":
        x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(3))]
    x = x[: len(x) // 128 * 128]
    got_v, got_s = _ours(x.view(torch.uint16).numpy(), "BF16", 128)
    ref_v, ref_s = _vllm_rule(x)
    np.testing.assert_array_equal(got_s, ref_s)
    np.testing.assert_array_equal(got_v, ref_v)
    # For BF16 the float32 log2 never decides differently from exact math.
    np.testing.assert_array_equal(_ref_numpy(x.float().numpy(), 128)[1], ref_s)


@needs_torch
def test_f32_amax_a_few_ulps_above_a_power_of_two_follows_torch_float32_log2() -> None:
    """Only F32 sources can put amax/448 within a few float32 ulps above 2**j; there vLLM's
    float32 log2 rounds onto j and keeps the smaller scale (elements then round to 448)."""
    amax = []
    for j in range(-40, 41, 3):
        base = np.float32(448.0 * 2.0**j)
        amax += [np.nextafter(base, np.float32(np.inf))]
        for _ in range(40):
            amax.append(np.nextafter(amax[-1], np.float32(np.inf)))
    w = np.zeros((len(amax), BLOCK), dtype=np.float32)
    w[:, 0] = amax
    w[:, 1] = -np.asarray(amax, dtype=np.float32) / 3
    got_v, got_s = _ours(w, "F32", BLOCK)
    ref_v, ref_s = _vllm_rule(torch.from_numpy(w))
    np.testing.assert_array_equal(got_s, ref_s)
    np.testing.assert_array_equal(got_v, ref_v)
    # ... and the float32 rule really differs from exact math on some of them.
    assert (_ref_numpy(w, BLOCK)[1] != ref_s).any()


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((b"\0" * 192, "BF16", 48), "positive multiple of 32, got 48"),
        ((b"\0" * 128, "U8", 32), "must be BF16, F16 or F32, got U8"),
        ((b"\0" * 100, "BF16", 32), "source holds 100 bytes, expected 128"),
        ((b"\0" * 64, "bf17", 32), "unknown dtype 'bf17'"),
    ],
)
def test_bad_input_raises_plan_error(args: tuple[bytes, str, int], match: str) -> None:
    with pytest.raises(PlanError, match=match):
        _core.block_quantize("mxfp8", *args)


def test_non_finite_value_is_refused_with_row_and_column() -> None:
    w = np.ones((4, 64), dtype=np.float32)
    w[2, 37] = np.nan
    w[3, 0] = np.inf
    with pytest.raises(PlanError, match="value NaN at row 2, column 37"):
        _core.block_quantize("mxfp8", w.tobytes(), "F32", 64)
