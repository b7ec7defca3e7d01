//! Hostile inputs to the engine (issue 11): zero-dimension tensors through every op, scales that
//! underflow, NaN e4m3 bytes, broken indexes, FIFOs, absurd thread counts, validation without
//! execution, cancellation and progress. Every output the engine writes is re-parsed with the
//! strict header reader (tensors must tile the data section exactly, as safetensors requires).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dqfast_core::checkpoint::Checkpoint;
use dqfast_core::dtype::Dtype;
use dqfast_core::error::Error;
use dqfast_core::plan::{execute_json, execute_json_with, validate_json, Control};
use serde_json::{json, Value};

mod common;
use common::{err_of, plan_of, src, write_file};

/// Every output shard parses with the strict reader and holds the expected tensors.
fn assert_readable(out: &Path, names: usize) {
    let ck = Checkpoint::open(out).unwrap_or_else(|e| panic!("output not readable: {e}"));
    assert_eq!(ck.names.len(), names);
}

#[test]
fn zero_dimension_tensors_through_every_op_give_readable_files() {
    let d = tempfile::tempdir().unwrap();
    let s = d.path().join("src.safetensors");
    use Dtype::*;
    write_file(
        &s,
        &[
            ("w0", BF16, vec![0, 64], None),
            ("wk0", BF16, vec![4, 0], None),
            ("w", BF16, vec![2, 64], None),
            ("u0", U8, vec![0, 8], None),
            ("e0", F8_E4M3, vec![0, 16], None),
            ("e", F8_E4M3, vec![2, 16], None),
            ("f0", F32, vec![0], None),
        ],
    );
    let tensors = json!([
        {"name": "copy", "op": "copy", "src": src("w0")},
        {"name": "copy1d", "op": "copy", "src": src("f0")},
        {"name": "fp8_row", "op": "fp8", "src": src("w0"), "scale": {"kind": "weight_amax", "per_row": true}},
        {"name": "fp8_row_scale", "op": "scale_of", "of": "fp8_row", "shape": [0]},
        {"name": "fp8_t", "op": "fp8", "src": src("w0"), "scale": {"kind": "weight_amax", "per_row": false}},
        {"name": "fp8_t_scale", "op": "scale_of", "of": "fp8_t", "shape": [1]},
        {"name": "fp8_k0", "op": "fp8", "src": src("wk0"), "scale": {"kind": "weight_amax", "per_row": true}},
        {"name": "fp8_k0_scale", "op": "scale_of", "of": "fp8_k0", "shape": [4]},
        {"name": "fp8_amax", "op": "fp8", "src": src("w0"), "scale": {"kind": "amax", "amax": []}},
        {"name": "fp8_vals", "op": "fp8", "src": src("w0"), "scale": {"kind": "values", "values": [0.5]}},
        {"name": "in_scale", "op": "scale_from_amax", "amax": [], "bound": 448.0, "shape": [0]},
        {"name": "lit", "op": "f32", "values": [], "shape": [0, 3]},
        {"name": "swap", "op": "swap_nibbles", "src": src("u0")},
        {"name": "repair", "op": "repair_nan_e4m3", "src": src("e0")},
        {"name": "rows", "op": "slice_rows", "src": src("wk0"), "start": 1, "stop": 3},
        {"name": "rows_empty", "op": "slice_rows", "src": src("w"), "start": 1, "stop": 1},
        {"name": "cat", "op": "concat_rows", "srcs": [src("w0"), src("w"), src("w0")]},
        {"name": "rescale", "op": "rescale_e4m3", "src": src("e0"), "factor": 0.5},
        {"name": "rescale_rows", "op": "rescale_e4m3", "src": src("e"), "factor": 0.5, "start": 1, "stop": 1 + 1},
        {"name": "nv_w", "op": "nvfp4_weight", "src": src("w0"), "amax": {"kind": "weight"}},
        {"name": "nv_s", "op": "nvfp4_block_scales", "src": src("w0"), "amax": {"kind": "weight"}},
        {"name": "nv_g", "op": "nvfp4_global_scale", "src": src("w0"), "amax": {"kind": "weight"}, "shape": []},
        {"name": "nv_given", "op": "nvfp4_weight", "src": src("w0"), "amax": {"kind": "given", "amax": 2.0}},
    ]);
    let n = tensors.as_array().unwrap().len();
    // One shard, then one shard per tensor (every zero-byte tensor at a shard boundary too).
    for (i, max) in [5_000_000_000u64, 1].into_iter().enumerate() {
        let out = d.path().join(format!("out{i}"));
        let mut p = plan_of(&s, &out, tensors.clone());
        p["max_shard_bytes"] = json!(max);
        validate_json(&p.to_string()).unwrap();
        execute_json(&p.to_string()).unwrap();
        assert_readable(&out, n);
    }
    let ck = Checkpoint::open(&d.path().join("out0")).unwrap();
    let (_, t) = ck.require("fp8_row_scale").unwrap();
    assert_eq!((t.shape.clone(), t.nbytes()), (vec![0], 0));
    let (f, t) = ck.require("fp8_k0_scale").unwrap();
    assert_eq!(f.data(t), 1.0f32.to_le_bytes().repeat(4));
}

