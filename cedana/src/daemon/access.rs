//! Who calls the daemon, and what they may do.
//!
//! The Unix socket is root's alone (0600) unless `daemon.socket_group` names a group, whose members may then
//! connect (0660). Each call's caller is known by the socket's peer credentials (`SO_PEERCRED`, which the
//! kernel fills in: a client cannot lie about them). Root may do anything; any other user:
//! - acts only on processes whose every task runs as that user (real, effective, saved and filesystem
//!   uids), and on jobs they own (started, adopted or restored by them); sees only their own jobs;
//! - runs new jobs as themselves (their uid, gid and groups);
//! - writes checkpoints only into folders they could write into themselves, reached without symbolic
//!   links. The daemon writes there through a descriptor of the folder it checked, so the folder cannot be
//!   swapped under it; the checkpoint is root's, mode 0600 (it holds process memory), which the user can
//!   move or delete but not change;
//! - restores only checkpoints the daemon wrote for them (recorded in the job store by device and inode,
//!   found wherever the user moved them), read through a descriptor of the checked file: a checkpoint of
//!   another user, or one the user crafted, is refused before anything is restored;
//! - has no access to containers (runc, containerd: root's) or object stores (the daemon's credentials).
//!
//! Over TCP every call carries the token of a root-only file: such callers are root.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use cedana::error::ErrorKind;
use cedana::jobs::model::Job;
use cedana::jobs::store::JobStore;
use tonic::Status;

use super::convert::status;

/// The user behind a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    /// The calling process (for its supplementary groups).
    pub pid: Option<i32>,
}

impl Caller {
    /// Root, as every caller over TCP (it holds the root-only token) and the daemon itself.
    pub const ROOT: Caller = Caller { uid: 0, gid: 0, pid: None };

    /// The caller of `request`: its peer's credentials on the Unix socket, root over TCP.
    pub fn of<T>(request: &tonic::Request<T>) -> Caller {
        let cred = request.extensions().get::<tonic::transport::server::UdsConnectInfo>().and_then(|i| i.peer_cred);
        match cred {
            Some(c) => Caller { uid: c.uid(), gid: c.gid(), pid: c.pid() },
            None => Caller::ROOT,
        }
    }

    /// Whether the caller is root (who may do anything).
    pub fn is_root(&self) -> bool {
        self.uid == 0
    }

    /// The caller's groups: the primary one and the supplementary ones of the calling process.
    fn groups(&self) -> Result<Vec<u32>, Status> {
        let mut groups = vec![self.gid];
        let Some(pid) = self.pid else { return Ok(groups) };
        let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .map_err(|e| denied(format!("the calling process ({pid}) is gone: {e}")))?;
        let line = text.lines().find_map(|l| l.strip_prefix("Groups:")).unwrap_or_default();
        groups.extend(line.split_whitespace().filter_map(|g| g.parse::<u32>().ok()));
        Ok(groups)
    }

    /// The caller's uid, gid and groups, to run a job as.
    pub fn credentials(&self) -> Result<cedana::jobs::supervisor::Credentials, Status> {
        let mut groups = self.groups()?;
        groups.sort_unstable();
        groups.dedup();
        Ok(cedana::jobs::supervisor::Credentials { uid: self.uid, gid: self.gid, groups })
    }

    /// Refuses callers other than root for `what`.
    pub fn only_root(&self, what: &str) -> Result<(), Status> {
        match self.is_root() {
            true => Ok(()),
            false => Err(denied(format!("{what} is for root only (uid {} asked)", self.uid))),
        }
    }

    /// Refuses a job its caller does not own.
    pub fn check_job(&self, job: &Job) -> Result<(), Status> {
        match self.is_root() || job.owner == self.uid {
            true => Ok(()),
            false => Err(denied(format!("job {} belongs to another user", job.jid))),
        }
    }

    /// Whether the caller may see `job` (in `ps`).
    pub fn sees(&self, job: &Job) -> bool {
        self.is_root() || job.owner == self.uid
    }

