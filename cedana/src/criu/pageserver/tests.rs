use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use super::pagemap::{encode_for_tests, Extent, Pagemap, PAGE_SIZE, PE_LAZY, PE_PARENT, PE_PRESENT};
use super::protocol::{Iov, IOV_SIZE, PS_IOV_ADD_F, PS_IOV_CLOSE, PS_IOV_GET};
use super::*;

const BASE: u64 = 0x7f00_0000_0000;

/// Pages whose every byte says which page of the image it is.
fn image(pages: u64) -> Vec<u8> {
    (0..pages).flat_map(|p| std::iter::repeat_n(p as u8, PAGE_SIZE as usize)).collect()
}

#[test]
fn a_pagemap_places_present_runs_one_after_another_in_the_pages_image() {
    let bytes = encode_for_tests(
        3,
        &[(0x1000, 2, PE_PRESENT), (0x9000, 4, PE_PARENT), (BASE, 3, PE_PRESENT | PE_LAZY), (BASE + 0x10000, 1, PE_PRESENT)],
    );
    let map = Pagemap::decode(&bytes).unwrap();
    assert_eq!(map.pages_id, 3);
    assert_eq!(
        map.extents,
        [
            Extent { vaddr: 0x1000, nr_pages: 2, offset: 0, lazy: false },
            Extent { vaddr: BASE, nr_pages: 3, offset: 2 * PAGE_SIZE, lazy: true },
            Extent { vaddr: BASE + 0x10000, nr_pages: 1, offset: 5 * PAGE_SIZE, lazy: false },
        ],
        "the parent's pages take no room in this image"
    );
    assert_eq!(map.find(BASE + PAGE_SIZE).map(|(e, left)| (e.vaddr, left)), Some((BASE, 2)));
    assert!(map.find(0x9000).is_none() && map.find(BASE + 3 * PAGE_SIZE).is_none());
    assert!(Pagemap::decode(&bytes[..bytes.len() - 3]).unwrap_err().to_string().contains("truncated"));
    assert!(Pagemap::decode(b"not an image at all").unwrap_err().to_string().contains("magic"));
}

#[test]
fn messages_are_laid_out_as_criu_lays_out_its_struct() {
    let iov = Iov { cmd: PS_IOV_ADD_F, flags: 4, nr_pages: 2, vaddr: 0x7f00_0000_1000, dst_id: 42 };
    let raw = iov.encode();
    assert_eq!(&raw[0..4], &(6u32 | (4 << 16)).to_le_bytes());
    assert_eq!(&raw[4..8], &[0; 4], "padding after the u32 command");
    assert_eq!(&raw[24..32], &42u64.to_le_bytes());
    assert_eq!(Iov::decode(&raw), iov);
}

/// A server on one end of a socket pair, over a pages image of 8 pages: PID 9 has them at BASE.
fn session() -> (UnixStream, std::thread::JoinHandle<Result<(), PageServerError>>, Arc<Served>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pages-1.img");
    std::fs::write(&path, image(8)).unwrap();
    let mut store = FilePages::new();
    store.insert(1, Arc::new(std::fs::File::open(&path).unwrap()), 0);
    let map = Pagemap::decode(&encode_for_tests(1, &[(BASE, 8, PE_PRESENT | PE_LAZY)])).unwrap();
    let server = PageServer::new(HashMap::from([(9, map)]), Arc::new(store));
    let served = server.served();
    let (ours, theirs) = UnixStream::pair().unwrap();
    let handle = std::thread::spawn(move || server.serve(theirs));
    (ours, handle, served)
}

fn ask(sock: &mut UnixStream, vaddr: u64, nr_pages: u64, pid: u64) {
    sock.write_all(&Iov { cmd: PS_IOV_GET, flags: 0, nr_pages, vaddr, dst_id: pid }.encode()).unwrap();
}

#[test]
fn the_server_answers_requests_with_the_pages_and_a_close_with_status_zero() {
    let (mut sock, handle, served) = session();
    ask(&mut sock, BASE + 2 * PAGE_SIZE, 3, 9);
    let mut head = [0u8; IOV_SIZE];
    sock.read_exact(&mut head).unwrap();
    let answer = Iov::decode(&head);
    let head_of = |h: &Iov| (h.cmd, h.flags, h.nr_pages, h.vaddr, h.dst_id);
    assert_eq!(head_of(&answer), (PS_IOV_ADD_F, 4, 3, BASE + 2 * PAGE_SIZE, 9));
    let mut pages = vec![0u8; 3 * PAGE_SIZE as usize];
    sock.read_exact(&mut pages).unwrap();
    assert_eq!(pages, image(8)[2 * PAGE_SIZE as usize..5 * PAGE_SIZE as usize]);
    // More than the run holds: the answer is cut at its end, as CRIU's own server does.
    ask(&mut sock, BASE + 6 * PAGE_SIZE, 100, 9);
    sock.read_exact(&mut head).unwrap();
    assert_eq!(Iov::decode(&head).nr_pages, 2);
    sock.read_exact(&mut pages[..2 * PAGE_SIZE as usize]).unwrap();
    sock.write_all(&Iov { cmd: PS_IOV_CLOSE, flags: 0, nr_pages: 0, vaddr: 0, dst_id: 0 }.encode()).unwrap();
    let mut status = [0xffu8; 4];
    sock.read_exact(&mut status).unwrap();
    assert_eq!(i32::from_le_bytes(status), 0);
    handle.join().unwrap().unwrap();
    assert_eq!(served.pages.load(std::sync::atomic::Ordering::Relaxed), 5);
}

#[test]
fn pages_the_checkpoint_lacks_a_foreign_command_or_a_hangup_end_the_session_with_an_error() {
    let (mut sock, handle, _) = session();
    ask(&mut sock, BASE, 1, 10);
    let e = handle.join().unwrap().unwrap_err();
    assert!(e.to_string().contains("PID 10"), "{e}");
    let (mut sock2, handle, _) = session();
    ask(&mut sock2, BASE - PAGE_SIZE, 1, 9);
    assert!(matches!(handle.join().unwrap(), Err(PageServerError::NoSuchPages { .. })));
    let (mut sock3, handle, _) = session();
    sock3.write_all(&Iov { cmd: 1, flags: 0, nr_pages: 1, vaddr: BASE, dst_id: 9 }.encode()).unwrap();
    assert!(handle.join().unwrap().unwrap_err().to_string().contains("command 0x1"));
    let (sock4, handle, _) = session();
    drop(sock4);
    assert!(matches!(handle.join().unwrap(), Err(PageServerError::Hangup)));
    drop(sock);
}
