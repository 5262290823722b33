//! Configuration: a TOML file, overridden by `CEDANA_*` environment variables.
//!
//! ```toml
//! [criu]
//! binary_path = "/usr/local/sbin/criu"
//! driver = "swrk"                       # or "cli"
//! [checkpoint]
//! dir = "/var/lib/cedana/checkpoints"   # default parent folder of dumps
//! compression = "zstd"                  # default --compression
//! scratch_dir = "/var/tmp"              # where archives are extracted for restore
//! [hooks]
//! command = "/usr/local/lib/cedana/hook" # run before/after every dump and restore
//! ```
//! The file is `$CEDANA_CONFIG`, else `/etc/cedana/config.toml` when it exists.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::codec::Compression;

/// Errors loading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: &'static str, message: String },
}

/// Settings of the `[criu]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CriuConfig {
    pub binary_path: Option<PathBuf>,
    /// How CRIU is driven: `swrk` (its RPC protocol) or `cli` (its command line with action scripts).
    pub driver: Option<CriuDriverKind>,
}

/// How the engine drives CRIU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CriuDriverKind {
    /// `criu swrk`: CRIU's RPC protocol over a socket pair, notifications answered in-process.
    Swrk,
    /// `criu dump/restore` commands whose action script is the calling executable.
    Cli,
}

impl std::str::FromStr for CriuDriverKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "swrk" | "rpc" => Ok(CriuDriverKind::Swrk),
            "cli" => Ok(CriuDriverKind::Cli),
            other => Err(format!("unknown CRIU driver {other:?}: use swrk or cli")),
        }
    }
}

/// The CRIU driver when the configuration names none.
///
/// `swrk`: measured as fast as the command line on a 1 GiB process (dump 0.96-0.99x, restore 1.00-1.11x of
/// the CLI driver, medians over alternating rounds, scripts/bench-criu-driver.sh), and it needs no action
/// script (nothing depends on the calling executable), reports the restored PID in its response, and can make
/// the restored root the caller's child without a process-wide subreaper.
pub const DEFAULT_CRIU_DRIVER: CriuDriverKind = CriuDriverKind::Swrk;

/// Settings of the `[checkpoint]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    pub dir: Option<PathBuf>,
    pub compression: Option<Compression>,
    pub scratch_dir: Option<PathBuf>,
}

/// Settings of the `[hooks]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HooksConfig {
    /// A command run before and after every dump and restore (see `engine::hooks`).
    pub command: Option<PathBuf>,
}

/// Settings of the `[db]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DbConfig {
    /// The daemon's job store (SQLite).
    pub path: Option<PathBuf>,
}

/// The whole configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The daemon's address: a Unix socket path (default /run/cedana.sock).
    pub address: Option<String>,
    /// `unix` (the default) or `tcp` (then `address` is HOST:PORT).
    pub protocol: Option<String>,
    /// Log level of the daemon and the CLI (error, warn, info, debug, trace).
    pub log_level: Option<String>,
    #[serde(default)]
    pub db: DbConfig,
    #[serde(default)]
    pub criu: CriuConfig,
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    #[serde(default)]
    pub hooks: HooksConfig,
}

/// The daemon's socket when the configuration names none.
pub const DEFAULT_ADDRESS: &str = "/run/cedana.sock";
/// The job store when the configuration names none.
pub const DEFAULT_DB_PATH: &str = "/var/lib/cedana/cedana.db";

/// Default compression when neither flag nor config names one (Cedana's default).
pub const DEFAULT_COMPRESSION: Compression = Compression::Tar;

impl Config {
    /// Load from the config file (if any) and the environment.
    pub fn load() -> Result<Self, ConfigError> {
        Self::load_from(None)
    }

    /// Load from `file` (else `$CEDANA_CONFIG`, else /etc/cedana/config.toml when it exists) and the
    /// environment.
    pub fn load_from(file: Option<&Path>) -> Result<Self, ConfigError> {
        let path = file.map(Path::to_path_buf).or_else(|| std::env::var_os("CEDANA_CONFIG").map(PathBuf::from)).or_else(|| {
            let p = PathBuf::from("/etc/cedana/config.toml");
            p.exists().then_some(p)
        });
        let mut cfg = match path {
            Some(p) => Self::from_file(&p)?,
            None => Config::default(),
        };
        cfg.apply_env()?;
        Ok(cfg)
    }

