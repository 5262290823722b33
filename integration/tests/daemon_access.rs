//! Access control through the daemon, with real unprivileged users: the socket is root's alone by default; with
//! `daemon.socket_group` its members may use it, each only on what they own. Every refusal the daemon makes
//! for such a user is tried here, as that user (`setpriv`), against the real CRIU.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use cedana_integration::daemon::{printed_pid, rows, Daemon};
use cedana_integration::workload::Workload;
use cedana_integration::{alive, bin, wait_for, workload_bin};

/// A user and their group, created for this test and removed (with every process of theirs) when dropped.
struct TestUser {
    name: String,
    uid: u32,
    gid: u32,
    home: PathBuf,
}

impl TestUser {
    fn create(tag: &str, group: &str, base: &Path) -> TestUser {
        let name = format!("cd{tag}{}", std::process::id());
        let ok = |cmd: &mut Command| {
            let out = cmd.output().unwrap();
            assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        ok(Command::new("groupadd").arg(&name));
        ok(Command::new("useradd").args(["-M", "-N", "-g", &name, "-G", group, "-s", "/usr/sbin/nologin"]).arg(&name));
        let id = |flag: &str| -> u32 {
            let out = Command::new("id").arg(flag).arg(&name).output().unwrap();
            String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
        };
        let (uid, gid) = (id("-u"), id("-g"));
        let home = base.join(&name);
        std::fs::create_dir(&home).unwrap();
        std::os::unix::fs::chown(&home, Some(uid), Some(gid)).unwrap();
        std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o755)).unwrap();
        TestUser { name, uid, gid, home }
    }

    /// `program ARGS` as this user (their uid, gid and groups).
    fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new("setpriv");
        cmd.args(["--reuid", &self.uid.to_string(), "--regid", &self.gid.to_string(), "--init-groups", "--"]).arg(program);
        cmd.stdin(Stdio::null());
        cmd
    }

    /// `cedana ARGS` as this user against `d`.
    fn cedana(&self, d: &Daemon, args: &[&str]) -> Output {
        let mut cmd = self.command(&bin("cedana"));
        cmd.args(args).current_dir(&self.home);
        d.env(&mut cmd);
        cmd.output().unwrap()
    }

    fn ok(&self, d: &Daemon, args: &[&str]) -> String {
        let out = self.cedana(d, args);
        assert!(out.status.success(), "{} {args:?}: {}", self.name, String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The error of `cedana ARGS` as this user, which must fail.
    fn err(&self, d: &Daemon, args: &[&str]) -> String {
        let out = self.cedana(d, args);
        assert!(!out.status.success(), "{} {args:?} must fail: {}", self.name, String::from_utf8_lossy(&out.stdout));
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// A counter of this user's, writing into their home.
    fn counter(&self, name: &str) -> i32 {
        let log = std::fs::File::create(self.home.join(format!("{name}.log"))).unwrap();
        std::os::unix::fs::fchown(&log, Some(self.uid), Some(self.gid)).unwrap();
        let mut cmd = self.command(Path::new("setsid"));
        cmd.arg(workload_bin("counter")).stdout(log).stderr(Stdio::null()).current_dir(&self.home);
        let mut child = cmd.spawn().unwrap();
        let setpriv = child.id() as i32;
        // setpriv and setsid exec: the child is the counter itself.
        std::thread::spawn(move || child.wait());
        setpriv
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = Command::new("pkill").args(["-KILL", "-U", &self.uid.to_string()]).status();
        std::thread::sleep(Duration::from_millis(200));
        // userdel removes the user's own group too, where it is theirs alone.
        let _ = Command::new("userdel").arg(&self.name).stderr(Stdio::null()).status();
        let _ = Command::new("groupdel").arg(&self.name).stderr(Stdio::null()).status();
    }
}

/// The uid a process runs as (its real uid).
fn uid_of(pid: i32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find_map(|l| l.strip_prefix("Uid:")).unwrap();
    line.split_whitespace().next().unwrap().parse().unwrap()
}

fn kill(pid: i32) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    wait_for("the process to go", Duration::from_secs(10), || (!alive(pid)).then_some(()));
}

/// The checkpoint path a dump printed last.
fn dumped_path(out: &str) -> PathBuf {
    PathBuf::from(out.trim().lines().last().unwrap().split_whitespace().last().unwrap())
}

#[test]
fn a_socket_groups_members_act_only_on_what_they_own() {
    let group = format!("cdgrp{}", std::process::id());
    assert!(Command::new("groupadd").arg(&group).status().unwrap().success());
    struct Group(String);
    impl Drop for Group {
        fn drop(&mut self) {
            let _ = Command::new("groupdel").arg(&self.0).status();
        }
    }
    let _group = Group(group.clone());
    let base = tempfile::tempdir().unwrap();
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let alice = TestUser::create("a", &group, base.path());
    let bob = TestUser::create("b", &group, base.path());

    let d = Daemon::start_with_env(&[("CEDANA_DAEMON_SOCKET_GROUP", &group)]);
    // The daemon's folder must be reachable for its socket to be.
    std::fs::set_permissions(d.dir(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let socket = std::fs::metadata(d.socket()).unwrap();
    assert_eq!(socket.mode() & 0o777, 0o660, "the socket is open to its group");
    let gid = Command::new("getent").args(["group", &group]).output().unwrap();
    let gid: u32 = String::from_utf8_lossy(&gid.stdout).split(':').nth(2).unwrap().parse().unwrap();
    assert_eq!(socket.gid(), gid);

    // Alice dumps her own process into her own folder: the checkpoint is root's alone. CRIU reads the
    // rlimits of a process of another uid than its own only with CAP_SYS_RESOURCE, which root lacks on
    // these machines: there the daemon lets the dump through and CRIU fails it, cleanly.
    let counter = alice.counter("counter");
    wait_for("alice's counter to count", Duration::from_secs(10), || {
        (std::fs::metadata(alice.home.join("counter.log")).ok()?.len() > 0).then_some(())
    });
    assert_eq!(uid_of(counter), alice.uid);
    let mine = alice.home.join("ckpt");
    let mkdir = alice.command(Path::new("mkdir")).arg(&mine).status().unwrap();
    assert!(mkdir.success());
    let dump_mine =
        alice.cedana(&d, &["dump", "process", &counter.to_string(), "--dir", mine.to_str().unwrap(), "--leave-running"]);
    let ckpt = if has_cap_sys_resource() {
        assert!(dump_mine.status.success(), "{}", String::from_utf8_lossy(&dump_mine.stderr));
        let ckpt = dumped_path(&String::from_utf8_lossy(&dump_mine.stdout));
        assert!(ckpt.starts_with(&mine), "{}", ckpt.display());
        let meta = std::fs::metadata(&ckpt).unwrap();
        assert_eq!((meta.uid(), meta.mode() & 0o777), (0, 0o600), "a user's checkpoint is root's, 0600");
        let read = alice.command(Path::new("cat")).arg(&ckpt).stdout(Stdio::null()).stderr(Stdio::null()).status().unwrap();
        assert!(!read.success(), "nobody but root reads a checkpoint (it holds process memory)");
        Some(ckpt)
    } else {
        let err = String::from_utf8_lossy(&dump_mine.stderr);
        assert!(!dump_mine.status.success() && err.contains("Can't get rlimit"), "CRIU, not the daemon, refuses: {err}");
        assert!(std::fs::read_dir(&mine).unwrap().next().is_none(), "nothing written");
        None
    };
    assert!(alive(counter));

    // Refusals: a folder that is not there, a folder she cannot write, another user's process, a process of root, containers, object stores.
    let err = alice.err(&d, &["dump", "process", &counter.to_string(), "--dir", alice.home.join("nope").to_str().unwrap()]);
    assert!(err.contains("does not exist: create the folder first"), "{err}");
    std::fs::create_dir_all(d.checkpoints()).unwrap();
    let err = alice.err(&d, &["dump", "process", &counter.to_string(), "--leave-running"]);
    assert!(err.contains("not writable by uid") && err.contains("permission denied"), "{err}");
    let err = bob.err(&d, &["dump", "process", &counter.to_string(), "--dir", bob.home.to_str().unwrap()]);
    assert!(err.contains("does not run as uid"), "{err}");
    assert!(alive(counter));
    let mut root_sleep = Command::new("sleep").arg("600").spawn().unwrap();
    let root_pid = root_sleep.id() as i32;
    let err = alice.err(&d, &["dump", "process", &root_pid.to_string(), "--dir", mine.to_str().unwrap()]);
    assert!(err.contains("does not run as uid"), "{err}");
    let err = alice.err(&d, &["manage", "process", &root_pid.to_string()]);
    assert!(err.contains("does not run as uid"), "{err}");
    root_sleep.kill().unwrap();
    root_sleep.wait().unwrap();
    let err = alice.err(&d, &["manage", "runc", "some-container"]);
    assert!(err.contains("root only"), "{err}");
    let err = alice.err(&d, &["dump", "process", &counter.to_string(), "--dir", "s3://bucket/x"]);
    assert!(err.contains("object stores"), "{err}");
    // A link to a folder she may not write is followed by her own CLI, then refused by the daemon.
    std::os::unix::fs::symlink(d.checkpoints(), alice.home.join("link")).unwrap();
    let err = alice.err(&d, &["dump", "process", &counter.to_string(), "--dir", alice.home.join("link").to_str().unwrap()]);
    assert!(err.contains("permission denied"), "{err}");

    // She restores her checkpoint, even moved; the restored process is hers. Bob cannot restore it.
    kill(counter);
    if let Some(ckpt) = &ckpt {
        let moved = alice.home.join("moved.tar.zst");
        assert!(alice.command(Path::new("mv")).arg(ckpt).arg(&moved).status().unwrap().success());
        let out = alice.ok(&d, &["restore", "process", "--path", moved.to_str().unwrap()]);
        let restored = printed_pid(&out);
        assert_eq!(uid_of(restored), alice.uid, "{out}");
        let err = bob.err(&d, &["restore", "process", "--path", moved.to_str().unwrap()]);
        assert!(err.contains("a checkpoint of another user"), "{err}");
        kill(restored);
    }
    // Nobody restores a checkpoint they made themselves, nor one root made.
    let fake = bob.home.join("fake.tar.zst");
    assert!(bob.command(Path::new("cp")).arg("/bin/true").arg(&fake).status().unwrap().success());
    let err = bob.err(&d, &["restore", "process", "--path", fake.to_str().unwrap()]);
    assert!(err.contains("not a checkpoint the daemon wrote"), "{err}");
    // Started as the other tests start workloads (a session of its own, no descriptor of the test's).
    let root_counter = Workload::start(&workload_bin("counter"), &[], base.path());
    let out = d.ok(&["dump", "process", &root_counter.pid.to_string(), "--dir", bob.home.to_str().unwrap()]);
    drop(root_counter);
    let roots = dumped_path(&out);
    let err = bob.err(&d, &["restore", "process", "--path", roots.to_str().unwrap()]);
    assert!(err.contains("not a checkpoint the daemon wrote"), "{err}");
    let err = bob.err(&d, &["restore", "process", "--path", roots.to_str().unwrap(), "--log", "/etc/x"]);
    assert!(err.contains("for root only"), "{err}");

    // Jobs: hers run as her, only she (and root) sees and acts on them.
    let out = alice.ok(&d, &["run", "process", "--jid", "alices", "--", workload_bin("counter").to_str().unwrap()]);
    let job_pid = printed_pid(&out);
    assert_eq!(uid_of(job_pid), alice.uid);
    let seen = |u: &TestUser| rows(&u.ok(&d, &["ps"])).iter().any(|r| r.first().is_some_and(|c| c == "alices"));
    assert!(seen(&alice));
    assert!(!seen(&bob), "bob does not see alice's job");
    assert!(rows(&d.ok(&["ps"])).iter().any(|r| r[0] == "alices"), "root sees every job");
    for args in [&["job", "kill", "alices"][..], &["dump", "job", "alices"], &["job", "inspect", "alices"]] {
        let err = bob.err(&d, args);
        assert!(err.contains("belongs to another user"), "{args:?}: {err}");
    }
    let err = alice.err(&d, &["run", "process", "--out", "/etc/x", "--", "true"]);
    assert!(err.contains("permission denied"), "{err}");
    let dump_job = alice.cedana(&d, &["dump", "job", "alices", "--dir", mine.to_str().unwrap()]);
    if has_cap_sys_resource() {
        assert!(dump_job.status.success(), "{}", String::from_utf8_lossy(&dump_job.stderr));
        let out = alice.ok(&d, &["restore", "job", "alices"]);
        let again = printed_pid(&out);
        assert_eq!(uid_of(again), alice.uid);
    } else {
        assert!(String::from_utf8_lossy(&dump_job.stderr).contains("Can't get rlimit"));
        assert!(alive(job_pid), "the job runs on");
    }
    alice.ok(&d, &["job", "kill", "alices"]);
    let _ = std::fs::remove_file("/var/log/cedana-output-alices.log");
}

/// Whether this process holds CAP_SYS_RESOURCE (bit 24 of its effective capabilities).
fn has_cap_sys_resource() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:")).unwrap().trim();
    u64::from_str_radix(hex, 16).unwrap() & (1 << 24) != 0
}
#[test]
fn the_socket_is_roots_alone_by_default() {
    let base = tempfile::tempdir().unwrap();
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let group = format!("cdgrq{}", std::process::id());
    assert!(Command::new("groupadd").arg(&group).status().unwrap().success());
    let carol = TestUser::create("c", &group, base.path());
    let d = Daemon::start();
    std::fs::set_permissions(d.dir(), std::fs::Permissions::from_mode(0o711)).unwrap();
    assert_eq!(std::fs::metadata(d.socket()).unwrap().mode() & 0o777, 0o600);
    let err = carol.err(&d, &["ps"]);
    assert!(err.contains("not open to this user") && err.contains("daemon.socket_group"), "{err}");
    let err = carol.err(&d, &["dump", "process", "1"]);
    assert!(err.contains("needs root") && err.contains("socket"), "{err}");
    drop(carol);
    let _ = Command::new("groupdel").arg(&group).status();
}
