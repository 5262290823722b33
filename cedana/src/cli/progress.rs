//! The terminal progress bar of the CLI.

use std::io::IsTerminal;

use cedana::progress::{Advancer, Progress};

/// A terminal progress bar on stderr (only when stderr is a terminal).
pub struct Bar {
    bar: Option<indicatif::ProgressBar>,
}

impl Bar {
    /// A bar if stderr is a terminal, else a silent reporter.
    pub fn for_terminal() -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new_spinner();
            bar.enable_steady_tick(std::time::Duration::from_millis(100));
            bar
        });
        Self { bar }
    }
}

impl Progress for Bar {
    fn phase(&self, name: &str, total: Option<u64>) {
        let Some(bar) = &self.bar else { return };
        bar.reset();
        match total {
            Some(t) => {
                bar.set_length(t);
                let style = indicatif::ProgressStyle::with_template(
                    "{spinner} {msg:12} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> ");
                bar.set_style(style);
            }
            None => {
                let style = indicatif::ProgressStyle::with_template("{spinner} {msg} {bytes} {elapsed}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner());
                bar.set_style(style);
            }
        }
        bar.set_message(name.to_string());
    }
    fn advance(&self, bytes: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(bytes);
        }
    }
    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
    fn advancer(&self) -> Option<Advancer> {
        let bar = self.bar.clone()?;
        Some(Box::new(move |n| bar.inc(n)))
    }
}
