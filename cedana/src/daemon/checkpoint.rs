//! Dumping and restoring jobs and processes (`dump`, `restore`).
//!
//! A runc job is dumped through the engine's runc target (the container is checkpointed and then
//! deleted), and restored from its latest checkpoint under the same container id, from the bundle the
//! checkpoint's manifest records. A containerd job is dumped the same way where its shim keeps its runc
//! state (with the container's record attached), and restored in place through containerd and our shim.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cedana::cancel::Cancel;
use cedana::checkpoint::CheckpointKind;
use cedana::engine::{
    dump::{default_name, free_name},
    Attachment, ContainerRestore, Destination, DumpRequest, OpContext, ProcessRestoreOptions, RestoreRequest, RestoreStdio,
    RuncSpec, Source, TargetSpec,
};
use cedana::error::ErrorKind;
use cedana::jobs::model::{CheckpointRecord, Job, JobKind, JobState, Origin, ORIGIN_FILE};
use cedana::runc::{ContainerRuntime, RestoreFlags, Runc};
use cedana_protos::v1 as pb;
use tonic::Status;

use crate::containerd::{prepare_dump, restore as restore_container, Client, RestoreSpec, Stdio, CEDANA_RUNTIME};

use super::access::{seal, Caller};
use super::convert::{checkpoint_to_pb, criu_from_pb, status};
use super::service::{lib_err, track, Service};

