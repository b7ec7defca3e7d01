//! The build engine: execute a [`Plan`] — a list of output tensors, each defined by an operation
//! on source tensors — into a sharded safetensors directory.
//!
//! Memory stays bounded whatever the model size: a reader thread reads the source tensors that
//! are not in the page cache with O_DIRECT into a budgeted pool of reused buffers, ahead of use
//! (the rest are memory-mapped and their pages released after use); output headers are computed
//! up front from the plan, and tensor data is produced in fixed-size batches (converted in
//! parallel by rayon) that a writer thread drains (O_DIRECT where the file system allows), so
//! reading tensor i+1, computing batch j+1 and writing batch j overlap.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{open_regular, Checkpoint, SafeFile};
use crate::direct::{self, BufPool, DirectWriter, TensorBuf};
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::fp8::{self, Rounding, Saturation};
use crate::header::{checked_nbytes, serialize_header, TensorInfo};
use crate::mxfp8::{self, MxError};
use crate::nvfp4;
use crate::writer::{
    assign_shards, index_json, shard_file_name, source_shards, OutputGuard, Placement,
    SourceLayout, StagedDir,
};

/// Bytes produced per batch handed to the writer thread.
const BATCH_BYTES: usize = 16 << 20;
/// Bytes each rayon task produces inside a batch.
const PIECE_BYTES: usize = 1 << 20;
/// Batches in flight between the producer and the writer (bounds memory to ~3 batches).
const BATCHES_IN_FLIGHT: usize = 2;
/// Smaller source tensors are read through the map: direct reads pay off for bulk data.
const MIN_DIRECT_BYTES: usize = 1 << 20;

/// How the engine moves bytes between disk and memory.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum IoMode {
    /// Direct reads of source tensors that are not already in the page cache, direct writes;
    /// the page cache wherever the file system refuses `O_DIRECT`.
    #[default]
    Auto,
    /// Direct reads and writes wherever the file system allows, cached or not.
    Direct,
    /// Memory map and page cache only.
    Buffered,
}

fn default_read_buffer() -> u64 {
    512 << 20
}

fn default_prefix() -> String {
    "diffusion_pytorch_model".into()
}
fn yes() -> bool {
    true
}
fn exact() -> Rounding {
    Rounding::Exact
}
fn clamp() -> Saturation {
    Saturation::Clamp
}

/// What to build. Produced by the Python planner, serialized as JSON.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// Checkpoints (files or directories) that ops refer to by position.
    pub sources: Vec<PathBuf>,
    pub output_dir: PathBuf,
    #[serde(default)]
    pub overwrite: bool,
    /// `None` (the default): keep the sharding of the first source, the checkpoint being converted
    /// (file names, which tensor in which file, the index name; see
    /// [`source_shards`](crate::writer::source_shards)). `Some(n)`: re-shard greedily into files
    /// of at most `n` bytes named `<file_prefix>-0000i-of-0000k.safetensors` (`--max-shard-size`).
    #[serde(default)]
    pub max_shard_bytes: Option<u64>,
    /// Shard and index names when re-sharding by size (or when the plan has no source).
    #[serde(default = "default_prefix")]
    pub file_prefix: String,
    /// `__metadata__` of every output shard.
    #[serde(default)]
    pub shard_metadata: BTreeMap<String, String>,
    /// Non-tensor files of the output directory (config.json, copied sidecars).
    #[serde(default)]
    pub files: Vec<ExtraFile>,
    pub tensors: Vec<OutTensor>,
    /// Worker threads; 0 means one per core.
    #[serde(default)]
    pub threads: usize,
    /// fsync every file before the output is moved into place.
    #[serde(default = "yes")]
    pub fsync: bool,
    /// Write the index json even for a single shard.
    #[serde(default)]
    pub always_index: bool,
    #[serde(default)]
    pub io: IoMode,
    /// Budget of the aligned buffers direct reads go into (source tensors larger than half of
    /// it are read through the map).
    #[serde(default = "default_read_buffer")]
    pub read_buffer_bytes: u64,
    /// Inputs the planner read that are not sources (export root, backbone.pt / amax sidecar,
    /// policy file): like the sources, the output may never be, contain or lie inside one.
    #[serde(default)]
    pub guard_inputs: Vec<PathBuf>,
    /// Tests only: sleep this long before each output tensor, so that a small build runs long
    /// enough to be interrupted.
    #[serde(default, rename = "_test_delay_ms", skip_serializing_if = "is_zero")]
    pub test_delay_ms: u64,
}

fn is_zero(x: &u64) -> bool {
    *x == 0
}

impl Plan {
    /// Every path the output must stay clear of: sources, copied files and guard inputs.
    pub fn inputs(&self) -> Vec<PathBuf> {
        let copied = self.files.iter().filter_map(|f| f.copy_from.clone());
        self.sources
            .iter()
            .cloned()
            .chain(copied)
            .chain(self.guard_inputs.iter().cloned())
            .collect()
    }

    /// The output refused if it is, contains or lies inside any input (see [`OutputGuard`]).
    pub fn output_guard(&self) -> Result<OutputGuard> {
        OutputGuard::new("--output-dir", &self.output_dir, &self.inputs())
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExtraFile {
    pub name: String,
    #[serde(default)]
    pub text: Option<String>,
    #[serde(default)]
    pub copy_from: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SrcRef {
    pub source: usize,
    pub tensor: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct OutTensor {
    pub name: String,
    #[serde(flatten)]
    pub op: Op,
}

/// How an output tensor is made.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Byte-for-byte copy.
    Copy { src: SrcRef },
    /// `e4m3(w / scale)` of a BF16/FP16/FP32 tensor.
    Fp8 {
        src: SrcRef,
        scale: ScaleSpec,
        #[serde(default = "exact")]
        rounding: Rounding,
        #[serde(default = "clamp")]
        saturation: Saturation,
    },
    /// The float32 scale(s) the `fp8` op that writes tensor `of` used.
    ScaleOf { of: String, shape: Vec<usize> },
    /// `amax / bound` in float32 (e.g. an FP8 input_scale: bound 448; NVFP4: 2688).
    ScaleFromAmax {
        amax: Vec<f32>,
        bound: f32,
        shape: Vec<usize>,
    },
    /// A literal float32 tensor.
    F32 { values: Vec<f32>, shape: Vec<usize> },
    /// Swap the two nibbles of every byte of a U8 tensor (FP4 element order).
    SwapNibbles { src: SrcRef },
    /// Copy an e4m3 tensor, replacing NaN bytes (0x7F/0xFF) by 448 (0x7E).
    RepairNanE4m3 { src: SrcRef },
    /// Rows `start..stop` of the first dimension (e.g. q, k, v of a fused projection).
    SliceRows {
        src: SrcRef,
        start: usize,
        stop: usize,
    },
    /// Concatenate tensors along the first dimension (same dtype and trailing shape).
    ConcatRows { srcs: Vec<SrcRef> },
    /// Block scales of an e4m3 tensor re-expressed for a new global scale:
    /// `e4m3(f32(s) * factor)`, rows `start..stop` (the whole tensor when both are 0).
    RescaleE4m3 {
        src: SrcRef,
        factor: f32,
        #[serde(default)]
        start: usize,
        #[serde(default)]
        stop: usize,
        /// Replace NaN bytes by 448 before rescaling.
        #[serde(default)]
        repair_nan: bool,
    },
    /// NVFP4 packed E2M1 codes `[N, K/2]` of a float tensor `[N, K]`.
    Nvfp4Weight { src: SrcRef, amax: NvAmax },
    /// NVFP4 e4m3 block scales `[N, K/16]` of a float tensor `[N, K]`.
    Nvfp4BlockScales { src: SrcRef, amax: NvAmax },
    /// NVFP4 `weight_scale_2` (float32) of a float tensor; `shape` is `[]` or `[1]`.
    Nvfp4GlobalScale {
        src: SrcRef,
        amax: NvAmax,
        shape: Vec<usize>,
    },
    /// MXFP8 e4m3 values `[N, K]` of a float tensor `[N, K]` (see [`mxfp8`]).
    Mxfp8Weight { src: SrcRef },
    /// MXFP8 E8M0 block scales, U8 `[N, K/32]`, of a float tensor `[N, K]`.
    Mxfp8Scales { src: SrcRef },
}

/// Where an FP8 scale comes from.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ScaleSpec {
    /// Calibrated maxima (one, or one per output row): scale = amax / 448.
    Amax { amax: Vec<f32> },
    /// Scales given directly.
    Values { values: Vec<f32> },
    /// Max |w| of the weight itself, per tensor or per output row.
    WeightAmax { per_row: bool },
}

/// Where an NVFP4 global amax comes from.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum NvAmax {
    Given {
        amax: f32,
    },
    /// max |w| of the tensor itself.
    Weight,
    /// max |w| over several tensors (q/k/v shards that a loader fuses must share one global
    /// scale, since vLLM keeps only the max).
    MaxOf {
        srcs: Vec<SrcRef>,
    },
}

/// Shared with a running build: a cancel flag every worker loop checks (so SIGINT stops the
/// engine within a batch, ~16 MiB, and the staging directory is removed) and progress counters
/// the caller polls from another thread.
#[derive(Default)]
pub struct Control {
    cancel: AtomicBool,
    bytes_done: AtomicU64,
    bytes_total: AtomicU64,
    tensors_done: AtomicU64,
    tensors_total: AtomicU64,
    current: Mutex<String>,
}

/// A snapshot of [`Control`]'s progress counters. Bytes are output bytes (headers included), so
/// `bytes_done` reaches `bytes_total` exactly when the last shard is written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub tensors_done: u64,
    pub tensors_total: u64,
    pub current: String,
}

