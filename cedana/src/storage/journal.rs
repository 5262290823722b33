//! Multipart uploads in progress, recorded on local disk so that one left pending by a killed process (its
//! parts stored, and billed, with no object) is aborted by a later start.
//!
//! An [`ObjectSink`](super::ObjectSink) writes `.cedana-upload-PID-N` in the temporary folder when its upload
//! begins (the object's URL and the upload's id, one a line) and removes it once the upload is completed or
//! aborted. [`abort_orphans`] aborts the uploads of records whose process no longer exists and removes them;
//! a record whose store cannot be reached is kept for a later start.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::config::Store;
use super::url::ObjectUrl;
use super::{runtime, StorageConfig, StorageError};

/// Prefix of the records' names, followed by `PID-N`.
pub const RECORD_PREFIX: &str = ".cedana-upload-";

/// Longest an abort at start may take (a store that does not answer must not hold up the start).
const ABORT_TIMEOUT: Duration = Duration::from_secs(5);

static SERIAL: AtomicU64 = AtomicU64::new(0);

/// The record of one upload in progress; removed when dropped or [`Record::settle`]d.
#[derive(Debug, Default)]
pub(crate) struct Record(Option<PathBuf>);

impl Record {
    /// Record the upload `id` of `url` in the temporary folder. A record that cannot be written is logged
    /// and skipped: the upload goes on (only a killed process's cleanup depends on it).
    pub(crate) fn write(url: &ObjectUrl, id: &str) -> Record {
        let name = format!("{RECORD_PREFIX}{}-{}", std::process::id(), SERIAL.fetch_add(1, Ordering::SeqCst));
        let path = std::env::temp_dir().join(name);
        match std::fs::write(&path, format!("{url}\n{id}\n")) {
            Ok(()) => Record(Some(path)),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot record the upload in progress");
                Record(None)
            }
        }
    }

    /// The upload was completed or aborted: forget it.
    pub(crate) fn settle(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        self.settle();
    }
}

/// The PID in a record's name.
fn owner(name: &str) -> Option<i32> {
    let rest = name.strip_prefix(RECORD_PREFIX)?;
    let (pid, serial) = rest.split_once('-')?;
    if serial.is_empty() || !serial.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok().filter(|p| *p > 0)
}

/// Abort the uploads recorded in `dir` by processes that no longer exist, with the store settings
/// `config`; returns the URLs whose uploads were aborted (or were gone already).
pub fn abort_orphans(dir: &Path, config: &StorageConfig) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut done = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = owner(&name) else { continue };
        if crate::engine::leftovers::running(pid) {
            continue;
        }
        let path = entry.path();
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let mut lines = text.lines();
        let (Some(url), Some(id)) = (lines.next(), lines.next()) else {
            let _ = std::fs::remove_file(&path);
            continue;
        };
        match abort(url, id, config) {
            Ok(()) | Err(StorageError::NotFound { .. }) => {
                tracing::info!(url, pid, "aborted the upload a killed process left pending");
                let _ = std::fs::remove_file(&path);
                done.push(url.to_string());
            }
            Err(e) => {
                tracing::warn!(url, error = %e, "cannot abort the upload a killed process left pending; trying again at the next start")
            }
        }
    }
    done
}

fn abort(url: &str, id: &str, config: &StorageConfig) -> Result<(), StorageError> {
    let object = ObjectUrl::parse(url)?;
    let store = Store::connect(&object, config)?;
    let (path, id, u, secrets) = (object.path()?, id.to_string(), url.to_string(), store.secrets.clone());
    runtime::run(async move {
        match tokio::time::timeout(ABORT_TIMEOUT, store.multipart.abort_multipart(&path, &id)).await {
            Ok(result) => result.map_err(|e| StorageError::from_store(&u, &e, &secrets)),
            Err(_) => Err(StorageError::Other { url: u, detail: format!("no answer within {ABORT_TIMEOUT:?}") }),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_are_read_from_record_names() {
        assert_eq!(owner(".cedana-upload-42-0"), Some(42));
        assert_eq!(owner(".cedana-upload-42-"), None);
        assert_eq!(owner(".cedana-upload-x-1"), None);
        assert_eq!(owner(".cedana-images-42-1"), None);
    }

    #[test]
    fn records_of_the_living_stay_and_unreadable_ones_of_the_dead_go() {
        let dir = tempfile::tempdir().unwrap();
        let mine = dir.path().join(format!("{RECORD_PREFIX}{}-0", std::process::id()));
        std::fs::write(&mine, "s3://b/k\nid\n").unwrap();
        let dead = dir.path().join(format!("{RECORD_PREFIX}{}-0", 4_194_305));
        std::fs::write(&dead, "garbage").unwrap();
        assert!(abort_orphans(dir.path(), &StorageConfig::default()).is_empty());
        assert!(mine.exists() && !dead.exists());
    }
}
