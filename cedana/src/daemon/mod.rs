//! The daemon: `cedana daemon start` serves the gRPC API on a Unix socket (0600, root only), or with
//! `protocol = "tcp"` on `HOST:PORT`, where every call but the health check needs the bearer token of a
//! root-only file ([`auth`]); with the standard health and reflection services. It owns the job store and the supervisor of managed jobs, and is
//! a child subreaper (restored trees are its children). SIGTERM or SIGINT stops it cleanly; managed jobs run
//! in sessions of their own and keep running; a restarted daemon finds them again in the store.

pub mod access;
pub mod attach;
pub mod auth;
mod checkpoint;
pub mod convert;
mod health;
mod jobs;
mod manage;
mod recover;
mod run;
pub mod service;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use cedana::config::{Config, DaemonAddress};
use cedana::engine::Engine;
use cedana::jobs::holder::{HolderConfig, HolderError};
use cedana::jobs::model::{Job, JobState};
use cedana::jobs::store::JobStore;
use cedana::jobs::supervisor::{Supervisor, SupervisorConfig, SupervisorError};
use cedana_protos::v1::daemon_client::DaemonClient;
use cedana_protos::v1::daemon_server::DaemonServer;
use cedana_protos::BearerToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// Where the daemon listens, with what it needs there.
enum Listen {
    /// The Unix socket: root's alone (0600), or with a group's members too (0660; see [`access`]).
    Unix(PathBuf, Option<nix::unistd::Gid>),
    /// `HOST:PORT`; every call but the health check must carry the token.
    Tcp { address: String, access: auth::RequireToken },
}

/// Run the daemon until SIGTERM/SIGINT. `address` (`--address`) replaces the configured one: a socket path,
/// or `HOST:PORT` when the protocol is `tcp`.
pub fn start(mut config: Config, address: Option<String>) -> anyhow::Result<i32> {
    if let Some(a) = address {
        config.address = Some(a);
    }
    // Checked first: a daemon that cannot be reached safely does not start at all.
    let listen = match config.daemon_address()? {
        DaemonAddress::Unix(socket) => Listen::Unix(socket, socket_group(&config)?),
        DaemonAddress::Tcp(address) => {
            let file = config.token_file();
            let token = auth::Token::load_for_server(&file).context("the daemon listens on TCP only with a token")?;
            Listen::Tcp { address, access: auth::RequireToken::new(token, file) }
        }
    };
    cedana::codec::pool::map_large_allocations();
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes plain integers and touches no memory of ours.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error()).context("becoming a child subreaper");
    }
    let db = config.db_path();
    let store = JobStore::open(&db).with_context(|| format!("opening the job store {}", db.display()))?;
    let engine = Engine::new(config)?;
    let (events_tx, events) = std::sync::mpsc::channel();
    let holder = holder_config(&db)?;
    let supervisor =
        Supervisor::with_config(events_tx, SupervisorConfig { holder: Some(holder), ..SupervisorConfig::default() })?;
    let serials = service::Serials::default();
    let registering = service::Registering::default();
    readopt(&store, &supervisor, &serials);
    recover::halted_but_running(&store, &supervisor, &serials);
    {
        let (store, serials, registering) = (store.clone(), serials.clone(), registering.clone());
        std::thread::Builder::new()
            .name("job-exits".into())
            .spawn(move || service::follow_exits(store, serials, registering, events))?;
    }
    let service = service::Service { engine, store, supervisor, log_dir: PathBuf::from(service::LOG_DIR), serials, registering };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(serve(service, listen))?;
    Ok(0)
}

/// Where the stdio holders of attachable jobs ([`cedana::jobs::holder`]) are started from and keep their
/// sockets: `stdio/` next to the job store, root-only; sockets of holders that are gone are removed.
fn holder_config(db: &Path) -> anyhow::Result<HolderConfig> {
    let exe = std::env::current_exe().context("finding the cedana binary (for the jobs' stdio holders)")?;
    let dir = db.parent().unwrap_or(Path::new("/")).join("stdio");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("making {} root-only", dir.display()))?;
    cedana::jobs::holder::sweep(&dir);
    Ok(HolderConfig { exe, dir })
}

/// Jobs the store says run: watch those still alive, mark the others lost.
fn readopt(store: &JobStore, supervisor: &Supervisor, serials: &service::Serials) {
    let Ok(jobs) = store.list() else { return };
    for job in jobs.into_iter().filter(|j| j.state == JobState::Running) {
        let alive = cedana::procfs::stat(job.pid).map(|s| !s.is_zombie()).unwrap_or(false);
        if alive {
            if let Ok(serial) = supervise_again(supervisor, &job) {
                service::track(serials, job.pid, serial);
                tracing::info!(jid = %job.jid, pid = job.pid, "re-adopted a running job");
                continue;
            }
        }
        tracing::info!(jid = %job.jid, pid = job.pid, "a job's process is gone: marking it lost");
        let _ = store.set_state(&job.jid, JobState::Lost, None);
    }
}

