//! `containerd-shim-cedana-v2`: a containerd shim (task API v2) that runs containers through a
//! runc-compatible runtime (`cedana-runc` by default). Layout:
//! - [`shim`]: containerd's `start` / `delete` commands and the wiring of the served Task service;
//! - [`service`]: the ttrpc Task service, a thin adapter over [`task`];
//! - [`task`]: the task logic and state machine (no ttrpc context; unit-tested with a stub runtime);
//! - [`runtime`]: the [`runtime::Runtime`] trait and the runc-compatible binary behind it;
//! - [`reaper`]: exit collection by PID for a subreaper; [`events`]: task events to containerd;
//! - [`oom`]: OOM notifications of cgroup v1 memory cgroups, published as TaskOOM;
//! - [`options`]: runtime options from Create requests; [`error`]: error kinds and their ttrpc codes;
//! - [`stats`]: the runtime's statistics as containerd's cgroup v1 metrics;
//! - [`console`]: terminals: the console socket a runtime sends them to, and the copying to the FIFOs;
//! - [`on_stop`]: checkpoint-on-stop (the `io.cedana.checkpoint-on-stop` annotation).

pub mod console;
pub mod error;
pub mod events;
pub mod on_stop;
pub mod oom;
pub mod options;
pub mod reaper;
pub mod runtime;
pub mod service;
pub mod shim;
pub mod stats;
pub mod task;
