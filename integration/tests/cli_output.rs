//! What `cedana dump` and `cedana restore` print, as scripts use it: the last field of a dump's last line is
//! the checkpoint's path (`| tail -n 1 | awk '{print $NF}'`), `--output json` is one JSON object with the
//! result, and the timings tree (profiling, on by default) ends in the total and disappears with
//! `CEDANA_PROFILING_ENABLED=false`. For process dumps (local and through the daemon), runc dumps and
//! restores, and jobs; and `cedana check --full`'s table.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cedana_integration::daemon::{printed_pid, wait_for_count, Daemon};
use cedana_integration::engines::{piped, RuncRoot};
use cedana_integration::workload::Workload;
use cedana_integration::{alive, bin, cedana_cmd, require_root, success_stdout, wait_for, workload_bin};
use nix::sys::signal::Signal;

const T: Duration = Duration::from_secs(20);

/// `tail -n 1 | awk '{print $NF}'`.
fn last_field(out: &str) -> &str {
    out.lines().last().and_then(|l| l.split_whitespace().last()).unwrap_or_else(|| panic!("no last field in {out:?}"))
}

/// The timings tree: from its `timings` line to its `└─ total` line, which must be its last.
fn timings_block(out: &str) -> Option<Vec<&str>> {
    let lines: Vec<&str> = out.lines().collect();
    let start = lines.iter().position(|l| *l == "timings")?;
    let block: Vec<&str> =
        lines[start..].iter().take_while(|l| **l == "timings" || l.starts_with(['├', '│', '└'])).copied().collect();
    Some(block)
}

/// The tree is there, has at least one phase, and ends in a total in milliseconds.
fn assert_timings_end_in_total(out: &str, phase: &str) {
    let block = timings_block(out).unwrap_or_else(|| panic!("no timings tree in:\n{out}"));
    let last = block.last().copied().unwrap_or_default();
    let fields: Vec<&str> = last.split_whitespace().collect();
    assert!(fields.len() == 4 && fields[..2] == ["└─", "total"] && fields[3] == "ms", "the tree ends in the total:\n{out}");
    assert!(fields[2].parse::<f64>().is_ok_and(|v| v > 0.0), "a total time: {last}");
    assert!(block.iter().any(|l| l.contains(phase)), "a {phase:?} phase in:\n{out}");
}

fn assert_no_timings(out: &str) {
    assert!(timings_block(out).is_none() && !out.contains("total"), "profiling is off, yet:\n{out}");
}

