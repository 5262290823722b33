//! [`JobStore`]: the jobs and their checkpoints in one SQLite file.
//!
//! The file is shared: by the threads of one daemon (one connection behind a mutex; a clone of the store is
//! another handle on it) and by several processes (e.g. the daemon and a `cedana ps` reading it). SQLite's
//! write-ahead log lets readers go on while one writer writes; a writer that finds the file locked waits up to
//! the busy timeout (5 s unless told otherwise) before giving up with [`StoreError::Busy`]. Every write is a
//! single statement or an `IMMEDIATE` transaction, so a waiting writer never has to abandon a stale snapshot.
//!
//! Synchronisation is `synchronous = NORMAL`, the usual choice with a write-ahead log: a crash of the daemon
//! loses nothing and the file never corrupts; a power cut may lose the last few commits.
//!
//! # Schema (version [`SCHEMA_VERSION`], in `PRAGMA user_version`)
//!
//! ```sql
//! CREATE TABLE jobs (
//!     jid TEXT PRIMARY KEY NOT NULL, kind TEXT NOT NULL, pid INTEGER NOT NULL, state TEXT NOT NULL,
//!     exit_code INTEGER, args TEXT NOT NULL /* JSON array of strings */, cwd BLOB, log BLOB,
//!     attachable INTEGER NOT NULL, gpu INTEGER NOT NULL, created_at INTEGER NOT NULL,
//!     container_id TEXT, runtime_root BLOB, restored_from TEXT, namespace TEXT, origin TEXT,
//!     owner INTEGER NOT NULL DEFAULT 0) STRICT;
//! CREATE INDEX jobs_by_creation ON jobs (created_at, jid);
//! CREATE INDEX jobs_running_by_pid ON jobs (pid) WHERE state = 'running';
//! CREATE TABLE checkpoints (
//!     id TEXT PRIMARY KEY NOT NULL, jid TEXT NOT NULL REFERENCES jobs (jid) ON DELETE CASCADE,
//!     time INTEGER NOT NULL, size INTEGER NOT NULL, path BLOB NOT NULL, compression TEXT NOT NULL) STRICT;
//! CREATE INDEX checkpoints_by_job ON checkpoints (jid, time);
//! CREATE TABLE sealed_checkpoints (
//!     dev INTEGER NOT NULL, ino INTEGER NOT NULL, owner INTEGER NOT NULL, path BLOB NOT NULL,
//!     created_at INTEGER NOT NULL, PRIMARY KEY (dev, ino)) STRICT;
//! ```
//!
//! Paths are stored as their bytes (BLOB), so that a path that is not UTF-8 round-trips. Kinds and states are
//! their lowercase names.
//!
//! # Migrations
//!
//! [`MIGRATIONS`] is an ordered list of SQL steps; step `n` (from 0) takes a file from version `n` to `n + 1`,
//! in one `IMMEDIATE` transaction that also sets `user_version`. A fresh file gets every step, a current one
//! none (opening it then writes nothing). A file of a newer version, a file that is not a SQLite database and
//! a SQLite database that is not a job store are refused and left exactly as they are.

mod schema;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rusqlite::ffi::{self, ErrorCode};
use rusqlite::types::Type;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, Row};

use super::model::{unix_now, CheckpointRecord, Job, JobKind, JobState};
use crate::error::ErrorKind;
use schema::{check_version, migrate};

pub use schema::{MIGRATIONS, SCHEMA_VERSION};

/// How long a writer waits for another one (thread or process) before giving up with [`StoreError::Busy`].
pub const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// How long opening waits before it tries again after SQLite answered busy without waiting: when two
/// connections set a fresh file up at once, the switch to the write-ahead log needs the file to itself, and
/// SQLite reports busy at once rather than call the busy handler where waiting could deadlock.
const SETUP_RETRY_PAUSE: Duration = Duration::from_millis(10);

/// The longest busy timeout accepted (SQLite counts it in milliseconds in an `int`); longer ones are cut.
const MAX_BUSY_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// The name errors give an in-memory store.
const IN_MEMORY: &str = ":memory:";

const JOB_COLUMNS: &str = "jid, kind, pid, state, exit_code, args, cwd, log, attachable, gpu, created_at, \
                           container_id, runtime_root, restored_from, namespace, origin, owner";
