//! A Google Cloud Storage emulator for tests: gcp-storage-emulator (installed by `scripts/setup.sh` into
//! `/opt/cedana/gcs-emulator`) on a free loopback port with a data folder of its own and the bucket
//! `cedana-test`, behind [`adapter`], which makes it answer object_store's GCS client as GCS does (see
//! there for what it adapts and why). Clients talk to the adapter; tests may ask the emulator directly.
//!
//! The emulator is found at `$CEDANA_GCS_EMULATOR`, else `$CEDANA_GCS_EMULATOR_VENV/bin/gcp-storage-emulator`,
//! else `/opt/cedana/gcs-emulator/bin/gcp-storage-emulator`. [`GcsServer::configure`] gives a command the
//! environment that reaches the adapter and nothing else: the base URL, and a service-account key with
//! `disable_oauth` (object_store then sends an empty bearer token and never asks a metadata server or
//! Google's token endpoint), with every inherited `GOOGLE_*` variable removed.

pub mod adapter;

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::moto::{free_port, raw_http, venv_program};

/// The bucket every server starts with.
pub const BUCKET: &str = "cedana-test";
/// A service-account key that makes object_store use no credential at all (`disable_oauth`).
pub const NO_OAUTH_KEY: &str = r#"{"disable_oauth":true,"client_email":"","private_key":"","private_key_id":""}"#;

/// Longest the emulator may take to answer after it starts (under a second here).
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The gcp-storage-emulator executable, or a panic that says how to install it.
pub fn emulator_bin() -> PathBuf {
    venv_program("gcp-storage-emulator", "CEDANA_GCS_EMULATOR", "CEDANA_GCS_EMULATOR_VENV", "/opt/cedana/gcs-emulator")
}

/// The emulator and its adapter, of this test's own; the emulator is killed (by its PID) and the adapter
/// stopped when dropped.
pub struct GcsServer {
    emulator: Option<Child>,
    port: u16,
    adapter_port: u16,
    shared: Arc<adapter::Shared>,
    runtime: Option<tokio::runtime::Runtime>,
    log: tempfile::NamedTempFile,
    _data: tempfile::TempDir,
}

impl GcsServer {
    /// Start the emulator (with the bucket [`BUCKET`]) and the adapter, each on a free loopback port.
    pub fn start() -> GcsServer {
        let bin = emulator_bin();
        let data = tempfile::tempdir().expect("GCS data folder");
        let (store, uploads) = (data.path().join("emulator"), data.path().join("uploads"));
        std::fs::create_dir_all(&uploads).expect("adapter's uploads folder");
        let log = tempfile::NamedTempFile::new().expect("emulator log file");
        let (emulator, port) = (0..5)
            .find_map(|_| {
                let port = free_port();
                let mut child = Command::new(&bin)
                    .arg("-d")
                    .arg(&store)
                    .args(["start", "--host", "127.0.0.1", "--port", &port.to_string(), "--default-bucket", BUCKET])
                    .stdin(Stdio::null())
                    .stdout(log.reopen().expect("emulator log"))
                    .stderr(log.reopen().expect("emulator log"))
                    .process_group(0)
                    .spawn()
                    .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
                let deadline = Instant::now() + START_TIMEOUT;
                while Instant::now() < deadline {
                    if child.try_wait().ok().flatten().is_some() {
                        return None; // the port was taken meanwhile: try another
                    }
                    if matches!(raw_http("127.0.0.1", port, "GET", &format!("/storage/v1/b/{BUCKET}"), b""), Ok((200, _))) {
                        return Some((child, port));
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                let _ = child.kill();
                let _ = child.wait();
                None
            })
            .unwrap_or_else(|| {
                panic!(
                    "gcp-storage-emulator did not start; its log:\n{}",
                    std::fs::read_to_string(log.path()).unwrap_or_default()
                )
            });
        let shared = Arc::new(adapter::Shared::new(SocketAddr::from(([127, 0, 0, 1], port)), uploads));
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("the adapter's runtime");
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("the adapter's listener");
        let adapter_port = listener.local_addr().expect("the adapter's address").port();
        runtime.spawn(adapter::serve(listener, shared.clone()));
        GcsServer { emulator: Some(emulator), port, adapter_port, shared, runtime: Some(runtime), log, _data: data }
    }

    /// The adapter's URL: the base URL clients are given.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.adapter_port)
    }

    /// `gs://BUCKET/KEY` in the test bucket.
    pub fn url(&self, key: &str) -> String {
        format!("gs://{BUCKET}/{key}")
    }

    /// The variables a client needs to reach the adapter, and only it.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("GOOGLE_BASE_URL", self.base_url()),
            ("GOOGLE_ALLOW_HTTP", "true".into()),
            ("GOOGLE_SERVICE_ACCOUNT_KEY", NO_OAUTH_KEY.into()),
        ]
    }

    /// Give `cmd` [`GcsServer::env`], and none of the Google variables (or `SERVICE_ACCOUNT`, which
    /// object_store reads too) this process has: no test may reach a real cloud or a metadata server.
    pub fn configure<'c>(&self, cmd: &'c mut Command) -> &'c mut Command {
        for (key, _) in std::env::vars_os() {
            if key.to_str().is_some_and(|k| k.starts_with("GOOGLE_") || k == "SERVICE_ACCOUNT") {
                cmd.env_remove(key);
            }
        }
        cmd.envs(self.env())
    }

    /// The adapter's state: faults to inject, what it saw.
    pub fn adapter(&self) -> &adapter::Shared {
        &self.shared
    }

    /// The objects under `prefix` in the test bucket, with their sizes, as the emulator lists them (its JSON
    /// API, not through the adapter).
    pub fn objects(&self, prefix: &str) -> Vec<(String, u64)> {
        let path = format!("/storage/v1/b/{BUCKET}/o?prefix={prefix}");
        let (status, body) = raw_http("127.0.0.1", self.port, "GET", &path, b"").unwrap_or_else(|e| panic!("GET {path}: {e}"));
        assert_eq!(status, 200, "listing the emulator's objects: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
        let items = v["items"].as_array().cloned().unwrap_or_default();
        items
            .iter()
            .map(|o| {
                let size = o["size"].as_str().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("object without size: {o}"));
                (o["name"].as_str().unwrap_or_default().to_string(), size)
            })
            .collect()
    }

    /// What the emulator logged (a line per request).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// Kill the emulator (SIGKILL to its PID).
    fn kill_emulator(&mut self) {
        if let Some(mut child) = self.emulator.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for GcsServer {
    fn drop(&mut self) {
        self.kill_emulator();
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}
