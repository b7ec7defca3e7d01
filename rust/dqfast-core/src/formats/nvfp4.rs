//! NVFP4 (E2M1 elements, one e4m3 scale per 16 elements along K, one f32 global scale).
//!
//! Bit-exact with ModelOpt 0.47 `NVFP4QTensor.quantize` as it runs in PyTorch (CPU, and the
//! non-TensorRT CUDA path):
//! * `weight_scale_2 = f32(amax) / 2688` (a true f32 division);
//! * per block of 16: `s = f32(max|w|) / f32(6 * weight_scale_2)` (product rounded to f32 first,
//!   then one division), `s == 0 -> 1.0`, clamp to `[2^-9, 448]` (NaN stays NaN), e4m3 RNE;
//! * `x = f32(w) / f32(f32(s_e4m3) * weight_scale_2)` (product rounded first, then one division);
//! * E2M1 code: number of bounds `[0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5]` that are not `>= |x|`
//!   (torch.searchsorted, left side; NaN counts past every bound), plus one when
//!   `|x|` is exactly 0.75, 1.75 or 3.5, plus 8 when `x < 0`;
//! * packing: low nibble = element 2j, high nibble = element 2j+1.
//!
//! All row-wise functions treat blocks independently, so any chunk of whole rows (indeed any
//! chunk of whole blocks) gives the same bytes as the whole tensor.

use super::e4m3::{e4m3_from_f32, e4m3_to_f32, E4M3_MAX};
use crate::dtype::Dtype;
// The e4m3 NaN helpers live with the other e4m3 code; re-exported for the NVFP4 callers.
pub use super::e4m3::{count_nan_e4m3, repair_nan_e4m3};
use super::load::{Bf16, Elem, F16, F32};
use super::with_avx2;

/// Elements per block scale.
pub const BLOCK: usize = 16;
/// Largest E2M1 magnitude.
pub const E2M1_MAX: f32 = 6.0;
/// Magnitudes of the eight non-negative E2M1 codes.
pub const E2M1_VALUES: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
/// ModelOpt's rounding bounds between consecutive magnitudes.
pub const E2M1_BOUNDS: [f32; 7] = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0];
/// Smallest block scale ModelOpt writes (smallest e4m3 subnormal).
pub const MIN_BLOCK_SCALE: f32 = 1.0 / 512.0;
/// The global-scale bound `6 * 448` (E2M1 max times E4M3 max): `weight_scale_2 = amax / 2688`.
pub const GLOBAL_BOUND: f32 = E2M1_MAX * E4M3_MAX;

/// ModelOpt's E2M1 encoding of one f32 (4-bit code).
#[inline(always)]
pub fn e2m1_encode(x: f32) -> u8 {
    let a = x.abs();
    // searchsorted(bounds, a) with right=False counts the bounds b with !(b >= a); written as
    // a sum of comparisons so it vectorizes, and so NaN lands past every bound (code 7) as in torch.
    let mut ord = 0u8;
    #[allow(clippy::neg_cmp_op_on_partial_ord)] // the negation is the point: NaN must count
    for b in E2M1_BOUNDS {
        ord += (!(b >= a)) as u8;
    }
    // Ties at 0.75, 1.75 and 3.5 go up to the even code.
    let tie = ((a == 0.75) | (a == 1.75) | (a == 3.5)) as u8;
    (((x < 0.0) as u8) << 3) + ord + tie
}

/// Value of a 4-bit E2M1 code (code 8 is -0.0); the high nibble is ignored.
#[inline(always)]
pub fn e2m1_decode(code: u8) -> f32 {
    let mag = E2M1_VALUES[(code & 7) as usize];
    if code & 8 != 0 {
        -mag
    } else {
        mag
    }
}

/// `weight_scale_2` (and `input_scale`) from a calibrated maximum: `amax / (6 * 448)` in f32.
#[inline]
pub fn global_scale_from_amax(amax: f32) -> f32 {
    amax / GLOBAL_BOUND
}