/// Follow a job the daemon started before it restarted: an attachable job gets its pipes back from its
/// stdio holder (so clients can attach again, and its log goes on through the daemon); any other job, or
/// one whose holder is gone, is watched.
pub(super) fn supervise_again(supervisor: &Supervisor, job: &Job) -> Result<u64, SupervisorError> {
    // Jobs on pipes (attachable ones, runc jobs with a log) have a holder; others have none.
    match supervisor.reattach(job.pid, job.log.as_deref()) {
        Ok(serial) => return Ok(serial),
        Err(SupervisorError::Holder(HolderError::NotFound { .. })) if !job.attachable => {}
        Err(e) => tracing::warn!(
            jid = %job.jid, pid = job.pid, error = %e,
            "cannot take the job's pipes back: it is followed, but clients cannot attach to it"
        ),
    }
    supervisor.watch(job.pid)
}

/// What the daemon listens on, bound.
enum Listener {
    Unix(tokio::net::UnixListener, PathBuf),
    Tcp(tokio::net::TcpListener),
}

async fn serve(service: service::Service, listen: Listen) -> anyhow::Result<()> {
    // On the Unix socket the mode is the access control; on TCP the token is (the health check stays open:
    // clients probe with it).
    let (listener, access) = match listen {
        Listen::Unix(socket, group) => {
            let listener = bind(&socket, group).await?;
            tracing::info!(socket = %socket.display(), group = ?group.map(|g| g.as_raw()), "cedana daemon listening");
            (Listener::Unix(listener, socket), None)
        }
        Listen::Tcp { address, access } => {
            let listener = tokio::net::TcpListener::bind(&address).await.with_context(|| {
                format!("listening on {address} (tcp): is the port taken, or the host not an address of this machine?")
            })?;
            let local = listener.local_addr()?;
            if local.ip().is_loopback() {
                tracing::info!(address = %local, "cedana daemon listening on tcp; calls need the token");
            } else {
                tracing::warn!(
                    address = %local,
                    "cedana daemon listening on tcp beyond loopback: traffic (the token too) is plaintext, use \
                     127.0.0.1 or an encrypted tunnel"
                );
            }
            (Listener::Tcp(listener), Some(access))
        }
    };
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<DaemonServer<service::Service>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(cedana_protos::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let guard = Guard(access);
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
        tracing::info!("shutting down; managed jobs keep running");
    };
    let router = tonic::transport::Server::builder()
        .add_service(health)
        .add_service(InterceptedService::new(reflection, guard.clone()))
        .add_service(DaemonServer::with_interceptor(service, guard));
    match listener {
        Listener::Unix(listener, socket) => {
            let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
            router.serve_with_incoming_shutdown(incoming, shutdown).await?;
            let _ = std::fs::remove_file(socket);
        }
        Listener::Tcp(listener) => {
            let incoming = tokio_stream::StreamExt::map(tokio_stream::wrappers::TcpListenerStream::new(listener), |conn| {
                // Small requests and answers: send them at once.
                if let Ok(stream) = &conn {
                    let _ = stream.set_nodelay(true);
                }
                conn
            });
            router.serve_with_incoming_shutdown(incoming, shutdown).await?;
        }
    }
    Ok(())
}

/// The access check of the daemon's services: none on the Unix socket, the token on TCP.
#[derive(Clone)]
struct Guard(Option<auth::RequireToken>);

impl tonic::service::Interceptor for Guard {
    fn call(&mut self, request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        match &mut self.0 {
            Some(check) => check.call(request),
            None => Ok(request),
        }
    }
}

/// The group `daemon.socket_group` names (a name or a number), if any.
fn socket_group(config: &Config) -> anyhow::Result<Option<nix::unistd::Gid>> {
    let Some(name) = config.daemon.socket_group.as_deref().filter(|g| !g.is_empty()) else { return Ok(None) };
    if let Ok(n) = name.parse::<u32>() {
        return Ok(Some(nix::unistd::Gid::from_raw(n)));
    }
    match nix::unistd::Group::from_name(name) {
        Ok(Some(g)) => Ok(Some(g.gid)),
        Ok(None) => anyhow::bail!("daemon.socket_group: there is no group {name:?} (create it with groupadd, or unset the key)"),
        Err(e) => anyhow::bail!("daemon.socket_group: looking up group {name:?}: {e}"),
    }
}

/// Listen on `socket`: root only, or with `group` its members too. A socket left by a daemon that died is
/// replaced; one a live daemon answers on is not.
async fn bind(socket: &Path, group: Option<nix::unistd::Gid>) -> anyhow::Result<tokio::net::UnixListener> {
    if socket.exists() {
        if tokio::net::UnixStream::connect(socket).await.is_ok() {
            anyhow::bail!("a daemon already listens on {}", socket.display());
        }
        std::fs::remove_file(socket).with_context(|| format!("removing the stale socket {}", socket.display()))?;
    }
    if let Some(parent) = socket.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    // Bound under a private name, given its group and mode, then renamed into place: the socket never
    // appears at its path with another mode, so a client that finds it finds it as it stays.
    let staged = socket.with_file_name(format!(
        ".{}.{}",
        socket.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&staged);
    let listener = tokio::net::UnixListener::bind(&staged).with_context(|| format!("listening on {}", staged.display()))?;
    let placed = (|| -> anyhow::Result<()> {
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))?;
        if let Some(gid) = group {
            // The group first, then the mode: never open to a group that is not yet the right one.
            nix::unistd::chown(&staged, None, Some(gid))
                .with_context(|| format!("giving {} to group {gid}", socket.display()))?;
            std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o660))?;
        }
        std::fs::rename(&staged, socket).with_context(|| format!("placing the socket at {}", socket.display()))?;
        Ok(())
    })();
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&staged);
        return Err(e);
    }
    Ok(listener)
}

