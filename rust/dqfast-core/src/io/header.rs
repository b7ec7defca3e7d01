//! Parsing and complete validation of safetensors headers.
//!
//! Everything is checked before any tensor byte is touched: header length against the file,
//! JSON shape, dtype names, `prod(shape) * dtype size == end - begin` (with overflow checks, so
//! a hostile header claiming a 1 TB tensor is refused, not allocated), offsets inside the file,
//! and — as huggingface/safetensors requires — tensors tiling the data section exactly, with no
//! overlap and no gap.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Map, Value};

use crate::dtype::Dtype;
use crate::error::{Error, Result};

/// The largest header we accept (huggingface/safetensors uses the same bound).
pub const MAX_HEADER_BYTES: u64 = 100 * 1024 * 1024;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Byte range relative to the start of the data section.
    pub begin: usize,
    pub end: usize,
}

impl TensorInfo {
    pub fn nbytes(&self) -> usize {
        self.end - self.begin
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

#[derive(Clone, Debug, Default)]
pub struct Header {
    /// Tensors in file order (sorted by offset).
    pub tensors: Vec<TensorInfo>,
    pub metadata: BTreeMap<String, String>,
    /// Absolute offset of the data section in the file (8 + header length).
    pub data_start: usize,
}

/// Checked `prod(shape) * elem` — `None` on overflow.
pub fn checked_nbytes(shape: &[usize], elem: usize) -> Option<usize> {
    shape.iter().try_fold(elem, |acc, &d| acc.checked_mul(d))
}

/// Parse and validate the header of a safetensors file whose complete bytes are `bytes`.
pub fn parse_header(path: &Path, bytes: &[u8]) -> Result<Header> {
    let file_len = bytes.len() as u64;
    if file_len < 8 {
        return Err(Error::header(
            path,
            format!("file is {file_len} bytes, too short for the 8-byte header length"),
        ));
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    if n > MAX_HEADER_BYTES {
        return Err(Error::header(
            path,
            format!("header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit"),
        ));
    }
    if 8 + n > file_len {
        return Err(Error::header(
            path,
            format!("header length {n} runs past the end of the {file_len}-byte file (truncated?)"),
        ));
    }
    let raw = &bytes[8..8 + n as usize];
    let text = std::str::from_utf8(raw)
        .map_err(|e| Error::header(path, format!("header is not UTF-8: {e}")))?;
    if !text.starts_with('{') {
        return Err(Error::header(path, "header does not start with '{'"));
    }
    let entries: OrderedEntries = serde_json::from_str(text)
        .map_err(|e| Error::header(path, format!("header is not valid JSON: {e}")))?;
    let data_start = 8 + n as usize;
    let data_len = bytes.len() - data_start;
    parse_header_object(path, &entries.0, data_start, data_len)
}

/// The top-level object as written, duplicates kept so that they can be refused.
struct OrderedEntries(Vec<(String, Value)>);

impl<'de> serde::Deserialize<'de> for OrderedEntries {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = OrderedEntries;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> std::result::Result<OrderedEntries, A::Error> {
                let mut v = Vec::new();
                while let Some((k, val)) = m.next_entry::<String, Value>()? {
                    v.push((k, val));
                }
                Ok(OrderedEntries(v))
            }
        }
        d.deserialize_map(V)
    }
}

fn parse_header_object(
    path: &Path,
    obj: &[(String, Value)],
    data_start: usize,
    data_len: usize,
) -> Result<Header> {
    let mut metadata = BTreeMap::new();
    let mut tensors = Vec::with_capacity(obj.len());
    let mut seen = std::collections::HashSet::with_capacity(obj.len());
    for (name, v) in obj {
        if !seen.insert(name.as_str()) {
            return Err(Error::tensor(
                path,
                name,
                "name appears twice in the header",
            ));
        }
        if name == "__metadata__" {
            let m = v
                .as_object()
                .ok_or_else(|| Error::header(path, "__metadata__ is not an object"))?;
            for (k, mv) in m {
                let s = mv.as_str().ok_or_else(|| {
                    Error::header(
                        path,
                        format!("__metadata__ value for '{k}' is not a string"),
                    )
                })?;
                metadata.insert(k.clone(), s.to_string());
            }
            continue;
        }
        tensors.push(parse_tensor_entry(path, name, v, data_len)?);
    }
    tensors.sort_by_key(|t| (t.begin, t.end));
    let mut offset = 0usize;
    for t in &tensors {
        if t.begin < offset {
            return Err(Error::tensor(
                path,
                &t.name,
                format!(
                    "data_offsets [{}, {}] overlap the previous tensor (ends at {offset})",
                    t.begin, t.end
                ),
            ));
        }
        if t.begin > offset {
            return Err(Error::tensor(
                path,
                &t.name,
                format!(
                    "data_offsets [{}, {}] leave a gap after byte {offset}",
                    t.begin, t.end
                ),
            ));
        }
        offset = t.end;
    }
    if offset != data_len {
        return Err(Error::header(
            path,
            format!("tensors cover {offset} bytes but the data section holds {data_len} bytes"),
        ));
    }
    Ok(Header {
        tensors,
        metadata,
        data_start,
    })
}

fn parse_tensor_entry(path: &Path, name: &str, v: &Value, data_len: usize) -> Result<TensorInfo> {
    let bad = |msg: String| Error::tensor(path, name, msg);
    let o = v
        .as_object()
        .ok_or_else(|| bad("entry is not an object".into()))?;
    for key in o.keys() {
        if !matches!(key.as_str(), "dtype" | "shape" | "data_offsets") {
            return Err(bad(format!("unknown key '{key}'")));
        }
    }
    let dtype_s = o
        .get("dtype")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("missing or non-string 'dtype'".into()))?;
    let dtype = Dtype::parse(dtype_s).ok_or_else(|| bad(format!("unknown dtype '{dtype_s}'")))?;
    let shape_v = o
        .get("shape")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("missing or non-array 'shape'".into()))?;
    let mut shape = Vec::with_capacity(shape_v.len());
    for d in shape_v {
        let d = d
            .as_u64()
            .ok_or_else(|| bad(format!("shape entry {d} is not a non-negative integer")))?;
        shape.push(usize::try_from(d).map_err(|_| bad(format!("shape entry {d} too large")))?);
    }
    let offs = o
        .get("data_offsets")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("missing or non-array 'data_offsets'".into()))?;
    if offs.len() != 2 {
        return Err(bad(format!(
            "data_offsets has {} entries, expected 2",
            offs.len()
        )));
    }
    let get = |i: usize| -> Result<usize> {
        offs[i]
            .as_u64()
            .and_then(|x| usize::try_from(x).ok())
            .ok_or_else(|| bad(format!("data_offsets[{i}] is not a valid offset")))
    };
    let (begin, end) = (get(0)?, get(1)?);
    if end < begin {
        return Err(bad(format!(
            "data_offsets [{begin}, {end}] end before they begin"
        )));
    }
    if end > data_len {
        return Err(bad(format!(
            "data_offsets [{begin}, {end}] run past the data section ({data_len} bytes; file truncated?)"
        )));
    }
    let expected = checked_nbytes(&shape, dtype.size())
        .ok_or_else(|| bad(format!("shape {shape:?} x {dtype} overflows")))?;
    if expected != end - begin {
        return Err(bad(format!(
            "shape {shape:?} of {dtype} needs {expected} bytes but data_offsets span {}",
            end - begin
        )));
    }
    Ok(TensorInfo {
        name: name.to_string(),
        dtype,
        shape,
        begin,
        end,
    })
}

