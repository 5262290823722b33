//! `cedana dump runc` and `cedana restore runc`: runc containers, through the real runc.

use std::path::PathBuf;

use cedana::config::Config;
use cedana::engine::{self, DumpTarget, RuncRestoreRequest, RuncTarget};
use cedana::runc::{RestoreFlags, Runc};

use super::dump::CommonDumpArgs;
use super::ms;

/// runc's state folder flag, shared by dump and restore.
#[derive(clap::Args, Debug)]
pub struct RootArg {
    /// runc's state folder (`runc --root`); Docker's containers are under
    /// /run/docker/runtime-runc/moby (or EXEC_ROOT/runtime-<runtime>/moby).
    #[arg(long, default_value = cedana::runc::DEFAULT_ROOT)]
    pub root: PathBuf,
}

#[derive(clap::Args, Debug)]
pub struct DumpArgs {
    /// Id of the container (as `runc list` shows it).
    pub id: String,
    #[command(flatten)]
    pub root: RootArg,
    #[command(flatten)]
    pub common: CommonDumpArgs,
}

#[derive(clap::Args, Debug)]
pub struct RestoreArgs {
    /// The checkpoint (a `cedana dump runc` output, or one cedana-runc wrote for `docker checkpoint`).
    #[arg(long, short = 'p')]
    pub path: PathBuf,
    /// Id of the restored container (must not exist yet).
    #[arg(long)]
    pub id: String,
    /// Bundle of the restored container: its rootfs, and its config.json (the checkpoint's is written there
    /// if it has none).
    #[arg(long, short = 'b')]
    pub bundle: PathBuf,
    #[command(flatten)]
    pub root: RootArg,
    /// Return once the container runs (else wait for it to exit, and exit with its code).
    #[arg(long, short = 'd')]
    pub detach: bool,
    /// Write the restored container's PID to this file.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// Pass the pseudoterminal master of a terminal container to this AF_UNIX socket.
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// Restore established TCP connections (recorded at dump; needed only for checkpoints of other tools).
    #[arg(long)]
    pub tcp_established: bool,
}

/// `cedana dump runc`.
pub fn dump(config: &Config, a: &DumpArgs) -> anyhow::Result<engine::DumpRequest> {
    let runc = Runc::locate(Some(a.root.root.clone()))?;
    let target = RuncTarget { id: a.id.clone(), runc, work_path: None, extra_flags: Vec::new() };
    a.common.request(config, DumpTarget::Runc(target))
}

/// `cedana restore runc`.
pub fn restore(config: &Config, a: RestoreArgs) -> anyhow::Result<i32> {
    let runc = Runc::locate(Some(a.root.root.clone()))?;
    let mut extra = Vec::new();
    if a.tcp_established {
        extra.push("--tcp-established".into());
    }
    let flags = RestoreFlags {
        bundle: std::path::absolute(&a.bundle)?,
        work_path: None,
        detach: a.detach,
        pid_file: a.pid_file.clone(),
        console_socket: a.console_socket.clone(),
        extra,
    };
    let req = RuncRestoreRequest { path: a.path.clone(), id: a.id.clone(), runc, flags };
    let bar = cedana::progress::Bar::for_terminal();
    let out = engine::runc::restore(config, &req, &bar)?;
    if a.detach {
        // stderr: the restored container writes to our stdout.
        let from = out.manifest.container.as_ref().map(|c| c.id.as_str()).unwrap_or("?");
        eprintln!(
            "Restored container {} (checkpoint of {from}) from {} (verify {}, runc restore {})",
            a.id,
            a.path.display(),
            ms(out.verify_time),
            ms(out.restore_time)
        );
    }
    Ok(out.exit_code)
}
