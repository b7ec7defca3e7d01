//! Direct I/O (`O_DIRECT`): reading source tensors into reused aligned buffers and writing
//! output shards without the page cache.
//!
//! Why: a conversion touches every byte of a 28 GB checkpoint once. Through the page cache each
//! byte costs a freshly allocated cache page on the way in (read) and another on the way out
//! (write), plus the page faults of the map and the kernel's copy. On the project's VM that
//! bookkeeping, not the disk, was the limit: `cat` of 7.5 GB spent 5–17 s of system time where
//! `dd iflag=direct` spent 0.5 s at the same or better speed, and 4 GB of buffered writes cost
//! 17–25 s of system time against 3 s direct (docs/performance.md). Direct I/O moves the data by
//! DMA into memory that is allocated once and reused.
//!
//! Everything here is an optimisation with a fallback: a file system that refuses `O_DIRECT`
//! (tmpfs on older kernels, some FUSE mounts) is read through the map and written buffered.

use std::alloc::{alloc, dealloc, Layout};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// Alignment of buffers, offsets and lengths for `O_DIRECT` (covers 512 B and 4 KiB sectors).
pub const ALIGN: usize = 4096;
/// Buffers are sized in steps of this, so a buffer fits many tensors of similar size.
const SIZE_STEP: usize = 4 << 20;

pub fn align_down(x: usize) -> usize {
    x / ALIGN * ALIGN
}
pub fn align_up(x: usize) -> usize {
    x.div_ceil(ALIGN) * ALIGN
}

/// Heap memory aligned for `O_DIRECT`. Not zeroed: only bytes that were written into it are ever
/// exposed as a slice.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    cap: usize,
}

// The buffer is plain memory owned by this value.
unsafe impl Send for AlignedBuf {}
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    pub fn new(cap: usize) -> AlignedBuf {
        let cap = align_up(cap.max(ALIGN));
        let layout = Layout::from_size_align(cap, ALIGN).expect("buffer layout");
        let ptr = unsafe { alloc(layout) };
        let ptr = NonNull::new(ptr).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, cap }
    }
    pub fn capacity(&self) -> usize {
        self.cap
    }
    fn ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        unsafe {
            dealloc(
                self.ptr.as_ptr(),
                Layout::from_size_align_unchecked(self.cap, ALIGN),
            )
        }
    }
}

/// Direct reads are issued this many bytes at a time, one at a time, like the writer's writes.
/// Measured on the 14B build (docs/performance.md): reads and writes share the disk, and more
/// reads in flight starve the writes the engine waits for — 4 threads × 8 MiB took 42.7–48.8 s,
/// 2 × 16 MiB 42.7 s, one 16 MiB read at a time 31.9–38.9 s (one 8 MiB: 35.1 s, one 32 MiB: 36.3 s).
const READ_CHUNK: usize = 16 << 20;

/// Read `len` bytes at `offset` of a file opened with `O_DIRECT` into `buf`; returns where in the
/// buffer they start (the read itself starts at the aligned offset below `offset`).
pub fn read_at(
    file: &File,
    path: &Path,
    offset: u64,
    len: usize,
    buf: &AlignedBuf,
) -> Result<usize> {
    read_at_until(file, path, offset, len, buf, &|| false)
}

/// [`read_at`], giving up with [`Error::Cancelled`] between chunks once `stop()` says so (a
/// large tensor is many chunks: a cancelled build must not wait for the whole read).
fn read_at_until(
    file: &File,
    path: &Path,
    offset: u64,
    len: usize,
    buf: &AlignedBuf,
    stop: &dyn Fn() -> bool,
) -> Result<usize> {
    let start = align_down(offset as usize);
    let skip = offset as usize - start;
    let want = align_up(skip + len);
    assert!(want <= buf.cap, "direct read larger than its buffer");
    let mut a = 0;
    while a < want {
        if stop() {
            return Err(Error::Cancelled);
        }
        let b = (a + READ_CHUNK).min(want);
        read_range(file, path, start, buf.ptr() as usize, a, b, skip + len)?;
        a = b;
    }
    Ok(skip)
}

