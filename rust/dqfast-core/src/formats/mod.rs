//! The weight formats: the byte-level kernels, pure functions over slices (no I/O), each bit-exact
//! with the reference it names. `e4m3` is the byte format they share, `load` the source-element
//! loaders; every kernel that vectorizes is compiled twice through [`with_avx2!`] (the one SIMD
//! dispatch style: AVX2 when the CPU has it, baseline otherwise; same results, only speed differs).
//!
//! A weight-only block format (values plus one scale per block along K, both computed from the
//! weight alone) is one file here exporting a [`BlockFormat`], listed in [`BLOCK_FORMATS`]: the
//! plan's `block_values` / `block_scales` ops and the Python side (`_core.BLOCK_FORMATS`,
//! `dqfast.formats`, `dqfast.weight_only`) take everything else from that entry.

pub mod e4m3;
pub mod fp8;
pub(crate) mod load;
pub mod mxfp8;
pub mod nvfp4;

use crate::dtype::Dtype;

/// Why a block-format kernel refused a buffer; the caller adds the file and tensor name (and
/// re-bases [`BlockError::NonFinite`]'s row, counted from the buffer's start, to the tensor's).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BlockError {
    /// The first non-finite element in row-major order.
    #[error("value {value} at row {row}, column {col}; refusing to quantize a non-finite weight")]
    NonFinite { row: usize, col: usize, value: f32 },
    /// A bad dtype, K or buffer length (the kernel's own message).
    #[error("{0}")]
    Invalid(String),
}

/// A block kernel: rows of a `[rows, k]` BF16/F16/F32 buffer (`src`, `dtype`, `k`) into `out`.
pub type BlockKernel = fn(&[u8], Dtype, usize, &mut [u8]) -> Result<(), BlockError>;

/// Values and scales of rows of a `[rows, k]` weight back to f32 (verification, tests).
pub type BlockDequantize = fn(&[u8], &[u8], usize) -> Result<Vec<f32>, BlockError>;

/// A weight-only block format: a float weight `[N, K]` is stored as values `[N, K /
/// elements_per_byte]` and one scale per `block` elements along K, `[N, K / block]`, each row
/// independent of the others (so the engine may quantize any run of whole rows).
#[derive(Debug)]
pub struct BlockFormat {
    /// Its name in the plan (`"format"`) and in `dqfast.formats`.
    pub name: &'static str,
    /// As messages print it.
    pub label: &'static str,
    /// Elements per scale along K.
    pub block: usize,
    /// Elements per stored values byte (2 for a packed 4-bit format).
    pub elements_per_byte: usize,
    pub values_dtype: Dtype,
    pub scales_dtype: Dtype,
    /// The values of rows of a float weight (`out`: `rows * k / elements_per_byte` bytes).
    pub values: BlockKernel,
    /// The scales of rows of a float weight (`out`: `rows * k / block` bytes).
    pub scales: BlockKernel,
    /// The reference dequantization (what the engine it targets computes before its cast).
    pub dequantize: BlockDequantize,
}

/// Every weight-only block format the engine writes.
pub const BLOCK_FORMATS: &[&BlockFormat] = &[&mxfp8::FORMAT];

/// The block format named `name`.
pub fn block_format(name: &str) -> Option<&'static BlockFormat> {
    BLOCK_FORMATS.iter().copied().find(|f| f.name == name)
}

/// Runs `$body` (a call of `inline(always)` generic loops) compiled for AVX2 when the CPU has it,
/// else as is: `with_avx2!(fn name[<generic params>](args) [<generic args>] => body)`. The loops
/// are re-vectorized 8 lanes wide; IEEE arithmetic gives the same results either way.
macro_rules! with_avx2 {
    (fn $name:ident [$($gdef:tt)*] ($($arg:ident : $ty:ty),*) [$($garg:tt)*] -> $ret:ty => $body:expr) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx2")]
            unsafe fn $name<$($gdef)*>($($arg: $ty),*) -> $ret {
                $body
            }
            if std::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU supports AVX2 (checked just above).
                return unsafe { $name::<$($garg)*>($($arg),*) };
            }
        }
        $body
    }};
}
pub(crate) use with_avx2;

#[cfg(test)]
mod tests {
    use super::*;

    /// Every registered format has a unique name, whole bytes per block, and kernels that agree with
    /// the shapes its entry declares (the engine sizes outputs from the entry alone).
    #[test]
    fn block_formats_are_consistent_with_their_kernels() {
        let mut names: Vec<_> = BLOCK_FORMATS.iter().map(|f| f.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), BLOCK_FORMATS.len());
        for f in BLOCK_FORMATS {
            assert!(
                f.block > 0 && f.block.is_multiple_of(f.elements_per_byte),
                "{}",
                f.name
            );
            let (rows, k) = (3, 2 * f.block);
            let src: Vec<u8> = (0..rows * k)
                .flat_map(|i| (i as f32 * 0.37 - 20.0).to_le_bytes())
                .collect();
            let mut values = vec![0u8; rows * k / f.elements_per_byte];
            let mut scales = vec![0u8; rows * k / f.block];
            (f.values)(&src, Dtype::F32, k, &mut values).unwrap();
            (f.scales)(&src, Dtype::F32, k, &mut scales).unwrap();
            // A wrong output length is the kernel's error, not a silent partial write.
            let mut short = vec![0u8; values.len() - 1];
            assert!(matches!(
                (f.values)(&src, Dtype::F32, k, &mut short),
                Err(BlockError::Invalid(_))
            ));
            // The format's dequantization inverts its quantization within one e4m3-like step.
            let back = (f.dequantize)(&values, &scales, k).unwrap();
            assert_eq!(back.len(), rows * k);
            for (i, (b, x)) in back.iter().zip(src.chunks_exact(4)).enumerate() {
                let x = f32::from_le_bytes([x[0], x[1], x[2], x[3]]);
                assert!(
                    (b - x).abs() <= 0.0625 * x.abs() + 1e-6,
                    "{} element {i}: {b} vs {x}",
                    f.name
                );
            }
            let mut bad = src.clone();
            bad[4 * (k + 1)..4 * (k + 2)].copy_from_slice(&f32::NAN.to_le_bytes());
            assert!(matches!(
                (f.scales)(&bad, Dtype::F32, k, &mut scales),
                Err(BlockError::NonFinite { row: 1, col: 1, .. })
            ));
        }
        assert_eq!(block_format("mxfp8").map(|f| f.block), Some(mxfp8::BLOCK));
        assert!(block_format("nvfp4").is_none());
    }
}
