//! [`prepare_dump`]: what the engine needs to checkpoint a containerd container, found through containerd.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cedana::engine::{Attachment, RuncSpec};
use cedana::error::ErrorKind;
use cedana_protos::containerd::containers::Container;
use cedana_protos::containerd::task::Status;
use cedana_protos::containerd::types::Mount;

use super::{runc_options, runc_root, Client, ContainerdError, Record, RECORD_FILE, ROOTFS_DIFF_FILE};

/// The dump of a containerd container, ready for the engine: its runc target and the files to attach
/// (its [`Record`], and its writable layer with `rootfs`).
pub struct PreparedDump {
    pub spec: RuncSpec,
    pub attachments: Vec<Attachment>,
}

/// Looks container `id` up: it must have a running or paused task on a runc-based runtime, whose runc state
/// is where the shim keeps it.
pub fn prepare_dump(client: &Client, id: &str, rootfs: bool) -> Result<PreparedDump, ContainerdError> {
    let container = client.container(id)?;
    let task = client.task(id)?.ok_or_else(|| {
        ContainerdError::new(ErrorKind::FailedPrecondition, format!("container {id} has no task: nothing runs to checkpoint"))
    })?;
    let status = Status::try_from(task.status).unwrap_or(Status::Unknown);
    if !matches!(status, Status::Running | Status::Paused) {
        return Err(ContainerdError::new(
            ErrorKind::FailedPrecondition,
            format!("the task of container {id} is {}: only a running or paused task can be checkpointed", status.as_str_name()),
        ));
    }
    let root = runc_root(container.runtime.as_ref(), client.namespace())?;
    if !root.join(id).join("state.json").is_file() {
        return Err(ContainerdError::new(
            ErrorKind::FailedPrecondition,
            format!(
                "container {id} runs, but its runc state is not under {}: does its shim use another root (runtime option Root)?",
                root.display()
            ),
        ));
    }
    let snapshot_parent = if container.snapshot_key.is_empty() {
        String::new()
    } else {
        client.snapshot_parent(&container.snapshotter, &container.snapshot_key)?
    };
    let upper = if rootfs { Some(upper_dir(client, &container)?) } else { None };
    let options = runc_options(container.runtime.as_ref())?.unwrap_or_default();
    let record = Record {
        namespace: client.namespace().to_string(),
        id: id.to_string(),
        image: container.image.clone(),
        runtime: container.runtime.as_ref().map(|r| r.name.clone()).unwrap_or_default(),
        runc_root: options.root,
        systemd_cgroup: options.systemd_cgroup,
        snapshotter: container.snapshotter.clone(),
        snapshot_parent,
        spec: spec_json(&container)?,
        labels: container.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        rootfs: upper.is_some(),
    };
    let record = serde_json::to_vec_pretty(&record)
        .map_err(|e| ContainerdError::new(ErrorKind::Internal, format!("writing the record of container {id}: {e}")))?;
    let mut attachments: Vec<Attachment> = vec![(RECORD_FILE.to_string(), Arc::new(move || Ok(record.clone())))];
    if let Some(upper) = upper {
        // Taken once CRIU is done: without --leave-running the container is gone by then, so the layer is
        // exactly what its processes had written.
        attachments.push((ROOTFS_DIFF_FILE.to_string(), Arc::new(move || tar_folder(&upper))));
    }
    let spec = RuncSpec { id: id.to_string(), runtime: None, root: Some(root), work_path: None, extra_flags: Vec::new() };
    Ok(PreparedDump { spec, attachments })
}

/// The container's spec as JSON.
fn spec_json(container: &Container) -> Result<serde_json::Value, ContainerdError> {
    let invalid = |m: String| ContainerdError::new(ErrorKind::FailedPrecondition, m);
    let spec = container.spec.as_ref().ok_or_else(|| invalid(format!("container {} has no spec", container.id)))?;
    serde_json::from_slice(&spec.value)
        .map_err(|e| invalid(format!("the spec of container {} ({}) is not JSON: {e}", container.id, spec.type_url)))
}

/// The upper folder of the container's overlay snapshot (its writable layer).
fn upper_dir(client: &Client, container: &Container) -> Result<PathBuf, ContainerdError> {
    let refuse = |m: String| ContainerdError::new(ErrorKind::FailedPrecondition, m);
    if container.snapshot_key.is_empty() {
        return Err(refuse(format!(
            "container {} has no snapshot (created with --rootfs FOLDER?): --rootfs needs one",
            container.id
        )));
    }
    let mounts = client.mounts(&container.snapshotter, &container.snapshot_key)?;
    overlay_option(&mounts, "upperdir=").map(PathBuf::from).ok_or_else(|| {
        refuse(format!(
            "the snapshot of container {} ({} snapshotter) is not an overlay with a writable layer: --rootfs supports overlayfs",
            container.id, container.snapshotter
        ))
    })
}

/// The value of option `key` (e.g. `upperdir=`) of the overlay mount among `mounts`.
pub(super) fn overlay_option<'a>(mounts: &'a [Mount], key: &str) -> Option<&'a str> {
    mounts.iter().filter(|m| m.r#type == "overlay").flat_map(|m| m.options.iter()).find_map(|o| o.strip_prefix(key))
}

/// A tar of `dir`'s content (special files such as overlay whiteouts included, symlinks not followed).
fn tar_folder(dir: &Path) -> std::io::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    builder.follow_symlinks(false);
    builder.append_dir_all(".", dir)?;
    builder.into_inner()
}
