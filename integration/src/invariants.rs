//! What must hold after any fault (a killed actor, a failing disk or store, CRIU's own fault injection): the
//! workload runs unfrozen and untraced (or, after a restore, runs correctly or is absent), no CRIU process
//! of the test is left, no temporary file or folder of a dump or restore is left in the test's folders, no
//! mount is left under them, no network-lock rule of CRIU's is left, and no incomplete checkpoint is visible
//! locally or in the object store.
//!
//! A fault test runs its `cedana` commands with [`Scene::env`]: `TMPDIR` and the scratch folder in a private
//! folder (so CRIU's work folders and downloads land where the test can see them, and the CRIU processes of
//! this test are found among everyone's by the folders they hold open), and a daemon address nobody listens
//! on (so the commands run in-process unless a test's own daemon is meant).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::wait_for;

/// Names of what dumps and restores create while they run and remove when done (or a sweep removes after
/// a crash): hidden checkpoints, disk reserves, staging and download folders, CRIU's work folders.
pub const TEMPORARY_MARKS: &[&str] = &[
    ".partial-",
    ".reserve-",
    ".cedana-images-",
    ".cedana-download-",
    ".cedana-restore-",
    ".cedana-lazy-",
    ".cedana-netlock-",
    ".aside-",
];

/// Prefixes of CRIU's work folders in `TMPDIR`.
pub const WORK_PREFIXES: &[&str] = &["cedana-dump-", "cedana-restore-", "cedana-runc-restore-"];

/// Longest a killed operation's CRIU may take to notice and exit, and a workload to be let go.
pub const SETTLE: Duration = Duration::from_secs(30);

/// One fault test's private folders.
pub struct Scene {
    root: tempfile::TempDir,
}

impl Default for Scene {
    fn default() -> Self {
        Self::new()
    }
}

impl Scene {
    /// A fresh scene: `dest/`, `tmp/` and `work/` in a temporary folder.
    pub fn new() -> Scene {
        let root = tempfile::tempdir().expect("a scene folder");
        for d in ["dest", "tmp", "work"] {
            std::fs::create_dir(root.path().join(d)).expect("a scene subfolder");
        }
        Scene { root }
    }

    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// Where checkpoints go.
    pub fn dest(&self) -> PathBuf {
        self.root().join("dest")
    }

    /// `TMPDIR` and the scratch folder of the commands.
    pub fn tmp(&self) -> PathBuf {
        self.root().join("tmp")
    }

    /// Where workloads run and log.
    pub fn work(&self) -> PathBuf {
        self.root().join("work")
    }

    /// Give `cmd` this scene's `TMPDIR`, scratch folder and a daemon address nobody listens on.
    pub fn env(&self, cmd: &mut Command) {
        cmd.env("TMPDIR", self.tmp())
            .env("CEDANA_SCRATCH_DIR", self.tmp())
            .env("CEDANA_ADDRESS", self.root().join("no-daemon.sock"))
            .env("CEDANA_LOG_LEVEL", "info");
    }

    /// `cedana ARGS` in this scene, not yet run.
    pub fn cedana(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(crate::bin("cedana"));
        cmd.args(args).stdin(std::process::Stdio::null());
        self.env(&mut cmd);
        cmd
    }

    /// `cedana dump process PID --no-server --dir DIR --name NAME --compression COMPRESSION` in this scene, not
    /// yet run.
    pub fn dump(&self, pid: i32, dir: &str, name: &str, compression: &str) -> Command {
        let pid = pid.to_string();
        self.cedana(&["dump", "process", &pid, "--no-server", "--dir", dir, "--name", name, "--compression", compression])
    }

    /// The CRIU processes working for this scene that still exist: those holding a file or folder of it open
    /// (CRIU rewrites its environment and arguments for its process titles, so the marker cannot be read back
    /// from CRIU itself; its work and images folders are always open in it).
    pub fn criu_processes(&self) -> Vec<i32> {
        criu_processes_under(self.root())
    }

    /// Wait until no CRIU process of this scene is left (a killed operation's CRIU notices and exits).
    pub fn assert_no_criu(&self) {
        let left = wait_for_value(SETTLE, Vec::new, || self.criu_processes());
        assert!(left.is_empty(), "CRIU processes left: {}", describe(&left));
    }

    /// No temporary file or folder of an operation left in the destination, `TMPDIR` or scratch folder.
    pub fn assert_no_temporaries(&self) {
        for dir in [self.dest(), self.tmp()] {
            let left = temporaries(&dir);
            assert!(left.is_empty(), "temporaries left in {}: {left:?}", dir.display());
        }
    }