impl Service {
    pub(super) fn dump(&self, caller: &Caller, req: pb::DumpRequest, cancel: &Cancel) -> Result<pb::DumpResponse, Status> {
        let (options, leave_running) = criu_from_pb(req.criu.as_ref());
        let config = self.engine.config();
        let compression = if req.compression.is_empty() {
            config.compression()
        } else {
            req.compression.parse().map_err(|e: cedana::codec::CodecError| status(e.kind(), &e))?
        };
        let name = (!req.name.is_empty()).then(|| req.name.clone());
        let mut attachments = Vec::new();
        let (target, job) = match req.target {
            Some(pb::dump_request::Target::Pid(pid)) => {
                caller.check_tree(pid)?;
                (TargetSpec::Process { pid }, None)
            }
            Some(pb::dump_request::Target::Jid(jid)) => {
                let job = self.get_job(caller, &jid)?;
                if job.state != JobState::Running || cedana::procfs::stat(job.pid).is_err() {
                    return Err(status(
                        ErrorKind::FailedPrecondition,
                        format!("job {jid} is {}: only a running job can be dumped", job.state),
                    ));
                }
                if job.kind == JobKind::Process {
                    caller.check_tree(job.pid)?;
                }
                let (target, attached) = job_target(&job, req.rootfs)?;
                attachments = attached;
                (target, Some(job))
            }
            Some(pb::dump_request::Target::RuncId(id)) => {
                caller.only_root("dumping a runc container")?;
                let root = (!req.runtime_root.is_empty()).then(|| PathBuf::from(&req.runtime_root));
                (TargetSpec::Runc(RuncSpec { id, runtime: None, root, work_path: None, extra_flags: Vec::new() }), None)
            }
            None => return Err(status(ErrorKind::InvalidArgument, "nothing to dump: give a PID or a job id")),
        };
        let dir = match req.dir.is_empty() {
            true => config.checkpoint_dir().to_string_lossy().into_owned(),
            false => req.dir.clone(),
        };
        caller.check_local(&dir)?;
        if req.overwrite && !caller.is_root() {
            // Replacing works on whatever sits at the name, as root: not in a folder a user controls.
            return Err(status(
                ErrorKind::PermissionDenied,
                "--overwrite is for root only: move or delete the old checkpoint yourself (it is yours to move)",
            ));
        }
        // For a user other than root: the folder they may write into, held open while the dump writes there.
        let held = caller.writable_dir(Path::new(&dir))?;
        let destination = match held.is_held() {
            true => Destination::parse(&held.path().to_string_lossy()),
            false => Destination::parse(&dir),
        };
        let destination = if req.overwrite { destination.replacing() } else { destination };
        let name = name.or_else(|| {
            job.as_ref().map(|j| free_name(&destination, &default_name(checkpoint_kind(j.kind), &j.jid), compression))
        });
        tracing::info!(target = ?target, job = ?job.as_ref().map(|j| &j.jid), "dump requested");
        // A job's checkpoint records where it was made, for a restore on another node.
        let checkpoint_id = cedana::jobs::names::checkpoint_id();
        if let Some(job) = &job {
            let origin = Origin { node: config.node_name(), job: Some(job.jid.clone()), checkpoint: Some(checkpoint_id.clone()) };
            let bytes = serde_json::to_vec_pretty(&origin).map_err(|e| status(ErrorKind::Internal, e))?;
            attachments.push((ORIGIN_FILE.to_string(), Arc::new(move || Ok(bytes.clone())) as _));
        }
        let dreq = DumpRequest { target, destination, name, compression, leave_running, options, stream: req.stream };
        // The job is marked before CRIU ends it, so its exit is not taken for a crash.
        if let (Some(job), false) = (&job, leave_running) {
            self.store.set_state(&job.jid, JobState::Halted, None).map_err(lib_err!())?;
        }
        // CRIU and runc are children of ours that the engine waits for: keep the orphan sweeper off them.
        let scope = self.supervisor.fork_scope();
        let dumped = self.engine.dump_attaching(dreq, &attachments, &OpContext::new().with_cancel(cancel.clone()));
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
        // A user's checkpoint (root's alone, 0600 or 0700 as every checkpoint) is recorded as written for them.
        let shown = held.shown(&out.path);
        if held.is_held() {
            seal(&self.store, caller, &out.path, &shown)?;
        }
        let checkpoint = match &job {
            Some(job) => {
                let record = CheckpointRecord {
                    id: checkpoint_id,
                    jid: job.jid.clone(),
                    time: out.manifest.created_at.timestamp(),
                    size: out.size,
                    path: shown.clone(),
                    compression: out.manifest.compression.to_string(),
                };
                self.store.add_checkpoint(&record).map_err(lib_err!())?;
                if out.manifest.gpu.is_some() && !job.gpu {
                    // `cedana ps` shows a GPU job as one also while it is halted.
                    if let Ok(mut j) = self.store.get(&job.jid) {
                        j.gpu = true;
                        self.store.update(&j).map_err(lib_err!())?;
                    }
                }
                tracing::info!(jid = %job.jid, path = %shown.display(), "job dumped");
                Some(checkpoint_to_pb(&record))
            }
            None => None,
        };
        Ok(pb::DumpResponse {
            path: shown.display().to_string(),
            size: out.size,
            checkpoint,
            pid: out.manifest.process.pid,
            comm: out.manifest.process.comm.clone(),
            criu_time_us: out.criu_time.as_micros() as u64,
            package_time_us: out.package_time.as_micros() as u64,
            total_time_us: out.total_time.as_micros() as u64,
        })
    }

