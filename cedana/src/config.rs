//! Configuration: a TOML file, overridden by `CEDANA_*` environment variables.
//!
//! ```toml
//! address = "/run/cedana.sock"          # the daemon's Unix socket, or HOST:PORT with protocol = "tcp"
//! protocol = "unix"                     # or "tcp"
//! log_level = "warn"
//! node_name = "node-a"                  # this node's name in checkpoints' origin (default: the hostname)
//! [daemon]
//! token_file = "/etc/cedana/token"      # the bearer token every TCP call carries (root only, 0600)
//! socket_group = "cedana"               # members may use the Unix socket (0660), each on what they own
//! [db]
//! path = "/var/lib/cedana/cedana.db"    # the daemon's job store
//! [criu]
//! binary_path = "/usr/local/sbin/criu"
//! driver = "swrk"                       # or "cli"
//! [checkpoint]
//! dir = "/var/lib/cedana/checkpoints"   # default parent folder of dumps
//! compression = "zstd"                  # default --compression
//! scratch_dir = "/var/tmp"              # where archives are extracted for restore
//! stream = true                         # images flow between CRIU and the archive, no files on disk
//! direct_writes = false                 # true: local archives go past the page cache (O_DIRECT), synced
//! [restore]
//! lazy = true                           # restores are lazy where the checkpoint allows (--no-lazy: not)
//! [hooks]
//! command = "/usr/local/lib/cedana/hook" # run before/after every dump and restore
//! [gpu]
//! backend = "auto"                      # or "cuda-checkpoint", "driver" (libcuda's API), "off"
//! cuda_checkpoint = "cuda-checkpoint"   # NVIDIA's utility (a path, or a name in PATH)
//! libcuda = "libcuda.so.1"              # the CUDA driver library, loaded at run time
//! nvidia_smi = "nvidia-smi"
//! lock_timeout_ms = 10000               # bound on locking a CUDA process before a dump
//! [profiling]
//! enabled = true                        # print a timings tree after every dump and restore
//! ```
//! The file is `--config FILE`, else `$CEDANA_CONFIG`, else `/etc/cedana/config.toml` when it exists.
//!
//! Every key can be overridden by `CEDANA_<KEY>`, the dotted key in capitals with dots as underscores
//! (`checkpoint.scratch_dir` is `CEDANA_CHECKPOINT_SCRATCH_DIR`); the older `CEDANA_SCRATCH_DIR` and
//! `CEDANA_HOOK_COMMAND` still work. [`Config::load_with_sources`] also says where each value came from
//! (`cedana config show`).

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
    #[error("the daemon's protocol {protocol:?} is not supported: set protocol (CEDANA_PROTOCOL) to \"unix\" or \"tcp\"")]
    Protocol { protocol: String },
    #[error(
        "the daemon's address {address:?} is not HOST:PORT ({reason}), which protocol \"tcp\" needs: set address \
         (CEDANA_ADDRESS or `cedana daemon start --address`) to e.g. {DEFAULT_TCP_ADDRESS}"
    )]
    TcpAddress { address: String, reason: &'static str },
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

impl CriuDriverKind {
    /// The name used in the configuration.
    pub fn name(self) -> &'static str {
        match self {
            CriuDriverKind::Swrk => "swrk",
            CriuDriverKind::Cli => "cli",
        }
    }
}

impl std::fmt::Display for CriuDriverKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
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
    /// Stream images between CRIU and the archive, with no image files on disk (where the checkpoint can).
    pub stream: Option<bool>,
    /// Write local archives past the page cache (`O_DIRECT`, where the filesystem takes it) and sync them
    /// before the dump returns (see `checkpoint::direct`); off by default.
    pub direct_writes: Option<bool>,
}

/// Settings of the `[restore]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreConfig {
    /// Restore lazily by default, where the checkpoint allows it (normally otherwise).
    pub lazy: Option<bool>,
}

/// Settings of the `[storage]` table (object stores).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSettings {
    /// An upload fails when none of its parts completes for this many seconds (a dump holds its workload
    /// frozen while it streams into the store).
    pub stall_timeout_s: Option<u64>,
    /// Uploads: the size of every part but the last, in MiB (5 to 5120; S3's limits).
    pub part_size_mib: Option<u64>,
    /// Uploads: parts uploading at once (each holds one part of memory).
    pub max_in_flight: Option<u64>,
}

/// Settings of the `[hooks]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HooksConfig {
    /// A command run before and after every dump and restore (see `engine::hooks`).
    pub command: Option<PathBuf>,
}

/// Settings of the `[gpu]` table (see [`crate::gpu`]).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuConfig {
    /// `auto` (the default), `cuda-checkpoint`, `driver` or `off`.
    pub backend: Option<crate::gpu::BackendChoice>,
    pub cuda_checkpoint: Option<PathBuf>,
    pub libcuda: Option<PathBuf>,
    pub nvidia_smi: Option<PathBuf>,
    /// Bound on locking each CUDA process before a dump, in milliseconds.
    pub lock_timeout_ms: Option<u64>,
}

