//! Streamed dumps: CRIU writes every image into a pipe of ours (`criu dump --stream`) and nothing touches
//! the disk but the archive. A page image goes straight through the codec into the archive as it comes (an
//! entry whose size is not known yet, see [`CheckpointWriter::add_unsized`]); the other images, small, are
//! held in memory and added when CRIU is done (at `post-dump`, while the tree is still frozen).

use std::io::{self, Read};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::checkpoint::{is_page_image, CheckpointError, CheckpointWriter};
use crate::codec::{self, Compression};
use crate::criu::streamer::capture::{Capture, ImageReceiver};
use crate::engine::EngineError;
use crate::progress::Advancer;

/// How long `post-dump` waits for images still in flight (the tails of pipes CRIU has already closed).
const SETTLE_TIMEOUT: Duration = Duration::from_secs(120);

/// Whether a dump in `compression` can be streamed into this writer: into an archive whose format has units,
/// through a sink that can patch headers in (a local file; an upload in parts).
pub(crate) fn can_stream(compression: Compression, writer: &CheckpointWriter) -> bool {
    codec::units::supports_late_headers(compression) && writer.accepts_unsized()
}

/// The images of a streamed dump, on their way into the checkpoint.
pub(crate) struct StreamIntake {
    /// Taken by [`StreamIntake::finish`], or at drop.
    capture: Option<Capture>,
    intake: Arc<Intake>,
}

struct Intake {
    writer: Mutex<Option<CheckpointWriter>>,
    /// Images held in memory until the end, in the order they were complete.
    held: Mutex<Vec<(String, Vec<u8>)>>,
    advance: Option<Advancer>,
    /// The first image the archive could not take, and why (the streamer only sees that it failed).
    failed: Mutex<Option<CheckpointError>>,
    /// The dump is over: image threads stop reading (a pipe whose writer never closes must not keep the
    /// checkpoint writer, and its unfinished file, alive).
    over: std::sync::atomic::AtomicBool,
}

impl StreamIntake {
    /// Listen for CRIU in `images_dir` (before it starts), writing into `writer`.
    pub fn start(writer: CheckpointWriter, images_dir: &Path, advance: Option<Advancer>) -> Result<Self, EngineError> {
        let intake = Arc::new(Intake {
            writer: Mutex::new(Some(writer)),
            held: Mutex::new(Vec::new()),
            advance,
            failed: Mutex::new(None),
            over: std::sync::atomic::AtomicBool::new(false),
        });
        let receiver: Arc<dyn ImageReceiver> = intake.clone();
        let capture = Capture::listen(images_dir, receiver)
            .map_err(|e| EngineError::io("listening for CRIU's image stream")(io::Error::other(e.to_string())))?;
        Ok(Self { capture: Some(capture), intake })
    }

    /// Once every image is through (call while CRIU waits at `post-dump`, or after it exited): the writer,
    /// with the images held in memory added.
    pub fn collect(&self) -> Result<CheckpointWriter, CheckpointError> {
        let Some(capture) = &self.capture else { return self.take_writer() };
        if let Err(e) = capture.settle(SETTLE_TIMEOUT) {
            return Err(self.intake.take_failure().unwrap_or_else(|| stream_failed(e)));
        }
        self.take_writer()
    }

    /// After CRIU exited: stop listening, and the writer with everything added (if not collected yet).
    pub fn finish(mut self) -> Result<Option<CheckpointWriter>, CheckpointError> {
        let intake = Arc::clone(&self.intake);
        if let Some(Err(e)) = self.capture.take().map(Capture::finish) {
            return Err(intake.take_failure().unwrap_or_else(|| stream_failed(e)));
        }
        let writer = intake.writer.lock().unwrap_or_else(PoisonError::into_inner).take();
        match writer {
            Some(w) => {
                let mut w = w;
                intake.add_held(&mut w)?;
                Ok(Some(w))
            }
            None => Ok(None),
        }
    }

    /// Why an image could not be taken, if one could not (without waiting).
    pub fn failure(&self) -> Option<CheckpointError> {
        let streamer = self.capture.as_ref().and_then(Capture::failure);
        self.intake.take_failure().or_else(|| streamer.map(stream_failed))
    }

    fn take_writer(&self) -> Result<CheckpointWriter, CheckpointError> {
        let taken = self.intake.writer.lock().unwrap_or_else(PoisonError::into_inner).take();
        let mut writer = taken.ok_or(CheckpointError::LivePacking("the streamed checkpoint was already collected"))?;
        self.intake.add_held(&mut writer)?;
        Ok(writer)
    }
}