#[test]
fn a_per_row_scale_tensor_of_a_zero_row_weight_must_be_empty() {
    // Before the fix the engine wrote one scale value (4 bytes) for a header saying [0].
    let d = tempfile::tempdir().unwrap();
    let s = d.path().join("src.safetensors");
    write_file(&s, &[("w0", Dtype::BF16, vec![0, 64], None)]);
    let p = plan_of(
        &s,
        &d.path().join("out"),
        json!([
            {"name": "w", "op": "fp8", "src": src("w0"), "scale": {"kind": "weight_amax", "per_row": true}},
            {"name": "w_scale", "op": "scale_of", "of": "w", "shape": [1]},
        ]),
    );
    let e = err_of(&p);
    assert!(e.contains("holds 1 values but 'w' has 0 scale(s)"), "{e}");
}

fn one_weight(d: &Path, bits: u16) -> PathBuf {
    let s = d.join("w.safetensors");
    let data: Vec<u8> = std::iter::repeat_n(bits.to_le_bytes(), 32)
        .flatten()
        .collect();
    write_file(&s, &[("w", Dtype::BF16, vec![2, 16], Some(data))]);
    s
}

#[test]
fn scales_that_underflow_are_refused_naming_the_tensor() {
    let d = tempfile::tempdir().unwrap();
    let s = one_weight(d.path(), 0x3F80); // 1.0
    let out = d.path().join("out");
    let tiny = 1e-37f32; // finite, > 0, normal; amax/448 and amax/2688 are subnormal
    let cases = [
        (
            json!([{"name": "x.input_scale", "op": "scale_from_amax", "amax": [tiny], "bound": 448.0, "shape": [1]}]),
            "x.input_scale",
        ),
        (
            json!([{"name": "x.input_scale", "op": "scale_from_amax", "amax": [tiny], "bound": 2688.0, "shape": []}]),
            "x.input_scale",
        ),
        (
            json!([{"name": "x.weight", "op": "fp8", "src": src("w"), "scale": {"kind": "amax", "amax": [tiny]}}]),
            "'w'",
        ),
        (
            json!([{"name": "x.weight", "op": "fp8", "src": src("w"), "scale": {"kind": "values", "values": [1e-40]}}]),
            "'w'",
        ),
        (
            json!([{"name": "x.weight_scale", "op": "f32", "values": [0.0], "shape": [1]}]),
            "x.weight_scale",
        ),
        (
            json!([{"name": "x.weight", "op": "nvfp4_weight", "src": src("w"), "amax": {"kind": "given", "amax": 1e-36}}]),
            "'w'",
        ),
    ];
    for (tensors, name) in cases {
        let e = err_of(&plan_of(&s, &out, tensors.clone()));
        assert!(
            e.contains(name) && (e.contains("subnormal") || e.contains("> 0")),
            "{tensors}: {e}"
        );
    }
    // A weight whose own amax is that small (BF16 subnormal 2^-133): found while building.
    let d2 = tempfile::tempdir().unwrap();
    let s = one_weight(d2.path(), 0x0001);
    for tensors in [
        json!([{"name": "x.weight", "op": "fp8", "src": src("w"), "scale": {"kind": "weight_amax", "per_row": false}}]),
        json!([{"name": "x.weight", "op": "fp8", "src": src("w"), "scale": {"kind": "weight_amax", "per_row": true}}]),
        json!([{"name": "x.weight", "op": "nvfp4_weight", "src": src("w"), "amax": {"kind": "weight"}}]),
    ] {
        let e = execute_json(&plan_of(&s, &out, tensors.clone()).to_string())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("'w'") && e.contains("subnormal"),
            "{tensors}: {e}"
        );
        assert!(!out.exists());
    }
}

