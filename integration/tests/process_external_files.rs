//! A process in a mount namespace of its own whose stdout and stderr are a host file it cannot reach by path
//! any more: started as `unshare --mount sh -c 'mount -t tmpfs none DIR; exec counter' > DIR/out.log`, the
//! file was opened in our namespace, and the tmpfs hides DIR in its own. CRIU dumps the namespace with the
//! tree, but not such a file ("Can't lookup mount=N for fd=1"): `cedana dump process` marks it external, and
//! `cedana restore process` reconnects it, to the same file by default (the output goes on in it) or where
//! `--external-file` says. Run as root: `cargo test -p cedana-integration --test process_external_files`.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use cedana_integration::workload::session_command;
use cedana_integration::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const T: Duration = Duration::from_secs(20);

/// The counter, in a mount namespace of its own with a tmpfs over `hidden`, writing to `log` (in `hidden`,
/// opened here). Killed (its group, by PID) when dropped: the restored process keeps the PID and group.
struct Hidden {
    pid: i32,
    child: Option<Child>,
    log: PathBuf,
    hidden: PathBuf,
}

impl Hidden {
    fn start(dir: &Path) -> Hidden {
        let hidden = dir.join("hidden");
        std::fs::create_dir_all(&hidden).unwrap();
        let log = hidden.join("out.log");
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd = session_command(Path::new("unshare"));
        cmd.args(["--mount", "--propagation", "private", "sh", "-c", r#"mount -t tmpfs none "$1" && exec "$2""#, "sh"])
            .arg(&hidden)
            .arg(workload_bin("counter"))
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .current_dir("/");
        let child = cmd.spawn().expect("unshare (util-linux) must be installed");
        let pid = child.id() as i32;
        let h = Hidden { pid, child: Some(child), log, hidden };
        h.wait_numbers(5);
        // The counter runs (exec'ed by the shell once the tmpfs is mounted), and the log is out of its sight.
        assert_eq!(std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap().trim(), "counter");
        assert!(h.has_tmpfs_over_hidden(), "the tmpfs must be mounted in the workload's namespace");
        assert!(!mounts_of("self").contains(&format!(" {} ", h.hidden.display())), "and only there");
        h
    }

    fn numbers(&self) -> Vec<u64> {
        numbers_in(&self.log)
    }

    fn wait_numbers(&self, n: usize) -> Vec<u64> {
        wait_for(&format!("more than {n} numbers in {}", self.log.display()), T, || {
            let got = numbers_in(&self.log);
            (got.len() > n).then_some(got)
        })
    }

    /// Whether the process's mount namespace has the tmpfs over the hidden folder.
    fn has_tmpfs_over_hidden(&self) -> bool {
        let mountpoint = format!(" {} ", self.hidden.display());
        mounts_of(&self.pid.to_string()).lines().any(|l| l.contains(&mountpoint) && l.contains(" - tmpfs "))
    }

    /// Reap the original after a dump ended it (a restored one is not our child), and wait until its PID
    /// is free.
    fn gone(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
        wait_for("the dumped process to be gone", T, || (!Path::new(&format!("/proc/{}", self.pid)).exists()).then_some(()));
    }
}

impl Drop for Hidden {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(-self.pid), Signal::SIGKILL);
        let _ = kill(Pid::from_raw(self.pid), Signal::SIGKILL);
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }
}

fn mounts_of(pid: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap_or_default()
}

fn mount_ns(pid: &str) -> u64 {
    std::fs::metadata(format!("/proc/{pid}/ns/mnt")).unwrap().ino()
}

/// The counter's numbers in a file, skipping the zeros a restore onto a new file leaves in front.
fn numbers_in(file: &Path) -> Vec<u64> {
    let bytes = std::fs::read(file).unwrap_or_default();
    String::from_utf8_lossy(&bytes).split(['\n', '\0']).filter_map(|l| l.trim().parse().ok()).collect()
}

fn assert_counts_from_one(numbers: &[u64], what: &str) {
    assert_eq!(numbers.first(), Some(&1), "{what}: {numbers:?}");
    assert!(numbers.windows(2).all(|p| p[1] == p[0] + 1), "{what} (a gap or a restart): {numbers:?}");
}

/// `cedana ARGS` with the given CRIU driver.
fn cedana_with(driver: &str, args: &[&str]) -> Output {
    cedana_cmd(args).env("CEDANA_CRIU_DRIVER", driver).stdin(Stdio::null()).output().unwrap()
}

