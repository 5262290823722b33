//! Terminals through the stub runtime, which sends a real pseudo-terminal over the console socket as runc does:
//! the output reaches the stdout FIFO, the stdin FIFO reaches the terminal, ResizePty and CloseIO act on it, and
//! the copying ends (every descriptor closed) when the terminal's process side goes away or the process is deleted.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use containerd_shim_protos::api::{CloseIORequest, ExecProcessRequest, ResizePtyRequest};
use containerd_shim_protos::protobuf::well_known_types::any::Any;

use super::*;
use crate::task::OUTPUT_WAIT;

const T: Duration = Duration::from_secs(5);

/// A bundle folder with a stdin and a stdout FIFO in it.
struct Io {
    dir: tempfile::TempDir,
    stdin: PathBuf,
    stdout: PathBuf,
}

fn io() -> Io {
    let dir = tempfile::tempdir().unwrap();
    let (stdin, stdout) = (dir.path().join("in"), dir.path().join("out"));
    for p in [&stdin, &stdout] {
        nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    }
    Io { dir, stdin, stdout }
}

impl Io {
    fn bundle(&self) -> String {
        self.dir.path().display().to_string()
    }
    /// A non-blocking reader of the stdout FIFO (as the client holds one).
    fn out_reader(&self) -> File {
        std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(&self.stdout).unwrap()
    }
    /// A writer of the stdin FIFO; fails (ENXIO) when nobody reads it.
    fn in_writer(&self) -> std::io::Result<File> {
        std::fs::OpenOptions::new().write(true).custom_flags(libc::O_NONBLOCK).open(&self.stdin)
    }
    /// Console sockets left in the bundle.
    fn sockets(&self) -> Vec<String> {
        std::fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("console-"))
            .collect()
    }
}

/// Read a non-blocking file until what was read contains `needle`; everything read.
async fn read_until(f: &mut File, needle: &str) -> String {
    let mut seen = Vec::new();
    let deadline = Instant::now() + T;
    while !String::from_utf8_lossy(&seen).contains(needle) {
        assert!(Instant::now() < deadline, "{needle:?} not read in time; read {:?}", String::from_utf8_lossy(&seen));
        let mut buf = [0u8; 1024];
        match f.read(&mut buf) {
            Ok(n) => seen.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => tokio::time::sleep(Duration::from_millis(10)).await,
            Err(e) => panic!("reading: {e}"),
        }
    }
    String::from_utf8_lossy(&seen).into_owned()
}

/// Wait until a non-blocking FIFO reader sees EOF (no writer left).
async fn wait_eof(f: &mut File) {
    let deadline = Instant::now() + T;
    loop {
        let mut buf = [0u8; 1024];
        match f.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "the stdout FIFO was not closed by the shim");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("reading: {e}"),
        }
    }
}

/// The window size (rows, columns) of a terminal.
fn window_size(fd: &OwnedFd) -> (u16, u16) {
    let mut size = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCGWINSZ writes one winsize into the pointer, valid for the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut size) };
    assert_eq!(rc, 0, "TIOCGWINSZ: {}", std::io::Error::last_os_error());
    (size.ws_row, size.ws_col)
}

/// Read from a terminal's slave end until `needle` shows (the slave set non-blocking).
async fn read_slave_until(slave: &OwnedFd, needle: &str) -> String {
    let flags = nix::fcntl::fcntl(slave, nix::fcntl::FcntlArg::F_GETFL).unwrap();
    let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(slave, nix::fcntl::FcntlArg::F_SETFL(flags)).unwrap();
    let mut f = File::from(slave.try_clone().unwrap());
    read_until(&mut f, needle).await
}

fn resize(id: &str, exec_id: &str, width: u32, height: u32) -> ResizePtyRequest {
    ResizePtyRequest { id: id.into(), exec_id: exec_id.into(), width, height, ..Default::default() }
}

fn tty_create(id: &str, io: &Io) -> CreateTaskRequest {
    CreateTaskRequest {
        id: id.into(),
        bundle: io.bundle(),
        terminal: true,
        stdin: io.stdin.display().to_string(),
        stdout: io.stdout.display().to_string(),
        ..Default::default()
    }
}

