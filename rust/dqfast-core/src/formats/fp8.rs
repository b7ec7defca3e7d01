//! float8_e4m3fn: conversion from BF16/FP16/FP32, scales and amax.
//!
//! The f32 → e4m3 rounding is c10's `fp8e4m3fn_from_fp32_value` (round to nearest even; in
//! range it is bit-identical to every PyTorch version). Out of range the versions differ: c10's
//! scalar rule gives the NaN code for |x| > 464 ([`Saturation::None`]); PyTorch 2.13's CPU cast
//! saturates to ±448, which equals ModelOpt's/vLLM's clamp-then-cast ([`Saturation::Clamp`], the
//! default; NaN stays NaN as with `torch.clamp`). `tests/test_fp8_kernels.py` proves both against
//! torch over every BF16/FP16 input.

use half::f16;

use super::load::{Bf16, Elem, F16, F32};
use super::with_avx2;
use crate::dtype::Dtype;

pub use super::e4m3::{
    count_nan_e4m3, e4m3_from_f32, e4m3_is_nan, e4m3_to_f32, repair_nan_e4m3, E4M3_MAX,
    E4M3_MAX_BYTE,
};
pub use super::load::{load_f32, round_to_bf16, to_f32_vec};

/// How out-of-range quotients are handled.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Saturation {
    /// Clamp to ±448 before the cast, as ModelOpt/vLLM write checkpoints.
    Clamp,
    /// PyTorch's plain cast (|x| > 464 becomes NaN).
    None,
}

/// How the quotient `w / scale` is formed before the cast.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Rounding {
    /// `(w.float() / scale).to(e4m3)`: divide in float32, round once. The most accurate.
    Exact,
    /// `(w / scale).to(e4m3)` with `w` in its own dtype and a 0-dim float32 scale, as ModelOpt's
    /// export does: torch keeps the quotient in the weight's dtype (BF16/FP16), so it is rounded
    /// twice. Reproduces ModelOpt's exported bytes.
    SourceDtype,
}

/// Quantize `src` (elements `first_elem..` of a tensor whose rows hold `row_len` elements) to
/// e4m3 in `out`. `scales` is one per-tensor scale or one scale per row.
#[allow(clippy::too_many_arguments)]
pub fn quantize_e4m3(
    src: &[u8],
    dtype: Dtype,
    scales: &[f32],
    row_len: usize,
    first_elem: usize,
    rounding: Rounding,
    saturation: Saturation,
    out: &mut [u8],
) {
    if scales.len() == 1 && dtype.size() == 2 && out.len() >= E4m3Lut::MIN_ELEMS {
        E4m3Lut::new(dtype, scales[0], rounding, saturation).apply(src, out);
        return;
    }
    quantize_direct(
        src, dtype, scales, row_len, first_elem, rounding, saturation, out,
    )
}

/// Elements converted together: fixed-size arrays let LLVM vectorize the division, rounding and
/// byte selection (the per-element function is branch-free).
const LANES: usize = 16;

#[inline(always)]
fn convert_one<S: Elem, const NATIVE: bool, const CLAMP: bool>(w: f32, scale: f32) -> u8 {
    let mut q = w / scale;
    if NATIVE {
        q = S::round_native(q);
    }
    if CLAMP {
        q = q.clamp(-E4M3_MAX, E4M3_MAX);
    }
    e4m3_from_f32(q)
}

#[inline(always)]
fn convert_run_inline<S: Elem, const NATIVE: bool, const CLAMP: bool>(
    src: &[u8],
    scale: f32,
    out: &mut [u8],
) {
    let whole = out.len() / LANES * LANES;
    let (head, tail) = out.split_at_mut(whole);
    for (o, b) in head
        .chunks_exact_mut(LANES)
        .zip(src.chunks_exact(LANES * S::SIZE))
    {
        let mut v = [0f32; LANES];
        for (i, x) in v.iter_mut().enumerate() {
            *x = S::load(&b[i * S::SIZE..(i + 1) * S::SIZE]);
        }
        for i in 0..LANES {
            o[i] = convert_one::<S, NATIVE, CLAMP>(v[i], scale);
        }
    }
    for (o, b) in tail
        .iter_mut()
        .zip(src[whole * S::SIZE..].chunks_exact(S::SIZE))
    {
        *o = convert_one::<S, NATIVE, CLAMP>(S::load(b), scale);
    }
}

