//! What a killed operation leaves behind, swept when the next one starts.
//!
//! Dumps and restores work under names that carry the PID of the process doing the work: hidden checkpoints
//! (`.NAME.partial-PID`), their disk reserves (`.NAME.reserve-PID`), an old checkpoint moved aside while a
//! new one replaces it (`.NAME.old-PID`), staging, download and restore folders (`.cedana-images-PID-*`,
//! `.cedana-download-PID-*`, `.cedana-scratch-PID-*`, `.cedana-restore-PID-*`), a lazy restore's images folder (`.cedana-lazy-PID-*`, which
//! lives as long as its pages are served), the marker of an operation whose CRIU may lock connections
//! (`.cedana-netlock-PID-*`, see [`super::netlock`]) and CRIU's work folders (`cedana-dump-PID-*`, `cedana-restore-PID-*`,
//! `cedana-runc-restore-PID-*`). Each is removed when its operation ends, unless the process was killed
//! (SIGKILL, a crash, a power cut). [`sweep`] removes those of processes that no longer exist; those of a
//! live process are left alone (it may still be working), as is anything kept on purpose:
//! [`mark_kept`] puts a `NAME.kept` marker beside what an error told the user to look at (the images of a
//! checkpoint that could not be finished after CRIU let the workload go, CRIU's work folder with its log).
//! An old checkpoint found aside with nothing at its name is put back instead of removed (the replacement
//! was killed between its two renames).

use std::path::{Path, PathBuf};

/// Suffix of the marker beside something kept on purpose.
pub const KEPT_SUFFIX: &str = ".kept";

/// Prefixes of per-operation folders, followed by `PID-`.
const PREFIXES: &[&str] = &[
    ".cedana-images-",
    ".cedana-download-",
    ".cedana-scratch-",
    ".cedana-lazy-",
    ".cedana-restore-",
    super::netlock::MARKER,
    "cedana-dump-",
    "cedana-restore-",
    "cedana-runc-restore-",
];

/// Suffixes of hidden checkpoint names, followed by the PID (the name starts with '.').
const SUFFIXES: &[&str] = &[".partial-", ".reserve-", ".old-"];

/// What the PID in a leftover's name names, and what it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leftover {
    /// A temporary file or folder of the process `pid`.
    Temporary { pid: i32 },
    /// The old checkpoint `.NAME.old-PID`, moved aside from `NAME` by the process `pid`.
    Aside { pid: i32, original: String },
}

/// What an entry named `name` is, if it is a leftover of some operation.
pub fn classify(name: &str) -> Option<Leftover> {
    if name.ends_with(KEPT_SUFFIX) {
        return None;
    }
    for prefix in PREFIXES {
        if let Some(rest) = name.strip_prefix(prefix) {
            let (pid, _) = rest.split_once('-')?;
            return parse_pid(pid).map(|pid| Leftover::Temporary { pid });
        }
    }
    let hidden = name.strip_prefix('.')?;
    for suffix in SUFFIXES {
        if let Some((base, pid)) = hidden.rsplit_once(suffix) {
            let pid = parse_pid(pid)?;
            if base.is_empty() {
                return None;
            }
            return Some(if *suffix == ".old-" {
                Leftover::Aside { pid, original: base.to_string() }
            } else {
                Leftover::Temporary { pid }
            });
        }
    }
    None
}

fn parse_pid(s: &str) -> Option<i32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok().filter(|p| *p > 0)
}

/// Whether the process `pid` exists (a zombie counts as gone): the owner of a leftover named after it may
/// still be working.
pub(crate) fn running(pid: i32) -> bool {
    if pid == std::process::id() as i32 {
        return true;
    }
    crate::procfs::stat(pid).map(|s| !s.is_zombie()).unwrap_or(false)
}

/// The marker that says `path` is kept on purpose.
fn marker(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(KEPT_SUFFIX);
    path.with_file_name(name)
}

/// Mark `path` as kept on purpose: [`sweep`] leaves it alone.
pub fn mark_kept(path: &Path) {
    if let Err(e) = std::fs::write(marker(path), b"") {
        tracing::warn!(path = %path.display(), error = %e, "cannot mark a kept folder; a later start may remove it");
    }
}

