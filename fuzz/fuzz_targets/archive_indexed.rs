//! Any bytes as a checkpoint archive, read out of order through its index (streamed restores) and opened
//! for a lazy restore: no panic, every file served or refused.
#![no_main]

use std::sync::Arc;

use cedana::checkpoint::index::IndexedArchive;
use cedana::checkpoint::LocalSource;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let shm = std::path::Path::new("/dev/shm");
    let tmp = if shm.is_dir() { shm.to_path_buf() } else { std::env::temp_dir() };
    let Ok(dir) = tempfile::tempdir_in(tmp) else { return };
    let path = dir.path().join("input.tar");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let Ok(source) = LocalSource::open(&path) else { return };
    if let Ok(Some(archive)) = IndexedArchive::open(Arc::new(source), 1 << 20) {
        for f in &archive.manifest().files {
            let mut out = Vec::new();
            if let Ok(d) = archive.copy_to(&f.name, &mut out) {
                assert_eq!(d.bytes, f.size);
                assert_eq!(out.len() as u64, f.size);
            }
        }
    }
    let scratch = dir.path().join("scratch");
    drop(cedana::checkpoint::lazy::open_lazy(&path, &scratch));
    drop(cedana::checkpoint::OpenedCheckpoint::open_streamed(&path, &scratch));
    let left = std::fs::read_dir(&scratch).map(|r| r.count()).unwrap_or(0);
    assert_eq!(left, 0, "the scratch folder is empty once the checkpoint is closed");
});
