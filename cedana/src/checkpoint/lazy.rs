//! A checkpoint opened for a lazy restore: everything but the page images is read and verified now and put
//! in an images folder; each page image stays where it is (a folder's file, or its entry's bytes in place in
//! an uncompressed archive) for the lazy-pages handler to read on demand. In the images folder, a page image
//! is a sparse file of its full size holding only the pages CRIU's restore reads itself (the runs not marked
//! lazy: a few pages of the program's data segments), written on a thread of its own while CRIU starts up
//! (CRIU is held at its `pre-restore` step until they are: [`LazyPages::take_pending`]); the lazy ones stay
//! holes, filled by the lazy-pages handler ([`crate::criu::uffd`]).
//!
//! The page images are not verified before the restore (that pass is what a lazy restore avoids): they are
//! read in 8 MiB chunks ([`ChunkedPages`]), each checked against the manifest's hash of it before any page
//! of it is served, and each whole image compared once the memory is local; the caller ends the program
//! should one not match.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::digest::Hasher;
use super::index::IndexedArchive;
use super::lazy_store::ChunkedPages;
use super::reader::{check_version, corrupt, parse_manifest, safe_relative, unreadable};
use super::source::{ArchiveSource, LocalSource};
use super::{is_page_image, CheckpointError, FileDigest, Manifest, OpenedCheckpoint, PendingVerification, MANIFEST_NAME};
use crate::codec::Compression;
use crate::criu::pages::pagemap::Pagemap;

/// The largest file other than a page image that a lazy restore reads into memory.
const MAX_SMALL_FILE: u64 = 1 << 30;
/// The folder of the scratch folder holding recorded page orders.
pub const ORDER_FOLDER: &str = ".cedana-page-order";
/// Longest GNU long name we read (a path, so a few KiB at most).
const MAX_LONG_NAME: u64 = 64 << 10;

/// One page image, read in place.
#[derive(Clone)]
pub struct LazyPage {
    /// `pages-<id>.img`.
    pub name: String,
    /// The archive or file holding its bytes, from `base` on.
    pub source: Arc<dyn ArchiveSource>,
    /// Where its bytes start (the first unit's start in a compressed archive).
    pub base: u64,
    /// What the manifest says of it.
    pub digest: FileDigest,
    /// In a compressed archive: its data's units, one checksum chunk each ([`super::Placed::units`]).
    pub units: Vec<u64>,
    pub compression: Compression,
}

impl std::fmt::Debug for LazyPage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LazyPage({} at {}+{})", self.name, self.source.location(), self.base)
    }
}

impl LazyPage {
    /// The number in its name (`pages-<id>.img`).
    pub fn pages_id(&self) -> Option<u32> {
        self.name.strip_prefix("pages-")?.strip_suffix(".img")?.parse().ok()
    }
}

/// The page images of a checkpoint opened for a lazy restore ([`OpenedCheckpoint::lazy`]).
pub struct LazyPages {
    /// Its page images, in place.
    pub pages: Vec<LazyPage>,
    /// The pagemap of each process, by PID.
    pub pagemaps: HashMap<u64, Pagemap>,
    /// The page images read by chunks (in place, from an object store, or decoded), each chunk checked
    /// before any of it is served.
    pub chunked: Arc<ChunkedPages>,
    /// The sparse page images being written ([`finish`]): CRIU must not restore memory before they are.
    /// Dropped before the images folder (declared before it in [`OpenedCheckpoint`]), and joined then.
    pending: Mutex<Option<PendingVerification>>,
    /// Where the order in which a lazy restore of this checkpoint saw the program touch its memory is kept
    /// ([`crate::criu::uffd::order`]): in the scratch folder, named after the manifest's hash.
    pub order_file: PathBuf,
}

impl LazyPages {
    /// The writing of the sparse page images, under way: the caller holds CRIU at its `pre-restore` step
    /// until it is done ([`PendingVerification::wait`]). `None` once taken, or for a folder (its page
    /// images are CRIU's own).
    pub fn take_pending(&self) -> Option<PendingVerification> {
        // A poisoned lock: a thread panicked while taking it, with nothing half-changed inside.
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

impl std::fmt::Debug for LazyPages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LazyPages({:?}, {} pagemaps)", self.pages, self.pagemaps.len())
    }
}

