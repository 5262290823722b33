//! The fakes of NVIDIA's CUDA checkpoint stack (integration/fake-gpu) behave as the real ones on the paths
//! our GPU code uses: cuda-checkpoint's command line and state machine, lock timeouts, injected failures,
//! the driver API in libcuda.so.1, the CRIU flow of NVIDIA's README, process trees, and nvidia-smi.

use std::ffi::{CStr, CString};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use cedana_integration::gpu::{app_lines, expected_sum, last_app_line, wait_count, AppLine, FakeGpu};
use cedana_integration::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// A process (tree) the test started or restored: its group and PID are killed when dropped.
struct Proc {
    pid: i32,
    child: Option<Child>,
}

impl Proc {
    fn started(child: Child) -> Proc {
        Proc { pid: child.id() as i32, child: Some(child) }
    }

    /// Reap the original process after a dump killed it, so that its PID is free for the restore.
    fn reap(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(-self.pid), Signal::SIGKILL);
        let _ = kill(Pid::from_raw(self.pid), Signal::SIGKILL);
        self.reap();
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `cuda-checkpoint ARGS` must succeed; returns its stdout.
fn tool_ok(gpu: &FakeGpu, args: &[&str]) -> String {
    success_stdout(&format!("cuda-checkpoint {args:?}"), &gpu.run_cuda_checkpoint(args, &[]))
}

/// `cuda-checkpoint ARGS` (with `env`) must fail with exit 1 and a message naming `pid` and `error`.
fn tool_refused(gpu: &FakeGpu, args: &[&str], env: &[(&str, &str)], pid: i32, error: &str) -> String {
    let out = gpu.run_cuda_checkpoint(args, env);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "cuda-checkpoint {args:?} should fail: stdout {} stderr {err}", text(&out.stdout));
    assert!(err.contains(&format!("pid {pid}")) && err.contains(error), "cuda-checkpoint {args:?}: expected {error}: {err}");
    err
}

fn state(gpu: &FakeGpu, pid: i32) -> String {
    tool_ok(gpu, &["--get-state", "--pid", &pid.to_string()]).trim().to_string()
}

fn action(gpu: &FakeGpu, pid: i32, what: &str) {
    tool_ok(gpu, &["--action", what, "--pid", &pid.to_string()]);
}

/// Whether one of the process's descriptors points to a path containing `needle`.
fn fd_to(pid: i32, needle: &str) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.flatten().any(|e| std::fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy().contains(needle))))
        .unwrap_or(false)
}

fn maps(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default()
}

/// The address ranges of the device mappings: shared mappings of the fake nvidia0 (a 1:5 device, which
/// the kernel shows as "/dev/zero (deleted)").
fn device_mappings(pid: i32) -> Vec<String> {
    maps(pid)
        .lines()
        .filter(|l| {
            l.split_whitespace().nth(1).is_some_and(|p| p.ends_with('s')) && (l.contains("/dev/zero") || l.contains("nvidia"))
        })
        .map(|l| l.split_whitespace().next().unwrap_or_default().to_string())
        .collect()
}

/// Whether the process refers to the GPU: a descriptor of nvidia0, a device mapping, or "nvidia0" in its maps.
fn refers_to_gpu(pid: i32) -> bool {
    fd_to(pid, "nvidia0") || !device_mappings(pid).is_empty() || maps(pid).contains("nvidia0")
}

/// The counts of `pid` in the log must be 1, 2, 3, ... with the right checksums, and no line says CORRUPT.
fn assert_counts_and_sums(log: &Path, pid: i32, mib: u32) {
    let all = std::fs::read_to_string(log).unwrap_or_default();
    assert!(!all.contains("CORRUPT") && !all.contains("error"), "gpu-app reported a problem:\n{all}");
    let lines = app_lines(log, Some(pid));
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l.count, i as u64 + 1, "pid {pid}: a gap, repeat or restart at line {i}:\n{all}");
    }
    let last = lines.last().expect("some lines");
    assert_eq!(last.sum, expected_sum(mib, last.count), "pid {pid}: checksum of the device buffer at count {}", last.count);
}

fn start_app(gpu: &FakeGpu, mib: u32, children: u32, env: &[(&str, &str)]) -> (Proc, std::path::PathBuf) {
    let log = gpu.dir.join("gpu-app.log");
    let mut cmd = gpu.app_command(mib, children, &log);
    cmd.envs(env.iter().copied());
    let p = Proc::started(cmd.spawn().expect("start gpu-app"));
    wait_count(&log, p.pid, 1);
    (p, log)
}

