//! External mounts of a container: bind mounts of host files that are not in its OCI spec, such as those the
//! legacy `nvidia-container-runtime-hook` makes (Docker's `--gpus`): a prestart hook that enters the
//! container's mount namespace and bind-mounts the driver's libraries, tools and device nodes into the rootfs.
//! runc tells CRIU about the spec's bind mounts only (as `external mnt[DEST]:DEST`), so CRIU fails on the
//! others ("mount ... is not reachable"). At dump each one is declared external
//! (`external mnt[MOUNTPOINT]:KEY`) and recorded with the host file it shows; at restore CRIU is told to bind
//! that host file (`external mnt[KEY]:HOST_PATH`), which must exist. See <https://criu.org/External_bind_mounts>.
//!
//! Which mounts: those of the container's mount namespace whose file system is also mounted on the host
//! (same device) and whose mount point is neither `/`, nor a destination of the spec's mounts, masked or
//! read-only paths or devices (runc's), nor a submount that a spec `rbind` brought along, nor under a cgroup
//! mount, and which do not show files the container has anyway (a bind mount of a folder of its rootfs or of
//! a spec mount, which CRIU binds from there). A mount of a file system of the container's own (tmpfs,
//! proc, mqueue) is CRIU's to dump.

use std::collections::HashSet;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::CheckpointError;
use crate::procfs::{parse_mountinfo, MountEntry};

/// Prefix of the keys under which our external mounts are saved in CRIU's images (runc's are plain paths).
const KEY_PREFIX: &str = "cedana:";

/// One external mount, as recorded in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExternalMount {
    /// Where it is mounted in the container (as the container sees it), e.g. `/dev/nvidia0`.
    pub mountpoint: String,
    /// CRIU's name for it in the images.
    pub key: String,
    /// The host file or folder it shows.
    pub host_path: PathBuf,
    /// What the host path is.
    pub kind: MountedKind,
}

/// What an external mount shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MountedKind {
    File,
    Directory,
    Device,
    Other,
}

impl MountedKind {
    fn of(meta: &std::fs::Metadata) -> MountedKind {
        let t = meta.file_type();
        if t.is_dir() {
            MountedKind::Directory
        } else if t.is_char_device() || t.is_block_device() {
            MountedKind::Device
        } else if t.is_file() {
            MountedKind::File
        } else {
            MountedKind::Other
        }
    }

    fn name(self) -> &'static str {
        match self {
            MountedKind::File => "a file",
            MountedKind::Directory => "a folder",
            MountedKind::Device => "a device node",
            MountedKind::Other => "a special file",
        }
    }
}

/// What the OCI spec says about mounts that runc (and CRIU through runc) handles itself.
#[derive(Debug, Default)]
pub(crate) struct SpecMounts {
    /// Destinations of `mounts`, masked and read-only paths, and device nodes.
    handled: HashSet<String>,
    /// `(destination, source)` of the bind mounts.
    binds: Vec<(String, String)>,
    /// Destinations of cgroup mounts (runc makes cgroup v1 hierarchies below as bind mounts).
    cgroups: Vec<String>,
}

impl SpecMounts {
    /// From a config.json.
    pub fn from_config(config: &serde_json::Value) -> SpecMounts {
        let mut s = SpecMounts::default();
        let strings = |v: &serde_json::Value| -> Vec<String> {
            v.as_array().map(|a| a.iter().filter_map(|x| x.as_str()).map(normal).collect()).unwrap_or_default()
        };
        for m in config["mounts"].as_array().into_iter().flatten() {
            let Some(dest) = m["destination"].as_str().map(normal) else { continue };
            let ty = m["type"].as_str().unwrap_or_default();
            let bind = ty == "bind" || strings(&m["options"]).iter().any(|o| o == "bind" || o == "rbind");
            if bind {
                if let Some(src) = m["source"].as_str() {
                    s.binds.push((dest.clone(), normal(src)));
                }
            }
            if ty == "cgroup" {
                s.cgroups.push(dest.clone());
            }
            s.handled.insert(dest);
        }
        s.handled.extend(strings(&config["linux"]["maskedPaths"]));
        s.handled.extend(strings(&config["linux"]["readonlyPaths"]));
        for d in config["linux"]["devices"].as_array().into_iter().flatten() {
            if let Some(p) = d["path"].as_str() {
                s.handled.insert(normal(p));
            }
        }
        s
    }
}

