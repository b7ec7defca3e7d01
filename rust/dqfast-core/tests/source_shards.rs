//! The default output layout keeps the converted checkpoint's sharding (issue #13, SGLang's
//! builders' rule): same file names, each tensor in its source tensor's file, scales beside their
//! weight, BF16 fallbacks read from another checkpoint in the file the converted one held them in,
//! the index named like the source's; `max_shard_bytes` re-shards greedily as before.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use dqfast_core::checkpoint::Checkpoint;
use dqfast_core::dtype::Dtype;
use dqfast_core::plan::{execute_json, validate_json};
use serde_json::{json, Value};

mod common;
use common::{src, write_file};

const A: &str = "diffusion_pytorch_model-00001-of-00002.safetensors";
const B: &str = "diffusion_pytorch_model-00002-of-00002.safetensors";
const INDEX: &str = "diffusion_pytorch_model.safetensors.index.json";

/// A 2-shard checkpoint (`a.weight`, `b.weight` in A; `c.weight` in B) and a one-file base.
fn two_shards(d: &Path) -> (PathBuf, PathBuf) {
    let ck = d.join("export");
    std::fs::create_dir(&ck).unwrap();
    write_file(
        &ck.join(A),
        &[
            ("a.weight", Dtype::BF16, vec![4, 16], None),
            ("b.weight", Dtype::F8_E4M3, vec![4, 16], None),
        ],
    );
    write_file(&ck.join(B), &[("c.weight", Dtype::BF16, vec![4, 16], None)]);
    let wm = json!({"a.weight": A, "b.weight": A, "c.weight": B});
    std::fs::write(
        ck.join(INDEX),
        json!({"metadata": {"total_size": 0}, "weight_map": wm}).to_string(),
    )
    .unwrap();
    let base = d.join("base.safetensors");
    write_file(&base, &[("b.weight", Dtype::BF16, vec![4, 16], None)]);
    (ck, base)
}

fn plan(sources: &[&Path], out: &Path, tensors: Value) -> Value {
    json!({"sources": sources, "output_dir": out, "fsync": false, "always_index": true, "tensors": tensors})
}

/// Output tensor -> file, from the output's own index (checked against the shards by the reader).
fn files_of(out: &Path) -> BTreeMap<String, String> {
    let ck = Checkpoint::open(out).unwrap();
    assert!(ck.index.is_some());
    ck.names
        .iter()
        .map(|n| {
            let (f, _) = ck.require(n).unwrap();
            let file = f.path.file_name().unwrap().to_string_lossy().to_string();
            (n.clone(), file)
        })
        .collect()
}

fn tensors() -> Value {
    let base = |t: &str| json!({"source": 1, "tensor": t});
    json!([
        // A synthesized scale written before its weight: beside `c.weight` all the same.
        {"name": "c.input_scale", "op": "f32", "values": [1.0], "shape": [1]},
        {"name": "a.weight", "op": "fp8", "src": src("a.weight"), "scale": {"kind": "weight_amax", "per_row": false}},
        {"name": "a.weight_scale", "op": "scale_of", "of": "a.weight", "shape": [1]},
        // A BF16 fallback read from the base: where the export held `b.weight`.
        {"name": "b.weight", "op": "copy", "src": base("b.weight")},
        {"name": "c.weight", "op": "fp8", "src": src("c.weight"), "scale": {"kind": "values", "values": [1.0]}},
        {"name": "c.weight_scale", "op": "f32", "values": [1.0], "shape": [1]},
        // A renamed tensor: its source tensor's file.
        {"name": "c.rows", "op": "slice_rows", "src": src("c.weight"), "start": 0, "stop": 2},
        // No source, no module weight: beside the tensor before it.
        {"name": "free", "op": "f32", "values": [2.0], "shape": [1]},
    ])
}

#[test]
fn a_two_shard_source_keeps_its_files_and_index_name() {
    let d = tempfile::tempdir().unwrap();
    let (ck, base) = two_shards(d.path());
    let out = d.path().join("out");
    let p = plan(&[&ck, &base], &out, tensors());
    validate_json(&p.to_string()).unwrap();
    let report = execute_json(&p.to_string()).unwrap();
    let files: Vec<&str> = report.shards.iter().map(|s| s.file.as_str()).collect();
    assert_eq!(files, [A, B], "written in the source's file order");
    let want: BTreeMap<String, String> = [
        ("a.weight", A),
        ("a.weight_scale", A),
        ("b.weight", A),
        ("c.input_scale", B),
        ("c.weight", B),
        ("c.weight_scale", B),
        ("c.rows", B),
        ("free", B),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(files_of(&out), want);
    let mut on_disk: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    on_disk.sort();
    assert_eq!(on_disk, [A, B, INDEX]);
    // The index: every tensor, total_size = the tensor bytes.
    let idx: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join(INDEX)).unwrap()).unwrap();
    let total: u64 = report
        .tensors
        .iter()
        .map(|t| t.shape.iter().product::<usize>() as u64 * t.dtype.size() as u64)
        .sum();
    assert_eq!(idx["metadata"]["total_size"], json!(total));
    assert_eq!(idx["weight_map"].as_object().unwrap().len(), want.len());
}

