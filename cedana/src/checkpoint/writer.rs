//! Writing a checkpoint: images in, manifest last, then the checkpoint is made visible at once (a folder, or an
//! archive's [`ArchiveSink`]: for a local file, an atomic rename to the final name).

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::digest::{self, FileDigest, HashingReader};
use super::index::Trailer;
use super::manifest::{Manifest, Placed, MANIFEST_NAME};
use super::release::ReleasingReader;
use super::sink::{self, ArchiveSink, DiskReserve, Existing, LocalFile, Unfinished};
use super::CheckpointError;
use crate::cancel::Cancel;
use crate::codec::zlib_units::{self, Adler};
use crate::codec::{self, Compression, Encoder, UnitChecks};

type TarStream = tar::Builder<Box<dyn Encoder<BufWriter<SinkWriter>>>>;

/// An archive's byte stream: first any entries written before their size was known (each a series of
/// independent units, see [`codec::units`]), then a tar stream through one encoder.
enum Encoding {
    /// The sink itself, with the zero bytes that still pad the last entry to a tar block.
    Units {
        out: BufWriter<SinkWriter>,
        pad: usize,
    },
    Tar(TarStream),
    /// Between the two, or after a failure.
    Broken,
}

/// What a checkpoint is written to.
enum Target {
    /// A folder (`none`) under the hidden temporary name, renamed into place by the commit (exchanged with
    /// the checkpoint there, when it is to be replaced).
    Folder { reserve: Option<DiskReserve>, existing: Existing },
    /// An archive, through a sink that the writer alone finishes or aborts.
    Archive { sink: SharedSink, encoding: Encoding, patchable: bool },
}

const IO_BUFFER: usize = 1 << 20;

/// Disk space held back while a checkpoint is written and released for [`CheckpointWriter::commit`]: the
/// manifest and the codec's buffered tail (zstd's in-flight jobs, the output buffer) then still fit on a disk
/// that the images filled, once the dumped process may already be gone.
pub const COMMIT_RESERVE: u64 = 16 << 20;

/// A checkpoint being written. Until [`CheckpointWriter::commit`] it is not visible under its final name (a
/// local one lives under a hidden temporary name); dropping an uncommitted writer deletes what was written, so
/// a checkpoint is either complete or absent (unless [`CheckpointWriter::keep_if_unfinished`] was called: then
/// what was written stays for the user).
pub struct CheckpointWriter {
    final_path: PathBuf,
    temp_path: PathBuf,
    compression: Compression,
    target: Target,
    files: Vec<FileDigest>,
    /// Where the entries written before their size was known start in the archive.
    placed: Vec<Placed>,
    /// Where the tar stream after them starts (see [`super::index::Trailer`]), once it has.
    tail: Option<Trailer>,
    /// For zlib, whose stream carries one checksum over all its content (see [`codec::zlib_units`]).
    zlib: Option<Box<ZlibSum>>,
    committed: bool,
    keep: bool,
    release_sources: bool,
    cancel: Cancel,
}

impl std::fmt::Debug for CheckpointWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointWriter")
            .field("final_path", &self.final_path)
            .field("temp_path", &self.temp_path)
            .field("compression", &self.compression)
            .field("files", &self.files.len())
            .finish_non_exhaustive()
    }
}

impl CheckpointWriter {
    /// The path of checkpoint `name` in `dir` for this compression (`DIR/NAME.tar.zst`, or `DIR/NAME`).
    pub fn path_for(dir: &Path, name: &str, compression: Compression) -> PathBuf {
        match compression.extension() {
            Some(ext) => dir.join(format!("{name}.{ext}")),
            None => dir.join(name),
        }
    }

    /// Start writing a checkpoint that will appear at `final_path` once committed: an archive in a
    /// [`LocalFile`], or for `none` a folder. Refused if something is at `final_path` already.
    pub fn create(final_path: PathBuf, compression: Compression) -> Result<Self, CheckpointError> {
        Self::create_with(final_path, compression, Existing::Refuse, false)
    }