/// Serialized header bytes and each tensor's `(begin, end)` data offsets.
pub type SerializedHeader = (Vec<u8>, Vec<(usize, usize)>);

/// Serialize a header for writing: `__metadata__` first, then tensors in the given order with
/// contiguous offsets; padded with spaces to a multiple of 8 bytes as huggingface/safetensors
/// does, so the data section is aligned.
pub fn serialize_header(
    metadata: &BTreeMap<String, String>,
    tensors: &[(String, Dtype, Vec<usize>)],
) -> Result<SerializedHeader> {
    let mut map = Map::new();
    if !metadata.is_empty() {
        let m: Map<String, Value> = metadata
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        map.insert("__metadata__".into(), Value::Object(m));
    }
    let mut offsets = Vec::with_capacity(tensors.len());
    let mut off = 0usize;
    for (name, dtype, shape) in tensors {
        let nbytes = checked_nbytes(shape, dtype.size())
            .ok_or_else(|| Error::Plan(format!("tensor '{name}': shape {shape:?} overflows")))?;
        let entry = serde_json::json!({
            "dtype": dtype.name(),
            "shape": shape,
            "data_offsets": [off, off + nbytes],
        });
        if map.insert(name.clone(), entry).is_some() {
            return Err(Error::Plan(format!(
                "tensor '{name}' written twice in one shard"
            )));
        }
        let end = off
            .checked_add(nbytes)
            .ok_or_else(|| Error::Plan(format!("tensor '{name}': shard size overflows")))?;
        offsets.push((off, end));
        off = end;
    }
    let mut json = serde_json::to_vec(&Value::Object(map)).expect("header serializes");
    while !(8 + json.len()).is_multiple_of(8) {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + json.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    Ok((out, offsets))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(header: &str, data: &[u8]) -> Vec<u8> {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn roundtrip_serialize_parse() {
        let mut md = BTreeMap::new();
        md.insert("format".to_string(), "pt".to_string());
        let tensors = vec![
            ("a".to_string(), Dtype::BF16, vec![2, 3]),
            ("b".to_string(), Dtype::F32, vec![]),
            ("c".to_string(), Dtype::F8_E4M3, vec![0, 4]),
        ];
        let (hdr, offs) = serialize_header(&md, &tensors).unwrap();
        assert_eq!(hdr.len() % 8, 0);
        assert_eq!(offs, vec![(0, 12), (12, 16), (16, 16)]);
        let mut file = hdr.clone();
        file.extend(vec![0u8; 16]);
        let h = parse_header(Path::new("x"), &file).unwrap();
        assert_eq!(h.metadata, md);
        assert_eq!(h.tensors.len(), 3);
        assert_eq!(h.tensors[0].name, "a");
        assert_eq!(h.tensors[1].shape, Vec::<usize>::new());
        assert_eq!(h.data_start, hdr.len());
    }

    fn err_of(file: &[u8]) -> String {
        parse_header(Path::new("f.safetensors"), file)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn rejects_malformed_headers() {
        assert!(err_of(b"1234").contains("too short"));
        let mut huge = (1u64 << 40).to_le_bytes().to_vec();
        huge.extend(b"{}");
        assert!(err_of(&huge).contains("limit"));
        let mut past = 100u64.to_le_bytes().to_vec();
        past.extend(b"{}");
        assert!(err_of(&past).contains("past the end"));
        assert!(err_of(&file_with("[1]", b"")).contains("start with"));
        assert!(err_of(&file_with("{\"a\":", b"")).contains("not valid JSON"));
        assert!(err_of(&file_with(
            "{\"a\":{\"dtype\":\"Q9\",\"shape\":[1],\"data_offsets\":[0,1]}}",
            b"x"
        ))
        .contains("unknown dtype 'Q9'"));
        assert!(err_of(&file_with(
            "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,4]}}",
            b"xxxx"
        ))
        .contains("needs 8 bytes"));
        assert!(err_of(&file_with(
            "{\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]}}",
            b"xx"
        ))
        .contains("run past the data section"));
        assert!(err_of(&file_with(
            "{\"a\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[0,2]},\"b\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[1,3]}}",
            b"xxx"
        ))
        .contains("overlap"));
        assert!(err_of(&file_with(
            "{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[1,2]}}",
            b"xx"
        ))
        .contains("gap"));
        assert!(err_of(&file_with(
            "{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}",
            b"xx"
        ))
        .contains("data section holds 2"));
        // A 1 TB claim is refused by arithmetic, never allocated.
        assert!(err_of(&file_with(
            "{\"a\":{\"dtype\":\"F32\",\"shape\":[1000000,1000000,1000000,1000000],\"data_offsets\":[0,1]}}",
            b"x"
        ))
        .contains("overflows"));
        assert!(err_of(&file_with(
            "{\"a\":{\"dtype\":\"U8\",\"shape\":[-1],\"data_offsets\":[0,1]}}",
            b"x"
        ))
        .contains("non-negative"));
        assert!(err_of(&file_with("{\"__metadata__\":{\"k\":1}}", b"")).contains("not a string"));
        assert!(err_of(&file_with(
            "{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[1,2]}}",
            b"xx"
        ))
        .contains("twice"));
    }
}