/// A client of the daemon; over TCP every request carries the token.
pub type Client = DaemonClient<InterceptedService<Channel, BearerToken>>;

/// Where a client finds the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The Unix socket.
    Unix(PathBuf),
    /// `HOST:PORT`, with the file holding the token to send.
    Tcp { address: String, token_file: PathBuf },
}

impl Target {
    /// The daemon of `config` (its protocol, address and token file).
    pub fn of(config: &Config) -> Result<Target, cedana::config::ConfigError> {
        Ok(match config.daemon_address()? {
            DaemonAddress::Unix(socket) => Target::Unix(socket),
            DaemonAddress::Tcp(address) => Target::Tcp { address, token_file: config.token_file() },
        })
    }

    /// The address, for messages and logs.
    pub fn display(&self) -> &Self {
        self
    }

    /// A channel to the daemon; `connect_timeout` bounds the connection (not the calls).
    pub async fn channel(&self, connect_timeout: Option<std::time::Duration>) -> Result<Channel, tonic::transport::Error> {
        match self {
            Target::Unix(socket) => {
                let endpoint = cedana_protos::uds_endpoint();
                let endpoint = match connect_timeout {
                    Some(t) => endpoint.connect_timeout(t),
                    None => endpoint,
                };
                cedana_protos::connect_uds_with(endpoint, socket).await
            }
            Target::Tcp { address, .. } => {
                let endpoint = cedana_protos::tcp_endpoint(address)?.tcp_nodelay(true);
                let endpoint = match connect_timeout {
                    Some(t) => endpoint.connect_timeout(t),
                    None => endpoint,
                };
                cedana_protos::connect_tcp_with(endpoint).await
            }
        }
    }

    /// What goes with every request: nothing on the Unix socket, the token of the token file on TCP.
    pub fn bearer(&self) -> anyhow::Result<BearerToken> {
        match self {
            Target::Unix(_) => Ok(BearerToken::none()),
            Target::Tcp { token_file, .. } => {
                let token = auth::Token::load(token_file)?;
                // A parsed token is visible ASCII, which a metadata value always holds.
                BearerToken::new(token.secret()).map_err(|e| anyhow::anyhow!("the token of {}: {e}", token_file.display()))
            }
        }
    }

    /// A client on `channel` that sends what [`Target::bearer`] gives.
    pub fn client(&self, channel: Channel) -> anyhow::Result<Client> {
        Ok(DaemonClient::with_interceptor(channel, self.bearer()?))
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Unix(socket) => write!(f, "{}", socket.display()),
            Target::Tcp { address, .. } => write!(f, "{address} (tcp)"),
        }
    }
}

impl From<&Path> for Target {
    fn from(socket: &Path) -> Target {
        Target::Unix(socket.to_path_buf())
    }
}

impl From<&PathBuf> for Target {
    fn from(socket: &PathBuf) -> Target {
        Target::Unix(socket.clone())
    }
}

impl From<&Target> for Target {
    fn from(target: &Target) -> Target {
        target.clone()
    }
}

/// A client of the daemon at `target` (a [`Target`], or a socket path), or an error saying it is not running
/// and how to start it.
pub async fn connect(target: impl Into<Target>) -> anyhow::Result<Client> {
    let target = target.into();
    let channel = target.channel(None).await.map_err(|e| {
        let chain = error_chain(&e);
        if matches!(target, Target::Unix(_)) && chain.contains("Permission denied") {
            return anyhow::anyhow!(
                "the cedana daemon's socket {target} is not open to this user ({chain}): it is root's alone unless \
                 daemon.socket_group names a group, whose members may then use it; run with sudo, or join that group"
            );
        }
        let configured = match &target {
            Target::Unix(_) => String::new(),
            Target::Tcp { address, .. } => format!(" (configured with protocol = \"tcp\" and address = \"{address}\")"),
        };
        anyhow::anyhow!(
            "the cedana daemon is not running at {target} ({}): start it with `sudo cedana daemon start`{configured} \
             (or pass --no-server where a command supports it)",
            chain
        )
    })?;
    target.client(channel)
}

/// An error and its sources, `: `-separated (tonic's transport error alone says only "transport error").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        // Layers of the transport repeat one another ("tcp connect error: tcp connect error: ...").
        let part = s.to_string();
        if !text.ends_with(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}