    /// Like [`CheckpointWriter::create`], but a checkpoint already at `final_path` is replaced by the commit,
    /// atomically: an archive by a rename over it, a folder by exchanging the two (then the old one is
    /// deleted). Until the commit, and after any failure, the old checkpoint stays exactly as it was.
    pub fn replacing(final_path: PathBuf, compression: Compression) -> Result<Self, CheckpointError> {
        Self::create_with(final_path, compression, Existing::Replace, false)
    }

    /// Start writing a checkpoint at `final_path`, doing `existing` about one already there; an archive past
    /// the page cache if `direct` ([`LocalFile`]).
    pub fn create_with(
        final_path: PathBuf,
        compression: Compression,
        existing: Existing,
        direct: bool,
    ) -> Result<Self, CheckpointError> {
        if compression.is_archive() {
            return Self::to_sink(Box::new(LocalFile::create_with(final_path, existing, direct)?), compression);
        }
        let (temp_path, reserve) = sink::hidden_place(&final_path, existing)?;
        // From here on, dropping the writer cleans up whatever was created.
        let writer = Self::new(final_path, temp_path, compression, Target::Folder { reserve, existing });
        sink::create_private_dir(&writer.temp_path).map_err(CheckpointError::io(&writer.temp_path))?;
        Ok(writer)
    }

    /// Start writing an archive in `compression` to `sink`, which the commit finishes (dropping the writer
    /// aborts it). A folder checkpoint (`none`) has no byte stream and is refused.
    pub fn to_sink(sink: Box<dyn ArchiveSink>, compression: Compression) -> Result<Self, CheckpointError> {
        let final_path = sink.location().to_path_buf();
        if !compression.is_archive() {
            sink.abort(false);
            let why = "a folder checkpoint (compression none) cannot go to an archive sink: use tar, gzip, lz4, zlib or zstd";
            return Err(CheckpointError::Io { path: final_path, source: io::Error::new(io::ErrorKind::InvalidInput, why) });
        }
        let temp_path = sink.temp_location().to_path_buf();
        let patchable = sink.patchable();
        // A sink that stages its writes itself needs no large buffer in front (only one for small writes).
        let capacity = if sink.stages_writes() { IO_BUFFER / 16 } else { 4 * IO_BUFFER };
        let sink = SharedSink(Arc::new(Mutex::new(Some(sink))));
        let mut out = BufWriter::with_capacity(capacity, SinkWriter { sink: sink.clone(), written: 0 });
        let zlib = (compression == Compression::Zlib).then(Box::default);
        if zlib.is_some() {
            // zlib's header opens the one deflate stream of the whole archive (in the buffer: nothing fails).
            out.write_all(&zlib_units::HEADER).map_err(CheckpointError::io(&temp_path))?;
        }
        let target = Target::Archive { sink, encoding: Encoding::Units { out, pad: 0 }, patchable };
        let mut writer = Self::new(final_path, temp_path, compression, target);
        writer.zlib = zlib;
        Ok(writer)
    }

    fn new(final_path: PathBuf, temp_path: PathBuf, compression: Compression, target: Target) -> Self {
        Self {
            final_path,
            temp_path,
            compression,
            target,
            files: Vec::new(),
            placed: Vec::new(),
            tail: None,
            zlib: None,
            committed: false,
            keep: false,
            release_sources: false,
            cancel: Cancel::new(),
        }
    }

    /// Stop at the next file or chunk once `cancel` is cancelled (with an I/O error "cancelled"); the live
    /// packer (see [`super::live`]) follows the same token.
    pub fn set_cancel(&mut self, cancel: Cancel) {
        self.cancel = cancel;
    }

    /// The token this writer stops on.
    pub fn cancel(&self) -> &Cancel {
        &self.cancel
    }

    /// For a folder checkpoint (`none`), the folder CRIU should write into, so images are not copied.
    pub fn in_place_dir(&self) -> Option<&Path> {
        matches!(self.target, Target::Folder { .. }).then_some(self.temp_path.as_path())
    }

    /// Where the checkpoint is written until it is committed: a hidden name beside the final one (for a sink
    /// that is not a local file, its location).
    pub fn temp_path(&self) -> &Path {
        &self.temp_path
    }

