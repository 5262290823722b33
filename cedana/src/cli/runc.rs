//! `cedana dump runc` and `cedana restore runc`: runc containers, through the real runc.

use std::path::PathBuf;

use cedana::checkpoint::CheckpointKind;
use cedana::engine::{self, ContainerRestore, Engine, RestoreRequest, RuncSpec, Source, TargetSpec};
use cedana::runc::RestoreFlags;

use super::dump::CommonDumpArgs;

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
    /// Dump in this command even when the daemon runs (the result is the same checkpoint).
    #[arg(long)]
    pub no_server: bool,
    #[command(flatten)]
    pub common: CommonDumpArgs,
}

#[derive(clap::Args, Debug)]
pub struct RestoreArgs {
    /// The checkpoint (a `cedana dump runc` output, or one cedana-runc wrote for `docker checkpoint`).
    #[arg(long, short = 'p')]
    pub path: String,
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
    /// Reconnect a file the container had open outside its mounts (e.g. its stdout redirected to a host
    /// file) to another path: `FD=PATH` (`1=/new/out.log`) or `OLD_PATH=PATH`; by default each goes back to
    /// the path it had. Repeatable.
    #[arg(long, value_name = "FROM=PATH", value_parser = cedana::checkpoint::external::FileRedirect::parse)]
    pub external_file: Vec<cedana::checkpoint::external::FileRedirect>,
    #[command(flatten)]
    pub restore: super::restore::RestoreFlags,
    #[command(flatten)]
    pub criu: super::CriuFlags,
}

/// `cedana dump runc`.
pub fn dump(engine: &Engine, a: &DumpArgs) -> anyhow::Result<engine::DumpRequest> {
    let spec =
        RuncSpec { id: a.id.clone(), runtime: None, root: Some(a.root.root.clone()), work_path: None, extra_flags: Vec::new() };
    a.common.request(engine, TargetSpec::Runc(spec))
}

/// The request of `cedana restore runc` (`super::restore` runs it and reports).
pub fn restore_request(a: &RestoreArgs, config: &cedana::config::Config) -> anyhow::Result<RestoreRequest> {
    let flags = RestoreFlags {
        bundle: std::path::absolute(&a.bundle)?,
        work_path: None,
        detach: a.detach,
        pid_file: a.pid_file.clone(),
        console_socket: a.console_socket.clone(),
        extra: Vec::new(),
        stdio: None,
    };
    let container = ContainerRestore { id: a.id.clone(), runtime: None, root: Some(a.root.root.clone()), flags };
    let (lazy, lazy_fallback) = a.restore.lazy_mode(config);
    let req = RestoreRequest {
        only: Some(CheckpointKind::Runc),
        options: a.criu.to_options()?,
        container: Some(container),
        external_files: a.external_file.clone(),
        lazy,
        lazy_fallback,
        skip_gpu_check: a.restore.skip_gpu_check,
        ..RestoreRequest::new(Source::parse(&a.path))
    };
    Ok(req)
}