/// How many columns [`JOB_COLUMNS`] names (where a joined checkpoint's columns start).
const JOB_COLUMN_COUNT: usize = 17;
const CHECKPOINT_COLUMNS: &str = "id, jid, time, size, path, compression";

/// What went wrong with the job store. [`StoreError::kind`] classifies it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No job has this id.
    #[error("job {jid} not found")]
    JobNotFound {
        /// The id asked for.
        jid: String,
    },
    /// A job with this id exists already.
    #[error("job {jid} exists already")]
    JobExists {
        /// The id that is taken.
        jid: String,
    },
    /// A checkpoint with this id exists already.
    #[error("checkpoint {id} exists already")]
    CheckpointExists {
        /// The id that is taken.
        id: String,
    },
    /// The file was written by a newer cedana, with a schema this one does not know. It was left as it is.
    #[error(
        "job store {}: its schema version is {found}, newer than version {supported}, the newest this cedana \
         knows; use a newer cedana (the file was left as it is)",
        .path.display()
    )]
    NewerVersion {
        /// The file.
        path: PathBuf,
        /// Its `user_version`.
        found: i64,
        /// [`SCHEMA_VERSION`].
        supported: u32,
    },
    /// The file is not a SQLite database, or a corrupt one. It was left as it is.
    #[error(
        "job store {}: not a SQLite database, or a corrupt one ({source}); move it aside (e.g. `mv {} {}.bad`) \
         and cedana will start a new store there (the file was left as it is)",
        .path.display(), .path.display(), .path.display()
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What SQLite said.
        source: rusqlite::Error,
    },
    /// The file is a SQLite database, but not a job store (it has tables and no schema version). It was left
    /// as it is.
    #[error(
        "{}: a SQLite database but not a cedana job store (it has tables of its own and no schema version); \
         point cedana at another file, or move this one aside (the file was left as it is)",
        .path.display()
    )]
    NotAJobStore {
        /// The file.
        path: PathBuf,
    },
    /// Another writer held the file locked for longer than the busy timeout.
    #[error("job store {}: busy, locked by another writer for more than {timeout:?} ({source})", .path.display())]
    Busy {
        /// The file.
        path: PathBuf,
        /// How long we waited.
        timeout: Duration,
        /// What SQLite said.
        source: rusqlite::Error,
    },
    /// The file or its folder could not be created or opened.
    #[error("job store {}: {source}", .path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The system's error.
        source: std::io::Error,
    },
    /// [`super::names::unique_jid`] found every id it tried taken.
    #[error("no free job id after {attempts} attempts")]
    NoFreeJid {
        /// How many ids were tried.
        attempts: usize,
    },
    /// Any other SQLite error (including a stored value that does not decode).
    #[error("job store {}: {source}", .path.display())]
    Sqlite {
        /// The file (`:memory:` for an in-memory store).
        path: PathBuf,
        /// What SQLite said.
        source: rusqlite::Error,
    },
}

impl StoreError {
    /// The class of this error: [`ErrorKind::NotFound`] for a missing job, [`ErrorKind::AlreadyExists`] for a
    /// taken id, [`ErrorKind::FailedPrecondition`] for a file we refuse (newer, corrupt, foreign),
    /// [`ErrorKind::Unavailable`] when busy, [`ErrorKind::ResourceExhausted`] for a full disk or no free id,
    /// the I/O error's kind for the file itself, [`ErrorKind::Internal`] for anything else.
    pub fn kind(&self) -> ErrorKind {
        match self {
            StoreError::JobNotFound { .. } => ErrorKind::NotFound,
            StoreError::JobExists { .. } | StoreError::CheckpointExists { .. } => ErrorKind::AlreadyExists,
            StoreError::NewerVersion { .. } | StoreError::Corrupt { .. } | StoreError::NotAJobStore { .. } => {
                ErrorKind::FailedPrecondition
            }
            StoreError::Busy { .. } => ErrorKind::Unavailable,
            StoreError::Io { source, .. } => ErrorKind::of_io(source),
            StoreError::NoFreeJid { .. } => ErrorKind::ResourceExhausted,
            StoreError::Sqlite { source, .. } => match sqlite_code(source) {
                Some(ErrorCode::DiskFull) => ErrorKind::ResourceExhausted,
                _ => ErrorKind::Internal,
            },
        }
    }
}

