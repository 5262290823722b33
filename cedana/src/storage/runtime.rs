//! The tokio runtime the object stores' async clients run on, owned by this module.
//!
//! Sinks and sources are synchronous (called from the checkpoint writer's and the restore's ordinary
//! threads): each call hands its future to this runtime and waits for the result. Waiting blocks the calling
//! thread, so these calls belong on ordinary threads (or tokio's `spawn_blocking`), never inside an async
//! task: there they would block one of the caller's runtime workers for the duration of a request. They do
//! not panic there, since the work itself runs on this module's own runtime.

use std::future::Future;
use std::sync::OnceLock;

use tokio::runtime::{Builder, Handle, Runtime};
use tokio::task::JoinHandle;

use super::StorageError;

/// Worker threads of the storage runtime: requests are I/O-bound, two keep several uploads moving.
const WORKERS: usize = 2;

static RUNTIME: OnceLock<Runtime> = OnceLock::new();

/// The storage runtime's handle, creating the runtime on first use.
pub(crate) fn handle() -> Result<Handle, StorageError> {
    if let Some(rt) = RUNTIME.get() {
        return Ok(rt.handle().clone());
    }
    let rt = Builder::new_multi_thread()
        .worker_threads(WORKERS)
        .thread_name("cedana-storage")
        .enable_all()
        .build()
        .map_err(|e| StorageError::Config { detail: format!("cannot start the storage runtime's threads: {e}") })?;
    // Another thread may have won the race: its runtime is used, ours is dropped (not in an async context:
    // the caller is an ordinary thread, see the module's doc).
    if let Err(extra) = RUNTIME.set(rt) {
        extra.shutdown_background();
    }
    RUNTIME.get().map(|rt| rt.handle().clone()).ok_or_else(|| StorageError::Config { detail: "no storage runtime".into() })
}

/// Start `fut` on the storage runtime, without waiting for it.
pub(crate) fn spawn<F>(fut: F) -> Result<JoinHandle<F::Output>, StorageError>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    Ok(handle()?.spawn(fut))
}

/// Run `fut` on the storage runtime and wait for its result from this (ordinary) thread.
pub(crate) fn run<F, T>(fut: F) -> Result<T, StorageError>
where
    F: Future<Output = Result<T, StorageError>> + Send + 'static,
    T: Send + 'static,
{
    wait(spawn(fut)?)
}

/// Wait for a task of the storage runtime from an ordinary thread.
pub(crate) fn wait<T>(task: JoinHandle<Result<T, StorageError>>) -> Result<T, StorageError> {
    match futures::executor::block_on(task) {
        Ok(res) => res,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => Err(StorageError::Other { url: "<storage runtime>".into(), detail: "the request was cancelled".into() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_from_plain_threads_and_from_inside_another_runtime() {
        assert_eq!(run(async { Ok(7) }).unwrap(), 7);
        let handles: Vec<_> = (0..4).map(|i| std::thread::spawn(move || run(async move { Ok(i * 2) }).unwrap())).collect();
        let sum: i32 = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(sum, 12);
        // A caller's own runtime (a daemon): blocking there is discouraged, but neither panics nor deadlocks.
        let other = Builder::new_current_thread().enable_all().build().unwrap();
        let got = other.block_on(async { run(async { Ok("inside") }) }).unwrap();
        assert_eq!(got, "inside");
        let from_blocking = other.block_on(async { tokio::task::spawn_blocking(|| run(async { Ok(1) })).await.unwrap() });
        assert_eq!(from_blocking.unwrap(), 1);
    }
}