impl Control {
    /// Ask the build to stop; it returns [`Error::Cancelled`] and writes nothing at the output.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
    pub fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }
    fn check(&self) -> Result<()> {
        if self.is_cancelled() {
            Err(Error::Cancelled)
        } else {
            Ok(())
        }
    }
    pub fn progress(&self) -> Progress {
        Progress {
            bytes_done: self.bytes_done.load(Ordering::Relaxed),
            bytes_total: self.bytes_total.load(Ordering::Relaxed),
            tensors_done: self.tensors_done.load(Ordering::Relaxed),
            tensors_total: self.tensors_total.load(Ordering::Relaxed),
            current: self.current.lock().map(|c| c.clone()).unwrap_or_default(),
        }
    }
}

/// What was written.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub output_dir: PathBuf,
    pub shards: Vec<ShardReport>,
    pub tensors: Vec<TensorReport>,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub seconds: f64,
    pub peak_rss_bytes: u64,
    pub threads: usize,
    /// Source bytes read with direct I/O (the rest came through the memory map).
    pub bytes_read_direct: u64,
    /// Whether the output shards were written with direct I/O.
    pub direct_writes: bool,
    /// Where the wall time went, per thread (seconds).
    pub timings: Timings,
}

/// Seconds each stage of the pipeline spent working or waiting: says whether a build was bound
/// by reading, computing or writing.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Timings {
    /// Reader thread: in direct reads.
    pub read: f64,
    /// Reader thread: waiting for the buffer budget (the engine is behind).
    pub read_stalled: f64,
    /// Engine: waiting for a direct read to finish (reading is behind).
    pub wait_for_read: f64,
    /// Engine: waiting for the writer to take a batch (writing is behind).
    pub wait_for_write: f64,
    /// Writer thread: writing (including copies into its staging buffer).
    pub write: f64,
}

/// Nanosecond counters shared by the pipeline's threads.
#[derive(Default)]
struct Clocks {
    read: AtomicU64,
    read_stalled: AtomicU64,
    wait_for_read: AtomicU64,
    wait_for_write: AtomicU64,
    write: AtomicU64,
}

