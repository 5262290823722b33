//! The daemon's gRPC service: a thin mapping of each call onto the job store, the supervisor and the
//! engine. Engine operations block (CRIU), so they run on tokio's blocking pool; errors become statuses by
//! their kind.
//!
//! # Calls whose client goes away
//! Dump, restore and manage (which may wait for an upcoming process or container) run with a
//! [`Cancel`] token that is cancelled when tonic drops the call's future, which it does when the client
//! disconnects (a CLI interrupted with Ctrl+C) or resets the stream. The blocking work is not abandoned: it
//! sees the token at its next safe point, and a dump then rolls back (the workload runs on, nothing is
//! written), a restore stops before anything is restored, and a wait for an upcoming workload ends.
//!
//! # runc containers as jobs
//! `run` creates and starts a container with `runc run --detach` (the container id is the job id unless
//! given), and its init process is the job's PID. The daemon is a child subreaper, so once the detached
//! runc exits the container's init is re-parented to the daemon: it is adopted as our child (reaped by
//! us, with its real exit status). A container adopted with `manage` (started by someone else) is
//! watched instead. Which one applies is decided by the init's parent, not assumed.
//!
//! A container's standard streams are `/dev/null` by default: CRIU can dump that (a host file as
//! stdout it cannot: "Can't lookup mount"), nothing in the container depends on the daemon, and the
//! container survives a daemon restart. With `--attachable` or a log file they are pipes instead, whose
//! far ends the supervisor holds (as for attachable process jobs): runc checkpoints pipes as external
//! and a restore gets new ones, so the log goes on and clients can attach; but such a container depends
//! on the daemon holding its pipes (a restarted daemon cannot give them back).
//!
//! A runc job is dumped through the engine's runc target (the container is checkpointed and then
//! deleted), and restored from its latest checkpoint under the same container id, from the bundle the
//! checkpoint's manifest records.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cedana::cancel::Cancel;
use cedana::checkpoint::CheckpointKind;
use cedana::engine::{
    dump::{default_name, free_name},
    ContainerRestore, Destination, DumpRequest, Engine, OpContext, ProcessRestoreOptions, RestoreRequest, RestoreStdio, RuncSpec,
    Source, TargetSpec,
};
use cedana::error::ErrorKind;
use cedana::jobs::attach::RestoreHandle;
use cedana::jobs::model::{CheckpointRecord, Job, JobKind, JobState};
use cedana::jobs::store::JobStore;
use cedana::jobs::supervisor::{Output, SpawnSpec, Supervisor, SupervisorError};
use cedana::runc::{ContainerRuntime, ContainerState, RestoreFlags, Runc, RuncError};
use cedana_protos::v1 as pb;
use tonic::{Request, Response, Status};

use super::convert::{checkpoint_to_pb, criu_from_pb, job_to_pb, status};

/// Where job output goes by default: `LOG_DIR/cedana-output-<JID>.log`.
pub const LOG_DIR: &str = "/var/log";

/// The state every call shares.
#[derive(Clone)]
pub struct Service {
    pub engine: Engine,
    pub store: JobStore,
    pub supervisor: Supervisor,
    pub log_dir: PathBuf,
    /// The supervisor's serial of each job's current process, by PID: an exit event of an earlier process
    /// under the same PID (the original of a restored job) is not taken for the current one's.
    pub serials: Serials,
}

/// PID -> serial of the process the daemon currently supervises under it.
pub type Serials = std::sync::Arc<std::sync::Mutex<std::collections::HashMap<i32, u64>>>;

/// Record that `pid` is now supervised as `serial`.
pub fn track(serials: &Serials, pid: i32, serial: u64) {
    if let Ok(mut map) = serials.lock() {
        map.insert(pid, serial);
    }
}

pub(crate) type Reply<T> = Result<Response<T>, Status>;

fn err<E: std::fmt::Display>(kind: ErrorKind) -> impl FnOnce(E) -> Status {
    move |e| status(kind, e)
}

macro_rules! lib_err {
    () => {
        |e| status(e.kind(), &e)
    };
}

/// Run blocking work (the store, the engine) off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, Status> + Send + 'static) -> Result<T, Status> {
    tokio::task::spawn_blocking(f).await.map_err(err(ErrorKind::Internal))?
}

impl Service {
    fn job_reply(&self, job: &Job) -> Result<pb::Job, Status> {
        let latest = self.store.latest_checkpoint(&job.jid).map_err(lib_err!())?;
        Ok(job_to_pb(job, latest.as_ref()))
    }

    fn get_job(&self, jid: &str) -> Result<Job, Status> {
        if jid.is_empty() {
            return Err(status(ErrorKind::InvalidArgument, "no job id given"));
        }
        self.store.get(jid).map_err(lib_err!())
    }

    fn new_jid(&self, wanted: &str) -> Result<String, Status> {
        if wanted.is_empty() {
            return cedana::jobs::names::unique_jid(&self.store).map_err(lib_err!());
        }
        if wanted.contains('/') || wanted.starts_with('.') || wanted.chars().any(char::is_whitespace) {
            return Err(status(ErrorKind::InvalidArgument, format!("invalid job id {wanted:?}: no '/', spaces or leading '.'")));
        }
        Ok(wanted.to_string())
    }

