//! What every restore command prints (`restore process`, `restore runc`, `restore job`, local or through
//! the daemon): one [`Restored`], rendered by [`render`]. Text: a headline (with the verification's and
//! CRIU's times when profiling is on) and the timings tree when profiling is on; JSON: one object.
//!
//! A restore whose program shares this command's stdout (an attached restore, or a runc container, which
//! inherits it) reports on stderr instead, so the program's output stays its own.

use std::time::Duration;

use cedana::checkpoint::CheckpointKind;
use cedana::engine::{RestoreOutcome, Timing};
use serde_json::json;

use super::ms;
use super::output::{self, Format, Report};
use super::timings::{Operation, Timings};

/// What a restore's report shows.
pub struct Restored<'a> {
    /// PID of the restored root (0 when an attached container has exited already).
    pub pid: i32,
    pub comm: &'a str,
    /// The checkpoint as the command named it.
    pub path: Option<&'a str>,
    pub kind: CheckpointKind,
    /// Id of the restored container, and of the container the checkpoint was taken of.
    pub container: Option<(&'a str, &'a str)>,
    /// The job's id, for `restore job`.
    pub job: Option<&'a str>,
    /// The container's exit code, for attached container restores.
    pub exit_code: Option<i32>,
    pub verify: Duration,
    pub criu: Duration,
    /// For a lazy restore: when the program ran (from the start of the restore) and when its memory was wholly
    /// local, and the pages served.
    pub lazy: Option<Lazy>,
    pub timings: Timings,
}

/// The two times of a lazy restore.
#[derive(Debug, Clone, Copy)]
pub struct Lazy {
    pub running_after: Duration,
    pub local_after: Duration,
    pub pages: u64,
    /// Of them, those brought first in the order an earlier restore saw the program touch them (not
    /// known of a daemon's restore).
    pub ordered: Option<u64>,
}

impl<'a> Restored<'a> {
    /// The report of a restore run in this process from `path`, with the phases its context recorded.
    pub fn of_outcome(out: &'a RestoreOutcome, path: &'a str, recorded: &[Timing]) -> Restored<'a> {
        let kind = out.manifest.kind;
        Restored {
            pid: out.pid,
            comm: &out.manifest.process.comm,
            path: Some(path),
            kind,
            container: None,
            job: None,
            exit_code: out.exit_code,
            verify: out.verify_time,
            criu: out.criu_time,
            lazy: out.lazy.map(|l| {
                let total = recorded.iter().find(|t| t.phase == "total").map(|t| t.time).unwrap_or_default();
                let (local_after, ordered) = (total, Some(l.ordered));
                Lazy { running_after: total.saturating_sub(l.time), local_after, pages: l.pages, ordered }
            }),
            timings: Timings::of_phases(recorded, kind, Operation::Restore, None),
        }
    }

    /// The report of a process restore the daemon ran, from the times its response carries; `round_trip`,
    /// the call as this command measured it, is the total.
    pub fn of_daemon(pid: i32, comm: &'a str, verify_us: u64, criu_us: u64, round_trip: Duration) -> Restored<'a> {
        let (verify, criu) = (Duration::from_micros(verify_us), Duration::from_micros(criu_us));
        let recorded = [
            Timing { phase: "verify", time: verify },
            Timing { phase: "criu", time: criu },
            Timing { phase: "total", time: round_trip },
        ];
        Restored {
            pid,
            comm,
            path: None,
            kind: CheckpointKind::Process,
            container: None,
            job: None,
            exit_code: None,
            verify,
            criu,
            lazy: None,
            timings: Timings::of_phases(&recorded, CheckpointKind::Process, Operation::Restore, None),
        }
    }
}

impl Restored<'_> {
    /// The same report of a daemon's restore that was lazy: its memory was wholly local `lazy_us` after the
    /// program started (the end of the call), `pages` pages served.
    pub fn with_lazy(mut self, lazy_us: u64, pages: u64) -> Self {
        if lazy_us == 0 && pages == 0 {
            return self;
        }
        let lazy = Duration::from_micros(lazy_us);
        let total = self.timings.total;
        self.lazy = Some(Lazy { running_after: total.saturating_sub(lazy), local_after: total, pages, ordered: None });
        let recorded = [
            Timing { phase: "verify", time: self.verify },
            Timing { phase: "criu", time: self.criu },
            Timing { phase: "lazy pages", time: lazy },
            Timing { phase: "total", time: total },
        ];
        self.timings = Timings::of_phases(&recorded, self.kind, Operation::Restore, None);
        self
    }
}

/// Where a report goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    /// For restores whose program writes to this command's stdout.
    Stderr,
}

/// Print the report of a restore on `stream`.
pub fn print(r: &Restored<'_>, report: Report, stream: Stream) {
    super::quiet_on_broken_pipe();
    let text = render(r, report);
    match stream {
        Stream::Stdout => print!("{text}"),
        Stream::Stderr => eprint!("{text}"),
    }
}

