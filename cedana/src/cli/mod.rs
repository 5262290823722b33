//! The `cedana` command line: parses flags into engine requests and renders the results.

pub mod advice;
mod attach;
mod check;
mod check_full;
mod config;
mod containerd;
mod dump;
mod dump_report;
mod features;
mod inspect;
pub mod jobs;
mod output;
mod progress;
mod restore;
mod restore_report;
mod runc;
mod timings;

use cedana::cancel::Cancel;
use cedana::engine::{Engine, OpContext};
use clap::{Parser, Subcommand};

/// Checkpoint/restore for Linux processes and containers, built on CRIU.
#[derive(Parser, Debug)]
#[command(name = "cedana", version, about, propagate_version = true)]
pub struct Cli {
    /// Log level (error, warn, info, debug, trace); default: `log_level` in the config, or warn.
    #[arg(long, global = true)]
    pub log_level: Option<String>,
    /// Configuration file (default: $CEDANA_CONFIG, else /etc/cedana/config.toml when it exists).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Check that CRIU is installed, recent enough, and works on this kernel.
    Check(check::CheckArgs),
    /// Checkpoint a process or container.
    #[command(subcommand)]
    Dump(dump::DumpCommand),
    /// Restore a checkpoint.
    #[command(subcommand)]
    Restore(restore::RestoreCommand),
    /// Work with checkpoint files.
    #[command(subcommand)]
    Checkpoint(inspect::CheckpointCommand),
    /// Run or check the daemon.
    #[command(subcommand)]
    Daemon(jobs::DaemonCommand),
    /// Start a managed job (through the daemon).
    #[command(subcommand, alias = "exec")]
    Run(jobs::RunCommand),
    /// Adopt a running process as a managed job (through the daemon).
    #[command(subcommand)]
    Manage(jobs::ManageCommand),
    /// List managed jobs (as `cedana job list`).
    Ps,
    /// Managed jobs.
    #[command(subcommand)]
    Job(jobs::JobCommand),
    /// Attach to the attachable job whose process has this PID.
    Attach { pid: i32 },
    /// The configuration.
    #[command(subcommand)]
    Config(config::ConfigCommand),
    /// Which commands support which types (process, job, runc, containerd) and GPUs.
    Features,
}

/// Run the parsed command; returns the process exit code.
pub fn run(cli: Cli) -> anyhow::Result<i32> {
    let config = cedana::config::Config::load_from(cli.config.as_deref())?;
    if matches!(cli.command, Command::Check(_) | Command::Checkpoint(_) | Command::Config(_) | Command::Features) {
        quiet_on_broken_pipe();
    }
    match cli.command {
        Command::Check(args) => check::run(&config, args),
        Command::Dump(dump::DumpCommand::Job(a)) => dump::job(&config, a),
        Command::Restore(restore::RestoreCommand::Job(a)) => restore::job(&config, a),
        // Users other than root dump and restore processes through a daemon whose socket they may use.
        Command::Dump(dump::DumpCommand::Process(a)) if !is_root() && !a.no_server => dump::process_as_user(&config, a),
        Command::Restore(restore::RestoreCommand::Process(a)) if !is_root() && !a.no_server => {
            restore::process_as_user(&config, a)
        }
        Command::Dump(cmd) => {
            require_root("dump")?;
            let engine = Engine::new(config)?;
            dump::run(&engine, cmd)
        }
        Command::Restore(cmd) => {
            require_root("restore")?;
            let engine = Engine::new(config)?;
            restore::run(&engine, cmd)
        }
        Command::Checkpoint(cmd) => inspect::run(cmd),
        Command::Daemon(cmd) => jobs::daemon(config, cmd),
        Command::Run(cmd) => jobs::run(&config, cmd),
        Command::Manage(cmd) => jobs::manage(&config, cmd),
        Command::Ps => jobs::job(&config, jobs::JobCommand::List),
        Command::Job(cmd) => jobs::job(&config, cmd),
        Command::Attach { pid } => attach::attach_pid(&config, pid),
        Command::Config(cmd) => config::run(&config, cli.config.as_deref(), cmd),
        Command::Features => features::run(),
    }
}

/// The context of one operation: a progress bar on a terminal, and, when `cancel_on_signal`, SIGINT,
/// SIGTERM and SIGHUP cancel it at the next safe point (CRIU then resumes a frozen tree) instead of killing
/// this process.
fn op_context(cancel_on_signal: bool) -> anyhow::Result<OpContext> {
    let cancel = Cancel::new();
    if cancel_on_signal {
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM, signal_hook::consts::SIGHUP] {
            signal_hook::flag::register(sig, cancel.flag())?;
        }
    }
    Ok(OpContext::new().with_cancel(cancel).with_progress(std::sync::Arc::new(progress::Bar::for_terminal())))
}

