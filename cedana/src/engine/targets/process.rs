//! A process tree, checkpointed by CRIU directly. CRIU freezes the tree; the pipeline packages the images at
//! CRIU's `post-dump` notification, while the tree is still frozen, and only a complete checkpoint lets CRIU
//! kill it (a refused `post-dump` makes CRIU resume it). Restore makes sure the tree's PIDs are free, wires
//! the standard streams that were pipes, and holds CRIU at `pre-restore` until the verification is done.
//!
//! A tree with a mount namespace of its own (`unshare --mount PROGRAM > out.log`) has its namespace
//! dumped by CRIU with it, and its descriptors opened before it left ours (its stdio, typically) lie on
//! mounts that namespace does not have: CRIU cannot dump them ("Can't lookup mount=N for fd=1"). They are
//! marked external (see [`crate::checkpoint::external`]) and recorded in [`RECORD_FILE`], with the
//! namespace's root; a restore hands CRIU those files open (`inherit_fd`), at their paths or where the
//! request redirects them, and builds the namespace on that root (CRIU's `--root`, without which CRIU 4.2
//! dies restoring it: "mnt: BUG at criu/mount.c:48").

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{CheckpointCall, DumpTarget, Prepared, RestoreTarget, Restored};
use crate::checkpoint::external::{self, ExternalFile};
use crate::checkpoint::{CheckpointError, CheckpointKind, OpenedCheckpoint};
use crate::criu::options::CriuOptions;
use crate::criu::streamer::serve::Serve;
use crate::criu::{CriuStdio, DumpCall, RestoreCall};
use crate::engine::context::OpContext;
use crate::engine::lazy::LazyRestore;
use crate::engine::restore::{Gate, RestoreRequest, RestoreStdio};
use crate::engine::{Engine, EngineError};
use crate::procfs;
use crate::procfs::parse_mountinfo;

/// The phase of a restore whose memory came through userfaultfd (filled, and verified, before the tree
/// resumed), in its timings.
pub const UFFD_FILL_PHASE: &str = "memory through userfaultfd";

/// How long to wait for a PID of the checkpoint held by a zombie that its parent has not reaped yet.
const ZOMBIE_GRACE: Duration = Duration::from_secs(5);

/// Name, inside a process checkpoint, of what its restore needs besides CRIU's images and the manifest
/// (a [`ProcessRecord`] in JSON). Absent from checkpoints of trees that need nothing of it.
pub const RECORD_FILE: &str = "process/restore.json";

/// What a restore of a process checkpoint needs to know besides CRIU's options: written into the images
/// folder at CRIU's `post-dump`, while the tree is frozen (the files' sizes are the ones CRIU recorded).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRecord {
    /// Files the tree held outside its mount namespace, marked external at dump.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub external_files: Vec<ExternalFile>,
    /// Set when the tree had a mount namespace of its own (CRIU dumped it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount_namespace: Option<MountNamespace>,
}

/// A tree's own mount namespace, as a restore must rebuild it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountNamespace {
    /// The folder (as this machine's root mount namespace sees it) whose content was the namespace's root
    /// mount: `/` for a copy of ours (`unshare --mount`), the new root's folder after a `pivot_root` onto a
    /// bind mount of it. `None` when the root mount is of another file system: the restore must be told.
    pub root: Option<PathBuf>,
}

/// Dump target: the tree rooted at `pid`.
pub(crate) struct ProcessTarget {
    pid: i32,
    /// What [`RECORD_FILE`] will hold (external files with their sizes refreshed once frozen).
    record: ProcessRecord,
}

impl ProcessTarget {
    pub fn new(pid: i32) -> Self {
        Self { pid, record: ProcessRecord::default() }
    }

    /// Write [`RECORD_FILE`] into the images folder (when there is anything to record), with the external
    /// files' sizes as they are now.
    fn write_record(&mut self, images_dir: &Path) -> Result<(), EngineError> {
        if self.record == ProcessRecord::default() {
            return Ok(());
        }
        self.record.external_files.iter_mut().for_each(ExternalFile::refresh_size);
        let path = images_dir.join(RECORD_FILE);
        let io = |e| EngineError::Checkpoint(CheckpointError::Io { path: path.clone(), source: e });
        let bytes = serde_json::to_vec_pretty(&self.record).map_err(|e| io(std::io::Error::other(e)))?;
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        std::fs::write(&path, bytes).map_err(io)
    }
}