/// Open the checkpoint at `path` for a lazy restore (extractions go under `scratch`): a folder, an
/// uncompressed archive, or a compressed one whose page images are runs of independent units (lz4, gzip,
/// zlib, zstd: [`super::Placed::units`]); others are refused (their pages cannot be read on their own). The result's
/// [`OpenedCheckpoint::lazy`] holds the page images.
pub fn open_lazy(path: &Path, scratch: &Path) -> Result<OpenedCheckpoint, CheckpointError> {
    if path.symlink_metadata().is_err() {
        return Err(CheckpointError::NotFound { path: path.to_path_buf() });
    }
    match Compression::detect_path(path)? {
        Compression::None => open_folder(path, scratch),
        Compression::Tar => {
            let source = Arc::new(LocalSource::open(path).map_err(CheckpointError::io(path))?);
            open_tar(source, path, scratch)
        }
        compression => {
            let source = Arc::new(LocalSource::open(path).map_err(CheckpointError::io(path))?);
            open_compressed(source, compression, path, scratch)
        }
    }
}

/// [`open_lazy`] of an archive read by ranges (an object in a store, named `location` in messages).
pub fn open_lazy_source(
    source: Arc<dyn ArchiveSource>,
    location: &Path,
    scratch: &Path,
) -> Result<OpenedCheckpoint, CheckpointError> {
    let mut head = [0u8; 512];
    let n = head.len().min(source.len() as usize);
    source.read_exact_at(0, &mut head[..n]).map_err(CheckpointError::io(location))?;
    match Compression::detect_bytes(&head[..n]) {
        Some(Compression::Tar) => open_tar(source, location, scratch),
        Some(compression) => open_compressed(source, compression, location, scratch),
        None => Err(corrupt(location, "not a checkpoint archive (no tar, gzip, lz4, zlib or zstd signature found)".into())),
    }
}

/// A folder: its small files are verified; it is its own images folder.
fn open_folder(path: &Path, scratch: &Path) -> Result<OpenedCheckpoint, CheckpointError> {
    let manifest_path = path.join(MANIFEST_NAME);
    let bytes = std::fs::read(&manifest_path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => CheckpointError::Incomplete { path: path.to_path_buf() },
        _ => CheckpointError::Io { path: manifest_path.clone(), source: e },
    })?;
    let manifest = parse_manifest(path, &bytes)?;
    check_version(path, &manifest)?;
    let mut pages = Vec::new();
    for f in &manifest.files {
        let file_path = path.join(safe_relative(path, &f.name)?);
        let missing = |e: std::io::Error| match e.kind() {
            std::io::ErrorKind::NotFound => corrupt(path, format!("file {} listed in the manifest is missing", f.name)),
            _ => CheckpointError::Io { path: file_path.clone(), source: e },
        };
        if is_page_image(&f.name) {
            let source = Arc::new(LocalSource::open(&file_path).map_err(missing)?);
            let (units, compression) = (Vec::new(), Compression::None);
            pages.push(LazyPage { name: f.name.clone(), source, base: 0, digest: f.clone(), units, compression });
        } else {
            let bytes = std::fs::read(&file_path).map_err(missing)?;
            check(path, f, &bytes)?;
        }
    }
    let pagemaps = read_pagemaps(path, path, &manifest)?;
    let mut opened = OpenedCheckpoint::in_folder(path, Compression::None, manifest, path.to_path_buf(), None);
    let chunked = Arc::new(ChunkedPages::new(&pages, path));
    let order_file = order_file(scratch, &serde_json::to_vec(&opened.manifest).unwrap_or_default());
    opened.lazy = Some(Arc::new(LazyPages { pages, pagemaps, chunked, pending: Mutex::new(None), order_file }));
    Ok(opened)
}

