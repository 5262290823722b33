//! Terminals through the stub runtime, which sends a real pseudo-terminal over the console socket as runc does:
//! the output reaches the stdout FIFO, the stdin FIFO reaches the terminal, ResizePty and CloseIO act on it, and
//! the copying ends (every descriptor closed) when the terminal's process side goes away or the process is deleted;
//! a task restored with a terminal gets it at Start, through a console socket given to the runtime's restore.

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

/// A Create with a checkpoint and a terminal (the restore is recorded; nothing reaches the runtime yet).
fn tty_restore(id: &str, io: &Io) -> CreateTaskRequest {
    CreateTaskRequest { checkpoint: io.bundle(), ..tty_create(id, io) }
}

#[tokio::test]
async fn a_task_restored_with_a_terminal_gets_it_at_start_and_keeps_it_until_delete() {
    let mut f = fixture(false);
    let io = io();
    let mut out = io.out_reader();
    let created = f.m.create(tty_restore("t3", &io)).await.unwrap();
    assert_eq!(created.pid, 0, "nothing runs before Start");
    match next_event(&mut f.events).await {
        Event::Create(e) => assert!(e.io.terminal && e.checkpoint == io.bundle(), "{e:?}"),
        other => panic!("expected create, got {other:?}"),
    }
    assert!(f.runtime.calls.lock().unwrap().is_empty(), "Create does not touch the runtime");
    let state = f.m.state(StateRequest { id: "t3".into(), ..Default::default() }).await.unwrap();
    assert!(state.terminal, "State reports the terminal of a pending restore");
    // Before Start there is no terminal yet: resizing it is a no-op, as for a process without one.
    f.m.resize_pty(resize("t3", "", 90, 30)).await.unwrap();

    let started = f.m.start(StartRequest { id: "t3".into(), ..Default::default() }).await.unwrap();
    assert_eq!(started.pid, RESTORED_PID as u32);
    assert!(matches!(next_event(&mut f.events).await, Event::Start(e) if e.pid == RESTORED_PID as u32));
    assert_eq!(
        *f.runtime.calls.lock().unwrap(),
        vec![format!("restore t3 {} {} console", io.bundle(), io.stdout.display())],
        "the runtime's restore is given a console socket"
    );
    assert!(io.sockets().is_empty(), "the console socket is removed once the terminal came: {:?}", io.sockets());
    let state = f.m.state(StateRequest { id: "t3".into(), ..Default::default() }).await.unwrap();
    assert_eq!((state.status.enum_value(), state.pid, state.terminal), (Ok(Status::RUNNING), RESTORED_PID as u32, true));
    let slave = f.runtime.slaves.lock().unwrap().pop().expect("the stub sent a terminal");

    // The restored process's output reaches the stdout FIFO, the client's input reaches the process.
    File::from(slave.try_clone().unwrap()).write_all(b"restored 42\n").unwrap();
    assert!(read_until(&mut out, "restored 42\r\n").await.contains("restored 42"));
    let mut input = io.in_writer().expect("the shim reads the stdin FIFO");
    input.write_all(b"typed after restore\n").unwrap();
    assert!(read_slave_until(&slave, "typed after restore\n").await.contains("typed after restore"));
    f.m.resize_pty(resize("t3", "", 120, 45)).await.unwrap();
    assert_eq!(window_size(&slave), (45, 120), "ResizePty acts on the restored task's terminal");

    // The restored init exits and its terminal closes: the copy ends, and Delete need not wait.
    drop(slave);
    wait_eof(&mut out).await;
    f.runtime.exits.send((RESTORED_PID, 3)).unwrap();
    let waited = f.m.wait(WaitRequest { id: "t3".into(), ..Default::default() }).await.unwrap();
    assert_eq!(waited.exit_status, 3);
    let started = Instant::now();
    let deleted = f.m.delete(DeleteRequest { id: "t3".into(), ..Default::default() }).await.unwrap();
    assert_eq!((deleted.pid, deleted.exit_status), (RESTORED_PID as u32, 3));
    assert!(started.elapsed() < OUTPUT_WAIT, "the output was copied already: Delete need not wait");
}

#[tokio::test]
async fn a_failed_terminal_restore_leaves_the_task_created_as_without_a_terminal_and_nothing_behind() {
    // The runtime's restore fails: the same error and state as the same restore without a terminal.
    let f = fixture(false);
    let io = io();
    f.m.create(tty_restore("badrestore", &io)).await.unwrap();
    let with = f.m.start(StartRequest { id: "badrestore".into(), ..Default::default() }).await.expect_err("restore fails");
    let g = fixture(false);
    let plain_io = self::io();
    let plain = CreateTaskRequest {
        id: "badrestore".into(),
        bundle: plain_io.bundle(),
        checkpoint: plain_io.bundle(),
        ..Default::default()
    };
    g.m.create(plain).await.unwrap();
    let without = g.m.start(StartRequest { id: "badrestore".into(), ..Default::default() }).await.expect_err("restore fails");
    assert_eq!((with.kind, with.to_string()), (without.kind, without.to_string()), "the runtime's error, as it is");
    for m in [&f.m, &g.m] {
        let state = m.state(StateRequest { id: "badrestore".into(), ..Default::default() }).await.unwrap();
        assert_eq!((state.status.enum_value(), state.pid), (Ok(Status::CREATED), 0), "still created, nothing running");
    }
    assert!(io.sockets().is_empty(), "no console socket left: {:?}", io.sockets());
    assert!(f.runtime.slaves.lock().unwrap().is_empty(), "no terminal was made");
    // No terminal: resizing is a no-op; the pending restore is deleted without a runtime container.
    f.m.resize_pty(resize("badrestore", "", 80, 24)).await.unwrap();
    f.m.delete(DeleteRequest { id: "badrestore".into(), ..Default::default() }).await.unwrap();
    assert_eq!(kind(f.m.state(StateRequest { id: "badrestore".into(), ..Default::default() }).await), Kind::NotFound);
    let calls = f.runtime.calls.lock().unwrap().clone();
    assert_eq!(
        calls,
        vec![format!("restore badrestore {} {} console", io.bundle(), io.stdout.display()), "delete badrestore true".into()]
    );

    // The runtime restores but sends no terminal: the restored container is deleted, the task stays created.
    let io = self::io();
    f.m.create(tty_restore("noconsole", &io)).await.unwrap();
    let err = f.m.start(StartRequest { id: "noconsole".into(), ..Default::default() }).await.expect_err("no terminal came");
    assert_eq!(err.kind, Kind::Internal, "{err}");
    let calls = f.runtime.calls.lock().unwrap().clone();
    assert_eq!(
        calls[2..],
        [format!("restore noconsole {} {} console", io.bundle(), io.stdout.display()), "delete noconsole true".into()]
    );
    let state = f.m.state(StateRequest { id: "noconsole".into(), ..Default::default() }).await.unwrap();
    assert_eq!((state.status.enum_value(), state.pid), (Ok(Status::CREATED), 0), "still created, nothing running");
    assert!(io.sockets().is_empty(), "{:?}", io.sockets());
}