    /// Whether what was written can be kept when the checkpoint cannot be finished (see
    /// [`CheckpointWriter::keep_if_unfinished`]): a folder or a local file can, an upload cannot.
    pub fn keeps_unfinished(&self) -> bool {
        match &self.target {
            Target::Folder { .. } => true,
            Target::Archive { sink, .. } => sink.lock().as_ref().is_some_and(|s| s.keeps_unfinished()),
        }
    }

    /// From now on, do not delete what was written if the checkpoint cannot be finished: call it once the
    /// dumped process is gone, so its images are never thrown away.
    pub fn keep_if_unfinished(&mut self) {
        self.keep = true;
    }

    /// Free each source file's disk (and page cache) as soon as it has been read into an archive, so the
    /// archive reuses the memory the images held instead of memory the system has not touched lately (on a
    /// VM, several times slower to fill). Only for sources that are not needed if writing fails: images of a
    /// process that is still alive.
    pub fn release_sources_while_reading(&mut self) {
        self.release_sources = true;
    }

    /// Where the finished checkpoint will be (for a sink that is not a local file, its location).
    pub fn final_path(&self) -> &Path {
        &self.final_path
    }

    /// The files added so far.
    pub fn files(&self) -> &[FileDigest] {
        &self.files
    }

    /// Add every regular file under `src` (recursively, sorted) not added yet, hashing as it goes.
    /// `progress` receives the number of bytes processed after each chunk.
    pub fn add_tree(&mut self, src: &Path, progress: &dyn Fn(u64)) -> Result<(), CheckpointError> {
        for name in list_files(src).map_err(CheckpointError::io(src))? {
            // The manifest comes last, and entries already streamed in (see add_unsized) are not repeated.
            if name == MANIFEST_NAME || self.files.iter().any(|f| f.name == name) {
                continue;
            }
            if self.cancel.is_cancelled() {
                return Err(CheckpointError::Io { path: src.join(&name), source: cancelled() });
            }
            self.add_file(&src.join(&name), &name, progress)?;
        }
        Ok(())
    }

    /// Record digests computed elsewhere for files already in the in-place folder (see [`super::tail`]).
    pub fn add_in_place_digests(&mut self, digests: Vec<FileDigest>) {
        self.files.extend(digests);
    }

    /// Add one file from disk under `name`.
    pub fn add_file(&mut self, path: &Path, name: &str, progress: &dyn Fn(u64)) -> Result<(), CheckpointError> {
        let in_place = self.in_place_dir().map(|d| path.starts_with(d)).unwrap_or(false);
        let digest = if in_place {
            let digest = digest::digest_file(path, name).map_err(CheckpointError::io(path))?;
            progress(digest.size);
            digest
        } else {
            let source = ReleasingReader::open(path, self.release_sources).map_err(CheckpointError::io(path))?;
            let size = source.file.metadata().map_err(CheckpointError::io(path))?.len();
            let cancel = self.cancel.clone();
            let checked = ProgressReader { inner: source, progress, cancel: &cancel };
            let mut reader = BufReader::with_capacity(IO_BUFFER, HashingReader::new(checked));
            self.write_entry(name, size, &mut reader)?;
            reader.get_ref().hasher().finish(name)
        };
        self.files.push(digest);
        Ok(())
    }

    /// Add a file from memory.
    pub fn add_bytes(&mut self, name: &str, bytes: &[u8]) -> Result<(), CheckpointError> {
        let mut reader = HashingReader::new(bytes);
        self.write_entry(name, bytes.len() as u64, &mut reader)?;
        self.files.push(reader.hasher().finish(name));
        Ok(())
    }