/// The report of a restore: text or JSON (see the module's documentation).
pub fn render(r: &Restored<'_>, report: Report) -> String {
    match report.format {
        Format::Json => output::json_line(&to_json(r)),
        Format::Text => {
            let phase = match r.kind {
                CheckpointKind::Process => "criu",
                CheckpointKind::Runc => "runc restore",
                CheckpointKind::Containerd => "containerd restore",
            };
            let times = match report.profiling {
                true => format!(" (verify {}, {phase} {})", ms(r.verify), ms(r.criu)),
                false => String::new(),
            };
            let from = r.path.map(|p| format!(" from {p}")).unwrap_or_default();
            let headline = match (r.job, r.container) {
                (Some(jid), _) => format!("Restored job {jid} as PID {}{times}", r.pid),
                (None, Some((id, of))) => format!("Restored container {id} (checkpoint of {of}){from}{times}"),
                (None, None) => format!("Restored PID {} ({}){from}{times}", r.pid, r.comm),
            };
            let lazy = r
                .lazy
                .map(|l| {
                    let ordered = match l.ordered {
                        Some(n) if n > 0 => format!(", {n} of them in a recorded order"),
                        _ => String::new(),
                    };
                    format!(
                        "Running after {}, wholly local after {} ({} pages served lazily{ordered})\n",
                        ms(l.running_after),
                        ms(l.local_after),
                        l.pages
                    )
                })
                .unwrap_or_default();
            format!("{headline}\n{lazy}{}", report.timings_text(&r.timings))
        }
    }
}

/// The whole result as one JSON object.
fn to_json(r: &Restored<'_>) -> serde_json::Value {
    json!({
        "pid": r.pid,
        "comm": r.comm,
        "path": r.path,
        "kind": r.kind.to_string(),
        "container_id": r.container.map(|(id, _)| id),
        "checkpoint_container_id": r.container.map(|(_, of)| of),
        "job_id": r.job,
        "exit_code": r.exit_code,
        "lazy": r.lazy.map(|l| {
            let mut v = json!({
                "running_after_ms": super::timings::millis(l.running_after),
                "local_after_ms": super::timings::millis(l.local_after),
                "pages": l.pages,
            });
            if let Some(n) = l.ordered {
                v["ordered_pages"] = json!(n);
            }
            v
        }),
        "timings_ms": output::timings_json(&r.timings),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn restored() -> Restored<'static> {
        let mut r = Restored::of_daemon(42, "counter", 3_000, 20_000, Duration::from_millis(25));
        r.path = Some("/tmp/c.tar");
        r
    }

    #[test]
    fn the_headline_keeps_its_times_with_profiling_and_the_tree_follows() {
        let on = render(&restored(), Report { format: Format::Text, profiling: true });
        let mut lines = on.lines();
        assert_eq!(lines.next(), Some("Restored PID 42 (counter) from /tmp/c.tar (verify 3.0 ms, criu 20.0 ms)"), "{on}");
        assert_eq!(lines.next(), Some("timings"), "{on}");
        assert!(on.contains("├─ criu restore ") && on.contains("├─ other "), "{on}");
        assert!(on.lines().last().is_some_and(|l| l.starts_with("└─ total ") && l.ends_with(" 25.0 ms")), "{on}");
        let off = render(&restored(), Report { format: Format::Text, profiling: false });
        assert_eq!(off, "Restored PID 42 (counter) from /tmp/c.tar\n");
    }

    #[test]
    fn jobs_and_containers_have_their_own_headline() {
        let mut r = restored();
        r.job = Some("j1");
        let t = render(&r, Report { format: Format::Text, profiling: false });
        assert_eq!(t, "Restored job j1 as PID 42\n");
        r.job = None;
        r.kind = CheckpointKind::Runc;
        r.container = Some(("copy", "orig"));
        let t = render(&r, Report { format: Format::Text, profiling: true });
        assert!(
            t.starts_with("Restored container copy (checkpoint of orig) from /tmp/c.tar (verify 3.0 ms, runc restore 20.0 ms)\n"),
            "{t}"
        );
    }

    #[test]
    fn a_lazy_restore_says_when_the_program_ran_and_when_its_memory_was_local() {
        let r = restored().with_lazy(15_000, 4096);
        let text = render(&r, Report { format: Format::Text, profiling: true });
        assert!(text.contains("\nRunning after 10.0 ms, wholly local after 25.0 ms (4096 pages served lazily)\n"), "{text}");
        assert!(text.contains("├─ lazy pages "), "{text}");
        let v: serde_json::Value = serde_json::from_str(&render(&r, Report { format: Format::Json, profiling: true })).unwrap();
        assert_eq!(v["lazy"], json!({"running_after_ms": 10.0, "local_after_ms": 25.0, "pages": 4096}));
        assert_eq!(v["timings_ms"]["lazy pages"], 15.0);
        assert!(restored().with_lazy(0, 0).lazy.is_none(), "not lazy: nothing changes");
    }

    #[test]
    fn json_is_one_object_with_the_whole_result() {
        let mut r = restored();
        r.job = Some("j1");
        let text = render(&r, Report { format: Format::Json, profiling: true });
        assert_eq!(text.lines().count(), 1, "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["pid"], 42);
        assert_eq!(v["job_id"], "j1");
        assert_eq!(v["kind"], "process");
        assert_eq!(v["path"], "/tmp/c.tar");
        assert_eq!(v["timings_ms"], json!({"verify": 3.0, "criu restore": 20.0, "other": 2.0, "total": 25.0}));
    }
}