#[test]
fn max_shard_bytes_re_shards_greedily_in_plan_order() {
    let d = tempfile::tempdir().unwrap();
    let (ck, base) = two_shards(d.path());
    let out = d.path().join("out");
    let mut p = plan(&[&ck, &base], &out, tensors());
    p["max_shard_bytes"] = json!(5_000_000_000u64);
    execute_json(&p.to_string()).unwrap();
    let files = files_of(&out);
    assert!(
        files
            .values()
            .all(|f| f == "diffusion_pytorch_model.safetensors"),
        "{files:?}"
    );
    assert!(out.join(INDEX).is_file());
    let out2 = d.path().join("out2");
    let mut p = plan(&[&ck, &base], &out2, tensors());
    p["max_shard_bytes"] = json!(64);
    p["file_prefix"] = json!("m");
    let r = execute_json(&p.to_string()).unwrap();
    assert!(r.shards.len() > 2);
    assert_eq!(
        r.shards[0].file,
        format!("m-00001-of-{:05}.safetensors", r.shards.len())
    );
    assert!(out2.join("m.safetensors.index.json").is_file());
}

#[test]
fn a_one_file_source_keeps_its_name_and_bytes() {
    let d = tempfile::tempdir().unwrap();
    let s = d.path().join("x.safetensors");
    write_file(
        &s,
        &[
            ("w", Dtype::BF16, vec![4, 16], None),
            ("v", Dtype::BF16, vec![2, 16], None),
        ],
    );
    let ops = json!([
        {"name": "w", "op": "fp8", "src": src("w"), "scale": {"kind": "weight_amax", "per_row": true}},
        {"name": "w_scale", "op": "scale_of", "of": "w", "shape": [4]},
        {"name": "v", "op": "copy", "src": src("v")},
    ]);
    let kept = d.path().join("kept");
    execute_json(&plan(&[&s], &kept, ops.clone()).to_string()).unwrap();
    let mut names: Vec<String> = std::fs::read_dir(&kept)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    assert_eq!(names, ["x.safetensors", "x.safetensors.index.json"]);
    // The same bytes as the size-based layout of one shard: only the name follows the source.
    let sized = d.path().join("sized");
    let mut p = plan(&[&s], &sized, ops);
    p["max_shard_bytes"] = json!(1u64 << 40);
    execute_json(&p.to_string()).unwrap();
    assert_eq!(
        std::fs::read(kept.join("x.safetensors")).unwrap(),
        std::fs::read(sized.join("diffusion_pytorch_model.safetensors")).unwrap()
    );
}

#[test]
fn a_zero_max_shard_bytes_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let (ck, base) = two_shards(d.path());
    let mut p = plan(&[&ck, &base], &d.path().join("out"), tensors());
    p["max_shard_bytes"] = json!(0);
    let e = validate_json(&p.to_string()).unwrap_err().to_string();
    assert!(e.contains("max_shard_bytes must be > 0"), "{e}");
}

#[test]
fn an_unknown_op_field_and_a_self_referencing_scale_of_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let (ck, base) = two_shards(d.path());
    let out = d.path().join("out");
    // A misspelt optional field would silently take its default: refused instead.
    let bad = json!([{"name": "a.weight", "op": "fp8", "src": src("a.weight"),
        "scale": {"kind": "values", "values": [1.0]}, "saturaton": "clamp"}]);
    let e = validate_json(&plan(&[&ck, &base], &out, bad).to_string())
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown field `saturaton`"), "{e}");
    // Before the op split this indexed past the resolved outputs (a panic).
    let own = json!([{"name": "s", "op": "scale_of", "of": "s", "shape": [1]}]);
    let e = validate_json(&plan(&[&ck, &base], &out, own).to_string())
        .unwrap_err()
        .to_string();
    assert!(e.contains("must name an earlier fp8 tensor"), "{e}");
}