/// Settings of the `[profiling]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfilingConfig {
    /// Whether the CLI prints the timings of every dump and restore (default: on).
    pub enabled: Option<bool>,
}

/// Settings of the `[daemon]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    /// The file holding the bearer token that every call to the daemon over TCP must carry (default
    /// [`DEFAULT_TOKEN_FILE`]); unused with the Unix socket.
    pub token_file: Option<PathBuf>,
    /// A group (name or number) whose members may use the daemon's Unix socket (then mode 0660): each acts
    /// only on processes and jobs of their own, and writes checkpoints only where they could write
    /// themselves. Unset: the socket is root's alone (0600).
    pub socket_group: Option<String>,
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
    /// The daemon's address: a Unix socket path (default /run/cedana.sock), or HOST:PORT with protocol `tcp`
    /// (default 127.0.0.1:8080).
    pub address: Option<String>,
    /// `unix` (the default) or `tcp` (then `address` is HOST:PORT).
    pub protocol: Option<String>,
    /// Log level of the daemon and the CLI (error, warn, info, debug, trace).
    pub log_level: Option<String>,
    /// This node's name, recorded in the origin of its jobs' checkpoints (default: the hostname).
    pub node_name: Option<String>,
    #[serde(default)]
    pub daemon: DaemonConfig,
    #[serde(default)]
    pub db: DbConfig,
    #[serde(default)]
    pub criu: CriuConfig,
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    #[serde(default)]
    pub restore: RestoreConfig,
    #[serde(default)]
    pub storage: StorageSettings,
    #[serde(default)]
    pub hooks: HooksConfig,
    #[serde(default)]
    pub gpu: GpuConfig,
    #[serde(default)]
    pub profiling: ProfilingConfig,
}

/// The daemon's socket when the configuration names none.
pub const DEFAULT_ADDRESS: &str = "/run/cedana.sock";
/// The daemon's address with protocol `tcp` when the configuration names none (loopback only).
pub const DEFAULT_TCP_ADDRESS: &str = "127.0.0.1:8080";
/// The daemon's token file when the configuration names none.
pub const DEFAULT_TOKEN_FILE: &str = "/etc/cedana/token";
/// The job store when the configuration names none.
pub const DEFAULT_DB_PATH: &str = "/var/lib/cedana/cedana.db";

/// Whether images stream between CRIU and the archive when neither flag nor config says (see
/// scripts/bench-stream.sh for why).
pub const DEFAULT_STREAM: bool = true;

/// Whether local archives are written past the page cache when the config does not say: no, as CRIU writes
/// (see `checkpoint::direct` for why).
pub const DEFAULT_DIRECT_WRITES: bool = false;
/// An upload fails after this many seconds without a part completing (`storage.stall_timeout_s`).
pub const DEFAULT_STALL_TIMEOUT_S: u64 = 30;
/// The size of an upload's first parts, in MiB (`storage.part_size_mib`): S3's smallest.
pub const DEFAULT_PART_SIZE_MIB: usize = 5;
/// Parts uploading at once (`storage.max_in_flight`).
pub const DEFAULT_MAX_IN_FLIGHT: usize = 4;

/// Default compression when neither flag nor config names one (Cedana's default).
pub const DEFAULT_COMPRESSION: Compression = Compression::Tar;

/// Whether timings are printed when the configuration does not say (Cedana's default).
pub const DEFAULT_PROFILING_ENABLED: bool = true;

/// The environment variable naming the config file.
pub const CONFIG_ENV: &str = "CEDANA_CONFIG";
/// The config file read when neither `--config` nor `$CEDANA_CONFIG` names one (only when it exists).
pub const DEFAULT_CONFIG_PATH: &str = "/etc/cedana/config.toml";
/// The daemon's protocol when the configuration names none.
pub const DEFAULT_PROTOCOL: &str = "unix";
/// The log level when neither the configuration nor `--log-level` names one (the CLI flag's default).
pub const DEFAULT_LOG_LEVEL: &str = "warn";

/// Where one configuration value came from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "source", rename_all = "lowercase")]
pub enum Source {
    /// Nothing set it: the built-in default applies.
    Default,
    /// The config file.
    File { path: PathBuf },
    /// An environment variable.
    Env { var: &'static str },
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Default => f.write_str("default"),
            Source::File { path } => write!(f, "file {}", path.display()),
            Source::Env { var } => write!(f, "env {var}"),
        }
    }
}

/// How the config file was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileChoice {
    /// The `--config` flag (`Config::load_from(Some(..))`).
    Flag,
    /// `$CEDANA_CONFIG`.
    Env,
    /// [`DEFAULT_CONFIG_PATH`], which exists.
    DefaultPath,
}

impl std::fmt::Display for FileChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FileChoice::Flag => f.write_str("flag --config"),
            FileChoice::Env => write!(f, "env {CONFIG_ENV}"),
            FileChoice::DefaultPath => f.write_str("default path"),
        }
    }
}

