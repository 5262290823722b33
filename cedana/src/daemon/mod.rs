//! The daemon: `cedana daemon start` serves the gRPC API on a Unix socket (0600, root only), with the
//! standard health and reflection services. It owns the job store and the supervisor of managed jobs, and is
//! a child subreaper (restored trees are its children). SIGTERM or SIGINT stops it cleanly; managed jobs run
//! in sessions of their own and keep running; a restarted daemon finds them again in the store.

pub mod attach;
mod checkpoint;
pub mod convert;
mod health;
mod jobs;
mod manage;
mod run;
pub mod service;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use cedana::config::Config;
use cedana::engine::Engine;
use cedana::jobs::model::JobState;
use cedana::jobs::store::JobStore;
use cedana::jobs::supervisor::Supervisor;
use cedana_protos::v1::daemon_server::DaemonServer;

/// Run the daemon until SIGTERM/SIGINT.
pub fn start(config: Config, address: Option<PathBuf>) -> anyhow::Result<i32> {
    let socket = address.unwrap_or_else(|| config.address());
    if config.protocol.as_deref().is_some_and(|p| p != "unix") {
        anyhow::bail!("protocol {:?} is not supported yet: the daemon listens on a Unix socket", config.protocol);
    }
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes plain integers and touches no memory of ours.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error()).context("becoming a child subreaper");
    }
    let db = config.db_path();
    let store = JobStore::open(&db).with_context(|| format!("opening the job store {}", db.display()))?;
    let engine = Engine::new(config)?;
    let (events_tx, events) = std::sync::mpsc::channel();
    let supervisor = Supervisor::new(events_tx)?;
    let serials = service::Serials::default();
    readopt(&store, &supervisor, &serials);
    {
        let (store, serials) = (store.clone(), serials.clone());
        std::thread::Builder::new().name("job-exits".into()).spawn(move || service::follow_exits(store, serials, events))?;
    }
    let service = service::Service { engine, store, supervisor, log_dir: PathBuf::from(service::LOG_DIR), serials };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(serve(service, &socket))?;
    Ok(0)
}

/// Jobs the store says run: watch those still alive, mark the others lost.
fn readopt(store: &JobStore, supervisor: &Supervisor, serials: &service::Serials) {
    let Ok(jobs) = store.list() else { return };
    for job in jobs.into_iter().filter(|j| j.state == JobState::Running) {
        let alive = cedana::procfs::stat(job.pid).map(|s| !s.is_zombie()).unwrap_or(false);
        if alive {
            if let Ok(serial) = supervisor.watch(job.pid) {
                service::track(serials, job.pid, serial);
                tracing::info!(jid = %job.jid, pid = job.pid, "re-adopted a running job");
                continue;
            }
        }
        tracing::info!(jid = %job.jid, pid = job.pid, "a job's process is gone: marking it lost");
        let _ = store.set_state(&job.jid, JobState::Lost, None);
    }
}

async fn serve(service: service::Service, socket: &Path) -> anyhow::Result<()> {
    let listener = bind(socket).await?;
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<DaemonServer<service::Service>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(cedana_protos::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    tracing::info!(socket = %socket.display(), "cedana daemon listening");
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
        tracing::info!("shutting down; managed jobs keep running");
    };
    tonic::transport::Server::builder()
        .add_service(health)
        .add_service(reflection)
        .add_service(DaemonServer::new(service))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    let _ = std::fs::remove_file(socket);
    Ok(())
}

/// Listen on `socket`, root only. A socket left by a daemon that died is replaced; one a live daemon
/// answers on is not.
async fn bind(socket: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    if socket.exists() {
        if tokio::net::UnixStream::connect(socket).await.is_ok() {
            anyhow::bail!("a daemon already listens on {}", socket.display());
        }
        std::fs::remove_file(socket).with_context(|| format!("removing the stale socket {}", socket.display()))?;
    }
    if let Some(parent) = socket.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    let listener = tokio::net::UnixListener::bind(socket).with_context(|| format!("listening on {}", socket.display()))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// A client of the daemon at `socket`, or an error saying it is not running and how to start it.
pub async fn connect(socket: &Path) -> anyhow::Result<cedana_protos::v1::daemon_client::DaemonClient<tonic::transport::Channel>> {
    let channel = cedana_protos::connect_uds(socket.to_path_buf()).await.map_err(|e| {
        anyhow::anyhow!(
            "the cedana daemon is not running at {} ({e}): start it with `sudo cedana daemon start` \
             (or pass --no-server where a command supports it)",
            socket.display()
        )
    })?;
    Ok(cedana_protos::v1::daemon_client::DaemonClient::new(channel))
}
