//! The orphan sweeper: reaps zombie children of this process that nobody can be waiting for, and the guards
//! that keep it away from the others ([`ForkScope`], [`Exclusion`]); see the documentation of
//! [`super`](crate::jobs::supervisor) for the rules.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::sync::Arc;

use super::events::ExitInfo;
use super::{lock, Core};

/// Make this process a child subreaper: orphaned descendants are re-parented to it (and must be reaped
/// by it: see the sweeper). For the daemon's start-up; it affects the whole process.
pub fn become_subreaper() -> io::Result<()> {
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes plain integer arguments and touches no memory of ours.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A section during which children forked by this process are safe from the sweeper (see the module
/// documentation). Dropping it ends the section.
pub struct ForkScope {
    core: Arc<Core>,
    id: u64,
}

impl ForkScope {
    /// Open a scope at the current sweep epoch.
    pub(super) fn open(core: &Arc<Core>) -> ForkScope {
        let mut st = lock(&core.state);
        let id = st.next_scope;
        st.next_scope += 1;
        let start = st.epoch;
        st.scopes.insert(id, start);
        ForkScope { core: Arc::clone(core), id }
    }

    /// Keep the sweeper away from `pid` beyond the end of this scope (a child forked in it that the
    /// caller waits for later).
    pub fn exclude(&self, pid: i32) -> Exclusion {
        self.core.exclude(pid);
        Exclusion { core: Arc::clone(&self.core), pid }
    }
}

impl Drop for ForkScope {
    fn drop(&mut self) {
        lock(&self.core.state).scopes.remove(&self.id);
    }
}

impl std::fmt::Debug for ForkScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForkScope").field("id", &self.id).finish()
    }
}

/// While held, the sweeper never reaps this PID.
pub struct Exclusion {
    core: Arc<Core>,
    pid: i32,
}

impl Exclusion {
    /// Exclude `pid` until the guard is dropped.
    pub(super) fn new(core: &Arc<Core>, pid: i32) -> Exclusion {
        core.exclude(pid);
        Exclusion { core: Arc::clone(core), pid }
    }

    /// The excluded PID.
    pub fn pid(&self) -> i32 {
        self.pid
    }
}

impl Drop for Exclusion {
    fn drop(&mut self) {
        self.core.unexclude(self.pid);
    }
}

impl std::fmt::Debug for Exclusion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exclusion").field("pid", &self.pid).finish()
    }
}

/// Whether any child of this process is a zombie (without reaping it).
fn any_zombie_child() -> bool {
    // SAFETY: as in wait_pidfd; WNOWAIT leaves the child waitable.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid writes only into `info`.
    let rc = unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOHANG | libc::WNOWAIT) };
    // SAFETY: a SIGCHLD siginfo (or zeroed).
    rc == 0 && unsafe { info.si_pid() } != 0
}

/// The zombies whose parent is `me`, as (pid, start time).
pub(super) fn zombie_children(me: i32) -> Vec<(i32, u64)> {
    use std::io::Read;
    let mut out = Vec::new();
    let Some(pids) = crate::procfs::pids() else { return out };
    let mut buf = String::with_capacity(1024);
    for pid in pids {
        buf.clear();
        let read = File::open(format!("/proc/{pid}/stat")).and_then(|mut f| f.read_to_string(&mut buf));
        if read.is_err() {
            continue;
        }
        if let Some((state, ppid, start)) = parse_stat(&buf) {
            if ppid == me && state == 'Z' {
                out.push((pid, start));
            }
        }
    }
    out
}

/// State, parent PID and start time from a /proc/PID/stat line.
pub(super) fn parse_stat(text: &str) -> Option<(char, i32, u64)> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some((fields.first()?.chars().next()?, fields.get(1)?.parse().ok()?, fields.get(19)?.parse().ok()?))
}

impl Core {
    pub(super) fn exclude(&self, pid: i32) {
        *lock(&self.state).exclusions.entry(pid).or_insert(0) += 1;
    }

    pub(super) fn unexclude(&self, pid: i32) {
        let mut st = lock(&self.state);
        if let Some(n) = st.exclusions.get_mut(&pid) {
            *n -= 1;
            if *n == 0 {
                st.exclusions.remove(&pid);
            }
        }
    }

    /// One sweep: reap zombie children that nobody can be waiting for. Returns how many were reaped.
    pub(super) fn sweep(&self) -> usize {
        let _one_at_a_time = lock(&self.sweep_lock);
        if !any_zombie_child() {
            lock(&self.state).seen.clear();
            return 0;
        }
        let zombies = zombie_children(std::process::id() as i32);
        let mut st = lock(&self.state);
        // Every zombie in `zombies` existed before this point; a scope opened from now on has a later epoch.
        let epoch = st.epoch;
        st.epoch += 1;
        let oldest_scope = st.scopes.values().min().copied();
        let mut still = HashMap::new();
        let mut reaped = 0;
        for z in zombies {
            let first = st.seen.get(&z).copied().unwrap_or(epoch);
            let maybe_a_scopes_child = oldest_scope.is_some_and(|s| first >= s);
            if maybe_a_scopes_child || st.exclusions.contains_key(&z.0) {
                still.insert(z, first);
                continue;
            }
            let mut status = 0;
            // SAFETY: waitpid on one PID, writing only `status`; the state lock keeps exclusions from changing.
            let rc = unsafe { libc::waitpid(z.0, &mut status, libc::WNOHANG) };
            if rc == z.0 {
                tracing::debug!(pid = z.0, status = ?ExitInfo::from_wait_status(status), "reaped an orphan");
                reaped += 1;
            }
        }
        st.seen = still;
        reaped
    }
}