fn sleeper() -> Proc {
    Proc::started(Command::new("sleep").arg("30").stdin(Stdio::null()).spawn().expect("start sleep"))
}

#[test]
fn state_machine_through_cuda_checkpoint() {
    require_root();
    let gpu = FakeGpu::new();
    let help = gpu.run_cuda_checkpoint(&["--help"], &[]);
    assert!(help.status.success() && text(&help.stdout).contains("--action"), "CRIU greps the help for --action");

    let (app, log) = start_app(&gpu, 4, 0, &[]);
    let (pid, p) = (app.pid, app.pid.to_string());
    wait_count(&log, pid, 3);
    assert_eq!(state(&gpu, pid), "running");
    assert!(fd_to(pid, "nvidia0") && maps(pid).contains("/libcuda.so.1"), "a CUDA process as our detection sees it");
    let mapped = device_mappings(pid);
    assert_eq!(mapped.len(), 1, "one shared device mapping:\n{}", maps(pid));
    let tid: i32 = tool_ok(&gpu, &["--get-restore-tid", "-p", &p]).trim().parse().expect("a TID");
    assert!(tid != pid && Path::new(&format!("/proc/{pid}/task/{tid}")).exists(), "restore thread {tid} of {pid}");
    // CRIU's plugin asks for the state by the restore thread's TID.
    assert_eq!(state(&gpu, tid), "running");

    // Only lock is legal from running.
    for illegal in ["checkpoint", "restore", "unlock"] {
        tool_refused(&gpu, &["--action", illegal, "--pid", &p], &[], pid, "CUDA_ERROR_ILLEGAL_STATE");
    }
    assert_eq!(state(&gpu, pid), "running", "refused transitions change nothing");

    action(&gpu, pid, "lock");
    assert_eq!(state(&gpu, pid), "locked");
    // At most the unit of work that was in flight completes; then the program's CUDA calls block.
    std::thread::sleep(Duration::from_millis(250));
    let frozen = last_app_line(&log, Some(pid)).unwrap();
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(last_app_line(&log, Some(pid)).unwrap(), frozen, "no GPU work while locked");
    assert!(alive(pid), "its CPU threads keep running");
    for illegal in ["lock", "restore"] {
        tool_refused(&gpu, &["--action", illegal, "--pid", &p], &[], pid, "CUDA_ERROR_ILLEGAL_STATE");
    }
    assert!(refers_to_gpu(pid), "a locked process keeps its device");

    action(&gpu, pid, "checkpoint");
    assert_eq!(state(&gpu, pid), "checkpointed");
    assert!(!refers_to_gpu(pid), "a checkpointed process refers to no GPU hardware:\n{}", maps(pid));
    for illegal in ["lock", "checkpoint", "unlock"] {
        tool_refused(&gpu, &["--action", illegal, "--pid", &p], &[], pid, "CUDA_ERROR_ILLEGAL_STATE");
    }
    assert_eq!(state(&gpu, pid), "checkpointed");

    action(&gpu, pid, "restore");
    assert_eq!(state(&gpu, pid), "locked");
    assert!(fd_to(pid, "nvidia0"), "the device is reopened");
    assert_eq!(device_mappings(pid), mapped, "device memory is mapped back at the same address");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(last_app_line(&log, Some(pid)).unwrap(), frozen, "still no GPU work until unlocked");

    action(&gpu, pid, "unlock");
    assert_eq!(state(&gpu, pid), "running");
    wait_count(&log, pid, frozen.count + 3);
    assert_counts_and_sums(&log, pid, 4);

    // --toggle goes both ways.
    tool_ok(&gpu, &["--toggle", "--pid", &p]);
    assert_eq!(state(&gpu, pid), "checkpointed");
    tool_ok(&gpu, &["--toggle", "--pid", &p]);
    assert_eq!(state(&gpu, pid), "running");
    let now = last_app_line(&log, Some(pid)).unwrap().count;
    wait_count(&log, pid, now + 2);
    assert_counts_and_sums(&log, pid, 4);
}

#[test]
fn non_cuda_processes_and_bad_arguments_are_refused() {
    require_root();
    let gpu = FakeGpu::new();
    let sleep = sleeper();
    let p = sleep.pid.to_string();
    for args in [vec!["--get-state", "--pid", &p], vec!["--get-restore-tid", "--pid", &p], vec!["--action", "lock", "--pid", &p]]
    {
        tool_refused(&gpu, &args, &[], sleep.pid, "CUDA_ERROR_NOT_FOUND");
    }
    assert!(alive(sleep.pid), "the refused process is untouched");
    let missing = i32::MAX.to_string();
    tool_refused(&gpu, &["--get-state", "--pid", &missing], &[], i32::MAX, "CUDA_ERROR_NOT_FOUND");
    for bad in
        [vec!["--action", "freeze", "--pid", &p], vec!["--get-state"], vec!["--pid", &p], vec!["--get-state", "--pid", "x1"]]
    {
        let out = gpu.run_cuda_checkpoint(&bad, &[]);
        assert_eq!(out.status.code(), Some(1), "{bad:?} must be refused: {}", text(&out.stderr));
        assert!(!out.stderr.is_empty(), "{bad:?}: a message on stderr");
    }
}

