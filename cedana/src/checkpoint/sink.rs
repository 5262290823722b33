//! Where a checkpoint archive's bytes go, and how the archive is finished.
//!
//! The archive encoder (a tar stream through a codec, see [`super::writer`]) only writes bytes. An
//! [`ArchiveSink`] decides where they land and what finishing means: [`LocalFile`] writes a local file under a
//! hidden name and renames it into place; [`Stream`] writes to any byte stream (a pipe, a socket, memory).
//! Sinks that cannot overwrite what they wrote (streams) get every archive entry with its size known:
//! patching tar headers in later is an optimisation of sinks that can (a local file; an upload in parts that
//! keeps back the part holding the header), not an assumption of the format.

use std::fmt;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::direct::DirectWriter;
use super::writer::COMMIT_RESERVE;
use super::CheckpointError;

/// Where an archive's bytes go, and how the complete archive is made visible.
///
/// The checkpoint writer buffers in front of the sink (large writes, a few MiB each), so a sink writes through
/// as it is told. Writes may come from an encoder's thread; the writer serialises every call, so a write that
/// blocks also holds up `finish` or `abort` until it returns. Exactly one of [`ArchiveSink::finish`] and
/// [`ArchiveSink::abort`] ends a sink's life (a failed `finish` hands the sink back, to be aborted).
pub trait ArchiveSink: Write + Send {
    /// Where the finished archive will be: a path, or, for a sink that is not a local file, a label of the
    /// caller's choosing (a URL, `<stdout>`). Named in errors, and returned by [`ArchiveSink::finish`].
    fn location(&self) -> &Path;

    /// Where the bytes are while the archive is unfinished ([`LocalFile`]: its hidden temporary name).
    fn temp_location(&self) -> &Path {
        self.location()
    }

    /// Whether bytes already written may be overwritten later ([`ArchiveSink::patch`]): tar headers are then
    /// written in front of entries whose size is not known yet, and patched in once it is. `false` for
    /// streams.
    fn patchable(&self) -> bool {
        false
    }

    /// Whether this sink gathers small writes into large ones itself ([`LocalFile`]): the writer then keeps
    /// only a small buffer in front of it.
    fn stages_writes(&self) -> bool {
        false
    }

    /// Whether this sink takes bytes more slowly than a codec makes them (an upload): the encoder then runs
    /// fewer blocks ahead of it, which would only wait, holding memory.
    fn drains_slowly(&self) -> bool {
        false
    }

    /// The bytes from offset `at` on (written already, or still to come) will be overwritten by
    /// [`ArchiveSink::patch`] before the archive is finished: a sink that sends its bytes away as they come
    /// (an upload in parts) keeps back what holds them until then. Only called where
    /// [`ArchiveSink::patchable`].
    fn hold(&mut self, _at: u64) {}

    /// Overwrite `bytes.len()` bytes at offset `at`: bytes written already, from a range announced with
    /// [`ArchiveSink::hold`], which this releases. A patch is one tar header slot: at most 1024 bytes
    /// ([`crate::codec::units::header_slot`]).
    fn patch(&mut self, _at: u64, _bytes: &[u8]) -> io::Result<()> {
        Err(io::Error::new(io::ErrorKind::Unsupported, "this sink cannot overwrite what it wrote"))
    }

    /// The archive's last bytes (manifest, codec trailer) come next: give back what was held for them
    /// ([`LocalFile`]: its disk reserve).
    fn release_reserve(&mut self) {}

    /// Make the complete archive visible at [`ArchiveSink::location`] (a local file: the atomic rename; an
    /// object store: completing the multipart upload) and return where it is. On failure the sink comes back,
    /// unfinished, with the error.
    fn finish(self: Box<Self>) -> Result<PathBuf, Unfinished>;

    /// Give up: delete what was written or, with `keep` and where the sink can, leave it for the user.
    fn abort(self: Box<Self>, keep: bool);

    /// Whether [`ArchiveSink::abort`] with `keep` leaves what was written for the user (a local file). A
    /// dump into a sink that cannot finishes its checkpoint while the workload is still frozen, so that a
    /// failure can give the workload back instead of losing its images.
    fn keeps_unfinished(&self) -> bool {
        false
    }
}

/// A sink that could not be finished, and why: still to be aborted (or kept).
pub struct Unfinished {
    pub sink: Box<dyn ArchiveSink>,
    pub error: CheckpointError,
}

impl fmt::Debug for Unfinished {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Unfinished").field("location", &self.sink.location()).field("error", &self.error).finish()
    }
}

/// What a new checkpoint does about one already at its final name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Existing {
    /// Refuse (before anything is written, and again at the commit): never overwrite a checkpoint.
    #[default]
    Refuse,
    /// Replace it atomically at the commit: until the new checkpoint is complete the old one stays as it
    /// was, and a failed checkpoint leaves it untouched.
    Replace,
}

