//! `cedana check --full`: everything that can be checked on this machine, as one table (COMPONENT STATUS
//! DETAIL, the layout of `cedana daemon check`): CRIU, its version, `criu check` and the features cedana
//! uses, network locking, privileges, runc, containerd, GPUs and the checkpoint storage. The exit code is
//! non-zero when a required row fails (CRIU, `criu check`, root, the checkpoint folder); optional ones
//! (a CRIU feature this kernel lacks, runc, containerd, a GPU) only say what is missing.

use std::path::{Path, PathBuf};
use std::process::Command;

use cedana::config::Config;
use cedana::criu::Criu;
use comfy_table::{presets::NOTHING, Table};
use indicatif::HumanBytes;

/// The state of one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// An optional feature this machine does not offer.
    Off,
    /// An optional program that is not installed.
    Missing,
    /// Nothing of the kind here (no GPU): not an error.
    None,
    /// Something required is missing or does not work.
    Failed,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Off => "off",
            Status::Missing => "missing",
            Status::None => "none",
            Status::Failed => "FAILED",
        }
    }
}

/// One row of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub component: String,
    pub status: Status,
    pub detail: String,
    /// Whether cedana cannot work without it (a failure makes the exit code non-zero).
    pub required: bool,
}

impl Row {
    fn new(component: impl Into<String>, status: Status, detail: impl Into<String>, required: bool) -> Row {
        Row { component: component.into(), status, detail: detail.into(), required }
    }
}

/// CRIU features checked with `criu check --feature`, and what each one gives.
const FEATURES: &[(&str, &str)] = &[
    ("mem_dirty_track", "pre-dumps and incremental checkpoints (soft-dirty tracking)"),
    ("uffd-noncoop", "lazy restores (--lazy-pages)"),
    ("pidfd_store", "reliable PID reuse detection across pre-dumps"),
    ("timens", "time namespaces of containers"),
];

/// Run every check, print the table (and `criu check`'s output when it failed); the exit code.
pub fn run(config: &Config) -> i32 {
    let (rows, criu_output) = rows(config);
    println!("{}", table(&rows));
    if let Some(output) = criu_output {
        println!("criu check said:");
        for line in output.lines() {
            println!("  {line}");
        }
    }
    exit_code(&rows)
}

/// Non-zero when a required row is not ok.
pub fn exit_code(rows: &[Row]) -> i32 {
    i32::from(rows.iter().any(|r| r.required && r.status != Status::Ok))
}

/// The table: COMPONENT STATUS DETAIL.
pub fn table(rows: &[Row]) -> String {
    let mut table = Table::new();
    table.load_style(NOTHING);
    table.set_header(["COMPONENT", "STATUS", "DETAIL"]);
    for r in rows {
        table.add_row([r.component.as_str(), r.status.as_str(), r.detail.as_str()]);
    }
    table.to_string()
}

/// Every row, and `criu check`'s output when it failed.
fn rows(config: &Config) -> (Vec<Row>, Option<String>) {
    let mut rows = Vec::new();
    let criu_output = criu_rows(config, &mut rows);
    let iptables = ["/usr/sbin/iptables-restore", "/sbin/iptables-restore"].iter().any(|p| Path::new(p).exists());
    rows.push(match iptables {
        true => Row::new("iptables", Status::Ok, "network locking for --tcp-established and containers", false),
        false => Row::new("iptables", Status::Missing, "install iptables (scripts/setup.sh does)", false),
    });
    rows.push(match nix::unistd::geteuid().is_root() {
        true => Row::new("privileges", Status::Ok, "root", true),
        false => Row::new("privileges", Status::Failed, "not root: CRIU needs root; run cedana with sudo", true),
    });
    rows.push(runc_row());
    rows.push(containerd_row());
    rows.push(gpu_row());
    rows.push(storage_row("storage", &config.checkpoint_dir(), "checkpoint.dir", true));
    rows.push(storage_row("scratch", &config.scratch_dir(), "checkpoint.scratch_dir", false));
    (rows, criu_output)
}

