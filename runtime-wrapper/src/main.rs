//! `cedana-runc`: a runc-compatible runtime. `checkpoint` and `restore` go through the cedana engine (our
//! checkpoint format, compression, verification), and so does `create` of a bundle that asks to be restored
//! from a checkpoint; every other command line is handed to the real runc unchanged, by exec, so its output,
//! exit code and signals are runc's own.
//!
//! The real runc is `$CEDANA_RUNC_BINARY`, else `runc` on PATH (never cedana-runc itself). Checkpoints are
//! compressed as `$CEDANA_CHECKPOINT_COMPRESSION` / the config's `checkpoint.compression`, else zstd.
//! Set `CEDANA_LOG_LEVEL` (e.g. `debug`) for the engine's own logs on stderr.

mod args;
mod checkpoint;
mod log;
mod restore;

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;

use args::Invocation;
use cedana::runc::Runc;
use log::RuncLog;

/// Why a command handled by the wrapper failed.
#[derive(Debug, thiserror::Error)]
pub enum WrapperError {
    #[error(transparent)]
    Engine(Box<cedana::engine::EngineError>),
    #[error(transparent)]
    Runc(#[from] cedana::runc::RuncError),
    #[error(transparent)]
    Config(#[from] cedana::config::ConfigError),
    #[error("{how} names {path}, which holds no cedana checkpoint: give a checkpoint file or folder of `cedana dump runc`, or a `docker checkpoint` folder written by cedana-runc")]
    NoCheckpoint { how: &'static str, path: PathBuf },
    #[error("a pre-dump needs the kernel's memory dirty tracking, which this machine lacks (no CONFIG_MEM_SOFT_DIRTY: `criu check --feature mem_dirty_track` fails); take a full checkpoint instead (without --pre-dump). The container was not touched")]
    NoDirtyTracking,
    #[error("cannot run the real runc {binary}: {source}")]
    Exec {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl From<cedana::engine::EngineError> for WrapperError {
    fn from(e: cedana::engine::EngineError) -> Self {
        WrapperError::Engine(Box::new(e))
    }
}

impl WrapperError {
    fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> WrapperError {
        let what = what.into();
        move |source| WrapperError::Io { what, source }
    }
}

fn main() {
    // CRIU runs our binaries as action scripts.
    cedana::criu::hook::run_if_invoked();
    if let Ok(level) = std::env::var("CEDANA_LOG_LEVEL") {
        let filter = tracing_subscriber::EnvFilter::try_new(level).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
    }
    let raw: Vec<OsString> = std::env::args_os().skip(1).collect();
    let argv: Vec<String> = raw.iter().map(|a| a.to_string_lossy().into_owned()).collect();
    let inv = args::parse(&argv);
    let log = inv
        .as_ref()
        .map(|i| RuncLog { file: i.globals.log.clone(), format: i.globals.log_format, debug: i.globals.debug })
        .unwrap_or_default();
    let code = match dispatch(inv.as_ref(), &raw, &log) {
        Ok(code) => code,
        Err(err) => {
            log.fatal(&format!("cedana-runc: {err}"));
            1
        }
    };
    std::process::exit(code);
}

/// Handle the commands we intercept; hand everything else to runc.
fn dispatch(inv: Option<&Invocation>, raw: &[OsString], log: &RuncLog) -> Result<i32, WrapperError> {
    let Some(inv) = inv else { return passthrough(raw) };
    let cfg = || cedana::config::Config::load();
    match inv.command.as_deref() {
        Some("checkpoint") => match args::CHECKPOINT.parse(&inv.args) {
            Some(a) if checkpoint::handles(&a) => checkpoint::run(&cfg()?, inv, &a, log),
            Some(a) => {
                checkpoint::check_pre_dump(&cfg()?, inv, &a)?;
                passthrough(raw)
            }
            None => passthrough(raw),
        },
        Some("restore") => match args::RESTORE.parse(&inv.args) {
            Some(a) => restore::restore(&cfg()?, inv, &a, log)?.map_or_else(|| passthrough(raw), Ok),
            None => passthrough(raw),
        },
        Some(cmd @ ("create" | "run")) => {
            let spec = if cmd == "run" { &args::RUN } else { &args::CREATE };
            match spec.parse(&inv.args) {
                Some(a) => restore::create(&cfg()?, inv, &a, cmd == "run", log)?.map_or_else(|| passthrough(raw), Ok),
                None => passthrough(raw),
            }
        }
        Some("start") => match args::START.parse(&inv.args) {
            Some(a) if restore::start(inv, &a, log) => Ok(0),
            _ => passthrough(raw),
        },
        _ => passthrough(raw),
    }
}

/// Become the real runc with the original arguments (returns only if exec fails).
fn passthrough(raw: &[OsString]) -> Result<i32, WrapperError> {
    let binary = cedana::runc::locate()?;
    let err = std::process::Command::new(&binary).args(raw).exec();
    Err(WrapperError::Exec { binary, source: err })
}

/// The real runc with the caller's global flags.
pub(crate) fn runc_for(inv: &Invocation) -> Result<Runc, WrapperError> {
    let runc = Runc::locate(inv.globals.root.clone())?.with_global(inv.globals.forward.iter().cloned());
    Ok(match &inv.globals.log {
        Some(file) => runc.with_log(file, if inv.globals.log_format == args::LogFormat::Json { "json" } else { "text" }),
        None => runc,
    })
}
