//! Progress reporting for long operations (the CLI draws a bar on a terminal; other front ends report it
//! their own way, or not at all).

/// Advances the current phase from another thread.
pub type Advancer = Box<dyn Fn(u64) + Send + Sync>;

/// Receives progress of the engine's long phases.
pub trait Progress: Send + Sync {
    /// A new phase; `total` bytes if known.
    fn phase(&self, name: &str, total: Option<u64>);
    /// `bytes` more processed.
    fn advance(&self, bytes: u64);
    /// The operation ended.
    fn finish(&self);
    /// A handle that advances the current phase from a thread of its own (none when nothing is shown).
    fn advancer(&self) -> Option<Advancer> {
        None
    }
}

/// Reports nothing.
pub struct Silent;

impl Progress for Silent {
    fn phase(&self, _: &str, _: Option<u64>) {}
    fn advance(&self, _: u64) {}
    fn finish(&self) {}
}