/// An uncompressed archive: its small files are extracted and verified, its page images located. Its tar
/// headers are walked by ranged reads (regular files, and GNU long names), so only the small files and the
/// headers are read.
fn open_tar(source: Arc<dyn ArchiveSource>, path: &Path, scratch: &Path) -> Result<OpenedCheckpoint, CheckpointError> {
    let damaged = |e: std::io::Error| unreadable(path, e, "the tar archive");
    let mut small: HashMap<String, Vec<u8>> = HashMap::new();
    let mut placed: HashMap<String, (u64, u64)> = HashMap::new();
    let mut manifest = None;
    let mut at = 0u64;
    let mut long_name: Option<String> = None;
    let truncated = || corrupt(path, "the tar archive ends without its end marker".into());
    // Every read is of a range the file holds, so no size field makes us allocate more than the file.
    let read = |offset: u64, len: u64| -> Result<Vec<u8>, CheckpointError> {
        if offset.checked_add(len).is_none_or(|end| end > source.len()) {
            return Err(truncated());
        }
        let mut buf = vec![0u8; usize::try_from(len).map_err(|_| corrupt(path, format!("an entry of {len} bytes")))?];
        source.read_exact_at(offset, &mut buf).map_err(damaged)?;
        Ok(buf)
    };
    loop {
        let block = read(at, 512)?;
        if block.iter().all(|b| *b == 0) {
            break;
        }
        let header = tar::Header::from_byte_slice(&block);
        let size = header.entry_size().map_err(damaged)?;
        let data = at + 512;
        at = size.div_ceil(512).checked_mul(512).and_then(|padded| data.checked_add(padded)).ok_or_else(truncated)?;
        let kind = header.entry_type();
        if kind == tar::EntryType::GNULongName {
            if size > MAX_LONG_NAME {
                return Err(corrupt(path, format!("a long name of {size} bytes")));
            }
            let bytes = read(data, size)?;
            long_name = Some(String::from_utf8_lossy(bytes.split(|b| *b == 0).next().unwrap_or_default()).into_owned());
            continue;
        }
        let name = match long_name.take() {
            Some(n) => n,
            None => header.path().map_err(damaged)?.to_string_lossy().into_owned(),
        };
        safe_relative(path, &name)?;
        if kind != tar::EntryType::Regular {
            return Err(super::reader::unsupported_entry(path, &name, kind));
        }
        if manifest.is_some() {
            return Err(corrupt(path, format!("entry {name} follows the manifest")));
        }
        if placed.contains_key(&name) || small.contains_key(&name) {
            return Err(corrupt(path, format!("entry {name} appears twice in the archive")));
        }
        if is_page_image(&name) {
            placed.insert(name, (data, size));
        } else if name == MANIFEST_NAME {
            if size > super::reader::MAX_MANIFEST {
                return Err(corrupt(path, "the manifest is implausibly large".into()));
            }
            manifest = Some(parse_manifest(path, &read(data, size)?)?);
        } else {
            if size > MAX_SMALL_FILE {
                return Err(corrupt(path, format!("{name} holds {size} bytes, more than a small image can")));
            }
            small.insert(name, read(data, size)?);
        }
    }
    let manifest = manifest.ok_or_else(|| CheckpointError::Incomplete { path: path.to_path_buf() })?;
    check_version(path, &manifest)?;
    let indexed = super::index::Trailer::find(&*source).map_err(CheckpointError::io(path))?.is_some();
    super::reader::check_index_kept(path, &manifest, indexed)?;
    let dir = lazy_folder(scratch)?;
    let mut pages = Vec::new();
    for f in &manifest.files {
        if let Some(&(base, size)) = placed.get(&f.name) {
            if size != f.size {
                return Err(corrupt(path, format!("{} holds {size} bytes, the manifest says {}", f.name, f.size)));
            }
            let (source, units) = (Arc::clone(&source), Vec::new());
            let compression = Compression::Tar;
            pages.push(LazyPage { name: f.name.clone(), source, base, digest: f.clone(), units, compression });
            continue;
        }
        let bytes =
            small.remove(&f.name).ok_or_else(|| corrupt(path, format!("file {} listed in the manifest is missing", f.name)))?;
        check(path, f, &bytes)?;
        let out = dir.path().join(safe_relative(path, &f.name)?);
        if let Some(parent) = out.parent() {
            std::fs::create_dir_all(parent).map_err(CheckpointError::io(parent))?;
        }
        std::fs::write(&out, bytes).map_err(CheckpointError::io(&out))?;
    }
    if let Some(extra) = small.keys().chain(placed.keys()).find(|n| !manifest.files.iter().any(|f| &f.name == *n)) {
        return Err(corrupt(path, format!("unexpected file {extra} not listed in the manifest")));
    }
    finish(path, Compression::Tar, manifest, dir, pages, scratch)
}

