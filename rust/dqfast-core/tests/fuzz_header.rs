//! Property-based fuzzing of the safetensors header parser and the index/shard reader.
//!
//! `cargo fuzz` needs a nightly toolchain, so this is a proptest harness instead: random bytes,
//! valid headers put through mutations (bit flips, truncations, splices, inserted bytes, rewritten
//! lengths and numbers) and random index json must never panic, and whatever parses must satisfy
//! the invariants the rest of the crate relies on (tensors tile the data section exactly, sizes
//! match shapes, names are unique, every byte range lies inside the file).
//!
//! The default `cargo test` runs a few hundred cases per property (seconds). Long runs:
//! `DQFAST_FUZZ_CASES=200000 cargo test -p dqfast-core --release --test fuzz_header`.
//! Inputs that once found a bug (or hit a rare branch) live in `tests/corpus/` and are replayed
//! on every run.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use dqfast_core::checkpoint::Checkpoint;
use dqfast_core::dtype::Dtype;
use dqfast_core::header::{checked_nbytes, parse_header, serialize_header, Header};
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence};

fn cases(default: u32) -> u32 {
    std::env::var("DQFAST_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn config(default: u32) -> Config {
    Config {
        cases: cases(default),
        // Failing inputs are printed and shrunk; corpus files (not proptest's regression
        // files) are where we keep them.
        failure_persistence: Some(Box::new(FileFailurePersistence::Off)),
        max_shrink_iters: 2048,
        ..Config::default()
    }
}

/// Everything a successful parse promises its users.
fn check_invariants(bytes: &[u8], h: &Header) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    assert_eq!(h.data_start, 8 + n, "data_start is 8 + header length");
    assert!(
        h.data_start <= bytes.len(),
        "data section starts inside the file"
    );
    assert!(
        std::str::from_utf8(&bytes[8..h.data_start]).is_ok(),
        "header is UTF-8"
    );
    let data_len = bytes.len() - h.data_start;
    let mut offset = 0usize;
    let mut names = HashSet::new();
    for t in &h.tensors {
        assert_eq!(
            t.begin, offset,
            "tensors tile the data section without gap or overlap"
        );
        assert!(t.end >= t.begin);
        assert_eq!(
            checked_nbytes(&t.shape, t.dtype.size()),
            Some(t.end - t.begin),
            "byte range matches shape x dtype size"
        );
        assert!(names.insert(t.name.as_str()), "tensor names are unique");
        assert_ne!(t.name, "__metadata__");
        // The slice every reader takes must be in bounds.
        let _ = &bytes[h.data_start + t.begin..h.data_start + t.end];
        offset = t.end;
    }
    assert_eq!(offset, data_len, "tensors cover the whole data section");

    // What parsed re-serializes to a header that parses to the same layout.
    let entries: Vec<(String, Dtype, Vec<usize>)> = h
        .tensors
        .iter()
        .map(|t| (t.name.clone(), t.dtype, t.shape.clone()))
        .collect();
    let (hdr, offs) = serialize_header(&h.metadata, &entries).expect("parsed header re-serializes");
    let mut file = hdr;
    file.extend_from_slice(&bytes[h.data_start..]);
    let again = parse_header(Path::new("roundtrip"), &file).expect("re-serialized header parses");
    assert_eq!(again.metadata, h.metadata);
    assert_eq!(again.tensors.len(), h.tensors.len());
    for ((a, b), (s, e)) in again.tensors.iter().zip(&h.tensors).zip(&offs) {
        assert_eq!((&a.name, a.dtype, &a.shape), (&b.name, b.dtype, &b.shape));
        assert_eq!((a.begin, a.end), (*s, *e));
        assert_eq!((a.begin, a.end), (b.begin, b.end));
    }
}

/// Parse must return (never panic); on success the invariants hold.
fn parse_checked(bytes: &[u8]) -> bool {
    match parse_header(Path::new("fuzz.safetensors"), bytes) {
        Ok(h) => {
            check_invariants(bytes, &h);
            true
        }
        Err(e) => {
            // Errors name the file, so the message is actionable.
            assert!(e.to_string().contains("fuzz.safetensors"), "{e}");
            false
        }
    }
}

