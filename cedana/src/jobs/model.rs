//! The jobs' data: what the daemon knows about a managed program and its checkpoints. Plain values that
//! serialise with serde (the daemon's API and `cedana ps --json` print them as they are).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::ErrorKind;

/// What a job runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    /// A process tree on the host.
    Process,
    /// A runc container.
    Runc,
    /// A containerd container (task).
    Containerd,
}

impl JobKind {
    /// The lowercase name, as stored and printed (`process`, `runc`, `containerd`).
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Process => "process",
            JobKind::Runc => "runc",
            JobKind::Containerd => "containerd",
        }
    }
}

impl fmt::Display for JobKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobKind {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "process" => Ok(JobKind::Process),
            "runc" => Ok(JobKind::Runc),
            "containerd" => Ok(JobKind::Containerd),
            _ => Err(ParseError { what: "job kind", value: s.to_owned() }),
        }
    }
}

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Running (as far as the daemon last saw).
    Running,
    /// Exited by itself; its exit code, when known, is in [`Job::exit_code`].
    Exited,
    /// A dump ended it (a checkpoint without `--leave-running`).
    Halted,
    /// Gone, without the daemon seeing how (e.g. it vanished while the daemon was down).
    Lost,
}

impl JobState {
    /// The lowercase name, as stored and as Cedana's `ps` prints it (`running`, `exited`, `halted`, `lost`).
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Running => "running",
            JobState::Exited => "exited",
            JobState::Halted => "halted",
            JobState::Lost => "lost",
        }
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobState {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "running" => Ok(JobState::Running),
            "exited" => Ok(JobState::Exited),
            "halted" => Ok(JobState::Halted),
            "lost" => Ok(JobState::Lost),
            _ => Err(ParseError { what: "job state", value: s.to_owned() }),
        }
    }
}

/// A name that is not one of a [`JobKind`]'s or a [`JobState`]'s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {value:?}")]
pub struct ParseError {
    /// What was being parsed ("job kind", "job state").
    pub what: &'static str,
    /// The text that did not parse.
    pub value: String,
}

impl ParseError {
    /// Always [`ErrorKind::InvalidArgument`].
    pub fn kind(&self) -> ErrorKind {
        ErrorKind::InvalidArgument
    }
}

/// A managed job: a program the daemon started or adopted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// The job id, unique in a store (e.g. `famous_hopper7`, see [`super::names`]).
    pub jid: String,
    /// What it runs as.
    pub kind: JobKind,
    /// The PID of its root process (the container's init for containers), as last seen.
    pub pid: i32,
    /// Where it is in its life.
    pub state: JobState,
    /// Its exit status once it exited, when known.
    pub exit_code: Option<i32>,
    /// The command line it was started with (empty for an adopted job whose command is unknown).
    pub args: Vec<String>,
    /// Its working directory.
    pub cwd: Option<PathBuf>,
    /// The file its output goes to.
    pub log: Option<PathBuf>,
    /// Whether its standard streams are kept by the daemon so that a client can attach to them.
    pub attachable: bool,
    /// Whether it uses a GPU.
    pub gpu: bool,
    /// When the job was created, in seconds since the Unix epoch.
    pub created_at: i64,
    /// The container's id, for container jobs.
    pub container_id: Option<String>,
    /// The container runtime's state folder (runc's `--root`) for runc jobs; containerd's socket for
    /// containerd jobs.
    pub runtime_root: Option<PathBuf>,
    /// The checkpoint (its path) this job was restored from, if it was.
    pub restored_from: Option<String>,
    /// The containerd namespace, for containerd jobs.
    pub namespace: Option<String>,
    /// For a job restored from another node's checkpoint: where that checkpoint was made.
    pub origin: Option<Origin>,
    /// The user (uid) the job belongs to: root's (0) unless a user of the daemon's socket group started,
    /// adopted or restored it. Only its owner (or root) may act on it.
    #[serde(default)]
    pub owner: u32,
}

/// Where a checkpoint was made: the node (its `node_name`), and for a managed job's checkpoint the job's id
/// and the checkpoint's id in that node's job store. Kept in the checkpoint as [`ORIGIN_FILE`].
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Origin {
    pub node: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
}

/// The file of a job's checkpoint that records its [`Origin`].
pub const ORIGIN_FILE: &str = "cedana-origin.json";

impl Job {
    /// A running job created now, with nothing else known: no exit code, no working directory or log, not
    /// attachable, no GPU, no container, not restored.
    pub fn new(jid: impl Into<String>, kind: JobKind, pid: i32, args: Vec<String>) -> Self {
        Job {
            jid: jid.into(),
            kind,
            pid,
            state: JobState::Running,
            exit_code: None,
            args,
            cwd: None,
            log: None,
            attachable: false,
            gpu: false,
            created_at: unix_now(),
            container_id: None,
            runtime_root: None,
            restored_from: None,
            namespace: None,
            origin: None,
            owner: 0,
        }
    }
}

/// A checkpoint taken of a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointRecord {
    /// Its id: random, shaped like a UUID (see [`super::names::checkpoint_id`]).
    pub id: String,
    /// The job it was taken of.
    pub jid: String,
    /// When it was taken, in seconds since the Unix epoch.
    pub time: i64,
    /// Its size in bytes.
    pub size: u64,
    /// Where it is (the archive, or the folder of images).
    pub path: PathBuf,
    /// Its compression (`none`, `tar`, `gzip`, `lz4`, `zlib`, `zstd`).
    pub compression: String,
}

impl CheckpointRecord {
    /// A record with a fresh random id, taken now.
    pub fn new(jid: impl Into<String>, size: u64, path: impl Into<PathBuf>, compression: impl Into<String>) -> Self {
        CheckpointRecord {
            id: super::names::checkpoint_id(),
            jid: jid.into(),
            time: unix_now(),
            size,
            path: path.into(),
            compression: compression.into(),
        }
    }
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_states_print_and_parse() {
        for k in [JobKind::Process, JobKind::Runc, JobKind::Containerd] {
            assert_eq!(k.to_string().parse::<JobKind>().unwrap(), k);
            assert_eq!(serde_json::to_string(&k).unwrap(), format!("\"{k}\""));
        }
        for s in [JobState::Running, JobState::Exited, JobState::Halted, JobState::Lost] {
            assert_eq!(s.to_string().parse::<JobState>().unwrap(), s);
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{s}\""));
        }
        assert_eq!(JobState::Halted.to_string(), "halted");
        let e = "Running".parse::<JobState>().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert!(e.to_string().contains("job state"), "{e}");
    }

    #[test]
    fn job_serialises_round_trip() {
        let mut job = Job::new("famous_hopper7", JobKind::Runc, 42, vec!["sh".into(), "-c".into()]);
        job.cwd = Some("/srv".into());
        job.container_id = Some("c1".into());
        let text = serde_json::to_string(&job).unwrap();
        assert!(text.contains("\"kind\":\"runc\""), "{text}");
        assert_eq!(serde_json::from_str::<Job>(&text).unwrap(), job);
    }
}
