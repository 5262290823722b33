//! Any bytes as a checkpoint archive, opened by the extracting reader (and `read_manifest`, `read_entry`):
//! no panic, and nothing written outside the scratch folder, which is empty again after a refusal.
#![no_main]

use cedana::checkpoint::{read_entry, read_manifest, OpenedCheckpoint};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(dir) = tempfile::tempdir_in(cedana_fuzz_tmp()) else { return };
    let path = dir.path().join("input.tar");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let scratch = dir.path().join("scratch");
    match OpenedCheckpoint::open(&path, &scratch, &|_| {}) {
        Ok(opened) => {
            assert!(opened.images_dir.starts_with(&scratch));
            drop(opened);
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    let left = std::fs::read_dir(&scratch).map(|r| r.count()).unwrap_or(0);
    assert_eq!(left, 0, "the scratch folder is empty once the checkpoint is closed");
    let mut names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.file_name()).collect();
    names.sort();
    assert!(names.iter().all(|n| n == "input.tar" || n == "scratch"), "written outside the scratch folder: {names:?}");
    if let Ok(manifest) = read_manifest(&path, false) {
        if let Some(f) = manifest.files.first() {
            let _ = read_entry(&path, &f.name);
        }
    }
});

/// Where inputs are written: memory when the machine has a tmpfs there.
fn cedana_fuzz_tmp() -> std::path::PathBuf {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}