/// A compressed archive with an index whose page images are runs of units: its small files are read (and
/// verified) through the index, its page images located.
fn open_compressed(
    source: Arc<dyn ArchiveSource>,
    compression: Compression,
    path: &Path,
    scratch: &Path,
) -> Result<OpenedCheckpoint, CheckpointError> {
    let not_in_place = || CheckpointError::NotInPlace { path: path.to_path_buf(), compression };
    let archive = IndexedArchive::open(Arc::clone(&source), MAX_SMALL_FILE)?.ok_or_else(not_in_place)?;
    let manifest = archive.manifest().clone();
    let dir = lazy_folder(scratch)?;
    let slot = crate::codec::units::header_slot(compression) as u64;
    let mut pages = Vec::new();
    for f in &manifest.files {
        if is_page_image(&f.name) {
            let placed = manifest.placement.iter().find(|p| p.name == f.name).filter(|p| !p.units.is_empty());
            let placed = placed.ok_or_else(not_in_place)?;
            let (source, units) = (Arc::clone(&source), placed.units.clone());
            let base = placed.offset + slot;
            pages.push(LazyPage { name: f.name.clone(), source, base, digest: f.clone(), units, compression });
            continue;
        }
        let out = dir.path().join(safe_relative(path, &f.name)?);
        if let Some(parent) = out.parent() {
            std::fs::create_dir_all(parent).map_err(CheckpointError::io(parent))?;
        }
        let mut file = File::create(&out).map_err(CheckpointError::io(&out))?;
        if let Some(e) = archive.copy_to(&f.name, &mut file)?.out_error {
            return Err(CheckpointError::Io { path: out, source: e });
        }
    }
    finish(path, compression, manifest, dir, pages, scratch)
}

/// The images folder of a lazy restore in `scratch`: `.cedana-lazy-PID-*`, named after this process so that a
/// later start removes it should this process be killed while it serves the pages (see
/// [`crate::engine::leftovers`]); removed when the checkpoint is dropped otherwise.
fn lazy_folder(scratch: &Path) -> Result<tempfile::TempDir, CheckpointError> {
    std::fs::create_dir_all(scratch).map_err(CheckpointError::io(scratch))?;
    tempfile::Builder::new()
        .prefix(&crate::engine::leftovers::prefix(".cedana-lazy-"))
        .tempdir_in(scratch)
        .map_err(CheckpointError::io(scratch))
}

/// The pagemaps read from the images folder `dir`, and the checkpoint opened. Each page image is written
/// there as a sparse file on a thread of its own ([`LazyPages::take_pending`]), while CRIU starts up: CRIU
/// reads page images only once it restores memory, after its `pre-restore` step.
fn finish(
    path: &Path,
    compression: Compression,
    manifest: Manifest,
    dir: tempfile::TempDir,
    pages: Vec<LazyPage>,
    scratch: &Path,
) -> Result<OpenedCheckpoint, CheckpointError> {
    let order_file = order_file(scratch, &serde_json::to_vec(&manifest).unwrap_or_default());
    let pagemaps = read_pagemaps(path, dir.path(), &manifest)?;
    let chunked = Arc::new(ChunkedPages::new(&pages, path));
    let sparse = pages.iter().map(|page| restored_runs(path, page, &pagemaps)).collect::<Result<Vec<_>, _>>()?;
    let pending = {
        let (location, images, chunked) = (path.to_path_buf(), dir.path().to_path_buf(), Arc::clone(&chunked));
        PendingVerification::spawn(path, "sparse-pages", move || {
            sparse.iter().try_for_each(|(page, runs)| write_sparse(&location, &images, page, runs, &chunked))
        })?
    };
    let images_dir = dir.path().to_path_buf();
    let mut opened = OpenedCheckpoint::in_folder(path, compression, manifest, images_dir, Some(dir));
    let pending = Mutex::new(Some(pending));
    opened.lazy = Some(Arc::new(LazyPages { pages, pagemaps, chunked, pending, order_file }));
    Ok(opened)
}

