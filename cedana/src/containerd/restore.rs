//! [`restore`]: a containerd container created again from its checkpoint, on our shim, which restores it
//! from the `io.cedana.restore` annotation when the task is created.

use cedana::error::ErrorKind;
use cedana_protos::containerd::containers::container::Runtime;
use cedana_protos::containerd::containers::Container;
use cedana_protos::containerd::runc_options::Options;
use cedana_protos::containerd::types::Mount;
use cedana_protos::containerd::{RUNC_OPTIONS_TYPE_URL, SPEC_TYPE_URL};
use prost::Message as _;

use super::dump::overlay_option;
use cedana::config::Config;
use cedana::engine::Source;

use super::{Client, ContainerdError, NewTask, Record, CEDANA_RUNTIME, RECORD_FILE, ROOTFS_DIFF_FILE};

/// The annotation our shim (through cedana-runc) restores a container from.
pub const RESTORE_ANNOTATION: &str = "io.cedana.restore";
/// The annotation asking cedana-runc for a lazy restore.
pub const LAZY_ANNOTATION: &str = "io.cedana.restore.lazy";
/// The annotation asking cedana-runc to restore GPU state on a host whose GPUs do not match its record.
pub const SKIP_GPU_CHECK_ANNOTATION: &str = "io.cedana.restore.skip-gpu-check";

/// What to restore, and as what.
pub struct RestoreSpec<'a> {
    /// The checkpoint (an absolute path, or an object-store URL).
    pub checkpoint: &'a Source,
    /// Settings to read it with (object-store credentials, scratch folder).
    pub config: &'a Config,
    /// Restore lazily (the `io.cedana.restore.lazy` annotation: cedana-runc restores the container before its
    /// memory has arrived, or normally when the checkpoint cannot be lazy).
    pub lazy: bool,
    /// Restore GPU state even where this host's GPUs do not match the checkpoint's record (the
    /// `io.cedana.restore.skip-gpu-check` annotation).
    pub skip_gpu_check: bool,
    /// The new container's id.
    pub id: &'a str,
    /// The image whose layers the new container's snapshot sits on, and that it records (the checkpointed
    /// container's recorded parent snapshot and image when `None`).
    pub image: Option<&'a str>,
    /// The runtime of the new container (it must restore from the annotation: ours by default).
    pub runtime: &'a str,
    /// Replace a container of that id whose task has stopped (a job restored in place), keeping its snapshot.
    pub replace_stopped: bool,
    pub stdio: Stdio,
}

/// The new task's standard streams: paths the shim opens (FIFOs or files), empty for /dev/null.
#[derive(Debug, Default, Clone)]
pub struct Stdio {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
}

/// A restored container.
pub struct Restored {
    pub record: Record,
    pub pid: u32,
}

/// Creates the container again from its checkpoint and starts it; on failure, removes what it created.
pub fn restore(client: &Client, spec: RestoreSpec<'_>) -> Result<Restored, ContainerdError> {
    let path = spec.checkpoint.display();
    let record = spec.checkpoint.read_entry(spec.config, RECORD_FILE)?.ok_or_else(|| {
        ContainerdError::new(
            ErrorKind::FailedPrecondition,
            format!("{path} is not a checkpoint of a containerd container (no {RECORD_FILE})"),
        )
    })?;
    let record: Record = serde_json::from_slice(&record)
        .map_err(|e| ContainerdError::new(ErrorKind::FailedPrecondition, format!("reading {RECORD_FILE} of {path}: {e}")))?;
    let mut record = record;
    if let Some(image) = spec.image {
        // Another image (e.g. the same one under another name on this node): the new snapshot sits on its
        // layers; the writable layer and the process are the checkpoint's.
        record.snapshot_parent = super::image::resolve(client, image)?.chain_id;
        record.image = image.to_string();
        if record.snapshotter.is_empty() {
            record.snapshotter = super::create::DEFAULT_SNAPSHOTTER.to_string();
        }
    }
    let id = spec.id;
    let exists = client.container_exists(id)?;
    // A job restored in place keeps its stopped container's snapshot: held by the lease while the container
    // is replaced.
    let keep = (exists && spec.replace_stopped && !record.snapshot_parent.is_empty()).then(|| (record.snapshotter.clone(), id));
    let keep = keep.as_ref().map(|(s, k)| (s.as_str(), *k));
    client.hold(keep, || create_again(client, &spec, record, exists))
}

