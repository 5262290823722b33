//! Archives read through their index: page images written before their size was known are found by offset,
//! small files come from the tail, everything is verified, and standard tools still read the archive.

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use super::index::{IndexedArchive, Trailer};
use super::tests::manifest;
use super::*;
use crate::codec::Compression;

const INDEXED: [Compression; 5] = [Compression::Tar, Compression::Gzip, Compression::Lz4, Compression::Zlib, Compression::Zstd];

fn pages(n: u32, seed: u32) -> Vec<u8> {
    (0..n).map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 13) as u8).collect()
}

/// An archive with two page images streamed in (sizes not known up front) and small files after them.
fn write_archive(path: &Path, c: Compression) -> (Vec<u8>, Vec<u8>) {
    let (p1, p2) = (pages(9_000_001, 1), pages(3_333, 2));
    let mut w = CheckpointWriter::create(path.to_path_buf(), c).unwrap();
    assert!(w.accepts_unsized(), "{c}");
    w.add_unsized("pages-1.img", &mut &p1[..]).unwrap();
    w.add_unsized("pages-2.img", &mut &p2[..]).unwrap();
    w.add_bytes("inventory.img", b"inventory").unwrap();
    w.add_bytes("core-1.img", &[7u8; 5000]).unwrap();
    w.add_bytes("empty.img", b"").unwrap();
    w.commit(&mut manifest()).unwrap();
    (p1, p2)
}

fn open(path: &Path) -> IndexedArchive {
    let source = Arc::new(LocalSource::open(path).unwrap());
    IndexedArchive::open(source, 64 << 20).unwrap().expect("an index")
}

#[test]
fn every_file_is_served_by_name_in_any_order_and_verified() {
    for c in INDEXED {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(format!("ck.{}", c.extension().unwrap()));
        let (p1, p2) = write_archive(&path, c);
        let archive = open(&path);
        assert_eq!(archive.compression(), c);
        assert_eq!(archive.manifest().placement.len(), 2, "{c}");
        let mut names: Vec<&str> = archive.placed_names().collect();
        names.sort();
        assert_eq!(names, ["pages-1.img", "pages-2.img"]);
        for (name, want) in [
            ("inventory.img", b"inventory".to_vec()),
            ("pages-2.img", p2.clone()),
            ("pages-1.img", p1.clone()),
            ("empty.img", vec![]),
        ] {
            let mut out = Vec::new();
            let d = archive.copy_to(name, &mut out).unwrap();
            assert!(d.out_error.is_none());
            assert_eq!(d.bytes, want.len() as u64, "{c} {name}");
            assert!(out == want, "{c} {name}: content differs");
        }
        assert!(archive.contains("core-1.img") && !archive.contains("nope.img"));
        assert!(archive.copy_to("nope.img", &mut Vec::new()).is_err());
        // The archive reads front to back as before, with every checksum.
        let m = read_manifest(&path, true).unwrap();
        assert_eq!(m.files.len(), 5, "{c}");
    }
}

#[test]
fn standard_tools_list_the_archive_and_ignore_the_trailer() {
    for c in INDEXED {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(format!("ck.{}", c.extension().unwrap()));
        write_archive(&path, c);
        let decompress = match c {
            Compression::Tar => "cat",
            Compression::Gzip => "gzip -dc",
            Compression::Lz4 => "lz4 -dc",
            // There is no zlib command: Python's module (the system's zlib), which checks the adler32 too.
            Compression::Zlib => {
                "python3 -c 'import sys, zlib; sys.stdout.buffer.write(zlib.decompress(open(sys.argv[1], \"rb\").read()))'"
            }
            _ => "zstd -dc",
        };
        let out = Command::new("sh").arg("-c").arg(format!("{decompress} '{}' | tar -tvf -", path.display())).output().unwrap();
        let listing = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && stderr.is_empty(), "{c}: {listing}\n{stderr}");
        for name in ["pages-1.img", "pages-2.img", "inventory.img", "core-1.img", "empty.img", "manifest.json"] {
            assert!(listing.contains(name), "{c}: {name} missing from\n{listing}");
        }
    }
}

#[test]
fn a_corrupt_page_image_is_refused_when_read_and_a_corrupt_small_file_at_open() {
    for c in INDEXED {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(format!("ck.{}", c.extension().unwrap()));
        write_archive(&path, c);
        let archive = open(&path);
        let offset = archive.manifest().placement.iter().find(|p| p.name == "pages-1.img").unwrap().offset;
        drop(archive);
        // Flip a byte in the middle of the first page image's data (stored or compressed).
        let mut bytes = std::fs::read(&path).unwrap();
        let at = offset as usize + 4096 + 3_000_000.min((bytes.len() - offset as usize) / 4);
        bytes[at] ^= 0x5A;
        std::fs::write(&path, &bytes).unwrap();
        let archive = open(&path);
        let err = archive.copy_to("pages-1.img", &mut std::io::sink()).unwrap_err().to_string();
        assert!(err.contains("corrupt") || err.contains("damaged"), "{c}: {err}");
        assert!(archive.copy_to("pages-2.img", &mut std::io::sink()).is_ok(), "{c}: the other image is intact");
    }
    // A small file is checked when the archive is opened (plain tar: its bytes are stored as they are).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ck.tar");
    write_archive(&path, Compression::Tar);
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes.windows(100).position(|w| w.iter().all(|b| *b == 7)).unwrap();
    bytes[at + 50] = 8;
    std::fs::write(&path, &bytes).unwrap();
    let source = Arc::new(LocalSource::open(&path).unwrap());
    let err = IndexedArchive::open(source, 64 << 20).err().expect("refused").to_string();
    assert!(err.contains("checksum mismatch in core-1.img"), "{err}");
}

