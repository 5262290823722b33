//! Reading a checkpoint: detect the format, extract, and verify every checksum before anyone restores it.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use super::digest::{FileDigest, HashingWriter};
use super::digest_job::DigestJob;
use super::index::{IndexedArchive, Trailer};
use super::manifest::{Manifest, FORMAT_VERSION, MANIFEST_NAME};
use super::source::{ArchiveSource, LocalSource};
use super::tar_guard::TarGuard;
use super::writer::copy_large;
use super::{CheckpointError, RESTORE_BYPRODUCTS};
use crate::codec::pipeline::ReadAhead;
use crate::codec::{self, Compression};

/// Largest manifest we accept (a corrupt size field must not make us allocate gigabytes).
pub(crate) const MAX_MANIFEST: u64 = 64 << 20;

/// A verified checkpoint, ready for CRIU: its images are in `images_dir`.
pub struct OpenedCheckpoint {
    pub path: PathBuf,
    pub compression: Compression,
    pub manifest: Manifest,
    /// The folder holding the verified images (the checkpoint itself for `none`, else an extraction).
    pub images_dir: PathBuf,
    /// For a restore that streams the images to CRIU: the archive read through its index (its small files
    /// verified already, each page image verified as CRIU reads it). `images_dir` then holds only our own
    /// files (not CRIU's images), for the restore to read.
    pub streamed: Option<Arc<IndexedArchive>>,
    /// For a lazy restore: the page images, read in place (see [`super::lazy`]); `images_dir` then holds the
    /// other images and sparse page images with only the pages the restore reads itself.
    pub lazy: Option<Arc<super::lazy::LazyPages>>,
    /// Keeps an extraction alive; deleted on drop (after `lazy`, whose sparse page images may still be
    /// being written into it: fields drop in order).
    _extracted: Option<tempfile::TempDir>,
}

impl OpenedCheckpoint {
    /// A checkpoint whose images are in `images_dir` (kept alive by `extracted`, when given), verified by
    /// the caller.
    pub(crate) fn in_folder(
        path: &Path,
        compression: Compression,
        manifest: Manifest,
        images_dir: PathBuf,
        extracted: Option<tempfile::TempDir>,
    ) -> Self {
        Self { path: path.to_path_buf(), compression, manifest, images_dir, streamed: None, lazy: None, _extracted: extracted }
    }

    /// Open and verify the checkpoint at `path`. Archives are extracted under `scratch`; nothing is
    /// returned unless every file matches the manifest.
    pub fn open(path: &Path, scratch: &Path, progress: &dyn Fn(u64)) -> Result<Self, CheckpointError> {
        if path.symlink_metadata().is_err() {
            return Err(CheckpointError::NotFound { path: path.to_path_buf() });
        }
        let compression = Compression::detect_path(path)?;
        if !compression.is_archive() {
            let manifest = verify_folder(path, progress)?;
            return Ok(Self {
                path: path.to_path_buf(),
                compression,
                manifest,
                images_dir: path.to_path_buf(),
                streamed: None,
                lazy: None,
                _extracted: None,
            });
        }
        // An archive with an index says what it holds before anything is extracted: each entry is then held
        // to the size the manifest declares, and the whole must fit the scratch folder.
        let source: Arc<dyn ArchiveSource> = Arc::new(LocalSource::open(path).map_err(CheckpointError::io(path))?);
        let indexed = Trailer::find(&*source).map_err(CheckpointError::io(path))?.is_some();
        let declared = super::index::declared_manifest(&*source)?;
        std::fs::create_dir_all(scratch).map_err(CheckpointError::io(scratch))?;
        let free = free_bytes(scratch)?;
        if let Some(needed) = declared.as_ref().map(Manifest::images_size).filter(|n| *n > free) {
            return Err(CheckpointError::ScratchFull { dir: scratch.to_path_buf(), needed, free });
        }
        let dir = restore_folder(scratch)?;
        let limits = Limits { declared: declared.as_ref(), dest: Some((dir.path(), free)) };
        let (manifest, digests) = walk_archive(path, compression, limits, progress)?;
        let manifest = manifest.ok_or_else(|| CheckpointError::Incomplete { path: path.to_path_buf() })?;
        check_version(path, &manifest)?;
        if declared.is_some_and(|d| d != manifest) {
            return Err(corrupt(path, "the manifest differs from the one the archive's index points at".into()));
        }
        check_index_kept(path, &manifest, indexed)?;
        compare(path, &manifest, &digests)?;
        Ok(Self {
            path: path.to_path_buf(),
            compression,
            manifest,
            images_dir: dir.path().to_path_buf(),
            streamed: None,
            lazy: None,
            _extracted: Some(dir),
        })
    }

