//! `checkpoint`: the real `runc checkpoint` through the engine, written in our format into `--image-path`
//! (as `cedana-checkpoint.<ext>`), so that `docker checkpoint create` and containerd store our checkpoint.

use std::ffi::OsString;
use std::path::PathBuf;

use cedana::codec::Compression;
use cedana::config::Config;
use cedana::criu::Criu;
use cedana::engine::{Destination, DumpRequest, Engine, OpContext, RuncSpec, TargetSpec};

use crate::args::{CommandArgs, Invocation};
use crate::log::RuncLog;
use crate::{runc_for, WrapperError};

/// Name (without extension) of the checkpoint we write into an image path.
pub const CHECKPOINT_NAME: &str = "cedana-checkpoint";

/// Compression when the configuration names none: zstd (level 1, all cores) is as fast as a plain tar on
/// two cores and halves the size of typical images.
pub const DEFAULT_COMPRESSION: Compression = Compression::Zstd;

/// Flags that make runc do something other than one full dump; those go to runc untouched.
const RUNC_ONLY: [&str; 5] = ["pre-dump", "lazy-pages", "page-server", "parent-path", "status-fd"];

/// Whether we handle this `checkpoint` (one id, and a plain full dump).
pub fn handles(a: &CommandArgs) -> bool {
    a.positionals.len() == 1 && !RUNC_ONLY.iter().any(|f| a.flags.iter().any(|(n, _)| n == f))
}

/// Refuse a `--pre-dump` up front, with the reason, when the kernel cannot track dirty memory (runc would
/// only say "CRIU is missing features"). Any doubt (no CRIU found) is left to runc.
pub fn check_pre_dump(cfg: &Config, inv: &Invocation, a: &CommandArgs) -> Result<(), WrapperError> {
    if !a.on("pre-dump") {
        return Ok(());
    }
    let from_flag = inv.globals.forward.iter().find_map(|t| t.to_str()?.strip_prefix("--criu=").map(PathBuf::from));
    let Ok(criu) = Criu::locate(from_flag.as_deref().or(cfg.criu.binary_path.as_deref())) else { return Ok(()) };
    match criu.has_feature("mem_dirty_track") {
        Ok(false) => Err(WrapperError::NoDirtyTracking),
        _ => Ok(()),
    }
}

/// Checkpoint container `a.positionals[0]`.
pub fn run(cfg: &Config, inv: &Invocation, a: &CommandArgs, log: &RuncLog) -> Result<i32, WrapperError> {
    let id = a.positionals[0].clone();
    let cwd = std::env::current_dir().map_err(WrapperError::io("reading the current folder"))?;
    // runc's default image path is ./checkpoint.
    let image_path = a.value("image-path").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("checkpoint"));
    let image_path = cwd.join(image_path);
    std::fs::create_dir_all(&image_path).map_err(WrapperError::io(format!("creating {}", image_path.display())))?;
    let options = cedana::criu::options::CriuOptions {
        tcp_established: a.on("tcp-established"),
        ext_unix_sk: a.on("ext-unix-sk"),
        shell_job: a.on("shell-job"),
        file_locks: a.on("file-locks"),
        ..Default::default()
    };
    let mapped = ["image-path", "work-path", "leave-running", "tcp-established", "ext-unix-sk", "shell-job", "file-locks"];
    let extra_flags: Vec<OsString> = a.tokens_without(&mapped);
    let spec = RuncSpec {
        id: id.clone(),
        runtime: Some(std::sync::Arc::new(runc_for(inv)?)),
        root: None,
        work_path: a.value("work-path").map(|w| cwd.join(w)),
        extra_flags,
    };
    let compression = cfg.checkpoint.compression.unwrap_or(DEFAULT_COMPRESSION);
    let engine = Engine::new(cfg.clone())?;
    let req = DumpRequest {
        target: TargetSpec::Runc(spec),
        destination: Destination::dir(image_path),
        name: Some(CHECKPOINT_NAME.to_string()),
        compression,
        leave_running: a.on("leave-running"),
        options,
    };
    let out = engine.dump(req, &OpContext::new())?;
    log.info(&format!(
        "cedana: checkpointed {id} to {} ({compression}, {} bytes, images {} bytes) in {} ms: runc checkpoint {} ms, packaging {} ms",
        out.path.display(),
        out.size,
        out.manifest.images_size(),
        out.total_time.as_millis(),
        out.criu_time.as_millis(),
        out.package_time.as_millis()
    ));
    Ok(0)
}
