//! Source elements (BF16, F16, F32) read as f32, shared by every format's kernels: one element
//! ([`Elem::load`]), a block of 16 ([`Elem::load_block`], NVFP4's group; MXFP8 loads its 32 as
//! two), and the source dtype's own rounding ([`Elem::round_native`], FP8's `source_dtype`).

use half::{bf16, f16};

use crate::dtype::Dtype;

/// Elements per [`Elem::load_block`].
pub const BLOCK: usize = 16;

/// A float source element type.
pub(crate) trait Elem {
    const SIZE: usize;
    /// One element (`b` holds exactly [`Elem::SIZE`] bytes).
    fn load(b: &[u8]) -> f32;
    /// `f` rounded to this dtype (as torch computes in the weight's own dtype).
    fn round_native(f: f32) -> f32;
    /// [`BLOCK`] elements (`b` holds exactly `BLOCK * SIZE` bytes).
    fn load_block(b: &[u8], out: &mut [f32; BLOCK]);
}
pub(crate) struct Bf16;
pub(crate) struct F16;
pub(crate) struct F32;
impl Elem for Bf16 {
    const SIZE: usize = 2;
    #[inline(always)]
    fn load(b: &[u8]) -> f32 {
        f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16)
    }
    #[inline(always)]
    fn round_native(f: f32) -> f32 {
        round_to_bf16(f)
    }
    #[inline(always)]
    fn load_block(b: &[u8], out: &mut [f32; BLOCK]) {
        let b: &[u8; 2 * BLOCK] = b.try_into().unwrap();
        for i in 0..BLOCK {
            out[i] = f32::from_bits((u16::from_le_bytes([b[2 * i], b[2 * i + 1]]) as u32) << 16);
        }
    }
}
impl Elem for F16 {
    const SIZE: usize = 2;
    #[inline(always)]
    fn load(b: &[u8]) -> f32 {
        f16_bits_to_f32(u16::from_le_bytes([b[0], b[1]]))
    }
    #[inline(always)]
    fn round_native(f: f32) -> f32 {
        round_to_f16(f)
    }
    #[inline(always)]
    fn load_block(b: &[u8], out: &mut [f32; BLOCK]) {
        let b: &[u8; 2 * BLOCK] = b.try_into().unwrap();
        for i in 0..BLOCK {
            out[i] = f16_bits_to_f32(u16::from_le_bytes([b[2 * i], b[2 * i + 1]]));
        }
    }
}
impl Elem for F32 {
    const SIZE: usize = 4;
    #[inline(always)]
    fn load(b: &[u8]) -> f32 {
        f32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
    #[inline(always)]
    fn round_native(f: f32) -> f32 {
        f
    }
    #[inline(always)]
    fn load_block(b: &[u8], out: &mut [f32; BLOCK]) {
        let b: &[u8; 4 * BLOCK] = b.try_into().unwrap();
        for i in 0..BLOCK {
            out[i] = f32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]);
        }
    }
}

/// Exact f16 -> f32 without branches (vectorizes, unlike a per-call feature check): placing the
/// exponent+mantissa bits 13 higher and multiplying by 2^112 rebiases normals and subnormals alike;
/// Inf/NaN get the all-ones exponent.
#[inline(always)]
pub(crate) fn f16_bits_to_f32(h: u16) -> f32 {
    let h = h as u32;
    let sign = (h & 0x8000) << 16;
    let em = (h & 0x7fff) << 13;
    let finite = (f32::from_bits(em) * f32::from_bits(0x7780_0000)).to_bits();
    let special = em | 0x7f80_0000;
    f32::from_bits(sign | if em >= 0x7c00 << 13 { special } else { finite })
}

/// PyTorch's scalar float → bfloat16 rounding (RNE; NaN becomes the canonical 0x7FC0).
#[inline(always)]
pub fn round_to_bf16(f: f32) -> f32 {
    if f.is_nan() {
        return f32::from_bits(0x7FC0_0000);
    }
    let b = f.to_bits();
    let r = b.wrapping_add(0x7FFF + ((b >> 16) & 1));
    f32::from_bits(r & 0xFFFF_0000)
}

#[inline(always)]
pub fn round_to_f16(f: f32) -> f32 {
    f16::from_f32(f).to_f32()
}

/// Read element `i` of a little-endian float buffer as f32.
#[inline(always)]
pub fn load_f32(src: &[u8], dtype: Dtype, i: usize) -> f32 {
    match dtype {
        Dtype::BF16 => bf16::from_bits(u16::from_le_bytes([src[2 * i], src[2 * i + 1]])).to_f32(),
        Dtype::F16 => f16::from_bits(u16::from_le_bytes([src[2 * i], src[2 * i + 1]])).to_f32(),
        Dtype::F32 => f32::from_le_bytes(src[4 * i..4 * i + 4].try_into().unwrap()),
        _ => unreachable!("load_f32 on non-float dtype {dtype}"),
    }
}

/// Decode a whole float buffer to f32 (for verification and small tensors).
pub fn to_f32_vec(src: &[u8], dtype: Dtype) -> Vec<f32> {
    let n = src.len() / dtype.size();
    (0..n).map(|i| load_f32(src, dtype, i)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The branch-free f16 loader equals `half`'s conversion on every f16 bit pattern (NaN: a NaN
    /// of the same sign; `half` also sets the quiet bit, which no format here looks at).
    #[test]
    fn f16_loader_is_exact_for_every_pattern() {
        for h in 0..=u16::MAX {
            let (a, b) = (f16_bits_to_f32(h), f16::from_bits(h).to_f32());
            if b.is_nan() {
                assert!(
                    a.is_nan() && a.is_sign_negative() == b.is_sign_negative(),
                    "{h:#06x}"
                );
            } else {
                assert_eq!(a.to_bits(), b.to_bits(), "{h:#06x}");
            }
            let bytes = h.to_le_bytes();
            assert_eq!(F16::load(&bytes).to_bits(), a.to_bits());
            // BF16 is the top half of an f32, payload and all.
            assert_eq!(Bf16::load(&bytes).to_bits(), (h as u32) << 16);
        }
    }
}
