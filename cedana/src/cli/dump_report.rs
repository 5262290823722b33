//! What every dump command prints (`dump process`, `dump runc`, `dump job`, local or through the daemon):
//! one [`Summary`], rendered by [`render`].
//!
//! Text: a headline, the summary, the timings tree when profiling is on, and last a line whose last
//! whitespace-separated field is the checkpoint's path, so that
//! `cedana dump ... | tail -n 1 | awk '{print $NF}'` gives it (as with Cedana, a path with spaces in it does
//! not survive awk's splitting: use `--output json` then). JSON: one object with the whole result.

use std::borrow::Cow;
use std::path::Path;
use std::time::Duration;

use cedana::checkpoint::manifest::Manifest;
use cedana::checkpoint::CheckpointKind;
use cedana::codec::Compression;
use cedana::engine::{DumpOutcome, Timing};
use cedana_protos::v1 as pb;
use indicatif::HumanBytes;
use serde_json::json;

use super::output::{self, Format, Report};
use super::timings::{Operation, Timings};

/// What a dump's report shows; a dump through the daemon knows less (no detected options, and CRIU's
/// statistics only when the manifest can be read cheaply).
pub struct Summary<'a> {
    pub pid: i32,
    pub comm: &'a str,
    /// The container's id, for container checkpoints.
    pub container: Option<&'a str>,
    /// The job's id, for `dump job`.
    pub job: Option<&'a str>,
    pub path: String,
    pub size: u64,
    pub compression: Option<Compression>,
    pub manifest: Option<Cow<'a, Manifest>>,
    pub timings: Timings,
    pub detected: &'a [&'static str],
}

/// Largest archive whose manifest the summary of a dump through the daemon reads back (the manifest is the
/// archive's last entry: reading it means reading the whole archive).
const SUMMARY_READ_LIMIT: u64 = 16 << 20;

