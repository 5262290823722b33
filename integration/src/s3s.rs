//! s3s-fs, an S3-compatible server that keeps objects as files and answers a ranged read with the range alone,
//! for benchmarks of restores from an object store (moto, the tests' server, reads the whole object for each
//! ranged read). `scripts/lib/s3s.sh` installs it; found at `$CEDANA_S3S_BIN`, else
//! `/opt/cedana/s3s/bin/s3s-fs`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::moto::{free_port, ACCESS_KEY_ID, REGION, SECRET_ACCESS_KEY};
use crate::wait_for;

/// An s3s-fs server of this run's own, storing under a temporary folder, with one bucket; killed (by its
/// PID) when dropped.
pub struct S3sServer {
    child: Child,
    host: String,
    port: u16,
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
        let address = format!("{host}:{port}");
        wait_for("s3s-fs to answer", Duration::from_secs(30), || std::net::TcpStream::connect(&address).ok().map(drop));
        S3sServer { child, host: host.to_string(), port, bucket, _data: data }
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
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
