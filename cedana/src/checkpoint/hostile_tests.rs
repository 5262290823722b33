//! Hostile and broken archives: each refused with a clear error by every reader that applies (the
//! extracting reader, the indexed reader of streamed restores, the lazy opener, `read_manifest`), before
//! any process exists, writing nothing outside the scratch folder and leaving it empty.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::digest::Hasher;
use super::index::{IndexedArchive, Trailer};
use super::tests::manifest;
use super::*;
use crate::codec::{self, Compression};

/// Formats every case runs in: uncompressed, and compressed ones with units.
const FORMATS: [Compression; 3] = [Compression::Tar, Compression::Zstd, Compression::Gzip];

/// One raw tar entry: its name and link target go into the header as given, unchecked.
struct Raw {
    name: Vec<u8>,
    kind: tar::EntryType,
    data: Vec<u8>,
    link: Vec<u8>,
}

fn file(name: &str, data: &[u8]) -> Raw {
    Raw { name: name.into(), kind: tar::EntryType::Regular, data: data.to_vec(), link: Vec::new() }
}

fn special(name: &str, kind: tar::EntryType, link: &str) -> Raw {
    Raw { name: name.into(), kind, data: Vec::new(), link: link.into() }
}

fn header(e: &Raw, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(e.kind);
    h.set_size(size);
    h.set_mode(0o644);
    let gnu = h.as_gnu_mut().unwrap();
    gnu.name[..e.name.len()].copy_from_slice(&e.name);
    gnu.linkname[..e.link.len()].copy_from_slice(&e.link);
    if matches!(e.kind, tar::EntryType::Char | tar::EntryType::Block) {
        h.set_device_major(1).unwrap();
        h.set_device_minor(3).unwrap();
    }
    h.set_cksum();
    h
}

fn pad(out: &mut Vec<u8>) {
    out.resize(out.len().div_ceil(512) * 512, 0);
}

/// The manifest of `entries`: every regular file, once (the first of a name), then changed by `lie`.
fn manifest_of(entries: &[Raw], lie: impl FnOnce(&mut Manifest)) -> Manifest {
    let mut m = manifest();
    for e in entries.iter().filter(|e| e.kind == tar::EntryType::Regular) {
        let name = String::from_utf8_lossy(&e.name).into_owned();
        if !m.files.iter().any(|f| f.name == name) {
            let mut h = Hasher::new();
            h.update(&e.data);
            m.files.push(h.finish(name));
        }
    }
    lie(&mut m);
    m
}

/// The tar stream of `entries` then `manifest`, ended; and the bytes of data it holds.
fn stream(entries: &[Raw], manifest: &Manifest) -> (Vec<u8>, u64) {
    let mut out = Vec::new();
    let json = manifest.to_json();
    let mut data = json.len() as u64;
    for e in entries {
        out.extend_from_slice(header(e, e.data.len() as u64).as_bytes());
        out.extend_from_slice(&e.data);
        pad(&mut out);
        data += e.data.len() as u64;
    }
    out.extend_from_slice(header(&file(MANIFEST_NAME, b""), json.len() as u64).as_bytes());
    out.extend_from_slice(&json);
    pad(&mut out);
    out.extend_from_slice(&[0u8; 1024]);
    (out, data)
}

/// `tar` compressed in format `c`, then the index's trailer pointing at its start: the extracting and the
/// indexed readers both read it.
fn archive(c: Compression, tar: &[u8], data: u64) -> Vec<u8> {
    let mut enc = codec::encoder(c, Vec::new()).unwrap();
    enc.write_all(tar).unwrap();
    let mut out = enc.finish().unwrap();
    let trailer = Trailer { tail_offset: 0, tail_pad: 0, tail_bytes: data };
    out.extend(codec::units::stored_unit(c, &trailer.encode(), None).unwrap());
    out
}

/// A folder holding the archive and, a few levels down, the scratch folder: whatever escapes the scratch
/// folder lands in it and is seen.
struct Sandbox {
    root: tempfile::TempDir,
}

impl Sandbox {
    fn new() -> Self {
        Self { root: tempfile::tempdir().unwrap() }
    }

    fn scratch(&self) -> PathBuf {
        self.root.path().join("a/b/c/scratch")
    }

    fn put(&self, c: Compression, bytes: &[u8]) -> PathBuf {
        let path = self.root.path().join(format!("in.{}", c.extension().unwrap()));
        std::fs::write(&path, bytes).unwrap();
        path
    }

