//! Archives written through sinks: to a pipe (not seekable) in every format, to a local file, and cancelled.

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::tests::manifest;
use super::*;
use crate::cancel::Cancel;
use crate::codec::Compression;

const ARCHIVES: [Compression; 5] = [Compression::Tar, Compression::Gzip, Compression::Lz4, Compression::Zlib, Compression::Zstd];

/// A fake images folder: a big page image (several encoder blocks) and a few small ones.
fn images(dir: &Path) {
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    let pages: Vec<u8> = (0..20_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(dir.join("pages-1.img"), pages).unwrap();
    std::fs::write(dir.join("core-42.img"), b"core").unwrap();
    std::fs::write(dir.join("empty.img"), b"").unwrap();
    std::fs::write(dir.join("sub/inventory.img"), b"inv").unwrap();
}

/// The names in `dir` (not recursive), sorted.
fn left_in(dir: &Path) -> Vec<String> {
    let mut n: Vec<String> =
        std::fs::read_dir(dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    n.sort();
    n
}

/// An OS pipe: the write end as a sink's stream, and a thread collecting what comes out of the read end.
fn pipe() -> (File, std::thread::JoinHandle<Vec<u8>>) {
    let (read, write) = nix::unistd::pipe().unwrap();
    let mut read = File::from(read);
    let reader = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        read.read_to_end(&mut bytes).unwrap();
        bytes
    });
    (File::from(write), reader)
}

#[test]
fn archives_streamed_through_a_pipe_read_back_in_every_format() {
    for c in ARCHIVES {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        images(&src);
        let (out, reader) = pipe();
        // Truly not seekable: the sink could not back-patch even if it tried.
        assert!(std::io::Seek::stream_position(&mut &out).is_err(), "{c}: a pipe does not seek");
        let sink = sink::Stream::new(out, "pipe:ckpt");
        let mut w = CheckpointWriter::to_sink(Box::new(sink), c).unwrap();
        assert_eq!(w.final_path(), Path::new("pipe:ckpt"));
        assert!(w.in_place_dir().is_none());
        assert!(!w.accepts_unsized(), "{c}: a stream cannot take entries before their size is known");
        let err = w.add_unsized("pages-9.img", &mut &b"data"[..]).expect_err("refused");
        assert!(err.to_string().contains("patch its header"), "{c}: {err}");
        w.add_tree(&src, &|_| {}).unwrap();
        let location = w.commit(&mut manifest()).unwrap();
        assert_eq!(location, Path::new("pipe:ckpt"));
        let bytes = reader.join().unwrap();

        let path = CheckpointWriter::path_for(dir.path(), "saved", c);
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(Compression::detect_path(&path).unwrap(), c);
        let m = read_manifest(&path, true).unwrap();
        let want = ["core-42.img", "empty.img", "pages-1.img", "sub/inventory.img"];
        assert_eq!(m.files.iter().map(|f| f.name.as_str()).collect::<Vec<_>>(), want, "{c}");
        assert_eq!(m.compression, c);
        let opened = OpenedCheckpoint::open(&path, &dir.path().join("scratch"), &|_| {}).unwrap();
        for name in want {
            assert!(
                std::fs::read(opened.images_dir.join(name)).unwrap() == std::fs::read(src.join(name)).unwrap(),
                "{c}: {name}"
            );
        }

        // zlib has no standard command-line decompressor (a raw zlib stream is neither gzip nor .Z): our reader
        // above is its only check.
        let tool = match c {
            Compression::Tar => "cat",
            Compression::Gzip => "gzip -dc",
            Compression::Lz4 => "lz4 -dc",
            Compression::Zstd => "zstd -dc",
            _ => continue,
        };
        let listing = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("{tool} < '{}' | tar -tf -", path.display()))
            .output()
            .unwrap();
        assert!(listing.status.success(), "{c}: {tool} | tar: {}", String::from_utf8_lossy(&listing.stderr));
        let names = String::from_utf8_lossy(&listing.stdout);
        let mut expected: Vec<&str> = want.to_vec();
        expected.push(MANIFEST_NAME);
        assert_eq!(names.lines().collect::<Vec<_>>(), expected, "{c}: the same entries, the manifest last");
    }
}