fn file_from(header: &[u8], data_len: usize) -> Vec<u8> {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header);
    v.extend(std::iter::repeat_n(0xA5u8, data_len));
    v
}

// ---- generators -------------------------------------------------------------------------

fn dtype() -> impl Strategy<Value = Dtype> {
    (0..Dtype::ALL.len()).prop_map(|i| Dtype::ALL[i])
}

/// Names from a small alphabet so duplicates and `__metadata__` collisions happen often.
fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        "[ab.]{1,3}",
        Just("__metadata__".to_string()),
        "[a-z_.0-9]{1,12}",
        any::<String>(),
    ]
}

fn tensors() -> impl Strategy<Value = Vec<(String, Dtype, Vec<usize>)>> {
    prop::collection::vec(
        (name(), dtype(), prop::collection::vec(0usize..5, 0..4)),
        0..6,
    )
}

fn metadata() -> impl Strategy<Value = BTreeMap<String, String>> {
    prop::collection::btree_map("[a-z_]{1,6}", any::<String>(), 0..3)
}

/// A valid safetensors file (unique names, consistent offsets) or `None` when the generated
/// names collide.
fn valid_file() -> impl Strategy<Value = Vec<u8>> {
    (metadata(), tensors()).prop_map(|(md, ts)| {
        let mut seen = HashSet::new();
        let ts: Vec<_> = ts
            .into_iter()
            .filter(|(n, _, _)| n != "__metadata__" && seen.insert(n.clone()))
            .collect();
        let (hdr, offs) = serialize_header(&md, &ts).unwrap();
        let data_len = offs.last().map(|o| o.1).unwrap_or(0);
        let mut f = hdr;
        f.extend(std::iter::repeat_n(0x5Au8, data_len));
        f
    })
}

#[derive(Clone, Debug)]
enum Mutation {
    BitFlip(usize, u8),
    Truncate(usize),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    /// Replace the 8-byte header length.
    SetLen(u64),
    /// Replace the i-th run of digits in the header text by this token.
    Number(usize, String),
    /// Replace the i-th quoted string in the header text by this token.
    Str(usize, String),
    /// Keep a prefix of this file and a suffix of another valid one.
    Splice(usize, Vec<u8>, usize),
    /// Append bytes to the data section.
    Append(Vec<u8>),
}

fn number_token() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<u64>().prop_map(|n| n.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        (0u64..64).prop_map(|n| n.to_string()),
        Just("18446744073709551616".to_string()),
        Just("99999999999999999999999999".to_string()),
        Just("1e400".to_string()),
        Just("-0".to_string()),
        Just("1.5".to_string()),
        Just("null".to_string()),
        Just("\"7\"".to_string()),
        Just("[]".to_string()),
        Just("{}".to_string()),
        Just("1099511627776".to_string()),
    ]
}

fn string_token() -> impl Strategy<Value = String> {
    prop_oneof![
        (0..Dtype::ALL.len()).prop_map(|i| format!("\"{}\"", Dtype::ALL[i].name())),
        Just("\"Q9\"".to_string()),
        Just("\"__metadata__\"".to_string()),
        Just("\"data_offsets\"".to_string()),
        Just("\"shape\"".to_string()),
        Just("\"dtype\"".to_string()),
        Just("\"a\"".to_string()),
        Just("\"\\ud800\"".to_string()),
        Just("1".to_string()),
        Just("{}".to_string()),
        "\"[a-z]{0,4}\"",
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<usize>(), 0u8..8).prop_map(|(p, b)| Mutation::BitFlip(p, b)),
        2 => any::<usize>().prop_map(Mutation::Truncate),
        2 => (any::<usize>(), prop::collection::vec(any::<u8>(), 1..8)).prop_map(|(p, v)| Mutation::Insert(p, v)),
        2 => (any::<usize>(), 1usize..16).prop_map(|(p, n)| Mutation::Delete(p, n)),
        1 => prop_oneof![any::<u64>(), 0u64..512].prop_map(Mutation::SetLen),
        4 => (any::<usize>(), number_token()).prop_map(|(i, t)| Mutation::Number(i, t)),
        3 => (any::<usize>(), string_token()).prop_map(|(i, t)| Mutation::Str(i, t)),
        2 => (any::<usize>(), valid_file(), any::<usize>()).prop_map(|(a, f, b)| Mutation::Splice(a, f, b)),
        1 => prop::collection::vec(any::<u8>(), 1..16).prop_map(Mutation::Append),
    ]
}

