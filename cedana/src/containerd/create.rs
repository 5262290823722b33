//! [`create`]: a new container from an image, as `ctr run --detach` makes one: its snapshot prepared on the
//! image's layers, the container with a spec built from the image's configuration (its user looked up in
//! the snapshot's /etc/passwd and /etc/group), and its task created and started. A failure removes what
//! was created.

use cedana::error::ErrorKind;
use cedana_protos::containerd::containers::container::Runtime;
use cedana_protos::containerd::containers::Container;
use cedana_protos::containerd::types::Mount;
use cedana_protos::containerd::SPEC_TYPE_URL;

use super::image::{resolve, Image};
use super::restore::Created;
use super::spec::{build, SpecInput};
use super::users::resolve_in_snapshot;
use super::{Client, ContainerdError, NewTask, Stdio};

/// The snapshotter new containers use unless told otherwise (containerd's default).
pub const DEFAULT_SNAPSHOTTER: &str = "overlayfs";

/// The container to create.
#[derive(Debug, Clone)]
pub struct NewContainer<'a> {
    /// The image, as containerd names it (`ctr images ls`); it must be unpacked in `snapshotter`.
    pub image: &'a str,
    /// The container's id.
    pub id: &'a str,
    /// The containerd runtime (shim) that runs it.
    pub runtime: &'a str,
    pub snapshotter: &'a str,
    /// The program and its arguments; the image's entrypoint and command when empty.
    pub args: &'a [String],
    /// `KEY=VALUE` pairs set over the image's environment.
    pub env: &'a [String],
    /// The task's stdin, stdout and stderr (paths the shim opens; empty for /dev/null).
    pub stdio: Stdio,
}

/// A created and started container.
#[derive(Debug, Clone)]
pub struct Started {
    /// Its task's init.
    pub pid: u32,
    /// The process's arguments, as the spec gives them.
    pub args: Vec<String>,
}

/// Creates the container and starts its task; on failure, removes what it created.
pub fn create(client: &Client, new: NewContainer<'_>) -> Result<Started, ContainerdError> {
    let id = new.id;
    let namespace = client.namespace().to_string();
    if client.container_exists(id)? {
        return Err(ContainerdError::new(
            ErrorKind::AlreadyExists,
            format!("container {id} already exists in namespace {namespace}: choose another id (--id) or remove it"),
        ));
    }
    let image = resolve(client, new.image)?;
    if !client.snapshot_exists(new.snapshotter, &image.chain_id)? {
        return Err(ContainerdError::new(
            ErrorKind::FailedPrecondition,
            format!(
                "image {} is not unpacked for snapshotter {} in namespace {namespace} (no snapshot {}): pull it with \
                 `ctr -n {namespace} image pull --snapshotter {} {}` (or import it with `ctr image import`)",
                new.image, new.snapshotter, image.chain_id, new.snapshotter, new.image
            ),
        ));
    }
    // Under a lease, as containerd's clients do: the snapshot is safe from the garbage collector until the
    // container that references it exists.
    client.hold(None, || {
        let mounts = client.prepare(new.snapshotter, id, &image.chain_id)?;
        start(client, &new, &image, &namespace, mounts)
    })
}

/// Builds the spec of the container on its prepared snapshot (whose mounts are `mounts`), creates the
/// container and starts its task; on failure, removes both.
fn start(
    client: &Client,
    new: &NewContainer<'_>,
    image: &Image,
    namespace: &str,
    mounts: Vec<Mount>,
) -> Result<Started, ContainerdError> {
    let id = new.id;
    let mut created = Created { client, id, snapshot: Some(new.snapshotter), container: false };
    let result = (|| {
        // As `ctr run` does, the image's user is looked up in the container's own snapshot, always (an
        // image without a user still gets root's additional groups).
        let user = resolve_in_snapshot(image.config.user.as_deref().unwrap_or_default(), new.image, &mounts)?;
        let spec = build(SpecInput { id, namespace, image: &image.config, args: new.args, env: new.env, user: &user })?;
        let args = spec["process"]["args"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
            .unwrap_or_default();
        let spec = serde_json::to_vec(&spec)
            .map_err(|e| ContainerdError::new(ErrorKind::Internal, format!("encoding the spec of container {id}: {e}")))?;
        client.create_container(Container {
            id: id.to_string(),
            labels: Default::default(),
            image: new.image.to_string(),
            runtime: Some(Runtime { name: new.runtime.to_string(), options: None }),
            spec: Some(prost_types::Any { type_url: SPEC_TYPE_URL.into(), value: spec }),
            snapshotter: new.snapshotter.to_string(),
            snapshot_key: id.to_string(),
        })?;
        created.container = true;
        let task = NewTask {
            rootfs: mounts,
            stdin: new.stdio.stdin.clone(),
            stdout: new.stdio.stdout.clone(),
            stderr: new.stdio.stderr.clone(),
        };
        client.create_task(id, task)?;
        client.start_task(id).map(|pid| Started { pid, args })
    })();
    if result.is_err() {
        created.undo();
    }
    result
}