/// The primary SQLite result code of an error, if it came from SQLite.
fn sqlite_code(e: &rusqlite::Error) -> Option<ErrorCode> {
    match e {
        rusqlite::Error::SqliteFailure(f, _) => Some(f.code),
        _ => None,
    }
}

/// The extended SQLite result code of an error, if it came from SQLite.
fn extended_code(e: &rusqlite::Error) -> Option<i32> {
    match e {
        rusqlite::Error::SqliteFailure(f, _) => Some(f.extended_code),
        _ => None,
    }
}

/// The store of managed jobs and their checkpoints, in a SQLite file. Cheap to clone (clones share one
/// connection), `Send + Sync`; see the [module documentation](self) for how it behaves with other writers.
#[derive(Clone)]
pub struct JobStore {
    inner: Arc<Inner>,
}

struct Inner {
    conn: Mutex<Connection>,
    path: PathBuf,
    busy_timeout: Duration,
    migrations_applied: u32,
}

impl std::fmt::Debug for JobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobStore").field("path", &self.inner.path).finish_non_exhaustive()
    }
}

/// The parameters `?1`..`?15` of a job row, in the order of `JOB_COLUMNS` (shared by insert and update).
macro_rules! job_row {
    ($job:expr, $args:expr) => {
        params![
            $job.jid,
            $job.kind.as_str(),
            $job.pid,
            $job.state.as_str(),
            $job.exit_code,
            $args,
            path_bytes($job.cwd.as_deref()),
            path_bytes($job.log.as_deref()),
            $job.attachable,
            $job.gpu,
            $job.created_at,
            $job.container_id,
            path_bytes($job.runtime_root.as_deref()),
            $job.restored_from,
            $job.namespace,
            $job.origin.as_ref().and_then(|o| serde_json::to_string(o).ok()),
            $job.owner,
        ]
    };
}

