//! The timings tree printed after a dump or a restore when profiling is on (`profiling.enabled`, default
//! on), as Cedana prints it: the phases of the operation, CRIU's own breakdown under its phase, and the
//! total last.
//!
//! ```text
//! timings
//! ├─ criu dump       412.0 ms
//! │  ├─ freezing       0.4 ms
//! │  └─ frozen       398.1 ms
//! │     ├─ memdump     2.3 ms
//! │     └─ memwrite  301.0 ms
//! ├─ packaging       120.0 ms
//! ├─ other             8.0 ms
//! └─ total           540.0 ms
//! ```

use std::time::Duration;

use cedana::checkpoint::CheckpointKind;
use cedana::criu::stats::DumpStats;
use cedana::engine::Timing;

/// One phase and the phases it breaks down into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Phase {
    /// What was timed, e.g. `criu dump`.
    pub name: String,
    pub time: Duration,
    /// A breakdown of this phase (not necessarily adding up to it).
    pub children: Vec<Phase>,
}

impl Phase {
    /// A phase without a breakdown.
    pub fn leaf(name: impl Into<String>, time: Duration) -> Phase {
        Phase { name: name.into(), time, children: Vec::new() }
    }
}

/// The timings of one operation: its phases in order, and the total (always printed last).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timings {
    pub phases: Vec<Phase>,
    pub total: Duration,
}

/// Which operation the timings are of: names the CRIU (or runtime) phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Dump,
    Restore,
}

/// The name of the engine's `criu` phase for a checkpoint of `kind`: `criu dump`, `runc restore`, ...
fn criu_phase(kind: CheckpointKind, op: Operation) -> &'static str {
    match (kind, op) {
        (CheckpointKind::Process, Operation::Dump) => "criu dump",
        (CheckpointKind::Process, Operation::Restore) => "criu restore",
        (CheckpointKind::Runc, Operation::Dump) => "runc checkpoint",
        (CheckpointKind::Runc, Operation::Restore) => "runc restore",
        (CheckpointKind::Containerd, Operation::Dump) => "containerd checkpoint",
        (CheckpointKind::Containerd, Operation::Restore) => "containerd restore",
    }
}

/// Below this, the time not covered by the phases is not shown as `other`.
const OTHER_THRESHOLD: Duration = Duration::from_micros(100);

impl Timings {
    /// The tree of an engine operation from the phases its `OpContext` recorded (`criu`, `package`, `verify`,
    /// `total`, ...), with CRIU's dump statistics under the CRIU phase when known. The time the phases do
    /// not cover (inspection, hooks, ...) is shown as `other`.
    pub fn of_phases(recorded: &[Timing], kind: CheckpointKind, op: Operation, stats: Option<&DumpStats>) -> Timings {
        let mut phases = Vec::new();
        let mut total = None;
        for t in recorded {
            let name = match t.phase {
                "total" => {
                    total = Some(t.time);
                    continue;
                }
                "criu" => criu_phase(kind, op),
                "package" => "packaging",
                other => other,
            };
            let children = match (t.phase, stats) {
                ("criu", Some(s)) => criu_breakdown(s),
                _ => Vec::new(),
            };
            phases.push(Phase { name: name.to_string(), time: t.time, children });
        }
        let covered: Duration = phases.iter().map(|p| p.time).sum();
        let total = total.unwrap_or(covered);
        let other = total.saturating_sub(covered);
        if other >= OTHER_THRESHOLD {
            phases.push(Phase::leaf("other", other));
        }
        Timings { phases, total }
    }

    /// Every phase as `(path, milliseconds)`, the path naming its parents (`criu dump/frozen/memdump`), the
    /// total last: for `--output json`.
    pub fn flattened_ms(&self) -> Vec<(String, f64)> {
        fn walk(prefix: &str, phases: &[Phase], out: &mut Vec<(String, f64)>) {
            for p in phases {
                let path = if prefix.is_empty() { p.name.clone() } else { format!("{prefix}/{}", p.name) };
                out.push((path.clone(), millis(p.time)));
                walk(&path, &p.children, out);
            }
        }
        let mut out = Vec::new();
        walk("", &self.phases, &mut out);
        out.push(("total".to_string(), millis(self.total)));
        out
    }

    /// The tree as text: `timings`, one line per phase with box-drawing branches, times aligned on the
    /// right, and `total` last.
    pub fn render(&self) -> String {
        let mut rows = Vec::new();
        collect(&self.phases, "", false, &mut rows);
        rows.push(("└─ ".to_string(), "total".to_string(), self.total));
        let label_width = rows.iter().map(|(prefix, name, _)| prefix.chars().count() + name.chars().count()).max().unwrap_or(0);
        let times: Vec<String> = rows.iter().map(|(_, _, t)| super::ms(*t)).collect();
        let time_width = times.iter().map(String::len).max().unwrap_or(0);
        let mut text = String::from("timings\n");
        for ((prefix, name, _), time) in rows.iter().zip(&times) {
            let pad = label_width - prefix.chars().count() - name.chars().count();
            text.push_str(&format!("{prefix}{name}{:pad$}  {time:>time_width$}\n", ""));
        }
        text
    }
}