    /// Open the archive at `path` for a streamed restore, through its index (see [`IndexedArchive`]): its
    /// small files and manifest are read and verified now, our own files (not CRIU's `*.img`) are put in a
    /// folder under `scratch`, and the page images stay in the archive until CRIU reads them. `None` when
    /// the archive has no index (or too large a tail): extract it with [`OpenedCheckpoint::open`].
    pub fn open_streamed(path: &Path, scratch: &Path) -> Result<Option<Self>, CheckpointError> {
        let source = LocalSource::open(path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => CheckpointError::NotFound { path: path.to_path_buf() },
            _ => CheckpointError::Io { path: path.to_path_buf(), source: e },
        })?;
        Self::open_streamed_from(Arc::new(source), path, scratch)
    }

    /// As [`OpenedCheckpoint::open_streamed`], for an archive read through any source (an object in a
    /// store); `path` names it.
    pub fn open_streamed_from(
        source: Arc<dyn ArchiveSource>,
        path: &Path,
        scratch: &Path,
    ) -> Result<Option<Self>, CheckpointError> {
        let Some(archive) = IndexedArchive::open(source, MAX_STREAMED_TAIL)? else { return Ok(None) };
        std::fs::create_dir_all(scratch).map_err(CheckpointError::io(scratch))?;
        let dir = restore_folder(scratch)?;
        for f in &archive.manifest().files {
            if f.name.ends_with(".img") || archive.placed_names().any(|n| n == f.name) {
                continue;
            }
            let dest = dir.path().join(safe_relative(path, &f.name)?);
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent).map_err(CheckpointError::io(parent))?;
            }
            let mut out = File::create(&dest).map_err(CheckpointError::io(&dest))?;
            let delivered = archive.copy_to(&f.name, &mut out)?;
            if let Some(e) = delivered.out_error {
                return Err(CheckpointError::Io { path: dest, source: e });
            }
        }
        Ok(Some(Self {
            path: path.to_path_buf(),
            compression: archive.compression(),
            manifest: archive.manifest().clone(),
            images_dir: dir.path().to_path_buf(),
            streamed: Some(Arc::new(archive)),
            lazy: None,
            _extracted: Some(dir),
        }))
    }
}

/// Largest total of small files a streamed restore holds in memory (beyond it, the archive is extracted).
const MAX_STREAMED_TAIL: u64 = 64 << 20;

/// Work on a checkpoint that CRIU must not restore from before it is done, under way on threads of its own
/// while CRIU starts up: the checksum verification of a folder checkpoint, or the writing of a lazy
/// restore's sparse page images ([`super::lazy`]).
pub struct PendingVerification(Pending);

enum Pending {
    Folder { job: Arc<DigestJob>, workers: Vec<std::thread::JoinHandle<()>>, manifest: Box<Manifest>, path: PathBuf },
    Task { worker: JoinOnDrop, path: PathBuf },
}

/// A thread working on a checkpoint's folder: joined when dropped unwaited, so that the folder (removed
/// once the checkpoint is closed) is not written to after it is gone.
struct JoinOnDrop(Option<std::thread::JoinHandle<Result<(), CheckpointError>>>);

impl Drop for JoinOnDrop {
    fn drop(&mut self) {
        if let Some(worker) = self.0.take() {
            let _ = worker.join();
        }
    }
}

impl PendingVerification {
    /// `work` (on a thread of its own) as pending work on the checkpoint at `path`.
    pub(crate) fn spawn(
        path: &Path,
        name: &str,
        work: impl FnOnce() -> Result<(), CheckpointError> + Send + 'static,
    ) -> Result<Self, CheckpointError> {
        let worker = std::thread::Builder::new().name(name.into()).spawn(work).map_err(CheckpointError::io(path))?;
        Ok(Self(Pending::Task { worker: JoinOnDrop(Some(worker)), path: path.to_path_buf() }))
    }

