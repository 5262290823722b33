//! Between the wire (the generated API types) and the library: jobs, checkpoints, CRIU options, errors.

use cedana::criu::options::CriuOptions;
use cedana::error::ErrorKind;
use cedana::jobs::model::{CheckpointRecord, Job, JobKind, JobState};
use cedana_protos::v1 as pb;

/// A gRPC status for an error of the library, by its kind.
pub fn status(kind: ErrorKind, message: impl std::fmt::Display) -> tonic::Status {
    let code = match kind {
        ErrorKind::NotFound => tonic::Code::NotFound,
        ErrorKind::InvalidArgument => tonic::Code::InvalidArgument,
        ErrorKind::FailedPrecondition => tonic::Code::FailedPrecondition,
        ErrorKind::AlreadyExists => tonic::Code::AlreadyExists,
        ErrorKind::ResourceExhausted => tonic::Code::ResourceExhausted,
        ErrorKind::Unavailable => tonic::Code::Unavailable,
        ErrorKind::Cancelled => tonic::Code::Cancelled,
        ErrorKind::Unimplemented => tonic::Code::Unimplemented,
        ErrorKind::PermissionDenied => tonic::Code::PermissionDenied,
        ErrorKind::Internal => tonic::Code::Internal,
    };
    tonic::Status::new(code, message.to_string())
}

/// The library's error kind for a gRPC status (the other way, for the CLI).
pub fn kind_of(code: tonic::Code) -> ErrorKind {
    match code {
        tonic::Code::NotFound => ErrorKind::NotFound,
        tonic::Code::InvalidArgument => ErrorKind::InvalidArgument,
        tonic::Code::FailedPrecondition => ErrorKind::FailedPrecondition,
        tonic::Code::AlreadyExists => ErrorKind::AlreadyExists,
        tonic::Code::ResourceExhausted => ErrorKind::ResourceExhausted,
        tonic::Code::Unavailable => ErrorKind::Unavailable,
        tonic::Code::Cancelled => ErrorKind::Cancelled,
        tonic::Code::Unimplemented => ErrorKind::Unimplemented,
        tonic::Code::PermissionDenied => ErrorKind::PermissionDenied,
        _ => ErrorKind::Internal,
    }
}

pub fn kind_to_pb(kind: JobKind) -> pb::JobType {
    match kind {
        JobKind::Process => pb::JobType::Process,
        JobKind::Runc => pb::JobType::Runc,
        JobKind::Containerd => pb::JobType::Containerd,
    }
}

pub fn state_to_pb(state: JobState) -> pb::JobState {
    match state {
        JobState::Running => pb::JobState::Running,
        JobState::Exited => pb::JobState::Exited,
        JobState::Halted => pb::JobState::Halted,
        JobState::Lost => pb::JobState::Lost,
    }
}

pub fn checkpoint_to_pb(c: &CheckpointRecord) -> pb::Checkpoint {
    pb::Checkpoint {
        id: c.id.clone(),
        jid: c.jid.clone(),
        time: c.time,
        size: c.size,
        path: c.path.display().to_string(),
        compression: c.compression.clone(),
    }
}

/// What `ps` shows in STATUS: the process's state from /proc while it runs, else the job's state.
fn live_status(job: &Job) -> String {
    if job.state != JobState::Running {
        return job.state.to_string();
    }
    match cedana::procfs::stat(job.pid) {
        Ok(st) => match st.state {
            'R' => "running",
            'S' | 'D' | 'I' => "sleep",
            'T' | 't' => "stopped",
            'Z' => "zombie",
            _ => "running",
        }
        .to_string(),
        Err(_) => "exiting".to_string(),
    }
}

/// Whether a running job's tree uses a GPU now (a CUDA process in it); the `GPU` column of `cedana ps`.
fn uses_gpu_now(job: &Job) -> bool {
    job.state == JobState::Running && job.pid > 0 && !cedana::gpu::detect::gpu_processes(job.pid).is_empty()
}

