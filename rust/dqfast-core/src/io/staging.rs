//! Atomic output directories and the input/output overlap rule.
//!
//! Everything is written under a temporary sibling directory that is renamed into place only
//! after every file has been written and synced, so an interrupted or failed build never leaves
//! a half-written checkpoint at the output path.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};

/// A temporary directory beside `output` that becomes `output` on [`StagedDir::commit`] and is
/// removed on drop otherwise.
pub struct StagedDir {
    pub tmp: PathBuf,
    pub output: PathBuf,
    committed: bool,
    /// The inputs the output must stay clear of, checked again right before the commit renames
    /// (and deletes) an existing output.
    guard: Option<OutputGuard>,
}

// ---- the input/output overlap rule ---------------------------------------------------------
//
// One rule, used by the plan engine before anything is created and again before the commit
// replaces an output, and by Python callers that write without a plan (`_core.check_output_paths`):
// an output must not be, contain or lie inside any input, by path (symlinks and `..` resolved)
// or by identity (device + inode: hard links, bind mounts). Otherwise `--overwrite` could delete
// the very checkpoint being converted.

/// Entries looked at when walking input directories (for symlinks that leave them and for
/// multiply-linked files) and the output tree (for hard links to inputs). Checkpoint trees hold
/// hundreds of files; the cap only bounds a mistaken input such as `/`.
const MAX_WALK: usize = 200_000;

/// (device, inode): what a path really is, whatever its spelling.
type FileId = (u64, u64);

fn file_id(p: &Path) -> Option<FileId> {
    fs::metadata(p).ok().map(|m| (m.dev(), m.ino()))
}

/// `p` absolute, with symlinks and `..` resolved: the deepest existing ancestor canonicalized,
/// the rest (not yet existing) appended with `.` and `..` applied lexically — what the path
/// will name once created.
pub fn resolve_path(p: &Path) -> Result<PathBuf> {
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| Error::io(p, "current_dir", e))?
            .join(p)
    };
    let comps: Vec<Component> = abs.components().collect();
    for k in (1..=comps.len()).rev() {
        let prefix: PathBuf = comps[..k].iter().collect();
        let Ok(mut real) = fs::canonicalize(&prefix) else {
            continue;
        };
        for c in &comps[k..] {
            match c {
                Component::ParentDir => {
                    real.pop();
                }
                Component::Normal(n) => real.push(n),
                _ => {}
            }
        }
        return Ok(real);
    }
    Ok(abs)
}

/// One input, resolved.
#[derive(Debug, Clone)]
struct GuardedInput {
    /// As the caller spelled it (or the symlink inside an input dir that led here).
    given: PathBuf,
    real: PathBuf,
    /// Identity of the input itself, if it exists.
    id: Option<FileId>,
    /// Identities of the input and of every ancestor directory.
    chain: Vec<FileId>,
    /// Index of the input (as passed to [`InputSet::resolve`]) this one was found under.
    root: usize,
}

impl GuardedInput {
    fn new(given: &Path, real: PathBuf, root: usize) -> GuardedInput {
        let chain = real.ancestors().filter_map(file_id).collect();
        GuardedInput {
            root,
            given: given.to_path_buf(),
            id: file_id(&real),
            real,
            chain,
        }
    }
}

/// Inputs, resolved once (directories walked for symlinks that lead elsewhere and for
/// multiply-linked files); [`InputSet::check`] then judges any number of outputs.
#[derive(Debug, Clone, Default)]
pub struct InputSet {
    inputs: Vec<GuardedInput>,
    /// Regular files of the inputs that have other links, by identity (and their input's index).
    linked: HashMap<FileId, (PathBuf, usize)>,
}

impl InputSet {
    pub fn resolve(inputs: &[PathBuf]) -> Result<InputSet> {
        let mut set = InputSet::default();
        let mut budget = MAX_WALK;
        for (root, p) in inputs.iter().enumerate() {
            let input = GuardedInput::new(p, resolve_path(p)?, root);
            match fs::metadata(&input.real) {
                Ok(m) if m.is_dir() => set.walk(&input.real, root, &mut budget),
                Ok(m) if m.nlink() > 1 => {
                    set.linked.insert((m.dev(), m.ino()), (p.clone(), root));
                }
                _ => {}
            }
            set.inputs.push(input);
        }
        Ok(set)
    }

