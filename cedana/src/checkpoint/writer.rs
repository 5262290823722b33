//! Writing a checkpoint: images in, manifest last, then an atomic rename to the final name.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use super::digest::{self, FileDigest, HashingReader};
use super::manifest::{Manifest, MANIFEST_NAME};
use super::release::ReleasingReader;
use super::CheckpointError;
use crate::codec::{self, Compression, Encoder};

type ArchiveSink = tar::Builder<Box<dyn Encoder<BufWriter<File>>>>;

/// An archive being written: first any entries written before their size was known (each a series of
/// independent units, see [`codec::units`]), then a tar stream through one encoder.
enum Archive {
    /// The file itself, with the zero bytes that still pad the last entry to a tar block.
    Units {
        out: BufWriter<File>,
        pad: usize,
    },
    Tar(ArchiveSink),
    /// Between the two, or after a failure.
    Broken,
}

const IO_BUFFER: usize = 1 << 20;

/// Disk space held back while a checkpoint is written and released for [`CheckpointWriter::commit`]: the
/// manifest and the codec's buffered tail (zstd's in-flight jobs, the output buffer) then still fit on a disk
/// that the images filled, once the dumped process may already be gone.
pub const COMMIT_RESERVE: u64 = 16 << 20;

/// A checkpoint being written. Until [`CheckpointWriter::commit`] it lives under a hidden temporary name;
/// dropping an uncommitted writer deletes it, so a checkpoint is either complete or absent (unless
/// [`CheckpointWriter::keep_if_unfinished`] was called: then what was written stays for the user).
pub struct CheckpointWriter {
    final_path: PathBuf,
    temp_path: PathBuf,
    reserve: Option<PathBuf>,
    compression: Compression,
    archive: Option<Archive>,
    files: Vec<FileDigest>,
    committed: bool,
    keep: bool,
    release_sources: bool,
}

impl CheckpointWriter {
    /// The path of checkpoint `name` in `dir` for this compression (`DIR/NAME.tar.zst`, or `DIR/NAME`).
    pub fn path_for(dir: &Path, name: &str, compression: Compression) -> PathBuf {
        match compression.extension() {
            Some(ext) => dir.join(format!("{name}.{ext}")),
            None => dir.join(name),
        }
    }

