//! MXFP8 weight-only: e4m3 elements `[N, K]`, one E8M0 (power-of-two) scale per 32 consecutive
//! elements along K, stored as uint8 `[N, K/32]` (the biased exponent: scale = 2^(byte - 127)).
//!
//! Bit-exact with vLLM 0.30.0's reference MXFP8 quantizer (the PyTorch path of
//! `mxfp8_e4m3_quantize`, which vLLM-Omni's online MXFP8 method calls; see docs/notes/sources.md §7):
//! * block amax = max |w| in f32, raised to at least 2^-126 (the smallest normal f32);
//! * scale byte `s = clamp(ceil(log2(f32(amax / 448))) + 127, 0, 254)`, with the quotient rounded
//!   to f32 and its log2 rounded to f32 before the ceiling, as `torch.log2` on a float32 tensor
//!   returns it. That is the smallest power of two that brings the block into ±448, *not* the OCP
//!   spec's `floor(log2(amax)) - 8` (which saturates blocks whose amax mantissa exceeds 1.75);
//! * element = e4m3 round-to-nearest-even of `w * 2^(127 - s)` (exact power-of-two scaling, so it
//!   equals vLLM's `w / 2^(s - 127)`); finite input never exceeds 448 there, so no saturation rule
//!   is involved;
//! * NaN or ±inf anywhere is refused ([`MxError::NonFinite`]): vLLM would write an undefined scale
//!   byte (a NaN cast to uint8) for NaN blocks and a useless scale of 2^127 for inf blocks.
//!
//! Blocks are independent, so any chunk of whole rows gives the same bytes as the whole tensor.

use rayon::prelude::*;

use super::e4m3::{e4m3_from_f32, e4m3_to_f32, E4M3_MAX};
use super::load::{Bf16, Elem, BLOCK as HALF, F16, F32};
use super::nvfp4::block_amax;
use super::{with_avx2, BlockError, BlockFormat};
use crate::dtype::Dtype;

/// MXFP8 as the engine's plan ops write it (`block_values` / `block_scales` with format `mxfp8`).
pub const FORMAT: BlockFormat = BlockFormat {
    name: "mxfp8",
    label: "MXFP8",
    block: BLOCK,
    elements_per_byte: 1,
    values_dtype: Dtype::F8_E4M3,
    // E8M0 exponent bytes, stored as U8 the way vLLM-Omni's loader takes them.
    scales_dtype: Dtype::U8,
    values: |s, d, k, out| quantize_values(s, d, k, out).map_err(BlockError::from),
    scales: |s, d, k, out| block_scales(s, d, k, out).map_err(BlockError::from),
    dequantize: |v, s, k| dequantize(v, s, k).map_err(BlockError::from),
};

/// Elements per E8M0 scale.
pub const BLOCK: usize = 32;
/// E8M0 exponent bias: byte `b` encodes 2^(b - 127).
pub const E8M0_BIAS: i32 = 127;
/// Largest scale byte vLLM writes (255 is E8M0's NaN code).
pub const MAX_SCALE_BYTE: u8 = 254;

/// Source bytes one rayon task quantizes at least (smaller inputs run on the calling thread).
const TASK_BYTES: usize = 256 << 10;

/// Why a buffer cannot be quantized; the caller adds the file and tensor name.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MxError {
    #[error("MXFP8 source must be BF16, F16 or F32, got {0}")]
    Dtype(Dtype),
    #[error("MXFP8 needs the last dimension K to be a positive multiple of {BLOCK}, got {0}")]
    K(usize),
    #[error("{what} holds {got} bytes, expected {want}")]
    Len {
        what: &'static str,
        got: usize,
        want: usize,
    },
    /// The first non-finite element in row-major order (row counted from the start of the buffer).
    #[error("value {value} at row {row}, column {col}; refusing to quantize a non-finite weight")]
    NonFinite { row: usize, col: usize, value: f32 },
}

impl From<MxError> for BlockError {
    fn from(e: MxError) -> Self {
        match e {
            MxError::NonFinite { row, col, value } => BlockError::NonFinite { row, col, value },
            e => BlockError::Invalid(e.to_string()),
        }
    }
}