/// CRIU, `criu check` and its features; `criu check`'s output when it failed.
fn criu_rows(config: &Config, rows: &mut Vec<Row>) -> Option<String> {
    let install = super::advice::CRIU_INSTALL;
    let criu = match Criu::locate(config.criu.binary_path.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            rows.push(Row::new("criu", Status::Failed, format!("{e}: {install}"), true));
            return None;
        }
    };
    match criu.supported_version() {
        Ok(v) => rows.push(Row::new(
            "criu",
            Status::Ok,
            format!("{v} at {} ({} driver)", criu.binary().display(), config.criu_driver()),
            true,
        )),
        Err(e) => {
            rows.push(Row::new("criu", Status::Failed, format!("{e}: {install}"), true));
            return None;
        }
    }
    let failed_output = match criu.check() {
        Ok((true, _)) => {
            rows.push(Row::new("criu check", Status::Ok, "looks good", true));
            None
        }
        Ok((false, output)) => {
            let first = output.lines().find(|l| l.contains("Error")).or(output.lines().next()).unwrap_or("no output");
            rows.push(Row::new("criu check", Status::Failed, first.trim().to_string(), true));
            Some(output)
        }
        Err(e) => {
            rows.push(Row::new("criu check", Status::Failed, e.to_string(), true));
            None
        }
    };
    for (feature, gives) in FEATURES {
        rows.push(feature_row(&criu, feature, gives));
    }
    failed_output
}

/// `criu check --feature NAME`: ok, off (this kernel lacks it), or off because this CRIU does not know it.
fn feature_row(criu: &Criu, feature: &str, gives: &str) -> Row {
    let name = format!("feature {feature}");
    let out = match Command::new(criu.binary()).args(["check", "--feature", feature]).output() {
        Ok(o) => o,
        Err(e) => return Row::new(name, Status::Off, format!("could not run criu: {e}"), false),
    };
    if out.status.success() {
        return Row::new(name, Status::Ok, gives, false);
    }
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let detail = if said.contains("Unknown feature") {
        format!("unknown to this CRIU: no {gives}")
    } else if feature == "mem_dirty_track" {
        "this kernel has no soft-dirty tracking (CONFIG_MEM_SOFT_DIRTY): no pre-dumps; full checkpoints work".to_string()
    } else {
        format!("not supported on this kernel: no {gives}")
    };
    Row::new(name, Status::Off, detail, false)
}

/// The first line of `BINARY --version`, and the field of it that holds the version (0-based), if it ran.
fn version_of(binary: &Path, field: usize) -> Option<String> {
    let out = Command::new(binary).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().next()?.split_whitespace().nth(field).map(str::to_string)
}

/// runc (optional: process checkpoints do not need it).
fn runc_row() -> Row {
    match cedana::runc::locate() {
        // `runc version 1.1.5+ds1`
        Ok(binary) => match version_of(&binary, 2) {
            Some(v) => Row::new("runc", Status::Ok, format!("{v} at {}", binary.display()), false),
            None => Row::new("runc", Status::Missing, format!("{} does not say its version", binary.display()), false),
        },
        Err(e) => Row::new("runc", Status::Missing, format!("{e}: needed for runc and containerd checkpoints"), false),
    }
}