impl Clocks {
    fn add(c: &AtomicU64, since: Instant) {
        c.fetch_add(since.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }
    fn timings(&self) -> Timings {
        let s = |c: &AtomicU64| Duration::from_nanos(c.load(Ordering::Relaxed)).as_secs_f64();
        Timings {
            read: s(&self.read),
            read_stalled: s(&self.read_stalled),
            wait_for_read: s(&self.wait_for_read),
            wait_for_write: s(&self.wait_for_write),
            write: s(&self.write),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ShardReport {
    pub file: String,
    pub bytes: u64,
    pub tensors: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct TensorReport {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub op: &'static str,
    pub shard: String,
    /// Scales an FP8 op used, or the global scale of an NVFP4 op (first 8 values).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scale: Option<Vec<f32>>,
}

/// A source tensor located in its file.
#[derive(Clone, Copy)]
struct Src<'a> {
    file: &'a SafeFile,
    info: &'a TensorInfo,
}

impl<'a> Src<'a> {
    fn data(&self) -> &'a [u8] {
        self.file.data(self.info)
    }
    fn err(&self, msg: impl Into<String>) -> Error {
        Error::tensor(&self.file.path, &self.info.name, msg)
    }
}

/// `s` when its dtype is `want` (the byte-wise ops keep dtype and shape), else the error
/// "`needs` data, found <dtype>" naming the tensor.
fn same_dtype_src<'a>(s: Src<'a>, want: Dtype, needs: &str) -> Result<Src<'a>> {
    if s.info.dtype != want {
        return Err(s.err(format!("{needs} data, found {}", s.info.dtype)));
    }
    Ok(s)
}

enum Kind<'a> {
    Copy(Src<'a>),
    Fp8 {
        src: Src<'a>,
        scale: FpScale,
        rounding: Rounding,
        saturation: Saturation,
        row_len: usize,
    },
    ScaleOf(usize),
    Bytes(Vec<u8>),
    SwapNibbles(Src<'a>),
    RepairNan(Src<'a>),
    Rows {
        src: Src<'a>,
        byte_start: usize,
    },
    Concat(Vec<Src<'a>>),
    Rescale {
        src: Src<'a>,
        factor: f32,
        byte_start: usize,
        repair_nan: bool,
    },
    Nv {
        src: Src<'a>,
        amax: NvAmaxR<'a>,
        what: NvPart,
        k: usize,
    },
    Mx(Mx<'a>),
}

#[derive(Clone)]
enum NvAmaxR<'a> {
    Given(f32),
    Of(Vec<Src<'a>>),
}

#[derive(Clone, Copy, PartialEq)]
enum NvPart {
    Weight,
    Scales,
    Global,
}

enum FpScale {
    Fixed(Arc<Vec<f32>>),
    WeightAmax { per_row: bool },
}

struct Resolved<'a> {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    nbytes: usize,
    kind: Kind<'a>,
    op: &'static str,
}

fn resolve<'a>(plan: &Plan, sources: &'a [Checkpoint]) -> Result<Vec<Resolved<'a>>> {
    let get = |r: &SrcRef| -> Result<Src<'a>> {
        let ck = sources.get(r.source).ok_or_else(|| {
            Error::Plan(format!(
                "source index {} out of range ({} sources)",
                r.source,
                sources.len()
            ))
        })?;
        let (file, info) = ck.require(&r.tensor)?;
        Ok(Src { file, info })
    };
    let float_src = |s: &Src| -> Result<()> {
        if s.info.dtype.is_float_source() {
            Ok(())
        } else {
            Err(s.err(format!(
                "dtype {} cannot be quantized (expected BF16, F16 or F32)",
                s.info.dtype
            )))
        }
    };
    let mut out: Vec<Resolved<'a>> = Vec::with_capacity(plan.tensors.len());
    let mut index: HashMap<&str, usize> = HashMap::new();
    for t in &plan.tensors {
        if index.insert(t.name.as_str(), out.len()).is_some() {
            return Err(Error::Plan(format!(
                "output tensor '{}' appears twice",
                t.name
            )));
        }
        let (dtype, shape, kind, op): (Dtype, Vec<usize>, Kind<'a>, &'static str) = match &t.op {
            Op::Copy { src } => {
                let s = get(src)?;
                (s.info.dtype, s.info.shape.clone(), Kind::Copy(s), "copy")
            }
            Op::Fp8 {
                src,
                scale,
                rounding,
                saturation,
            } => {
                let s = get(src)?;
                float_src(&s)?;
                // Real row count: a [0, K] weight has no rows and so no per-row scales.
                let rows = s.info.shape.first().copied().unwrap_or(1);
                let numel = s.info.numel();
                let row_len = if numel == 0 { 1 } else { numel / rows };
                let scale = match scale {
                    ScaleSpec::Amax { amax } => FpScale::Fixed(Arc::new(
                        fp8::scales_from_amax("calibrated amax", amax, fp8::E4M3_MAX)
                            .map_err(|m| s.err(m))?,
                    )),
                    // Checked with every other fixed scale just below.
                    ScaleSpec::Values { values } => FpScale::Fixed(Arc::new(values.clone())),
                    ScaleSpec::WeightAmax { per_row } => FpScale::WeightAmax { per_row: *per_row },
                };
                if let FpScale::Fixed(v) = &scale {
                    if v.len() != 1 && v.len() != rows {
                        return Err(s.err(format!(
                            "{} scale values for a tensor of shape {:?} (expected 1 or {rows})",
                            v.len(),
                            s.info.shape
                        )));
                    }
                    fp8::check_scales("weight scale", v).map_err(|m| s.err(m))?;
                }
                (
                    Dtype::F8_E4M3,
                    s.info.shape.clone(),
                    Kind::Fp8 {
                        src: s,
                        scale,
                        rounding: *rounding,
                        saturation: *saturation,
                        row_len,
                    },
                    "fp8",
                )
            }
            Op::ScaleOf { of, shape } => {
                let &j = index.get(of.as_str()).ok_or_else(|| {
                    Error::Plan(format!(
                        "'{}': scale_of '{of}' must name an earlier fp8 tensor",
                        t.name
                    ))
                })?;
                let Kind::Fp8 { src, scale, .. } = &out[j].kind else {
                    return Err(Error::Plan(format!(
                        "'{}': scale_of '{of}' is not an fp8 tensor",
                        t.name
                    )));
                };
                let rows = src.info.shape.first().copied().unwrap_or(1);
                let want = match scale {
                    FpScale::Fixed(v) => v.len(),
                    FpScale::WeightAmax { per_row: true } => rows,
                    FpScale::WeightAmax { per_row: false } => 1,
                };
                let numel = numel_of(&t.name, shape)?;
                if numel != want {
                    return Err(Error::Plan(format!(
                        "'{}': shape {shape:?} holds {numel} values but '{of}' has {want} scale(s)",
                        t.name
                    )));
                }
                (Dtype::F32, shape.clone(), Kind::ScaleOf(j), "scale")
            }
            Op::ScaleFromAmax { amax, bound, shape } => {
                let vals = fp8::scales_from_amax("amax", amax, *bound)
                    .map_err(|m| Error::Plan(format!("tensor '{}': {m}", t.name)))?;
                (
                    Dtype::F32,
                    shape.clone(),
                    Kind::Bytes(f32_bytes(&vals, &t.name, shape)?),
                    "scale",
                )
            }
            // Every literal float32 tensor a planner writes is a scale: the scale rule applies.
            Op::F32 { values, shape } => {
                fp8::check_scales("scale", values)
                    .map_err(|m| Error::Plan(format!("tensor '{}': {m}", t.name)))?;
                (
                    Dtype::F32,
                    shape.clone(),
                    Kind::Bytes(f32_bytes(values, &t.name, shape)?),
                    "f32",
                )
            }
            Op::SwapNibbles { src } => {
                let s = same_dtype_src(get(src)?, Dtype::U8, "nibble swap needs packed U8")?;
                (
                    Dtype::U8,
                    s.info.shape.clone(),
                    Kind::SwapNibbles(s),
                    "swap_nibbles",
                )
            }
            Op::RepairNanE4m3 { src } => {
                let s = same_dtype_src(get(src)?, Dtype::F8_E4M3, "NaN repair needs F8_E4M3")?;
                (
                    Dtype::F8_E4M3,
                    s.info.shape.clone(),
                    Kind::RepairNan(s),
                    "repair_nan",
                )
            }
            Op::SliceRows { src, start, stop } => {
                let s = get(src)?;
                let (shape, byte_start) = row_slice(&s, *start, *stop)?;
                (
                    s.info.dtype,
                    shape,
                    Kind::Rows { src: s, byte_start },
                    "slice_rows",
                )
            }
            Op::RescaleE4m3 {
                src,
                factor,
                start,
                stop,
                repair_nan,
            } => {
                let s = get(src)?;
                if s.info.dtype != Dtype::F8_E4M3 {
                    return Err(s.err(format!(
                        "rescale needs F8_E4M3 data, found {}",
                        s.info.dtype
                    )));
                }
                if !(factor.is_finite() && *factor > 0.0) {
                    return Err(s.err(format!("rescale factor {factor} must be finite and > 0")));
                }
                let (a, b) = if *start == 0 && *stop == 0 {
                    (0, s.info.shape.first().copied().unwrap_or(1))
                } else {
                    (*start, *stop)
                };
                let (shape, byte_start) = row_slice(&s, a, b)?;
                (
                    Dtype::F8_E4M3,
                    shape,
                    Kind::Rescale {
                        src: s,
                        factor: *factor,
                        byte_start,
                        repair_nan: *repair_nan,
                    },
                    "rescale_e4m3",
                )
            }
            Op::ConcatRows { srcs } => {
                if srcs.is_empty() {
                    return Err(Error::Plan(format!("'{}': concat_rows of nothing", t.name)));
                }
                let ss: Vec<Src> = srcs.iter().map(get).collect::<Result<_>>()?;
                let first = ss[0];
                if first.info.shape.is_empty() {
                    return Err(first.err("concat_rows needs tensors with at least one dimension"));
                }
                let mut rows = 0;
                for s in &ss {
                    if s.info.dtype != first.info.dtype
                        || s.info.shape.get(1..) != first.info.shape.get(1..)
                    {
                        return Err(s.err(format!(
                            "cannot concatenate {} {:?} with {} {:?}",
                            s.info.dtype, s.info.shape, first.info.dtype, first.info.shape
                        )));
                    }
                    rows += s.info.shape[0];
                }
                let mut shape = first.info.shape.clone();
                shape[0] = rows;
                (first.info.dtype, shape, Kind::Concat(ss), "concat_rows")
            }
            Op::Nvfp4Weight { src, amax }
            | Op::Nvfp4BlockScales { src, amax }
            | Op::Nvfp4GlobalScale { src, amax, .. } => {
                let s = get(src)?;
                float_src(&s)?;
                if s.info.shape.len() != 2 || s.info.shape[1] % 16 != 0 {
                    return Err(s.err(format!(
                        "NVFP4 needs a 2-D weight whose last dimension is a multiple of 16, found {:?}",
                        s.info.shape
                    )));
                }
                let amax_r = match amax {
                    NvAmax::Given { amax } => {
                        nv_global_checked(*amax).map_err(|m| s.err(m))?;
                        NvAmaxR::Given(*amax)
                    }
                    NvAmax::Weight => NvAmaxR::Of(vec![s]),
                    NvAmax::MaxOf { srcs } => {
                        let v: Vec<Src> = srcs.iter().map(get).collect::<Result<_>>()?;
                        for x in &v {
                            float_src(x)?;
                        }
                        if v.is_empty() {
                            return Err(Error::Plan(format!(
                                "'{}': max_of needs at least one tensor",
                                t.name
                            )));
                        }
                        NvAmaxR::Of(v)
                    }
                };
                let (n, k) = (s.info.shape[0], s.info.shape[1]);
                let (what, dtype, shape, op) = match &t.op {
                    Op::Nvfp4Weight { .. } => {
                        (NvPart::Weight, Dtype::U8, vec![n, k / 2], "nvfp4_weight")
                    }
                    Op::Nvfp4BlockScales { .. } => (
                        NvPart::Scales,
                        Dtype::F8_E4M3,
                        vec![n, k / 16],
                        "nvfp4_block_scales",
                    ),
                    Op::Nvfp4GlobalScale { shape, .. } => {
                        if numel_of(&t.name, shape)? != 1 {
                            return Err(Error::Plan(format!(
                                "'{}': global scale shape {shape:?} is not a scalar",
                                t.name
                            )));
                        }
                        (
                            NvPart::Global,
                            Dtype::F32,
                            shape.clone(),
                            "nvfp4_global_scale",
                        )
                    }
                    _ => unreachable!(),
                };
                (
                    dtype,
                    shape,
                    Kind::Nv {
                        src: s,
                        amax: amax_r,
                        what,
                        k,
                    },
                    op,
                )
            }
            Op::Mxfp8Weight { src } | Op::Mxfp8Scales { src } => {
                let s = get(src)?;
                float_src(&s)?;
                let scales = matches!(t.op, Op::Mxfp8Scales { .. });
                let m = Mx::new(s, scales)?;
                (m.dtype(), m.shape(), Kind::Mx(m), m.op_name())
            }
        };
        let nbytes = checked_nbytes(&shape, dtype.size())
            .ok_or_else(|| Error::Plan(format!("'{}': shape {shape:?} overflows", t.name)))?;
        if let Kind::Bytes(b) = &kind {
            debug_assert_eq!(b.len(), nbytes);
        }
        out.push(Resolved {
            name: t.name.clone(),
            dtype,
            shape,
            nbytes,
            kind,
            op,
        });
    }
    Ok(out)
}

/// NVFP4 global scale of a given (calibrated) amax: [`fp8::scales_from_amax`] with the NVFP4
/// bound, so a given amax of 0 is refused (only a weight's own all-zero amax gets 1).
fn nv_global_checked(amax: f32) -> std::result::Result<f32, String> {
    fp8::scales_from_amax("NVFP4 weight amax", &[amax], nvfp4::GLOBAL_BOUND).map(|v| v[0])
}

/// An MXFP8 output of one float weight `[N, K]`, values (`[N, K]` e4m3) or scales (`[N, K/32]`
/// U8): the op's shape, fill, reads and release rule in one place.
#[derive(Clone, Copy)]
struct Mx<'a> {
    src: Src<'a>,
    scales: bool,
    k: usize,
}