/// A path without a trailing slash (but `/` itself).
fn normal(p: &str) -> String {
    let t = p.trim_end_matches('/');
    if t.is_empty() {
        "/".into()
    } else {
        t.to_string()
    }
}

/// `path` relative to `base` when it lies strictly below it (`/a/b` under `/a` is `b`).
fn below<'a>(path: &'a str, base: &str) -> Option<&'a str> {
    let rest = if base == "/" { path.strip_prefix('/')? } else { path.strip_prefix(base)?.strip_prefix('/')? };
    (!rest.is_empty()).then_some(rest)
}

/// `path` relative to `base` when it is `base` or lies below it (`""` for `base` itself).
fn at_or_below<'a>(path: &'a str, base: &str) -> Option<&'a str> {
    if path == base {
        return Some("");
    }
    below(path, base)
}

/// The container's mounts that are external, each with the host paths it may show (candidates, best first).
pub(crate) fn select(container: &[MountEntry], host: &[MountEntry], spec: &SpecMounts) -> Vec<(MountEntry, Vec<PathBuf>)> {
    let host_points: HashSet<&str> = host.iter().map(|h| h.mountpoint.as_str()).collect();
    let mut out = Vec::new();
    for (i, m) in container.iter().enumerate() {
        let point = m.mountpoint.as_str();
        if container[i + 1..].iter().any(|later| later.mountpoint == m.mountpoint) {
            continue; // Mounted over: only the mount on top is seen there.
        }
        if point == "/" || spec.handled.contains(point) || spec.cgroups.iter().any(|c| below(point, c).is_some()) {
            continue;
        }
        // A submount that a spec rbind brought along: the host has a mount at the same place below the source.
        let from_rbind = spec.binds.iter().any(|(dest, src)| {
            below(point, dest).is_some_and(|rel| host_points.contains(format!("{}/{rel}", src.trim_end_matches('/')).as_str()))
        });
        if from_rbind {
            continue;
        }
        // A bind mount of files the container has anyway (of its rootfs, or of a mount of its spec): CRIU
        // binds it from there.
        let reachable = container.iter().any(|o| {
            o.mountpoint != m.mountpoint
                && (o.mountpoint == "/" || spec.handled.contains(o.mountpoint.as_str()))
                && o.dev == m.dev
                && at_or_below(&m.root, &o.root).is_some()
        });
        if reachable {
            continue;
        }
        let mut candidates: Vec<(usize, PathBuf)> = host
            .iter()
            .filter(|h| h.dev == m.dev)
            .filter_map(|h| {
                let rel = at_or_below(&m.root, &h.root)?;
                let path = if rel.is_empty() { PathBuf::from(&h.mountpoint) } else { Path::new(&h.mountpoint).join(rel) };
                Some((h.root.len(), path))
            })
            .collect();
        if candidates.is_empty() {
            continue; // A file system of the container's own: CRIU dumps it.
        }
        // The deepest root first: the most direct view of the file.
        candidates.sort_by_key(|(depth, _)| std::cmp::Reverse(*depth));
        out.push((m.clone(), candidates.into_iter().map(|(_, p)| p).collect()));
    }
    out
}

