//! The engine: the only code that checkpoints or restores. A front end (the CLI, the daemon, the shim,
//! `cedana-runc`) builds one [`Engine`] per process, turns its own input into a [`DumpRequest`] or
//! [`RestoreRequest`], calls [`Engine::dump`] / [`Engine::restore`] with an [`OpContext`] of its own, and
//! renders the outcome or the error (whose [`EngineError::kind`] maps onto its wire codes).
//!
//! - [`dump`], [`restore`]: the two pipelines, the same for every target;
//! - [`targets`]: process and runc (what a workload is, how it is frozen, finished or rolled back);
//! - [`location`]: destinations and sources (a folder, a file, a caller's writer; object stores to come);
//! - [`context`]: cancellation, progress and timings of one operation;
//! - [`hooks`]: work run before and after CRIU (a user command, the GPU's state: see [`crate::gpu`]);
//! - [`error`]: errors with their kinds.

pub mod context;
pub mod dump;
pub mod error;
pub mod hooks;
pub(crate) mod lazy;
pub mod leftovers;
pub mod location;
pub mod netlock;
#[cfg(feature = "storage")]
pub(crate) mod remote;
pub mod restore;
pub(crate) mod stream;
pub mod targets;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::{Config, CriuDriverKind};
use crate::criu::cli::CliDriver;
use crate::criu::swrk::SwrkDriver;
use crate::criu::{Criu, CriuDriver};
use crate::runc::{ContainerRuntime, Runc, RuncError};

pub use context::{OpContext, Timing};
pub use dump::{Attachment, DumpOutcome, DumpRequest};
pub use error::EngineError;
pub use hooks::{Hook, HookContext, HookPoint, Hooks};
pub use lazy::LazyTransfer;
pub use location::{Destination, Source};
pub use restore::{wait_for_exit, ProcessRestoreOptions, RestoreOutcome, RestoreRequest, RestoreStdio};
pub use targets::runc::{ContainerRestore, RuncSpec};
pub use targets::TargetSpec;

/// Makes the container runtime client for a state folder (`--root`; the runtime's default when `None`).
pub type RuntimeFactory = dyn Fn(Option<&Path>) -> Result<Arc<dyn ContainerRuntime>, RuncError> + Send + Sync;

/// The engine: CRIU driver, container runtime client, hooks, scratch space and configuration, set up once.
/// Cheap to clone and share between threads; any number of operations may run on it at once.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    criu: Arc<dyn CriuDriver>,
    criu_version: String,
    runtimes: Arc<RuntimeFactory>,
    hooks: Hooks,
    scratch: PathBuf,
}

impl Engine {
    /// Set up an engine from the configuration: locate CRIU and check its version, pick the CRIU driver,
    /// and build the hooks it names.
    pub fn new(config: Config) -> Result<Self, EngineError> {
        let criu = Criu::locate(config.criu.binary_path.as_deref())?;
        let version = criu.supported_version()?;
        leftovers::sweep_config(&config);
        let driver: Arc<dyn CriuDriver> = match config.criu_driver() {
            CriuDriverKind::Cli => Arc::new(CliDriver::new(criu)),
            CriuDriverKind::Swrk => Arc::new(SwrkDriver::new(criu)),
        };
        Ok(Self::builder(config, driver, version).build())
    }

    /// An engine from parts (tests give fakes of the CRIU driver and the runtime).
    pub fn builder(config: Config, criu: Arc<dyn CriuDriver>, criu_version: String) -> EngineBuilder {
        let mut hooks = Hooks::default();
        if let Some(cmd) = &config.hooks.command {
            hooks.push(Arc::new(hooks::CommandHook::new(cmd)));
        }
        // After the user's command: it runs before the GPU is locked and after it is given back.
        let gpu = config.gpu_settings();
        if gpu.backend != crate::gpu::BackendChoice::Off {
            hooks.push(Arc::new(crate::gpu::GpuHook::new(gpu)));
        }
        let scratch = config.scratch_dir();
        EngineBuilder {
            inner: Inner {
                config,
                criu,
                criu_version,
                runtimes: Arc::new(|root: Option<&Path>| {
                    Ok(Arc::new(Runc::locate(root.map(Path::to_path_buf))?) as Arc<dyn ContainerRuntime>)
                }),
                hooks,
                scratch,
            },
        }
    }

    /// Checkpoint what `req` names.
    pub fn dump(&self, req: DumpRequest, ctx: &OpContext) -> Result<DumpOutcome, EngineError> {
        dump::run(self, req, &[], ctx)
    }

    /// [`Engine::dump`], adding the caller's files to the checkpoint (see [`Attachment`]).
    pub fn dump_attaching(
        &self,
        req: DumpRequest,
        attachments: &[Attachment],
        ctx: &OpContext,
    ) -> Result<DumpOutcome, EngineError> {
        dump::run(self, req, attachments, ctx)
    }

    /// Verify and restore the checkpoint `req` names.
    pub fn restore(&self, req: RestoreRequest, ctx: &OpContext) -> Result<RestoreOutcome, EngineError> {
        restore::run(self, req, ctx)
    }

    /// The configuration the engine was built from.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The CRIU driver.
    pub fn criu(&self) -> &dyn CriuDriver {
        self.inner.criu.as_ref()
    }

    /// The version of the CRIU driven.
    pub fn criu_version(&self) -> &str {
        &self.inner.criu_version
    }

    /// The container runtime client for state folder `root`.
    pub fn runtime(&self, root: Option<&Path>) -> Result<Arc<dyn ContainerRuntime>, EngineError> {
        Ok((self.inner.runtimes)(root)?)
    }

    /// The hooks run around CRIU.
    pub fn hooks(&self) -> &Hooks {
        &self.inner.hooks
    }

    /// Where archives are extracted and staged.
    pub fn scratch_dir(&self) -> PathBuf {
        self.inner.scratch.clone()
    }
}

/// Builds an [`Engine`] from parts.
pub struct EngineBuilder {
    inner: Inner,
}

impl EngineBuilder {
    /// Use `factory` to make container runtime clients.
    pub fn runtimes(mut self, factory: Arc<RuntimeFactory>) -> Self {
        self.inner.runtimes = factory;
        self
    }

    /// Add a hook after those the configuration names.
    pub fn hook(mut self, hook: Arc<dyn Hook>) -> Self {
        self.inner.hooks.push(hook);
        self
    }

    /// Stage and extract under `dir`.
    pub fn scratch(mut self, dir: PathBuf) -> Self {
        self.inner.scratch = dir;
        self
    }

    pub fn build(self) -> Engine {
        Engine { inner: Arc::new(self.inner) }
    }
}

#[cfg(test)]
mod fakes;
#[cfg(test)]
mod tests;