/// `ceil(log2(q))` for a positive finite f32, with the log2 rounded to f32 first.
///
/// Only when `q` sits a few f32 ulps above a power of two `2^k` can that rounding land exactly on
/// `k` (the true log2 is then within half an ulp of `k`); there the f32 result is taken from the
/// f64 log2, which is far more accurate than the f32 grid around any `k` in range. Everywhere
/// else the answer follows from the exponent bits.
#[inline]
fn ceil_log2_f32(q: f32) -> i32 {
    // log2(1 + 64 * 2^-23) exceeds half an ulp of every |k| <= 127, so above it the f32 log2
    // is always strictly greater than k.
    const NEAR_POWER: u32 = 64;
    let bits = q.to_bits();
    let biased = (bits >> 23) as i32;
    let mant = bits & 0x7f_ffff;
    if biased != 0 && mant == 0 {
        biased - 127
    } else if biased != 0 && mant > NEAR_POWER {
        biased - 127 + 1
    } else {
        ((q as f64).log2() as f32).ceil() as i32
    }
}

/// E8M0 scale byte of a block from its (finite, non-negative) max |w|.
#[inline]
pub fn scale_byte(amax: f32) -> u8 {
    let q = amax.max(f32::MIN_POSITIVE) / E4M3_MAX;
    (ceil_log2_f32(q) + E8M0_BIAS).clamp(0, MAX_SCALE_BYTE as i32) as u8
}

/// `2^(e)` as f32 for `e` in `-127..=127` (2^-127 is subnormal but exact).
#[inline(always)]
fn pow2(e: i32) -> f32 {
    debug_assert!((-127..=127).contains(&e));
    if e >= -126 {
        f32::from_bits(((e + 127) as u32) << 23)
    } else {
        f32::from_bits(1 << 22)
    }
}

/// Value of a scale byte: 2^(b - 127); 255 is NaN.
#[inline]
pub fn scale_value(b: u8) -> f32 {
    if b == 0xFF {
        f32::NAN
    } else {
        pow2(b as i32 - E8M0_BIAS)
    }
}

/// What a pass writes.
#[derive(Clone, Copy, PartialEq)]
enum Want {
    Both,
    Values,
    Scales,
}

/// Quantize whole rows of `k` elements. `values`/`scales` are empty when not wanted. Returns the
/// first non-finite element as (element index in `src`, value).
#[inline(always)]
fn quantize_rows<E: Elem>(
    src: &[u8],
    values: &mut [u8],
    scales: &mut [u8],
    want: Want,
) -> Option<(usize, f32)> {
    let mut v = [[0f32; HALF]; 2];
    for (b, chunk) in src.chunks_exact(BLOCK * E::SIZE).enumerate() {
        let (lo, hi) = chunk.split_at(HALF * E::SIZE);
        E::load_block(lo, &mut v[0]);
        E::load_block(hi, &mut v[1]);
        // Sign-cleared bit patterns order like |w|, with inf and NaN above every number.
        let amax_bits = block_amax(&v[0]).to_bits().max(block_amax(&v[1]).to_bits());
        if amax_bits >= f32::INFINITY.to_bits() {
            let i = v
                .as_flattened()
                .iter()
                .position(|x| !x.is_finite())
                .unwrap();
            return Some((b * BLOCK + i, v.as_flattened()[i]));
        }
        let s = scale_byte(f32::from_bits(amax_bits));
        if want != Want::Values {
            scales[b] = s;
        }
        if want != Want::Scales {
            let mul = pow2(E8M0_BIAS - s as i32);
            let out: &mut [u8; BLOCK] = (&mut values[b * BLOCK..(b + 1) * BLOCK])
                .try_into()
                .unwrap();
            for (o, &x) in out.iter_mut().zip(v.as_flattened()) {
                *o = e4m3_from_f32(x * mul);
            }
        }
    }
    None
}

/// [`quantize_rows`] compiled for AVX2 when the CPU has it.
fn rows_dispatch<E: Elem>(
    src: &[u8],
    values: &mut [u8],
    scales: &mut [u8],
    want: Want,
) -> Option<(usize, f32)> {
    with_avx2!(fn go[E: Elem](src: &[u8], values: &mut [u8], scales: &mut [u8], want: Want) [E] -> Option<(usize, f32)>
        => quantize_rows::<E>(src, values, scales, want))
}