    /// Symlinks under an input directory become inputs of their own (their targets are read);
    /// multiply-linked files are remembered for the hard-link check.
    fn walk(&mut self, dir: &Path, root: usize, budget: &mut usize) {
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            let Ok(rd) = fs::read_dir(&d) else { continue };
            for e in rd.flatten() {
                if *budget == 0 {
                    return;
                }
                *budget -= 1;
                let path = e.path();
                let Ok(m) = fs::symlink_metadata(&path) else {
                    continue;
                };
                if m.file_type().is_symlink() {
                    if let Ok(real) = fs::canonicalize(&path) {
                        self.inputs.push(GuardedInput::new(&path, real, root));
                    }
                } else if m.is_dir() {
                    stack.push(path);
                } else if m.nlink() > 1 {
                    self.linked.insert((m.dev(), m.ino()), (path, root));
                }
            }
        }
    }

    /// Refuse `output` (named by the option `flag`) if it is, contains or lies inside an input
    /// (by resolved path or by device + inode), or if it exists and holds a hard link to an
    /// input file.
    pub fn check(&self, flag: &str, output: &Path) -> Result<()> {
        match self.overlaps(flag, output)?.into_iter().next() {
            Some((_, e)) => Err(e),
            None => Ok(()),
        }
    }

    /// Every input `output` overlaps, once each: (its index in the list given to
    /// [`InputSet::resolve`], the refusal naming it).
    pub fn overlaps(&self, flag: &str, output: &Path) -> Result<Vec<(usize, Error)>> {
        let out = resolve_path(output)?;
        let mut found: BTreeMap<usize, Error> = BTreeMap::new();
        for input in &self.inputs {
            if found.contains_key(&input.root) {
                continue;
            }
            if let Some(why) = overlap(&out, input) {
                let e = refusal(flag, output, &out, None, why, &input.given);
                found.insert(input.root, e);
            }
        }
        if !self.linked.is_empty() {
            self.find_links(flag, output, &out, &mut found);
        }
        Ok(found.into_iter().collect())
    }

    /// Files of an existing output that are other names of input files.
    fn find_links(
        &self,
        flag: &str,
        output: &Path,
        out: &Path,
        found: &mut BTreeMap<usize, Error>,
    ) {
        let mut stack = vec![out.to_path_buf()];
        let mut seen = 0usize;
        while let Some(p) = stack.pop() {
            seen += 1;
            if seen > MAX_WALK {
                break;
            }
            let Ok(m) = fs::symlink_metadata(&p) else {
                continue;
            };
            if m.is_dir() {
                if let Ok(rd) = fs::read_dir(&p) {
                    stack.extend(rd.flatten().map(|e| e.path()));
                }
            } else if m.is_file() {
                if let Some((input, root)) = self.linked.get(&(m.dev(), m.ino())) {
                    let why = "holds a hard link to";
                    found
                        .entry(*root)
                        .or_insert_with(|| refusal(flag, output, out, Some(&p), why, input));
                }
            }
        }
    }
}

/// How the resolved output `out` overlaps `input`, if it does.
fn overlap(out: &Path, input: &GuardedInput) -> Option<&'static str> {
    let out_id = file_id(out);
    if *out == input.real || (out_id.is_some() && out_id == input.id) {
        Some("is")
    } else if input.real.starts_with(out) || out_id.is_some_and(|o| input.chain.contains(&o)) {
        Some("contains")
    } else if out.starts_with(&input.real)
        || input
            .id
            .is_some_and(|i| out.ancestors().filter_map(file_id).any(|a| a == i))
    {
        Some("lies inside")
    } else {
        None
    }
}

/// The one-line refusal: the option, the output as given (and resolved, when that differs), the
/// relation, and the input as given (and resolved).
fn refusal(
    flag: &str,
    output: &Path,
    out: &Path,
    at: Option<&Path>,
    why: &str,
    input: &Path,
) -> Error {
    let shown = |given: &Path, real: &Path| {
        if real == given {
            given.display().to_string()
        } else {
            format!("{} (= {})", given.display(), real.display())
        }
    };
    let at = match at {
        Some(file) => format!("{} (at {})", shown(output, out), file.display()),
        None => shown(output, out),
    };
    let input_real = resolve_path(input).unwrap_or_else(|_| input.to_path_buf());
    Error::UnsafeOutput {
        output: output.to_path_buf(),
        input: input.to_path_buf(),
        msg: format!(
            "{flag} {at} {why} input {}: refusing to write there \
             (an output may not be, contain or lie inside an input; --overwrite never replaces one)",
            shown(input, &input_real),
        ),
    }
}

