//! [`Record`]: what a checkpoint of a containerd container keeps of its container, besides the runc
//! checkpoint itself (JSON, in the checkpoint as [`RECORD_FILE`]).

use serde::{Deserialize, Serialize};

/// The record's name inside the checkpoint.
pub const RECORD_FILE: &str = "containerd/container.json";
/// The container's writable layer (a tar of the snapshot's upper folder), with `--rootfs`.
pub const ROOTFS_DIFF_FILE: &str = "containerd/rootfs-diff.tar";

/// A containerd container as it was checkpointed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub namespace: String,
    pub id: String,
    /// The image reference the container was created from (may be empty, e.g. `ctr run --rootfs`).
    pub image: String,
    pub runtime: String,
    /// The runtime options' `Root` (empty for the default) and `SystemdCgroup`, given to the new container.
    #[serde(default)]
    pub runc_root: String,
    #[serde(default)]
    pub systemd_cgroup: bool,
    pub snapshotter: String,
    /// The committed snapshot the container's writable one sat on (the image's top layer), empty when
    /// the container had no snapshot.
    pub snapshot_parent: String,
    /// The OCI runtime spec (config.json) the container was created with.
    pub spec: serde_json::Value,
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Whether the checkpoint holds the writable layer ([`ROOTFS_DIFF_FILE`]).
    #[serde(default)]
    pub rootfs: bool,
}
