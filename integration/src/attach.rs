//! A client attached to a daemon's job (`cedana job attach JID`, `cedana attach PID`, `run ... --attach`)
//! running in the background: its stdin a pipe the test holds, its stdout read line by line.

use std::io::Write;
use std::process::{Child, ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::daemon::Daemon;
use crate::lines::Lines;
use crate::wait_for;

/// How long the attach tests wait for anything.
pub const WAIT: Duration = Duration::from_secs(20);

/// A client (`cedana ARGS`) of `d` in the background: its stdin a pipe we hold open, its stdout read line by
/// line, its stderr collected.
pub fn client(d: &Daemon, args: &[&str]) -> Client {
    let mut child = d.command(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let stdout = Lines::read(child.stdout.take().unwrap());
    let stderr = Lines::read(child.stderr.take().unwrap());
    Client { child, stdout, stderr }
}

/// An attach client running in the background.
pub struct Client {
    pub child: Child,
    pub stdout: Lines,
    pub stderr: Lines,
}

impl Client {
    /// Type `text` into the client's stdin.
    pub fn type_in(&mut self, text: &str) {
        let stdin = self.child.stdin.as_mut().expect("the client's stdin is open");
        stdin.write_all(text.as_bytes()).unwrap();
        stdin.flush().unwrap();
    }

    /// End of file on the client's stdin.
    pub fn close_stdin(&mut self) {
        self.child.stdin.take();
    }

    /// Ctrl+C, as a terminal would send it.
    pub fn interrupt(&self) {
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGINT).unwrap();
    }

    pub fn wait(&mut self) -> ExitStatus {
        let child = &mut self.child;
        wait_for("the attach client to exit", WAIT, || child.try_wait().unwrap())
    }

    /// Ctrl+C; the client must detach and exit 0 saying so.
    pub fn detach(&mut self, jid: &str) {
        self.interrupt();
        let status = self.wait();
        let stderr = self.stderr.wait_closed(WAIT).join("\n");
        assert!(status.success(), "Ctrl+C detaches with exit code 0: {status}; stderr: {stderr}");
        assert!(stderr.contains(&format!("detached from {jid} (it keeps running)")), "{stderr}");
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Kills these processes (by PID, with SIGKILL) when dropped: jobs outlive their daemon, so a test that
/// fails half-way must not leave them running.
pub struct KillOnDrop(pub Vec<i32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for &pid in &self.0 {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}