#[test]
fn archives_written_past_the_page_cache_read_back_and_stay_out_of_it() {
    for c in ARCHIVES {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        images(&src);
        let path = CheckpointWriter::path_for(dir.path(), "ckpt", c);
        let sink = LocalFile::create_with(path.clone(), Existing::Refuse, true).unwrap();
        assert!(sink.stages_writes(), "{c}: ext4 and tmpfs take direct writes");
        let mut w = CheckpointWriter::to_sink(Box::new(sink), c).unwrap();
        // An entry of unknown size first: its header is patched in once written.
        if w.accepts_unsized() {
            w.add_unsized("pages-1.img", &mut File::open(src.join("pages-1.img")).unwrap()).unwrap();
        }
        w.add_tree(&src, &|_| {}).unwrap();
        assert_eq!(w.commit(&mut manifest()).unwrap(), path);
        let pages = std::fs::metadata(&path).unwrap().len().div_ceil(4096) as usize;
        let cached = super::direct::cached_pages(&path);
        assert!(cached * 10 < pages, "{c}: {cached} of {pages} pages in the page cache");
        let m = read_manifest(&path, true).unwrap();
        assert_eq!(m.files.len(), 4, "{c}");
        let opened = OpenedCheckpoint::open(&path, &dir.path().join("scratch"), &|_| {}).unwrap();
        for name in ["core-42.img", "empty.img", "pages-1.img", "sub/inventory.img"] {
            assert!(
                std::fs::read(opened.images_dir.join(name)).unwrap() == std::fs::read(src.join(name)).unwrap(),
                "{c}: {name}"
            );
        }
    }
}

#[test]
fn a_stream_is_handed_back_when_finished() {
    let dir = tempfile::tempdir().unwrap();
    images(&dir.path().join("src"));
    let got = Arc::new(Mutex::new(None));
    let slot = Arc::clone(&got);
    let sink = sink::Stream::new(Vec::new(), "memory").on_finish(move |bytes| {
        *slot.lock().unwrap() = Some(bytes);
        Ok(())
    });
    let mut w = CheckpointWriter::to_sink(Box::new(sink), Compression::Zstd).unwrap();
    w.add_tree(&dir.path().join("src"), &|_| {}).unwrap();
    w.add_bytes("extra.json", b"{}").unwrap();
    assert_eq!(w.commit(&mut manifest()).unwrap(), Path::new("memory"));
    let bytes = got.lock().unwrap().take().expect("handed back");
    let path = dir.path().join("memory.tar.zst");
    std::fs::write(&path, bytes).unwrap();
    assert_eq!(read_manifest(&path, true).unwrap().files.len(), 5);
}

#[test]
fn a_failed_finish_fails_the_commit() {
    let sink = sink::Stream::new(Vec::new(), "memory").on_finish(|_| Err(std::io::Error::other("upload refused")));
    let w = CheckpointWriter::to_sink(Box::new(sink), Compression::Gzip).unwrap();
    let err = w.commit(&mut manifest()).expect_err("must fail");
    assert!(matches!(err, CheckpointError::Io { .. }) && err.to_string().contains("upload refused"), "{err}");
}

#[test]
fn a_folder_cannot_go_to_a_sink() {
    let dir = tempfile::tempdir().unwrap();
    let sink = LocalFile::create(dir.path().join("ckpt")).unwrap();
    let err = CheckpointWriter::to_sink(Box::new(sink), Compression::None).expect_err("refused");
    assert!(err.to_string().contains("compression none"), "{err}");
    assert!(left_in(dir.path()).is_empty(), "the refused sink was aborted: {:?}", left_in(dir.path()));
}