#[test]
fn lock_times_out_while_work_is_in_flight_and_waits_for_a_stopped_process() {
    require_root();
    let gpu = FakeGpu::new();
    // Each unit of GPU work takes 1 s, and the next one starts at once.
    let (app, log) = start_app(&gpu, 1, 0, &[("FAKE_CUDA_BUSY_MS", "1000")]);
    let (pid, p) = (app.pid, app.pid.to_string());

    // A lock that lands in the microseconds between two units succeeds: try again then.
    let mut timed_out = None;
    for _ in 0..3 {
        let start = Instant::now();
        let out = gpu.run_cuda_checkpoint(&["--action", "lock", "--pid", &p, "--timeout", "200"], &[]);
        if out.status.success() {
            action(&gpu, pid, "unlock");
            continue;
        }
        timed_out = Some((start.elapsed(), text(&out.stderr)));
        break;
    }
    let (took, err) = timed_out.expect("a 200 ms lock against 1 s units of work must time out");
    assert!(err.contains("CUDA_ERROR_TIMEOUT") && err.contains(&format!("pid {pid}")), "{err}");
    assert!(took >= Duration::from_millis(200) && took < Duration::from_millis(900), "timed out after {took:?}");
    assert_eq!(state(&gpu, pid), "running", "a timed-out lock leaves the process running");

    // Without a timeout, lock waits for the work in flight.
    let start = Instant::now();
    action(&gpu, pid, "lock");
    assert_eq!(state(&gpu, pid), "locked");
    let at_lock = last_app_line(&log, Some(pid)).map(|l| l.count).unwrap_or(0);
    action(&gpu, pid, "unlock");
    wait_count(&log, pid, at_lock + 1);
    eprintln!("lock without timeout took {:?}", start.elapsed());

    // A stopped process cannot answer: the controller gives up after its own timeout and withdraws.
    kill(Pid::from_raw(pid), Signal::SIGSTOP).unwrap();
    let start = Instant::now();
    let env = [("FAKE_CUDA_CONTROL_TIMEOUT_MS", "400")];
    let err = tool_refused(&gpu, &["--action", "lock", "--pid", &p], &env, pid, "CUDA_ERROR_TIMEOUT");
    assert!(err.contains("withdrawn"), "{err}");
    tool_refused(&gpu, &["--get-state", "--pid", &p], &env, pid, "CUDA_ERROR_TIMEOUT");
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(800) && took < Duration::from_secs(5), "{took:?}");
    // The restore-thread TID is known without the thread (CRIU asks for it while the process is frozen).
    tool_ok(&gpu, &["--get-restore-tid", "--pid", &p]);
    kill(Pid::from_raw(pid), Signal::SIGCONT).unwrap();
    assert_eq!(state(&gpu, pid), "running", "the withdrawn lock never happened");
    let now = last_app_line(&log, Some(pid)).unwrap().count;
    wait_count(&log, pid, now + 1);
    assert_counts_and_sums(&log, pid, 1);
}

