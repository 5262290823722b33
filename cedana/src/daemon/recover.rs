//! Jobs a killed daemon left in the middle of an operation, put right at the next start.
//!
//! A dump marks its job `halted` before CRIU runs (so that the exit CRIU causes is not taken for a crash),
//! and a restore marks it `running` only once the restored tree is adopted. A daemon killed in between
//! leaves the store saying `halted` while the job's process runs: CRIU gave the tree back when the dump
//! could not finish, or finished the restore on its own. Such a job is re-adopted and marked `running`, as
//! a running job is at every start; a `halted` job whose process is gone stays `halted` (its checkpoint,
//! if the dump completed, is what restores it).

use cedana::jobs::model::{Job, JobState};
use cedana::jobs::store::JobStore;
use cedana::jobs::supervisor::Supervisor;

use super::service;

/// Re-adopt the `halted` jobs whose process runs (see the module's documentation).
pub(super) fn halted_but_running(store: &JobStore, supervisor: &Supervisor, serials: &service::Serials) {
    let Ok(jobs) = store.list() else { return };
    for job in jobs.into_iter().filter(|j| j.state == JobState::Halted && j.pid > 0) {
        if !runs(&job) {
            continue;
        }
        match super::supervise_again(supervisor, &job) {
            Ok(serial) => {
                service::track(serials, job.pid, serial);
                match store.set_state(&job.jid, JobState::Running, None) {
                    Ok(()) => tracing::warn!(
                        jid = %job.jid, pid = job.pid,
                        "a job marked halted runs: an operation on it was interrupted; re-adopted as running"
                    ),
                    Err(e) => tracing::error!(jid = %job.jid, error = %e, "cannot mark a re-adopted job running"),
                }
            }
            Err(e) => tracing::warn!(jid = %job.jid, pid = job.pid, error = %e, "cannot watch a job marked halted that runs"),
        }
    }
}

/// Whether the job's process is alive and is the job's (its command name matches the job's program, when
/// the job records one: a PID reused by another program does not count).
fn runs(job: &Job) -> bool {
    let Ok(stat) = cedana::procfs::stat(job.pid) else { return false };
    if stat.is_zombie() {
        return false;
    }
    match job.args.first().and_then(|a| std::path::Path::new(a).file_name()) {
        // The kernel keeps the first 15 bytes of the name.
        Some(name) => {
            let name = name.to_string_lossy();
            let short: String = name.chars().take(15).collect();
            stat.comm == short || stat.comm == *name
        }
        None => true,
    }
}