impl<'a> Mx<'a> {
    fn new(src: Src<'a>, scales: bool) -> Result<Self> {
        let shape = &src.info.shape;
        if shape.len() != 2 || !shape[1].is_multiple_of(mxfp8::BLOCK) {
            return Err(src.err(format!(
                "MXFP8 needs a 2-D weight whose last dimension is a multiple of {}, found {shape:?}",
                mxfp8::BLOCK
            )));
        }
        Ok(Mx {
            src,
            scales,
            k: shape[1],
        })
    }

    fn dtype(&self) -> Dtype {
        if self.scales {
            Dtype::U8
        } else {
            Dtype::F8_E4M3
        }
    }

    fn shape(&self) -> Vec<usize> {
        vec![self.src.info.shape[0], self.row_out()]
    }

    fn op_name(&self) -> &'static str {
        if self.scales {
            "mxfp8_scales"
        } else {
            "mxfp8_weight"
        }
    }

    /// Output bytes per source row: the unit of work, since a block never straddles rows.
    fn row_out(&self) -> usize {
        if self.scales {
            self.k / mxfp8::BLOCK
        } else {
            self.k
        }
    }

    /// Source bytes behind output bytes `from..to` (whole rows; never called when K = 0, as the
    /// output is then empty).
    fn src_range(&self, from: usize, to: usize) -> std::ops::Range<usize> {
        let (row_out, row_in) = (self.row_out(), self.k * self.src.info.dtype.size());
        from / row_out * row_in..to / row_out * row_in
    }

    /// Output bytes `at..at + out.len()`. A non-finite weight is refused naming the source tensor
    /// and the row counted from the tensor's start (the kernel counts from the piece's).
    fn fill(&self, ld: &Loaded, at: usize, out: &mut [u8]) -> Result<()> {
        let d = self.src.info.dtype;
        let s = &ld.data(&self.src)[self.src_range(at, at + out.len())];
        let r = if self.scales {
            mxfp8::block_scales(s, d, self.k, out)
        } else {
            mxfp8::quantize_values(s, d, self.k, out)
        };
        r.map_err(|e| {
            let e = match e {
                MxError::NonFinite { row, col, value } => MxError::NonFinite {
                    row: at / self.row_out() + row,
                    col,
                    value,
                },
                e => e,
            };
            self.src.err(e.to_string())
        })
    }

    /// Drop the mapped source rows behind output bytes `from..to` (the other MXFP8 op of this
    /// weight faults them back in from the page cache, which keeps RSS at one batch).
    fn release(&self, ld: &Loaded, from: usize, to: usize) {
        let r = self.src_range(from, to);
        ld.release_range(&self.src, r.start, r.end);
    }

    /// Source bytes read, counted once per weight (on the values; the scales re-read them).
    fn source_bytes(&self) -> usize {
        if self.scales {
            0
        } else {
            self.src.info.nbytes()
        }
    }
}

fn row_slice(s: &Src, start: usize, stop: usize) -> Result<(Vec<usize>, usize)> {
    let rows = *s
        .info
        .shape
        .first()
        .ok_or_else(|| s.err("cannot slice rows of a 0-d tensor"))?;
    // An empty range is a valid [0, ...] tensor (e.g. a zero-row weight rescaled whole).
    if start > stop || stop > rows {
        return Err(s.err(format!("row range {start}..{stop} is not inside 0..{rows}")));
    }
    let row_bytes = s.info.nbytes().checked_div(rows).unwrap_or(0);
    let mut shape = s.info.shape.clone();
    shape[0] = stop - start;
    Ok((shape, start * row_bytes))
}

/// Elements of a plan-given shape, refusing overflow (a plan is input too).
fn numel_of(name: &str, shape: &[usize]) -> Result<usize> {
    checked_nbytes(shape, 1)
        .ok_or_else(|| Error::Plan(format!("'{name}': shape {shape:?} overflows")))
}

fn f32_bytes(values: &[f32], name: &str, shape: &[usize]) -> Result<Vec<u8>> {
    let numel = numel_of(name, shape)?;
    if numel != values.len() {
        return Err(Error::Plan(format!(
            "'{name}': {} values for shape {shape:?}",
            values.len()
        )));
    }
    Ok(values.iter().flat_map(|v| v.to_le_bytes()).collect())
}

/// Scales computed while the build runs (weight amax), shared between an fp8 op and the
/// `scale_of` tensor that records them, and NVFP4 global scales shared by the three outputs.
#[derive(Default)]
struct Memo {
    fp8: Mutex<HashMap<usize, Arc<Vec<f32>>>>,
    nv: Mutex<HashMap<Vec<(usize, String)>, f32>>,
}

fn weight_scales(src: &Src, data: &[u8], per_row: bool) -> Result<Vec<f32>> {
    let d = src.info.dtype;
    let amax: Vec<f32> = if per_row {
        // One scale per real row: none for a [0, K] weight (its scale tensor is [0]).
        let rows = src.info.shape.first().copied().unwrap_or(1);
        let rb = src.info.nbytes().checked_div(rows).unwrap_or(0);
        if rows == 0 {
            Vec::new()
        } else if rb == 0 {
            vec![0.0; rows]
        } else {
            data.par_chunks(rb).map(|r| fp8::amax(r, d)).collect()
        }
    } else {
        vec![fp8::par_amax(data, d)]
    };
    amax.iter()
        .enumerate()
        .map(|(i, &a)| {
            fp8::weight_scale_from_amax(a, &format!(" (row {i})")).map_err(|m| src.err(m))
        })
        .collect()
}

impl Memo {
    fn fp8_scales(&self, idx: usize, r: &Resolved, ld: &Loaded) -> Result<Arc<Vec<f32>>> {
        let Kind::Fp8 { src, scale, .. } = &r.kind else {
            unreachable!()
        };
        match scale {
            FpScale::Fixed(v) => Ok(v.clone()),
            FpScale::WeightAmax { per_row } => {
                if let Some(v) = self.fp8.lock().unwrap().get(&idx) {
                    return Ok(v.clone());
                }
                let v = Arc::new(weight_scales(src, ld.data(src), *per_row)?);
                self.fp8.lock().unwrap().insert(idx, v.clone());
                Ok(v)
            }
        }
    }

    fn nv_global(&self, amax: &NvAmaxR, ld: &Loaded) -> Result<f32> {
        let srcs = match amax {
            NvAmaxR::Given(a) => return nv_global_checked(*a).map_err(Error::Internal),
            NvAmaxR::Of(srcs) => srcs,
        };
        let key: Vec<(usize, String)> = srcs
            .iter()
            .map(|s| (s.file as *const SafeFile as usize, s.info.name.clone()))
            .collect();
        if let Some(&g) = self.nv.lock().unwrap().get(&key) {
            return Ok(g);
        }
        let mut a = 0.0f32;
        for s in srcs {
            let x = fp8::par_amax(ld.data(s), s.info.dtype);
            ld.release_range(s, 0, s.info.nbytes());
            if !x.is_finite() {
                return Err(s.err(format!("weight amax is {x}; refusing to quantize")));
            }
            a = a.max(x);
        }
        let g = nvfp4::global_scale_for_weight_amax(a, "").map_err(|m| srcs[0].err(m))?;
        self.nv.lock().unwrap().insert(key, g);
        Ok(g)
    }
}

/// The engine's end of the writer channel; times how long the engine waits on the writer.
/// Also the producer's cancellation point (every batch passes here) and its byte count.
struct Sink<'a, 'c> {
    tx: SyncSender<Msg<'a>>,
    clocks: &'c Clocks,
    ctl: &'c Control,
    /// Tensor bytes sent (header and Open excluded), to check each tensor against its header.
    sent: Cell<u64>,
}

impl<'a> Sink<'a, '_> {
    fn send(&self, m: Msg<'a>) -> Result<()> {
        self.ctl.check()?;
        self.sent.set(self.sent.get() + m.len() as u64);
        let t = Instant::now();
        let r = self
            .tx
            .send(m)
            .map_err(|_| Error::Internal("writer thread stopped".into()));
        Clocks::add(&self.clocks.wait_for_write, t);
        r
    }
}

