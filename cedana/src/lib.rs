//! cedana: checkpoint/restore of Linux processes and containers on top of CRIU.
//!
//! The library is the engine every front end shares (the `cedana` CLI, `cedana-runc`, the containerd shim,
//! the daemon). A front end builds one [`engine::Engine`], turns its input into a request, and renders the
//! outcome:
//! - [`engine`]: the dump and restore pipelines, targets (process, runc), destinations and sources, the
//!   per-operation context, hooks, errors with kinds;
//! - [`criu`]: the CRIU drivers (`criu swrk` RPC, or the command line with action scripts), options, logs,
//!   statistics;
//! - [`checkpoint`]: our format (manifest, checksums, archive writer over any sink, verified reader);
//! - [`codec`]: none | tar | gzip | lz4 | zlib | zstd, detected by content;
//! - [`runc`]: the container runtime client (the real runc);
//! - [`storage`] (feature `storage`): checkpoint archives in object stores (S3, GCS): an upload sink and a
//!   ranged-read source;
//! - [`gpu`]: GPU-aware checkpoint/restore of CUDA processes (NVIDIA's checkpoint API as an engine hook);
//! - [`procfs`]: what /proc says about a tree before we dump it;
//! - [`config`], [`cancel`], [`progress`], [`error`], [`binary`]: settings, cancellation tokens, progress
//!   reporting, error kinds, locating external programs.
//!
//! Argument parsing, tables and progress bars belong to the binaries (the `cli` feature).

pub mod binary;
pub mod cancel;
pub mod checkpoint;
pub mod codec;
pub mod config;
pub mod criu;
pub mod engine;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod gpu;
#[cfg(feature = "jobs")]
pub mod jobs;
pub mod procfs;
pub mod progress;
pub mod runc;
#[cfg(feature = "storage")]
pub mod storage;
