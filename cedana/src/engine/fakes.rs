//! Fakes of the CRIU driver and of the container runtime, for the engine's unit tests (no root, no CRIU, no
//! runc). They act on real processes the tests start (`sleep` children), as CRIU and runc would: a dump
//! freezes the tree (SIGSTOP), writes CRIU-like images, asks `post-dump` and then kills the tree (SIGKILL), or
//! resumes it (SIGCONT) when the answer is no or the tree is left running. Failures are injected where CRIU
//! or runc fail in real life, and every step is recorded in a shared event log, so a test can tell what the
//! engine asked for and in which order.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::criu::{Criu, CriuDriver, CriuError, DumpCall, RestoreCall};
use crate::procfs;
use crate::runc::{ContainerRuntime, ContainerState, CriuExtras, RestoreFlags, RuncError};

/// What the fakes (and the tests' hooks) did, in order.
pub type Events = Arc<Mutex<Vec<String>>>;

/// A new, empty event log.
pub fn events() -> Events {
    Arc::default()
}

/// Append `event` to `events`.
pub fn record(events: &Events, event: impl Into<String>) {
    events.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(event.into());
}

/// A copy of the log.
pub fn snapshot(events: &Events) -> Vec<String> {
    events.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
}

/// How long the fakes wait for a signal to take effect before they give up.
const SETTLE: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------------------
// Processes

/// The state letter of /proc/PID/stat (`R`, `S`, `T`, `Z`, ...), or `None` once the PID is gone.
pub fn proc_state(pid: i32) -> Option<char> {
    procfs::stat(pid).ok().map(|s| s.state)
}

/// Alive, neither stopped (`T`, `t`) nor exited (`Z`, `X`).
pub fn is_running(pid: i32) -> bool {
    matches!(proc_state(pid), Some(s) if !matches!(s, 'T' | 't' | 'Z' | 'X'))
}

/// Wait until `cond` holds (or `SETTLE` passed); whether it held.
fn wait_until(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + SETTLE;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Start `sleep SECS` in a session of its own (as a workload started with `setsid`), once it runs `sleep`.
pub fn spawn_sleep(secs: u32) -> Child {
    let mut cmd = Command::new("sleep");
    cmd.arg(secs.to_string()).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    // SAFETY: setsid is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid()?;
            Ok(())
        });
    }
    let child = cmd.spawn().expect("spawning sleep");
    let pid = child.id() as i32;
    let execed = wait_until(|| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "sleep"));
    assert!(execed, "PID {pid} never ran sleep");
    child
}

fn signal(pid: i32, sig: Signal) -> Result<(), nix::errno::Errno> {
    kill(Pid::from_raw(pid), sig)
}

/// Stop `pid` and wait until the kernel shows it stopped, as CRIU's freeze does.
fn freeze(pid: i32) -> Result<(), String> {
    signal(pid, Signal::SIGSTOP).map_err(|e| format!("can't stop PID {pid}: {e}"))?;
    if wait_until(|| matches!(proc_state(pid), Some('T' | 't'))) {
        Ok(())
    } else {
        Err(format!("PID {pid} did not stop"))
    }
}

/// Resume `pid` and wait until it is no longer stopped.
fn thaw(pid: i32) {
    let _ = signal(pid, Signal::SIGCONT);
    wait_until(|| !matches!(proc_state(pid), Some('T' | 't')));
}

/// A workload for a test: `sleep 60` in a session of its own, killed and reaped when dropped.
pub struct Workload {
    child: Child,
    pub pid: i32,
}

impl Workload {
    pub fn spawn() -> Self {
        let child = spawn_sleep(60);
        let pid = child.id() as i32;
        Self { child, pid }
    }

    /// Alive, not stopped.
    pub fn is_running(&self) -> bool {
        is_running(self.pid)
    }

    /// The state letter of its /proc/PID/stat.
    pub fn state(&self) -> Option<char> {
        proc_state(self.pid)
    }

