//! Reading an archive out of order, through its index: what a streamed restore needs (CRIU asks for the
//! images in its own order, not the archive's).
//!
//! An archive whose format has units (tar, gzip, lz4, zstd) ends in a [`Trailer`]: a stored unit that
//! decodes to a few bytes after the tar stream's end-of-archive blocks, which every tar reader ignores. It
//! says where the tar stream of the small entries and the manifest starts (after the page images, written
//! first as units of their own); the manifest's `placement` says where each page image starts. So a reader
//! that seeks reads the small files and the manifest first, verifies them, and then streams each page image
//! from its own offset, verifying it as it goes.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::sync::Arc;

use super::digest::Hasher;
use super::manifest::{Manifest, MANIFEST_NAME};
use super::reader::{corrupt, parse_manifest, safe_relative, unreadable};
use super::source::ArchiveSource;
use super::CheckpointError;
use crate::codec::{self, Compression};

/// What a trailer starts with.
const TRAILER_MAGIC: &[u8; 16] = b"cedana-index-v1\n";
/// The trailer's bytes: the magic, then three little-endian u64.
const TRAILER_LEN: usize = 16 + 24;
/// The most bytes a tar stream's end blocks and the trailer decode to.
const MAX_AFTER_END: u64 = 64 << 10;
/// How far from the end a trailer's payload may start (a stored unit wraps it in at most a few dozen bytes).
const TRAILER_SEARCH: u64 = 128;

/// The index's entry point, at the end of an archive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trailer {
    /// Byte offset in the archive where the tar stream of the small entries starts (a unit boundary).
    pub tail_offset: u64,
    /// Bytes of padding (zeros) that stream starts with: the end of the last page image's tar block.
    pub tail_pad: u64,
    /// Bytes of data of the entries in that stream, the manifest included.
    pub tail_bytes: u64,
}

impl Trailer {
    /// The trailer's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = TRAILER_MAGIC.to_vec();
        for v in [self.tail_offset, self.tail_pad, self.tail_bytes] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }

    /// The trailer of the archive in `source`, if it has one.
    pub fn find(source: &dyn ArchiveSource) -> io::Result<Option<Self>> {
        let len = source.len();
        let from = len.saturating_sub(TRAILER_SEARCH);
        let mut end = vec![0u8; (len - from) as usize];
        source.read_exact_at(from, &mut end)?;
        let Some(at) = end.windows(TRAILER_MAGIC.len()).rposition(|w| w == TRAILER_MAGIC) else { return Ok(None) };
        let Some(payload) = end.get(at + TRAILER_MAGIC.len()..at + TRAILER_LEN) else { return Ok(None) };
        let word = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&payload[i * 8..i * 8 + 8]);
            u64::from_le_bytes(b)
        };
        let trailer = Self { tail_offset: word(0), tail_pad: word(1), tail_bytes: word(2) };
        // The archive ends with the trailer's unit exactly as the writer makes it: one cut short is none.
        let mut head = [0u8; 512];
        let n = head.len().min(len as usize);
        source.read_exact_at(0, &mut head[..n])?;
        let whole =
            Compression::detect_bytes(&head[..n]).is_some_and(|c| codec::units::ends_with_closing(c, &end, &trailer.encode()));
        Ok((whole && trailer.tail_offset < len && trailer.tail_pad < 512).then_some(trailer))
    }
}

/// An archive opened through its index: the small files held in memory (verified), the page images read in
/// place on demand (verified as they are read).
pub struct IndexedArchive {
    source: Arc<dyn ArchiveSource>,
    compression: Compression,
    manifest: Manifest,
    small: HashMap<String, Vec<u8>>,
    placed: HashMap<String, u64>,
}