fn header_span(f: &[u8]) -> (usize, usize) {
    if f.len() < 8 {
        return (f.len(), f.len());
    }
    let n = u64::from_le_bytes(f[..8].try_into().unwrap()) as usize;
    (8, 8usize.saturating_add(n).min(f.len()))
}

/// Byte ranges of digit runs (or quoted strings) inside the header text.
fn token_spans(f: &[u8], quoted: bool) -> Vec<(usize, usize)> {
    let (a, b) = header_span(f);
    let mut spans = Vec::new();
    let mut i = a;
    while i < b {
        if quoted && f[i] == b'"' {
            let mut j = i + 1;
            while j < b && f[j] != b'"' {
                j += if f[j] == b'\\' { 2 } else { 1 };
            }
            let end = (j + 1).min(b);
            spans.push((i, end));
            i = end;
        } else if !quoted && f[i].is_ascii_digit() {
            let mut j = i;
            while j < b && f[j].is_ascii_digit() {
                j += 1;
            }
            spans.push((i, j));
            i = j;
        } else {
            i += 1;
        }
    }
    spans
}

/// Replace a token and, when the mutation keeps the file plausible, fix up the header length so
/// the mutation reaches the JSON checks instead of stopping at the length check.
fn replace_token(f: &mut Vec<u8>, span: (usize, usize), tok: &str) {
    let (hs, he) = header_span(f);
    let delta = tok.len() as i64 - (span.1 - span.0) as i64;
    f.splice(span.0..span.1, tok.bytes());
    if hs == 8 && he >= span.1 {
        let n = (he - hs) as i64 + delta;
        f[..8].copy_from_slice(&(n as u64).to_le_bytes());
    }
}

fn apply(mut f: Vec<u8>, m: &Mutation) -> Vec<u8> {
    match m {
        Mutation::BitFlip(p, b) => {
            if !f.is_empty() {
                let i = p % f.len();
                f[i] ^= 1 << b;
            }
        }
        Mutation::Truncate(n) => f.truncate(n % (f.len() + 1)),
        Mutation::Insert(p, v) => {
            let i = p % (f.len() + 1);
            f.splice(i..i, v.iter().copied());
        }
        Mutation::Delete(p, n) => {
            if !f.is_empty() {
                let i = p % f.len();
                let j = (i + n).min(f.len());
                f.drain(i..j);
            }
        }
        Mutation::SetLen(n) => {
            if f.len() >= 8 {
                f[..8].copy_from_slice(&n.to_le_bytes());
            }
        }
        Mutation::Number(i, tok) | Mutation::Str(i, tok) => {
            let spans = token_spans(&f, matches!(m, Mutation::Str(..)));
            if !spans.is_empty() {
                let s = spans[i % spans.len()];
                replace_token(&mut f, s, tok);
            }
        }
        Mutation::Splice(a, other, b) => {
            let a = a % (f.len() + 1);
            let b = b % (other.len() + 1);
            f.truncate(a);
            f.extend_from_slice(&other[b..]);
        }
        Mutation::Append(v) => f.extend_from_slice(v),
    }
    f
}