    fn run(&self, req: pb::RunRequest) -> Result<pb::Job, Status> {
        match req.r#type() {
            pb::JobType::Process | pb::JobType::Unspecified => self.run_process(req),
            pb::JobType::Runc => self.run_runc(req),
            pb::JobType::Containerd => Err(status(ErrorKind::Unimplemented, "containerd jobs cannot be run yet")),
        }
    }

    fn default_log(&self, jid: &str, given: &str) -> PathBuf {
        if given.is_empty() {
            self.log_dir.join(format!("cedana-output-{jid}.log"))
        } else {
            PathBuf::from(given)
        }
    }

    fn run_process(&self, req: pb::RunRequest) -> Result<pb::Job, Status> {
        if req.args.is_empty() {
            return Err(status(ErrorKind::InvalidArgument, "no program given: cedana run process -- PROGRAM ARGS..."));
        }
        let jid = self.new_jid(&req.jid)?;
        if self.store.contains(&jid).map_err(lib_err!())? {
            return Err(status(ErrorKind::AlreadyExists, format!("job {jid} exists already")));
        }
        let log = self.default_log(&jid, &req.log);
        let output = if req.attachable { Output::Attachable { log: Some(log.clone()) } } else { Output::Log(log.clone()) };
        let cwd = (!req.cwd.is_empty()).then(|| PathBuf::from(&req.cwd));
        let env = req.env.iter().filter_map(|e| e.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let spec = SpawnSpec { args: req.args.clone(), cwd: cwd.clone(), env, clear_env: false, output };
        let spawned = self.supervisor.spawn(&spec).map_err(lib_err!())?;
        track(&self.serials, spawned.pid, spawned.serial);
        let job = Job {
            jid,
            kind: JobKind::Process,
            pid: spawned.pid,
            state: JobState::Running,
            exit_code: None,
            args: req.args,
            cwd,
            log: Some(log),
            attachable: req.attachable,
            gpu: false,
            created_at: chrono::Utc::now().timestamp(),
            container_id: None,
            runtime_root: None,
            restored_from: None,
        };
        self.store.insert(&job).map_err(lib_err!())?;
        tracing::info!(jid = %job.jid, pid = job.pid, "job started");
        self.job_reply(&job)
    }

    /// `runc run --detach` a container as a new job (see the module documentation for its streams).
    fn run_runc(&self, req: pb::RunRequest) -> Result<pb::Job, Status> {
        if req.bundle.is_empty() {
            return Err(status(ErrorKind::InvalidArgument, "no bundle given: cedana run runc --bundle DIR"));
        }
        let bundle = PathBuf::from(&req.bundle);
        if !bundle.join("config.json").is_file() {
            return Err(status(
                ErrorKind::InvalidArgument,
                format!("bundle {} has no config.json (a bundle holds the container's config.json and rootfs)", bundle.display()),
            ));
        }
        if let Some(bad) = req.args.iter().find(|a| !RUNC_RUN_FLAGS.contains(&a.as_str())) {
            return Err(status(
                ErrorKind::InvalidArgument,
                format!("runc run flag {bad:?} is not supported for jobs (only {})", RUNC_RUN_FLAGS.join(", ")),
            ));
        }
        let jid = self.new_jid(&req.jid)?;
        if self.store.contains(&jid).map_err(lib_err!())? {
            return Err(status(ErrorKind::AlreadyExists, format!("job {jid} exists already")));
        }
        let id = if req.container_id.is_empty() { jid.clone() } else { req.container_id.clone() };
        check_container_id(&id)?;
        let runc = runc_at(&req.runtime_root)?;
        if runc.exists(&id).map_err(lib_err!())? {
            return Err(RuncError::Exists { id, root: runc.root().to_path_buf() }).map_err(lib_err!());
        }
        let piped = req.attachable || !req.log.is_empty();
        let log = piped.then(|| self.default_log(&jid, &req.log));
        let pipes = match piped {
            true => Some(self.supervisor.prepare_restore_pipes(log.as_deref()).map_err(lib_err!())?),
            false => None,
        };
        let (stdio, handle) = match pipes {
            Some(p) => (Some([p.stdin, p.stdout, p.stderr]), Some(p.handle)),
            None => (None, None),
        };
        // runc and the container's init are children of ours until the init is supervised.
        let scope = self.supervisor.fork_scope();
        run_container(&runc, &id, &bundle, &req.args, stdio).map_err(lib_err!())?;
        let state = match runc.state(&id) {
            Ok(s) if s.pid > 0 => s,
            other => {
                let _ = runc.delete(&id, true);
                let detail = match other {
                    Ok(s) => format!("it is {} without a process", s.status),
                    Err(e) => e.to_string(),
                };
                return Err(status(ErrorKind::Internal, format!("container {id} did not start: {detail}")));
            }
        };
        let job = Job {
            log,
            attachable: req.attachable,
            container_id: Some(id.clone()),
            runtime_root: Some(runc.root().to_path_buf()),
            ..Job::new(jid, JobKind::Runc, state.pid, cedana::procfs::describe(state.pid).map(|i| i.cmdline).unwrap_or_default())
        };
        if let Err(e) = self.store.insert(&job) {
            let _ = runc.delete(&id, true);
            return Err(status(e.kind(), &e));
        }
        // Recorded before it is supervised, so that its exit finds the job.
        let supervised = self.supervise(state.pid, handle);
        drop(scope);
        self.record_supervision(&job, supervised)?;
        tracing::info!(jid = %job.jid, pid = job.pid, container = %id, root = %runc.root().display(), "runc job started");
        self.job_reply(&job)
    }

    /// Supervise `pid`: adopted as our child when it is one (the init of a container runc started or
    /// restored detached is re-parented to the daemon, a subreaper, once runc exits), else watched. With
    /// `handle`, its pipes are connected to a new output hub. Call it inside the fork scope of the
    /// operation that created the process.
    fn supervise(&self, pid: i32, handle: Option<RestoreHandle>) -> Result<u64, SupervisorError> {
        let ours = cedana::procfs::stat(pid).is_ok_and(|s| s.ppid == std::process::id() as i32);
        tracing::debug!(pid, child = ours, "supervising");
        match handle {
            Some(h) => self.supervisor.attach_restored(h, pid, ours),
            None if ours => match self.supervisor.adopt_child(pid) {
                Err(SupervisorError::NotAChild(_)) => self.supervisor.watch(pid),
                other => other,
            },
            None => self.supervisor.watch(pid),
        }
    }

    /// Track a new supervision of `job`'s process, or mark the job lost when it could not be supervised.
    fn record_supervision(&self, job: &Job, supervised: Result<u64, SupervisorError>) -> Result<(), Status> {
        match supervised {
            Ok(serial) => {
                track(&self.serials, job.pid, serial);
                Ok(())
            }
            Err(e) => {
                tracing::warn!(jid = %job.jid, pid = job.pid, error = %e, "the job's process cannot be supervised");
                let _ = self.store.set_state(&job.jid, JobState::Lost, None);
                Err(status(e.kind(), format!("job {} (PID {}) cannot be supervised: {e}", job.jid, job.pid)))
            }
        }
    }

    fn manage(&self, req: pb::ManageRequest, cancel: &Cancel) -> Result<pb::Job, Status> {
        match req.r#type() {
            pb::JobType::Process | pb::JobType::Unspecified => self.manage_process(req, cancel),
            pb::JobType::Runc => self.manage_runc(req, cancel),
            pb::JobType::Containerd => Err(status(ErrorKind::Unimplemented, "containerd containers cannot be managed yet")),
        }
    }

    fn manage_process(&self, req: pb::ManageRequest, cancel: &Cancel) -> Result<pb::Job, Status> {
        let pid = match (req.pid, req.name.as_str(), req.upcoming) {
            (pid, "", false) if pid > 0 => pid,
            (pid, _, _) if pid < 0 => return Err(status(ErrorKind::InvalidArgument, format!("invalid PID {pid}"))),
            (0, "", _) => {
                return Err(status(
                    ErrorKind::InvalidArgument,
                    "no process given: a PID, or a command name (cedana manage --upcoming process --name COMM)",
                ))
            }
            (0, name, upcoming) => {
                check_comm(name)?;
                let what = format!("a process named {name:?}");
                match upcoming {
                    true => wait_until(&what, cancel, || self.find_named(name))?,
                    false => self
                        .find_named(name)?
                        .ok_or_else(|| status(ErrorKind::NotFound, format!("no process named {name:?} that is not a job")))?,
                }
            }
            (_, _, true) => {
                return Err(status(
                    ErrorKind::InvalidArgument,
                    "an upcoming process is waited for by its command name (--name), not by a PID",
                ))
            }
            (_, _, false) => return Err(status(ErrorKind::InvalidArgument, "give a PID or a command name, not both")),
        };
        cedana::procfs::stat(pid).map_err(lib_err!())?;
        if let Some(j) = self.store.find_by_pid(pid).map_err(lib_err!())? {
            return Err(status(ErrorKind::AlreadyExists, format!("PID {pid} is job {} already", j.jid)));
        }
        let info = cedana::procfs::describe(pid).map_err(lib_err!())?;
        let jid = self.new_jid(&req.jid)?;
        let job = Job { cwd: Some(PathBuf::from(info.cwd)), ..Job::new(jid, JobKind::Process, pid, info.cmdline) };
        self.store.insert(&job).map_err(lib_err!())?;
        let supervised = self.supervise(pid, None);
        self.record_supervision(&job, supervised)?;
        tracing::info!(jid = %job.jid, pid, "process adopted");
        self.job_reply(&job)
    }

    /// The first process (by PID) whose command name is `name`, that is not a job, a zombie, a kernel
    /// thread or the daemon itself.
    fn find_named(&self, name: &str) -> Result<Option<i32>, Status> {
        let me = std::process::id() as i32;
        let mut pids: Vec<i32> = std::fs::read_dir("/proc")
            .map_err(err(ErrorKind::Internal))?
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .filter(|pid| *pid != me)
            .collect();
        pids.sort_unstable();
        for pid in pids {
            let Ok(comm) = std::fs::read_to_string(format!("/proc/{pid}/comm")) else { continue };
            if comm.strip_suffix('\n').unwrap_or(&comm) != name {
                continue;
            }
            match cedana::procfs::stat(pid) {
                Ok(st) if !st.is_zombie() && st.flags & PF_KTHREAD == 0 => {}
                _ => continue,
            }
            if self.store.find_by_pid(pid).map_err(lib_err!())?.is_none() {
                return Ok(Some(pid));
            }
        }
        Ok(None)
    }

    /// Adopt a runc container (waiting until it exists and runs, for an upcoming one).
    fn manage_runc(&self, req: pb::ManageRequest, cancel: &Cancel) -> Result<pb::Job, Status> {
        let id = req.container_id.clone();
        if id.is_empty() {
            return Err(status(ErrorKind::InvalidArgument, "no container id given: cedana manage runc ID"));
        }
        let runc = runc_at(&req.runtime_root)?;
        let state = if req.upcoming {
            let what = format!("runc container {id} (root {})", runc.root().display());
            wait_until(&what, cancel, || {
                // runc state forks a child and waits for it.
                let _scope = self.supervisor.fork_scope();
                match runc.state(&id) {
                    Ok(s) if s.status == "running" && s.pid > 0 => Ok(Some(s)),
                    Ok(_) | Err(RuncError::NoSuchContainer { .. }) => Ok(None),
                    Err(e @ (RuncError::NotFound { .. } | RuncError::Spawn { .. })) => Err(status(e.kind(), &e)),
                    Err(e) => {
                        // A container half created or half deleted: look again.
                        tracing::debug!(error = %e, "runc state");
                        Ok(None)
                    }
                }
            })?
        } else {
            let _scope = self.supervisor.fork_scope();
            let s = runc.state(&id).map_err(lib_err!())?;
            if s.status != "running" && s.status != "paused" {
                return Err(RuncError::NotRunning { id, status: s.status, what: "managing it" }).map_err(lib_err!());
            }
            s
        };
        self.adopt_container(&req.jid, &runc, &id, &state)
    }

    fn adopt_container(&self, wanted_jid: &str, runc: &Runc, id: &str, state: &ContainerState) -> Result<pb::Job, Status> {
        let pid = state.pid;
        if let Some(j) = self.store.find_by_pid(pid).map_err(lib_err!())? {
            return Err(status(ErrorKind::AlreadyExists, format!("container {id} (PID {pid}) is job {} already", j.jid)));
        }
        let jid = self.new_jid(wanted_jid)?;
        let args = cedana::procfs::describe(pid).map(|i| i.cmdline).unwrap_or_default();
        let job = Job {
            container_id: Some(id.to_string()),
            runtime_root: Some(runc.root().to_path_buf()),
            ..Job::new(jid, JobKind::Runc, pid, args)
        };
        self.store.insert(&job).map_err(lib_err!())?;
        let supervised = self.supervise(pid, None);
        self.record_supervision(&job, supervised)?;
        tracing::info!(jid = %job.jid, pid, container = %id, root = %runc.root().display(), "runc container adopted");
        self.job_reply(&job)
    }

    fn dump(&self, req: pb::DumpRequest, cancel: &Cancel) -> Result<pb::DumpResponse, Status> {
        let (options, leave_running) = criu_from_pb(req.criu.as_ref());
        let config = self.engine.config();
        let compression = if req.compression.is_empty() {
            config.compression()
        } else {
            req.compression.parse().map_err(|e: cedana::codec::CodecError| status(e.kind(), &e))?
        };
        let destination =
            if req.dir.is_empty() { Destination::dir(config.checkpoint_dir()) } else { Destination::parse(&req.dir) };
        let name = (!req.name.is_empty()).then(|| req.name.clone());
        let (target, job) = match req.target {
            Some(pb::dump_request::Target::Pid(pid)) => (TargetSpec::Process { pid }, None),
            Some(pb::dump_request::Target::Jid(jid)) => {
                let job = self.get_job(&jid)?;
                if job.state != JobState::Running || cedana::procfs::stat(job.pid).is_err() {
                    return Err(status(
                        ErrorKind::FailedPrecondition,
                        format!("job {jid} is {}: only a running job can be dumped", job.state),
                    ));
                }
                (job_target(&job)?, Some(job))
            }
            Some(pb::dump_request::Target::RuncId(_)) => {
                return Err(status(ErrorKind::Unimplemented, "dumping runc containers through the daemon is not built yet"))
            }
            None => return Err(status(ErrorKind::InvalidArgument, "nothing to dump: give a PID or a job id")),
        };
        let name = name.or_else(|| {
            job.as_ref().map(|j| free_name(&destination, &default_name(checkpoint_kind(j.kind), &j.jid), compression))
        });
        tracing::info!(target = ?target, job = ?job.as_ref().map(|j| &j.jid), "dump requested");
        let dreq = DumpRequest { target, destination, name, compression, leave_running, options };
        // The job is marked before CRIU ends it, so its exit is not taken for a crash.
        if let (Some(job), false) = (&job, leave_running) {
            self.store.set_state(&job.jid, JobState::Halted, None).map_err(lib_err!())?;
        }
        // CRIU and runc are children of ours that the engine waits for: keep the orphan sweeper off them.
        let scope = self.supervisor.fork_scope();
        let dumped = self.engine.dump(dreq, &OpContext::new().with_cancel(cancel.clone()));
        drop(scope);
        // The tree CRIU ended may leave zombies of ours (children of its processes): reap them now.
        self.supervisor.sweep();
        let out = match dumped {
            Ok(out) => out,
            Err(e) => {
                if let (Some(job), false) = (&job, leave_running) {
                    // The workload is running again (the engine rolled back).
                    let _ = self.store.set_state(&job.jid, JobState::Running, None);
                }
                if cancel.is_cancelled() {
                    tracing::warn!(job = ?job.as_ref().map(|j| &j.jid), error = %e, "dump cancelled: its client went away; the workload runs on");
                }
                return Err(status(e.kind(), &e));
            }
        };
        let checkpoint = match &job {
            Some(job) => {
                let record = CheckpointRecord {
                    id: cedana::jobs::names::checkpoint_id(),
                    jid: job.jid.clone(),
                    time: out.manifest.created_at.timestamp(),
                    size: out.size,
                    path: out.path.clone(),
                    compression: out.manifest.compression.to_string(),
                };
                self.store.add_checkpoint(&record).map_err(lib_err!())?;
                tracing::info!(jid = %job.jid, path = %out.path.display(), "job dumped");
                Some(checkpoint_to_pb(&record))
            }
            None => None,
        };
        Ok(pb::DumpResponse {
            path: out.path.display().to_string(),
            size: out.size,
            checkpoint,
            pid: out.manifest.process.pid,
            comm: out.manifest.process.comm.clone(),
            criu_time_us: out.criu_time.as_micros() as u64,
            package_time_us: out.package_time.as_micros() as u64,
            total_time_us: out.total_time.as_micros() as u64,
        })
    }

    fn restore(&self, req: pb::RestoreRequest, cancel: &Cancel) -> Result<pb::RestoreResponse, Status> {
        let (options, _) = criu_from_pb(req.criu.as_ref());
        let (path, job) = match req.source {
            Some(pb::restore_request::Source::Path(ref p)) => (p.clone(), None),
            Some(pb::restore_request::Source::Jid(ref jid)) => {
                let job = self.get_job(jid)?;
                if job.state == JobState::Running && cedana::procfs::stat(job.pid).is_ok() {
                    return Err(status(ErrorKind::FailedPrecondition, format!("job {jid} is running: dump it first")));
                }
                let latest = self.store.latest_checkpoint(jid).map_err(lib_err!())?.ok_or_else(|| {
                    status(ErrorKind::FailedPrecondition, format!("job {jid} has no checkpoint: dump it first"))
                })?;
                (latest.path.display().to_string(), Some(job))
            }
            None => return Err(status(ErrorKind::InvalidArgument, "nothing to restore: give a path or a job id")),
        };
        let ctx = OpContext::new().with_cancel(cancel.clone());
        let result = match job {
            Some(job) if job.kind == JobKind::Runc => self.restore_container_job(job, path, options, req.attachable, &ctx),
            job => self.restore_process(&req, job, path, options, &ctx),
        };
        if result.is_err() && cancel.is_cancelled() {
            tracing::warn!(source = ?req.source, "restore cancelled: its client went away");
        }
        result
    }

    fn restore_process(
        &self,
        req: &pb::RestoreRequest,
        job: Option<Job>,
        path: String,
        options: cedana::criu::options::CriuOptions,
        ctx: &OpContext,
    ) -> Result<pb::RestoreResponse, Status> {
        // An attachable job gets new pipes whose far ends the supervisor holds, so clients can attach again.
        let attachable = job.as_ref().is_some_and(|j| j.attachable) || req.attachable;
        let pipes = match attachable {
            true => Some(self.supervisor.prepare_restore_pipes(job.as_ref().and_then(|j| j.log.as_deref())).map_err(lib_err!())?),
            false => None,
        };
        let (stdio, handle) = match pipes {
            Some(p) => (RestoreStdio::Fds(std::sync::Arc::new([p.stdin, p.stdout, p.stderr])), Some(p.handle)),
            None if req.log.is_empty() => (RestoreStdio::Null, None),
            None => (RestoreStdio::File(PathBuf::from(&req.log)), None),
        };
        let pid_file = (!req.pid_file.is_empty()).then(|| PathBuf::from(&req.pid_file));
        let rreq = RestoreRequest {
            only: Some(CheckpointKind::Process),
            options,
            // The daemon is the restored tree's parent: it waits for it by PID and records its exit.
            process: ProcessRestoreOptions { as_child: true, stdio, pid_file },
            ..RestoreRequest::new(Source::parse(&path))
        };
        tracing::info!(path = %path, job = ?job.as_ref().map(|j| &j.jid), "restore requested");
        // Reap what the dumped tree left (its children die as zombies of ours once their parent is gone, and
        // hold the tree's PIDs as process group or session) before a scope shelters new zombies from the sweeper.
        self.supervisor.sweep();
        // The scope also covers the restored root until the supervisor has adopted it.
        let scope = self.supervisor.fork_scope();
        // The request (and with it our copies of the child's ends of the pipes) is dropped once CRIU is done.
        let out = self.engine.restore(rreq, ctx).map_err(|e| status(e.kind(), &e))?;
        let serial = match handle {
            Some(h) => self.supervisor.attach_restored(h, out.pid, true),
            None => self.supervisor.adopt_child(out.pid),
        }
        .map_err(lib_err!())?;
        track(&self.serials, out.pid, serial);
        drop(scope);
        let job = match job {
            Some(mut job) => {
                job.pid = out.pid;
                job.state = JobState::Running;
                job.exit_code = None;
                job.restored_from = Some(path);
                // Restored with new pipes the supervisor holds: clients can attach from now on.
                job.attachable |= attachable;
                self.store.update(&job).map_err(lib_err!())?;
                Some(self.job_reply(&job)?)
            }
            None => None,
        };
        Ok(pb::RestoreResponse {
            pid: out.pid,
            job,
            verify_time_us: out.verify_time.as_micros() as u64,
            criu_time_us: out.criu_time.as_micros() as u64,
        })
    }

    /// Restore a runc job from its latest checkpoint (`path`): the same container id and runc root, the
    /// bundle the checkpoint's manifest records, detached; then supervise the new init.
    fn restore_container_job(
        &self,
        mut job: Job,
        path: String,
        options: cedana::criu::options::CriuOptions,
        attach: bool,
        ctx: &OpContext,
    ) -> Result<pb::RestoreResponse, Status> {
        let manifest = cedana::checkpoint::read_manifest(Path::new(&path), false).map_err(lib_err!())?;
        let container = manifest.container.as_ref().filter(|_| manifest.kind == CheckpointKind::Runc).ok_or_else(|| {
            status(
                ErrorKind::FailedPrecondition,
                format!("{path} is a {} checkpoint, not one of a runc container", manifest.kind),
            )
        })?;
        let bundle = container.bundle.clone().ok_or_else(|| {
            status(ErrorKind::FailedPrecondition, format!("checkpoint {path} records no bundle for container {}", container.id))
        })?;
        let id = job.container_id.clone().unwrap_or_else(|| container.id.clone());
        let root = job.runtime_root.clone().or_else(|| container.root.clone());
        // Streams that were pipes at dump time get new pipes whose far ends the supervisor holds (the log
        // goes on, clients can attach); any others come back as they were (/dev/null).
        let piped = job.attachable || job.log.is_some() || attach;
        let pipes = match piped {
            true => Some(self.supervisor.prepare_restore_pipes(job.log.as_deref()).map_err(lib_err!())?),
            false => None,
        };
        let (stdio, handle) = match pipes {
            Some(p) => (Some([p.stdin, p.stdout, p.stderr]), Some(p.handle)),
            None => (None, None),
        };
        let runc = Runc::locate(root.clone()).map_err(lib_err!())?;
        let runtime: Arc<dyn ContainerRuntime> = Arc::new(JobRunc { runc: runc.clone(), stdio: Mutex::new(stdio) });
        let rreq = RestoreRequest {
            only: Some(CheckpointKind::Runc),
            options,
            container: Some(ContainerRestore {
                id: id.clone(),
                runtime: Some(runtime),
                root,
                flags: RestoreFlags { bundle: bundle.clone(), detach: true, ..Default::default() },
            }),
            ..RestoreRequest::new(Source::parse(&path))
        };
        tracing::info!(path = %path, jid = %job.jid, container = %id, bundle = %bundle.display(), "restore requested");
        // As for processes: what the dumped container left goes before the scope opens.
        self.supervisor.sweep();
        // runc, CRIU and then the container's init (re-parented to us) are our children until supervised.
        let scope = self.supervisor.fork_scope();
        // The request, and with it our copies of the container's ends of the pipes, is dropped here.
        let out = self.engine.restore(rreq, ctx).map_err(|e| status(e.kind(), &e))?;
        let pid = match out.pid {
            0 => runc.state(&id).map_err(lib_err!())?.pid,
            pid => pid,
        };
        job.pid = pid;
        job.state = JobState::Running;
        job.exit_code = None;
        job.restored_from = Some(path);
        job.attachable |= attach;
        self.store.update(&job).map_err(lib_err!())?;
        let supervised = self.supervise(pid, handle);
        drop(scope);
        self.record_supervision(&job, supervised)?;
        tracing::info!(jid = %job.jid, pid, container = %id, "runc job restored");
        Ok(pb::RestoreResponse {
            pid,
            job: Some(self.job_reply(&job)?),
            verify_time_us: out.verify_time.as_micros() as u64,
            criu_time_us: out.criu_time.as_micros() as u64,
        })
    }

    fn check(&self) -> pb::CheckResponse {
        let mut components = Vec::new();
        let criu = self.engine.criu().criu().binary().display().to_string();
        components.push(pb::HealthComponent {
            name: "criu".into(),
            ok: true,
            detail: format!("{} at {criu} ({:?} driver)", self.engine.criu_version(), self.engine.config().criu_driver()),
        });
        let db = self.store.list().map(|jobs| format!("{} jobs", jobs.len()));
        components.push(pb::HealthComponent {
            name: "database".into(),
            ok: db.is_ok(),
            detail: db.unwrap_or_else(|e| e.to_string()),
        });
        let dir = self.engine.config().checkpoint_dir();
        let storage = std::fs::create_dir_all(&dir).and_then(|()| tempfile::tempfile_in(&dir).map(drop));
        components.push(pb::HealthComponent {
            name: "storage".into(),
            ok: storage.is_ok(),
            detail: match storage {
                Ok(()) => format!("{} is writable", dir.display()),
                Err(e) => format!("{}: {e}", dir.display()),
            },
        });
        let gpus = std::fs::read_dir("/dev")
            .map(|d| d.flatten().filter(|e| e.file_name().to_string_lossy().starts_with("nvidia")).count());
        components.push(pb::HealthComponent {
            name: "gpu".into(),
            ok: true,
            detail: match gpus {
                Ok(0) | Err(_) => "no NVIDIA GPU on this machine".into(),
                Ok(n) => format!("{n} NVIDIA device nodes"),
            },
        });
        pb::CheckResponse { components }
    }
}