/// The one JSON object a command printed (and nothing else).
fn json(out: &str) -> serde_json::Value {
    assert_eq!(out.lines().count(), 1, "one line of JSON: {out}");
    serde_json::from_str(out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// The stdout of a command that must succeed.
fn stdout(what: &str, cmd: &mut Command) -> String {
    success_stdout(what, &cmd.output().unwrap_or_else(|e| panic!("{what}: {e}")))
}

/// `cedana ARGS` with no daemon to ask (a socket that does not exist), profiling as `profiling` says
/// (`None`: the default).
fn local(args: &[&str], profiling: Option<&str>) -> Command {
    let mut cmd = cedana_cmd(args);
    cmd.env("CEDANA_ADDRESS", "/nonexistent/cedana-cli-output.sock").env("CEDANA_LOG_LEVEL", "warn");
    if let Some(p) = profiling {
        cmd.env("CEDANA_PROFILING_ENABLED", p);
    }
    cmd
}

fn wait_gone(pid: i32) {
    wait_for(&format!("PID {pid} to be free"), T, || (!Path::new(&format!("/proc/{pid}")).exists()).then_some(()));
}

#[test]
fn process_dumps_end_in_their_path_and_report_json_and_timings() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let mut w = Workload::start(&workload_bin("counter"), &[], dir.path());
    w.wait_lines(3);
    let pid = w.pid.to_string();
    let dump = |name: &str, extra: &[&str], profiling: Option<&str>| {
        let args = [&["dump", "process", &pid, "--no-server", "--dir", d, "--name", name][..], extra].concat();
        stdout(&format!("dump {name}"), &mut local(&args, profiling))
    };

    let out = dump("text", &["--leave-running"], None);
    assert_eq!(last_field(&out), dir.path().join("text.tar").to_str().unwrap(), "{out}");
    assert!(Path::new(last_field(&out)).is_file());
    assert!(out.starts_with(&format!("Dumped PID {pid} (counter) to ")), "{out}");
    assert_timings_end_in_total(&out, "criu dump");
    assert_timings_end_in_total(&out, "packaging");
    // The same name again is refused and the checkpoint left alone; --overwrite replaces it.
    let text = dir.path().join("text.tar");
    let first = std::fs::read(&text).unwrap();
    let refused =
        local(&["dump", "process", &pid, "--no-server", "--dir", d, "--name", "text", "--leave-running"], None).output().unwrap();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && err.contains("already exists"), "{err}");
    assert_eq!(std::fs::read(&text).unwrap(), first, "the refused dump left the checkpoint as it was");
    let out = dump("text", &["--leave-running", "--overwrite"], None);
    assert_eq!(last_field(&out), text.to_str().unwrap(), "{out}");
    assert_ne!(std::fs::read(&text).unwrap(), first, "--overwrite replaced the checkpoint");
    assert_eq!(cedana_integration::entries(dir.path()).iter().filter(|e| e.starts_with(".")).count(), 0, "no temporary files");

    let v = json(&dump("json", &["--leave-running", "--output", "json"], None));
    let path = dir.path().join("json.tar");
    assert_eq!(v["path"], path.to_str().unwrap());
    assert_eq!(v["size"], std::fs::metadata(&path).unwrap().len());
    assert_eq!(
        (v["pid"].as_i64(), v["comm"].as_str(), v["kind"].as_str()),
        (Some(w.pid.into()), Some("counter"), Some("process"))
    );
    assert_eq!((v["compression"].as_str(), v["tree_size"].as_u64()), (Some("tar"), Some(1)));
    assert!(v["images_size"].as_u64().is_some_and(|s| s > 0) && v["pages"]["written"].as_u64().is_some(), "{v}");
    assert!(v["timings_ms"]["total"].as_f64().is_some_and(|t| t > 0.0) && v["timings_ms"]["criu dump"].is_number(), "{v}");

    let out = dump("quiet", &[], Some("false"));
    assert_no_timings(&out);
    assert_eq!(last_field(&out), dir.path().join("quiet.tar").to_str().unwrap(), "{out}");
    assert!(Path::new(last_field(&out)).is_file());
    w.reap();
    wait_gone(w.pid);

    // Restores: the tree by default, JSON, and nothing but the headline with profiling off. The counter
    // writes to its log after each restore, so each restore is of a fresh dump (CRIU checks the log's size).
    let restore = |name: &str, extra: &[&str], profiling: Option<&str>| {
        let path = dir.path().join(format!("{name}.tar"));
        let args = [&["restore", "process", "--path", path.to_str().unwrap()][..], extra].concat();
        let out = stdout("restore", &mut local(&args, profiling));
        assert!(alive(w.pid), "restored: {out}");
        (path.display().to_string(), out)
    };
    let (q, out) = restore("quiet", &[], None);
    assert!(out.starts_with(&format!("Restored PID {pid} (counter) from {q} (verify ")), "{out}");
    assert_timings_end_in_total(&out, "criu restore");
    dump("again", &[], Some("false"));
    wait_gone(w.pid);
    let (again, out) = restore("again", &["--json"], None);
    let v = json(&out);
    assert_eq!((v["pid"].as_i64(), v["path"].as_str()), (Some(w.pid.into()), Some(again.as_str())), "{v}");
    assert!(v["timings_ms"]["total"].as_f64().is_some_and(|t| t > 0.0) && v["timings_ms"]["verify"].is_number(), "{v}");
    dump("last", &[], Some("false"));
    wait_gone(w.pid);
    let (last, out) = restore("last", &[], Some("false"));
    assert_eq!(out, format!("Restored PID {pid} (counter) from {last}\n"));
    w.signal(Signal::SIGKILL);
}

