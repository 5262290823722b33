use super::pagemap::{encode_for_tests, Extent, Pagemap, PAGE_SIZE, PE_LAZY, PE_PARENT, PE_PRESENT};

const BASE: u64 = 0x7f00_0000_0000;

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
