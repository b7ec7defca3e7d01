//! Output shards: which tensor goes into which file (the source's files by default, or greedy by
//! size), their names, the index json, and the stream writer for tensors handed over one at a
//! time. Files are written under a [`StagedDir`](crate::io::staging::StagedDir).

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::io::staging::StagedDir;

/// How tensors are grouped into shards: greedy in plan order, a new shard when the next tensor
/// would push the current one past `max_bytes` (huggingface's rule; a single tensor larger than
/// the limit gets a shard of its own).
pub fn assign_shards(sizes: &[u64], max_bytes: u64) -> Vec<std::ops::Range<usize>> {
    let mut shards = Vec::new();
    let mut start = 0;
    let mut acc = 0u64;
    for (i, &s) in sizes.iter().enumerate() {
        if i > start && acc + s > max_bytes {
            shards.push(start..i);
            start = i;
            acc = 0;
        }
        acc += s;
    }
    if start < sizes.len() || sizes.is_empty() {
        shards.push(start..sizes.len());
    }
    shards
}

/// `prefix.safetensors` for one shard, else `prefix-0000i-of-0000n.safetensors`.
pub fn shard_file_name(prefix: &str, i: usize, n: usize) -> String {
    if n == 1 {
        format!("{prefix}.safetensors")
    } else {
        format!("{prefix}-{:05}-of-{:05}.safetensors", i + 1, n)
    }
}

/// The shard files of the checkpoint a plan converts (its first source), as the output keeps them:
/// the default layout, SGLang's builders' rule (issue #13) — every output tensor goes into the file
/// of the source tensor it came from, under the same file name, and the index is named like the
/// source's.
#[derive(Debug, Clone)]
pub struct SourceLayout {
    /// File names, sorted (the order the shards are written in, as SGLang's tools do).
    pub files: Vec<String>,
    /// Tensor name -> file name.
    pub held: HashMap<String, String>,
    /// The source's index file name, or `<stem>.safetensors.index.json` for a single file.
    pub index_name: String,
}

impl SourceLayout {
    /// The layout of an opened checkpoint. A diffusers variant's names lose their variant tag
    /// (`x.fp16-00001-of-00002.safetensors` -> `x-00001-of-00002.safetensors`, index
    /// `x.safetensors.index.fp16.json` -> `x.safetensors.index.json`): the output is a model's
    /// main weights, which loaders look for under the plain names.
    pub fn of(ck: &crate::checkpoint::Checkpoint) -> SourceLayout {
        let name = |p: &Path| main_name(&p.file_name().unwrap_or_default().to_string_lossy());
        let mut files: Vec<String> = ck.files.iter().map(|f| name(&f.path)).collect();
        files.sort();
        files.dedup();
        let held = ck
            .files
            .iter()
            .flat_map(|f| {
                let n = name(&f.path);
                f.header
                    .tensors
                    .iter()
                    .map(move |t| (t.name.clone(), n.clone()))
            })
            .collect();
        // `<stem>.safetensors.index.json`, the stem of the index (or of the single file).
        let named_by = match &ck.index {
            Some(ix) => ix
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .to_string(),
            None => files.first().cloned().unwrap_or_default(),
        };
        let stem = named_by
            .split_once(".safetensors")
            .map_or(named_by.as_str(), |(s, _)| s);
        let stem = stem.split_once('.').map_or(stem, |(s, _)| s);
        SourceLayout {
            files,
            held,
            index_name: format!("{stem}.safetensors.index.json"),
        }
    }
}

/// A shard file name without its diffusers variant tag: `<stem>.<variant>.safetensors` ->
/// `<stem>.safetensors`, `<stem>.<variant>-00001-of-00002.safetensors` ->
/// `<stem>-00001-of-00002.safetensors` (the reader's rule: a dot inside the name before
/// `.safetensors` marks a variant); other names unchanged.
pub fn main_name(file: &str) -> String {
    let Some(base) = file.strip_suffix(".safetensors") else {
        return file.to_string();
    };
    let Some((stem, variant)) = base.split_once('.') else {
        return file.to_string();
    };
    // `fp16-00001-of-00002`: keep the shard numbering.
    let shard = variant.rsplitn(4, '-').collect::<Vec<_>>();
    let numbered = shard.len() == 4
        && shard[1] == "of"
        && [shard[0], shard[2]]
            .iter()
            .all(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()));
    if numbered {
        format!("{stem}-{}-of-{}.safetensors", shard[2], shard[0])
    } else {
        format!("{stem}.safetensors")
    }
}