    fn write_entry(&mut self, name: &str, size: u64, reader: &mut dyn Read) -> Result<(), CheckpointError> {
        if let Target::Folder { .. } = self.target {
            let dest = self.temp_path.join(name);
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent).map_err(CheckpointError::io(parent))?;
            }
            let mut out = sink::create_private(&dest).map_err(CheckpointError::io(&dest))?;
            copy_large(reader, &mut out).map_err(CheckpointError::io(&dest))?;
            return Ok(());
        }
        let res = self.tar()?.append_data(&mut entry_header(size), name, reader);
        res.map_err(|source| CheckpointError::Io { path: self.temp_path.clone(), source })?;
        if let Some(t) = &mut self.tail {
            t.tail_bytes += size;
        }
        Ok(())
    }

    /// Write the manifest (with the file list filled in) last, finish the stream and make the checkpoint
    /// visible under its final name (for an archive, [`ArchiveSink::finish`]). Returns where it is.
    pub fn commit(mut self, manifest: &mut Manifest) -> Result<PathBuf, CheckpointError> {
        self.release_reserve();
        manifest.files = self.files.clone();
        manifest.placement = self.placed.clone();
        manifest.compression = self.compression;
        let json = manifest.to_json();
        if let Target::Folder { existing, .. } = self.target {
            let path = self.temp_path.join(MANIFEST_NAME);
            sink::create_private(&path).and_then(|mut f| f.write_all(&json)).map_err(CheckpointError::io(&path))?;
            let taken = self.final_path.symlink_metadata().is_ok();
            match (taken, existing) {
                (true, Existing::Refuse) => return Err(CheckpointError::Exists { path: self.final_path.clone() }),
                (true, Existing::Replace) => {
                    replace_folder(&self.temp_path, &self.final_path).map_err(CheckpointError::io(&self.final_path))?
                }
                (false, _) => {
                    std::fs::rename(&self.temp_path, &self.final_path).map_err(CheckpointError::io(&self.final_path))?
                }
            }
            self.committed = true;
            return Ok(self.final_path.clone());
        }
        let res = self.tar()?.append_data(&mut entry_header(json.len() as u64), MANIFEST_NAME, &json[..]);
        res.map_err(CheckpointError::io(&self.temp_path))?;
        let temp = self.temp_path.as_path();
        let io_err = |source| CheckpointError::Io { path: temp.to_path_buf(), source };
        let Target::Archive { sink, encoding, .. } = &mut self.target else { return Err(io_err(not_an_archive())) };
        let Encoding::Tar(builder) = std::mem::replace(encoding, Encoding::Broken) else {
            return Err(io_err(unusable()));
        };
        let mut out = builder.into_inner().and_then(|enc| enc.finish()).map_err(io_err)?;
        if let Some(ZlibSum { adler, tail_checks: Some(checks) }) = self.zlib.as_deref_mut() {
            adler.append_units(checks);
        }
        // The index's trailer: a unit of its own at the very end, where a reader that seeks finds it (for
        // zlib, the stream's final block, followed by its checksum).
        if let Some(mut trailer) = self.tail {
            trailer.tail_bytes += json.len() as u64;
            let content = trailer.encode();
            if let Some(z) = &mut self.zlib {
                z.adler.update(&content);
            }
            if let Some(unit) = codec::units::closing_unit(self.compression, &content, self.zlib.as_ref().map(|z| z.adler)) {
                out.write_all(&unit).map_err(io_err)?;
            }
        }
        out.flush().map_err(io_err)?;
        drop(out);
        let Some(unfinished) = sink.take() else { return Err(io_err(abandoned())) };
        match unfinished.finish() {
            Ok(path) => {
                self.committed = true;
                Ok(path)
            }
            Err(Unfinished { sink: back, error }) => {
                // Dropping the writer aborts it (or keeps it, see keep_if_unfinished).
                sink.put_back(back);
                Err(error)
            }
        }
    }
}

impl CheckpointWriter {
    /// The archive's tar stream, started (after any entries written as units) on first use.
    fn tar(&mut self) -> Result<&mut TarStream, CheckpointError> {
        let temp = self.temp_path.as_path();
        let io_err = |source| CheckpointError::Io { path: temp.to_path_buf(), source };
        let Target::Archive { encoding, .. } = &mut self.target else { return Err(io_err(not_an_archive())) };
        if matches!(encoding, Encoding::Units { .. }) {
            if let Encoding::Units { out, pad } = std::mem::replace(encoding, Encoding::Broken) {
                if codec::units::supports_late_headers(self.compression) {
                    let offset = out.get_ref().written + out.buffer().len() as u64;
                    self.tail = Some(Trailer { tail_offset: offset, tail_pad: pad as u64, tail_bytes: 0 });
                }
                let mut enc = codec::tail_encoder(self.compression, out)?;
                if let Some(z) = &mut self.zlib {
                    z.tail_checks = enc.unit_checks();
                }
                // The last entry written as units still owes its padding to a whole tar block.
                enc.write_all(&[0u8; 512][..pad]).map_err(io_err)?;
                let mut builder = tar::Builder::new(enc);
                builder.mode(tar::HeaderMode::Deterministic);
                *encoding = Encoding::Tar(builder);
            }
        }
        match encoding {
            Encoding::Tar(builder) => Ok(builder),
            _ => Err(io_err(unusable())),
        }
    }

