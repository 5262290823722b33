//! Replacing a checkpoint of the same name: atomically on success, not at all on failure, with nothing left
//! under hidden names either way.

use std::path::{Path, PathBuf};

use super::tests::manifest;
use super::*;
use crate::codec::{Compression, ALL};

fn images(dir: &Path, content: &[u8]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("pages-1.img"), content.repeat(10_000)).unwrap();
    std::fs::write(dir.join("inventory.img"), b"inv").unwrap();
}

/// Write checkpoint `name` of `content` (recorded as the manifest's hostname too) into `dir`.
fn write(dir: &Path, name: &str, c: Compression, existing: Existing, content: &str) -> Result<PathBuf, CheckpointError> {
    let src = dir.join(format!("src-{content}"));
    images(&src, content.as_bytes());
    let mut w = CheckpointWriter::create_with(CheckpointWriter::path_for(dir, name, c), c, existing, true)?;
    w.add_tree(&src, &|_| {})?;
    std::fs::remove_dir_all(&src).unwrap();
    let mut m = manifest();
    m.hostname = content.into();
    w.commit(&mut m)
}

/// What a checkpoint holds, as its reader sees it: the manifest's hostname and the page image.
fn content(path: &Path) -> (String, Vec<u8>) {
    let scratch = tempfile::tempdir().unwrap();
    let opened = OpenedCheckpoint::open(path, scratch.path(), &|_| {}).unwrap();
    (opened.manifest.hostname.clone(), std::fs::read(opened.images_dir.join("pages-1.img")).unwrap())
}

fn names(dir: &Path) -> Vec<String> {
    let mut n: Vec<String> =
        std::fs::read_dir(dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    n.sort();
    n
}

#[test]
fn a_replacing_checkpoint_takes_the_place_of_the_old_one() {
    for c in ALL {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "cp", c, Existing::Refuse, "old").unwrap();
        let again = write(dir.path(), "cp", c, Existing::Replace, "new").unwrap();
        assert_eq!(again, path);
        assert_eq!(content(&path), ("new".to_string(), b"new".repeat(10_000)), "{c}");
        assert_eq!(names(dir.path()), [path.file_name().unwrap().to_string_lossy().into_owned()], "{c}: no temporary left");
    }
}

#[test]
fn without_replace_a_second_checkpoint_is_refused_before_anything_is_written() {
    for c in [Compression::None, Compression::Zstd] {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "cp", c, Existing::Refuse, "old").unwrap();
        let err = write(dir.path(), "cp", c, Existing::Refuse, "new").unwrap_err();
        assert!(matches!(err, CheckpointError::Exists { .. }), "{err}");
        assert_eq!(content(&path).0, "old");
    }
}

#[test]
fn an_unfinished_replacing_checkpoint_leaves_the_old_one_as_it_was() {
    for c in [Compression::None, Compression::Tar, Compression::Zstd] {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "cp", c, Existing::Refuse, "old").unwrap();
        let before = content(&path);
        let src = dir.path().join("src");
        images(&src, b"new");
        let mut w = CheckpointWriter::replacing(path.clone(), c).unwrap();
        w.add_tree(&src, &|_| {}).unwrap();
        // The dump fails (CRIU, the container, a signal): the writer is dropped uncommitted.
        drop(w);
        std::fs::remove_dir_all(&src).unwrap();
        assert_eq!(content(&path), before, "{c}");
        assert_eq!(names(dir.path()), [path.file_name().unwrap().to_string_lossy().into_owned()], "{c}: nothing else left");
    }
}

#[test]
fn a_commit_that_cannot_replace_leaves_the_old_one_and_no_temporary() {
    let dir = tempfile::tempdir().unwrap();
    // What is at the final name is a folder (a checkpoint of compression none named like the archive):
    // a file cannot be renamed over it.
    let path = CheckpointWriter::path_for(dir.path(), "cp", Compression::Zstd);
    std::fs::create_dir(&path).unwrap();
    std::fs::write(path.join("keep"), b"old").unwrap();
    let src = dir.path().join("src");
    images(&src, b"new");
    let mut w = CheckpointWriter::replacing(path.clone(), Compression::Zstd).unwrap();
    w.add_tree(&src, &|_| {}).unwrap();
    std::fs::remove_dir_all(&src).unwrap();
    assert!(w.commit(&mut manifest()).is_err());
    assert_eq!(std::fs::read(path.join("keep")).unwrap(), b"old");
    assert_eq!(names(dir.path()), ["cp.tar.zst"], "the temporary archive is gone");
}

#[test]
fn a_folder_checkpoint_replaces_a_file_of_its_name_and_the_reverse() {
    let dir = tempfile::tempdir().unwrap();
    let name = dir.path().join("cp");
    std::fs::write(&name, b"a file in the way").unwrap();
    let path = write(dir.path(), "cp", Compression::None, Existing::Replace, "folder").unwrap();
    assert_eq!(path, name);
    assert_eq!(content(&path).0, "folder");
    assert_eq!(names(dir.path()), ["cp"]);
    // And a folder over a folder, whatever it held.
    std::fs::write(path.join("stray"), b"x").unwrap();
    write(dir.path(), "cp", Compression::None, Existing::Replace, "again").unwrap();
    assert_eq!(content(&path).0, "again");
    assert!(!path.join("stray").exists(), "the old folder went as a whole");
    assert_eq!(names(dir.path()), ["cp"]);
}