impl serde::Serialize for FileChoice {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The config file that was read.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ConfigFile {
    pub path: PathBuf,
    pub chosen_by: FileChoice,
}

/// Where each key of a loaded [`Config`] came from (see [`Config::load_with_sources`]).
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// The config file read, if any.
    pub file: Option<ConfigFile>,
    by_key: std::collections::BTreeMap<&'static str, Source>,
}

impl Sources {
    /// The source of `key` (a dotted name such as `checkpoint.dir`); `Default` for keys nothing set.
    pub fn get(&self, key: &str) -> Source {
        self.by_key.get(key).cloned().unwrap_or(Source::Default)
    }
}

/// One key of the effective configuration, as `cedana config show` prints it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Setting {
    /// The dotted key, e.g. `checkpoint.compression`.
    pub key: &'static str,
    /// The value used: the configured one, else the default (`None`: nothing, e.g. no hook command, or no
    /// CRIU binary found).
    pub value: Option<String>,
    #[serde(flatten)]
    pub source: Source,
    /// The environment variable that overrides it (`CEDANA_<KEY>`, dots as underscores).
    pub env: &'static str,
}

/// A value that can be read from an environment variable.
trait FromEnv: Sized {
    fn from_env(v: std::ffi::OsString) -> Result<Self, String>;
}

impl FromEnv for PathBuf {
    fn from_env(v: std::ffi::OsString) -> Result<Self, String> {
        Ok(v.into())
    }
}

impl FromEnv for String {
    fn from_env(v: std::ffi::OsString) -> Result<Self, String> {
        v.into_string().map_err(|v| format!("{v:?} is not valid UTF-8"))
    }
}

impl FromEnv for bool {
    fn from_env(v: std::ffi::OsString) -> Result<Self, String> {
        let s = String::from_env(v)?;
        match s.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Ok(true),
            "false" | "0" | "no" | "off" => Ok(false),
            _ => Err(format!("{s:?} is not a boolean: use true or false")),
        }
    }
}

impl FromEnv for Compression {
    fn from_env(v: std::ffi::OsString) -> Result<Self, String> {
        String::from_env(v)?.parse().map_err(|e: crate::codec::CodecError| e.to_string())
    }
}

impl FromEnv for u64 {
    fn from_env(v: std::ffi::OsString) -> Result<Self, String> {
        let s = String::from_env(v)?;
        s.trim().parse().map_err(|_| format!("{s:?} is not a whole number"))
    }
}

impl FromEnv for crate::gpu::BackendChoice {
    fn from_env(v: std::ffi::OsString) -> Result<Self, String> {
        String::from_env(v)?.parse()
    }
}

impl FromEnv for CriuDriverKind {
    fn from_env(v: std::ffi::OsString) -> Result<Self, String> {
        String::from_env(v)?.parse()
    }
}

/// One configuration key: its dotted name, its environment variables, and how to set, test and show it.
struct Key {
    name: &'static str,
    /// `CEDANA_<KEY>` (dots as underscores) first, then older names still honoured; the first one set wins.
    env: &'static [&'static str],
    set: fn(&mut Config, std::ffi::OsString) -> Result<(), String>,
    is_set: fn(&Config) -> bool,
    /// The value used (the configured one, else the default).
    value: fn(&Config) -> Option<String>,
}

/// `key!("dotted.name", ["CEDANA_DOTTED_NAME", "CEDANA_OLD_NAME"], field.path, |c| effective value)`.
macro_rules! key {
    ($name:literal, [$($env:literal),+], $($field:ident).+, $value:expr) => {
        Key {
            name: $name,
            env: &[$($env),+],
            set: |c, v| {
                c.$($field).+ = Some(FromEnv::from_env(v)?);
                Ok(())
            },
            is_set: |c| c.$($field).+.is_some(),
            value: $value,
        }
    };
}

/// A value for [`Setting::value`].
fn shown(v: impl std::fmt::Display) -> Option<String> {
    Some(v.to_string())
}

