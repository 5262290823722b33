//! External files: regular files the dumped processes hold open that lie outside their own mounts, typically
//! a container's stdout and stderr redirected to a file on the host (`runc run -d ID > out.log 2>&1`). CRIU
//! cannot dump such a file by itself ("Can't lookup mount=N for fd=1"): it is marked external at dump
//! (`--external file[MNT_ID:INODE]`) and recorded here, and a restore hands CRIU the file, open, under the
//! same key (`--inherit-fd fd[N]:file[MNT_ID:INODE]`); CRIU reopens it with the flags and at the offset the
//! process had, so the output goes on where it was. See <https://criu.org/External_files> and
//! <https://criu.org/Inheriting_FDs_on_restore>.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::CheckpointError;

/// One external file, as recorded in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExternalFile {
    /// CRIU's name of the file: `file[MNT_ID:INODE]`, both in hex.
    pub key: String,
    /// Where it was at dump time (as the host sees it).
    pub path: PathBuf,
    /// The descriptors of the root process that referred to it (e.g. `[1, 2]`); other processes of the tree
    /// may hold it too.
    #[serde(default)]
    pub fds: Vec<i32>,
    /// The open flags of the root's (or the first holder's) descriptor, as `/proc/PID/fdinfo` gives them.
    #[serde(default)]
    pub flags: u32,
    /// Its inode at dump time.
    #[serde(default)]
    pub inode: u64,
    /// Its size when the checkpoint was written: CRIU refuses to reopen a file of another size unless it is
    /// open write-only for appending.
    #[serde(default)]
    pub size: u64,
}

impl ExternalFile {
    /// Whether CRIU checks the size of the file at restore (every file but one opened write-only for appending).
    pub fn size_checked(&self) -> bool {
        let flags = self.flags as i32;
        !((flags & libc::O_ACCMODE) == libc::O_WRONLY && flags & libc::O_APPEND != 0)
    }

    /// Record the file's size now (once the processes are frozen), if it is still the same file.
    pub fn refresh_size(&mut self) {
        if let Ok(m) = std::fs::metadata(&self.path) {
            if m.ino() == self.inode {
                self.size = m.len();
            }
        }
    }
}

/// Where an external file goes at restore instead of its original path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRedirect {
    /// Which file: by a descriptor of the restored root, or by its original path.
    pub from: FileSelector,
    /// The file to reconnect it to (created if missing).
    pub to: PathBuf,
}

/// How a [`FileRedirect`] names the external file it applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileSelector {
    /// The file that descriptor N of the dumped root referred to (1 for stdout).
    Fd(i32),
    /// The file that was at this path at dump time.
    Path(PathBuf),
}

impl FileRedirect {
    /// Parse `FROM=TO`, FROM being a descriptor number (`1=/new/out.log`) or an absolute path
    /// (`/old/out.log=/new/out.log`).
    pub fn parse(s: &str) -> Result<Self, String> {
        let (from, to) = s.split_once('=').ok_or_else(|| format!("{s:?}: expected FD=PATH or OLD_PATH=PATH"))?;
        if to.is_empty() {
            return Err(format!("{s:?}: the new path is empty"));
        }
        let from = match from.parse::<i32>() {
            Ok(fd) if fd >= 0 => FileSelector::Fd(fd),
            _ if from.starts_with('/') => FileSelector::Path(PathBuf::from(from)),
            _ => return Err(format!("{s:?}: {from:?} is neither a descriptor number nor an absolute path")),
        };
        Ok(Self { from, to: PathBuf::from(to) })
    }

    fn applies_to(&self, f: &ExternalFile) -> bool {
        match &self.from {
            FileSelector::Fd(fd) => f.fds.contains(fd),
            FileSelector::Path(p) => *p == f.path,
        }
    }
}

/// The external files of the tree rooted at `root` (whose mount namespace is the one that counts), held by
/// any of `pids`: every regular file whose mount is not among the root's mounts. Descriptors that vanish
/// while they are read are skipped.
pub fn find(root: i32, pids: &[i32]) -> Result<Vec<ExternalFile>, CheckpointError> {
    find_matching(root, pids, Kinds::RegularFiles)
}

/// As [`find`], and also the memory devices (`/dev/null`, `/dev/zero`, `/dev/urandom`, ...: character
/// devices of major 1) outside the root's mounts, which CRIU dumps as files too: a process started by
/// `unshare --mount PROGRAM < /dev/null > out.log` holds the host's `/dev/null`, which its own mount
/// namespace does not have. Terminals and other devices are never taken (CRIU handles them otherwise).
pub fn find_with_devices(root: i32, pids: &[i32]) -> Result<Vec<ExternalFile>, CheckpointError> {
    find_matching(root, pids, Kinds::FilesAndMemoryDevices)
}