    pub(super) fn restore(
        &self,
        caller: &Caller,
        req: pb::RestoreRequest,
        cancel: &Cancel,
    ) -> Result<pb::RestoreResponse, Status> {
        let (options, _) = criu_from_pb(req.criu.as_ref());
        if !caller.is_root() && (!req.log.is_empty() || !req.pid_file.is_empty()) {
            return Err(status(
                ErrorKind::PermissionDenied,
                "--log and --pid-file are for root only (the daemon would write them as root)",
            ));
        }
        // A user other than root restores only checkpoints the daemon wrote for them, read through a held
        // descriptor (see `access`).
        let held = |p: &str| -> Result<(String, super::access::HeldPath), Status> {
            caller.check_local(p)?;
            let held = caller.sealed_checkpoint(&self.store, Path::new(p))?;
            let path = if held.is_held() { held.path().display().to_string() } else { p.to_string() };
            Ok((path, held))
        };
        let (path, job, _held) = match req.source {
            Some(pb::restore_request::Source::Path(ref p)) if req.as_job => {
                let ctx = OpContext::new().with_cancel(cancel.clone());
                let (path, _held) = held(p)?;
                return self.restore_as_new_job(caller, &req, path, options, &ctx);
            }
            Some(pb::restore_request::Source::Path(ref p)) => {
                let (path, h) = held(p)?;
                (path, None, h)
            }
            Some(pb::restore_request::Source::Jid(ref jid)) => {
                let job = self.get_job(caller, jid)?;
                if job.state == JobState::Running && cedana::procfs::stat(job.pid).is_ok() {
                    return Err(status(ErrorKind::FailedPrecondition, format!("job {jid} is running: dump it first")));
                }
                let latest = self.store.latest_checkpoint(jid).map_err(lib_err!())?.ok_or_else(|| {
                    status(ErrorKind::FailedPrecondition, format!("job {jid} has no checkpoint: dump it first"))
                })?;
                let (path, h) = held(&latest.path.display().to_string())?;
                (path, Some(job), h)
            }
            None => return Err(status(ErrorKind::InvalidArgument, "nothing to restore: give a path or a job id")),
        };
        let ctx = OpContext::new().with_cancel(cancel.clone());
        let result = match job {
            Some(job) if job.kind == JobKind::Runc => self.restore_container_job(job, path, options, &req, &ctx),
            Some(job) if job.kind == JobKind::Containerd => {
                self.restore_containerd_job(job, path, req.lazy, req.skip_gpu_check, req.attachable)
            }
            job => self.restore_process(&req, job, path, options, &ctx),
        };
        if result.is_err() && cancel.is_cancelled() {
            tracing::warn!(source = ?req.source, "restore cancelled: its client went away");
        }
        result
    }

