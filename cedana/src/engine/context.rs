//! The per-operation context every engine call gets from its caller: cancellation (a token the caller owns:
//! Ctrl-C in the CLI, a cancelled RPC in the daemon, a deadline), progress, and the timings of its phases.
//! Nothing in it is process-wide, so any number of operations can run at once.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::cancel::Cancel;
use crate::progress::{Progress, Silent};

/// One timed phase of an operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timing {
    /// `verify`, `criu`, `package`, `total`, ...
    pub phase: &'static str,
    pub time: Duration,
}

/// Context of one operation.
#[derive(Clone)]
pub struct OpContext {
    cancel: Cancel,
    progress: Arc<dyn Progress>,
    timings: Arc<Mutex<Vec<Timing>>>,
}

impl Default for OpContext {
    fn default() -> Self {
        Self::new()
    }
}

impl OpContext {
    /// A context with its own token, silent progress and no deadline.
    pub fn new() -> Self {
        Self { cancel: Cancel::new(), progress: Arc::new(Silent), timings: Arc::default() }
    }

    /// Use `cancel` (shared with the caller, who cancels through it).
    pub fn with_cancel(mut self, cancel: Cancel) -> Self {
        self.cancel = cancel;
        self
    }

    /// Report progress to `progress`.
    pub fn with_progress(mut self, progress: Arc<dyn Progress>) -> Self {
        self.progress = progress;
        self
    }

    /// The operation's cancellation token.
    pub fn cancel(&self) -> &Cancel {
        &self.cancel
    }

    /// Whether the caller cancelled (or the deadline passed).
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Where progress goes.
    pub fn progress(&self) -> &dyn Progress {
        self.progress.as_ref()
    }

    /// Record the time a phase took (a phase recorded twice is summed).
    pub fn record(&self, phase: &'static str, time: Duration) {
        let Ok(mut t) = self.timings.lock() else { return };
        match t.iter_mut().find(|t| t.phase == phase) {
            Some(existing) => existing.time += time,
            None => t.push(Timing { phase, time }),
        }
    }

    /// The phases timed so far, in the order they were first recorded.
    pub fn timings(&self) -> Vec<Timing> {
        self.timings.lock().map(|t| t.clone()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_are_recorded_in_order_and_summed() {
        let ctx = OpContext::new();
        ctx.record("criu", Duration::from_millis(5));
        ctx.record("package", Duration::from_millis(2));
        ctx.record("criu", Duration::from_millis(1));
        let t = ctx.timings();
        assert_eq!(t[0], Timing { phase: "criu", time: Duration::from_millis(6) });
        assert_eq!(t[1].phase, "package");
        let cancel = Cancel::new();
        let ctx = OpContext::new().with_cancel(cancel.clone());
        cancel.cancel();
        assert!(ctx.is_cancelled());
    }
}
