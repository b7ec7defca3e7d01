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
use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rayon::prelude::*;
use serde::Serialize;

use super::layout::{layout, ShardPlan};
use super::ops::Memo;
use super::resolve::{key, resolve, Resolved, Src, SrcKey};
use super::schedule::{reader_loop, schedule, Loaded};
use super::schema::{IoMode, Plan};
use crate::checkpoint::{open_regular, Checkpoint};
use crate::direct::{self, BufPool, DirectWriter, TensorBuf};
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::fp8;
use crate::writer::{index_json, StagedDir};

/// Bytes produced per batch handed to the writer thread.
const BATCH_BYTES: usize = 16 << 20;
/// Bytes each rayon task produces inside a batch.
const PIECE_BYTES: usize = 1 << 20;
/// Batches in flight between the producer and the writer (bounds memory to ~3 batches).
const BATCHES_IN_FLIGHT: usize = 2;

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
    pub(crate) fn check(&self) -> Result<()> {
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
pub(crate) struct Clocks {
    pub read: AtomicU64,
    pub read_stalled: AtomicU64,
    pub wait_for_read: AtomicU64,
    pub wait_for_write: AtomicU64,
    pub write: AtomicU64,
}

impl Clocks {
    pub fn add(c: &AtomicU64, since: Instant) {
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

/// The engine's end of the writer channel; times how long the engine waits on the writer.
/// Also the producer's cancellation point (every batch passes here) and its byte count.
pub(crate) struct Sink<'a, 'c> {
    tx: SyncSender<Msg<'a>>,
    clocks: &'c Clocks,
    ctl: &'c Control,
    /// Tensor bytes sent (header and Open excluded), to check each tensor against its header.
    sent: Cell<u64>,
}

impl<'a> Sink<'a, '_> {
    pub fn send(&self, m: Msg<'a>) -> Result<()> {
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

pub(crate) enum Msg<'a> {
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

/// What an op's [`OpKind::emit`] works with: its position and byte count, the other outputs,
/// the memoized scales, the direct-read buffers and the writer channel.
pub(crate) struct Emit<'a, 'x> {
    /// The output's position in write order.
    pub idx: usize,
    /// The output's bytes (its header's count).
    pub nbytes: usize,
    pub all: &'x [Resolved<'a>],
    pub memo: &'x Memo,
    pub ld: &'x Loaded,
    sink: &'x Sink<'a, 'x>,
    pool: &'x Receiver<Vec<u8>>,
}

impl<'a> Emit<'a, '_> {
    pub fn send(&self, m: Msg<'a>) -> Result<()> {
        self.sink.send(m)
    }

    /// Bytes computed here (a scale): handed to the writer as they are.
    pub fn owned(&self, b: Vec<u8>) -> Result<()> {
        self.send(Msg::Owned(b))
    }

    /// A source tensor's bytes (direct buffer or map).
    pub fn data(&self, s: &Src<'a>) -> &[u8] {
        self.ld.data(s)
    }

    /// Drop mapped source pages already used (a no-op for buffered sources).
    pub fn release_range(&self, s: &Src, from: usize, to: usize) {
        self.ld.release_range(s, from, to)
    }

    /// A mapped source's pages are dropped once the writer is past them; a buffered one needs
    /// nothing.
    pub fn release(&self, s: &Src<'a>) -> Result<()> {
        if self.ld.buffered(s) {
            Ok(())
        } else {
            self.send(Msg::Release(*s))
        }
    }

    /// e4m3 data holding NaN bytes (0x7F/0xFF) is refused, never copied: one NaN ruins a layer
    /// at inference. Planners repair them to 448 (`repair_nan_e4m3`) only when asked. A parallel
    /// count at memory speed, next to the copy's disk I/O.
    pub fn refuse_nan_e4m3(&self, s: &Src, range: Range<usize>) -> Result<()> {
        if s.info.dtype != Dtype::F8_E4M3 {
            return Ok(());
        }
        let data = &self.ld.data(s)[range];
        let n: usize = data.par_chunks(PIECE_BYTES).map(fp8::count_nan_e4m3).sum();
        if n == 0 {
            return Ok(());
        }
        Err(s.err(format!(
            "{n} NaN byte(s) (0x7F/0xFF) in F8_E4M3 data; pass --repair-nan (repair_nan=True) to \
             replace them by 448"
        )))
    }

    /// Bytes `range` of a source tensor as they are (copy, slice, concat): e4m3 NaN refused, the
    /// bytes sent without a copy, the source released.
    pub fn pass_through(&self, s: &Src<'a>, range: Range<usize>) -> Result<()> {
        self.refuse_nan_e4m3(s, range.clone())?;
        self.send(self.ld.message(s, range))?;
        self.release(s)
    }

    /// The output's bytes computed in batches of whole `unit`s (a unit of work never splits, e.g.
    /// one row of NVFP4 codes): each batch filled in parallel pieces by `fill(at, out)` (output
    /// bytes `at..at + out.len()`), sent to the writer, then `done(from, to)` to release the
    /// source bytes behind output bytes `from..to`.
    pub fn computed(
        &self,
        unit: usize,
        fill: &(dyn Fn(usize, &mut [u8]) -> Result<()> + Sync),
        done: &dyn Fn(usize, usize),
    ) -> Result<()> {
        let batch = (BATCH_BYTES / unit).max(1) * unit;
        let piece = (PIECE_BYTES / unit).max(1) * unit;
        let mut at = 0;
        while at < self.nbytes {
            let len = batch.min(self.nbytes - at);
            let mut buf = self.pool.try_recv().unwrap_or_default();
            buf.clear();
            buf.resize(len, 0);
            let filled: Vec<Result<()>> = buf
                .par_chunks_mut(piece)
                .enumerate()
                .map(|(i, c)| fill(at + i * piece, c))
                .collect();
            // The first failing piece in tensor order, so the error names the first bad row.
            filled.into_iter().collect::<Result<()>>()?;
            self.send(Msg::Owned(buf))?;
            // Ops never look back: drop the source pages of this batch now, so the resident set
            // holds about one batch of input, not one tensor.
            done(at, at + len);
            at += len;
        }
        Ok(())
    }

    /// The FP8 scales output `j` (an fp8 op) uses.
    pub fn fp8_scales(&self, j: usize) -> Result<Arc<Vec<f32>>> {
        self.all[j].op.fp8_scales(self, j).unwrap_or_else(|| {
            Err(Error::Internal(format!(
                "'{}' is not an fp8 op",
                self.all[j].name
            )))
        })
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
pub(crate) fn writer_loop(
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
                        for s in r.op.sources().iter().filter(|s| mapped(s)) {
                            s.file.prefetch(s.info);
                        }
                    }
                    if let Some(next) = resolved.get(i + 1) {
                        for s in next.op.sources().iter().filter(|s| mapped(s)) {
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
                    let cx = Emit {
                        idx: i,
                        nbytes: r.nbytes,
                        all: &resolved,
                        memo: &memo,
                        ld: &ld,
                        sink: &sink,
                        pool: &recycle_rx,
                    };
                    let scale = r.op.emit(&cx)?;
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
                        op: r.op.name(),
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
    let bytes_read = resolved
        .iter()
        .map(|r| r.op.source_bytes(r.nbytes) as u64)
        .sum();
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

/// Convenience for callers holding a JSON plan.
pub fn execute_json(plan_json: &str) -> Result<Report> {
    execute(&parse_plan(plan_json)?)
}

/// [`execute_json`] with a [`Control`].
pub fn execute_json_with(plan_json: &str, ctl: &Control) -> Result<Report> {
    execute_with(&parse_plan(plan_json)?, ctl)
}
