//! `cedana restore ...`
//!
//! `restore process` asks the daemon when one answers on the configured socket (the restored tree is then
//! the daemon's child, reaped by it), and restores in this process otherwise. `--no-server` always restores
//! here, attached to this command unless `--detach`.
//!
//! Every restore prints its result through [`super::restore_report`] (text, or `--output json`).

use std::path::PathBuf;
use std::time::Instant;

use cedana::checkpoint::CheckpointKind;
use cedana::engine::{self, Engine, ProcessRestoreOptions, RestoreRequest, RestoreStdio, Source};

use super::output::{OutputArgs, Report};
use super::restore_report::{self, Restored, Stream};
use super::CriuFlags;

#[derive(clap::Subcommand, Debug)]
pub enum RestoreCommand {
    /// Restore a process checkpoint (through the daemon when it runs, unless --no-server).
    Process(ProcessArgs),
    /// Restore a runc checkpoint as a new runc container.
    Runc(RuncArgs),
    /// Restore a containerd checkpoint as a new containerd container (through the cedana shim).
    Containerd(super::containerd::RestoreArgs),
    /// Restore a managed job from its latest checkpoint (through the daemon).
    Job(JobArgs),
}

/// `--lazy`, `--lazy-fallback` and `--skip-gpu-check`, as the restore commands take them.
#[derive(clap::Args, Debug)]
pub struct RestoreFlags {
    /// Restore lazily: the program runs at once, its memory filled on demand (userfaultfd) and then in the
    /// background from the checkpoint (by the daemon, or by this command without one); returns once the
    /// memory is wholly local. Needs page images that can be read in pieces (a checkpoint of this version,
    /// in any compression) and a process or runc checkpoint.
    #[arg(long)]
    pub lazy: bool,
    /// Restore lazily where the checkpoint allows it, else normally (implies --lazy; what `restore.lazy = true`
    /// in the configuration makes the default).
    #[arg(long)]
    pub lazy_fallback: bool,
    /// Restore normally, whatever `restore.lazy` in the configuration says.
    #[arg(long, conflicts_with_all = ["lazy", "lazy_fallback"])]
    pub no_lazy: bool,
    /// Restore a checkpoint holding GPU state even on a host whose GPUs do not match it (fewer, with less
    /// memory, an older driver); the GPU restore may then fail, and the restored processes are killed.
    #[arg(long)]
    pub skip_gpu_check: bool,
}