    /// Refuses a process tree with any task that does not run wholly as the caller.
    pub fn check_tree(&self, pid: i32) -> Result<(), Status> {
        if self.is_root() {
            return Ok(());
        }
        for p in cedana::procfs::tree_pids(pid) {
            let text = match std::fs::read_to_string(format!("/proc/{p}/status")) {
                Ok(t) => t,
                // Gone meanwhile: nothing of it to protect.
                Err(_) => continue,
            };
            let uids = text.lines().find_map(|l| l.strip_prefix("Uid:")).unwrap_or_default();
            let all_ours = {
                let ids: Vec<u32> = uids.split_whitespace().filter_map(|u| u.parse().ok()).collect();
                ids.len() == 4 && ids.iter().all(|u| *u == self.uid)
            };
            if !all_ours {
                return Err(denied(format!("process {p} of the tree of {pid} does not run as uid {} alone", self.uid)));
            }
        }
        Ok(())
    }

    /// Opens `dir` for the caller to create a checkpoint in: an absolute path without symbolic links or
    /// `..`, every folder of it searchable by the caller, the last one writable. Root gets the path as is.
    pub fn writable_dir(&self, dir: &Path) -> Result<HeldPath, Status> {
        if self.is_root() {
            return Ok(HeldPath::plain(dir));
        }
        let groups = self.groups()?;
        let fd = self.walk(dir, &groups)?;
        let meta = fd_metadata(&fd).map_err(|e| denied(format!("{}: {e}", dir.display())))?;
        if !self.may(&meta, &groups, 0o3) {
            return Err(denied(format!("{} is not writable by uid {}: give a folder of yours", dir.display(), self.uid)));
        }
        Ok(HeldPath::held(fd, dir))
    }

    /// Opens the checkpoint at `path` for the caller to restore: for root, the path as is; for another user,
    /// a root-owned file or folder (mode 0700 or stricter) that the daemon recorded writing for that user.
    pub fn sealed_checkpoint(&self, store: &JobStore, path: &Path) -> Result<HeldPath, Status> {
        if self.is_root() {
            return Ok(HeldPath::plain(path));
        }
        let groups = self.groups()?;
        let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("/"));
        let name = path.file_name().ok_or_else(|| invalid(format!("{} names no checkpoint", path.display())))?;
        let dir = self.walk(parent, &groups)?;
        let fd = open_at(&dir, name.as_bytes(), libc::O_PATH | libc::O_NOFOLLOW)
            .map_err(|e| status(ErrorKind::of_io(&e), format!("{}: {e}", path.display())))?;
        let meta = fd_metadata(&fd).map_err(|e| denied(format!("{}: {e}", path.display())))?;
        let owner = store.sealed_checkpoint_owner(meta.dev(), meta.ino()).map_err(|e| status(e.kind(), &e))?;
        let unchanged = meta.uid() == 0 && meta.mode() & 0o077 == 0 && (meta.is_file() || meta.is_dir());
        match owner {
            Some(o) if o == self.uid && unchanged => Ok(HeldPath::held(fd, path)),
            Some(o) if o == self.uid => Err(denied(format!("{} was changed since the daemon wrote it", path.display()))),
            Some(_) => Err(denied(format!("{} is a checkpoint of another user", path.display()))),
            None => Err(denied(format!(
                "{} is not a checkpoint the daemon wrote for uid {}: only those are restored for users other than root",
                path.display(),
                self.uid
            ))),
        }
    }

    /// Refuses what is not a local path (an object store URL) for callers other than root.
    pub fn check_local(&self, location: &str) -> Result<(), Status> {
        if self.is_root() || !location.contains("://") {
            return Ok(());
        }
        Err(denied(format!("{location}: object stores are reached with the daemon's credentials, for root only")))
    }

    /// Opens every folder of `dir` in turn (no symbolic links), each searchable by the caller.
    fn walk(&self, dir: &Path, groups: &[u32]) -> Result<OwnedFd, Status> {
        if !dir.is_absolute() {
            return Err(invalid(format!("{}: give an absolute path", dir.display())));
        }
        let mut fd = open_at_root()?;
        let mut reached = PathBuf::from("/");
        for part in dir.components() {
            match part {
                Component::RootDir | Component::CurDir => continue,
                Component::ParentDir | Component::Prefix(_) => {
                    return Err(invalid(format!("{}: give a path without '..'", dir.display())));
                }
                Component::Normal(name) => {
                    let meta = fd_metadata(&fd).map_err(|e| denied(format!("{}: {e}", reached.display())))?;
                    if !self.may(&meta, groups, 0o1) {
                        return Err(denied(format!("{} is not searchable by uid {}", reached.display(), self.uid)));
                    }
                    reached.push(name);
                    fd = open_at(&fd, name.as_bytes(), libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW).map_err(
                        |e| match e.raw_os_error() {
                            Some(libc::ELOOP) | Some(libc::ENOTDIR) => invalid(format!(
                                "{} is a symbolic link or not a folder: give the real path of a folder",
                                reached.display()
                            )),
                            Some(libc::ENOENT) => status(
                                ErrorKind::NotFound,
                                format!("{} does not exist: create the folder first", reached.display()),
                            ),
                            _ => status(ErrorKind::of_io(&e), format!("{}: {e}", reached.display())),
                        },
                    )?;
                }
            }
        }
        let meta = fd_metadata(&fd).map_err(|e| denied(format!("{}: {e}", dir.display())))?;
        if !self.may(&meta, groups, 0o1) {
            return Err(denied(format!("{} is not searchable by uid {}", dir.display(), self.uid)));
        }
        Ok(fd)
    }

    /// Whether the caller has the permission bits `bits` (rwx as 0o4, 0o2, 0o1) on a file of `meta`, as the
    /// kernel decides it from the mode (owner, then group, then others; no ACLs).
    fn may(&self, meta: &std::fs::Metadata, groups: &[u32], bits: u32) -> bool {
        let mode = meta.mode();
        let granted = if meta.uid() == self.uid {
            mode >> 6
        } else if groups.contains(&meta.gid()) {
            mode >> 3
        } else {
            mode
        };
        granted & bits == bits
    }
}

