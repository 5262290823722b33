//! `containerd-shim-cedana-v2` with terminals under a private containerd: `ctr run -t` and `ctr task exec -t`
//! (run inside a pseudo-terminal the test creates, since ctr needs its own stdin to be one), window sizes, exit
//! codes compared with the stock runc shim, the shim's descriptors after a terminal exec, and what ctr 1.6 makes of
//! a checkpointed terminal container (it cannot restore one with a terminal: see the last test; the shim's terminal
//! restore is tested at the TaskManager level, in `shim/src/task/tests/terminal.rs`).
//! Build first, then run as root: `cargo build --workspace && cargo test -p cedana-integration --test shim_terminal`.

use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Child, Stdio};
use std::time::Duration;

use cedana_integration::engines::{wait_child, ShimHost};
use cedana_integration::lines::Lines;
use cedana_integration::wait_for;

const RUNTIME: &str = "io.containerd.cedana.v2";
const RUNC_SHIM: &str = "io.containerd.runc.v2";
const SHIM: &str = "containerd-shim-cedana-v2";
const T: Duration = Duration::from_secs(30);

/// The private containerd of [`ShimHost`], with this file's ctr helpers.
struct Setup(ShimHost);

impl std::ops::Deref for Setup {
    type Target = ShimHost;
    fn deref(&self) -> &ShimHost {
        &self.0
    }
}

fn setup() -> Setup {
    Setup(ShimHost::start())
}

/// A ctr process whose stdin, stdout and stderr are the slave end of a pseudo-terminal of the test, which is
/// also its controlling terminal (in a session of its own); its output is read from the master end.
struct Attached {
    child: Child,
    out: Lines,
    /// The master end, to resize the terminal (the kernel then sends ctr SIGWINCH, and ctr resizes the process's
    /// terminal through containerd: `ResizePty`; Debian's ctr 1.6 has no `ctr task resize`).
    master: OwnedFd,
}

impl Attached {
    /// Spawn `cmd` on a new pseudo-terminal of `rows` x `cols`.
    fn spawn(mut cmd: std::process::Command, rows: u16, cols: u16) -> Attached {
        let (mut master, mut slave) = (-1, -1);
        let size = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: openpty writes two descriptors into the integers; the name pointer may be null and the termios
        // and winsize pointers are valid (or null) for the call.
        let rc = unsafe { libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), &size) };
        assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: openpty just opened both; nothing else owns them.
        let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        cmd.stdin(Stdio::from(slave.try_clone().unwrap()))
            .stdout(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::from(slave));
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn ctr");
        // Our copies of the slave went with the command: the master reads EIO once ctr is gone.
        drop(cmd);
        let reader = std::fs::File::from(master.try_clone().unwrap());
        Attached { child, out: Lines::read(reader), master }
    }

    /// Set the window size of ctr's terminal (ctr gets SIGWINCH).
    fn resize(&self, rows: u16, cols: u16) {
        use std::os::fd::AsRawFd;
        let size = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: TIOCSWINSZ reads one winsize from the pointer, valid for the call.
        let rc = unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &size) };
        assert_eq!(rc, 0, "TIOCSWINSZ: {}", std::io::Error::last_os_error());
    }

    /// Wait for ctr's exit; its exit code and every line it printed (trimmed).
    fn finish(mut self) -> (Option<i32>, Vec<String>) {
        let status = wait_child(&mut self.child, T);
        let lines = self.out.wait_closed(T).into_iter().map(|l| l.trim().to_string()).collect();
        (status.code(), lines)
    }

    /// Wait for a line satisfying `f`.
    fn line(&self, what: &str, f: impl Fn(&str) -> bool) -> String {
        self.out.wait_line(what, T, |l| f(l.trim())).trim().to_string()
    }
}

fn is_pts(l: &str) -> bool {
    l.starts_with("/dev/pts/")
}

impl Setup {
    /// `ctr run -t --rm` of `script` on `runtime` under a `rows` x `cols` terminal.
    fn run_tty(&self, runtime: &str, id: &str, script: &str, rows: u16, cols: u16) -> Attached {
        let mut cmd = self.d.ctr_cmd(&["run", "-t", "--rm", "--runtime", runtime, "--rootfs"]);
        cmd.arg(&self.rootfs).args([id, "/bin/sh", "-c", script]);
        Attached::spawn(cmd, rows, cols)
    }