/// The same code compiled twice: for AVX2 (8-wide division) when the CPU has it, else baseline.
fn convert_run<S: Elem, const NATIVE: bool, const CLAMP: bool>(
    src: &[u8],
    scale: f32,
    out: &mut [u8],
) {
    with_avx2!(fn go[S: Elem, const NATIVE: bool, const CLAMP: bool](src: &[u8], scale: f32, out: &mut [u8]) [S, NATIVE, CLAMP] -> ()
        => convert_run_inline::<S, NATIVE, CLAMP>(src, scale, out))
}

/// A 65,536-entry table of the e4m3 byte of every 16-bit input for one scale: per-tensor BF16/FP16
/// conversion then costs one lookup per element. Built with the same conversion, so identical.
pub struct E4m3Lut(Box<[u8]>);

impl E4m3Lut {
    pub fn new(dtype: Dtype, scale: f32, rounding: Rounding, saturation: Saturation) -> E4m3Lut {
        assert_eq!(
            dtype.size(),
            2,
            "a lookup table needs a 16-bit source dtype"
        );
        let src: Vec<u8> = (0..=u16::MAX).flat_map(|b| b.to_le_bytes()).collect();
        let mut t = vec![0u8; 1 << 16];
        quantize_direct(
            &src,
            dtype,
            &[scale],
            1 << 16,
            0,
            rounding,
            saturation,
            &mut t,
        );
        E4m3Lut(t.into_boxed_slice())
    }

    /// Worth building when a conversion has at least this many elements.
    pub const MIN_ELEMS: usize = 1 << 18;