/// `weight_scale_2` from the weight's own max |w| (the builders' rule): [`global_scale_from_amax`]
/// by [`crate::fp8::scale_for_weight_amax`] (1 for an all-zero weight, where ModelOpt would write
/// NaN block scales, 0/0; NaN/inf and scales that underflow refused).
pub fn global_scale_for_weight_amax(amax: f32, at: &str) -> Result<f32, String> {
    crate::fp8::scale_for_weight_amax(amax, at, "amax/2688", global_scale_from_amax)
}

/// e4m3 byte of one block's scale given its max |w| and the precomputed `6 * weight_scale_2`.
#[inline(always)]
fn block_scale_byte(block_amax: f32, six_wsf2: f32) -> u8 {
    let mut s = block_amax / six_wsf2;
    if s == 0.0 {
        s = 1.0;
    }
    // f32::clamp keeps NaN, as torch.clamp does; the cast then gives 0x7F.
    e4m3_from_f32(s.clamp(MIN_BLOCK_SCALE, E4M3_MAX))
}

/// max |v| over a block; NaN if any element is NaN (torch.amax propagates NaN). The max of the
/// sign-cleared bit patterns does both at once: NaN patterns sort above every number.
#[inline(always)]
pub(crate) fn block_amax(v: &[f32; BLOCK]) -> f32 {
    let mut m = 0u32;
    for x in v {
        m = m.max(x.to_bits() & 0x7fff_ffff);
    }
    f32::from_bits(m)
}

/// Quantize one block; returns its scale byte and writes 8 packed bytes.
#[inline(always)]
fn quantize_block(v: &[f32; BLOCK], six_wsf2: f32, wsf2: f32, packed: &mut [u8]) -> u8 {
    let sb = block_scale_byte(block_amax(v), six_wsf2);
    let divisor = e4m3_to_f32(sb) * wsf2;
    let mut codes = [0u8; BLOCK];
    for i in 0..BLOCK {
        codes[i] = e2m1_encode(v[i] / divisor);
    }
    let packed: &mut [u8; BLOCK / 2] = packed.try_into().unwrap();
    for j in 0..BLOCK / 2 {
        packed[j] = codes[2 * j] | (codes[2 * j + 1] << 4);
    }
    sb
}

fn check_shape(src: &[u8], dtype: Dtype, k: usize) -> usize {
    assert!(
        dtype.is_float_source(),
        "NVFP4 source must be BF16/F16/F32, got {dtype}"
    );
    assert!(
        k > 0 && k.is_multiple_of(BLOCK),
        "NVFP4 needs K divisible by {BLOCK}, got {k}"
    );
    let row_bytes = k * dtype.size();
    assert!(
        src.len().is_multiple_of(row_bytes),
        "source is not a whole number of rows"
    );
    src.len() / dtype.size()
}

#[inline(always)]
fn quantize_typed<E: Elem>(src: &[u8], wsf2: f32, packed: &mut [u8], scales: &mut [u8]) {
    let six_wsf2 = E2M1_MAX * wsf2;
    let mut v = [0f32; BLOCK];
    let blocks = src
        .chunks_exact(BLOCK * E::SIZE)
        .zip(packed.chunks_exact_mut(BLOCK / 2));
    for ((chunk, p), s) in blocks.zip(scales.iter_mut()) {
        E::load_block(chunk, &mut v);
        *s = quantize_block(&v, six_wsf2, wsf2, p);
    }
}

#[inline(always)]
fn scales_typed<E: Elem>(src: &[u8], wsf2: f32, scales: &mut [u8]) {
    let six_wsf2 = E2M1_MAX * wsf2;
    let mut v = [0f32; BLOCK];
    for (chunk, s) in src.chunks_exact(BLOCK * E::SIZE).zip(scales.iter_mut()) {
        E::load_block(chunk, &mut v);
        *s = block_scale_byte(block_amax(&v), six_wsf2);
    }
}

#[inline(always)]
fn codes_typed<E: Elem>(src: &[u8], wsf2: f32, packed: &mut [u8]) {
    let six_wsf2 = E2M1_MAX * wsf2;
    let mut v = [0f32; BLOCK];
    for (chunk, p) in src
        .chunks_exact(BLOCK * E::SIZE)
        .zip(packed.chunks_exact_mut(BLOCK / 2))
    {
        E::load_block(chunk, &mut v);
        quantize_block(&v, six_wsf2, wsf2, p);
    }
}

