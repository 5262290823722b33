//! `cedana run containerd IMAGE`: the daemon creates a container from an image imported into a private
//! containerd, on our shim, and runs it as a job (its task's init as the job's PID, its output in the job's
//! log); `dump job` and `restore job` checkpoint it and bring it back in place, still writing to the log;
//! unknown images and taken ids are refused with errors that say what to do; an image whose `User` is a name
//! runs as that user of its /etc/passwd, with its groups of /etc/group, as `ctr run` would run it.
//! Build first, then run as root:
//! `cargo build --workspace && cargo test -p cedana-integration --test daemon_containerd_run`.

use std::path::PathBuf;
use std::time::Duration;

use cedana_integration::attach::client;
use cedana_integration::daemon::{consecutive, numbers_in, wait_for_count, Daemon};
use cedana_integration::engines::{put_shim_on_path, Containerd};
use cedana_integration::images::{busybox_rootfs, oci_image_tar_with_config};
use cedana_integration::{bin, require_root, wait_for};

const CEDANA_SHIM: &str = "io.containerd.cedana.v2";
const T: Duration = Duration::from_secs(30);
/// Prints a count to stdout, ten a second.
const COUNTER: &str = "i=0; while true; do echo $i; i=$((i+1)); sleep 0.1; done";

struct Setup {
    // Dropped in this order: the daemon, then containerd (which removes the test's containers).
    daemon: Daemon,
    containerd: Containerd,
    image: String,
    tmp: tempfile::TempDir,
}

fn setup(image: &str) -> Setup {
    require_root();
    bin("containerd-shim-cedana-v2");
    bin("cedana-runc");
    put_shim_on_path();
    let tmp = tempfile::tempdir().unwrap();
    let containerd = Containerd::start(&tmp.path().join("containerd"));
    let rootfs = busybox_rootfs(&tmp.path().join("rootfs"));
    let image = format!("docker.io/cedana/{image}:latest");
    containerd.import(&rootfs, &image);
    Setup { daemon: Daemon::start(), containerd, image, tmp }
}

impl Setup {
    /// Imports a busybox image named `docker.io/cedana/{name}:latest` whose config runs `sleep 1000` as
    /// `user`, with `passwd` and `group` as its /etc/passwd and /etc/group; its name.
    fn import_with_user(&self, name: &str, user: &str, passwd: &str, group: &str) -> String {
        let work = self.tmp.path().join(name);
        let rootfs = busybox_rootfs(&work.join("rootfs"));
        std::fs::write(rootfs.join("etc/passwd"), passwd).unwrap();
        std::fs::write(rootfs.join("etc/group"), group).unwrap();
        let image = format!("docker.io/cedana/{name}:latest");
        let config = serde_json::json!({ "Env": ["PATH=/bin"], "Cmd": ["/bin/sleep", "1000"], "User": user });
        let tar = oci_image_tar_with_config(&rootfs, &work, &image, config);
        self.containerd.ok(&["image", "import", tar.to_str().unwrap()]);
        image
    }

