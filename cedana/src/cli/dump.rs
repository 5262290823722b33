//! `cedana dump ...`
//!
//! `dump process` asks the daemon when one answers on the configured socket or TCP address (it then dumps, as
//! root, with its configuration's defaults), and dumps in this process otherwise or with `--no-server`. The
//! probe costs one `stat` when there is no socket (one refused connection on a local TCP port nobody listens
//! on), and never prints anything then.
//!
//! Every dump prints its result through [`super::dump_report`]: the path is the last field of the last line
//! (or `--output json`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use cedana::codec::Compression;
use cedana::engine::{Destination, DumpRequest, Engine, EngineError, TargetSpec};
use cedana::error::ErrorKind;
use cedana_protos::v1 as pb;

use super::dump_report::{self, Summary};
use super::output::{OutputArgs, Report};
use super::CriuFlags;

#[derive(clap::Subcommand, Debug)]
pub enum DumpCommand {
    /// Checkpoint a process tree by PID (through the daemon when it runs, unless --no-server).
    Process(ProcessArgs),
    /// Checkpoint a runc container (also Docker's) by id.
    Runc(super::runc::DumpArgs),
    /// Checkpoint a containerd container (run by the runc shim or cedana's) by id.
    Containerd(super::containerd::DumpArgs),
    /// Checkpoint a managed job (through the daemon).
    Job(JobArgs),
}

#[derive(clap::Args, Debug)]
pub struct JobArgs {
    /// The job's id.
    pub jid: String,
    /// A containerd job: also keep the container's writable layer.
    #[arg(long)]
    pub rootfs: bool,
    #[command(flatten)]
    pub common: CommonDumpArgs,
}

/// `cedana dump job JID`: the daemon checkpoints the job and records the checkpoint.
pub fn job(config: &cedana::config::Config, a: JobArgs) -> anyhow::Result<i32> {
    let options = a.common.criu.to_options()?;
    let req = pb::DumpRequest {
        target: Some(pb::dump_request::Target::Jid(a.jid.clone())),
        dir: absolute_location(a.common.dir.as_deref())?,
        name: a.common.name.clone().unwrap_or_default(),
        compression: a.common.compression.map(|c| c.to_string()).unwrap_or_default(),
        criu: Some(crate::daemon::convert::criu_to_pb(&options, a.common.criu.leave_running)),
        runtime_root: String::new(),
        overwrite: a.common.overwrite,
        rootfs: a.rootfs,
        stream: a.common.criu.stream(),
    };
    let out = super::jobs::with_daemon(config, async |c| c.dump(req).await.map(|r| r.into_inner()))?;
    let asked = a.common.compression.or_else(|| out.checkpoint.as_ref().and_then(|c| c.compression.parse().ok()));
    let summary = Summary { job: Some(&a.jid), ..Summary::of_response(&out, asked) };
    dump_report::print(&summary, Report::new(&a.common.output, config));
    Ok(0)
}

/// Flags of every dump.
#[derive(clap::Args, Debug)]
pub struct CommonDumpArgs {
    /// Parent folder of the checkpoint (default: the configured one, or /tmp).
    #[arg(long, short = 'd')]
    pub dir: Option<String>,
    /// Name of the checkpoint (default: dump-<type>-<id>-<time>).
    #[arg(long)]
    pub name: Option<String>,
    /// none | tar | gzip | lz4 | zlib | zstd (default: the configured one, or tar).
    #[arg(long, value_parser = parse_compression)]
    pub compression: Option<Compression>,
    /// Replace a checkpoint of the same name in the folder (else the dump is refused).
    #[arg(long)]
    pub overwrite: bool,
    #[command(flatten)]
    pub criu: CriuFlags,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(clap::Args, Debug)]
pub struct ProcessArgs {
    /// PID of the root of the tree to checkpoint.
    pub pid: i32,
    /// Dump in this command even when the daemon runs (the result is the same checkpoint).
    #[arg(long)]
    pub no_server: bool,
    #[command(flatten)]
    pub common: CommonDumpArgs,
}

fn parse_compression(s: &str) -> Result<Compression, String> {
    s.parse().map_err(|e: cedana::codec::CodecError| e.to_string())
}

impl CommonDumpArgs {
    pub(super) fn request(&self, engine: &Engine, target: TargetSpec) -> anyhow::Result<DumpRequest> {
        let config = engine.config();
        let destination = match &self.dir {
            Some(d) => Destination::parse(d),
            // The configured folder may be an object store too (`s3://bucket/prefix`).
            None => Destination::parse(&config.checkpoint_dir().to_string_lossy()),
        };
        let destination = if self.overwrite { destination.replacing() } else { destination };
        Ok(DumpRequest {
            target,
            destination,
            name: self.name.clone(),
            compression: self.compression.unwrap_or_else(|| config.compression()),
            leave_running: self.criu.leave_running,
            options: self.criu.to_options()?,
            stream: self.criu.stream(),
        })
    }
}

