//! Memory-mapped access to one safetensors file or a sharded checkpoint directory.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use memmap2::{Advice, Mmap, UncheckedAdvice};

use crate::error::{Error, Result};
use crate::header::{parse_header, Header, TensorInfo};

/// Index file names looked for in a directory, in order (then any `*.safetensors.index.json`).
pub const INDEX_NAMES: [&str; 2] = [
    "model.safetensors.index.json",
    "diffusion_pytorch_model.safetensors.index.json",
];

/// What a non-regular file is, for messages.
fn file_kind(t: std::fs::FileType) -> &'static str {
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_block_device() || t.is_char_device() {
        "a device"
    } else {
        "not a plain file"
    }
}

/// Open an input for reading only if it is a regular file. `O_NONBLOCK` makes opening a FIFO
/// return at once instead of waiting for a writer; `fstat` on the opened handle then decides
/// (no window between the check and the open). `flags` are extra open flags (`O_DIRECT`).
pub fn open_regular_with(path: &Path, flags: i32) -> Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | flags)
        .open(path)
        .map_err(|e| Error::io(path, "open", e))?;
    let t = f
        .metadata()
        .map_err(|e| Error::io(path, "stat", e))?
        .file_type();
    if !t.is_file() {
        return Err(Error::NotRegular {
            path: path.to_path_buf(),
            kind: file_kind(t),
        });
    }
    Ok(f)
}

/// [`open_regular_with`] without extra flags.
pub fn open_regular(path: &Path) -> Result<File> {
    open_regular_with(path, 0)
}

/// The whole text of a regular file (never blocks on a FIFO).
pub fn read_regular_to_string(path: &Path) -> Result<String> {
    use std::io::Read;
    let mut s = String::new();
    open_regular(path)?
        .read_to_string(&mut s)
        .map_err(|e| Error::io(path, "read", e))?;
    Ok(s)
}

/// One validated, memory-mapped safetensors file.
pub struct SafeFile {
    pub path: PathBuf,
    pub header: Header,
    mmap: Option<Mmap>,
    by_name: HashMap<String, usize>,
    /// The same file opened with `O_DIRECT`, on first use; `None` inside where unsupported.
    direct: std::sync::OnceLock<Option<File>>,
}

impl SafeFile {
    pub fn open(path: &Path) -> Result<SafeFile> {
        let file = open_regular(path)?;
        let len = file
            .metadata()
            .map_err(|e| Error::io(path, "stat", e))?
            .len();
        if len < 8 {
            return Err(Error::header(
                path,
                format!("file is {len} bytes, too short for the 8-byte header length"),
            ));
        }
        // SAFETY: the map is read-only; a file truncated underneath us by another process is
        // outside what any mmap-based reader (safetensors included) can defend against.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, "mmap", e))?;
        // Tensors are read front to back: ask for aggressive readahead.
        let _ = mmap.advise(Advice::Sequential);
        let header = parse_header(path, &mmap)?;
        let by_name = header
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(SafeFile {
            path: path.to_path_buf(),
            header,
            mmap: Some(mmap),
            by_name,
            direct: std::sync::OnceLock::new(),
        })
    }

    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.header.tensors[i])
    }

    /// The raw bytes of a tensor (zero-copy).
    pub fn data(&self, t: &TensorInfo) -> &[u8] {
        let m = self.mmap.as_ref().expect("mapped");
        &m[self.header.data_start + t.begin..self.header.data_start + t.end]
    }

    /// Start reading a tensor from disk in the background (so I/O overlaps the work on the
    /// tensor before it).
    /// Byte offset of a tensor's data in the file.
    pub fn file_offset(&self, t: &TensorInfo) -> u64 {
        (self.header.data_start + t.begin) as u64
    }

    /// A handle for direct (page-cache-bypassing) reads, if the file system supports them.
    pub fn direct_file(&self) -> Option<&File> {
        self.direct
            .get_or_init(|| crate::direct::open_for_read(&self.path))
            .as_ref()
    }

    pub fn prefetch(&self, t: &TensorInfo) {
        let Some(m) = self.mmap.as_ref() else { return };
        let start = self.header.data_start + t.begin;
        // The kernel caps one WILLNEED at the device's readahead size (read_ahead_kb, often a few
        // MB), so a large tensor is requested window by window.
        const WINDOW: usize = 4 << 20;
        let len = t.end - t.begin;
        let mut off = 0;
        while off < len {
            let n = WINDOW.min(len - off);
            let _ = m.advise_range(Advice::WillNeed, start + off, n);
            off += n;
        }
    }

    /// Tell the kernel we are done with these pages of the map: they leave our resident set
    /// (the page cache keeps them), which is what keeps peak RSS flat on 28 GB inputs.
    pub fn release(&self, t: &TensorInfo) {
        self.release_range(t, 0, t.nbytes());
    }

    /// [`SafeFile::release`] for bytes `from..to` of a tensor's data.
    pub fn release_range(&self, t: &TensorInfo, from: usize, to: usize) {
        let Some(m) = self.mmap.as_ref() else { return };
        let page = 4096usize;
        let start = self.header.data_start + t.begin + from;
        let end = self.header.data_start + t.begin + to.min(t.nbytes());
        let a = start.div_ceil(page) * page;
        let b = end / page * page;
        if b > a {
            // SAFETY: the map is private, read-only and file-backed: dropping its pages only
            // means they are faulted in again from the file if read later.
            unsafe {
                let _ = m.unchecked_advise_range(UncheckedAdvice::DontNeed, a, b - a);
            }
        }
    }
}