impl DumpTarget for ProcessTarget {
    fn prepare(&mut self, _engine: &Engine, options: &CriuOptions) -> Result<Prepared, EngineError> {
        let pid = self.pid;
        let root = procfs::check_dumpable(pid)?;
        let info = procfs::describe(pid)?;
        let mut options = options.clone();
        let mut detected = Vec::new();
        if !options.shell_job && procfs::needs_shell_job(&root, &info.pids) {
            tracing::info!(pid, sid = root.sid, pgid = root.pgid, "session or group leader outside the tree: using shell-job");
            options.shell_job = true;
            detected.push("--shell-job");
        }
        if !options.tcp_established && !options.tcp_close {
            let conns = procfs::established_tcp(&info.pids);
            if !conns.is_empty() {
                return Err(EngineError::NeedsTcpEstablished { pid, conns: conns.join(", ") });
            }
        }
        let external_files = external::find_with_devices(pid, &info.pids)?;
        for f in &external_files {
            tracing::info!(pid, key = %f.key, path = %f.path.display(), fds = ?f.fds, "a file outside the tree's mounts: external");
        }
        let mount_namespace = own_mount_namespace(pid)?;
        if let Some(ns) = &mount_namespace {
            tracing::info!(pid, root = ?ns.root, "the tree has a mount namespace of its own: CRIU dumps it");
        }
        self.record = ProcessRecord { external_files, mount_namespace };
        Ok(Prepared {
            kind: CheckpointKind::Process,
            id: pid.to_string(),
            container_id: None,
            process: info,
            container: None,
            options,
            detected,
            extra_files: Vec::new(),
            work_path: None,
        })
    }

    fn survives_criu(&self, leave_running: bool) -> bool {
        leave_running
    }

    fn can_stream(&self) -> bool {
        true
    }

    fn checkpoint(
        &mut self,
        engine: &Engine,
        call: &CheckpointCall<'_>,
        ready: &mut dyn FnMut() -> bool,
        frozen: &mut dyn FnMut() -> bool,
    ) -> Result<(), EngineError> {
        // The external files are CRIU options of this dump only: a restore names them with inherit_fd.
        let mut options = call.options.clone();
        for f in &self.record.external_files {
            let resource = f.key.clone();
            if !options.external.contains(&resource) {
                options.external.push(resource);
            }
        }
        let dump = DumpCall {
            pid: self.pid,
            images_dir: call.images_dir,
            work_dir: call.work_dir,
            options: &options,
            leave_running: call.leave_running,
            stream: call.stream,
        };
        let mut recorded: Option<Result<(), EngineError>> = None;
        let result = {
            let mut asked_ready = false;
            let mut notify = |action: &str| {
                if action == "pre-dump" {
                    // CRIU has started up and freezes the tree next.
                    asked_ready = true;
                    return ready();
                }
                if action != "post-dump" {
                    return true;
                }
                if !asked_ready && !ready() {
                    // A CRIU that skipped pre-dump: too late to keep the tree unfrozen, not to refuse the dump.
                    return false;
                }
                // The tree is frozen: the files' sizes are final, and the record is packaged with the images.
                let written = self.write_record(call.images_dir);
                let ok = written.is_ok();
                recorded = Some(written);
                ok && frozen()
            };
            engine.criu().dump(&dump, &mut notify).map_err(EngineError::from)
        };
        match (result, recorded) {
            (Err(e), Some(Err(record))) => {
                tracing::error!(error = %record, "writing the restore record failed");
                Err(e)
            }
            (Err(e), _) => Err(e),
            (Ok(()), Some(written)) => written,
            // No post-dump notification came (a driver without them): record it now.
            (Ok(()), None) => self.write_record(call.images_dir),
        }
    }

    fn finish(&mut self, _leave_running: bool) -> Result<(), EngineError> {
        // CRIU ended the tree itself once `post-dump` let it.
        Ok(())
    }

    fn roll_back(&mut self, cause: EngineError) -> EngineError {
        // CRIU resumes the tree when `post-dump` fails, and a tree left running was never stopped.
        cause
    }
}

/// Restore target for process checkpoints.
pub(crate) struct ProcessRestore;

impl RestoreTarget for ProcessRestore {
    fn precheck(&self, _engine: &Engine, _req: &RestoreRequest) -> Result<(), EngineError> {
        Ok(())
    }

