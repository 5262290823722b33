//! The shim's process-level commands for containerd: `start` (spawn the long-lived shim and print its
//! address), `delete` (clean up after a shim that is gone), and serving the Task service.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::asynchronous::util::write_str_to_file;
use containerd_shim::asynchronous::{spawn, ExitSignal, Shim};
use containerd_shim::{Config, Flags, StartOpts};
use containerd_shim_protos::api::{DeleteResponse, Mount};
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::MessageField;

use crate::error::{Error, Result};
use crate::events::{EventSender, RemoteEvents};
use crate::oom::CgroupV1Oom;
use crate::reaper::Reaper;
use crate::runtime::{namespace_root, resolve_binary, RuncRuntime, ROOT_RECORD, RUNTIME_RECORD};
use crate::service::TaskService;
use crate::task::{RootfsMounter, TaskManager};

/// The runtime name containerd knows this shim by.
pub const RUNTIME_NAME: &str = "io.containerd.cedana.v2";

/// The shim configuration for the crate: no implicit `waitpid(-1)` reaper (ours reaps by PID).
pub fn config() -> Config {
    Config { no_reaper: true, ..Default::default() }
}

pub struct CedanaShim {
    id: String,
    namespace: String,
    bundle: PathBuf,
    exit: Arc<ExitSignal>,
}

/// Mounts with the crate's helper (flags and data parsed as containerd does), unmounts lazily.
pub struct SystemMounter;

impl RootfsMounter for SystemMounter {
    fn mount(&self, mounts: &[Mount], target: &Path) -> Result<()> {
        std::fs::create_dir_all(target)?;
        for m in mounts {
            let (fs_type, source) =
                (Some(m.type_.as_str()).filter(|s| !s.is_empty()), Some(m.source.as_str()).filter(|s| !s.is_empty()));
            containerd_shim::mount::mount_rootfs(fs_type, source, &m.options, target)
                .map_err(|e| Error::internal(format!("mounting the rootfs at {}: {e}", target.display())))?;
        }
        Ok(())
    }

    fn unmount(&self, target: &Path) -> Result<()> {
        match nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => Ok(()),
            Err(e) => Err(Error::internal(format!("unmounting {}: {e}", target.display()))),
        }
    }
}

#[async_trait]
impl Shim for CedanaShim {
    type T = TaskService<RuncRuntime>;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        let bundle =
            if args.bundle.is_empty() { std::env::current_dir().unwrap_or_default() } else { PathBuf::from(&args.bundle) };
        CedanaShim { id: args.id.clone(), namespace: args.namespace.clone(), bundle, exit: Arc::new(ExitSignal::default()) }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        let grouping = opts.id.clone();
        let address = spawn(opts, &grouping, Vec::new()).await?;
        write_str_to_file("address", &address).await?;
        Ok(address)
    }

    async fn delete_shim(&mut self) -> containerd_shim::Result<DeleteResponse> {
        let binary = std::fs::read_to_string(self.bundle.join(RUNTIME_RECORD))
            .map(|s| PathBuf::from(s.trim()))
            .unwrap_or_else(|_| resolve_binary(None));
        let root = std::fs::read_to_string(self.bundle.join(ROOT_RECORD))
            .map(|s| PathBuf::from(s.trim()))
            .unwrap_or_else(|_| namespace_root(None, &self.namespace));
        let out = std::process::Command::new(&binary)
            .arg("--root")
            .arg(root)
            .args(["delete", "--force", &self.id])
            .stdin(std::process::Stdio::null())
            .output();
        if let Some(out) = out.as_ref().ok().filter(|o| !o.status.success()) {
            log::warn!("{} delete {}: {}", binary.display(), self.id, String::from_utf8_lossy(&out.stderr).trim());
        }
        if let Err(e) = SystemMounter.unmount(&self.bundle.join("rootfs")) {
            log::warn!("{e}");
        }
        Ok(DeleteResponse { exit_status: 128 + 9, exited_at: MessageField::some(Timestamp::now()), ..Default::default() })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        let (reaper, exits) = Reaper::new();
        let runtime = RuncRuntime::new(&self.namespace, reaper.clone(), None);
        let events: Arc<dyn EventSender> = Arc::new(RemoteEvents::new(publisher, self.namespace.clone()));
        let manager = Arc::new(
            TaskManager::new(Arc::new(runtime), events.clone(), Arc::new(SystemMounter), self.exit.clone())
                .with_oom_watcher(Arc::new(CgroupV1Oom::new(events))),
        );
        manager.forward_exits(exits);
        tokio::spawn(reaper.run());
        TaskService { manager }
    }
}