impl<'a> Summary<'a> {
    /// The summary of a dump run in this process, with the phases its context recorded.
    pub fn of_outcome(out: &'a DumpOutcome, recorded: &[Timing]) -> Summary<'a> {
        let m = &out.manifest;
        Summary {
            pid: m.process.pid,
            comm: &m.process.comm,
            container: m.container.as_ref().map(|c| c.id.as_str()),
            job: None,
            path: out.path.display().to_string(),
            size: out.size,
            compression: Some(m.compression),
            manifest: Some(Cow::Borrowed(m)),
            timings: Timings::of_phases(recorded, m.kind, Operation::Dump, m.stats.as_ref()),
            detected: &out.detected,
        }
    }

    /// The summary of a dump the daemon ran (`asked`: the compression the command asked for), with the
    /// timings its response carries.
    pub fn of_response(out: &'a pb::DumpResponse, asked: Option<Compression>) -> Summary<'a> {
        let path = Path::new(&out.path);
        let cheap = path.is_dir() || out.size <= SUMMARY_READ_LIMIT;
        let manifest = match cheap && path.exists() {
            true => cedana::checkpoint::read_manifest(path, false).ok().map(Cow::Owned),
            false => None,
        };
        let compression = manifest
            .as_ref()
            .map(|m: &Cow<'_, Manifest>| m.compression)
            .or(asked)
            .or_else(|| Compression::detect_path(path).ok());
        let us = Duration::from_micros;
        let recorded = [
            Timing { phase: "criu", time: us(out.criu_time_us) },
            Timing { phase: "package", time: us(out.package_time_us) },
            Timing { phase: "total", time: us(out.total_time_us) },
        ];
        let kind = manifest.as_ref().map(|m| m.kind).unwrap_or(CheckpointKind::Process);
        let timings = Timings::of_phases(&recorded, kind, Operation::Dump, manifest.as_ref().and_then(|m| m.stats.as_ref()));
        Summary {
            pid: out.pid,
            comm: &out.comm,
            container: None,
            job: None,
            path: out.path.clone(),
            size: out.size,
            compression,
            manifest,
            timings,
            detected: &[],
        }
    }
}

/// Print the report of a dump on stdout.
pub fn print(s: &Summary<'_>, report: Report) {
    super::quiet_on_broken_pipe();
    print!("{}", render(s, report));
}

/// The report of a dump: text or JSON (see the module's documentation).
pub fn render(s: &Summary<'_>, report: Report) -> String {
    match report.format {
        Format::Json => output::json_line(&to_json(s)),
        Format::Text => text(s, report),
    }
}

fn text(s: &Summary<'_>, report: Report) -> String {
    let mut t = String::new();
    let container = s.container.or_else(|| s.manifest.as_deref().and_then(|m| m.container.as_ref()).map(|c| c.id.as_str()));
    t += &match (s.job, container) {
        (Some(jid), _) => format!("Dumped job {jid} (PID {}, {}) to {}\n", s.pid, s.comm, s.path),
        (None, Some(id)) => format!("Dumped container {id} (PID {}, {}) to {}\n", s.pid, s.comm, s.path),
        (None, None) => format!("Dumped PID {} ({}) to {}\n", s.pid, s.comm, s.path),
    };
    let m = s.manifest.as_deref();
    t += &match (s.compression, m) {
        (Some(c), Some(m)) => {
            let how = if m.streamed { ", streamed" } else { "" };
            format!("  size      {} ({c}{how}, images {})\n", HumanBytes(s.size), HumanBytes(m.images_size()))
        }
        (Some(c), None) => format!("  size      {} ({c})\n", HumanBytes(s.size)),
        (None, _) => format!("  size      {}\n", HumanBytes(s.size)),
    };
    if let Some(st) = m.and_then(|m| m.stats.as_ref()) {
        t += &format!("  pages     {} written, {} scanned\n", st.pages_written, st.pages_scanned);
    }
    if !s.detected.is_empty() {
        t += &format!("  detected  {}\n", s.detected.join(" "));
    }
    if let Some(m) = m.filter(|m| m.process.pids.len() > 1) {
        t += &format!("  tree      {} processes\n", m.process.pids.len());
    }
    if let Some(g) = m.and_then(|m| m.gpu.as_ref()) {
        t += &format!("  gpu       {}\n", gpu_line(g));
    }
    t += &report.timings_text(&s.timings);
    t += &format!("checkpoint  {}\n", s.path);
    t
}

/// `2 CUDA processes (cuda-checkpoint), 1 GPU: NVIDIA A100 (40960 MiB), driver 570.86.10, CUDA 12.8`.
pub fn gpu_line(g: &cedana::gpu::GpuRecord) -> String {
    let mut line = format!("{} CUDA process(es) ({})", g.pids.len(), g.backend);
    if let Some(d) = g.devices.first() {
        line += &format!(", {} GPU(s): {} ({} MiB)", g.devices.len(), d.name, d.memory_mib);
    }
    if !g.driver_version.is_empty() {
        line += &format!(", driver {}", g.driver_version);
    }
    if !g.cuda_version.is_empty() {
        line += &format!(", CUDA {}", g.cuda_version);
    }
    line
}

/// The whole result as one JSON object.
fn to_json(s: &Summary<'_>) -> serde_json::Value {
    let m = s.manifest.as_deref();
    let container = s.container.map(str::to_string).or_else(|| m.and_then(|m| m.container.as_ref()).map(|c| c.id.clone()));
    let stats = m.and_then(|m| m.stats.as_ref());
    json!({
        "path": s.path,
        "kind": m.map(|m| m.kind.to_string()),
        "streamed": m.map(|m| m.streamed),
        "pid": s.pid,
        "comm": s.comm,
        "container_id": container,
        "job_id": s.job,
        "size": s.size,
        "compression": s.compression.map(|c| c.to_string()),
        "images_size": m.map(Manifest::images_size),
        "pages": stats.map(|st| json!({
            "written": st.pages_written,
            "scanned": st.pages_scanned,
            "skipped_parent": st.pages_skipped_parent,
            "lazy": st.pages_lazy,
        })),
        "tree_size": m.map(|m| m.process.pids.len()),
        "pids": m.map(|m| m.process.pids.clone()),
        "detected": s.detected,
        "criu_version": m.map(|m| m.criu_version.clone()),
        "gpu": m.and_then(|m| m.gpu.as_ref()),
        "timings_ms": output::timings_json(&s.timings),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary() -> Summary<'static> {
        let recorded = [
            Timing { phase: "criu", time: Duration::from_millis(40) },
            Timing { phase: "package", time: Duration::from_millis(10) },
            Timing { phase: "total", time: Duration::from_millis(55) },
        ];
        Summary {
            pid: 42,
            comm: "counter",
            container: None,
            job: None,
            path: "/tmp/cp/dump-process-42.tar".into(),
            size: 2048,
            compression: Some(Compression::Tar),
            manifest: None,
            timings: Timings::of_phases(&recorded, CheckpointKind::Process, Operation::Dump, None),
            detected: &["shell-job"],
        }
    }

    fn last_field_of_last_line(text: &str) -> Option<&str> {
        text.lines().last().and_then(|l| l.split_whitespace().last())
    }

    #[test]
    fn the_text_ends_in_the_path_with_or_without_timings() {
        let s = summary();
        let on = render(&s, Report { format: Format::Text, profiling: true });
        assert!(on.starts_with("Dumped PID 42 (counter) to /tmp/cp/dump-process-42.tar\n  size      2.00 KiB (tar)\n"), "{on}");
        assert_eq!(last_field_of_last_line(&on), Some("/tmp/cp/dump-process-42.tar"), "{on}");
        let tree = on.find("\ntimings\n").expect("a timings tree");
        assert!(on[tree..].contains("├─ criu dump ") && on[tree..].contains("└─ total "), "{on}");
        assert!(on.contains("  detected  shell-job\n"), "{on}");
        let off = render(&s, Report { format: Format::Text, profiling: false });
        assert!(!off.contains("timings") && !off.contains(" ms"), "{off}");
        assert_eq!(last_field_of_last_line(&off), Some("/tmp/cp/dump-process-42.tar"), "{off}");
    }

    #[test]
    fn a_job_and_a_container_are_named_in_the_headline() {
        let mut s = summary();
        s.job = Some("j1");
        let t = render(&s, Report { format: Format::Text, profiling: false });
        assert!(t.starts_with("Dumped job j1 (PID 42, counter) to /tmp/cp/"), "{t}");
        s.job = None;
        s.container = Some("c1");
        let t = render(&s, Report { format: Format::Text, profiling: false });
        assert!(t.starts_with("Dumped container c1 (PID 42, counter) to "), "{t}");
    }

    #[test]
    fn json_is_one_object_with_the_whole_result() {
        let mut s = summary();
        s.job = Some("j1");
        let text = render(&s, Report { format: Format::Json, profiling: true });
        assert_eq!(text.lines().count(), 1, "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["path"], "/tmp/cp/dump-process-42.tar");
        assert_eq!(v["pid"], 42);
        assert_eq!(v["job_id"], "j1");
        assert_eq!(v["size"], 2048);
        assert_eq!(v["compression"], "tar");
        assert_eq!(v["detected"], json!(["shell-job"]));
        assert_eq!(v["timings_ms"], json!({"criu dump": 40.0, "packaging": 10.0, "other": 5.0, "total": 55.0}));
        assert!(v["container_id"].is_null() && v["pages"].is_null());
    }
}