    fn restore(
        &self,
        engine: &Engine,
        ctx: &OpContext,
        req: &RestoreRequest,
        opened: &OpenedCheckpoint,
        gate: &mut Gate<'_>,
    ) -> Result<Restored, EngineError> {
        wait_until_free(&opened.manifest.process.pids, ctx)?;
        let process = &req.process;
        let mut user = req.options.clone();
        let stdio = match &process.stdio {
            RestoreStdio::Inherit => CriuStdio::Caller,
            RestoreStdio::File(p) => CriuStdio::All(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(EngineError::io(format!("opening {}", p.display())))?,
            ),
            RestoreStdio::Null => CriuStdio::All(
                File::options().read(true).write(true).open("/dev/null").map_err(EngineError::io("opening /dev/null"))?,
            ),
            RestoreStdio::Fds(fds) => {
                let dup = |i: usize| fds[i].try_clone().map(File::from).map_err(EngineError::io("duplicating the stdio given"));
                CriuStdio::Each([dup(0)?, dup(1)?, dup(2)?])
            }
        };
        for pipe in &opened.manifest.process.stdio_pipes {
            user.inherit_fd.push(format!("fd[{}]:{}", pipe.fd, pipe.resource));
        }
        let record = read_record(&opened.images_dir)?;
        // Held open until CRIU is done: CRIU takes them by their numbers in this process.
        let reopened = reopen_external_files(&record, req)?;
        for r in &reopened {
            tracing::info!(key = %r.file.key, path = %r.path.display(), fds = ?r.file.fds, "reconnecting an external file");
            user.inherit_fd.push(format!("fd[{}]:{}", r.handle.as_raw_fd(), r.file.key));
        }
        if let Some(ns) = &record.mount_namespace {
            if !gives_root(&user.extra) {
                let root = ns.root.as_ref().ok_or_else(|| EngineError::Unsupported {
                    what: "restoring this tree's mount namespace".into(),
                    detail: "its root mount was not a folder of this machine's root file system, so where to build \
                             it is unknown: give CRIU's root option (--root DIR, the folder that holds its root)"
                        .into(),
                })?;
                user.extra.extend(["--root".to_string(), root.display().to_string()]);
            }
        }
        if opened.lazy.is_some() {
            user.extra.push("--lazy-pages".into());
        }
        let options = opened.manifest.criu_options.merged_with(&user);
        let work = tempfile::Builder::new()
            .prefix(&crate::engine::leftovers::prefix("cedana-restore-"))
            .tempdir()
            .map_err(EngineError::io("creating a work folder"))?;
        // A lazy restore: our lazy-pages handler listens before the restore begins.
        let mut lazy = match &opened.lazy {
            Some(pages) => {
                // Filled before the tree resumes: a phase of the restore, with its bar on a terminal.
                let advance = if req.through_uffd {
                    let lazy_bytes = pages.pagemaps.values().flat_map(|m| &m.extents).filter(|e| e.lazy).map(|e| e.len()).sum();
                    ctx.progress().phase("restoring", Some(lazy_bytes));
                    ctx.progress().advancer()
                } else {
                    None
                };
                Some(LazyRestore::start(&opened.images_dir, work.path(), pages, &opened.path, req.through_uffd, advance)?)
            }
            None => None,
        };
        // A streamed restore: CRIU reads every image from the archive through our socket, each page image
        // verified as it goes; `post-restore` (memory restored, nothing resumed) waits for the verdict.
        let serve = match &opened.streamed {
            Some(archive) => {
                let progress = ctx.progress();
                progress.phase("restoring", Some(opened.manifest.images_size()));
                let images = crate::engine::stream::ArchiveImages { archive: Arc::clone(archive), advance: progress.advancer() };
                let serve = Serve::listen(&opened.images_dir, Arc::new(images))
                    .map_err(|e| EngineError::io("serving the images to CRIU")(std::io::Error::other(e.to_string())))?;
                Some(serve)
            }
            None => None,
        };
        let call = RestoreCall {
            images_dir: &opened.images_dir,
            work_dir: work.path(),
            options: &options,
            stdio,
            as_child: process.as_child,
            stream: serve.is_some(),
        };
        let started = Instant::now();
        let mut streamed_verdict = None;
        let mut notify = |action: &str| match action {
            "pre-restore" => gate.pass(),
            "post-restore" => match (&serve, lazy.as_mut()) {
                (Some(s), _) => {
                    let verdict = s.settle(STREAM_SETTLE);
                    let ok = verdict.is_ok();
                    streamed_verdict = Some(verdict);
                    ok
                }
                // Memory through userfaultfd: all of it in place and verified before anything resumes.
                (None, Some(l)) if req.through_uffd => {
                    let t = Instant::now();
                    let filled = l.fill_before_resume();
                    ctx.record(UFFD_FILL_PHASE, t.elapsed());
                    filled
                }
                _ => true,
            },
            _ => true,
        };
        let restored = engine.criu().restore(&call, &mut notify);
        if req.through_uffd {
            ctx.progress().finish();
        }
        let stream_error = match serve {
            Some(s) => {
                ctx.progress().finish();
                let finished = s.finish();
                match (streamed_verdict, finished) {
                    (Some(Err(e)), _) => Some(e),
                    // An image that could not be served explains why CRIU failed.
                    (_, Err(e)) if restored.is_err() => Some(e),
                    _ => None,
                }
            }
            None => None,
        };
        drop(reopened);
        let criu_time = started.elapsed().saturating_sub(gate.waited());
        if let Some(e) = stream_error {
            // CRIU killed the half-restored tree when `post-restore` failed: nothing of it runs.
            return Err(EngineError::Checkpoint(CheckpointError::Corrupt { path: opened.path.clone(), detail: e.to_string() }));
        }
        let pid = match restored {
            Ok(pid) => pid,
            Err(e) => {
                let cause = lazy.and_then(LazyRestore::abort);
                let kept = work.keep();
                crate::engine::leftovers::mark_kept(&kept);
                tracing::info!(log = %kept.display(), "criu restore failed; its log was kept");
                return Err(cause.unwrap_or_else(|| e.into()));
            }
        };
        if let Some(pf) = &process.pid_file {
            std::fs::write(pf, format!("{pid}\n")).map_err(EngineError::io(format!("writing {}", pf.display())))?;
        }
        let lazy = match lazy.map(|daemon| daemon.finish(&opened.manifest.process.pids)).transpose() {
            // Filled before the tree resumed: a normal restore.
            Ok(_) if req.through_uffd => None,
            Ok(lazy) => lazy,
            Err(e) => {
                let kept = work.keep();
                crate::engine::leftovers::mark_kept(&kept);
                tracing::info!(log = %kept.display(), "the lazy restore failed; CRIU's logs were kept");
                return Err(e);
            }
        };
        Ok(Restored { pid, exit_code: None, criu_time, lazy })
    }
}