    /// Nothing but the archive and the (empty) scratch folder's parents.
    fn assert_clean(&self, what: &str) {
        let mut found = Vec::new();
        walk(self.root.path(), &mut found);
        found.retain(|p| {
            let rel = p.strip_prefix(self.root.path()).unwrap().to_str().unwrap();
            !(rel.starts_with("in.") || ["a", "a/b", "a/b/c", "a/b/c/scratch"].contains(&rel))
        });
        assert!(found.is_empty(), "{what}: left behind {found:?}");
    }
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        out.push(e.path());
        if e.file_type().unwrap().is_dir() {
            walk(&e.path(), out);
        }
    }
}

/// The reader every archive goes through, by name (`read_entry` reads `core-1.img`).
const READERS: [&str; 6] = ["open", "read_manifest", "read_entry", "indexed", "streamed", "lazy"];

fn read_with(reader: &str, path: &Path, scratch: &Path) -> Result<(), CheckpointError> {
    match reader {
        "open" => OpenedCheckpoint::open(path, scratch, &|_| {}).map(drop),
        "read_manifest" => read_manifest(path, true).map(drop),
        "read_entry" => read_entry(path, "core-1.img")?.map(drop).ok_or(CheckpointError::Incomplete { path: path.into() }),
        "indexed" => {
            let source = Arc::new(LocalSource::open(path).unwrap());
            let archive = IndexedArchive::open(source, 64 << 20)?.ok_or(CheckpointError::Incomplete { path: path.into() })?;
            for f in &archive.manifest().files {
                archive.copy_to(&f.name, &mut std::io::sink())?;
            }
            Ok(())
        }
        "streamed" => {
            OpenedCheckpoint::open_streamed(path, scratch)?.map(drop).ok_or(CheckpointError::Incomplete { path: path.into() })
        }
        // With the sparse page images it writes on a thread of its own (what CRIU reads itself).
        _ => lazy::open_lazy(path, scratch)
            .and_then(|o| o.lazy.as_ref().and_then(|l| l.take_pending()).map_or(Ok(()), |p| p.wait())),
    }
}

/// `bytes` as an archive of format `c` is refused by every reader as corrupt, with a message holding one
/// of `expect`, and nothing is left outside the archive.
fn refused_everywhere(c: Compression, bytes: &[u8], expect: &[&str]) {
    let sandbox = Sandbox::new();
    let path = sandbox.put(c, bytes);
    for reader in READERS {
        let err = read_with(reader, &path, &sandbox.scratch()).err().unwrap_or_else(|| panic!("{c} {reader}: accepted"));
        assert!(matches!(err, CheckpointError::Corrupt { .. }), "{c} {reader}: {err}");
        let msg = err.to_string();
        assert!(expect.iter().any(|e| msg.contains(e)), "{c} {reader}: {msg}");
        sandbox.assert_clean(&format!("{c} {reader}"));
    }
}

/// An archive of `entries` and their manifest (changed by `lie`) is refused everywhere.
fn refused(entries: Vec<Raw>, lie: impl Fn(&mut Manifest), expect: &[&str]) {
    let manifest = manifest_of(&entries, &lie);
    let (tar, data) = stream(&entries, &manifest);
    for c in FORMATS {
        refused_everywhere(c, &archive(c, &tar, data), expect);
    }
}

fn honest() -> Vec<Raw> {
    vec![file("core-1.img", b"core!"), file("inventory.img", b"inventory")]
}

#[test]
fn crafted_archives_are_read_when_honest() {
    let entries = honest();
    let (tar, data) = stream(&entries, &manifest_of(&entries, |_| {}));
    for c in FORMATS {
        let sandbox = Sandbox::new();
        let path = sandbox.put(c, &archive(c, &tar, data));
        for reader in READERS {
            read_with(reader, &path, &sandbox.scratch()).unwrap_or_else(|e| panic!("{c} {reader}: {e}"));
            sandbox.assert_clean(reader);
        }
    }
}

#[test]
fn parent_directory_names_are_refused() {
    for name in ["../../../../escaped", "core/../../escaped", "./../escaped"] {
        let mut entries = honest();
        entries.insert(0, file(name, b"x"));
        refused(entries, |_| {}, &["would escape the checkpoint folder"]);
    }
}

