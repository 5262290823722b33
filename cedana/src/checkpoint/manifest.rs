//! The manifest: our own record of a checkpoint, written last (a checkpoint without one is incomplete).

use std::path::PathBuf;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::digest::FileDigest;
use super::external::ExternalFile;
use super::mounts::ExternalMount;
use crate::codec::Compression;
use crate::criu::options::CriuOptions;
use crate::criu::stats::DumpStats;

/// Version of the checkpoint layout this build writes; it reads this version only.
pub const FORMAT_VERSION: u32 = 1;
/// File name of the manifest inside a checkpoint.
pub const MANIFEST_NAME: &str = "manifest.json";

/// What was checkpointed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckpointKind {
    Process,
    Runc,
    Containerd,
}

impl std::fmt::Display for CheckpointKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CheckpointKind::Process => "process",
            CheckpointKind::Runc => "runc",
            CheckpointKind::Containerd => "containerd",
        })
    }
}

/// The dumped process tree, as seen at dump time.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProcessInfo {
    /// PID of the root of the tree.
    pub pid: i32,
    /// Every PID of the tree (CRIU restores them all with the same numbers).
    pub pids: Vec<i32>,
    pub cmdline: Vec<String>,
    pub comm: String,
    pub exe: String,
    pub cwd: String,
    /// Standard streams of the root that were pipes, restored onto the restoring caller's own stdio.
    #[serde(default)]
    pub stdio_pipes: Vec<StdioPipe>,
}

/// One standard stream (0, 1 or 2) of the dumped root that was a pipe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StdioPipe {
    pub fd: i32,
    /// CRIU's name of the resource, e.g. `pipe:[12345]`.
    pub resource: String,
}

/// A container around the dumped tree (runc and containerd checkpoints).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ContainerInfo {
    pub id: String,
    #[serde(default)]
    pub bundle: Option<PathBuf>,
    #[serde(default)]
    pub root: Option<PathBuf>,
    /// The OCI config.json of the container, if it was saved.
    #[serde(default)]
    pub config: Option<serde_json::Value>,
    /// Files the container's processes held open outside the container's mounts (e.g. its stdout redirected
    /// to a file on the host), which a restore reconnects (absent from older checkpoints: none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub external_files: Vec<ExternalFile>,
    /// Bind mounts of host files that the container's spec does not have (made by a runtime hook such as
    /// NVIDIA's legacy one), external to CRIU; a restore binds each host file again (absent from older
    /// checkpoints: none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub external_mounts: Vec<ExternalMount>,
}

/// Everything we know about a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub kind: CheckpointKind,
    pub created_at: DateTime<Utc>,
    pub hostname: String,
    pub cedana_version: String,
    pub criu_version: String,
    pub compression: Compression,
    pub process: ProcessInfo,
    #[serde(default)]
    pub container: Option<ContainerInfo>,
    /// Options the dump used that a restore must repeat (applied at restore without the user asking).
    pub criu_options: CriuOptions,
    /// CRIU's own dump statistics.
    #[serde(default)]
    pub stats: Option<DumpStats>,
    /// Checksum algorithm of `files`.
    pub checksum: String,
    /// Every file of the checkpoint but the manifest, with size and checksum.
    pub files: Vec<FileDigest>,
    /// Where in an archive the entries written before their size was known (page images) start: the
    /// offset of the unit holding their tar header, for readers that seek (see [`super::index`]). Empty
    /// for folders and streams, and in checkpoints of older versions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub placement: Vec<Placed>,
    /// Whether the images were streamed from CRIU into the archive (no image file was written).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub streamed: bool,
    /// The GPU state the checkpoint holds (CUDA processes, their GPUs, driver and CUDA versions), for the
    /// restoring host's check; absent when no process of the tree used a GPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<crate::gpu::GpuRecord>,
    /// The dump's own phases as far as they were known when the manifest was written (hooks, GPU, and
    /// `write` = from CRIU's start until every image was written, compressed and handed to the
    /// destination); CRIU's freeze, frozen and memory-dump times are in `stats`. What an upload does after
    /// the manifest (its last parts) is not in it. Empty in checkpoints of older versions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub phases: Vec<PhaseTime>,
}

/// One phase of a dump and how long it took.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhaseTime {
    pub phase: String,
    pub ms: f64,
}

/// An archive entry's position in the archive file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placed {
    pub name: String,
    /// Byte offset of the self-contained unit holding the entry's tar header; its data follows.
    pub offset: u64,
    /// When the data is a run of self-contained units of one checksum chunk each (8 MiB of the entry, the
    /// last one shorter; lz4, gzip, zlib and zstd): their compressed sizes, in order. The first starts right after the
    /// header's unit, so any chunk of the entry can be read and verified on its own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub units: Vec<u64>,
}

impl Manifest {
    /// Total size of the image files.
    pub fn images_size(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    /// Serialize as pretty JSON.
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing plain data structs with string keys cannot fail.
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }
}
