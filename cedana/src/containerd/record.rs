//! [`Record`]: what a checkpoint of a containerd container keeps of its container, besides the runc
//! checkpoint itself (JSON, in the checkpoint as [`RECORD_FILE`]).

use cedana::error::ErrorKind;
use serde::{Deserialize, Serialize};

use super::ContainerdError;

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

/// Reads entry `name` of the checkpoint at `path` (a folder or an archive of any compression) and checks
/// it against the checkpoint's manifest, without reading the rest of the checkpoint; `None` when the
/// checkpoint has no such entry.
pub fn read_entry(path: &std::path::Path, name: &str) -> Result<Option<Vec<u8>>, ContainerdError> {
    use std::io::Read as _;
    let manifest = cedana::checkpoint::read_manifest(path, false)?;
    let Some(expected) = manifest.files.iter().find(|f| f.name == name) else { return Ok(None) };
    let compression = cedana::codec::Compression::detect_path(path)
        .map_err(|e| ContainerdError::new(e.kind(), format!("{}: {e}", path.display())))?;
    let io = |e: std::io::Error| ContainerdError::new(ErrorKind::of_io(&e), format!("reading {name} of {}: {e}", path.display()));
    let bytes = if compression.is_archive() {
        let file = std::fs::File::open(path).map_err(io)?;
        let decoder = cedana::codec::decoder(compression, std::io::BufReader::new(file))
            .map_err(|e| ContainerdError::new(e.kind(), format!("{}: {e}", path.display())))?;
        let mut archive = tar::Archive::new(decoder);
        let mut found = None;
        for entry in archive.entries().map_err(io)? {
            let mut entry = entry.map_err(io)?;
            if entry.path().map_err(io)?.to_str() == Some(name) {
                let mut bytes = Vec::new();
                entry.read_to_end(&mut bytes).map_err(io)?;
                found = Some(bytes);
                break;
            }
        }
        found.ok_or_else(|| {
            ContainerdError::new(
                ErrorKind::FailedPrecondition,
                format!("{}: the manifest lists {name} but the archive does not hold it", path.display()),
            )
        })?
    } else {
        std::fs::read(path.join(name)).map_err(io)?
    };
    let mut hasher = cedana::checkpoint::digest::Hasher::new();
    hasher.update(&bytes);
    if &hasher.finish(name) != expected {
        return Err(ContainerdError::new(
            ErrorKind::FailedPrecondition,
            format!("{}: {name} does not match the checkpoint's manifest: the checkpoint is corrupt", path.display()),
        ));
    }
    Ok(Some(bytes))
}
