//! The weight formats: the byte-level kernels, pure functions over slices (no I/O), each bit-exact
//! with the reference it names. `e4m3` is the byte format they share, `load` the source-element
//! loaders; every kernel that vectorizes is compiled twice through [`with_avx2!`] (the one SIMD
//! dispatch style: AVX2 when the CPU has it, baseline otherwise; same results, only speed differs).

pub mod e4m3;
pub mod fp8;
pub(crate) mod load;
pub mod mxfp8;
pub mod nvfp4;

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