/// CRIU needs root: say so before anything else fails in a less obvious way.
/// Let a closed stdout end this command quietly, as it ends `ls` or `cat` (`cedana ... | head`), instead of
/// a panic in `println!`. Called by commands that hold no sockets or children, and by the others once their
/// work is done and only their report is left to print (Rust ignores SIGPIPE by default, which the daemon and
/// the CRIU connection rely on).
pub(crate) fn quiet_on_broken_pipe() {
    // SAFETY: restoring the default disposition of SIGPIPE installs no handler.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

pub(crate) fn require_root(what: &str) -> anyhow::Result<()> {
    if !is_root() {
        anyhow::bail!("cedana {what} needs root (CRIU does): run it with sudo");
    }
    Ok(())
}

pub(crate) fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// CRIU options, taken by dump and restore alike (as `criu` does: an option that only matters at dump is
/// accepted and ignored by a restore).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct CriuFlags {
    /// Leave the process running after the checkpoint (dump only).
    #[arg(long)]
    pub leave_running: bool,
    /// Checkpoint/restore established TCP connections.
    #[arg(long)]
    pub tcp_established: bool,
    /// Do not checkpoint established TCP connections' state (dump); restore them closed (restore).
    #[arg(long)]
    pub tcp_close: bool,
    /// Skip in-flight TCP connections (dump only).
    #[arg(long)]
    pub skip_in_flight: bool,
    /// Checkpoint/restore file locks.
    #[arg(long)]
    pub file_locks: bool,
    /// The process was started from a shell (detected automatically at dump).
    #[arg(long)]
    pub shell_job: bool,
    /// Allow connections to unix sockets outside the tree.
    #[arg(long)]
    pub ext_unix_sk: bool,
    /// Checkpoint opened-but-deleted files through link remaps (dump only).
    #[arg(long)]
    pub link_remap: bool,
    /// Dump devices through any path that reaches them (dump only).
    #[arg(long)]
    pub evasive_devices: bool,
    /// Largest deleted file kept in the checkpoint, e.g. 10M (dump only).
    #[arg(long, value_name = "SIZE")]
    pub ghost_limit: Option<String>,
    /// Seconds to wait for the tree to freeze (dump only).
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<u32>,
    /// How to lock the network: iptables, nftables or skip.
    #[arg(long, value_name = "METHOD")]
    pub network_lock: Option<String>,
    /// Cgroup handling: none, props, soft, full, strict or ignore.
    #[arg(long, value_name = "MODE")]
    pub manage_cgroups: Option<String>,
    /// External resources, as CRIU's --external (repeatable).
    #[arg(long, value_name = "RES")]
    pub external: Vec<String>,
    /// Any other CRIU options, passed through (e.g. --criu-opts "--ghost-limit 10M").
    #[arg(long, value_name = "OPTS", allow_hyphen_values = true)]
    pub criu_opts: Option<String>,
    /// Stream images between CRIU and the archive, with no image files on disk (default: the configured
    /// checkpoint.stream, on). Process and job checkpoints stream in every archive format (tar, gzip, lz4,
    /// zlib, zstd).
    #[arg(long, overrides_with = "no_stream")]
    pub stream: bool,
    /// Have CRIU write image files (dump) or extract the archive (restore) instead of streaming.
    #[arg(long, overrides_with = "stream")]
    pub no_stream: bool,
}

impl CriuFlags {
    /// `--stream` / `--no-stream`, or `None` for the configured default.
    pub fn stream(&self) -> Option<bool> {
        match (self.stream, self.no_stream) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        }
    }

    fn to_options(&self) -> anyhow::Result<cedana::criu::options::CriuOptions> {
        let extra = match &self.criu_opts {
            Some(s) => cedana::criu::options::parse_extra(s).map_err(anyhow::Error::msg)?,
            None => Vec::new(),
        };
        Ok(cedana::criu::options::CriuOptions {
            tcp_established: self.tcp_established,
            tcp_close: self.tcp_close,
            skip_in_flight: self.skip_in_flight,
            file_locks: self.file_locks,
            shell_job: self.shell_job,
            ext_unix_sk: self.ext_unix_sk,
            link_remap: self.link_remap,
            external: self.external.clone(),
            inherit_fd: Vec::new(),
            extra,
            ghost_limit: self.ghost_limit.clone(),
            network_lock: self.network_lock.clone(),
            manage_cgroups: self.manage_cgroups.clone(),
            timeout: self.timeout,
            evasive_devices: self.evasive_devices,
        })
    }
}

/// Milliseconds with one decimal, for summaries.
pub fn ms(d: std::time::Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}