impl Service {
    /// Answer a call with `f` on tokio's blocking pool.
    async fn answer<Q: Send + 'static, T: Send + 'static>(
        &self,
        request: Request<Q>,
        f: fn(&Service, Q) -> Result<T, Status>,
    ) -> Reply<T> {
        let s = self.clone();
        let req = request.into_inner();
        blocking(move || f(&s, req)).await.map(Response::new)
    }

    /// Answer a call with `f` on tokio's blocking pool, cancelling its token when the call's future is
    /// dropped before `f` is done (the client went away). `f` itself runs to its end either way.
    async fn answer_cancellable<Q: Send + 'static, T: Send + 'static>(
        &self,
        call: &'static str,
        request: Request<Q>,
        f: fn(&Service, Q, &Cancel) -> Result<T, Status>,
    ) -> Reply<T> {
        let s = self.clone();
        let req = request.into_inner();
        let cancel = Cancel::new();
        let mut guard = CancelOnDrop { cancel: cancel.clone(), call, done: false };
        let result = blocking(move || f(&s, req, &cancel)).await;
        guard.done = true;
        result.map(Response::new)
    }

    fn list(&self, _req: pb::ListRequest) -> Result<pb::JobList, Status> {
        let jobs = self.store.list().map_err(lib_err!())?;
        let latest = self.store.latest_checkpoints().map_err(lib_err!())?;
        Ok(pb::JobList { jobs: jobs.iter().map(|j| job_to_pb(j, latest.get(&j.jid))).collect() })
    }

