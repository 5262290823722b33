//! The daemon's gRPC service: a thin mapping of each call onto the job store, the supervisor and the
//! engine. Engine operations block (CRIU), so they run on tokio's blocking pool; errors become statuses by
//! their kind.

use std::path::PathBuf;

use cedana::checkpoint::CheckpointKind;
use cedana::engine::{
    dump::{default_name, free_name},
    Destination, DumpRequest, Engine, OpContext, ProcessRestoreOptions, RestoreRequest, RestoreStdio, Source, TargetSpec,
};
use cedana::error::ErrorKind;
use cedana::jobs::model::{CheckpointRecord, Job, JobKind, JobState};
use cedana::jobs::store::JobStore;
use cedana::jobs::supervisor::{Output, SpawnSpec, Supervisor};
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
        if req.r#type() != pb::JobType::Process && req.r#type() != pb::JobType::Unspecified {
            return Err(status(ErrorKind::Unimplemented, "only process jobs can be run yet"));
        }
        if req.args.is_empty() {
            return Err(status(ErrorKind::InvalidArgument, "no program given: cedana run process -- PROGRAM ARGS..."));
        }
        let jid = self.new_jid(&req.jid)?;
        if self.store.contains(&jid).map_err(lib_err!())? {
            return Err(status(ErrorKind::AlreadyExists, format!("job {jid} exists already")));
        }
        let log =
            if req.log.is_empty() { self.log_dir.join(format!("cedana-output-{jid}.log")) } else { PathBuf::from(&req.log) };
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

    fn manage(&self, req: pb::ManageRequest) -> Result<pb::Job, Status> {
        if req.r#type() != pb::JobType::Process && req.r#type() != pb::JobType::Unspecified {
            return Err(status(ErrorKind::Unimplemented, "only processes can be managed yet"));
        }
        if req.upcoming {
            return Err(status(ErrorKind::Unimplemented, "managing upcoming processes is not built yet"));
        }
        let pid = req.pid;
        cedana::procfs::stat(pid).map_err(lib_err!())?;
        if let Some(j) = self.store.find_by_pid(pid).map_err(lib_err!())? {
            return Err(status(ErrorKind::AlreadyExists, format!("PID {pid} is job {} already", j.jid)));
        }
        let info = cedana::procfs::describe(pid).map_err(lib_err!())?;
        let jid = self.new_jid(&req.jid)?;
        let job = Job {
            jid,
            kind: JobKind::Process,
            pid,
            state: JobState::Running,
            exit_code: None,
            args: info.cmdline,
            cwd: Some(PathBuf::from(info.cwd)),
            log: None,
            attachable: false,
            gpu: false,
            created_at: chrono::Utc::now().timestamp(),
            container_id: None,
            runtime_root: None,
            restored_from: None,
        };
        self.store.insert(&job).map_err(lib_err!())?;
        let serial = self.supervisor.watch(pid).map_err(lib_err!())?;
        track(&self.serials, pid, serial);
        self.job_reply(&job)
    }

    fn dump(&self, req: pb::DumpRequest) -> Result<pb::DumpResponse, Status> {
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
                (TargetSpec::Process { pid: job.pid }, Some(job))
            }
            Some(pb::dump_request::Target::RuncId(_)) => {
                return Err(status(ErrorKind::Unimplemented, "dumping runc containers through the daemon is not built yet"))
            }
            None => return Err(status(ErrorKind::InvalidArgument, "nothing to dump: give a PID or a job id")),
        };
        let name = name.or_else(|| {
            job.as_ref().map(|j| free_name(&destination, &default_name(CheckpointKind::Process, &j.jid), compression))
        });
        tracing::info!(target = ?target, job = ?job.as_ref().map(|j| &j.jid), "dump requested");
        let dreq = DumpRequest { target, destination, name, compression, leave_running, options };
        // The job is marked before CRIU ends it, so its exit is not taken for a crash.
        if let (Some(job), false) = (&job, leave_running) {
            self.store.set_state(&job.jid, JobState::Halted, None).map_err(lib_err!())?;
        }
        // CRIU and runc are children of ours that the engine waits for: keep the orphan sweeper off them.
        let _scope = self.supervisor.fork_scope();
        let out = match self.engine.dump(dreq, &OpContext::new()) {
            Ok(out) => out,
            Err(e) => {
                if let (Some(job), false) = (&job, leave_running) {
                    // The workload is running again (the engine rolled back).
                    let _ = self.store.set_state(&job.jid, JobState::Running, None);
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

    fn restore(&self, req: pb::RestoreRequest) -> Result<pb::RestoreResponse, Status> {
        let (options, _) = criu_from_pb(req.criu.as_ref());
        let (path, job) = match req.source {
            Some(pb::restore_request::Source::Path(p)) => (p, None),
            Some(pb::restore_request::Source::Jid(jid)) => {
                let job = self.get_job(&jid)?;
                if job.state == JobState::Running && cedana::procfs::stat(job.pid).is_ok() {
                    return Err(status(ErrorKind::FailedPrecondition, format!("job {jid} is running: dump it first")));
                }
                let latest = self.store.latest_checkpoint(&jid).map_err(lib_err!())?.ok_or_else(|| {
                    status(ErrorKind::FailedPrecondition, format!("job {jid} has no checkpoint: dump it first"))
                })?;
                (latest.path.display().to_string(), Some(job))
            }
            None => return Err(status(ErrorKind::InvalidArgument, "nothing to restore: give a path or a job id")),
        };
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
        // The scope also covers the restored root until the supervisor has adopted it.
        let scope = self.supervisor.fork_scope();
        // The request (and with it our copies of the child's ends of the pipes) is dropped once CRIU is done.
        let out = self.engine.restore(rreq, &OpContext::new()).map_err(|e| status(e.kind(), &e))?;
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
        // Its output hub (for attachable jobs) goes with it, so a later process with the same PID gets none.
        self.supervisor.release(job.pid);
        Ok(reply)
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
        self.answer(request, Service::manage).await
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
        self.answer(request, Service::dump).await
    }

    async fn restore(&self, request: Request<pb::RestoreRequest>) -> Reply<pb::RestoreResponse> {
        self.answer(request, Service::restore).await
    }

    type AttachStream = super::attach::AttachStream;

    async fn attach(&self, request: Request<tonic::Streaming<pb::AttachInput>>) -> Reply<Self::AttachStream> {
        super::attach::serve(self.clone(), request).await
    }

    async fn check(&self, request: Request<pb::CheckRequest>) -> Reply<pb::CheckResponse> {
        self.answer(request, |s, _| Ok(s.check())).await
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
