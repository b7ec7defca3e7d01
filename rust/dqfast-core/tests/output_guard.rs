//! Property: however the output and the inputs are spelled — absolute, relative to the current
//! directory, through `..` (existing or not-yet-existing parents), `.`, symlinks to the tree or
//! to the base, trailing slashes — executing a plan never modifies an input: an output that is,
//! contains or lies inside an input is refused with `Error::UnsafeOutput`, and a disjoint output
//! still builds (or is refused as existing when overwriting was not asked for).
//!
//! proptest rather than Hypothesis: it is already a dev-dependency, runs in `cargo test`, and the
//! rule under test lives in this crate (every Python builder reaches it through the plan).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use dqfast_core::checkpoint::Checkpoint;
use dqfast_core::error::Error;
use dqfast_core::plan::execute_json;
use dqfast_core::writer::relative_to_cwd;
use proptest::prelude::*;

/// Where the output goes, as a path inside the test tree, and whether that overlaps an input.
const TARGETS: &[(&str, bool)] = &[
    ("", true),                       // the tree root: contains everything
    ("base", true),                   // the source
    ("base/model.safetensors", true), // its shard
    ("base/new", true),               // inside the source
    ("ckpt", true),                   // holds the backbone (a guard input)
    ("ckpt/backbone.pt", true),       // the backbone itself
    ("sub", false),                   // an existing, unrelated (empty) directory
    ("sub/out", false),               // new, beside the inputs
    ("out", false),                   // new or pre-existing, beside the inputs
];

#[derive(Debug, Clone, Copy)]
enum Spelling {
    Absolute,
    RelativeToCwd,
    ThroughSubDotDot,
    ThroughMissingDotDot,
    CurDir,
    ThroughRootLink,
    ThroughBaseLink,
}

/// Spellings of an existing input (a missing parent cannot be opened through).
fn input_spelling() -> impl Strategy<Value = Spelling> {
    spelling().prop_filter("opens", |s| !matches!(s, Spelling::ThroughMissingDotDot))
}

fn spelling() -> impl Strategy<Value = Spelling> {
    prop_oneof![
        Just(Spelling::Absolute),
        Just(Spelling::RelativeToCwd),
        Just(Spelling::ThroughSubDotDot),
        Just(Spelling::ThroughMissingDotDot),
        Just(Spelling::CurDir),
        Just(Spelling::ThroughRootLink),
        Just(Spelling::ThroughBaseLink),
    ]
}

/// `rel` (inside the tree at `root`) spelled as asked.
fn spell(root: &Path, rel: &str, how: Spelling, trailing_slash: bool) -> PathBuf {
    let mut p = match how {
        Spelling::Absolute => root.join(rel),
        Spelling::RelativeToCwd => relative_to_cwd(root).unwrap().join(rel),
        Spelling::ThroughSubDotDot => root.join("sub/..").join(rel),
        Spelling::ThroughMissingDotDot => root.join("nope/deeper/../..").join(rel),
        Spelling::CurDir => root.join(".").join(rel).join("."),
        Spelling::ThroughRootLink => root.join("link_root/link_root").join(rel),
        Spelling::ThroughBaseLink => match rel.strip_prefix("base") {
            Some(rest) => root.join("link_base").join(rest.trim_start_matches('/')),
            None => root.join("link_base/..").join(rel),
        },
    }
    .display()
    .to_string();
    if trailing_slash {
        p.push('/');
    }
    PathBuf::from(p)
}

/// A one-tensor safetensors file.
fn write_shard(path: &Path) {
    let header = br#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend((0u8..16).map(|i| i.wrapping_mul(37)));
    fs::write(path, bytes).unwrap();
}

/// root/{base/model.safetensors, base/config.json, ckpt/backbone.pt, sub/, link_root -> root,
/// link_base -> base}.
fn tree() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let r = d.path();
    fs::create_dir(r.join("base")).unwrap();
    write_shard(&r.join("base/model.safetensors"));
    fs::write(r.join("base/config.json"), b"{}").unwrap();
    fs::create_dir(r.join("ckpt")).unwrap();
    fs::write(r.join("ckpt/backbone.pt"), b"maxima").unwrap();
    fs::create_dir(r.join("sub")).unwrap();
    std::os::unix::fs::symlink(r, r.join("link_root")).unwrap();
    std::os::unix::fs::symlink(r.join("base"), r.join("link_base")).unwrap();
    d
}

/// Every file under `dir` with its bytes (symlinks by target).
fn digest(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let m = fs::symlink_metadata(&p).unwrap();
            if m.file_type().is_symlink() {
                let t = fs::read_link(&p).unwrap();
                out.insert(p, t.into_os_string().into_encoded_bytes());
            } else if m.is_dir() {
                out.insert(p.clone(), b"dir".to_vec());
                stack.push(p);
            } else {
                out.insert(p.clone(), fs::read(&p).unwrap());
            }
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn no_spelling_of_the_output_modifies_an_input(
        target in 0..TARGETS.len(),
        out_how in spelling(),
        out_slash in any::<bool>(),
        src_how in input_spelling(),
        src_slash in any::<bool>(),
        guard_how in input_spelling(),
        overwrite in any::<bool>(),
        pre_existing in any::<bool>(),
    ) {
        let d = tree();
        let root = d.path();
        let (rel, overlaps) = TARGETS[target];
        if pre_existing && rel == "out" {
            fs::create_dir(root.join("out")).unwrap();
            fs::write(root.join("out/old"), b"old").unwrap();
        }
        let output = spell(root, rel, out_how, out_slash);
        let source = spell(root, "base", src_how, src_slash);
        let backbone = spell(root, "ckpt/backbone.pt", guard_how, false);
        let inputs_before = (digest(&root.join("base")), digest(&root.join("ckpt")));
        let existed = root.join(rel).exists();
        let plan = serde_json::json!({
            "sources": [source],
            "output_dir": output,
            "overwrite": overwrite,
            "fsync": false,
            "threads": 1,
            "files": [{"name": "config.json", "copy_from": root.join("link_base/config.json")}],
            "guard_inputs": [backbone],
            "tensors": [{"name": "w", "op": "copy", "src": {"source": 0, "tensor": "w"}}],
        });
        let result = execute_json(&plan.to_string());
        prop_assert_eq!(
            (digest(&root.join("base")), digest(&root.join("ckpt"))),
            inputs_before,
            "an input changed: output {:?}, result {:?}", output, result.as_ref().err()
        );
        match result {
            Err(Error::UnsafeOutput { .. }) => prop_assert!(overlaps, "{:?} refused but disjoint", output),
            Err(Error::OutputExists(_)) => prop_assert!(!overlaps && existed && !overwrite),
            Ok(_) => {
                prop_assert!(!overlaps && (overwrite || !existed), "{:?} written", output);
                let ck = Checkpoint::open(&root.join(rel)).unwrap();
                prop_assert_eq!(ck.names.clone(), vec!["w".to_string()]);
                prop_assert!(!root.join(rel).join("old").exists());
            }
            Err(e) => prop_assert!(false, "unexpected error for {:?}: {}", output, e),
        }
    }
}