/// A JSON header object built from loosely typed parts: right and wrong types, huge numbers,
/// offsets that may or may not line up.
fn json_value_for(key: &'static str) -> BoxedStrategy<serde_json::Value> {
    use serde_json::{json, Value};
    match key {
        "dtype" => prop_oneof![
            4 => dtype().prop_map(|d| json!(d.name())),
            1 => "[A-Z0-9_]{0,8}".prop_map(Value::String),
            1 => Just(json!(7)),
        ]
        .boxed(),
        "shape" => prop_oneof![
            6 => prop::collection::vec(prop_oneof![0u64..6, any::<u64>(), Just(1u64 << 40)], 0..5)
                .prop_map(|v| json!(v)),
            1 => Just(json!([-1])),
            1 => Just(json!([1.5])),
            1 => Just(json!("2,2")),
        ]
        .boxed(),
        _ => prop_oneof![
            6 => (0u64..64, 0u64..64).prop_map(|(a, b)| json!([a, b])),
            1 => (any::<u64>(), any::<u64>()).prop_map(|(a, b)| json!([a, b])),
            1 => Just(json!([0])),
            1 => Just(json!([0, 1, 2])),
            1 => Just(json!({"0": 0})),
        ]
        .boxed(),
    }
}

fn json_entry() -> impl Strategy<Value = serde_json::Value> {
    (
        json_value_for("dtype"),
        json_value_for("shape"),
        json_value_for("data_offsets"),
        0u8..16,
    )
        .prop_map(|(d, s, o, drop)| {
            let mut m = serde_json::Map::new();
            if drop != 1 {
                m.insert("dtype".into(), d);
            }
            if drop != 2 {
                m.insert("shape".into(), s);
            }
            if drop != 3 {
                m.insert("data_offsets".into(), o);
            }
            if drop == 4 {
                m.insert("extra".into(), serde_json::json!(1));
            }
            serde_json::Value::Object(m)
        })
}

fn json_header() -> impl Strategy<Value = (String, usize)> {
    (
        prop::collection::vec(("[ab]{1,2}", json_entry()), 0..5),
        prop::option::of(prop_oneof![
            Just(serde_json::json!({"format": "pt"})),
            Just(serde_json::json!({"k": 1})),
            Just(serde_json::json!([1])),
        ]),
        0usize..80,
    )
        .prop_map(|(entries, md, data_len)| {
            // Build the text by hand so duplicate keys survive.
            let mut parts: Vec<String> = entries
                .iter()
                .map(|(k, v)| format!("{}:{}", serde_json::json!(k), v))
                .collect();
            if let Some(md) = md {
                parts.insert(0, format!("\"__metadata__\":{md}"));
            }
            (format!("{{{}}}", parts.join(",")), data_len)
        })
}

// ---- properties ----------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        parse_checked(&bytes);
    }

    #[test]
    fn random_text_after_a_consistent_length_never_panics(text in ".{0,200}", data in 0usize..64) {
        parse_checked(&file_from(text.as_bytes(), data));
    }

    #[test]
    fn valid_files_parse_and_hold_invariants(f in valid_file()) {
        prop_assert!(parse_checked(&f), "a serialized header must parse");
    }

    #[test]
    fn mutated_valid_files_never_panic(f in valid_file(), ms in prop::collection::vec(mutation(), 1..4)) {
        let mut g = f;
        for m in &ms {
            g = apply(g, m);
        }
        parse_checked(&g);
    }

    #[test]
    fn structured_json_headers_never_panic((text, data_len) in json_header()) {
        parse_checked(&file_from(text.as_bytes(), data_len));
    }
}

