//! The `block_values` / `block_scales` plan ops with format `mxfp8`: the engine writes exactly the bytes of
//! `mxfp8::quantize` on the same data, across batch (16 MiB) and piece (1 MiB) boundaries; a
//! non-finite weight is refused naming the tensor and its row; bad shapes and dtypes are refused
//! before anything is written; every output re-parses with the strict reader.

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

use dqfast_core::checkpoint::Checkpoint;
use dqfast_core::dtype::Dtype;
use dqfast_core::mxfp8;
use dqfast_core::plan::execute_json;
use serde_json::{json, Value};

mod common;
use common::{err_of, plan_of, src, write_file, Bf16Rng};

/// Rows x K of the large weight: 8200 x 4096 BF16 (67 MB) gives 33.6 MB of values (three 16 MiB
/// batches) and 1.05 MB of scales (two 1 MiB pieces), so both ops cross a boundary.
const N: usize = 8200;
const K: usize = 4096;

/// `n` pseudo-random finite BF16 values over a wide range of magnitudes (2^-31 .. 2^16).
fn bf16_data(n: usize, state: u64) -> Vec<u8> {
    Bf16Rng {
        state,
        exp_min: 0x60,
        exps: 48,
    }
    .data(n)
}

fn plan(source: &Path, out: &Path, tensors: Value) -> String {
    plan_of(source, out, tensors).to_string()
}

fn mx_ops(name: &str, t: &str, scales_first: bool) -> Value {
    let w = json!({"name": format!("{name}.weight"), "op": "block_values", "format": "mxfp8", "src": src(t)});
    let s = json!({"name": format!("{name}.weight_scale"), "op": "block_scales", "format": "mxfp8", "src": src(t)});
    if scales_first {
        json!([s, w])
    } else {
        json!([w, s])
    }
}

#[test]
fn plan_output_equals_the_kernel_across_batches_and_refuses_a_nan_naming_tensor_and_row() {
    let d = tempfile::tempdir().unwrap();
    let s = d.path().join("src.safetensors");
    let big = bf16_data(N * K, 0x9E37_79B9_7F4A_7C15);
    // An F32 weight too (different source element size), small.
    let small: Vec<u8> = bf16_data(7 * 64, 7)
        .chunks(2)
        .flat_map(|b| ((u16::from_le_bytes([b[0], b[1]]) as u32) << 16).to_le_bytes())
        .collect();
    let offs = write_file(
        &s,
        &[
            ("w", Dtype::BF16, vec![N, K], Some(big.clone())),
            ("f", Dtype::F32, vec![7, 64], Some(small.clone())),
        ],
    );
    let out = d.path().join("out");
    let mut tensors = mx_ops("w", "w", false).as_array().unwrap().clone();
    tensors.extend(mx_ops("f", "f", true).as_array().unwrap().iter().cloned());
    let report = execute_json(&plan(&s, &out, Value::Array(tensors))).unwrap();
    // The source is counted once per weight, not once per op.
    assert_eq!(report.bytes_read, (big.len() + small.len()) as u64);

    let ck = Checkpoint::open(&out).expect("strict reader accepts the output");
    assert_eq!(ck.names.len(), 4);
    for (name, data, dtype, rows, k) in [
        ("w", &big, Dtype::BF16, N, K),
        ("f", &small, Dtype::F32, 7, 64),
    ] {
        let (mut values, mut scales) = (vec![0u8; rows * k], vec![0u8; rows * k / 32]);
        mxfp8::quantize(data, dtype, k, &mut values, &mut scales).unwrap();
        let (f, t) = ck.require(&format!("{name}.weight")).unwrap();
        assert_eq!((t.dtype, t.shape.clone()), (Dtype::F8_E4M3, vec![rows, k]));
        assert!(f.data(t) == values.as_slice(), "{name}.weight differs");
        let (f, t) = ck.require(&format!("{name}.weight_scale")).unwrap();
        assert_eq!((t.dtype, t.shape.clone()), (Dtype::U8, vec![rows, k / 32]));
        assert!(
            f.data(t) == scales.as_slice(),
            "{name}.weight_scale differs"
        );
    }

    // NaN in the last row (in the third values batch and the second scales piece), an inf later
    // in the same row: the error names the tensor, the row from the tensor's start and the NaN.
    let (row, col) = (N - 1, 5);
    let mut f = std::fs::OpenOptions::new().write(true).open(&s).unwrap();
    for (c, bits) in [(col, 0x7FC0u16), (col + 100, 0x7F80)] {
        f.seek(SeekFrom::Start(offs[0] + ((row * K + c) * 2) as u64))
            .unwrap();
        f.write_all(&bits.to_le_bytes()).unwrap();
    }
    drop(f);
    for scales_first in [false, true] {
        let bad_out = d.path().join(format!("bad{scales_first}"));
        let e = execute_json(&plan(&s, &bad_out, mx_ops("w", "w", scales_first)))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("tensor 'w'") && e.contains(&format!("row {row}, column {col}")),
            "{e}"
        );
        assert!(e.contains("NaN"), "{e}");
        assert!(!bad_out.exists(), "nothing at the output after a failure");
    }
}