async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + T;
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not in time");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn init_terminal_copies_both_ways_resizes_closes_stdin_and_ends_with_the_terminal() {
    let f = fixture(false);
    let io = io();
    let mut out = io.out_reader();
    f.m.create(tty_create("t1", &io)).await.unwrap();
    assert_eq!(f.runtime.calls.lock().unwrap()[0], format!("create t1 {} console", io.stdout.display()));
    assert!(io.sockets().is_empty(), "the console socket is removed once the terminal came: {:?}", io.sockets());
    let state = f.m.state(StateRequest { id: "t1".into(), ..Default::default() }).await.unwrap();
    assert!(state.terminal, "State reports the terminal");
    let slave = f.runtime.slaves.lock().unwrap().pop().expect("the stub sent a terminal");

    // The process's output reaches the stdout FIFO (through the terminal's line discipline: \r\n).
    File::from(slave.try_clone().unwrap()).write_all(b"hello\n").unwrap();
    assert!(read_until(&mut out, "hello\r\n").await.contains("hello\r\n"));

    // The client's input reaches the process.
    let mut input = io.in_writer().expect("the shim reads the stdin FIFO");
    input.write_all(b"typed\n").unwrap();
    assert!(read_slave_until(&slave, "typed\n").await.contains("typed"));

    f.m.resize_pty(resize("t1", "", 100, 40)).await.unwrap();
    assert_eq!(window_size(&slave), (40, 100));

    // CloseIO: the shim lets go of the stdin FIFO (a new writer then finds no reader).
    f.m.close_io(CloseIORequest { id: "t1".into(), stdin: true, ..Default::default() }).await.unwrap();
    wait_until("the stdin FIFO to have no reader", || io.in_writer().err().and_then(|e| e.raw_os_error()) == Some(libc::ENXIO))
        .await;
    // The output still flows.
    File::from(slave.try_clone().unwrap()).write_all(b"after\n").unwrap();
    assert!(read_until(&mut out, "after").await.contains("after"));

    // The process side of the terminal goes away: the output copy ends and the shim closes the stdout FIFO.
    drop(slave);
    wait_eof(&mut out).await;
    f.m.kill(KillRequest { id: "t1".into(), signal: 9, ..Default::default() }).await.unwrap();
    f.m.wait(WaitRequest { id: "t1".into(), ..Default::default() }).await.unwrap();
    let started = Instant::now();
    f.m.delete(DeleteRequest { id: "t1".into(), ..Default::default() }).await.unwrap();
    assert!(started.elapsed() < OUTPUT_WAIT, "the output was copied already: Delete need not wait");
}

#[tokio::test]
async fn exec_terminal_is_resized_and_closed_at_delete() {
    let f = fixture(false);
    let io = io();
    let mut out = io.out_reader();
    f.m.create(CreateTaskRequest { bundle: io.bundle(), ..create_req("t2") }).await.unwrap();
    f.m.start(StartRequest { id: "t2".into(), ..Default::default() }).await.unwrap();
    // The spec asks for the terminal (the request's flag is not set): that is what the runtime acts on.
    let spec = r#"{"args":["/bin/sh"],"cwd":"/","terminal":true}"#;
    let exec = ExecProcessRequest {
        id: "t2".into(),
        exec_id: "e1".into(),
        stdout: io.stdout.display().to_string(),
        spec: MessageField::some(Any { value: spec.as_bytes().to_vec(), ..Default::default() }),
        ..Default::default()
    };
    f.m.exec(exec).await.unwrap();
    let exec_state = StateRequest { id: "t2".into(), exec_id: "e1".into(), ..Default::default() };
    assert!(f.m.state(exec_state.clone()).await.unwrap().terminal);
    f.m.start(StartRequest { id: "t2".into(), exec_id: "e1".into(), ..Default::default() }).await.unwrap();
    let calls = f.runtime.calls.lock().unwrap().clone();
    assert!(calls.contains(&format!("exec t2 e1 {} console", io.stdout.display())), "{calls:?}");
    let slave = f.runtime.slaves.lock().unwrap().pop().expect("the stub sent a terminal");

    File::from(slave.try_clone().unwrap()).write_all(b"from exec\n").unwrap();
    assert!(read_until(&mut out, "from exec").await.contains("from exec"));
    f.m.resize_pty(resize("t2", "e1", 132, 50)).await.unwrap();
    assert_eq!(window_size(&slave), (50, 132));
    // The init has no terminal: resizing it is a no-op, and leaves the exec's alone.
    f.m.resize_pty(resize("t2", "", 10, 10)).await.unwrap();
    assert_eq!(window_size(&slave), (50, 132));
    assert_eq!(kind(f.m.resize_pty(resize("t2", "e1", 70_000, 10)).await), Kind::InvalidArgument);

    // It exits while something still holds its terminal: Delete waits a little, then closes the terminal.
    f.m.kill(KillRequest { id: "t2".into(), exec_id: "e1".into(), signal: 9, ..Default::default() }).await.unwrap();
    f.m.wait(WaitRequest { id: "t2".into(), exec_id: "e1".into(), ..Default::default() }).await.unwrap();
    let started = Instant::now();
    f.m.delete(DeleteRequest { id: "t2".into(), exec_id: "e1".into(), ..Default::default() }).await.unwrap();
    assert!(started.elapsed() >= OUTPUT_WAIT, "Delete gave the output {OUTPUT_WAIT:?}");
    wait_eof(&mut out).await;
    // The master end is closed: the terminal is hung up, and writes to it fail.
    let err = File::from(slave).write_all(b"x").expect_err("a hung-up terminal");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
}

#[tokio::test]
async fn a_runtime_that_sends_no_terminal_fails_the_create_and_the_container_is_deleted() {
    let f = fixture(false);
    let io = io();
    let err = f.m.create(tty_create("noconsole", &io)).await.expect_err("no terminal came");
    assert_eq!(err.kind, Kind::Internal, "{err}");
    let calls = f.runtime.calls.lock().unwrap().clone();
    assert!(calls.contains(&"delete noconsole true".to_string()), "{calls:?}");
    assert!(io.sockets().is_empty(), "{:?}", io.sockets());
    assert_eq!(kind(f.m.state(StateRequest { id: "noconsole".into(), ..Default::default() }).await), Kind::NotFound);
}

#[tokio::test]
async fn restoring_with_a_terminal_is_unimplemented() {
    let f = fixture(false);
    let io = io();
    let req = CreateTaskRequest { checkpoint: io.bundle(), ..tty_create("t3", &io) };
    assert_eq!(kind(f.m.create(req).await), Kind::Unimplemented);
    assert!(f.runtime.calls.lock().unwrap().is_empty(), "nothing reached the runtime");
}