#[test]
fn a_dropped_writer_over_a_local_file_leaves_nothing() {
    for c in ARCHIVES {
        // Dropped before any entry, after entries of unknown size, and in the middle of the tar stream.
        for stage in 0..3 {
            let dir = tempfile::tempdir().unwrap();
            let src = dir.path().join("src");
            images(&src);
            let path = CheckpointWriter::path_for(dir.path(), "ckpt", c);
            let mut w = CheckpointWriter::to_sink(Box::new(LocalFile::create(path.clone()).unwrap()), c).unwrap();
            assert_eq!(w.final_path(), path);
            assert!(w.temp_path().starts_with(dir.path()) && w.temp_path() != path);
            assert!(w.temp_path().exists());
            if stage >= 1 && w.accepts_unsized() {
                w.add_unsized("pages-1.img", &mut File::open(src.join("pages-1.img")).unwrap()).unwrap();
            }
            if stage >= 2 {
                w.add_tree(&src, &|_| {}).unwrap();
            }
            drop(w);
            assert_eq!(left_in(dir.path()), ["src"], "{c}, stage {stage}");
        }
    }
}

#[test]
fn a_kept_unfinished_archive_holds_everything_written() {
    for direct in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        images(&src);
        let path = CheckpointWriter::path_for(dir.path(), "ckpt", Compression::Lz4);
        let mut w = CheckpointWriter::create_with(path.clone(), Compression::Lz4, Existing::Refuse, direct).unwrap();
        w.add_tree(&src, &|_| {}).unwrap();
        w.keep_if_unfinished();
        let temp = w.temp_path().to_path_buf();
        drop(w);
        assert!(!path.exists());
        // Every entry is there, whole (the staged bytes of a direct writer too); only the manifest is missing.
        let err = read_manifest(&temp, false).expect_err("no manifest");
        assert!(matches!(err, CheckpointError::Incomplete { .. }), "{err}");
        let listing = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("lz4 -dc < '{}' | tar -tf -", temp.display()))
            .output()
            .unwrap();
        assert!(listing.status.success(), "direct {direct}: {}", String::from_utf8_lossy(&listing.stderr));
        assert_eq!(String::from_utf8_lossy(&listing.stdout).lines().count(), 4);
        assert!(!left_in(dir.path()).iter().any(|n| n.contains(".reserve-")));
    }
}

#[test]
fn a_commit_over_an_existing_checkpoint_keeps_or_deletes_the_archive() {
    for keep in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        images(&src);
        let path = CheckpointWriter::path_for(dir.path(), "cp", Compression::Zstd);
        let mut w = CheckpointWriter::create(path.clone(), Compression::Zstd).unwrap();
        w.add_tree(&src, &|_| {}).unwrap();
        let temp = w.temp_path().to_path_buf();
        if keep {
            w.keep_if_unfinished();
        }
        std::fs::write(&path, b"in the way").unwrap();
        let err = w.commit(&mut manifest()).err().unwrap();
        assert!(matches!(err, CheckpointError::Exists { .. }), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"in the way");
        assert_eq!(temp.is_file(), keep, "the archive is kept only after keep_if_unfinished");
        if keep {
            assert_eq!(read_manifest(&temp, true).unwrap().files.len(), 4, "the kept archive is complete");
        }
    }
}