// Index + shard directories touch the file system: fewer cases.
proptest! {
    #![proptest_config(config(48).clone_with_cases_div(4))]

    #[test]
    fn index_directories_never_panic(
        shards in prop::collection::vec(valid_file(), 1..3),
        index in prop_oneof![
            Just(None),
            prop::collection::btree_map("[ab.]{1,3}", prop_oneof![
                Just("s0.safetensors".to_string()),
                Just("s1.safetensors".to_string()),
                Just("missing.safetensors".to_string()),
                Just("../s0.safetensors".to_string()),
                Just("".to_string()),
            ], 0..5).prop_map(Some),
        ],
        raw_index in prop_oneof![
            4 => Just(None),
            1 => ".{0,40}".prop_map(Some),
            1 => Just(Some("{\"weight_map\": []}".to_string())),
            1 => Just(Some("{\"weight_map\": {\"a\": 1}}".to_string())),
        ],
        mutate in prop::option::of(mutation()),
    ) {
        let dir = tempfile::tempdir().unwrap();
        for (i, s) in shards.iter().enumerate() {
            let bytes = match (&mutate, i) {
                (Some(m), 0) => apply(s.clone(), m),
                _ => s.clone(),
            };
            std::fs::write(dir.path().join(format!("s{i}.safetensors")), bytes).unwrap();
        }
        let idx_path = dir.path().join("model.safetensors.index.json");
        if let Some(text) = raw_index {
            std::fs::write(&idx_path, text).unwrap();
        } else if let Some(map) = index {
            let v = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
            std::fs::write(&idx_path, v.to_string()).unwrap();
        }
        if let Ok(ck) = Checkpoint::open(dir.path()) {
            // Every listed name resolves to a tensor whose bytes lie inside its file.
            let mut seen = HashSet::new();
            for n in &ck.names {
                prop_assert!(seen.insert(n.clone()), "tensor {n} listed twice");
                let (f, t) = ck.find(n).expect("listed name resolves");
                prop_assert_eq!(&t.name, n);
                prop_assert_eq!(f.data(t).len(), t.nbytes());
            }
            prop_assert_eq!(
                ck.total_bytes(),
                ck.files.iter().flat_map(|f| f.header.tensors.iter()).map(|t| t.nbytes() as u64).sum::<u64>()
            );
        }
    }
}

trait DivCases {
    fn clone_with_cases_div(&self, d: u32) -> Config;
}
impl DivCases for Config {
    fn clone_with_cases_div(&self, d: u32) -> Config {
        let mut c = self.clone();
        // Long runs (DQFAST_FUZZ_CASES) scale this property down; the default stays as given.
        if std::env::var("DQFAST_FUZZ_CASES").is_ok() {
            c.cases = (c.cases / d).max(1);
        }
        c
    }
}

// ---- corpus ------------------------------------------------------------------------------

/// Every file in `tests/corpus/` is a whole safetensors file (`*.safetensors`) that must parse
/// or fail cleanly; files named `ok-*` must parse, `bad-*` must fail.
#[test]
fn corpus_replays() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).expect("tests/corpus exists") {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if !name.ends_with(".safetensors") {
            continue;
        }
        let bytes = std::fs::read(&p).unwrap();
        let ok = parse_checked(&bytes);
        if name.starts_with("ok-") {
            assert!(ok, "{name} should parse");
        } else if name.starts_with("bad-") {
            assert!(!ok, "{name} should be refused");
        }
        n += 1;
    }
    assert!(n >= 10, "corpus has only {n} files");
}

/// A header claiming a 1 TB tensor is refused by arithmetic, without allocating it: the parse
/// runs in bounded time and returns Err.
#[test]
fn terabyte_claims_are_refused_without_allocating() {
    for hdr in [
        "{\"w\":{\"dtype\":\"U8\",\"shape\":[1099511627776],\"data_offsets\":[0,1099511627776]}}",
        "{\"w\":{\"dtype\":\"F32\",\"shape\":[1048576,1048576],\"data_offsets\":[0,4398046511104]}}",
        "{\"w\":{\"dtype\":\"F64\",\"shape\":[4294967296,4294967296,4294967296],\"data_offsets\":[0,8]}}",
        "{\"w\":{\"dtype\":\"U8\",\"shape\":[18446744073709551615],\"data_offsets\":[0,18446744073709551615]}}",
    ] {
        assert!(!parse_checked(&file_from(hdr.as_bytes(), 8)), "{hdr}");
    }
}