/// The external mounts of the container whose init is `pid` (see the module's description), each checked to
/// show the same file on the host as in the container.
pub fn find(pid: i32, config: &serde_json::Value) -> Result<Vec<ExternalMount>, CheckpointError> {
    let ns = |p: &str| std::fs::metadata(p).map(|m| m.ino()).map_err(CheckpointError::io(p));
    if ns(&format!("/proc/{pid}/ns/mnt"))? == ns("/proc/self/ns/mnt")? {
        return Ok(Vec::new()); // Not a mount namespace of its own: nothing is a container's mount.
    }
    let read = |path: &str| std::fs::read_to_string(path).map_err(CheckpointError::io(path));
    let container = parse_mountinfo(&read(&format!("/proc/{pid}/mountinfo"))?);
    let host = parse_mountinfo(&read("/proc/self/mountinfo")?);
    let mut found = Vec::new();
    for (m, candidates) in select(&container, &host, &SpecMounts::from_config(config)) {
        let inside = format!("/proc/{pid}/root{}", m.mountpoint);
        let meta = std::fs::metadata(&inside).map_err(CheckpointError::io(&inside))?;
        let same = |p: &PathBuf| std::fs::metadata(p).is_ok_and(|h| h.dev() == meta.dev() && h.ino() == meta.ino());
        let Some(host_path) = candidates.iter().find(|p| same(p)).cloned() else {
            return Err(CheckpointError::ExternalMount {
                mountpoint: m.mountpoint.clone(),
                detail: format!(
                    "it is a bind mount from the host (device {}, {}) that is not in the container's spec, and no host \
                     path shows the same file (looked at {})",
                    m.dev,
                    m.root,
                    candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
                ),
            });
        };
        check_plain(&m.mountpoint, &host_path)?;
        found.push(ExternalMount {
            key: format!("{KEY_PREFIX}{}", m.mountpoint),
            mountpoint: m.mountpoint,
            host_path,
            kind: MountedKind::of(&meta),
        });
    }
    Ok(found)
}

/// CRIU's configuration file has no quoting: refuse paths it would split.
fn check_plain(mountpoint: &str, host_path: &Path) -> Result<(), CheckpointError> {
    let plain = |s: &str| !s.chars().any(|c| c.is_whitespace() || c.is_control() || c == '"' || c == '\'');
    if plain(mountpoint) && host_path.to_str().is_some_and(plain) {
        return Ok(());
    }
    Err(CheckpointError::ExternalMount {
        mountpoint: mountpoint.into(),
        detail: format!(
            "its path or its host path {} has a blank or quote, which CRIU's options cannot carry",
            host_path.display()
        ),
    })
}

/// CRIU options (configuration file lines) declaring `mounts` external at dump.
pub fn dump_options(mounts: &[ExternalMount]) -> Vec<String> {
    mounts.iter().map(|m| format!("external mnt[{}]:{}", m.mountpoint, m.key)).collect()
}

/// CRIU options binding each recorded mount's host file at restore; refused when a host file is missing or
/// of another kind than at dump (a restore would fail or show the wrong thing).
pub fn restore_options(mounts: &[ExternalMount]) -> Result<Vec<String>, CheckpointError> {
    let mut options = Vec::with_capacity(mounts.len());
    for m in mounts {
        let refuse = |what: String| CheckpointError::ExternalMount {
            mountpoint: m.mountpoint.clone(),
            detail: format!(
                "the checkpointed container had {} from the host's {} bind-mounted there (not by its spec, e.g. by \
                 NVIDIA's container hook), and on this host {what}: install it (the same driver version) or restore \
                 on a host that has it",
                m.kind.name(),
                m.host_path.display()
            ),
        };
        match std::fs::metadata(&m.host_path) {
            Err(e) => return Err(refuse(format!("it cannot be found ({e})"))),
            Ok(meta) if MountedKind::of(&meta) != m.kind => {
                return Err(refuse(format!("it is {}", MountedKind::of(&meta).name())))
            }
            Ok(_) => {}
        }
        check_plain(&m.mountpoint, &m.host_path)?;
        options.push(format!("external mnt[{}]:{}", m.key, m.host_path.display()));
    }
    Ok(options)
}

#[cfg(test)]
#[path = "mounts_tests.rs"]
mod tests;
