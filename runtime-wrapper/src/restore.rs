//! `restore` of our checkpoints, and restore at create: a bundle whose config.json carries the annotation
//! `io.cedana.restore=<checkpoint>` (or `CEDANA_RESTORE=<checkpoint>` in its process env; a local path or
//! an object-store URL such as `s3://bucket/prefix/name.tar.zst`) is restored by
//! `create`/`run` instead of started fresh. `start` of such a container then succeeds without doing anything
//! (a marker `ROOT/ID/cedana.json` records it), as containerd and dockerd call `create` then `start`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use cedana::checkpoint::CheckpointKind;
use cedana::checkpoint::MANIFEST_NAME;
use cedana::config::Config;
use cedana::engine::{ContainerRestore, Engine, OpContext, RestoreRequest, Source};
use cedana::runc::{RestoreFlags, DEFAULT_ROOT};

use crate::args::{CommandArgs, Invocation};
use crate::checkpoint::{path_flag, CHECKPOINT_NAME};
use crate::log::RuncLog;
use crate::{runc_for, WrapperError};

/// Annotation naming a checkpoint to restore at create.
pub const RESTORE_ANNOTATION: &str = "io.cedana.restore";
/// Process environment variable naming a checkpoint to restore at create (Docker cannot set annotations).
pub const RESTORE_ENV: &str = "CEDANA_RESTORE";
/// Annotation asking for that restore to be lazy (`true`): the container runs before its memory has arrived;
/// a checkpoint that cannot be restored lazily is restored normally.
pub const LAZY_ANNOTATION: &str = "io.cedana.restore.lazy";
/// The same as a process environment variable.
pub const LAZY_ENV: &str = "CEDANA_RESTORE_LAZY";
/// Annotation asking to restore a checkpoint holding GPU state even where this host's GPUs do not match it.
pub const SKIP_GPU_CHECK_ANNOTATION: &str = "io.cedana.restore.skip-gpu-check";
/// The same as a process environment variable.
pub const SKIP_GPU_CHECK_ENV: &str = "CEDANA_RESTORE_SKIP_GPU_CHECK";
/// The CRI's annotation telling a pod's sandbox container (`sandbox`) from its workloads (`container`).
const CRI_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// The CRI's annotation naming a workload container of a pod.
const CRI_CONTAINER_NAME: &str = "io.kubernetes.cri.container-name";
/// Marker of a container restored at create, in its runc state folder.
const MARKER: &str = "cedana.json";

/// CRIU's first image of a dump: plain CRIU images are in a folder that holds it.
const CRIU_INVENTORY: &str = "inventory.img";

/// Our checkpoint at `path`: a checkpoint file, a checkpoint folder, or a folder holding one that
/// cedana-runc wrote (an image path). `None` for anything else (e.g. plain CRIU images), and for an image
/// path where runc wrote plain CRIU images after our checkpoint (runc restores the newest, as it would).
pub fn find_checkpoint(path: &Path) -> Option<PathBuf> {
    let meta = path.metadata().ok()?;
    if meta.is_file() || path.join(MANIFEST_NAME).is_file() {
        return Some(path.to_path_buf());
    }
    let entries = std::fs::read_dir(path).ok()?;
    let ours = entries.flatten().find(|e| e.file_name().to_string_lossy().starts_with(CHECKPOINT_NAME)).map(|e| e.path())?;
    let modified = |p: &Path| p.metadata().and_then(|m| m.modified()).ok();
    match (modified(&path.join(CRIU_INVENTORY)), modified(&ours)) {
        (Some(plain), Some(mine)) if plain > mine => None,
        _ => Some(ours),
    }
}

fn absolute(cwd: &Path, p: Option<&str>) -> PathBuf {
    p.map(|p| cwd.join(p)).unwrap_or_else(|| cwd.to_path_buf())
}

