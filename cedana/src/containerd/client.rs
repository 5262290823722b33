//! [`Client`]: blocking calls to containerd's Containers, Tasks, Snapshots, Images and Content services over
//! its socket,
//! each scoped to one namespace. Errors say which call failed on which object, in containerd's words.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cedana::error::ErrorKind;
use cedana_protos::containerd::containers::containers_client::ContainersClient;
use cedana_protos::containerd::containers::{Container, CreateContainerRequest, DeleteContainerRequest, GetContainerRequest};
use cedana_protos::containerd::content::content_client::ContentClient;
use cedana_protos::containerd::content::ReadContentRequest;
use cedana_protos::containerd::images::images_client::ImagesClient;
use cedana_protos::containerd::images::GetImageRequest;
use cedana_protos::containerd::leases::leases_client::LeasesClient;
use cedana_protos::containerd::leases::{AddResourceRequest, CreateRequest, DeleteRequest, Resource};
use cedana_protos::containerd::snapshots::snapshots_client::SnapshotsClient;
use cedana_protos::containerd::snapshots::{MountsRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest};
use cedana_protos::containerd::task::Process;
use cedana_protos::containerd::tasks::tasks_client::TasksClient;
use cedana_protos::containerd::tasks::{CreateTaskRequest, DeleteTaskRequest, GetRequest, StartRequest, WaitRequest};
use cedana_protos::containerd::types::{Descriptor, Mount};
use cedana_protos::containerd::{with_namespace, LEASE_HEADER};
use tonic::transport::Channel;
use tonic::Code;

use super::ContainerdError;

type Result<T> = std::result::Result<T, ContainerdError>;

/// How long connecting to containerd may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection to containerd, for one namespace.
pub struct Client {
    runtime: tokio::runtime::Runtime,
    channel: Channel,
    namespace: String,
    address: PathBuf,
    /// The lease this client's calls hold what they create with (see [`Client::hold`]).
    lease: std::sync::Mutex<Option<String>>,
}

/// How long a lease outlives us if we die before deleting it (containerd then lets it expire).
const LEASE_EXPIRY: chrono::Duration = chrono::Duration::hours(1);

/// The stdio and rootfs of a new task.
#[derive(Debug, Default)]
pub struct NewTask {
    pub rootfs: Vec<Mount>,
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
}