    fn inspect(&self, req: pb::JobRef) -> Result<pb::Job, Status> {
        self.get_job(&req.jid).and_then(|j| self.job_reply(&j))
    }

    fn kill(&self, req: pb::KillRequest) -> Result<pb::Job, Status> {
        let job = self.get_job(&req.jid)?;
        if job.state != JobState::Running {
            return Err(status(ErrorKind::FailedPrecondition, format!("job {} is {}, not running", job.jid, job.state)));
        }
        let sig = if req.signal == 0 { libc::SIGKILL } else { req.signal };
        self.supervisor.signal(job.pid, sig).map_err(lib_err!())?;
        self.job_reply(&job)
    }

    fn delete(&self, req: pb::JobRef) -> Result<pb::Job, Status> {
        let job = self.get_job(&req.jid)?;
        if job.state == JobState::Running && cedana::procfs::stat(job.pid).is_ok() {
            return Err(status(ErrorKind::FailedPrecondition, format!("job {} is running: kill it first", job.jid)));
        }
        let reply = self.job_reply(&job)?;
        self.store.delete(&job.jid).map_err(lib_err!())?;
        if let (JobKind::Runc, Some(id)) = (job.kind, &job.container_id) {
            self.remove_stopped_container(id, job.runtime_root.as_deref());
        }
        // Its output hub (for attachable jobs) goes with it, so a later process with the same PID gets none.
        self.supervisor.release(job.pid);
        Ok(reply)
    }