/// Read buffer bytes `[a, b)` from file offset `file_start + a`; bytes at or past `need_end` may
/// lie beyond the end of the file (the aligned tail of the last tensor).
fn read_range(
    file: &File,
    path: &Path,
    file_start: usize,
    base: usize,
    a: usize,
    b: usize,
    need_end: usize,
) -> Result<()> {
    let mut done = a;
    while done < b {
        // A buffer we own (`b <= cap`); the kernel writes at most `b - done` bytes at `base + done`.
        let n = unsafe {
            libc::pread(
                std::os::fd::AsRawFd::as_raw_fd(file),
                (base + done) as *mut libc::c_void,
                b - done,
                (file_start + done) as libc::off_t,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Error::io(path, "read (O_DIRECT)", e));
        }
        if n == 0 {
            if done >= need_end {
                return Ok(());
            }
            return Err(Error::io(
                path,
                "read (O_DIRECT)",
                std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "file shorter than its header says",
                ),
            ));
        }
        done += n as usize;
    }
    Ok(())
}

/// Open `path` for direct reads, or `None` where the file system does not support it.
/// Only a regular file is opened (a FIFO swapped in after the header was read is refused, never
/// waited on).
pub fn open_for_read(path: &Path) -> Option<File> {
    let f = crate::checkpoint::open_regular_with(path, libc::O_DIRECT).ok()?;
    // Some file systems accept the flag at open and refuse the read: probe one block.
    let b = AlignedBuf::new(ALIGN);
    let n = unsafe {
        libc::pread(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            b.ptr() as *mut libc::c_void,
            ALIGN,
            0,
        )
    };
    (n >= 0).then_some(f)
}

/// Fraction of `data`'s pages (a slice of a file map) that are in the page cache.
pub fn resident_fraction(data: &[u8]) -> f64 {
    if data.is_empty() {
        return 1.0;
    }
    let page = ALIGN;
    let start = align_down(data.as_ptr() as usize);
    let end = data.as_ptr() as usize + data.len();
    let pages = (end - start).div_ceil(page);
    let mut vec = vec![0u8; pages];
    let rc = unsafe { libc::mincore(start as *mut libc::c_void, end - start, vec.as_mut_ptr()) };
    if rc != 0 {
        return 0.0;
    }
    vec.iter().filter(|&&v| v & 1 == 1).count() as f64 / pages as f64
}

// --------------------------------------------------------------------------- buffer pool

/// Aligned read buffers under one byte budget, reused so that their pages are faulted in once
/// per build, not once per tensor.
pub struct BufPool {
    budget: usize,
    state: Mutex<PoolState>,
    freed: Condvar,
}

struct PoolState {
    free: Vec<AlignedBuf>,
    allocated: usize,
    closed: bool,
}

/// Capacity a read of `len` bytes at `offset` needs (what the budget counts).
pub fn need_for(offset: u64, len: usize) -> usize {
    let skip = offset as usize - align_down(offset as usize);
    align_up(skip + len).div_ceil(SIZE_STEP) * SIZE_STEP
}

impl BufPool {
    pub fn new(budget: usize) -> Arc<BufPool> {
        Arc::new(BufPool {
            budget,
            state: Mutex::new(PoolState {
                free: Vec::new(),
                allocated: 0,
                closed: false,
            }),
            freed: Condvar::new(),
        })
    }

    /// A buffer of at least `need` bytes; waits while the budget is used up. `None` once closed.
    pub fn take(self: &Arc<Self>, need: usize) -> Option<AlignedBuf> {
        let mut st = self.state.lock().unwrap();
        loop {
            if st.closed {
                return None;
            }
            // Smallest free buffer that fits.
            if let Some(i) = (0..st.free.len())
                .filter(|&i| st.free[i].cap >= need)
                .min_by_key(|&i| st.free[i].cap)
            {
                return Some(st.free.swap_remove(i));
            }
            // Drop free buffers that are too small until a new one fits the budget.
            while st.allocated + need > self.budget && !st.free.is_empty() {
                let b = st.free.pop().unwrap();
                st.allocated -= b.cap;
            }
            if st.allocated + need <= self.budget || st.allocated == 0 {
                st.allocated += need;
                return Some(AlignedBuf::new(need));
            }
            st = self.freed.wait(st).unwrap();
        }
    }