fn quantize_dispatch<E: Elem>(src: &[u8], wsf2: f32, packed: &mut [u8], scales: &mut [u8]) {
    with_avx2!(fn go[E: Elem](src: &[u8], wsf2: f32, packed: &mut [u8], scales: &mut [u8]) [E] -> ()
        => quantize_typed::<E>(src, wsf2, packed, scales))
}

fn scales_dispatch<E: Elem>(src: &[u8], wsf2: f32, scales: &mut [u8]) {
    with_avx2!(fn go[E: Elem](src: &[u8], wsf2: f32, scales: &mut [u8]) [E] -> ()
        => scales_typed::<E>(src, wsf2, scales))
}

fn codes_dispatch<E: Elem>(src: &[u8], wsf2: f32, packed: &mut [u8]) {
    with_avx2!(fn go[E: Elem](src: &[u8], wsf2: f32, packed: &mut [u8]) [E] -> ()
        => codes_typed::<E>(src, wsf2, packed))
}

/// Packed codes and block scales in one pass over rows of a `[rows, k]` float tensor.
/// `packed.len() == n/2`, `scales.len() == n/16` where `n` is the element count.
pub fn quantize(
    src: &[u8],
    dtype: Dtype,
    k: usize,
    weight_scale_2: f32,
    packed: &mut [u8],
    scales: &mut [u8],
) {
    let n = check_shape(src, dtype, k);
    assert_eq!(packed.len(), n / 2, "packed output length");
    assert_eq!(scales.len(), n / BLOCK, "scales output length");
    match dtype {
        Dtype::BF16 => quantize_dispatch::<Bf16>(src, weight_scale_2, packed, scales),
        Dtype::F16 => quantize_dispatch::<F16>(src, weight_scale_2, packed, scales),
        Dtype::F32 => quantize_dispatch::<F32>(src, weight_scale_2, packed, scales),
        _ => unreachable!(),
    }
}

/// Block scales (e4m3 bytes) for rows of a `[rows, k]` float tensor; `out.len() == rows*k/16`.
pub fn block_scales(src: &[u8], dtype: Dtype, k: usize, weight_scale_2: f32, out: &mut [u8]) {
    let n = check_shape(src, dtype, k);
    assert_eq!(out.len(), n / BLOCK, "scales output length");
    match dtype {
        Dtype::BF16 => scales_dispatch::<Bf16>(src, weight_scale_2, out),
        Dtype::F16 => scales_dispatch::<F16>(src, weight_scale_2, out),
        Dtype::F32 => scales_dispatch::<F32>(src, weight_scale_2, out),
        _ => unreachable!(),
    }
}

/// Packed E2M1 codes, `out.len() == rows*k/2`; low nibble = element 2j, high = 2j+1.
pub fn quantize_packed(src: &[u8], dtype: Dtype, k: usize, weight_scale_2: f32, out: &mut [u8]) {
    let n = check_shape(src, dtype, k);
    assert_eq!(out.len(), n / 2, "packed output length");
    match dtype {
        Dtype::BF16 => codes_dispatch::<Bf16>(src, weight_scale_2, out),
        Dtype::F16 => codes_dispatch::<F16>(src, weight_scale_2, out),
        Dtype::F32 => codes_dispatch::<F32>(src, weight_scale_2, out),
        _ => unreachable!(),
    }
}

/// `e2m1(q) * (f32(s_e4m3) * weight_scale_2)` as f32, the order ModelOpt's dequantize uses.
pub fn dequantize(packed: &[u8], scales: &[u8], k: usize, weight_scale_2: f32) -> Vec<f32> {
    let mut out = vec![0f32; packed.len() * 2];
    dequantize_into(packed, scales, k, weight_scale_2, &mut out);
    out
}

