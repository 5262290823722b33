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
//!     container_id TEXT, runtime_root BLOB, restored_from TEXT) STRICT;
//! CREATE INDEX jobs_by_creation ON jobs (created_at, jid);
//! CREATE INDEX jobs_running_by_pid ON jobs (pid) WHERE state = 'running';
//! CREATE TABLE checkpoints (
//!     id TEXT PRIMARY KEY NOT NULL, jid TEXT NOT NULL REFERENCES jobs (jid) ON DELETE CASCADE,
//!     time INTEGER NOT NULL, size INTEGER NOT NULL, path BLOB NOT NULL, compression TEXT NOT NULL) STRICT;
//! CREATE INDEX checkpoints_by_job ON checkpoints (jid, time);
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
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, Row, TransactionBehavior};

use super::model::{CheckpointRecord, Job, JobKind, JobState};
use crate::error::ErrorKind;

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
];

/// The schema version this build writes and understands (the number of [`MIGRATIONS`]).
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// How long a writer waits for another one (thread or process) before giving up with [`StoreError::Busy`].
pub const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest busy timeout accepted (SQLite counts it in milliseconds in an `int`); longer ones are cut.
const MAX_BUSY_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// The name errors give an in-memory store.
const IN_MEMORY: &str = ":memory:";

const JOB_COLUMNS: &str = "jid, kind, pid, state, exit_code, args, cwd, log, attachable, gpu, created_at, \
                           container_id, runtime_root, restored_from";
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
        let conn = Connection::open_with_flags(&path, flags).map_err(|e| classify(&path, busy_timeout, e))?;
        Self::setup(conn, path, busy_timeout)
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
        // (SQLITE_NOTADB) and one from a newer cedana is recognised here, before anything is written.
        let found: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(err)?;
        check_version(&path, found)?;
        if found == 0 {
            // A database with tables but no version is someone else's: refuse it before the journal mode
            // (written in the file's header) changes.
            let tables: i64 = conn.query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0)).map_err(err)?;
            if tables > 0 {
                return Err(StoreError::NotAJobStore { path });
            }
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
        let sql =
            format!("INSERT INTO jobs ({JOB_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)");
        let result = conn.prepare_cached(&sql).and_then(|mut st| {
            st.execute(params![
                job.jid,
                job.kind.as_str(),
                job.pid,
                job.state.as_str(),
                job.exit_code,
                args,
                path_bytes(job.cwd.as_deref()),
                path_bytes(job.log.as_deref()),
                job.attachable,
                job.gpu,
                job.created_at,
                job.container_id,
                path_bytes(job.runtime_root.as_deref()),
                job.restored_from,
            ])
        });
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
                 restored_from = ?14 WHERE jid = ?1",
            )
            .and_then(|mut st| {
                st.execute(params![
                    job.jid,
                    job.kind.as_str(),
                    job.pid,
                    job.state.as_str(),
                    job.exit_code,
                    args,
                    path_bytes(job.cwd.as_deref()),
                    path_bytes(job.log.as_deref()),
                    job.attachable,
                    job.gpu,
                    job.created_at,
                    job.container_id,
                    path_bytes(job.runtime_root.as_deref()),
                    job.restored_from,
                ])
            })
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
                    let checkpoint = match row.get::<_, Option<String>>(14)? {
                        Some(_) => Some(checkpoint_from_row(row, 14)?),
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

/// Refuses a `user_version` newer than ours.
fn check_version(path: &Path, found: i64) -> Result<(), StoreError> {
    if found > i64::from(SCHEMA_VERSION) {
        return Err(StoreError::NewerVersion { path: path.to_path_buf(), found, supported: SCHEMA_VERSION });
    }
    Ok(())
}

/// Applies the missing schema steps, each in its own `IMMEDIATE` transaction that first reads the version
/// again (another process may have migrated meanwhile). Returns how many steps this call applied.
fn migrate(conn: &mut Connection, path: &Path, busy_timeout: Duration) -> Result<u32, StoreError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Barrier;
    use std::time::Instant;

    fn full_job(jid: &str) -> Job {
        Job {
            jid: jid.to_owned(),
            kind: JobKind::Containerd,
            pid: 31337,
            state: JobState::Halted,
            exit_code: Some(-9),
            args: vec!["sh".into(), "-c".into(), "echo 'hi there' \"$x\" ü".into(), String::new()],
            cwd: Some("/srv/work dir".into()),
            // Not UTF-8: paths are stored as bytes.
            log: Some(PathBuf::from(OsString::from_vec(b"/var/log/job-\xff.log".to_vec()))),
            attachable: true,
            gpu: true,
            created_at: 1_764_000_000,
            container_id: Some("c0ffee".into()),
            runtime_root: Some("/run/containerd/runc/k8s.io".into()),
            restored_from: Some("/var/lib/cedana/checkpoints/x.tar.zst".into()),
        }
    }

    fn bare_job(jid: &str, created_at: i64) -> Job {
        Job { created_at, ..Job::new(jid, JobKind::Process, 100, vec![]) }
    }

    fn checkpoint(jid: &str, id: &str, time: i64) -> CheckpointRecord {
        CheckpointRecord {
            id: id.to_owned(),
            jid: jid.to_owned(),
            time,
            size: u64::from(u32::MAX) * 3,
            path: format!("/var/lib/cedana/{id}.tar.zst").into(),
            compression: "zstd".into(),
        }
    }

    fn temp() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    #[test]
    fn every_field_round_trips() {
        let store = JobStore::open_in_memory().unwrap();
        assert_eq!(store.migrations_applied(), SCHEMA_VERSION);
        let full = full_job("famous_hopper7");
        let bare = Job::new("bold_curie3", JobKind::Runc, 7, vec![]);
        store.insert(&full).unwrap();
        store.insert(&bare).unwrap();
        assert_eq!(store.get("famous_hopper7").unwrap(), full);
        assert_eq!(store.get("bold_curie3").unwrap(), bare);
        assert!(matches!(store.get("nobody_knuth1"), Err(StoreError::JobNotFound { .. })));
        assert!(store.contains("bold_curie3").unwrap());

        // Update every field the other way round.
        let mut changed = bare.clone();
        changed.jid = full.jid.clone();
        store.update(&changed).unwrap();
        assert_eq!(store.get("famous_hopper7").unwrap(), changed);
        store.update(&full).unwrap();
        assert_eq!(store.get("famous_hopper7").unwrap(), full);

        let c = checkpoint("famous_hopper7", &crate::jobs::names::checkpoint_id(), 5);
        store.add_checkpoint(&c).unwrap();
        assert_eq!(store.checkpoints("famous_hopper7").unwrap(), vec![c.clone()]);
        assert_eq!(store.latest_checkpoint("famous_hopper7").unwrap(), Some(c));
        assert_eq!(store.latest_checkpoint("bold_curie3").unwrap(), None);
    }

    #[test]
    fn duplicates_and_missing_jobs_are_classified() {
        let store = JobStore::open_in_memory().unwrap();
        store.insert(&bare_job("a", 1)).unwrap();
        let e = store.insert(&bare_job("a", 2)).unwrap_err();
        assert!(matches!(e, StoreError::JobExists { ref jid } if jid == "a"), "{e:?}");
        assert_eq!(e.kind(), ErrorKind::AlreadyExists);

        for e in [
            store.get("missing").unwrap_err(),
            store.update(&bare_job("missing", 1)).unwrap_err(),
            store.delete("missing").unwrap_err(),
            store.set_state("missing", JobState::Lost, None).unwrap_err(),
            store.add_checkpoint(&checkpoint("missing", "c1", 1)).unwrap_err(),
            store.checkpoints("missing").unwrap_err(),
            store.latest_checkpoint("missing").unwrap_err(),
        ] {
            assert!(matches!(e, StoreError::JobNotFound { ref jid } if jid == "missing"), "{e:?}");
            assert_eq!(e.kind(), ErrorKind::NotFound);
            assert_eq!(e.to_string(), "job missing not found");
        }

        store.add_checkpoint(&checkpoint("a", "c1", 1)).unwrap();
        let e = store.add_checkpoint(&checkpoint("a", "c1", 2)).unwrap_err();
        assert!(matches!(e, StoreError::CheckpointExists { .. }), "{e:?}");
        assert_eq!(e.kind(), ErrorKind::AlreadyExists);
    }

    #[test]
    fn set_state_and_find_by_pid() {
        let store = JobStore::open_in_memory().unwrap();
        let mut old = bare_job("old", 1);
        old.pid = 500;
        let mut new = bare_job("new", 2);
        new.pid = 500;
        store.insert(&old).unwrap();
        store.insert(&new).unwrap();
        assert_eq!(store.find_by_pid(500).unwrap().unwrap().jid, "new");
        store.set_state("new", JobState::Exited, Some(3)).unwrap();
        let got = store.get("new").unwrap();
        assert_eq!((got.state, got.exit_code), (JobState::Exited, Some(3)));
        assert_eq!(store.find_by_pid(500).unwrap().unwrap().jid, "old");
        store.set_state("old", JobState::Halted, None).unwrap();
        assert_eq!(store.find_by_pid(500).unwrap(), None);
        assert_eq!(store.find_by_pid(501).unwrap(), None);
    }

    #[test]
    fn list_is_ordered_by_creation_then_jid() {
        let store = JobStore::open_in_memory().unwrap();
        for (jid, t) in [("c", 5), ("b", 5), ("z", 1), ("a", 9)] {
            store.insert(&bare_job(jid, t)).unwrap();
        }
        let order: Vec<String> = store.list().unwrap().into_iter().map(|j| j.jid).collect();
        assert_eq!(order, ["z", "b", "c", "a"]);
    }

    #[test]
    fn checkpoints_newest_first_and_cascade_on_delete() {
        let store = JobStore::open_in_memory().unwrap();
        store.insert(&bare_job("a", 1)).unwrap();
        store.insert(&bare_job("b", 2)).unwrap();
        for (id, t) in [("a1", 10), ("a3", 30), ("a2", 20), ("a3bis", 30)] {
            store.add_checkpoint(&checkpoint("a", id, t)).unwrap();
        }
        store.add_checkpoint(&checkpoint("b", "b1", 99)).unwrap();
        let ids: Vec<String> = store.checkpoints("a").unwrap().into_iter().map(|c| c.id).collect();
        // Same time: the one recorded later first.
        assert_eq!(ids, ["a3bis", "a3", "a2", "a1"]);
        assert_eq!(store.latest_checkpoint("a").unwrap().unwrap().id, "a3bis");
        let listed = store.list_with_latest_checkpoint().unwrap();
        let summary: Vec<(&str, Option<&str>)> =
            listed.iter().map(|(j, c)| (j.jid.as_str(), c.as_ref().map(|c| c.id.as_str()))).collect();
        assert_eq!(summary, [("a", Some("a3bis")), ("b", Some("b1"))]);
        store.insert(&bare_job("none", 3)).unwrap();
        let latest = store.latest_checkpoints().unwrap();
        assert_eq!(latest.len(), 2);
        assert_eq!((latest["a"].id.as_str(), latest["b"].id.as_str()), ("a3bis", "b1"));
        store.delete("none").unwrap();

        store.delete("a").unwrap();
        assert!(!store.contains("a").unwrap());
        let orphans: i64 = store.conn().query_row("SELECT count(*) FROM checkpoints WHERE jid = 'a'", [], |r| r.get(0)).unwrap();
        assert_eq!(orphans, 0);
        assert_eq!(store.checkpoints("b").unwrap().len(), 1);
        assert_eq!(store.list_with_latest_checkpoint().unwrap().len(), 1);
        assert!(store.checkpoints("a").is_err());
    }

    #[test]
    fn reopen_keeps_jobs_and_migrates_nothing() {
        let dir = temp();
        let path = dir.path().join("state/deeper/jobs.db");
        let job = full_job("famous_hopper7");
        {
            let store = JobStore::open(&path).unwrap();
            assert_eq!(store.migrations_applied(), SCHEMA_VERSION);
            assert_eq!(store.schema_version().unwrap(), i64::from(SCHEMA_VERSION));
            store.insert(&job).unwrap();
            store.add_checkpoint(&checkpoint(&job.jid, "c1", 1)).unwrap();
        }
        let mode = fs::metadata(&path).unwrap().permissions();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600);
        let store = JobStore::open(&path).unwrap();
        assert_eq!(store.migrations_applied(), 0);
        assert_eq!(store.schema_version().unwrap(), i64::from(SCHEMA_VERSION));
        assert_eq!(store.list().unwrap(), vec![job]);
        assert_eq!(store.checkpoints("famous_hopper7").unwrap().len(), 1);
        let mode: String = store.conn().query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
        assert_eq!(mode, "wal");
    }

    #[test]
    fn newer_version_is_refused_and_left_alone() {
        let dir = temp();
        let path = dir.path().join("jobs.db");
        {
            let store = JobStore::open(&path).unwrap();
            store.insert(&bare_job("a", 1)).unwrap();
            store.conn().pragma_update(None, "user_version", 7).unwrap();
        }
        check_newer_refused(&path);
        // The same for a file in rollback-journal mode (whose header the journal mode would change).
        let path = dir.path().join("rollback.db");
        Connection::open(&path).unwrap().execute_batch("CREATE TABLE x (y); PRAGMA user_version = 7;").unwrap();
        check_newer_refused(&path);
    }

    fn check_newer_refused(path: &Path) {
        let before = fs::read(path).unwrap();
        let e = JobStore::open(path).unwrap_err();
        assert!(matches!(e, StoreError::NewerVersion { found: 7, supported: SCHEMA_VERSION, .. }), "{e:?}");
        assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
        let text = e.to_string();
        assert!(text.contains("version is 7") && text.contains(&format!("version {SCHEMA_VERSION}")), "{text}");
        assert!(text.contains(&path.display().to_string()), "{text}");
        println!("{text}");
        assert!(fs::read(path).unwrap() == before, "the file was modified");
    }

    #[test]
    fn garbage_file_is_refused_with_its_name_and_left_alone() {
        let dir = temp();
        for (name, content) in [
            ("short.db", b"not a database".to_vec()),
            ("long.db", (0..8192_u32).map(|i| (i * 7 % 251) as u8).collect::<Vec<u8>>()),
        ] {
            let path = dir.path().join(name);
            fs::write(&path, &content).unwrap();
            let e = JobStore::open(&path).unwrap_err();
            assert!(matches!(e, StoreError::Corrupt { .. }), "{e:?}");
            assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
            let text = e.to_string();
            assert!(text.contains(&path.display().to_string()) && text.contains("move it aside"), "{text}");
            println!("{text}");
            assert!(fs::read(&path).unwrap() == content, "the file was modified");
        }
    }

    #[test]
    fn foreign_sqlite_database_is_refused() {
        let dir = temp();
        let path = dir.path().join("other.db");
        Connection::open(&path).unwrap().execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);").unwrap();
        let before = fs::read(&path).unwrap();
        let e = JobStore::open(&path).unwrap_err();
        assert!(matches!(e, StoreError::NotAJobStore { .. }), "{e:?}");
        assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
        assert!(fs::read(&path).unwrap() == before, "the file was modified");
    }

    #[test]
    fn busy_after_the_timeout_is_unavailable() {
        let dir = temp();
        let path = dir.path().join("jobs.db");
        let store = JobStore::open_with_timeout(&path, Duration::from_millis(100)).unwrap();
        let mut other = Connection::open(&path).unwrap();
        let tx = other.transaction_with_behavior(TransactionBehavior::Immediate).unwrap();
        let started = Instant::now();
        let e = store.insert(&bare_job("a", 1)).unwrap_err();
        assert!(started.elapsed() >= Duration::from_millis(90), "{:?}", started.elapsed());
        assert!(matches!(e, StoreError::Busy { .. }), "{e:?}");
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        // Readers are not blocked by a writer.
        assert_eq!(store.list().unwrap(), vec![]);
        drop(tx);
        store.insert(&bare_job("a", 1)).unwrap();
    }

    #[test]
    fn threads_write_concurrently_through_one_store() {
        let dir = temp();
        let store = JobStore::open(dir.path().join("jobs.db")).unwrap();
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let store = store.clone();
                std::thread::spawn(move || {
                    for i in 0..50 {
                        let mut job = bare_job(&format!("t{t}_{i}"), i);
                        store.insert(&job).unwrap();
                        job.pid = t * 1000 + i as i32;
                        store.update(&job).unwrap();
                        store.set_state(&job.jid, JobState::Exited, Some(t)).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let jobs = store.list().unwrap();
        assert_eq!(jobs.len(), 400);
        for job in jobs {
            let (t, i) = job.jid[1..].split_once('_').unwrap();
            let (t, i): (i32, i32) = (t.parse().unwrap(), i.parse().unwrap());
            assert_eq!((job.pid, job.state, job.exit_code), (t * 1000 + i, JobState::Exited, Some(t)));
        }
    }

    #[test]
    fn two_stores_on_one_file_write_at_once() {
        let dir = temp();
        let path = dir.path().join("jobs.db");
        let barrier = Arc::new(Barrier::new(2));
        // Both open the fresh file at the same moment (one migrates, the other waits and finds it done),
        // then write at the same time.
        let threads: Vec<_> = (0..2)
            .map(|s| {
                let (path, barrier) = (path.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    let store = JobStore::open(&path).unwrap();
                    barrier.wait();
                    write_jobs(&store, &format!("s{s}"), 200);
                    store.migrations_applied()
                })
            })
            .collect();
        let applied: u32 = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(applied, SCHEMA_VERSION, "the schema was applied exactly once");
        let store = JobStore::open(&path).unwrap();
        let jobs = store.list_with_latest_checkpoint().unwrap();
        assert_eq!(jobs.len(), 400);
        assert!(jobs.iter().all(|(j, c)| j.state == JobState::Halted && c.is_some()));
    }

    /// Where [`two_processes_write_one_file_at_once`] tells its child process the file is.
    const CHILD_DB_ENV: &str = "CEDANA_JOBS_TEST_CHILD_DB";

    /// The child's half of [`two_processes_write_one_file_at_once`]; does nothing when run on its own.
    #[test]
    fn child_process_writer() {
        let Some(path) = std::env::var_os(CHILD_DB_ENV) else { return };
        write_jobs(&JobStore::open(path).unwrap(), "child", 300);
    }

    fn write_jobs(store: &JobStore, prefix: &str, n: i64) {
        for i in 0..n {
            let jid = format!("{prefix}_{i}");
            store.insert(&bare_job(&jid, i)).unwrap();
            store.add_checkpoint(&checkpoint(&jid, &format!("{jid}_c"), i)).unwrap();
            store.set_state(&jid, JobState::Halted, None).unwrap();
        }
    }

    #[test]
    fn two_processes_write_one_file_at_once() {
        let dir = temp();
        let path = dir.path().join("jobs.db");
        let store = JobStore::open(&path).unwrap();
        // This test binary again, running only the child's test, with the file's path in the environment.
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "jobs::store::tests::child_process_writer", "--test-threads", "1"])
            .env(CHILD_DB_ENV, &path)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        write_jobs(&store, "parent", 300);
        assert!(child.wait().unwrap().success(), "the child process failed");
        let jobs = store.list_with_latest_checkpoint().unwrap();
        assert_eq!(jobs.len(), 600);
        assert!(jobs.iter().all(|(j, c)| j.state == JobState::Halted && c.is_some()));
        assert_eq!(jobs.iter().filter(|(j, _)| j.jid.starts_with("child_")).count(), 300);
    }

    #[test]
    fn listing_a_thousand_jobs_is_fast() {
        let dir = temp();
        let store = JobStore::open(dir.path().join("jobs.db")).unwrap();
        for i in 0..1000 {
            let mut job = full_job(&format!("job{i:04}"));
            job.created_at = i;
            store.insert(&job).unwrap();
            for c in 0..2 {
                store.add_checkpoint(&checkpoint(&job.jid, &format!("{i}_{c}"), i + c)).unwrap();
            }
        }
        // Warm up once (page cache, statement cache), then take the best of a few.
        assert_eq!(store.list().unwrap().len(), 1000);
        let time = |f: &dyn Fn() -> usize| {
            (0..5)
                .map(|_| {
                    let started = Instant::now();
                    assert_eq!(f(), 1000);
                    started.elapsed()
                })
                .min()
                .unwrap()
        };
        let list = time(&|| store.list().unwrap().len());
        let list_and_latest = time(&|| {
            let (jobs, latest) = (store.list().unwrap(), store.latest_checkpoints().unwrap());
            assert_eq!(latest.len(), jobs.len());
            jobs.len()
        });
        let with_latest = time(&|| store.list_with_latest_checkpoint().unwrap().len());
        // A fresh store on the file, as `cedana ps` would do it: open + one query.
        let cold = {
            let started = Instant::now();
            let fresh = JobStore::open(store.path()).unwrap();
            assert_eq!(fresh.list_with_latest_checkpoint().unwrap().len(), 1000);
            started.elapsed()
        };
        println!(
            "1,000 jobs x 2 checkpoints: list() {list:?}, list() + latest_checkpoints() {list_and_latest:?}, \
             list_with_latest_checkpoint() {with_latest:?}, open + list_with_latest_checkpoint() {cold:?}"
        );
        let bound = Duration::from_millis(200);
        assert!(list < bound && list_and_latest < bound && with_latest < bound && cold < bound, "too slow");
    }
}
