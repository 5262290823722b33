//! `cedana dump containerd` and `cedana restore containerd`: containers that containerd runs through the
//! runc shim or ours (the work itself is in [`crate::containerd`], shared with the daemon).

use std::path::PathBuf;

use cedana::engine::{Attachment, DumpRequest, Engine, Source, TargetSpec};
use cedana_protos::containerd::{DEFAULT_ADDRESS, DEFAULT_NAMESPACE};

use super::dump::CommonDumpArgs;
use crate::containerd::{prepare_dump, restore as restore_container, Client, RestoreSpec, Stdio, CEDANA_RUNTIME};

/// containerd's socket and namespace, shared by dump and restore.
#[derive(clap::Args, Debug)]
pub struct ContainerdArgs {
    /// containerd's socket.
    #[arg(long, short = 'a', default_value = DEFAULT_ADDRESS, env = "CONTAINERD_ADDRESS")]
    pub address: PathBuf,
    /// containerd's namespace (Kubernetes' is k8s.io).
    #[arg(long, short = 'n', default_value = DEFAULT_NAMESPACE, env = "CONTAINERD_NAMESPACE")]
    pub namespace: String,
}

#[derive(clap::Args, Debug)]
pub struct DumpArgs {
    /// Id of the container (as `ctr containers ls` shows it).
    pub id: String,
    #[command(flatten)]
    pub containerd: ContainerdArgs,
    /// Also keep the container's writable layer (files the program wrote into its rootfs).
    #[arg(long)]
    pub rootfs: bool,
    #[command(flatten)]
    pub common: CommonDumpArgs,
}

#[derive(clap::Args, Debug)]
pub struct RestoreArgs {
    /// The checkpoint (a `cedana dump containerd` output): a local path or an object-store URL.
    #[arg(long, short = 'p')]
    pub path: String,
    /// Id of the restored container (must not exist yet).
    #[arg(long)]
    pub id: String,
    /// Image whose layers the new container sits on (it must be unpacked in the namespace); the checkpointed
    /// container's by default.
    #[arg(long)]
    pub image: Option<String>,
    #[command(flatten)]
    pub containerd: ContainerdArgs,
    /// containerd runtime of the new container (it must restore from the `io.cedana.restore` annotation).
    #[arg(long, default_value = CEDANA_RUNTIME)]
    pub runtime: String,
    /// Return once the container runs (else wait for it to exit, with its output on ours, and exit with its
    /// code).
    #[arg(long, short = 'd')]
    pub detach: bool,
    /// Restore lazily: the container runs before its memory has arrived (the shim's cedana-runc serves the
    /// pages, and restores normally a checkpoint that cannot be lazy).
    #[arg(long)]
    pub lazy: bool,
    /// Restore a checkpoint holding GPU state even on a host whose GPUs do not match it.
    #[arg(long)]
    pub skip_gpu_check: bool,
}

/// `cedana dump containerd`: the runc checkpoint of the container, and the files to attach to it (its record,
/// and its writable layer with `--rootfs`).
pub fn dump(engine: &Engine, a: &DumpArgs) -> anyhow::Result<(DumpRequest, Vec<Attachment>)> {
    let client = Client::connect(&a.containerd.address, &a.containerd.namespace)?;
    let prepared = prepare_dump(&client, &a.id, a.rootfs)?;
    let req = a.common.request(engine, TargetSpec::Runc(prepared.spec))?;
    Ok((req, prepared.attachments))
}

/// `cedana restore containerd`.
pub fn restore(config: &cedana::config::Config, a: RestoreArgs) -> anyhow::Result<i32> {
    let path = match Source::parse(&a.path) {
        Source::Path(p) => Source::Path(std::path::absolute(p)?),
        url => url,
    };
    let client = Client::connect(&a.containerd.address, &a.containerd.namespace)?;
    // Attached: the shim opens our own stdout and stderr for the container.
    let me = std::process::id();
    let stdio = match a.detach {
        true => Stdio::default(),
        false => Stdio { stdin: String::new(), stdout: format!("/proc/{me}/fd/1"), stderr: format!("/proc/{me}/fd/2") },
    };
    let spec = RestoreSpec {
        checkpoint: &path,
        config,
        lazy: a.lazy || config.restore_lazy(),
        skip_gpu_check: a.skip_gpu_check,
        id: &a.id,
        image: a.image.as_deref(),
        runtime: &a.runtime,
        replace_stopped: false,
        stdio,
    };
    let restored = restore_container(&client, spec)?;
    if a.detach {
        eprintln!(
            "Restored container {} (PID {}, checkpoint of {}) in namespace {} from {}",
            a.id,
            restored.pid,
            restored.record.id,
            client.namespace(),
            path.display()
        );
        return Ok(0);
    }
    let code = client.wait_task(&a.id)?;
    client.delete_task(&a.id)?;
    Ok(code as i32)
}
