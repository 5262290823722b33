//! Any bytes as a zstd unit, decoded whole (a local file) and as an object store hands it over in pieces:
//! no panic, and both ways reach the same verdict and the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Two bytes of the expected length (at most 64 KiB), one of the piece size, then the unit.
    let [a, b, p, unit @ ..] = data else { return };
    let len = u16::from_le_bytes([*a, *b]) as usize;
    let piece = 1 + (*p as usize) * 61;
    let (whole, pieces) = cedana::fuzzing::zstd_unit_both_ways(unit, len, piece);
    match (&whole, &pieces) {
        (Ok(x), Ok(y)) => assert!(x == y, "the two ways decode to different bytes"),
        (Err(_), Err(_)) => {}
        _ => panic!("whole {:?} but in pieces of {piece} {:?}", whole.map(|_| ()), pieces.map(|_| ())),
    }
});
