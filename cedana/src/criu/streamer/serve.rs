//! The restore side: CRIU asks for each image by name, and an [`ImageProvider`] writes it into the pipe CRIU
//! sends for it.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::{recv_fd, widen, write_reply, Server, StreamerError, SERVE_SOCKET};

/// Gives CRIU the images it restores from.
pub trait ImageProvider: Send + Sync + 'static {
    /// Whether the checkpoint holds image `name` (CRIU asks for optional images too).
    fn exists(&self, name: &str) -> bool;
    /// Write image `name` into `out` (CRIU's pipe), whole. Called on a thread of its own for each image,
    /// possibly for several at once. An error is the restore's failure (and CRIU sees its pipe end early).
    fn provide(&self, name: &str, out: &mut File) -> io::Result<()>;
}

/// Serves a `criu restore --stream` from an images folder's socket.
pub struct Serve {
    server: Server,
}

impl Serve {
    /// Listen on `images_dir/streamer-serve.sock` (before CRIU starts).
    pub fn listen(images_dir: &Path, provider: Arc<dyn ImageProvider>) -> Result<Self, StreamerError> {
        let server = Server::listen(images_dir, SERVE_SOCKET, move |conn, name, shared| {
            let exists = provider.exists(&name);
            let sock_err = |source| StreamerError::Image { name: name.clone(), source };
            write_reply(conn, exists).map_err(sock_err)?;
            if !exists {
                tracing::debug!(image = %name, "CRIU asked for an image the checkpoint does not hold");
                return Ok(());
            }
            // CRIU makes the pipe and sends its write end.
            let mut out = recv_fd(conn)?;
            widen(out.as_raw_fd());
            let provider = Arc::clone(&provider);
            let image = name.clone();
            shared
                .spawn(&name, move || {
                    provider.provide(&image, &mut out).map_err(|source| StreamerError::Image { name: image, source })
                })
                .map_err(sock_err)
        })?;
        Ok(Self { server })
    }

    /// Wait until every image CRIU asked for has been written whole; the first error if any failed. Call it
    /// while CRIU waits at `pre-resume`: it has read what it restores, and asks for nothing more.
    pub fn settle(&self, timeout: Duration) -> Result<(), StreamerError> {
        self.server.shared.settle(timeout)
    }

    /// Once CRIU has exited: stop listening, wait for the image threads, and return the images served (in
    /// the order CRIU asked for them) or the first error.
    pub fn finish(self) -> Result<Vec<String>, StreamerError> {
        self.server.finish()
    }
}