    pub fn give(&self, b: AlignedBuf) {
        let mut st = self.state.lock().unwrap();
        st.free.push(b);
        self.freed.notify_all();
    }

    fn is_closed(&self) -> bool {
        self.state.lock().unwrap().closed
    }

    /// Wake and refuse every waiter (the build is over or failed).
    pub fn close(&self) {
        self.state.lock().unwrap().closed = true;
        self.freed.notify_all();
    }
}

/// The bytes of one source tensor read into a pooled buffer; goes back to the pool on drop.
pub struct TensorBuf {
    buf: Option<AlignedBuf>,
    pool: Arc<BufPool>,
    start: usize,
    len: usize,
}

impl TensorBuf {
    /// Read `len` bytes at `offset` of `file` into a buffer from `pool` (`None`: pool closed);
    /// `timed(waiting for the pool, reading)` is told how long each step took.
    pub fn read(
        pool: &Arc<BufPool>,
        file: &File,
        path: &Path,
        offset: u64,
        len: usize,
        timed: impl FnOnce(Duration, Duration),
    ) -> Result<Option<TensorBuf>> {
        let t0 = Instant::now();
        let Some(buf) = pool.take(need_for(offset, len)) else {
            return Ok(None);
        };
        let t1 = Instant::now();
        let mut tb = TensorBuf {
            buf: Some(buf),
            pool: pool.clone(),
            start: 0,
            len: 0,
        };
        // The pool closes when the build stops (done, failed or cancelled): stop reading too.
        let r = read_at_until(file, path, offset, len, tb.buf.as_ref().unwrap(), &|| {
            pool.is_closed()
        });
        timed(t1 - t0, t1.elapsed());
        tb.start = match r {
            Err(Error::Cancelled) => return Ok(None),
            r => r?,
        };
        tb.len = len;
        Ok(Some(tb))
    }

    pub fn bytes(&self) -> &[u8] {
        let b = self.buf.as_ref().expect("buffer present until drop");
        // `read` filled [start, start + len).
        unsafe { std::slice::from_raw_parts(b.ptr().add(self.start), self.len) }
    }
}

impl Drop for TensorBuf {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            self.pool.give(b);
        }
    }
}

// --------------------------------------------------------------------------- writing

/// Bytes gathered before one direct write.
const STAGE_BYTES: usize = 16 << 20;

/// A shard file written with `O_DIRECT` through one aligned staging buffer; the last partial
/// block is padded and the file truncated back to its length.
pub struct DirectWriter {
    file: File,
    path: PathBuf,
    stage: AlignedBuf,
    fill: usize,
    written: u64,
}

impl DirectWriter {
    /// `None` where the file system refuses `O_DIRECT` (the caller writes buffered instead).
    /// `stage` is reused across files; `size` (the final length) is allocated up front, so that
    /// the writes fill allocated blocks instead of extending the file one write at a time.
    pub fn create(
        path: &Path,
        stage: Option<AlignedBuf>,
        size: u64,
    ) -> Result<std::result::Result<DirectWriter, Option<AlignedBuf>>> {
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_DIRECT)
            .open(path);
        match f {
            Ok(file) => {
                if size > 0 {
                    // Best effort: a file system without fallocate still gets the writes.
                    let _ = unsafe {
                        libc::fallocate(
                            std::os::fd::AsRawFd::as_raw_fd(&file),
                            0,
                            0,
                            size as libc::off_t,
                        )
                    };
                }
                Ok(Ok(DirectWriter {
                    file,
                    path: path.to_path_buf(),
                    stage: stage.unwrap_or_else(|| AlignedBuf::new(STAGE_BYTES)),
                    fill: 0,
                    written: 0,
                }))
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(Err(stage)),
            Err(e) => Err(Error::io(path, "create", e)),
        }
    }