pub fn job_to_pb(job: &Job, latest: Option<&CheckpointRecord>) -> pb::Job {
    pb::Job {
        jid: job.jid.clone(),
        r#type: kind_to_pb(job.kind) as i32,
        pid: job.pid,
        state: state_to_pb(job.state) as i32,
        status: live_status(job),
        gpu: job.gpu || uses_gpu_now(job),
        latest_checkpoint: latest.map(checkpoint_to_pb),
        log: job.log.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
        attachable: job.attachable,
        exit_code: job.exit_code,
        args: job.args.clone(),
        created_at: job.created_at,
        container_id: job.container_id.clone().unwrap_or_default(),
        runtime_root: job.runtime_root.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
        restored_from: job.restored_from.clone().unwrap_or_default(),
        origin_node: job.origin.as_ref().map(|o| o.node.clone()).unwrap_or_default(),
        origin_job: job.origin.as_ref().and_then(|o| o.job.clone()).unwrap_or_default(),
        origin_checkpoint: job.origin.as_ref().and_then(|o| o.checkpoint.clone()).unwrap_or_default(),
    }
}

pub fn criu_from_pb(o: Option<&pb::CriuOptions>) -> (CriuOptions, bool) {
    let Some(o) = o else { return (CriuOptions::default(), false) };
    let options = CriuOptions {
        tcp_established: o.tcp_established,
        tcp_close: o.tcp_close,
        skip_in_flight: o.skip_in_flight,
        file_locks: o.file_locks,
        shell_job: o.shell_job,
        ext_unix_sk: o.ext_unix_sk,
        link_remap: o.link_remap,
        external: o.external.clone(),
        inherit_fd: o.inherit_fd.clone(),
        extra: o.extra.clone(),
        ghost_limit: o.ghost_limit.clone(),
        network_lock: o.network_lock.clone(),
        manage_cgroups: o.manage_cgroups.clone(),
        timeout: o.timeout,
        evasive_devices: o.evasive_devices,
    };
    (options, o.leave_running)
}

pub fn criu_to_pb(o: &CriuOptions, leave_running: bool) -> pb::CriuOptions {
    pb::CriuOptions {
        leave_running,
        tcp_established: o.tcp_established,
        tcp_close: o.tcp_close,
        skip_in_flight: o.skip_in_flight,
        file_locks: o.file_locks,
        shell_job: o.shell_job,
        ext_unix_sk: o.ext_unix_sk,
        link_remap: o.link_remap,
        evasive_devices: o.evasive_devices,
        external: o.external.clone(),
        inherit_fd: o.inherit_fd.clone(),
        extra: o.extra.clone(),
        ghost_limit: o.ghost_limit.clone(),
        network_lock: o.network_lock.clone(),
        manage_cgroups: o.manage_cgroups.clone(),
        timeout: o.timeout,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_its_code_and_back() {
        for kind in [
            ErrorKind::NotFound,
            ErrorKind::InvalidArgument,
            ErrorKind::FailedPrecondition,
            ErrorKind::AlreadyExists,
            ErrorKind::ResourceExhausted,
            ErrorKind::Unavailable,
            ErrorKind::Cancelled,
            ErrorKind::Unimplemented,
            ErrorKind::Internal,
        ] {
            let s = status(kind, "x");
            assert_eq!(s.code() as i32, kind.code(), "{kind}");
            assert_eq!(kind_of(s.code()), kind);
        }
    }

    #[test]
    fn criu_options_cross_the_wire_unchanged() {
        let o = CriuOptions {
            tcp_established: true,
            ghost_limit: Some("1M".into()),
            external: vec!["x".into()],
            ..Default::default()
        };
        let (back, leave) = criu_from_pb(Some(&criu_to_pb(&o, true)));
        assert_eq!(back, o);
        assert!(leave);
    }
}
