//! A dump the daemon runs for a client is cancelled when that client goes away: `cedana dump job`
//! interrupted with SIGINT while the archive is being written leaves the job running (unfrozen, with its
//! memory), no checkpoint and no partial file, and the daemon says why in its log.

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use cedana_integration::engines::wait_child;
use cedana_integration::{alive, bin, entries, require_root, wait_for, wait_for_partial_checkpoint, workload_bin};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const T: Duration = Duration::from_secs(30);

/// A daemon on private state in a temporary folder (as in `daemon.rs`).
struct Daemon {
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Daemon {
    fn start() -> Daemon {
        require_root();
        let dir = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(dir.path().join("daemon.log")).unwrap();
        let mut cmd = Command::new(bin("cedana"));
        cmd.args(["daemon", "start"]).stdin(Stdio::null()).stdout(log.try_clone().unwrap()).stderr(log);
        let mut d = Daemon { dir, child: None };
        d.env(&mut cmd);
        d.child = Some(cmd.spawn().unwrap());
        let socket = d.socket();
        wait_for("the daemon's socket", T, || std::os::unix::net::UnixStream::connect(&socket).ok().map(drop));
        d
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("cedana.sock")
    }

    fn checkpoints(&self) -> PathBuf {
        self.dir.path().join("checkpoints")
    }

    fn env(&self, cmd: &mut Command) {
        cmd.env("CEDANA_ADDRESS", self.socket())
            .env("CEDANA_DB_PATH", self.dir.path().join("jobs.db"))
            .env("CEDANA_CHECKPOINT_DIR", self.checkpoints())
            .env("CEDANA_LOG_LEVEL", "info");
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin("cedana"));
        cmd.args(args).stdin(Stdio::null());
        self.env(&mut cmd);
        cmd
    }

    fn cedana(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.cedana(args);
        assert!(
            out.status.success(),
            "cedana {args:?} failed: {}\ndaemon log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn row(&self, jid: &str) -> Vec<String> {
        let ps = self.ok(&["ps"]);
        let rows: Vec<Vec<String>> = ps.lines().skip(1).map(|l| l.split_whitespace().map(str::to_string).collect()).collect();
        rows.into_iter().find(|r| r[0] == jid).unwrap_or_else(|| panic!("job {jid} in ps: {ps}"))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
            let _ = wait_child(&mut c, Duration::from_secs(30));
        }
    }
}

/// The `sum ...` lines the memory workload wrote into its log.
fn sums(log: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(log).unwrap_or_default().lines().filter(|l| l.starts_with("sum ")).map(str::to_string).collect()
}

#[test]
fn an_interrupted_dump_job_is_cancelled_in_the_daemon_and_the_job_runs_on() {
    let d = Daemon::start();
    let log = d.dir.path().join("memory.log");
    let memory = workload_bin("memory");
    let out = d.ok(&["run", "process", "--jid", "big", "--out", log.to_str().unwrap(), "--", memory.to_str().unwrap(), "512"]);
    let pid: i32 = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    let before = wait_for("the memory checksum", Duration::from_secs(60), || sums(&log).first().cloned());

    let client =
        d.cmd(&["dump", "job", "big", "--compression", "gzip"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    // While the archive is written (gzip is slow): the daemon holds the job frozen, the partial file grows.
    wait_for_partial_checkpoint(&d.checkpoints(), 4 << 20);
    let interrupted = Instant::now();
    kill(Pid::from_raw(client.id() as i32), Signal::SIGINT).unwrap();
    let result = client.wait_with_output().unwrap();
    assert!(!result.status.success(), "the interrupted client fails: {result:?}");

    // The daemon notices that its client went away, stops the dump and gives the job back.
    wait_for("the daemon to cancel the dump", T, || {
        (d.log().contains("the client went away") && d.log().contains("dump cancelled")).then_some(())
    });
    let row = wait_for("the job to run again", T, || {
        let row = d.row("big");
        (row[3] != "halted").then_some(row)
    });
    eprintln!("the job ran again {:?} after the interrupt", interrupted.elapsed());
    assert!(["sleep", "running"].contains(&row[3].as_str()), "{row:?}");
    assert_eq!(row[2], pid.to_string(), "the same process, not a restored one: {row:?}");
    assert!(alive(pid), "the job's process survives a cancelled dump");
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    assert!(!stat.contains(") T ") && !stat.contains(") t "), "the process must not be left stopped: {stat}");
    wait_for("the staging folder to go", T, || entries(&d.checkpoints()).is_empty().then_some(()));
    let out = d.ok(&["job", "checkpoints", "big"]);
    assert_eq!(out.lines().count(), 1, "no checkpoint recorded (header only): {out}");

    // It kept its memory and works on.
    kill(Pid::from_raw(pid), Signal::SIGUSR1).unwrap();
    let again = wait_for("the checksum after the cancelled dump", Duration::from_secs(60), || sums(&log).get(1).cloned());
    assert_eq!(again, before);
    // And it can still be dumped.
    d.ok(&["dump", "job", "big", "--compression", "lz4"]);
    assert_eq!(d.row("big")[3], "halted");
    d.ok(&["job", "delete", "big"]);
}
