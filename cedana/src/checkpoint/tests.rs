//! Round trips, detection, incompleteness and corruption of the checkpoint format.

use std::path::{Path, PathBuf};

use super::*;
use crate::codec::{Compression, ALL};
use crate::criu::options::CriuOptions;

pub(crate) fn manifest() -> Manifest {
    Manifest {
        format_version: FORMAT_VERSION,
        kind: CheckpointKind::Process,
        created_at: chrono::Utc::now(),
        hostname: "host".into(),
        cedana_version: "0".into(),
        criu_version: "4.2.1".into(),
        compression: Compression::None,
        process: ProcessInfo { pid: 42, pids: vec![42], cmdline: vec!["prog".into()], ..Default::default() },
        container: None,
        criu_options: CriuOptions { tcp_established: true, ..Default::default() },
        stats: None,
        checksum: digest::ALGORITHM.into(),
        files: Vec::new(),
        placement: Vec::new(),
        streamed: false,
        gpu: None,
        phases: Vec::new(),
    }
}

/// A fake images folder: a big pages file and a few small ones.
fn images(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let pages: Vec<u8> = (0..3_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(dir.join("pages-1.img"), pages).unwrap();
    std::fs::write(dir.join("core-42.img"), b"core").unwrap();
    std::fs::write(dir.join("inventory.img"), b"inv").unwrap();
    std::fs::write(dir.join("empty.img"), b"").unwrap();
}

fn write(dir: &Path, compression: Compression) -> PathBuf {
    let src = dir.join("src");
    images(&src);
    let path = CheckpointWriter::path_for(dir, "ckpt", compression);
    let mut w = CheckpointWriter::create(path, compression).unwrap();
    match w.in_place_dir().map(Path::to_path_buf) {
        Some(d) => {
            images(&d);
            w.add_tree(&d, &|_| {}).unwrap();
        }
        None => w.add_tree(&src, &|_| {}).unwrap(),
    }
    w.commit(&mut manifest()).unwrap()
}

#[test]
fn every_format_round_trips_and_verifies() {
    for c in ALL {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), c);
        assert_eq!(Compression::detect_path(&path).unwrap(), c);
        let scratch = dir.path().join("scratch");
        let opened = OpenedCheckpoint::open(&path, &scratch, &|_| {}).unwrap();
        assert_eq!(opened.manifest.files.len(), 4, "{c}");
        assert_eq!(opened.manifest.compression, c);
        assert!(opened.manifest.criu_options.tcp_established);
        let original = std::fs::read(dir.path().join("src/pages-1.img")).unwrap();
        assert_eq!(std::fs::read(opened.images_dir.join("pages-1.img")).unwrap(), original, "{c}");
        let extracted = opened.images_dir.clone();
        drop(opened);
        if c.is_archive() {
            assert!(!extracted.exists(), "{c}: extraction must be removed when dropped");
        }
        assert_eq!(read_manifest(&path, true).unwrap().files.len(), 4);
    }
}

#[test]
fn one_entry_is_read_and_checked_in_every_format() {
    for c in ALL {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), c);
        let original = std::fs::read(dir.path().join("src/pages-1.img")).unwrap();
        assert_eq!(super::read_entry(&path, "pages-1.img").unwrap(), Some(original), "{c}");
        assert_eq!(super::read_entry(&path, "no-such-file").unwrap(), None, "{c}");
    }
    // A folder checkpoint whose file changed after the dump: refused as corrupt.
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), Compression::None);
    std::fs::write(path.join("pages-1.img"), b"tampered").unwrap();
    assert!(matches!(super::read_entry(&path, "pages-1.img"), Err(CheckpointError::Corrupt { .. })));
}

/// Page images streamed in before their size is known, then the rest as usual: our reader verifies it and
/// the format's own command-line tools read it as one tar stream.
#[test]
fn entries_streamed_before_their_size_is_known_round_trip() {
    for c in [Compression::Tar, Compression::Gzip, Compression::Lz4, Compression::Zstd] {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        images(&src);
        std::fs::write(src.join("pages-2.img"), vec![9u8; 1000]).unwrap();
        let path = CheckpointWriter::path_for(dir.path(), "ckpt", c);
        let mut w = CheckpointWriter::create(path, c).unwrap();
        assert!(w.accepts_unsized(), "{c}");
        for name in ["pages-1.img", "pages-2.img"] {
            w.add_unsized(name, &mut std::fs::File::open(src.join(name)).unwrap()).unwrap();
        }
        w.add_tree(&src, &|_| {}).unwrap();
        assert!(!w.accepts_unsized(), "{c}: sized entries have started");
        let path = w.commit(&mut manifest()).unwrap();
        assert_eq!(Compression::detect_path(&path).unwrap(), c);
        let opened = OpenedCheckpoint::open(&path, &dir.path().join("scratch"), &|_| {}).unwrap();
        assert_eq!(opened.manifest.files.len(), 5, "{c}: each file once");
        for name in ["pages-1.img", "pages-2.img", "core-42.img", "empty.img"] {
            let want = std::fs::read(src.join(name)).unwrap();
            assert!(std::fs::read(opened.images_dir.join(name)).unwrap() == want, "{c}: {name}");
        }
        let tool = match c {
            Compression::Tar => "cat",
            Compression::Gzip => "gzip -dc",
            Compression::Lz4 => "lz4 -dc",
            _ => "zstd -dc",
        };
        let listing = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("{tool} < '{}' | tar -tf -", path.display()))
            .output()
            .unwrap();
        let names = String::from_utf8_lossy(&listing.stdout);
        assert!(listing.status.success(), "{c}: {tool} | tar: {}", String::from_utf8_lossy(&listing.stderr));
        assert_eq!(names.lines().next(), Some("pages-1.img"), "{c}");
        assert_eq!(names.lines().count(), 6, "{c}: {names}");
    }
}