    /// `ctr task exec -t --exec-id EXEC TASK /bin/sh -c SCRIPT` under a `rows` x `cols` terminal.
    fn exec_tty(&self, task: &str, exec_id: &str, script: &str, rows: u16, cols: u16) -> Attached {
        let cmd = self.d.ctr_cmd(&["task", "exec", "-t", "--exec-id", exec_id, task, "/bin/sh", "-c", script]);
        Attached::spawn(cmd, rows, cols)
    }

    /// `ctr run -t` (attached, the container kept) of `script` from `image` on `runtime` under a `rows` x `cols`
    /// terminal.
    fn run_tty_image(&self, runtime: &str, image: &str, id: &str, script: &str, rows: u16, cols: u16) -> Attached {
        let cmd = self.d.ctr_cmd(&["run", "-t", "--runtime", runtime, image, id, "/bin/sh", "-c", script]);
        Attached::spawn(cmd, rows, cols)
    }

    /// `ctr run -d` of `args` on `runtime`, waiting until it runs.
    fn run_detached(&self, runtime: &str, id: &str, args: &[&str]) {
        let mut cmd = self.d.ctr_cmd(&["run", "--runtime", runtime, "--detach", "--rootfs"]);
        cmd.arg(&self.rootfs).arg(id).args(args);
        let out = cmd.stdin(Stdio::null()).output().expect("ctr run");
        assert!(out.status.success(), "ctr run --detach {id}: {}", String::from_utf8_lossy(&out.stderr));
        wait_for("the task to run", T, || (self.d.task_status(id).as_deref() == Some("RUNNING")).then_some(()));
    }
}

/// The counter's numbers among the lines an attached ctr printed (`n=K`).
fn printed(lines: &[String]) -> Vec<u64> {
    lines.iter().filter_map(|l| l.trim().strip_prefix("n=")?.parse().ok()).collect()
}

/// The PID of our shim serving task `id` (its command line has `-id ID`).
fn shim_pid(id: &str) -> i32 {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else { continue };
        let args: Vec<String> = cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        if args.first().is_some_and(|a| a.ends_with(SHIM)) && args.windows(2).any(|w| w[0] == "-id" && w[1] == id) {
            found.push(pid);
        }
    }
    assert_eq!(found.len(), 1, "one shim serves {id}: {found:?}");
    found[0]
}

/// The descriptors open in `pid`.
fn fds(pid: i32) -> Vec<String> {
    let dir = format!("/proc/{pid}/fd");
    let mut v: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| {
            let target = std::fs::read_link(e.path()).map(|t| t.display().to_string()).unwrap_or_default();
            format!("{} -> {target}", e.file_name().to_string_lossy())
        })
        .collect();
    v.sort();
    v
}

#[test]
fn run_with_a_terminal_gets_a_pty_its_size_and_the_exit_code_as_with_the_runc_shim() {
    let s = setup();
    let mut results = Vec::new();
    for (runtime, id) in [(RUNC_SHIM, "tty-runc"), (RUNTIME, "tty-cedana")] {
        // ctr passes its terminal's size on at start; `stty size` prints rows and columns.
        let (code, lines) = s.run_tty(runtime, id, "tty; sleep 0.5; stty size; exit 4", 33, 111).finish();
        assert_eq!(code, Some(4), "{runtime}: the container's exit code comes through ctr; output {lines:?}");
        assert!(lines.iter().any(|l| is_pts(l)), "{runtime}: tty names a pseudo-terminal: {lines:?}");
        assert!(lines.iter().any(|l| l == "33 111"), "{runtime}: the window size reached the container: {lines:?}");
        assert_eq!(s.d.task_status(id), None, "{runtime}: --rm deleted the task");
        results.push((code, lines.iter().filter(|l| !l.is_empty()).count()));
    }
    assert_eq!(results[0], results[1], "exit code and lines of output: runc shim vs ours");
}

