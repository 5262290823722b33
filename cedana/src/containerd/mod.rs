//! containerd, as cedana reaches it: a blocking client of containerd's API ([`Client`]), where a
//! container's runc state lives ([`runc_root`]), the record of a container kept in its checkpoint
//! ([`Record`]), and the two operations the CLI and the daemon share: preparing the dump of a container
//! ([`prepare_dump`]) and creating it again from a checkpoint ([`restore`]); and new containers from images
//! ([`create`]: the image resolved by [`image`], its spec built by [`spec`]).

mod client;
mod create;
mod dump;
pub mod image;
mod record;
mod restore;
pub mod spec;
pub mod users;

pub use client::{Client, NewTask};
pub use create::{create, NewContainer, DEFAULT_SNAPSHOTTER};
pub use dump::prepare_dump;
pub use record::{Record, RECORD_FILE, ROOTFS_DIFF_FILE};
pub use restore::{restore, RestoreSpec, Stdio};

use std::path::{Path, PathBuf};

use cedana::error::ErrorKind;
use cedana_protos::containerd::containers::container::Runtime;
use cedana_protos::containerd::runc_options::Options;
use cedana_protos::containerd::RUNC_OPTIONS_TYPE_URL;
use prost::Message as _;

/// The runc shim's (and our shim's) default state root; the namespace is appended.
pub const DEFAULT_RUNC_ROOT: &str = "/run/containerd/runc";
/// Our shim's runtime name.
pub const CEDANA_RUNTIME: &str = "io.containerd.cedana.v2";
/// Runtimes whose containers are runc containers under [`runc_root`].
const RUNC_RUNTIMES: &[&str] = &["io.containerd.runc.v2", "io.containerd.runc.v1", CEDANA_RUNTIME];

/// A failure talking to containerd or handling a container's checkpoint, with the kind a wire protocol maps.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ContainerdError {
    kind: ErrorKind,
    message: String,
}

impl ContainerdError {
    /// An error of `kind`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ContainerdError { kind, message: message.into() }
    }

    /// The kind of the failure.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
}

impl From<cedana::engine::EngineError> for ContainerdError {
    fn from(e: cedana::engine::EngineError) -> Self {
        ContainerdError::new(e.kind(), e.to_string())
    }
}

impl From<cedana::checkpoint::CheckpointError> for ContainerdError {
    fn from(e: cedana::checkpoint::CheckpointError) -> Self {
        ContainerdError::new(e.kind(), e.to_string())
    }
}

/// The runc options of a container's runtime, when it has some of that type (the CRI plugin's
/// `runtimes.<name>.options` table, or `ctr run --runc-binary`/`--runtime-root`...).
pub fn runc_options(runtime: Option<&Runtime>) -> Result<Option<Options>, ContainerdError> {
    let Some(any) = runtime.and_then(|r| r.options.as_ref()) else { return Ok(None) };
    if !any.type_url.ends_with(RUNC_OPTIONS_TYPE_URL) {
        return Ok(None);
    }
    let options = Options::decode(any.value.as_slice())
        .map_err(|e| ContainerdError::new(ErrorKind::InvalidArgument, format!("the runtime options ({}): {e}", any.type_url)))?;
    Ok(Some(options))
}

/// Where the runc state of the container lives: the runtime options' `Root`, else [`DEFAULT_RUNC_ROOT`],
/// with the namespace appended (as the runc shim and ours keep it). Refuses runtimes that are not runc's.
pub fn runc_root(runtime: Option<&Runtime>, namespace: &str) -> Result<PathBuf, ContainerdError> {
    let name = runtime.map(|r| r.name.as_str()).unwrap_or_default();
    if !RUNC_RUNTIMES.contains(&name) {
        return Err(ContainerdError::new(
            ErrorKind::FailedPrecondition,
            format!("the container runs on runtime {name:?}: cedana checkpoints containers of {} only", RUNC_RUNTIMES.join(", ")),
        ));
    }
    let root = runc_options(runtime)?.map(|o| o.root).filter(|r| !r.is_empty());
    Ok(Path::new(root.as_deref().unwrap_or(DEFAULT_RUNC_ROOT)).join(namespace))
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost_types::Any;

    #[test]
    fn roots_follow_the_runc_shim() {
        let runtime = |name: &str, root: Option<&str>| Runtime {
            name: name.into(),
            options: root.map(|r| Any {
                type_url: RUNC_OPTIONS_TYPE_URL.into(),
                value: Options { root: r.into(), ..Default::default() }.encode_to_vec(),
            }),
        };
        assert_eq!(
            runc_root(Some(&runtime("io.containerd.runc.v2", None)), "k8s.io").unwrap(),
            Path::new("/run/containerd/runc/k8s.io")
        );
        assert_eq!(runc_root(Some(&runtime(CEDANA_RUNTIME, Some("/x"))), "default").unwrap(), Path::new("/x/default"));
        let err = runc_root(Some(&runtime("io.containerd.kata.v2", None)), "default").unwrap_err().to_string();
        assert!(err.contains("io.containerd.kata.v2") && err.contains("runc"), "{err}");
    }
}