enum Msg<'a> {
    /// Start a shard file that will hold this many bytes.
    Open(PathBuf, u64),
    Owned(Vec<u8>),
    Borrowed(&'a [u8]),
    /// A range of a source tensor read into a buffer (direct I/O).
    Shared(Arc<TensorBuf>, std::ops::Range<usize>),
    Release(Src<'a>),
}

impl Msg<'_> {
    /// Bytes of output this message carries.
    fn len(&self) -> usize {
        match self {
            Msg::Owned(b) => b.len(),
            Msg::Borrowed(b) => b.len(),
            Msg::Shared(_, r) => r.len(),
            Msg::Open(..) | Msg::Release(_) => 0,
        }
    }
}

/// Identity of a source tensor (its file and header entry).
type SrcKey = (usize, usize);

fn key(s: &Src) -> SrcKey {
    (
        s.file as *const SafeFile as usize,
        s.info as *const TensorInfo as usize,
    )
}

/// Source tensors currently held in direct-read buffers; every other source is read through
/// its memory map. Correctness never depends on what is here, only speed.
#[derive(Default)]
struct Loaded {
    bufs: HashMap<SrcKey, Arc<TensorBuf>>,
}

impl Loaded {
    fn data<'s, 'a: 's>(&'s self, s: &Src<'a>) -> &'s [u8] {
        match self.bufs.get(&key(s)) {
            Some(b) => b.bytes(),
            None => s.data(),
        }
    }
    fn message<'a>(&self, s: &Src<'a>, range: std::ops::Range<usize>) -> Msg<'a> {
        match self.bufs.get(&key(s)) {
            Some(b) => Msg::Shared(b.clone(), range),
            None => Msg::Borrowed(&s.data()[range]),
        }
    }
    fn buffered(&self, s: &Src) -> bool {
        self.bufs.contains_key(&key(s))
    }
    /// Drop mapped source pages already used (a no-op for buffered sources).
    fn release_range(&self, s: &Src, from: usize, to: usize) {
        if !self.buffered(s) {
            s.file.release_range(s.info, from, to);
        }
    }
}

/// An output shard being written: direct where the file system allows, else buffered.
enum ShardOut {
    Direct(DirectWriter),
    Buffered(PathBuf, BufWriter<File>),
}

impl ShardOut {
    fn write_all(&mut self, b: &[u8]) -> Result<()> {
        match self {
            ShardOut::Direct(w) => w.write_all(b),
            ShardOut::Buffered(p, w) => w
                .write_all(b)
                .map_err(|e| Error::io(p.as_path(), "write", e)),
        }
    }
}

/// Writer thread: drains batches into the current shard file; recycles owned buffers. Returns
/// the bytes written and whether every shard was written directly.
fn writer_loop(
    rx: Receiver<Msg>,
    recycle: SyncSender<Vec<u8>>,
    fsync: bool,
    direct: bool,
    clocks: &Clocks,
    ctl: &Control,
) -> Result<(u64, bool)> {
    let mut cur: Option<ShardOut> = None;
    let mut stage: Option<direct::AlignedBuf> = None;
    let mut written = 0u64;
    let mut all_direct = direct;
    let finish = |c: Option<ShardOut>, stage: &mut Option<direct::AlignedBuf>| -> Result<()> {
        match c {
            Some(ShardOut::Direct(w)) => *stage = Some(w.finish(fsync)?),
            Some(ShardOut::Buffered(p, w)) => {
                let f = w
                    .into_inner()
                    .map_err(|e| Error::io(&p, "write", e.into_error()))?;
                if fsync {
                    f.sync_all().map_err(|e| Error::io(&p, "fsync", e))?;
                }
            }
            None => {}
        }
        Ok(())
    };
    for msg in rx {
        // Stop at once on cancel (no fsync of a file about to be removed).
        ctl.check()?;
        let t = Instant::now();
        let len = msg.len() as u64;
        match msg {
            Msg::Open(p, size) => {
                finish(cur.take(), &mut stage)?;
                let mut out = None;
                if direct {
                    match DirectWriter::create(&p, stage.take(), size)? {
                        Ok(w) => out = Some(ShardOut::Direct(w)),
                        Err(st) => {
                            stage = st;
                            all_direct = false;
                        }
                    }
                }
                cur = Some(match out {
                    Some(o) => o,
                    None => {
                        let f = File::create(&p).map_err(|e| Error::io(&p, "create", e))?;
                        ShardOut::Buffered(p, BufWriter::with_capacity(1 << 20, f))
                    }
                });
            }
            Msg::Owned(buf) => {
                cur.as_mut().expect("file open").write_all(&buf)?;
                written += buf.len() as u64;
                let _ = recycle.try_send(buf);
            }
            Msg::Borrowed(b) => {
                cur.as_mut().expect("file open").write_all(b)?;
                written += b.len() as u64;
            }
            Msg::Shared(b, range) => {
                cur.as_mut()
                    .expect("file open")
                    .write_all(&b.bytes()[range.clone()])?;
                written += range.len() as u64;
            }
            Msg::Release(s) => s.file.release(s.info),
        }
        ctl.bytes_done.fetch_add(len, Ordering::Relaxed);
        Clocks::add(&clocks.write, t);
    }
    let t = Instant::now();
    finish(cur.take(), &mut stage)?;
    Clocks::add(&clocks.write, t);
    Ok((written, all_direct))
}

/// Fill `out` with the bytes of `r` starting at output byte `at` (a multiple of `unit`).
#[allow(clippy::too_many_arguments)]
fn fill(
    r: &Resolved,
    ld: &Loaded,
    at: usize,
    out: &mut [u8],
    scales: Option<&[f32]>,
    nv_gs: f32,
    lut: Option<&fp8::E4m3Lut>,
) -> Result<()> {
    match &r.kind {
        Kind::Mx(m) => return m.fill(ld, at, out),
        Kind::Fp8 {
            src,
            rounding,
            saturation,
            row_len,
            ..
        } => {
            let d = src.info.dtype;
            let s = &ld.data(src)[at * d.size()..(at + out.len()) * d.size()];
            match lut {
                Some(t) => t.apply(s, out),
                None => fp8::quantize_e4m3(
                    s,
                    d,
                    scales.unwrap(),
                    *row_len,
                    at,
                    *rounding,
                    *saturation,
                    out,
                ),
            }
        }
        Kind::SwapNibbles(src) => nvfp4::swap_nibbles(&ld.data(src)[at..at + out.len()], out),
        Kind::RepairNan(src) => {
            out.copy_from_slice(&ld.data(src)[at..at + out.len()]);
            nvfp4::repair_nan_e4m3(out);
        }
        Kind::Rescale {
            src,
            factor,
            byte_start,
            repair_nan,
        } => {
            let s = &ld.data(src)[byte_start + at..byte_start + at + out.len()];
            if *repair_nan {
                let mut tmp = s.to_vec();
                nvfp4::repair_nan_e4m3(&mut tmp);
                nvfp4::rescale_block_scales(&tmp, *factor, out);
            } else {
                nvfp4::rescale_block_scales(s, *factor, out);
            }
        }
        Kind::Nv { src, what, k, .. } => {
            let d = src.info.dtype;
            let (row_out, row_in) = match what {
                NvPart::Weight => (k / 2, k * d.size()),
                NvPart::Scales => (k / 16, k * d.size()),
                NvPart::Global => unreachable!(),
            };
            let (r0, r1) = (at / row_out, (at + out.len()) / row_out);
            let s = &ld.data(src)[r0 * row_in..r1 * row_in];
            match what {
                NvPart::Weight => nvfp4::quantize_packed(s, d, *k, nv_gs, out),
                _ => nvfp4::block_scales(s, d, *k, nv_gs, out),
            }
        }
        _ => unreachable!("fill on a non-computed tensor"),
    }
    Ok(())
}

/// Output bytes of one indivisible unit of work.
fn unit_bytes(r: &Resolved) -> usize {
    match &r.kind {
        Kind::Nv {
            what: NvPart::Weight,
            k,
            ..
        } => (k / 2).max(1),
        Kind::Nv {
            what: NvPart::Scales,
            k,
            ..
        } => (k / 16).max(1),
        Kind::Mx(m) => m.row_out().max(1),
        _ => 1,
    }
}

/// e4m3 data holding NaN bytes (0x7F/0xFF) is refused, never copied: one NaN ruins a layer at
/// inference. Planners repair them to 448 (`repair_nan_e4m3`) only when asked. A parallel count
/// at memory speed, next to the copy's disk I/O.
fn refuse_nan_e4m3(s: &Src, data: &[u8]) -> Result<()> {
    if s.info.dtype != Dtype::F8_E4M3 {
        return Ok(());
    }
    let n: usize = data.par_chunks(PIECE_BYTES).map(fp8::count_nan_e4m3).sum();
    if n == 0 {
        return Ok(());
    }
    Err(s.err(format!(
        "{n} NaN byte(s) (0x7F/0xFF) in F8_E4M3 data; pass --repair-nan (repair_nan=True) to \
         replace them by 448"
    )))
}