    /// Start writing a checkpoint that will appear at `final_path` once committed.
    pub fn create(final_path: PathBuf, compression: Compression) -> Result<Self, CheckpointError> {
        if final_path.symlink_metadata().is_ok() {
            return Err(CheckpointError::Exists { path: final_path });
        }
        let parent = final_path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).map_err(CheckpointError::io(parent))?;
        let file_name = final_path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let temp_path = parent.join(format!(".{file_name}.partial-{}", std::process::id()));
        let reserve = reserve_space(&parent.join(format!(".{file_name}.reserve-{}", std::process::id())))?;
        // From here on, dropping the writer cleans up whatever was created.
        let mut writer = Self {
            final_path,
            temp_path,
            reserve,
            compression,
            archive: None,
            files: Vec::new(),
            committed: false,
            keep: false,
            release_sources: false,
        };
        let temp = writer.temp_path.clone();
        if compression.is_archive() {
            let file = File::create(&temp).map_err(CheckpointError::io(&temp))?;
            writer.archive = Some(Archive::Units { out: BufWriter::with_capacity(4 * IO_BUFFER, file), pad: 0 });
        } else {
            std::fs::create_dir(&temp).map_err(CheckpointError::io(&temp))?;
        }
        Ok(writer)
    }

    /// For a folder checkpoint (`none`), the folder CRIU should write into, so images are not copied.
    pub fn in_place_dir(&self) -> Option<&Path> {
        self.archive.is_none().then_some(self.temp_path.as_path())
    }

    /// The hidden name the checkpoint is written under until it is committed.
    pub fn temp_path(&self) -> &Path {
        &self.temp_path
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

    /// Where the finished checkpoint will be.
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
            if crate::interrupt::requested() {
                return Err(CheckpointError::Io { path: src.join(&name), source: io::Error::other("interrupted by a signal") });
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
            let mut reader = BufReader::with_capacity(IO_BUFFER, HashingReader::new(ProgressReader { inner: source, progress }));
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
        if self.archive.is_none() {
            let dest = self.temp_path.join(name);
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent).map_err(CheckpointError::io(parent))?;
            }
            let mut out = File::create(&dest).map_err(CheckpointError::io(&dest))?;
            copy_large(reader, &mut out).map_err(CheckpointError::io(&dest))?;
            return Ok(());
        }
        let temp = self.temp_path.clone();
        self.tar()?.append_data(&mut entry_header(size), name, reader).map_err(CheckpointError::io(&temp))
    }

    /// Write the manifest (with the file list filled in) last, finish the stream and move the checkpoint
    /// to its final name. Returns the final path.
    pub fn commit(mut self, manifest: &mut Manifest) -> Result<PathBuf, CheckpointError> {
        self.release_reserve();
        manifest.files = self.files.clone();
        manifest.compression = self.compression;
        let json = manifest.to_json();
        if self.archive.is_some() {
            let temp = self.temp_path.clone();
            let mut header = entry_header(json.len() as u64);
            self.tar()?.append_data(&mut header, MANIFEST_NAME, &json[..]).map_err(CheckpointError::io(&temp))?;
            let Some(Archive::Tar(builder)) = self.archive.take() else {
                unreachable!("tar() leaves a tar stream in place or fails")
            };
            let enc = builder.into_inner().map_err(CheckpointError::io(&temp))?;
            let mut out = enc.finish().map_err(CheckpointError::io(&temp))?;
            out.flush().map_err(CheckpointError::io(&temp))?;
        } else {
            let path = self.temp_path.join(MANIFEST_NAME);
            std::fs::write(&path, &json).map_err(CheckpointError::io(&path))?;
        }
        if self.final_path.symlink_metadata().is_ok() {
            return Err(CheckpointError::Exists { path: self.final_path.clone() });
        }
        std::fs::rename(&self.temp_path, &self.final_path).map_err(CheckpointError::io(&self.final_path))?;
        self.committed = true;
        Ok(self.final_path.clone())
    }
}

impl CheckpointWriter {
    /// The archive's tar stream, started (after any entries written as units) on first use.
    fn tar(&mut self) -> Result<&mut ArchiveSink, CheckpointError> {
        let temp = self.temp_path.clone();
        if let Some(Archive::Units { .. }) = self.archive {
            let Some(Archive::Units { out, pad }) = self.archive.replace(Archive::Broken) else {
                unreachable!("matched just above")
            };
            let mut enc = codec::encoder(self.compression, out)?;
            // The last entry written as units still owes its padding to a whole tar block.
            enc.write_all(&[0u8; 512][..pad]).map_err(CheckpointError::io(&temp))?;
            let mut builder = tar::Builder::new(enc);
            builder.mode(tar::HeaderMode::Deterministic);
            self.archive = Some(Archive::Tar(builder));
        }
        match &mut self.archive {
            Some(Archive::Tar(builder)) => Ok(builder),
            _ => Err(CheckpointError::Io {
                path: temp,
                source: io::Error::other("the archive was left unusable by an earlier error"),
            }),
        }
    }

    /// Whether entries can still be written before their size is known ([`Self::add_unsized`]).
    pub fn accepts_unsized(&self) -> bool {
        matches!(self.archive, Some(Archive::Units { .. })) && codec::units::supports_late_headers(self.compression)
    }

