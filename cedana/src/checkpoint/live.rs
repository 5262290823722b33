//! Packing page images into an archive while CRIU is still writing them.
//!
//! A thread watches the images folder (inotify), and streams each page image (`pages-*.img`, nearly all of a
//! checkpoint's bytes) into the archive as CRIU writes it, entry by entry in the order CRIU creates them,
//! through [`CheckpointWriter::add_unsized`]. What has been packed is punched out of the staged file, so the
//! staging folder never holds much more than CRIU's small images. When CRIU is done, only the tail of the
//! last page image and the small images are left to pack, while CRIU keeps the process frozen.

use std::collections::{HashSet, VecDeque};
use std::io::{self, Read};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

use super::release::ReleasingReader;
use super::{is_page_image, CheckpointError, CheckpointWriter};
use crate::cancel::Cancel;
use crate::progress::Advancer;

/// How long a reader waits for news of the folder before it looks at its flags again.
const WAIT: Duration = Duration::from_millis(20);

#[derive(Default)]
struct Flags {
    /// CRIU has written and closed every image.
    criu_done: AtomicBool,
    /// Give up (CRIU failed): drop the writer, which deletes what was written.
    stop: AtomicBool,
}

/// Streams page images into a writer while CRIU writes them; [`LivePacker::finish`] hands the writer back.
pub struct LivePacker {
    flags: Arc<Flags>,
    handle: Option<JoinHandle<Result<CheckpointWriter, CheckpointError>>>,
}

impl LivePacker {
    /// Start following `dir` (before CRIU writes anything there). `writer` must accept unsized entries;
    /// `advance` hears of every byte packed. The packer stops once the writer's [`CheckpointWriter::cancel`]
    /// token is cancelled. On failure the writer comes back with the error, to be used the ordinary way.
    pub fn start(
        writer: CheckpointWriter,
        dir: &Path,
        advance: Option<Advancer>,
    ) -> Result<Self, Box<(CheckpointWriter, io::Error)>> {
        let watch = match Watch::new(dir) {
            Ok(w) => w,
            Err(e) => return Err(Box::new((writer, e))),
        };
        let flags = Arc::new(Flags::default());
        let shared = Arc::clone(&flags);
        // The writer goes over a channel once the thread runs, so a failed spawn still has it to give back.
        let (hand_over, receive) = std::sync::mpsc::sync_channel::<CheckpointWriter>(1);
        let spawned = std::thread::Builder::new().name("live-pack".into()).spawn(move || match receive.recv() {
            Ok(writer) => pack(writer, watch, &shared, advance.as_deref()),
            Err(_) => Err(CheckpointError::LivePacking("no writer was handed over")),
        });
        match spawned {
            Ok(handle) => {
                // The receiver waits in the thread just started: this cannot fail unless it died.
                if let Err(std::sync::mpsc::SendError(writer)) = hand_over.send(writer) {
                    return Err(Box::new((writer, io::Error::other("the live packer thread ended early"))));
                }
                Ok(Self { flags, handle: Some(handle) })
            }
            Err(e) => Err(Box::new((writer, e))),
        }
    }

    /// CRIU has closed every image: pack what is left of the page images and return the writer.
    pub fn finish(mut self) -> Result<CheckpointWriter, CheckpointError> {
        self.flags.criu_done.store(true, Ordering::SeqCst);
        match self.handle.take().map(JoinHandle::join) {
            Some(Ok(res)) => res,
            _ => Err(CheckpointError::LivePacking("the packing thread panicked")),
        }
    }
}