pub fn run(engine: &Engine, cmd: DumpCommand) -> anyhow::Result<i32> {
    let mut attachments = Vec::new();
    let (req, output) = match cmd {
        DumpCommand::Process(a) => {
            if !a.no_server {
                if let Some(daemon) = Daemon::probe(engine.config()) {
                    let target = pb::dump_request::Target::Pid(a.pid);
                    return via_daemon(daemon, target, String::new(), &a.common, engine.config());
                }
            }
            (a.common.request(engine, TargetSpec::Process { pid: a.pid })?, a.common.output)
        }
        DumpCommand::Runc(a) => {
            if !a.no_server {
                if let Some(daemon) = Daemon::probe(engine.config()) {
                    let target = pb::dump_request::Target::RuncId(a.id.clone());
                    let root = std::path::absolute(&a.root.root)?.display().to_string();
                    return via_daemon(daemon, target, root, &a.common, engine.config());
                }
            }
            (super::runc::dump(engine, &a)?, a.common.output)
        }
        DumpCommand::Containerd(a) => {
            let (req, attached) = super::containerd::dump(engine, &a)?;
            attachments = attached;
            (req, a.common.output)
        }
        DumpCommand::Job(a) => return job(engine.config(), a),
    };
    // A signal cancels the dump at the next safe point; CRIU then resumes the process.
    let ctx = super::op_context(true)?;
    let out = engine.dump_attaching(req, &attachments, &ctx)?;
    dump_report::print(&Summary::of_outcome(&out, &ctx.timings()), Report::new(&output, engine.config()));
    Ok(0)
}

/// `cedana dump process PID` run by a user other than root: through the daemon, which dumps only what that
/// user owns (see `daemon::access`).
pub fn process_as_user(config: &cedana::config::Config, a: ProcessArgs) -> anyhow::Result<i32> {
    match Daemon::probe(config) {
        Some(daemon) => via_daemon(daemon, pb::dump_request::Target::Pid(a.pid), String::new(), &a.common, config),
        None => anyhow::bail!(
            "cedana dump needs root (CRIU does): run it with sudo, or through a daemon whose socket you may use \
             (daemon.socket_group lets a group's members dump their own processes)"
        ),
    }
}

/// `cedana dump process PID` or `cedana dump runc ID` answered by the daemon: the same request, with paths made
/// absolute (the daemon does not share our working folder), and the same summary.
fn via_daemon(
    mut daemon: Daemon,
    target: pb::dump_request::Target,
    runtime_root: String,
    common: &CommonDumpArgs,
    config: &cedana::config::Config,
) -> anyhow::Result<i32> {
    let options = common.criu.to_options()?;
    let req = pb::DumpRequest {
        target: Some(target),
        dir: absolute_location(common.dir.as_deref())?,
        name: common.name.clone().unwrap_or_default(),
        compression: common.compression.map(|c| c.to_string()).unwrap_or_default(),
        criu: Some(crate::daemon::convert::criu_to_pb(&options, common.criu.leave_running)),
        runtime_root,
        overwrite: common.overwrite,
        rootfs: false,
        stream: common.criu.stream(),
    };
    tracing::info!(target = ?req.target, socket = %daemon.socket.display(), "dumping through the daemon");
    let out = daemon.call(async |c| c.dump(req).await.map(|r| r.into_inner())).map_err(daemon_error)?;
    dump_report::print(&Summary::of_response(&out, common.compression), Report::new(&common.output, config));
    Ok(0)
}

/// A path the user gave, made absolute against our working folder (and, for users other than root, without
/// symbolic links where it exists: the daemon follows none for them); URLs (`s3://...`) are kept.
pub(super) fn absolute_location(given: Option<&str>) -> anyhow::Result<String> {
    Ok(match given {
        Some(d) if !d.contains("://") && !super::is_root() && Path::new(d).exists() => {
            std::fs::canonicalize(d)?.display().to_string()
        }
        Some(d) if !d.contains("://") => std::path::absolute(d)?.display().to_string(),
        Some(d) => d.to_string(),
        None => String::new(),
    })
}

/// How long the probe waits for a daemon whose socket exists to answer a health check (a live daemon answers
/// in about a millisecond).
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// The daemon of this configuration, connected.
pub(super) struct Daemon {
    runtime: tokio::runtime::Runtime,
    client: crate::daemon::Client,
    /// Its socket or TCP address.
    pub(super) socket: crate::daemon::Target,
}