    /// Best effort: runc forgets a job's container once it has stopped (a dumped one is gone already).
    fn remove_stopped_container(&self, id: &str, root: Option<&Path>) {
        let Ok(runc) = Runc::locate(root.map(Path::to_path_buf)) else { return };
        let _scope = self.supervisor.fork_scope();
        if runc.state(id).is_ok_and(|s| s.status == "stopped") {
            match runc.delete(id, false) {
                Ok(()) => tracing::info!(container = %id, "deleted the stopped container of a deleted job"),
                Err(e) => tracing::warn!(container = %id, error = %e, "deleting the stopped container of a deleted job"),
            }
        }
    }

    fn checkpoints(&self, req: pb::JobRef) -> Result<pb::CheckpointList, Status> {
        self.get_job(&req.jid)?;
        let list = self.store.checkpoints(&req.jid).map_err(lib_err!())?;
        Ok(pb::CheckpointList { checkpoints: list.iter().map(checkpoint_to_pb).collect() })
    }
}

#[tonic::async_trait]
impl pb::daemon_server::Daemon for Service {
    async fn run(&self, request: Request<pb::RunRequest>) -> Reply<pb::Job> {
        self.answer(request, Service::run).await
    }

    async fn manage(&self, request: Request<pb::ManageRequest>) -> Reply<pb::Job> {
        self.answer_cancellable("manage", request, Service::manage).await
    }

