//! Terminals of containers and exec processes, handled as containerd's runc shim handles them.
//!
//! For a process with a terminal the shim listens on a [`ConsoleSocket`] (a fresh unix socket, in the bundle when
//! its path fits in a socket address), passes its path to the runtime (`--console-socket`), and receives the
//! master end of the pseudo-terminal the runtime allocated (SCM_RIGHTS, with the console's name as payload). A
//! [`Console`] then copies the master's output to the stdout FIFO and the stdin FIFO to the master in background
//! tasks (stderr is unused: the terminal carries both outputs). The output copy ends when every holder of the
//! terminal's slave end is gone (reads of the master fail with EIO), the input copy when its FIFO reaches EOF,
//! when CloseIO stops it, or when the output copy has ended. Dropping a [`Console`] ends both and closes every
//! descriptor it held.

use std::io::IoSliceMut;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::error::{Error, Result};

/// The longest path a unix socket address holds (`sun_path` less its terminating NUL).
const SOCKET_PATH_MAX: usize = 107;
/// Size of the copy buffers.
const BUFFER: usize = 32 * 1024;

/// A unix socket a runtime sends a new terminal's master end to. The socket file is removed on drop.
pub struct ConsoleSocket {
    listener: UnixListener,
    path: PathBuf,
}

/// A socket file name not used before by this process.
fn socket_name() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("console-{}-{}.sock", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

impl ConsoleSocket {
    /// Listen on a new socket in `dir`, or in the temporary folder when that path is too long for a socket
    /// address (a long bundle path).
    pub fn bind(dir: &Path) -> Result<ConsoleSocket> {
        let name = socket_name();
        let mut path = dir.join(&name);
        if path.as_os_str().len() > SOCKET_PATH_MAX {
            path = std::env::temp_dir().join(&name);
        }
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)
            .map_err(|e| Error::internal(format!("creating the console socket {}: {e}", path.display())))?;
        Ok(ConsoleSocket { listener, path })
    }

    /// The socket's path, for the runtime's `--console-socket`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accept the runtime's connection and receive the terminal's master end (within `timeout`).
    pub async fn receive(&self, timeout: Duration) -> Result<OwnedFd> {
        let received = tokio::time::timeout(timeout, async {
            let (stream, _) = self.listener.accept().await?;
            loop {
                stream.readable().await?;
                match stream.try_io(tokio::io::Interest::READABLE, || receive_fd(stream.as_raw_fd())) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    other => return other,
                }
            }
        })
        .await
        .map_err(|_| Error::internal(format!("no terminal received on {} in {timeout:?}", self.path.display())))?;
        let fd = received.map_err(|e| Error::internal(format!("receiving the terminal on {}: {e}", self.path.display())))?;
        if !nix::unistd::isatty(&fd).unwrap_or(false) {
            return Err(Error::internal(format!("the descriptor received on {} is not a terminal", self.path.display())));
        }
        Ok(fd)
    }
}

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// One message from the runtime: the console's name and, in its control data, one descriptor (close-on-exec, so
/// it never leaks into the runtime commands the shim starts later).
fn receive_fd(socket: std::os::fd::RawFd) -> std::io::Result<OwnedFd> {
    let mut name = [0u8; 4096];
    let mut iov = [IoSliceMut::new(&mut name)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 2]);
    let msg = recvmsg::<()>(socket, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC).map_err(std::io::Error::from)?;
    let mut received: Vec<OwnedFd> = Vec::new();
    for cmsg in msg.cmsgs().map_err(std::io::Error::from)? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            // SAFETY: the kernel just installed these descriptors in our table for us; nothing else owns them.
            received.extend(fds.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
        }
    }
    let bytes = msg.bytes;
    if received.is_empty() {
        return Err(std::io::Error::other(if bytes == 0 {
            "the runtime closed the console socket without sending a terminal"
        } else {
            "the console socket message carried no file descriptor"
        }));
    }
    let console = String::from_utf8_lossy(&name[..bytes.min(name.len())]).trim_end_matches('\0').to_string();
    log::debug!("received the terminal {console:?}");
    // Any extra descriptor is closed here.
    Ok(received.swap_remove(0))
}

/// A process's terminal: the master end and the tasks copying between it and the process's FIFOs.
pub struct Console {
    master: Arc<AsyncFd<OwnedFd>>,
    input: Option<JoinHandle<()>>,
    output: JoinHandle<()>,
    /// True once the output copy has ended (the terminal closed, or its destination failed).
    output_done: watch::Receiver<bool>,
}

impl Console {
    /// Start copying between the terminal's master end and the process's FIFOs: `stdout` (a FIFO or a file;
    /// empty: the output is read and dropped) and `stdin` (a FIFO; empty: none).
    pub fn start(master: OwnedFd, stdin: &str, stdout: &str) -> Result<Console> {
        set_nonblocking(&master)?;
        // SAFETY: an OwnedFd is a valid open descriptor, owned by the AsyncFd until it is dropped, and always
        // reports that same descriptor.
        let master = unsafe { AsyncFd::register(master) }
            .map_err(|e| Error::internal(format!("watching the terminal's master end: {e}")))?;
        let master = Arc::new(master);
        let out = open_output(stdout)?;
        let input = if stdin.is_empty() {
            None
        } else {
            let path = stdin.strip_prefix("file://").unwrap_or(stdin);
            let fifo = tokio::net::unix::pipe::OpenOptions::new()
                .open_receiver(path)
                .map_err(|e| Error::internal(format!("opening the stdin FIFO {path}: {e}")))?;
            Some(fifo)
        };
        let (done_tx, output_done) = watch::channel(false);
        let output = tokio::spawn(copy_output(Arc::clone(&master), out, done_tx));
        let input = input.map(|fifo| tokio::spawn(copy_input(fifo, Arc::clone(&master), output_done.clone())));
        Ok(Console { master, input, output, output_done })
    }

