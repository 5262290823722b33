//! The daemon's gRPC service: a thin mapping of each call onto the job store, the supervisor and the
//! engine. Engine operations block (CRIU), so they run on tokio's blocking pool; errors become statuses by
//! their kind.
//!
//! This module holds the shared state and helpers and maps each call of the API onto a method of
//! [`Service`]; the calls themselves live in the sibling modules: `run` (new jobs), `manage` (adopting
//! running or upcoming workloads), `checkpoint` (dump and restore), `jobs` (list, inspect, kill, delete,
//! checkpoints), `health` (check) and `attach`.
//!
//! # Calls whose client goes away
//! Dump, restore and manage (which may wait for an upcoming process or container) run with a
//! [`Cancel`] token that is cancelled when tonic drops the call's future, which it does when the client
//! disconnects (a CLI interrupted with Ctrl+C) or resets the stream. The blocking work is not abandoned: it
//! sees the token at its next safe point, and a dump then rolls back (the workload runs on, nothing is
//! written), a restore stops before anything is restored, and a wait for an upcoming workload ends.

use std::path::PathBuf;

use cedana::cancel::Cancel;
use cedana::engine::Engine;
use cedana::error::ErrorKind;
use cedana::jobs::attach::RestoreHandle;
use cedana::jobs::model::{Job, JobState};
use cedana::jobs::store::JobStore;
use cedana::jobs::supervisor::{Supervisor, SupervisorError};
use cedana::runc::Runc;
use cedana_protos::v1 as pb;
use tonic::{Request, Response, Status};

use super::access::Caller;
use super::convert::{job_to_pb, status};

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
    /// Held from a job's process starting (or being restored) until the store records it running, and by
    /// [`follow_exits`] for each exit it handles: a process that exits at once is not missed.
    pub registering: Registering,
}

/// See [`Service::registering`].
pub type Registering = std::sync::Arc<std::sync::Mutex<()>>;

impl Service {
    /// Hold off exit handling while a new or restored job's process is being recorded.
    pub(super) fn registering(&self) -> std::sync::MutexGuard<'_, ()> {
        self.registering.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
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

pub(super) fn err<E: std::fmt::Display>(kind: ErrorKind) -> impl FnOnce(E) -> Status {
    move |e| status(kind, e)
}

macro_rules! lib_err {
    () => {
        |e| status(e.kind(), &e)
    };
}
pub(super) use lib_err;

/// Run blocking work (the store, the engine) off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, Status> + Send + 'static) -> Result<T, Status> {
    tokio::task::spawn_blocking(f).await.map_err(err(ErrorKind::Internal))?
}

impl Service {
    pub(super) fn job_reply(&self, job: &Job) -> Result<pb::Job, Status> {
        let latest = self.store.latest_checkpoint(&job.jid).map_err(lib_err!())?;
        Ok(job_to_pb(job, latest.as_ref()))
    }

    /// The job `jid`, if `caller` may act on it.
    pub(super) fn get_job(&self, caller: &Caller, jid: &str) -> Result<Job, Status> {
        if jid.is_empty() {
            return Err(status(ErrorKind::InvalidArgument, "no job id given"));
        }
        let job = self.store.get(jid).map_err(lib_err!())?;
        caller.check_job(&job)?;
        Ok(job)
    }

    pub(super) fn new_jid(&self, wanted: &str) -> Result<String, Status> {
        if wanted.is_empty() {
            return cedana::jobs::names::unique_jid(&self.store).map_err(lib_err!());
        }
        if wanted.contains('/') || wanted.starts_with('.') || wanted.chars().any(char::is_whitespace) {
            return Err(status(ErrorKind::InvalidArgument, format!("invalid job id {wanted:?}: no '/', spaces or leading '.'")));
        }
        Ok(wanted.to_string())
    }

    /// Supervise `pid`: adopted as our child when it is one (the init of a container runc started or
    /// restored detached is re-parented to the daemon, a subreaper, once runc exits), else watched. With
    /// `handle`, its pipes are connected to a new output hub. Call it inside the fork scope of the
    /// operation that created the process.
    pub(super) fn supervise(&self, pid: i32, handle: Option<RestoreHandle>) -> Result<u64, SupervisorError> {
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
    pub(super) fn record_supervision(&self, job: &Job, supervised: Result<u64, SupervisorError>) -> Result<(), Status> {
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
}

impl Service {
    /// Answer a call with `f` on tokio's blocking pool.
    async fn answer<Q: Send + 'static, T: Send + 'static>(
        &self,
        request: Request<Q>,
        f: fn(&Service, &Caller, Q) -> Result<T, Status>,
    ) -> Reply<T> {
        let s = self.clone();
        let caller = Caller::of(&request);
        let req = request.into_inner();
        blocking(move || f(&s, &caller, req)).await.map(Response::new)
    }

    /// Answer a call with `f` on tokio's blocking pool, cancelling its token when the call's future is
    /// dropped before `f` is done (the client went away). `f` itself runs to its end either way.
    async fn answer_cancellable<Q: Send + 'static, T: Send + 'static>(
        &self,
        call: &'static str,
        request: Request<Q>,
        f: fn(&Service, &Caller, Q, &Cancel) -> Result<T, Status>,
    ) -> Reply<T> {
        let s = self.clone();
        let caller = Caller::of(&request);
        let req = request.into_inner();
        let cancel = Cancel::new();
        let mut guard = CancelOnDrop { cancel: cancel.clone(), call, done: false };
        let result = blocking(move || {
            let result = f(&s, &caller, req, &cancel);
            release_memory();
            result
        })
        .await;
        guard.done = true;
        result.map(Response::new)
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
        self.answer(request, |s, _, _| Ok(s.check())).await
    }
}

/// Give the memory an operation freed back to the system. glibc keeps freed buffers in its arenas (one per
/// thread that allocated, up to 8 per core) and raises its mapping threshold with each large free, so a
/// long-lived daemon that ran many dumps at once would keep their high-water mark resident (230 MB after 50
/// concurrent dumps of small processes, growing over a soak); trimmed after each dump, restore and manage, it
/// stays flat. Done after the operation, not during it: its buffers are reused while it runs.
fn release_memory() {
    // SAFETY: malloc_trim only returns free memory of the allocator's arenas to the system.
    unsafe {
        libc::malloc_trim(0);
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

/// runc with its state under `root` (runc's default when empty).
pub(super) fn runc_at(root: &str) -> Result<Runc, Status> {
    Runc::locate((!root.is_empty()).then(|| PathBuf::from(root))).map_err(lib_err!())
}

/// Keeps the store in step with what the supervisor sees: a job that exits by itself is `exited` (with its
/// code); one a dump ended stays `halted`.
pub fn follow_exits(
    store: JobStore,
    serials: Serials,
    registering: Registering,
    events: std::sync::mpsc::Receiver<cedana::jobs::supervisor::JobEvent>,
) {
    for event in events {
        // A job whose process is being recorded is in the store, running, once this is ours.
        let _registered = registering.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
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