/// One output tensor as [`source_shards`] sees it.
#[derive(Debug, Clone, Default)]
pub struct Placement<'a> {
    pub name: &'a str,
    /// The file names of the source tensors the op reads from the converted checkpoint, in the
    /// op's order (the first is its primary source).
    pub source_files: Vec<String>,
    /// The op reads no tensor at all (`f32`, `scale_from_amax`: a synthesized scale).
    pub synthesized: bool,
    /// An output this one must sit beside (a `scale_of`'s weight), by plan position.
    pub beside: Option<usize>,
}

/// Which output shard each tensor goes to, keeping the source's files. In order of precedence:
/// 1. a `scale_of` beside its weight (the engine computes the scale while writing the weight);
/// 2. a synthesized tensor (no source tensor: `f32`, `scale_from_amax`) beside its module's
///    weight, `<module>.weight` with `<module>` the name up to the last dot — SGLang's FP8 tool
///    writes a quantized weight's new scales into the weight's file, wherever the export had them;
/// 3. the file where the source holds a tensor of the same name (converted or replaced in place:
///    an FP8 weight, a BF16 fallback read from another checkpoint, an NVFP4 export's scales);
/// 4. the file of the op's primary source tensor (renamed, sliced or fused tensors);
/// 5. otherwise (a scratch input, a synthesized tensor of no module) beside the tensor before it
///    in the plan, else the source's first file.
///
/// Returns the shards to write, in the source's file order: (file name, plan positions in plan
/// order). A source file that receives no tensor is not written. With no source file at all,
/// every tensor goes into one `fallback` shard.
pub fn source_shards(
    layout: &SourceLayout,
    tensors: &[Placement],
    fallback: &str,
) -> Vec<(String, Vec<usize>)> {
    let pos: HashMap<&str, usize> = tensors
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name, i))
        .collect();
    let weight_of = |t: &Placement| -> Option<usize> {
        let (module, _) = t.name.rsplit_once('.')?;
        pos.get(format!("{module}.weight").as_str())
            .copied()
            .filter(|&j| j != pos[t.name])
    };
    // Rules 3 and 4 first: they need no other tensor's placement.
    let mut at: Vec<Option<String>> = tensors
        .iter()
        .map(|t| {
            if t.beside.is_some() || (t.synthesized && weight_of(t).is_some()) {
                return None;
            }
            layout
                .held
                .get(t.name)
                .cloned()
                .or_else(|| t.source_files.first().cloned())
        })
        .collect();
    let default = layout
        .files
        .first()
        .cloned()
        .unwrap_or_else(|| fallback.to_string());
    for i in 0..tensors.len() {
        if at[i].is_some() {
            continue;
        }
        let t = &tensors[i];
        let next_to = match t.beside {
            Some(j) => Some(j),
            None if t.synthesized => weight_of(t),
            None => None,
        };
        let beside = next_to.and_then(|j| at[j].clone());
        let previous = i.checked_sub(1).and_then(|j| at[j].clone());
        at[i] = Some(beside.or(previous).unwrap_or_else(|| default.clone()));
    }
    let mut shards: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, f) in at.into_iter().enumerate() {
        shards
            .entry(f.expect("assigned above"))
            .or_default()
            .push(i);
    }
    if shards.is_empty() {
        // An empty plan still writes one (empty) shard, as the size-based layout does.
        shards.insert(default, Vec::new());
    }
    shards.into_iter().collect()
}

/// The index json huggingface and diffusers read: `{"metadata": {"total_size"}, "weight_map"}`.
pub fn index_json(total_size: u64, weight_map: &BTreeMap<String, String>) -> String {
    let v = serde_json::json!({
        "metadata": {"total_size": total_size},
        "weight_map": weight_map,
    });
    serde_json::to_string_pretty(&v).expect("index serializes") + "\n"
}

/// Header bytes reserved at the start of every shard a [`StreamWriter`] writes (beyond the
/// metadata): room for about 400 tensor entries. Shards close early rather than overflow it, so
/// tensor data is written once, in place. A multiple of 4096, so tensor data starts page-aligned.
pub const STREAM_HEADER_RESERVE: usize = 64 << 10;

