//! Cancellation by signal. Front ends call [`install`]; long operations poll [`requested`] at points where
//! stopping is safe (the engine never abandons CRIU while it holds a process frozen).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

static REQUESTED: AtomicBool = AtomicBool::new(false);

/// Route SIGINT, SIGTERM and SIGHUP to the cancellation flag instead of killing the process.
pub fn install() -> std::io::Result<()> {
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM, signal_hook::consts::SIGHUP] {
        signal_hook::flag::register(sig, Arc::clone(&flag))?;
    }
    std::thread::Builder::new().name("signals".into()).spawn(move || loop {
        if flag.load(Ordering::Relaxed) {
            REQUESTED.store(true, Ordering::SeqCst);
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    })?;
    Ok(())
}

/// Whether a cancellation was requested.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// Request cancellation (tests, and front ends with their own signal handling).
pub fn request() {
    REQUESTED.store(true, Ordering::SeqCst);
}
