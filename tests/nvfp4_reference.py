"""Plain-torch NVFP4 weight quantization, written from ModelOpt 0.47's definition.

This deliberately does not import modelopt: `test_nvfp4_kernels.py` checks it against
`NVFP4QTensor` (proving it ModelOpt-exact) and then uses it as the oracle for `dqfast._core`.

Order of operations (each step in float32, each product rounded before the next division):
  weight_scale_2 = amax / (6 * 448)
  s              = max|w_block| / (6 * weight_scale_2);  s == 0 -> 1;  clamp [2^-9, 448];  e4m3
  x              = w / (float(s_e4m3) * weight_scale_2)
  code           = E2M1 of x (nearest, ties to even, saturating; sign bit only for x < 0)
"""

from __future__ import annotations

import torch

BLOCK = 16
E2M1_MAX = 6.0
E4M3_MAX = 448.0
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def global_scale(amax: torch.Tensor | float) -> torch.Tensor:
    """weight_scale_2 (or input_scale) as a float32 0-dim tensor."""
    return torch.as_tensor(amax, dtype=torch.float32) / (E2M1_MAX * E4M3_MAX)


def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """4-bit E2M1 codes (uint8) of a float32 tensor.

    Written as the threshold table of round-to-nearest-even on {0, .5, 1, 1.5, 2, 3, 4, 6}:
    a tie goes to the magnitude with an even code, so 0.25, 1.25, 2.5 and 5 round down and
    0.75, 1.75, 3.5 round up. Everything past 5 (also inf and NaN, as ModelOpt's searchsorted
    does) becomes 6.
    """
    a = x.float().abs()
    # Number of thresholds that |x| has passed; "passed" is > at a down-tie, >= at an up-tie.
    passed = [a > 0.25, a >= 0.75, a > 1.25, a >= 1.75, a > 2.5, a >= 3.5, a > 5.0]
    magnitude = torch.zeros_like(a, dtype=torch.uint8)
    for p in passed:
        magnitude += p.to(torch.uint8)
    magnitude = torch.where(torch.isnan(a), torch.tensor(7, dtype=torch.uint8), magnitude)
    sign = (x < 0).to(torch.uint8) << 3
    return sign | magnitude


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """float32 values of 4-bit codes (code 8 is -0.0)."""
    table = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float32)
    magnitude = table[(codes & 7).long()]
    return torch.where((codes & 8) != 0, -magnitude, magnitude)


def block_scales(weight: torch.Tensor, weight_scale_2: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn block scales [N, K/16]."""
    n, k = weight.shape
    block_max = weight.float().abs().view(n, k // BLOCK, BLOCK).amax(dim=-1)
    scale = block_max / (E2M1_MAX * weight_scale_2)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return scale.clamp(min=2.0**-9, max=E4M3_MAX).to(torch.float8_e4m3fn)


def quantize(weight: torch.Tensor, amax: torch.Tensor | float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NVFP4-quantize a [N, K] weight: (packed uint8 [N, K/2], e4m3 scales [N, K/16], weight_scale_2).

    ``amax`` is the calibrated maximum; without it the tensor's own max |w| is used.
    """
    n, k = weight.shape
    assert k % BLOCK == 0, "K must be a multiple of 16"
    if amax is None:
        amax = weight.float().abs().amax()
    weight_scale_2 = global_scale(amax)
    scales = block_scales(weight, weight_scale_2)
    divisor = scales.float() * weight_scale_2
    scaled = weight.float().view(n, k // BLOCK, BLOCK) / divisor.unsqueeze(-1)
    codes = e2m1_encode(scaled.view(n, k))
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return packed, scales, weight_scale_2


def dequantize(packed: torch.Tensor, scales: torch.Tensor, weight_scale_2: torch.Tensor) -> torch.Tensor:
    """float32 [N, K] from packed codes: e2m1(q) * (float(s) * weight_scale_2)."""
    n, half_k = packed.shape
    codes = torch.stack([packed & 0xF, packed >> 4], dim=-1).view(n, 2 * half_k)
    per_block = scales.float() * weight_scale_2
    values = e2m1_decode(codes).view(n, -1, BLOCK) * per_block.unsqueeze(-1)
    return values.view(n, 2 * half_k)