/// Lines of `phases` as (branch prefix, name, time), indented by `indent`; `last_closes` is false at the
/// top level, where the total follows, so the last phase there gets `├─` rather than `└─`.
fn collect(phases: &[Phase], indent: &str, last_closes: bool, rows: &mut Vec<(String, String, Duration)>) {
    for (i, p) in phases.iter().enumerate() {
        // At the top level the total always follows; below, the last child closes its branch.
        let last = i + 1 == phases.len() && last_closes;
        let (branch, below) = if last { ("└─ ", "   ") } else { ("├─ ", "│  ") };
        rows.push((format!("{indent}{branch}"), p.name.clone(), p.time));
        collect(&p.children, &format!("{indent}{below}"), true, rows);
    }
}

/// CRIU's own statistics of a dump, as a breakdown of its phase.
fn criu_breakdown(s: &DumpStats) -> Vec<Phase> {
    let us = Duration::from_micros;
    vec![
        Phase::leaf("freezing", us(s.freezing_time_us)),
        Phase {
            name: "frozen".into(),
            time: us(s.frozen_time_us),
            children: vec![Phase::leaf("memdump", us(s.memdump_time_us)), Phase::leaf("memwrite", us(s.memwrite_time_us))],
        },
    ]
}

/// Milliseconds with microsecond precision, for JSON.
pub fn millis(d: Duration) -> f64 {
    (d.as_micros() as f64) / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_dump_tree_has_criu_s_breakdown_the_rest_as_other_and_ends_in_the_total() {
        let recorded = [
            Timing { phase: "criu", time: ms(412) },
            Timing { phase: "package", time: ms(120) },
            Timing { phase: "total", time: ms(540) },
        ];
        let stats = DumpStats {
            freezing_time_us: 400,
            frozen_time_us: 398_100,
            memdump_time_us: 2_300,
            memwrite_time_us: 301_000,
            ..Default::default()
        };
        let t = Timings::of_phases(&recorded, CheckpointKind::Process, Operation::Dump, Some(&stats));
        let text = t.render();
        let expected = "\
timings
├─ criu dump       412.0 ms
│  ├─ freezing       0.4 ms
│  └─ frozen       398.1 ms
│     ├─ memdump     2.3 ms
│     └─ memwrite  301.0 ms
├─ packaging       120.0 ms
├─ other             8.0 ms
└─ total           540.0 ms
";
        assert_eq!(text, expected, "\n{text}");
        assert_eq!(
            text.lines().last().map(|l| l.split_whitespace().collect::<Vec<_>>()),
            Some(vec!["└─", "total", "540.0", "ms"])
        );
    }

    #[test]
    fn a_restore_tree_names_the_runtime_and_shows_no_other_when_the_phases_cover_the_total() {
        let recorded = [
            Timing { phase: "verify", time: ms(5) },
            Timing { phase: "criu", time: ms(100) },
            Timing { phase: "total", time: ms(105) },
        ];
        let t = Timings::of_phases(&recorded, CheckpointKind::Runc, Operation::Restore, None);
        assert_eq!(t.phases.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["verify", "runc restore"]);
        assert_eq!(t.render(), "timings\n├─ verify          5.0 ms\n├─ runc restore  100.0 ms\n└─ total         105.0 ms\n");
    }

    #[test]
    fn without_a_recorded_total_the_total_is_the_sum_and_a_last_child_closes_only_its_branch() {
        let t = Timings {
            phases: vec![
                Phase { name: "a".into(), time: ms(1), children: vec![Phase::leaf("b", ms(1))] },
                Phase::leaf("c", ms(2)),
            ],
            total: ms(3),
        };
        let lines: Vec<String> = t.render().lines().map(str::to_string).collect();
        assert_eq!(lines[1].split_whitespace().next(), Some("├─"));
        assert!(lines[2].starts_with("│  └─ b"), "{lines:?}");
        assert!(lines[3].starts_with("├─ c"), "{lines:?}");
        assert!(lines[4].starts_with("└─ total"), "{lines:?}");
        let summed = Timings::of_phases(&[Timing { phase: "criu", time: ms(7) }], CheckpointKind::Process, Operation::Dump, None);
        assert_eq!(summed.total, ms(7));
        assert_eq!(summed.phases.len(), 1, "nothing is left over for `other`");
    }

    #[test]
    fn flattened_phases_name_their_parents_and_end_in_the_total() {
        let recorded = [Timing { phase: "criu", time: ms(10) }, Timing { phase: "total", time: ms(10) }];
        let stats = DumpStats { frozen_time_us: 1_500, ..Default::default() };
        let flat = Timings::of_phases(&recorded, CheckpointKind::Process, Operation::Dump, Some(&stats)).flattened_ms();
        let names: Vec<&str> = flat.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "criu dump",
                "criu dump/freezing",
                "criu dump/frozen",
                "criu dump/frozen/memdump",
                "criu dump/frozen/memwrite",
                "total"
            ]
        );
        assert_eq!(flat[2].1, 1.5);
        assert_eq!(flat.last().map(|(_, v)| *v), Some(10.0));
    }
}
