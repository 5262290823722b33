//! Cancellation owned by the caller of an operation: a Ctrl-C in the CLI, a cancelled RPC in the daemon, a
//! deadline. Long operations poll [`Cancel::is_cancelled`] at points where stopping is safe (the engine never
//! abandons CRIU while it holds a process frozen). Nothing here is process-wide: every operation has its own.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A cancellation token: cheap to clone, shared by every thread of one operation.
#[derive(Debug, Clone, Default)]
pub struct Cancel {
    flag: Arc<AtomicBool>,
    deadline: Option<Instant>,
}

impl Cancel {
    /// A token that is never cancelled unless [`Cancel::cancel`] is called.
    pub fn new() -> Self {
        Self::default()
    }

    /// The same token, also cancelled once `timeout` has passed from now.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        let at = Instant::now() + timeout;
        self.deadline = Some(self.deadline.map_or(at, |d| d.min(at)));
        self
    }

    /// Request cancellation (every clone sees it).
    pub fn cancel(&self) {
        self.flag.store(true, Ordering::SeqCst);
    }

    /// Whether the operation should stop at its next safe point.
    pub fn is_cancelled(&self) -> bool {
        self.flag.load(Ordering::SeqCst) || self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    /// Whether the deadline (rather than [`Cancel::cancel`]) is what cancelled it.
    pub fn timed_out(&self) -> bool {
        !self.flag.load(Ordering::SeqCst) && self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    /// The shared flag, for code that polls a plain atomic (signal handlers set it).
    pub fn flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.flag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_the_flag_and_deadlines_expire() {
        let c = Cancel::new();
        let other = c.clone();
        assert!(!other.is_cancelled());
        c.cancel();
        assert!(other.is_cancelled() && !other.timed_out());
        let t = Cancel::new().with_timeout(Duration::from_millis(1));
        std::thread::sleep(Duration::from_millis(5));
        assert!(t.is_cancelled() && t.timed_out());
        assert!(!Cancel::new().with_timeout(Duration::from_secs(60)).is_cancelled());
    }
}
