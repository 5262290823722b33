//! A private `cedana daemon` for a test: its own socket, job database and checkpoint folder in a temporary
//! folder, commands run against it, its `ps` read as rows, and helpers for the jobs' numbered output. A daemon
//! of [`Daemon::start_tcp`] listens on a free port of 127.0.0.1 instead, with a token file in its folder.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::{bin, require_root, wait_for};

/// Longest the daemon may take to listen on its socket, and to exit on SIGTERM.
const DAEMON_TIMEOUT: Duration = Duration::from_secs(30);

/// A daemon on private state in a temporary folder, stopped (by PID) when dropped.
pub struct Daemon {
    dir: tempfile::TempDir,
    child: Option<Child>,
    log_level: &'static str,
    daemon_env: Vec<(String, String)>,
    /// `127.0.0.1:PORT` when the daemon listens on TCP (protocol `tcp`) instead of its socket.
    tcp: Option<String>,
    /// The network namespace the daemon runs in (a node of [`crate::nodes::Nodes`]), if not ours.
    netns: Option<String>,
}

impl Daemon {
    /// Start a daemon on a private socket, database and checkpoint folder in a temporary folder (needs root).
    pub fn start() -> Daemon {
        Daemon::start_with_env(&[])
    }

    /// Like [`Daemon::start`], with extra environment variables for the daemon (kept across restarts).
    pub fn start_with_env(vars: &[(&str, &str)]) -> Daemon {
        require_root();
        let dir = tempfile::tempdir().unwrap();
        let daemon_env = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut d = Daemon { dir, child: None, log_level: "info", daemon_env, tcp: None, netns: None };
        d.spawn();
        d
    }

    /// Like [`Daemon::start_with_env`], the daemon running in the network namespace `netns` (so are the jobs it
    /// starts and the processes it restores); its socket, database and folders are as usual.
    pub fn start_in_netns(netns: &str, vars: &[(&str, &str)]) -> Daemon {
        require_root();
        let dir = tempfile::tempdir().unwrap();
        let daemon_env = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut d = Daemon { dir, child: None, log_level: "info", daemon_env, tcp: None, netns: Some(netns.to_string()) };
        d.spawn();
        d
    }

    /// Like [`Daemon::start`], listening on TCP at 127.0.0.1 on a free port, with a token that
    /// `cedana daemon token` writes to [`Daemon::token_file`]; the commands run against it use both.
    pub fn start_tcp() -> Daemon {
        require_root();
        let dir = tempfile::tempdir().unwrap();
        let tcp = Some(format!("127.0.0.1:{}", free_port()));
        let mut d = Daemon { dir, child: None, log_level: "info", daemon_env: Vec::new(), tcp, netns: None };
        let token = d.token_file();
        let out = Command::new(bin("cedana")).args(["daemon", "token", "--file"]).arg(&token).output().unwrap();
        assert!(out.status.success(), "cedana daemon token: {}", String::from_utf8_lossy(&out.stderr));
        d.spawn();
        d
    }

    /// `127.0.0.1:PORT` of a daemon of [`Daemon::start_tcp`].
    pub fn tcp_address(&self) -> Option<&str> {
        self.tcp.as_deref()
    }

    /// The token file of a daemon of [`Daemon::start_tcp`].
    pub fn token_file(&self) -> PathBuf {
        self.dir().join("token")
    }

    /// The `CEDANA_LOG_LEVEL` of the commands run against this daemon (default `info`; the daemon logs at info).
    pub fn with_log_level(mut self, level: &'static str) -> Daemon {
        self.log_level = level;
        self
    }

    /// The temporary folder holding the daemon's state, for a test's own files too.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The daemon's socket.
    pub fn socket(&self) -> PathBuf {
        self.dir().join("cedana.sock")
    }