/// A checkpoint: one file, or the shards of a directory, with a name → shard map.
pub struct Checkpoint {
    pub root: PathBuf,
    pub files: Vec<SafeFile>,
    /// The index json the shards were listed by (None: a single file).
    pub index: Option<PathBuf>,
    locate: HashMap<String, usize>,
    /// Tensor names in shard order, then file order.
    pub names: Vec<String>,
}

impl Checkpoint {
    /// Open a `.safetensors` file, an index json, or a directory holding one file or an index and
    /// its shards.
    pub fn open(path: &Path) -> Result<Checkpoint> {
        if path.is_dir() {
            Self::open_dir(path)
        } else if path.extension().is_some_and(|e| e == "json") {
            // An index named directly (a diffusers variant's `*.safetensors.index.fp16.json`):
            // its shards; the index stays the root, so reopening the root selects the same files.
            let (files, weight_map) = read_index(path)?;
            Self::from_files(path, files, Some((path.to_path_buf(), weight_map)))
        } else {
            Self::from_files(path, vec![path.to_path_buf()], None)
        }
    }

    fn open_dir(dir: &Path) -> Result<Checkpoint> {
        let mut index = INDEX_NAMES
            .iter()
            .map(|n| dir.join(n))
            // exists(), not is_file(): a FIFO under an index name must be refused, not skipped.
            .find(|p| p.exists());
        let entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, "read_dir", e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        if index.is_none() {
            let mut idx: Vec<&PathBuf> = entries
                .iter()
                .filter(|p| p.to_string_lossy().ends_with(".safetensors.index.json"))
                .collect();
            idx.sort();
            match idx.len() {
                0 => {}
                1 => index = Some(idx[0].clone()),
                _ => {
                    return Err(Error::header(
                        dir,
                        format!("several index files and none of the standard names: {idx:?}"),
                    ))
                }
            }
        }
        if let Some(index) = index {
            let (files, weight_map) = read_index(&index)?;
            // A shard the index does not mention would be silently left out of the build.
            let mut stray: Vec<&PathBuf> = entries
                .iter()
                .filter(|p| p.extension().is_some_and(|e| e == "safetensors") && !files.contains(p))
                .collect();
            stray.sort();
            if let Some(p) = stray.first() {
                return Err(Error::header(
                    &index,
                    format!(
                        "shard file '{}' is in the directory but no weight_map entry mentions it \
                         (remove it, or add its tensors to the index)",
                        p.file_name().unwrap_or_default().to_string_lossy()
                    ),
                ));
            }
            return Self::from_files(dir, files, Some((index, weight_map)));
        }
        let mut st: Vec<PathBuf> = entries
            .into_iter()
            // Not filtered by is_file(): a FIFO or directory named *.safetensors is refused by
            // SafeFile::open with a message saying so.
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        st.sort();
        // diffusers variants (`<name>.fp16.safetensors`) beside the main weights: without a
        // variant, diffusers loads the main file, and so do we.
        if st.len() > 1 {
            let main: Vec<PathBuf> = st.iter().filter(|p| !is_variant_file(p)).cloned().collect();
            if main.len() == 1 {
                return Self::from_files(dir, main, None);
            }
        }
        match st.len() {
            0 => Err(Error::header(
                dir,
                "no .safetensors file and no index json in directory",
            )),
            1 => Self::from_files(dir, st, None),
            _ => Err(Error::header(
                dir,
                format!(
                    "{} .safetensors files but no index json to say how they fit together",
                    st.len()
                ),
            )),
        }
    }