/// A path the daemon checked for a caller: for root the path itself; for other users a descriptor of what
/// was checked, reached as `/proc/<daemon>/fd/<n>` (by the daemon and its CRIU alike) so that nothing can
/// be swapped in between. Keep it while the operation runs.
#[derive(Debug)]
pub struct HeldPath {
    fd: Option<OwnedFd>,
    shown: PathBuf,
}

impl HeldPath {
    fn plain(path: &Path) -> Self {
        HeldPath { fd: None, shown: path.to_path_buf() }
    }

    fn held(fd: OwnedFd, shown: &Path) -> Self {
        HeldPath { fd: Some(fd), shown: shown.to_path_buf() }
    }

    /// The path to operate on.
    pub fn path(&self) -> PathBuf {
        match &self.fd {
            Some(fd) => PathBuf::from(format!("/proc/{}/fd/{}", std::process::id(), fd.as_raw_fd())),
            None => self.shown.clone(),
        }
    }

    /// `p` (under [`HeldPath::path`]) as the caller named it.
    pub fn shown(&self, p: &Path) -> PathBuf {
        match p.strip_prefix(self.path()) {
            Ok(rest) if rest.as_os_str().is_empty() => self.shown.clone(),
            Ok(rest) => self.shown.join(rest),
            Err(_) => p.to_path_buf(),
        }
    }

    /// Whether the path is held through a descriptor (the caller is not root).
    pub fn is_held(&self) -> bool {
        self.fd.is_some()
    }
}

/// Records a checkpoint the daemon wrote at `path` for a caller other than root, so that this caller (and
/// no one else but root) may restore it.
pub fn seal(store: &JobStore, caller: &Caller, path: &Path, shown: &Path) -> Result<(), Status> {
    if caller.is_root() {
        return Ok(());
    }
    let meta = std::fs::symlink_metadata(path).map_err(|e| status(ErrorKind::Internal, format!("{}: {e}", shown.display())))?;
    store.seal_checkpoint(meta.dev(), meta.ino(), caller.uid, shown).map_err(|e| status(e.kind(), &e))
}

fn denied(message: String) -> Status {
    status(ErrorKind::PermissionDenied, message)
}

fn invalid(message: String) -> Status {
    status(ErrorKind::InvalidArgument, message)
}

