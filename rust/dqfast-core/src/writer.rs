//! Output side: shard assignment, atomic output directories, and the index json.
//!
//! Everything is written under a temporary sibling directory that is renamed into place only
//! after every file has been written and synced, so an interrupted or failed build never leaves
//! a half-written checkpoint at the output path.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

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

/// The index json huggingface and diffusers read: `{"metadata": {"total_size"}, "weight_map"}`.
pub fn index_json(total_size: u64, weight_map: &BTreeMap<String, String>) -> String {
    let v = serde_json::json!({
        "metadata": {"total_size": total_size},
        "weight_map": weight_map,
    });
    serde_json::to_string_pretty(&v).expect("index serializes") + "\n"
}

/// A temporary directory beside `output` that becomes `output` on [`StagedDir::commit`] and is
/// removed on drop otherwise.
pub struct StagedDir {
    pub tmp: PathBuf,
    pub output: PathBuf,
    committed: bool,
}

const TMP_TAG: &str = ".dqfast-tmp-";

/// The directory an output lives in and the output's file name.
fn parent_and_name(output: &Path) -> Result<(PathBuf, String)> {
    let parent = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = output
        .file_name()
        .ok_or_else(|| Error::Plan(format!("output path {} has no file name", output.display())))?
        .to_string_lossy()
        .to_string();
    Ok((parent, name))
}

/// A fresh staging path beside `output` for this process: `.<name>.dqfast-tmp-<pid>-<host>-<nanos>`.
/// pid + host: on storage several machines share, only our own host's pids can be checked.
/// Anything named like this (a `-old` suffix included) is removed by [`clean_stale_staging`]
/// once its process is gone.
pub fn staging_path(output: &Path) -> Result<PathBuf> {
    let (parent, name) = parent_and_name(output)?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    Ok(parent.join(format!(
        ".{name}{TMP_TAG}{}-{}-{nanos}",
        std::process::id(),
        hostname()
    )))
}

impl StagedDir {
    pub fn create(output: &Path, overwrite: bool) -> Result<StagedDir> {
        if output.exists() && !overwrite {
            return Err(Error::OutputExists(output.to_path_buf()));
        }
        let (parent, _) = parent_and_name(output)?;
        fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, "create_dir_all", e))?;
        clean_stale_staging(output);
        let tmp = staging_path(output)?;
        fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, "create_dir", e))?;
        Ok(StagedDir {
            tmp,
            output: output.to_path_buf(),
            committed: false,
        })
    }

    /// Move the finished directory into place (replacing an existing output when allowed).
    pub fn commit(mut self, overwrite: bool) -> Result<()> {
        sync_dir(&self.tmp)?;
        if self.output.exists() {
            if !overwrite {
                return Err(Error::OutputExists(self.output.clone()));
            }
            // Rename the old output aside first so the swap itself is two renames, never a
            // moment with a half-deleted directory at the output path.
            // Named like a staging dir, so the stale cleaner removes it if we die right here.
            let old = PathBuf::from(format!("{}-old", self.tmp.display()));
            fs::rename(&self.output, &old).map_err(|e| Error::io(&self.output, "rename", e))?;
            fs::rename(&self.tmp, &self.output).map_err(|e| Error::io(&self.tmp, "rename", e))?;
            let _ = if old.is_dir() {
                fs::remove_dir_all(&old)
            } else {
                fs::remove_file(&old)
            };
        } else {
            fs::rename(&self.tmp, &self.output).map_err(|e| Error::io(&self.tmp, "rename", e))?;
        }
        if let Some(p) = self.output.parent() {
            let _ = sync_dir(if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            });
        }
        self.committed = true;
        Ok(())
    }
}

impl Drop for StagedDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.tmp);
        }
    }
}

fn sync_dir(p: &Path) -> Result<()> {
    let f = fs::File::open(p).map_err(|e| Error::io(p, "open", e))?;
    f.sync_all().map_err(|e| Error::io(p, "fsync", e))
}

fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().replace(['-', '/'], "_"))
        .unwrap_or_else(|_| "host".into())
}

/// Whether a process of this host is running (a zombie — killed, not yet reaped — is not).
fn pid_alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state letter follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|state| state != 'Z' && state != 'X'),
        Err(_) => false,
    }
}

/// Remove temporary directories of `output` left by processes of this host that no longer exist
/// (a build killed with SIGKILL cannot clean up after itself); returns what was removed.
/// Directories of other hosts are left alone: their pids mean nothing here.
pub fn clean_stale_staging(output: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let Ok((parent, name)) = parent_and_name(output) else {
        return removed;
    };
    let prefix = format!(".{name}{TMP_TAG}");
    let host = hostname();
    let Ok(rd) = fs::read_dir(&parent) else {
        return removed;
    };
    for e in rd.flatten() {
        let fname = e.file_name().to_string_lossy().to_string();
        let Some(rest) = fname.strip_prefix(&prefix) else {
            continue;
        };
        let mut parts = rest.split('-');
        let pid: Option<i32> = parts.next().and_then(|p| p.parse().ok());
        let dir_host = parts.next().unwrap_or("");
        // Directories named before the host was recorded have a number here.
        let ours = dir_host == host || dir_host.chars().all(|c| c.is_ascii_digit());
        if ours && !pid.is_some_and(pid_alive) && fs::remove_dir_all(e.path()).is_ok() {
            removed.push(e.path());
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_split_greedily() {
        assert_eq!(assign_shards(&[4, 4, 4], 8), vec![0..2, 2..3]);
        assert_eq!(assign_shards(&[10, 1], 8), vec![0..1, 1..2]);
        assert_eq!(assign_shards(&[1, 10, 1], 8), vec![0..1, 1..2, 2..3]);
        assert_eq!(assign_shards(&[], 8), vec![0..0]);
        assert_eq!(assign_shards(&[3, 3, 2], 8), vec![0..3]);
    }

    #[test]
    fn names() {
        assert_eq!(shard_file_name("m", 0, 1), "m.safetensors");
        assert_eq!(shard_file_name("m", 1, 3), "m-00002-of-00003.safetensors");
    }

    #[test]
    fn staged_dir_is_removed_unless_committed() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("out");
        let s = StagedDir::create(&out, false).unwrap();
        let tmp = s.tmp.clone();
        assert!(tmp.is_dir());
        drop(s);
        assert!(!tmp.exists());
        assert!(!out.exists());
        let s = StagedDir::create(&out, false).unwrap();
        fs::write(s.tmp.join("f"), b"x").unwrap();
        s.commit(false).unwrap();
        assert!(out.join("f").is_file());
        assert!(matches!(
            StagedDir::create(&out, false),
            Err(Error::OutputExists(_))
        ));
        let s = StagedDir::create(&out, true).unwrap();
        fs::write(s.tmp.join("g"), b"y").unwrap();
        s.commit(true).unwrap();
        assert!(out.join("g").is_file());
        assert!(!out.join("f").exists());
        let leftovers: Vec<_> = fs::read_dir(d.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1);
    }

    #[test]
    fn stale_tmp_dirs_of_dead_processes_are_cleaned() {
        let d = tempfile::tempdir().unwrap();
        let stale = d
            .path()
            .join(format!(".out.dqfast-tmp-999999999-{}-1", hostname()));
        fs::create_dir(&stale).unwrap();
        let stale_old = d
            .path()
            .join(format!(".out.dqfast-tmp-999999998-{}-1-old", hostname()));
        fs::create_dir(&stale_old).unwrap();
        let foreign = d.path().join(".out.dqfast-tmp-999999999-otherhost-1");
        fs::create_dir(&foreign).unwrap();
        let s = StagedDir::create(&d.path().join("out"), false).unwrap();
        assert!(!stale.exists() && !stale_old.exists());
        assert!(
            foreign.exists(),
            "another host's staging dir must be left alone"
        );
        drop(s);
        assert!(pid_alive(std::process::id() as i32));
    }
}