impl JobStore {
    /// Opens the store at `path`, creating the file (mode 0600) and its folder if needed and bringing its
    /// schema up to [`SCHEMA_VERSION`]. Waits up to [`DEFAULT_BUSY_TIMEOUT`] for other writers.
    ///
    /// Refuses, leaving the file untouched: a file of a newer schema ([`StoreError::NewerVersion`]), a file
    /// that is not a SQLite database or is corrupt ([`StoreError::Corrupt`]), a SQLite database that is not
    /// a job store ([`StoreError::NotAJobStore`]).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with_timeout(path, DEFAULT_BUSY_TIMEOUT)
    }

    /// [`JobStore::open`] with another busy timeout: how long an operation waits for other writers before
    /// failing with [`StoreError::Busy`] (at most a day).
    pub fn open_with_timeout(path: impl AsRef<Path>, busy_timeout: Duration) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |source| StoreError::Io { path: p, source }
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).map_err(io(parent))?;
        }
        // Create the file ourselves so that it gets mode 0600 (SQLite would use 0644); an existing file is
        // neither truncated nor touched.
        fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).mode(0o600).open(&path).map_err(io(&path))?;
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let mut conn = Connection::open_with_flags(&path, flags).map_err(|e| classify(&path, busy_timeout, e))?;
        // Setting up is idempotent (reads, pragmas, migrations that read the version again), so a busy
        // answer is retried on a new connection until the busy timeout has passed.
        let deadline = std::time::Instant::now() + busy_timeout.min(MAX_BUSY_TIMEOUT);
        loop {
            match Self::setup(conn, path.clone(), busy_timeout) {
                Err(StoreError::Busy { .. }) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(SETUP_RETRY_PAUSE);
                    conn = Connection::open_with_flags(&path, flags).map_err(|e| classify(&path, busy_timeout, e))?;
                }
                other => return other,
            }
        }
    }

    /// A private store in memory, empty, for tests.
    pub fn open_in_memory() -> Result<Self, StoreError> {
        let path = PathBuf::from(IN_MEMORY);
        let conn = Connection::open_in_memory().map_err(|e| classify(&path, DEFAULT_BUSY_TIMEOUT, e))?;
        Self::setup(conn, path, DEFAULT_BUSY_TIMEOUT)
    }

    /// Checks the file before anything could write to it, then sets the connection up and migrates.
    fn setup(mut conn: Connection, path: PathBuf, busy_timeout: Duration) -> Result<Self, StoreError> {
        let busy_timeout = busy_timeout.min(MAX_BUSY_TIMEOUT);
        let err = |e| classify(&path, busy_timeout, e);
        conn.busy_timeout(busy_timeout).map_err(err)?;
        // Reading the header is the first access to the file: a file that is not a database fails here
        // (SQLITE_NOTADB) and one from a newer cedana is recognised here, before anything is written. The
        // version and the tables are read in one statement, so from one snapshot: another process may be
        // migrating the fresh file at this very moment.
        let (found, tables): (i64, i64) = conn
            .query_row("SELECT (SELECT user_version FROM pragma_user_version), (SELECT count(*) FROM sqlite_schema)", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .map_err(err)?;
        check_version(&path, found)?;
        // A database with tables but no version is someone else's: refuse it before the journal mode
        // (written in the file's header) changes.
        if found == 0 && tables > 0 {
            return Err(StoreError::NotAJobStore { path });
        }
        // In memory the journal mode stays "memory".
        let _mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0)).map_err(err)?;
        conn.pragma_update(None, "synchronous", "NORMAL").map_err(err)?;
        conn.pragma_update(None, "foreign_keys", true).map_err(err)?;
        let migrations_applied = if found == i64::from(SCHEMA_VERSION) { 0 } else { migrate(&mut conn, &path, busy_timeout)? };
        Ok(JobStore { inner: Arc::new(Inner { conn: Mutex::new(conn), path, busy_timeout, migrations_applied }) })
    }

    /// The file (`:memory:` for an in-memory store).
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// How many schema steps opening this store applied: all of them for a fresh file, 0 for a current one.
    pub fn migrations_applied(&self) -> u32 {
        self.inner.migrations_applied
    }

    /// The schema version of the file (its `user_version`), as it is now.
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        self.conn().query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(|e| self.err(e))
    }

    /// Adds a job. [`StoreError::JobExists`] if its id is taken.
    pub fn insert(&self, job: &Job) -> Result<(), StoreError> {
        let conn = self.conn();
        let args = args_to_json(&job.args).map_err(|e| self.err(e))?;
        let sql = format!(
            "INSERT INTO jobs ({JOB_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)"
        );
        let result = conn.prepare_cached(&sql).and_then(|mut st| st.execute(job_row!(job, args)));
        match result {
            Ok(_) => Ok(()),
            Err(e) if is_unique_violation(&e) => Err(StoreError::JobExists { jid: job.jid.clone() }),
            Err(e) => Err(self.err(e)),
        }
    }

    /// Replaces every field of the job with `job.jid` by `job`'s. [`StoreError::JobNotFound`] if there is
    /// none.
    pub fn update(&self, job: &Job) -> Result<(), StoreError> {
        let conn = self.conn();
        let args = args_to_json(&job.args).map_err(|e| self.err(e))?;
        let changed = conn
            .prepare_cached(
                "UPDATE jobs SET kind = ?2, pid = ?3, state = ?4, exit_code = ?5, args = ?6, cwd = ?7, log = ?8, \
                 attachable = ?9, gpu = ?10, created_at = ?11, container_id = ?12, runtime_root = ?13, \
                 restored_from = ?14, namespace = ?15, origin = ?16, owner = ?17 WHERE jid = ?1",
            )
            .and_then(|mut st| st.execute(job_row!(job, args)))
            .map_err(|e| self.err(e))?;
        self.found(changed, &job.jid)
    }

    /// Sets a job's state and exit code in one atomic update. [`StoreError::JobNotFound`] if there is no
    /// such job.
    pub fn set_state(&self, jid: &str, state: JobState, exit_code: Option<i32>) -> Result<(), StoreError> {
        let changed = self
            .conn()
            .prepare_cached("UPDATE jobs SET state = ?2, exit_code = ?3 WHERE jid = ?1")
            .and_then(|mut st| st.execute(params![jid, state.as_str(), exit_code]))
            .map_err(|e| self.err(e))?;
        self.found(changed, jid)
    }

    /// The job with this id. [`StoreError::JobNotFound`] if there is none (see [`JobStore::contains`] to ask
    /// without an error).
    pub fn get(&self, jid: &str) -> Result<Job, StoreError> {
        let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE jid = ?1");
        self.conn()
            .prepare_cached(&sql)
            .and_then(|mut st| st.query_row([jid], job_from_row).optional())
            .map_err(|e| self.err(e))?
            .ok_or_else(|| StoreError::JobNotFound { jid: jid.to_owned() })
    }

    /// Whether a job has this id.
    pub fn contains(&self, jid: &str) -> Result<bool, StoreError> {
        self.conn()
            .prepare_cached("SELECT 1 FROM jobs WHERE jid = ?1")
            .and_then(|mut st| st.exists([jid]))
            .map_err(|e| self.err(e))
    }

    /// Every job, oldest first (by creation time, then id).
    pub fn list(&self) -> Result<Vec<Job>, StoreError> {
        let sql = format!("SELECT {JOB_COLUMNS} FROM jobs ORDER BY created_at, jid");
        self.conn().prepare_cached(&sql).and_then(|mut st| st.query_map([], job_from_row)?.collect()).map_err(|e| self.err(e))
    }

    /// Every job with its latest checkpoint, if it has one, oldest job first: what `ps` shows, in one query.
    pub fn list_with_latest_checkpoint(&self) -> Result<Vec<(Job, Option<CheckpointRecord>)>, StoreError> {
        let sql = format!(
            "SELECT {}, c.id, c.jid, c.time, c.size, c.path, c.compression FROM jobs AS j \
             LEFT JOIN checkpoints AS c ON c.rowid = (SELECT rowid FROM checkpoints WHERE jid = j.jid \
             ORDER BY time DESC, rowid DESC LIMIT 1) \
             ORDER BY j.created_at, j.jid",
            JOB_COLUMNS.split(", ").map(|c| format!("j.{c}")).collect::<Vec<_>>().join(", ")
        );
        self.conn()
            .prepare_cached(&sql)
            .and_then(|mut st| {
                st.query_map([], |row| {
                    let job = job_from_row(row)?;
                    let checkpoint = match row.get::<_, Option<String>>(JOB_COLUMN_COUNT)? {
                        Some(_) => Some(checkpoint_from_row(row, JOB_COLUMN_COUNT)?),
                        None => None,
                    };
                    Ok((job, checkpoint))
                })?
                .collect()
            })
            .map_err(|e| self.err(e))
    }

    /// The newest checkpoint of every job that has one, by job id, in one query (with [`JobStore::list`],
    /// what `ps` shows).
    pub fn latest_checkpoints(&self) -> Result<HashMap<String, CheckpointRecord>, StoreError> {
        let sql = format!(
            "SELECT {} FROM jobs AS j JOIN checkpoints AS c ON c.rowid = (SELECT rowid FROM checkpoints \
             WHERE jid = j.jid ORDER BY time DESC, rowid DESC LIMIT 1)",
            CHECKPOINT_COLUMNS.split(", ").map(|c| format!("c.{c}")).collect::<Vec<_>>().join(", ")
        );
        self.conn()
            .prepare_cached(&sql)
            .and_then(|mut st| st.query_map([], |r| checkpoint_from_row(r, 0).map(|c| (c.jid.clone(), c)))?.collect())
            .map_err(|e| self.err(e))
    }

    /// Removes a job and its checkpoint records (not the checkpoints' files). [`StoreError::JobNotFound`] if
    /// there is no such job.
    pub fn delete(&self, jid: &str) -> Result<(), StoreError> {
        let changed = self
            .conn()
            .prepare_cached("DELETE FROM jobs WHERE jid = ?1")
            .and_then(|mut st| st.execute([jid]))
            .map_err(|e| self.err(e))?;
        self.found(changed, jid)
    }

    /// The running job whose process has this PID (the newest, should there be several).
    pub fn find_by_pid(&self, pid: i32) -> Result<Option<Job>, StoreError> {
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE pid = ?1 AND state = 'running' \
             ORDER BY created_at DESC, jid DESC LIMIT 1"
        );
        self.conn().prepare_cached(&sql).and_then(|mut st| st.query_row([pid], job_from_row).optional()).map_err(|e| self.err(e))
    }

    /// Records that the daemon wrote the checkpoint whose file (or folder) is inode `ino` of device `dev`,
    /// at `path`, for user `owner`; replaces an earlier record of the same inode.
    pub fn seal_checkpoint(&self, dev: u64, ino: u64, owner: u32, path: &Path) -> Result<(), StoreError> {
        let (dev, ino) = (dev as i64, ino as i64); // SQLite integers are signed; the bits round-trip.
        self.conn()
            .prepare_cached(
                "INSERT OR REPLACE INTO sealed_checkpoints (dev, ino, owner, path, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .and_then(|mut st| st.execute(params![dev, ino, owner, path.as_os_str().as_bytes(), unix_now()]))
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// The owner recorded by [`JobStore::seal_checkpoint`] for inode `ino` of device `dev`, if any.
    pub fn sealed_checkpoint_owner(&self, dev: u64, ino: u64) -> Result<Option<u32>, StoreError> {
        let (dev, ino) = (dev as i64, ino as i64);
        self.conn()
            .prepare_cached("SELECT owner FROM sealed_checkpoints WHERE dev = ?1 AND ino = ?2")
            .and_then(|mut st| st.query_row(params![dev, ino], |r| r.get(0)).optional())
            .map_err(|e| self.err(e))
    }

    /// Records a checkpoint of a job. [`StoreError::JobNotFound`] if the job does not exist,
    /// [`StoreError::CheckpointExists`] if the checkpoint's id is taken.
    pub fn add_checkpoint(&self, checkpoint: &CheckpointRecord) -> Result<(), StoreError> {
        let size = size_to_sql(checkpoint.size).map_err(|e| self.err(e))?;
        let sql = format!("INSERT INTO checkpoints ({CHECKPOINT_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6)");
        let result = self.conn().prepare_cached(&sql).and_then(|mut st| {
            st.execute(params![
                checkpoint.id,
                checkpoint.jid,
                checkpoint.time,
                size,
                checkpoint.path.as_os_str().as_bytes(),
                checkpoint.compression,
            ])
        });
        match result {
            Ok(_) => Ok(()),
            Err(e) if extended_code(&e) == Some(ffi::SQLITE_CONSTRAINT_FOREIGNKEY) => {
                Err(StoreError::JobNotFound { jid: checkpoint.jid.clone() })
            }
            Err(e) if is_unique_violation(&e) => Err(StoreError::CheckpointExists { id: checkpoint.id.clone() }),
            Err(e) => Err(self.err(e)),
        }
    }

    /// A job's checkpoints, newest first (by time, then by when they were recorded).
    /// [`StoreError::JobNotFound`] if there is no such job.
    pub fn checkpoints(&self, jid: &str) -> Result<Vec<CheckpointRecord>, StoreError> {
        let conn = self.conn();
        let sql = format!("SELECT {CHECKPOINT_COLUMNS} FROM checkpoints WHERE jid = ?1 ORDER BY time DESC, rowid DESC");
        let list: Vec<CheckpointRecord> = conn
            .prepare_cached(&sql)
            .and_then(|mut st| st.query_map([jid], |r| checkpoint_from_row(r, 0))?.collect())
            .map_err(|e| self.err(e))?;
        if list.is_empty() {
            self.check_job(&conn, jid)?;
        }
        Ok(list)
    }

    /// A job's newest checkpoint, if it has any. [`StoreError::JobNotFound`] if there is no such job.
    pub fn latest_checkpoint(&self, jid: &str) -> Result<Option<CheckpointRecord>, StoreError> {
        let conn = self.conn();
        let sql = format!("SELECT {CHECKPOINT_COLUMNS} FROM checkpoints WHERE jid = ?1 ORDER BY time DESC, rowid DESC LIMIT 1");
        let latest = conn
            .prepare_cached(&sql)
            .and_then(|mut st| st.query_row([jid], |r| checkpoint_from_row(r, 0)).optional())
            .map_err(|e| self.err(e))?;
        if latest.is_none() {
            self.check_job(&conn, jid)?;
        }
        Ok(latest)
    }

    /// The connection. A thread that panicked while holding it leaves it usable: every write is one
    /// statement or a transaction that rolls back when dropped, so the poison is ignored.
    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.inner.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// [`StoreError::JobNotFound`] unless the job exists.
    fn check_job(&self, conn: &Connection, jid: &str) -> Result<(), StoreError> {
        let exists = conn
            .prepare_cached("SELECT 1 FROM jobs WHERE jid = ?1")
            .and_then(|mut st| st.exists([jid]))
            .map_err(|e| self.err(e))?;
        if exists {
            Ok(())
        } else {
            Err(StoreError::JobNotFound { jid: jid.to_owned() })
        }
    }

    /// [`StoreError::JobNotFound`] if a statement about `jid` changed no row.
    fn found(&self, changed: usize, jid: &str) -> Result<(), StoreError> {
        if changed == 0 {
            Err(StoreError::JobNotFound { jid: jid.to_owned() })
        } else {
            Ok(())
        }
    }

    fn err(&self, e: rusqlite::Error) -> StoreError {
        classify(&self.inner.path, self.inner.busy_timeout, e)
    }
}

/// Turns a SQLite error into ours: busy or locked after the timeout, a file that is not a database or is
/// corrupt, anything else.
fn classify(path: &Path, busy_timeout: Duration, source: rusqlite::Error) -> StoreError {
    let path = path.to_path_buf();
    match sqlite_code(&source) {
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => StoreError::Busy { path, timeout: busy_timeout, source },
        Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => StoreError::Corrupt { path, source },
        _ => StoreError::Sqlite { path, source },
    }
}

/// A primary key or unique constraint failed.
fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(extended_code(e), Some(ffi::SQLITE_CONSTRAINT_PRIMARYKEY | ffi::SQLITE_CONSTRAINT_UNIQUE))
}