    /// Whether entries can still be written before their size is known ([`Self::add_unsized`]): only into an
    /// archive whose sink can patch what it wrote, in a format with units, before any other entry.
    pub fn accepts_unsized(&self) -> bool {
        matches!(self.target, Target::Archive { encoding: Encoding::Units { .. }, patchable: true, .. })
            && codec::units::supports_late_headers(self.compression)
    }

    /// Add an entry whose size is unknown until `reader` ends (a file still being written), without
    /// buffering it: its data is compressed as it comes, and its tar header goes into a slot reserved in
    /// front of it, written in place once the size is known. Only where [`Self::accepts_unsized`].
    pub fn add_unsized(&mut self, name: &str, reader: &mut dyn Read) -> Result<(), CheckpointError> {
        let temp = self.temp_path.as_path();
        let io_err = |source| CheckpointError::Io { path: temp.to_path_buf(), source };
        if !self.accepts_unsized() {
            let why = match self.target {
                Target::Archive { patchable: false, .. } => {
                    "an entry of unknown size needs a sink that can patch its header in (not a stream): add it once its size is known"
                }
                _ => "unsized entries must come first, in an archive (a folder has no entries of unknown size)",
            };
            return Err(io_err(io::Error::other(why)));
        }
        let Target::Archive { sink, encoding, .. } = &mut self.target else { return Err(io_err(not_an_archive())) };
        let Encoding::Units { mut out, pad } = std::mem::replace(encoding, Encoding::Broken) else {
            return Err(io_err(unusable()));
        };
        let c = self.compression;
        let slot = codec::units::header_slot(c);
        let unit = |content: &[u8], size| {
            codec::units::stored_unit(c, content, size).ok_or_else(|| io_err(io::Error::other("no room for a tar header")))
        };
        if pad > 0 {
            out.write_all(&unit(&[0u8; 512][..pad], None)?).map_err(io_err)?;
            if let Some(z) = &mut self.zlib {
                z.adler.update(&[0u8; 512][..pad]);
            }
        }
        // Where the slot starts: what reached the sink, and what is still buffered in front of it.
        let at = out.get_ref().written + out.buffer().len() as u64;
        let window = match sink.lock().as_mut() {
            Some(s) => {
                s.hold(at);
                if s.drains_slowly() {
                    codec::Window::Lean
                } else {
                    codec::Window::Full
                }
            }
            None => return Err(io_err(abandoned())),
        };
        // A placeholder of the slot's size (overwritten below), so the data lands after it.
        out.write_all(&unit(&[0u8; 512], Some(slot))?).map_err(io_err)?;
        let mut enc = codec::unit_encoder(c, out, window)?;
        let (unit_sizes, unit_hashes, unit_checks) = (enc.unit_sizes(), enc.unit_hashes(), enc.unit_checks());
        let mut reader = ProgressReader { inner: reader, progress: &|_| {}, cancel: &self.cancel };
        // The encoder's workers hash the units (one checksum chunk each) where it can; else the reader does.
        let (size, read_digest) = if unit_hashes.is_some() {
            (enc.copy_from(&mut reader).map_err(io_err)?, None)
        } else {
            let mut hashing = HashingReader::new(&mut reader);
            let size = enc.copy_from(&mut hashing).map_err(io_err)?;
            (size, Some(hashing.hasher().finish(name)))
        };
        let mut out = enc.finish().map_err(io_err)?;
        let digest = match (read_digest, unit_hashes) {
            (Some(digest), _) => digest,
            (None, hashes) => {
                let hashes = hashes.and_then(|h| h.lock().ok().map(|h| h.clone())).unwrap_or_default();
                super::digest::combine(name.to_string(), size, &hashes)
            }
        };
        let units = unit_sizes.and_then(|u| u.lock().ok().map(|u| u.clone())).unwrap_or_default();
        // The placeholder must have reached the file before it is overwritten.
        out.flush().map_err(io_err)?;
        let mut header = entry_header(size);
        header.set_path(name).map_err(io_err)?;
        header.set_cksum();
        let patch = unit(header.as_bytes(), Some(slot))?;
        if let Some(z) = &mut self.zlib {
            // In the stream's order: the header in its slot, then the data's units.
            z.adler.update(header.as_bytes());
            let checks = unit_checks.ok_or_else(|| io_err(io::Error::other("the zlib encoder kept no checksums")))?;
            z.adler.append_units(&checks);
        }
        match sink.lock().as_mut() {
            Some(s) => s.patch(at, &patch).map_err(io_err)?,
            None => return Err(io_err(abandoned())),
        }
        self.files.push(digest);
        self.placed.push(Placed { name: name.to_string(), offset: at, units });
        *encoding = Encoding::Units { out, pad: (512 - (size % 512) as usize) % 512 };
        Ok(())
    }