    /// `cedana run containerd IMAGE --address SOCK --namespace NS EXTRA...`, unrun arguments.
    fn run_args(&self, image: &str, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = ["run", "containerd", image].iter().map(|s| s.to_string()).collect();
        args.extend(["--address".into(), self.containerd.socket.display().to_string()]);
        args.extend(["--namespace".into(), self.containerd.namespace.clone()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    fn run_ok(&self, image: &str, extra: &[&str]) -> String {
        let args = self.run_args(image, extra);
        self.daemon.ok(&args.iter().map(String::as_str).collect::<Vec<_>>())
    }

    fn run_err(&self, image: &str, extra: &[&str]) -> String {
        let args = self.run_args(image, extra);
        self.daemon.err(&args.iter().map(String::as_str).collect::<Vec<_>>())
    }
}

#[test]
fn a_container_run_from_an_image_is_a_job_that_is_dumped_and_restored_writing_on_in_its_log() {
    let s = setup("run-job");
    let out = s.run_ok(&s.image, &["--id", "c1", "--jid", "j1", "--", "/bin/sh", "-c", COUNTER]);
    assert_eq!(s.containerd.task_status("c1").as_deref(), Some("RUNNING"), "ctr task ls shows it running");
    let pid = s.containerd.task_pid("c1");
    let first = out.lines().next().unwrap_or_default();
    assert_eq!(first.split_whitespace().collect::<Vec<_>>(), ["j1", pid.to_string().as_str()], "{out}");
    let info = s.containerd.ok(&["container", "info", "c1"]);
    assert!(info.contains(CEDANA_SHIM) && info.contains(&s.image), "on our shim, from the image: {info}");

    let row = s.daemon.row("j1");
    assert_eq!(row[1], "containerd", "{row:?}");
    assert_eq!(row[2], pid.to_string(), "{row:?}");
    // The counter sleeps between lines, but a listing may catch it running (R) on a loaded machine.
    let row = wait_for("the job's process to show as sleeping", T, || {
        let row = s.daemon.row("j1");
        (row[3] == "sleep").then_some(row)
    });
    assert_eq!(row[3], "sleep", "a running job shows its process's state: {row:?}");
    let log = PathBuf::from(row.last().unwrap());
    let before = wait_for_count(&log, 10, T);
    assert_eq!(before[0], 0, "the log holds the counter's output from the start: {before:?}");
    assert!(consecutive(&before), "{before:?}");

    let out = s.daemon.ok(&["dump", "job", "j1"]);
    let path = out.lines().last().and_then(|l| l.split_whitespace().last()).unwrap_or_default().to_string();
    assert!(std::path::Path::new(&path).exists(), "the last field is the checkpoint: {out}");
    wait_for("the dumped task to stop", T, || (s.containerd.task_status("c1").as_deref() == Some("STOPPED")).then_some(()));
    s.daemon.wait_status("j1", &["halted"]);
    let at_dump = numbers_in(&log);

    s.daemon.ok(&["restore", "job", "j1"]);
    assert_eq!(s.containerd.task_status("c1").as_deref(), Some("RUNNING"), "restored in place, under the same id");
    let restored = s.containerd.task_pid("c1");
    let row = s.daemon.row("j1");
    assert_eq!(row[2], restored.to_string(), "ps shows the restored init: {row:?}");
    let after = wait_for_count(&log, at_dump.len() + 10, T);
    assert_eq!(after[0], 0, "{after:?}");
    assert!(consecutive(&after), "the count goes on in the log without a gap or a repeat: {after:?}");
}

#[test]
fn unknown_images_and_taken_ids_are_refused_clearly() {
    let s = setup("run-errors");
    let e = s.run_err("docker.io/cedana/not-there:latest", &["--id", "x1", "--", "/bin/true"]);
    assert!(e.contains("not-there") && e.contains("ctr") && e.contains("image pull"), "{e}");
    assert!(s.containerd.ok(&["container", "ls", "-q"]).trim().is_empty(), "nothing was created");

    s.run_ok(&s.image, &["--id", "taken", "--jid", "first", "--", "/bin/sleep", "1000"]);
    let e = s.run_err(&s.image, &["--id", "taken", "--jid", "second", "--", "/bin/sleep", "1000"]);
    assert!(e.contains("already exists") && e.contains("taken"), "{e}");
    assert!(e.to_lowercase().contains("alreadyexists") || e.contains("already"), "{e}");
    let ps = s.daemon.ps();
    assert!(ps.iter().all(|r| r[0] != "second"), "no job recorded for the refused run: {ps:?}");
    assert_eq!(s.daemon.row("first")[2], s.containerd.task_pid("taken").to_string(), "the first job is untouched");
}

/// The values of line `key` (`Uid`, `Gid`, `Groups`) of /proc/PID/status.
fn status_ids(pid: i32, key: &str) -> Vec<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find_map(|l| l.strip_prefix(&format!("{key}:"))).unwrap_or_else(|| panic!("{key} in {status}"));
    line.split_whitespace().map(|n| n.parse().unwrap()).collect()
}

const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\napp:x:1234:2345:app:/:/bin/sh\n";
const GROUP: &str = "root:x:0:\napp:x:2345:app\nextra:x:3456:other,app\nwheel:x:10:root\n";

#[test]
fn an_image_whose_user_is_a_name_runs_as_that_user_with_its_groups() {
    let s = setup("run-users");
    let image = s.import_with_user("run-users-app", "app", PASSWD, GROUP);
    s.run_ok(&image, &["--id", "u1", "--jid", "u1"]);
    let pid = s.containerd.task_pid("u1");
    assert_eq!(status_ids(pid, "Uid"), [1234; 4], "real, effective, saved and fs uid are app's");
    assert_eq!(status_ids(pid, "Gid"), [2345; 4], "app's gid from /etc/passwd");
    assert_eq!(status_ids(pid, "Groups"), [3456], "the group listing app, not app's own group nor root's");
    assert!(s.containerd.ok(&["snapshot", "ls"]).contains("u1"), "the container's snapshot is in place");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains("cedana-rootfs-"), "the snapshot mounted to read the users is unmounted: {mounts}");

    // USER:GROUP, a name and a group name.
    let image = s.import_with_user("run-users-pair", "app:extra", PASSWD, GROUP);
    s.run_ok(&image, &["--id", "u2", "--jid", "u2"]);
    let pid = s.containerd.task_pid("u2");
    assert_eq!(status_ids(pid, "Uid"), [1234; 4]);
    assert_eq!(status_ids(pid, "Gid"), [3456; 4], "the named group's gid from /etc/group");
}

#[test]
fn an_image_user_missing_from_its_passwd_is_refused_naming_user_and_image() {
    let s = setup("run-users-missing");
    let image = s.import_with_user("run-users-nobody", "nobody", PASSWD, GROUP);
    let e = s.run_err(&image, &["--id", "n1", "--jid", "n1"]);
    assert!(e.contains("\"nobody\"") && e.contains(&image) && e.contains("/etc/passwd"), "{e}");
    assert!(e.contains("numeric"), "says what to do: {e}");
    assert!(!s.containerd.ok(&["container", "ls", "-q"]).contains("n1"), "no container was left");
    assert!(!s.containerd.ok(&["snapshot", "ls"]).contains("n1"), "the prepared snapshot was removed");
    assert!(s.daemon.ps().iter().all(|r| r[0] != "n1"), "no job recorded for the refused run");
}

#[test]
fn an_attachable_container_job_takes_input_and_gives_output_through_a_dump_a_restore_and_a_daemon_crash() {
    let mut s = setup("attach-job");
    // Echoes each line it reads, and says when its stdin ends.
    let script = "while read l; do echo got:$l; done; echo stdin-closed";
    let log = s.tmp.path().join("a1.log");
    let out = ["--id", "a1", "--jid", "a1", "--attachable", "--out", log.to_str().unwrap()];
    s.run_ok(&s.image, &[&out[..], &["--", "/bin/sh", "-c", script]].concat());
    let row = s.daemon.row("a1");
    assert_eq!((row[1].as_str(), row.last().unwrap().as_str()), ("containerd", "[Attachable]"), "{row:?}");
    // Type a line, read the answer; Ctrl+C detaches and the container runs on.
    let echo = |s: &Setup, line: &str| {
        let mut c = client(&s.daemon, &["job", "attach", "a1"]);
        c.type_in(&format!("{line}\n"));
        let got = wait_for(&format!("the answer to {line}"), T, || {
            let lines = c.stdout.snapshot();
            lines.iter().any(|l| l == &format!("got:{line}")).then_some(lines)
        });
        c.detach("a1");
        got
    };
    echo(&s, "one");
    assert_eq!(s.containerd.task_status("a1").as_deref(), Some("RUNNING"), "detaching leaves the container running");

    s.daemon.ok(&["dump", "job", "a1"]);
    s.daemon.wait_status("a1", &["halted"]);
    s.daemon.ok(&["restore", "job", "a1"]);
    assert_eq!(s.containerd.task_status("a1").as_deref(), Some("RUNNING"));
    assert_eq!(s.daemon.row("a1").last().unwrap(), "[Attachable]", "still attachable after its restore");
    let after_restore = echo(&s, "two");
    assert!(!after_restore.contains(&"got:one".to_string()), "a restored job's replay starts afresh: {after_restore:?}");

    // The daemon crashes: the FIFOs stay held (by the stdio holder), and the restarted daemon takes them back.
    s.daemon.kill_hard();
    s.daemon.spawn();
    echo(&s, "three");

    // End of file on a client's stdin reaches the container through the shim.
    let mut c = client(&s.daemon, &["job", "attach", "a1"]);
    c.close_stdin();
    c.wait();
    wait_for("the container to end", T, || (s.containerd.task_status("a1").as_deref() == Some("STOPPED")).then_some(()));
    // The log has it all, through the dump, the restore and the daemon's crash.
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(text.contains("got:one\ngot:two\ngot:three\nstdin-closed\n"), "{text}");
    s.daemon.wait_status("a1", &["exited"]);
    s.daemon.ok(&["job", "delete", "a1"]);
}