#[test]
fn exec_with_a_terminal_gets_a_pty_its_size_and_the_exit_code_as_with_the_runc_shim() {
    let s = setup();
    let mut codes = Vec::new();
    for (runtime, id) in [(RUNC_SHIM, "exec-tty-runc"), (RUNTIME, "exec-tty-cedana")] {
        s.run_detached(runtime, id, &["/bin/sleep", "1000"]);
        let (code, lines) = s.exec_tty(id, "e1", "tty; sleep 0.5; stty size; exit 5", 27, 93).finish();
        assert_eq!(code, Some(5), "{runtime}: the exec's exit code comes through ctr; output {lines:?}");
        assert!(lines.iter().any(|l| is_pts(l)), "{runtime}: {lines:?}");
        assert!(lines.iter().any(|l| l == "27 93"), "{runtime}: the window size reached the exec: {lines:?}");
        codes.push(code);
        // ctr deleted the exec: its id can be used again, and the task runs on.
        let (again, _) = s.exec_tty(id, "e1", "exit 0", 24, 80).finish();
        assert_eq!(again, Some(0), "{runtime}");
        assert_eq!(s.d.task_status(id).as_deref(), Some("RUNNING"), "{runtime}");
    }
    assert_eq!(codes[0], codes[1]);
}

#[test]
fn resize_reaches_the_init_and_an_exec_and_a_terminal_exec_leaves_no_descriptor_behind() {
    let s = setup();
    let id = "tty-resize";
    let init = s.run_tty(RUNTIME, id, "tty; sleep 1000", 24, 80);
    let pts = init.line("the init's tty", is_pts);
    wait_for("the task to run", T, || (s.d.task_status(id).as_deref() == Some("RUNNING")).then_some(()));
    let shim = shim_pid(id);

    // ResizePty of the init: seen on its terminal from another process of the container.
    init.resize(40, 100);
    let mut n = 0;
    wait_for("stty -F TTY size in the container to say 40 100", T, || {
        n += 1;
        let out = s.d.ok(&["task", "exec", "--exec-id", &format!("chk{n}"), id, "/bin/stty", "-F", &pts, "size"]);
        (out.trim() == "40 100").then_some(())
    });

    // ResizePty of an exec, by its exec id, while it waits.
    let before = fds(shim);
    let exec = s.exec_tty(id, "e2", "sleep 2; stty size; exit 6", 24, 80);
    wait_for("the exec to start", T, || s.d.ok(&["task", "ps", id]).contains("ExecID:e2").then_some(()));
    let during = fds(shim).len();
    assert!(during > before.len(), "the exec's terminal and FIFOs are open in the shim while it runs ({during} fds)");
    // ctr resizes the exec to its own terminal's size right after the start: come after that.
    std::thread::sleep(Duration::from_millis(500));
    exec.resize(35, 120);
    let (code, lines) = exec.finish();
    assert_eq!(code, Some(6), "{lines:?}");
    assert!(lines.iter().any(|l| l == "35 120"), "the exec saw the resize: {lines:?}");

    // Its terminal, FIFOs and console socket are all closed again once ctr has deleted it.
    let settled = std::panic::catch_unwind(|| {
        wait_for("the shim's descriptor count to be as before the exec", T, || (fds(shim).len() == before.len()).then_some(()))
    });
    assert!(settled.is_ok(), "descriptors of the shim before the exec: {before:#?}\nafter: {:#?}", fds(shim));
    assert!(
        !cedana_integration::entries(&s.d.dir.join("state/io.containerd.runtime.v2.task").join(&s.d.namespace).join(id))
            .iter()
            .any(|n| n.starts_with("console-")),
        "no console socket left in the bundle"
    );
    // A bundle path too long for a socket address puts the socket in the temporary folder instead.
    let prefix = format!("console-{shim}-");
    let left: Vec<String> =
        cedana_integration::entries(&std::env::temp_dir()).into_iter().filter(|n| n.starts_with(&prefix)).collect();
    assert!(left.is_empty(), "console sockets left in the temporary folder: {left:?}");

    // Killing the init ends the attached ctr with the signal's code.
    s.d.ok(&["task", "kill", "-s", "SIGKILL", id]);
    let (code, _) = init.finish();
    assert_eq!(code, Some(137));
}