#[test]
fn absolute_names_are_refused() {
    let target = std::env::temp_dir().join(format!("cedana-hostile-{}", std::process::id()));
    let mut entries = honest();
    entries.insert(0, file(target.to_str().unwrap(), b"x"));
    refused(entries, |_| {}, &["would escape the checkpoint folder"]);
    assert!(!target.exists());
}

#[test]
fn symbolic_links_are_refused() {
    // The classic escape: a link out of the folder, then a file written through it.
    let mut entries = honest();
    entries.insert(0, special("link", tar::EntryType::Symlink, "../../../.."));
    entries.insert(1, file("link/escaped", b"x"));
    refused(entries, |_| {}, &["is a symbolic link, not a regular file"]);
}

#[test]
fn hard_links_out_of_the_folder_are_refused() {
    let mut entries = honest();
    entries.insert(0, special("passwd.img", tar::EntryType::Link, "/etc/passwd"));
    refused(entries, |_| {}, &["is a hard link, not a regular file"]);
}

#[test]
fn device_nodes_and_fifos_are_refused() {
    for (kind, what) in [
        (tar::EntryType::Char, "is a character device"),
        (tar::EntryType::Block, "is a block device"),
        (tar::EntryType::Fifo, "is a FIFO"),
    ] {
        let mut entries = honest();
        entries.insert(0, special("node.img", kind, ""));
        refused(entries, |_| {}, &[what]);
    }
}

#[test]
fn duplicate_entries_are_refused() {
    // The second copy differs: whichever a reader kept, it must not pick one silently.
    let mut entries = honest();
    entries.push(file("core-1.img", b"other"));
    refused(entries, |_| {}, &["core-1.img appears twice"]);
    // The same name spelled differently is the same file.
    let mut entries = honest();
    entries.push(file("./core-1.img", b"core!"));
    let sandbox = Sandbox::new();
    let (tar, data) = stream(&entries, &manifest_of(&entries, |m| m.files.retain(|f| !f.name.starts_with("./"))));
    let path = sandbox.put(Compression::Tar, &archive(Compression::Tar, &tar, data));
    let err = OpenedCheckpoint::open(&path, &sandbox.scratch(), &|_| {}).err().unwrap();
    assert!(err.to_string().contains("appears twice"), "{err}");
    sandbox.assert_clean("./ duplicate");
}

#[test]
fn a_manifest_lying_about_a_size_is_refused() {
    let lie = |m: &mut Manifest| m.files[0].size += 1;
    refused(honest(), lie, &["checksum mismatch in core-1.img", "core-1.img has 5 bytes, the manifest says 6"]);
}

#[test]
fn a_manifest_lying_about_a_checksum_is_refused() {
    let lie = |m: &mut Manifest| {
        let flipped = if m.files[0].xxh3.starts_with('0') { "1" } else { "0" };
        m.files[0].xxh3.replace_range(..1, flipped);
    };
    refused(honest(), lie, &["checksum mismatch in core-1.img"]);
}

#[test]
fn a_manifest_naming_an_absent_file_is_refused() {
    let lie = |m: &mut Manifest| {
        let mut ghost = m.files[0].clone();
        ghost.name = "ghost.img".into();
        m.files.push(ghost);
    };
    refused(honest(), lie, &["file ghost.img listed in the manifest is missing"]);
}

#[test]
fn a_manifest_listing_fewer_files_than_present_is_refused() {
    refused(honest(), |m| m.files.retain(|f| f.name != "inventory.img"), &["unexpected file inventory.img"]);
}

#[test]
fn a_manifest_naming_unsafe_or_repeated_files_is_refused() {
    let lie = |m: &mut Manifest| m.files[0].name = "../core-1.img".into();
    refused(honest(), lie, &["would escape the checkpoint folder"]);
    let lie = |m: &mut Manifest| m.files.push(m.files[0].clone());
    refused(honest(), lie, &["the manifest lists core-1.img twice"]);
    let lie = |m: &mut Manifest| {
        m.placement.push(Placed { name: "core-1.img".into(), offset: 0, units: vec![] });
        m.placement.push(Placed { name: "core-1.img".into(), offset: 0, units: vec![] });
    };
    refused(honest(), lie, &["places core-1.img"]);
}