#[test]
fn runc_dumps_and_restores_report_the_same_way() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let runc = RuncRoot::new(tmp.path(), "runc");
    let cid = format!("ced-output-{}", std::process::id());
    let (bundle, _out) = runc.run_counter(tmp.path(), &cid, 3, T);
    let dir = tmp.path().join("cp");
    let dump = |name: &str, extra: &[&str], profiling: Option<&str>| {
        let mut cmd = runc.cedana_dump(&cid, &dir, &[&["--leave-running", "--name", name][..], extra].concat());
        cmd.env("CEDANA_LOG_LEVEL", "warn");
        if let Some(p) = profiling {
            cmd.env("CEDANA_PROFILING_ENABLED", p);
        }
        stdout(&format!("dump runc {name}"), &mut cmd)
    };

    let out = dump("text", &[], None);
    assert_eq!(last_field(&out), dir.join("text.tar").to_str().unwrap(), "{out}");
    assert!(Path::new(last_field(&out)).is_file());
    assert!(out.starts_with(&format!("Dumped container {cid} ")), "{out}");
    assert_timings_end_in_total(&out, "runc checkpoint");

    let v = json(&dump("json", &["--output", "json", "--compression", "zstd"], None));
    assert_eq!(v["path"], dir.join("json.tar.zst").to_str().unwrap());
    assert!(dir.join("json.tar.zst").is_file());
    assert_eq!(
        (v["container_id"].as_str(), v["kind"].as_str(), v["compression"].as_str()),
        (Some(cid.as_str()), Some("runc"), Some("zstd"))
    );
    assert!(v["timings_ms"]["runc checkpoint"].is_number() && v["timings_ms"]["total"].is_number(), "{v}");

    let out = dump("quiet", &[], Some("false"));
    assert_no_timings(&out);
    assert_eq!(last_field(&out), dir.join("quiet.tar").to_str().unwrap(), "{out}");

    // The restored container writes to our stdout: the report goes to stderr, here the same pipe.
    let copy = format!("{cid}-copy");
    runc.track(&copy);
    let mut cmd = Command::new(bin("cedana"));
    cmd.args(["restore", "runc", "--detach", "--id", &copy, "--path"])
        .arg(dir.join("text.tar"))
        .arg("--bundle")
        .arg(&bundle.dir)
        .arg("--root")
        .arg(&runc.root)
        .env("CEDANA_LOG_LEVEL", "warn");
    let lines = piped(&mut cmd);
    assert!(cmd.status().unwrap().success(), "{:?}", lines.snapshot());
    lines.wait_line("the total", T, |l| l.starts_with("└─ total "));
    let text = lines.snapshot().join("\n");
    assert!(text.contains(&format!("Restored container {copy} (checkpoint of {cid}) from ")), "{text}");
    assert_timings_end_in_total(&text, "runc restore");
    assert_eq!(runc.status(&copy).as_deref(), Some("running"));
}

/// The checkpoint a dump through the daemon wrote: the last field of its last line, which exists.
fn dumped_path(out: &str) -> PathBuf {
    let path = PathBuf::from(last_field(out));
    assert!(path.is_file(), "{} exists: {out}", path.display());
    path
}

