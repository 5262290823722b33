//! Exit collection for a subreaper that never calls `waitpid(-1)`.
//!
//! Three kinds of children: commands we run (the runtime binary), which their owner waits for by PID through
//! tokio; watched processes (a container's init, which reparents to us when `runc create` exits), reaped here
//! by PID and reported once on the exit channel; and orphans reparented to us, reaped here. An exit of a PID
//! that is not watched yet is kept (a container init that dies before it is registered is not lost).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::sync::mpsc;

/// Most exits of unwatched PIDs kept for a later `watch`.
const UNCLAIMED_MAX: usize = 4096;

#[derive(Default)]
struct State {
    /// PIDs of commands whose owner waits for them (never reaped here).
    owned: HashSet<i32>,
    /// PIDs whose exit is reported on the channel.
    watched: HashSet<i32>,
    /// Exit codes of PIDs reaped before anyone watched them.
    unclaimed: HashMap<i32, i32>,
}

/// The shim's reaper; cheap to clone.
#[derive(Clone)]
pub struct Reaper {
    state: Arc<Mutex<State>>,
    exits: mpsc::UnboundedSender<(i32, i32)>,
}

/// The exit code of a wait status as containerd reports it (128 + signal when killed).
pub fn exit_code(status: WaitStatus) -> Option<(i32, i32)> {
    match status {
        WaitStatus::Exited(pid, code) => Some((pid.as_raw(), code)),
        WaitStatus::Signaled(pid, sig, _) => Some((pid.as_raw(), 128 + sig as i32)),
        _ => None,
    }
}

impl Reaper {
    /// A reaper reporting watched exits as `(pid, exit code)` on the returned channel. Call [`Reaper::run`]
    /// in a task to collect exits on SIGCHLD.
    pub fn new() -> (Reaper, mpsc::UnboundedReceiver<(i32, i32)>) {
        let (exits, rx) = mpsc::unbounded_channel();
        (Reaper { state: Default::default(), exits }, rx)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Spawn `cmd`; its PID is left to the returned child's owner until [`Reaper::release`].
    pub fn spawn(&self, cmd: &mut tokio::process::Command) -> std::io::Result<tokio::process::Child> {
        let mut state = self.lock();
        let child = cmd.spawn()?;
        if let Some(pid) = child.id() {
            state.owned.insert(pid as i32);
        }
        Ok(child)
    }

    /// The owner of `pid` has waited for it.
    pub fn release(&self, pid: Option<u32>) {
        if let Some(pid) = pid {
            self.lock().owned.remove(&(pid as i32));
        }
    }

    /// Report the exit of `pid` (a process that is, or will become, our child) on the channel.
    pub fn watch(&self, pid: i32) {
        let mut state = self.lock();
        if let Some(code) = state.unclaimed.remove(&pid) {
            let _ = self.exits.send((pid, code));
        } else {
            state.watched.insert(pid);
        }
        drop(state);
        self.collect();
    }

    /// Reap every exited child that is not owned by a command, reporting watched ones.
    pub fn collect(&self) {
        let mut state = self.lock();
        let mut candidates: HashSet<i32> = children();
        candidates.extend(state.watched.iter().copied());
        for pid in candidates {
            if state.owned.contains(&pid) {
                continue;
            }
            let Ok(status) = waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) else { continue };
            let Some((pid, code)) = exit_code(status) else { continue };
            if state.watched.remove(&pid) {
                let _ = self.exits.send((pid, code));
            } else {
                if state.unclaimed.len() >= UNCLAIMED_MAX {
                    state.unclaimed.clear();
                }
                state.unclaimed.insert(pid, code);
            }
        }
    }

    /// Collect exits on every SIGCHLD (and every second, in case one was coalesced away).
    pub async fn run(self) {
        let mut sigchld = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child()) {
            Ok(s) => s,
            Err(e) => {
                log::error!("cannot listen for SIGCHLD: {e}");
                return;
            }
        };
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = sigchld.recv() => {}
                _ = tick.tick() => {}
            }
            self.collect();
        }
    }
}

/// Our children's PIDs, from /proc (every thread's `children` list).
fn children() -> HashSet<i32> {
    let mut out = HashSet::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return out };
    for t in tasks.flatten() {
        if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
            out.extend(s.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// The tests reap their own children: run them one at a time.
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    #[tokio::test]
    async fn watched_exit_is_reported_once_and_commands_are_left_to_their_owner() {
        let _serial = SERIAL.lock().await;
        let (reaper, mut exits) = Reaper::new();
        // A command we own: the reaper must not take its status from tokio.
        let mut cmd = tokio::process::Command::new("sh");
        cmd.args(["-c", "exit 3"]);
        let mut child = reaper.spawn(&mut cmd).unwrap();
        let pid = child.id();
        // A watched process (spawned through std so no one else waits for it), exiting with 5.
        let watched = std::process::Command::new("sh").args(["-c", "sleep 0.1; exit 5"]).spawn().unwrap();
        let wpid = watched.id() as i32;
        std::mem::forget(watched);
        reaper.watch(wpid);
        tokio::spawn(reaper.clone().run());
        let got = tokio::time::timeout(Duration::from_secs(10), exits.recv()).await.unwrap().unwrap();
        assert_eq!(got, (wpid, 5));
        assert_eq!(child.wait().await.unwrap().code(), Some(3));
        reaper.release(pid);
        assert!(tokio::time::timeout(Duration::from_millis(300), exits.recv()).await.is_err());
    }

    #[tokio::test]
    async fn exit_before_watch_is_kept() {
        let _serial = SERIAL.lock().await;
        let (reaper, mut exits) = Reaper::new();
        let early = std::process::Command::new("sh").args(["-c", "exit 9"]).spawn().unwrap();
        let pid = early.id() as i32;
        std::mem::forget(early);
        // Wait until it is a zombie, then let the reaper take it before anyone watches.
        std::thread::sleep(Duration::from_millis(200));
        reaper.collect();
        reaper.watch(pid);
        let got = tokio::time::timeout(Duration::from_secs(5), exits.recv()).await.unwrap().unwrap();
        assert_eq!(got, (pid, 9));
    }
}