/// The largest the scratch folder grew while `f` ran, polled.
fn peak_while(scratch: &Path, f: impl FnOnce() -> Result<(), CheckpointError>) -> (Result<(), CheckpointError>, u64) {
    fn size(dir: &Path) -> u64 {
        let mut found = Vec::new();
        walk(dir, &mut found);
        found.iter().filter_map(|p| p.symlink_metadata().ok()).filter(|m| m.is_file()).map(|m| m.len()).sum()
    }
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let watcher = s.spawn(|| {
            let mut peak = 0;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                peak = peak.max(size(scratch));
                std::thread::sleep(Duration::from_millis(1));
            }
            peak
        });
        let res = f();
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        (res, watcher.join().unwrap())
    })
}

/// A page image of 96 MiB of zeros (a few hundred KiB compressed; more than a streamed restore reads
/// through the index) whose manifest declares 10 bytes.
fn bomb(c: Compression, with_index: bool) -> Vec<u8> {
    const SIZE: u64 = 96 << 20;
    let bomb = file("pages-1.img", b"");
    let small = file("core-1.img", b"core!");
    let mut m = manifest_of(&[small], |_| {});
    let mut h = Hasher::new();
    h.update(&[0u8; 10]);
    m.files.push(h.finish("pages-1.img"));
    let json = m.to_json();
    let mut enc = codec::encoder(c, Vec::new()).unwrap();
    enc.write_all(header(&bomb, SIZE).as_bytes()).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..SIZE >> 20 {
        enc.write_all(&zeros).unwrap();
    }
    let (rest, _) = stream(&[file("core-1.img", b"core!")], &m);
    enc.write_all(&rest).unwrap();
    let mut out = enc.finish().unwrap();
    if with_index {
        let trailer = Trailer { tail_offset: 0, tail_pad: 0, tail_bytes: SIZE + 5 + json.len() as u64 };
        out.extend(codec::units::stored_unit(c, &trailer.encode(), None).unwrap());
    }
    out
}

#[test]
fn a_decompression_bomb_is_stopped_at_its_header() {
    for c in [Compression::Zstd, Compression::Gzip] {
        let sandbox = Sandbox::new();
        let bytes = bomb(c, true);
        assert!(bytes.len() < 4 << 20, "{c}: the bomb is small ({} bytes)", bytes.len());
        let path = sandbox.put(c, &bytes);
        let scratch = sandbox.scratch();
        // A tail this large is not read through the index: streamed restores decline it, for an extraction.
        let source = Arc::new(LocalSource::open(&path).unwrap());
        assert!(IndexedArchive::open(source, 64 << 20).unwrap().is_none(), "{c}");
        assert!(OpenedCheckpoint::open_streamed(&path, &scratch).unwrap().is_none(), "{c}");
        for reader in ["open", "read_manifest", "lazy"] {
            let started = Instant::now();
            let (res, peak) = peak_while(&scratch, || read_with(reader, &path, &scratch));
            let err = res.err().unwrap_or_else(|| panic!("{c} {reader}: accepted"));
            let msg = err.to_string();
            let expected = ["pages-1.img has 100663296 bytes, the manifest says 10", "larger than the index says"];
            if reader != "read_manifest" {
                assert!(expected.iter().any(|e| msg.contains(e)), "{c} {reader}: {msg}");
                // Refused at its header: its data is decompressed once at most, to reach the manifest, and never
                // written (a debug build decompresses slowly, hence the generous bound).
                assert!(started.elapsed() < Duration::from_secs(60), "{c} {reader}: {:?}", started.elapsed());
            }
            assert!(matches!(err, CheckpointError::Corrupt { .. }), "{c} {reader}: {err}");
            assert!(peak <= 1 << 20, "{c} {reader}: the scratch folder grew to {peak} bytes");
            sandbox.assert_clean(&format!("{c} {reader}"));
        }
    }
}

#[test]
fn a_huge_long_name_is_refused_before_it_is_read_into_memory() {
    // The tar reader would buffer a long name whole: the declared 1 TiB must be refused at its header.
    let long = Raw { name: b"././@LongLink".to_vec(), kind: tar::EntryType::GNULongName, data: vec![], link: vec![] };
    let mut tar = header(&long, 1 << 40).as_bytes().to_vec();
    tar.extend(vec![b'a'; 1 << 20]);
    for c in FORMATS {
        refused_everywhere(c, &archive(c, &tar, 1 << 20), &["a long name of 1099511627776 bytes"]);
    }
}

