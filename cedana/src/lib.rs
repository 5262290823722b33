//! cedana: checkpoint/restore of Linux processes and containers on top of CRIU.
//!
//! The library is the engine every front end shares (the `cedana` CLI, `cedana-runc`, the containerd shim):
//! - [`engine`]: dump and restore, the only code that drives a checkpoint end to end;
//! - [`criu`]: the CRIU driver (options, hooks, logs, statistics);
//! - [`checkpoint`]: our format (manifest, checksums, atomic writes, verified extraction);
//! - [`codec`]: none | tar | gzip | lz4 | zlib | zstd, detected by content;
//! - [`procfs`]: what /proc says about a tree before we dump it;
//! - [`runc`]: the runc driver (runc containers are checkpointed through the real runc);
//! - [`config`], [`progress`], [`interrupt`], [`binary`]: settings, terminal progress, cancellation,
//!   locating external programs.

pub mod binary;
pub mod checkpoint;
pub mod codec;
pub mod config;
pub mod criu;
pub mod engine;
pub mod interrupt;
pub mod procfs;
pub mod progress;
pub mod runc;