    /// No mount left under the scene's folders.
    pub fn assert_no_mounts(&self) {
        let left = mounts_under(self.root());
        assert!(left.is_empty(), "mounts left under {}: {left:?}", self.root().display());
    }

    /// Every invariant of a dump that failed or was killed: the workload `pid` runs unfrozen and untraced,
    /// no CRIU process, temporary or mount is left, and no checkpoint is in the destination.
    pub fn assert_dump_rolled_back(&self, pid: i32) {
        self.assert_no_criu();
        assert_running_unfrozen(pid);
        self.assert_no_temporaries();
        self.assert_no_mounts();
        let visible = crate::entries(&self.dest());
        assert!(visible.is_empty(), "no checkpoint may be visible after a failed dump: {visible:?}");
    }
}

/// CRIU processes with a descriptor or their working folder under `dir`.
pub fn criu_processes_under(dir: &Path) -> Vec<i32> {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let under = |p: PathBuf| p.starts_with(&dir);
    processes()
        .into_iter()
        .filter(|pid| {
            is_criu(*pid) && {
                let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
                    .map(|d| d.flatten().filter_map(|e| std::fs::read_link(e.path()).ok()).any(under))
                    .unwrap_or(false);
                fds || std::fs::read_link(format!("/proc/{pid}/cwd")).map(under).unwrap_or(false)
            }
        })
        .collect()
}

/// Every PID in /proc.
pub fn processes() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .map(|d| d.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default()
}

/// Whether `pid` runs CRIU (its executable is named `criu`), and is not a zombie.
pub fn is_criu(pid: i32) -> bool {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
    exe.as_deref().and_then(Path::file_name).is_some_and(|n| n == "criu") && crate::alive(pid)
}