impl Drop for LivePacker {
    fn drop(&mut self) {
        self.flags.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// A writer, possibly still inside a [`LivePacker`].
pub enum Packing {
    Ready(Box<CheckpointWriter>),
    Live(LivePacker),
    /// The live packer failed; its error was returned once.
    Failed,
}

impl Packing {
    /// Pack page images live where the writer can (an archive of a format with units, to a sink that can patch headers in:
    /// see [`CheckpointWriter::accepts_unsized`]), else not: they then go in after CRIU is done.
    pub fn start(writer: CheckpointWriter, images_dir: &Path, advance: Option<Advancer>) -> Self {
        if !writer.accepts_unsized() {
            return Packing::Ready(Box::new(writer));
        }
        match LivePacker::start(writer, images_dir, advance) {
            Ok(p) => Packing::Live(p),
            Err(failed) => {
                let (writer, e) = *failed;
                tracing::warn!(%e, "page images will be packed after CRIU is done");
                Packing::Ready(Box::new(writer))
            }
        }
    }

    /// The writer, once the live packer (if any) has finished: call it when CRIU has closed every image.
    pub fn writer(&mut self) -> Result<&mut CheckpointWriter, CheckpointError> {
        if let Packing::Live(_) = self {
            let Packing::Live(packer) = std::mem::replace(self, Packing::Failed) else { unreachable!("matched above") };
            *self = Packing::Ready(Box::new(packer.finish()?));
        }
        match self {
            Packing::Ready(w) => Ok(w),
            _ => Err(CheckpointError::LivePacking("the checkpoint writer failed earlier")),
        }
    }

    /// The writer, for its commit.
    pub fn into_writer(mut self) -> Result<CheckpointWriter, CheckpointError> {
        self.writer()?;
        match self {
            Packing::Ready(w) => Ok(*w),
            _ => unreachable!("writer() leaves a ready writer or fails"),
        }
    }
}

fn pack(
    mut writer: CheckpointWriter,
    mut watch: Watch,
    flags: &Flags,
    advance: Option<&(dyn Fn(u64) + Send + Sync)>,
) -> Result<CheckpointWriter, CheckpointError> {
    let io_err = |dir: &Path, source| CheckpointError::Io { path: dir.to_path_buf(), source };
    // The writer's token, shared with whoever cancels the operation.
    let cancel = writer.cancel().clone();
    loop {
        if let Some(name) = watch.queue.pop_front() {
            let path = watch.dir.join(&name);
            let inner = match ReleasingReader::open(&path, true) {
                Ok(r) => r,
                // Created and removed again by CRIU: not part of the checkpoint.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(CheckpointError::Io { path, source: e }),
            };
            let mut reader = GrowingFile { inner, name: name.clone(), watch: &mut watch, flags, cancel: &cancel, advance };
            writer.add_unsized(&name, &mut reader)?;
            tracing::debug!(name, "page image packed while CRIU ran");
            continue;
        }
        let done = flags.criu_done.load(Ordering::SeqCst);
        watch.wait(if done { Duration::ZERO } else { WAIT }).map_err(|e| io_err(&watch.dir, e))?;
        if watch.queue.is_empty() && done {
            return Ok(writer);
        }
        if flags.stop.load(Ordering::SeqCst) {
            return Err(io_err(&watch.dir, io::Error::other("stopped")));
        }
        if cancel.is_cancelled() {
            return Err(io_err(&watch.dir, io::Error::other("cancelled")));
        }
    }
}

/// The page images created in a folder, in order, and which of them CRIU has closed.
struct Watch {
    dir: PathBuf,
    inotify: Inotify,
    queue: VecDeque<String>,
    closed: HashSet<String>,
}

impl Watch {
    fn new(dir: &Path) -> io::Result<Self> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        let mask = AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MODIFY | AddWatchFlags::IN_CLOSE_WRITE;
        inotify.add_watch(dir, mask)?;
        let mut queue: Vec<String> = std::fs::read_dir(dir)?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| is_page_image(n))
            .collect();
        queue.sort();
        Ok(Self { dir: dir.to_path_buf(), inotify, queue: queue.into(), closed: HashSet::new() })
    }

    /// Wait up to `timeout` for events, and take them in.
    fn wait(&mut self, timeout: Duration) -> io::Result<()> {
        let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(self.inotify.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
        loop {
            let events = match self.inotify.read_events() {
                Ok(ev) => ev,
                Err(nix::errno::Errno::EAGAIN) => return Ok(()),
                Err(e) => return Err(e.into()),
            };
            for ev in events {
                let Some(name) = ev.name.map(|n| n.to_string_lossy().into_owned()) else { continue };
                if !is_page_image(&name) {
                    continue;
                }
                if ev.mask.contains(AddWatchFlags::IN_CREATE) && !self.queue.contains(&name) {
                    self.queue.push_back(name.clone());
                }
                if ev.mask.contains(AddWatchFlags::IN_CLOSE_WRITE) {
                    self.closed.insert(name);
                }
            }
        }
    }
}

/// A page image as CRIU writes it: reads block until more data lands, and end when CRIU has closed it.
struct GrowingFile<'a> {
    inner: ReleasingReader,
    name: String,
    watch: &'a mut Watch,
    flags: &'a Flags,
    cancel: &'a Cancel,
    advance: Option<&'a (dyn Fn(u64) + Send + Sync)>,
}