/// `restore` of our checkpoint; `None` when `--image-path` holds none (runc then restores it itself).
pub fn restore(cfg: &Config, inv: &Invocation, a: &CommandArgs, log: &RuncLog) -> Result<Option<i32>, WrapperError> {
    let cwd = std::env::current_dir().map_err(WrapperError::io("reading the current folder"))?;
    let image_path = cwd.join(path_flag(a, "image-path").unwrap_or_else(|| PathBuf::from("checkpoint")));
    let (Some(checkpoint), [id]) = (find_checkpoint(&image_path), a.positionals.as_slice()) else { return Ok(None) };
    let handled = ["image-path", "work-path", "bundle", "detach", "pid-file", "console-socket"];
    let flags = RestoreFlags {
        bundle: absolute(&cwd, a.value("bundle")),
        work_path: path_flag(a, "work-path").map(|w| cwd.join(w)),
        detach: a.on("detach"),
        pid_file: a.value("pid-file").map(|p| cwd.join(p)),
        console_socket: a.value("console-socket").map(|p| cwd.join(p)),
        extra: a.tokens_without(&handled),
        stdio: None,
    };
    run_restore(cfg, inv, id, Source::Path(checkpoint), flags, Asks { lazy: cfg.restore_lazy(), skip_gpu_check: false }, log)
        .map(Some)
}

/// `create` or `run` of a bundle that asks for a restore; `None` when it does not ask for one.
pub fn create(cfg: &Config, inv: &Invocation, a: &CommandArgs, run: bool, log: &RuncLog) -> Result<Option<i32>, WrapperError> {
    let cwd = std::env::current_dir().map_err(WrapperError::io("reading the current folder"))?;
    let bundle = absolute(&cwd, a.value("bundle"));
    let [id] = a.positionals.as_slice() else { return Ok(None) };
    let Some((how, requested)) = requested_restore(&bundle) else { return Ok(None) };
    let asks = Asks {
        lazy: requested_option(&bundle, LAZY_ANNOTATION, LAZY_ENV) || cfg.restore_lazy(),
        skip_gpu_check: requested_option(&bundle, SKIP_GPU_CHECK_ANNOTATION, SKIP_GPU_CHECK_ENV),
    };
    let checkpoint = match Source::parse(&requested) {
        Source::Path(p) => {
            let requested = cwd.join(p);
            Source::Path(find_checkpoint(&requested).ok_or(WrapperError::NoCheckpoint { how, path: requested })?)
        }
        url => url,
    };
    let mut extra: Vec<OsString> = Vec::new();
    for flag in ["no-pivot", "no-subreaper"] {
        if a.on(flag) {
            extra.push(format!("--{flag}").into());
        }
    }
    let flags = RestoreFlags {
        bundle,
        work_path: None,
        detach: !run || a.on("detach"),
        pid_file: a.value("pid-file").map(|p| cwd.join(p)),
        console_socket: a.value("console-socket").map(|p| cwd.join(p)),
        extra,
        stdio: None,
    };
    let code = run_restore(cfg, inv, id, checkpoint.clone(), flags, asks, log)?;
    if !run {
        let marker = root(inv).join(id).join(MARKER);
        let record = serde_json::json!({ "restored_from": checkpoint.display(), "started": false });
        std::fs::write(&marker, record.to_string()).map_err(WrapperError::io(format!("writing {}", marker.display())))?;
    }
    Ok(Some(code))
}

/// `start` of a container restored at create: it already runs, so succeed (once). `false` otherwise.
pub fn start(inv: &Invocation, a: &CommandArgs, log: &RuncLog) -> bool {
    let [id] = a.positionals.as_slice() else { return false };
    let marker = root(inv).join(id).join(MARKER);
    if std::fs::remove_file(&marker).is_err() {
        return false;
    }
    log.info(&format!("cedana: {id} was restored at create and runs already; start does nothing"));
    true
}

fn root(inv: &Invocation) -> PathBuf {
    inv.globals.root.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_ROOT))
}