impl IndexedArchive {
    /// Open the archive in `source` through its index, reading and verifying its small files and manifest.
    /// `None` when it has no index (a checkpoint of an older version, zlib, one written to a stream) or when
    /// its small files add up to more than `max_tail` bytes: read it front to back instead.
    pub fn open(source: Arc<dyn ArchiveSource>, max_tail: u64) -> Result<Option<Self>, CheckpointError> {
        let location = std::path::PathBuf::from(source.location());
        let Some((compression, trailer)) = find_index(&*source)? else { return Ok(None) };
        if trailer.tail_bytes > max_tail {
            return Ok(None);
        }
        // Two passes: the manifest first (nothing held), then the small files, each held only when it is
        // the size the manifest lists, so a lying entry costs no memory.
        let declared = read_tail(&*source, compression, trailer, None)?.manifest;
        let declared = declared.ok_or_else(|| CheckpointError::Incomplete { path: location.clone() })?;
        super::reader::check_version(&location, &declared)?;
        let Tail { manifest: again, small, digests } = read_tail(&*source, compression, trailer, Some(&declared))?;
        if again.as_ref() != Some(&declared) {
            return Err(corrupt(&location, "the archive's manifest changed while it was read".into()));
        }
        let manifest = declared;
        let placed: HashMap<String, u64> = manifest.placement.iter().map(|p| (p.name.clone(), p.offset)).collect();
        for f in &manifest.files {
            match (digests.get(&f.name), placed.get(&f.name)) {
                (Some(d), _) if d != f => return Err(corrupt(&location, format!("checksum mismatch in {}", f.name))),
                (Some(_), _) => {}
                (None, Some(offset)) if *offset < trailer.tail_offset => {}
                (None, _) => return Err(corrupt(&location, format!("file {} listed in the manifest is missing", f.name))),
            }
        }
        if let Some(extra) = small.keys().find(|n| !manifest.files.iter().any(|f| &f.name == *n)) {
            return Err(corrupt(&location, format!("unexpected file {extra} not listed in the manifest")));
        }
        let archive = Self { source, compression, manifest, small, placed };
        // Each page image's header is where the manifest places it, before anyone reads its data.
        for p in &archive.manifest.placement {
            if archive.small.contains_key(&p.name) {
                return Err(corrupt(&location, format!("{} is both placed and among the small files", p.name)));
            }
            let expected = archive.listed(&p.name)?;
            let header_len = if p.units.is_empty() { None } else { Some(codec::units::header_slot(compression)) };
            archive.check_header(&p.name, p.offset, header_len, expected)?;
        }
        Ok(Some(archive))
    }

    fn listed(&self, name: &str) -> Result<&super::FileDigest, CheckpointError> {
        let location = std::path::PathBuf::from(self.source.location());
        self.manifest
            .files
            .iter()
            .find(|f| f.name == name)
            .ok_or_else(|| corrupt(&location, format!("{name} is placed in the archive but not listed in the manifest")))
    }

    /// The decoded stream from the tar header of `name` at `offset` (a unit of `slot` bytes when given, else
    /// the start of a stream running on), past that header: it must be a regular file of that name and the
    /// size the manifest lists.
    fn check_header(
        &self,
        name: &str,
        offset: u64,
        slot: Option<usize>,
        expected: &super::FileDigest,
    ) -> Result<Box<dyn Read + Send>, CheckpointError> {
        let location = std::path::PathBuf::from(self.source.location());
        let io_err = |e| CheckpointError::Io { path: location.clone(), source: e };
        let damaged = |e: io::Error| unreadable(&location, e, &format!("{name} in the archive"));
        let reader: Box<dyn Read + Send> = match slot {
            Some(slot) => {
                if offset.checked_add(slot as u64).is_none_or(|end| end > self.source.len()) {
                    return Err(damaged(io::ErrorKind::UnexpectedEof.into()));
                }
                let mut head = vec![0u8; slot];
                self.source.read_exact_at(offset, &mut head).map_err(io_err)?;
                Box::new(io::Cursor::new(head))
            }
            None => self.source.read_from(offset).map_err(io_err)?,
        };
        let mut stream = codec::unit_decoder(self.compression, reader)?;
        let mut header = tar::Header::new_old();
        stream.read_exact(header.as_mut_bytes()).map_err(damaged)?;
        let found = header.path().map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
        let regular = header.entry_type() == tar::EntryType::Regular;
        if found != name || !regular || header.size().ok() != Some(expected.size) {
            return Err(corrupt(&location, format!("the index points {name} at an entry that is not it ({found:?})")));
        }
        Ok(Box::new(stream))
    }

    /// The manifest (verified against the small files it lists).
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The archive's compression.
    pub fn compression(&self) -> Compression {
        self.compression
    }

    /// Where the archive is.
    pub fn location(&self) -> &str {
        self.source.location()
    }

    /// Whether the checkpoint holds a file of this name.
    pub fn contains(&self, name: &str) -> bool {
        self.small.contains_key(name) || self.placed.contains_key(name)
    }

    /// The names of the files read in place (the page images).
    pub fn placed_names(&self) -> impl Iterator<Item = &str> {
        self.placed.keys().map(String::as_str)
    }

