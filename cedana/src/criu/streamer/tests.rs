//! The protocol against the real CRIU: a process dumped through [`Capture`] into memory, restored through
//! [`Serve`] from it, with no image file in between.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::capture::{Capture, ImageReceiver};
use super::serve::{ImageProvider, Serve};

#[derive(Default)]
struct Memory(Mutex<HashMap<String, Vec<u8>>>);

impl ImageReceiver for Memory {
    fn receive(&self, name: &str, data: &mut File) -> io::Result<()> {
        let mut bytes = Vec::new();
        data.read_to_end(&mut bytes)?;
        self.0.lock().unwrap().insert(name.to_string(), bytes);
        Ok(())
    }
}

impl ImageProvider for Memory {
    fn exists(&self, name: &str) -> bool {
        self.0.lock().unwrap().contains_key(name)
    }
    fn provide(&self, name: &str, out: &mut File) -> io::Result<()> {
        let bytes = self.0.lock().unwrap().get(name).cloned().unwrap_or_default();
        out.write_all(&bytes)
    }
}

fn criu() -> std::path::PathBuf {
    crate::criu::Criu::locate(None).expect("CRIU is installed by scripts/setup.sh").binary().to_path_buf()
}

/// `argv` in a session of its own (CRIU dumps session leaders), with stdio on /dev/null.
fn spawn_in_session(argv: &[&str]) -> std::process::Child {
    let mut cmd = Command::new(argv[0]);
    cmd.args(&argv[1..]).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    // SAFETY: setsid between fork and exec only changes the child's session.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    cmd.spawn().unwrap()
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map(|s| !s.contains(") Z")).unwrap_or(false)
}

#[test]
fn a_process_goes_through_criu_and_back_without_image_files() {
    // A counter that writes its state to a file each time it ticks.
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("count");
    let script = format!("i=0; while true; do i=$((i+1)); echo $i > {}; sleep 0.05; done", state.display());
    let mut child = spawn_in_session(&["sh", "-c", &script]);
    let pid = child.id() as i32;
    std::thread::sleep(Duration::from_millis(300));

    let images = dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    let memory = Arc::new(Memory::default());
    let capture = Capture::listen(&images, memory.clone()).unwrap();
    let out = Command::new(criu())
        .args(["dump", "--stream", "-t", &pid.to_string(), "-D"])
        .arg(&images)
        .args(["-o", "dump.log", "-v4"])
        .output()
        .unwrap();
    let log = std::fs::read_to_string(images.join("dump.log")).unwrap_or_default();
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("rror")).collect();
    assert!(out.status.success(), "criu dump --stream failed:\n{}", errors.join("\n"));
    let names = capture.finish().unwrap();
    // The dumped process is gone (reap it: it was our child).
    let _ = child.wait();
    assert!(names.iter().any(|n| n.starts_with("pages-")), "{names:?}");
    assert!(names.contains(&"inventory.img".to_string()), "{names:?}");
    let files: Vec<String> = std::fs::read_dir(&images).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert!(!files.iter().any(|f| f.ends_with(".img") && !f.starts_with("stats")), "no image file was written: {files:?}");
    let count_at_dump: u64 = std::fs::read_to_string(&state).unwrap().trim().parse().unwrap_or(0);
    // The dumped tree's PIDs must be free again: orphans of it are reaped by init, in its own time.
    for n in &names {
        if let Some(p) = n.strip_prefix("core-").and_then(|r| r.strip_suffix(".img")) {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while std::path::Path::new(&format!("/proc/{p}")).exists() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    let serve = Serve::listen(&images, memory.clone()).unwrap();
    let pidfile = dir.path().join("pid");
    let out = Command::new(criu())
        .args(["restore", "--stream", "-d", "-D"])
        .arg(&images)
        .args(["-o", "restore.log", "-v4", "--pidfile"])
        .arg(&pidfile)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let log = std::fs::read_to_string(images.join("restore.log")).unwrap_or_default();
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("rror")).collect();
    let served = serve.finish();
    if !out.status.success() {
        let sizes: Vec<(String, usize)> = memory.0.lock().unwrap().iter().map(|(k, v)| (k.clone(), v.len())).collect();
        eprintln!("dumped: {names:?}\nsizes: {sizes:?}\nserved: {served:?}");
    }
    assert!(out.status.success(), "criu restore --stream failed:\n{}", errors.join("\n"));
    let served = served.unwrap();
    assert!(served.iter().any(|n| n.starts_with("pages-")), "{served:?}");
    let restored: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
    assert_eq!(restored, pid);
    // The counter goes on (a loaded machine may take a while to schedule it). The shell truncates the file
    // before each write: an empty read is no number.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut now = 0;
    while now <= count_at_dump && std::time::Instant::now() < deadline && alive(pid) {
        std::thread::sleep(Duration::from_millis(20));
        now = std::fs::read_to_string(&state).ok().and_then(|s| s.trim().parse::<u64>().ok()).unwrap_or(now);
    }
    let still = alive(pid);
    // SAFETY: kill the restored counter by the PID CRIU reported.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    assert!(still, "the restored process runs");
    assert!(now > count_at_dump, "the counter went on from {count_at_dump} (now {now})");
}

#[test]
fn a_receiver_error_fails_the_dump_and_the_process_runs_on() {
    struct Refuse;
    impl ImageReceiver for Refuse {
        fn receive(&self, name: &str, data: &mut File) -> io::Result<()> {
            if name.starts_with("pages-") {
                return Err(io::Error::other("disk full (test)"));
            }
            io::copy(data, &mut io::sink()).map(|_| ())
        }
    }
    // Far more memory than a pipe holds (the shell keeps the string), so that CRIU is still writing pages
    // when the receiver refuses them, whatever the timing.
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("ready");
    let script = format!("x=$(head -c 3000000 /dev/urandom | od -An -tx1); : > {}; while :; do sleep 1; done", ready.display());
    let mut child = spawn_in_session(&["sh", "-c", &script]);
    let pid = child.id() as i32;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !ready.exists() {
        assert!(std::time::Instant::now() < deadline, "the workload never got ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    let capture = Capture::listen(dir.path(), Arc::new(Refuse)).unwrap();
    let out = Command::new(criu())
        .args(["dump", "--stream", "-t", &pid.to_string(), "-D"])
        .arg(dir.path())
        .args(["-o", "dump.log"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "the dump must fail");
    let err = capture.finish().unwrap_err().to_string();
    assert!(err.contains("disk full (test)") && err.contains("pages-"), "{err}");
    assert!(alive(pid), "CRIU resumed the process");
    child.kill().unwrap();
    let _ = child.wait();
}

#[test]
fn a_capture_criu_never_connects_to_finishes_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let capture = Capture::listen(dir.path(), Arc::new(Memory::default())).unwrap();
    capture.settle(Duration::from_secs(1)).unwrap();
    assert_eq!(capture.finish().unwrap(), Vec::<String>::new());
    assert!(!dir.path().join(super::CAPTURE_SOCKET).exists(), "the socket is removed");
}