/// Why the probe found no daemon to ask.
enum Absent {
    /// Nobody listens (a socket left by a daemon that died): quietly work without it.
    Refused(tonic::transport::Error),
    /// Something listens but does not answer, or answers that it does not serve.
    NotAnswering(String),
    /// The daemon answers on TCP, but its token cannot be read here.
    NoToken(String),
}

impl Daemon {
    /// The daemon answering on the configured socket or TCP address, or `None` when there is none: no socket
    /// file (one `stat`, nothing printed), nobody listening (refused at once, nothing printed), or no healthy
    /// answer within [`PROBE_TIMEOUT`] (a warning; the command then works without the daemon). A daemon on TCP
    /// whose token this user cannot read is not asked either (a warning).
    pub(super) fn probe(config: &cedana::config::Config) -> Option<Daemon> {
        use std::os::unix::fs::FileTypeExt;
        let target = match crate::daemon::Target::of(config) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "no daemon to ask: working without it");
                return None;
            }
        };
        if let crate::daemon::Target::Unix(socket) = &target {
            if !std::fs::metadata(socket).is_ok_and(|m| m.file_type().is_socket()) {
                return None;
            }
        }
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
        let answered = runtime.block_on(async {
            match tokio::time::timeout(PROBE_TIMEOUT, Self::healthy(&target)).await {
                Ok(answer) => answer,
                Err(_) => Err(Absent::NotAnswering(format!("no answer within {PROBE_TIMEOUT:?}"))),
            }
        });
        match answered.and_then(|channel| target.client(channel).map_err(|e| Absent::NoToken(format!("{e:#}")))) {
            Ok(client) => Some(Daemon { runtime, client, socket: target }),
            Err(Absent::Refused(e)) => {
                tracing::debug!(socket = %target, error = %e, "no daemon listens: working without it");
                None
            }
            Err(Absent::NotAnswering(why)) => {
                tracing::warn!(socket = %target, "the daemon does not answer ({why}): working without it");
                None
            }
            Err(Absent::NoToken(why)) => {
                tracing::warn!(socket = %target, "the daemon answers, but {why}; working without it");
                None
            }
        }
    }

    /// Connect to `target` and ask the standard health service (open without a token) whether the daemon's
    /// API is served.
    async fn healthy(target: &crate::daemon::Target) -> Result<tonic::transport::Channel, Absent> {
        use tonic::server::NamedService;
        use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest};
        let channel = target.channel(Some(PROBE_TIMEOUT)).await.map_err(Absent::Refused)?;
        let service = <pb::daemon_server::DaemonServer<crate::daemon::service::Service> as NamedService>::NAME;
        let answer = HealthClient::new(channel.clone())
            .check(HealthCheckRequest { service: service.to_string() })
            .await
            .map_err(|s| Absent::NotAnswering(format!("health check: {}", s.message())))?;
        match answer.into_inner().status() {
            ServingStatus::Serving => Ok(channel),
            other => Err(Absent::NotAnswering(format!("{service} is {}", other.as_str_name()))),
        }
    }

    /// One call to the daemon.
    pub(super) fn call<T>(
        &mut self,
        f: impl AsyncFnOnce(&mut crate::daemon::Client) -> Result<T, tonic::Status>,
    ) -> Result<T, tonic::Status> {
        self.runtime.block_on(f(&mut self.client))
    }
}

/// A status from the daemon as an error for the user: the daemon's message and the kind, and the advice the
/// CLI gives for the same error of a local dump or restore, recognised by kind and message.
pub(super) fn daemon_error(s: tonic::Status) -> anyhow::Error {
    if s.code() == tonic::Code::Unauthenticated {
        return anyhow::anyhow!("{} (unauthenticated)", s.message());
    }
    let kind = crate::daemon::convert::kind_of(s.code());
    let message = s.message();
    match advice_like(kind, message) {
        Some(hint) => anyhow::anyhow!("{message} ({kind})\n  hint: {hint}"),
        None => anyhow::anyhow!("{message} ({kind})"),
    }
}

