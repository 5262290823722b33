//! CRIU's image-streamer protocol (`criu dump --stream`, `criu restore --stream`), our own implementation:
//! images flow through pipes between CRIU and us instead of through files.
//!
//! CRIU connects to `streamer-capture.sock` (dump) or `streamer-serve.sock` (restore) in its images folder.
//! Each frame on that connection is a little-endian u32 length and a protobuf message. For each image file
//! CRIU sends a request naming it; at restore we first answer whether it exists. Then CRIU makes a pipe and
//! sends us one end (SCM_RIGHTS, with a one-byte payload): at dump CRIU writes the image into it, at
//! restore we do. Requests come one at a time, but several pipes may be open at once, so each is served on a
//! thread of its own and never left unread (CRIU would block on it). `stats-*` stay local files.
//!
//! - [`capture`]: the dump side, handing each image to an [`capture::ImageReceiver`];
//! - [`serve`]: the restore side, asking an [`serve::ImageProvider`] for each image.

pub mod capture;
pub mod serve;
pub mod splice;

use std::fs::File;
use std::io::{self, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Socket CRIU connects to at dump.
pub const CAPTURE_SOCKET: &str = "streamer-capture.sock";
/// Socket CRIU connects to at restore.
pub const SERVE_SOCKET: &str = "streamer-serve.sock";
/// The longer of the two names (for the length of a socket path in an images folder).
pub const LONGEST_SOCKET: &str = CAPTURE_SOCKET;

/// Largest request we accept (a file name).
const MAX_FRAME: u32 = 64 << 10;

/// Errors of the image streamer.
#[derive(Debug, thiserror::Error)]
pub enum StreamerError {
    #[error("image streamer socket {path}: {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("image streamer: CRIU sent a malformed request ({0})")]
    Protocol(String),
    #[error("image {name}: {source}")]
    Image {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("image streamer: images still in flight after {0:?}")]
    Timeout(Duration),
}

impl StreamerError {
    /// The class of this error, for wire protocols.
    pub fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind as K;
        match self {
            StreamerError::Socket { source, .. } | StreamerError::Image { source, .. } => K::of_io(source),
            StreamerError::Protocol(_) => K::Internal,
            StreamerError::Timeout(_) => K::Unavailable,
        }
    }
}

/// `img_streamer_request_entry`.
#[derive(Clone, PartialEq, prost::Message)]
struct Request {
    #[prost(string, required, tag = "1")]
    filename: String,
}

/// `img_streamer_reply_entry`.
#[derive(Clone, PartialEq, prost::Message)]
struct Reply {
    #[prost(bool, required, tag = "1")]
    exists: bool,
}

/// Read one request (a frame naming an image) from CRIU's connection; `None` at its end. Any byte stream
/// is either a request, the end, or a [`StreamerError::Protocol`].
pub fn read_request(conn: &mut impl Read) -> Result<Option<String>, StreamerError> {
    let mut len = [0u8; 4];
    match conn.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(StreamerError::Protocol(format!("reading a request: {e}"))),
    }
    let len = u32::from_le_bytes(len);
    if len > MAX_FRAME {
        return Err(StreamerError::Protocol(format!("a request of {len} bytes")));
    }
    let mut body = vec![0u8; len as usize];
    conn.read_exact(&mut body).map_err(|e| StreamerError::Protocol(format!("reading a request: {e}")))?;
    let req = <Request as prost::Message>::decode(&body[..]).map_err(|e| StreamerError::Protocol(e.to_string()))?;
    if req.filename.is_empty() || req.filename.contains('/') {
        return Err(StreamerError::Protocol(format!("image name {:?}", req.filename)));
    }
    Ok(Some(req.filename))
}

fn write_reply(conn: &mut UnixStream, exists: bool) -> io::Result<()> {
    let body = prost::Message::encode_to_vec(&Reply { exists });
    let mut frame = (body.len() as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(&body);
    conn.write_all(&frame)
}

/// Receive the pipe end CRIU sends after a request.
fn recv_fd(conn: &UnixStream) -> Result<File, StreamerError> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut byte = [0u8; 1];
    let mut iov = [IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!(RawFd);
    let msg = recvmsg::<()>(conn.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
        .map_err(|e| StreamerError::Protocol(format!("receiving a pipe: {e}")))?;
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs().map_err(|e| StreamerError::Protocol(format!("receiving a pipe: {e}")))? {
        if let ControlMessageOwned::ScmRights(r) = cmsg {
            fds.extend(r);
        }
    }
    let mut owned: Vec<OwnedFd> = fds
        .into_iter()
        // SAFETY: each descriptor just arrived with SCM_RIGHTS and is owned by nobody else in this process.
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    match (owned.pop(), owned.is_empty()) {
        (Some(fd), true) => Ok(File::from(fd)),
        _ => Err(StreamerError::Protocol("expected one pipe with the request".into())),
    }
}

/// Bytes waiting unread on a socket.
fn unread(fd: RawFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the pointer we pass.
    let rc = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) };
    if rc == 0 {
        n.max(0) as usize
    } else {
        0
    }
}

/// Make a pipe as large as the system allows up to 1 MiB (a 64 KiB pipe halves the stream's speed).
fn widen(fd: RawFd) {
    // SAFETY: F_SETPIPE_SZ takes an integer; failure leaves the pipe as it was.
    unsafe { libc::fcntl(fd, libc::F_SETPIPE_SZ, 1 << 20) };
}