#[test]
fn nan_e4m3_bytes_are_refused_unless_repaired() {
    let d = tempfile::tempdir().unwrap();
    let s = d.path().join("src.safetensors");
    let mut e = vec![0x38u8; 64];
    e[5] = 0x7F;
    e[40] = 0xFF;
    write_file(
        &s,
        &[
            ("e", Dtype::F8_E4M3, vec![4, 16], Some(e)),
            ("ok", Dtype::F8_E4M3, vec![1, 16], None),
        ],
    );
    let out = d.path().join("out");
    for t in [
        json!({"name": "x", "op": "copy", "src": src("e")}),
        json!({"name": "x", "op": "slice_rows", "src": src("e"), "start": 2, "stop": 3}),
        json!({"name": "x", "op": "concat_rows", "srcs": [src("ok"), src("e")]}),
        json!({"name": "x", "op": "rescale_e4m3", "src": src("e"), "factor": 0.5}),
    ] {
        let err = execute_json(&plan_of(&s, &out, json!([t.clone()])).to_string()).unwrap_err();
        let m = err.to_string();
        assert!(matches!(err, Error::Tensor { .. }), "{m}");
        assert!(
            m.contains("'e'") && m.contains("NaN byte") && m.contains("--repair-nan"),
            "{t}: {m}"
        );
        assert!(!out.exists());
    }
    // Rows without a NaN are fine; repair ops write 448 (0x7E).
    let p = plan_of(
        &s,
        &out,
        json!([
            {"name": "a", "op": "slice_rows", "src": src("e"), "start": 1, "stop": 2},
            {"name": "b", "op": "repair_nan_e4m3", "src": src("e")},
            {"name": "c", "op": "rescale_e4m3", "src": src("e"), "factor": 1.0, "repair_nan": true},
        ]),
    );
    execute_json(&p.to_string()).unwrap();
    let ck = Checkpoint::open(&out).unwrap();
    for n in ["b", "c"] {
        let (f, t) = ck.require(n).unwrap();
        assert_eq!((f.data(t)[5], f.data(t)[40]), (0x7E, 0x7E));
    }
    assert!(ck.nan_e4m3_counts().is_empty());
    assert_eq!(
        Checkpoint::open(&s).unwrap().nan_e4m3_counts(),
        BTreeMap::from([("e".to_string(), 2)])
    );
}

fn sharded(d: &Path, weight_map: Value) -> PathBuf {
    let dir = d.join("ck");
    std::fs::create_dir(&dir).unwrap();
    write_file(
        &dir.join("a.safetensors"),
        &[("a", Dtype::U8, vec![4], None)],
    );
    write_file(
        &dir.join("b.safetensors"),
        &[("b", Dtype::U8, vec![4], None)],
    );
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        json!({"metadata": {}, "weight_map": weight_map}).to_string(),
    )
    .unwrap();
    dir
}