fn emit<'a>(
    idx: usize,
    r: &'a Resolved<'a>,
    all: &'a [Resolved<'a>],
    memo: &Memo,
    ld: &Loaded,
    tx: &Sink<'a, '_>,
    pool: &Receiver<Vec<u8>>,
) -> Result<Option<Vec<f32>>> {
    let send = |m: Msg<'a>| tx.send(m);
    // A mapped source's pages are dropped once the writer is past them; a buffered one needs nothing.
    let release = |s: &Src<'a>| {
        if ld.buffered(s) {
            Ok(())
        } else {
            send(Msg::Release(*s))
        }
    };
    match &r.kind {
        Kind::Copy(s) => {
            refuse_nan_e4m3(s, ld.data(s))?;
            send(ld.message(s, 0..s.info.nbytes()))?;
            release(s)?;
            return Ok(None);
        }
        Kind::Rows { src, byte_start } => {
            refuse_nan_e4m3(src, &ld.data(src)[*byte_start..byte_start + r.nbytes])?;
            send(ld.message(src, *byte_start..byte_start + r.nbytes))?;
            release(src)?;
            return Ok(None);
        }
        Kind::Concat(ss) => {
            for s in ss {
                refuse_nan_e4m3(s, ld.data(s))?;
                send(ld.message(s, 0..s.info.nbytes()))?;
                release(s)?;
            }
            return Ok(None);
        }
        Kind::Bytes(b) => {
            send(Msg::Borrowed(b))?;
            return Ok(None);
        }
        Kind::ScaleOf(j) => {
            let v = memo.fp8_scales(*j, &all[*j], ld)?;
            send(Msg::Owned(v.iter().flat_map(|x| x.to_le_bytes()).collect()))?;
            return Ok(Some(v.iter().take(8).copied().collect()));
        }
        Kind::Nv {
            amax,
            what: NvPart::Global,
            ..
        } => {
            let g = memo.nv_global(amax, ld)?;
            send(Msg::Owned(g.to_le_bytes().to_vec()))?;
            return Ok(Some(vec![g]));
        }
        Kind::Rescale {
            src,
            byte_start,
            repair_nan: false,
            ..
        } => refuse_nan_e4m3(src, &ld.data(src)[*byte_start..byte_start + r.nbytes])?,
        _ => {}
    }
    let scales = match &r.kind {
        Kind::Fp8 { .. } => Some(memo.fp8_scales(idx, r, ld)?),
        _ => None,
    };
    let nv_gs = match &r.kind {
        Kind::Nv { amax, .. } => memo.nv_global(amax, ld)?,
        _ => 0.0,
    };
    // Per-tensor scale on a 16-bit source: one 64 KiB table per tensor replaces the arithmetic.
    let lut = match (&r.kind, scales.as_deref()) {
        (
            Kind::Fp8 {
                src,
                rounding,
                saturation,
                ..
            },
            Some(v),
        ) if v.len() == 1 && src.info.dtype.size() == 2 && r.nbytes >= fp8::E4m3Lut::MIN_ELEMS => {
            Some(fp8::E4m3Lut::new(
                src.info.dtype,
                v[0],
                *rounding,
                *saturation,
            ))
        }
        _ => None,
    };
    let unit = unit_bytes(r);
    let batch = (BATCH_BYTES / unit).max(1) * unit;
    let piece = (PIECE_BYTES / unit).max(1) * unit;
    let mut at = 0;
    while at < r.nbytes {
        let len = batch.min(r.nbytes - at);
        let mut buf = pool.try_recv().unwrap_or_default();
        buf.clear();
        buf.resize(len, 0);
        let filled: Vec<Result<()>> = buf
            .par_chunks_mut(piece)
            .enumerate()
            .map(|(i, c)| {
                fill(
                    r,
                    ld,
                    at + i * piece,
                    c,
                    scales.as_deref().map(|v| v.as_slice()),
                    nv_gs,
                    lut.as_ref(),
                )
            })
            .collect();
        // The first failing piece in tensor order, so the error names the first bad row.
        filled.into_iter().collect::<Result<()>>()?;
        send(Msg::Owned(buf))?;
        // Elementwise ops never look back: drop the source pages of this batch now, so the
        // resident set holds about one batch of input, not one tensor.
        match &r.kind {
            Kind::Fp8 { src, .. } | Kind::SwapNibbles(src) | Kind::RepairNan(src) => {
                let sz = src.info.dtype.size();
                ld.release_range(src, at * sz, (at + len) * sz);
            }
            Kind::Nv { src, what, k, .. } => {
                // Whole rows were read: release them (the next NVFP4 op of this weight faults
                // them back in from the page cache, which keeps RSS at one batch).
                let row_out = if *what == NvPart::Weight {
                    k / 2
                } else {
                    k / 16
                };
                let row_in = k * src.info.dtype.size();
                ld.release_range(src, at / row_out * row_in, (at + len) / row_out * row_in);
            }
            Kind::Rescale {
                src, byte_start, ..
            } => {
                ld.release_range(src, byte_start + at, byte_start + at + len);
            }
            Kind::Mx(m) => m.release(ld, at, at + len),
            _ => {}
        }
        at += len;
    }
    if let Kind::Fp8 { src, .. } | Kind::SwapNibbles(src) | Kind::RepairNan(src) = &r.kind {
        release(src)?;
    }
    Ok(match &r.kind {
        Kind::Fp8 { .. } => scales.map(|v| v.iter().take(8).copied().collect()),
        Kind::Nv { .. } => Some(vec![nv_gs]),
        _ => None,
    })
}

/// Which source tensors are read directly into buffers, in the order the engine first needs
/// them, and when each is received and dropped.
struct Schedule<'a> {
    loads: Vec<Src<'a>>,
    /// Per output tensor: loads to receive before emitting it.
    take: Vec<Vec<usize>>,
    /// Per output tensor: loads to drop after emitting it.
    drop: Vec<Vec<usize>>,
}

/// The source tensors emitting output `i` reads: its own sources, and the weights behind an
/// NVFP4 global scale the first time it is needed (a `scale_of` always follows its weight, whose
/// scales are memoized by then).
fn uses<'a>(i: usize, all: &[Resolved<'a>], seen_nv: &mut HashSet<Vec<SrcKey>>) -> Vec<Src<'a>> {
    let mut v = sources_of(&all[i]);
    if let Kind::Nv {
        amax: NvAmaxR::Of(srcs),
        ..
    } = &all[i].kind
    {
        if seen_nv.insert(srcs.iter().map(key).collect()) {
            v.extend(srcs.iter().copied());
        }
    }
    v
}

fn wants_direct(s: &Src, io: IoMode) -> bool {
    io != IoMode::Buffered
        && s.info.nbytes() >= MIN_DIRECT_BYTES
        && s.file.direct_file().is_some()
        // Cached data is cheaper through the map than read again from disk.
        && (io == IoMode::Direct || direct::resident_fraction(s.data()) < 0.5)
}

/// Decide the direct loads. The reader thread fills buffers in load order while the engine
/// consumes them in the same order; a load is taken only if it fits the budget next to every
/// load still in use when it is first needed, so the reader can always make progress.
fn schedule<'a>(all: &[Resolved<'a>], io: IoMode, budget: usize) -> Schedule<'a> {
    let n = all.len();
    let mut sched = Schedule {
        loads: Vec::new(),
        take: vec![Vec::new(); n],
        drop: vec![Vec::new(); n],
    };
    if io == IoMode::Buffered {
        return sched;
    }
    let mut seen_nv = HashSet::new();
    let per_op: Vec<Vec<Src<'a>>> = (0..n).map(|i| uses(i, all, &mut seen_nv)).collect();
    let mut last: HashMap<SrcKey, usize> = HashMap::new();
    for (i, u) in per_op.iter().enumerate() {
        for s in u {
            last.insert(key(s), i);
        }
    }
    let mut decided: HashSet<SrcKey> = HashSet::new();
    let mut live: Vec<(usize, usize)> = Vec::new(); // (last use, bytes)
    for (i, u) in per_op.iter().enumerate() {
        live.retain(|&(l, _)| l >= i);
        for s in u {
            if !decided.insert(key(s)) {
                continue;
            }
            let need = direct::need_for(s.file.file_offset(s.info), s.info.nbytes());
            let in_use: usize = live.iter().map(|&(_, b)| b).sum();
            if need <= budget / 2 && in_use + need <= budget && wants_direct(s, io) {
                let li = sched.loads.len();
                let l = last[&key(s)];
                sched.loads.push(*s);
                sched.take[i].push(li);
                sched.drop[l].push(li);
                live.push((l, need));
            }
        }
    }
    sched
}