/// How long `post-restore` waits for the images still being written to CRIU.
const STREAM_SETTLE: Duration = Duration::from_secs(120);

/// The checkpoint's [`RECORD_FILE`], or an empty record when it has none (older checkpoints, trees that
/// needed nothing of it).
fn read_record(images_dir: &Path) -> Result<ProcessRecord, EngineError> {
    let path = images_dir.join(RECORD_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
            EngineError::Checkpoint(CheckpointError::Corrupt { path, detail: format!("unreadable restore record: {e}") })
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ProcessRecord::default()),
        Err(e) => Err(EngineError::Checkpoint(CheckpointError::Io { path, source: e })),
    }
}

/// Open the recorded external files for the restore (see [`external::open_for_restore`]); a redirect that
/// applies to none of them is refused, naming the files there are.
fn reopen_external_files(record: &ProcessRecord, req: &RestoreRequest) -> Result<Vec<external::Reopened>, EngineError> {
    if let Some(r) = external::unmatched(&record.external_files, &req.external_files).first() {
        let known: Vec<String> =
            record.external_files.iter().map(|f| format!("{} (descriptors {:?})", f.path.display(), f.fds)).collect();
        let detail = if known.is_empty() {
            format!("the checkpoint records no external files, so {r} applies to nothing")
        } else {
            format!("{r} applies to none of the checkpoint's external files: {}", known.join(", "))
        };
        return Err(CheckpointError::ExternalFile { path: r.to.clone(), detail }.into());
    }
    Ok(external::open_for_restore(&record.external_files, &req.external_files)?)
}

/// Whether CRIU arguments set `--root` already.
fn gives_root(extra: &[String]) -> bool {
    extra.iter().any(|a| a == "--root" || a.starts_with("--root="))
}