impl Read for GrowingFile<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.flags.stop.load(Ordering::SeqCst) {
                return Err(io::Error::other("stopped"));
            }
            if self.cancel.is_cancelled() {
                return Err(io::Error::other("cancelled"));
            }
            // Seen closed before the read: then the read sees everything CRIU wrote.
            let complete = self.watch.closed.contains(&self.name) || self.flags.criu_done.load(Ordering::SeqCst);
            let n = self.inner.read(buf)?;
            if let Some(advance) = self.advance.filter(|_| n > 0) {
                advance(n as u64);
            }
            if n > 0 || complete {
                return Ok(n);
            }
            self.watch.wait(WAIT)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::io::Write;

    use super::*;
    use crate::codec::Compression;

    /// A scratch folder with an empty `images` folder, and a writer of an archive in `c` beside it.
    fn staging(c: Compression) -> (tempfile::TempDir, PathBuf, CheckpointWriter) {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("images");
        std::fs::create_dir(&images).unwrap();
        let writer = CheckpointWriter::create(CheckpointWriter::path_for(dir.path(), "ckpt", c), c).unwrap();
        (dir, images, writer)
    }

    #[test]
    fn page_images_written_while_followed_end_up_whole_in_the_archive() {
        let (dir, images, writer) = staging(Compression::Zstd);
        let packed = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = Arc::clone(&packed);
        let advance: Advancer = Box::new(move |n| {
            counter.fetch_add(n, Ordering::SeqCst);
        });
        let mut packing = Packing::start(writer, &images, Some(advance));
        assert!(matches!(packing, Packing::Live(_)));
        // Two page images written in bursts, as CRIU would, and a small image.
        let mut want = Vec::new();
        for (i, name) in ["pages-1.img", "pages-2.img"].iter().enumerate() {
            let mut f = File::create(images.join(name)).unwrap();
            let mut content = Vec::new();
            for burst in 0..20u32 {
                let block: Vec<u8> = (0..100_000u32).map(|j| (j * (burst + 1) + i as u32) as u8).collect();
                f.write_all(&block).unwrap();
                content.extend(block);
                std::thread::sleep(Duration::from_millis(2));
            }
            want.push((name.to_string(), content));
        }
        std::fs::write(images.join("core-1.img"), b"core").unwrap();
        let writer = packing.writer().unwrap();
        assert_eq!(writer.files().len(), 2, "both page images were streamed");
        assert_eq!(packed.load(Ordering::SeqCst), 2 * 20 * 100_000, "progress heard of every byte");
        // Packed bytes were punched out of the staged files (they read back as zeros now).
        assert!(std::fs::read(images.join("pages-1.img")).unwrap().iter().all(|b| *b == 0));
        // The rest goes in as usual, page images are not added twice.
        std::fs::write(images.join("pages-1.img"), b"must not be packed again").unwrap();
        writer.add_tree(&images, &|_| {}).unwrap();
        let path = packing.into_writer().unwrap().commit(&mut crate::checkpoint::tests::manifest()).unwrap();
        let opened = crate::checkpoint::OpenedCheckpoint::open(&path, &dir.path().join("scratch"), &|_| {}).unwrap();
        assert_eq!(opened.manifest.files.len(), 3);
        for (name, content) in want {
            assert!(std::fs::read(opened.images_dir.join(&name)).unwrap() == content, "{name}");
        }
    }

    #[test]
    fn a_stopped_packer_leaves_nothing() {
        let (dir, images, writer) = staging(Compression::Lz4);
        let packing = Packing::start(writer, &images, None);
        // A page image CRIU never closes (it failed mid-way).
        let mut open = File::create(images.join("pages-1.img")).unwrap();
        open.write_all(&vec![1u8; 1 << 20]).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        drop(packing);
        drop(open);
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(left, vec![std::ffi::OsString::from("images")]);
    }
}