#[test]
fn bad_shapes_and_dtypes_are_refused_before_writing_naming_the_tensor() {
    let d = tempfile::tempdir().unwrap();
    let s = d.path().join("src.safetensors");
    write_file(
        &s,
        &[
            ("k48", Dtype::BF16, vec![2, 48], None),
            ("flat", Dtype::BF16, vec![64], None),
            ("cube", Dtype::BF16, vec![1, 2, 32], None),
            ("e4m3", Dtype::F8_E4M3, vec![2, 32], None),
        ],
    );
    for (t, op, format, want) in [
        (
            "k48",
            "block_values",
            "mxfp8",
            "multiple of 32, found [2, 48]",
        ),
        ("flat", "block_scales", "mxfp8", "2-D weight"),
        ("cube", "block_values", "mxfp8", "2-D weight"),
        ("e4m3", "block_scales", "mxfp8", "cannot be quantized"),
        (
            "k48",
            "block_values",
            "mxfp9",
            "unknown block format 'mxfp9' (known: mxfp8)",
        ),
        ("k48", "block_scales", "", "unknown block format ''"),
    ] {
        let out = d.path().join("out");
        let e = err_of(&plan_of(
            &s,
            &out,
            json!([{"name": "x", "op": op, "format": format, "src": src(t)}]),
        ));
        assert!(
            e.contains(&format!("tensor '{t}'")) && e.contains(want),
            "{e}"
        );
        assert!(!out.exists());
    }
}

#[test]
fn zero_size_weights_give_empty_readable_tensors() {
    let d = tempfile::tempdir().unwrap();
    let s = d.path().join("src.safetensors");
    write_file(
        &s,
        &[
            ("n0", Dtype::BF16, vec![0, 64], Some(vec![])),
            ("k0", Dtype::F16, vec![3, 0], Some(vec![])),
        ],
    );
    let out = d.path().join("out");
    let mut tensors = mx_ops("n0", "n0", false).as_array().unwrap().clone();
    tensors.extend(
        mx_ops("k0", "k0", false)
            .as_array()
            .unwrap()
            .iter()
            .cloned(),
    );
    execute_json(&plan(&s, &out, Value::Array(tensors))).unwrap();
    let ck = Checkpoint::open(&out).unwrap();
    for (n, shape) in [
        ("n0.weight", vec![0, 64]),
        ("n0.weight_scale", vec![0, 2]),
        ("k0.weight", vec![3, 0]),
        ("k0.weight_scale", vec![3, 0]),
    ] {
        let (_, t) = ck.require(n).unwrap();
        assert_eq!((t.shape.clone(), t.nbytes()), (shape, 0), "{n}");
    }
}