impl RestoreFlags {
    /// Whether the restore is to be lazy, and whether a checkpoint that cannot be is restored normally:
    /// `--lazy` (strict), `--lazy-fallback`, `--no-lazy`, else the configuration's `restore.lazy` (with
    /// fallback: the default must not refuse checkpoints a normal restore takes).
    pub fn lazy_mode(&self, config: &cedana::config::Config) -> (bool, bool) {
        match (self.no_lazy, self.lazy, self.lazy_fallback) {
            (true, _, _) => (false, false),
            (_, true, fallback) => (true, fallback),
            (_, false, true) => (true, true),
            _ => (config.restore_lazy(), config.restore_lazy()),
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct JobArgs {
    /// The job's id (with --path: the id the restored job gets; default: the id of the job the checkpoint was
    /// made of).
    #[arg(required_unless_present = "path")]
    pub jid: Option<String>,
    /// Restore this checkpoint (a file, a folder or an object's URL) as a new job of this node, e.g. a job's
    /// checkpoint made on another node: the job gets its command line and origin from the checkpoint.
    #[arg(long, short = 'p')]
    pub path: Option<String>,
    /// With --path: where the restored job's output goes (default: nowhere, unless --attach).
    #[arg(long = "out", value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Attach to the restored job (it is restored attachable).
    #[arg(long)]
    pub attach: bool,
    #[command(flatten)]
    pub restore: RestoreFlags,
    #[command(flatten)]
    pub criu: CriuFlags,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// `cedana restore runc`: runc's flags and the report's format.
#[derive(clap::Args, Debug)]
pub struct RuncArgs {
    #[command(flatten)]
    pub runc: super::runc::RestoreArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// `cedana restore job JID`: the daemon restores the job's latest checkpoint as the same job; with `--path`,
/// that checkpoint as a new job (its id JID when given).
pub fn job(config: &cedana::config::Config, a: JobArgs) -> anyhow::Result<i32> {
    use cedana_protos::v1 as pb;
    let options = a.criu.to_options()?;
    let source = match (&a.path, &a.jid) {
        (Some(path), _) => pb::restore_request::Source::Path(super::dump::absolute_location(Some(path.as_str()))?),
        (None, Some(jid)) => pb::restore_request::Source::Jid(jid.clone()),
        // clap requires one of them.
        (None, None) => anyhow::bail!("give the job's id, or --path with a checkpoint"),
    };
    let log = match &a.out {
        Some(out) => std::path::absolute(out)?.display().to_string(),
        None => String::new(),
    };
    let (lazy, lazy_fallback) = a.restore.lazy_mode(config);
    let req = pb::RestoreRequest {
        source: Some(source),
        as_job: a.path.is_some(),
        new_jid: a.jid.clone().filter(|_| a.path.is_some()).unwrap_or_default(),
        log,
        criu: Some(crate::daemon::convert::criu_to_pb(&options, false)),
        attachable: a.attach,
        stream: a.criu.stream(),
        lazy,
        lazy_fallback,
        skip_gpu_check: a.restore.skip_gpu_check,
        ..Default::default()
    };
    let started = Instant::now();
    let out = super::jobs::with_daemon(config, async |c| c.restore(req).await.map(|r| r.into_inner()))?;
    let round_trip = started.elapsed();
    let jid = out.job.as_ref().map(|j| j.jid.clone()).or(a.jid.clone()).unwrap_or_default();
    if a.attach {
        return super::attach::attach_job(config, &jid);
    }
    let comm = comm_of(out.pid);
    let kind = match out.job.as_ref().map(|j| j.r#type()) {
        Some(pb::JobType::Runc) => CheckpointKind::Runc,
        Some(pb::JobType::Containerd) => CheckpointKind::Containerd,
        _ => CheckpointKind::Process,
    };
    let restored = Restored {
        job: Some(&jid),
        kind,
        ..Restored::of_daemon(out.pid, &comm, out.verify_time_us, out.criu_time_us, round_trip)
    }
    .with_lazy(out.lazy_time_us, out.lazy_pages);
    restore_report::print(&restored, Report::new(&a.output, config), Stream::Stdout);
    Ok(0)
}

/// The command name of a restored process, which /proc shows (the daemon's responses carry none).
fn comm_of(pid: i32) -> String {
    match std::fs::read_to_string(format!("/proc/{pid}/comm")) {
        Ok(c) => c.trim_end().to_string(),
        Err(_) => "exited".to_string(),
    }
}

#[derive(clap::Args, Debug)]
pub struct ProcessArgs {
    /// The checkpoint: a file (any compression, detected by content) or a folder.
    #[arg(long, short = 'p')]
    pub path: String,
    /// Restore as a child of this command, without the daemon even when it runs: wait for it, pass its
    /// stdio through, and exit with its exit code.
    #[arg(long)]
    pub no_server: bool,
    /// Return as soon as the process is restored, leaving it running in the background.
    #[arg(long)]
    pub detach: bool,
    /// Write the restored PID to this file.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// For detached restores: where standard streams that were pipes go (default /dev/null).
    #[arg(long = "log", value_name = "FILE")]
    pub log: Option<PathBuf>,
    /// CRIU --inherit-fd mappings, e.g. fd[1]:pipe:[1234] (repeatable). The fds are this command's, so
    /// such a restore always runs here, never in the daemon.
    #[arg(long, value_name = "MAP")]
    pub inherit_fd: Vec<String>,
    /// Reconnect a file the process held outside its mount namespace at dump time (its stdout on a host
    /// file, for a process started by `unshare --mount`) to another path: `FD=PATH` by its descriptor in
    /// the restored root (1 for stdout), or `OLD_PATH=PATH` (repeatable). The others go back to their
    /// original paths. A new file is extended with zeros to the size the original had (CRIU restores the
    /// process's own offset). Such a restore always runs here, never in the daemon.
    #[arg(long, value_name = "FROM=PATH", value_parser = cedana::checkpoint::external::FileRedirect::parse)]
    pub external_file: Vec<cedana::checkpoint::external::FileRedirect>,
    #[command(flatten)]
    pub restore: RestoreFlags,
    #[command(flatten)]
    pub criu: CriuFlags,
    #[command(flatten)]
    pub output: OutputArgs,
}

pub fn run(engine: &Engine, cmd: RestoreCommand) -> anyhow::Result<i32> {
    let a = match cmd {
        RestoreCommand::Process(a) => a,
        RestoreCommand::Runc(a) => return runc(engine, a),
        RestoreCommand::Containerd(a) => return super::containerd::restore(engine.config(), a),
        RestoreCommand::Job(a) => return job(engine.config(), a),
    };
    if !a.no_server && a.inherit_fd.is_empty() && a.external_file.is_empty() {
        if let Some(daemon) = super::dump::Daemon::probe(engine.config()) {
            return process_via_daemon(daemon, &a, engine.config());
        }
    }
    let attached = a.no_server && !a.detach;
    let mut options = a.criu.to_options()?;
    options.inherit_fd = a.inherit_fd.clone();
    let stdio =
        if attached { RestoreStdio::Inherit } else { a.log.clone().map(RestoreStdio::File).unwrap_or(RestoreStdio::Null) };
    let (lazy, lazy_fallback) = a.restore.lazy_mode(engine.config());
    let req = RestoreRequest {
        only: Some(CheckpointKind::Process),
        options,
        process: ProcessRestoreOptions { as_child: attached, stdio, pid_file: a.pid_file.clone() },
        external_files: a.external_file.clone(),
        stream: a.criu.stream(),
        lazy,
        lazy_fallback,
        skip_gpu_check: a.restore.skip_gpu_check,
        ..RestoreRequest::new(Source::parse(&a.path))
    };
    // An attached restore is cancelled by a signal until the tree runs; afterwards signals are forwarded.
    let ctx = super::op_context(attached)?;
    let out = engine.restore(req, &ctx)?;
    let restored = Restored::of_outcome(&out, &a.path, &ctx.timings());
    // Attached, the restored program has our stdout.
    let stream = if attached { Stream::Stderr } else { Stream::Stdout };
    restore_report::print(&restored, Report::new(&a.output, engine.config()), stream);
    if !attached {
        return Ok(0);
    }
    tracing::info!(pid = out.pid, "restored; waiting for it to exit");
    forward_signals(out.pid);
    Ok(engine::wait_for_exit(out.pid)?)
}

/// `cedana restore process --path P` run by a user other than root: through the daemon, which restores for
/// them only checkpoints it wrote for them (see `daemon::access`).
pub fn process_as_user(config: &cedana::config::Config, a: ProcessArgs) -> anyhow::Result<i32> {
    if !a.inherit_fd.is_empty() || !a.external_file.is_empty() {
        anyhow::bail!("--inherit-fd and --external-file need a restore in this command, which needs root: run it with sudo");
    }
    match super::dump::Daemon::probe(config) {
        Some(daemon) => process_via_daemon(daemon, &a, config),
        None => anyhow::bail!(
            "cedana restore needs root (CRIU does): run it with sudo, or through a daemon whose socket you may use \
             (daemon.socket_group)"
        ),
    }
}

/// `cedana restore process --path P` answered by the daemon: the same request with paths made absolute
/// (the daemon does not share our working folder), and the same summary line.
fn process_via_daemon(mut daemon: super::dump::Daemon, a: &ProcessArgs, config: &cedana::config::Config) -> anyhow::Result<i32> {
    use cedana_protos::v1 as pb;
    let absolute = |p: &PathBuf| std::path::absolute(p).map(|p| p.display().to_string());
    let options = a.criu.to_options()?;
    let (lazy, lazy_fallback) = a.restore.lazy_mode(config);
    let req = pb::RestoreRequest {
        source: Some(pb::restore_request::Source::Path(super::dump::absolute_location(Some(&a.path))?)),
        criu: Some(crate::daemon::convert::criu_to_pb(&options, false)),
        attachable: false,
        log: a.log.as_ref().map(absolute).transpose()?.unwrap_or_default(),
        pid_file: a.pid_file.as_ref().map(absolute).transpose()?.unwrap_or_default(),
        stream: a.criu.stream(),
        lazy,
        lazy_fallback,
        skip_gpu_check: a.restore.skip_gpu_check,
        ..Default::default()
    };
    tracing::info!(path = %a.path, socket = %daemon.socket.display(), "restoring through the daemon");
    let started = Instant::now();
    let out = daemon.call(async |c| c.restore(req).await.map(|r| r.into_inner())).map_err(super::dump::daemon_error)?;
    let round_trip = started.elapsed();
    // The response has no command name: the restored process has the checkpoint's, which /proc shows.
    let comm = comm_of(out.pid);
    let restored =
        Restored { path: Some(&a.path), ..Restored::of_daemon(out.pid, &comm, out.verify_time_us, out.criu_time_us, round_trip) }
            .with_lazy(out.lazy_time_us, out.lazy_pages);
    restore_report::print(&restored, Report::new(&a.output, config), Stream::Stdout);
    Ok(0)
}

/// `cedana restore runc`: the report goes to stderr, as the restored container writes to our stdout; an
/// attached restore reports once the container has exited, and exits with its code.
fn runc(engine: &Engine, a: RuncArgs) -> anyhow::Result<i32> {
    let req = super::runc::restore_request(&a.runc, engine.config())?;
    let ctx = super::op_context(false)?;
    let out = engine.restore(req, &ctx)?;
    let from = out.manifest.container.as_ref().map(|c| c.id.as_str()).unwrap_or("?");
    let restored = Restored { container: Some((&a.runc.id, from)), ..Restored::of_outcome(&out, &a.runc.path, &ctx.timings()) };
    restore_report::print(&restored, Report::new(&a.output, engine.config()), Stream::Stderr);
    Ok(out.exit_code.unwrap_or(0))
}

/// Pass SIGINT/SIGTERM/SIGHUP received by this command on to the restored process.
fn forward_signals(pid: i32) {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) else { return };
    let _ = std::thread::Builder::new().name("forward-signals".into()).spawn(move || {
        for sig in signals.forever() {
            if let Ok(sig) = nix::sys::signal::Signal::try_from(sig) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
            }
        }
    });
}
