//! A private image registry for tests: Debian's docker-registry (unpacked by scripts/setup.sh into
//! /opt/cedana/registry, `$CEDANA_REGISTRY_PREFIX`) serving plain HTTP on a free port of 127.0.0.1, with its
//! storage in the test's folder. containerd treats a loopback registry as plain HTTP by default.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running registry, killed (by PID) when dropped.
pub struct Registry {
    child: Child,
    port: u16,
}

fn binary() -> PathBuf {
    let prefix = std::env::var_os("CEDANA_REGISTRY_PREFIX").map(PathBuf::from).unwrap_or_else(|| "/opt/cedana/registry".into());
    let bin = prefix.join("usr/bin/docker-registry");
    assert!(bin.exists(), "{} is missing: run scripts/setup.sh", bin.display());
    bin
}

impl Registry {
    /// Start a registry storing its blobs under `dir`, and wait until it answers.
    pub fn start(dir: &Path) -> Registry {
        std::fs::create_dir_all(dir.join("data")).expect("registry folder");
        let port = crate::daemon::free_port();
        let config = dir.join("config.yml");
        let yaml = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.join("data").display()
        );
        std::fs::write(&config, yaml).expect("registry config");
        let log = std::fs::File::create(dir.join("registry.log")).expect("registry log");
        let child = Command::new(binary())
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("registry log"))
            .stderr(log)
            .spawn()
            .expect("start docker-registry");
        let registry = Registry { child, port };
        crate::wait_for(&format!("the registry on 127.0.0.1:{port}"), Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok().map(drop)
        });
        registry
    }

    /// `127.0.0.1:PORT`, the host part of its image references.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
