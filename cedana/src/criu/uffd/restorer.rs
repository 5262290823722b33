//! What `criu restore --lazy-pages` says on `lazy-pages.socket` (in its work folder), where the lazy-pages
//! handler listens: for each restored process its PID (a native `int`) followed by its userfaultfd (one
//! byte carrying the descriptor); a zombie's PID negated, with no descriptor; and once every process is
//! restored, the word `0x52535446` ("ReSTore Finished").

use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

/// "ReSTore Finished".
const RESTORE_FINISHED: u32 = 0x5253_5446;

/// One message of the restore.
#[derive(Debug)]
pub enum Message {
    /// A restored process (its PID in its own namespace) and its userfaultfd.
    Process { pid: i32, uffd: OwnedFd },
    /// A zombie: nothing of it to fill.
    Zombie,
    /// Every process is restored and about to run.
    Finished,
}

/// Read the next message; `None` when the restore closed the socket.
pub fn read_message(sock: &mut UnixStream) -> io::Result<Option<Message>> {
    let mut word = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match sock.read(&mut word[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "a message cut short")),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    if u32::from_ne_bytes(word) == RESTORE_FINISHED {
        return Ok(Some(Message::Finished));
    }
    let pid = i32::from_ne_bytes(word);
    if pid < 0 {
        return Ok(Some(Message::Zombie));
    }
    let uffd = receive_fd(sock)?;
    super::kernel::set_nonblocking(uffd.as_raw_fd())?;
    Ok(Some(Message::Process { pid, uffd }))
}

/// Receive the one descriptor sent with a byte.
fn receive_fd(sock: &UnixStream) -> io::Result<OwnedFd> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec { iov_base: byte.as_mut_ptr().cast(), iov_len: 1 };
    // Room for one descriptor's control message, aligned for cmsghdr.
    let mut control = [0u64; 8];
    // SAFETY: an all-zero msghdr is valid; its pointers are set below to live buffers.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    loop {
        // SAFETY: recvmsg writes at most iov_len bytes into `byte` and msg_controllen into `control`.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the restore closed the socket before sending a userfaultfd",
            ));
        }
        break;
    }
    // SAFETY: CMSG_FIRSTHDR reads the msghdr recvmsg filled; the header it returns lies within `control`.
    let cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    // SAFETY: `cmsg` is null or a header within `control` (checked before use).
    if cmsg.is_null() || unsafe { (*cmsg).cmsg_level != libc::SOL_SOCKET || (*cmsg).cmsg_type != libc::SCM_RIGHTS } {
        return Err(io::Error::other("the restore sent a PID without its userfaultfd"));
    }
    // SAFETY: an SCM_RIGHTS message holds at least one int; the descriptor is now ours.
    let fd = unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<i32>()) };
    // SAFETY: the kernel installed `fd` in our table for this message; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// As CRIU's `send_fd`: one byte carrying the descriptor.
    fn send_fd(sock: &UnixStream, fd: i32) {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        let iov = [std::io::IoSlice::new(&[0u8])];
        let sent = sendmsg::<()>(sock.as_raw_fd(), &iov, &[ControlMessage::ScmRights(&[fd])], MsgFlags::empty(), None);
        assert_eq!(sent.unwrap(), 1);
    }

    #[test]
    fn processes_zombies_and_the_end_are_read_as_criu_sends_them() {
        let (mut ours, mut theirs) = UnixStream::pair().unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();
        theirs.write_all(&1234i32.to_ne_bytes()).unwrap();
        send_fd(&theirs, file.as_raw_fd());
        theirs.write_all(&(-77i32).to_ne_bytes()).unwrap();
        theirs.write_all(&RESTORE_FINISHED.to_ne_bytes()).unwrap();
        drop(theirs);
        match read_message(&mut ours).unwrap() {
            Some(Message::Process { pid, uffd }) => {
                assert_eq!(pid, 1234);
                assert_ne!(uffd.as_raw_fd(), file.as_raw_fd(), "a descriptor of its own");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(read_message(&mut ours).unwrap(), Some(Message::Zombie)));
        assert!(matches!(read_message(&mut ours).unwrap(), Some(Message::Finished)));
        assert!(read_message(&mut ours).unwrap().is_none());
    }

    #[test]
    fn a_pid_without_its_descriptor_is_an_error() {
        let (mut ours, mut theirs) = UnixStream::pair().unwrap();
        theirs.write_all(&1234i32.to_ne_bytes()).unwrap();
        theirs.write_all(&[0u8]).unwrap();
        assert!(read_message(&mut ours).is_err());
    }
}