/// Reader thread: fill buffers for the scheduled loads, in order.
fn reader_loop(
    loads: &[Src],
    pool: &Arc<BufPool>,
    tx: SyncSender<Result<Arc<TensorBuf>>>,
    clocks: &Clocks,
    ctl: &Control,
) {
    for s in loads {
        if ctl.is_cancelled() {
            return;
        }
        let file = s
            .file
            .direct_file()
            .expect("scheduled only where direct reads work");
        let r = TensorBuf::read(
            pool,
            file,
            &s.file.path,
            s.file.file_offset(s.info),
            s.info.nbytes(),
            |stalled, read| {
                clocks
                    .read_stalled
                    .fetch_add(stalled.as_nanos() as u64, Ordering::Relaxed);
                clocks
                    .read
                    .fetch_add(read.as_nanos() as u64, Ordering::Relaxed);
            },
        )
        .map_err(|e| match e {
            Error::Io { source, .. } => s.err(format!("direct read failed: {source}")),
            e => e,
        });
        let stop = match r {
            Ok(Some(b)) => tx.send(Ok(Arc::new(b))).is_err(),
            Ok(None) => true,
            Err(e) => {
                let _ = tx.send(Err(e));
                true
            }
        };
        if stop {
            return;
        }
    }
}

/// Worker threads for a plan: `requested` (0 = one per core), capped at the number of cores —
/// more only adds contention, and an absurd value (`--threads 100000`) would spend minutes
/// spawning threads.
pub fn effective_threads(requested: usize) -> usize {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    if requested == 0 {
        cores
    } else {
        requested.min(cores)
    }
}

/// Execute a plan. The output appears at `plan.output_dir` only if everything succeeded.
pub fn execute(plan: &Plan) -> Result<Report> {
    execute_with(plan, &Control::default())
}

/// [`execute`], cancellable and observable through `ctl` from another thread.
pub fn execute_with(plan: &Plan, ctl: &Control) -> Result<Report> {
    let threads = effective_threads(plan.threads);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| Error::Internal(format!("thread pool: {e}")))?;
    pool.install(|| execute_inner(plan, threads, ctl))
}

/// Every check [`execute`] makes before it writes anything — plan fields, the output rule,
/// sources open and valid, each op's tensors, dtypes, shapes and scales, extra files regular and
/// readable, shard headers — without writing. What it cannot know without reading all the data
/// (NaN/inf in weights, NaN e4m3 bytes, weight-derived scales) is checked while building.
pub fn validate(plan: &Plan) -> Result<()> {
    check_plan(plan)?;
    let sources = open_sources(plan)?;
    let resolved = resolve(plan, &sources)?;
    for f in &plan.files {
        if let Some(src) = &f.copy_from {
            open_regular(src)?;
        }
    }
    layout(plan, &sources, resolved)?;
    Ok(())
}

/// [`validate`] for a JSON plan.
pub fn validate_json(plan_json: &str) -> Result<()> {
    validate(&parse_plan(plan_json)?)
}

fn parse_plan(plan_json: &str) -> Result<Plan> {
    serde_json::from_str(plan_json).map_err(|e| Error::Plan(e.to_string()))
}

/// Plan fields and the output rule (refused early, before reading anything).
fn check_plan(plan: &Plan) -> Result<()> {
    if plan.max_shard_bytes == Some(0) {
        return Err(Error::Plan("max_shard_bytes must be > 0".into()));
    }
    if plan.file_prefix.is_empty() || plan.file_prefix.contains('/') {
        return Err(Error::Plan(format!(
            "bad file prefix '{}'",
            plan.file_prefix
        )));
    }
    // Refuse early, before reading or creating anything: an output that overlaps an input
    // (however spelled), or one that exists when overwriting was not asked for.
    plan.output_guard()?;
    if plan.output_dir.exists() && !plan.overwrite {
        return Err(Error::OutputExists(plan.output_dir.clone()));
    }
    for f in &plan.files {
        if f.name.contains('/')
            || f.name.ends_with(".safetensors")
            || f.name.ends_with(".index.json")
        {
            return Err(Error::Plan(format!(
                "extra file name '{}' not allowed",
                f.name
            )));
        }
        if f.text.is_some() == f.copy_from.is_some() {
            return Err(Error::Plan(format!(
                "extra file '{}' needs exactly one of text / copy_from",
                f.name
            )));
        }
    }
    Ok(())
}

fn open_sources(plan: &Plan) -> Result<Vec<Checkpoint>> {
    plan.sources.iter().map(|p| Checkpoint::open(p)).collect()
}

/// One output shard: its file name, the range of the (write-ordered) resolved tensors it holds
/// and its serialized header.
struct ShardPlan {
    file: String,
    range: std::ops::Range<usize>,
    header: Vec<u8>,
}

/// The output layout: `resolved` reordered into write order (shard by shard), the shards and the
/// index file name. By default the source's sharding is kept ([`source_shards`]); with
/// `max_shard_bytes` the tensors are re-sharded greedily in plan order.
fn layout<'a>(
    plan: &Plan,
    sources: &'a [Checkpoint],
    resolved: Vec<Resolved<'a>>,
) -> Result<(Vec<Resolved<'a>>, Vec<ShardPlan>, String)> {
    let prefix_index = format!("{}.safetensors.index.json", plan.file_prefix);
    let (resolved, groups, index) = match (plan.max_shard_bytes, sources.first()) {
        (None, Some(ck)) => {
            let lay = SourceLayout::of(ck);
            let ours: HashMap<&Path, String> = ck
                .files
                .iter()
                .map(|f| {
                    let n = f.path.file_name().unwrap_or_default();
                    (f.path.as_path(), n.to_string_lossy().to_string())
                })
                .collect();
            let places: Vec<Placement> = resolved
                .iter()
                .map(|r| Placement {
                    name: &r.name,
                    source_files: sources_of(r)
                        .iter()
                        .filter_map(|s| ours.get(s.file.path.as_path()).cloned())
                        .collect(),
                    synthesized: matches!(r.kind, Kind::Bytes(_)),
                    beside: match r.kind {
                        Kind::ScaleOf(j) => Some(j),
                        _ => None,
                    },
                })
                .collect();
            let shards = source_shards(&lay, &places, &format!("{}.safetensors", plan.file_prefix));
            let order: Vec<usize> = shards.iter().flat_map(|(_, v)| v.iter().copied()).collect();
            let mut groups = Vec::with_capacity(shards.len());
            let mut start = 0;
            for (file, v) in shards {
                groups.push((file, start..start + v.len()));
                start += v.len();
            }
            (reorder(resolved, &order), groups, lay.index_name)
        }
        (max, _) => {
            let sizes: Vec<u64> = resolved.iter().map(|r| r.nbytes as u64).collect();
            let ranges = assign_shards(&sizes, max.unwrap_or(u64::MAX));
            let n = ranges.len();
            let groups = ranges
                .into_iter()
                .enumerate()
                .map(|(i, r)| (shard_file_name(&plan.file_prefix, i, n), r))
                .collect();
            (resolved, groups, prefix_index)
        }
    };
    let shards = groups
        .into_iter()
        .map(|(file, range)| {
            let entries: Vec<(String, Dtype, Vec<usize>)> = resolved[range.clone()]
                .iter()
                .map(|r| (r.name.clone(), r.dtype, r.shape.clone()))
                .collect();
            let (header, _) = serialize_header(&plan.shard_metadata, &entries)?;
            Ok(ShardPlan {
                file,
                range,
                header,
            })
        })
        .collect::<Result<_>>()?;
    Ok((resolved, shards, index))
}

/// `resolved` in the given order (a permutation), `scale_of` references renumbered.
fn reorder<'a>(resolved: Vec<Resolved<'a>>, order: &[usize]) -> Vec<Resolved<'a>> {
    let mut new_pos = vec![0; order.len()];
    for (new, &old) in order.iter().enumerate() {
        new_pos[old] = new;
    }
    let mut slots: Vec<Option<Resolved<'a>>> = resolved.into_iter().map(Some).collect();
    order
        .iter()
        .map(|&old| {
            let mut r = slots[old].take().expect("a permutation");
            if let Kind::ScaleOf(j) = &mut r.kind {
                *j = new_pos[*j];
            }
            r
        })
        .collect()
}

/// Copy a sidecar file, refusing anything but a regular file (a FIFO would block forever).
fn copy_regular(src: &Path, dst: &Path) -> Result<()> {
    let mut from = open_regular(src)?;
    let mut to = File::create(dst).map_err(|e| Error::io(dst, "create", e))?;
    std::io::copy(&mut from, &mut to).map_err(|e| Error::io(src, "copy", e))?;
    Ok(())
}