/// Prints its terminal, then counts on it.
const TTY_COUNTER: &str = "tty; i=0; while true; do echo n=$i; i=$((i+1)); sleep 0.2; done";

/// Debian's ctr 1.6.20 cannot restore a task with a terminal: `ctr run` has no `--checkpoint`, `ctr task start`
/// takes no checkpoint, and `ctr container restore --live` creates the task without a terminal (no stdio console:
/// its Create carries `terminal: false`) even when the checkpointed spec asks for one, so the runtime gets no
/// console socket and its restore refuses the spec's terminal (runc: "cannot allocate tty if runc will detach
/// without setting console socket"), as it would under the runc shim, which passes no console socket either.
/// What this checks of ours: a terminal container checkpoints through ctr, and the failed restore at Start
/// comes back to ctr with the runtime's reason and leaves the task created with nothing running, so that
/// `ctr task rm` removes it (`ctr task rm -f` would wait for an exit that never comes, with either shim: containerd's
/// forced delete kills, gets NotFound, then waits).
#[test]
fn ctr_1_6_restores_a_terminal_container_without_a_terminal_and_the_failed_restore_leaves_nothing_running() {
    let s = setup();
    let image = "docker.io/cedana/busybox-tty-cr:latest";
    s.d.import(&s.rootfs, image);
    let mut outcomes = Vec::new();
    for runtime in [RUNC_SHIM, RUNTIME] {
        let name = if runtime == RUNTIME { "cedana" } else { "runc" };
        let (id, restored, reference) =
            (format!("tty-cr-{name}"), format!("tty-cr-{name}-restored"), format!("cedana/tty-cr-{name}:1"));
        let original = s.run_tty_image(runtime, image, &id, TTY_COUNTER, 24, 80);
        original.line("the init's tty", is_pts);
        wait_for("the counter to count at the client", T, || (printed(&original.out.snapshot()).len() >= 3).then_some(()));
        let spec = s.d.ok(&["container", "info", &id]);
        assert!(spec.contains("\"terminal\": true"), "{runtime}: the container's spec asks for a terminal: {spec}");

        s.d.ok(&["container", "checkpoint", "--task", &id, &reference]);
        assert_eq!(s.d.task_status(&id).as_deref(), Some("RUNNING"), "{runtime}: the task runs on after the checkpoint");
        let n = printed(&original.out.snapshot()).len();
        wait_for("the counter to go on at the client", T, || (printed(&original.out.snapshot()).len() > n + 2).then_some(()));
        s.d.ok(&["task", "kill", "-s", "SIGKILL", &id]);
        let (code, lines) = original.finish();
        assert_eq!(code, Some(137), "{runtime}: the attached ctr ends with the kill: {lines:?}");

        let out = s.d.ctr(&["container", "restore", "--live", &restored, &reference]);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            stderr.contains("cannot allocate tty if runc will detach without setting console socket"),
            "{runtime}: the task was created without a terminal, so no console socket reached the runtime: {stderr}"
        );
        // The restore at Start failed: the task is still created, with no process.
        assert_eq!(s.d.task_status(&restored).as_deref(), Some("CREATED"), "{runtime}");
        assert_eq!(s.d.task_pid(&restored), 0, "{runtime}: nothing runs");
        let bundle = s.d.dir.join("state/io.containerd.runtime.v2.task").join(&s.d.namespace).join(&restored);
        let runtime_state = std::path::Path::new("/run/containerd/runc").join(&s.d.namespace).join(&restored);
        assert!(!runtime_state.exists(), "{runtime}: no container of the failed restore: {}", runtime_state.display());
        assert!(
            !cedana_integration::entries(&bundle).iter().any(|n| n.starts_with("console-")),
            "{runtime}: no console socket in the bundle"
        );
        s.d.ok(&["task", "rm", &restored]);
        assert_eq!(s.d.task_status(&restored), None, "{runtime}");
        s.d.ok(&["container", "rm", &restored]);
        outcomes.push(out.status.code());
    }
    assert_eq!(outcomes, [Some(1), Some(1)], "ctr container restore fails alike through the runc shim and ours");
}
