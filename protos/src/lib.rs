//! The cedana daemon's gRPC API.
//!
//! The daemon is not built yet; this crate holds the API version the CLI and daemon agree on so that
//! front ends can already depend on it.

/// Version of the daemon API spoken by this build.
pub const API_VERSION: &str = "v1alpha1";