/// Which descriptors [`find_matching`] takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kinds {
    RegularFiles,
    FilesAndMemoryDevices,
}

/// The major number of the memory character devices (`/dev/null`, `/dev/zero`, `/dev/full`, `/dev/random`,
/// `/dev/urandom`, `/dev/mem`, ...).
const MEM_MAJOR: u64 = 1;

impl Kinds {
    fn accepts(self, meta: &std::fs::Metadata) -> bool {
        use std::os::unix::fs::FileTypeExt;
        meta.is_file()
            || (self == Kinds::FilesAndMemoryDevices
                && meta.file_type().is_char_device()
                && libc::major(meta.rdev()) as u64 == MEM_MAJOR)
    }
}

fn find_matching(root: i32, pids: &[i32], kinds: Kinds) -> Result<Vec<ExternalFile>, CheckpointError> {
    let mountinfo = format!("/proc/{root}/mountinfo");
    let text = std::fs::read_to_string(&mountinfo).map_err(CheckpointError::io(&mountinfo))?;
    let mounts: BTreeSet<u64> = crate::procfs::parse_mountinfo(&text).iter().map(|m| m.id).collect();
    let mut found: BTreeMap<String, ExternalFile> = BTreeMap::new();
    for &pid in pids {
        let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { continue };
        let mut fds: Vec<i32> = dir.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect();
        fds.sort_unstable();
        for fd in fds {
            let Some((mnt_id, flags)) = fdinfo(pid, fd) else { continue };
            if mounts.contains(&mnt_id) {
                continue;
            }
            let link = format!("/proc/{pid}/fd/{fd}");
            let Ok(meta) = std::fs::metadata(&link) else { continue };
            if !kinds.accepts(&meta) {
                continue;
            }
            let Ok(path) = std::fs::read_link(&link) else { continue };
            let key = format!("file[{mnt_id:x}:{:x}]", meta.ino());
            let entry = found.entry(key.clone()).or_insert_with(|| ExternalFile {
                key,
                path,
                fds: Vec::new(),
                flags,
                inode: meta.ino(),
                size: if meta.is_file() { meta.len() } else { 0 },
            });
            if pid == root {
                if entry.fds.is_empty() {
                    entry.flags = flags;
                }
                entry.fds.push(fd);
            }
        }
    }
    Ok(found.into_values().collect())
}

/// The redirects among `redirects` that apply to none of `files` (a descriptor the root did not hold on an
/// external file, or a path no external file had), for an error that names them.
pub fn unmatched<'a>(files: &[ExternalFile], redirects: &'a [FileRedirect]) -> Vec<&'a FileRedirect> {
    redirects.iter().filter(|r| !files.iter().any(|f| r.applies_to(f))).collect()
}

/// A redirect as the user wrote it (`1=/new/out.log`, `/old/out.log=/new/out.log`).
impl std::fmt::Display for FileRedirect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.from {
            FileSelector::Fd(fd) => write!(f, "{fd}={}", self.to.display()),
            FileSelector::Path(p) => write!(f, "{}={}", p.display(), self.to.display()),
        }
    }
}

/// `mnt_id` and `flags` of a descriptor, from `/proc/PID/fdinfo/FD`.
fn fdinfo(pid: i32, fd: i32) -> Option<(u64, u32)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).ok()?;
    let field = |name: &str| text.lines().find_map(|l| l.strip_prefix(name)).map(str::trim);
    let mnt_id = field("mnt_id:")?.parse().ok()?;
    let flags = u32::from_str_radix(field("flags:")?, 8).ok()?;
    Some((mnt_id, flags))
}

/// One external file opened for a restore: the file to hand CRIU, and where it is.
#[derive(Debug)]
pub struct Reopened {
    pub file: ExternalFile,
    /// The path it was opened at (the original one unless redirected).
    pub path: PathBuf,
    pub handle: File,
}