/// One output and the inputs it must stay clear of: checked when made, and again by
/// [`StagedDir::commit`] right before an existing output is replaced (the file system may have
/// changed in between).
#[derive(Debug, Clone)]
pub struct OutputGuard {
    /// The option that named the output (`--output-dir`, `--out`, a manifest's `output`).
    flag: String,
    output: PathBuf,
    inputs: InputSet,
}

impl OutputGuard {
    pub fn new(flag: &str, output: &Path, inputs: &[PathBuf]) -> Result<OutputGuard> {
        let g = OutputGuard {
            flag: flag.to_string(),
            output: output.to_path_buf(),
            inputs: InputSet::resolve(inputs)?,
        };
        g.check()?;
        Ok(g)
    }

    pub fn check(&self) -> Result<()> {
        self.inputs.check(&self.flag, &self.output)
    }
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
        Self::create_guarded(output, overwrite, None)
    }

    /// [`StagedDir::create`] that checks `guard` first and again right before the commit.
    pub fn create_guarded(
        output: &Path,
        overwrite: bool,
        guard: Option<OutputGuard>,
    ) -> Result<StagedDir> {
        if let Some(g) = &guard {
            g.check()?;
        }
        // The parent resolved (symlinks, `..`) and the name kept: `out/.` cannot be renamed, and
        // `sub/../sub` stops resolving once the old `sub` is renamed aside. A symlink at the output
        // path itself is still replaced, not followed.
        let output: &Path = &{
            let (parent, name) = parent_and_name(&output.components().collect::<PathBuf>())?;
            resolve_path(&parent)?.join(name)
        };
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
            guard,
        })
    }

    /// Move the finished directory into place (replacing an existing output when allowed).
    pub fn commit(mut self, overwrite: bool) -> Result<()> {
        sync_dir(&self.tmp)?;
        // The output may have been replaced (by a symlink to an input, say) since the build began.
        if let Some(g) = &self.guard {
            g.check()?;
        }
        if self.output.exists() {
            if !overwrite {
                return Err(Error::OutputExists(self.output.clone()));
            }
            // Rename the old output aside first so the swap itself is two renames, never a
            // moment with a half-deleted directory at the output path.
            // Named like a staging dir, so the stale cleaner removes it if we die right here.
            let old = PathBuf::from(format!("{}-old", self.tmp.display()));
            fs::rename(&self.output, &old).map_err(|e| Error::io(&self.output, "rename", e))?;
            if let Err(e) = fs::rename(&self.tmp, &self.output) {
                // Put the previous output back rather than leave it under a name the stale
                // cleaner deletes.
                let _ = fs::rename(&old, &self.output);
                return Err(Error::io(&self.tmp, "rename", e));
            }
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

/// The existing path `to` spelled relative to the current directory (`..` up to the common
/// ancestor). For tests only (the unit tests here and tests/output_guard.rs spell outputs this
/// way); nothing in the engine uses it.
#[doc(hidden)]
pub fn relative_to_cwd(to: &Path) -> std::io::Result<PathBuf> {
    let cwd = fs::canonicalize(std::env::current_dir()?)?;
    let to = fs::canonicalize(to)?;
    let common = cwd
        .components()
        .zip(to.components())
        .take_while(|(a, b)| a == b)
        .count();
    let mut rel = PathBuf::new();
    for _ in common..cwd.components().count() {
        rel.push("..");
    }
    rel.extend(to.components().skip(common));
    Ok(rel)
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// `base/` (one file), `ckpt/backbone.pt`, and an empty `sub/`, in a fresh directory.
    fn inputs_tree() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let base = d.path().join("base");
        fs::create_dir(&base).unwrap();
        fs::write(base.join("model.safetensors"), b"weights").unwrap();
        fs::create_dir(d.path().join("ckpt")).unwrap();
        let bb = d.path().join("ckpt").join("backbone.pt");
        fs::write(&bb, b"amax").unwrap();
        fs::create_dir(d.path().join("sub")).unwrap();
        (d, base, bb)
    }

    fn refused(out: &Path, inputs: &[PathBuf]) -> String {
        match OutputGuard::new("--output-dir", out, inputs) {
            Err(Error::UnsafeOutput { msg, .. }) => msg,
            other => panic!("{} not refused: {other:?}", out.display()),
        }
    }

    #[test]
    fn output_equal_to_containing_or_inside_an_input_is_refused() {
        let (d, base, bb) = inputs_tree();
        let inputs = [base.clone(), bb.clone()];
        let msg = refused(&base, &inputs);
        assert!(
            msg.starts_with("--output-dir ") && msg.contains(" is input "),
            "{msg}"
        );
        assert!(refused(d.path(), &inputs).contains(" contains input "));
        assert!(refused(&base.join("out"), &inputs).contains(" lies inside input "));
        assert!(refused(&d.path().join("ckpt"), &inputs).contains("backbone.pt"));
        assert!(refused(&bb, &inputs).contains(" is input "));
        // Disjoint: a sibling, a new directory, an existing empty one.
        for ok in ["out", "sub", "sub/new/deeper"] {
            OutputGuard::new("--output-dir", &d.path().join(ok), &inputs).unwrap();
        }
    }

    #[test]
    fn every_spelling_of_an_input_is_the_input() {
        let (d, base, bb) = inputs_tree();
        let inputs = [relative_to_cwd(&base).unwrap(), bb];
        std::os::unix::fs::symlink(&base, d.path().join("link")).unwrap();
        std::os::unix::fs::symlink(d.path(), d.path().join("sub").join("up")).unwrap();
        let spellings = [
            base.clone(),
            relative_to_cwd(&base).unwrap(),
            d.path().join("sub/../base"),
            d.path().join("./base/"),
            d.path().join("new/../base"),
            d.path().join("link"),
            d.path().join("sub/up/base"),
            d.path().join("sub/up/link/x/.."),
        ];
        for out in &spellings {
            let msg = refused(out, &inputs);
            assert!(msg.contains(&out.display().to_string()), "{msg}");
        }
        assert!(refused(&d.path().join("link/new"), &inputs).contains("lies inside"));
        assert!(refused(&d.path().join("sub/up"), &inputs).contains("contains"));
    }

    #[test]
    fn symlink_in_an_input_that_points_into_the_output_is_refused() {
        let (d, base, _) = inputs_tree();
        let out = d.path().join("out");
        fs::create_dir(&out).unwrap();
        fs::write(out.join("real.safetensors"), b"data").unwrap();
        std::os::unix::fs::symlink(out.join("real.safetensors"), base.join("shard.safetensors"))
            .unwrap();
        let msg = refused(&out, std::slice::from_ref(&base));
        assert!(
            msg.contains("contains input") && msg.contains("shard.safetensors"),
            "{msg}"
        );
    }

    #[test]
    fn hard_link_to_an_input_file_is_refused() {
        let (d, base, bb) = inputs_tree();
        let out = d.path().join("out");
        fs::create_dir(&out).unwrap();
        fs::hard_link(
            base.join("model.safetensors"),
            out.join("model.safetensors"),
        )
        .unwrap();
        let msg = refused(&out, &[base.clone(), bb.clone()]);
        assert!(msg.contains("holds a hard link to"), "{msg}");
        // A file output that is another name of an input file.
        let alias = d.path().join("alias.pt");
        fs::hard_link(&bb, &alias).unwrap();
        assert!(refused(&alias, &[bb]).contains(" is input "));
    }

    #[test]
    fn commit_checks_again_before_replacing_the_output() {
        let (d, base, _) = inputs_tree();
        let out = d.path().join("out");
        let guard = OutputGuard::new("--output-dir", &out, std::slice::from_ref(&base)).unwrap();
        let s = StagedDir::create_guarded(&out, true, Some(guard)).unwrap();
        fs::write(s.tmp.join("f"), b"x").unwrap();
        // Between the start of the build and its commit, the output became the input.
        std::os::unix::fs::symlink(&base, &out).unwrap();
        let tmp = s.tmp.clone();
        assert!(matches!(s.commit(true), Err(Error::UnsafeOutput { .. })));
        assert_eq!(
            fs::read(base.join("model.safetensors")).unwrap(),
            b"weights"
        );
        assert!(!tmp.exists(), "staging removed");
    }
}