/// An archive in a local file: written under a hidden name (`.NAME.partial-PID`) beside the final one, with
/// [`COMMIT_RESERVE`] bytes of disk held back for the last writes, and renamed into place when finished;
/// optionally past the page cache ([`DirectWriter`]), and then on disk before the rename.
/// Dropped unfinished (or aborted without `keep`), it deletes what was written.
pub struct LocalFile {
    final_path: PathBuf,
    temp_path: PathBuf,
    file: DirectWriter,
    reserve: Option<DiskReserve>,
    existing: Existing,
    /// Finished, or aborted with `keep`: nothing to delete.
    settled: bool,
}

impl LocalFile {
    /// Start an archive that will appear at `final_path` once finished; refused if something is there.
    pub fn create(final_path: PathBuf) -> Result<Self, CheckpointError> {
        Self::create_with(final_path, Existing::Refuse, false)
    }

    /// Start an archive that will appear at `final_path` once finished, replacing a file there by an atomic
    /// rename at [`ArchiveSink::finish`] (the old file stays intact until then).
    pub fn replacing(final_path: PathBuf) -> Result<Self, CheckpointError> {
        Self::create_with(final_path, Existing::Replace, false)
    }

    /// Start an archive at `final_path`, doing `existing` about a checkpoint already there, past the page
    /// cache if `direct` (and the filesystem takes it).
    pub fn create_with(final_path: PathBuf, existing: Existing, direct: bool) -> Result<Self, CheckpointError> {
        let (temp_path, reserve) = hidden_place(&final_path, existing)?;
        let file = create_private(&temp_path).map_err(CheckpointError::io(&temp_path))?;
        let file = DirectWriter::new(file, direct);
        Ok(Self { final_path, temp_path, file, reserve, existing, settled: false })
    }
}

impl Write for LocalFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write_all(buf)?;
        Ok(buf.len())
    }
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.file.write_all(buf)
    }
    /// Staged bytes stay staged (patches reach them there); [`ArchiveSink::finish`] writes them out.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ArchiveSink for LocalFile {
    fn location(&self) -> &Path {
        &self.final_path
    }

    fn temp_location(&self) -> &Path {
        &self.temp_path
    }

    fn patchable(&self) -> bool {
        true
    }

    fn stages_writes(&self) -> bool {
        self.file.is_direct()
    }

    fn keeps_unfinished(&self) -> bool {
        true
    }

    fn patch(&mut self, at: u64, bytes: &[u8]) -> io::Result<()> {
        self.file.patch(at, bytes)
    }

    fn release_reserve(&mut self) {
        self.reserve = None;
    }

    fn finish(mut self: Box<Self>) -> Result<PathBuf, Unfinished> {
        self.reserve = None;
        // Every byte in the file (and, written directly, on disk) before the name says it is complete.
        let durable = match self.file.complete() {
            Ok(durable) => durable,
            Err(source) => {
                let error = CheckpointError::Io { path: self.temp_path.clone(), source };
                return Err(Unfinished { sink: self, error });
            }
        };
        // A rename would replace what appeared there meanwhile: never overwrite a checkpoint unless asked to.
        if self.existing == Existing::Refuse && self.final_path.symlink_metadata().is_ok() {
            let error = CheckpointError::Exists { path: self.final_path.clone() };
            return Err(Unfinished { sink: self, error });
        }
        // rename(2) replaces a file at the final name atomically (a folder there makes it fail, untouched).
        if let Err(source) = std::fs::rename(&self.temp_path, &self.final_path) {
            let error = CheckpointError::Io { path: self.final_path.clone(), source };
            return Err(Unfinished { sink: self, error });
        }
        self.settled = true;
        if durable {
            sync_parent(&self.final_path);
        }
        Ok(self.final_path.clone())
    }

    fn abort(mut self: Box<Self>, keep: bool) {
        if keep {
            if let Err(err) = self.file.drain() {
                tracing::warn!(path = %self.temp_path.display(), %err, "the kept checkpoint misses its last bytes");
            }
            tracing::warn!(path = %self.temp_path.display(), "unfinished checkpoint kept: the dumped process is gone");
            self.settled = true;
        }
    }
}

impl Drop for LocalFile {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        if let Err(err) = std::fs::remove_file(&self.temp_path) {
            if err.kind() != io::ErrorKind::NotFound {
                tracing::warn!(path = %self.temp_path.display(), %err, "could not remove an unfinished checkpoint");
            }
        }
    }
}

/// Make a rename into `path`'s folder durable (`fsync` of the folder); a failure is logged, the checkpoint
/// being complete under its name either way.
fn sync_parent(path: &Path) {
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if let Err(err) = File::open(parent).and_then(|d| d.sync_all()) {
        tracing::warn!(dir = %parent.display(), %err, "could not sync the checkpoint's folder");
    }
}

