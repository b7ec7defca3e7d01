"""NVFP4 kernels: the torch reference against ModelOpt, and dqfast._core against the reference.

(a) `nvfp4_reference` equals ModelOpt's own `NVFP4QTensor` quantization bit for bit;
(b) `dqfast._core.nvfp4_quantize` / `nvfp4_dequantize` / `rescale_block_scales` / `swap_nibbles`
    equal the reference on random and adversarial inputs;
(c) `dqfast._core.e2m1_encode_f32` equals the reference encoder on a dense grid plus every
    bound, tie and special value.
"""

from __future__ import annotations

import struct
from types import ModuleType

import pytest

torch = pytest.importorskip("torch")

import nvfp4_reference as ref  # noqa: E402  (tests/ is on sys.path under pytest's default import mode)

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
BOUNDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


# ----------------------------------------------------------------------------- inputs


def random_weight(rows: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Gaussian rows with per-row magnitudes spread over several decades, plus exact zeros."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, k, generator=g) * torch.logspace(-3, 1, rows).unsqueeze(1)
    w[torch.rand(rows, k, generator=g) < 0.02] = 0.0
    return w.to(dtype)


def adversarial_weights(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Blocks built to hit every branch of the definition; every value is exact in `dtype`."""
    k = 64
    cases: dict[str, torch.Tensor] = {}

    w = torch.zeros(4, k)
    w[1, 16:32] = 0.5  # one non-zero block among zero blocks
    w[3, 5] = -2.0
    cases["zero_blocks"] = w

    w = torch.full((3, k), 1e-3)
    w[0, 7] = 100.0  # single outlier sets both the global and its block's scale
    w[1, 40] = -100.0
    w[2, 63] = 100.0
    cases["single_outlier"] = w

    # Blocks whose divisor s*gs is a power of two so x = w/(s*gs) lands exactly on each tie and
    # each E2M1 value: gs = 2^-4 (amax = 2688/16 = 168), block max 6 * 2^j * gs gives s = 2^j.
    ties = torch.tensor([*BOUNDS, *ref.E2M1_MAGNITUDES, 0.0])
    rows = []
    for j in (-9, -7, -3, 0, 3, 8):  # s = 2^j: subnormal, boundary, normal e4m3 scales
        unit = 2.0**j * 2.0**-4
        for sign in (1.0, -1.0):
            row = torch.zeros(k)
            row[: ties.numel()] = sign * ties * unit
            row[15] = 6.0 * unit  # the block max
            row[16 : 16 + ties.numel()] = -sign * ties * unit
            row[31] = -6.0 * unit
            # Neighbouring block: each tie nudged by one float32 ulp either way (F32 only differs).
            nudged = torch.nextafter(ties * unit, torch.tensor(float("inf")))
            row[32 : 32 + ties.numel()] = nudged
            row[47] = 6.0 * unit
            row[48 : 48 + ties.numel()] = torch.nextafter(ties * unit, torch.tensor(0.0))
            row[63] = 6.0 * unit
            rows.append(row)
    w = torch.stack(rows)
    w[0, 0] = 168.0  # pins amax so gs = 2^-4 exactly
    cases["ties"] = w

    # Tiny blocks next to a large one: block scales go subnormal and below 2^-9 (clamped).
    w = torch.zeros(2, k)
    w[0, 0] = 1000.0
    w[0, 16:32] = torch.linspace(-1.0, 1.0, 16)
    w[0, 32:48] = torch.linspace(-0.05, 0.05, 16)
    w[0, 48:64] = torch.linspace(-0.002, 0.002, 16)
    w[1] = torch.linspace(-0.3, 0.3, k)
    cases["subnormal_scales"] = w

    g = torch.Generator().manual_seed(7)
    tiny = 1e-30 if dtype == torch.float32 else 1e-6
    huge = 1e30 if dtype == torch.float32 else (60000.0 if dtype == torch.float16 else 1e30)
    cases["tiny_amax"] = torch.randn(3, k, generator=g) * tiny
    cases["huge_amax"] = torch.randn(3, k, generator=g) * (huge / 4)
    cases["near_rounding_points"] = near_rounding_points(dtype)
    if dtype == torch.float32:
        # weight_scale_2 itself is a float32 subnormal here.
        cases["subnormal_global_scale"] = torch.randn(3, k, generator=g) * 1e-37
    return {name: t.to(dtype) for name, t in cases.items()}


def nudge(x: torch.Tensor, ulps: torch.Tensor) -> torch.Tensor:
    """Move each float32 element by the given number of ulps (positive: away from zero)."""
    bits = x.float().view(torch.int32) + ulps.to(torch.int32)
    return bits.view(torch.float32)


def near_rounding_points(dtype: torch.dtype) -> torch.Tensor:
    """Blocks whose scale s = bmax / (6 gs) sits within a few ulps of every e4m3 rounding midpoint,
    and whose elements w / (s_e4m3 gs) sit within an ulp of every E2M1 bound, with a global scale
    that is not a power of two: here a different operation order (dividing twice, multiplying by a
    reciprocal) changes bytes."""
    amax = torch.tensor(3.7).to(dtype).float()
    gs = ref.global_scale(amax)
    e4m3 = torch.arange(1, 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    midpoints = (e4m3[:-1] + e4m3[1:]) / 2
    offsets = torch.arange(-2, 3)
    block_max = nudge((midpoints.unsqueeze(1) * (6.0 * gs)).expand(-1, offsets.numel()), offsets).flatten()
    block_max = block_max.to(dtype).float()
    divisor = ref.block_scales(block_max.unsqueeze(1).expand(-1, 16).contiguous(), gs)[:, 0].float() * gs
    slot = torch.arange(15)
    bounds = torch.tensor(BOUNDS)[slot % 7]
    sign = torch.where(slot % 2 == 0, 1.0, -1.0)
    others = nudge(bounds * divisor.unsqueeze(1), slot // 7 - 1) * sign
    blocks = torch.cat([block_max.unsqueeze(1), others], dim=1)
    blocks[0, 0] = amax  # pins the global scale
    blocks = blocks[: blocks.shape[0] // 4 * 4]
    return blocks.reshape(-1, 64).to(dtype)


def reference_amax(w: torch.Tensor) -> float:
    return float(w.float().abs().amax())


# ----------------------------------------------------------------------------- (a) reference == ModelOpt


@pytest.fixture(scope="module")
def nvfp4_qtensor() -> type:
    module = pytest.importorskip("modelopt.torch.quantization.qtensor.nvfp4_tensor")
    return module.NVFP4QTensor


def modelopt_quantize(qtensor: type, w: torch.Tensor, amax: float | None) -> tuple[torch.Tensor, ...]:
    wsf2 = None if amax is None else torch.tensor(amax, dtype=torch.float32) / (6.0 * 448.0)
    packed, scales, wsf2 = qtensor.quantize(w.clone(), 16, weights_scaling_factor_2=wsf2)
    return packed._quantized_data, scales, wsf2


def assert_same_quantization(got: tuple, want: tuple, what: str) -> None:
    packed, scales, gs = got
    want_packed, want_scales, want_gs = want
    assert torch.equal(packed.view(torch.uint8), want_packed.view(torch.uint8)), f"{what}: packed codes differ"
    assert torch.equal(scales.view(torch.uint8), want_scales.view(torch.uint8)), f"{what}: block scales differ"
    assert torch.equal(
        torch.as_tensor(gs).float().reshape(()).view(torch.int32), torch.as_tensor(want_gs).float().reshape(()).view(torch.int32)
    ), f"{what}: weight_scale_2 differs"


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("calibrated", [False, True])
def test_reference_matches_modelopt_random(nvfp4_qtensor: type, dtype_name: str, calibrated: bool) -> None:
    w = random_weight(256, 1024, DTYPES[dtype_name], seed=1)
    # A calibrated amax above max|w| (as after calibration on other data) exercises a
    # weight_scale_2 that is not derived from the tensor itself.
    amax = reference_amax(w) * 1.37 if calibrated else None
    want = modelopt_quantize(nvfp4_qtensor, w, amax)
    got = ref.quantize(w, amax)
    assert_same_quantization(got, want, f"{dtype_name} calibrated={calibrated}")


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_reference_matches_modelopt_adversarial(nvfp4_qtensor: type, dtype_name: str) -> None:
    for name, w in adversarial_weights(DTYPES[dtype_name]).items():
        assert_same_quantization(ref.quantize(w), modelopt_quantize(nvfp4_qtensor, w, None), f"{dtype_name}/{name}")


def test_reference_matches_modelopt_all_zero_tensor(nvfp4_qtensor: type) -> None:
    # amax = 0 gives weight_scale_2 = 0 and 0/0 block scales: ModelOpt writes NaN scale bytes.
    w = torch.zeros(2, 32, dtype=torch.bfloat16)
    assert_same_quantization(ref.quantize(w), modelopt_quantize(nvfp4_qtensor, w, None), "all-zero")


def test_reference_encoder_matches_modelopt_cast(nvfp4_qtensor: type) -> None:
    x = encoder_grid()
    want = nvfp4_qtensor._cast_fp4(x.clone())
    assert torch.equal(ref.e2m1_encode(x), want)


def test_reference_dequantize_matches_modelopt(nvfp4_qtensor: type) -> None:
    w = random_weight(16, 128, torch.bfloat16, seed=3)
    packed, scales, gs = ref.quantize(w)
    qt = nvfp4_qtensor(w.shape, torch.float32, packed)
    want = qt.dequantize(torch.float32, scale=scales, double_scale=gs, block_sizes={-1: 16})
    assert torch.equal(ref.dequantize(packed, scales, gs), want)


# ----------------------------------------------------------------------------- (b) dqfast._core == reference


@pytest.fixture(scope="module")
def core() -> ModuleType:
    module = pytest.importorskip("dqfast._core")
    if not hasattr(module, "nvfp4_quantize"):
        pytest.skip("dqfast._core was built without the NVFP4 bindings")
    return module


def core_quantize(core: ModuleType, w: torch.Tensor, dtype_name: str, amax: float) -> tuple[torch.Tensor, ...]:
    rows, k = w.shape
    data = w.contiguous().view(torch.uint8).numpy().tobytes()
    packed, scales, gs = core.nvfp4_quantize(data, dtype_name, rows, k, amax)
    packed_t = torch.frombuffer(bytearray(packed), dtype=torch.uint8).view(rows, k // 2)
    scales_t = torch.frombuffer(bytearray(scales), dtype=torch.uint8).view(rows, k // 16)
    return packed_t, scales_t, torch.tensor(gs, dtype=torch.float32)


def check_core_against_reference(core: ModuleType, w: torch.Tensor, dtype_name: str, what: str) -> None:
    amax = reference_amax(w)
    got = core_quantize(core, w, dtype_name, amax)
    want = ref.quantize(w, amax)
    assert_same_quantization(got, want, what)
    # Quantizing each row alone (as the engine streams chunks of rows) gives the same bytes.
    for r in range(0, w.shape[0], max(1, w.shape[0] // 3)):
        row = core_quantize(core, w[r : r + 1], dtype_name, amax)
        assert torch.equal(row[0], got[0][r : r + 1]) and torch.equal(row[1], got[1][r : r + 1]), f"{what}: row {r}"


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_core_quantize_random(core: ModuleType, dtype_name: str, seed: int) -> None:
    w = random_weight(48, 512, DTYPES[dtype_name], seed=seed)
    check_core_against_reference(core, w, dtype_name, f"{dtype_name} seed {seed}")


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_core_quantize_adversarial(core: ModuleType, dtype_name: str) -> None:
    for name, w in adversarial_weights(DTYPES[dtype_name]).items():
        check_core_against_reference(core, w, dtype_name, f"{dtype_name}/{name}")


def test_core_quantize_calibrated_amax_and_zero_tensor(core: ModuleType) -> None:
    w = random_weight(8, 64, torch.bfloat16, seed=5)
    for amax in (reference_amax(w) * 3.1, reference_amax(w) * 0.5, 0.0):
        got = core_quantize(core, w, "BF16", amax)
        want = ref.quantize(w, torch.tensor(amax, dtype=torch.float32))
        assert_same_quantization(got, want, f"amax {amax}")
    zeros = torch.zeros(2, 32, dtype=torch.bfloat16)
    assert_same_quantization(core_quantize(core, zeros, "BF16", 0.0), ref.quantize(zeros, 0.0), "all-zero")


def test_core_dequantize(core: ModuleType) -> None:
    w = random_weight(16, 256, torch.float32, seed=9)
    packed, scales, gs = ref.quantize(w)
    data = core.nvfp4_dequantize(packed.numpy().tobytes(), scales.view(torch.uint8).numpy().tobytes(), 256, float(gs))
    got = torch.frombuffer(bytearray(data), dtype=torch.float32).view(16, 256)
    assert torch.equal(got.view(torch.int32), ref.dequantize(packed, scales, gs).view(torch.int32))


def test_core_swap_nibbles(core: ModuleType) -> None:
    b = torch.arange(256, dtype=torch.uint8)
    got = torch.frombuffer(bytearray(core.swap_nibbles(b.numpy().tobytes())), dtype=torch.uint8)
    assert torch.equal(got, (b >> 4) | (b << 4))


@pytest.mark.parametrize("factor", [1.0, 0.999, 0.5, 1 / 3, 0.0123, 1.7, 1000.0])
def test_core_rescale_block_scales(core: ModuleType, factor: float) -> None:
    finite = torch.tensor([b for b in range(256) if b & 0x7F != 0x7F], dtype=torch.uint8)
    got = torch.frombuffer(bytearray(core.rescale_block_scales(finite.numpy().tobytes(), factor)), dtype=torch.uint8)
    scaled = finite.view(torch.float8_e4m3fn).float() * torch.tensor(factor, dtype=torch.float32)
    want = scaled.clamp(-448.0, 448.0).to(torch.float8_e4m3fn).view(torch.uint8)
    assert torch.equal(got, want)


def test_core_rejects_bad_shapes(core: ModuleType) -> None:
    # PlanError like every other bad argument of _core (these raised a bare ValueError before).
    from dqfast.errors import PlanError

    with pytest.raises(PlanError, match="multiple of 16"):
        core.nvfp4_quantize(b"\0" * 40, "BF16", 1, 20, 1.0)  # K not a multiple of 16
    with pytest.raises(PlanError, match="bytes"):
        core.nvfp4_quantize(b"\0" * 30, "BF16", 1, 16, 1.0)  # wrong byte count
    with pytest.raises(PlanError, match="dtype"):
        core.nvfp4_quantize(b"\0" * 64, "I32", 1, 16, 1.0)
    with pytest.raises(PlanError, match="whole rows"):
        core.nvfp4_dequantize(b"\0" * 8, b"\0" * 3, 16, 1.0)
    with pytest.raises(PlanError, match="multiple of 4"):
        core.e2m1_encode_f32(b"\0" * 5)


# ----------------------------------------------------------------------------- (c) exhaustive encoder


def encoder_grid() -> torch.Tensor:
    """Every multiple of 2^-12 in [-8, 8], every bf16 value, each bound/value +- one ulp, specials."""
    dense = torch.arange(-8 * 4096, 8 * 4096 + 1, dtype=torch.float64).float() / 4096.0
    every_bf16 = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    marks = torch.tensor([*BOUNDS, *ref.E2M1_MAGNITUDES, 6.0])
    marks = torch.cat([marks, -marks])
    near = torch.cat([marks, torch.nextafter(marks, torch.tensor(float("inf"))), torch.nextafter(marks, torch.tensor(float("-inf")))])
    specials = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), -float("nan"), 1e-45, -1e-45, 3e38])
    return torch.cat([dense, every_bf16, near, specials]).float()


def core_encode(core: ModuleType, x: torch.Tensor) -> torch.Tensor:
    codes = core.e2m1_encode_f32(x.contiguous().numpy().tobytes())
    return torch.frombuffer(bytearray(codes), dtype=torch.uint8)


def test_core_e2m1_encode_exhaustive(core: ModuleType) -> None:
    x = encoder_grid()
    got = core_encode(core, x)
    want = ref.e2m1_encode(x)
    bad = (got != want).nonzero().flatten()
    assert bad.numel() == 0, f"{bad.numel()} mismatches, first x = {x[bad[:5]].tolist()}"


def test_encoder_rounds_to_nearest_even() -> None:
    # Independent of both encoders' threshold tables: nearest magnitude, ties to the even code.
    x = encoder_grid()
    x = x[torch.isfinite(x)]
    codes = ref.e2m1_encode(x)
    mags = torch.tensor(ref.E2M1_MAGNITUDES, dtype=torch.float64)
    dist = (x.double().abs().clamp(max=6.0).unsqueeze(1) - mags).abs()
    best = dist.min(dim=1, keepdim=True).values
    # Among the nearest candidates pick the even code (the odd-index tie loses).
    candidates = dist == best
    even_first = torch.where(
        candidates[:, ::2].any(dim=1), (candidates[:, ::2].float().argmax(dim=1) * 2), (candidates[:, 1::2].float().argmax(dim=1) * 2 + 1)
    )
    assert torch.equal((codes & 7).long(), even_first)
    assert torch.equal((codes & 8) != 0, x < 0)


def test_struct_sanity_of_binding(core: ModuleType) -> None:
    # A tiny hand-checkable case through the binding's byte interface.
    codes = core.e2m1_encode_f32(struct.pack("<4f", 0.75, -5.0, 1.25, -0.0))
    assert list(codes) == [int(c) for c in ref.e2m1_encode(torch.tensor([0.75, -5.0, 1.25, -0.0]))]
