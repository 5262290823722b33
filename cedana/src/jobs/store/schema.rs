//! The schema of the job store and its migrations (see the documentation of
//! [`super`](crate::jobs::store)).

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, TransactionBehavior};

use super::{classify, StoreError};

/// The schema steps, in order: step `n` takes a file from `user_version` `n` to `n + 1`. Append only; never
/// edit a step that has shipped.
pub const MIGRATIONS: &[&str] = &[
    // 1: jobs and their checkpoints.
    "CREATE TABLE jobs (
        jid TEXT PRIMARY KEY NOT NULL,
        kind TEXT NOT NULL,
        pid INTEGER NOT NULL,
        state TEXT NOT NULL,
        exit_code INTEGER,
        args TEXT NOT NULL,
        cwd BLOB,
        log BLOB,
        attachable INTEGER NOT NULL,
        gpu INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        container_id TEXT,
        runtime_root BLOB,
        restored_from TEXT
    ) STRICT;
    CREATE INDEX jobs_by_creation ON jobs (created_at, jid);
    CREATE INDEX jobs_running_by_pid ON jobs (pid) WHERE state = 'running';
    CREATE TABLE checkpoints (
        id TEXT PRIMARY KEY NOT NULL,
        jid TEXT NOT NULL REFERENCES jobs (jid) ON DELETE CASCADE,
        time INTEGER NOT NULL,
        size INTEGER NOT NULL,
        path BLOB NOT NULL,
        compression TEXT NOT NULL
    ) STRICT;
    CREATE INDEX checkpoints_by_job ON checkpoints (jid, time);",
    // 2: the containerd namespace of containerd jobs (whose runtime_root is containerd's socket).
    "ALTER TABLE jobs ADD COLUMN namespace TEXT;",
    // 3: where a job restored from another node's checkpoint came from (JSON of `model::Origin`).
    "ALTER TABLE jobs ADD COLUMN origin TEXT;",
    // 4: who owns a job, and the checkpoints the daemon wrote for users other than root: root-owned files
    // (or folders) that user cannot change, known by device and inode wherever the user moves them.
    "ALTER TABLE jobs ADD COLUMN owner INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE sealed_checkpoints (
        dev INTEGER NOT NULL,
        ino INTEGER NOT NULL,
        owner INTEGER NOT NULL,
        path BLOB NOT NULL,
        created_at INTEGER NOT NULL,
        PRIMARY KEY (dev, ino)
    ) STRICT;",
];

/// The schema version this build writes and understands (the number of [`MIGRATIONS`]).
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// Refuses a `user_version` newer than ours.
pub(super) fn check_version(path: &Path, found: i64) -> Result<(), StoreError> {
    if found > i64::from(SCHEMA_VERSION) {
        return Err(StoreError::NewerVersion { path: path.to_path_buf(), found, supported: SCHEMA_VERSION });
    }
    Ok(())
}

/// Applies the missing schema steps, each in its own `IMMEDIATE` transaction that first reads the version
/// again (another process may have migrated meanwhile). Returns how many steps this call applied.
pub(super) fn migrate(conn: &mut Connection, path: &Path, busy_timeout: Duration) -> Result<u32, StoreError> {
    let err = |e| classify(path, busy_timeout, e);
    let mut applied = 0;
    loop {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(err)?;
        let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(err)?;
        check_version(path, version)?;
        let Ok(step) = usize::try_from(version) else {
            // A negative user_version is nobody's schema.
            return Err(StoreError::NotAJobStore { path: path.to_path_buf() });
        };
        let Some(sql) = MIGRATIONS.get(step) else {
            // Current (check_version ruled out newer): nothing to do; the empty transaction rolls back.
            return Ok(applied);
        };
        if step == 0 {
            // Checked again under the write lock, in case the file changed since.
            let tables: i64 = tx.query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0)).map_err(err)?;
            if tables > 0 {
                return Err(StoreError::NotAJobStore { path: path.to_path_buf() });
            }
        }
        tx.execute_batch(sql).map_err(err)?;
        tx.pragma_update(None, "user_version", version + 1).map_err(err)?;
        tx.commit().map_err(err)?;
        applied += 1;
    }
}
