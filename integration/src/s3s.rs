//! s3s-fs, an S3-compatible server that keeps each object as the file BUCKET/KEY, with nginx serving those
//! files for reads: for benchmarks of restores from an object store. s3s-fs (as moto, the tests' server)
//! answers a ranged read by reading the object from its start; nginx reads the range in place and answers
//! GET and HEAD path-style with the headers an S3 client reads, as S3 does (it checks no signature).
//! `scripts/lib/s3s.sh` installs both; found at `$CEDANA_S3S_BIN` (else `/opt/cedana/s3s/bin/s3s-fs`) and
//! `$CEDANA_NGINX` (else `/opt/cedana/nginx/usr/sbin/nginx`).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::moto::{free_port, ACCESS_KEY_ID, REGION, SECRET_ACCESS_KEY};
use crate::wait_for;

/// An s3s-fs server of this run's own, storing under a temporary folder, with one bucket; killed (by its
/// PID) when dropped.
pub struct S3sServer {
    child: Child,
    reader: Child,
    host: String,
    port: u16,
    read_port: u16,
    bucket: String,
    _data: tempfile::TempDir,
}

impl S3sServer {
    /// Start s3s-fs on `host` (an address of this machine) and a free port, with the bucket `cedana-test`.
    pub fn start_on(host: &str) -> S3sServer {
        let bin =
            std::env::var_os("CEDANA_S3S_BIN").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/opt/cedana/s3s/bin/s3s-fs"));
        assert!(bin.is_file(), "s3s-fs is not installed at {}: scripts/lib/s3s.sh installs it", bin.display());
        let data = tempfile::tempdir_in("/var/tmp").expect("a folder for s3s-fs");
        let bucket = "cedana-test".to_string();
        std::fs::create_dir(data.path().join(&bucket)).expect("the bucket's folder");
        let port = free_port();
        let child = Command::new(&bin)
            .args(["--host", host, "--port", &port.to_string(), "--access-key", ACCESS_KEY_ID, "--secret-key", SECRET_ACCESS_KEY])
            .arg(data.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        let (reader, read_port) = start_nginx(host, data.path());
        for (what, p) in [("s3s-fs", port), ("nginx", read_port)] {
            let address = format!("{host}:{p}");
            wait_for(&format!("{what} to answer"), Duration::from_secs(30), || {
                std::net::TcpStream::connect(&address).ok().map(drop)
            });
        }
        S3sServer { child, reader, host: host.to_string(), port, read_port, bucket, _data: data }
    }

    /// The environment a client needs to read from this server through nginx (ranges in place).
    pub fn read_env(&self) -> Vec<(&'static str, String)> {
        let mut env = self.env();
        env[0].1 = format!("http://{}:{}", self.host, self.read_port);
        env
    }

    /// `s3://BUCKET/KEY` in its bucket.
    pub fn url(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.bucket)
    }

    /// The environment a client needs to reach this server (standard AWS variables).
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", format!("http://{}:{}", self.host, self.port)),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID.into()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY.into()),
            ("AWS_REGION", REGION.into()),
            ("AWS_ALLOW_HTTP", "true".into()),
        ]
    }
}

impl Drop for S3sServer {
    fn drop(&mut self) {
        // nginx's master stops its workers on SIGTERM (SIGKILL would leave them running).
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.reader.id() as i32), nix::sys::signal::Signal::SIGTERM);
        let _ = self.reader.wait();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// nginx on `host` and a free port serving `data` (in the foreground, its files under `data/.nginx`).
fn start_nginx(host: &str, data: &std::path::Path) -> (Child, u16) {
    let bin =
        std::env::var_os("CEDANA_NGINX").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/opt/cedana/nginx/usr/sbin/nginx"));
    assert!(bin.is_file(), "nginx is not unpacked at {}: scripts/lib/s3s.sh does it", bin.display());
    let dir = data.join(".nginx");
    std::fs::create_dir_all(dir.join("tmp")).expect("nginx's folder");
    let port = free_port();
    let d = dir.display();
    let conf = format!(
        "daemon off; worker_processes 2; user root; pid {d}/nginx.pid; error_log {d}/error.log;\n\
         events {{ worker_connections 256; }}\n\
         http {{ access_log off; sendfile on; default_type application/octet-stream;\n\
         client_body_temp_path {d}/tmp/body; proxy_temp_path {d}/tmp/proxy; fastcgi_temp_path {d}/tmp/fastcgi;\n\
         uwsgi_temp_path {d}/tmp/uwsgi; scgi_temp_path {d}/tmp/scgi;\n\
         server {{ listen {host}:{port}; root {}; }} }}\n",
        data.display()
    );
    std::fs::write(dir.join("nginx.conf"), conf).expect("nginx.conf");
    let child = Command::new(&bin)
        .arg("-p")
        .arg(&dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
    (child, port)
}