/// The checkpoint a bundle asks for, and how it asked. A Kubernetes pod's annotations reach every container
/// of the pod, its sandbox (pause) container too: that one is never restored, and a pod of several containers
/// names each one's checkpoint with `io.cedana.restore.<container name>`, which wins over the plain annotation.
fn requested_restore(bundle: &Path) -> Option<(&'static str, String)> {
    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(bundle.join("config.json")).ok()?).ok()?;
    let annotations = &config["annotations"];
    if annotations[CRI_CONTAINER_TYPE].as_str() == Some("sandbox") {
        return None;
    }
    if let Some(name) = annotations[CRI_CONTAINER_NAME].as_str() {
        let key = format!("{RESTORE_ANNOTATION}.{name}");
        if let Some(p) = annotations[key.as_str()].as_str().filter(|p| !p.is_empty()) {
            return Some(("the annotation io.cedana.restore.<container name>", p.to_string()));
        }
    }
    if let Some(p) = annotations[RESTORE_ANNOTATION].as_str().filter(|p| !p.is_empty()) {
        return Some(("the annotation io.cedana.restore", p.to_string()));
    }
    config["process"]["env"].as_array()?.iter().filter_map(|e| e.as_str()).find_map(|e| {
        let p = e.strip_prefix(RESTORE_ENV)?.strip_prefix('=')?;
        (!p.is_empty()).then(|| ("the environment variable CEDANA_RESTORE", p.to_string()))
    })
}

/// The options a bundle that asks for a restore gives it.
#[derive(Debug, Clone, Copy)]
struct Asks {
    lazy: bool,
    skip_gpu_check: bool,
}

/// Whether a bundle that asks for a restore sets an option of it (`true`, `1` or `yes`) by annotation or by
/// process environment variable.
fn requested_option(bundle: &Path, annotation: &str, env_var: &str) -> bool {
    let Some(config) =
        std::fs::read(bundle.join("config.json")).ok().and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
    else {
        return false;
    };
    let yes = |v: &str| matches!(v, "true" | "1" | "yes");
    config["annotations"][annotation].as_str().is_some_and(yes)
        || config["process"]["env"].as_array().is_some_and(|env| {
            env.iter()
                .filter_map(|e| e.as_str())
                .any(|e| e.strip_prefix(env_var).and_then(|v| v.strip_prefix('=')).is_some_and(yes))
        })
}