/// The same for a shard named by the caller ([`StreamWriter::write_tensor_to`]): it cannot close
/// early and continue in another file, so it reserves room for about 6,500 entries (a diffusers
/// shard of 5 GB holds a few hundred). The unused part is spaces in the header, as the format
/// allows.
pub const NAMED_HEADER_RESERVE: usize = 1 << 20;

/// One shard a [`StreamWriter`] is filling: data goes at `reserve + offset`, the header is
/// written into the reserved space when the shard is closed.
struct StreamShard {
    /// The file name the caller gave (None: named by position when the writer finishes).
    name: Option<String>,
    /// Header bytes reserved at the start of the file.
    reserve: usize,
    part: PathBuf,
    file: fs::File,
    tensors: Vec<(String, crate::dtype::Dtype, Vec<usize>)>,
    data_bytes: u64,
    header_bytes: usize,
}

impl StreamShard {
    /// An empty shard writing into a new `part` file (the one place a shard file is created);
    /// `header_bytes`: what its header holds before any tensor entry.
    fn create(
        part: PathBuf,
        name: Option<String>,
        reserve: usize,
        header_bytes: usize,
    ) -> Result<StreamShard> {
        let file = fs::File::create(&part).map_err(|e| Error::io(&part, "create", e))?;
        Ok(StreamShard {
            name,
            reserve,
            part,
            file,
            tensors: Vec::new(),
            data_bytes: 0,
            header_bytes,
        })
    }
}

/// Writes tensors handed over one at a time (sizes not known in advance) into sharded safetensors
/// under a [`StagedDir`]: each tensor's bytes are written once, at their final offset; headers
/// (the same [`serialize_header`](crate::header::serialize_header) as the build engine, padded
/// with spaces to the reserved size, as the format allows), shard names, the index and the
/// atomic move into place happen in [`StreamWriter::finish`]. Dropped unfinished, it leaves
/// nothing at the output path.
pub struct StreamWriter {
    stage: Option<StagedDir>,
    overwrite: bool,
    max_shard_bytes: u64,
    prefix: String,
    metadata: BTreeMap<String, String>,
    reserve: usize,
    always_index: bool,
    fsync: bool,
    names: std::collections::HashSet<String>,
    files: std::collections::HashSet<String>,
    done: Vec<StreamShard>,
    cur: Option<StreamShard>,
    /// Shards named by the caller, by file name.
    named: BTreeMap<String, StreamShard>,
}

/// Serialized length of one header entry, comma included (an upper bound of what it adds).
fn entry_bytes(name: &str, dtype: crate::dtype::Dtype, shape: &[usize], end: u64) -> usize {
    let e = serde_json::json!({"dtype": dtype.name(), "shape": shape, "data_offsets": [end, end]});
    serde_json::to_string(name)
        .map(|n| n.len())
        .unwrap_or(name.len() * 6 + 2)
        + 2
        + serde_json::to_string(&e).map(|x| x.len()).unwrap_or(0)
}

/// Write one tensor's bytes at their final offset in `c` and record its header entry.
fn append(
    c: &mut StreamShard,
    name: &str,
    dtype: crate::dtype::Dtype,
    shape: &[usize],
    data: &[u8],
) -> Result<()> {
    let entry = entry_bytes(name, dtype, shape, c.data_bytes + data.len() as u64);
    if c.header_bytes + entry > c.reserve {
        return Err(Error::Plan(if c.tensors.is_empty() {
            format!(
                "tensor '{name}': its header entry alone exceeds {} bytes",
                c.reserve
            )
        } else {
            format!(
                "tensor '{name}': the shard's {}-byte header space is full ({} tensors)",
                c.reserve,
                c.tensors.len()
            )
        }));
    }
    use std::os::unix::fs::FileExt;
    c.file
        .write_all_at(data, c.reserve as u64 + c.data_bytes)
        .map_err(|e| Error::io(&c.part, "write", e))?;
    c.data_bytes += data.len() as u64;
    c.header_bytes += entry;
    c.tensors.push((name.to_string(), dtype, shape.to_vec()));
    Ok(())
}