/// [`dequantize`] into a caller's buffer (`out.len() == packed.len() * 2`); any chunk of whole
/// blocks gives the same values as the whole tensor.
pub fn dequantize_into(
    packed: &[u8],
    scales: &[u8],
    k: usize,
    weight_scale_2: f32,
    out: &mut [f32],
) {
    assert!(
        k > 0 && k.is_multiple_of(BLOCK),
        "NVFP4 needs K divisible by {BLOCK}, got {k}"
    );
    assert_eq!(
        packed.len() * 2,
        scales.len() * BLOCK,
        "packed and scales disagree"
    );
    assert_eq!(out.len(), packed.len() * 2, "dequantize output length");
    for ((o, p), &s) in out
        .chunks_exact_mut(BLOCK)
        .zip(packed.chunks_exact(BLOCK / 2))
        .zip(scales)
    {
        let scale = e4m3_to_f32(s) * weight_scale_2;
        for j in 0..BLOCK / 2 {
            o[2 * j] = e2m1_decode(p[j] & 0xF) * scale;
            o[2 * j + 1] = e2m1_decode(p[j] >> 4) * scale;
        }
    }
}

/// Exchange the two nibbles of every byte.
pub fn swap_nibbles(src: &[u8], out: &mut [u8]) {
    assert_eq!(src.len(), out.len());
    for (o, &b) in out.iter_mut().zip(src) {
        *o = b.rotate_left(4);
    }
}

