//! The commands served by the daemon: `run`, `manage`, `ps` / `job ...`, `dump job`, `restore job`, and
//! `daemon start|check`.

use std::path::PathBuf;

use cedana::config::Config;
use cedana_protos::v1 as pb;
use comfy_table::{presets::NOTHING, Table};

use crate::daemon;

#[derive(clap::Subcommand, Debug)]
pub enum DaemonCommand {
    /// Run the daemon in the foreground (as root; stop it with SIGTERM or Ctrl+C: managed jobs keep running).
    Start {
        /// Unix socket to listen on (default: `address` from the config, or /run/cedana.sock), or HOST:PORT when
        /// the protocol (config `protocol`, CEDANA_PROTOCOL) is tcp (default 127.0.0.1:8080).
        #[arg(long)]
        address: Option<String>,
    },
    /// Write a new token for the daemon on TCP (32 random bytes, hex) to the token file (config
    /// daemon.token_file, default /etc/cedana/token), mode 0600; the daemon reads it when it starts.
    Token {
        /// Write here instead of the configured token file.
        #[arg(long, value_name = "FILE")]
        file: Option<PathBuf>,
        /// Replace an existing token (restart the daemon, and clients then send the new one).
        #[arg(long)]
        force: bool,
    },
    /// Print the daemon's health (CRIU, database, storage, GPU); non-zero exit when something is wrong.
    Check,
}

#[derive(clap::Subcommand, Debug)]
pub enum RunCommand {
    /// Start a program as a managed job: cedana run process [--jid ID] -- PROGRAM ARGS...
    Process(RunArgs),
    /// Create and start a runc container as a managed job: cedana run runc --bundle DIR [--id ID] [--root R].
    /// The daemon runs `runc run --detach`; the job's PID is the container's init.
    Runc(RunRuncArgs),
    /// Create a containerd container from an image and start it as a managed job (as `ctr run --detach`
    /// does, on cedana's shim by default): cedana run containerd IMAGE [--id ID] [-- ARGS...]. The image
    /// must be pulled and unpacked in the namespace; the job's PID is the task's init, its output the log.
    Containerd(RunContainerdArgs),
}

#[derive(clap::Args, Debug)]
pub struct RunContainerdArgs {
    /// The image, as containerd names it (`ctr images ls`), e.g. docker.io/library/busybox:latest.
    pub image: String,
    /// Container id (default: the job id).
    #[arg(long)]
    pub id: Option<String>,
    /// Job id (default: a memorable random one).
    #[arg(long)]
    pub jid: Option<String>,
    #[command(flatten)]
    pub containerd: super::containerd::ContainerdArgs,
    /// containerd runtime (shim) of the container; cedana's shim by default, so that it can be restored.
    #[arg(long, default_value = crate::containerd::CEDANA_RUNTIME)]
    pub runtime: String,
    /// Set an environment variable in the container (KEY=VALUE; repeatable), over the image's.
    #[arg(long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Output file of the container's stdout and stderr (default /var/log/cedana-output-<JID>.log).
    #[arg(long = "out", value_name = "LOG")]
    pub out: Option<PathBuf>,
    /// Give the container FIFOs for stdin/stdout/stderr that the daemon holds, so clients can attach (its
    /// output also goes to the log; a stdio holder keeps them across a restart of the daemon).
    #[arg(long)]
    pub attachable: bool,
    /// Start it attachable and attach to it now (Ctrl+C detaches; the container keeps running).
    #[arg(long)]
    pub attach: bool,
    /// Write the container's init PID to this file.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// The program and its arguments (default: the image's entrypoint and command).
    #[arg(last = true)]
    pub args: Vec<String>,
}