impl StreamWriter {
    pub fn create(
        output: &Path,
        overwrite: bool,
        max_shard_bytes: u64,
        prefix: &str,
        metadata: BTreeMap<String, String>,
        always_index: bool,
        fsync: bool,
    ) -> Result<StreamWriter> {
        if prefix.is_empty() || prefix.contains('/') {
            return Err(Error::Plan(format!(
                "file prefix '{prefix}' is not a file name"
            )));
        }
        let meta_bytes = serde_json::to_string(&metadata)
            .map(|m| m.len())
            .unwrap_or(0);
        let reserve = (meta_bytes + 32 + STREAM_HEADER_RESERVE).div_ceil(4096) * 4096;
        Ok(StreamWriter {
            stage: Some(StagedDir::create(output, overwrite)?),
            overwrite,
            max_shard_bytes,
            prefix: prefix.to_string(),
            metadata,
            reserve,
            always_index,
            fsync,
            names: Default::default(),
            files: Default::default(),
            done: Vec::new(),
            cur: None,
            named: BTreeMap::new(),
        })
    }

    /// The staging directory (for tests and error messages).
    pub fn staging_dir(&self) -> Option<&Path> {
        self.stage.as_ref().map(|s| s.tmp.as_path())
    }

    fn stage(&self) -> Result<&StagedDir> {
        self.stage
            .as_ref()
            .ok_or_else(|| Error::Plan("the writer is already finished".into()))
    }

    fn close_current(&mut self) {
        if let Some(s) = self.cur.take() {
            self.done.push(s);
        }
    }

    /// Append one tensor (`data` is its little-endian bytes, `shape` its dimensions) to the
    /// size-based shards (`max_shard_bytes`, named `<prefix>-0000i-of-0000n.safetensors`).
    pub fn write_tensor(
        &mut self,
        name: &str,
        dtype: crate::dtype::Dtype,
        shape: &[usize],
        data: &[u8],
    ) -> Result<()> {
        self.write_tensor_to(None, name, dtype, shape, data)
    }

    /// [`StreamWriter::write_tensor`] into the shard file `shard` (e.g. the source's file the
    /// tensor came from) when given. A writer uses named shards or size-based ones, not both.
    pub fn write_tensor_to(
        &mut self,
        shard: Option<&str>,
        name: &str,
        dtype: crate::dtype::Dtype,
        shape: &[usize],
        data: &[u8],
    ) -> Result<()> {
        let tmp = self.stage()?.tmp.clone();
        let nbytes = crate::header::checked_nbytes(shape, dtype.size())
            .ok_or_else(|| Error::Plan(format!("tensor '{name}': shape {shape:?} overflows")))?;
        if nbytes != data.len() {
            return Err(Error::Plan(format!(
                "tensor '{name}': {} bytes given for {dtype} {shape:?} ({nbytes} bytes)",
                data.len()
            )));
        }
        if name == "__metadata__" || name.is_empty() {
            return Err(Error::Plan(format!("'{name}' is not a tensor name")));
        }
        if self.names.contains(name) {
            return Err(Error::Plan(format!("tensor '{name}' written twice")));
        }
        let mixed = match shard {
            Some(_) => self.cur.is_some() || !self.done.is_empty(),
            None => !self.named.is_empty(),
        };
        if mixed {
            return Err(Error::Plan(format!(
                "tensor '{name}': a writer puts every tensor in a named shard or every tensor in \
                 size-based shards, not both"
            )));
        }
        if let Some(file) = shard {
            return self.write_named(&tmp, file, name, dtype, shape, data);
        }
        // huggingface's greedy rule (as `assign_shards`), and a new shard before the header
        // outgrows its reserved space.
        if let Some(c) = &self.cur {
            let entry = entry_bytes(name, dtype, shape, c.data_bytes + nbytes as u64);
            if c.data_bytes + nbytes as u64 > self.max_shard_bytes
                || c.header_bytes + entry > self.reserve
            {
                self.close_current();
            }
        }
        if self.cur.is_none() {
            let part = tmp.join(format!(".shard-{}.part", self.done.len()));
            let meta = serde_json::json!({"__metadata__": self.metadata}).to_string();
            self.cur = Some(StreamShard::create(
                part,
                None,
                self.reserve,
                8 + meta.len() + 8,
            )?);
        }
        let c = self.cur.as_mut().expect("opened above");
        append(c, name, dtype, shape, data)?;
        self.names.insert(name.to_string());
        Ok(())
    }

