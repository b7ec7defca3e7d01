"""Reference (torch, device-agnostic) FP8 / NVFP4 quantization math.

These functions define the numerics every fast path is tested against. They follow
docs/formats.md (ModelOpt 0.47 semantics): clamp-then-cast to e4m3, E2M1 round to
nearest with ties to the even code, low nibble = even element.
"""

from __future__ import annotations

import torch

from dqfast._core import E4M3_MAX, E4M3_MAX_BYTE, NVFP4_BOUND, NVFP4_GROUP

# The format constants are the Rust core's (one definition, exported by dqfast._core).
E2M1_MAX = NVFP4_BOUND / E4M3_MAX  # 6.0, the largest E2M1 magnitude
NVFP4_BLOCK = NVFP4_GROUP
# Smallest amax used for dynamic scales, so an all-zero row gives scale > 0 (no 0/0).
MIN_AMAX = 1e-12

# E2M1 magnitudes indexed by the low 3 bits of a code.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_E2M1_BOUNDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_E2M1_TIES_UP = (0.75, 1.75, 3.5)


def to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Saturating cast of float32 values to float8_e4m3fn (clamp to ±448, then RNE)."""
    return x.float().clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q = sat_e4m3(x / scale), division in float32; `scale` broadcasts against x."""
    return to_e4m3(x.float() / scale.float())


def per_token_scale(x: torch.Tensor) -> torch.Tensor:
    """Dynamic per-row activation scale amax_row / 448, shape [..., 1], float32."""
    amax = x.float().abs().amax(dim=-1, keepdim=True).clamp_min(MIN_AMAX)
    return amax / E4M3_MAX