#[test]
fn dumps_and_restores_through_the_daemon_report_the_same_way() {
    let d = Daemon::start();
    let log = d.dir().join("counter.log");
    let counter = workload_bin("counter");
    let jid = "out1";
    let out = d.ok(&["run", "process", "--jid", jid, "--out", log.to_str().unwrap(), "--", counter.to_str().unwrap()]);
    let pid = printed_pid(&out).to_string();
    // `run` too: the job id and PID first, the tree after, ending in the total.
    assert_eq!(out.lines().next(), Some(format!("{jid} {pid}").as_str()), "{out}");
    assert_timings_end_in_total(&out, "total");
    wait_for_count(&log, 3, T);
    let with = |args: &[&str], profiling: Option<&str>| {
        let mut cmd = d.command(args);
        if let Some(p) = profiling {
            cmd.env("CEDANA_PROFILING_ENABLED", p);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{args:?}: {}\n{}", String::from_utf8_lossy(&out.stderr), d.log());
        String::from_utf8_lossy(&out.stdout).into_owned()
    };

    // `dump process` answered by the daemon.
    let out = with(&["dump", "process", &pid, "--leave-running", "--name", "viad"], None);
    assert_eq!(dumped_path(&out), d.checkpoints().join("viad.tar"), "{out}");
    assert_timings_end_in_total(&out, "criu dump");
    let v = json(&with(&["dump", "process", &pid, "--leave-running", "--name", "viaj", "--output", "json"], None));
    assert_eq!(v["path"], d.checkpoints().join("viaj.tar").to_str().unwrap());
    assert!(v["timings_ms"]["total"].as_f64().is_some_and(|t| t > 0.0), "{v}");

    // `dump job` / `restore job`, in each format.
    let out = with(&["dump", "job", jid], Some("false"));
    assert_no_timings(&out);
    assert!(out.starts_with(&format!("Dumped job {jid} (PID {pid}, counter) to ")), "{out}");
    dumped_path(&out);
    let out = with(&["restore", "job", jid], None);
    assert!(out.starts_with(&format!("Restored job {jid} as PID {pid} (verify ")), "{out}");
    assert_timings_end_in_total(&out, "criu restore");
    let v = json(&with(&["dump", "job", jid, "--output", "json"], None));
    assert_eq!(v["job_id"], jid);
    assert!(Path::new(v["path"].as_str().unwrap_or_default()).is_file(), "{v}");
    let v = json(&with(&["restore", "job", jid, "--json"], None));
    assert_eq!((v["job_id"].as_str(), v["pid"].to_string()), (Some(jid), pid.clone()), "{v}");
    let out = with(&["dump", "job", jid], None);
    assert_timings_end_in_total(&out, "criu dump");
    assert!(dumped_path(&out).starts_with(d.checkpoints()), "{out}");
    // The job is halted: nothing of it outlives the test.
    d.wait_status(jid, &["halted"]);

    // `run` with profiling off prints the job id and PID only.
    let out = with(&["run", "process", "--jid", "quiet", "--", "/bin/sleep", "30"], Some("false"));
    assert_no_timings(&out);
    assert_eq!(out.lines().count(), 1, "{out}");
    let quiet = printed_pid(&out);
    with(&["job", "kill", "quiet"], None);
    wait_for(&format!("PID {quiet} to end"), T, || (!alive(quiet)).then_some(()));
}

#[test]
fn check_full_prints_one_table_of_everything_and_passes_here() {
    require_root();
    let out = cedana_cmd(&["check", "--full"]).output().unwrap();
    let text = success_stdout("cedana check --full", &out);
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or_default().split_whitespace().collect();
    assert_eq!(header, ["COMPONENT", "STATUS", "DETAIL"], "{text}");
    let status = |component: &str| -> String {
        text.lines()
            .find_map(|l| l.trim_start().strip_prefix(component).filter(|rest| rest.starts_with("  ")))
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("no row {component} in\n{text}"))
            .to_string()
    };
    for required in ["criu", "criu check", "privileges", "storage", "runc", "containerd"] {
        assert_eq!(status(required), "ok", "{required}:\n{text}");
    }
    // No GPU on these machines: reported as none, which is no failure.
    assert!(["none", "ok"].contains(&status("gpu").as_str()), "{text}");
    // This kernel has no soft-dirty tracking (FIELD-NOTES): an optional feature, off.
    assert!(["off", "ok"].contains(&status("feature mem_dirty_track").as_str()), "{text}");
    assert_eq!(status("feature uffd-noncoop"), "ok", "{text}");
}

#[test]
fn a_reader_that_stops_early_ends_the_command_quietly() {
    // `cedana features | head -n 0`, made certain: stdout is a pipe whose reader is already gone, so the
    // first write fails with EPIPE. The command must end as a Unix tool does, by SIGPIPE, not by a panic.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = cedana_integration::cedana_cmd(&["features"]).stdout(writer).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked") && !stderr.contains("Broken pipe"), "{stderr}");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "ended by SIGPIPE: {:?}", out.status);
}
