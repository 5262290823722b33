//! A client of containerd's gRPC API: the Containers, Tasks, Snapshots, Images and Content services,
//! generated from the subset of containerd's API in `proto/containerd/` (wire-compatible with containerd
//! 1.6, 1.7 and 2.x).
//!
//! containerd scopes every call to a namespace, sent in the `containerd-namespace` metadata header:
//! [`with_namespace`] wraps a request with it. Connect with [`crate::connect_uds`] to containerd's socket
//! (`/run/containerd/containerd.sock` by default).

// The module tree mirrors the proto packages, as the generated code refers across packages by
// relative paths (`super::super::...`).
#[allow(missing_docs, clippy::all, rustdoc::all)]
mod generated {
    pub mod containerd {
        pub mod types {
            tonic::include_proto!("containerd.types");
        }
        pub mod v1 {
            pub mod types {
                tonic::include_proto!("containerd.v1.types");
            }
        }
        pub mod runc {
            pub mod v1 {
                tonic::include_proto!("containerd.runc.v1");
            }
        }
        pub mod services {
            pub mod containers {
                pub mod v1 {
                    tonic::include_proto!("containerd.services.containers.v1");
                }
            }
            pub mod tasks {
                pub mod v1 {
                    tonic::include_proto!("containerd.services.tasks.v1");
                }
            }
            pub mod snapshots {
                pub mod v1 {
                    tonic::include_proto!("containerd.services.snapshots.v1");
                }
            }
            pub mod images {
                pub mod v1 {
                    tonic::include_proto!("containerd.services.images.v1");
                }
            }
            pub mod leases {
                pub mod v1 {
                    tonic::include_proto!("containerd.services.leases.v1");
                }
            }
            pub mod content {
                pub mod v1 {
                    tonic::include_proto!("containerd.services.content.v1");
                }
            }
        }
    }
}

pub use generated::containerd::runc::v1 as runc_options;
pub use generated::containerd::services::containers::v1 as containers;
pub use generated::containerd::services::content::v1 as content;
pub use generated::containerd::services::images::v1 as images;
pub use generated::containerd::services::leases::v1 as leases;
pub use generated::containerd::services::snapshots::v1 as snapshots;
pub use generated::containerd::services::tasks::v1 as tasks;
pub use generated::containerd::types;
/// Task types: `Process` and its `Status`.
pub use generated::containerd::v1::types as task;

/// The metadata header naming the lease a call's new resources are held by (safe from garbage collection).
pub const LEASE_HEADER: &str = "containerd-lease";

/// containerd's default socket.
pub const DEFAULT_ADDRESS: &str = "/run/containerd/containerd.sock";
/// containerd's default namespace (the one `ctr` uses).
pub const DEFAULT_NAMESPACE: &str = "default";
/// The metadata header naming the namespace of a call.
pub const NAMESPACE_HEADER: &str = "containerd-namespace";
/// The type URL of the runc shim's runtime options inside an `Any`.
pub const RUNC_OPTIONS_TYPE_URL: &str = "containerd.runc.v1.Options";
/// The type URL containerd gives an OCI runtime spec inside an `Any`.
pub const SPEC_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";

/// `message` as a request in `namespace`. Fails only for a namespace that cannot be a header value.
pub fn with_namespace<T>(namespace: &str, message: T) -> Result<tonic::Request<T>, tonic::Status> {
    let mut request = tonic::Request::new(message);
    let value =
        namespace.parse().map_err(|_| tonic::Status::invalid_argument(format!("namespace {namespace:?} is not a valid name")))?;
    request.metadata_mut().insert(NAMESPACE_HEADER, value);
    Ok(request)
}
