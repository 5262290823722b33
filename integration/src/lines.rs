//! Lines read from a pipe by a background thread (a container's stdout, which must be a pipe: CRIU cannot
//! dump a container whose stdout is a file on the host).

use std::io::{BufRead, BufReader, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The lines read so far from one pipe, and whether it reached end of file.
#[derive(Clone)]
pub struct Lines {
    lines: Arc<Mutex<Vec<String>>>,
    closed: Arc<AtomicBool>,
}

impl Lines {
    /// Read `pipe` line by line in a background thread.
    pub fn read(pipe: impl Read + Send + 'static) -> Lines {
        let lines = Lines { lines: Arc::default(), closed: Arc::default() };
        let l = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                match line {
                    Ok(line) => l.lines.lock().unwrap_or_else(|e| e.into_inner()).push(line),
                    Err(_) => break,
                }
            }
            l.closed.store(true, Ordering::SeqCst);
        });
        lines
    }

    /// The lines so far.
    pub fn snapshot(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Wait (up to `timeout`) until there are at least `n` lines.
    pub fn wait_for(&self, n: usize, timeout: Duration) -> Vec<String> {
        crate::wait_for(&format!("{n} lines of output (have {:?})", self.tail()), timeout, || {
            let l = self.snapshot();
            (l.len() >= n).then_some(l)
        })
    }

    /// Wait (up to `timeout`) until the lines hold at least `n` numbers (the counter's), and return them.
    pub fn wait_numbers(&self, n: usize, timeout: Duration) -> Vec<u64> {
        crate::wait_for(&format!("{n} numbers of output (have {:?})", self.tail()), timeout, || {
            let l = numbers(&self.snapshot());
            (l.len() >= n).then_some(l)
        })
    }

    /// Wait (up to `timeout`) until a line satisfies `f`, and return it.
    pub fn wait_line(&self, what: &str, timeout: Duration, f: impl Fn(&str) -> bool) -> String {
        crate::wait_for(what, timeout, || self.snapshot().into_iter().find(|l| f(l)))
    }

    /// Wait (up to `timeout`) for end of file: every writer of the pipe is gone.
    pub fn wait_closed(&self, timeout: Duration) -> Vec<String> {
        crate::wait_for("the pipe to close", timeout, || self.closed.load(Ordering::SeqCst).then_some(()));
        self.snapshot()
    }

    fn tail(&self) -> Vec<String> {
        let l = self.snapshot();
        l[l.len().saturating_sub(3)..].to_vec()
    }
}

/// The numbers among `lines` (the counter's output).
pub fn numbers(lines: &[String]) -> Vec<u64> {
    lines.iter().filter_map(|l| l.trim().parse().ok()).collect()
}