/// Split whole rows over rayon tasks; report the first non-finite element in row-major order.
fn run<E: Elem>(
    src: &[u8],
    k: usize,
    values: &mut [u8],
    scales: &mut [u8],
    want: Want,
) -> Result<(), MxError> {
    let row_bytes = k * E::SIZE;
    let task_bytes = (TASK_BYTES / row_bytes).max(1) * row_bytes;
    let mut jobs = Vec::with_capacity(src.len().div_ceil(task_bytes));
    let (mut v_rest, mut s_rest) = (values, scales);
    let mut first_elem = 0;
    for s in src.chunks(task_bytes) {
        let elems = s.len() / E::SIZE;
        let nv = if want == Want::Scales { 0 } else { elems };
        let ns = if want == Want::Values {
            0
        } else {
            elems / BLOCK
        };
        let (v, vr) = std::mem::take(&mut v_rest).split_at_mut(nv);
        let (sc, sr) = std::mem::take(&mut s_rest).split_at_mut(ns);
        (v_rest, s_rest) = (vr, sr);
        jobs.push((first_elem, s, v, sc));
        first_elem += elems;
    }
    let first_bad = jobs
        .into_par_iter()
        .filter_map(|(at, s, v, sc)| rows_dispatch::<E>(s, v, sc, want).map(|(i, x)| (at + i, x)))
        .min_by_key(|&(i, _)| i);
    match first_bad {
        None => Ok(()),
        Some((i, value)) => Err(MxError::NonFinite {
            row: i / k,
            col: i % k,
            value,
        }),
    }
}

/// Validate dtype, K and buffer lengths; returns the element count.
fn check(
    src: &[u8],
    dtype: Dtype,
    k: usize,
    values: Option<&[u8]>,
    scales: Option<&[u8]>,
) -> Result<usize, MxError> {
    if !dtype.is_float_source() {
        return Err(MxError::Dtype(dtype));
    }
    if k == 0 || !k.is_multiple_of(BLOCK) {
        return Err(MxError::K(k));
    }
    let row_bytes = k * dtype.size();
    if !src.len().is_multiple_of(row_bytes) {
        return Err(MxError::Len {
            what: "source",
            got: src.len(),
            want: src.len().div_ceil(row_bytes) * row_bytes,
        });
    }
    let n = src.len() / dtype.size();
    for (what, buf, want) in [("values", values, n), ("scales", scales, n / BLOCK)] {
        if let Some(b) = buf {
            if b.len() != want {
                return Err(MxError::Len {
                    what,
                    got: b.len(),
                    want,
                });
            }
        }
    }
    Ok(n)
}

fn dispatch(
    src: &[u8],
    dtype: Dtype,
    k: usize,
    values: &mut [u8],
    scales: &mut [u8],
    want: Want,
) -> Result<(), MxError> {
    match dtype {
        Dtype::BF16 => run::<Bf16>(src, k, values, scales, want),
        Dtype::F16 => run::<F16>(src, k, values, scales, want),
        Dtype::F32 => run::<F32>(src, k, values, scales, want),
        _ => Err(MxError::Dtype(dtype)),
    }
}

/// e4m3 values (`rows*k` bytes) and E8M0 scales (`rows*k/32` bytes) of rows of a `[rows, k]`
/// BF16/F16/F32 tensor, in one pass. On error the outputs hold unspecified bytes.
pub fn quantize(
    src: &[u8],
    dtype: Dtype,
    k: usize,
    values: &mut [u8],
    scales: &mut [u8],
) -> Result<(), MxError> {
    check(src, dtype, k, Some(values), Some(scales))?;
    dispatch(src, dtype, k, values, scales, Want::Both)
}

/// e4m3 values only (the `weight` tensor), `values.len() == rows*k`.
pub fn quantize_values(
    src: &[u8],
    dtype: Dtype,
    k: usize,
    values: &mut [u8],
) -> Result<(), MxError> {
    check(src, dtype, k, Some(values), None)?;
    dispatch(src, dtype, k, values, &mut [], Want::Values)
}

/// E8M0 scale bytes only (the `weight_scale` tensor), `scales.len() == rows*k/32`.
pub fn block_scales(src: &[u8], dtype: Dtype, k: usize, scales: &mut [u8]) -> Result<(), MxError> {
    check(src, dtype, k, None, Some(scales))?;
    dispatch(src, dtype, k, &mut [], scales, Want::Scales)
}

