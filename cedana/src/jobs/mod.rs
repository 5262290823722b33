//! Managed jobs: the programs the daemon started (`cedana run`) or adopted (`cedana manage`), their
//! checkpoints and their state, kept in a SQLite file so that they outlive a restart of the daemon.
//!
//! - [`model`]: the plain data ([`Job`], [`JobKind`], [`JobState`], [`CheckpointRecord`]);
//! - [`store`]: [`JobStore`], the SQLite store (WAL, migrations by `PRAGMA user_version`, safe for several
//!   threads and several processes on one file), and [`StoreError`];
//! - [`names`]: memorable job ids (`famous_hopper7`) and random checkpoint ids.
//!
//! ```no_run
//! use cedana::jobs::{names, Job, JobKind, JobState, JobStore};
//!
//! # fn main() -> Result<(), cedana::jobs::StoreError> {
//! let store = JobStore::open("/var/lib/cedana/jobs.db")?;
//! let jid = names::unique_jid(&store)?;
//! store.insert(&Job::new(jid.clone(), JobKind::Process, 4242, vec!["sleep".into(), "100".into()]))?;
//! store.set_state(&jid, JobState::Exited, Some(0))?;
//! for job in store.list()? {
//!     println!("{} {} {}", job.jid, job.pid, job.state);
//! }
//! # Ok(())
//! # }
//! ```

pub mod model;
pub mod names;
pub mod store;

pub use model::{CheckpointRecord, Job, JobKind, JobState, ParseError};
pub use store::{JobStore, StoreError, DEFAULT_BUSY_TIMEOUT, SCHEMA_VERSION};
pub mod attach;
pub mod fifos;
pub mod holder;
pub mod supervisor;