#[derive(clap::Args, Debug)]
pub struct RunRuncArgs {
    /// The bundle: a folder holding the container's config.json and rootfs.
    #[arg(long, short = 'b')]
    pub bundle: PathBuf,
    /// Container id (default: the job id).
    #[arg(long)]
    pub id: Option<String>,
    /// runc's state folder (`runc --root`).
    #[arg(long, default_value = cedana::runc::DEFAULT_ROOT)]
    pub root: PathBuf,
    /// Job id (default: a memorable random one).
    #[arg(long)]
    pub jid: Option<String>,
    /// Accepted for runc's sake: a managed container always runs detached (the daemon keeps it).
    #[arg(long, short = 'd')]
    pub detach: bool,
    /// Give the container pipes for stdin/stdout/stderr that the daemon holds, so clients can attach (its
    /// output also goes to the log). Without this or --out they are /dev/null and no output is kept; a
    /// stdio holder keeps the pipes across a restart of the daemon.
    #[arg(long)]
    pub attachable: bool,
    /// Start it attachable and attach to it now (Ctrl+C detaches; the container keeps running).
    #[arg(long)]
    pub attach: bool,
    /// Keep the container's output in LOG (through pipes the daemon holds, as with --attachable; the log of
    /// an attachable container defaults to /var/log/cedana-output-<JID>.log).
    #[arg(long = "out", value_name = "LOG")]
    pub out: Option<PathBuf>,
    /// Write the container's init PID to this file.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// runc run --no-pivot (a rootfs on ramfs).
    #[arg(long)]
    pub no_pivot: bool,
    /// runc run --no-new-keyring.
    #[arg(long)]
    pub no_new_keyring: bool,
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Job id (default: a memorable random one).
    #[arg(long)]
    pub jid: Option<String>,
    /// Keep the job's stdin/stdout/stderr on pipes the daemon holds, so clients can attach later.
    #[arg(long)]
    pub attachable: bool,
    /// Start it attachable and attach to it now (Ctrl+C detaches; the job keeps running).
    #[arg(long)]
    pub attach: bool,
    /// Output file (default /var/log/cedana-output-<JID>.log).
    #[arg(long = "out", value_name = "LOG")]
    pub out: Option<PathBuf>,
    /// Write the job's PID to this file.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// The program and its arguments.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

/// `cedana manage TYPE ...`, or `cedana manage --upcoming TYPE ...` to wait for the workload to appear
/// (`--upcoming` is a flag-named subcommand holding the same types; `--upcoming` after the type works too).
#[derive(clap::Subcommand, Debug)]
pub enum ManageCommand {
    #[command(flatten)]
    Running(ManageTarget),
    /// Wait until a process or container appears, then adopt it: cedana manage --upcoming runc ID, or
    /// cedana manage --upcoming process --name COMM (blocks; Ctrl+C stops waiting).
    #[command(name = "upcoming", long_flag = "upcoming", subcommand)]
    Upcoming(ManageTarget),
}

#[derive(clap::Subcommand, Debug)]
pub enum ManageTarget {
    /// Adopt a running process as a managed job: by PID, or by command name (--name).
    Process {
        /// The process's PID.
        #[arg(required_unless_present = "name", conflicts_with = "name")]
        pid: Option<i32>,
        /// Adopt a process by its command name: the name /proc/PID/comm shows (the executable's file name,
        /// at most 15 characters), not its full command line or arguments. The first process of that name
        /// (lowest PID) that is not a job yet is adopted; with --upcoming, the command waits for one.
        #[arg(long, value_name = "COMM")]
        name: Option<String>,
        /// Job id (default: a memorable random one).
        #[arg(long)]
        jid: Option<String>,
        /// Wait until a process of that command name (--name) appears (blocks; Ctrl+C stops waiting).
        #[arg(long)]
        upcoming: bool,
    },
    /// Adopt a running runc container as a managed job (its init is the job's PID); with --upcoming, wait
    /// until it exists and runs.
    Runc {
        /// Id of the container (as `runc list` shows it).
        id: String,
        /// runc's state folder (`runc --root`).
        #[arg(long, default_value = cedana::runc::DEFAULT_ROOT)]
        root: PathBuf,
        /// Job id (default: a memorable random one).
        #[arg(long)]
        jid: Option<String>,
        /// Wait until the container exists and runs (blocks; Ctrl+C stops waiting).
        #[arg(long)]
        upcoming: bool,
    },
    /// Adopt a containerd container with a running task as a managed job (run by the runc shim or ours); with
    /// --upcoming, wait until its task runs. `dump job` checkpoints it; `restore job` restores it in place,
    /// on cedana's shim.
    Containerd {
        /// Id of the container (as `ctr containers ls` shows it).
        id: String,
        #[command(flatten)]
        containerd: super::containerd::ContainerdArgs,
        /// Job id (default: a memorable random one).
        #[arg(long)]
        jid: Option<String>,
        /// Wait until the container's task runs (blocks; Ctrl+C stops waiting).
        #[arg(long)]
        upcoming: bool,
    },
}

#[derive(clap::Subcommand, Debug)]
pub enum JobCommand {
    /// List managed jobs (as `cedana ps`).
    List,
    /// Everything the daemon knows about one job.
    Inspect { jid: String },
    /// Send a signal to a job (SIGKILL unless --signal).
    Kill {
        jid: String,
        #[arg(long, default_value_t = 9)]
        signal: i32,
    },
    /// Forget a job that is not running (its checkpoints stay on disk).
    Delete { jid: String },
    /// The checkpoints of a job, newest first.
    Checkpoints { jid: String },
    /// Attach to an attachable job's stdin/stdout/stderr (Ctrl+C detaches; the job keeps running).
    Attach { jid: String },
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

/// Run `f` against the daemon of this configuration (its Unix socket, or its TCP address with the token).
pub fn with_daemon<T>(
    config: &Config,
    f: impl AsyncFnOnce(&mut daemon::Client) -> Result<T, tonic::Status>,
) -> anyhow::Result<T> {
    let target = daemon::Target::of(config)?;
    runtime()?.block_on(async {
        let mut client = daemon::connect(target).await?;
        f(&mut client).await.map_err(status_error)
    })
}

/// A status from the daemon as an error for the user.
fn status_error(s: tonic::Status) -> anyhow::Error {
    match s.code() {
        tonic::Code::Unauthenticated => anyhow::anyhow!("{} (unauthenticated)", s.message()),
        code => anyhow::anyhow!("{} ({})", s.message(), daemon::convert::kind_of(code)),
    }
}

pub fn daemon(config: Config, cmd: DaemonCommand) -> anyhow::Result<i32> {
    match cmd {
        DaemonCommand::Start { address } => {
            super::require_root("daemon start")?;
            daemon::start(config, address)
        }
        DaemonCommand::Token { file, force } => {
            let path = file.unwrap_or_else(|| config.token_file());
            daemon::auth::generate(&path, force)?;
            println!("{}", path.display());
            Ok(0)
        }
        DaemonCommand::Check => {
            let health = with_daemon(&config, async |c| c.check(pb::CheckRequest {}).await.map(|r| r.into_inner()))?;
            let mut table = Table::new();
            table.load_style(NOTHING);
            table.set_header(["COMPONENT", "STATUS", "DETAIL"]);
            for c in &health.components {
                table.add_row([c.name.as_str(), if c.ok { "ok" } else { "FAILED" }, c.detail.as_str()]);
            }
            super::quiet_on_broken_pipe();
            println!("{table}");
            Ok(if health.components.iter().all(|c| c.ok) { 0 } else { 1 })
        }
    }
}

pub fn run(config: &Config, cmd: RunCommand) -> anyhow::Result<i32> {
    let (req, pid_file, attach) = match cmd {
        RunCommand::Process(a) => {
            let req = pb::RunRequest {
                jid: a.jid.clone().unwrap_or_default(),
                r#type: pb::JobType::Process as i32,
                args: a.args.clone(),
                attachable: a.attachable || a.attach,
                log: absolute_string(a.out.as_deref())?,
                cwd: std::env::current_dir()?.display().to_string(),
                ..Default::default()
            };
            (req, a.pid_file, a.attach)
        }
        RunCommand::Runc(a) => {
            let flags = [(a.no_pivot, "--no-pivot"), (a.no_new_keyring, "--no-new-keyring")];
            let req = pb::RunRequest {
                jid: a.jid.clone().unwrap_or_default(),
                r#type: pb::JobType::Runc as i32,
                args: flags.iter().filter(|(on, _)| *on).map(|(_, f)| f.to_string()).collect(),
                attachable: a.attachable || a.attach,
                log: absolute_string(a.out.as_deref())?,
                bundle: absolute_string(Some(&a.bundle))?,
                container_id: a.id.clone().unwrap_or_default(),
                runtime_root: absolute_string(Some(&a.root))?,
                ..Default::default()
            };
            (req, a.pid_file, a.attach)
        }
        RunCommand::Containerd(a) => {
            if let Some(bad) = a.env.iter().find(|e| e.split_once('=').is_none_or(|(k, _)| k.is_empty())) {
                anyhow::bail!("--env {bad:?} is not KEY=VALUE");
            }
            let req = pb::RunRequest {
                jid: a.jid.clone().unwrap_or_default(),
                r#type: pb::JobType::Containerd as i32,
                args: a.args.clone(),
                attachable: a.attachable || a.attach,
                log: absolute_string(a.out.as_deref())?,
                env: a.env.clone(),
                image: a.image.clone(),
                container_id: a.id.clone().unwrap_or_default(),
                runtime_root: absolute_string(Some(&a.containerd.address))?,
                namespace: a.containerd.namespace.clone(),
                runtime: a.runtime.clone(),
                ..Default::default()
            };
            (req, a.pid_file, a.attach)
        }
    };
    let started = std::time::Instant::now();
    let job = with_daemon(config, async |c| c.run(req).await.map(|r| r.into_inner()))?;
    let took = started.elapsed();
    if let Some(pf) = &pid_file {
        std::fs::write(pf, format!("{}\n", job.pid))?;
    }
    if attach {
        return super::attach::attach_job(config, &job.jid);
    }
    println!("{} {}", job.jid, job.pid);
    // The job id and PID stay the first line (scripts read them there); the timings follow, as Cedana's.
    if config.profiling_enabled() {
        print!("{}", super::timings::Timings { phases: Vec::new(), total: took }.render());
    }
    Ok(0)
}

/// A path as the daemon needs it (absolute: it has a working directory of its own), or "" for none.
fn absolute_string(p: Option<&std::path::Path>) -> anyhow::Result<String> {
    Ok(p.map(std::path::absolute).transpose()?.map(|p| p.display().to_string()).unwrap_or_default())
}

pub fn manage(config: &Config, cmd: ManageCommand) -> anyhow::Result<i32> {
    let (waits, target) = match cmd {
        ManageCommand::Running(t) => (false, t),
        ManageCommand::Upcoming(t) => (true, t),
    };
    let req = match target {
        ManageTarget::Process { pid, name, jid, upcoming } => {
            let upcoming = upcoming || waits;
            if upcoming && name.is_none() {
                anyhow::bail!(
                    "an upcoming process is waited for by its command name: cedana manage --upcoming process --name COMM"
                );
            }
            pb::ManageRequest {
                r#type: pb::JobType::Process as i32,
                jid: jid.unwrap_or_default(),
                pid: pid.unwrap_or_default(),
                name: name.unwrap_or_default(),
                upcoming,
                ..Default::default()
            }
        }
        ManageTarget::Runc { id, root, jid, upcoming } => pb::ManageRequest {
            r#type: pb::JobType::Runc as i32,
            jid: jid.unwrap_or_default(),
            container_id: id,
            runtime_root: absolute_string(Some(&root))?,
            upcoming: upcoming || waits,
            ..Default::default()
        },
        ManageTarget::Containerd { id, containerd, jid, upcoming } => pb::ManageRequest {
            r#type: pb::JobType::Containerd as i32,
            jid: jid.unwrap_or_default(),
            container_id: id,
            runtime_root: absolute_string(Some(&containerd.address))?,
            namespace: containerd.namespace,
            upcoming: upcoming || waits,
            ..Default::default()
        },
    };
    let job = with_daemon(config, async |c| c.manage(req).await.map(|r| r.into_inner()))?;
    println!("{} {}", job.jid, job.pid);
    Ok(0)
}

pub fn job(config: &Config, cmd: JobCommand) -> anyhow::Result<i32> {
    match cmd {
        JobCommand::List => {
            let list = with_daemon(config, async |c| c.list(pb::ListRequest {}).await.map(|r| r.into_inner()))?;
            print!("{}", jobs_table(&list.jobs, chrono::Utc::now().timestamp()));
        }
        JobCommand::Inspect { jid } => {
            let job = with_daemon(config, async |c| c.inspect(pb::JobRef { jid }).await.map(|r| r.into_inner()))?;
            println!("{job:#?}");
        }
        JobCommand::Kill { jid, signal } => {
            let job = with_daemon(config, async |c| c.kill(pb::KillRequest { jid, signal }).await.map(|r| r.into_inner()))?;
            println!("Sent signal {signal} to job {} (PID {})", job.jid, job.pid);
        }
        JobCommand::Delete { jid } => {
            let job = with_daemon(config, async |c| c.delete(pb::JobRef { jid }).await.map(|r| r.into_inner()))?;
            println!("Deleted job {}", job.jid);
        }
        JobCommand::Attach { jid } => return super::attach::attach_job(config, &jid),
        JobCommand::Checkpoints { jid } => {
            let list = with_daemon(config, async |c| c.checkpoints(pb::JobRef { jid }).await.map(|r| r.into_inner()))?;
            let mut table = Table::new();
            table.load_style(NOTHING);
            table.set_header(["ID", "TIME", "SIZE", "PATH"]);
            for cp in &list.checkpoints {
                let time = chrono::DateTime::from_timestamp(cp.time, 0).map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string());
                table.add_row([cp.id.clone(), time.unwrap_or_default(), human_size(cp.size), cp.path.clone()]);
            }
            super::quiet_on_broken_pipe();
            println!("{table}");
        }
    }
    Ok(0)
}

/// `cedana ps`: JOB TYPE PID STATUS GPU CHECKPOINT SIZE LOG, as Cedana prints it.
pub fn jobs_table(jobs: &[pb::Job], now: i64) -> String {
    let mut table = Table::new();
    table.load_style(NOTHING);
    table.set_header(["JOB", "TYPE", "PID", "STATUS", "GPU", "CHECKPOINT", "SIZE", "LOG"]);
    for j in jobs {
        let kind = match j.r#type() {
            pb::JobType::Process | pb::JobType::Unspecified => "process",
            pb::JobType::Runc => "runc",
            pb::JobType::Containerd => "containerd",
        };
        let (when, size) = match &j.latest_checkpoint {
            Some(cp) => (ago(now - cp.time), human_size(cp.size)),
            None => (String::new(), String::new()),
        };
        let log = if j.attachable { "[Attachable]".to_string() } else { j.log.clone() };
        table.add_row([
            j.jid.clone(),
            kind.to_string(),
            j.pid.to_string(),
            j.status.clone(),
            if j.gpu { "yes" } else { "no" }.to_string(),
            when,
            size,
            log,
        ]);
    }
    format!("{table}\n")
}