/// The advice for the library error the daemon's message stands for (one of the same variant: the advice
/// depends on the variant, not on its fields).
fn advice_like(kind: ErrorKind, message: &str) -> Option<String> {
    use cedana::checkpoint::{manifest::CheckpointKind, CheckpointError};
    use cedana::criu::CriuError;
    use cedana::procfs::ProcError;
    let path = PathBuf::new;
    let like = match kind {
        ErrorKind::FailedPrecondition if message.contains("another PID namespace") => {
            EngineError::Process(ProcError::OtherPidNamespace { pid: 0 })
        }
        ErrorKind::FailedPrecondition if message.contains("established TCP connections") => {
            EngineError::NeedsTcpEstablished { pid: 0, conns: String::new() }
        }
        ErrorKind::FailedPrecondition if message.contains("restores processes under their original PIDs") => {
            EngineError::PidInUse { pid: 0, comm: String::new() }
        }
        ErrorKind::FailedPrecondition if message.contains("is too old") => {
            EngineError::Criu(CriuError::TooOld { binary: path(), found: String::new() })
        }
        ErrorKind::Unavailable if message.contains("CRIU not found") => {
            EngineError::Criu(CriuError::NotFound { tried: String::new() })
        }
        ErrorKind::InvalidArgument if message.starts_with("invalid checkpoint name") => {
            EngineError::BadName { name: String::new(), reason: "" }
        }
        ErrorKind::InvalidArgument if message.contains(" checkpoint, not a ") => {
            let found = [CheckpointKind::Runc, CheckpointKind::Containerd, CheckpointKind::Process]
                .into_iter()
                .find(|k| message.contains(&format!(" holds a {k} checkpoint")))?;
            EngineError::WrongKind { path: path(), found, wanted: CheckpointKind::Process }
        }
        ErrorKind::ResourceExhausted if message.contains(" is full") => {
            EngineError::Checkpoint(CheckpointError::NoSpace { dir: path() })
        }
        ErrorKind::AlreadyExists if message.contains(" already exists") => {
            EngineError::Checkpoint(CheckpointError::Exists { path: path() })
        }
        ErrorKind::NotFound if message.contains("no checkpoint at ") => {
            EngineError::Checkpoint(CheckpointError::NotFound { path: path() })
        }
        _ => return None,
    };
    let text = super::advice::render(&anyhow::Error::new(like));
    text.rsplit_once("\n  hint: ").map(|(_, hint)| hint.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_daemon_error_keeps_its_message_and_kind_and_gets_the_local_advice() {
        let e = daemon_error(tonic::Status::already_exists("/tmp/x.tar already exists"));
        let text = super::super::advice::render(&e);
        assert!(text.starts_with("/tmp/x.tar already exists (already exists)\n  hint: "), "{text}");
        assert!(text.contains("choose another --name"), "{text}");
        let e = daemon_error(tonic::Status::failed_precondition(
            "PID 5 cannot be checkpointed: it runs in another PID namespace (a container?): checkpoint the container instead",
        ));
        assert!(format!("{e:#}").contains("cedana dump runc"), "{e:#}");
        let e = daemon_error(tonic::Status::invalid_argument("/c.tar holds a runc checkpoint, not a process one"));
        assert!(format!("{e:#}").contains("cedana restore runc"), "{e:#}");
        let e = daemon_error(tonic::Status::not_found("no checkpoint at /nope: check the path"));
        assert!(format!("{e:#}").contains("check the --path"), "{e:#}");
        let e = daemon_error(tonic::Status::internal("criu dump failed"));
        assert_eq!(format!("{e:#}"), "criu dump failed (internal)");
    }

    #[test]
    fn the_probe_is_quick_and_quiet_without_a_socket() {
        let dir = tempfile::tempdir().unwrap();
        let config =
            cedana::config::Config { address: Some(dir.path().join("none.sock").display().to_string()), ..Default::default() };
        let t = std::time::Instant::now();
        assert!(Daemon::probe(&config).is_none());
        // A socket file nobody listens on is refused at once.
        let listener = std::os::unix::net::UnixListener::bind(dir.path().join("dead.sock")).unwrap();
        drop(listener);
        let config =
            cedana::config::Config { address: Some(dir.path().join("dead.sock").display().to_string()), ..Default::default() };
        assert!(Daemon::probe(&config).is_none());
        assert!(t.elapsed() < Duration::from_millis(50), "{:?}", t.elapsed());
    }

    #[test]
    fn the_probe_of_a_tcp_port_nobody_listens_on_is_quick_and_quiet() {
        // A port that was free a moment ago: the connection is refused at once.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let config = cedana::config::Config {
            protocol: Some("tcp".into()),
            address: Some(format!("127.0.0.1:{port}")),
            ..Default::default()
        };
        let t = std::time::Instant::now();
        assert!(Daemon::probe(&config).is_none());
        assert!(t.elapsed() < Duration::from_millis(100), "{:?}", t.elapsed());
    }

    #[test]
    fn a_listener_that_does_not_answer_is_not_taken_for_a_daemon() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("mute.sock");
        // Connections are queued by the kernel but never served.
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let config = cedana::config::Config { address: Some(socket.display().to_string()), ..Default::default() };
        let t = std::time::Instant::now();
        assert!(Daemon::probe(&config).is_none());
        assert!(t.elapsed() < PROBE_TIMEOUT + Duration::from_millis(500), "{:?}", t.elapsed());
    }
}