    /// Add an entry whose size is unknown until `reader` ends (a file still being written), without
    /// buffering it: its data is compressed as it comes, and its tar header goes into a slot reserved in
    /// front of it. Only before any other entry (see [`Self::accepts_unsized`]).
    pub fn add_unsized(&mut self, name: &str, reader: &mut dyn Read) -> Result<(), CheckpointError> {
        use std::io::Seek;
        use std::os::unix::fs::FileExt;
        let temp = self.temp_path.clone();
        if !self.accepts_unsized() {
            return Err(CheckpointError::Io { path: temp, source: io::Error::other("unsized entries must come first") });
        }
        let Some(Archive::Units { mut out, pad }) = self.archive.replace(Archive::Broken) else {
            unreachable!("accepts_unsized checked the state")
        };
        let c = self.compression;
        let slot = codec::units::header_slot(c);
        let unit = |content: &[u8], size| {
            codec::units::stored_unit(c, content, size)
                .ok_or_else(|| CheckpointError::Io { path: temp.clone(), source: io::Error::other("no room for a tar header") })
        };
        if pad > 0 {
            out.write_all(&unit(&[0u8; 512][..pad], None)?).map_err(CheckpointError::io(&temp))?;
        }
        let at = out.stream_position().map_err(CheckpointError::io(&temp))?;
        // A placeholder of the slot's size (overwritten below), so the data lands after it.
        out.write_all(&unit(&[0u8; 512], Some(slot))?).map_err(CheckpointError::io(&temp))?;
        let mut enc = codec::encoder(c, out)?;
        let mut hashing = HashingReader::new(reader);
        let size = copy_large(&mut hashing, &mut enc).map_err(CheckpointError::io(&temp))?;
        let mut out = enc.finish().map_err(CheckpointError::io(&temp))?;
        out.flush().map_err(CheckpointError::io(&temp))?;
        let mut header = entry_header(size);
        header.set_path(name).map_err(CheckpointError::io(&temp))?;
        header.set_cksum();
        out.get_ref().write_all_at(&unit(header.as_bytes(), Some(slot))?, at).map_err(CheckpointError::io(&temp))?;
        self.files.push(hashing.hasher().finish(name));
        self.archive = Some(Archive::Units { out, pad: (512 - (size % 512) as usize) % 512 });
        Ok(())
    }

    fn release_reserve(&mut self) {
        if let Some(path) = self.reserve.take() {
            let _ = std::fs::remove_file(path);
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

/// Hold [`COMMIT_RESERVE`] bytes at `path`. `None` where the filesystem cannot preallocate; an error (before
/// anything is dumped) when the disk has not even that much room.
fn reserve_space(path: &Path) -> Result<Option<PathBuf>, CheckpointError> {
    use std::os::fd::AsRawFd;
    let file = File::create(path).map_err(CheckpointError::io(path))?;
    // SAFETY: posix_fallocate on a descriptor we own, with a valid length.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, COMMIT_RESERVE as libc::off_t) };
    match rc {
        0 => Ok(Some(path.to_path_buf())),
        libc::EOPNOTSUPP | libc::EINVAL => {
            let _ = std::fs::remove_file(path);
            Ok(None)
        }
        errno => {
            let _ = std::fs::remove_file(path);
            if errno == libc::ENOSPC {
                let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
                return Err(CheckpointError::NoSpace { dir });
            }
            Err(CheckpointError::Io { path: path.to_path_buf(), source: io::Error::from_raw_os_error(errno) })
        }
    }
}

impl Drop for CheckpointWriter {
    fn drop(&mut self) {
        self.release_reserve();
        if self.committed {
            return;
        }
        drop(self.archive.take());
        if self.keep {
            tracing::warn!(path = %self.temp_path.display(), "unfinished checkpoint kept: the dumped process is gone");
            return;
        }
        let res = if self.temp_path.is_dir() {
            std::fs::remove_dir_all(&self.temp_path)
        } else {
            std::fs::remove_file(&self.temp_path)
        };
        if let Err(err) = res {
            if err.kind() != io::ErrorKind::NotFound {
                tracing::warn!(path = %self.temp_path.display(), %err, "could not remove an unfinished checkpoint");
            }
        }
    }
}

struct ProgressReader<'a, R> {
    inner: R,
    progress: &'a dyn Fn(u64),
}

impl<R: Read> Read for ProgressReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if crate::interrupt::requested() {
            return Err(io::Error::other("interrupted by a signal"));
        }
        let n = self.inner.read(buf)?;
        (self.progress)(n as u64);
        Ok(n)
    }
}

/// Copy with a large buffer (std's 8 KiB buffer costs a lot of syscalls on gigabytes of pages).
pub(crate) fn copy_large(reader: &mut dyn Read, writer: &mut dyn Write) -> io::Result<u64> {
    let mut buf = vec![0u8; IO_BUFFER];
    let mut total = 0;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        writer.write_all(&buf[..n])?;
        total += n as u64;
    }
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