#[test]
fn indexes_with_an_empty_weight_map_or_unlisted_shards_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let dir = sharded(d.path(), json!({}));
    let e = Checkpoint::open(&dir).err().unwrap();
    assert!(
        matches!(&e, Error::Header { path, .. } if path.ends_with("model.safetensors.index.json")),
        "{e}"
    );
    assert!(e.to_string().contains("empty 'weight_map'"), "{e}");

    let d = tempfile::tempdir().unwrap();
    let dir = sharded(d.path(), json!({"a": "a.safetensors"}));
    let e = Checkpoint::open(&dir).err().unwrap().to_string();
    assert!(
        e.contains("'b.safetensors'") && e.contains("no weight_map entry"),
        "{e}"
    );
    // Listed completely: fine.
    let d = tempfile::tempdir().unwrap();
    let dir = sharded(
        d.path(),
        json!({"a": "a.safetensors", "b": "b.safetensors"}),
    );
    assert_eq!(Checkpoint::open(&dir).unwrap().names.len(), 2);
}

fn mkfifo(p: &Path) {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
}

/// Run `f` on a thread; fail if it does not return within 5 s (a FIFO open would block forever).
fn within_5s<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(5))
        .expect("blocked on a FIFO")
}

#[test]
fn fifos_are_refused_at_once_never_opened_for_a_blocking_read() {
    let d = tempfile::tempdir().unwrap();
    // A FIFO as the checkpoint file itself.
    let f = d.path().join("pipe.safetensors");
    mkfifo(&f);
    let e = within_5s(move || Checkpoint::open(&f).err().unwrap());
    assert!(
        matches!(&e, Error::NotRegular { kind: "a FIFO", .. }),
        "{e}"
    );
    // A FIFO as the only shard of a directory, as a listed shard, and as the index.
    for case in ["lone", "shard", "index"] {
        let dir = d.path().join(case);
        std::fs::create_dir(&dir).unwrap();
        match case {
            "lone" => mkfifo(&dir.join("m.safetensors")),
            "shard" => {
                write_file(
                    &dir.join("a.safetensors"),
                    &[("a", Dtype::U8, vec![4], None)],
                );
                mkfifo(&dir.join("b.safetensors"));
                std::fs::write(
                    dir.join("model.safetensors.index.json"),
                    json!({"weight_map": {"a": "a.safetensors", "b": "b.safetensors"}}).to_string(),
                )
                .unwrap();
            }
            _ => {
                write_file(
                    &dir.join("a.safetensors"),
                    &[("a", Dtype::U8, vec![4], None)],
                );
                mkfifo(&dir.join("model.safetensors.index.json"));
            }
        }
        let e = within_5s(move || Checkpoint::open(&dir).err().unwrap().to_string());
        assert!(e.contains("not a regular file (a FIFO)"), "{case}: {e}");
    }
    // A FIFO as a sidecar file the plan copies.
    let s = d.path().join("src.safetensors");
    write_file(&s, &[("a", Dtype::U8, vec![4], None)]);
    let side = d.path().join("README.md");
    mkfifo(&side);
    let mut p = plan_of(
        &s,
        &d.path().join("out"),
        json!([{"name": "a", "op": "copy", "src": src("a")}]),
    );
    p["files"] = json!([{"name": "README.md", "copy_from": side}]);
    let out = d.path().join("out");
    let e = within_5s(move || err_of(&p));
    assert!(e.contains("not a regular file (a FIFO)"), "{e}");
    assert!(!out.exists());
}

