//! CRIU's pipe filled by `vmsplice`: a decoded unit's pages are put into the pipe by reference instead of
//! being copied in (for a 1 GiB restore, one copy of every page less: about 0.25 s on this kind of machine).
//!
//! The pipe then refers to our buffer's pages until CRIU has read them, so a buffer must neither change nor go
//! back to the allocator (which would hand its pages out again) before then. Each buffer is held until the
//! pipe's unread byte count (`FIONREAD`) shows CRIU read past its end; when the pipe is dropped, it waits for
//! CRIU to read the rest or to close its end. Should CRIU keep the pipe open unread for longer than
//! [`DRAIN_LIMIT`], the buffers are leaked rather than freed: wasted memory, never wrong pages.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use crate::checkpoint::UnitOut;
use crate::codec::pool::Pooled;

/// Longest a dropped pipe waits for CRIU to read what it still holds of our buffers.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(60);

/// CRIU's pipe (its write end, sent to us), taking decoded units by `vmsplice`.
pub struct SplicePipe<'a> {
    pipe: &'a File,
    /// Bytes put into the pipe so far.
    sent: u64,
    /// Buffers the pipe may still refer to, with the stream offset where each ends.
    held: VecDeque<(u64, Pooled)>,
    /// `vmsplice` works here (false after it was refused: units are then written).
    splice: bool,
}

impl<'a> SplicePipe<'a> {
    /// Write into `pipe`.
    pub fn new(pipe: &'a File) -> Self {
        Self { pipe, sent: 0, held: VecDeque::new(), splice: true }
    }

    /// Bytes in the pipe not read yet (`None` if the kernel does not say).
    fn unread(&self) -> Option<u64> {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int through the pointer, which points at `n`.
        let rc = unsafe { libc::ioctl(self.pipe.as_raw_fd(), libc::FIONREAD, &mut n) };
        (rc == 0).then_some(n.max(0) as u64)
    }

    /// Let go of the buffers CRIU has read past.
    fn release(&mut self) {
        let Some(unread) = self.unread() else { return };
        let consumed = self.sent.saturating_sub(unread);
        while self.held.front().is_some_and(|(end, _)| *end <= consumed) {
            self.held.pop_front();
        }
    }

    /// Whether CRIU closed its end (nothing will read the pipe any more).
    fn reader_gone(&self) -> bool {
        let mut fds = [libc::pollfd { fd: self.pipe.as_raw_fd(), events: 0, revents: 0 }];
        // SAFETY: poll reads and writes the one pollfd of `fds`, which outlives the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 1, 1) };
        rc > 0 && fds[0].revents & libc::POLLERR != 0
    }

    /// Put all of `data` into the pipe by reference; `Ok(false)` if the kernel refuses `vmsplice` here
    /// before anything went in.
    fn vmsplice_all(&mut self, data: &[u8]) -> io::Result<bool> {
        let mut off = 0;
        while off < data.len() {
            let iov = libc::iovec { iov_base: data[off..].as_ptr() as *mut libc::c_void, iov_len: data.len() - off };
            // SAFETY: the iovec points into `data`, alive for the call; the pipe only reads those pages, and the
            // caller holds the buffer until the pipe no longer refers to them (see `held`).
            let n = unsafe { libc::vmsplice(self.pipe.as_raw_fd(), &iov, 1, 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EINVAL | libc::ENOSYS) if off == 0 => return Ok(false),
                    _ => return Err(e),
                }
            }
            off += n as usize;
            self.sent += n as u64;
        }
        Ok(true)
    }
}

impl Write for SplicePipe<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = (&mut &*self.pipe).write(buf)?;
        self.sent += n as u64;
        self.release();
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl UnitOut for SplicePipe<'_> {
    fn write_unit(&mut self, data: Pooled) -> io::Result<()> {
        if self.splice {
            let before = self.sent;
            let spliced = self.vmsplice_all(&data);
            if self.sent > before {
                // Some of it is in the pipe by reference: hold it whatever happened next.
                self.held.push_back((self.sent, data));
                self.release();
                return spliced.map(drop);
            }
            match spliced {
                Ok(true) => return Ok(()),
                Ok(false) => {
                    tracing::debug!("vmsplice refused on CRIU's pipe: writing the units");
                    self.splice = false;
                }
                Err(e) => return Err(e),
            }
        }
        self.write_all(&data)
    }
}

impl Drop for SplicePipe<'_> {
    fn drop(&mut self) {
        let started = Instant::now();
        loop {
            self.release();
            if self.held.is_empty() || self.reader_gone() {
                return;
            }
            if started.elapsed() > DRAIN_LIMIT {
                let bytes: usize = self.held.iter().map(|(_, b)| b.len()).sum();
                tracing::warn!(bytes, "CRIU left part of an image unread in its pipe: its buffers are not reused");
                for (_, buf) in self.held.drain(..) {
                    std::mem::forget(buf);
                }
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::FromRawFd;

    fn pipe() -> (File, File) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills the two ints of `fds` with new descriptors, owned by the Files below.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both descriptors were just created and are owned by nothing else.
        unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
    }

    #[test]
    fn units_arrive_whole_and_in_order_and_their_buffers_are_held_until_read() {
        let (mut r, w) = pipe();
        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            r.read_to_end(&mut all).unwrap();
            all
        });
        let mut expected = Vec::new();
        {
            let mut out = SplicePipe::new(&w);
            for i in 0..6u8 {
                let unit: Vec<u8> = (0..3 << 20).map(|j: u32| (j as u8).wrapping_mul(7).wrapping_add(i)).collect();
                expected.extend_from_slice(&unit);
                out.write_unit(Pooled::unpooled(unit)).unwrap();
                // Never more held than what the pipe (1 MiB at most here) and the last unit can refer to.
                assert!(out.held.len() <= 2, "{} buffers held", out.held.len());
            }
            assert!(out.splice, "vmsplice works on a pipe");
            out.write_all(b"tail").unwrap();
            expected.extend_from_slice(b"tail");
        }
        drop(w);
        let got = reader.join().unwrap();
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "the bytes read are the bytes written");
    }

    #[test]
    fn a_pipe_whose_reader_closed_fails_the_write_and_the_drop_does_not_wait() {
        let (r, w) = pipe();
        drop(r);
        // (Rust's runtime ignores SIGPIPE: the write fails with EPIPE.)
        let started = Instant::now();
        {
            let mut out = SplicePipe::new(&w);
            let err = out.write_unit(Pooled::unpooled(vec![1u8; 1 << 20])).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
        }
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn the_drop_waits_for_the_reader_to_take_what_the_pipe_holds() {
        let (mut r, w) = pipe();
        let unit = vec![9u8; 32 << 10];
        let mut out = SplicePipe::new(&w);
        out.write_unit(Pooled::unpooled(unit)).unwrap();
        assert_eq!(out.held.len(), 1, "unread: held");
        let reader = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            let mut buf = vec![0u8; 32 << 10];
            r.read_exact(&mut buf).unwrap();
            buf
        });
        let started = Instant::now();
        drop(out);
        assert!(started.elapsed() >= Duration::from_millis(150), "the drop waited for the read");
        assert!(reader.join().unwrap().iter().all(|b| *b == 9));
    }
}
