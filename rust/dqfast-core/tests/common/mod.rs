//! Helpers shared by the integration tests (each test file has `mod common;`): safetensors files
//! written from given tensors, pseudo-random BF16 data and plan JSON.

// Each test crate uses only some of these.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use dqfast_core::dtype::Dtype;
use dqfast_core::header::serialize_header;
use dqfast_core::plan::{execute_json, validate_json};
use serde_json::{json, Value};

/// (name, dtype, shape, bytes or None for filler 0x3C: small finite values in every float
/// format, finite e4m3).
pub type Spec<'a> = (&'a str, Dtype, Vec<usize>, Option<Vec<u8>>);

/// A safetensors file of the given tensors; returns the file offset of each tensor's data.
pub fn write_file(path: &Path, tensors: &[Spec]) -> Vec<u64> {
    let entries: Vec<(String, Dtype, Vec<usize>)> = tensors
        .iter()
        .map(|(n, d, s, _)| (n.to_string(), *d, s.clone()))
        .collect();
    let (hdr, offs) = serialize_header(&BTreeMap::new(), &entries).unwrap();
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(&hdr).unwrap();
    for ((_, _, _, data), &(a, b)) in tensors.iter().zip(&offs) {
        match data {
            Some(d) => {
                assert_eq!(d.len(), b - a);
                f.write_all(d).unwrap()
            }
            None => f.write_all(&vec![0x3C; b - a]).unwrap(),
        }
    }
    offs.iter().map(|&(a, _)| (hdr.len() + a) as u64).collect()
}

/// Pseudo-random finite BF16 values (xorshift): random sign and mantissa, exponent in
/// `exp_min .. exp_min + exps`.
pub struct Bf16Rng {
    pub state: u64,
    pub exp_min: u16,
    pub exps: u64,
}

impl Bf16Rng {
    /// `n` values as little-endian bytes; the state carries on to the next call.
    pub fn data(&mut self, n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n * 2);
        for _ in 0..n {
            let s = &mut self.state;
            *s ^= *s << 13;
            *s ^= *s >> 7;
            *s ^= *s << 17;
            let sign = (*s >> 63) as u16;
            let exp = self.exp_min + ((*s >> 40) % self.exps) as u16;
            let v = (sign << 15) | (exp << 7) | (*s & 0x7F) as u16;
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }
}

pub fn src(t: &str) -> Value {
    json!({"source": 0, "tensor": t})
}

pub fn plan_of(source: &Path, out: &Path, tensors: Value) -> Value {
    json!({"sources": [source], "output_dir": out, "fsync": false, "tensors": tensors})
}

/// The error of a plan that validate and execute must both refuse, with the same message.
pub fn err_of(plan: &Value) -> String {
    let s = plan.to_string();
    let v = validate_json(&s).expect_err("validate_plan must refuse what execute refuses");
    let e = execute_json(&s).unwrap_err().to_string();
    assert_eq!(v.to_string(), e, "validate and execute disagree");
    e
}