    async fn list(&self, request: Request<pb::ListRequest>) -> Reply<pb::JobList> {
        self.answer(request, Service::list).await
    }

    async fn inspect(&self, request: Request<pb::JobRef>) -> Reply<pb::Job> {
        self.answer(request, Service::inspect).await
    }

    async fn kill(&self, request: Request<pb::KillRequest>) -> Reply<pb::Job> {
        self.answer(request, Service::kill).await
    }

    async fn delete(&self, request: Request<pb::JobRef>) -> Reply<pb::Job> {
        self.answer(request, Service::delete).await
    }

    async fn checkpoints(&self, request: Request<pb::JobRef>) -> Reply<pb::CheckpointList> {
        self.answer(request, Service::checkpoints).await
    }

    async fn dump(&self, request: Request<pb::DumpRequest>) -> Reply<pb::DumpResponse> {
        self.answer_cancellable("dump", request, Service::dump).await
    }

    async fn restore(&self, request: Request<pb::RestoreRequest>) -> Reply<pb::RestoreResponse> {
        self.answer_cancellable("restore", request, Service::restore).await
    }

    type AttachStream = super::attach::AttachStream;

    async fn attach(&self, request: Request<tonic::Streaming<pb::AttachInput>>) -> Reply<Self::AttachStream> {
        super::attach::serve(self.clone(), request).await
    }