    /// Help with what is left, then give the verdict: for a folder, every file matches the manifest.
    pub fn wait(self) -> Result<(), CheckpointError> {
        match self.0 {
            Pending::Folder { job, workers, manifest, path } => {
                job.work();
                for worker in workers {
                    worker.join().map_err(|_| corrupt(&path, "a verification thread panicked".into()))?;
                }
                compare(&path, &manifest, &job.digests())
            }
            Pending::Task { mut worker, path } => match worker.0.take().map(|w| w.join()) {
                Some(Ok(result)) => result,
                Some(Err(_)) => Err(corrupt(&path, "a thread reading the checkpoint panicked".into())),
                None => Ok(()),
            },
        }
    }
}

impl OpenedCheckpoint {
    /// Open a folder checkpoint and start verifying it in the background, so the verification overlaps
    /// CRIU's own start-up: one core fewer than the machine has hashes meanwhile (CRIU keeps one), and
    /// [`PendingVerification::wait`] joins in. The caller must hold CRIU before it restores anything (its
    /// `pre-restore` hook) until `wait` succeeds. Missing or unexpected files are refused here already.
    pub fn open_folder_verifying(path: &Path) -> Result<(Self, PendingVerification), CheckpointError> {
        if path.symlink_metadata().is_err() {
            return Err(CheckpointError::NotFound { path: path.to_path_buf() });
        }
        let manifest = load_folder_manifest(path)?;
        let job = Arc::new(folder_job(path, &manifest)?);
        let workers = (0..(codec::worker_threads() as usize).saturating_sub(1).max(1))
            .map(|_| {
                let job = Arc::clone(&job);
                std::thread::Builder::new().name("verify".into()).spawn(move || job.work())
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(CheckpointError::io(path))?;
        let pending =
            PendingVerification(Pending::Folder { job, workers, manifest: Box::new(manifest.clone()), path: path.to_path_buf() });
        let opened = Self {
            path: path.to_path_buf(),
            compression: Compression::None,
            manifest,
            images_dir: path.to_path_buf(),
            streamed: None,
            lazy: None,
            _extracted: None,
        };
        Ok((opened, pending))
    }
}

/// Read the manifest of a checkpoint; with `verify`, also check every file against it.
pub fn read_manifest(path: &Path, verify: bool) -> Result<Manifest, CheckpointError> {
    if path.symlink_metadata().is_err() {
        return Err(CheckpointError::NotFound { path: path.to_path_buf() });
    }
    let compression = Compression::detect_path(path)?;
    if !compression.is_archive() {
        return if verify { verify_folder(path, &|_| {}) } else { load_folder_manifest(path) };
    }
    if !verify {
        // Through the index, only the archive's end is read (the small files and the manifest).
        let source = LocalSource::open(path).map_err(CheckpointError::io(path))?;
        if let Some(archive) = IndexedArchive::open(Arc::new(source), MAX_STREAMED_TAIL)? {
            return Ok(archive.manifest().clone());
        }
    }
    let (manifest, digests) = walk_archive(path, compression, Limits { declared: None, dest: None }, &|_| {})?;
    let manifest = manifest.ok_or_else(|| CheckpointError::Incomplete { path: path.to_path_buf() })?;
    check_version(path, &manifest)?;
    if verify {
        let source = LocalSource::open(path).map_err(CheckpointError::io(path))?;
        check_index_kept(path, &manifest, Trailer::find(&source).map_err(CheckpointError::io(path))?.is_some())?;
        compare(path, &manifest, &digests)?;
    }
    Ok(manifest)
}

/// An archive whose manifest places page images for readers that seek was written with an index at its
/// very end: without it, the archive lost its end (a plain tar cut after its data reads to the end as if
/// whole otherwise).
pub(crate) fn check_index_kept(path: &Path, manifest: &Manifest, indexed: bool) -> Result<(), CheckpointError> {
    if !manifest.placement.is_empty() && !indexed {
        return Err(corrupt(path, "the index at the archive's end is missing: the archive was cut short".into()));
    }
    Ok(())
}

/// Read the one file `name` of the checkpoint at `path` (a folder, or an archive of any compression, read
/// only as far as that file) and check it against the manifest; `None` when the manifest lists no such file.
pub fn read_entry(path: &Path, name: &str) -> Result<Option<Vec<u8>>, CheckpointError> {
    let manifest = read_manifest(path, false)?;
    let Some(expected) = manifest.files.iter().find(|f| f.name == name) else { return Ok(None) };
    let compression = Compression::detect_path(path)?;
    let bytes = if compression.is_archive() {
        let file = File::open(path).map_err(CheckpointError::io(path))?;
        let mut archive = tar::Archive::new(TarGuard::new(codec::decoder(compression, file)?));
        let damaged =
            |e: io::Error| corrupt(path, format!("cannot read the {compression} archive ({e}); it is truncated or damaged"));
        let mut found = None;
        for entry in archive.entries().map_err(damaged)? {
            let mut entry = entry.map_err(damaged)?;
            if entry.path().map_err(damaged)?.to_str() == Some(name) {
                // The entry is read into memory: it must be what the manifest says before a byte is.
                let kind = entry.header().entry_type();
                if kind != tar::EntryType::Regular {
                    return Err(unsupported_entry(path, name, kind));
                }
                if entry.size() != expected.size {
                    let size = entry.size();
                    return Err(corrupt(path, format!("file {name} has {size} bytes, the manifest says {}", expected.size)));
                }
                let mut bytes = Vec::new();
                entry.read_to_end(&mut bytes).map_err(damaged)?;
                found = Some(bytes);
                break;
            }
        }
        found.ok_or_else(|| corrupt(path, format!("the manifest lists {name} but the archive does not hold it")))?
    } else {
        let file = path.join(name);
        std::fs::read(&file).map_err(CheckpointError::io(&file))?
    };
    let mut hasher = super::digest::Hasher::new();
    hasher.update(&bytes);
    if !hasher.finish(name).same(expected) {
        return Err(corrupt(path, format!("{name} does not match the manifest")));
    }
    Ok(Some(bytes))
}

fn load_folder_manifest(path: &Path) -> Result<Manifest, CheckpointError> {
    let mpath = path.join(MANIFEST_NAME);
    let bytes = match std::fs::read(&mpath) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(CheckpointError::Incomplete { path: path.to_path_buf() }),
        Err(e) => return Err(CheckpointError::Io { path: mpath, source: e }),
    };
    let manifest = parse_manifest(path, &bytes)?;
    check_version(path, &manifest)?;
    Ok(manifest)
}

fn verify_folder(path: &Path, progress: &dyn Fn(u64)) -> Result<Manifest, CheckpointError> {
    let manifest = load_folder_manifest(path)?;
    let job = folder_job(path, &manifest)?;
    job.run(codec::worker_threads() as usize, progress);
    compare(path, &manifest, &job.digests())?;
    Ok(manifest)
}

/// The hashing of every file the manifest lists, opened; a missing file, or one the manifest does not list,
/// is refused at once.
fn folder_job(path: &Path, manifest: &Manifest) -> Result<DigestJob, CheckpointError> {
    let mut present = Vec::new();
    list_names(path, "", &mut present).map_err(CheckpointError::io(path))?;
    for name in present {
        let known = name == MANIFEST_NAME || RESTORE_BYPRODUCTS.contains(&name.as_str());
        if !known && !manifest.files.iter().any(|f| f.name == name) {
            return Err(corrupt(path, format!("unexpected file {name} not listed in the manifest")));
        }
    }
    let files = manifest
        .files
        .iter()
        .map(|f| Ok((f.name.clone(), path.join(safe_relative(path, &f.name)?))))
        .collect::<Result<Vec<_>, CheckpointError>>()?;
    DigestJob::open(files.clone()).map_err(|(i, e)| match e.kind() {
        io::ErrorKind::NotFound => corrupt(path, format!("file {} listed in the manifest is missing", files[i].0)),
        _ => CheckpointError::Io { path: files[i].1.clone(), source: e },
    })
}

/// What a walk through an archive may write.
struct Limits<'a> {
    /// The manifest, when the archive's index gave it before the walk: every entry must be listed there,
    /// with the size it declares.
    declared: Option<&'a Manifest>,
    /// Where to extract, and how many bytes may be written there (the free space found before).
    dest: Option<(&'a Path, u64)>,
}

/// Stream through an archive, optionally extracting, hashing every file. Only regular files are accepted,
/// each once, under a relative name; an entry is refused before any of its bytes is written when it is
/// not what the declared manifest lists or would not fit the space left.
fn walk_archive(
    path: &Path,
    compression: Compression,
    limits: Limits<'_>,
    progress: &dyn Fn(u64),
) -> Result<(Option<Manifest>, Vec<FileDigest>), CheckpointError> {
    let file = File::open(path).map_err(CheckpointError::io(path))?;
    let decoder = ReadAhead::new(codec::decoder(compression, file)?).map_err(CheckpointError::io(path))?;
    let mut archive = tar::Archive::new(TarGuard::new(decoder));
    let damaged =
        |e: io::Error| corrupt(path, format!("cannot read the {compression} archive ({e}); it is truncated or damaged"));
    let mut manifest = None;
    let mut digests = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut written = 0u64;
    for entry in archive.entries().map_err(damaged)? {
        let mut entry = entry.map_err(damaged)?;
        let name = entry.path().map_err(damaged)?.to_string_lossy().into_owned();
        let rel = safe_relative(path, &name)?;
        match entry.header().entry_type() {
            tar::EntryType::Directory => continue,
            tar::EntryType::Regular | tar::EntryType::Continuous => {}
            other => return Err(unsupported_entry(path, &name, other)),
        }
        if manifest.is_some() {
            return Err(corrupt(path, format!("entry {name} follows the manifest")));
        }
        if !seen.insert(rel.clone()) {
            return Err(corrupt(path, format!("entry {name} appears twice in the archive")));
        }
        if let Some(declared) = limits.declared.filter(|_| name != MANIFEST_NAME) {
            let Some(listed) = declared.files.iter().find(|f| f.name == name) else {
                return Err(corrupt(path, format!("unexpected file {name} not listed in the manifest")));
            };
            if entry.size() != listed.size {
                let size = entry.size();
                return Err(corrupt(path, format!("file {name} has {size} bytes, the manifest says {}", listed.size)));
            }
        }
        if name == MANIFEST_NAME {
            if entry.size() > MAX_MANIFEST {
                return Err(corrupt(path, "the manifest is implausibly large".into()));
            }
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).map_err(damaged)?;
            manifest = Some(parse_manifest(path, &bytes)?);
            continue;
        }
        let digest = match limits.dest {
            Some((dest, free)) => {
                written = written.saturating_add(entry.size());
                if written > free {
                    return Err(CheckpointError::ScratchFull { dir: dest.to_path_buf(), needed: written, free });
                }
                let out_path = dest.join(&rel);
                if let Some(parent) = out_path.parent() {
                    std::fs::create_dir_all(parent).map_err(CheckpointError::io(parent))?;
                }
                let out = File::create(&out_path).map_err(CheckpointError::io(&out_path))?;
                let mut w = HashingWriter::new(out);
                copy_large(&mut entry, &mut w).map_err(damaged)?;
                w.hasher().finish(name.as_str())
            }
            None => {
                let mut w = HashingWriter::new(io::sink());
                copy_large(&mut entry, &mut w).map_err(damaged)?;
                w.hasher().finish(name.as_str())
            }
        };
        progress(digest.size);
        digests.push(digest);
    }
    // Drain the rest of the stream so trailing garbage or a bad final checksum is noticed.
    let mut rest = archive.into_inner().into_inner();
    io::copy(&mut rest, &mut io::sink()).map_err(damaged)?;
    Ok((manifest, digests))
}