impl Drop for StreamIntake {
    fn drop(&mut self) {
        // A dump that failed or was abandoned: stop the image threads, wait for them, and drop the writer
        // here (an unfinished checkpoint is deleted now, not whenever the last thread lets go of it).
        self.intake.over.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(capture) = self.capture.take() {
            let _ = capture.finish();
        }
        drop(self.intake.writer.lock().unwrap_or_else(PoisonError::into_inner).take());
    }
}

impl Intake {
    fn take_failure(&self) -> Option<CheckpointError> {
        self.failed.lock().unwrap_or_else(PoisonError::into_inner).take()
    }

    fn add_held(&self, writer: &mut CheckpointWriter) -> Result<(), CheckpointError> {
        let mut held = std::mem::take(&mut *self.held.lock().unwrap_or_else(PoisonError::into_inner));
        held.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, bytes) in held {
            writer.add_bytes(&name, &bytes)?;
        }
        Ok(())
    }
}

impl ImageReceiver for Intake {
    fn receive(&self, name: &str, data: &mut std::fs::File) -> io::Result<()> {
        let mut counted = Counted { inner: data, advance: self.advance.as_deref(), over: &self.over };
        if is_page_image(name) {
            // One page image at a time goes into the archive; another that comes meanwhile (CRIU dumps the
            // processes of a tree one after another, so rarely) is held like the small ones.
            if let Ok(mut slot) = self.writer.try_lock() {
                if let Some(writer) = slot.as_mut().filter(|w| w.accepts_unsized()) {
                    return writer.add_unsized(name, &mut counted).map_err(|e| {
                        let short = io::Error::other(format!("the archive could not take it: {e}"));
                        let mut failed = self.failed.lock().unwrap_or_else(PoisonError::into_inner);
                        failed.get_or_insert(e);
                        short
                    });
                }
            }
        }
        let mut bytes = Vec::new();
        counted.read_to_end(&mut bytes)?;
        self.held.lock().unwrap_or_else(PoisonError::into_inner).push((name.to_string(), bytes));
        Ok(())
    }
}

/// A pipe whose bytes advance the progress bar.
struct Counted<'a> {
    inner: &'a mut std::fs::File,
    advance: Option<&'a (dyn Fn(u64) + Send + Sync)>,
    over: &'a std::sync::atomic::AtomicBool,
}

impl Read for Counted<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use std::os::fd::AsRawFd;
        // Wait for data in slices, so that the end of the dump stops a reader whose pipe never closes.
        loop {
            if self.over.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(io::Error::other("the dump ended before CRIU finished this image"));
            }
            let mut fds = [libc::pollfd { fd: self.inner.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
            // SAFETY: poll on one descriptor we hold, for at most 200 ms.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), 1, 200) };
            if rc > 0 || (rc < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted) {
                break;
            }
        }
        let n = self.inner.read(buf)?;
        if let Some(a) = self.advance {
            a(n as u64);
        }
        Ok(n)
    }
}

fn stream_failed(e: crate::criu::streamer::StreamerError) -> CheckpointError {
    CheckpointError::Stream(e.to_string())
}

/// A streamed restore's images: CRIU's requests answered from the archive through its index, each page
/// image verified as it is read (a mismatch fails the restore at `post-restore`, before the tree runs).
pub(crate) struct ArchiveImages {
    pub archive: Arc<crate::checkpoint::index::IndexedArchive>,
    pub advance: Option<Advancer>,
}

impl crate::criu::streamer::serve::ImageProvider for ArchiveImages {
    fn exists(&self, name: &str) -> bool {
        self.archive.contains(name)
    }

    fn provide(&self, name: &str, out: &mut std::fs::File) -> io::Result<()> {
        let pipe = crate::criu::streamer::splice::SplicePipe::new(out);
        let mut counted = CountedOut { inner: pipe, advance: self.advance.as_deref() };
        let delivered = self.archive.copy_units_to(name, &mut counted).map_err(|e| io::Error::other(e.to_string()))?;
        if let Some(e) = delivered.out_error {
            // CRIU closed its end early (it failed, or needed less): the image itself was verified whole.
            tracing::debug!(image = name, error = %e, "CRIU stopped reading an image");
        }
        Ok(())
    }
}

/// CRIU's pipe, whose bytes advance the progress bar.
struct CountedOut<'a> {
    inner: crate::criu::streamer::splice::SplicePipe<'a>,
    advance: Option<&'a (dyn Fn(u64) + Send + Sync)>,
}

impl io::Write for CountedOut<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        if let Some(a) = self.advance {
            a(n as u64);
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl crate::checkpoint::UnitOut for CountedOut<'_> {
    fn write_unit(&mut self, data: crate::codec::pool::Pooled) -> io::Result<()> {
        let n = data.len() as u64;
        self.inner.write_unit(data)?;
        if let Some(a) = self.advance {
            a(n);
        }
        Ok(())
    }
}