#[test]
fn a_cancelled_token_stops_the_writer_and_leaves_nothing() {
    for c in [Compression::None, Compression::Tar, Compression::Zstd] {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        images(&src);
        // Cancelled before: no file is added.
        let path = CheckpointWriter::path_for(dir.path(), "ckpt", c);
        let mut w = CheckpointWriter::create(path.clone(), c).unwrap();
        let cancel = Cancel::new();
        w.set_cancel(cancel.clone());
        cancel.cancel();
        assert!(w.cancel().is_cancelled());
        let err = w.add_tree(&src, &|_| {}).expect_err("cancelled");
        assert!(matches!(&err, CheckpointError::Io { source, .. } if source.to_string() == "cancelled"), "{c}: {err}");
        assert!(w.files().is_empty());
        drop(w);
        assert_eq!(left_in(dir.path()), ["src"], "{c}");

        // Cancelled in the middle of the big page image: the copy stops at its next chunk.
        let mut w = CheckpointWriter::create(path.clone(), c).unwrap();
        let cancel = Cancel::new();
        w.set_cancel(cancel.clone());
        let read = std::sync::atomic::AtomicU64::new(0);
        let progress = |n: u64| {
            if read.fetch_add(n, std::sync::atomic::Ordering::SeqCst) + n > 4 << 20 {
                cancel.cancel();
            }
        };
        let err = w.add_tree(&src, &progress).expect_err("cancelled");
        assert!(err.to_string().contains("cancelled"), "{c}: {err}");
        assert!(read.load(std::sync::atomic::Ordering::SeqCst) < 20_000_000, "{c}: stopped early");
        drop(w);
        assert_eq!(left_in(dir.path()), ["src"], "{c}");
        assert!(!path.exists());
    }
}

#[test]
fn a_cancelled_token_stops_an_entry_of_unknown_size() {
    let dir = tempfile::tempdir().unwrap();
    let path = CheckpointWriter::path_for(dir.path(), "ckpt", Compression::Gzip);
    let mut w = CheckpointWriter::create(path, Compression::Gzip).unwrap();
    let cancel = Cancel::new();
    w.set_cancel(cancel.clone());
    cancel.cancel();
    let err = w.add_unsized("pages-1.img", &mut &[7u8; 100][..]).expect_err("cancelled");
    assert!(err.to_string().contains("cancelled"), "{err}");
    drop(w);
    assert!(left_in(dir.path()).is_empty());
}

/// The live packer follows the writer's token: cancelled, it stops, and dropping what it hands back leaves
/// nothing.
#[test]
fn a_cancelled_live_packer_stops() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    let mut w =
        CheckpointWriter::create(CheckpointWriter::path_for(dir.path(), "ckpt", Compression::Zstd), Compression::Zstd).unwrap();
    let cancel = Cancel::new();
    w.set_cancel(cancel.clone());
    let mut packing = live::Packing::start(w, &images, None);
    assert!(matches!(packing, live::Packing::Live(_)));
    // A page image CRIU is still writing when the operation is cancelled.
    let mut open = File::create(images.join("pages-1.img")).unwrap();
    open.write_all(&[1u8; 1 << 20]).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));
    cancel.cancel();
    let err = packing.writer().expect_err("cancelled");
    assert!(err.to_string().contains("cancelled"), "{err}");
    drop(packing);
    drop(open);
    assert_eq!(left_in(dir.path()), ["images"]);
}

#[test]
fn checkpoints_are_their_owners_alone_and_never_written_through_a_planted_link() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    images(&src);
    let victim = dir.path().join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    for c in [Compression::None, Compression::Zstd] {
        let path = CheckpointWriter::path_for(dir.path(), "ckpt", c);
        // Links at the names the writer will use, as a user owning the folder could plant them.
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        for hidden in [format!(".{name}.partial-{}", std::process::id()), format!(".{name}.reserve-{}", std::process::id())] {
            std::os::unix::fs::symlink(&victim, dir.path().join(hidden)).unwrap();
        }
        let mut w = CheckpointWriter::create(path.clone(), c).unwrap();
        w.add_tree(&src, &|_| {}).unwrap();
        w.commit(&mut manifest()).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious", "{c}: nothing written through a link");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, if c == Compression::None { 0o700 } else { 0o600 }, "{c}");
        if c == Compression::None {
            for entry in std::fs::read_dir(&path).unwrap().flatten().filter(|e| e.file_type().unwrap().is_file()) {
                assert_eq!(entry.metadata().unwrap().permissions().mode() & 0o777, 0o600, "{:?}", entry.path());
            }
        }
    }
}