    fn from_files(
        root: &Path,
        paths: Vec<PathBuf>,
        index: Option<(PathBuf, HashMap<String, String>)>,
    ) -> Result<Checkpoint> {
        // Open (and so validate) every shard in parallel: each open is a header parse.
        use rayon::prelude::*;
        let files: Vec<SafeFile> = paths
            .par_iter()
            .map(|p| SafeFile::open(p))
            .collect::<Result<_>>()?;
        let mut locate = HashMap::new();
        let mut names = Vec::new();
        for (fi, f) in files.iter().enumerate() {
            for t in &f.header.tensors {
                if let Some(prev) = locate.insert(t.name.clone(), fi) {
                    return Err(Error::tensor(
                        &f.path,
                        &t.name,
                        format!("also present in {}", files[prev].path.display()),
                    ));
                }
                names.push(t.name.clone());
            }
        }
        let index_path = index.as_ref().map(|(p, _)| p.clone());
        if let Some((index_path, weight_map)) = index {
            for (name, shard) in &weight_map {
                match locate.get(name) {
                    None => {
                        return Err(Error::header(
                            &index_path,
                            format!("weight_map lists tensor '{name}' but shard '{shard}' does not contain it"),
                        ))
                    }
                    Some(&fi) => {
                        let actual = files[fi].path.file_name().unwrap().to_string_lossy();
                        if actual != shard.as_str() {
                            return Err(Error::header(
                                &index_path,
                                format!("weight_map puts tensor '{name}' in '{shard}' but it is in '{actual}'"),
                            ));
                        }
                    }
                }
            }
            if let Some(n) = names.iter().find(|n| !weight_map.contains_key(*n)) {
                return Err(Error::header(
                    &index_path,
                    format!("tensor '{n}' is in a shard but not in the weight_map"),
                ));
            }
        }
        Ok(Checkpoint {
            root: root.to_path_buf(),
            files,
            index: index_path,
            locate,
            names,
        })
    }

    pub fn find(&self, name: &str) -> Option<(&SafeFile, &TensorInfo)> {
        let &fi = self.locate.get(name)?;
        let f = &self.files[fi];
        Some((f, f.get(name).expect("located tensor present")))
    }

    pub fn require(&self, name: &str) -> Result<(&SafeFile, &TensorInfo)> {
        self.find(name).ok_or_else(|| Error::MissingTensor {
            path: self.root.clone(),
            tensor: name.to_string(),
        })
    }

    /// NaN bytes (0x7F/0xFF) of every F8_E4M3 tensor that has any, counted in parallel over the
    /// maps (pages released after use, so RSS stays flat on large checkpoints).
    pub fn nan_e4m3_counts(&self) -> std::collections::BTreeMap<String, usize> {
        use rayon::prelude::*;
        let items: Vec<(&SafeFile, &TensorInfo)> = self
            .files
            .iter()
            .flat_map(|f| f.header.tensors.iter().map(move |t| (f, t)))
            .filter(|(_, t)| t.dtype == crate::dtype::Dtype::F8_E4M3)
            .collect();
        items
            .par_iter()
            .map(|(f, t)| {
                let n = f
                    .data(t)
                    .chunks(4 << 20)
                    .map(crate::fp8::count_nan_e4m3)
                    .sum::<usize>();
                f.release(t);
                (t.name.clone(), n)
            })
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    pub fn total_bytes(&self) -> u64 {
        self.files
            .iter()
            .flat_map(|f| f.header.tensors.iter())
            .map(|t| t.nbytes() as u64)
            .sum()
    }
}

/// A diffusers variant file: a dot inside the name before `.safetensors` (`model.fp16.safetensors`).
fn is_variant_file(p: &Path) -> bool {
    p.file_stem()
        .is_some_and(|s| s.to_string_lossy().contains('.'))
}

/// Read an index json: the shard files (in first-appearance order, deduplicated) and the map.
pub fn read_index(index: &Path) -> Result<(Vec<PathBuf>, HashMap<String, String>)> {
    let text = read_regular_to_string(index)?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::header(index, format!("index is not valid JSON: {e}")))?;
    let wm = v
        .get("weight_map")
        .and_then(|w| w.as_object())
        .ok_or_else(|| Error::header(index, "index has no 'weight_map' object"))?;
    if wm.is_empty() {
        // Every tensor would be missing from the build.
        return Err(Error::header(index, "index has an empty 'weight_map'"));
    }
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut shards: Vec<String> = Vec::new();
    let mut map = HashMap::with_capacity(wm.len());
    for (name, s) in wm {
        let s = s.as_str().ok_or_else(|| {
            Error::header(
                index,
                format!("weight_map entry for '{name}' is not a string"),
            )
        })?;
        if s.contains('/') || s.contains('\\') || s == ".." {
            return Err(Error::header(
                index,
                format!("shard name '{s}' is not a plain file name"),
            ));
        }
        if !shards.iter().any(|x| x == s) {
            shards.push(s.to_string());
        }
        map.insert(name.clone(), s.to_string());
    }
    let mut files = Vec::with_capacity(shards.len());
    for s in shards {
        let p = dir.join(&s);
        if !p.exists() {
            return Err(Error::header(
                index,
                format!("shard '{s}' listed in weight_map does not exist"),
            ));
        }
        files.push(p);
    }
    Ok((files, map))
}
