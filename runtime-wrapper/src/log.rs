//! Logging the way runc does, so that containerd and dockerd read our messages like runc's: JSON lines
//! (`{"level":"error","msg":"...","time":"..."}`) or logrus text lines into `--log`, and on a fatal error the
//! bare message on stderr too (a logrus text line when there is no `--log`).

use std::io::Write;
use std::path::PathBuf;

use crate::args::LogFormat;

/// Where and how to log.
#[derive(Debug, Clone, Default)]
pub struct RuncLog {
    pub file: Option<PathBuf>,
    pub format: LogFormat,
    /// `--debug`: informational lines go to stderr too when there is no log file (else only errors do).
    pub debug: bool,
}

impl RuncLog {
    /// One line at `level` (`info`, `error`, ...): into the log file, or on stderr without one.
    pub fn line(&self, level: &str, msg: &str) {
        let line = format_line(self.format, level, msg, &now());
        match &self.file {
            Some(path) => {
                let written = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .and_then(|mut f| f.write_all(line.as_bytes()));
                if let Err(e) = written {
                    eprintln!("cedana-runc: cannot write to log {}: {e}", path.display());
                }
            }
            None => eprint!("{}", format_line(LogFormat::Text, level, msg, &now())),
        }
    }

    /// An informational line (timings): into the log file; on stderr only with `--debug`, as runc does.
    pub fn info(&self, msg: &str) {
        if self.file.is_some() || self.debug {
            self.line("info", msg);
        }
    }

    /// A fatal error, as runc reports it: in the log, and on stderr.
    pub fn fatal(&self, msg: &str) {
        self.line("error", msg);
        if self.file.is_some() {
            eprintln!("{msg}");
        }
    }
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// One log line, newline included, in logrus's JSON or text layout.
pub fn format_line(format: LogFormat, level: &str, msg: &str, time: &str) -> String {
    match format {
        LogFormat::Json => {
            // Serializing a map of strings cannot fail.
            let obj = serde_json::json!({ "level": level, "msg": msg, "time": time });
            format!("{}\n", serde_json::to_string(&obj).unwrap_or_default())
        }
        LogFormat::Text => format!("time={time:?} level={level} msg={}\n", go_quote(msg)),
    }
}

/// Quote like Go's `%q` for the characters that matter in a message.
fn go_quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_look_like_runcs() {
        assert_eq!(
            format_line(LogFormat::Json, "error", "boom \"x\"", "2026-01-01T00:00:00Z"),
            "{\"level\":\"error\",\"msg\":\"boom \\\"x\\\"\",\"time\":\"2026-01-01T00:00:00Z\"}\n"
        );
        assert_eq!(
            format_line(LogFormat::Text, "error", "a\nb", "2026-01-01T00:00:00Z"),
            "time=\"2026-01-01T00:00:00Z\" level=error msg=\"a\\nb\"\n"
        );
    }

    #[test]
    fn the_json_log_file_gets_appended_lines() {
        let dir = tempfile::tempdir().unwrap();
        let log = RuncLog { file: Some(dir.path().join("log.json")), format: LogFormat::Json, debug: false };
        log.info("one");
        log.line("error", "two");
        let text = std::fs::read_to_string(dir.path().join("log.json")).unwrap();
        let levels: Vec<String> =
            text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["level"].to_string()).collect();
        assert_eq!(levels, ["\"info\"", "\"error\""]);
    }
}
