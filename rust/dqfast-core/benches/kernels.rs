//! Inner-kernel throughput, single thread, page-cache-resident data (GB/s of input).
//! `cargo bench -p dqfast-core --bench kernels`; results recorded in docs/performance.md.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dqfast_core::dtype::Dtype;
use dqfast_core::fp8::{self, E4m3Lut, Rounding, Saturation};
use dqfast_core::nvfp4;

/// Deterministic BF16 weights ~ N(0, 0.02) without a RNG dependency.
fn bf16_weights(n: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut out = Vec::with_capacity(2 * n);
    for _ in 0..n {
        let mut s = 0.0f32;
        for _ in 0..4 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            s += (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
        }
        let v = s * 0.035;
        out.extend_from_slice(&((v.to_bits().wrapping_add(0x8000)) >> 16).to_le_bytes()[..2]);
    }
    out
}

fn kernels(c: &mut Criterion) {
    let (rows, k) = (1024usize, 5120usize);
    let n = rows * k;
    let src = bf16_weights(n);
    let mut out = vec![0u8; n];
    let scale = 0.1f32 / 448.0;
    let mut g = c.benchmark_group("kernels");
    g.throughput(Throughput::Bytes(src.len() as u64));
    g.sample_size(20);
    for (name, rounding) in [
        ("exact", Rounding::Exact),
        ("modelopt", Rounding::SourceDtype),
    ] {
        g.bench_function(BenchmarkId::new("bf16_to_e4m3_direct", name), |b| {
            // per-row scales force the arithmetic path
            let scales = vec![scale; rows];
            b.iter(|| {
                fp8::quantize_e4m3(
                    &src,
                    Dtype::BF16,
                    &scales,
                    k,
                    0,
                    rounding,
                    Saturation::Clamp,
                    &mut out,
                )
            })
        });
        g.bench_function(BenchmarkId::new("bf16_to_e4m3_lut", name), |b| {
            b.iter(|| {
                let lut = E4m3Lut::new(Dtype::BF16, scale, rounding, Saturation::Clamp);
                lut.apply(&src, &mut out)
            })
        });
    }
    g.bench_function("amax_bf16", |b| b.iter(|| fp8::amax(&src, Dtype::BF16)));
    let gs = nvfp4::global_scale_from_amax(fp8::amax(&src, Dtype::BF16));
    let mut packed = vec![0u8; n / 2];
    let mut scales = vec![0u8; n / 16];
    g.bench_function("nvfp4_quantize_bf16", |b| {
        b.iter(|| nvfp4::quantize(&src, Dtype::BF16, k, gs, &mut packed, &mut scales))
    });
    g.bench_function("nvfp4_block_scales_bf16", |b| {
        b.iter(|| nvfp4::block_scales(&src, Dtype::BF16, k, gs, &mut scales))
    });
    g.throughput(Throughput::Bytes(packed.len() as u64));
    let mut swapped = vec![0u8; n / 2];
    g.bench_function("swap_nibbles", |b| {
        b.iter(|| nvfp4::swap_nibbles(&packed, &mut swapped))
    });
    g.finish();
}

criterion_group!(benches, kernels);
criterion_main!(benches);