    /// Parse one TOML file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse { path: path.into(), message: e.to_string() })
    }

    fn apply_env(&mut self) -> Result<(), ConfigError> {
        if let Some(v) = std::env::var_os("CEDANA_CRIU_BINARY_PATH") {
            self.criu.binary_path = Some(v.into());
        }
        if let Ok(v) = std::env::var("CEDANA_ADDRESS") {
            self.address = Some(v);
        }
        if let Ok(v) = std::env::var("CEDANA_PROTOCOL") {
            self.protocol = Some(v);
        }
        if let Ok(v) = std::env::var("CEDANA_LOG_LEVEL") {
            self.log_level = Some(v);
        }
        if let Some(v) = std::env::var_os("CEDANA_DB_PATH") {
            self.db.path = Some(v.into());
        }
        if let Ok(v) = std::env::var("CEDANA_CRIU_DRIVER") {
            self.criu.driver = Some(v.parse().map_err(|message| ConfigError::Env { var: "CEDANA_CRIU_DRIVER", message })?);
        }
        if let Some(v) = std::env::var_os("CEDANA_CHECKPOINT_DIR") {
            self.checkpoint.dir = Some(v.into());
        }
        if let Some(v) = std::env::var_os("CEDANA_HOOK_COMMAND") {
            self.hooks.command = Some(v.into());
        }
        if let Some(v) = std::env::var_os("CEDANA_SCRATCH_DIR") {
            self.checkpoint.scratch_dir = Some(v.into());
        }
        if let Ok(v) = std::env::var("CEDANA_CHECKPOINT_COMPRESSION") {
            let c = v.parse().map_err(|e: crate::codec::CodecError| ConfigError::Env {
                var: "CEDANA_CHECKPOINT_COMPRESSION",
                message: e.to_string(),
            })?;
            self.checkpoint.compression = Some(c);
        }
        Ok(())
    }

    /// Parent folder for new checkpoints.
    pub fn checkpoint_dir(&self) -> PathBuf {
        self.checkpoint.dir.clone().unwrap_or_else(|| PathBuf::from("/tmp"))
    }

    /// Compression for new checkpoints.
    pub fn compression(&self) -> Compression {
        self.checkpoint.compression.unwrap_or(DEFAULT_COMPRESSION)
    }

    /// The daemon's Unix socket.
    pub fn address(&self) -> PathBuf {
        self.address.clone().map(PathBuf::from).unwrap_or_else(|| PathBuf::from(DEFAULT_ADDRESS))
    }

    /// The daemon's job store.
    pub fn db_path(&self) -> PathBuf {
        self.db.path.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_DB_PATH))
    }

    /// How CRIU is driven.
    pub fn criu_driver(&self) -> CriuDriverKind {
        self.criu.driver.unwrap_or(DEFAULT_CRIU_DRIVER)
    }

    /// Where archives are extracted before a restore.
    pub fn scratch_dir(&self) -> PathBuf {
        self.checkpoint.scratch_dir.clone().unwrap_or_else(std::env::temp_dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_file_and_refuses_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "[criu]\nbinary_path = \"/x/criu\"\n[checkpoint]\ncompression = \"zstd\"\n").unwrap();
        let c = Config::from_file(&p).unwrap();
        assert_eq!(c.criu.binary_path.as_deref(), Some(Path::new("/x/criu")));
        assert_eq!(c.compression(), Compression::Zstd);
        std::fs::write(&p, "[criu]\nbinary = \"/x\"\n").unwrap();
        let err = Config::from_file(&p).unwrap_err().to_string();
        assert!(err.contains("binary"), "{err}");
    }

    #[test]
    fn defaults() {
        let c = Config::default();
        assert_eq!(c.checkpoint_dir(), PathBuf::from("/tmp"));
        assert_eq!(c.compression(), Compression::Tar);
    }
}