    fn release_reserve(&mut self) {
        match &mut self.target {
            Target::Folder { reserve, .. } => *reserve = None,
            Target::Archive { sink, .. } => {
                if let Some(s) = sink.lock().as_mut() {
                    s.release_reserve();
                }
            }
        }
    }
}

/// The tar header of a regular file of `size` bytes, readable by its owner only (the path and checksum are set
/// when it is written).
fn entry_header(size: u64) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_size(size);
    header.set_mode(0o600);
    header.set_entry_type(tar::EntryType::Regular);
    header
}

impl Drop for CheckpointWriter {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        match &mut self.target {
            Target::Folder { reserve, .. } => {
                *reserve = None;
                if self.keep {
                    tracing::warn!(path = %self.temp_path.display(), "unfinished checkpoint kept: the dumped process is gone");
                    return;
                }
                if let Err(err) = std::fs::remove_dir_all(&self.temp_path) {
                    if err.kind() != io::ErrorKind::NotFound {
                        tracing::warn!(path = %self.temp_path.display(), %err, "could not remove an unfinished checkpoint");
                    }
                }
            }
            Target::Archive { sink, encoding, .. } => {
                let encoding = std::mem::replace(encoding, Encoding::Broken);
                // To keep it, let what was written reach the sink first; else the sink goes first, so that
                // nothing more reaches it (an encoder thread still at work fails at its next write).
                let rest = if self.keep {
                    drain(encoding);
                    None
                } else {
                    Some(encoding)
                };
                if let Some(s) = sink.take() {
                    s.abort(self.keep);
                }
                drop(rest);
            }
        }
    }
}