/// Every key, in the order `cedana config show` prints them. Adding a key: its field above, one line here.
#[rustfmt::skip]
const KEYS: &[Key] = &[
    key!("address", ["CEDANA_ADDRESS"], address, |c| match c.daemon_address() { Ok(a) => shown(a), Err(_) => c.address.clone() }),
    key!("protocol", ["CEDANA_PROTOCOL"], protocol, |c| shown(c.protocol())),
    key!("log_level", ["CEDANA_LOG_LEVEL"], log_level, |c| shown(c.log_level())),
    key!("node_name", ["CEDANA_NODE_NAME"], node_name, |c| shown(c.node_name())),
    key!("db.path", ["CEDANA_DB_PATH"], db.path, |c| shown(c.db_path().display())),
    key!("daemon.token_file", ["CEDANA_DAEMON_TOKEN_FILE"], daemon.token_file, |c| shown(c.token_file().display())),
    key!("daemon.socket_group", ["CEDANA_DAEMON_SOCKET_GROUP"], daemon.socket_group, |c| c.daemon.socket_group.clone()),
    key!("criu.binary_path", ["CEDANA_CRIU_BINARY_PATH"], criu.binary_path, |c| c.criu_binary().map(|p| p.display().to_string())),
    key!("criu.driver", ["CEDANA_CRIU_DRIVER"], criu.driver, |c| shown(c.criu_driver())),
    key!("checkpoint.dir", ["CEDANA_CHECKPOINT_DIR"], checkpoint.dir, |c| shown(c.checkpoint_dir().display())),
    key!("checkpoint.compression", ["CEDANA_CHECKPOINT_COMPRESSION"], checkpoint.compression, |c| shown(c.compression())),
    key!("checkpoint.stream", ["CEDANA_CHECKPOINT_STREAM"], checkpoint.stream, |c| shown(c.stream())),
    key!("checkpoint.direct_writes", ["CEDANA_CHECKPOINT_DIRECT_WRITES"], checkpoint.direct_writes, |c| shown(c.direct_writes())),
    key!("checkpoint.scratch_dir", ["CEDANA_CHECKPOINT_SCRATCH_DIR", "CEDANA_SCRATCH_DIR"], checkpoint.scratch_dir, |c| shown(c.scratch_dir().display())),
    key!("restore.lazy", ["CEDANA_RESTORE_LAZY"], restore.lazy, |c| shown(c.restore_lazy())),
    key!("storage.stall_timeout_s", ["CEDANA_STORAGE_STALL_TIMEOUT_S"], storage.stall_timeout_s, |c| shown(c.storage_stall_timeout().as_secs())),
    key!("storage.part_size_mib", ["CEDANA_STORAGE_PART_SIZE_MIB"], storage.part_size_mib, |c| shown(c.storage_part_size() >> 20)),
    key!("storage.max_in_flight", ["CEDANA_STORAGE_MAX_IN_FLIGHT"], storage.max_in_flight, |c| shown(c.storage_max_in_flight())),
    key!("hooks.command", ["CEDANA_HOOKS_COMMAND", "CEDANA_HOOK_COMMAND"], hooks.command, |c| c.hooks.command.as_ref().map(|p| p.display().to_string())),
    key!("gpu.backend", ["CEDANA_GPU_BACKEND"], gpu.backend, |c| shown(c.gpu_settings().backend)),
    key!("gpu.cuda_checkpoint", ["CEDANA_GPU_CUDA_CHECKPOINT"], gpu.cuda_checkpoint, |c| shown(c.gpu_settings().cuda_checkpoint.display())),
    key!("gpu.libcuda", ["CEDANA_GPU_LIBCUDA"], gpu.libcuda, |c| shown(c.gpu_settings().libcuda.display())),
    key!("gpu.nvidia_smi", ["CEDANA_GPU_NVIDIA_SMI"], gpu.nvidia_smi, |c| shown(c.gpu_settings().nvidia_smi.display())),
    key!("gpu.lock_timeout_ms", ["CEDANA_GPU_LOCK_TIMEOUT_MS"], gpu.lock_timeout_ms, |c| shown(c.gpu_settings().lock_timeout.as_millis())),
    key!("profiling.enabled", ["CEDANA_PROFILING_ENABLED"], profiling.enabled, |c| shown(c.profiling_enabled())),
];

impl Config {
    /// Load from the config file (if any) and the environment.
    pub fn load() -> Result<Self, ConfigError> {
        Self::load_from(None)
    }

    /// Load from `file` (else `$CEDANA_CONFIG`, else /etc/cedana/config.toml when it exists) and the
    /// environment.
    pub fn load_from(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with_sources(file).map(|(cfg, _)| cfg)
    }

    /// As [`Config::load_from`], and where each key's value came from: the file, an environment variable
    /// (`CEDANA_<KEY>`, dots as underscores, or an older name), or nothing (the default).
    pub fn load_with_sources(file: Option<&Path>) -> Result<(Self, Sources), ConfigError> {
        Self::load_with_env(file, &|var| std::env::var_os(var))
    }

    /// As [`Config::load_with_sources`], with the environment read through `env`.
    fn load_with_env(
        file: Option<&Path>,
        env: &dyn Fn(&str) -> Option<std::ffi::OsString>,
    ) -> Result<(Self, Sources), ConfigError> {
        let chosen = match file {
            Some(p) => Some(ConfigFile { path: p.to_path_buf(), chosen_by: FileChoice::Flag }),
            None => match env(CONFIG_ENV) {
                Some(p) => Some(ConfigFile { path: p.into(), chosen_by: FileChoice::Env }),
                None => {
                    let p = PathBuf::from(DEFAULT_CONFIG_PATH);
                    p.exists().then_some(ConfigFile { path: p, chosen_by: FileChoice::DefaultPath })
                }
            },
        };
        let mut sources = Sources { file: chosen, ..Default::default() };
        let mut cfg = match &sources.file {
            Some(f) => Self::from_file(&f.path)?,
            None => Config::default(),
        };
        for key in KEYS {
            if let Some(f) = &sources.file {
                if (key.is_set)(&cfg) {
                    sources.by_key.insert(key.name, Source::File { path: f.path.clone() });
                }
            }
            if let Some((var, value)) = key.env.iter().find_map(|var| env(var).map(|v| (*var, v))) {
                (key.set)(&mut cfg, value).map_err(|message| ConfigError::Env { var, message })?;
                sources.by_key.insert(key.name, Source::Env { var });
            }
        }
        Ok((cfg, sources))
    }

