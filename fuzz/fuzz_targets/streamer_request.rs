//! Any bytes as CRIU's side of an image-streamer connection: a run of requests, each a name of one path
//! component, then the end or a protocol error.
#![no_main]

use cedana::criu::streamer::{read_request, StreamerError};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut conn = std::io::Cursor::new(data);
    loop {
        match read_request(&mut conn) {
            Ok(Some(name)) => assert!(!name.is_empty() && !name.contains('/')),
            Ok(None) => break,
            Err(e) => {
                assert!(matches!(e, StreamerError::Protocol(_)), "{e}");
                break;
            }
        }
    }
});
