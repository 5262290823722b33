//! A console socket, as containerd's shim and `runc`'s recvtty hold one: runc connects to it and sends the
//! master end of the container's new pseudo-terminal (SCM_RIGHTS); its output is then read from that end.

use std::io::IoSliceMut;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};

use crate::lines::Lines;

/// A listening console socket; `receive` waits for the terminal a runtime sends.
pub struct ConsoleSocket {
    pub path: PathBuf,
    received: mpsc::Receiver<std::io::Result<OwnedFd>>,
}

impl ConsoleSocket {
    /// Listen at `path` and accept one runtime connection in the background.
    pub fn bind(path: &Path) -> ConsoleSocket {
        let listener = UnixListener::bind(path).expect("bind the console socket");
        let (tx, received) = mpsc::channel();
        std::thread::spawn(move || {
            let fd = listener.accept().and_then(|(stream, _)| receive_fd(&stream));
            let _ = tx.send(fd);
        });
        ConsoleSocket { path: path.to_path_buf(), received }
    }

    /// The terminal's master end, as lines of output.
    pub fn receive(&self, timeout: Duration) -> Lines {
        let fd = self
            .received
            .recv_timeout(timeout)
            .expect("the runtime sends a terminal to the console socket")
            .expect("receive the terminal's file descriptor");
        Lines::read(std::fs::File::from(fd))
    }
}

fn receive_fd(stream: &std::os::unix::net::UnixStream) -> std::io::Result<OwnedFd> {
    use std::os::fd::AsRawFd;
    let mut name = [0u8; 4096];
    let mut iov = [IoSliceMut::new(&mut name)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(stream.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::empty()).map_err(std::io::Error::from)?;
    for cmsg in msg.cmsgs().map_err(std::io::Error::from)? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            if let Some(&fd) = fds.first() {
                // SAFETY: the kernel just installed this descriptor in our table for us; nothing else owns it.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    Err(std::io::Error::other("the console socket message carried no file descriptor"))
}