#[test]
fn names_follow_the_compression() {
    let d = Path::new("/x");
    assert_eq!(CheckpointWriter::path_for(d, "n", Compression::Zstd), Path::new("/x/n.tar.zst"));
    assert_eq!(CheckpointWriter::path_for(d, "n", Compression::None), Path::new("/x/n"));
}

#[test]
fn an_unfinished_writer_leaves_nothing_behind() {
    for c in [Compression::None, Compression::Zstd] {
        let dir = tempfile::tempdir().unwrap();
        images(&dir.path().join("src"));
        let path = CheckpointWriter::path_for(dir.path(), "ckpt", c);
        let mut w = CheckpointWriter::create(path.clone(), c).unwrap();
        if w.in_place_dir().is_none() {
            w.add_tree(&dir.path().join("src"), &|_| {}).unwrap();
        }
        drop(w);
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(left, vec![std::ffi::OsString::from("src")], "{c}");
        assert!(!path.exists());
    }
}

#[test]
fn an_existing_checkpoint_is_never_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), Compression::Tar);
    let err = CheckpointWriter::create(path, Compression::Tar).err().unwrap();
    assert!(matches!(err, CheckpointError::Exists { .. }), "{err}");
}

#[test]
fn truncated_archives_are_refused() {
    for c in [Compression::Tar, Compression::Gzip, Compression::Lz4, Compression::Zlib, Compression::Zstd] {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), c);
        let bytes = std::fs::read(&path).unwrap();
        // A plain tar cut inside its zero trailer still holds every byte of data and is accepted; any cut
        // into data, and any cut of a compressed stream, must be refused.
        let mut cuts = vec![bytes.len() - 1100, bytes.len() / 2, 600];
        if c != Compression::Tar {
            cuts.push(bytes.len() - 10);
        }
        for cut in cuts {
            std::fs::write(&path, &bytes[..cut]).unwrap();
            let err = OpenedCheckpoint::open(&path, &dir.path().join("s"), &|_| {}).err().expect("must fail");
            assert!(
                matches!(err, CheckpointError::Corrupt { .. } | CheckpointError::Incomplete { .. }),
                "{c} cut at {cut}: {err}"
            );
        }
        // Nothing is left in the scratch folder after a refused restore.
        let left = std::fs::read_dir(dir.path().join("s")).map(|r| r.count()).unwrap_or(0);
        assert_eq!(left, 0, "{c}");
    }
}

#[test]
fn flipped_bytes_are_refused() {
    for c in [Compression::Tar, Compression::Gzip, Compression::Lz4, Compression::Zlib, Compression::Zstd] {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), c);
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.len() / 3;
        bytes[at] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        let err = OpenedCheckpoint::open(&path, &dir.path().join("s"), &|_| {}).err().expect("must fail");
        assert!(matches!(err, CheckpointError::Corrupt { .. } | CheckpointError::Incomplete { .. }), "{c}: {err}");
    }
}