/// `f32(e4m3) * 2^(s - 127)` in f32, the product vLLM's dequantization forms before its cast to
/// BF16 (for verification and tests).
pub fn dequantize(values: &[u8], scales: &[u8], k: usize) -> Result<Vec<f32>, MxError> {
    if k == 0 || !k.is_multiple_of(BLOCK) {
        return Err(MxError::K(k));
    }
    if !values.len().is_multiple_of(k) {
        return Err(MxError::Len {
            what: "values",
            got: values.len(),
            want: values.len().div_ceil(k) * k,
        });
    }
    if scales.len() * BLOCK != values.len() {
        return Err(MxError::Len {
            what: "scales",
            got: scales.len(),
            want: values.len() / BLOCK,
        });
    }
    Ok(values
        .chunks_exact(BLOCK)
        .zip(scales)
        .flat_map(|(v, &s)| {
            let scale = scale_value(s);
            v.iter().map(move |&b| e4m3_to_f32(b) * scale)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    // ---- References written from the definitions, in f64, independent of the kernel ----

    /// Every finite e4m3 byte with its value: normals `(1 + m/8)·2^(e-7)`, subnormals `m/8·2^-6`.
    fn e4m3_grid() -> Vec<(u8, f64)> {
        (0u8..=255)
            .filter(|b| b & 0x7F != 0x7F)
            .map(|b| {
                let (e, m) = (((b >> 3) & 0xF) as i32, (b & 7) as f64);
                let mag = if e == 0 {
                    m / 8.0 * 2f64.powi(-6)
                } else {
                    (1.0 + m / 8.0) * 2f64.powi(e - 7)
                };
                (b, if b & 0x80 != 0 { -mag } else { mag })
            })
            .collect()
    }

    /// Nearest e4m3 to `x` (|x| <= 464), ties to the even code; the sign is kept for zeros.
    fn ref_e4m3(grid: &[(u8, f64)], x: f64) -> u8 {
        let mut best = (0u8, f64::INFINITY);
        for &(b, v) in grid.iter().filter(|(b, _)| b & 0x80 == 0) {
            let d = (v - x.abs()).abs();
            if d < best.1 || (d == best.1 && b & 1 == 0) {
                best = (b, d);
            }
        }
        best.0 | if x.is_sign_negative() { 0x80 } else { 0 }
    }

    /// Smallest e with max(amax, 2^-126) <= 448·2^e, clamped to the E8M0 range, found by exact
    /// f64 comparisons (no logarithm).
    fn ref_exponent(amax: f64) -> i32 {
        let a = amax.max(2f64.powi(-126));
        let mut e = -140;
        while a > 448.0 * 2f64.powi(e) {
            e += 1;
        }
        e.clamp(-127, 127)
    }

    /// The f32 rule spelled out: f32 quotient, log2 rounded to f32 (from f64), ceiling.
    fn ref_ceil_log2_f32(q: f32) -> i32 {
        ((q as f64).log2() as f32).ceil() as i32
    }

    fn finite_bf16() -> impl Iterator<Item = f32> {
        (0..=u16::MAX)
            .map(|b| bf16::from_bits(b).to_f32())
            .filter(|x| x.is_finite())
    }

    fn bf16_bytes(v: &[f32]) -> Vec<u8> {
        v.iter()
            .flat_map(|&x| bf16::from_f32(x).to_bits().to_le_bytes())
            .collect()
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn quantize_vec(src: &[u8], dtype: Dtype, k: usize) -> Result<(Vec<u8>, Vec<u8>), MxError> {
        let n = src.len() / dtype.size();
        let (mut v, mut s) = (vec![0u8; n], vec![0u8; n / BLOCK]);
        quantize(src, dtype, k, &mut v, &mut s)?;
        Ok((v, s))
    }

    /// Check every block of `vals` (already exactly representable in the source dtype) against
    /// the f64 reference.
    fn assert_matches_reference(vals: &[f32], values: &[u8], scales: &[u8]) {
        let grid = e4m3_grid();
        for (b, block) in vals.chunks(BLOCK).enumerate() {
            let amax = block.iter().fold(0f64, |m, &x| m.max((x as f64).abs()));
            let e = ref_exponent(amax);
            assert_eq!(scales[b] as i32, e + 127, "block {b} amax {amax}");
            for (i, &x) in block.iter().enumerate() {
                let want = ref_e4m3(&grid, x as f64 * 2f64.powi(-e));
                assert_eq!(
                    values[b * BLOCK + i],
                    want,
                    "block {b} elem {i}: {x} at 2^{e}"
                );
            }
        }
    }

    // ---- The scale rule ----

    #[test]
    fn scale_rule_matches_exact_math_for_every_bf16_and_f16_amax() {
        // BF16/F16 carry too few mantissa bits for amax/448 to fall within a few f32 ulps above a
        // power of two, so vLLM's f32 log2 and the exact exponent agree on every value.
        let f16s = (0..=u16::MAX).map(|b| f16::from_bits(b).to_f32());
        for a in finite_bf16()
            .chain(f16s)
            .filter(|a| a.is_finite() && *a >= 0.0)
        {
            assert_eq!(
                scale_byte(a) as i32,
                ref_exponent(a as f64) + 127,
                "amax {a:e}"
            );
        }
    }

    #[test]
    fn exponent_fast_path_equals_rounded_log2_near_every_power_of_two() {
        // Every normal exponent, every mantissa within 4096 ulps above the power of two and
        // 64 below the next one, and every subnormal with a small or large mantissa.
        for biased in 1u32..=254 {
            for mant in (0..=4096).chain((1 << 23) - 64..1 << 23) {
                let q = f32::from_bits(biased << 23 | mant);
                assert_eq!(ceil_log2_f32(q), ref_ceil_log2_f32(q), "q {q:e} ({mant})");
            }
        }
        for mant in (1..=4096).chain((1 << 23) - 4096..1 << 23) {
            let q = f32::from_bits(mant);
            assert_eq!(ceil_log2_f32(q), ref_ceil_log2_f32(q), "subnormal q {q:e}");
        }
        // Where the f32 rounding matters (F32 sources only): one ulp above 2^-10 the true log2
        // is above -10, but within half an f32 ulp of it, so vLLM's rule keeps 2^-10.
        let q = f32::from_bits((117 << 23) | 1);
        assert!(q as f64 > 2f64.powi(-10));
        assert_eq!(ceil_log2_f32(q), -10);
        // ... while far enough above, the exponent moves up as the exact rule says.
        assert_eq!(ceil_log2_f32(f32::from_bits((117 << 23) | 65)), -9);
    }

    #[test]
    fn power_of_two_boundaries_and_the_difference_from_the_ocp_floor_rule() {
        for j in [-20, -1, 0, 1, 10] {
            let top = 448.0 * 2f32.powi(j);
            // amax exactly 448·2^j: scale 2^j, amax itself becomes 448 (0x7E).
            let mut block = [0f32; BLOCK];
            block[3] = -top;
            block[4] = top / 3.0;
            let (v, s) = quantize_vec(&f32_bytes(&block), Dtype::F32, BLOCK).unwrap();
            assert_eq!(s[0] as i32, 127 + j);
            assert_eq!(v[3], 0xFE);
            // Next BF16 above: the exponent moves up, so nothing saturates.
            let above = f32::from_bits((bf16::from_f32(top).to_bits() as u32 + 1) << 16);
            block[3] = above;
            let (v2, s2) = quantize_vec(&bf16_bytes(&block), Dtype::BF16, BLOCK).unwrap();
            assert_eq!(s2[0] as i32, 128 + j);
            assert_eq!(e4m3_to_f32(v2[3]), 224.0, "{above} / 2^{}", j + 1);
        }
        // amax 480 (mantissa 1.875 > 1.75): vLLM scales by 2 (480 -> 240); the OCP spec's
        // floor(log2(480)) - 8 = 0 would keep scale 1 and saturate 480 to 448.
        let mut block = [1f32; BLOCK];
        block[0] = 480.0;
        let (v, s) = quantize_vec(&f32_bytes(&block), Dtype::F32, BLOCK).unwrap();
        assert_eq!(s[0], 128);
        assert_eq!(e4m3_to_f32(v[0]), 240.0);
        assert_eq!(e4m3_to_f32(v[1]), 0.5);
        // amax 448 (mantissa 1.75): both rules agree on scale 1.
        block[0] = 448.0;
        let (_, s) = quantize_vec(&f32_bytes(&block), Dtype::F32, BLOCK).unwrap();
        assert_eq!(s[0], 127);
    }

    // ---- Every BF16 value through the kernel ----

    #[test]
    fn every_bf16_value_in_a_block_with_each_anchor_amax() {
        // Element 0 of each block is the anchor (|anchor| is the block amax); the other 31 sweep
        // every finite BF16 value not larger in magnitude.
        let anchors = [
            448.0f32,
            -1.0,
            1.75,
            1.7578125, // just above 1.75: the exponent moves up
            480.0,
            448.0 * 2f32.powi(-20),
            2f32.powi(-126),    // smallest normal: scale byte 0
            2f32.powi(-133),    // BF16 subnormal
            bf16::MAX.to_f32(), // largest BF16
            -bf16::MAX.to_f32(),
        ];
        for anchor in anchors {
            let fill: Vec<f32> = finite_bf16().filter(|x| x.abs() <= anchor.abs()).collect();
            let mut vals = Vec::new();
            for c in fill.chunks(BLOCK - 1) {
                vals.push(anchor);
                vals.extend_from_slice(c);
                vals.resize(vals.len().next_multiple_of(BLOCK), 0.0);
            }
            let k = BLOCK * 4;
            vals.resize(vals.len().next_multiple_of(k), 0.0);
            let (v, s) = quantize_vec(&bf16_bytes(&vals), Dtype::BF16, k).unwrap();
            assert_matches_reference(&vals, &v, &s);
        }
    }

    #[test]
    fn consecutive_bf16_patterns_and_f16_patterns() {
        // All 65536 patterns in order (NaN/inf replaced by zero): blocks mix neighbours of every
        // magnitude and both signs.
        let bf: Vec<f32> = (0..=u16::MAX)
            .map(|b| bf16::from_bits(b).to_f32())
            .map(|x| if x.is_finite() { x } else { 0.0 })
            .collect();
        let (v, s) = quantize_vec(&bf16_bytes(&bf), Dtype::BF16, 1024).unwrap();
        assert_matches_reference(&bf, &v, &s);
        let hf: Vec<f32> = (0..=u16::MAX)
            .map(|b| f16::from_bits(b).to_f32())
            .map(|x| if x.is_finite() { x } else { 0.0 })
            .collect();
        let bytes: Vec<u8> = hf
            .iter()
            .flat_map(|&x| f16::from_f32(x).to_bits().to_le_bytes())
            .collect();
        let (v, s) = quantize_vec(&bytes, Dtype::F16, 2048).unwrap();
        assert_matches_reference(&hf, &v, &s);
        // Same bytes from the F32 upcast.
        let (v2, s2) = quantize_vec(&f32_bytes(&hf), Dtype::F32, 2048).unwrap();
        assert_eq!((v, s), (v2, s2));
    }

    #[test]
    fn zero_blocks_and_subnormals() {
        // All zeros: amax is raised to 2^-126, whose exponent clamps to byte 0; -0 keeps its sign.
        let mut block = [0f32; BLOCK];
        block[1] = -0.0;
        let (v, s) = quantize_vec(&f32_bytes(&block), Dtype::F32, BLOCK).unwrap();
        assert_eq!(s, [0]);
        assert_eq!(v[0], 0x00);
        assert_eq!(v[1], 0x80);
        assert!(v[2..].iter().all(|&b| b == 0));
        // A BF16 subnormal block also gets byte 0 (scale 2^-127): 2^-133 -> 2^-6, -3·2^-133 -> -3·2^-6.
        block[0] = 2f32.powi(-133);
        block[1] = -3.0 * 2f32.powi(-133);
        let (v, s) = quantize_vec(&bf16_bytes(&block), Dtype::BF16, BLOCK).unwrap();
        assert_eq!(s, [0]);
        assert_eq!(e4m3_to_f32(v[0]), 2f32.powi(-6));
        assert_eq!(e4m3_to_f32(v[1]), -3.0 * 2f32.powi(-6));
        // F16 subnormals are ordinary f32 values: 2^-24 gets the exponent 2^-32 and becomes 256.
        block[0] = 2f32.powi(-24);
        block[1] = 0.0;
        let hb: Vec<u8> = block
            .iter()
            .flat_map(|&x| f16::from_f32(x).to_bits().to_le_bytes())
            .collect();
        let (v, s) = quantize_vec(&hb, Dtype::F16, BLOCK).unwrap();
        assert_eq!(s, [127 - 32]);
        assert_eq!(e4m3_to_f32(v[0]), 256.0);
        // Elements far below the block amax underflow to (signed) zero, as e4m3 rounding says.
        let mut block = [0f32; BLOCK];
        block[0] = 448.0;
        block[1] = 2f32.powi(-10); // half the smallest e4m3 subnormal: tie to even -> 0
        block[2] = -1.5 * 2f32.powi(-10); // rounds up to the smallest subnormal
        let (v, _) = quantize_vec(&f32_bytes(&block), Dtype::F32, BLOCK).unwrap();
        assert_eq!([v[1], v[2]], [0x00, 0x81]);
    }

    // ---- Non-finite input and typed errors ----

    #[test]
    fn nan_and_inf_are_refused_naming_the_first_in_row_major_order() {
        let (rows, k) = (600usize, 512usize); // > TASK_BYTES: several rayon tasks
        let mut vals = vec![0.25f32; rows * k];
        vals[577 * k + 3] = f32::NAN;
        vals[5 * k + 100] = f32::INFINITY;
        vals[5 * k + 200] = -f32::NAN;
        let src = bf16_bytes(&vals);
        let err = quantize_vec(&src, Dtype::BF16, k).unwrap_err();
        assert!(
            matches!(err, MxError::NonFinite { row: 5, col: 100, value } if value == f32::INFINITY),
            "{err:?}"
        );
        let mut v = vec![0u8; rows * k];
        let mut s = vec![0u8; rows * k / BLOCK];
        for e in [
            quantize_values(&src, Dtype::BF16, k, &mut v).unwrap_err(),
            block_scales(&src, Dtype::BF16, k, &mut s).unwrap_err(),
        ] {
            assert!(
                matches!(
                    e,
                    MxError::NonFinite {
                        row: 5,
                        col: 100,
                        ..
                    }
                ),
                "{e:?}"
            );
        }
        vals[5 * k + 100] = 1.0;
        vals[5 * k + 200] = 1.0;
        let err = quantize_vec(&f32_bytes(&vals), Dtype::F32, k).unwrap_err();
        assert!(
            matches!(err, MxError::NonFinite { row: 577, col: 3, value } if value.is_nan()),
            "{err:?}"
        );
        assert!(err.to_string().contains("row 577, column 3"), "{err}");
        let neg_inf = f32_bytes(&[f32::NEG_INFINITY; BLOCK]);
        assert!(matches!(
            quantize_vec(&neg_inf, Dtype::F32, BLOCK),
            Err(MxError::NonFinite { row: 0, col: 0, .. })
        ));
    }

    #[test]
    fn typed_errors_for_bad_shapes_and_dtypes() {
        let src = vec![0u8; 2 * 64 * 2]; // two BF16 rows of 64
        let (mut v, mut s) = (vec![0u8; 128], vec![0u8; 4]);
        assert_eq!(
            quantize(&src, Dtype::U8, 64, &mut v, &mut s),
            Err(MxError::Dtype(Dtype::U8))
        );
        for k in [0, 16, 48, 100] {
            assert_eq!(
                quantize(&src, Dtype::BF16, k, &mut v, &mut s),
                Err(MxError::K(k))
            );
        }
        let e = quantize(&src[..200], Dtype::BF16, 64, &mut v, &mut s).unwrap_err();
        assert_eq!(
            e,
            MxError::Len {
                what: "source",
                got: 200,
                want: 256
            }
        );
        let e = quantize(&src, Dtype::BF16, 64, &mut v[..127], &mut s).unwrap_err();
        assert_eq!(
            e,
            MxError::Len {
                what: "values",
                got: 127,
                want: 128
            }
        );
        let e = quantize(&src, Dtype::BF16, 64, &mut v, &mut s[..3]).unwrap_err();
        assert_eq!(
            e,
            MxError::Len {
                what: "scales",
                got: 3,
                want: 4
            }
        );
        assert!(matches!(
            quantize_values(&src, Dtype::F16, 32, &mut v[..64]),
            Err(MxError::Len { what: "values", .. })
        ));
        assert!(matches!(
            block_scales(&src, Dtype::F32, 32, &mut s[..1]),
            Err(MxError::Len { what: "scales", .. })
        ));
        assert!(e.to_string().contains("scales holds 3 bytes, expected 4"));
        assert_eq!(
            MxError::K(48).to_string(),
            "MXFP8 needs the last dimension K to be a positive multiple of 32, got 48"
        );
        assert_eq!(dequantize(&v, &s, 48), Err(MxError::K(48)));
        assert!(matches!(
            dequantize(&v[..96], &s[..3], 64),
            Err(MxError::Len { what: "values", .. })
        ));
        assert!(matches!(
            dequantize(&v, &s[..3], 64),
            Err(MxError::Len { what: "scales", .. })
        ));
    }

    // ---- Entry points, chunking, parallelism, dequantization ----

    fn pseudo_random(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed;
        (0..n)
            .map(|i| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = ((state >> 40) as f32) / (1u64 << 24) as f32 - 0.5;
                // Wide dynamic range across blocks, some zero blocks.
                if (i / BLOCK) % 53 == 7 {
                    0.0
                } else {
                    u * 2f32.powi(((i / BLOCK) % 41) as i32 - 20)
                }
            })
            .collect()
    }

    #[test]
    fn entry_points_agree_and_rows_are_independent_across_tasks() {
        let (rows, k) = (300usize, 1024usize); // 600 KiB of BF16: three rayon tasks
        let vals: Vec<f32> = pseudo_random(rows * k, 7)
            .iter()
            .map(|&x| bf16::from_f32(x).to_f32())
            .collect();
        let src = bf16_bytes(&vals);
        let (v, s) = quantize_vec(&src, Dtype::BF16, k).unwrap();
        let mut v2 = vec![0u8; v.len()];
        let mut s2 = vec![0u8; s.len()];
        quantize_values(&src, Dtype::BF16, k, &mut v2).unwrap();
        block_scales(&src, Dtype::BF16, k, &mut s2).unwrap();
        assert_eq!((&v, &s), (&v2, &s2));
        // One row at a time (one task each) gives the same bytes.
        for r in [0, 1, 127, 128, 255, 299] {
            let (vr, sr) = quantize_vec(&src[r * k * 2..(r + 1) * k * 2], Dtype::BF16, k).unwrap();
            assert_eq!(vr, v[r * k..(r + 1) * k], "row {r}");
            assert_eq!(sr, s[r * k / BLOCK..(r + 1) * k / BLOCK], "row {r}");
        }
        assert_matches_reference(&vals, &v, &s);
    }

    #[test]
    fn dequantize_is_value_times_power_of_two_and_close_to_the_input() {
        let k = 256;
        let vals = pseudo_random(64 * k, 99);
        let (v, s) = quantize_vec(&f32_bytes(&vals), Dtype::F32, k).unwrap();
        let deq = dequantize(&v, &s, k).unwrap();
        for (i, (&w, &d)) in vals.iter().zip(&deq).enumerate() {
            let scale = scale_value(s[i / BLOCK]);
            assert_eq!(d, e4m3_to_f32(v[i]) * scale);
            // Within half an e4m3 step: 2^-4 relative for normals, 2^-10 absolute (scaled) below.
            let bound = (w.abs() / 16.0).max(2f32.powi(-10) * scale);
            assert!((d - w).abs() <= bound, "elem {i}: {w} -> {d}");
        }
        // Exact for values already on the grid.
        let grid: Vec<f32> = (0..BLOCK)
            .map(|i| e4m3_to_f32(0x30 + i as u8) * 2f32.powi(-30))
            .collect();
        let (v, s) = quantize_vec(&f32_bytes(&grid), Dtype::F32, BLOCK).unwrap();
        assert_eq!(dequantize(&v, &s, BLOCK).unwrap(), grid);
        assert!(scale_value(255).is_nan());
        assert_eq!(scale_value(0), 2f32.powi(-127));
        assert_eq!(scale_value(254), 2f32.powi(127));
    }
}
