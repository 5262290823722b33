//! CRIU action-script hooks, answered by the running engine.
//!
//! CRIU runs its `--action-script` with no arguments and `CRTOOLS_SCRIPT_ACTION` set. We point it at our own
//! executable with [`HOOK_SOCKET_ENV`] set; every binary of the project calls [`run_if_invoked`] first thing,
//! which then acts as a client: it forwards the action over a unix socket to the engine that started CRIU and
//! exits with its verdict. A dead engine means a failed hook, so CRIU resumes the dumped tasks (fail safe).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

/// Environment variable naming the engine's hook socket.
pub const HOOK_SOCKET_ENV: &str = "CEDANA_CRIU_HOOK_SOCKET";

/// Set once this executable has shown, by calling [`run_if_invoked`], that it answers CRIU's action scripts.
static ANSWERS_HOOKS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether this executable answers CRIU's action scripts (its `main` called [`run_if_invoked`]): only then
/// may it be CRIU's `--action-script`. Any other program (a test binary, a front end of someone else's)
/// would run its own `main` at every CRIU notification instead of answering it.
pub fn answers_hooks() -> bool {
    ANSWERS_HOOKS.load(std::sync::atomic::Ordering::SeqCst)
}

/// If this process was started by CRIU as an action script, answer it and exit. Call first in `main`.
pub fn run_if_invoked() {
    ANSWERS_HOOKS.store(true, std::sync::atomic::Ordering::SeqCst);
    let (Some(action), Some(socket)) = (std::env::var_os("CRTOOLS_SCRIPT_ACTION"), std::env::var_os(HOOK_SOCKET_ENV)) else {
        return;
    };
    let action = action.to_string_lossy().into_owned();
    let code = match ask(Path::new(&socket), &action) {
        Ok(true) => 0,
        Ok(false) => 1,
        Err(err) => {
            eprintln!("cedana: CRIU hook {action}: cannot reach the engine ({err}); failing the hook");
            1
        }
    };
    std::process::exit(code);
}

fn ask(socket: &Path, action: &str) -> std::io::Result<bool> {
    let mut stream = UnixStream::connect(socket)?;
    let pid = std::env::var("CRTOOLS_INIT_PID").unwrap_or_default();
    writeln!(stream, "{action} {pid}")?;
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply)?;
    Ok(reply.trim() == "ok")
}

/// One hook call from CRIU, waiting for a verdict.
pub struct HookCall {
    /// CRIU's action name (`post-dump`, `post-restore`, ...).
    pub action: String,
    /// `CRTOOLS_INIT_PID`, when CRIU set it.
    pub pid: Option<i32>,
    stream: UnixStream,
}

impl HookCall {
    /// Let CRIU go on (`true`) or fail the action (`false`).
    pub fn reply(mut self, ok: bool) {
        let _ = self.stream.write_all(if ok { b"ok\n" } else { b"fail\n" });
    }
}

/// The engine's end: a socket that receives hook calls on a channel.
pub struct HookServer {
    path: PathBuf,
    calls: mpsc::Receiver<Option<HookCall>>,
    wake: mpsc::Sender<Option<HookCall>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl HookServer {
    /// Listen on `dir/hook.sock`.
    pub fn bind(dir: &Path) -> std::io::Result<Self> {
        let path = dir.join("hook.sock");
        let listener = UnixListener::bind(&path)?;
        let (tx, calls) = mpsc::channel();
        let wake = tx.clone();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = std::sync::Arc::clone(&stop);
        std::thread::Builder::new().name("criu-hooks".into()).spawn(move || {
            for stream in listener.incoming().flatten() {
                if stopped.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                let mut line = String::new();
                let Ok(reader_stream) = stream.try_clone() else { continue };
                if BufReader::new(reader_stream).read_line(&mut line).is_err() {
                    continue;
                }
                let mut parts = line.split_whitespace();
                let action = parts.next().unwrap_or_default().to_string();
                let pid = parts.next().and_then(|p| p.parse().ok());
                if tx.send(Some(HookCall { action, pid, stream })).is_err() {
                    break;
                }
            }
        })?;
        Ok(Self { path, calls, wake, stop })
    }

    /// The socket path, for [`HOOK_SOCKET_ENV`].
    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    /// Run `wait` (which blocks until the CRIU process exits) on a thread, then wake up [`Self::next`].
    pub fn on_exit(&self, wait: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
        let wake = self.wake.clone();
        std::thread::Builder::new().name("criu-wait".into()).spawn(move || {
            wait();
            let _ = wake.send(None);
        })?;
        Ok(())
    }

    /// Wait up to `timeout` for the next hook call; `None` on timeout or when woken by [`Self::on_exit`].
    pub fn next(&self, timeout: Duration) -> Option<HookCall> {
        self.calls.recv_timeout(timeout).ok().flatten()
    }
}

impl Drop for HookServer {
    fn drop(&mut self) {
        // Wake the accept loop so its thread ends (a long-lived caller must not collect threads).
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = UnixStream::connect(&self.path);
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_round_trips_and_a_dead_server_fails_the_hook() {
        let dir = tempfile::tempdir().unwrap();
        let server = HookServer::bind(dir.path()).unwrap();
        let sock = server.socket_path().to_path_buf();
        let client = std::thread::spawn(move || ask(&sock, "post-dump"));
        let call = server.next(Duration::from_secs(5)).expect("a hook call");
        assert_eq!(call.action, "post-dump");
        call.reply(false);
        assert!(!client.join().unwrap().unwrap());
        let sock = server.socket_path().to_path_buf();
        drop(server);
        assert!(ask(&sock, "post-dump").is_err());
    }
}