/// Where the page order of the checkpoint whose manifest is `manifest` is kept, in `scratch`.
fn order_file(scratch: &Path, manifest: &[u8]) -> PathBuf {
    scratch.join(ORDER_FOLDER).join(format!("{:032x}.order", super::digest::xxh3_128(manifest)))
}

fn check(path: &Path, expected: &FileDigest, bytes: &[u8]) -> Result<(), CheckpointError> {
    let mut h = Hasher::new();
    h.update(bytes);
    if !h.finish(&expected.name).same(expected) {
        return Err(corrupt(path, format!("checksum mismatch in {}", expected.name)));
    }
    Ok(())
}

/// The pagemaps in `images` (`pagemap-<PID>.img`), by PID.
fn read_pagemaps(path: &Path, images: &Path, manifest: &Manifest) -> Result<HashMap<u64, Pagemap>, CheckpointError> {
    let mut maps = HashMap::new();
    for f in &manifest.files {
        let Some(pid) = f.name.strip_prefix("pagemap-").and_then(|n| n.strip_suffix(".img")).and_then(|n| n.parse().ok()) else {
            continue;
        };
        let file = images.join(&f.name);
        let bytes = std::fs::read(&file).map_err(CheckpointError::io(&file))?;
        let map = Pagemap::decode(&bytes).map_err(|e| corrupt(path, e.to_string()))?;
        maps.insert(pid, map);
    }
    Ok(maps)
}

/// The runs of `page` (offset, length) that CRIU's restore reads itself (those not marked lazy).
fn restored_runs(
    path: &Path,
    page: &LazyPage,
    maps: &HashMap<u64, Pagemap>,
) -> Result<(LazyPage, Vec<(u64, u64)>), CheckpointError> {
    let id = page.pages_id();
    let mut runs = Vec::new();
    for extent in maps.values().filter(|m| Some(m.pages_id) == id).flat_map(|m| m.extents.iter()).filter(|e| !e.lazy) {
        if extent.offset.checked_add(extent.len()).is_none_or(|end| end > page.digest.size) {
            return Err(corrupt(path, format!("a pagemap places pages past the end of {}", page.name)));
        }
        runs.push((extent.offset, extent.len()));
    }
    Ok((page.clone(), runs))
}

/// `page` as a sparse file in `images`: its full size, with the bytes of `runs`.
fn write_sparse(
    path: &Path,
    images: &Path,
    page: &LazyPage,
    runs: &[(u64, u64)],
    chunked: &ChunkedPages,
) -> Result<(), CheckpointError> {
    use crate::criu::pages::PageStore;
    use std::os::unix::fs::FileExt;
    let out_path: PathBuf = images.join(&page.name);
    let out = File::create(&out_path).map_err(CheckpointError::io(&out_path))?;
    out.set_len(page.digest.size).map_err(CheckpointError::io(&out_path))?;
    let mut buf = Vec::new();
    for &(offset, len) in runs {
        buf.resize(len as usize, 0);
        match page.pages_id() {
            Some(id) => chunked.read_at(id, offset, &mut buf).map_err(|e| super::lazy_store::read_failed(path, e))?,
            None => page.source.read_exact_at(page.base + offset, &mut buf).map_err(CheckpointError::io(path))?,
        }
        out.write_all_at(&buf, offset).map_err(CheckpointError::io(&out_path))?;
    }
    Ok(())
}