/// Remove from `dir` (not recursively) the leftovers of processes that no longer exist, putting back an old
/// checkpoint moved aside by a replacement that was killed; returns what was removed or put back. Errors are
/// logged, never returned: a sweep must not stop the operation that runs it.
pub fn sweep(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut done = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(leftover) = classify(&name) else { continue };
        let path = entry.path();
        let pid = match &leftover {
            Leftover::Temporary { pid } | Leftover::Aside { pid, .. } => *pid,
        };
        if running(pid) || marker(&path).symlink_metadata().is_ok() {
            continue;
        }
        if let Leftover::Aside { original, .. } = &leftover {
            let original = dir.join(original);
            if original.symlink_metadata().is_err() {
                match std::fs::rename(&path, &original) {
                    Ok(()) => {
                        tracing::warn!(checkpoint = %original.display(), "put back a checkpoint a killed replacement had moved aside");
                        done.push(original);
                    }
                    Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot put back a checkpoint moved aside"),
                }
                continue;
            }
        }
        let removed = match entry.file_type() {
            Ok(t) if t.is_dir() => std::fs::remove_dir_all(&path),
            _ => std::fs::remove_file(&path),
        };
        match removed {
            Ok(()) => {
                tracing::info!(path = %path.display(), pid, "removed what a killed operation left");
                done.push(path);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot remove what a killed operation left"),
        }
    }
    done
}

/// [`sweep`] the folders an engine of `config` works in: the temporary folder (CRIU's work folders), the
/// scratch folder (downloads, extractions) and the default checkpoint folder; abort the multipart uploads
/// that killed processes left pending (see [`crate::storage::journal`]); and, when a killed operation's
/// marker says its CRIU may have locked connections, remove the network-lock rules a killed CRIU left (see
/// [`super::netlock`]: the firewall is only read then, not at every start).
pub fn sweep_config(config: &crate::config::Config) -> Vec<PathBuf> {
    let mut dirs = vec![std::env::temp_dir(), config.scratch_dir(), config.checkpoint_dir()];
    dirs.sort();
    dirs.dedup();
    #[cfg(feature = "storage")]
    crate::storage::journal::abort_orphans(&std::env::temp_dir(), &crate::engine::remote::storage_config(config));
    let removed: Vec<PathBuf> = dirs.iter().flat_map(|d| sweep(d)).collect();
    let marked = |p: &PathBuf| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(super::netlock::MARKER));
    if removed.iter().any(marked) {
        super::netlock::sweep();
    }
    removed
}

/// The prefix of a per-operation folder of this process: `PREFIX` then `PID-` (see [`sweep`]).
pub fn prefix(base: &str) -> String {
    format!("{base}{}-", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_classified_by_their_pid() {
        let t = |pid| Some(Leftover::Temporary { pid });
        assert_eq!(classify(".c.tar.zst.partial-42"), t(42));
        assert_eq!(classify(".c.reserve-7"), t(7));
        assert_eq!(classify(".cedana-images-99-abc123"), t(99));
        assert_eq!(classify("cedana-dump-5-XyZ"), t(5));
        assert_eq!(classify("cedana-runc-restore-6-q"), t(6));
        assert_eq!(classify(".cedana-lazy-12-AbC9"), t(12));
        assert_eq!(classify(".cedana-restore-13-AbC9"), t(13));
        assert_eq!(classify(".cedana-netlock-12-AbC9"), t(12));
        assert_eq!(classify(".c.old-8"), Some(Leftover::Aside { pid: 8, original: "c".into() }));
        for not in [
            "c.tar",
            ".cedana-lazy-AbC9",
            ".cedana-restore-AbC9",
            ".c.partial-",
            ".c.partial-x1",
            "cedana-dump-abc",
            ".partial-3",
            "cedana-dump-5-x.kept",
            "x.old-3",
            // Kept on purpose: the page orders lazy restores record.
            crate::checkpoint::lazy::ORDER_FOLDER,
        ] {
            assert_eq!(classify(not), None, "{not}");
        }
    }

    #[test]
    fn only_leftovers_of_dead_processes_go_and_kept_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        // A PID that does not exist: above the default pid_max.
        let dead = 4_194_304 + 1;
        let me = std::process::id();
        let make = |n: &str| std::fs::write(dir.path().join(n), b"x").unwrap();
        make(&format!(".a.tar.partial-{dead}"));
        make(&format!(".a.tar.reserve-{dead}"));
        make(&format!(".b.tar.partial-{me}"));
        std::fs::create_dir(dir.path().join(format!("cedana-dump-{dead}-x"))).unwrap();
        std::fs::create_dir(dir.path().join(format!("cedana-dump-{dead}-kept"))).unwrap();
        mark_kept(&dir.path().join(format!("cedana-dump-{dead}-kept")));
        make(&format!(".c.old-{dead}"));
        make(&format!(".d.old-{dead}"));
        make("d");
        make("user-file");
        let done = sweep(dir.path());
        assert_eq!(done.len(), 5, "{done:?}");
        let mut left: Vec<String> =
            std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        left.sort();
        let mut want = vec![
            format!(".b.tar.partial-{me}"),
            "c".to_string(),
            format!("cedana-dump-{dead}-kept"),
            format!("cedana-dump-{dead}-kept.kept"),
            "d".to_string(),
            "user-file".to_string(),
        ];
        want.sort();
        assert_eq!(left, want);
    }
}