def fp8_quantize_weight(w: torch.Tensor, per_channel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a [N, K] weight to e4m3 with a per-tensor (0-dim) or per-channel ([N]) scale."""
    wf = w.float()
    if per_channel:
        scale = wf.abs().amax(dim=1).clamp_min(MIN_AMAX) / E4M3_MAX
        return quantize_fp8(wf, scale[:, None]), scale
    scale = wf.abs().amax().clamp_min(MIN_AMAX) / E4M3_MAX
    return quantize_fp8(wf, scale), scale


def fp8_fake_quant(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """e4m3(x / scale) * scale in float32 (what the FP8 GEMM sees of x)."""
    return quantize_fp8(x, scale).float() * scale.float()


def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """Float32 values (already divided by their scale) -> E2M1 codes (uint8, 0..15).

    First bound >= |x| gives the magnitude index (so 0.25, 1.25, 2.5, 5 round down), exact
    ties 0.75/1.75/3.5 round up to the even code; |x| > 5 saturates to 6. Sign bit only for
    x < 0, so -0.0 encodes as +0.
    """
    ax = x.float().abs()
    bounds = torch.tensor(_E2M1_BOUNDS, dtype=torch.float32, device=x.device)
    idx = torch.searchsorted(bounds, ax.contiguous(), right=False)
    for tie in _E2M1_TIES_UP:
        idx = torch.where(ax == tie, idx + 1, idx)
    sign = (x < 0).to(torch.uint8) << 3
    return idx.to(torch.uint8) | sign


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8, low 4 bits) -> float32 values."""
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    c = codes.to(torch.int64)
    mag = lut[c & 7]
    return torch.where((c & 8) != 0, -mag, mag)


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """[..., K] codes -> [..., K/2] bytes, low nibble = element 2j, high = 2j+1."""
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """[..., K/2] bytes -> [..., K] codes (inverse of pack_e2m1)."""
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack((lo, hi), dim=-1).flatten(-2)


def swap_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Rewrite bytes written high-nibble-first into runtime order."""
    return (packed >> 4) | (packed << 4)


def nvfp4_quantize(w: torch.Tensor, global_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ModelOpt-0.47 NVFP4 quantization of a [N, K] tensor.

    Returns (packed uint8 [N, K/2], block scales e4m3 [N, K/16], weight_scale_2 float32 0-dim).
    `global_scale` (= amax / 2688) defaults to max|w| / 2688.
    """
    n, k = w.shape
    if k % NVFP4_BLOCK:
        raise ValueError(f"K={k} is not a multiple of {NVFP4_BLOCK}")
    wf = w.float()
    if global_scale is None:
        global_scale = wf.abs().amax() / (E2M1_MAX * E4M3_MAX)
    gs = global_scale.float().reshape(())
    blocks = wf.reshape(n, k // NVFP4_BLOCK, NVFP4_BLOCK)
    s = blocks.abs().amax(dim=-1) / (E2M1_MAX * gs)
    s = torch.where(s == 0, torch.ones_like(s), s)
    s_e4m3 = s.clamp(2.0**-9, E4M3_MAX).to(torch.float8_e4m3fn)
    x = blocks / (s_e4m3.float()[..., None] * gs)
    codes = e2m1_encode(x).reshape(n, k)
    return pack_e2m1(codes), s_e4m3, gs


def nvfp4_dequantize(packed: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """Packed NVFP4 [N, K/2] + e4m3 [N, K/16] + global scale (0-dim or [N]) -> float32 [N, K]."""
    n = packed.shape[0]
    vals = e2m1_decode(unpack_e2m1(packed))
    k = vals.shape[-1]
    vals = vals.reshape(n, k // NVFP4_BLOCK, NVFP4_BLOCK) * block_scale.float()[..., None]
    gs = global_scale.float()
    gs = gs.reshape(n, 1) if gs.dim() == 1 else gs
    return vals.reshape(n, k) * gs


def nvfp4_e4m3_inv_row_scale(block_scale: torch.Tensor) -> torch.Tensor:
    """W4A8: per output channel, 448 / (6 * max block scale of the row), float32 [N], so the row's
    largest representable NVFP4 magnitude (6 * its largest block scale) lands on e4m3's 448.
    A row of all-zero block scales gets 1."""
    rowmax = block_scale.float().amax(dim=1)
    return torch.where(rowmax > 0, E4M3_MAX / (E2M1_MAX * rowmax), torch.ones_like(rowmax))


def nvfp4_to_e4m3(packed: torch.Tensor, block_scale: torch.Tensor, inv_row_scale: torch.Tensor) -> torch.Tensor:
    """W4A8 reference: NVFP4 [N, K/2] codes + e4m3 [N, K/16] block scales -> e4m3 [N, K] holding
    e2m1 * (block_scale * inv_row_scale), rounded once (RNE) to e4m3. The GEMM then uses the
    per-channel weight scale weight_scale_2 / inv_row_scale. An e2m1 value (2 significant bits)
    times an e4m3 scale (4) has up to 5 significant bits, so this rounding costs at most 2^-5
    relative per element, on top of the FP4 error."""
    n = packed.shape[0]
    vals = e2m1_decode(unpack_e2m1(packed))
    k = vals.shape[-1]
    t = block_scale.float() * inv_row_scale.float()[:, None]
    vals = vals.reshape(n, k // NVFP4_BLOCK, NVFP4_BLOCK) * t[..., None]
    return to_e4m3(vals.reshape(n, k))


def nvfp4_fake_quant_activation(x: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    """W4A4 activation fake-quant: dynamic per-16 e4m3 block scales, global scale 1/input_scale.

    Mirrors the weight recipe with `input_scale` in place of weight_scale_2; returns float32.
    """
    shape = x.shape
    k = shape[-1]
    flat = x.float().reshape(-1, k)
    packed, s, gs = nvfp4_quantize(flat, global_scale=input_scale.float().reshape(()))
    return nvfp4_dequantize(packed, s, gs).reshape(shape)


def swizzle_block_scales_128x4(scales: torch.Tensor) -> torch.Tensor:
    """Row-major [rows, cols] block scales -> the 128x4 tiled layout FP4 GEMMs read.

    Pads rows to 128 and cols to 4 with zeros, then orders each 128x4 tile as
    (32 rows) x (4 row-groups) x (4 cols) so one 512-byte tile holds 128 rows x 4 blocks.
    """
    rows, cols = scales.shape
    pr = (rows + 127) // 128 * 128
    pc = (cols + 3) // 4 * 4
    raw = scales.view(torch.uint8) if scales.dtype == torch.float8_e4m3fn else scales
    padded = torch.zeros((pr, pc), dtype=raw.dtype, device=raw.device)
    padded[:rows, :cols] = raw
    tiled = padded.reshape(pr // 128, 4, 32, pc // 4, 4).permute(0, 3, 2, 1, 4).contiguous()
    out = tiled.reshape(pr, pc)
    return out.view(torch.float8_e4m3fn) if scales.dtype == torch.float8_e4m3fn else out


def clamp_nan_e4m3(scales: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Replace NaN e4m3 bytes (0x7F, 0xFF) by 0x7E (+448); returns (fixed, count)."""
    raw = scales.view(torch.uint8)
    bad = (raw == 0x7F) | (raw == 0xFF)
    count = int(bad.sum())
    if count == 0:
        return scales, 0
    fixed = torch.where(bad, torch.full_like(raw, E4M3_MAX_BYTE), raw)
    return fixed.view(torch.float8_e4m3fn), count