impl Client {
    /// Connects to containerd's socket at `address`.
    pub fn connect(address: &Path, namespace: &str) -> Result<Client> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ContainerdError::new(ErrorKind::Internal, format!("starting an async runtime: {e}")))?;
        let endpoint = cedana_protos::uds_endpoint().connect_timeout(CONNECT_TIMEOUT);
        let channel = runtime.block_on(cedana_protos::connect_uds_with(endpoint, address)).map_err(|e| {
            ContainerdError::new(
                ErrorKind::Unavailable,
                format!(
                    "cannot reach containerd at {}: {} (is containerd running? give its socket with --address)",
                    address.display(),
                    source_message(&e)
                ),
            )
        })?;
        Ok(Client {
            runtime,
            channel,
            namespace: namespace.to_string(),
            address: address.to_path_buf(),
            lease: std::sync::Mutex::new(None),
        })
    }

    /// The namespace the calls are in.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    fn request<T>(&self, message: T) -> Result<tonic::Request<T>> {
        let mut request = with_namespace(&self.namespace, message)
            .map_err(|s| ContainerdError::new(ErrorKind::InvalidArgument, s.message()))?;
        if let Some(lease) = self.lease.lock().unwrap_or_else(|e| e.into_inner()).as_deref() {
            let value = lease.parse().map_err(|_| ContainerdError::new(ErrorKind::Internal, format!("lease id {lease:?}")))?;
            request.metadata_mut().insert(LEASE_HEADER, value);
        }
        Ok(request)
    }

    /// Runs `steps` under a lease, as containerd's own clients do: a snapshot prepared (or one named by
    /// `keep`) is safe from containerd's garbage collector until the container that will reference it exists.
    /// The lease is deleted afterwards (and expires by itself should we die first).
    pub fn hold<T>(&self, keep: Option<(&str, &str)>, steps: impl FnOnce() -> Result<T>) -> Result<T> {
        let id = format!("cedana-{}-{}", std::process::id(), chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default());
        let expire = (chrono::Utc::now() + LEASE_EXPIRY).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let labels = [("containerd.io/gc.expire".to_string(), expire)].into_iter().collect();
        let req = self.request(CreateRequest { id: id.clone(), labels })?;
        let mut leases = LeasesClient::new(self.channel.clone());
        self.runtime.block_on(leases.create(req)).map_err(|s| self.failed("creating lease", &id, s))?;
        *self.lease.lock().unwrap_or_else(|e| e.into_inner()) = Some(id.clone());
        let result = (|| {
            if let Some((snapshotter, key)) = keep {
                let resource = Resource { id: key.to_string(), r#type: format!("snapshots/{snapshotter}") };
                let req = self.request(AddResourceRequest { id: id.clone(), resource: Some(resource) })?;
                self.runtime.block_on(leases.add_resource(req)).map_err(|s| self.failed("holding snapshot", key, s))?;
            }
            steps()
        })();
        *self.lease.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let req = self.request(DeleteRequest { id: id.clone(), sync: false })?;
        if let Err(s) = self.runtime.block_on(leases.delete(req)) {
            tracing::warn!(lease = %id, error = %s.message(), "deleting a lease (it expires by itself)");
        }
        result
    }

    /// The container `id`; an error naming the namespace when it does not exist.
    pub fn container(&self, id: &str) -> Result<Container> {
        let req = self.request(GetContainerRequest { id: id.into() })?;
        let mut c = ContainersClient::new(self.channel.clone());
        match self.runtime.block_on(c.get(req)) {
            Ok(r) => r
                .into_inner()
                .container
                .ok_or_else(|| ContainerdError::new(ErrorKind::Internal, format!("containerd returned no container for {id}"))),
            Err(s) if s.code() == Code::NotFound => Err(ContainerdError::new(
                ErrorKind::NotFound,
                format!(
                    "container {id} not found in namespace {} of containerd at {} (see `ctr -n {} containers ls`)",
                    self.namespace,
                    self.address.display(),
                    self.namespace
                ),
            )),
            Err(s) => Err(self.failed("getting container", id, s)),
        }
    }

    /// Whether a container `id` exists.
    pub fn container_exists(&self, id: &str) -> Result<bool> {
        let req = self.request(GetContainerRequest { id: id.into() })?;
        let mut c = ContainersClient::new(self.channel.clone());
        match self.runtime.block_on(c.get(req)) {
            Ok(_) => Ok(true),
            Err(s) if s.code() == Code::NotFound => Ok(false),
            Err(s) => Err(self.failed("getting container", id, s)),
        }
    }

    /// The init process of the container's task, `None` when it has no task.
    pub fn task(&self, id: &str) -> Result<Option<Process>> {
        let req = self.request(GetRequest { container_id: id.into(), exec_id: String::new() })?;
        let mut c = TasksClient::new(self.channel.clone());
        match self.runtime.block_on(c.get(req)) {
            Ok(r) => Ok(r.into_inner().process),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(self.failed("getting the task of", id, s)),
        }
    }

    /// The root descriptor of image `name` (an index or a manifest); an error naming `ctr image pull` when
    /// the namespace has no such image.
    pub fn image(&self, name: &str) -> Result<Descriptor> {
        let req = self.request(GetImageRequest { name: name.into() })?;
        let mut c = ImagesClient::new(self.channel.clone());
        match self.runtime.block_on(c.get(req)) {
            Ok(r) => r.into_inner().image.and_then(|i| i.target).ok_or_else(|| {
                ContainerdError::new(ErrorKind::Internal, format!("containerd returned no target for image {name}"))
            }),
            Err(s) if s.code() == Code::NotFound => Err(ContainerdError::new(
                ErrorKind::NotFound,
                format!(
                    "image {name} not found in namespace {ns} of containerd at {}: pull it first (`ctr -n {ns} image pull \
                     {name}`; `ctr -n {ns} images ls` lists the images there)",
                    self.address.display(),
                    ns = self.namespace,
                ),
            )),
            Err(s) => Err(self.failed("getting image", name, s)),
        }
    }

    /// The blob `digest` of the content store, whole; refused when it is larger than `limit` bytes.
    pub fn read_content(&self, digest: &str, limit: usize) -> Result<Vec<u8>> {
        let req = self.request(ReadContentRequest { digest: digest.into(), offset: 0, size: 0 })?;
        let mut c = ContentClient::new(self.channel.clone());
        self.runtime.block_on(async {
            let mut stream = c.read(req).await.map_err(|s| self.read_failed(digest, s))?.into_inner();
            let mut data = Vec::new();
            while let Some(chunk) = stream.message().await.map_err(|s| self.read_failed(digest, s))? {
                data.extend_from_slice(&chunk.data);
                if data.len() > limit {
                    return Err(ContainerdError::new(
                        ErrorKind::FailedPrecondition,
                        format!("blob {digest} is larger than {limit} bytes: not an image manifest or configuration"),
                    ));
                }
            }
            Ok(data)
        })
    }

    fn read_failed(&self, digest: &str, s: tonic::Status) -> ContainerdError {
        if s.code() == Code::NotFound {
            return ContainerdError::new(
                ErrorKind::FailedPrecondition,
                format!(
                    "blob {digest} is missing from the content store of namespace {ns}: the image is incomplete (pull it \
                     again: `ctr -n {ns} image pull IMAGE`)",
                    ns = self.namespace
                ),
            );
        }
        self.failed("reading blob", digest, s)
    }

    /// Whether snapshot `key` exists in `snapshotter`.
    pub fn snapshot_exists(&self, snapshotter: &str, key: &str) -> Result<bool> {
        let req = self.request(StatSnapshotRequest { snapshotter: snapshotter.into(), key: key.into() })?;
        let mut c = SnapshotsClient::new(self.channel.clone());
        match self.runtime.block_on(c.stat(req)) {
            Ok(_) => Ok(true),
            Err(s) if s.code() == Code::NotFound => Ok(false),
            Err(s) => Err(self.failed("reading snapshot", key, s)),
        }
    }

    /// The parent of snapshot `key`.
    pub fn snapshot_parent(&self, snapshotter: &str, key: &str) -> Result<String> {
        let req = self.request(StatSnapshotRequest { snapshotter: snapshotter.into(), key: key.into() })?;
        let mut c = SnapshotsClient::new(self.channel.clone());
        let info = self.runtime.block_on(c.stat(req)).map_err(|s| self.failed("reading snapshot", key, s))?;
        Ok(info.into_inner().info.map(|i| i.parent).unwrap_or_default())
    }

    /// The mounts of snapshot `key`.
    pub fn mounts(&self, snapshotter: &str, key: &str) -> Result<Vec<Mount>> {
        let req = self.request(MountsRequest { snapshotter: snapshotter.into(), key: key.into() })?;
        let mut c = SnapshotsClient::new(self.channel.clone());
        Ok(self
            .runtime
            .block_on(c.mounts(req))
            .map_err(|s| self.failed("reading the mounts of snapshot", key, s))?
            .into_inner()
            .mounts)
    }

    /// A new writable snapshot `key` on `parent`; its mounts.
    pub fn prepare(&self, snapshotter: &str, key: &str, parent: &str) -> Result<Vec<Mount>> {
        let req = self.request(PrepareSnapshotRequest {
            snapshotter: snapshotter.into(),
            key: key.into(),
            parent: parent.into(),
            labels: Default::default(),
        })?;
        let mut c = SnapshotsClient::new(self.channel.clone());
        match self.runtime.block_on(c.prepare(req)) {
            Ok(r) => Ok(r.into_inner().mounts),
            Err(s) if s.code() == Code::NotFound => Err(ContainerdError::new(
                ErrorKind::FailedPrecondition,
                format!(
                    "the image layers the container ran on (snapshot {parent} of snapshotter {snapshotter}) are not in \
                     namespace {}: pull and unpack the container's image first (`ctr -n {} image pull IMAGE`)",
                    self.namespace, self.namespace
                ),
            )),
            Err(s) if s.code() == Code::AlreadyExists => Err(ContainerdError::new(
                ErrorKind::AlreadyExists,
                format!("snapshot {key} exists already in namespace {}", self.namespace),
            )),
            Err(s) => Err(self.failed("preparing snapshot", key, s)),
        }
    }

    pub fn remove_snapshot(&self, snapshotter: &str, key: &str) -> Result<()> {
        let req = self.request(RemoveSnapshotRequest { snapshotter: snapshotter.into(), key: key.into() })?;
        let mut c = SnapshotsClient::new(self.channel.clone());
        self.runtime.block_on(c.remove(req)).map_err(|s| self.failed("removing snapshot", key, s))?;
        Ok(())
    }

    pub fn create_container(&self, container: Container) -> Result<()> {
        let id = container.id.clone();
        let req = self.request(CreateContainerRequest { container: Some(container) })?;
        let mut c = ContainersClient::new(self.channel.clone());
        self.runtime.block_on(c.create(req)).map_err(|s| self.failed("creating container", &id, s))?;
        Ok(())
    }

    pub fn delete_container(&self, id: &str) -> Result<()> {
        let req = self.request(DeleteContainerRequest { id: id.into() })?;
        let mut c = ContainersClient::new(self.channel.clone());
        self.runtime.block_on(c.delete(req)).map_err(|s| self.failed("deleting container", id, s))?;
        Ok(())
    }

    /// Creates the container's task; its init PID.
    pub fn create_task(&self, id: &str, task: NewTask) -> Result<u32> {
        let req = self.request(CreateTaskRequest {
            container_id: id.into(),
            rootfs: task.rootfs,
            stdin: task.stdin,
            stdout: task.stdout,
            stderr: task.stderr,
            terminal: false,
            checkpoint: None,
            options: None,
        })?;
        let mut c = TasksClient::new(self.channel.clone());
        Ok(self.runtime.block_on(c.create(req)).map_err(|s| self.failed("creating the task of", id, s))?.into_inner().pid)
    }

    pub fn start_task(&self, id: &str) -> Result<u32> {
        let req = self.request(StartRequest { container_id: id.into(), exec_id: String::new() })?;
        let mut c = TasksClient::new(self.channel.clone());
        Ok(self.runtime.block_on(c.start(req)).map_err(|s| self.failed("starting the task of", id, s))?.into_inner().pid)
    }

    /// Waits for the task's init to exit; its exit status.
    pub fn wait_task(&self, id: &str) -> Result<u32> {
        let req = self.request(WaitRequest { container_id: id.into(), exec_id: String::new() })?;
        let mut c = TasksClient::new(self.channel.clone());
        Ok(self
            .runtime
            .block_on(c.wait(req))
            .map_err(|s| self.failed("waiting for the task of", id, s))?
            .into_inner()
            .exit_status)
    }

    pub fn delete_task(&self, id: &str) -> Result<()> {
        let req = self.request(DeleteTaskRequest { container_id: id.into() })?;
        let mut c = TasksClient::new(self.channel.clone());
        self.runtime.block_on(c.delete(req)).map_err(|s| self.failed("deleting the task of", id, s))?;
        Ok(())
    }

    fn failed(&self, what: &str, id: &str, s: tonic::Status) -> ContainerdError {
        let message =
            format!("containerd at {}: {what} {id} (namespace {}): {}", self.address.display(), self.namespace, s.message());
        ContainerdError::new(kind_of(s.code()), message)
    }
}

/// The kind of a containerd answer's code.
fn kind_of(code: Code) -> ErrorKind {
    match code {
        Code::NotFound => ErrorKind::NotFound,
        Code::InvalidArgument => ErrorKind::InvalidArgument,
        Code::FailedPrecondition => ErrorKind::FailedPrecondition,
        Code::AlreadyExists => ErrorKind::AlreadyExists,
        Code::ResourceExhausted => ErrorKind::ResourceExhausted,
        Code::Unavailable | Code::DeadlineExceeded => ErrorKind::Unavailable,
        Code::Cancelled => ErrorKind::Cancelled,
        Code::Unimplemented => ErrorKind::Unimplemented,
        _ => ErrorKind::Internal,
    }
}

/// The innermost message of an error chain (e.g. "No such file or directory" under tonic's wrapping).
fn source_message(e: &(dyn std::error::Error + 'static)) -> String {
    let mut last = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        last = s.to_string();
        cur = s.source();
    }
    last
}