/// What the server thread and the image threads share.
#[derive(Default)]
struct Shared {
    /// The server is handling a request (read from the socket, not yet handed to an image thread).
    busy: AtomicBool,
    /// Image threads still running.
    active: AtomicUsize,
    /// The connection, once CRIU connected (-1 before).
    conn: std::sync::atomic::AtomicI32,
    stop: AtomicBool,
    /// The first error, of the server or of an image.
    error: Mutex<Option<StreamerError>>,
    /// Every image CRIU asked for, in order.
    names: Mutex<Vec<String>>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl Shared {
    fn fail(&self, e: StreamerError) {
        let mut slot = self.error.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if slot.is_none() {
            *slot = Some(e);
        }
    }

    fn take_error(&self) -> Option<StreamerError> {
        self.error.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take()
    }

    fn names(&self) -> Vec<String> {
        self.names.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Wait until CRIU has nothing unread on the socket, no request is being handled and no image thread
    /// runs. Only meaningful while CRIU itself waits (at one of its notifications), so that it cannot start
    /// another image meanwhile.
    fn settle(&self, timeout: Duration) -> Result<(), StreamerError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.take_error() {
                return Err(e);
            }
            let conn = self.conn.load(Ordering::SeqCst);
            // The order matters: a request consumed from the socket is already marked busy, and a busy
            // request has counted its image thread before it is marked done.
            let quiet =
                (conn < 0 || unread(conn) == 0) && !self.busy.load(Ordering::SeqCst) && self.active.load(Ordering::SeqCst) == 0;
            if quiet {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(StreamerError::Timeout(timeout));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Run `work` on an image thread, counted in `active`.
    fn spawn(self: &Arc<Self>, name: &str, work: impl FnOnce() -> Result<(), StreamerError> + Send + 'static) -> io::Result<()> {
        self.active.fetch_add(1, Ordering::SeqCst);
        let shared = Arc::clone(self);
        let spawned = std::thread::Builder::new().name(format!("image {name}")).spawn(move || {
            if let Err(e) = work() {
                shared.fail(e);
            }
            shared.active.fetch_sub(1, Ordering::SeqCst);
        });
        match spawned {
            Ok(handle) => {
                self.threads.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(handle);
                Ok(())
            }
            Err(e) => {
                self.active.fetch_sub(1, Ordering::SeqCst);
                Err(e)
            }
        }
    }

    fn join_all(&self) {
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        for t in threads {
            let _ = t.join();
        }
    }
}

/// The listening side shared by capture and serve: a socket in the images folder and the thread that
/// accepts CRIU's one connection and handles its requests with `handle`.
struct Server {
    path: PathBuf,
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn listen(
        dir: &Path,
        socket: &str,
        mut handle: impl FnMut(&mut UnixStream, String, &Arc<Shared>) -> Result<(), StreamerError> + Send + 'static,
    ) -> Result<Self, StreamerError> {
        let path = dir.join(socket);
        let sock_err = |source| StreamerError::Socket { path: path.clone(), source };
        let listener = crate::criu::socket::bind_in(dir, socket).map_err(sock_err)?;
        let shared = Arc::new(Shared { conn: std::sync::atomic::AtomicI32::new(-1), ..Shared::default() });
        let state = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("criu-streamer".into())
            .spawn(move || {
                // Polled, not a blocking accept: `stop` must end the wait even when the socket's path is gone
                // (its folder removed under a dump), where connecting to wake it up cannot work.
                loop {
                    let mut fds = [libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
                    // SAFETY: poll on one valid descriptor we own.
                    let rc = unsafe { libc::poll(fds.as_mut_ptr(), 1, 100) };
                    if state.stop.load(Ordering::SeqCst) {
                        return;
                    }
                    if rc > 0 {
                        break;
                    }
                }
                let Ok((mut conn, _)) = listener.accept() else { return };
                if state.stop.load(Ordering::SeqCst) {
                    return;
                }
                state.conn.store(conn.as_raw_fd(), Ordering::SeqCst);
                loop {
                    // Wait for the next request without consuming it, so that `settle` sees it as unread.
                    let mut fds = [libc::pollfd { fd: conn.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
                    // SAFETY: poll on one valid descriptor we own.
                    let rc = unsafe { libc::poll(fds.as_mut_ptr(), 1, 100) };
                    if state.stop.load(Ordering::SeqCst) {
                        break;
                    }
                    if rc <= 0 {
                        continue;
                    }
                    state.busy.store(true, Ordering::SeqCst);
                    let res = match read_request(&mut conn) {
                        Ok(Some(name)) => {
                            state.names.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(name.clone());
                            handle(&mut conn, name, &state)
                        }
                        Ok(None) => {
                            state.busy.store(false, Ordering::SeqCst);
                            break;
                        }
                        Err(e) => Err(e),
                    };
                    state.busy.store(false, Ordering::SeqCst);
                    if let Err(e) = res {
                        tracing::warn!(error = %e, "image streamer stops");
                        state.fail(e);
                        break;
                    }
                }
                state.conn.store(-1, Ordering::SeqCst);
            })
            .map_err(sock_err)?;
        Ok(Self { path, shared, thread: Some(thread) })
    }

    /// Stop accepting requests, wait for every image thread, and give the first error and the images asked
    /// for.
    fn finish(mut self) -> Result<Vec<String>, StreamerError> {
        self.stop();
        self.shared.join_all();
        match self.shared.take_error() {
            Some(e) => Err(e),
            None => Ok(self.shared.names()),
        }
    }

    fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            // Wake an accept that is still waiting (CRIU never connected) at once; else it sees `stop` within
            // its poll's timeout.
            let _ = UnixStream::connect(&self.path);
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests;