fn args_to_json(args: &[String]) -> rusqlite::Result<String> {
    serde_json::to_string(args).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
}

fn size_to_sql(size: u64) -> rusqlite::Result<i64> {
    i64::try_from(size).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
}

fn path_bytes(p: Option<&Path>) -> Option<&[u8]> {
    p.map(|p| p.as_os_str().as_bytes())
}

fn path_from_bytes(b: Vec<u8>) -> PathBuf {
    PathBuf::from(OsString::from_vec(b))
}

/// A decoding failure of column `idx`, as rusqlite reports them.
fn bad_value(idx: usize, ty: Type, e: impl std::error::Error + Send + Sync + 'static) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(idx, ty, Box::new(e))
}

/// A job from the first 14 columns of a row, in [`JOB_COLUMNS`]' order.
fn job_from_row(row: &Row<'_>) -> rusqlite::Result<Job> {
    let kind: String = row.get(1)?;
    let state: String = row.get(3)?;
    let args: String = row.get(5)?;
    Ok(Job {
        jid: row.get(0)?,
        kind: kind.parse::<JobKind>().map_err(|e| bad_value(1, Type::Text, e))?,
        pid: row.get(2)?,
        state: state.parse::<JobState>().map_err(|e| bad_value(3, Type::Text, e))?,
        exit_code: row.get(4)?,
        args: serde_json::from_str(&args).map_err(|e| bad_value(5, Type::Text, e))?,
        cwd: row.get::<_, Option<Vec<u8>>>(6)?.map(path_from_bytes),
        log: row.get::<_, Option<Vec<u8>>>(7)?.map(path_from_bytes),
        attachable: row.get(8)?,
        gpu: row.get(9)?,
        created_at: row.get(10)?,
        container_id: row.get(11)?,
        runtime_root: row.get::<_, Option<Vec<u8>>>(12)?.map(path_from_bytes),
        restored_from: row.get(13)?,
        namespace: row.get(14)?,
        origin: row.get::<_, Option<String>>(15)?.and_then(|o| serde_json::from_str(&o).ok()),
        owner: row.get(16)?,
    })
}

/// A checkpoint from the six columns of a row starting at `at`, in [`CHECKPOINT_COLUMNS`]' order.
fn checkpoint_from_row(row: &Row<'_>, at: usize) -> rusqlite::Result<CheckpointRecord> {
    let size: i64 = row.get(at + 3)?;
    Ok(CheckpointRecord {
        id: row.get(at)?,
        jid: row.get(at + 1)?,
        time: row.get(at + 2)?,
        size: u64::try_from(size).map_err(|e| bad_value(at + 3, Type::Integer, e))?,
        path: path_from_bytes(row.get(at + 4)?),
        compression: row.get(at + 5)?,
    })
}
