//! Direct reads: which source tensors a reader thread reads ahead with `O_DIRECT` into a budgeted
//! buffer pool (the rest are read through the memory map), in the order the engine needs them,
//! and when each is taken and dropped.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::mpsc::SyncSender;
use std::sync::Arc;

use super::pipeline::{Clocks, Control, Msg};
use super::resolve::{key, Resolved, Src, SrcKey};
use super::schema::IoMode;
use crate::direct::{self, BufPool, TensorBuf};
use crate::error::{Error, Result};

/// Smaller source tensors are read through the map: direct reads pay off for bulk data.
const MIN_DIRECT_BYTES: usize = 1 << 20;

/// Source tensors currently held in direct-read buffers; every other source is read through
/// its memory map. Correctness never depends on what is here, only speed.
#[derive(Default)]
pub(crate) struct Loaded {
    pub bufs: HashMap<SrcKey, Arc<TensorBuf>>,
}

impl Loaded {
    pub fn data<'s, 'a: 's>(&'s self, s: &Src<'a>) -> &'s [u8] {
        match self.bufs.get(&key(s)) {
            Some(b) => b.bytes(),
            None => s.data(),
        }
    }
    pub(crate) fn message<'a>(&self, s: &Src<'a>, range: std::ops::Range<usize>) -> Msg<'a> {
        match self.bufs.get(&key(s)) {
            Some(b) => Msg::Shared(b.clone(), range),
            None => Msg::Borrowed(&s.data()[range]),
        }
    }
    pub fn buffered(&self, s: &Src) -> bool {
        self.bufs.contains_key(&key(s))
    }
    /// Drop mapped source pages already used (a no-op for buffered sources).
    pub fn release_range(&self, s: &Src, from: usize, to: usize) {
        if !self.buffered(s) {
            s.file.release_range(s.info, from, to);
        }
    }
}

/// Which source tensors are read directly into buffers, in the order the engine first needs
/// them, and when each is received and dropped.
pub(crate) struct Schedule<'a> {
    pub loads: Vec<Src<'a>>,
    /// Per output tensor: loads to receive before emitting it.
    pub take: Vec<Vec<usize>>,
    /// Per output tensor: loads to drop after emitting it.
    pub drop: Vec<Vec<usize>>,
}

/// The source tensors emitting output `i` reads: its own sources, and the weights behind an
/// NVFP4 global scale the first time it is needed (a `scale_of` always follows its weight, whose
/// scales are memoized by then).
fn uses<'a>(i: usize, all: &[Resolved<'a>], seen_nv: &mut HashSet<Vec<SrcKey>>) -> Vec<Src<'a>> {
    let mut v = all[i].op.sources();
    if let Some(srcs) = all[i].op.group() {
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
pub(crate) fn schedule<'a>(all: &[Resolved<'a>], io: IoMode, budget: usize) -> Schedule<'a> {
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
pub(crate) fn reader_loop(
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