#[test]
fn one_entry_larger_than_its_manifest_says_is_not_read_into_memory() {
    // Without an index, so `read_entry` finds the entry by walking the archive.
    let sandbox = Sandbox::new();
    let path = sandbox.put(Compression::Zstd, &bomb(Compression::Zstd, false));
    let err = read_entry(&path, "pages-1.img").expect_err("refused");
    assert!(err.to_string().contains("pages-1.img has 100663296 bytes, the manifest says 10"), "{err}");
    sandbox.assert_clean("read_entry");
}

#[test]
fn an_entry_larger_than_the_free_space_is_refused_before_it_is_written() {
    // Without an index the manifest comes last: the scratch folder's free space bounds the extraction.
    for c in [Compression::Tar, Compression::Zlib] {
        let sandbox = Sandbox::new();
        let mut tar = Vec::new();
        tar.extend_from_slice(header(&file("pages-1.img", b""), 1 << 60).as_bytes());
        tar.extend_from_slice(&[0u8; 4096]);
        let mut enc = codec::encoder(c, Vec::new()).unwrap();
        enc.write_all(&tar).unwrap();
        let path = sandbox.put(c, &enc.finish().unwrap());
        let (res, peak) = peak_while(&sandbox.scratch(), || read_with("open", &path, &sandbox.scratch()));
        let err = res.expect_err("refused");
        assert!(matches!(err, CheckpointError::ScratchFull { needed: 1152921504606846976, .. }), "{c}: {err}");
        assert!(err.to_string().contains("free space there or restore with another scratch folder"), "{err}");
        assert_eq!(peak, 0, "{c}");
        sandbox.assert_clean(&c.to_string());
    }
}