    fn write_named(
        &mut self,
        tmp: &Path,
        file: &str,
        name: &str,
        dtype: crate::dtype::Dtype,
        shape: &[usize],
        data: &[u8],
    ) -> Result<()> {
        if !file.ends_with(".safetensors") || file.contains('/') || file.starts_with('.') {
            return Err(Error::Plan(format!(
                "tensor '{name}': shard '{file}' is not a plain <name>.safetensors file name"
            )));
        }
        if !self.named.contains_key(file) {
            let part = tmp.join(format!(".named-{}.part", self.named.len()));
            let meta = serde_json::json!({"__metadata__": self.metadata}).to_string();
            let reserve = (meta.len() + 32 + NAMED_HEADER_RESERVE).div_ceil(4096) * 4096;
            let shard =
                StreamShard::create(part, Some(file.to_string()), reserve, 8 + meta.len() + 8)?;
            self.named.insert(file.to_string(), shard);
        }
        let c = self.named.get_mut(file).expect("inserted above");
        append(c, name, dtype, shape, data).map_err(|e| match e {
            Error::Plan(m) => Error::Plan(format!("shard '{file}': {m}")),
            e => e,
        })?;
        self.names.insert(name.to_string());
        Ok(())
    }

    /// A non-tensor file of the output directory (config.json, a README).
    pub fn write_file(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let tmp = self.stage()?.tmp.clone();
        if name.is_empty()
            || name.contains('/')
            || name.starts_with('.')
            || name.ends_with(".safetensors")
            || name.ends_with(".index.json")
            || !self.files.insert(name.to_string())
        {
            return Err(Error::Plan(format!(
                "extra file name '{name}' not allowed (a plain new name, not a shard or index)"
            )));
        }
        let p = tmp.join(name);
        fs::write(&p, bytes).map_err(|e| Error::io(&p, "write", e))?;
        if self.fsync {
            fs::File::open(&p)
                .and_then(|f| f.sync_all())
                .map_err(|e| Error::io(&p, "fsync", e))?;
        }
        Ok(())
    }