/// Put the complete folder checkpoint `new` in place of the checkpoint at `old` (a folder or a file): the two
/// are exchanged atomically (`renameat2(RENAME_EXCHANGE)`), and the old one, now under the temporary name,
/// is deleted. Where the filesystem cannot exchange, the old one is first moved aside under a hidden name,
/// and moved back should the new one fail to take its place.
fn replace_folder(new: &Path, old: &Path) -> io::Result<()> {
    match exchange(new, old) {
        Ok(()) => {
            remove_quietly(new);
            Ok(())
        }
        // Gone meanwhile: nothing to replace.
        Err(e) if e.kind() == io::ErrorKind::NotFound && old.symlink_metadata().is_err() => std::fs::rename(new, old),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS)) => {
            let name = old.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let aside = old.with_file_name(format!(".{name}.old-{}", std::process::id()));
            std::fs::rename(old, &aside)?;
            if let Err(e) = std::fs::rename(new, old) {
                // Put the old checkpoint back: a failed commit leaves it as it was.
                let _ = std::fs::rename(&aside, old);
                return Err(e);
            }
            remove_quietly(&aside);
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Exchange the entries at `a` and `b` atomically.
fn exchange(a: &Path, b: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c =
        |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e));
    let (a, b) = (c(a)?, c(b)?);
    // SAFETY: two valid NUL-terminated paths, relative to the current folder.
    let rc = unsafe { libc::renameat2(libc::AT_FDCWD, a.as_ptr(), libc::AT_FDCWD, b.as_ptr(), libc::RENAME_EXCHANGE) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Delete a replaced checkpoint (a folder or a file); the new one is in place already, so a failure is only
/// logged.
fn remove_quietly(path: &Path) {
    let res = match path.symlink_metadata() {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(_) => Ok(()),
    };
    if let Err(err) = res {
        tracing::warn!(path = %path.display(), %err, "could not delete the replaced checkpoint");
    }
}

/// Push everything an abandoned archive stream holds to its sink (the encoder's buffers, the output buffer).
fn drain(encoding: Encoding) {
    let out = match encoding {
        Encoding::Units { out, .. } => Some(out),
        Encoding::Tar(builder) => builder.into_inner().and_then(|enc| enc.finish()).ok(),
        Encoding::Broken => None,
    };
    if let Some(mut out) = out {
        let _ = out.flush();
    }
}

/// The checksum of a zlib archive's one stream: the adler32 of what was written so far outside the tar
/// stream's encoder, and that encoder's per-unit checks, added at the end.
#[derive(Default)]
struct ZlibSum {
    adler: Adler,
    tail_checks: Option<UnitChecks>,
}

/// The writer's hold on its archive sink, shared with the [`SinkWriter`] the encoder writes to (from
/// whichever thread): the writer alone takes the sink out, to finish or abort it, and an encoder left behind
/// by an error then fails at its next write.
#[derive(Clone)]
struct SharedSink(Arc<Mutex<Option<Box<dyn ArchiveSink>>>>);

impl SharedSink {
    fn lock(&self) -> MutexGuard<'_, Option<Box<dyn ArchiveSink>>> {
        // A panic in another writing thread leaves the sink no worse than a failed write does.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn take(&self) -> Option<Box<dyn ArchiveSink>> {
        self.lock().take()
    }

    fn put_back(&self, sink: Box<dyn ArchiveSink>) {
        *self.lock() = Some(sink);
    }
}

/// The sink as the encoder sees it: writes go straight through (behind the writer's buffer), counted.
struct SinkWriter {
    sink: SharedSink,
    /// Bytes that reached the sink: the position of the next one.
    written: u64,
}

impl Write for SinkWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.sink.lock().as_mut().ok_or_else(abandoned)?.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.sink.lock().as_mut().ok_or_else(abandoned)?.write_all(buf)?;
        self.written += buf.len() as u64;
        Ok(())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.sink.lock().as_mut().ok_or_else(abandoned)?.flush()
    }
}

/// The error of an operation stopped by its [`Cancel`] token.
fn cancelled() -> io::Error {
    io::Error::other("cancelled")
}

fn abandoned() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "the archive's sink was already finished or abandoned")
}

fn unusable() -> io::Error {
    io::Error::other("the archive was left unusable by an earlier error")
}

fn not_an_archive() -> io::Error {
    io::Error::other("a folder checkpoint has no archive stream")
}

/// A source read into the checkpoint: reports progress, and stops once the operation is cancelled.
struct ProgressReader<'a, R> {
    inner: R,
    progress: &'a dyn Fn(u64),
    cancel: &'a Cancel,
}

impl<R: Read> Read for ProgressReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.cancel.is_cancelled() {
            return Err(cancelled());
        }
        let n = self.inner.read(buf)?;
        (self.progress)(n as u64);
        Ok(n)
    }
}

/// Copy with a large buffer (std's 8 KiB buffer costs a lot of syscalls on gigabytes of pages).
pub(crate) fn copy_large(reader: &mut dyn Read, writer: &mut dyn Write) -> io::Result<u64> {
    codec::copy_in_pieces(reader, &mut |piece| writer.write_all(piece))
}

/// Regular files under `dir`, relative, `/`-separated, sorted.
pub(crate) fn list_files(dir: &Path) -> io::Result<Vec<String>> {
    fn walk(dir: &Path, prefix: &str, out: &mut Vec<String>) -> io::Result<()> {
        let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let name = format!("{prefix}{}", entry.file_name().to_string_lossy());
            let kind = entry.file_type()?;
            if kind.is_dir() {
                walk(&entry.path(), &format!("{name}/"), out)?;
            } else if kind.is_file() {
                out.push(name);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, "", &mut out)?;
    Ok(out)
}
