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

/// The workload's log, `dir/NAME.log`, created empty.
fn log_file(program: &Path, dir: &Path) -> (PathBuf, std::fs::File) {
    let name = program.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let log = dir.join(format!("{name}.log"));
    let file = std::fs::File::create(&log).expect("create workload log");
    (log, file)
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
        let (log, file) = log_file(program, dir);
        let mut cmd = session_command(program);
        cmd.args(args).stdout(file.try_clone().expect("dup log")).stderr(file).current_dir(dir);
        let child = cmd.spawn().expect("start workload");
        let pid = child.id() as i32;
        Workload { child: Some(child), pid, log, own_group: true }
    }

    /// Start it as a job of a shell that leads a session of its own (`setsid sh -c 'PROGRAM &; wait'`): the
    /// workload's session and group leader is outside its tree, as for a job started from a terminal, whatever
    /// session the test itself runs in.
    pub fn start_as_shell_job(program: &Path, args: &[&str], dir: &Path) -> Workload {
        let (log, file) = log_file(program, dir);
        let pid_file = log.with_extension("job-pid");
        let mut cmd = session_command(Path::new("/bin/sh"));
        cmd.arg("-c")
            .arg(r#"pid_file=$1; shift; "$@" & echo $! > "$pid_file.tmp"; mv "$pid_file.tmp" "$pid_file"; wait"#)
            .arg("sh")
            .arg(&pid_file)
            .arg(program)
            .args(args)
            .stdout(file.try_clone().expect("dup log"))
            .stderr(file)
            .current_dir(dir);
        let child = cmd.spawn().expect("start the job's shell");
        let text = crate::wait_for("the job's PID", Duration::from_secs(10), || std::fs::read_to_string(&pid_file).ok());
        let pid = text.trim().parse().expect("the shell wrote a PID");
        Workload { child: Some(child), pid, log, own_group: false }
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