pub(crate) fn parse_manifest(path: &Path, bytes: &[u8]) -> Result<Manifest, CheckpointError> {
    #[derive(serde::Deserialize)]
    struct Versioned {
        format_version: u32,
    }
    let v: Versioned =
        serde_json::from_slice(bytes).map_err(|e| corrupt(path, format!("the manifest is not valid JSON ({e})")))?;
    if v.format_version != FORMAT_VERSION {
        return Err(CheckpointError::Version { path: path.to_path_buf(), found: v.format_version, expected: FORMAT_VERSION });
    }
    serde_json::from_slice(bytes).map_err(|e| corrupt(path, format!("the manifest is malformed ({e})")))
}

pub(crate) fn check_version(path: &Path, manifest: &Manifest) -> Result<(), CheckpointError> {
    if manifest.format_version != FORMAT_VERSION {
        return Err(CheckpointError::Version {
            path: path.to_path_buf(),
            found: manifest.format_version,
            expected: FORMAT_VERSION,
        });
    }
    if manifest.checksum != super::digest::ALGORITHM {
        return Err(corrupt(path, format!("unknown checksum algorithm {:?}", manifest.checksum)));
    }
    let mut names = std::collections::HashSet::new();
    for f in &manifest.files {
        safe_relative(path, &f.name)?;
        if f.name == MANIFEST_NAME {
            return Err(corrupt(path, format!("the manifest lists itself ({MANIFEST_NAME}) as a file")));
        }
        if !names.insert(f.name.as_str()) {
            return Err(corrupt(path, format!("the manifest lists {} twice", f.name)));
        }
    }
    let mut placed = std::collections::HashSet::new();
    for p in &manifest.placement {
        if !names.contains(p.name.as_str()) || !placed.insert(p.name.as_str()) {
            return Err(corrupt(path, format!("the manifest places {} that it does not list once", p.name)));
        }
    }
    Ok(())
}