/// A small archive as the writer makes it: two page images streamed in (placed, with units where the format
/// has them), small files after them, the manifest, the index.
fn written(dir: &Path, c: Compression) -> PathBuf {
    let path = dir.join(format!("w.{}", c.extension().unwrap()));
    let mut w = CheckpointWriter::create(path.clone(), c).unwrap();
    let pages: Vec<u8> = (0..20_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    w.add_unsized("pages-1.img", &mut &pages[..]).unwrap();
    w.add_unsized("pages-2.img", &mut &pages[..700]).unwrap();
    w.add_bytes("core-1.img", &[7u8; 1500]).unwrap();
    w.add_bytes("inventory.img", b"inventory").unwrap();
    w.commit(&mut manifest()).unwrap()
}

/// Cut points of every class in an archive of `len` bytes: every tar block boundary and the bytes around
/// it (headers start there), points inside blocks (data, headers' fields), and every one of the last 200
/// bytes (the manifest's end, the end blocks, the index's trailer, compressed frames' ends).
fn cuts(len: usize) -> Vec<usize> {
    let mut cuts: Vec<usize> = (0..len).step_by(512).flat_map(|b| [b, b + 1, b + 100, b + 257, b + 511]).collect();
    cuts.extend((0..len).step_by(89));
    cuts.extend(len.saturating_sub(200)..len);
    cuts.retain(|c| *c < len);
    cuts.sort();
    cuts.dedup();
    cuts
}

#[test]
fn truncation_at_every_offset_class_is_refused() {
    for c in [Compression::Tar, Compression::Zstd, Compression::Lz4, Compression::Gzip] {
        let dir = tempfile::tempdir().unwrap();
        let full = written(dir.path(), c);
        let bytes = std::fs::read(&full).unwrap();
        for reader in READERS {
            read_with(reader, &full, &dir.path().join("s")).unwrap_or_else(|e| panic!("{c} {reader} whole: {e}"));
        }
        let sandbox = Sandbox::new();
        let cut_points = cuts(bytes.len());
        assert!(cut_points.len() > 100, "{c}: {} cuts", cut_points.len());
        for cut in cut_points {
            let path = sandbox.put(c, &bytes[..cut]);
            // (`read_entry` reads one file: cut after it, that file is whole and rightly served.)
            for reader in READERS.into_iter().filter(|r| *r != "read_entry") {
                let res = read_with(reader, &path, &sandbox.scratch());
                let err = res.err().unwrap_or_else(|| panic!("{c} {reader}: a cut at {cut} of {} is accepted", bytes.len()));
                assert!(
                    matches!(
                        err,
                        CheckpointError::Corrupt { .. }
                            | CheckpointError::Incomplete { .. }
                            | CheckpointError::Codec(_)
                            | CheckpointError::NotInPlace { .. }
                    ),
                    "{c} {reader} cut at {cut}: {err}"
                );
                if reader != "indexed" {
                    sandbox.assert_clean(&format!("{c} {reader} cut at {cut}"));
                }
            }
        }
    }
}

#[test]
fn a_placement_pointing_at_another_entry_is_refused_before_any_page_is_read() {
    // A plain tar, whose manifest can be edited in place (a compressed one would need recompressing).
    for c in [Compression::Tar] {
        let dir = tempfile::tempdir().unwrap();
        let path = written(dir.path(), c);
        let source = Arc::new(LocalSource::open(&path).unwrap());
        let m = IndexedArchive::open(source, 64 << 20).unwrap().unwrap().manifest().clone();
        // Point pages-2.img at pages-1.img's header, keeping the manifest's length (spaces are JSON too).
        let (one, two) = (m.placement[0].offset.to_string(), m.placement[1].offset.to_string());
        assert!(one.len() < two.len(), "{c}: {one} {two}");
        let mut bytes = std::fs::read(&path).unwrap();
        let from = format!("\"offset\": {two}");
        let to = format!("\"offset\": {one:>width$}", width = two.len());
        let at = bytes.windows(from.len()).position(|w| w == from.as_bytes()).expect("the offset in the manifest");
        bytes.splice(at..at + from.len(), to.bytes());
        let sandbox = Sandbox::new();
        let path = sandbox.put(c, &bytes);
        // (A lazy restore of a plain tar finds the page images by their headers, not by the placement.)
        let readers: &[&str] = if c == Compression::Tar { &["indexed", "streamed"] } else { &["indexed", "streamed", "lazy"] };
        for reader in readers {
            let err = read_with(reader, &path, &sandbox.scratch()).err().unwrap_or_else(|| panic!("{c} {reader}: accepted"));
            assert!(err.to_string().contains("the index points pages-2.img at an entry that is not it"), "{c} {reader}: {err}");
            sandbox.assert_clean(reader);
        }
    }
}

/// Writes the seed inputs of the archive and manifest fuzz targets under `$CEDANA_FUZZ_SEEDS` (the
/// committed `fuzz/seeds`): `CEDANA_FUZZ_SEEDS=$PWD/fuzz/seeds cargo test -p cedana --lib write_fuzz_seeds
/// -- --ignored`.
#[test]
#[ignore]
fn write_fuzz_seeds() {
    let root = PathBuf::from(std::env::var("CEDANA_FUZZ_SEEDS").expect("CEDANA_FUZZ_SEEDS"));
    let dir = tempfile::tempdir().unwrap();
    for target in ["archive_open", "archive_indexed", "manifest"] {
        std::fs::create_dir_all(root.join(target)).unwrap();
    }
    for c in [Compression::Tar, Compression::Zstd, Compression::Gzip, Compression::Lz4] {
        let bytes = std::fs::read(written(dir.path(), c)).unwrap();
        let entries = honest();
        let (tar, data) = stream(&entries, &manifest_of(&entries, |_| {}));
        for target in ["archive_open", "archive_indexed"] {
            std::fs::write(root.join(target).join(format!("written-{c}")), &bytes).unwrap();
            std::fs::write(root.join(target).join(format!("crafted-{c}")), archive(c, &tar, data)).unwrap();
        }
    }
    let entries = honest();
    std::fs::write(root.join("manifest/two-files.json"), manifest_of(&entries, |_| {}).to_json()).unwrap();
}

#[test]
fn a_unit_the_manifest_sizes_beyond_the_archive_or_that_decodes_to_more_is_refused() {
    let sandbox = Sandbox::new();
    let mut enc = codec::encoder(Compression::Zstd, Vec::new()).unwrap();
    enc.write_all(&vec![0u8; 1 << 20]).unwrap();
    let unit = enc.finish().unwrap();
    let path = sandbox.put(Compression::Zstd, &unit);
    let source = LocalSource::open(&path).unwrap();
    // A placement's unit size is never allocated unchecked.
    let err = units_read::decode_unit(&source, Compression::Zstd, 0, 1 << 40, 4096).unwrap_err();
    assert!(err.to_string().contains("which the archive cannot hold"), "{err}");
    // A unit is decoded one byte past its chunk at most.
    let err = units_read::decode_unit(&source, Compression::Zstd, 0, unit.len() as u64, 4096).unwrap_err();
    assert!(err.to_string().contains("does not decode to its 4096 bytes"), "{err}");
}