    async fn check(&self, request: Request<pb::CheckRequest>) -> Reply<pb::CheckResponse> {
        self.answer(request, |s, _| Ok(s.check())).await
    }
}

/// Cancels a call's token when dropped before the call was done: tonic drops a call's future when its
/// client goes away.
struct CancelOnDrop {
    cancel: Cancel,
    call: &'static str,
    done: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if !self.done {
            tracing::warn!(call = self.call, "the client went away: cancelling the call");
            self.cancel.cancel();
        }
    }
}

/// How often an upcoming process or container is looked for.
const UPCOMING_POLL: Duration = Duration::from_millis(100);

/// Poll `probe` every [`UPCOMING_POLL`] until it finds `what`, or until `cancel` (the client went away).
fn wait_until<T>(what: &str, cancel: &Cancel, mut probe: impl FnMut() -> Result<Option<T>, Status>) -> Result<T, Status> {
    tracing::info!(what, "waiting for an upcoming workload");
    loop {
        if cancel.is_cancelled() {
            tracing::warn!(what, "stopped waiting: the client went away");
            return Err(status(ErrorKind::Cancelled, format!("stopped waiting for {what}")));
        }
        if let Some(found) = probe()? {
            return Ok(found);
        }
        std::thread::sleep(UPCOMING_POLL);
    }
}

/// `PF_KTHREAD` in /proc/PID/stat's flags: a kernel thread.
const PF_KTHREAD: u64 = 0x0020_0000;

/// Command names (/proc/PID/comm) are at most 15 bytes: a longer name would never match.
fn check_comm(name: &str) -> Result<(), Status> {
    if name.len() > 15 || name.contains('/') || name.contains('\n') {
        return Err(status(
            ErrorKind::InvalidArgument,
            format!("{name:?} cannot be a command name: /proc/PID/comm is at most 15 bytes, without '/'"),
        ));
    }
    Ok(())
}

/// The `runc run` flags a job may pass.
const RUNC_RUN_FLAGS: [&str; 2] = ["--no-pivot", "--no-new-keyring"];

/// runc accepts ids of letters, digits and `_ + - .` (and so do we, for job-named containers).
fn check_container_id(id: &str) -> Result<(), Status> {
    let ok = !id.is_empty() && id != "." && id != ".." && id.chars().all(|c| c.is_ascii_alphanumeric() || "_+-.".contains(c));
    if !ok {
        return Err(status(
            ErrorKind::InvalidArgument,
            format!("invalid container id {id:?}: letters, digits and _ + - . only (give another with --id)"),
        ));
    }
    Ok(())
}

/// runc with its state under `root` (runc's default when empty).
fn runc_at(root: &str) -> Result<Runc, Status> {
    Runc::locate((!root.is_empty()).then(|| PathBuf::from(root))).map_err(lib_err!())
}

/// The engine's target for a running job.
fn job_target(job: &Job) -> Result<TargetSpec, Status> {
    match job.kind {
        JobKind::Process => Ok(TargetSpec::Process { pid: job.pid }),
        JobKind::Runc => {
            let id = job
                .container_id
                .clone()
                .ok_or_else(|| status(ErrorKind::FailedPrecondition, format!("runc job {} has no container id", job.jid)))?;
            Ok(TargetSpec::Runc(RuncSpec {
                id,
                runtime: None,
                root: job.runtime_root.clone(),
                work_path: None,
                extra_flags: Vec::new(),
            }))
        }
        JobKind::Containerd => Err(status(ErrorKind::Unimplemented, "containerd jobs cannot be dumped yet")),
    }
}

fn checkpoint_kind(kind: JobKind) -> CheckpointKind {
    match kind {
        JobKind::Process => CheckpointKind::Process,
        JobKind::Runc => CheckpointKind::Runc,
        JobKind::Containerd => CheckpointKind::Containerd,
    }
}

/// Give `cmd` these standard streams (stdin, stdout, stderr), or /dev/null.
fn set_stdio(cmd: &mut std::process::Command, stdio: Option<[OwnedFd; 3]>) {
    match stdio {
        Some([i, o, e]) => cmd.stdin(Stdio::from(i)).stdout(Stdio::from(o)).stderr(Stdio::from(e)),
        None => cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()),
    };
}

