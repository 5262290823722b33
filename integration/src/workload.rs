//! A workload process started for a test: its own session, stdin from /dev/null, stdout and stderr to a
//! log file the test reads. Killed (by PID) when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// `program`, ready to start in a session of its own with stdin and stderr on /dev/null (set stdout).
pub fn session_command(program: &Path) -> Command {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(program);
    cmd.stdin(Stdio::null()).stderr(Stdio::null());
    // SAFETY: setsid is async-signal-safe and runs in the child between fork and exec.
    unsafe {
        cmd.pre_exec(|| nix::unistd::setsid().map(|_| ()).map_err(std::io::Error::from));
    }
    cmd
}

/// A running test workload.
pub struct Workload {
    child: Option<Child>,
    pub pid: i32,
    pub log: PathBuf,
    own_group: bool,
}

impl Workload {
    /// Start `program ARGS` in its own session with output to `dir/NAME.log`.
    pub fn start(program: &Path, args: &[&str], dir: &Path) -> Workload {
        Self::start_with(program, args, dir, true)
    }

    /// Start it, in a new session or (`setsid = false`) in the test's own session, as a shell would.
    pub fn start_with(program: &Path, args: &[&str], dir: &Path, setsid: bool) -> Workload {
        let name = program.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("create workload log");
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("dup log"))
            .stderr(file)
            .current_dir(dir);
        if setsid {
            use std::os::unix::process::CommandExt;
            // SAFETY: setsid is async-signal-safe and runs in the child between fork and exec.
            unsafe {
                cmd.pre_exec(|| nix::unistd::setsid().map(|_| ()).map_err(std::io::Error::from));
            }
        }
        let child = cmd.spawn().expect("start workload");
        let pid = child.id() as i32;
        Workload { child: Some(child), pid, log, own_group: setsid }
    }

    /// The log so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Lines of the log so far (complete lines only).
    pub fn lines(&self) -> Vec<String> {
        let text = self.output();
        let complete = match text.rfind('\n') {
            Some(i) => &text[..=i],
            None => "",
        };
        complete.lines().map(str::to_string).collect()
    }

    /// Wait until the log has at least `n` lines.
    pub fn wait_lines(&self, n: usize) -> Vec<String> {
        crate::wait_for(&format!("{n} lines from PID {}", self.pid), Duration::from_secs(20), || {
            let l = self.lines();
            (l.len() >= n).then_some(l)
        })
    }

    /// Reap the original process after a dump killed it, so its PID is free for the restore.
    pub fn reap(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }

    /// Send a signal to the workload's PID (the original, or the restored one: they share the PID).
    pub fn signal(&self, sig: Signal) {
        let _ = kill(Pid::from_raw(self.pid), sig);
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        // A session leader's group holds its whole tree (restored trees keep their group).
        let target = if self.own_group { -self.pid } else { self.pid };
        let _ = kill(Pid::from_raw(target), Signal::SIGKILL);
        self.reap();
    }
}
