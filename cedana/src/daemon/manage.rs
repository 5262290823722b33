//! Adopting workloads already running (`manage`): a process by PID or command name, a runc container, or a
//! containerd container, any of which may be waited for when upcoming.

use std::path::PathBuf;
use std::time::Duration;

use cedana::cancel::Cancel;
use cedana::error::ErrorKind;
use cedana::jobs::model::{Job, JobKind};
use cedana::runc::{ContainerState, Runc, RuncError};
use cedana_protos::v1 as pb;
use tonic::Status;

use crate::containerd::Client;
use cedana_protos::containerd::task::Status as TaskStatus;

use super::access::Caller;
use super::convert::status;
use super::service::{err, lib_err, runc_at, Service};

impl Service {
    pub(super) fn manage(&self, caller: &Caller, req: pb::ManageRequest, cancel: &Cancel) -> Result<pb::Job, Status> {
        match super::run::job_type(req.r#type)? {
            pb::JobType::Process | pb::JobType::Unspecified => self.manage_process(caller, req, cancel),
            pb::JobType::Runc => caller.only_root("managing a runc container").and_then(|_| self.manage_runc(req, cancel)),
            pb::JobType::Containerd => {
                caller.only_root("managing a containerd container").and_then(|_| self.manage_containerd(req, cancel))
            }
        }
    }

    fn manage_process(&self, caller: &Caller, req: pb::ManageRequest, cancel: &Cancel) -> Result<pb::Job, Status> {
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
        caller.check_tree(pid)?;
        if let Some(j) = self.store.find_by_pid(pid).map_err(lib_err!())? {
            return Err(status(ErrorKind::AlreadyExists, format!("PID {pid} is job {} already", j.jid)));
        }
        let info = cedana::procfs::describe(pid).map_err(lib_err!())?;
        let jid = self.new_jid(&req.jid)?;
        let job =
            Job { cwd: Some(PathBuf::from(info.cwd)), owner: caller.uid, ..Job::new(jid, JobKind::Process, pid, info.cmdline) };
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
        let mut pids = cedana::procfs::pids()
            .ok_or_else(|| std::io::Error::other("/proc cannot be read"))
            .map_err(err(ErrorKind::Internal))?;
        pids.retain(|pid| *pid != me);
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
}

impl Service {
    /// Adopt a containerd container (by its task's init; waiting until the task runs, for an upcoming one).
    fn manage_containerd(&self, req: pb::ManageRequest, cancel: &Cancel) -> Result<pb::Job, Status> {
        let id = req.container_id.clone();
        if id.is_empty() {
            return Err(status(ErrorKind::InvalidArgument, "no container id given: cedana manage containerd ID"));
        }
        let address = match req.runtime_root.as_str() {
            "" => PathBuf::from(cedana_protos::containerd::DEFAULT_ADDRESS),
            a => PathBuf::from(a),
        };
        let namespace = match req.namespace.as_str() {
            "" => cedana_protos::containerd::DEFAULT_NAMESPACE.to_string(),
            n => n.to_string(),
        };
        let client = Client::connect(&address, &namespace).map_err(lib_err!())?;
        let running = |client: &Client| -> Result<Option<u32>, Status> {
            match client.task(&id) {
                Ok(Some(t)) if t.status == TaskStatus::Running as i32 && t.pid > 0 => Ok(Some(t.pid)),
                Ok(_) => Ok(None),
                Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
                Err(e) => Err(status(e.kind(), &e)),
            }
        };
        let pid = if req.upcoming {
            wait_until(&format!("containerd container {id} (namespace {namespace})"), cancel, || running(&client))?
        } else {
            client.container(&id).map_err(lib_err!())?;
            running(&client)?.ok_or_else(|| {
                status(ErrorKind::FailedPrecondition, format!("container {id} has no running task: nothing to manage"))
            })?
        } as i32;
        if let Some(j) = self.store.find_by_pid(pid).map_err(lib_err!())? {
            return Err(status(ErrorKind::AlreadyExists, format!("container {id} (PID {pid}) is job {} already", j.jid)));
        }
        let jid = self.new_jid(&req.jid)?;
        let args = cedana::procfs::describe(pid).map(|i| i.cmdline).unwrap_or_default();
        let job = Job {
            container_id: Some(id.clone()),
            runtime_root: Some(address.clone()),
            namespace: Some(namespace.clone()),
            ..Job::new(jid, JobKind::Containerd, pid, args)
        };
        self.store.insert(&job).map_err(lib_err!())?;
        let supervised = self.supervise(pid, None);
        self.record_supervision(&job, supervised)?;
        tracing::info!(jid = %job.jid, pid, container = %id, namespace = %namespace, address = %address.display(), "containerd container adopted");
        self.job_reply(&job)
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
