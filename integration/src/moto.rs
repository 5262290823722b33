//! A real S3-compatible server for tests: moto (`moto_server`, installed by `scripts/setup.sh` into
//! `/opt/cedana/moto`), on a free loopback port, with a bucket; and [`FaultProxy`], a proxy in front of it
//! that can answer errors or cut connections on demand.
//!
//! The server is found at `$CEDANA_MOTO_SERVER`, else `$CEDANA_MOTO_VENV/bin/moto_server`, else
//! `/opt/cedana/moto/bin/moto_server`. moto checks no signatures: the keys are dummies, and a plain HTTP
//! request (see [`MotoServer::http`]) reaches every S3 API, such as the list of pending multipart uploads.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The access key id tests use (moto accepts any).
pub const ACCESS_KEY_ID: &str = "AKIDCEDANATEST";
/// The secret key tests use: recognisable, so that a test can assert no message shows it.
pub const SECRET_ACCESS_KEY: &str = "cedana-test-secret-Zx9Qv7Lm3Np";
/// The region moto is addressed in.
pub const REGION: &str = "us-east-1";

/// Longest moto may take to answer after it starts (about 1 s here).
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The moto_server executable, or a panic that says how to install it.
pub fn moto_server_bin() -> PathBuf {
    venv_program("moto_server", "CEDANA_MOTO_SERVER", "CEDANA_MOTO_VENV", "/opt/cedana/moto")
}

/// A program that `scripts/setup.sh` installs into a Python venv of its own: `$BIN_VAR`, else
/// `$VENV_VAR/bin/PROGRAM`, else `DEFAULT_VENV/bin/PROGRAM`; or a panic that says how to install it.
pub(crate) fn venv_program(program: &str, bin_var: &str, venv_var: &str, default_venv: &str) -> PathBuf {
    let candidates: Vec<PathBuf> = [
        std::env::var_os(bin_var).map(PathBuf::from),
        std::env::var_os(venv_var).map(|v| PathBuf::from(v).join("bin").join(program)),
        Some(PathBuf::from(default_venv).join("bin").join(program)),
    ]
    .into_iter()
    .flatten()
    .collect();
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .unwrap_or_else(|| panic!("{program} is not installed (looked at {candidates:?}): run `sudo bash scripts/setup.sh`"))
}

/// A free TCP port on 127.0.0.1 (free when this returns; a server started right after gets it).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free loopback port")
}

/// A moto server of this test's own, with one bucket; killed (by its PID) when dropped.
pub struct MotoServer {
    child: Option<Child>,
    /// The address it listens on (127.0.0.1, or a test network's own address).
    host: String,
    port: u16,
    bucket: String,
    log: tempfile::NamedTempFile,
}

impl MotoServer {
    /// Start moto on a free port, wait until it answers, and create the bucket `cedana-test`.
    pub fn start() -> MotoServer {
        Self::start_on("127.0.0.1")
    }