/// Every file of the manifest must be present with the same size and checksum, and nothing else.
fn compare(path: &Path, manifest: &Manifest, found: &[FileDigest]) -> Result<(), CheckpointError> {
    let found: BTreeMap<&str, &FileDigest> = found.iter().map(|d| (d.name.as_str(), d)).collect();
    for expected in &manifest.files {
        match found.get(expected.name.as_str()) {
            None => return Err(corrupt(path, format!("file {} listed in the manifest is missing", expected.name))),
            Some(d) if d.size != expected.size => {
                return Err(corrupt(
                    path,
                    format!("file {} has {} bytes, the manifest says {}", expected.name, d.size, expected.size),
                ))
            }
            Some(d) if d.xxh3 != expected.xxh3 => return Err(corrupt(path, format!("checksum mismatch in {}", expected.name))),
            Some(_) => {}
        }
    }
    if let Some(extra) = found.keys().find(|n| !manifest.files.iter().any(|f| f.name == **n)) {
        return Err(corrupt(path, format!("unexpected file {extra} not listed in the manifest")));
    }
    Ok(())
}

/// Accept only plain relative paths (no `..`, no absolute paths, no empty names); the path returned has
/// only its normal components (`./a` is `a`).
pub(crate) fn safe_relative(path: &Path, name: &str) -> Result<PathBuf, CheckpointError> {
    let p = Path::new(name);
    let ok = p.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    let rel: PathBuf = p.components().filter(|c| matches!(c, Component::Normal(_))).collect();
    if !ok || rel.as_os_str().is_empty() || name.contains('\0') {
        return Err(corrupt(path, format!("entry {name:?} would escape the checkpoint folder")));
    }
    Ok(rel)
}