    /// Write the headers, name the shards, write the index and move the directory into place.
    /// Returns the shard file names and the total tensor bytes.
    pub fn finish(&mut self) -> Result<(Vec<String>, u64)> {
        let tmp = self.stage()?.tmp.clone();
        self.close_current();
        self.done
            .extend(std::mem::take(&mut self.named).into_values());
        if self.done.is_empty() {
            // No tensor at all: one empty shard, as the engine writes for an empty plan.
            let part = tmp.join(".shard-0.part");
            self.done
                .push(StreamShard::create(part, None, self.reserve, 0)?);
        }
        let n = self.done.len();
        let mut names = Vec::with_capacity(n);
        let mut weight_map = BTreeMap::new();
        let mut total = 0u64;
        use std::os::unix::fs::FileExt;
        for (i, s) in self.done.iter().enumerate() {
            let (mut hdr, _) = crate::header::serialize_header(&self.metadata, &s.tensors)?;
            if hdr.len() > s.reserve {
                return Err(Error::Internal(format!(
                    "shard header of {} bytes outgrew its {} reserved bytes",
                    hdr.len(),
                    s.reserve
                )));
            }
            hdr.resize(s.reserve, b' ');
            hdr[..8].copy_from_slice(&((s.reserve - 8) as u64).to_le_bytes());
            s.file
                .write_all_at(&hdr, 0)
                .map_err(|e| Error::io(&s.part, "write", e))?;
            if self.fsync {
                s.file
                    .sync_all()
                    .map_err(|e| Error::io(&s.part, "fsync", e))?;
            }
            let fname = s
                .name
                .clone()
                .unwrap_or_else(|| shard_file_name(&self.prefix, i, n));
            let dst = tmp.join(&fname);
            fs::rename(&s.part, &dst).map_err(|e| Error::io(&s.part, "rename", e))?;
            for (t, _, _) in &s.tensors {
                weight_map.insert(t.clone(), fname.clone());
            }
            total += s.data_bytes;
            names.push(fname);
        }
        if n > 1 || self.always_index {
            let p = tmp.join(format!("{}.safetensors.index.json", self.prefix));
            fs::write(&p, index_json(total, &weight_map)).map_err(|e| Error::io(&p, "write", e))?;
        }
        self.done.clear();
        let stage = self.stage.take().expect("checked above");
        stage.commit(self.overwrite)?;
        Ok((names, total))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::Checkpoint;
    use crate::dtype::Dtype;

    /// A temp dir and a [`StreamWriter`] (no metadata, no fsync) into its `out` (not yet there).
    fn writer_in_tmp(
        max_shard_bytes: u64,
        prefix: &str,
        always_index: bool,
    ) -> (tempfile::TempDir, PathBuf, StreamWriter) {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("out");
        let w = StreamWriter::create(
            &out,
            false,
            max_shard_bytes,
            prefix,
            BTreeMap::new(),
            always_index,
            false,
        )
        .unwrap();
        (d, out, w)
    }

    #[test]
    fn shards_split_greedily() {
        assert_eq!(assign_shards(&[4, 4, 4], 8), vec![0..2, 2..3]);
        assert_eq!(assign_shards(&[10, 1], 8), vec![0..1, 1..2]);
        assert_eq!(assign_shards(&[1, 10, 1], 8), vec![0..1, 1..2, 2..3]);
        assert_eq!(assign_shards(&[], 8), vec![0..0]);
        assert_eq!(assign_shards(&[3, 3, 2], 8), vec![0..3]);
    }

    fn lay(held: &[(&str, &str)]) -> SourceLayout {
        let mut files: Vec<String> = held.iter().map(|(_, f)| f.to_string()).collect();
        files.sort();
        files.dedup();
        SourceLayout {
            files,
            held: held
                .iter()
                .map(|(t, f)| (t.to_string(), f.to_string()))
                .collect(),
            index_name: "i.json".into(),
        }
    }

    fn place<'a>(name: &'a str, files: &[&str], beside: Option<usize>) -> Placement<'a> {
        Placement {
            name,
            source_files: files.iter().map(|f| f.to_string()).collect(),
            synthesized: false,
            beside,
        }
    }

    fn synth(name: &str) -> Placement<'_> {
        Placement {
            name,
            synthesized: true,
            ..Default::default()
        }
    }

    #[test]
    fn source_shards_follow_the_source_files() {
        let l = lay(&[
            ("a.weight", "1"),
            ("b.weight", "1"),
            ("c.weight", "2"),
            ("c.weight_scale", "1"),
            ("c.bias", "1"),
        ]);
        let t = [
            synth("c.input_scale"),          // 0: its module's weight (2), though first
            place("a.weight", &["1"], None), // 1: held by the source in 1
            place("b.weight", &["other"], None), // 2: held in 1, whatever file it is read from
            place("c.weight", &["2"], None), // 3
            place("x.weight_scale", &[], Some(1)), // 4: beside a.weight (scale_of)
            place("c.q", &["2", "1"], None), // 5: the primary source's file
            synth("free"),                   // 6: beside the tensor before it
            synth("c.weight_scale"),         // 7: beside its weight, not where it was held
            place("c.bias", &["1"], None),   // 8: read from the source: where it was
        ];
        assert_eq!(
            source_shards(&l, &t, "f"),
            vec![
                ("1".into(), vec![1, 2, 4, 8]),
                ("2".into(), vec![0, 3, 5, 6, 7])
            ]
        );
        // A scale_of follows its weight even when the source holds a tensor of its own name.
        let l = lay(&[("w", "1"), ("w_scale", "2")]);
        let t = [place("w", &["1"], None), place("w_scale", &[], Some(0))];
        assert_eq!(source_shards(&l, &t, "f"), vec![("1".into(), vec![0, 1])]);
    }

    #[test]
    fn variant_names_lose_their_tag() {
        for (given, want) in [
            ("m.safetensors", "m.safetensors"),
            (
                "m-00001-of-00002.safetensors",
                "m-00001-of-00002.safetensors",
            ),
            ("m.fp16.safetensors", "m.safetensors"),
            (
                "m.fp16-00001-of-00002.safetensors",
                "m-00001-of-00002.safetensors",
            ),
            ("m.fp16-x.safetensors", "m.safetensors"),
            ("notes.txt", "notes.txt"),
        ] {
            assert_eq!(main_name(given), want, "{given}");
        }
    }

    #[test]
    fn source_shards_of_nothing() {
        assert_eq!(
            source_shards(&lay(&[("w", "x.safetensors")]), &[], "f"),
            vec![("x.safetensors".into(), vec![])]
        );
        let t = [synth("s")];
        assert_eq!(
            source_shards(&lay(&[]), &t, "f.safetensors"),
            vec![("f.safetensors".into(), vec![0])]
        );
    }

    #[test]
    fn names() {
        assert_eq!(shard_file_name("m", 0, 1), "m.safetensors");
        assert_eq!(shard_file_name("m", 1, 3), "m-00002-of-00003.safetensors");
    }

    #[test]
    fn stream_writer_shards_reads_back_and_is_atomic() {
        let (d, out, mut w) = writer_in_tmp(130, "model", false);
        let staged = w.staging_dir().unwrap().to_path_buf();
        for i in 0..5u8 {
            w.write_tensor(&format!("t{i}"), Dtype::U8, &[2, 30], &[i; 60])
                .unwrap();
        }
        assert!(!out.exists(), "nothing at the output before finish");
        assert!(matches!(
            w.write_tensor("t0", Dtype::U8, &[1], &[0]),
            Err(Error::Plan(_))
        ));
        assert!(matches!(
            w.write_tensor("bad", Dtype::F32, &[2], &[0; 4]),
            Err(Error::Plan(_))
        ));
        w.write_file("config.json", b"{}").unwrap();
        let (names, total) = w.finish().unwrap();
        assert_eq!(names.len(), 3); // 60 + 60 <= 130 < 3 * 60: two tensors per shard
        assert_eq!(total, 300);
        assert!(!staged.exists());
        let ck = Checkpoint::open(&out).unwrap();
        for i in 0..5u8 {
            let (f, t) = ck.require(&format!("t{i}")).unwrap();
            assert_eq!(f.data(t), &[i; 60][..]);
            assert_eq!(f.header.data_start % 4096, 0, "data section page-aligned");
        }
        assert!(out.join("model.safetensors.index.json").is_file());
        assert!(out.join("config.json").is_file());
        // Dropped unfinished: no output, no staging directory.
        let out2 = d.path().join("out2");
        let mut w = StreamWriter::create(&out2, false, 1 << 30, "m", BTreeMap::new(), false, false)
            .unwrap();
        w.write_tensor("x", Dtype::U8, &[3], &[1, 2, 3]).unwrap();
        drop(w);
        assert!(!out2.exists());
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn stream_writer_writes_named_shards() {
        let (d, out, mut w) = writer_in_tmp(1, "m", false);
        for (i, f) in ["b.safetensors", "a.safetensors", "b.safetensors"]
            .iter()
            .enumerate()
        {
            let data = [i as u8; 60];
            w.write_tensor_to(Some(f), &format!("t{i}"), Dtype::U8, &[2, 30], &data)
                .unwrap();
        }
        // Mixing with size-based shards, and a name that is not a plain shard file, are refused.
        for (shard, what) in [(None, "not both"), (Some("x/y.safetensors"), "plain")] {
            let e = w
                .write_tensor_to(shard, "z", Dtype::U8, &[1], &[0])
                .unwrap_err();
            assert!(e.to_string().contains(what), "{e}");
        }
        let (names, total) = w.finish().unwrap();
        assert_eq!(names, ["a.safetensors", "b.safetensors"]);
        assert_eq!(total, 180);
        let ck = Checkpoint::open(&out).unwrap();
        for (t, f) in [("t0", "b"), ("t1", "a"), ("t2", "b")] {
            let (file, info) = ck.require(t).unwrap();
            assert_eq!(file.path.file_name().unwrap(), &*format!("{f}.safetensors"));
            assert_eq!(file.data(info).len(), 60);
            assert_eq!(file.header.data_start % 4096, 0);
        }
        assert!(out.join("m.safetensors.index.json").is_file());
        // A writer that started with size-based shards refuses a named one.
        let mut w = StreamWriter::create(
            &d.path().join("o2"),
            false,
            1 << 30,
            "m",
            BTreeMap::new(),
            false,
            false,
        )
        .unwrap();
        w.write_tensor("x", Dtype::U8, &[1], &[1]).unwrap();
        assert!(w
            .write_tensor_to(Some("a.safetensors"), "y", Dtype::U8, &[1], &[1])
            .is_err());
    }

    #[test]
    fn stream_writer_closes_a_shard_before_its_header_overflows() {
        let (_d, out, mut w) = writer_in_tmp(u64::MAX, "m", true);
        let long = "n".repeat(2000);
        for i in 0..100 {
            w.write_tensor(&format!("{long}{i}"), Dtype::U8, &[1], &[i as u8])
                .unwrap();
        }
        let (names, _) = w.finish().unwrap();
        assert!(names.len() >= 3, "{names:?}");
        let ck = Checkpoint::open(&out).unwrap();
        let (f, t) = ck.require(&format!("{long}99")).unwrap();
        assert_eq!(f.data(t), &[99]);
    }
}