    /// Write file `name` to `out`: a small file from memory (verified when opened), a page image read in
    /// place and verified as it is read. An error once anything does not match the manifest (after all
    /// its bytes were read) or the archive cannot be read; [`Delivery::out_error`] when only `out` failed.
    pub fn copy_to(&self, name: &str, out: &mut dyn Write) -> Result<Delivery, CheckpointError> {
        self.copy_units_to(name, &mut super::units_read::PlainOut(out))
    }

    /// [`IndexedArchive::copy_to`], handing each decoded unit of a page image to `out` whole.
    pub fn copy_units_to(&self, name: &str, out: &mut dyn super::UnitOut) -> Result<Delivery, CheckpointError> {
        let location = std::path::PathBuf::from(self.source.location());
        if let Some(bytes) = self.small.get(name) {
            let out_error = out.write_all(bytes).err();
            return Ok(Delivery { bytes: bytes.len() as u64, out_error });
        }
        let Some(offset) = self.placed.get(name) else {
            return Err(corrupt(&location, format!("{name} is not in the checkpoint")));
        };
        let expected = self.listed(name)?;
        let units = self.manifest.placement.iter().find(|p| p.name == name).map(|p| p.units.as_slice()).unwrap_or_default();
        if !units.is_empty() {
            return self.copy_units(name, *offset, units, expected, out);
        }
        if self.compression == Compression::Tar {
            // A tar holds the image as it is, right after its header: read in the checksum's chunks, each
            // as a unit of its own (on every core, and into CRIU's pipe by reference).
            let chunk = super::digest::CHUNK as u64;
            let pieces: Vec<u64> =
                (0..expected.size.div_ceil(chunk).max(1)).map(|i| (expected.size - i * chunk).min(chunk)).collect();
            return self.copy_units(name, *offset, &pieces, expected, out);
        }
        let damaged = |e: io::Error| unreadable(&location, e, &format!("{name} in the archive"));
        let mut stream = self.check_header(name, *offset, None, expected)?;
        let mut hasher = Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut left = expected.size;
        let mut out_error = None;
        while left > 0 {
            let want = buf.len().min(left as usize);
            let n = stream.read(&mut buf[..want]).map_err(damaged)?;
            if n == 0 {
                return Err(damaged(io::ErrorKind::UnexpectedEof.into()));
            }
            hasher.update(&buf[..n]);
            if out_error.is_none() {
                out_error = out.write_all(&buf[..n]).err();
            }
            left -= n as u64;
        }
        if !hasher.finish(name).same(expected) {
            return Err(corrupt(&location, format!("checksum mismatch in {name}")));
        }
        Ok(Delivery { bytes: expected.size, out_error })
    }
}

impl IndexedArchive {
    /// [`IndexedArchive::copy_to`] of a page image stored as independent units: its header unit checked,
    /// then the units decoded on every core and written in order.
    fn copy_units(
        &self,
        name: &str,
        offset: u64,
        units: &[u64],
        expected: &super::FileDigest,
        out: &mut dyn super::UnitOut,
    ) -> Result<Delivery, CheckpointError> {
        let location = std::path::PathBuf::from(self.source.location());
        let slot = codec::units::header_slot(self.compression);
        self.check_header(name, offset, Some(slot), expected)?;
        let read = super::units_read::Units {
            source: &*self.source,
            compression: self.compression,
            base: offset + slot as u64,
            sizes: units,
            expected,
            location: &location,
        };
        let copied = read.copy_to(out, codec::worker_threads() as usize)?;
        Ok(Delivery { bytes: copied.bytes, out_error: copied.out_error })
    }
}

/// What the tar stream after the page images holds: the manifest, and the small files with their digests
/// when kept.
struct Tail {
    manifest: Option<Manifest>,
    small: HashMap<String, Vec<u8>>,
    digests: HashMap<String, super::FileDigest>,
}

