//! The holder's loop run in a thread of the test, over real pipes and a real process as "the job".

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use super::*;
use crate::jobs::attach::pipe;

/// A job (`sleep`), its pipes as the daemon would hold them, and a running holder linked to "the daemon".
struct Scene {
    job: Child,
    dir: tempfile::TempDir,
    log: PathBuf,
    /// The job's side: the read end of stdin, the write ends of stdout and stderr.
    job_stdin: OwnedFd,
    job_stdout: File,
    _job_stderr: File,
    /// The daemon's side.
    stdout: OwnedFd,
    link: Option<HolderLink>,
    holder: Option<std::thread::JoinHandle<io::Result<()>>>,
}

impl Scene {
    fn new() -> Scene {
        let job = Command::new("sleep").arg("60").spawn().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("job.log");
        let sockets = dir.path().join("stdio");
        std::fs::create_dir(&sockets).unwrap();
        let (in_r, in_w) = pipe().unwrap();
        let (out_r, out_w) = pipe().unwrap();
        let (err_r, err_w) = pipe().unwrap();
        let (ours, theirs) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC).unwrap();
        let held = Held {
            pid: job.id() as i32,
            stdin: Some(in_w),
            stdout: Some(out_r.try_clone().unwrap()),
            stderr: Some(err_r),
            log: Some(File::options().create(true).append(true).open(&log).unwrap()),
            link: Some(theirs),
        };
        let holder = std::thread::spawn(move || hold(held, &sockets));
        let scene = Scene {
            job,
            dir,
            log,
            job_stdin: in_r,
            job_stdout: File::from(out_w),
            _job_stderr: File::from(err_w),
            stdout: out_r,
            link: Some(HolderLink(ours)),
            holder: Some(holder),
        };
        scene.wait_for("the holder's socket", || scene.sockets().len() == 1);
        scene
    }

    fn pid(&self) -> i32 {
        self.job.id() as i32
    }

    fn sockets(&self) -> Vec<String> {
        std::fs::read_dir(self.dir.path().join("stdio"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    }

    fn logged(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_for(&self, what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// End the job and wait for the holder to return.
    fn end(&mut self) {
        let _ = self.job.kill();
        let _ = self.job.wait();
        self.holder.take().unwrap().join().unwrap().unwrap();
    }
}

impl Drop for Scene {
    fn drop(&mut self) {
        let _ = self.job.kill();
        let _ = self.job.wait();
    }
}

fn read_available(fd: &OwnedFd) -> Vec<u8> {
    crate::jobs::attach::set_nonblocking(fd.as_fd()).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = nix::unistd::read(fd, &mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    out
}

#[test]
fn while_linked_the_holder_leaves_the_output_to_the_daemon_and_takes_it_over_when_the_daemon_goes() {
    let mut s = Scene::new();
    s.job_stdout.write_all(b"one\n").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(read_available(&s.stdout), b"one\n", "the daemon's end still gets the output");
    assert_eq!(s.logged(), "");
    // The daemon goes: the holder appends output to the log, so the job never blocks on a full pipe.
    s.link.take();
    let big = vec![b'x'; 1 << 20];
    s.job_stdout.write_all(&big).unwrap();
    s.job_stdout.write_all(b"two\n").unwrap();
    s.wait_for("the output in the log", || s.logged().ends_with("two\n"));
    assert_eq!(s.logged().len(), big.len() + 4);
    s.end();
    assert!(s.sockets().is_empty(), "the holder removes its socket: {:?}", s.sockets());
}

#[test]
fn a_restarted_daemon_takes_the_pipes_back_and_the_holder_stops_reading() {
    let mut s = Scene::new();
    s.link.take();
    s.job_stdout.write_all(b"while down\n").unwrap();
    s.wait_for("the output in the log", || s.logged() == "while down\n");
    let back = reclaim(&s.dir.path().join("stdio"), s.pid()).unwrap();
    s.job_stdout.write_all(b"after\n").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(read_available(&back.stdout), b"after\n", "the reclaimed read end gets the output");
    assert_eq!(s.logged(), "while down\n", "the holder no longer reads");
    // stdin came back too: what the daemon writes reaches the job.
    let stdin = back.stdin.as_ref().expect("stdin was open");
    nix::unistd::write(stdin, b"in\n").unwrap();
    let mut got = [0u8; 3];
    File::from(s.job_stdin.try_clone().unwrap()).read_exact(&mut got).unwrap();
    assert_eq!(&got, b"in\n");
    // The new link works as the first did: closing it hands the output to the holder again.
    drop(back);
    s.job_stdout.write_all(b"down again\n").unwrap();
    s.wait_for("the output in the log", || s.logged().ends_with("down again\n"));
    s.end();
}

#[test]
fn closing_stdin_through_the_link_gives_the_job_end_of_file() {
    let mut s = Scene::new();
    s.link.as_ref().unwrap().close_stdin();
    // Our own copy of the write end was moved into the holder; once it closes it, the job reads EOF.
    let mut job_stdin = File::from(s.job_stdin.try_clone().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = tx.send(job_stdin.read_to_end(&mut buf).map(|_| buf));
    });
    let got = rx.recv_timeout(Duration::from_secs(5)).expect("the job reads end of file").unwrap();
    assert!(got.is_empty());
    // A daemon taking over now gets no stdin.
    s.link.take();
    let back = reclaim(&s.dir.path().join("stdio"), s.pid()).unwrap();
    assert!(back.stdin.is_none());
    s.end();
}

#[test]
fn output_left_in_the_pipes_when_the_job_exits_goes_to_the_log() {
    let mut s = Scene::new();
    s.link.take();
    // Written before the job ends: pumped before the holder sees the exit, or drained after it.
    s.job_stdout.write_all(b"last words\n").unwrap();
    let _ = s.job.kill();
    let _ = s.job.wait();
    s.holder.take().unwrap().join().unwrap().unwrap();
    assert_eq!(s.logged(), "last words\n");
}

#[test]
fn reclaim_says_when_no_holder_answers_and_removes_dead_holders_sockets() {
    let dir = tempfile::tempdir().unwrap();
    let err = reclaim(dir.path(), 4242).unwrap_err();
    assert!(matches!(err, HolderError::NotFound { pid: 4242, .. }), "{err}");
    assert_eq!(err.kind(), ErrorKind::NotFound);
    // A socket file of a holder that no longer runs (a PID nobody has).
    let stale = dir.path().join(format!("4242.{}.sock", i32::MAX - 1));
    std::fs::write(&stale, b"").unwrap();
    assert!(reclaim(dir.path(), 4242).is_err());
    assert!(!stale.exists(), "the dead holder's socket is removed");
    let other = dir.path().join(format!("77.{}.sock", i32::MAX - 1));
    std::fs::write(&other, b"").unwrap();
    sweep(dir.path());
    assert!(!other.exists());
}

#[test]
fn holder_arguments_are_checked() {
    let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert!(parse(&args(&[])).is_err());
    assert!(parse(&args(&["x", "/d"])).is_err());
    assert!(parse(&args(&["1", "/d", "stdout=1"])).is_err(), "fds below 3 are refused");
    assert!(parse(&args(&["1", "/d", "nonsense"])).is_err());
}
