//! The cedana daemon's gRPC API, generated at build time from `proto/cedana/daemon/v1/daemon.proto`.
//!
//! `build.rs` compiles the proto files with [protox](https://docs.rs/protox) (a protobuf compiler written in
//! Rust, so no `protoc` is needed to build) and generates prost messages plus tonic client and server code
//! with `tonic-prost-build`:
//!
//! - [`v1`]: the messages (`v1::Job`, `v1::DumpRequest`, ...), the enums (`v1::JobType`, `v1::JobState`),
//!   the client [`v1::daemon_client::DaemonClient`], and the server trait [`v1::daemon_server::Daemon`] with
//!   its tower service [`v1::daemon_server::DaemonServer`].
//! - [`FILE_DESCRIPTOR_SET`]: the encoded descriptors, for `tonic-reflection`.
//! - [`connect_uds`] / [`connect_uds_with`]: a client [`Channel`] over the daemon's Unix socket.
//!
//! - [`containerd`]: a client of containerd's own API (containers, tasks, snapshots).
//!
//! The server side of the recipe (used by the daemon and by this crate's tests) is tonic's
//! `Server::builder().add_service(DaemonServer::new(..)).serve_with_incoming(..)` fed by a
//! `tokio_stream::wrappers::UnixListenerStream` around a bound `tokio::net::UnixListener`.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

pub mod containerd;

/// Version of the daemon API spoken by this build (the proto package is `cedana.daemon.v1`).
pub const API_VERSION: &str = "v1";

/// Generated code for the proto package `cedana.daemon.v1`.
// The proto comments become doc comments; they are prose, not rustdoc markup (e.g. `<JID>`).
#[allow(rustdoc::invalid_html_tags, rustdoc::bare_urls, rustdoc::broken_intra_doc_links)]
pub mod v1 {
    tonic::include_proto!("cedana.daemon.v1");
}

/// The encoded `FileDescriptorSet` of the daemon API, to register with
/// `tonic_reflection::server::Builder::register_encoded_file_descriptor_set`.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("cedana_descriptor");

/// The URI the Unix-socket client uses for its requests. gRPC over HTTP/2 needs one, but only its
/// authority (sent as `:authority`) is used; the connection always goes to the socket.
pub const UDS_URI: &str = "http://localhost";

/// The endpoint [`connect_uds`] uses: [`UDS_URI`] with tonic's defaults. Set timeouts or other options on
/// it and pass it to [`connect_uds_with`].
pub fn uds_endpoint() -> Endpoint {
    Endpoint::from_static(UDS_URI)
}

/// Connects to a gRPC server listening on the Unix socket `path`.
///
/// Fails when nothing listens there; the error's source chain then holds the [`std::io::Error`]
/// (`NotFound` when the socket file is missing, `ConnectionRefused` when no one listens on it). The
/// channel reconnects to the same path when the connection breaks.
pub async fn connect_uds(path: impl AsRef<Path>) -> Result<Channel, tonic::transport::Error> {
    connect_uds_with(uds_endpoint(), path).await
}

/// As [`connect_uds`], with the given endpoint settings (its URI is only used for `:authority`).
pub async fn connect_uds_with(endpoint: Endpoint, path: impl AsRef<Path>) -> Result<Channel, tonic::transport::Error> {
    let path: PathBuf = path.as_ref().to_path_buf();
    endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
}