/// The tree's mount namespace, when it is not ours: CRIU dumps it, and its restore must be told where to
/// build it (see [`MountNamespace::root`]).
fn own_mount_namespace(pid: i32) -> Result<Option<MountNamespace>, EngineError> {
    let ns = |p: &str| {
        let path = format!("{p}/ns/mnt");
        std::fs::metadata(&path).map(|m| m.ino()).map_err(EngineError::io(format!("reading {path}")))
    };
    if ns(&format!("/proc/{pid}"))? == ns("/proc/self")? {
        return Ok(None);
    }
    let root_mount = |p: &str| -> Option<(String, String)> {
        let text = std::fs::read_to_string(format!("{p}/mountinfo")).ok()?;
        parse_root_mount(&text)
    };
    let root = match (root_mount(&format!("/proc/{pid}")), root_mount("/proc/self")) {
        (Some((dev, root)), Some((our_dev, our_root))) if dev == our_dev && our_root == "/" => Some(PathBuf::from(root)),
        _ => None,
    };
    Ok(Some(MountNamespace { root }))
}

/// The device (`major:minor`) and root (the folder of its file system it shows) of the mount at `/` in a
/// mountinfo text: the last one listed, which is on top.
fn parse_root_mount(mountinfo: &str) -> Option<(String, String)> {
    parse_mountinfo(mountinfo).into_iter().rev().find(|m| m.mountpoint == "/").map(|m| (m.dev, m.root))
}

/// Fail if a PID of the checkpoint is taken by a live process; give zombies a moment to be reaped.
/// A PID stays taken while any process, even a zombie, still uses it as its process group or session.
fn wait_until_free(pids: &[i32], ctx: &OpContext) -> Result<(), EngineError> {
    let deadline = Instant::now() + ZOMBIE_GRACE;
    loop {
        match procfs::pid_users(pids).into_iter().next() {
            None => return Ok(()),
            Some(user) if user.zombie && Instant::now() < deadline && !ctx.is_cancelled() => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Some(user) => {
                let how = match (user.holder == user.pid, user.zombie) {
                    (true, false) => user.comm,
                    (true, true) => format!("{} (a zombie that its parent has not reaped)", user.comm),
                    (false, zombie) => format!(
                        "{} (PID {}{}, which uses it as its process group or session)",
                        user.comm,
                        user.holder,
                        if zombie { ", a zombie that its parent has not reaped" } else { "" }
                    ),
                };
                return Err(EngineError::PidInUse { pid: user.pid, comm: how });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_root_mount_is_the_topmost_at_slash_with_escapes_undone() {
        let text = "22 1 254:0 / / rw - ext4 /dev/vda rw\n\
                    30 22 0:5 / /dev rw - devtmpfs devtmpfs rw\n\
                    41 22 254:0 /srv/new\\040root / rw - ext4 /dev/vda rw\n";
        assert_eq!(parse_root_mount(text), Some(("254:0".into(), "/srv/new root".into())));
        assert_eq!(parse_root_mount("30 22 0:5 / /dev rw - devtmpfs devtmpfs rw\n"), None);
    }

    #[test]
    fn a_tree_in_our_mount_namespace_has_none_of_its_own() {
        assert_eq!(own_mount_namespace(std::process::id() as i32).unwrap(), None);
    }

    #[test]
    fn root_given_by_the_user_is_kept() {
        assert!(gives_root(&["--root".into(), "/x".into()]));
        assert!(gives_root(&["--root=/x".into()]));
        assert!(!gives_root(&["--rootless".into()]));
    }

    #[test]
    fn records_round_trip_and_a_missing_one_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_record(dir.path()).unwrap(), ProcessRecord::default());
        let mut target = ProcessTarget::new(1);
        target.write_record(dir.path()).unwrap();
        assert!(!dir.path().join(RECORD_FILE).exists(), "nothing to record, no file");
        target.record.mount_namespace = Some(MountNamespace { root: Some("/".into()) });
        target.write_record(dir.path()).unwrap();
        assert_eq!(read_record(dir.path()).unwrap(), target.record);
        std::fs::write(dir.path().join(RECORD_FILE), b"{").unwrap();
        assert!(read_record(dir.path()).unwrap_err().to_string().contains("restore record"));
    }

    #[test]
    fn a_redirect_that_matches_no_external_file_is_refused_by_name() {
        let mut req = RestoreRequest::new(crate::engine::Source::parse("/x"));
        req.external_files = vec![external::FileRedirect::parse("7=/tmp/new.log").unwrap()];
        let err = reopen_external_files(&ProcessRecord::default(), &req).unwrap_err().to_string();
        assert!(err.contains("7=/tmp/new.log") && err.contains("no external files"), "{err}");
    }
}