    pub fn write_all(&mut self, mut data: &[u8]) -> Result<()> {
        while !data.is_empty() {
            let n = (self.stage.cap - self.fill).min(data.len());
            unsafe {
                std::ptr::copy_nonoverlapping(data.as_ptr(), self.stage.ptr().add(self.fill), n)
            };
            self.fill += n;
            data = &data[n..];
            if self.fill == self.stage.cap {
                self.flush_stage(self.fill)?;
            }
        }
        Ok(())
    }

    fn flush_stage(&mut self, len: usize) -> Result<()> {
        let s = unsafe { std::slice::from_raw_parts(self.stage.ptr(), len) };
        self.file
            .write_all_at(s, self.written)
            .map_err(|e| Error::io(&self.path, "write (O_DIRECT)", e))?;
        self.written += len as u64;
        self.fill = 0;
        Ok(())
    }

    /// Write the tail (zero-padded to a block, then truncated off), optionally fsync; hands the
    /// staging buffer back for the next file.
    pub fn finish(mut self, fsync: bool) -> Result<AlignedBuf> {
        let logical = self.written + self.fill as u64;
        if self.fill > 0 {
            let padded = align_up(self.fill);
            unsafe {
                std::ptr::write_bytes(self.stage.ptr().add(self.fill), 0, padded - self.fill)
            };
            self.flush_stage(padded)?;
        }
        // Drops the padding of the last block and whatever was allocated beyond what was written.
        self.file
            .set_len(logical)
            .map_err(|e| Error::io(&self.path, "truncate", e))?;
        if fsync {
            self.file
                .sync_all()
                .map_err(|e| Error::io(&self.path, "fsync", e))?;
        }
        Ok(self.stage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn direct_write_then_read_round_trips_unaligned_lengths() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.bin");
        // Longer than the staging buffer and than several read chunks.
        let data: Vec<u8> = (0..(3 * READ_CHUNK + 12_345))
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        // Allocated larger than written: the file must still end where the data ends.
        match DirectWriter::create(&p, None, data.len() as u64 + 12_345).unwrap() {
            Ok(mut w) => {
                w.write_all(&data[..100]).unwrap();
                w.write_all(&data[100..]).unwrap();
                w.finish(true).unwrap();
            }
            Err(_) => {
                // No O_DIRECT on this file system: nothing to test here.
                std::fs::File::create(&p).unwrap().write_all(&data).unwrap();
            }
        }
        assert_eq!(std::fs::read(&p).unwrap(), data);
        if let Some(f) = open_for_read(&p) {
            let pool = BufPool::new(128 << 20);
            let n = data.len();
            for (off, len) in [
                (0u64, 10usize),
                (4095, 2),
                (5000, 3 << 20),
                (n as u64 - 7, 7),
                (1, n - 1),
                (4097, n - 4100),
            ] {
                let tb = TensorBuf::read(&pool, &f, &p, off, len, |_, _| {})
                    .unwrap()
                    .unwrap();
                assert_eq!(
                    tb.bytes(),
                    &data[off as usize..off as usize + len],
                    "offset {off} len {len}"
                );
            }
            // Reading past the end is an error naming the file, not garbage.
            let e = TensorBuf::read(&pool, &f, &p, data.len() as u64 - 3, 10, |_, _| {})
                .err()
                .unwrap();
            assert!(e.to_string().contains("x.bin"), "{e}");
        }
    }

    #[test]
    fn pool_reuses_buffers_and_respects_its_budget() {
        let pool = BufPool::new(3 * SIZE_STEP);
        let a = pool.take(SIZE_STEP).unwrap();
        let b = pool.take(2 * SIZE_STEP).unwrap();
        let pa = a.ptr() as usize;
        pool.give(a);
        let c = pool.take(SIZE_STEP).unwrap();
        assert_eq!(c.ptr() as usize, pa, "a free buffer that fits is reused");
        // Budget full: a waiter is released by a give from another thread.
        let p2 = pool.clone();
        let t = std::thread::spawn(move || p2.take(SIZE_STEP).map(|b| b.capacity()));
        std::thread::sleep(std::time::Duration::from_millis(50));
        pool.give(b);
        assert_eq!(t.join().unwrap(), Some(2 * SIZE_STEP));
        pool.give(c);
        pool.close();
        assert!(pool.take(1).is_none());
    }
}