/// Open every external file for a restore: at its original path, or where a redirect sends it. A file that
/// does not exist is created. Because CRIU restores the process's own file offset and refuses a file of
/// another size (unless it is open for appending), a missing or empty file is extended to the size the
/// original had at dump (sparse: its earlier content is not copied); one of any other size is refused here,
/// with the reason, before anything is restored.
pub fn open_for_restore(files: &[ExternalFile], redirects: &[FileRedirect]) -> Result<Vec<Reopened>, CheckpointError> {
    let mut out = Vec::with_capacity(files.len());
    for f in files {
        let redirected = redirects.iter().find(|r| r.applies_to(f)).map(|r| r.to.clone());
        let is_redirected = redirected.is_some();
        let path = redirected.unwrap_or_else(|| f.path.clone());
        let bad = |detail: String| CheckpointError::ExternalFile { path: path.clone(), detail };
        if !is_redirected && path.to_string_lossy().ends_with(" (deleted)") {
            return Err(bad(format!("the workload held {} open after it was deleted; give a new path for it", f.key)));
        }
        let flags = f.flags as i32;
        let mode = flags & libc::O_ACCMODE;
        let handle = std::fs::OpenOptions::new()
            .read(mode != libc::O_WRONLY)
            .write(mode != libc::O_RDONLY)
            .create(mode != libc::O_RDONLY)
            .open(&path)
            .map_err(|e| bad(format!("cannot open it for the restored workload: {e}")))?;
        let meta = handle.metadata().map_err(CheckpointError::io(&path))?;
        // CRIU checks the size of regular files only (a device has none).
        if f.size_checked() && meta.is_file() {
            let size = meta.len();
            if size == 0 && f.size > 0 {
                handle.set_len(f.size).map_err(CheckpointError::io(&path))?;
            } else if size != f.size {
                return Err(bad(format!(
                    "it holds {size} bytes, but {} bytes at dump time; the workload writes at its own offset, \
                     and CRIU reopens only a file of the same size: restore it onto a new or empty file",
                    f.size
                )));
            }
        }
        out.push(Reopened { file: f.clone(), path, handle });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn file(path: &Path, flags: i32, size: u64) -> ExternalFile {
        ExternalFile { key: "file[1b:2a]".into(), path: path.into(), fds: vec![1, 2], flags: flags as u32, inode: 0, size }
    }

    #[test]
    fn redirects_parse_by_descriptor_or_path() {
        assert_eq!(FileRedirect::parse("1=/n/out").unwrap(), FileRedirect { from: FileSelector::Fd(1), to: "/n/out".into() });
        let r = FileRedirect::parse("/o/out=/n/out").unwrap();
        assert_eq!(r.from, FileSelector::Path("/o/out".into()));
        assert!(FileRedirect::parse("out").is_err());
        assert!(FileRedirect::parse("1=").is_err());
        assert!(FileRedirect::parse("rel/out=/n").is_err());
    }

    #[test]
    fn files_of_this_process_on_its_own_mounts_are_not_external() {
        let dir = tempfile::tempdir().unwrap();
        let f = File::create(dir.path().join("x")).unwrap();
        let pid = std::process::id() as i32;
        let found = find(pid, &[pid]).unwrap();
        assert!(found.iter().all(|e| e.path != dir.path().join("x")), "{found:?}");
        drop(f);
    }

    #[test]
    fn a_missing_or_empty_file_is_created_at_the_recorded_size_and_another_size_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let orig = dir.path().join("orig.log");
        std::fs::write(&orig, b"0123456789").unwrap();
        let rec = file(&orig, libc::O_WRONLY, 10);
        // Same path, same size: opened as it is.
        let got = open_for_restore(std::slice::from_ref(&rec), &[]).unwrap();
        assert_eq!((got[0].path.as_path(), got[0].handle.metadata().unwrap().len()), (orig.as_path(), 10));
        // Redirected by descriptor to a new file: created, and extended to the recorded size.
        let new = dir.path().join("new.log");
        let r = FileRedirect { from: FileSelector::Fd(2), to: new.clone() };
        let got = open_for_restore(std::slice::from_ref(&rec), &[r]).unwrap();
        assert_eq!(got[0].path, new);
        assert_eq!(std::fs::metadata(&new).unwrap().len(), 10);
        // A file of another size is refused with the reason, and left alone.
        std::fs::write(&orig, b"0123").unwrap();
        let err = open_for_restore(std::slice::from_ref(&rec), &[]).unwrap_err().to_string();
        assert!(err.contains("holds 4 bytes, but 10 bytes at dump time"), "{err}");
        assert_eq!(std::fs::read(&orig).unwrap(), b"0123");
        // Opened for appending: any size goes.
        let append = file(&orig, libc::O_WRONLY | libc::O_APPEND, 10);
        assert!(open_for_restore(&[append], &[]).is_ok());
        assert!(file(&orig, libc::O_RDWR | libc::O_APPEND, 1).size_checked(), "read-write files are checked even when appending");
    }

    #[test]
    fn a_deleted_file_needs_a_new_path() {
        let rec = file(Path::new("/tmp/gone.log (deleted)"), libc::O_WRONLY, 0);
        let err = open_for_restore(&[rec], &[]).unwrap_err().to_string();
        assert!(err.contains("after it was deleted"), "{err}");
    }
}
