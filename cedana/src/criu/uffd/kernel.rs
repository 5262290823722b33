//! The userfaultfd calls of a lazy-pages handler (linux/userfaultfd.h): reading a process's events and
//! filling its missing pages. CRIU's restore opens each process's userfaultfd with the non-cooperative
//! events (fork, mremap, madvise-remove, munmap) and hands it to the handler.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

const EVENT_PAGEFAULT: u8 = 0x12;
const EVENT_FORK: u8 = 0x13;
const EVENT_REMAP: u8 = 0x14;
const EVENT_REMOVE: u8 = 0x15;
const EVENT_UNMAP: u8 = 0x16;
/// `sizeof(struct uffd_msg)`.
const MSG_SIZE: usize = 32;

// _IOWR(0xAA, 3, struct uffdio_copy), _IOWR(0xAA, 4, struct uffdio_zeropage), _IOR(0xAA, 1, struct uffdio_range).
const UFFDIO_COPY: libc::c_ulong = 0xc028_aa03;
const UFFDIO_ZEROPAGE: libc::c_ulong = 0xc020_aa04;
const UFFDIO_UNREGISTER: libc::c_ulong = 0x8010_aa01;

// _IOWR(0xAA, 0x3F, struct uffdio_api), and the features CRIU's lazy restore asks for.
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
const UFFD_API: u64 = 0xaa;
const NONCOOPERATIVE: u64 = (1 << 1) | (1 << 2) | (1 << 3) | (1 << 6); // EVENT_FORK, _REMAP, _REMOVE, _UNMAP

/// Whether this kernel's userfaultfd reports forks, mremaps, madvises and munmaps (what a restore through
/// userfaultfd needs), checked once on a userfaultfd of our own.
pub fn noncooperative() -> bool {
    static ANSWER: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ANSWER.get_or_init(|| {
        // SAFETY: the userfaultfd syscall takes flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if fd < 0 {
            return false;
        }
        // SAFETY: the descriptor was just created for us.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        #[repr(C)]
        struct UffdioApi {
            api: u64,
            features: u64,
            ioctls: u64,
        }
        let mut api = UffdioApi { api: UFFD_API, features: NONCOOPERATIVE, ioctls: 0 };
        // SAFETY: the kernel reads and writes the struct, which lives for the call.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api as *mut UffdioApi) };
        rc == 0 && api.features & NONCOOPERATIVE == NONCOOPERATIVE
    })
}

/// What a process's userfaultfd reports.
#[derive(Debug)]
pub enum Event {
    /// A thread touched the missing page at `address` and waits for it.
    PageFault { address: u64 },
    /// The process forked: the child's userfaultfd, over the same missing memory.
    Fork { uffd: OwnedFd },
    /// `mremap` moved `[from, from + len)` to `to`.
    Remap { from: u64, to: u64, len: u64 },
    /// `[start, end)` was dropped (`madvise(MADV_DONTNEED/REMOVE)`: it reads as zeros from now on).
    Remove { start: u64, end: u64 },
    /// `[start, end)` was unmapped.
    Unmap { start: u64, end: u64 },
}

fn u64_at(msg: &[u8; MSG_SIZE], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&msg[at..at + 8]);
    u64::from_ne_bytes(b)
}

/// Read the next event; `None` when none is pending (or the process is gone).
pub fn read_event(uffd: BorrowedFd<'_>) -> io::Result<Option<Event>> {
    let mut msg = [0u8; MSG_SIZE];
    // SAFETY: reads at most MSG_SIZE bytes into a buffer of that size.
    let n = unsafe { libc::read(uffd.as_raw_fd(), msg.as_mut_ptr().cast(), MSG_SIZE) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
            _ => Err(e),
        };
    }
    if n == 0 {
        return Ok(None);
    }
    if n as usize != MSG_SIZE {
        return Err(io::Error::other(format!("a userfaultfd message of {n} bytes")));
    }
    // The union starts at byte 8: pagefault {flags, address, ptid}, fork {ufd}, remap {from, to, len},
    // remove {start, end}.
    Ok(Some(match msg[0] {
        EVENT_PAGEFAULT => Event::PageFault { address: u64_at(&msg, 16) },
        EVENT_FORK => {
            let fd = u32::from_ne_bytes([msg[8], msg[9], msg[10], msg[11]]) as i32;
            // SAFETY: the kernel installed this descriptor in our table for us with the event; we own it.
            let uffd = unsafe { OwnedFd::from_raw_fd(fd) };
            set_nonblocking(uffd.as_raw_fd())?;
            Event::Fork { uffd }
        }
        EVENT_REMAP => Event::Remap { from: u64_at(&msg, 8), to: u64_at(&msg, 16), len: u64_at(&msg, 24) },
        EVENT_REMOVE => Event::Remove { start: u64_at(&msg, 8), end: u64_at(&msg, 16) },
        EVENT_UNMAP => Event::Unmap { start: u64_at(&msg, 8), end: u64_at(&msg, 16) },
        other => return Err(io::Error::other(format!("userfaultfd event {other:#x}, which a lazy restore does not expect"))),
    }))
}