#[test]
fn thread_counts_are_capped_at_the_cores() {
    let cores = std::thread::available_parallelism().unwrap().get();
    assert_eq!(dqfast_core::plan::effective_threads(0), cores);
    assert_eq!(dqfast_core::plan::effective_threads(100_000), cores);
    assert_eq!(dqfast_core::plan::effective_threads(1), 1);
    let d = tempfile::tempdir().unwrap();
    let s = one_weight(d.path(), 0x3F80);
    let mut p = plan_of(
        &s,
        &d.path().join("out"),
        json!([{"name": "a", "op": "copy", "src": src("w")}]),
    );
    p["threads"] = json!(100_000);
    let t = Instant::now();
    let r = execute_json(&p.to_string()).unwrap();
    assert_eq!(r.threads, cores);
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[test]
fn validate_refuses_what_execute_refuses_without_writing() {
    let d = tempfile::tempdir().unwrap();
    let s = one_weight(d.path(), 0x3F80);
    let out = d.path().join("out");
    let bad = [
        json!([{"name": "a", "op": "copy", "src": src("missing")}]),
        json!([{"name": "a", "op": "fp8", "src": src("w"), "scale": {"kind": "values", "values": [1.0, 1.0, 1.0]}}]),
        json!([{"name": "a", "op": "swap_nibbles", "src": src("w")}]),
        json!([{"name": "a", "op": "slice_rows", "src": src("w"), "start": 1, "stop": 9}]),
        json!([{"name": "a", "op": "nvfp4_weight", "src": src("w"), "amax": {"kind": "given", "amax": -1.0}}]),
        json!([{"name": "a", "op": "copy", "src": src("w")}, {"name": "a", "op": "copy", "src": src("w")}]),
    ];
    for t in bad {
        err_of(&plan_of(&s, &out, t));
        assert!(!out.exists());
    }
    let mut p = plan_of(
        &s,
        &out,
        json!([{"name": "a", "op": "copy", "src": src("w")}]),
    );
    p["files"] = json!([{"name": "x.safetensors", "text": "no"}]);
    err_of(&p);
    // A valid plan validates and writes nothing; an existing output is refused without overwrite.
    let p = plan_of(
        &s,
        &out,
        json!([{"name": "a", "op": "copy", "src": src("w")}]),
    );
    validate_json(&p.to_string()).unwrap();
    assert!(!out.exists());
    std::fs::create_dir(&out).unwrap();
    assert!(matches!(
        validate_json(&p.to_string()),
        Err(Error::OutputExists(_))
    ));
}

#[test]
fn a_cancelled_build_stops_within_a_second_and_leaves_the_old_output() {
    let d = tempfile::tempdir().unwrap();
    let s = one_weight(d.path(), 0x3F80);
    let out = d.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("old.txt"), b"previous output").unwrap();
    let tensors: Vec<Value> = (0..200)
        .map(|i| json!({"name": format!("t{i}"), "op": "copy", "src": src("w")}))
        .collect();
    let mut p = plan_of(&s, &out, json!(tensors));
    p["overwrite"] = json!(true);
    p["_test_delay_ms"] = json!(50); // ~10 s in all
    let ctl = Arc::new(Control::default());
    let seen_progress = Arc::new(AtomicBool::new(false));
    let (c, sp) = (ctl.clone(), seen_progress.clone());
    let watcher = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        let pr = c.progress();
        sp.store(
            pr.tensors_done > 0 && pr.tensors_total == 200 && pr.bytes_done > 0,
            Ordering::Relaxed,
        );
        c.cancel();
        Instant::now()
    });
    let r = execute_json_with(&p.to_string(), &ctl);
    let stopped = Instant::now();
    let cancelled_at = watcher.join().unwrap();
    assert!(matches!(r, Err(Error::Cancelled)), "{:?}", r.err());
    assert!(stopped - cancelled_at < Duration::from_secs(1));
    assert!(seen_progress.load(Ordering::Relaxed));
    assert_eq!(
        std::fs::read(out.join("old.txt")).unwrap(),
        b"previous output"
    );
    let left: Vec<_> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("dqfast-tmp"))
        .collect();
    assert!(left.is_empty(), "staging left behind: {left:?}");
}

#[test]
fn progress_counts_every_output_byte_and_tensor() {
    let d = tempfile::tempdir().unwrap();
    let s = one_weight(d.path(), 0x3F80);
    let out = d.path().join("out");
    let tensors: Vec<Value> = (0..5)
        .map(|i| json!({"name": format!("t{i}"), "op": "fp8", "src": src("w"), "scale": {"kind": "weight_amax", "per_row": true}}))
        .collect();
    let mut p = plan_of(&s, &out, json!(tensors));
    p["max_shard_bytes"] = json!(40);
    let ctl = Control::default();
    execute_json_with(&p.to_string(), &ctl).unwrap();
    let pr = ctl.progress();
    let on_disk: u64 = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert_eq!((pr.bytes_done, pr.bytes_total), (on_disk, on_disk));
    assert_eq!((pr.tensors_done, pr.tensors_total), (5, 5));
    assert_eq!(pr.current, "t4");
}