    /// Restore the checkpoint at `path` as a new process job of this node: its command line, working folder
    /// and origin (node, job, checkpoint id, when the checkpoint records them) come from the checkpoint, its
    /// id from the request, else from the origin, else a new one. A failed restore leaves no job behind.
    fn restore_as_new_job(
        &self,
        caller: &Caller,
        req: &pb::RestoreRequest,
        path: String,
        options: cedana::criu::options::CriuOptions,
        ctx: &OpContext,
    ) -> Result<pb::RestoreResponse, Status> {
        let source = Source::parse(&path);
        let read = |name: &str| source.read_entry(self.engine.config(), name).map_err(|e| status(e.kind(), &e));
        let manifest = source.read_manifest(self.engine.config()).map_err(|e| status(e.kind(), &e))?;
        if manifest.kind != CheckpointKind::Process {
            return Err(status(
                ErrorKind::Unimplemented,
                format!("{path} holds a {} checkpoint: restore it with `cedana restore {}` (only process checkpoints become new jobs so far)", manifest.kind, manifest.kind),
            ));
        }
        let origin: Option<Origin> = read(ORIGIN_FILE)?.and_then(|b| serde_json::from_slice(&b).ok());
        let wanted = match req.new_jid.is_empty() {
            true => origin.as_ref().and_then(|o| o.job.clone()).unwrap_or_default(),
            false => req.new_jid.clone(),
        };
        let jid = self.new_jid(&wanted)?;
        if self.store.contains(&jid).map_err(lib_err!())? {
            return Err(status(
                ErrorKind::AlreadyExists,
                format!("job {jid} exists on this node: give the restored job another id"),
            ));
        }
        let mut job = Job {
            cwd: Some(PathBuf::from(&manifest.process.cwd)),
            log: (!req.log.is_empty()).then(|| PathBuf::from(&req.log)),
            origin,
            owner: caller.uid,
            ..Job::new(jid.clone(), JobKind::Process, 0, manifest.process.cmdline.clone())
        };
        job.state = JobState::Halted;
        self.store.insert(&job).map_err(lib_err!())?;
        tracing::info!(jid = %jid, path = %path, origin = ?job.origin, "restoring a checkpoint as a new job");
        let result = self.restore_process(req, Some(job), path, options, ctx);
        if result.is_err() {
            let _ = self.store.delete(&jid);
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
            stream: req.stream,
            lazy: req.lazy,
            lazy_fallback: req.lazy_fallback,
            skip_gpu_check: req.skip_gpu_check,
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
        let registering = self.registering();
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
                drop(registering);
                Some(self.job_reply(&job)?)
            }
            None => None,
        };
        Ok(pb::RestoreResponse {
            pid: out.pid,
            job,
            verify_time_us: out.verify_time.as_micros() as u64,
            criu_time_us: out.criu_time.as_micros() as u64,
            lazy_time_us: out.lazy.map(|l| l.time.as_micros() as u64).unwrap_or(0),
            lazy_pages: out.lazy.map(|l| l.pages).unwrap_or(0),
        })
    }

    /// Restore a runc job from its latest checkpoint (`path`): the same container id and runc root, the
    /// bundle the checkpoint's manifest records, detached; then supervise the new init.
    fn restore_container_job(
        &self,
        mut job: Job,
        path: String,
        options: cedana::criu::options::CriuOptions,
        req: &pb::RestoreRequest,
        ctx: &OpContext,
    ) -> Result<pb::RestoreResponse, Status> {
        let attach = req.attachable;
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
            Some(p) => ([p.stdin, p.stdout, p.stderr], Some(p.handle)),
            None => {
                let null = || std::fs::File::options().read(true).write(true).open("/dev/null").map(OwnedFd::from);
                let null = |_| null().map_err(|e| status(ErrorKind::Internal, format!("opening /dev/null: {e}")));
                ([null(0)?, null(1)?, null(2)?], None)
            }
        };
        let runc = Runc::locate(root.clone()).map_err(lib_err!())?;
        let runtime: Arc<dyn ContainerRuntime> = Arc::new(runc.clone());
        let rreq = RestoreRequest {
            only: Some(CheckpointKind::Runc),
            options,
            container: Some(ContainerRestore {
                id: id.clone(),
                runtime: Some(runtime),
                root,
                flags: RestoreFlags { bundle: bundle.clone(), detach: true, stdio: Some(Arc::new(stdio)), ..Default::default() },
            }),
            lazy: req.lazy,
            lazy_fallback: req.lazy_fallback,
            skip_gpu_check: req.skip_gpu_check,
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
            lazy_time_us: out.lazy.map(|l| l.time.as_micros() as u64).unwrap_or(0),
            lazy_pages: out.lazy.map(|l| l.pages).unwrap_or(0),
        })
    }
}

