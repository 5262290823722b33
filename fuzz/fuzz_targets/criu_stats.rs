//! Any bytes as CRIU's `stats-dump` image: decoded or refused, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = cedana::criu::stats::decode_dump_stats(data);
});
