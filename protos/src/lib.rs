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
//! - [`tcp_endpoint`] / [`connect_tcp_with`]: a client [`Channel`] to a daemon listening on `HOST:PORT`, and
//!   [`BearerToken`], the client interceptor that sends the daemon's token (`authorization: Bearer <token>`).
//!
//! - [`containerd`]: a client of containerd's own API (containers, tasks, snapshots).
//! - [`cri`]: a client of the Kubernetes CRI (`runtime.v1`, a wire-compatible subset), as the kubelet speaks it
//!   to containerd's CRI plugin.
//!
//! The server side of the recipe (used by the daemon and by this crate's tests) is tonic's
//! `Server::builder().add_service(DaemonServer::new(..)).serve_with_incoming(..)` fed by a
//! `tokio_stream::wrappers::UnixListenerStream` around a bound `tokio::net::UnixListener`.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint, Uri};

pub mod containerd;

/// A client of the Kubernetes Container Runtime Interface, API `runtime.v1`: the kubelet's side of what
/// containerd's CRI plugin serves on containerd's socket. Generated from `proto/k8s/cri/v1/api.proto`, a
/// wire-compatible subset of k8s.io/cri-api (same package, services, methods and field numbers; only the
/// calls and fields cedana's tests use).
///
/// - [`cri::v1`]: the messages (`v1::PodSandboxConfig`, `v1::ContainerConfig`, ...) and enums
///   (`v1::NamespaceMode`, `v1::ContainerState`, ...).
/// - [`cri::RuntimeServiceClient`] (pod sandboxes and containers) and [`cri::ImageServiceClient`] (images), to
///   use on a [`Channel`] from [`connect_uds`] to containerd's socket.
pub mod cri {
    // The module tree mirrors the proto package, as the generated code expects.
    #[allow(missing_docs, clippy::all, rustdoc::all)]
    mod generated {
        pub mod runtime {
            pub mod v1 {
                tonic::include_proto!("runtime.v1");
            }
        }
    }

    pub use generated::runtime::v1;
    pub use v1::image_service_client::ImageServiceClient;
    pub use v1::runtime_service_client::RuntimeServiceClient;

    /// The CRI API version this client speaks (`VersionRequest.version`).
    pub const API_VERSION: &str = "v1";
}

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

/// The endpoint of a gRPC server on plain TCP at `address` (`HOST:PORT`, an IPv6 host in brackets), as
/// `http://HOST:PORT`. Fails when that makes no valid URI.
pub fn tcp_endpoint(address: &str) -> Result<Endpoint, tonic::transport::Error> {
    Endpoint::from_shared(format!("http://{address}"))
}

/// Connects to the gRPC server of `endpoint` (see [`tcp_endpoint`]); fails when nothing listens there (the
/// error's source chain then holds the [`std::io::Error`], `ConnectionRefused` on a local port nobody
/// listens on).
pub async fn connect_tcp_with(endpoint: Endpoint) -> Result<Channel, tonic::transport::Error> {
    endpoint.connect().await
}

/// The metadata key that carries the daemon's token over TCP.
pub const AUTHORIZATION: &str = "authorization";

/// A client interceptor that sends `authorization: Bearer <token>` with every request; [`BearerToken::none`]
/// sends nothing (the Unix socket needs no token). Use it with `DaemonClient::with_interceptor`.
#[derive(Clone, Default)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl BearerToken {
    /// No token: requests go as they are.
    pub fn none() -> Self {
        BearerToken(None)
    }

    /// `Bearer <token>`; fails when the token is not visible ASCII (metadata values cannot hold it).
    pub fn new(token: &str) -> Result<Self, tonic::metadata::errors::InvalidMetadataValue> {
        let mut value: MetadataValue<Ascii> = format!("Bearer {token}").parse()?;
        // Kept out of debug output of the request.
        value.set_sensitive(true);
        Ok(BearerToken(Some(value)))
    }
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "BearerToken(<redacted>)" } else { "BearerToken(none)" })
    }
}

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert(AUTHORIZATION, value.clone());
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    #[test]
    fn the_bearer_token_goes_in_the_authorization_metadata_and_is_redacted() {
        let mut with = BearerToken::new("abc123").unwrap();
        let req = with.call(tonic::Request::new(())).unwrap();
        assert_eq!(req.metadata().get(AUTHORIZATION).unwrap().to_str().unwrap(), "Bearer abc123");
        assert!(!format!("{with:?}").contains("abc123"));
        let req = BearerToken::none().call(tonic::Request::new(())).unwrap();
        assert!(req.metadata().get(AUTHORIZATION).is_none());
        assert!(BearerToken::new("has\nnewline").is_err());
    }

    #[test]
    fn tcp_endpoints_take_host_port() {
        assert_eq!(tcp_endpoint("127.0.0.1:8080").unwrap().uri().to_string(), "http://127.0.0.1:8080/");
        assert_eq!(tcp_endpoint("[::1]:9").unwrap().uri().port_u16(), Some(9));
    }
}