    /// Every key with the value used and where it came from, in a stable order.
    pub fn describe(&self, sources: &Sources) -> Vec<Setting> {
        KEYS.iter().map(|k| Setting { key: k.name, value: (k.value)(self), source: sources.get(k.name), env: k.env[0] }).collect()
    }

    /// The dotted names of every key, in the order [`Config::describe`] lists them.
    pub fn keys() -> impl Iterator<Item = &'static str> {
        KEYS.iter().map(|k| k.name)
    }

    /// Parse one TOML file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse { path: path.into(), message: e.to_string() })
    }

    /// The daemon's protocol (`protocol`, else [`DEFAULT_PROTOCOL`]).
    pub fn protocol(&self) -> &str {
        self.protocol.as_deref().unwrap_or(DEFAULT_PROTOCOL)
    }

    /// The CRIU binary used: `criu.binary_path`, else the one [`crate::criu::Criu::locate`] finds (`None`:
    /// none found).
    fn criu_binary(&self) -> Option<PathBuf> {
        match &self.criu.binary_path {
            Some(p) => Some(p.clone()),
            None => crate::criu::Criu::locate(None).ok().map(|criu| criu.binary().to_path_buf()),
        }
    }

    /// Whether restores are lazy by default (`restore.lazy`, else no): lazily where the checkpoint allows it,
    /// normally where it does not.
    pub fn restore_lazy(&self) -> bool {
        self.restore.lazy.unwrap_or(false)
    }

    /// How long an upload may go without a part completing (`storage.stall_timeout_s`, else 30 s).
    pub fn storage_stall_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.storage.stall_timeout_s.unwrap_or(DEFAULT_STALL_TIMEOUT_S))
    }

    /// The size of an upload's first parts in bytes (`storage.part_size_mib`, else [`DEFAULT_PART_SIZE_MIB`]);
    /// the store's limits are checked when an upload starts (the cap here only keeps the product in range).
    pub fn storage_part_size(&self) -> usize {
        let mib = self.storage.part_size_mib.map_or(DEFAULT_PART_SIZE_MIB, |m| m.min(1 << 20) as usize);
        mib << 20
    }

    /// Parts uploading at once (`storage.max_in_flight`, else [`DEFAULT_MAX_IN_FLIGHT`]).
    pub fn storage_max_in_flight(&self) -> usize {
        self.storage.max_in_flight.map_or(DEFAULT_MAX_IN_FLIGHT, |n| n.min(1024) as usize)
    }

    /// The GPU settings: the `[gpu]` table over [`crate::gpu::GpuSettings`]' defaults.
    pub fn gpu_settings(&self) -> crate::gpu::GpuSettings {
        let d = crate::gpu::GpuSettings::default();
        let g = &self.gpu;
        crate::gpu::GpuSettings {
            backend: g.backend.unwrap_or(d.backend),
            cuda_checkpoint: g.cuda_checkpoint.clone().unwrap_or(d.cuda_checkpoint),
            libcuda: g.libcuda.clone().unwrap_or(d.libcuda),
            nvidia_smi: g.nvidia_smi.clone().unwrap_or(d.nvidia_smi),
            lock_timeout: g.lock_timeout_ms.map(std::time::Duration::from_millis).unwrap_or(d.lock_timeout),
        }
    }

    /// This node's name (`node_name`, else the hostname).
    pub fn node_name(&self) -> String {
        self.node_name.clone().unwrap_or_else(|| {
            nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_else(|_| "localhost".into())
        })
    }

    /// The log level (`log_level`, else [`DEFAULT_LOG_LEVEL`]).
    pub fn log_level(&self) -> &str {
        self.log_level.as_deref().unwrap_or(DEFAULT_LOG_LEVEL)
    }

    /// Parent folder for new checkpoints.
    pub fn checkpoint_dir(&self) -> PathBuf {
        self.checkpoint.dir.clone().unwrap_or_else(|| PathBuf::from("/tmp"))
    }

    /// Compression for new checkpoints.
    pub fn compression(&self) -> Compression {
        self.checkpoint.compression.unwrap_or(DEFAULT_COMPRESSION)
    }

    /// Whether dumps and restores stream images between CRIU and the archive by default (where they can: see
    /// `engine::dump::DumpRequest::stream`).
    pub fn stream(&self) -> bool {
        self.checkpoint.stream.unwrap_or(DEFAULT_STREAM)
    }

    /// Whether local archives are written past the page cache (see [`crate::checkpoint::LocalFile`]).
    pub fn direct_writes(&self) -> bool {
        self.checkpoint.direct_writes.unwrap_or(DEFAULT_DIRECT_WRITES)
    }

    /// The daemon's Unix socket (`address`, else [`DEFAULT_ADDRESS`]); see [`Config::daemon_address`] for the
    /// address of either protocol.
    pub fn address(&self) -> PathBuf {
        self.address.clone().map(PathBuf::from).unwrap_or_else(|| PathBuf::from(DEFAULT_ADDRESS))
    }

    /// Where the daemon listens and clients connect: the Unix socket, or with `protocol = "tcp"` the
    /// HOST:PORT in `address` (else [`DEFAULT_TCP_ADDRESS`]). Fails on another protocol, or on an address
    /// that is not HOST:PORT when the protocol is `tcp`.
    pub fn daemon_address(&self) -> Result<DaemonAddress, ConfigError> {
        match self.protocol() {
            "unix" => Ok(DaemonAddress::Unix(self.address())),
            "tcp" => {
                let address = self.address.clone().unwrap_or_else(|| DEFAULT_TCP_ADDRESS.to_string());
                check_host_port(&address).map_err(|reason| ConfigError::TcpAddress { address: address.clone(), reason })?;
                Ok(DaemonAddress::Tcp(address))
            }
            other => Err(ConfigError::Protocol { protocol: other.to_string() }),
        }
    }

    /// The file holding the daemon's bearer token for TCP (`daemon.token_file`, else [`DEFAULT_TOKEN_FILE`]).
    pub fn token_file(&self) -> PathBuf {
        self.daemon.token_file.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_TOKEN_FILE))
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

    /// Whether the CLI prints the timings of dumps and restores (`profiling.enabled`, else
    /// [`DEFAULT_PROFILING_ENABLED`]).
    pub fn profiling_enabled(&self) -> bool {
        self.profiling.enabled.unwrap_or(DEFAULT_PROFILING_ENABLED)
    }
}