/// `runc run --detach --bundle BUNDLE FLAGS... ID`, the container's streams on `stdio` (/dev/null when
/// `None`; runc passes its own to the container). runc's errors are read back from a log of its own.
fn run_container(runc: &Runc, id: &str, bundle: &Path, flags: &[String], stdio: Option<[OwnedFd; 3]>) -> Result<(), RuncError> {
    let spawn = |source| RuncError::Spawn { binary: runc.binary().to_path_buf(), source };
    let log = tempfile::NamedTempFile::new().map_err(spawn)?;
    let mut cmd = runc.command();
    cmd.arg("--log").arg(log.path()).args(["--log-format", "json"]);
    cmd.args(["run", "--detach", "--bundle"]).arg(bundle).args(flags).arg(id);
    set_stdio(&mut cmd, stdio);
    tracing::debug!(?cmd, "running runc");
    let st = cmd.status().map_err(spawn)?;
    if st.success() {
        return Ok(());
    }
    Err(RuncError::Failed {
        command: "run".into(),
        id: id.into(),
        status: cedana::binary::describe_status(st),
        message: logged_error(log.path(), None),
    })
}

/// The last error runc logged as JSON lines in `log`, with CRIU's first errors from `criu_log`.
fn logged_error(log: &Path, criu_log: Option<&Path>) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut message = text
        .lines()
        .rev()
        .find_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            (v.get("level")?.as_str()? == "error").then(|| v.get("msg")?.as_str().map(str::to_string))?
        })
        .unwrap_or_else(|| "runc gave no reason".to_string());
    if let Some(criu) = criu_log.and_then(|p| std::fs::read_to_string(p).ok()) {
        let causes: Vec<String> =
            cedana::criu::log::error_lines(&criu).into_iter().filter(|l| !l.contains("FAILED")).take(2).collect();
        if !causes.is_empty() {
            message.push_str(&format!("; CRIU: {}", causes.join(" / ")));
        }
    }
    message
}

/// runc for a runc job's restore: the engine's runc, except that `runc restore` runs with the standard
/// streams the daemon chose instead of the daemon's own. runc hands its stdin, stdout and stderr to the
/// restored container in place of the pipes the container had at dump time (CRIU's `--inherit-fd`), so
/// they must be the job's new pipes, or /dev/null.
#[derive(Debug)]
struct JobRunc {
    runc: Runc,
    /// Taken by the restore: stdin, stdout, stderr (/dev/null when `None`).
    stdio: Mutex<Option<[OwnedFd; 3]>>,
}

impl ContainerRuntime for JobRunc {
    fn root(&self) -> &Path {
        self.runc.root()
    }
    fn state(&self, id: &str) -> Result<ContainerState, RuncError> {
        self.runc.state(id)
    }
    fn exists(&self, id: &str) -> Result<bool, RuncError> {
        self.runc.exists(id)
    }
    fn pause(&self, id: &str) -> Result<(), RuncError> {
        self.runc.pause(id)
    }
    fn resume(&self, id: &str) -> Result<(), RuncError> {
        self.runc.resume(id)
    }
    fn delete(&self, id: &str, force: bool) -> Result<(), RuncError> {
        self.runc.delete(id, force)
    }
    fn checkpoint(&self, id: &str, images: &Path, work: &Path, flags: &[std::ffi::OsString]) -> Result<(), RuncError> {
        self.runc.checkpoint(id, images, work, flags)
    }
    fn restore(&self, id: &str, images: &Path, flags: &RestoreFlags) -> Result<i32, RuncError> {
        let spawn = |source| RuncError::Spawn { binary: self.runc.binary().to_path_buf(), source };
        let log = tempfile::NamedTempFile::new().map_err(spawn)?;
        let mut cmd = self.runc.command();
        cmd.arg("--log").arg(log.path()).args(["--log-format", "json"]);
        cmd.arg("restore").arg("--image-path").arg(images).arg("--bundle").arg(&flags.bundle);
        if let Some(w) = &flags.work_path {
            cmd.arg("--work-path").arg(w);
        }
        if flags.detach {
            cmd.arg("--detach");
        }
        if let Some(p) = &flags.pid_file {
            cmd.arg("--pid-file").arg(p);
        }
        if let Some(s) = &flags.console_socket {
            cmd.arg("--console-socket").arg(s);
        }
        cmd.args(&flags.extra).arg(id);
        let stdio = self.stdio.lock().ok().and_then(|mut s| s.take());
        set_stdio(&mut cmd, stdio);
        tracing::debug!(?cmd, "running runc restore");
        // Our copies of the container's ends go with `cmd`, once runc has started.
        let st = cmd.status().map_err(spawn)?;
        drop(cmd);
        match st.code() {
            Some(0) => Ok(0),
            Some(code) if !flags.detach => Ok(code),
            _ => Err(RuncError::Failed {
                command: "restore".into(),
                id: id.into(),
                status: cedana::binary::describe_status(st),
                message: logged_error(
                    log.path(),
                    Some(&flags.work_path.clone().unwrap_or_else(|| images.to_path_buf()).join("restore.log")),
                ),
            }),
        }
    }
}

/// Keeps the store in step with what the supervisor sees: a job that exits by itself is `exited` (with its
/// code); one a dump ended stays `halted`.
pub fn follow_exits(store: JobStore, serials: Serials, events: std::sync::mpsc::Receiver<cedana::jobs::supervisor::JobEvent>) {
    for event in events {
        let cedana::jobs::supervisor::JobEvent::Exited { pid, status, serial } = event;
        let current = serials.lock().ok().and_then(|mut m| match m.get(&pid) {
            Some(s) if *s == serial => m.remove(&pid),
            Some(_) => None,
            None => Some(serial),
        });
        if current.is_none() {
            tracing::debug!(pid, serial, "exit of an earlier process under a supervised PID: ignored");
            continue;
        }
        let Ok(Some(job)) = store.find_by_pid(pid) else { continue };
        let (state, code) = match status {
            Some(s) => (JobState::Exited, s.code().or_else(|| s.signal().map(|sig| 128 + sig))),
            None => (JobState::Exited, None),
        };
        tracing::info!(jid = %job.jid, pid, ?code, "job exited");
        if let Err(e) = store.set_state(&job.jid, state, code) {
            tracing::warn!(jid = %job.jid, error = %e, "recording a job's exit failed");
        }
    }
}
