//! Properties of the checkpoint format over generated inputs: what is written reads back in every format,
//! a damaged archive never yields other content than was written, manifests survive JSON, and no entry
//! name accepted leaves the folder.

use std::collections::BTreeMap;
use std::path::{Component, Path};

use proptest::prelude::*;

use super::reader::safe_relative;
use super::tests::manifest;
use super::*;
use crate::codec::{Compression, ALL};

/// A few files of a checkpoint: names as CRIU writes them, contents of any bytes.
fn files() -> impl Strategy<Value = BTreeMap<String, Vec<u8>>> {
    prop::collection::btree_map("[a-z]{1,8}(-[0-9]{1,3})?\\.img", prop::collection::vec(any::<u8>(), 0..3000), 1..6)
}

/// Write `files` as a checkpoint of format `c` in `dir`, the first one streamed in before its size is known
/// where the format takes that (a placed page image, read through the index); and whether it was.
fn write(dir: &Path, c: Compression, files: &BTreeMap<String, Vec<u8>>) -> (std::path::PathBuf, bool) {
    let path = CheckpointWriter::path_for(dir, "ck", c);
    let mut w = CheckpointWriter::create(path, c).unwrap();
    let streamed = w.accepts_unsized();
    for (i, (name, bytes)) in files.iter().enumerate() {
        if i == 0 && streamed {
            w.add_unsized(&format!("pages-{name}"), &mut &bytes[..]).unwrap();
        } else {
            w.add_bytes(name, bytes).unwrap();
        }
    }
    (w.commit(&mut manifest()).unwrap(), streamed)
}

/// The files of an opened checkpoint, by name.
fn contents(opened: &OpenedCheckpoint) -> BTreeMap<String, Vec<u8>> {
    let dir = &opened.images_dir;
    opened.manifest.files.iter().map(|f| (f.name.clone(), std::fs::read(dir.join(&f.name)).unwrap())).collect()
}

/// `files` as written: the first one renamed when it was streamed in.
fn expected(files: &BTreeMap<String, Vec<u8>>, streamed_first: bool) -> BTreeMap<String, Vec<u8>> {
    let mut out = files.clone();
    if streamed_first {
        let (name, bytes) = files.iter().next().map(|(n, b)| (n.clone(), b.clone())).unwrap();
        out.remove(&name);
        out.insert(format!("pages-{name}"), bytes);
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn what_is_written_reads_back_in_every_format(files in files()) {
        for c in ALL {
            let dir = tempfile::tempdir().unwrap();
            let (path, streamed) = write(dir.path(), c, &files);
            let opened = OpenedCheckpoint::open(&path, &dir.path().join("s"), &|_| {}).unwrap();
            prop_assert_eq!(contents(&opened), expected(&files, streamed), "{}", c);
        }
    }

    #[test]
    fn a_damaged_archive_never_yields_other_content(
        files in files(),
        at in any::<prop::sample::Index>(),
        flip in 1u8..=255,
        cut in any::<bool>(),
    ) {
        for c in [Compression::Tar, Compression::Zstd, Compression::Gzip, Compression::Lz4, Compression::Zlib] {
            let dir = tempfile::tempdir().unwrap();
            let (path, streamed) = write(dir.path(), c, &files);
            let mut bytes = std::fs::read(&path).unwrap();
            let i = at.index(bytes.len());
            if cut {
                bytes.truncate(i);
            } else {
                bytes[i] ^= flip;
            }
            std::fs::write(&path, &bytes).unwrap();
            let scratch = dir.path().join("s");
            match OpenedCheckpoint::open(&path, &scratch, &|_| {}) {
                // A flip in bytes no reader looks at (a header's unused field, the padding) is harmless.
                Ok(opened) => prop_assert_eq!(contents(&opened), expected(&files, streamed), "{} at {}", c, i),
                Err(e) => {
                    let left = std::fs::read_dir(&scratch).map(|r| r.count()).unwrap_or(0);
                    prop_assert_eq!(left, 0, "{}: {}", c, e);
                }
            }
        }
    }

    #[test]
    fn manifests_survive_json(
        names in prop::collection::vec("[ -~]{1,40}", 0..8),
        sizes in prop::collection::vec(any::<u64>(), 8),
        pid in any::<i32>(),
        host in "\\PC{0,30}",
    ) {
        let mut m = manifest();
        m.hostname = host;
        m.process.pid = pid;
        for (name, size) in names.iter().zip(&sizes) {
            m.files.push(FileDigest { name: name.clone(), size: *size, xxh3: format!("{size:032x}"), chunks: Vec::new() });
        }
        let parsed = reader::parse_manifest(Path::new("m"), &m.to_json()).unwrap();
        prop_assert_eq!(parsed, m);
    }

    #[test]
    fn no_accepted_name_leaves_the_folder(name in "[./a-z\\\\]{0,12}|\\PC{0,20}") {
        if let Ok(rel) = safe_relative(Path::new("ck"), &name) {
            prop_assert!(!rel.as_os_str().is_empty());
            prop_assert!(rel.components().all(|c| matches!(c, Component::Normal(_))), "{:?}", rel);
            prop_assert!(Path::new("/scratch").join(&rel).starts_with("/scratch"));
        }
    }
}