fn describe(pids: &[i32]) -> String {
    pids.iter()
        .map(|p| {
            let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            format!("{p}: {}", String::from_utf8_lossy(&cmd).replace('\0', " "))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Poll `f` until it returns `want()`-equal, or `timeout`; the last value.
fn wait_for_value<T: PartialEq>(timeout: Duration, want: impl Fn() -> T, mut f: impl FnMut() -> T) -> T {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let v = f();
        if v == want() || std::time::Instant::now() >= deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A field of /proc/PID/status (`State`, `TracerPid`, ...), trimmed.
pub fn status_field(pid: i32, field: &str) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines().find_map(|l| l.strip_prefix(field)?.strip_prefix(':').map(|v| v.trim().to_string()))
}

/// Whether `pid` is stopped or traced (State T or t, or a tracer attached): what CRIU leaves when it dies
/// holding a tree.
pub fn frozen_or_traced(pid: i32) -> bool {
    let state = status_field(pid, "State").unwrap_or_default();
    let tracer = status_field(pid, "TracerPid").unwrap_or_default();
    state.starts_with('T') || state.starts_with('t') || (tracer != "0" && !tracer.is_empty())
}

/// Whether `pid` is exiting (PF_EXITING in its flags: killed, its address space going or gone).
pub fn exiting(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command's closing parenthesis: state is the 1st, flags the 7th.
    let flags = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(6)?.parse::<u64>().ok());
    flags.is_some_and(|f| f & 0x4 != 0)
}

/// `pid` is alive, and (within [`SETTLE`]) neither stopped nor traced.
pub fn assert_running_unfrozen(pid: i32) {
    assert!(crate::alive(pid), "the workload {pid} must survive");
    let stuck = wait_for_value(SETTLE, || false, || frozen_or_traced(pid));
    assert!(
        !stuck,
        "the workload {pid} is left {} (TracerPid {})",
        status_field(pid, "State").unwrap_or_default(),
        status_field(pid, "TracerPid").unwrap_or_default()
    );
}

/// Wait until `pid` is held by a tracer (CRIU has seized it: the tree is frozen); the tracer's PID.
pub fn wait_until_seized(pid: i32, timeout: Duration) -> i32 {
    wait_for_fast(&format!("CRIU to seize {pid}"), timeout, || {
        status_field(pid, "TracerPid").and_then(|t| t.parse::<i32>().ok()).filter(|t| *t != 0)
    })
}

/// Like [`crate::wait_for`], polling every millisecond (for windows of a few hundred milliseconds).
/// Whether `f` became true within `timeout` (checked every 20 ms).
pub fn wait_for_value_or(timeout: Duration, f: impl Fn() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

/// A hook script in `dir` that blocks (`sleep 120`) at hook point `point`, having written its PID to
/// `dir/hook.pid` (read it with [`hook_pid`]); it lets every other point pass.
pub fn blocking_hook(dir: &Path, point: &str) -> PathBuf {
    let hook = dir.join("hook.sh");
    let pid_file = dir.join("hook.pid");
    let _ = std::fs::remove_file(&pid_file);
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\nif [ \"$CEDANA_HOOK\" = {point} ]; then echo $$ > {p}.tmp; mv {p}.tmp {p}; exec sleep 120; fi\nexit 0\n",
            p = pid_file.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    hook
}

/// The PID a [`blocking_hook`] wrote, once it did.
pub fn hook_pid(dir: &Path) -> i32 {
    let text = wait_for("the hook to block", Duration::from_secs(30), || std::fs::read_to_string(dir.join("hook.pid")).ok());
    text.trim().parse().unwrap()
}

pub fn wait_for_fast<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Temporary files and folders of operations in `dir` (not recursive), and CRIU work folders; not what an
/// error kept on purpose for the user (CRIU's work folder with its log: a `NAME.kept` marker beside it).
pub fn temporaries(dir: &Path) -> Vec<String> {
    let all = crate::entries(dir);
    let kept = |n: &String| n.ends_with(".kept") || all.contains(&format!("{n}.kept"));
    all.iter()
        .filter(|n| TEMPORARY_MARKS.iter().any(|m| n.contains(m)) || WORK_PREFIXES.iter().any(|p| n.starts_with(p)))
        .filter(|n| !kept(n))
        .cloned()
        .collect()
}

/// What errors kept on purpose in `dir` (each with its `.kept` marker).
pub fn kept(dir: &Path) -> Vec<String> {
    crate::entries(dir).into_iter().filter(|n| n.ends_with(".kept")).collect()
}

/// Mount points at or under `dir`.
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .filter(|m| Path::new(m).starts_with(&dir))
        .map(str::to_string)
        .collect()
}

/// CRIU's network-lock rules: iptables rules (filter table, IPv4 and IPv6) of its chain `CRIU` (a network
/// namespace locked whole) or matching its mark 0xc114 (a connection locked on its own, as for a process with
/// `--tcp-established`), or an nftables table whose name starts with `CRIU`.
pub fn network_lock_rules() -> Vec<String> {
    let mut found = Vec::new();
    for tool in ["iptables", "ip6tables"] {
        if let Ok(out) = Command::new(tool).args(["-w", "-S"]).output() {
            found.extend(
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter(|l| l.contains(" CRIU") || l.contains("0xc114"))
                    .map(|l| format!("{tool}: {l}")),
            );
        }
    }
    if let Ok(out) = Command::new("nft").args(["list", "tables"]).output() {
        found.extend(String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.contains("CRIU")).map(|l| format!("nft: {l}")));
    }
    found
}

/// The keys of the objects under `prefix` in moto's test bucket.
pub fn bucket_keys(moto: &crate::moto::MotoServer, prefix: &str) -> Vec<String> {
    let (status, body) = moto.http("GET", &format!("/{}?prefix={prefix}", moto.bucket()), b"");
    assert_eq!(status, 200, "listing {prefix}: {body}");
    body.split("<Key>").skip(1).filter_map(|s| s.split("</Key>").next()).map(str::to_string).collect()
}

/// No object under `prefix` and no multipart upload left pending in moto's bucket.
pub fn assert_store_clean(moto: &crate::moto::MotoServer, prefix: &str) {
    let keys = bucket_keys(moto, prefix);
    assert!(keys.is_empty(), "no object may be visible under {prefix}: {keys:?}");
    let pending = wait_for_value(SETTLE, Vec::new, || moto.pending_uploads());
    assert!(pending.is_empty(), "multipart uploads left pending: {pending:?}");
}

/// The `sum ...` lines of the memory workload's log.
pub fn sums(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log).unwrap_or_default().lines().filter(|l| l.starts_with("sum ")).map(str::to_string).collect()
}

/// Ask the memory workload `pid` for its checksum again (SIGUSR1) and wait for it: it must equal `expected`.
pub fn assert_memory_intact(pid: i32, log: &Path, expected: &str) {
    let n = sums(log).len();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGUSR1).expect("signal the workload");
    let got = wait_for("the workload's checksum", Duration::from_secs(60), || sums(log).get(n).cloned());
    assert_eq!(got, expected, "the workload's memory changed");
}