impl Service {
    /// Restore a containerd job from its latest checkpoint (`path`) in place: its stopped task and container
    /// are replaced (its snapshot, with what the program wrote, is kept) by one on our shim, which restores
    /// the checkpoint; then the new init is supervised.
    fn restore_containerd_job(
        &self,
        mut job: Job,
        path: String,
        lazy: bool,
        skip_gpu_check: bool,
        attachable: bool,
    ) -> Result<pb::RestoreResponse, Status> {
        let id = job
            .container_id
            .clone()
            .ok_or_else(|| status(ErrorKind::FailedPrecondition, format!("containerd job {} has no container id", job.jid)))?;
        let client = containerd_client(&job)?;
        let started = std::time::Instant::now();
        let checkpoint = Source::parse(&path);
        // An attachable job gets new FIFOs (clients attach again); otherwise the output goes on in the job's
        // log (the shim opens it for the restored task).
        job.attachable |= attachable;
        let fifos = match job.attachable {
            true => Some(self.supervisor.prepare_fifos(&self.io_dir(&job.jid), job.log.as_deref()).map_err(lib_err!())?),
            false => None,
        };
        let stdio = match (&fifos, &job.log) {
            (Some(f), _) => {
                let [stdin, stdout, stderr] = f.paths();
                Stdio { stdin, stdout, stderr }
            }
            (None, Some(log)) => {
                Stdio { stdin: String::new(), stdout: log.display().to_string(), stderr: log.display().to_string() }
            }
            (None, None) => Stdio::default(),
        };
        let spec = RestoreSpec {
            checkpoint: &checkpoint,
            config: self.engine.config(),
            lazy,
            skip_gpu_check,
            id: &id,
            image: None,
            runtime: CEDANA_RUNTIME,
            replace_stopped: true,
            stdio,
        };
        tracing::info!(path = %path, jid = %job.jid, container = %id, "restore requested");
        let restored = restore_container(&client, spec).map_err(lib_err!())?;
        let pid = restored.pid as i32;
        job.pid = pid;
        job.state = JobState::Running;
        job.exit_code = None;
        job.restored_from = Some(path);
        self.store.update(&job).map_err(lib_err!())?;
        let supervised = match fifos {
            // The task runs: its shim holds the far ends of the FIFOs.
            Some(fifos) => self.supervisor.attach_restored(fifos.opened(), pid, false),
            None => self.supervise(pid, None),
        };
        self.record_supervision(&job, supervised)?;
        tracing::info!(jid = %job.jid, pid, container = %id, "containerd job restored");
        Ok(pb::RestoreResponse {
            pid,
            job: Some(self.job_reply(&job)?),
            // The shim verifies and restores (through cedana-runc) out of our sight: the whole containerd
            // restore (task creation, where that happens, and start) stands for the CRIU phase.
            verify_time_us: 0,
            criu_time_us: started.elapsed().as_micros() as u64,
            ..Default::default()
        })
    }
}

/// The engine's target for a running job, and what to attach to its checkpoint (a containerd container's
/// record, and its writable layer with `rootfs`).
fn job_target(job: &Job, rootfs: bool) -> Result<(TargetSpec, Vec<Attachment>), Status> {
    let container_id = || {
        job.container_id
            .clone()
            .ok_or_else(|| status(ErrorKind::FailedPrecondition, format!("job {} has no container id", job.jid)))
    };
    match job.kind {
        JobKind::Process => Ok((TargetSpec::Process { pid: job.pid }, Vec::new())),
        JobKind::Runc => {
            let spec = RuncSpec {
                id: container_id()?,
                runtime: None,
                root: job.runtime_root.clone(),
                work_path: None,
                extra_flags: Vec::new(),
            };
            Ok((TargetSpec::Runc(spec), Vec::new()))
        }
        JobKind::Containerd => {
            let client = containerd_client(job)?;
            let prepared = prepare_dump(&client, &container_id()?, rootfs).map_err(lib_err!())?;
            Ok((TargetSpec::Runc(prepared.spec), prepared.attachments))
        }
    }
}

/// A client of the containerd a containerd job runs on (its socket and namespace).
fn containerd_client(job: &Job) -> Result<Client, Status> {
    let address = job.runtime_root.clone().unwrap_or_else(|| cedana_protos::containerd::DEFAULT_ADDRESS.into());
    let namespace = job.namespace.clone().unwrap_or_else(|| cedana_protos::containerd::DEFAULT_NAMESPACE.into());
    Client::connect(&address, &namespace).map_err(lib_err!())
}

fn checkpoint_kind(kind: JobKind) -> CheckpointKind {
    match kind {
        JobKind::Process => CheckpointKind::Process,
        JobKind::Runc => CheckpointKind::Runc,
        JobKind::Containerd => CheckpointKind::Containerd,
    }
}