/// `3 seconds ago`, `5 minutes ago`, ...
pub fn ago(secs: i64) -> String {
    let secs = secs.max(0);
    let (n, unit) = match secs {
        0..60 => (secs, "second"),
        60..3600 => (secs / 60, "minute"),
        3600..86400 => (secs / 3600, "hour"),
        _ => (secs / 86400, "day"),
    };
    format!("{n} {unit}{} ago", if n == 1 { "" } else { "s" })
}

/// `610 KiB`, `1.2 GiB`: whole numbers below 10 units get one decimal.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 || value >= 10.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_sizes_read_as_cedana_prints_them() {
        assert_eq!(ago(3), "3 seconds ago");
        assert_eq!(ago(61), "1 minute ago");
        assert_eq!(ago(7200), "2 hours ago");
        assert_eq!(human_size(610 * 1024), "610 KiB");
        assert_eq!(human_size(1288490189), "1.2 GiB");
        assert_eq!(human_size(12), "12 B");
    }

    fn manage_of(args: &[&str]) -> ManageCommand {
        use clap::Parser;
        match crate::cli::Cli::try_parse_from(args).unwrap().command {
            crate::cli::Command::Manage(m) => m,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn upcoming_is_accepted_before_and_after_the_type() {
        let m = manage_of(&["cedana", "manage", "--upcoming", "runc", "c1", "--root", "/r"]);
        assert!(matches!(m, ManageCommand::Upcoming(ManageTarget::Runc { ref id, upcoming: false, .. }) if id == "c1"), "{m:?}");
        let m = manage_of(&["cedana", "manage", "runc", "--upcoming", "c1"]);
        assert!(matches!(m, ManageCommand::Running(ManageTarget::Runc { upcoming: true, .. })), "{m:?}");
        let m = manage_of(&["cedana", "manage", "--upcoming", "process", "--name", "nginx"]);
        assert!(matches!(m, ManageCommand::Upcoming(ManageTarget::Process { pid: None, name: Some(_), .. })), "{m:?}");
        let m = manage_of(&["cedana", "manage", "process", "42"]);
        assert!(matches!(m, ManageCommand::Running(ManageTarget::Process { pid: Some(42), name: None, upcoming: false, .. })));
        use clap::Parser;
        assert!(
            crate::cli::Cli::try_parse_from(["cedana", "manage", "process", "42", "--name", "x"]).is_err(),
            "a PID or a name"
        );
        assert!(crate::cli::Cli::try_parse_from(["cedana", "manage", "process"]).is_err(), "a PID or a name is needed");
    }

    #[test]
    fn the_table_has_cedanas_columns() {
        let job = pb::Job {
            jid: "famous_hopper7".into(),
            r#type: pb::JobType::Process as i32,
            pid: 32675,
            status: "halted".into(),
            latest_checkpoint: Some(pb::Checkpoint { time: 100, size: 610 * 1024, ..Default::default() }),
            attachable: true,
            ..Default::default()
        };
        let text = jobs_table(&[job], 103);
        let mut lines = text.lines();
        let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
        assert_eq!(header, ["JOB", "TYPE", "PID", "STATUS", "GPU", "CHECKPOINT", "SIZE", "LOG"]);
        let row = lines.next().unwrap();
        for field in ["famous_hopper7", "process", "32675", "halted", "no", "3 seconds ago", "610 KiB", "[Attachable]"] {
            assert!(row.contains(field), "{field} in {row}");
        }
    }
}
