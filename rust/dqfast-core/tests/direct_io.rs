//! The direct-I/O path (O_DIRECT reads into pooled buffers, O_DIRECT writes) must write exactly
//! the bytes the memory-map path writes, for every op, and finish under any read budget (the
//! schedule must never let the reader thread and the engine wait on each other).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use dqfast_core::dtype::Dtype;
use dqfast_core::plan::execute_json;
use serde_json::json;

mod common;
use common::{src, write_file, Bf16Rng, Spec};

/// A safetensors file of BF16 tensors with pseudo-random finite values; returns its path.
fn write_source(dir: &Path, name: &str, tensors: &[(&str, Vec<usize>)]) -> PathBuf {
    // Exponent 0x70..0x8F: |x| ~ 2^-15 .. 2^16, finite and varied.
    let mut rng = Bf16Rng {
        state: 0x9E37_79B9_7F4A_7C15,
        exp_min: 0x70,
        exps: 32,
    };
    let specs: Vec<Spec> = tensors
        .iter()
        .map(|(n, s)| {
            let data = rng.data(s.iter().product());
            (*n, Dtype::BF16, s.clone(), Some(data))
        })
        .collect();
    let p = dir.join(name);
    write_file(&p, &specs);
    p
}

fn plan(source: &Path, out: &Path, io: &str, budget: u64) -> String {
    let nv_group = json!({"kind": "max_of", "srcs": [src("q"), src("k"), src("v")]});
    json!({
        "sources": [source],
        "output_dir": out,
        "fsync": false,
        "io": io,
        "read_buffer_bytes": budget,
        // Small shards: several files, so direct writes open, pad and truncate more than once.
        "max_shard_bytes": 3_000_000,
        "tensors": [
            {"name": "a.weight", "op": "fp8", "src": src("a"), "scale": {"kind": "weight_amax", "per_row": false}},
            {"name": "a.weight_scale", "op": "scale_of", "of": "a.weight", "shape": []},
            {"name": "b.weight", "op": "fp8", "src": src("b"), "scale": {"kind": "weight_amax", "per_row": true}},
            {"name": "b.weight_scale", "op": "scale_of", "of": "b.weight", "shape": [512, 1]},
            {"name": "c.copy", "op": "copy", "src": src("c")},
            {"name": "c.rows", "op": "slice_rows", "src": src("c"), "start": 100, "stop": 333},
            {"name": "ab.cat", "op": "concat_rows", "srcs": [src("c"), src("small")]},
            // A fused q/k/v group: q's global scale needs k and v before their own ops.
            {"name": "q.weight", "op": "nvfp4_weight", "src": src("q"), "amax": nv_group},
            {"name": "q.weight_scale", "op": "nvfp4_block_scales", "src": src("q"), "amax": nv_group},
            {"name": "q.weight_scale_2", "op": "nvfp4_global_scale", "src": src("q"), "amax": nv_group, "shape": []},
            {"name": "k.weight", "op": "nvfp4_weight", "src": src("k"), "amax": nv_group},
            {"name": "k.weight_scale", "op": "nvfp4_block_scales", "src": src("k"), "amax": nv_group},
            {"name": "v.weight", "op": "nvfp4_weight", "src": src("v"), "amax": nv_group},
            {"name": "v.weight_scale", "op": "nvfp4_block_scales", "src": src("v"), "amax": nv_group},
            {"name": "d.weight", "op": "nvfp4_weight", "src": src("d"), "amax": {"kind": "weight"}},
            {"name": "d.weight_scale", "op": "nvfp4_block_scales", "src": src("d"), "amax": {"kind": "weight"}},
            {"name": "small.copy", "op": "copy", "src": src("small")},
        ]
    })
    .to_string()
}

fn read_dir_bytes(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect()
}

#[test]
fn every_io_mode_and_budget_writes_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    // 1–2 MiB tensors (at the direct threshold and above), at unaligned file offsets.
    let source = write_source(
        dir.path(),
        "src.safetensors",
        &[
            ("small", vec![3, 1024]),
            ("a", vec![512, 1024]),
            ("b", vec![512, 1040]),
            ("c", vec![600, 1024]),
            ("q", vec![512, 1024]),
            ("k", vec![512, 1024]),
            ("v", vec![512, 1024]),
            ("d", vec![1024, 1024]),
        ],
    );
    let reference = dir.path().join("buffered");
    let r = execute_json(&plan(&source, &reference, "buffered", 512 << 20)).unwrap();
    assert_eq!(r.bytes_read_direct, 0);
    assert!(!r.direct_writes);
    let want = read_dir_bytes(&reference);
    // Every shard re-parses with the strict reader (tensors tile the data section exactly, as the
    // safetensors library requires) and the index covers every tensor of every op.
    assert_eq!(
        dqfast_core::checkpoint::Checkpoint::open(&reference)
            .unwrap()
            .names
            .len(),
        17
    );
    assert!(
        want.len() > 2,
        "several shards and an index: {:?}",
        want.keys()
    );

    let mut direct_reads_seen = false;
    // Budgets from "fits everything" down to "fits nothing" (every load falls back to the map).
    for (io, budget) in [
        ("direct", 512u64 << 20),
        ("direct", 16 << 20),
        ("direct", 8 << 20),
        ("auto", 512 << 20),
        ("direct", 1 << 20),
    ] {
        let out = dir.path().join(format!("{io}-{budget}"));
        let r = execute_json(&plan(&source, &out, io, budget)).unwrap();
        direct_reads_seen |= r.bytes_read_direct > 0;
        let got = read_dir_bytes(&out);
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "{io} {budget}"
        );
        for (name, bytes) in &want {
            assert!(got[name] == *bytes, "{io} budget {budget}: {name} differs");
        }
    }
    // On a file system without O_DIRECT everything falls back; where it exists it must be used.
    if dqfast_core::direct::open_for_read(&source).is_some() {
        assert!(
            direct_reads_seen,
            "O_DIRECT works here but no tensor was read directly"
        );
    }
}