fn run_restore(
    cfg: &Config,
    inv: &Invocation,
    id: &str,
    checkpoint: Source,
    flags: RestoreFlags,
    asks: Asks,
    log: &RuncLog,
) -> Result<i32, WrapperError> {
    let runtime = std::sync::Arc::new(runc_for(inv)?);
    let container = ContainerRestore { id: id.to_string(), runtime: Some(runtime), root: None, flags };
    let req = RestoreRequest {
        only: Some(CheckpointKind::Runc),
        container: Some(container),
        lazy: asks.lazy,
        lazy_fallback: asks.lazy,
        skip_gpu_check: asks.skip_gpu_check,
        ..RestoreRequest::new(checkpoint.clone())
    };
    let out = Engine::new(cfg.clone())?.restore(req, &OpContext::new())?;
    let lazily = out.lazy.map(|l| format!(", then its memory lazily ({} pages in {} ms)", l.pages, l.time.as_millis()));
    log.info(&format!(
        "cedana: restored {id} from {} (checkpoint of {}) in {} ms: verify {} ms, runc restore {} ms{}",
        checkpoint.display(),
        out.manifest.container.as_ref().map(|c| c.id.as_str()).unwrap_or("?"),
        (out.verify_time + out.criu_time).as_millis(),
        out.verify_time.as_millis(),
        out.criu_time.as_millis(),
        lazily.unwrap_or_default()
    ));
    Ok(out.exit_code.unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restore_is_asked_by_annotation_or_env() {
        let dir = tempfile::tempdir().unwrap();
        let write = |v: serde_json::Value| std::fs::write(dir.path().join("config.json"), v.to_string()).unwrap();
        write(serde_json::json!({"annotations": {"io.cedana.restore": "/cp.tar"}, "process": {"env": ["PATH=/bin"]}}));
        assert_eq!(requested_restore(dir.path()).unwrap().1, "/cp.tar");
        write(serde_json::json!({"process": {"env": ["PATH=/bin", "CEDANA_RESTORE=/d/cp"]}}));
        assert_eq!(requested_restore(dir.path()).unwrap().1, "/d/cp");
        write(serde_json::json!({"process": {"env": ["CEDANA_RESTORE_X=1", "CEDANA_RESTORE="]}}));
        assert!(requested_restore(dir.path()).is_none());
        assert!(!requested_option(dir.path(), LAZY_ANNOTATION, LAZY_ENV));
        write(serde_json::json!({"annotations": {"io.cedana.restore": "/cp.tar", "io.cedana.restore.lazy": "true"}}));
        assert!(requested_option(dir.path(), LAZY_ANNOTATION, LAZY_ENV));
        write(serde_json::json!({"process": {"env": ["CEDANA_RESTORE=/cp", "CEDANA_RESTORE_LAZY=1"]}}));
        assert!(requested_option(dir.path(), LAZY_ANNOTATION, LAZY_ENV));
        write(serde_json::json!({"annotations": {"io.cedana.restore.lazy": "no"}}));
        assert!(!requested_option(dir.path(), LAZY_ANNOTATION, LAZY_ENV));
        // A pod's sandbox is never restored; a container of the pod takes its own annotation over the pod's.
        write(serde_json::json!({"annotations": {"io.cedana.restore": "/cp", "io.kubernetes.cri.container-type": "sandbox"}}));
        assert!(requested_restore(dir.path()).is_none());
        write(serde_json::json!({"annotations": {
            "io.cedana.restore": "/pod-cp", "io.cedana.restore.app": "/app-cp",
            "io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.container-name": "app"}}));
        assert_eq!(requested_restore(dir.path()).unwrap().1, "/app-cp");
        write(serde_json::json!({"annotations": {"io.cedana.restore": "/pod-cp", "io.kubernetes.cri.container-name": "side"}}));
        assert_eq!(requested_restore(dir.path()).unwrap().1, "/pod-cp");
        write(serde_json::json!({"annotations": {"io.cedana.restore.skip-gpu-check": "true"}}));
        assert!(requested_option(dir.path(), SKIP_GPU_CHECK_ANNOTATION, SKIP_GPU_CHECK_ENV));
        assert!(!requested_option(dir.path(), LAZY_ANNOTATION, LAZY_ENV));
    }

    #[test]
    fn checkpoints_are_found_in_image_paths() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(find_checkpoint(dir.path()), None);
        std::fs::write(dir.path().join("pages-1.img"), "x").unwrap();
        assert_eq!(find_checkpoint(dir.path()), None, "plain CRIU images are not ours");
        std::fs::write(dir.path().join("cedana-checkpoint.tar.zst"), "x").unwrap();
        assert_eq!(find_checkpoint(dir.path()), Some(dir.path().join("cedana-checkpoint.tar.zst")));
        assert_eq!(find_checkpoint(&dir.path().join("pages-1.img")), Some(dir.path().join("pages-1.img")));
        assert_eq!(find_checkpoint(&dir.path().join("missing")), None);
        // runc wrote plain images after ours (e.g. a --parent-path dump passed through): those are newer.
        let later = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
        let inventory = std::fs::File::create(dir.path().join("inventory.img")).unwrap();
        inventory.set_modified(later).unwrap();
        assert_eq!(find_checkpoint(dir.path()), None, "the newer plain images are runc's to restore");
        inventory.set_modified(std::time::SystemTime::UNIX_EPOCH).unwrap();
        assert_eq!(find_checkpoint(dir.path()), Some(dir.path().join("cedana-checkpoint.tar.zst")));
    }
}