    /// Wait for it to end (it was killed) and reap it, freeing its PID; `None` if it is still alive after
    /// a few seconds.
    pub fn reap(&mut self) -> Option<ExitStatus> {
        let deadline = Instant::now() + SETTLE;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------------------
// Images

/// Size of the fake page image: a few MiB, not a multiple of the chunk size.
pub const PAGES_SIZE: usize = (3 << 20) + 12_345;
/// CRIU writes page images in chunks; so do the fakes.
const CHUNK: usize = 256 << 10;

/// The content of the page image of `pid`: non-trivial bytes (they do not compress to nothing), different
/// for every PID.
pub fn page_bytes(pid: i32) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (pid as u64).wrapping_mul(0x2545_F491_4F6C_DD1D);
    (0..PAGES_SIZE)
        .map(|i| {
            // xorshift, with runs of repeated bytes now and then, as memory has.
            if i % 4096 < 1024 {
                return (pid as u8).wrapping_add((i / 4096) as u8);
            }
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Write CRIU-like images of `pid` into `dir`: `core-PID.img`, `pagemap-PID.img`, `pages-1.img` (written
/// in chunks, as CRIU streams memory), and `inventory.img` last.
pub fn write_images(dir: &Path, pid: i32) -> std::io::Result<()> {
    std::fs::write(dir.join(format!("core-{pid}.img")), format!("fake core of {pid}\n"))?;
    std::fs::write(dir.join(format!("pagemap-{pid}.img")), format!("fake pagemap of {pid}: {PAGES_SIZE} bytes\n"))?;
    let pages = page_bytes(pid);
    let mut f = std::fs::File::create(dir.join("pages-1.img"))?;
    for chunk in pages.chunks(CHUNK) {
        f.write_all(chunk)?;
        std::thread::sleep(Duration::from_millis(1));
    }
    f.sync_data()?;
    drop(f);
    std::fs::write(dir.join("inventory.img"), format!("fake inventory: root {pid}\n"))?;
    Ok(())
}

/// The PID whose images `dir` holds (from its `core-PID.img`), if they are all there.
pub fn images_of(dir: &Path) -> Option<i32> {
    if !dir.join("inventory.img").is_file() || !dir.join("pages-1.img").is_file() {
        return None;
    }
    std::fs::read_dir(dir).ok()?.flatten().find_map(|e| {
        let name = e.file_name().to_string_lossy().into_owned();
        name.strip_prefix("core-")?.strip_suffix(".img")?.parse().ok()
    })
}

/// Whether `dir/pages-1.img` holds exactly the pages of `pid`.
pub fn pages_intact(dir: &Path, pid: i32) -> bool {
    std::fs::read(dir.join("pages-1.img")).is_ok_and(|b| b == page_bytes(pid))
}

// ---------------------------------------------------------------------------------------------------------
// CRIU

/// Run between writing the images and the `post-dump` notification (while the tree is frozen).
pub type Between = Box<dyn Fn(&DumpCall<'_>) + Send + Sync>;

/// A CRIU driver that acts on the real process as CRIU would, without CRIU.
pub struct FakeCriu {
    criu: Criu,
    events: Events,
    fail_before_images: bool,
    fail_after_post_dump: bool,
    between: Option<Between>,
    restored: Mutex<Vec<Child>>,
    work_dirs: Mutex<Vec<PathBuf>>,
}

impl FakeCriu {
    pub fn new(events: Events) -> Self {
        Self {
            criu: Criu::locate(Some(Path::new("/bin/true"))).expect("/bin/true exists"),
            events,
            fail_before_images: false,
            fail_after_post_dump: false,
            between: None,
            restored: Mutex::new(Vec::new()),
            work_dirs: Mutex::new(Vec::new()),
        }
    }

    /// Fail every dump after freezing, before any image is written (the tree is resumed).
    pub fn failing_before_images(mut self) -> Self {
        self.fail_before_images = true;
        self
    }

    /// Once `post-dump` agreed and the tree was killed, fail anyway: what a driver reports when CRIU's final
    /// reply is lost (`criu swrk` crashing or killed after it ended the tree).
    pub fn failing_after_post_dump(mut self) -> Self {
        self.fail_after_post_dump = true;
        self
    }

    /// Run `f` after the images are written, before `post-dump`.
    pub fn between(mut self, f: impl Fn(&DumpCall<'_>) + Send + Sync + 'static) -> Self {
        self.between = Some(Box::new(f));
        self
    }

    /// The work folders the engine gave (kept by the engine when CRIU fails).
    pub fn work_dirs(&self) -> Vec<PathBuf> {
        self.work_dirs.lock().unwrap().clone()
    }

    fn failed(&self, action: &'static str, work_dir: &Path, error: &str) -> CriuError {
        let log = work_dir.join(format!("{action}.log"));
        let _ = std::fs::write(&log, format!("(00.000100) Error (fake): {error}\n"));
        CriuError::Failed {
            action,
            status: "exit code 1".into(),
            errors: vec![format!("Error (fake): {error}")],
            hint: None,
            log,
        }
    }

    fn log(&self, event: String) {
        record(&self.events, event);
    }
}

impl CriuDriver for FakeCriu {
    fn criu(&self) -> &Criu {
        &self.criu
    }

    fn dump(&self, call: &DumpCall<'_>, on_notify: &mut dyn FnMut(&str) -> bool) -> Result<(), CriuError> {
        let pid = call.pid;
        self.work_dirs.lock().unwrap().push(call.work_dir.to_path_buf());
        if !on_notify("pre-dump") {
            self.log(format!("criu pre-dump {pid} -> false"));
            return Err(self.failed("dump", call.work_dir, "pre-dump action script failed"));
        }
        self.log(format!("criu pre-dump {pid}"));
        if proc_state(pid).is_none_or(|s| s == 'Z' || s == 'X') {
            self.log(format!("criu failed {pid}"));
            return Err(self.failed("dump", call.work_dir, &format!("can't seize {pid}: no such process")));
        }
        if let Err(e) = freeze(pid) {
            self.log(format!("criu failed {pid}"));
            return Err(self.failed("dump", call.work_dir, &e));
        }
        self.log(format!("criu froze {pid}"));
        if self.fail_before_images {
            thaw(pid);
            self.log(format!("criu resumed {pid}"));
            return Err(self.failed("dump", call.work_dir, "injected failure while dumping"));
        }
        if let Err(e) = write_images(call.images_dir, pid) {
            thaw(pid);
            self.log(format!("criu resumed {pid}"));
            return Err(self.failed("dump", call.work_dir, &format!("writing images: {e}")));
        }
        self.log(format!("criu images {pid}"));
        if let Some(f) = &self.between {
            f(call);
        }
        let ok = on_notify("post-dump");
        self.log(format!("criu post-dump {pid} -> {ok}"));
        if !ok {
            // CRIU resumes the tree when its post-dump action fails, and leaves its images behind.
            thaw(pid);
            self.log(format!("criu resumed {pid}"));
            return Err(self.failed("dump", call.work_dir, "post-dump action script failed"));
        }
        if call.leave_running {
            thaw(pid);
            self.log(format!("criu resumed {pid}"));
        } else {
            let _ = signal(pid, Signal::SIGKILL);
            self.log(format!("criu killed {pid}"));
            if self.fail_after_post_dump {
                self.log(format!("criu failed {pid} after post-dump"));
                return Err(self.failed("dump", call.work_dir, "criu swrk ended without a reply (killed by SIGKILL)"));
            }
        }
        Ok(())
    }

    fn restore(&self, call: &RestoreCall<'_>, on_notify: &mut dyn FnMut(&str) -> bool) -> Result<i32, CriuError> {
        self.work_dirs.lock().unwrap().push(call.work_dir.to_path_buf());
        self.log("criu restore".into());
        let Some(original) = images_of(call.images_dir) else {
            self.log("criu restore failed: no images".into());
            return Err(self.failed("restore", call.work_dir, "can't open inventory.img"));
        };
        let ok = on_notify("pre-restore");
        self.log(format!("criu pre-restore -> {ok}"));
        if !ok {
            return Err(self.failed("restore", call.work_dir, "pre-restore action script failed"));
        }
        let intact = pages_intact(call.images_dir, original);
        let child = spawn_sleep(30);
        let pid = child.id() as i32;
        self.restored.lock().unwrap().push(child);
        self.log(format!("criu restored {pid} (images of {original}, pages intact: {intact})"));
        on_notify("post-restore");
        Ok(pid)
    }
}

impl Drop for FakeCriu {
    fn drop(&mut self) {
        for mut child in self.restored.get_mut().map(std::mem::take).unwrap_or_default() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Container runtime

/// A container the fake runtime knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeContainer {
    /// `created`, `running`, `paused` or `stopped`, as runc says.
    pub status: String,
    pub pid: i32,
    pub bundle: PathBuf,
}

/// Failures to inject into the fake runtime.
#[derive(Debug, Clone, Copy, Default)]
pub struct Failures {
    pub pause: bool,
    pub resume: bool,
    pub checkpoint: bool,
    pub restore: bool,
}

/// A container runtime that keeps its containers in memory, around real processes, with runc's failure cases.
#[derive(Debug)]
pub struct FakeRuntime {
    root: PathBuf,
    events: Events,
    containers: Mutex<HashMap<String, FakeContainer>>,
    failures: Mutex<Failures>,
    restored: Mutex<Vec<Child>>,
    /// A checkpoint path whose presence `delete` records.
    watched: Mutex<Option<PathBuf>>,
}

impl FakeRuntime {
    pub fn new(events: Events) -> Self {
        Self {
            root: PathBuf::from("/run/fake-runc"),
            events,
            containers: Mutex::default(),
            failures: Mutex::default(),
            restored: Mutex::default(),
            watched: Mutex::default(),
        }
    }

    /// Record, at each `delete`, whether a checkpoint is at `path` (to tell a delete after the commit from
    /// one before it).
    pub fn watch_checkpoint(&self, path: &Path) {
        *self.watched.lock().unwrap() = Some(path.to_path_buf());
    }

    /// Know container `id` around the process `pid`.
    pub fn add(&self, id: &str, status: &str, pid: i32, bundle: &Path) {
        let c = FakeContainer { status: status.into(), pid, bundle: bundle.to_path_buf() };
        self.containers.lock().unwrap().insert(id.into(), c);
    }

    pub fn container(&self, id: &str) -> Option<FakeContainer> {
        self.containers.lock().unwrap().get(id).cloned()
    }

    pub fn set_failures(&self, f: Failures) {
        *self.failures.lock().unwrap() = f;
    }

    fn failures(&self) -> Failures {
        *self.failures.lock().unwrap()
    }

    fn log(&self, event: String) {
        record(&self.events, event);
    }

    fn missing(&self, id: &str) -> RuncError {
        RuncError::NoSuchContainer { id: id.into(), root: self.root.clone() }
    }

    fn failed(&self, command: &str, id: &str, message: &str) -> RuncError {
        self.log(format!("runc {command} {id} failed"));
        RuncError::Failed { command: command.into(), id: id.into(), status: "exit status 1".into(), message: message.into() }
    }

    /// The container's status as runc would report it: a running container whose process is gone is stopped.
    fn status_of(c: &FakeContainer) -> String {
        match c.status.as_str() {
            "running" | "paused" if proc_state(c.pid).is_none_or(|s| s == 'Z' || s == 'X') => "stopped".into(),
            s => s.into(),
        }
    }
}

impl ContainerRuntime for FakeRuntime {
    fn root(&self) -> &Path {
        &self.root
    }

    fn state(&self, id: &str) -> Result<ContainerState, RuncError> {
        let map = self.containers.lock().unwrap();
        let c = map.get(id).ok_or_else(|| self.missing(id))?;
        Ok(ContainerState { id: id.into(), pid: c.pid, status: Self::status_of(c), bundle: c.bundle.clone() })
    }

    fn exists(&self, id: &str) -> Result<bool, RuncError> {
        Ok(self.containers.lock().unwrap().contains_key(id))
    }

    fn pause(&self, id: &str) -> Result<(), RuncError> {
        let mut map = self.containers.lock().unwrap();
        let c = map.get_mut(id).ok_or_else(|| self.missing(id))?;
        if self.failures().pause {
            return Err(self.failed("pause", id, "unable to freeze: injected failure"));
        }
        if Self::status_of(c) != "running" {
            return Err(self.failed("pause", id, "container not running"));
        }
        freeze(c.pid).map_err(|e| self.failed("pause", id, &e))?;
        c.status = "paused".into();
        self.log(format!("runc pause {id}"));
        Ok(())
    }

    fn resume(&self, id: &str) -> Result<(), RuncError> {
        let mut map = self.containers.lock().unwrap();
        let c = map.get_mut(id).ok_or_else(|| self.missing(id))?;
        if self.failures().resume {
            return Err(self.failed("resume", id, "unable to thaw: injected failure"));
        }
        if Self::status_of(c) != "paused" {
            return Err(self.failed("resume", id, "container not paused"));
        }
        thaw(c.pid);
        c.status = "running".into();
        self.log(format!("runc resume {id}"));
        Ok(())
    }

    fn delete(&self, id: &str, force: bool) -> Result<(), RuncError> {
        let mut map = self.containers.lock().unwrap();
        let c = map.get(id).ok_or_else(|| self.missing(id))?;
        let status = Self::status_of(c);
        if !force && status != "stopped" && status != "created" {
            return Err(self.failed("delete", id, &format!("cannot delete container {id} that is not stopped: {status}")));
        }
        let _ = signal(c.pid, Signal::SIGKILL);
        map.remove(id);
        match self.watched.lock().unwrap().as_deref() {
            Some(p) => self.log(format!("runc delete {id} (checkpoint committed: {})", p.exists())),
            None => self.log(format!("runc delete {id}")),
        }
        Ok(())
    }

    fn checkpoint(&self, id: &str, images: &Path, work: &Path, flags: &[OsString], extras: &CriuExtras) -> Result<(), RuncError> {
        if !extras.is_empty() {
            return Err(RuncError::Unsupported { option: "CRIU options outside runc's flags".into() });
        }
        let mut map = self.containers.lock().unwrap();
        let c = map.get_mut(id).ok_or_else(|| self.missing(id))?;
        let status = Self::status_of(c);
        if status != "running" && status != "paused" {
            return Err(self.failed("checkpoint", id, "container is not running"));
        }
        let _ = std::fs::write(work.join("dump.log"), "fake runc checkpoint\n");
        if self.failures().checkpoint {
            return Err(self.failed("checkpoint", id, "criu failed: type NOTIFY errno 0 (injected)"));
        }
        write_images(images, c.pid).map_err(|e| self.failed("checkpoint", id, &format!("writing images: {e}")))?;
        let flags: Vec<String> = flags.iter().map(|f| f.to_string_lossy().into_owned()).collect();
        if !flags.iter().any(|f| f == "--leave-running") {
            // Without --leave-running, runc ends the container once CRIU has dumped it.
            let _ = signal(c.pid, Signal::SIGKILL);
            c.status = "stopped".into();
        }
        self.log(format!("runc checkpoint {id} {}", flags.join(" ")).trim_end().to_string());
        Ok(())
    }

    fn restore(&self, id: &str, images: &Path, flags: &RestoreFlags, extras: CriuExtras) -> Result<i32, RuncError> {
        if !extras.is_empty() {
            return Err(RuncError::Unsupported { option: "CRIU options outside runc's flags".into() });
        }
        let mut map = self.containers.lock().unwrap();
        if map.contains_key(id) {
            return Err(RuncError::Exists { id: id.into(), root: self.root.clone() });
        }
        if !flags.bundle.join("config.json").is_file() {
            return Err(self.failed("restore", id, "bundle has no config.json"));
        }
        if self.failures().restore {
            return Err(self.failed("restore", id, "criu failed: type RESTORE errno 0 (injected)"));
        }
        let Some(original) = images_of(images) else { return Err(self.failed("restore", id, "no images")) };
        let intact = pages_intact(images, original);
        let child = spawn_sleep(30);
        let pid = child.id() as i32;
        self.restored.lock().unwrap().push(child);
        if let Some(p) = &flags.pid_file {
            let _ = std::fs::write(p, pid.to_string());
        }
        map.insert(id.into(), FakeContainer { status: "running".into(), pid, bundle: flags.bundle.clone() });
        self.log(format!("runc restore {id} {pid} (images of {original}, pages intact: {intact})"));
        Ok(0)
    }
}

impl Drop for FakeRuntime {
    fn drop(&mut self) {
        for mut child in self.restored.get_mut().map(std::mem::take).unwrap_or_default() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