/// The steps of [`restore`], under its lease.
fn create_again(client: &Client, spec: &RestoreSpec<'_>, record: Record, exists: bool) -> Result<Restored, ContainerdError> {
    let id = spec.id;
    let mut reused_snapshot = false;
    if exists {
        let task = client.task(id)?;
        let stopped = task.as_ref().is_none_or(|t| t.status == cedana_protos::containerd::task::Status::Stopped as i32);
        if !(spec.replace_stopped && stopped) {
            return Err(ContainerdError::new(
                ErrorKind::AlreadyExists,
                format!("container {id} already exists in namespace {}: choose another id or remove it", client.namespace()),
            ));
        }
        // The job's own container, stopped by its dump: its writable layer is kept and reused.
        if task.is_some() {
            client.delete_task(id)?;
        }
        client.delete_container(id)?;
        reused_snapshot = !record.snapshot_parent.is_empty();
    }
    let rootfs_diff =
        if record.rootfs && !reused_snapshot { spec.checkpoint.read_entry(spec.config, ROOTFS_DIFF_FILE)? } else { None };
    let mut oci = record.spec.clone();
    annotate(&mut oci, spec.checkpoint, &[(LAZY_ANNOTATION, spec.lazy), (SKIP_GPU_CHECK_ANNOTATION, spec.skip_gpu_check)])?;
    let snapshotter = (!record.snapshot_parent.is_empty()).then(|| record.snapshotter.clone());
    let mounts = match (&snapshotter, reused_snapshot) {
        (Some(s), true) => client.mounts(s, id)?,
        (Some(s), false) => client.prepare(s, id, &record.snapshot_parent)?,
        (None, _) => Vec::new(),
    };
    let mut created = Created { client, id, snapshot: snapshotter.as_deref().filter(|_| !reused_snapshot), container: false };
    let result = (|| {
        if let Some(diff) = &rootfs_diff {
            unpack_layer(diff, &mounts)?;
        }
        let invalid = |e: serde_json::Error| ContainerdError::new(ErrorKind::Internal, format!("encoding the spec: {e}"));
        client.create_container(Container {
            id: id.to_string(),
            labels: record.labels.clone().into_iter().collect(),
            image: record.image.clone(),
            runtime: Some(Runtime { name: spec.runtime.to_string(), options: restore_options(&record, spec.runtime) }),
            spec: Some(prost_types::Any { type_url: SPEC_TYPE_URL.into(), value: serde_json::to_vec(&oci).map_err(invalid)? }),
            snapshotter: snapshotter.clone().unwrap_or_default(),
            snapshot_key: if snapshotter.is_some() { id.to_string() } else { String::new() },
        })?;
        created.container = true;
        let task = NewTask {
            rootfs: mounts.clone(),
            stdin: spec.stdio.stdin.clone(),
            stdout: spec.stdio.stdout.clone(),
            stderr: spec.stdio.stderr.clone(),
        };
        client.create_task(id, task)?;
        client.start_task(id)
    })();
    match result {
        Ok(pid) => Ok(Restored { record, pid }),
        Err(e) => {
            created.undo();
            Err(e)
        }
    }
}

/// Unpacks the recorded writable layer into the new snapshot's upper folder.
fn unpack_layer(diff: &[u8], mounts: &[Mount]) -> Result<(), ContainerdError> {
    let upper = overlay_option(mounts, "upperdir=")
        .ok_or_else(|| ContainerdError::new(ErrorKind::FailedPrecondition, "the new snapshot has no writable overlay layer"))?;
    tar::Archive::new(diff).unpack(upper).map_err(|e| {
        ContainerdError::new(ErrorKind::of_io(&e), format!("unpacking the container's writable layer into {upper}: {e}"))
    })
}

/// Sets the annotations that make the shim restore the container from `checkpoint`, with each option
/// annotation set to `true` when asked and removed otherwise.
fn annotate(spec: &mut serde_json::Value, checkpoint: &Source, options: &[(&str, bool)]) -> Result<(), ContainerdError> {
    let bad = || ContainerdError::new(ErrorKind::FailedPrecondition, "the recorded spec is not a JSON object with annotations");
    let annotations = spec.as_object_mut().ok_or_else(bad)?.entry("annotations").or_insert_with(|| serde_json::json!({}));
    let annotations = annotations.as_object_mut().ok_or_else(bad)?;
    annotations.insert(RESTORE_ANNOTATION.into(), checkpoint.display().into());
    for (name, on) in options {
        match on {
            true => annotations.insert(name.to_string(), "true".into()),
            false => annotations.remove(*name),
        };
    }
    Ok(())
}

/// The runtime options of the new container: the recorded root and cgroup driver, and no runtime binary, so
/// that our shim drives cedana-runc, which restores. Other runtimes get none.
fn restore_options(record: &Record, runtime: &str) -> Option<prost_types::Any> {
    if runtime != CEDANA_RUNTIME || (record.runc_root.is_empty() && !record.systemd_cgroup) {
        return None;
    }
    let options = Options { root: record.runc_root.clone(), systemd_cgroup: record.systemd_cgroup, ..Default::default() };
    Some(prost_types::Any { type_url: RUNC_OPTIONS_TYPE_URL.into(), value: options.encode_to_vec() })
}

/// What a restore (or a new container's creation) has created in containerd so far, removed again if it
/// fails.
pub(super) struct Created<'a> {
    pub(super) client: &'a Client,
    pub(super) id: &'a str,
    /// The snapshotter of a snapshot this operation prepared.
    pub(super) snapshot: Option<&'a str>,
    pub(super) container: bool,
}

impl Created<'_> {
    /// Removes the task, container and snapshot created (best effort: failures are logged).
    pub(super) fn undo(self) {
        if self.container {
            let _ = self.client.delete_task(self.id);
            if let Err(e) = self.client.delete_container(self.id) {
                tracing::warn!(error = %e, id = self.id, "removing the container of a failed restore");
            }
        }
        if let Some(snapshotter) = self.snapshot {
            if let Err(e) = self.client.remove_snapshot(snapshotter, self.id) {
                tracing::warn!(error = %e, id = self.id, "removing the snapshot of a failed restore");
            }
        }
    }
}