    pub fn apply(&self, src: &[u8], out: &mut [u8]) {
        let t: &[u8] = &self.0;
        for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
            *o = t[u16::from_le_bytes([c[0], c[1]]) as usize];
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn quantize_direct(
    src: &[u8],
    dtype: Dtype,
    scales: &[f32],
    row_len: usize,
    first_elem: usize,
    rounding: Rounding,
    saturation: Saturation,
    out: &mut [u8],
) {
    match dtype {
        Dtype::BF16 => {
            quantize_typed::<Bf16>(src, scales, row_len, first_elem, rounding, saturation, out)
        }
        Dtype::F16 => {
            quantize_typed::<F16>(src, scales, row_len, first_elem, rounding, saturation, out)
        }
        Dtype::F32 => {
            quantize_typed::<F32>(src, scales, row_len, first_elem, rounding, saturation, out)
        }
        _ => unreachable!("quantize_e4m3 on non-float dtype {dtype}"),
    }
}

fn quantize_typed<S: Elem>(
    src: &[u8],
    scales: &[f32],
    row_len: usize,
    first_elem: usize,
    rounding: Rounding,
    saturation: Saturation,
    out: &mut [u8],
) {
    let n = out.len();
    debug_assert_eq!(src.len(), n * S::SIZE);
    let run = match (rounding, saturation) {
        (Rounding::Exact, Saturation::Clamp) => convert_run::<S, false, true>,
        (Rounding::Exact, Saturation::None) => convert_run::<S, false, false>,
        (Rounding::SourceDtype, Saturation::Clamp) => convert_run::<S, true, true>,
        (Rounding::SourceDtype, Saturation::None) => convert_run::<S, true, false>,
    };
    if scales.len() == 1 {
        run(src, scales[0], out);
        return;
    }
    // Per-row scales: convert one row segment at a time.
    let mut i = 0;
    while i < n {
        let elem = first_elem + i;
        let row = elem / row_len;
        let seg = (row_len - elem % row_len).min(n - i);
        run(
            &src[i * S::SIZE..(i + seg) * S::SIZE],
            scales[row],
            &mut out[i..i + seg],
        );
        i += seg;
    }
}

/// max |x| over a float buffer; NaN if any element is NaN (as `torch.amax` propagates it).
///
/// Works on bit patterns: with the sign cleared, IEEE order of non-negative values is integer
/// order, and every NaN pattern sorts above infinity — so one unsigned max (which vectorizes)
/// gives both the maximum and the NaN check.
pub fn amax(src: &[u8], dtype: Dtype) -> f32 {
    match dtype {
        Dtype::BF16 => f32::from_bits((max_abs_bits16(src) as u32) << 16),
        Dtype::F16 => f16::from_bits(max_abs_bits16(src)).to_f32(),
        Dtype::F32 => {
            let mut m = 0u32;
            for c in src.chunks_exact(4) {
                m = m.max(u32::from_le_bytes([c[0], c[1], c[2], c[3]]) & 0x7fff_ffff);
            }
            f32::from_bits(m)
        }
        _ => unreachable!("amax on non-float dtype {dtype}"),
    }
}

/// Largest sign-cleared 16-bit pattern: 16 independent lanes so the loop becomes vector maxes.
#[inline(always)]
fn max_abs_bits16_inline(src: &[u8]) -> u16 {
    let mut acc = [0u16; 16];
    let mut chunks = src.chunks_exact(32);
    for c in &mut chunks {
        for (i, a) in acc.iter_mut().enumerate() {
            *a = (*a).max(u16::from_le_bytes([c[2 * i], c[2 * i + 1]]) & 0x7fff);
        }
    }
    let mut m = acc.into_iter().max().unwrap_or(0);
    for c in chunks.remainder().chunks_exact(2) {
        m = m.max(u16::from_le_bytes([c[0], c[1]]) & 0x7fff);
    }
    m
}

fn max_abs_bits16(src: &[u8]) -> u16 {
    with_avx2!(fn go[](src: &[u8]) [] -> u16 => max_abs_bits16_inline(src))
}

/// Per-row max |x| (rows of `row_len` elements).
pub fn amax_rows(src: &[u8], dtype: Dtype, row_len: usize) -> Vec<f32> {
    let rb = row_len * dtype.size();
    if rb == 0 {
        return Vec::new();
    }
    src.chunks_exact(rb).map(|r| amax(r, dtype)).collect()
}

/// FP8 dequant scale from a calibrated maximum: `amax / 448` in float32, as ModelOpt and
/// SGLang's builder compute `weight_scale` and `input_scale`.
#[inline]
pub fn scale_from_amax(amax: f32) -> f32 {
    amax / E4M3_MAX
}

/// A scale from a weight's own max |w| (per tensor, row or block), the rule every builder and
/// `dqfast.ops` use: `scale(amax)`, and 1 for an all-zero weight (any positive scale represents
/// zeros exactly). A NaN or infinite amax is refused (such a weight is not quantized), and so is
/// a scale that fails [`check_scale`]. `at` locates the amax in the message (e.g. " (row 3)");
/// `rule` names the scale (e.g. "amax/448").
pub fn scale_for_weight_amax(
    amax: f32,
    at: &str,
    rule: &str,
    scale: impl Fn(f32) -> f32,
) -> Result<f32, String> {
    if amax.is_nan() || amax.is_infinite() {
        let what = if amax.is_nan() { "NaN" } else { "inf" };
        return Err(format!("contains {what}{at}; refusing to quantize"));
    }
    if amax == 0.0 {
        return Ok(1.0);
    }
    let s = scale(amax);
    check_scale(s)
        .map(|_| s)
        .map_err(|m| format!("weight amax {amax:e}{at} gives scale {rule} = {m}; keep this weight in BF16 (fallback)"))
}

/// FP8 weight scale (`amax / 448`) by [`scale_for_weight_amax`].
pub fn weight_scale_from_amax(amax: f32, at: &str) -> Result<f32, String> {
    scale_for_weight_amax(amax, at, "amax/448", scale_from_amax)
}

/// Bytes of input each rayon task reduces in [`par_amax`].
const PAR_PIECE_BYTES: usize = 1 << 20;

/// [`amax`] over all cores (pieces of 1 MiB); identical to the serial result, NaN included.
pub fn par_amax(src: &[u8], dtype: Dtype) -> f32 {
    use rayon::prelude::*;
    let piece = (PAR_PIECE_BYTES / dtype.size() * dtype.size()).max(dtype.size());
    src.par_chunks(piece)
        .map(|c| amax(c, dtype))
        .reduce(|| 0.0f32, nan_max)
}

/// max of two maxima that propagates NaN (as `torch.amax` does).
#[inline]
pub fn nan_max(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::NAN
    } else {
        a.max(b)
    }
}

/// `f32(q) * scale` of e4m3 bytes (elements `first_elem..` of a tensor whose rows hold `row_len`
/// elements), with the scale indexing of [`quantize_e4m3`]: one scale, or one per row.
pub fn dequantize_e4m3(
    q: &[u8],
    scales: &[f32],
    row_len: usize,
    first_elem: usize,
    out: &mut [f32],
) {
    assert_eq!(q.len(), out.len(), "dequantize_e4m3 output length");
    if scales.len() == 1 {
        let s = scales[0];
        for (o, &b) in out.iter_mut().zip(q) {
            *o = e4m3_to_f32(b) * s;
        }
        return;
    }
    let n = q.len();
    let mut i = 0;
    while i < n {
        let elem = first_elem + i;
        let s = scales[elem / row_len];
        let seg = (row_len - elem % row_len).min(n - i);
        for (o, &b) in out[i..i + seg].iter_mut().zip(&q[i..i + seg]) {
            *o = e4m3_to_f32(b) * s;
        }
        i += seg;
    }
}

/// The one rule for every scale dqfast writes or uses (FP8 weight and input scales, NVFP4
/// global scales): finite, > 0 and a *normal* float32. A zero or subnormal scale (an amax below
/// `bound * 2^-126`) makes a runtime divide by zero or lose all precision, so the scale itself
/// is checked, not only the amax it came from. `Err` holds the reason, for the caller to place.
pub fn check_scale(s: f32) -> Result<(), String> {
    if s.is_normal() && s > 0.0 {
        Ok(())
    } else if s.is_finite() && s > 0.0 {
        Err(format!("{s:e} is subnormal in float32 (below 2^-126)"))
    } else {
        Err(format!("{s} is not finite and > 0"))
    }
}

/// " at index i" for multi-value tensors.
fn at_index(n: usize, i: usize) -> String {
    if n > 1 {
        format!(" at index {i}")
    } else {
        String::new()
    }
}

/// [`check_scale`] for every value; the message names `what` and the index.
pub fn check_scales(what: &str, v: &[f32]) -> Result<(), String> {
    for (i, &s) in v.iter().enumerate() {
        check_scale(s).map_err(|m| format!("{what}{}: {m}", at_index(v.len(), i)))?;
    }
    Ok(())
}

/// Scales `amax / bound` (float32 division: bit-exact with numpy and torch), every amax finite
/// and > 0 and every scale passing [`check_scale`]. `bound` is 448 for FP8, 2688 for NVFP4.
pub fn scales_from_amax(what: &str, amax: &[f32], bound: f32) -> Result<Vec<f32>, String> {
    if !(bound.is_finite() && bound > 0.0) {
        return Err(format!("bound {bound} must be finite and > 0"));
    }
    amax.iter()
        .enumerate()
        .map(|(i, &a)| {
            let at = at_index(amax.len(), i);
            if !(a.is_finite() && a > 0.0) {
                return Err(format!("{what}{at} is {a}; it must be finite and > 0"));
            }
            let s = a / bound;
            check_scale(s).map_err(|m| {
                format!("{what}{at} is {a:e}: its scale {what}/{bound} = {m}; the value is too small to use")
            })?;
            Ok(s)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_table_round_trips_every_byte() {
        for b in 0..=255u8 {
            let f = e4m3_to_f32(b);
            if e4m3_is_nan(b) {
                assert!(f.is_nan());
                assert_eq!(e4m3_from_f32(f), b);
                continue;
            }
            // 0x80 is -0.0 and must come back as 0x80, not 0x00.
            assert_eq!(e4m3_from_f32(f), b, "byte {b:#04x} value {f}");
        }
        assert_eq!(e4m3_to_f32(0x7E), 448.0);
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9));
        assert_eq!(e4m3_to_f32(0x08), 2f32.powi(-6));
    }

    #[test]
    fn decode_table_matches_the_format_definition() {
        for b in 0..=255u8 {
            let sign = if b & 0x80 != 0 { -1.0f32 } else { 1.0 };
            let e = ((b >> 3) & 0xF) as i32;
            let m = (b & 0x7) as f32;
            let want = if b & 0x7f == 0x7f {
                f32::NAN
            } else if e == 0 {
                sign * m * 2f32.powi(-9)
            } else {
                sign * (1.0 + m / 8.0) * 2f32.powi(e - 7)
            };
            let got = e4m3_to_f32(b);
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "{b:#04x}"
            );
        }
    }