/// An archive written to any byte stream: a pipe, a socket, memory. Not seekable, so every entry goes in with
/// its size known. [`ArchiveSink::finish`] flushes the stream and then hands it to the hook set with
/// [`Stream::on_finish`], or closes it; [`ArchiveSink::abort`] closes it, and the reader at the other end sees
/// an archive cut short (without its manifest), which readers refuse.
pub struct Stream<W: Write + Send + 'static> {
    out: Option<W>,
    location: PathBuf,
    on_finish: Option<Box<dyn FnOnce(W) -> io::Result<()> + Send>>,
}

impl<W: Write + Send + 'static> Stream<W> {
    /// Write to `out`; `location` names the archive in errors and is what a commit returns.
    pub fn new(out: W, location: impl Into<PathBuf>) -> Self {
        Self { out: Some(out), location: location.into(), on_finish: None }
    }

    /// Once the archive is complete and flushed, hand the stream to `hook` (to take back a buffer, or to
    /// confirm delivery); its error fails the commit.
    pub fn on_finish(mut self, hook: impl FnOnce(W) -> io::Result<()> + Send + 'static) -> Self {
        self.on_finish = Some(Box::new(hook));
        self
    }

    fn out(&mut self) -> io::Result<&mut W> {
        self.out.as_mut().ok_or_else(|| io::Error::new(io::ErrorKind::BrokenPipe, "the archive stream was already handed over"))
    }
}

impl<W: Write + Send + 'static> Write for Stream<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out()?.write(buf)
    }
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.out()?.write_all(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.out()?.flush()
    }
}

impl<W: Write + Send + 'static> ArchiveSink for Stream<W> {
    fn location(&self) -> &Path {
        &self.location
    }

    fn finish(mut self: Box<Self>) -> Result<PathBuf, Unfinished> {
        let res = match self.out() {
            Ok(out) => out.flush(),
            Err(e) => Err(e),
        };
        let res = res.and_then(|()| match (self.out.take(), self.on_finish.take()) {
            (Some(out), Some(hook)) => hook(out),
            // Dropping the stream closes it: the reader sees the end of the archive.
            _ => Ok(()),
        });
        match res {
            Ok(()) => Ok(self.location.clone()),
            Err(source) => {
                let error = CheckpointError::Io { path: self.location.clone(), source };
                Err(Unfinished { sink: self, error })
            }
        }
    }

    fn abort(self: Box<Self>, _keep: bool) {}
}

/// Disk space held at a path (a preallocated file), released when dropped.
pub(crate) struct DiskReserve(PathBuf);

impl DiskReserve {
    /// Hold [`COMMIT_RESERVE`] bytes at `path`. `None` where the filesystem cannot preallocate; an error
    /// (before anything is dumped) when the disk has not even that much room.
    pub(crate) fn hold(path: &Path) -> Result<Option<Self>, CheckpointError> {
        use std::os::fd::AsRawFd;
        let file = create_private(path).map_err(CheckpointError::io(path))?;
        // SAFETY: posix_fallocate on a descriptor we own, with a valid length.
        let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, COMMIT_RESERVE as libc::off_t) };
        match rc {
            0 => Ok(Some(Self(path.to_path_buf()))),
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
}

impl Drop for DiskReserve {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Create the new file `path`, readable and writable by its owner alone (a checkpoint holds process memory).
/// Never through a symbolic link or into an existing file: a leftover of an earlier run under the same name
/// (a file or a link, never followed) is removed first. The folder may be a user's, written by root.
pub(crate) fn create_private(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let open = || std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path);
    match open() {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            std::fs::remove_file(path)?;
            open()
        }
        other => other,
    }
}

/// Create the new folder `path`, its owner's alone, as [`create_private`] creates files: whatever was left
/// under its name (a link, a file, a folder of an earlier run) is removed first, never followed.
pub(crate) fn create_private_dir(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let create = || std::fs::DirBuilder::new().mode(0o700).create(path);
    match create() {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            match std::fs::symlink_metadata(path)?.is_dir() {
                true => std::fs::remove_dir_all(path)?,
                false => std::fs::remove_file(path)?,
            }
            create()
        }
        other => other,
    }
}

/// The hidden temporary name of a checkpoint that will appear at `final_path` (`.NAME.partial-PID`, beside
/// it), with the disk reserve held for its last writes. Refused when something is at `final_path` already,
/// unless it is to be replaced.
pub(crate) fn hidden_place(final_path: &Path, existing: Existing) -> Result<(PathBuf, Option<DiskReserve>), CheckpointError> {
    if existing == Existing::Refuse && final_path.symlink_metadata().is_ok() {
        return Err(CheckpointError::Exists { path: final_path.to_path_buf() });
    }
    let parent = final_path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(CheckpointError::io(parent))?;
    let file_name = final_path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let temp_path = parent.join(format!(".{file_name}.partial-{}", std::process::id()));
    let reserve = DiskReserve::hold(&parent.join(format!(".{file_name}.reserve-{}", std::process::id())))?;
    Ok((temp_path, reserve))
}