#[test]
fn injected_failures_leave_the_states_the_driver_leaves() {
    require_root();
    let gpu = FakeGpu::new();
    let (app, log) = start_app(&gpu, 1, 0, &[]);
    let (pid, p) = (app.pid, app.pid.to_string());
    let other = (pid + 1).to_string();

    tool_refused(&gpu, &["--action", "lock", "--pid", &p], &[("FAKE_CUDA_FAIL", "lock")], pid, "CUDA_ERROR_UNKNOWN");
    assert_eq!(state(&gpu, pid), "running", "a failed lock leaves it running");
    let out = gpu.run_cuda_checkpoint(&["--get-state", "--pid", &p], &[("FAKE_CUDA_FAIL", "get-state")]);
    assert!(!out.status.success() && text(&out.stderr).contains("CUDA_ERROR_UNKNOWN"), "{}", text(&out.stderr));

    // A delayed lock takes that long.
    let start = Instant::now();
    let out = gpu.run_cuda_checkpoint(&["--action", "lock", "--pid", &p], &[("FAKE_CUDA_DELAY_MS", "lock:300")]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(start.elapsed() >= Duration::from_millis(300), "{:?}", start.elapsed());

    tool_refused(&gpu, &["--action", "unlock", "--pid", &p], &[("FAKE_CUDA_FAIL", "unlock")], pid, "CUDA_ERROR_UNKNOWN");
    assert_eq!(state(&gpu, pid), "locked");
    let fail_here = format!("checkpoint:{pid}");
    tool_refused(&gpu, &["--action", "checkpoint", "--pid", &p], &[("FAKE_CUDA_FAIL", &fail_here)], pid, "CUDA_ERROR_UNKNOWN");
    assert_eq!(state(&gpu, pid), "locked", "a failed checkpoint leaves it locked");
    assert!(refers_to_gpu(pid), "... with its device");
    // An injection for another PID does not apply.
    let fail_other = format!("checkpoint:{other}");
    let out = gpu.run_cuda_checkpoint(&["--action", "checkpoint", "--pid", &p], &[("FAKE_CUDA_FAIL", &fail_other)]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(state(&gpu, pid), "checkpointed");

    let counted = last_app_line(&log, Some(pid)).unwrap();
    tool_refused(&gpu, &["--action", "restore", "--pid", &p], &[("FAKE_CUDA_FAIL", "restore")], pid, "CUDA_ERROR_UNKNOWN");
    assert_eq!(state(&gpu, pid), "failed", "a failed restore leaves it failed");
    for illegal in ["lock", "checkpoint", "restore", "unlock"] {
        tool_refused(&gpu, &["--action", illegal, "--pid", &p], &[], pid, "CUDA_ERROR_ILLEGAL_STATE");
    }
    assert_eq!(state(&gpu, pid), "failed");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(last_app_line(&log, Some(pid)).unwrap(), counted, "no GPU work in the failed state");
    assert!(alive(pid));
}

/// Run CRIU (where scripts/setup.sh installs it, else from PATH); on failure show its log.
fn criu(args: &[&str], log: &Path) {
    let installed = Path::new("/usr/local/sbin/criu");
    let binary = if installed.exists() { installed } else { Path::new("criu") };
    let out = Command::new(binary).args(args).stdin(Stdio::null()).output().expect("run criu (scripts/setup.sh)");
    assert!(
        out.status.success(),
        "criu {args:?} failed ({}):\n{}{}\n--- {}:\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr),
        log.display(),
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

/// NVIDIA's README flow for `pids` (the CUDA processes of the tree rooted at root.pid): lock and checkpoint
/// each with cuda-checkpoint, `criu dump` the tree (which kills it), `criu restore` it detached, restore and
/// unlock each. Returns the restored root, killed by the caller when dropped.
fn checkpoint_dump_restore(gpu: &FakeGpu, mut root: Proc, pids: &[i32], log: &Path) -> (Proc, Vec<AppLine>) {
    let images = gpu.dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    let tids: Vec<String> = pids.iter().map(|p| tool_ok(gpu, &["--get-restore-tid", "--pid", &p.to_string()])).collect();
    for &pid in pids {
        action(gpu, pid, "lock");
        action(gpu, pid, "checkpoint");
        assert!(!refers_to_gpu(pid), "pid {pid} still refers to the GPU:\n{}", maps(pid));
    }
    let at_dump: Vec<AppLine> = pids.iter().map(|&p| last_app_line(log, Some(p)).unwrap()).collect();
    let root_pid = root.pid.to_string();
    let dir = images.to_str().unwrap();
    criu(&["dump", "--shell-job", "-D", dir, "-t", &root_pid, "-o", "dump.log", "-v4"], &images.join("dump.log"));
    root.reap();
    for &pid in pids {
        assert!(!alive(pid), "the dump killed {pid}");
        // The children were reparented to init: wait until it reaped them, so that their PIDs are free.
        wait_for(&format!("PID {pid} to be reaped"), Duration::from_secs(10), || {
            (!Path::new(&format!("/proc/{pid}")).exists()).then_some(())
        });
        tool_refused(gpu, &["--get-state", "--pid", &pid.to_string()], &[], pid, "CUDA_ERROR_NOT_FOUND");
    }
    let pidfile = images.join("restore.pid");
    criu(
        &[
            "restore",
            "--shell-job",
            "--restore-detached",
            "-D",
            dir,
            "-o",
            "restore.log",
            "-v4",
            "--pidfile",
            pidfile.to_str().unwrap(),
        ],
        &images.join("restore.log"),
    );
    let restored = Proc { pid: std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap(), child: None };
    assert_eq!(restored.pid, root.pid, "CRIU restores the same PID");
    std::mem::forget(root); // same PID: `restored` kills it
    for (&pid, tid) in pids.iter().zip(&tids) {
        assert_eq!(state(gpu, pid), "checkpointed", "restored as dumped");
        assert_eq!(&tool_ok(gpu, &["--get-restore-tid", "--pid", &pid.to_string()]), tid, "the same restore thread");
        action(gpu, pid, "restore");
        action(gpu, pid, "unlock");
        assert_eq!(state(gpu, pid), "running");
        assert!(fd_to(pid, "nvidia0"), "pid {pid} has its device again");
    }
    (restored, at_dump)
}

#[test]
fn criu_dumps_and_restores_a_checkpointed_cuda_process() {
    require_root();
    let gpu = FakeGpu::new();
    let (app, log) = start_app(&gpu, 8, 0, &[]);
    let pid = app.pid;
    wait_count(&log, pid, 3);
    let (_restored, at_dump) = checkpoint_dump_restore(&gpu, app, &[pid], &log);
    wait_count(&log, pid, at_dump[0].count + 3);
    assert_counts_and_sums(&log, pid, 8);
}

#[test]
fn a_tree_with_two_children_has_three_cuda_processes() {
    require_root();
    let gpu = FakeGpu::new();
    let (app, log) = start_app(&gpu, 1, 2, &[]);
    let pids = wait_for("lines from three processes", Duration::from_secs(10), || {
        let mut p: Vec<i32> = app_lines(&log, None).iter().map(|l| l.pid).collect();
        p.sort();
        p.dedup();
        (p.len() == 3).then_some(p)
    });
    assert!(pids.contains(&app.pid));
    let mut tids = Vec::new();
    for &pid in &pids {
        assert_eq!(state(&gpu, pid), "running", "pid {pid}");
        assert!(fd_to(pid, "nvidia0") && maps(pid).contains("/libcuda.so.1"), "pid {pid} is a CUDA process");
        tids.push(tool_ok(&gpu, &["--get-restore-tid", "--pid", &pid.to_string()]));
        if pid != app.pid {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
            let ppid: i32 = stat.rsplit_once(')').unwrap().1.split_whitespace().nth(1).unwrap().parse().unwrap();
            assert_eq!(ppid, app.pid, "pid {pid} is a child of the root");
        }
    }
    tids.sort();
    tids.dedup();
    assert_eq!(tids.len(), 3, "each process has its own restore thread");
    for &pid in &pids {
        wait_count(&log, pid, 2);
    }
    let (_restored, at_dump) = checkpoint_dump_restore(&gpu, app, &pids, &log);
    for (&pid, line) in pids.iter().zip(&at_dump) {
        wait_count(&log, pid, line.count + 2);
        assert_counts_and_sums(&log, pid, 1);
    }
}

#[test]
fn a_cuda_process_in_its_own_pid_and_mount_namespaces_is_reached_from_the_host() {
    require_root();
    let gpu = FakeGpu::new();
    // Inside: a private tmpfs over `inner` holds the device node and the control folder; the app is PID 1.
    let inner = gpu.dir.join("container");
    std::fs::create_dir(&inner).unwrap();
    let log = gpu.dir.join("ns-app.log");
    let script = format!(
        "mount -t tmpfs none {d} && mknod {d}/nvidia0 c 1 5 && FAKE_CUDA_DEVICE={d}/nvidia0 FAKE_CUDA_DIR={d}/ctl exec {app} 1",
        d = inner.display(),
        app = gpu.app.display()
    );
    let file = std::fs::File::create(&log).unwrap();
    let mut cmd = cedana_integration::workload::session_command(Path::new("unshare"));
    cmd.args(["--pid", "--mount", "--fork", "--mount-proc", "sh", "-c", &script])
        .env("LD_LIBRARY_PATH", &gpu.lib_dir)
        .stdout(file.try_clone().unwrap())
        .stderr(file);
    let unshare = Proc::started(cmd.spawn().expect("unshare (util-linux)"));
    let u = unshare.pid;
    let pid: i32 = wait_for("the app inside the namespaces", Duration::from_secs(10), || {
        let children = std::fs::read_to_string(format!("/proc/{u}/task/{u}/children")).ok()?;
        let p: i32 = children.split_whitespace().next()?.parse().ok()?;
        let comm = std::fs::read_to_string(format!("/proc/{p}/comm")).ok()?;
        (comm.trim() == "gpu-app").then_some(p)
    });
    wait_count(&log, 1, 3); // it prints its PID in its namespace
    assert!(cedana_integration::entries(&inner).is_empty(), "the control files are not visible from the host");
    assert_eq!(state(&gpu, pid), "running");
    let tid: i32 = tool_ok(&gpu, &["--get-restore-tid", "--pid", &pid.to_string()]).trim().parse().unwrap();
    assert!(tid != pid && Path::new(&format!("/proc/{pid}/task/{tid}")).exists(), "a host TID: {tid}");
    assert_eq!(state(&gpu, tid), "running");
    tool_ok(&gpu, &["--toggle", "--pid", &pid.to_string()]);
    assert_eq!(state(&gpu, pid), "checkpointed");
    assert!(!refers_to_gpu(pid));
    let at = last_app_line(&log, Some(1)).unwrap().count;
    tool_ok(&gpu, &["--toggle", "--pid", &pid.to_string()]);
    assert_eq!(state(&gpu, pid), "running");
    wait_count(&log, 1, at + 2);
    assert_counts_and_sums(&log, 1, 1);
}

type GetState = unsafe extern "C" fn(i32, *mut i32) -> i32;
type PidArgs = unsafe extern "C" fn(i32, *mut u64) -> i32;

/// The library's symbol `name` (which must have type T).
///
/// # Safety
/// T must be the function pointer type of the symbol.
unsafe fn sym<T: Copy>(lib: *mut libc::c_void, name: &str) -> T {
    let c = CString::new(name).unwrap();
    // SAFETY: lib is a handle from dlopen; dlsym reads the NUL-terminated name.
    let p = unsafe { libc::dlsym(lib, c.as_ptr()) };
    assert!(!p.is_null(), "libcuda.so.1 exports {name}");
    assert_eq!(std::mem::size_of::<T>(), std::mem::size_of::<*mut libc::c_void>());
    // SAFETY: the caller names the symbol's type; both are pointer-sized.
    unsafe { std::mem::transmute_copy(&p) }
}

#[test]
fn driver_api_in_libcuda_answers_a_controller() {
    require_root();
    let gpu = FakeGpu::new();
    let (app, _log) = start_app(&gpu, 1, 0, &[]);
    let sleep = sleeper();
    let path = CString::new(gpu.lib_dir.join("libcuda.so.1").to_str().unwrap()).unwrap();
    // SAFETY: loading the fake driver; its constructors do nothing. It stays loaded for the process.
    let lib = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    assert!(!lib.is_null(), "dlopen libcuda.so.1");
    // SAFETY: the types below are the driver API's signatures (the args structs are 64 bytes; we pass
    // 8 u64s or NULL; pointer out-parameters point to live locals).
    unsafe {
        let version: unsafe extern "C" fn(*mut i32) -> i32 = sym(lib, "cuDriverGetVersion");
        let name: unsafe extern "C" fn(i32, *mut *const libc::c_char) -> i32 = sym(lib, "cuGetErrorName");
        let string: unsafe extern "C" fn(i32, *mut *const libc::c_char) -> i32 = sym(lib, "cuGetErrorString");
        let init: unsafe extern "C" fn(u32) -> i32 = sym(lib, "cuInit");
        let get_state: GetState = sym(lib, "cuCheckpointProcessGetState");
        let get_tid: GetState = sym(lib, "cuCheckpointProcessGetRestoreThreadId");
        let lock: PidArgs = sym(lib, "cuCheckpointProcessLock");
        let checkpoint: PidArgs = sym(lib, "cuCheckpointProcessCheckpoint");
        let restore: PidArgs = sym(lib, "cuCheckpointProcessRestore");
        let unlock: PidArgs = sym(lib, "cuCheckpointProcessUnlock");

        let mut v = 0;
        assert_eq!(version(&mut v), 0);
        let want = std::env::var("FAKE_CUDA_DRIVER_VERSION").ok().and_then(|v| v.parse().ok()).unwrap_or(12080);
        assert_eq!(v, want, "CUDA 12.8 unless FAKE_CUDA_DRIVER_VERSION says otherwise");
        let mut s: *const libc::c_char = std::ptr::null();
        assert_eq!(name(909, &mut s), 0);
        assert_eq!(CStr::from_ptr(s).to_str().unwrap(), "CUDA_ERROR_TIMEOUT");
        assert_eq!(string(401, &mut s), 0);
        assert!(CStr::from_ptr(s).to_str().unwrap().contains("present state"));
        assert_eq!(name(12345, &mut s), 1, "unknown codes: CUDA_ERROR_INVALID_VALUE");

        let pid = app.pid;
        let mut st = -1;
        assert_eq!(get_state(pid, &mut st), 0);
        assert_eq!(st, 0, "CU_PROCESS_STATE_RUNNING");
        assert_eq!(get_state(pid, std::ptr::null_mut()), 1, "NULL state: CUDA_ERROR_INVALID_VALUE");
        assert_eq!(get_state(-5, &mut st), 1, "bad pid: CUDA_ERROR_INVALID_VALUE");
        assert_eq!(get_state(sleep.pid, &mut st), 500, "not a CUDA process: CUDA_ERROR_NOT_FOUND");
        let mut tid = 0;
        assert_eq!(get_tid(pid, &mut tid), 0);
        assert!(tid != pid && Path::new(&format!("/proc/{pid}/task/{tid}")).exists());

        let mut args = [0u64; 8];
        args[0] = 5000; // timeoutMs = 5000, reserved0 = 0
        assert_eq!(lock(pid, args.as_mut_ptr()), 0);
        assert_eq!(unlock(pid, args.as_mut_ptr()), 1, "reserved fields must be zero: CUDA_ERROR_INVALID_VALUE");
        assert_eq!(get_state(pid, &mut st), 0);
        assert_eq!(st, 1, "still CU_PROCESS_STATE_LOCKED");
        let mut none = [0u64; 8];
        assert_eq!(unlock(pid, none.as_mut_ptr()), 0);
        assert_eq!(lock(pid, std::ptr::null_mut()), 0, "NULL args: no timeout");
        assert_eq!(checkpoint(pid, std::ptr::null_mut()), 0);
        assert_eq!(get_state(pid, &mut st), 0);
        assert_eq!(st, 2, "CU_PROCESS_STATE_CHECKPOINTED");
        assert_eq!(restore(pid, std::ptr::null_mut()), 3, "restore needs cuInit in the caller");
        assert_eq!(init(1), 1, "cuInit flags must be 0");
        assert_eq!(init(0), 0);
        assert_eq!(restore(pid, std::ptr::null_mut()), 0);
        assert_eq!(unlock(pid, std::ptr::null_mut()), 0);
        assert_eq!(get_state(pid, &mut st), 0);
        assert_eq!(st, 0);
    }
}

#[test]
fn nvidia_smi_answers_queries_from_its_environment() {
    let gpu = FakeGpu::new();
    let smi = |args: &[&str], env: &[(&str, &str)]| -> Output {
        Command::new(&gpu.nvidia_smi).args(args).envs(env.iter().copied()).output().expect("run the fake nvidia-smi")
    };
    let q = "--query-gpu=index,name,memory.total,driver_version,uuid";
    let out = smi(&[q, "--format=csv,noheader,nounits"], &[]);
    let text_out = success_stdout("nvidia-smi", &out);
    let fields: Vec<&str> = text_out.trim().split(", ").collect();
    assert_eq!(fields[..4], ["0", "NVIDIA A100-SXM4-40GB", "40960", "570.86.10"], "{text_out}");
    assert!(fields[4].starts_with("GPU-"), "{text_out}");

    let env = [
        ("FAKE_GPU_COUNT", "2"),
        ("FAKE_GPU_NAME", "NVIDIA H100 80GB HBM3"),
        ("FAKE_GPU_MEMORY_MIB", "81559"),
        ("FAKE_GPU_DRIVER", "575.51.03"),
    ];
    let out = success_stdout(
        "nvidia-smi",
        &smi(&["--query-gpu=driver_version,memory.total,name", "--format=csv,noheader,nounits"], &env),
    );
    assert_eq!(out, "575.51.03, 81559, NVIDIA H100 80GB HBM3\n".repeat(2));
    let out = success_stdout("nvidia-smi", &smi(&["--query-gpu=name,memory.total", "--format=csv"], &[]));
    assert_eq!(out, "name, memory.total [MiB]\nNVIDIA A100-SXM4-40GB, 40960 MiB\n");

    let bad = smi(&["--query-gpu=name,temperature.bogus", "--format=csv"], &[]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(text(&bad.stderr).contains("temperature.bogus"), "{}", text(&bad.stderr));
    let none = smi(&[q, "--format=csv"], &[("FAKE_GPU_COUNT", "0")]);
    assert!(!none.status.success() && text(&none.stderr).contains("No devices were found"));

    let table = success_stdout("nvidia-smi", &smi(&[], &[("FAKE_GPU_DRIVER", "570.86.10")]));
    let head: String = table.lines().take(4).collect::<Vec<_>>().join("\n");
    assert!(head.contains("Driver Version: 570.86.10") && head.contains("CUDA Version: 12.8"), "{table}");
}

/// A controller that calls `cuCheckpointProcessRestore(PID, args)` with the GPU pairs `OLD NEW ...` of its
/// command line (CUDA 12.9's args layout) and prints the CUresult; built with gcc against the fake driver.
const REMAP_CONTROLLER: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
typedef struct { unsigned char bytes[16]; } CUuuid;
typedef struct { CUuuid oldUuid, newUuid; } CUcheckpointGpuPair;
typedef struct { CUcheckpointGpuPair *gpuPairs; unsigned int gpuPairsCount; char reserved[44]; unsigned long long reserved1; } Args;
int cuInit(unsigned int);
int cuCheckpointProcessRestore(int, Args *);
static void uuid(const char *s, CUuuid *u) {
    s += 4;
    for (int i = 0; i < 16; i++, s += 2) {
        while (*s == '-') s++;
        sscanf(s, "%2hhx", &u->bytes[i]);
    }
}
int main(int argc, char **argv) {
    CUcheckpointGpuPair pairs[4];
    int n = 0;
    for (int i = 2; i + 1 < argc && n < 4; i += 2, n++) uuid(argv[i], &pairs[n].oldUuid), uuid(argv[i + 1], &pairs[n].newUuid);
    Args a;
    memset(&a, 0, sizeof a);
    a.gpuPairs = n ? pairs : NULL;
    a.gpuPairsCount = n;
    cuInit(0);
    printf("%d\n", cuCheckpointProcessRestore(atoi(argv[1]), &a));
    return 0;
}
"#;

#[test]
fn restore_args_remap_a_process_onto_the_gpu_its_pair_names() {
    require_root();
    let gpu = FakeGpu::new();
    let (app, log) = start_app(&gpu, 1, 0, &[]);
    let src = gpu.dir.join("remap.c");
    let controller = gpu.dir.join("remap");
    std::fs::write(&src, REMAP_CONTROLLER).unwrap();
    let lib = gpu.lib_dir.display().to_string();
    let out = Command::new("gcc")
        .args(["-Wall", "-Werror", "-o", controller.to_str().unwrap(), src.to_str().unwrap(), &format!("-L{lib}")])
        .args(["-l:libcuda.so.1", &format!("-Wl,-rpath,{lib}")])
        .output()
        .unwrap();
    assert!(out.status.success(), "gcc: {}", text(&out.stderr));
    let pid = app.pid.to_string();
    let own = "GPU-6661e5e0-0000-4000-8000-000000000000";
    let other = "GPU-0e0e0e0e-1111-4222-8333-444444444444";
    let gpu_file = gpu.control_dir.join(format!("{pid}.gpu"));
    assert_eq!(std::fs::read_to_string(&gpu_file).unwrap().trim(), own, "GPU 0 unless told otherwise");
    action(&gpu, app.pid, "lock");
    action(&gpu, app.pid, "checkpoint");
    // The restoring host has one GPU, the other one, and a driver with GPU pairs unless said otherwise.
    let restore = |pairs: &[&str], version: &str| {
        let out = Command::new(&controller)
            .arg(&pid)
            .args(pairs)
            .env("FAKE_GPU_UUIDS", other)
            .env("FAKE_CUDA_DRIVER_VERSION", version)
            .output()
            .unwrap();
        text(&out.stdout).trim().parse::<i32>().unwrap_or_else(|_| panic!("{} {}", text(&out.stdout), text(&out.stderr)))
    };
    assert_eq!(restore(&[], "12090"), 101, "its GPU is not on this host: CUDA_ERROR_INVALID_DEVICE");
    assert_eq!(restore(&[other, own], "12090"), 1, "the pairs must name its GPU: CUDA_ERROR_INVALID_VALUE");
    assert_eq!(restore(&[own, "GPU-77777777-1111-4222-8333-444444444444"], "12090"), 101, "the new GPU must be here");
    assert_eq!(restore(&[own, other], "12080"), 1, "CUDA 12.8: the pairs are reserved fields");
    assert_eq!(state(&gpu, app.pid), "checkpointed", "a refused remapping changes nothing");
    assert_eq!(restore(&[own, other], "12090"), 0);
    assert_eq!(state(&gpu, app.pid), "locked");
    assert_eq!(std::fs::read_to_string(&gpu_file).unwrap().trim(), other, "it runs on the new GPU");
    action(&gpu, app.pid, "unlock");
    let now = last_app_line(&log, Some(app.pid)).unwrap().count;
    wait_count(&log, app.pid, now + 2);
    assert_counts_and_sums(&log, app.pid, 1);
}