/// Re-express block scales relative to a new global scale: `s' = e4m3(min(f32(s) * factor, 448))`
/// (RNE). With `factor = gs_old / gs_new <= 1` the dequantized block is preserved up to one
/// e4m3 rounding. NaN bytes stay NaN (repair them first); results may underflow to 0.
pub fn rescale_block_scales(scales: &[u8], factor: f32, out: &mut [u8]) {
    assert_eq!(scales.len(), out.len());
    for (o, &s) in out.iter_mut().zip(scales) {
        *o = e4m3_from_f32((e4m3_to_f32(s) * factor).clamp(-E4M3_MAX, E4M3_MAX));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Straight transcription of ModelOpt's `_cast_fp4` for one value, for comparison.
    fn encode_reference(x: f32) -> u8 {
        let a = x.abs();
        let ord = E2M1_BOUNDS.iter().position(|&b| b >= a).unwrap_or(7) as u8;
        let tie = [0.75f32, 1.75, 3.5].contains(&a) as u8;
        ((x < 0.0) as u8) * 8 + ord + tie
    }

    /// Nearest E2M1 magnitude with ties to the even code (independent of the bounds table).
    fn nearest_even_code(a: f32) -> u8 {
        let a = a.min(6.0);
        let mut best = 0usize;
        for (i, &v) in E2M1_VALUES.iter().enumerate() {
            let d = (v - a).abs();
            let bd = (E2M1_VALUES[best] - a).abs();
            if d < bd || (d == bd && i % 2 == 0) {
                best = i;
            }
        }
        best as u8
    }

    #[test]
    fn e2m1_encode_dense_grid_and_every_bound() {
        // Every multiple of 2^-10 in [-8, 8] plus the neighbours of each bound and value.
        let mut xs: Vec<f32> = (-8192..=8192).map(|i| i as f32 / 1024.0).collect();
        for &b in E2M1_BOUNDS.iter().chain(E2M1_VALUES.iter()) {
            for v in [b, -b] {
                xs.extend([
                    v,
                    f32::from_bits(v.to_bits() + 1),
                    f32::from_bits(v.to_bits().wrapping_sub(1)),
                ]);
            }
        }
        xs.extend([
            0.0,
            -0.0,
            f32::MIN_POSITIVE,
            -f32::MIN_POSITIVE,
            1e30,
            -1e30,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ]);
        for x in xs {
            let c = e2m1_encode(x);
            assert_eq!(c, encode_reference(x), "x = {x}");
            // Independent check: round to nearest, ties to even, saturate, sign only for x < 0.
            if x.is_finite() {
                assert_eq!(c & 7, nearest_even_code(x.abs()), "magnitude of x = {x}");
                assert_eq!(c & 8 != 0, x < 0.0, "sign of x = {x}");
            }
        }
        // Ties explicitly.
        for (x, c) in [
            (0.25f32, 0u8),
            (0.75, 2),
            (1.25, 2),
            (1.75, 4),
            (2.5, 4),
            (3.5, 6),
            (5.0, 6),
            (-5.0, 14),
            (-0.0, 0),
        ] {
            assert_eq!(e2m1_encode(x), c, "tie {x}");
        }
        // NaN of either sign lands past every bound, without the sign bit.
        assert_eq!(e2m1_encode(f32::NAN), 7);
        assert_eq!(e2m1_encode(-f32::NAN), 7);
        assert_eq!(e2m1_encode(f32::INFINITY), 7);
        assert_eq!(e2m1_encode(f32::NEG_INFINITY), 15);
    }

    #[test]
    fn e2m1_decode_table() {
        for c in 0..16u8 {
            let v = e2m1_decode(c);
            assert_eq!(v.abs(), E2M1_VALUES[(c & 7) as usize]);
            assert_eq!(v.is_sign_negative(), c >= 8);
            if c != 8 {
                assert_eq!(e2m1_encode(v), c, "code {c} round trip");
            }
        }
        assert_eq!(e2m1_decode(8).to_bits(), (-0.0f32).to_bits());
    }

    #[test]
    fn swap_is_an_involution() {
        let src: Vec<u8> = (0..=255).collect();
        let mut once = vec![0u8; 256];
        let mut twice = vec![0u8; 256];
        swap_nibbles(&src, &mut once);
        swap_nibbles(&once, &mut twice);
        assert_eq!(src, twice);
        assert_eq!(once[0x12], 0x21);
        assert_eq!(once[0xF0], 0x0F);
    }

    #[test]
    fn nan_repair() {
        let mut b: Vec<u8> = (0..=255).collect();
        assert_eq!(count_nan_e4m3(&b), 2);
        assert_eq!(repair_nan_e4m3(&mut b), 2);
        assert_eq!(b[0x7F], 0x7E);
        assert_eq!(b[0xFF], 0x7E);
        assert_eq!(count_nan_e4m3(&b), 0);
        for (i, &v) in b.iter().enumerate() {
            if i != 0x7F && i != 0xFF {
                assert_eq!(v, i as u8);
            }
        }
    }

    #[test]
    fn rescale_bounds_and_identity() {
        let src: Vec<u8> = (0..0x7Fu8).collect(); // every finite non-negative e4m3
        let mut out = vec![0u8; src.len()];
        rescale_block_scales(&src, 1.0, &mut out);
        assert_eq!(src, out);
        for factor in [0.3f32, 0.5, 0.999, 1.0 / 3.0, 2.0, 1000.0] {
            rescale_block_scales(&src, factor, &mut out);
            for (&s, &o) in src.iter().zip(&out) {
                let want = e4m3_to_f32(s) * factor;
                let got = e4m3_to_f32(o);
                assert!(got <= 448.0 && !got.is_nan(), "factor {factor} byte {s:#x}");
                if factor <= 1.0 {
                    assert!(got <= e4m3_to_f32(s));
                    // RNE: no other e4m3 value is closer than the result.
                    for c in 0..0x7Fu8 {
                        assert!((e4m3_to_f32(c) - want).abs() >= (got - want).abs());
                    }
                }
            }
        }
        // Saturation at 448 rather than NaN.
        rescale_block_scales(&[0x7E], 1.5, &mut out[..1]);
        assert_eq!(out[0], 0x7E);
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|f| f.to_le_bytes()).collect()
    }

    #[test]
    fn quantize_matches_definition_and_is_chunk_invariant() {
        // Deterministic pseudo-random rows with a wide dynamic range.
        let (rows, k) = (8usize, 64usize);
        let mut state = 12345u64;
        let vals: Vec<f32> = (0..rows * k)
            .map(|i| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = ((state >> 40) as f32) / (1u64 << 24) as f32 - 0.5;
                if i % 97 == 0 {
                    0.0
                } else {
                    u * 2f32.powi((i % 13) as i32 - 6)
                }
            })
            .collect();
        let src = f32_bytes(&vals);
        let amax = vals.iter().fold(0f32, |m, v| m.max(v.abs()));
        let gs = global_scale_from_amax(amax);
        let mut packed = vec![0u8; rows * k / 2];
        let mut scales = vec![0u8; rows * k / 16];
        quantize(&src, Dtype::F32, k, gs, &mut packed, &mut scales);
        // Separate entry points agree with the fused one.
        let mut p2 = vec![0u8; packed.len()];
        let mut s2 = vec![0u8; scales.len()];
        quantize_packed(&src, Dtype::F32, k, gs, &mut p2);
        block_scales(&src, Dtype::F32, k, gs, &mut s2);
        assert_eq!(packed, p2);
        assert_eq!(scales, s2);
        // Row chunks give the same bytes.
        for r in 0..rows {
            let mut p = vec![0u8; k / 2];
            quantize_packed(&src[r * k * 4..(r + 1) * k * 4], Dtype::F32, k, gs, &mut p);
            assert_eq!(p, packed[r * k / 2..(r + 1) * k / 2]);
        }
        // Per-element definition, written out directly.
        for (b, block) in vals.chunks(16).enumerate() {
            let bmax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let mut s = bmax / (6.0 * gs);
            if s == 0.0 {
                s = 1.0;
            }
            let sb = e4m3_from_f32(s.clamp(1.0 / 512.0, 448.0));
            assert_eq!(scales[b], sb);
            for (i, &w) in block.iter().enumerate() {
                let code = encode_reference(w / (e4m3_to_f32(sb) * gs));
                let byte = packed[b * 8 + i / 2];
                assert_eq!(if i % 2 == 0 { byte & 0xF } else { byte >> 4 }, code);
            }
        }
        // Dequantized values stay within half an E2M1 step (relative to the block scale) of the input.
        let deq = dequantize(&packed, &scales, k, gs);
        for (b, block) in vals.chunks(16).enumerate() {
            let scale = e4m3_to_f32(scales[b]) * gs;
            for (i, &w) in block.iter().enumerate() {
                assert!(
                    (deq[b * 16 + i] - w).abs() <= scale * 1.0 + 1e-30,
                    "block {b} elem {i}"
                );
            }
        }
    }

    #[test]
    fn zero_block_gets_unit_scale_and_nan_propagates() {
        let mut vals = vec![0f32; 32];
        vals[16] = f32::NAN;
        vals[17] = 1.0;
        let src = f32_bytes(&vals);
        let mut packed = vec![0u8; 16];
        let mut scales = vec![0u8; 2];
        quantize(&src, Dtype::F32, 32, 0.01, &mut packed, &mut scales);
        assert_eq!(scales[0], e4m3_from_f32(1.0));
        assert_eq!(packed[..8], [0u8; 8]);
        assert_eq!(scales[1], 0x7F);
        assert_eq!(packed[8..], [0x77u8; 8]);
    }

    #[test]
    fn bf16_and_f16_inputs_match_their_f32_upcast() {
        let vals: Vec<f32> = (0..256)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013)
            .collect();
        let bf: Vec<u8> = vals
            .iter()
            .flat_map(|&f| half::bf16::from_f32(f).to_bits().to_le_bytes())
            .collect();
        let hf: Vec<u8> = vals
            .iter()
            .flat_map(|&f| half::f16::from_f32(f).to_bits().to_le_bytes())
            .collect();
        let bf_up: Vec<f32> = vals
            .iter()
            .map(|&f| half::bf16::from_f32(f).to_f32())
            .collect();
        let hf_up: Vec<f32> = vals
            .iter()
            .map(|&f| half::f16::from_f32(f).to_f32())
            .collect();
        for (src, dt, up) in [(bf, Dtype::BF16, bf_up), (hf, Dtype::F16, hf_up)] {
            let gs = 0.0007;
            let mut a = vec![0u8; 128];
            let mut b = vec![0u8; 128];
            let mut sa = vec![0u8; 16];
            let mut sb = vec![0u8; 16];
            quantize(&src, dt, 64, gs, &mut a, &mut sa);
            quantize(&f32_bytes(&up), Dtype::F32, 64, gs, &mut b, &mut sb);
            assert_eq!(a, b);
            assert_eq!(sa, sb);
        }
    }
}