    /// [`MotoServer::start`], listening on `host` (an address of a private test network, e.g. the bridge of
    /// [`crate::nodes::Nodes`]) instead of loopback.
    pub fn start_on(host: &str) -> MotoServer {
        let bin = moto_server_bin();
        let log = tempfile::NamedTempFile::new().expect("moto log file");
        for _ in 0..5 {
            let port = free_port();
            let mut child = Command::new(&bin)
                .args(["-H", host, "-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(log.reopen().expect("moto log"))
                .stderr(log.reopen().expect("moto log"))
                .process_group(0)
                .spawn()
                .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
            let deadline = Instant::now() + START_TIMEOUT;
            let mut up = false;
            while Instant::now() < deadline {
                if child.try_wait().ok().flatten().is_some() {
                    break; // the port was taken meanwhile: try another
                }
                if raw_http(host, port, "GET", "/", b"").is_ok() {
                    up = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if up {
                let server = MotoServer { child: Some(child), host: host.to_string(), port, bucket: "cedana-test".into(), log };
                server.create_bucket(&server.bucket);
                return server;
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("moto did not start; its log:\n{}", std::fs::read_to_string(log.path()).unwrap_or_default());
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The endpoint URL (`http://HOST:PORT`).
    pub fn endpoint(&self) -> String {
        format!("http://{}:{}", self.host, self.port)
    }

    /// The bucket created at start.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// `s3://BUCKET/KEY` in the test bucket.
    pub fn url(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.bucket)
    }

    /// The environment a client needs to reach this server (standard AWS variables).
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID.into()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY.into()),
            ("AWS_REGION", REGION.into()),
            ("AWS_ALLOW_HTTP", "true".into()),
        ]
    }

    /// Storage settings that reach a server at `endpoint` (this one, or a proxy in front of it) with the test
    /// keys; the rest at their defaults.
    pub fn storage_config(endpoint: &str) -> cedana::storage::StorageConfig {
        cedana::storage::StorageConfig {
            endpoint: Some(endpoint.to_string()),
            allow_http: true,
            region: Some(REGION.into()),
            credentials: Some(cedana::storage::Credentials {
                access_key_id: ACCESS_KEY_ID.into(),
                secret_access_key: SECRET_ACCESS_KEY.into(),
                session_token: None,
            }),
            ..Default::default()
        }
    }

    /// Create another bucket.
    pub fn create_bucket(&self, name: &str) {
        let (status, body) = self.http("PUT", &format!("/{name}"), b"");
        assert_eq!(status, 200, "creating bucket {name}: {body}");
    }

    /// The keys of the multipart uploads begun and neither completed nor aborted, in the test bucket.
    pub fn pending_uploads(&self) -> Vec<String> {
        let (status, body) = self.http("GET", &format!("/{}?uploads", self.bucket), b"");
        assert_eq!(status, 200, "listing multipart uploads: {body}");
        body.split("<Upload>").skip(1).filter_map(|u| xml_value(u, "Key")).collect()
    }

    /// Whether an object is at `key` in the test bucket.
    pub fn has_object(&self, key: &str) -> bool {
        let (status, body) = self.http("HEAD", &format!("/{}/{key}", self.bucket), b"");
        assert!(status == 200 || status == 404, "HEAD {key}: {status} {body}");
        status == 200
    }

    /// A plain HTTP/1.0 request to the server (no signature: moto checks none); returns the status and body.
    pub fn http(&self, method: &str, path: &str, body: &[u8]) -> (u16, String) {
        raw_http(&self.host, self.port, method, path, body).unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// The server's PID, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kill the server (SIGKILL to its PID), as a crash would: connections fail from now on.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// What the server logged (one line per request).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The text of the first `<tag>...</tag>` in `xml`.
fn xml_value(xml: &str, tag: &str) -> Option<String> {
    let start = xml.find(&format!("<{tag}>"))? + tag.len() + 2;
    let end = start + xml[start..].find(&format!("</{tag}>"))?;
    Some(xml[start..end].to_string())
}

pub(crate) fn raw_http(host: &str, port: u16, method: &str, path: &str, body: &[u8]) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect((host, port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let head = format!("{method} {path} HTTP/1.0\r\nHost: {host}:{port}\r\nContent-Length: {}\r\n\r\n", body.len());
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let text = String::from_utf8_lossy(&resp);
    let status =
        text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or_else(|| std::io::Error::other("no status line"))?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

/// What a [`FaultProxy`] does to requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Fault {
    /// Pass everything through.
    None = 0,
    /// Answer `500 Internal Server Error` to part uploads (`PUT ...?partNumber=`), pass the rest. Error
    /// bodies echo the request's `Authorization` header (which names the access key id).
    FailParts = 1,
    /// Answer `500` to every request.
    FailAll = 2,
    /// Close every new connection at once, without an answer.
    Cut = 3,
}

/// A loopback HTTP proxy in front of a server that can be switched to answer errors: one request per
/// connection (it adds `Connection: close` both ways), so every request is seen. Stops when dropped.
pub struct FaultProxy {
    port: u16,
    fault: Arc<AtomicU8>,
    faulted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FaultProxy {
    /// A proxy on a free port forwarding to `127.0.0.1:upstream`.
    pub fn start(upstream: u16) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy listener");
        let port = listener.local_addr().expect("proxy address").port();
        listener.set_nonblocking(true).expect("nonblocking listener");
        let (fault, faulted, stop) =
            (Arc::new(AtomicU8::new(0)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)));
        let (f, n, s) = (fault.clone(), faulted.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let (f, n) = (f.clone(), n.clone());
                        std::thread::spawn(move || {
                            let _ = serve(client, upstream, &f, &n);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        FaultProxy { port, fault, faulted, stop, thread: Some(thread) }
    }

    /// The endpoint URL to give clients.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Switch what the proxy does to the requests that come next.
    pub fn set(&self, fault: Fault) {
        self.fault.store(fault as u8, Ordering::SeqCst);
    }

    /// Requests answered with an error or cut so far.
    pub fn faulted(&self) -> usize {
        self.faulted.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Read an HTTP head (up to the blank line): its lines, and the Content-Length.
fn read_head(r: &mut impl BufRead) -> std::io::Result<(Vec<String>, usize)> {
    let (mut lines, mut len) = (Vec::new(), 0);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let line = line.trim_end().to_string();
        if line.is_empty() {
            return Ok((lines, len));
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
        lines.push(line);
    }
}

/// `lines` with `Connection: close` instead of any connection header, as a head.
fn closing_head(lines: &[String]) -> String {
    let mut out: String = lines
        .iter()
        .filter(|l| !l.to_ascii_lowercase().starts_with("connection:") && !l.to_ascii_lowercase().starts_with("keep-alive:"))
        .map(|l| format!("{l}\r\n"))
        .collect();
    out.push_str("Connection: close\r\n\r\n");
    out
}

fn serve(client: TcpStream, upstream: u16, fault: &AtomicU8, faulted: &AtomicUsize) -> std::io::Result<()> {
    let mode = fault.load(Ordering::SeqCst);
    if mode == Fault::Cut as u8 {
        faulted.fetch_add(1, Ordering::SeqCst);
        return client.shutdown(Shutdown::Both);
    }
    let mut from_client = BufReader::new(client.try_clone()?);
    let (head, len) = read_head(&mut from_client)?;
    let mut body = vec![0u8; len];
    from_client.read_exact(&mut body)?;
    let request_line = head.first().cloned().unwrap_or_default();
    let is_part = request_line.starts_with("PUT ") && request_line.contains("partNumber=");
    let mut client = client;
    if mode == Fault::FailAll as u8 || (mode == Fault::FailParts as u8 && is_part) {
        faulted.fetch_add(1, Ordering::SeqCst);
        // Echo the request's Authorization header, as real S3 echoes the key id in some errors: clients must
        // keep it out of their messages.
        let auth = head.iter().find(|l| l.to_ascii_lowercase().starts_with("authorization:")).cloned().unwrap_or_default();
        let msg = format!(
            "<Error><Code>InternalError</Code><Message>injected by the test proxy</Message><Request>{auth}</Request></Error>"
        );
        let resp = format!(
            "HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{msg}",
            msg.len()
        );
        client.write_all(resp.as_bytes())?;
        return client.shutdown(Shutdown::Both);
    }
    let mut up = TcpStream::connect(("127.0.0.1", upstream))?;
    up.write_all(closing_head(&head).as_bytes())?;
    up.write_all(&body)?;
    let mut from_up = BufReader::new(up);
    let (resp_head, _) = read_head(&mut from_up)?;
    client.write_all(closing_head(&resp_head).as_bytes())?;
    std::io::copy(&mut from_up, &mut client)?;
    client.shutdown(Shutdown::Both)
}