fn open_at_root() -> Result<OwnedFd, Status> {
    let root = CString::new("/").map_err(|e| status(ErrorKind::Internal, e))?;
    // SAFETY: open with a valid C string; the descriptor returned is ours alone.
    let fd = unsafe { libc::open(root.as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(status(ErrorKind::Internal, format!("opening /: {}", std::io::Error::last_os_error())));
    }
    // SAFETY: fd was just returned by open and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn open_at(dir: &OwnedFd, name: &[u8], flags: libc::c_int) -> std::io::Result<OwnedFd> {
    let name = CString::new(name).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: openat with a descriptor we hold and a valid C string; the result is ours alone.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by openat and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The metadata of what `fd` refers to (an `O_PATH` descriptor too).
fn fd_metadata(fd: &OwnedFd) -> std::io::Result<std::fs::Metadata> {
    std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(uid: u32) -> Caller {
        Caller { uid, gid: uid, pid: None }
    }

    #[test]
    fn root_gets_paths_as_they_are() {
        let held = Caller::ROOT.writable_dir(Path::new("/nonexistent/x")).unwrap();
        assert_eq!(held.path(), PathBuf::from("/nonexistent/x"));
        assert!(!held.is_held());
    }

    #[test]
    fn a_user_may_not_write_into_a_root_folder_nor_through_a_link() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let err = user(4242).writable_dir(dir.path()).unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
        // Their own folder is fine, and held by a descriptor.
        let mine = dir.path().join("mine");
        std::fs::create_dir(&mine).unwrap();
        std::os::unix::fs::chown(&mine, Some(4242), Some(4242)).unwrap();
        let held = user(4242).writable_dir(&mine).unwrap();
        assert!(held.is_held());
        assert_eq!(std::fs::metadata(held.path()).unwrap().ino(), std::fs::metadata(&mine).unwrap().ino());
        assert_eq!(held.shown(&held.path().join("a.tar")), mine.join("a.tar"));
        // A link to it is not.
        std::os::unix::fs::symlink(&mine, dir.path().join("link")).unwrap();
        let err = user(4242).writable_dir(&dir.path().join("link")).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains("symbolic link"), "{err:?}");
        // Nor `..` or a relative path.
        assert!(user(4242).writable_dir(&mine.join("..").join("mine")).is_err());
        assert!(user(4242).writable_dir(Path::new("rel")).is_err());
        // A folder below one they cannot search is refused.
        let locked = dir.path().join("locked");
        std::fs::create_dir(&locked).unwrap();
        std::fs::set_permissions(&locked, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
        let inner = locked.join("inner");
        std::fs::create_dir(&inner).unwrap();
        std::os::unix::fs::chown(&inner, Some(4242), Some(4242)).unwrap();
        let err = user(4242).writable_dir(&inner).unwrap_err();
        assert!(err.message().contains("not searchable"), "{err:?}");
    }

    #[test]
    fn only_sealed_unchanged_checkpoints_of_the_caller_are_restored() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
        let store = JobStore::open(dir.path().join("db")).unwrap();
        let ckpt = dir.path().join("c.tar");
        std::fs::write(&ckpt, b"x").unwrap();
        std::fs::set_permissions(&ckpt, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let err = user(4242).sealed_checkpoint(&store, &ckpt).unwrap_err();
        assert!(err.message().contains("not a checkpoint the daemon wrote"), "{err:?}");
        seal(&store, &user(4242), &ckpt, &ckpt).unwrap();
        let held = user(4242).sealed_checkpoint(&store, &ckpt).unwrap();
        assert_eq!(std::fs::read(held.path()).unwrap(), b"x");
        // Moved, it is still theirs.
        let moved = dir.path().join("moved.tar");
        std::fs::rename(&ckpt, &moved).unwrap();
        user(4242).sealed_checkpoint(&store, &moved).unwrap();
        // Another user's.
        let err = user(4343).sealed_checkpoint(&store, &moved).unwrap_err();
        assert!(err.message().contains("another user"), "{err:?}");
        // Made readable or writable by others, or given away: changed.
        std::fs::set_permissions(&moved, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
        let err = user(4242).sealed_checkpoint(&store, &moved).unwrap_err();
        assert!(err.message().contains("changed"), "{err:?}");
    }

    #[test]
    fn trees_of_other_users_are_refused() {
        let me = std::process::id() as i32;
        Caller::ROOT.check_tree(me).unwrap();
        let err = user(4242).check_tree(me).unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        let err = user(4242).only_root("runc").unwrap_err();
        assert!(err.message().contains("root only"), "{err:?}");
        assert!(user(4242).check_local("s3://b/k").is_err());
        user(4242).check_local("/tmp/x").unwrap();
        Caller::ROOT.check_local("s3://b/k").unwrap();
    }
}