    #[test]
    fn rounding_is_nearest_even_and_torch_overflow() {
        // Midpoint between 1.0 (0x38) and 1.125 (0x39) ties to even 0x38.
        assert_eq!(e4m3_from_f32(1.0625), 0x38);
        // Midpoint between 1.125 and 1.25 ties to even 1.25 (0x3A).
        assert_eq!(e4m3_from_f32(1.1875), 0x3A);
        // Above 448 torch does not saturate: 464 ties to 448, just above becomes NaN.
        assert_eq!(e4m3_from_f32(464.0), 0x7E);
        assert_eq!(e4m3_from_f32(464.1), 0x7F);
        assert_eq!(e4m3_from_f32(-1000.0), 0xFF);
        assert_eq!(e4m3_from_f32(f32::INFINITY), 0x7F);
        // Subnormals: half of the smallest subnormal ties to zero, just above rounds up.
        assert_eq!(e4m3_from_f32(2f32.powi(-10)), 0x00);
        assert_eq!(e4m3_from_f32(2f32.powi(-10) * 1.01), 0x01);
        assert_eq!(e4m3_from_f32(-0.0), 0x80);
    }

    #[test]
    fn clamp_saturates_but_keeps_nan() {
        let src: Vec<u8> = [1000.0f32, -1000.0, f32::NAN, 3.0]
            .iter()
            .flat_map(|f| f.to_le_bytes())
            .collect();
        let mut out = [0u8; 4];
        quantize_e4m3(
            &src,
            Dtype::F32,
            &[1.0],
            4,
            0,
            Rounding::Exact,
            Saturation::Clamp,
            &mut out,
        );
        assert_eq!(out, [0x7E, 0xFE, 0x7F, e4m3_from_f32(3.0)]);
    }