/// The refusal of an archive entry that is not a regular file (a link, a device, a FIFO...).
pub(crate) fn unsupported_entry(path: &Path, name: &str, kind: tar::EntryType) -> CheckpointError {
    let what = match kind {
        tar::EntryType::Symlink => "a symbolic link",
        tar::EntryType::Link => "a hard link",
        tar::EntryType::Char => "a character device",
        tar::EntryType::Block => "a block device",
        tar::EntryType::Fifo => "a FIFO",
        _ => "of an unsupported type",
    };
    corrupt(path, format!("entry {name} is {what}, not a regular file; a checkpoint holds only regular files"))
}

/// Bytes free for us under `dir`.
fn free_bytes(dir: &Path) -> Result<u64, CheckpointError> {
    let st = nix::sys::statvfs::statvfs(dir).map_err(|e| CheckpointError::Io { path: dir.to_path_buf(), source: e.into() })?;
    Ok(st.blocks_available().saturating_mul(st.fragment_size()))
}

pub(crate) fn corrupt(path: &Path, detail: String) -> CheckpointError {
    CheckpointError::Corrupt { path: path.to_path_buf(), detail }
}

/// A failed read of the archive at `path`: the source's own failure (an unreachable store, see
/// [`super::source::is_source_failure`]) as it is, anything else as damage, `what` saying what was read.
pub(crate) fn unreadable(path: &Path, e: io::Error, what: &str) -> CheckpointError {
    if super::source::is_source_failure(&e) {
        return CheckpointError::Source { path: path.to_path_buf(), source: e };
    }
    corrupt(path, format!("cannot read {what} ({e}); it is truncated or damaged"))
}

fn list_names(dir: &Path, prefix: &str, out: &mut Vec<String>) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = format!("{prefix}{}", entry.file_name().to_string_lossy());
        if entry.file_type()?.is_dir() {
            list_names(&entry.path(), &format!("{name}/"), out)?;
        } else {
            out.push(name);
        }
    }
    Ok(())
}

/// A folder for what a restore takes out of a checkpoint, in `scratch`: `.cedana-restore-PID-*`, named after this
/// process so that a later start sweeps it should this one be killed (see `engine::leftovers`).
fn restore_folder(scratch: &Path) -> Result<tempfile::TempDir, CheckpointError> {
    tempfile::Builder::new()
        .prefix(&crate::engine::leftovers::prefix(".cedana-restore-"))
        .tempdir_in(scratch)
        .map_err(CheckpointError::io(scratch))
}
