//! Container engines started by the tests, each with private state under a temporary folder: a runc root,
//! and dockerd (with its own containerd). They stop only what they started, by PID or container id.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use crate::lines::Lines;

/// A pipe whose write end becomes a child's stdout and stderr (close-on-exec everywhere else).
pub fn output_pipe() -> (std::fs::File, OwnedFd) {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
    (std::fs::File::from(r), w)
}

/// Give `cmd` stdin from /dev/null and stdout+stderr into a new pipe; returns the pipe's lines.
pub fn piped(cmd: &mut Command) -> Lines {
    let (r, w) = output_pipe();
    let w2 = w.try_clone().expect("dup pipe");
    cmd.stdin(Stdio::null()).stdout(Stdio::from(w)).stderr(Stdio::from(w2));
    Lines::read(r)
}

/// A private runc state folder (`runc --root`). Containers created through it are force-deleted on drop.
pub struct RuncRoot {
    pub root: PathBuf,
    /// The runtime binary: `runc`, or cedana-runc.
    pub binary: PathBuf,
    ids: std::sync::Mutex<Vec<String>>,
}

impl RuncRoot {
    /// A root at `dir/runc-root` driven by `binary`.
    pub fn new(dir: &Path, binary: impl Into<PathBuf>) -> RuncRoot {
        RuncRoot { root: dir.join("runc-root"), binary: binary.into(), ids: Default::default() }
    }

    /// A command `BINARY --root ROOT ARGS`.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.binary);
        c.arg("--root").arg(&self.root).args(args);
        c
    }

    /// Run a command to completion.
    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).stdin(Stdio::null()).output().expect("run the runtime")
    }

    /// Run a command that must succeed; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "{} {args:?} failed ({}): {}{}",
            self.binary.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Remember `id` for deletion on drop (for containers created by other commands, e.g. a restore).
    pub fn track(&self, id: &str) {
        self.ids.lock().unwrap_or_else(|e| e.into_inner()).push(id.to_string());
    }

    /// `run -d` container `id` from `bundle`, its stdout and stderr into a pipe whose lines are returned.
    pub fn run_detached(&self, bundle: &Path, id: &str) -> Lines {
        self.track(id);
        let mut cmd = self.cmd(&["run", "-d", "--bundle"]);
        cmd.arg(bundle).arg(id);
        let lines = piped(&mut cmd);
        let status = cmd.status().expect("runc run");
        assert!(status.success(), "run -d {id} failed: {:?}", lines.snapshot());
        lines
    }

    /// `state ID` as JSON, or `None` when the container does not exist.
    pub fn state(&self, id: &str) -> Option<serde_json::Value> {
        let out = self.run(&["state", id]);
        out.status.success().then(|| serde_json::from_slice(&out.stdout).expect("state is JSON"))
    }

    /// The container's status (`running`, `paused`, ...), or `None` when it does not exist.
    pub fn status(&self, id: &str) -> Option<String> {
        self.state(id).map(|s| s["status"].as_str().unwrap_or_default().to_string())
    }
}

impl Drop for RuncRoot {
    fn drop(&mut self) {
        let ids = std::mem::take(&mut *self.ids.lock().unwrap_or_else(|e| e.into_inner()));
        for id in ids {
            let _ = Command::new("runc")
                .arg("--root")
                .arg(&self.root)
                .args(["delete", "--force", &id])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Wait for a child to exit, up to `timeout`; kill it (by PID) if it does not.
pub fn wait_child(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("PID {} did not exit within {timeout:?}", child.id());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
