//! Looking after recorded jobs: `list`, `inspect`, `kill`, `delete` and a job's `checkpoints`.

use std::path::Path;

use cedana::error::ErrorKind;
use cedana::jobs::model::{JobKind, JobState};
use cedana::runc::Runc;
use cedana_protos::v1 as pb;
use tonic::Status;

use super::access::Caller;
use super::convert::{checkpoint_to_pb, job_to_pb, status};
use super::service::{lib_err, Service};

impl Service {
    pub(super) fn list(&self, caller: &Caller, _req: pb::ListRequest) -> Result<pb::JobList, Status> {
        let mut jobs = self.store.list().map_err(lib_err!())?;
        jobs.retain(|j| caller.sees(j));
        let latest = self.store.latest_checkpoints().map_err(lib_err!())?;
        Ok(pb::JobList { jobs: jobs.iter().map(|j| job_to_pb(j, latest.get(&j.jid))).collect() })
    }

    pub(super) fn inspect(&self, caller: &Caller, req: pb::JobRef) -> Result<pb::Job, Status> {
        self.get_job(caller, &req.jid).and_then(|j| self.job_reply(&j))
    }

    pub(super) fn kill(&self, caller: &Caller, req: pb::KillRequest) -> Result<pb::Job, Status> {
        let job = self.get_job(caller, &req.jid)?;
        if job.state != JobState::Running {
            return Err(status(ErrorKind::FailedPrecondition, format!("job {} is {}, not running", job.jid, job.state)));
        }
        let sig = if req.signal == 0 { libc::SIGKILL } else { req.signal };
        self.supervisor.signal(job.pid, sig).map_err(lib_err!())?;
        self.job_reply(&job)
    }

    pub(super) fn delete(&self, caller: &Caller, req: pb::JobRef) -> Result<pb::Job, Status> {
        let job = self.get_job(caller, &req.jid)?;
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
        if job.kind == JobKind::Containerd && job.attachable {
            let _ = std::fs::remove_dir_all(self.io_dir(&job.jid));
        }
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

    pub(super) fn checkpoints(&self, caller: &Caller, req: pb::JobRef) -> Result<pb::CheckpointList, Status> {
        self.get_job(caller, &req.jid)?;
        let list = self.store.checkpoints(&req.jid).map_err(lib_err!())?;
        Ok(pb::CheckpointList { checkpoints: list.iter().map(checkpoint_to_pb).collect() })
    }
}
