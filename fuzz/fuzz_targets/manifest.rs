//! Any bytes as a manifest: refused or parsed, and a parsed one serializes back to an equal manifest.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(manifest) = cedana::fuzzing::parse_manifest(data) {
        let again = cedana::fuzzing::parse_manifest(&manifest.to_json()).expect("a parsed manifest parses again");
        assert_eq!(again, manifest);
    }
});