    /// Set the terminal's window size (TIOCSWINSZ on the master end; the process gets SIGWINCH).
    pub fn resize(&self, width: u32, height: u32) -> Result<()> {
        let size = libc::winsize {
            ws_row: u16::try_from(height).map_err(|_| Error::invalid(format!("terminal height {height} too large")))?,
            ws_col: u16::try_from(width).map_err(|_| Error::invalid(format!("terminal width {width} too large")))?,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which is valid for the duration of the call.
        let rc = unsafe { libc::ioctl(self.master.get_ref().as_raw_fd(), libc::TIOCSWINSZ, &size) };
        if rc != 0 {
            return Err(Error::internal(format!("resizing the terminal: {}", std::io::Error::last_os_error())));
        }
        Ok(())
    }

    /// Stop copying stdin to the terminal and close the stdin FIFO (CloseIO).
    pub fn close_stdin(&mut self) {
        if let Some(input) = self.input.take() {
            input.abort();
        }
    }

    /// Wait up to `timeout` for the output copy to end (the process and every other holder of the terminal
    /// gone); whether it did.
    pub async fn wait_output(&mut self, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, self.output_done.wait_for(|done| *done)).await.is_ok_and(|r| r.is_ok())
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        self.close_stdin();
        self.output.abort();
    }
}

fn set_nonblocking(fd: &OwnedFd) -> Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = fcntl(fd, FcntlArg::F_GETFL).map_err(|e| Error::internal(format!("terminal flags: {e}")))?;
    fcntl(fd, FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK))
        .map_err(|e| Error::internal(format!("terminal flags: {e}")))?;
    Ok(())
}

type Output = Option<Box<dyn AsyncWrite + Send + Unpin>>;

/// The destination of the terminal's output: a FIFO opened read-write (the open never waits for a reader, and a
/// reader that goes away does not make writes fail), else a file appended to; `None` for no stdout.
fn open_output(stdout: &str) -> Result<Output> {
    if stdout.is_empty() {
        return Ok(None);
    }
    let path = stdout.strip_prefix("file://").unwrap_or(stdout);
    let is_fifo = std::fs::metadata(path).map(|m| std::os::unix::fs::FileTypeExt::is_fifo(&m.file_type()))?;
    let out: Box<dyn AsyncWrite + Send + Unpin> = if is_fifo {
        let fifo = tokio::net::unix::pipe::OpenOptions::new()
            .read_write(true)
            .open_sender(path)
            .map_err(|e| Error::internal(format!("opening the stdout FIFO {path}: {e}")))?;
        Box::new(fifo)
    } else {
        let file = std::fs::OpenOptions::new().append(true).open(path)?;
        Box::new(tokio::fs::File::from_std(file))
    };
    Ok(Some(out))
}

/// Read from the master end; `Ok(0)` once every holder of the slave end is gone (EIO).
async fn read_master(master: &AsyncFd<OwnedFd>, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        let mut ready = master.readable().await?;
        match ready.try_io(|fd| nix::unistd::read(fd.get_ref(), buf).map_err(std::io::Error::from)) {
            Ok(Err(e)) if e.raw_os_error() == Some(Errno::EIO as i32) => return Ok(0),
            Ok(result) => return result,
            Err(_would_block) => continue,
        }
    }
}

/// Write all of `data` to the master end.
async fn write_master(master: &AsyncFd<OwnedFd>, mut data: &[u8]) -> std::io::Result<()> {
    while !data.is_empty() {
        let mut ready = master.writable().await?;
        match ready.try_io(|fd| nix::unistd::write(fd.get_ref().as_fd(), data).map_err(std::io::Error::from)) {
            Ok(Ok(n)) => data = &data[n..],
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
    Ok(())
}

/// Terminal → stdout, until the terminal closes; then the destination is closed and `done` set.
async fn copy_output(master: Arc<AsyncFd<OwnedFd>>, mut out: Output, done: watch::Sender<bool>) {
    let mut buf = vec![0u8; BUFFER];
    loop {
        let n = match read_master(&master, &mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                log::warn!("reading the terminal: {e}");
                break;
            }
        };
        if let Some(w) = out.as_mut() {
            if let Err(e) = w.write_all(&buf[..n]).await {
                log::warn!("copying the terminal's output to stdout: {e}");
                // Keep draining the terminal, so the process never blocks on a full one.
                out = None;
            }
        }
    }
    if let Some(mut w) = out {
        let _ = w.flush().await;
    }
    done.send_replace(true);
}

/// stdin → terminal, until the FIFO's EOF, a write error, or the end of the output copy.
async fn copy_input(mut fifo: tokio::net::unix::pipe::Receiver, master: Arc<AsyncFd<OwnedFd>>, mut done: watch::Receiver<bool>) {
    let mut buf = vec![0u8; BUFFER];
    loop {
        let n = tokio::select! {
            r = fifo.read(&mut buf) => match r {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    log::warn!("reading stdin: {e}");
                    break;
                }
            },
            _ = done.wait_for(|d| *d) => break,
        };
        if let Err(e) = write_master(&master, &buf[..n]).await {
            log::warn!("copying stdin to the terminal: {e}");
            break;
        }
    }
}