/// Where the daemon listens (see [`Config::daemon_address`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DaemonAddress {
    /// A Unix socket (protocol `unix`).
    Unix(PathBuf),
    /// `HOST:PORT` (protocol `tcp`); the host is a name, an IPv4 address or a bracketed IPv6 address.
    Tcp(String),
}

impl std::fmt::Display for DaemonAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DaemonAddress::Unix(p) => write!(f, "{}", p.display()),
            DaemonAddress::Tcp(a) => f.write_str(a),
        }
    }
}

/// Whether `address` is HOST:PORT; why not otherwise.
fn check_host_port(address: &str) -> Result<(), &'static str> {
    let (host, port) = address.rsplit_once(':').ok_or("no :PORT")?;
    port.parse::<u16>().map_err(|_| "the port is not a number from 0 to 65535")?;
    let host = match host.strip_prefix('[') {
        Some(v6) => v6.strip_suffix(']').ok_or("an IPv6 host needs brackets: [::1]:PORT")?,
        None if host.contains(':') => return Err("an IPv6 host needs brackets: [::1]:PORT"),
        None => host,
    };
    if host.is_empty() {
        return Err("no host");
    }
    if host.contains(['/', ' ']) {
        return Err("the host holds '/' or a space (a socket path?)");
    }
    Ok(())
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

    fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<std::ffi::OsString> {
        let vars: std::collections::HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| vars.get(k).map(Into::into)
    }

    #[test]
    fn every_key_has_its_cedana_env_name_first() {
        for key in KEYS {
            assert_eq!(key.env[0], format!("CEDANA_{}", key.name.to_uppercase().replace('.', "_")), "{}", key.name);
        }
        let names: Vec<_> = Config::keys().collect();
        assert_eq!(
            names,
            [
                "address",
                "protocol",
                "log_level",
                "node_name",
                "db.path",
                "daemon.token_file",
                "daemon.socket_group",
                "criu.binary_path",
                "criu.driver",
                "checkpoint.dir",
                "checkpoint.compression",
                "checkpoint.stream",
                "checkpoint.direct_writes",
                "checkpoint.scratch_dir",
                "restore.lazy",
                "storage.stall_timeout_s",
                "storage.part_size_mib",
                "storage.max_in_flight",
                "hooks.command",
                "gpu.backend",
                "gpu.cuda_checkpoint",
                "gpu.libcuda",
                "gpu.nvidia_smi",
                "gpu.lock_timeout_ms",
                "profiling.enabled"
            ]
        );
    }

    #[test]
    fn sources_say_file_env_or_default() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "address = \"/x/s.sock\"\n[checkpoint]\ncompression = \"zstd\"\ndir = \"/from/file\"\n").unwrap();
        let env = env_of(&[("CEDANA_CHECKPOINT_DIR", "/from/env"), ("CEDANA_CONFIG", "/ignored/when/flag/given")]);
        let (c, sources) = Config::load_with_env(Some(&p), &env).unwrap();
        assert_eq!(sources.file, Some(ConfigFile { path: p.clone(), chosen_by: FileChoice::Flag }));
        assert_eq!(c.checkpoint_dir(), PathBuf::from("/from/env"));
        assert_eq!(sources.get("checkpoint.dir"), Source::Env { var: "CEDANA_CHECKPOINT_DIR" });
        assert_eq!(sources.get("address"), Source::File { path: p.clone() });
        assert_eq!(sources.get("db.path"), Source::Default);
        let rows = c.describe(&sources);
        let row = |k: &str| rows.iter().find(|r| r.key == k).unwrap().clone();
        assert_eq!(row("checkpoint.compression").value.as_deref(), Some("zstd"));
        assert_eq!(row("checkpoint.compression").source.to_string(), format!("file {}", p.display()));
        assert_eq!(row("checkpoint.dir").source.to_string(), "env CEDANA_CHECKPOINT_DIR");
        assert_eq!(row("db.path").value.as_deref(), Some(DEFAULT_DB_PATH));
        assert_eq!(row("db.path").source.to_string(), "default");
        assert_eq!(row("criu.driver").value.as_deref(), Some("swrk"));
        assert_eq!(row("protocol").value.as_deref(), Some("unix"));
        assert_eq!(row("hooks.command").value, None);
        assert_eq!(row("hooks.command").env, "CEDANA_HOOKS_COMMAND");
        let json = serde_json::to_value(row("checkpoint.dir")).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"key": "checkpoint.dir", "value": "/from/env", "source": "env",
                "var": "CEDANA_CHECKPOINT_DIR", "env": "CEDANA_CHECKPOINT_DIR"})
        );

        // $CEDANA_CONFIG names the file when no flag does.
        let env = env_of(&[("CEDANA_CONFIG", p.to_str().unwrap())]);
        let (_, sources) = Config::load_with_env(None, &env).unwrap();
        assert_eq!(sources.file.unwrap().chosen_by, FileChoice::Env);
    }

    #[test]
    fn new_and_old_env_names_both_work_and_the_new_one_wins() {
        let (c, s) =
            Config::load_with_env(None, &env_of(&[("CEDANA_SCRATCH_DIR", "/old"), ("CEDANA_HOOK_COMMAND", "/h")])).unwrap();
        assert_eq!(c.scratch_dir(), PathBuf::from("/old"));
        assert_eq!(s.get("checkpoint.scratch_dir"), Source::Env { var: "CEDANA_SCRATCH_DIR" });
        assert_eq!(c.hooks.command.as_deref(), Some(Path::new("/h")));
        let env = env_of(&[
            ("CEDANA_SCRATCH_DIR", "/old"),
            ("CEDANA_CHECKPOINT_SCRATCH_DIR", "/new"),
            ("CEDANA_HOOKS_COMMAND", "/h2"),
            ("CEDANA_CRIU_DRIVER", "cli"),
            ("CEDANA_CRIU_BINARY_PATH", "/c/criu"),
        ]);
        let (c, s) = Config::load_with_env(None, &env).unwrap();
        assert_eq!(c.scratch_dir(), PathBuf::from("/new"));
        assert_eq!(s.get("checkpoint.scratch_dir"), Source::Env { var: "CEDANA_CHECKPOINT_SCRATCH_DIR" });
        assert_eq!(c.hooks.command.as_deref(), Some(Path::new("/h2")));
        assert_eq!(c.criu_driver(), CriuDriverKind::Cli);
        assert_eq!(c.criu.binary_path.as_deref(), Some(Path::new("/c/criu")));
    }

    #[test]
    fn profiling_is_on_by_default_and_turned_off_by_the_file_or_the_environment() {
        let (c, s) = Config::load_with_env(None, &env_of(&[])).unwrap();
        assert!(c.profiling_enabled());
        let row = c.describe(&s).into_iter().find(|r| r.key == "profiling.enabled").unwrap();
        assert_eq!((row.value.as_deref(), row.source, row.env), (Some("true"), Source::Default, "CEDANA_PROFILING_ENABLED"));

        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "[profiling]\nenabled = false\n").unwrap();
        let (c, s) = Config::load_with_env(Some(&p), &env_of(&[])).unwrap();
        assert!(!c.profiling_enabled());
        assert_eq!(s.get("profiling.enabled"), Source::File { path: p.clone() });
        let row = c.describe(&s).into_iter().find(|r| r.key == "profiling.enabled").unwrap();
        assert_eq!(row.value.as_deref(), Some("false"));

        // The environment wins over the file, in any of the usual spellings.
        for (v, on) in [("true", true), ("TRUE", true), ("1", true), ("on", true), ("false", false), ("0", false), ("no", false)]
        {
            let (c, s) = Config::load_with_env(Some(&p), &env_of(&[("CEDANA_PROFILING_ENABLED", v)])).unwrap();
            assert_eq!(c.profiling_enabled(), on, "{v}");
            assert_eq!(s.get("profiling.enabled"), Source::Env { var: "CEDANA_PROFILING_ENABLED" });
        }
        let err = Config::load_with_env(None, &env_of(&[("CEDANA_PROFILING_ENABLED", "maybe")])).unwrap_err().to_string();
        assert!(err.contains("CEDANA_PROFILING_ENABLED") && err.contains("maybe") && err.contains("true or false"), "{err}");
        std::fs::write(&p, "[profiling]\nenabled = \"yes\"\n").unwrap();
        assert!(Config::load_with_env(Some(&p), &env_of(&[])).is_err(), "the file takes a TOML boolean");
    }

    #[test]
    fn bad_values_name_the_variable_or_file_and_the_valid_values() {
        let err = Config::load_with_env(None, &env_of(&[("CEDANA_CHECKPOINT_COMPRESSION", "brotli")])).unwrap_err().to_string();
        assert!(err.contains("CEDANA_CHECKPOINT_COMPRESSION") && err.contains("brotli"), "{err}");
        assert!(err.contains("none, tar, gzip, lz4, zlib, zstd"), "{err}");
        let err = Config::load_with_env(None, &env_of(&[("CEDANA_CRIU_DRIVER", "fast")])).unwrap_err().to_string();
        assert!(err.contains("CEDANA_CRIU_DRIVER") && err.contains("swrk or cli"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "[checkpoint]\ncompression = \"brotli\"\n").unwrap();
        let err = Config::load_with_env(Some(&p), &env_of(&[])).unwrap_err().to_string();
        assert!(err.contains(&p.display().to_string()) && err.contains("brotli") && err.contains("zstd"), "{err}");
        std::fs::write(&p, "[criu]\ndriver = \"fast\"\n").unwrap();
        let err = Config::load_with_env(Some(&p), &env_of(&[])).unwrap_err().to_string();
        assert!(err.contains(&p.display().to_string()) && err.contains("swrk") && err.contains("cli"), "{err}");
    }

    #[test]
    fn the_daemon_address_follows_the_protocol() {
        let c = Config::default();
        assert_eq!(c.daemon_address().unwrap(), DaemonAddress::Unix(PathBuf::from(DEFAULT_ADDRESS)));
        let tcp = |address: Option<&str>| Config {
            protocol: Some("tcp".into()),
            address: address.map(str::to_string),
            ..Default::default()
        };
        assert_eq!(tcp(None).daemon_address().unwrap(), DaemonAddress::Tcp(DEFAULT_TCP_ADDRESS.into()));
        for ok in ["127.0.0.1:8080", "localhost:1", "[::1]:9000", "0.0.0.0:0"] {
            assert_eq!(tcp(Some(ok)).daemon_address().unwrap(), DaemonAddress::Tcp(ok.into()), "{ok}");
        }
        for bad in ["/run/cedana.sock", "127.0.0.1", "127.0.0.1:http", "::1:80", ":80", "127.0.0.1:70000"] {
            let err = tcp(Some(bad)).daemon_address().unwrap_err().to_string();
            assert!(err.contains(bad) && err.contains("HOST:PORT") && err.contains(DEFAULT_TCP_ADDRESS), "{err}");
        }
        let err = Config { protocol: Some("udp".into()), ..Default::default() }.daemon_address().unwrap_err().to_string();
        assert!(err.contains("\"udp\"") && err.contains("\"unix\" or \"tcp\""), "{err}");
    }

    #[test]
    fn the_token_file_has_a_default_a_file_key_and_an_env_override() {
        let (c, s) = Config::load_with_env(None, &env_of(&[])).unwrap();
        assert_eq!(c.token_file(), PathBuf::from(DEFAULT_TOKEN_FILE));
        assert_eq!(s.get("daemon.token_file"), Source::Default);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "protocol = \"tcp\"\naddress = \"127.0.0.1:9\"\n[daemon]\ntoken_file = \"/f/token\"\n").unwrap();
        let (c, s) = Config::load_with_env(Some(&p), &env_of(&[])).unwrap();
        assert_eq!(c.token_file(), PathBuf::from("/f/token"));
        assert_eq!(s.get("daemon.token_file"), Source::File { path: p.clone() });
        let row = c.describe(&s).into_iter().find(|r| r.key == "address").unwrap();
        assert_eq!(row.value.as_deref(), Some("127.0.0.1:9"));
        let (c, s) = Config::load_with_env(Some(&p), &env_of(&[("CEDANA_DAEMON_TOKEN_FILE", "/e/token")])).unwrap();
        assert_eq!(c.token_file(), PathBuf::from("/e/token"));
        assert_eq!(s.get("daemon.token_file"), Source::Env { var: "CEDANA_DAEMON_TOKEN_FILE" });
        // With tcp and no address, `config show` gives the TCP default, not the socket's.
        let c = Config { protocol: Some("tcp".into()), ..Default::default() };
        let row = c.describe(&Sources::default()).into_iter().find(|r| r.key == "address").unwrap();
        assert_eq!(row.value.as_deref(), Some(DEFAULT_TCP_ADDRESS));
    }
}
