//! The handler against the kernel's userfaultfd, on memory of the test process itself: a fill that races
//! with the program moving its memory.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use super::*;
use crate::criu::pages::pagemap::Extent;

const PAGES: u64 = 8;

/// Page `i` of the fake checkpoint: every byte `i + 1`.
struct Numbered;

impl PageStore for Numbered {
    fn read_at(&self, _pages_id: u32, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        for (k, b) in buf.iter_mut().enumerate() {
            *b = ((offset + k as u64) / PAGE_SIZE + 1) as u8;
        }
        Ok(())
    }
}

/// A userfaultfd of this process with the remap event, over a fresh anonymous mapping of `PAGES` pages.
fn registered() -> (OwnedFd, u64) {
    registered_pages(PAGES)
}

/// [`registered`], over `pages` pages.
fn registered_pages(pages: u64) -> (OwnedFd, u64) {
    // SAFETY: the userfaultfd syscall returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    assert!(fd >= 0, "userfaultfd: {}", std::io::Error::last_os_error());
    // SAFETY: just created, owned by nobody else.
    let uffd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut api = [0xaau64, 1 << 2 /* EVENT_REMAP */, 0];
    // SAFETY: UFFDIO_API reads and writes the three-word struct.
    assert_eq!(unsafe { libc::ioctl(uffd.as_raw_fd(), 0xc018_aa3f, api.as_mut_ptr()) }, 0);
    let len = (pages * PAGE_SIZE) as usize;
    // SAFETY: a new private anonymous mapping.
    // (One block more, to start it on a fault block's boundary.)
    let block = FAULT_BLOCK as usize;
    let at = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len + block,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(at, libc::MAP_FAILED);
    let (raw, at) = (at as usize, (at as usize).next_multiple_of(block));
    // SAFETY: unmaps the parts of the mapping just made before and after the aligned range.
    unsafe {
        if at > raw {
            libc::munmap(raw as *mut libc::c_void, at - raw);
        }
        libc::munmap((at + len) as *mut libc::c_void, raw + block - at);
    }
    let at = at as *mut libc::c_void;
    // struct uffdio_register { range { start, len }, mode (MISSING), ioctls }
    let mut register = [at as u64, len as u64, 1, 0];
    // SAFETY: UFFDIO_REGISTER reads and writes the four-word struct.
    assert_eq!(unsafe { libc::ioctl(uffd.as_raw_fd(), 0xc020_aa00, register.as_mut_ptr()) }, 0);
    (uffd, at as u64)
}

/// A session serving the fake checkpoint at `base`, with the write ends of its stop and fill pipes (kept
/// open: a closed one reads as a stop).
fn session(base: u64) -> (Session, [OwnedFd; 2]) {
    ordered_session(base, PAGES, 0, PageOrder::default())
}

/// [`session`] of `pages` pages at `offset` in their page image, bringing the blocks of `order` first.
fn ordered_session(base: u64, pages: u64, offset: u64, order: PageOrder) -> (Session, [OwnedFd; 2]) {
    let map = Pagemap { pages_id: 1, extents: vec![Extent { vaddr: base, nr_pages: pages, offset, lazy: true }] };
    let maps = HashMap::from([(7u64, map)]);
    let pages = Pages { maps, store: Arc::new(Numbered), images: PathBuf::new(), advance: None, order };
    let (stopped, stop) = pipe().unwrap();
    let (fill_asked, fill) = pipe().unwrap();
    (Session::new(pages, stopped, fill_asked, std::sync::mpsc::channel().0), [stop, fill])
}

/// Serve process 7 through `uffd`, with its `len` bytes at `base` all missing.
fn serve_whole(s: &mut Session, uffd: OwnedFd, base: u64, len: u64) {
    let mut missing = Missing::default();
    missing.add(base, base + len);
    s.procs.push(Proc::new(7, uffd, missing, base));
}

