//! `checkpoint`: the real `runc checkpoint` through the engine, written in our format into `--image-path`
//! (as `cedana-checkpoint.<ext>`), so that `docker checkpoint create` and containerd store our checkpoint.

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

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

/// A path flag's value, as runc reads it: absent or empty means "not given".
pub fn path_flag(a: &CommandArgs, name: &str) -> Option<PathBuf> {
    a.value(name).filter(|v| !v.is_empty()).map(PathBuf::from)
}

/// Checkpoint container `a.positionals[0]` into the image path, replacing a checkpoint there (ours, or
/// runc's plain CRIU images) as runc does, but atomically: the old one stays as it was until the new one is
/// complete, and a failed checkpoint leaves it untouched.
pub fn run(cfg: &Config, inv: &Invocation, a: &CommandArgs, log: &RuncLog) -> Result<i32, WrapperError> {
    let id = a.positionals[0].clone();
    let cwd = std::env::current_dir().map_err(WrapperError::io("reading the current folder"))?;
    // An object store's URL (s3://BUCKET/PREFIX, gs://...): the checkpoint is the object
    // PREFIX/cedana-checkpoint.<ext> there (uploaded as it is written; visible only once complete).
    let url = a.value("image-path").filter(|p| Destination::parse(p).local_dir().is_none()).map(str::to_string);
    // runc's default image path is ./checkpoint (also for an empty --image-path). The engine creates it once
    // the container is found, as runc does (not for a container that does not exist).
    let image_path = cwd.join(path_flag(a, "image-path").unwrap_or_else(|| PathBuf::from("checkpoint")));
    let existed = url.is_none() && image_path.symlink_metadata().is_ok();
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
        work_path: path_flag(a, "work-path").map(|w| cwd.join(w)),
        extra_flags,
    };
    let compression = cfg.checkpoint.compression.unwrap_or(DEFAULT_COMPRESSION);
    let engine = Engine::new(cfg.clone())?;
    let req = DumpRequest {
        target: TargetSpec::Runc(spec),
        destination: match &url {
            Some(url) => Destination::parse(url),
            None => Destination::dir(&image_path).replacing(),
        },
        name: Some(CHECKPOINT_NAME.to_string()),
        compression,
        leave_running: a.on("leave-running"),
        options,
        // runc runs CRIU here and writes image files.
        stream: None,
    };
    let out = engine.dump(req, &cancelled_by_signals());
    if url.is_none() && !existed && image_path.is_dir() {
        // runc creates the image path with mode 0600 (os.MkdirAll(imagePath, 0o600)).
        let _ = std::fs::set_permissions(&image_path, std::fs::Permissions::from_mode(0o600));
    }
    let out = out?;
    if url.is_none() {
        remove_replaced(&image_path, &out.path, log);
    }
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

/// A context that SIGTERM and SIGINT cancel: a caller that gives up on a checkpoint (the shim when a
/// checkpoint-on-stop runs out of time) stops it, and the engine rolls it back (the container runs on, nothing
/// incomplete is left). A signal that cannot be caught leaves the default, which ends this process.
fn cancelled_by_signals() -> OpContext {
    let cancel = cedana::cancel::Cancel::new();
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        if let Err(e) = signal_hook::flag::register(sig, cancel.flag()) {
            tracing::warn!(signal = sig, error = %e, "cannot catch the signal: it will end the checkpoint abruptly");
        }
    }
    OpContext::new().with_cancel(cancel)
}

/// Once the new checkpoint at `kept` is committed, remove what an earlier checkpoint left in the image path:
/// runc's plain CRIU images (`*.img`, `descriptors.json`) and our checkpoints under other extensions (a
/// restore must find only the new one). Failures are logged, not fatal: the new checkpoint is complete.
fn remove_replaced(image_path: &Path, kept: &Path, log: &RuncLog) {
    let Ok(entries) = std::fs::read_dir(image_path) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if path == kept || !is_replaced(&name) {
            continue;
        }
        let res = match entry.file_type() {
            Ok(t) if t.is_dir() => std::fs::remove_dir_all(&path),
            _ => std::fs::remove_file(&path),
        };
        if let Err(e) = res {
            log.info(&format!("cedana: could not remove {} of an earlier checkpoint: {e}", path.display()));
        }
    }
}

/// Whether an image path's entry belongs to an earlier checkpoint that a new one replaces.
fn is_replaced(name: &str) -> bool {
    name.ends_with(".img") || name == "descriptors.json" || name.starts_with(CHECKPOINT_NAME)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftovers_of_earlier_checkpoints_go_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["pages-1.img", "inventory.img", "descriptors.json", "cedana-checkpoint.tar.lz4", "dump.log", "other"] {
            std::fs::write(dir.path().join(f), "x").unwrap();
        }
        std::fs::create_dir(dir.path().join("cedana-checkpoint")).unwrap();
        let kept = dir.path().join("cedana-checkpoint.tar.zst");
        std::fs::write(&kept, "new").unwrap();
        remove_replaced(dir.path(), &kept, &RuncLog::default());
        let mut left: Vec<String> =
            std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        left.sort();
        assert_eq!(left, ["cedana-checkpoint.tar.zst", "dump.log", "other"]);
    }

    #[test]
    fn empty_path_flags_are_not_given() {
        let a = crate::args::CHECKPOINT.parse(&["--image-path=".into(), "--work-path".into(), "w".into(), "c".into()]).unwrap();
        assert_eq!(path_flag(&a, "image-path"), None);
        assert_eq!(path_flag(&a, "work-path"), Some(PathBuf::from("w")));
    }
}