fn execute_inner(plan: &Plan, threads: usize, ctl: &Control) -> Result<Report> {
    let t0 = Instant::now();
    check_plan(plan)?;
    let sources = open_sources(plan)?;
    let resolved = resolve(plan, &sources)?;
    let (resolved, shards, index_name) = layout(plan, &sources, resolved)?;
    let n = shards.len();
    let sizes: Vec<u64> = resolved.iter().map(|r| r.nbytes as u64).collect();
    let data_total: u64 = sizes.iter().sum();
    let hdr_total: u64 = shards.iter().map(|s| s.header.len() as u64).sum();
    ctl.bytes_total
        .store(data_total + hdr_total, Ordering::Relaxed);
    ctl.tensors_total
        .store(resolved.len() as u64, Ordering::Relaxed);
    ctl.check()?;
    let staged =
        StagedDir::create_guarded(&plan.output_dir, plan.overwrite, Some(plan.output_guard()?))?;
    for f in &plan.files {
        let dst = staged.tmp.join(&f.name);
        if let Some(t) = &f.text {
            std::fs::write(&dst, t).map_err(|e| Error::io(&dst, "write", e))?;
        } else if let Some(src) = &f.copy_from {
            copy_regular(src, &dst)?;
        }
        if plan.fsync {
            File::open(&dst)
                .and_then(|f| f.sync_all())
                .map_err(|e| Error::io(&dst, "fsync", e))?;
        }
    }

    let sched = schedule(&resolved, plan.io, plan.read_buffer_bytes as usize);
    let direct_keys: HashSet<SrcKey> = sched.loads.iter().map(key).collect();
    let bytes_read_direct: u64 = sched.loads.iter().map(|s| s.info.nbytes() as u64).sum();
    let read_pool = BufPool::new(plan.read_buffer_bytes as usize);
    let (load_tx, load_rx) = sync_channel::<Result<Arc<TensorBuf>>>(sched.loads.len() + 1);

    let memo = Memo::default();
    let mut tensor_reports: Vec<TensorReport> = Vec::with_capacity(resolved.len());
    let mut shard_reports = Vec::with_capacity(n);
    let mut weight_map = BTreeMap::new();
    let (tx, rx) = sync_channel::<Msg>(BATCHES_IN_FLIGHT);
    let (recycle_tx, recycle_rx) = sync_channel::<Vec<u8>>(BATCHES_IN_FLIGHT + 1);
    let fsync = plan.fsync;
    let direct_out = plan.io != IoMode::Buffered;
    let clocks = Clocks::default();
    let sink = Sink {
        tx,
        clocks: &clocks,
        ctl,
        sent: Cell::new(0),
    };
    let (written, direct_writes) = std::thread::scope(|scope| -> Result<(u64, bool)> {
        let (loads, pool, clk) = (&sched.loads, &read_pool, &clocks);
        let writer = scope.spawn(move || writer_loop(rx, recycle_tx, fsync, direct_out, clk, ctl));
        if !loads.is_empty() {
            scope.spawn(move || reader_loop(loads, pool, load_tx, clk, ctl));
        } else {
            drop(load_tx);
        }
        let mut produce = || -> Result<()> {
            let mut ld = Loaded::default();
            for ShardPlan {
                file: fname,
                range,
                header,
            } in &shards
            {
                let hdr = header.clone();
                let hdr_len = hdr.len() as u64;
                let shard_bytes = hdr_len
                    + resolved[range.clone()]
                        .iter()
                        .map(|r| r.nbytes as u64)
                        .sum::<u64>();
                sink.send(Msg::Open(staged.tmp.join(fname), shard_bytes))?;
                sink.send(Msg::Owned(hdr))?;
                let mut bytes = hdr_len;
                for i in range.clone() {
                    let r = &resolved[i];
                    ctl.check()?;
                    if let Ok(mut c) = ctl.current.lock() {
                        c.clone_from(&r.name);
                    }
                    if plan.test_delay_ms > 0 {
                        std::thread::sleep(Duration::from_millis(plan.test_delay_ms));
                    }
                    let mapped = |s: &Src| !direct_keys.contains(&key(s));
                    if i == range.start {
                        for s in sources_of(r).iter().filter(|s| mapped(s)) {
                            s.file.prefetch(s.info);
                        }
                    }
                    if let Some(next) = resolved.get(i + 1) {
                        for s in sources_of(next).iter().filter(|s| mapped(s)) {
                            s.file.prefetch(s.info);
                        }
                    }
                    for &li in &sched.take[i] {
                        let t = Instant::now();
                        let b = load_rx.recv();
                        Clocks::add(&clocks.wait_for_read, t);
                        let b =
                            b.map_err(|_| Error::Internal("reader thread stopped".into()))??;
                        ld.bufs.insert(key(&sched.loads[li]), b);
                    }
                    let before = sink.sent.get();
                    let scale = emit(i, r, &resolved, &memo, &ld, &sink, &recycle_rx)?;
                    // The header promised exactly r.nbytes: any other count would leave stray
                    // or missing bytes that no safetensors reader accepts. Never write that.
                    let produced = sink.sent.get() - before;
                    if produced != r.nbytes as u64 {
                        return Err(Error::Internal(format!(
                            "tensor '{}': {produced} bytes produced for a header of {} bytes",
                            r.name, r.nbytes
                        )));
                    }
                    ctl.tensors_done.fetch_add(1, Ordering::Relaxed);
                    for &li in &sched.drop[i] {
                        ld.bufs.remove(&key(&sched.loads[li]));
                    }
                    bytes += r.nbytes as u64;
                    weight_map.insert(r.name.clone(), fname.clone());
                    tensor_reports.push(TensorReport {
                        name: r.name.clone(),
                        dtype: r.dtype,
                        shape: r.shape.clone(),
                        op: r.op,
                        shard: fname.clone(),
                        scale,
                    });
                }
                shard_reports.push(ShardReport {
                    file: fname.clone(),
                    bytes,
                    tensors: range.len(),
                });
            }
            Ok(())
        };
        let produced = produce();
        drop(sink);
        // Unblock the reader if the build stopped early (its buffers came back when `ld` dropped).
        read_pool.close();
        drop(load_rx);
        let w = writer
            .join()
            .map_err(|_| Error::Internal("writer thread panicked".into()))?;
        // A writer error explains a producer's "writer stopped"; report it first.
        let w = w?;
        produced?;
        Ok(w)
    })?;

    ctl.check()?;
    if n > 1 || plan.always_index {
        let total = data_total;
        let p = staged.tmp.join(&index_name);
        std::fs::write(&p, index_json(total, &weight_map))
            .map_err(|e| Error::io(&p, "write", e))?;
    }
    let bytes_read = resolved.iter().map(|r| source_bytes(r)).sum();
    staged.commit(plan.overwrite)?;
    Ok(Report {
        output_dir: plan.output_dir.clone(),
        shards: shard_reports,
        tensors: tensor_reports,
        bytes_read,
        bytes_written: written,
        seconds: t0.elapsed().as_secs_f64(),
        peak_rss_bytes: crate::rss::peak_rss_bytes(),
        threads,
        bytes_read_direct,
        direct_writes,
        timings: clocks.timings(),
    })
}

/// The source tensors an output reads.
fn sources_of<'a>(r: &Resolved<'a>) -> Vec<Src<'a>> {
    match &r.kind {
        Kind::Copy(s) | Kind::Fp8 { src: s, .. } | Kind::SwapNibbles(s) | Kind::RepairNan(s) => {
            vec![*s]
        }
        Kind::Rows { src, .. } | Kind::Rescale { src, .. } | Kind::Nv { src, .. } => vec![*src],
        Kind::Mx(m) => vec![m.src],
        Kind::Concat(ss) => ss.clone(),
        _ => Vec::new(),
    }
}

fn source_bytes(r: &Resolved) -> u64 {
    (match &r.kind {
        Kind::Copy(s) | Kind::Fp8 { src: s, .. } | Kind::SwapNibbles(s) | Kind::RepairNan(s) => {
            s.info.nbytes()
        }
        Kind::Nv {
            src,
            what: NvPart::Weight,
            ..
        } => src.info.nbytes(),
        Kind::Rows { .. } | Kind::Rescale { .. } => r.nbytes,
        Kind::Mx(m) => m.source_bytes(),
        Kind::Concat(ss) => ss.iter().map(|s| s.info.nbytes()).sum(),
        _ => 0,
    }) as u64
}

/// Convenience for callers holding a JSON plan.
pub fn execute_json(plan_json: &str) -> Result<Report> {
    execute(&parse_plan(plan_json)?)
}

/// [`execute_json`] with a [`Control`].
pub fn execute_json_with(plan_json: &str, ctl: &Control) -> Result<Report> {
    execute_with(&parse_plan(plan_json)?, ctl)
}
