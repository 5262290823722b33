//! The dump side: CRIU writes each image into a pipe we hand it, and an [`ImageReceiver`] takes it from
//! there (into an archive, as it comes).

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::{recv_fd, widen, Server, StreamerError, CAPTURE_SOCKET};

/// Takes the images CRIU dumps.
pub trait ImageReceiver: Send + Sync + 'static {
    /// Read image `name` from `data` (CRIU's pipe) to its end. Called on a thread of its own for each
    /// image, possibly for several at once. An error makes CRIU's dump fail: the pipe is closed unread.
    fn receive(&self, name: &str, data: &mut File) -> io::Result<()>;
}

/// Listens for a `criu dump --stream` in an images folder and hands every image to a receiver.
pub struct Capture {
    server: Server,
}

impl Capture {
    /// Listen on `images_dir/streamer-capture.sock` (before CRIU starts).
    pub fn listen(images_dir: &Path, receiver: Arc<dyn ImageReceiver>) -> Result<Self, StreamerError> {
        let server = Server::listen(images_dir, CAPTURE_SOCKET, move |conn, name, shared| {
            let mut pipe = recv_fd(conn)?;
            widen(std::os::fd::AsRawFd::as_raw_fd(&pipe));
            let receiver = Arc::clone(&receiver);
            let image = name.clone();
            shared
                .spawn(&name, move || {
                    receiver.receive(&image, &mut pipe).map_err(|source| StreamerError::Image { name: image, source })
                })
                .map_err(|e| StreamerError::Image { name, source: e })
        })?;
        Ok(Self { server })
    }

    /// Wait until every image CRIU has started is wholly received; the first error if any failed. Call it
    /// while CRIU waits at `post-dump`: by then it has written every image, and starts no other.
    pub fn settle(&self, timeout: Duration) -> Result<(), StreamerError> {
        self.server.shared.settle(timeout)
    }

    /// The first error so far (an image a receiver could not take), without waiting.
    pub fn failure(&self) -> Option<StreamerError> {
        self.server.shared.take_error()
    }

    /// Once CRIU has exited: stop listening, wait for the image threads, and return the images received
    /// (in the order CRIU sent them) or the first error.
    pub fn finish(self) -> Result<Vec<String>, StreamerError> {
        self.server.finish()
    }
}