#[test]
fn archives_without_an_index_or_with_a_large_tail_are_read_front_to_back() {
    let dir = tempfile::tempdir().unwrap();
    // One zlib stream of a tar (as archives were before zlib had units); a tail larger than allowed; a cut
    // archive has no trailer.
    let zlib = dir.path().join("a.tar.zlib");
    let mut tar = tar::Builder::new(crate::codec::encoder(Compression::Zlib, Vec::new()).unwrap());
    let mut header = tar::Header::new_gnu();
    header.set_size(1);
    header.set_cksum();
    tar.append_data(&mut header, "x.img", &b"x"[..]).unwrap();
    std::fs::write(&zlib, tar.into_inner().unwrap().finish().unwrap()).unwrap();
    let zs = dir.path().join("b.tar.zst");
    write_archive(&zs, Compression::Zstd);
    let src = |p: &Path| Arc::new(LocalSource::open(p).unwrap());
    assert!(IndexedArchive::open(src(&zlib), 64 << 20).unwrap().is_none());
    assert!(IndexedArchive::open(src(&zs), 100).unwrap().is_none(), "the tail is over 100 bytes");
    let bytes = std::fs::read(&zs).unwrap();
    let cut = dir.path().join("c.tar.zst");
    std::fs::write(&cut, &bytes[..bytes.len() - 200]).unwrap();
    assert!(Trailer::find(&*src(&cut)).unwrap().is_none());
    // A trailer at the end of anything else (say, a copied trailer) is not trusted blindly.
    let mut fake = std::fs::File::create(dir.path().join("d.tar.zst")).unwrap();
    fake.write_all(&bytes[..64]).unwrap();
    fake.write_all(&Trailer { tail_offset: 1 << 40, tail_pad: 0, tail_bytes: 10 }.encode()).unwrap();
    drop(fake);
    assert!(Trailer::find(&*src(&dir.path().join("d.tar.zst"))).unwrap().is_none(), "offset past the end");
}

#[test]
fn the_manifest_is_read_from_the_end_and_a_full_verification_still_reads_everything() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ck.tar.zst");
    write_archive(&path, Compression::Zstd);
    let offset = read_manifest(&path, false).unwrap().placement[0].offset as usize;
    // Damage the first page image: reading the manifest does not touch it, verifying does.
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[offset + 4096] ^= 0x10;
    std::fs::write(&path, &bytes).unwrap();
    assert_eq!(read_manifest(&path, false).unwrap().files.len(), 5);
    assert!(read_manifest(&path, true).is_err(), "the full verification reads the page images");
}

#[test]
fn lz4_gzip_and_zstd_page_images_are_runs_of_units_of_one_chunk_each_that_decode_alone() {
    use std::io::Read;
    for c in [Compression::Lz4, Compression::Gzip, Compression::Zstd] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cp");
        let (p1, _) = write_archive(&path, c);
        let archive = open(&path);
        let placed = archive.manifest().placement.iter().find(|p| p.name == "pages-1.img").unwrap().clone();
        let chunk = digest::CHUNK;
        assert_eq!(placed.units.len(), p1.len().div_ceil(chunk), "{c}: one unit per chunk");
        let bytes = std::fs::read(&path).unwrap();
        let mut at = placed.offset as usize + crate::codec::units::header_slot(c);
        for (i, size) in placed.units.iter().enumerate() {
            let unit = &bytes[at..at + *size as usize];
            let mut out = Vec::new();
            crate::codec::decoder(c, std::io::Cursor::new(unit.to_vec())).unwrap().read_to_end(&mut out).unwrap();
            let end = ((i + 1) * chunk).min(p1.len());
            assert!(out == p1[i * chunk..end], "{c}: unit {i} is chunk {i}");
            at += *size as usize;
        }
    }
    // tar writes no units (its bytes are read in place).
    let dir = tempfile::tempdir().unwrap();
    write_archive(&dir.path().join("cp"), Compression::Tar);
    assert!(open(&dir.path().join("cp")).manifest().placement.iter().all(|p| p.units.is_empty()));
}

/// A writer that takes `left` bytes and then fails (CRIU closing its pipe early).
struct Closing {
    left: usize,
}

impl Write for Closing {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            return Err(std::io::ErrorKind::BrokenPipe.into());
        }
        let n = buf.len().min(self.left);
        self.left -= n;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn units_are_decoded_in_parallel_in_order_and_a_reader_that_stops_still_gets_a_verdict() {
    for c in [Compression::Lz4, Compression::Zstd, Compression::Gzip] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cp");
        let (p1, _) = write_archive(&path, c);
        let archive = open(&path);
        let mut out = Vec::new();
        assert_eq!(archive.copy_to("pages-1.img", &mut out).unwrap().bytes, p1.len() as u64);
        assert!(out == p1, "{c}: the units in order");
        let d = archive.copy_to("pages-1.img", &mut Closing { left: 1 << 20 }).unwrap();
        assert_eq!(d.bytes, p1.len() as u64, "{c}: every unit read for the verdict");
        assert_eq!(d.out_error.map(|e| e.kind()), Some(std::io::ErrorKind::BrokenPipe), "{c}");
    }
}
