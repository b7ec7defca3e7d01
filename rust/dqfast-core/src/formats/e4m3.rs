//! float8_e4m3fn, the byte format FP8, NVFP4 block scales and MXFP8 share: its range, the
//! f32 -> e4m3 cast (PyTorch's), the decode table, and the NaN bytes (0x7F/0xFF) that are refused
//! or repaired.

/// Largest finite e4m3 value.
pub const E4M3_MAX: f32 = 448.0;
/// Byte of +448.
pub const E4M3_MAX_BYTE: u8 = 0x7E;

const FP8_NAN_THRESHOLD: u32 = 1087 << 20; // 480.0f32
const DENORM_MAGIC: u32 = 141 << 23; // 2^14: adding it aligns the subnormal grid to bit 0
const MIN_NORMAL_BITS: u32 = 121 << 23; // 2^-6
const NORMAL_REBIAS: u32 = ((7i32 - 127) << 23) as u32;

/// PyTorch's float → float8_e4m3fn cast, written without branches so loops vectorize.
#[inline(always)]
pub fn e4m3_from_f32(f: f32) -> u8 {
    let bits = f.to_bits();
    let sign = ((bits >> 24) & 0x80) as u8;
    let abs = bits & 0x7fff_ffff;
    let sub = (f32::from_bits(abs) + f32::from_bits(DENORM_MAGIC))
        .to_bits()
        .wrapping_sub(DENORM_MAGIC) as u8;
    let mant_odd = (abs >> 20) & 1;
    let norm = (abs
        .wrapping_add(NORMAL_REBIAS)
        .wrapping_add(0x7FFFF)
        .wrapping_add(mant_odd)
        >> 20) as u8;
    let r = if abs >= FP8_NAN_THRESHOLD {
        0x7f
    } else if abs < MIN_NORMAL_BITS {
        sub
    } else {
        norm
    };
    r | sign
}

/// f32 bit pattern of an e4m3 byte, built from the format's definition (normals
/// `(1 + m/8)·2^(e-7)`, subnormals `m·2^-9`, 0x7F/0xFF NaN).
const fn e4m3_bits(b: u8) -> u32 {
    let sign = ((b as u32) & 0x80) << 24;
    let e = ((b >> 3) & 0xF) as u32;
    let m = (b & 0x7) as u32;
    if b & 0x7f == 0x7f {
        return sign | 0x7fc0_0000;
    }
    if e != 0 {
        return sign | ((e + 120) << 23) | (m << 20);
    }
    if m == 0 {
        return sign;
    }
    // Subnormal: normalize m·2^-9 (m in 1..=7): p = index of m's top bit.
    let p = if m >= 4 {
        2
    } else if m >= 2 {
        1
    } else {
        0
    };
    sign | ((p + 118) << 23) | ((m - (1 << p)) << (23 - p))
}

const fn e4m3_table() -> [f32; 256] {
    let mut t = [0f32; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = f32::from_bits(e4m3_bits(i as u8));
        i += 1;
    }
    t
}

/// Every e4m3 byte's value: decoding is one load (it sits in NVFP4's per-block inner loop).
static E4M3_TO_F32: [f32; 256] = e4m3_table();

/// float8_e4m3fn → f32 (exact).
#[inline(always)]
pub fn e4m3_to_f32(b: u8) -> f32 {
    E4M3_TO_F32[b as usize]
}

/// Whether an e4m3 byte is one of the two NaN codes.
#[inline]
pub fn e4m3_is_nan(b: u8) -> bool {
    b & 0x7f == 0x7f
}

/// Number of e4m3 NaN bytes (0x7F, 0xFF). Counted in u32 lanes over fixed chunks so the loop
/// vectorizes (a byte compare and add per element).
pub fn count_nan_e4m3(bytes: &[u8]) -> usize {
    bytes
        .chunks(1 << 16)
        .map(|c| c.iter().map(|&b| ((b & 0x7F) == 0x7F) as u32).sum::<u32>() as usize)
        .sum()
}

/// Replace every e4m3 NaN byte by +448 (0x7E), as vLLM-Omni does at load; returns how many.
pub fn repair_nan_e4m3(bytes: &mut [u8]) -> usize {
    let mut n = 0;
    for b in bytes.iter_mut() {
        let nan = (*b & 0x7F) == 0x7F;
        n += nan as usize;
        *b = if nan { E4M3_MAX_BYTE } else { *b };
    }
    n
}