    #[test]
    fn per_row_scales_apply_to_their_rows_across_chunk_offsets() {
        let vals: Vec<f32> = (0..12).map(|i| i as f32).collect();
        let src: Vec<u8> = vals.iter().flat_map(|f| f.to_le_bytes()).collect();
        let scales = [1.0f32, 2.0, 4.0];
        let mut whole = [0u8; 12];
        quantize_e4m3(
            &src,
            Dtype::F32,
            &scales,
            4,
            0,
            Rounding::Exact,
            Saturation::Clamp,
            &mut whole,
        );
        for (i, &b) in whole.iter().enumerate() {
            assert_eq!(b, e4m3_from_f32(vals[i] / scales[i / 4]));
        }
        // The same result when converted in odd-sized pieces.
        let mut pieces = [0u8; 12];
        for (a, b) in [(0usize, 3usize), (3, 9), (9, 12)] {
            quantize_e4m3(
                &src[a * 4..b * 4],
                Dtype::F32,
                &scales,
                4,
                a,
                Rounding::Exact,
                Saturation::Clamp,
                &mut pieces[a..b],
            );
        }
        assert_eq!(whole, pieces);
    }

    #[test]
    fn bf16_rounding_matches_definition() {
        assert_eq!(round_to_bf16(1.0 + 2f32.powi(-8)), 1.0); // tie to even
        assert_eq!(
            round_to_bf16(1.0 + 3.0 * 2f32.powi(-8)),
            1.0 + 2f32.powi(-6)
        ); // tie up to even
        assert_eq!(round_to_bf16(f32::NAN).to_bits(), 0x7FC0_0000);
    }