/// Read the tar stream of the small files and the manifest that `trailer` points at: regular files only,
/// each once, under relative names, adding up to no more than the trailer says. With `keep`, the small
/// files are held in memory and hashed when `declared` (the manifest, read before) lists them with their
/// size, refused when it does not, else only skipped.
fn read_tail(
    source: &dyn ArchiveSource,
    compression: Compression,
    trailer: Trailer,
    declared: Option<&Manifest>,
) -> Result<Tail, CheckpointError> {
    let location = std::path::PathBuf::from(source.location());
    let io_err = |e| CheckpointError::Io { path: location.clone(), source: e };
    let damaged = |e: io::Error| unreadable(&location, e, &format!("the {compression} archive"));
    let mut stream = codec::unit_decoder(compression, source.read_from(trailer.tail_offset).map_err(io_err)?)?;
    io::copy(&mut (&mut stream).take(trailer.tail_pad), &mut io::sink()).map_err(damaged)?;
    let mut tail = tar::Archive::new(super::tar_guard::TarGuard::new(stream));
    let mut small = HashMap::new();
    let mut digests = HashMap::new();
    let mut seen = std::collections::HashSet::new();
    let mut manifest = None;
    let mut read = 0u64;
    for entry in tail.entries().map_err(damaged)? {
        let mut entry = entry.map_err(damaged)?;
        let name = entry.path().map_err(damaged)?.to_string_lossy().into_owned();
        safe_relative(&location, &name)?;
        let kind = entry.header().entry_type();
        if kind != tar::EntryType::Regular {
            return Err(super::reader::unsupported_entry(&location, &name, kind));
        }
        if manifest.is_some() {
            return Err(corrupt(&location, format!("entry {name} follows the manifest")));
        }
        if !seen.insert(name.clone()) {
            return Err(corrupt(&location, format!("entry {name} appears twice in the archive")));
        }
        read = read.saturating_add(entry.size());
        if read > trailer.tail_bytes {
            return Err(corrupt(&location, "the small files are larger than the index says".into()));
        }
        if name == MANIFEST_NAME {
            if entry.size() > super::reader::MAX_MANIFEST {
                return Err(corrupt(&location, "the manifest is implausibly large".into()));
            }
            let mut bytes = Vec::with_capacity(entry.size() as usize);
            entry.read_to_end(&mut bytes).map_err(damaged)?;
            manifest = Some(parse_manifest(&location, &bytes)?);
        } else if let Some(declared) = declared {
            let Some(listed) = declared.files.iter().find(|f| f.name == name) else {
                return Err(corrupt(&location, format!("unexpected file {name} not listed in the manifest")));
            };
            if entry.size() != listed.size {
                let size = entry.size();
                return Err(corrupt(&location, format!("file {name} has {size} bytes, the manifest says {}", listed.size)));
            }
            let mut bytes = Vec::with_capacity(entry.size() as usize);
            entry.read_to_end(&mut bytes).map_err(damaged)?;
            let mut h = Hasher::new();
            h.update(&bytes);
            digests.insert(name.clone(), h.finish(&name));
            small.insert(name, bytes);
        } else {
            io::copy(&mut entry, &mut io::sink()).map_err(damaged)?;
        }
    }
    // The end blocks and the trailer's own unit follow: read them too, so a damaged end is noticed.
    let rest = io::copy(&mut tail.into_inner().into_inner().take(MAX_AFTER_END), &mut io::sink()).map_err(damaged)?;
    if rest == MAX_AFTER_END {
        return Err(corrupt(&location, "data follows the end of the archive".into()));
    }
    Ok(Tail { manifest, small, digests })
}

/// The compression of the archive in `source` and its index's trailer; `None` when it has no index (a format
/// without late headers, an older version, a stream).
fn find_index(source: &dyn ArchiveSource) -> Result<Option<(Compression, Trailer)>, CheckpointError> {
    let io_err = |e| CheckpointError::Io { path: std::path::PathBuf::from(source.location()), source: e };
    let mut head = [0u8; 512];
    let n = head.len().min(source.len() as usize);
    source.read_exact_at(0, &mut head[..n]).map_err(io_err)?;
    let Some(compression) = Compression::detect_bytes(&head[..n]) else { return Ok(None) };
    if !codec::units::supports_late_headers(compression) {
        return Ok(None);
    }
    Ok(Trailer::find(source).map_err(io_err)?.map(|t| (compression, t)))
}

/// The manifest of the archive in `source` as its index gives it, before anything else is read (`None`
/// when it has no index): read through the tar stream of the small files without holding them, however
/// large. Checked as a manifest, not yet against the files.
pub(crate) fn declared_manifest(source: &dyn ArchiveSource) -> Result<Option<Manifest>, CheckpointError> {
    let location = std::path::PathBuf::from(source.location());
    let Some((compression, trailer)) = find_index(source)? else { return Ok(None) };
    let manifest = read_tail(source, compression, trailer, None)?.manifest;
    let manifest = manifest.ok_or_else(|| CheckpointError::Incomplete { path: location.clone() })?;
    super::reader::check_version(&location, &manifest)?;
    Ok(Some(manifest))
}

/// A file read out of the archive: every byte was read and matched the manifest.
#[derive(Debug)]
pub struct Delivery {
    pub bytes: u64,
    /// Why writing to the destination stopped (e.g. the reader closed its end early), if it did.
    pub out_error: Option<io::Error>,
}