fn ok_with(driver: &str, args: &[&str]) -> String {
    success_stdout(&format!("cedana {} ({driver} driver)", args.join(" ")), &cedana_with(driver, args))
}

/// Dump `h` into `dir/NAME.tar.zst` (ending it) and return the checkpoint's path.
fn dump(h: &mut Hidden, driver: &str, dir: &Path, name: &str) -> String {
    let pid = h.pid.to_string();
    let out = ok_with(
        driver,
        &["dump", "process", &pid, "--no-server", "--dir", dir.to_str().unwrap(), "--name", name, "--compression", "zstd"],
    );
    assert!(out.contains(&format!("Dumped PID {pid}")), "{out}");
    h.gone();
    let path = dir.join(format!("{name}.tar.zst"));
    assert!(path.is_file(), "{out}");
    path.display().to_string()
}

/// The names of the files a checkpoint holds, from its manifest.
fn files_of(checkpoint: &str) -> Vec<String> {
    let out = Command::new(bin("cedana")).args(["checkpoint", "inspect", "--json", checkpoint]).output().unwrap();
    let m: serde_json::Value = serde_json::from_slice(&out.stdout).expect("inspect --json prints the manifest");
    m["files"].as_array().expect("a file list").iter().filter_map(|f| f["name"].as_str().map(str::to_string)).collect()
}

#[test]
fn a_process_in_its_own_mount_namespace_writes_on_into_the_same_host_file_with_either_driver() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let mut h = Hidden::start(tmp.path());
    let pid = h.pid.to_string();
    let ours = mount_ns("self");
    assert_ne!(mount_ns(&pid), ours);
    for (round, driver) in ["swrk", "cli"].into_iter().enumerate() {
        let cp = dump(&mut h, driver, tmp.path(), &format!("cp-{driver}"));
        assert!(files_of(&cp).contains(&"process/restore.json".to_string()), "the restore record is in the checkpoint");
        let at_dump = h.numbers();
        assert!(!at_dump.is_empty());
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(h.numbers(), at_dump, "{driver}: nothing writes while the process is checkpointed");
        let out = ok_with(driver, &["restore", "process", "--path", &cp, "--no-server", "--detach"]);
        assert!(out.contains(&format!("Restored PID {pid}")), "{driver}: {out}");
        let after = h.wait_numbers(at_dump.len() + 10);
        assert_counts_from_one(&after, &format!("{driver}: the log after restore {}", round + 1));
        // The namespace came back with the tree: its own, with the tmpfs still hiding the log's folder.
        assert_ne!(mount_ns(&pid), ours, "{driver}");
        assert!(h.has_tmpfs_over_hidden(), "{driver}: the restored namespace has the tmpfs:\n{}", mounts_of(&pid));
    }
}

#[test]
fn a_redirected_restore_writes_into_the_new_file_and_a_redirect_matching_nothing_is_refused() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let mut h = Hidden::start(tmp.path());
    let pid = h.pid.to_string();
    let cp = dump(&mut h, "swrk", tmp.path(), "cp");
    let at_dump = h.numbers();
    let old_size = std::fs::metadata(&h.log).unwrap().len();

    // A redirect for a descriptor that held no external file: refused before anything is restored.
    let out = cedana_with(
        "swrk",
        &["restore", "process", "--path", &cp, "--no-server", "--detach", "--external-file", "7=/tmp/nowhere.log"],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("7=/tmp/nowhere.log") && err.contains("out.log"), "{err}");
    assert!(!alive(h.pid), "nothing was restored");

    let new = tmp.path().join("new.log");
    let redirect = format!("1={}", new.display());
    let out = ok_with("cli", &["restore", "process", "--path", &cp, "--no-server", "--detach", "--external-file", &redirect]);
    assert!(out.contains(&format!("Restored PID {pid}")), "{out}");
    let got = wait_for("numbers in the new file", T, || {
        let n = numbers_in(&new);
        (n.len() > 10).then_some(n)
    });
    // Zeros up to the offset the process had, then the count going on from where it was.
    assert_eq!(got.first(), Some(&(at_dump.last().unwrap() + 1)), "{got:?}");
    assert!(got.windows(2).all(|p| p[1] == p[0] + 1), "{got:?}");
    assert_eq!(std::fs::read(&new).unwrap()[..old_size as usize].iter().filter(|b| **b != 0).count(), 0);
    // stdout and stderr were one file: both went to the new one, and the old one is left as it was.
    assert_eq!(std::fs::metadata(&h.log).unwrap().len(), old_size);
    assert_eq!(h.numbers(), at_dump);
}