#[test]
fn folder_checkpoints_detect_changes() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), Compression::None);
    let scratch = dir.path().join("s");
    // CRIU's own restore by-products are tolerated.
    std::fs::write(path.join("stats-restore"), b"x").unwrap();
    OpenedCheckpoint::open(&path, &scratch, &|_| {}).unwrap();
    // A modified image is not.
    let mut pages = std::fs::read(path.join("pages-1.img")).unwrap();
    pages[1000] ^= 1;
    std::fs::write(path.join("pages-1.img"), &pages).unwrap();
    let err = OpenedCheckpoint::open(&path, &scratch, &|_| {}).err().unwrap();
    assert!(err.to_string().contains("checksum mismatch in pages-1.img"), "{err}");
    pages[1000] ^= 1;
    std::fs::write(path.join("pages-1.img"), &pages).unwrap();
    // Neither is a missing one, nor an extra one.
    std::fs::write(path.join("intruder.img"), b"x").unwrap();
    assert!(OpenedCheckpoint::open(&path, &scratch, &|_| {}).is_err());
    std::fs::remove_file(path.join("intruder.img")).unwrap();
    std::fs::remove_file(path.join("core-42.img")).unwrap();
    let err = OpenedCheckpoint::open(&path, &scratch, &|_| {}).err().unwrap();
    assert!(err.to_string().contains("core-42.img"), "{err}");
    // Nor one without its manifest.
    std::fs::remove_file(path.join(MANIFEST_NAME)).unwrap();
    let err = OpenedCheckpoint::open(&path, &scratch, &|_| {}).err().unwrap();
    assert!(matches!(err, CheckpointError::Incomplete { .. }), "{err}");
}

#[test]
fn unsafe_archive_entries_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("evil.tar");
    let mut b = tar::Builder::new(std::fs::File::create(&path).unwrap());
    let mut h = tar::Header::new_gnu();
    h.set_size(1);
    h.set_mode(0o644);
    // tar::Builder refuses `..` itself, so write the name into the header by hand.
    h.as_gnu_mut().unwrap().name[..10].copy_from_slice(b"../escaped");
    h.set_cksum();
    b.append(&h, &b"x"[..]).unwrap();
    b.finish().unwrap();
    drop(b);
    let err = OpenedCheckpoint::open(&path, &dir.path().join("s"), &|_| {}).err().unwrap();
    assert!(err.to_string().contains("escape"), "{err}");
    assert!(!dir.path().join("escaped").exists());
}

#[test]
fn other_format_versions_are_refused_with_advice() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), Compression::None);
    let text = std::fs::read_to_string(path.join(MANIFEST_NAME)).unwrap();
    std::fs::write(path.join(MANIFEST_NAME), text.replace("\"format_version\": 1", "\"format_version\": 99")).unwrap();
    let err = read_manifest(&path, false).err().unwrap();
    assert!(matches!(err, CheckpointError::Version { found: 99, .. }), "{err}");
}

#[test]
fn missing_and_unrecognised_paths_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let err = read_manifest(&dir.path().join("nope.tar.zst"), false).err().unwrap();
    assert!(matches!(err, CheckpointError::NotFound { .. }), "{err}");
    let junk = dir.path().join("junk");
    std::fs::write(&junk, b"just text").unwrap();
    let err = read_manifest(&junk, false).err().unwrap();
    assert!(err.to_string().contains("not a checkpoint archive"), "{err}");
}

fn names(dir: &Path) -> Vec<String> {
    let mut n: Vec<String> =
        std::fs::read_dir(dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    n.sort();
    n
}

#[test]
fn space_for_the_commit_is_held_while_writing_and_released_after() {
    for c in [Compression::None, Compression::Zstd] {
        let dir = tempfile::tempdir().unwrap();
        let w = CheckpointWriter::create(CheckpointWriter::path_for(dir.path(), "cp", c), c).unwrap();
        let reserve = names(dir.path()).into_iter().find(|n| n.contains(".reserve-")).expect("a reserve file");
        assert_eq!(std::fs::metadata(dir.path().join(&reserve)).unwrap().len(), writer::COMMIT_RESERVE, "{c}");
        w.commit(&mut manifest()).unwrap();
        assert_eq!(names(dir.path()), [CheckpointWriter::path_for(Path::new(""), "cp", c).display().to_string()], "{c}");
        let w = CheckpointWriter::create(CheckpointWriter::path_for(dir.path(), "dropped", c), c).unwrap();
        drop(w);
        assert_eq!(names(dir.path()).len(), 1, "a dropped writer leaves nothing, reserve included ({c})");
    }
}

#[test]
fn a_commit_that_fails_after_the_point_of_no_return_keeps_what_was_written() {
    for keep in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        images(&src);
        let path = CheckpointWriter::path_for(dir.path(), "cp", Compression::None);
        let mut w = CheckpointWriter::create(path.clone(), Compression::None).unwrap();
        w.add_tree(&src, &|_| {}).unwrap();
        let temp = w.temp_path().to_path_buf();
        if keep {
            w.keep_if_unfinished();
        }
        // Someone takes the final name meanwhile: the commit fails.
        std::fs::write(&path, b"in the way").unwrap();
        let err = w.commit(&mut manifest()).err().unwrap();
        assert!(matches!(err, CheckpointError::Exists { .. }), "{err}");
        assert_eq!(temp.join("pages-1.img").is_file(), keep, "images kept only after keep_if_unfinished");
        assert!(!names(dir.path()).iter().any(|n| n.contains(".reserve-")));
    }
}