/// Make reads of `fd` return at once when nothing is pending.
pub fn set_nonblocking(fd: i32) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL only read and set the descriptor's status flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// How a fill ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Filled {
    /// Every byte is in place.
    All,
    /// The first `n` bytes are; the process's memory is changing (an event is pending): try the rest later.
    Retry(u64),
    /// The first `n` bytes are, then a page that is there already (the rest may still be missing).
    Exists(u64),
    /// The range is not (wholly) in a registered mapping any more.
    NoMapping(u64),
    /// The process is gone.
    Gone,
}

#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
struct UffdioZeropage {
    start: u64,
    len: u64,
    mode: u64,
    zeropage: i64,
}

#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}

fn outcome(rc: libc::c_int, done: i64) -> io::Result<Filled> {
    if rc == 0 {
        return Ok(Filled::All);
    }
    let e = io::Error::last_os_error();
    let done = done.max(0) as u64;
    match e.raw_os_error() {
        Some(libc::EAGAIN) => Ok(Filled::Retry(done)),
        Some(libc::EEXIST) => Ok(Filled::Exists(done)),
        Some(libc::ENOENT) => Ok(Filled::NoMapping(done)),
        Some(libc::ESRCH) | Some(libc::ENOSPC) => Ok(Filled::Gone),
        _ => Err(e),
    }
}

/// Copy `data` into the process at `dst` (page-aligned, whole pages), waking the threads waiting for it.
pub fn copy(uffd: BorrowedFd<'_>, dst: u64, data: &[u8]) -> io::Result<Filled> {
    let mut arg = UffdioCopy { dst, src: data.as_ptr() as u64, len: data.len() as u64, mode: 0, copy: 0 };
    // SAFETY: the kernel reads `len` bytes at `src` (a live slice of that length) and writes `copy` in `arg`.
    let rc = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_COPY, &mut arg as *mut UffdioCopy) };
    outcome(rc, arg.copy)
}

/// Map zero pages over `[start, start + len)` (memory the checkpoint holds nothing for).
pub fn zero(uffd: BorrowedFd<'_>, start: u64, len: u64) -> io::Result<Filled> {
    let mut arg = UffdioZeropage { start, len, mode: 0, zeropage: 0 };
    // SAFETY: the kernel reads the range from `arg` and writes `zeropage` in it.
    let rc = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_ZEROPAGE, &mut arg as *mut UffdioZeropage) };
    outcome(rc, arg.zeropage)
}

/// Stop handling `[start, start + len)`: its faults are the kernel's again. `Ok(false)` when the process
/// is gone.
pub fn unregister(uffd: BorrowedFd<'_>, start: u64, len: u64) -> io::Result<bool> {
    let arg = UffdioRange { start, len };
    // SAFETY: the kernel only reads the range from `arg`.
    let rc = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_UNREGISTER, &arg as *const UffdioRange) };
    if rc == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENOMEM) | Some(libc::ESRCH) => Ok(false),
        _ => Err(e),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn this_kernel_has_what_restores_through_userfaultfd_need() {
        // Root on the machines the suite runs on (the fork event needs CAP_SYS_PTRACE).
        assert!(super::noncooperative(), "userfaultfd with fork, remap, remove and unmap events");
    }
}