#[test]
fn pages_a_fill_finds_moved_away_stay_missing_and_arrive_where_the_memory_went() {
    let (uffd, from) = registered();
    let len = PAGES * PAGE_SIZE;
    // SAFETY: a new reservation to move the mapping onto.
    let to = unsafe {
        libc::mmap(std::ptr::null_mut(), len as usize, libc::PROT_NONE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
    };
    assert_ne!(to, libc::MAP_FAILED);
    let to = to as u64;
    let (mut s, _pipes) = session(from);
    let mut missing = Missing::default();
    missing.add(from, from + len);
    s.procs.push(Proc::new(7, uffd.try_clone().unwrap(), missing, from));

    // The program moves its memory; its mremap waits until the handler has read the event.
    let mover = std::thread::spawn(move || {
        // SAFETY: moves the mapping made above onto the reservation; neither is used by anything else.
        let at = unsafe {
            libc::mremap(
                from as *mut libc::c_void,
                len as usize,
                len as usize,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                to as *mut libc::c_void,
            )
        };
        at as u64
    });
    assert!(s.wait_readable(uffd.as_raw_fd()).unwrap(), "the remap event is queued");

    // A fill at the old place before the event is read: the kernel says "not mapped" (6.8 and newer) or
    // "changing"; either way nothing is taken as arrived.
    let filled = s.fill(0, Run { start: from, end: from + len, image: from }).unwrap();
    assert_eq!(filled, 0);
    assert_eq!(s.procs[0].missing.pages(), PAGES, "the pages are still missing");

    let event = kernel::read_event(uffd.as_fd()).unwrap().expect("the remap event");
    s.procs[0].changing = None;
    s.handle(0, event).unwrap();
    assert_eq!(mover.join().unwrap(), to);
    let run = s.procs[0].missing.next_after(0, len).expect("the moved pages are missing at their new place");
    assert_eq!((run.start, run.end, run.image), (to, to + len, from));
    assert_eq!(s.fill(0, run).unwrap(), len);
    assert!(s.procs[0].missing.is_empty());
    // SAFETY: every page of the moved mapping is in place now; read only.
    let moved = unsafe { std::slice::from_raw_parts(to as *const u8, len as usize) };
    for page in 0..PAGES as usize {
        assert!(moved[page * PAGE_SIZE as usize..][..PAGE_SIZE as usize].iter().all(|&b| b == page as u8 + 1), "page {page}");
    }
    // SAFETY: unmaps the mapping this test made.
    unsafe { libc::munmap(to as *mut libc::c_void, len as usize) };
}

#[test]
fn a_copy_across_mappings_split_since_the_dump_is_made_page_by_page() {
    let (uffd, base) = registered();
    let len = PAGES * PAGE_SIZE;
    // The program split its mapping in two (another protection for the second half).
    // SAFETY: changes the protection of the test's own mapping.
    assert_eq!(unsafe { libc::mprotect((base + len / 2) as *mut libc::c_void, (len / 2) as usize, libc::PROT_READ) }, 0);
    let (mut s, _pipes) = session(base);
    serve_whole(&mut s, uffd, base, len);
    assert_eq!(s.fill(0, Run { start: base, end: base + len, image: base }).unwrap(), len);
    assert!(s.procs[0].missing.is_empty() && s.procs[0].changing.is_none());
    // SAFETY: every page is in place; read only.
    let mem = unsafe { std::slice::from_raw_parts(base as *const u8, len as usize) };
    assert!((0..PAGES as usize).all(|p| mem[p * PAGE_SIZE as usize] == p as u8 + 1));
    // SAFETY: unmaps the mapping this test made.
    unsafe { libc::munmap(base as *mut libc::c_void, len as usize) };
}

#[test]
fn the_background_brings_the_recorded_blocks_first_on_to_their_chunks_end() {
    const BLOCKS: u64 = 4;
    let pages = BLOCKS * FAULT_BLOCK / PAGE_SIZE;
    let (uffd, base) = registered_pages(pages);
    let len = pages * PAGE_SIZE;
    let block = |b: u64| base + b * FAULT_BLOCK;
    // Blocks 0 and 1 lie at the end of the page image's first checksum chunk, 2 and 3 in the second.
    let offset = ORDER_CHUNK - 2 * FAULT_BLOCK;
    let mut order = PageOrder::default();
    // Block 3, then a PID the restore has not, then block 2, then block 0 (on to its chunk's end: 1 as well).
    for (pid, addr) in [(7, block(3)), (99, block(1)), (7, block(2)), (7, block(0))] {
        order.push(pid, addr);
    }
    let (mut s, _pipes) = ordered_session(base, pages, offset, order);
    serve_whole(&mut s, uffd, base, len);
    let block_pages = FAULT_BLOCK / PAGE_SIZE;
    let missing_at = |s: &Session, b: u64| s.procs[0].missing.find(block(b)).is_some();

    s.background().unwrap();
    assert!(!missing_at(&s, 3) && missing_at(&s, 2) && missing_at(&s, 0) && missing_at(&s, 1), "block 3 came first");
    assert_eq!(s.done.ordered, block_pages);
    s.background().unwrap();
    assert!(!missing_at(&s, 2) && missing_at(&s, 0) && missing_at(&s, 1), "then block 2");
    assert_eq!(s.done.ordered, 2 * block_pages);
    s.background().unwrap();
    assert!(s.procs[0].missing.is_empty(), "then block 0, and 1 up to the chunk's end");
    assert_eq!(s.done.ordered, 4 * block_pages);
    assert!(s.order.is_empty());
    // SAFETY: every page is in place; read only.
    let mem = unsafe { std::slice::from_raw_parts(base as *const u8, len as usize) };
    for p in 0..pages {
        assert_eq!(mem[(p * PAGE_SIZE) as usize], ((offset / PAGE_SIZE + p + 1) % 256) as u8, "page {p}");
    }
    // SAFETY: unmaps the mapping this test made.
    unsafe { libc::munmap(base as *mut libc::c_void, len as usize) };
}

#[test]
fn a_fault_is_recorded_once_by_its_block_and_the_rest_comes_as_without_an_order() {
    let pages = 4 * FAULT_BLOCK / PAGE_SIZE;
    let (uffd, base) = registered_pages(pages);
    let len = pages * PAGE_SIZE;
    let (mut s, _pipes) = ordered_session(base, pages, 0, PageOrder::default());
    serve_whole(&mut s, uffd, base, len);
    let at = base + 2 * FAULT_BLOCK + 5 * PAGE_SIZE + 7;
    s.fault(0, at).unwrap();
    assert!(s.procs[0].missing.find(at).is_none());
    assert_eq!(s.done.touched.blocks.iter().copied().collect::<Vec<_>>(), vec![(7, base + 2 * FAULT_BLOCK)]);
    while !s.procs[0].missing.is_empty() {
        s.background().unwrap();
    }
    assert_eq!(s.done.ordered, 0, "nothing came by an order");
    // SAFETY: every page is in place; read only.
    let mem = unsafe { std::slice::from_raw_parts(base as *const u8, len as usize) };
    assert!((0..pages).all(|p| mem[(p * PAGE_SIZE) as usize] == (p + 1) as u8));
    // SAFETY: unmaps the mapping this test made.
    unsafe { libc::munmap(base as *mut libc::c_void, len as usize) };
}

#[test]
fn right_after_a_fault_the_background_goes_on_from_it_before_the_order() {
    let pages = 4 * FAULT_BLOCK / PAGE_SIZE;
    let (uffd, base) = registered_pages(pages);
    let len = pages * PAGE_SIZE;
    let mut order = PageOrder::default();
    order.push(7, base + 3 * FAULT_BLOCK);
    let (mut s, _pipes) = ordered_session(base, pages, 0, order);
    serve_whole(&mut s, uffd, base, len);
    s.fault(0, base).unwrap();
    s.background().unwrap();
    assert!(s.procs[0].missing.is_empty(), "blocks 1 to 3 came on from the fault");
    assert_eq!(s.done.ordered, 0, "not by the order");
    s.background().unwrap();
    assert!(s.order.is_empty(), "block 3 of the order was passed over: there already");
    // SAFETY: unmaps the mapping this test made.
    unsafe { libc::munmap(base as *mut libc::c_void, len as usize) };
}
