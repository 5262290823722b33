//! The `cedana` command line: parses flags into engine requests and renders the results.

mod check;
mod dump;
mod inspect;
mod restore;
mod runc;

use clap::{Parser, Subcommand};

/// Checkpoint/restore for Linux processes and containers, built on CRIU.
#[derive(Parser, Debug)]
#[command(name = "cedana", version, about, propagate_version = true)]
pub struct Cli {
    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "warn", env = "CEDANA_LOG_LEVEL")]
    pub log_level: String,
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
}

/// Run the parsed command; returns the process exit code.
pub fn run(cli: Cli) -> anyhow::Result<i32> {
    let config = cedana::config::Config::load()?;
    match cli.command {
        Command::Check(args) => check::run(&config, args),
        Command::Dump(cmd) => {
            require_root("dump")?;
            dump::run(&config, cmd)
        }
        Command::Restore(cmd) => {
            require_root("restore")?;
            restore::run(&config, cmd)
        }
        Command::Checkpoint(cmd) => inspect::run(cmd),
    }
}

/// CRIU needs root: say so before anything else fails in a less obvious way.
fn require_root(what: &str) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        anyhow::bail!("cedana {what} needs root (CRIU does): run it with sudo");
    }
    Ok(())
}

/// Flags shared by dump and restore that map onto CRIU options.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct CriuFlags {
    /// Checkpoint/restore established TCP connections.
    #[arg(long)]
    pub tcp_established: bool,
    /// Checkpoint/restore file locks.
    #[arg(long)]
    pub file_locks: bool,
    /// The process was started from a shell (detected automatically at dump).
    #[arg(long)]
    pub shell_job: bool,
    /// Allow connections to unix sockets outside the tree.
    #[arg(long)]
    pub ext_unix_sk: bool,
    /// External resources, as CRIU's --external (repeatable).
    #[arg(long, value_name = "RES")]
    pub external: Vec<String>,
    /// Any other CRIU options, passed through (e.g. --criu-opts "--ghost-limit 10M").
    #[arg(long, value_name = "OPTS", allow_hyphen_values = true)]
    pub criu_opts: Option<String>,
}

impl CriuFlags {
    fn to_options(&self) -> anyhow::Result<cedana::criu::options::CriuOptions> {
        let extra = match &self.criu_opts {
            Some(s) => cedana::criu::options::parse_extra(s).map_err(anyhow::Error::msg)?,
            None => Vec::new(),
        };
        Ok(cedana::criu::options::CriuOptions {
            tcp_established: self.tcp_established,
            file_locks: self.file_locks,
            shell_job: self.shell_job,
            ext_unix_sk: self.ext_unix_sk,
            external: self.external.clone(),
            extra,
            ..Default::default()
        })
    }
}

/// Milliseconds with one decimal, for summaries.
pub fn ms(d: std::time::Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}
