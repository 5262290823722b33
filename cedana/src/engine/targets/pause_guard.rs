//! What resumes a container that a dump paused, should the process running the dump be killed before it
//! resumes or deletes the container itself (SIGKILL of `cedana-runc` or `cedana` mid-checkpoint: nothing of
//! that process runs any more, and the container would stay paused for good).
//!
//! Before pausing, the dump starts a guard: a small shell whose stdin is the read end of a pipe. The dump
//! holds the write end, and so do the `runc checkpoint` it runs and that runc's CRIU (the lifeline is
//! inherited by both at a fixed descriptor number). When the dump is over it writes `done` and the guard exits
//! without doing anything. When the pipe closes without `done`, every holder is gone: the dump was killed,
//! and its runc and CRIU have finished too (so none of them pauses the container again afterwards). The
//! guard then runs the runtime's `resume ID` (a container already running, or deleted, makes that fail
//! harmlessly).

use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::process::{Child, Command, Stdio};

/// The descriptor number at which `runc checkpoint` and its CRIU inherit the guard's lifeline.
pub(crate) const LIFELINE_FD: i32 = 100;

/// The guard's program: wait for the verdict, resume the container unless it is `done`.
const SCRIPT: &str = r#"read -r verdict; [ "$verdict" = done ] && exit 0; exec "$@""#;

/// A running guard; [`PauseGuard::disarm`] once the dump no longer needs it. Dropped without being disarmed
/// (a panic, or an error path that did not resume the container), it resumes the container once every holder
/// of the lifeline is gone.
pub(crate) struct PauseGuard {
    lifeline: Option<File>,
    child: Child,
}

impl PauseGuard {
    /// Start a guard that runs `resume` (the runtime's `resume ID`) if the lifeline closes without a verdict.
    pub(crate) fn start(resume: &Command) -> std::io::Result<Self> {
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(std::io::Error::from)?;
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c").arg(SCRIPT).arg("cedana-pause-guard").arg(resume.get_program()).args(resume.get_args());
        for (key, value) in resume.get_envs() {
            match value {
                Some(v) => cmd.env(key, v),
                None => cmd.env_remove(key),
            };
        }
        // Its own process group: a terminal's Ctrl-C for the dump does not end the guard with it.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.current_dir("/").stdin(Stdio::from(read)).stdout(Stdio::null()).stderr(Stdio::null()).spawn()?;
        Ok(Self { lifeline: Some(File::from(write)), child })
    }

    /// A descriptor of the lifeline for a child (runc) to inherit: the guard acts only once it is closed too.
    pub(crate) fn lifeline(&self) -> std::io::Result<OwnedFd> {
        match &self.lifeline {
            Some(f) => Ok(f.try_clone()?.into()),
            None => Err(std::io::Error::other("the pause guard was disarmed")),
        }
    }

    /// The dump is over and the container is as it should be: the guard exits without acting.
    pub(crate) fn disarm(mut self) {
        if let Some(mut f) = self.lifeline.take() {
            if let Err(e) = f.write_all(b"done\n") {
                tracing::warn!(error = %e, "cannot tell the pause guard the dump is over; it may resume the container");
            }
        }
        // Dropped here: the guard has its verdict and exits at once; it is reaped.
    }
}

impl Drop for PauseGuard {
    fn drop(&mut self) {
        // Closing the lifeline lets the guard finish (or act, when not disarmed); reap it then. A caller that
        // reaps every child itself (a daemon's SIGCHLD handler) makes the wait fail, which is harmless.
        drop(self.lifeline.take());
        if let Err(e) = self.child.wait() {
            tracing::debug!(error = %e, "the pause guard was reaped elsewhere");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A guard around `touch MARKER`: whether it ran, once the guard has finished.
    fn ran(marker: &std::path::Path, disarm: bool) -> bool {
        let mut resume = Command::new("touch");
        resume.arg(marker);
        let guard = PauseGuard::start(&resume).unwrap();
        if disarm {
            // The verdict counts even while another holder (runc) still has the lifeline open.
            let held = guard.lifeline().unwrap();
            guard.disarm();
            drop(held);
        } else {
            drop(guard);
        }
        marker.exists()
    }

    #[test]
    fn a_disarmed_guard_does_nothing_and_an_abandoned_one_resumes() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!ran(&dir.path().join("disarmed"), true));
        assert!(ran(&dir.path().join("abandoned"), false));
    }
}