    /// The daemon's PID (it must be running).
    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("the daemon runs").id() as i32
    }

    /// The daemon's checkpoint folder.
    pub fn checkpoints(&self) -> PathBuf {
        self.dir().join("checkpoints")
    }

    /// Point `cmd` at this daemon's socket (or TCP address and token file), database and checkpoint folder, at
    /// the commands' log level.
    pub fn env(&self, cmd: &mut Command) {
        match &self.tcp {
            None => cmd.env("CEDANA_ADDRESS", self.socket()),
            Some(address) => cmd
                .env("CEDANA_PROTOCOL", "tcp")
                .env("CEDANA_ADDRESS", address)
                .env("CEDANA_DAEMON_TOKEN_FILE", self.token_file()),
        };
        cmd.env("CEDANA_DB_PATH", self.dir().join("jobs.db"))
            .env("CEDANA_CHECKPOINT_DIR", self.checkpoints())
            .env("CEDANA_LOG_LEVEL", self.log_level);
    }

    /// `cedana ARGS` against this daemon (stdin /dev/null), not yet run.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin("cedana"));
        cmd.args(args).stdin(Stdio::null());
        self.env(&mut cmd);
        cmd
    }

    /// Run `cedana ARGS` against this daemon and capture its output.
    pub fn cedana(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// Like [`Daemon::cedana`], run in the folder `cwd`.
    pub fn cedana_in(&self, cwd: &Path, args: &[&str]) -> Output {
        self.command(args).current_dir(cwd).output().unwrap()
    }

    /// `cedana ARGS`, which must succeed: its stdout (else a panic with its stderr and the daemon's log).
    pub fn ok(&self, args: &[&str]) -> String {
        self.succeeded(args, self.cedana(args))
    }

    /// Like [`Daemon::ok`], run in the folder `cwd`.
    pub fn ok_in(&self, cwd: &Path, args: &[&str]) -> String {
        self.succeeded(args, self.cedana_in(cwd, args))
    }

    /// `cedana ARGS`, which must fail: its stderr.
    pub fn err(&self, args: &[&str]) -> String {
        failed(args, self.cedana(args))
    }

    /// Like [`Daemon::err`], run in the folder `cwd`.
    pub fn err_in(&self, cwd: &Path, args: &[&str]) -> String {
        failed(args, self.cedana_in(cwd, args))
    }

    fn succeeded(&self, args: &[&str], out: Output) -> String {
        assert!(
            out.status.success(),
            "cedana {args:?} failed: {}\ndaemon log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `ps`, as rows of fields.
    pub fn ps(&self) -> Vec<Vec<String>> {
        rows(&self.ok(&["ps"]))
    }

    /// The `ps` row of job `jid` (it must be there).
    pub fn row(&self, jid: &str) -> Vec<String> {
        self.ps().into_iter().find(|r| r[0] == jid).unwrap_or_else(|| panic!("job {jid} in ps: {:?}", self.ps()))
    }

    /// Wait (up to 20 s) until job `jid`'s status is one of `wanted`; its row then.
    pub fn wait_status(&self, jid: &str, wanted: &[&str]) -> Vec<String> {
        wait_for(&format!("job {jid} to be {wanted:?}"), Duration::from_secs(20), || {
            let row = self.row(jid);
            wanted.contains(&row[3].as_str()).then_some(row)
        })
    }

    /// Start the daemon process (logging into `daemon.log`), and wait until it listens on its socket.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir().join("daemon.log")).unwrap();
        // nsenter execs the daemon (the child's PID is the daemon's) in the netns only (`ip netns exec` would
        // also give it a mount namespace of its own, and so every process it restores).
        let mut cmd = match &self.netns {
            None => Command::new(bin("cedana")),
            Some(netns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{netns}")).arg("--").arg(bin("cedana"));
                c
            }
        };
        cmd.args(["daemon", "start"]).stdin(Stdio::null()).stdout(log.try_clone().unwrap()).stderr(log);
        self.env(&mut cmd);
        cmd.env("CEDANA_LOG_LEVEL", "info");
        cmd.envs(self.daemon_env.iter().map(|(k, v)| (k, v)));
        self.child = Some(cmd.spawn().unwrap());
        match &self.tcp {
            None => {
                let socket = self.socket();
                wait_for("the daemon's socket", DAEMON_TIMEOUT, || {
                    std::os::unix::net::UnixStream::connect(&socket).ok().map(drop)
                });
            }
            Some(address) => {
                let log = self.dir().join("daemon.log");
                let child = self.child.as_mut().expect("just spawned");
                wait_for(&format!("the daemon to listen on {address}"), DAEMON_TIMEOUT, || {
                    if let Ok(Some(status)) = child.try_wait() {
                        let log = std::fs::read_to_string(&log).unwrap_or_default();
                        panic!("the daemon exited ({status}) before listening on {address}; log:\n{log}");
                    }
                    std::net::TcpStream::connect(address).ok().map(drop)
                });
            }
        }
    }

    /// SIGTERM, and wait for a clean exit.
    pub fn stop(&mut self) {
        let mut child = self.child.take().expect("the daemon runs");
        kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
        let status = wait_for("the daemon to stop", DAEMON_TIMEOUT, || child.try_wait().unwrap());
        assert!(status.success(), "the daemon exits cleanly on SIGTERM: {status}; log:\n{}", self.log());
    }

    /// SIGKILL, as a crash would, and reap it: nothing of its own cleanup runs.
    pub fn kill_hard(&mut self) {
        let mut child = self.child.take().expect("the daemon runs");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// [`Daemon::stop`], then [`Daemon::spawn`] on the same state.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// What the daemon has logged so far (over all its runs).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir().join("daemon.log")).unwrap_or_default()
    }
}

impl Drop for Daemon {
    /// SIGTERM by PID, and SIGKILL if it has not exited after 30 s.
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + DAEMON_TIMEOUT;
            while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A TCP port of 127.0.0.1 that was free a moment ago (the kernel's pick).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The stderr of `cedana ARGS`, which must have failed.
fn failed(args: &[&str], out: Output) -> String {
    assert!(!out.status.success(), "cedana {args:?} should fail: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The rows of a `ps` output (its header skipped), as fields.
pub fn rows(ps: &str) -> Vec<Vec<String>> {
    ps.lines().skip(1).map(|l| l.split_whitespace().map(str::to_string).collect()).collect()
}

/// The PID a `run` or `manage` printed after the job id.
pub fn printed_pid(out: &str) -> i32 {
    out.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// The numbers in the file `path`, one a line (a job's log); none when it does not exist.
pub fn numbers_in(path: &Path) -> Vec<u64> {
    std::fs::read_to_string(path).unwrap_or_default().lines().filter_map(|l| l.trim().parse().ok()).collect()
}

/// Wait (up to `timeout`) until the file `path` holds at least `n` numbers; them then.
pub fn wait_for_count(path: &Path, n: usize, timeout: Duration) -> Vec<u64> {
    wait_for(&format!("{n} lines in {}", path.display()), timeout, || {
        let v = numbers_in(path);
        (v.len() >= n).then_some(v)
    })
}

/// Whether each number is one more than the one before.
pub fn consecutive(v: &[u64]) -> bool {
    v.windows(2).all(|w| w[1] == w[0] + 1)
}

/// Assert `v` is `1, 2, 3, ...` with no gap and no repeat; `what` names it in the message.
pub fn check_sequence(v: &[u64], what: &str) {
    assert_eq!(v.first(), Some(&1), "{what}: the count starts at 1: {v:?}");
    for (i, w) in v.windows(2).enumerate() {
        assert_eq!(w[1], w[0] + 1, "{what}: {} follows {} at line {} (gap or repeat)", w[1], w[0], i + 2);
    }
}