    #[test]
    fn amax_bit_trick_equals_float_max_for_every_16bit_pattern() {
        for dtype in [Dtype::BF16, Dtype::F16] {
            // Every pattern once, then each pattern paired with a small value: max must be exact.
            let all: Vec<u8> = (0..=u16::MAX).flat_map(|b| b.to_le_bytes()).collect();
            assert!(amax(&all, dtype).is_nan());
            for b in (0..=u16::MAX).step_by(7) {
                let pair: Vec<u8> = [b, 0x3c00u16.min(b)]
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect();
                let want = {
                    let a = load_f32(&pair, dtype, 0).abs();
                    let c = load_f32(&pair, dtype, 1).abs();
                    if a.is_nan() || c.is_nan() {
                        f32::NAN
                    } else {
                        a.max(c)
                    }
                };
                let got = amax(&pair, dtype);
                assert!(
                    got == want || (got.is_nan() && want.is_nan()),
                    "{dtype} {b:#06x}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn weight_scale_rule_and_parallel_amax() {
        assert_eq!(weight_scale_from_amax(448.0, ""), Ok(1.0));
        assert_eq!(weight_scale_from_amax(0.0, ""), Ok(1.0));
        assert!(weight_scale_from_amax(f32::NAN, " (row 2)")
            .unwrap_err()
            .contains("NaN (row 2)"));
        assert!(weight_scale_from_amax(f32::INFINITY, "")
            .unwrap_err()
            .contains("inf"));
        // The scale is checked, not the amax: 1e-40 / 448 underflows to a subnormal.
        assert!(weight_scale_from_amax(1e-36, "")
            .unwrap_err()
            .contains("subnormal"));
        // More than one piece, the maximum in the last one.
        let mut v = vec![0.5f32; (3 << 20) / 4 + 7];
        *v.last_mut().unwrap() = -9.0;
        let b: Vec<u8> = v.iter().flat_map(|f| f.to_le_bytes()).collect();
        assert_eq!(par_amax(&b, Dtype::F32), 9.0);
        assert_eq!(par_amax(&b, Dtype::F32), amax(&b, Dtype::F32));
        v[3] = f32::NAN;
        let b: Vec<u8> = v.iter().flat_map(|f| f.to_le_bytes()).collect();
        assert!(par_amax(&b, Dtype::F32).is_nan());
    }

    #[test]
    fn dequantize_uses_quantize_scale_indexing() {
        let q: Vec<u8> = (0..12).map(|i| e4m3_from_f32(i as f32)).collect();
        let scales = [1.0f32, 2.0, 4.0];
        let mut whole = [0f32; 12];
        dequantize_e4m3(&q, &scales, 4, 0, &mut whole);
        for (i, &x) in whole.iter().enumerate() {
            assert_eq!(x, e4m3_to_f32(q[i]) * scales[i / 4]);
        }
        let mut pieces = [0f32; 12];
        for (a, b) in [(0usize, 5usize), (5, 12)] {
            dequantize_e4m3(&q[a..b], &scales, 4, a, &mut pieces[a..b]);
        }
        assert_eq!(whole, pieces);
    }

    #[test]
    fn amax_propagates_nan_and_ignores_sign() {
        let src: Vec<u8> = [1.0f32, -7.5, 2.0]
            .iter()
            .flat_map(|f| f.to_le_bytes())
            .collect();
        assert_eq!(amax(&src, Dtype::F32), 7.5);
        let src: Vec<u8> = [1.0f32, f32::NAN, 2.0]
            .iter()
            .flat_map(|f| f.to_le_bytes())
            .collect();
        assert!(amax(&src, Dtype::F32).is_nan());
        assert_eq!(amax_rows(&[0u8; 0], Dtype::F32, 4), Vec::<f32>::new());
    }
}