/// The first executable `name` on PATH or among `fallbacks`.
fn find_program(name: &str, fallbacks: &[&str]) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    cedana::binary::candidates(name, fallbacks)
        .into_iter()
        .find(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// containerd (optional).
fn containerd_row() -> Row {
    match find_program("containerd", &["/usr/bin/containerd", "/usr/local/bin/containerd"]) {
        // `containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3`
        Some(binary) => match version_of(&binary, 2) {
            Some(v) => Row::new("containerd", Status::Ok, format!("{v} at {}", binary.display()), false),
            None => Row::new("containerd", Status::Missing, format!("{} does not say its version", binary.display()), false),
        },
        None => Row::new("containerd", Status::Missing, "not found on PATH: needed for containerd checkpoints", false),
    }
}

/// NVIDIA GPUs: `nvidia-smi`'s list, else the driver's version from /proc, else none (not an error).
fn gpu_row() -> Row {
    if let Some(smi) = find_program("nvidia-smi", &[]) {
        let out = Command::new(&smi).args(["--query-gpu=name,driver_version", "--format=csv,noheader"]).output();
        match out {
            Ok(o) if o.status.success() => {
                let gpus: Vec<String> = String::from_utf8_lossy(&o.stdout).lines().map(|l| l.trim().to_string()).collect();
                let detail = match gpus.as_slice() {
                    [] => "nvidia-smi lists no GPU".to_string(),
                    list => format!("{} GPU(s): {}", list.len(), list.join("; ")),
                };
                let status = if gpus.is_empty() { Status::None } else { Status::Ok };
                return Row::new("gpu", status, detail, false);
            }
            Ok(o) => {
                let said = String::from_utf8_lossy(&o.stdout);
                let first = said.lines().next().unwrap_or("no output").trim().to_string();
                return Row::new("gpu", Status::None, format!("nvidia-smi failed: {first}"), false);
            }
            Err(e) => return Row::new("gpu", Status::None, format!("nvidia-smi did not run: {e}"), false),
        }
    }
    match std::fs::read_to_string("/proc/driver/nvidia/version") {
        Ok(v) => {
            let first = v.lines().next().unwrap_or("").trim().to_string();
            Row::new("gpu", Status::Ok, format!("NVIDIA driver ({first}), no nvidia-smi"), false)
        }
        Err(_) => Row::new("gpu", Status::None, "no NVIDIA GPU or driver on this machine", false),
    }
}

/// A folder cedana writes into: writable (or creatable), and its free space.
fn storage_row(component: &str, dir: &Path, key: &str, required: bool) -> Row {
    let fail = |detail: String| Row::new(component, if required { Status::Failed } else { Status::Off }, detail, required);
    // The folder, or the nearest ancestor that exists (the folder is created at the first dump).
    let existing = dir.ancestors().find(|a| a.exists()).unwrap_or(Path::new("/"));
    if !existing.is_dir() {
        return fail(format!("{key} {}: {} is not a folder", dir.display(), existing.display()));
    }
    if let Err(e) = tempfile::tempfile_in(existing) {
        return fail(format!("{key} {}: {} is not writable: {e}", dir.display(), existing.display()));
    }
    let free = match nix::sys::statvfs::statvfs(existing) {
        Ok(s) => HumanBytes(s.blocks_available().saturating_mul(s.fragment_size())).to_string(),
        Err(e) => format!("unknown ({e})"),
    };
    let created = if existing == dir { String::new() } else { " (created at the first use)".to_string() };
    Row::new(component, Status::Ok, format!("{key} {}{created} is writable, {free} free", dir.display()), required)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_required_row_that_is_not_ok_fails_the_check() {
        let rows = vec![
            Row::new("criu", Status::Ok, "4.2.1", true),
            Row::new("gpu", Status::None, "no NVIDIA GPU", false),
            Row::new("containerd", Status::Missing, "not found", false),
        ];
        assert_eq!(exit_code(&rows), 0);
        let mut failing = rows.clone();
        failing.push(Row::new("storage", Status::Failed, "not writable", true));
        assert_eq!(exit_code(&failing), 1);
        let text = table(&failing);
        let header: Vec<&str> = text.lines().next().unwrap().split_whitespace().collect();
        assert_eq!(header, ["COMPONENT", "STATUS", "DETAIL"]);
        assert!(text.lines().any(|l| l.split_whitespace().take(2).eq(["storage", "FAILED"])), "{text}");
        assert!(text.lines().any(|l| l.split_whitespace().take(2).eq(["gpu", "none"])), "{text}");
    }

    #[test]
    fn storage_says_writable_and_free_or_fails_when_required() {
        let dir = tempfile::tempdir().unwrap();
        let row = storage_row("storage", dir.path(), "checkpoint.dir", true);
        assert_eq!(row.status, Status::Ok, "{row:?}");
        assert!(row.detail.contains("is writable") && row.detail.contains(" free"), "{row:?}");
        let later = dir.path().join("not/yet");
        let row = storage_row("storage", &later, "checkpoint.dir", true);
        assert_eq!(row.status, Status::Ok, "{row:?}");
        assert!(row.detail.contains("created at the first use"), "{row:?}");
        let file = dir.path().join("file");
        std::fs::write(&file, "x").unwrap();
        let row = storage_row("storage", &file.join("sub"), "checkpoint.dir", true);
        assert_eq!(row.status, Status::Failed, "{row:?}");
        assert_eq!(storage_row("scratch", &file.join("sub"), "checkpoint.scratch_dir", false).status, Status::Off);
    }

    #[test]
    fn gpu_absence_is_none_not_a_failure() {
        // This machine has no GPU; on one with a GPU the row is ok. Either way it is never required.
        let row = gpu_row();
        assert!(matches!(row.status, Status::None | Status::Ok), "{row:?}");
        assert!(!row.required);
    }
}
