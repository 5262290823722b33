//! Pass-through fidelity: the same lifecycle, successful and failing commands alike, through plain runc and
//! through cedana-runc, must give the same exit codes, the same stdout and stderr, and the same JSON log
//! messages (after masking PIDs and timestamps).
//! Run as root: `cargo test -p cedana-integration --test wrapper_fidelity -- --test-threads=1`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cedana_integration::engines::piped;
use cedana_integration::images::Bundle;
use cedana_integration::{bin, require_root, wait_for};

/// Steps that cedana-runc carries out itself instead of passing them through.
const INTERCEPTED: [&str; 1] = ["checkpoint of a missing container"];

/// What one command did.
#[derive(Debug, PartialEq)]
struct Record {
    step: String,
    code: Option<i32>,
    stdout: String,
    stderr: String,
    log: Vec<String>,
}

/// Digit runs → `N` (PIDs, times, sizes).
fn mask_numbers(s: &str) -> String {
    let mut out = String::new();
    let mut in_digits = false;
    for c in s.chars() {
        if c.is_ascii_digit() {
            if !in_digits {
                out.push('N');
            }
            in_digits = true;
        } else {
            out.push(c);
            in_digits = false;
        }
    }
    out
}

/// A JSON value with its `pid` and `created` fields (at any depth) masked.
fn mask_json(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, val) in m.iter_mut() {
                if k == "pid" || k == "created" {
                    *val = "MASKED".into();
                } else {
                    mask_json(val);
                }
            }
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(mask_json),
        _ => {}
    }
}

/// stdout of `ps` with masked numbers and single spaces; JSON with masked fields; anything else as is.
fn normalise_stdout(step: &str, text: &str) -> String {
    if step.starts_with("ps") || step.starts_with("events") {
        // ps pads its columns to the width of the PIDs; events report counters that differ from run to run,
        // and leave out a memory `cache` of zero (it comes and goes with the page cache).
        return mask_numbers(text)
            .replace("\"memory\":{\"cache\":N,", "\"memory\":{")
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect::<Vec<_>>()
            .join("\n");
    }
    if let Ok(mut v) = serde_json::from_str::<serde_json::Value>(text) {
        mask_json(&mut v);
        return v.to_string();
    }
    text.to_string()
}

/// logrus lines on stderr without their `time="..."` field.
fn normalise_stderr(text: &str) -> String {
    text.lines()
        .map(|l| match l.strip_prefix("time=\"").and_then(|r| r.split_once("\" ")) {
            Some((_, rest)) => rest.to_string(),
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

struct Lifecycle {
    binary: PathBuf,
    root: PathBuf,
    log: PathBuf,
    records: Vec<Record>,
}

impl Lifecycle {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.binary);
        c.arg("--root").arg(&self.root).arg("--log").arg(&self.log).args(["--log-format", "json"]).args(args);
        c
    }

    fn take_log(&self) -> Vec<String> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let _ = std::fs::remove_file(&self.log);
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .map(|v| format!("{}: {}", v["level"].as_str().unwrap_or_default(), v["msg"].as_str().unwrap_or_default()))
            .collect()
    }

    /// Run one step to completion and record it.
    fn step(&mut self, step: &str, args: &[&str]) {
        let out = self.cmd(args).stdin(std::process::Stdio::null()).output().expect("run the runtime");
        let stdout = normalise_stdout(step, &String::from_utf8_lossy(&out.stdout));
        let stderr = normalise_stderr(&String::from_utf8_lossy(&out.stderr));
        let log = self.take_log();
        self.records.push(Record { step: step.into(), code: out.status.code(), stdout, stderr, log });
    }
}

/// The lifecycle of one container, plus failing commands, through `binary`.
fn lifecycle(binary: PathBuf, tmp: &Path, bundle: &Path, run_bundle: &Path, id: &str) -> Vec<Record> {
    let mut l = Lifecycle { binary, root: tmp.join("root"), log: tmp.join("log.json"), records: Vec::new() };
    l.step("version", &["--version"]);
    l.step("features", &["features"]);
    l.step("list empty", &["list"]);

    // create keeps the container's stdio: read it from a pipe.
    let mut create = l.cmd(&["create", "--bundle", bundle.to_str().unwrap(), id]);
    let output = piped(&mut create);
    let status = create.status().expect("create");
    l.records.push(Record {
        step: "create".into(),
        code: status.code(),
        stdout: String::new(),
        stderr: String::new(),
        log: l.take_log(),
    });
    l.step("state created", &["state", id]);
    l.step("start", &["start", id]);
    output.wait_for(1, Duration::from_secs(10));
    l.step("state running", &["state", id]);
    l.step("list json", &["list", "--format", "json"]);
    l.step("list -q", &["list", "-q"]);
    l.step("ps", &["ps", id]);
    l.step("ps json", &["ps", "--format", "json", id]);
    l.step("exec", &["exec", id, "echo", "hello"]);
    l.step("exec exit code", &["exec", id, "sh", "-c", "exit 7"]);
    l.step("update", &["update", "--pids-limit", "100", id]);
    l.step("events --stats", &["events", "--stats", id]);
    l.step("pause", &["pause", id]);
    l.step("state paused", &["state", id]);
    l.step("resume", &["resume", id]);
    l.step("kill bad signal", &["kill", id, "NOSUCHSIG"]);
    l.step("kill", &["kill", id, "KILL"]);
    let root = l.root.clone();
    wait_for("the container to stop", Duration::from_secs(10), || {
        let out = Command::new("runc").arg("--root").arg(&root).args(["state", id]).output().ok()?;
        String::from_utf8_lossy(&out.stdout).contains("\"stopped\"").then_some(())
    });
    l.step("state stopped", &["state", id]);
    l.step("delete", &["delete", id]);
    l.records.push(Record {
        step: "container output".into(),
        code: None,
        stdout: output.snapshot().join("\n"),
        stderr: String::new(),
        log: Vec::new(),
    });

    let run_id = format!("{id}-run");
    l.step("run in the foreground", &["run", "--bundle", run_bundle.to_str().unwrap(), &run_id]);
    l.step("state after a foreground run", &["state", &run_id]);

    // Failing commands.
    l.step("state of a missing container", &["state", "no-such-container"]);
    l.step("start of a missing container", &["start", "no-such-container"]);
    l.step("kill of a missing container", &["kill", "no-such-container", "KILL"]);
    l.step("delete of a missing container", &["delete", "no-such-container"]);
    l.step("pause of a missing container", &["pause", "no-such-container"]);
    l.step("events of a missing container", &["events", "--stats", "no-such-container"]);
    l.step("create from a missing bundle", &["create", "--bundle", "/nonexistent/bundle", "x1"]);
    l.step(
        "checkpoint of a missing container",
        &["checkpoint", "--image-path", tmp.join("i").to_str().unwrap(), "no-such-container"],
    );
    l.step("checkpoint with an unknown flag", &["checkpoint", "--bogus", "no-such-container"]);
    l.step(
        "restore from missing images",
        &["restore", "--image-path", "/nonexistent/images", "--bundle", bundle.to_str().unwrap(), "x2"],
    );
    l.step("unknown command", &["frobnicate"]);
    l.step("unknown global flag", &["--bogus", "list"]);
    l.records
}

#[test]
fn runc_and_cedana_runc_behave_the_same() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let bundle = Bundle::busybox(&tmp.path().join("bundle"), &["sh", "-c", "echo started; sleep 1000"]);
    let id = format!("ced-fidelity-{}", std::process::id());
    let run_bundle = Bundle::busybox(&tmp.path().join("run-bundle"), &["sh", "-c", "echo ran; exit 3"]);
    let plain = tmp.path().join("plain");
    let wrapped = tmp.path().join("wrapped");
    std::fs::create_dir_all(&plain).unwrap();
    std::fs::create_dir_all(&wrapped).unwrap();
    let expected = lifecycle(PathBuf::from("runc"), &plain, &bundle.dir, &run_bundle.dir, &id);
    let got = lifecycle(bin("cedana-runc"), &wrapped, &bundle.dir, &run_bundle.dir, &id);

    // The lifecycle did what it should (so that equal outputs mean something).
    let by = |step: &str| expected.iter().find(|r| r.step == step).unwrap();
    assert_eq!(by("exec").stdout, "hello\n");
    assert_eq!(by("exec exit code").code, Some(7));
    assert_eq!((by("run in the foreground").code, by("run in the foreground").stdout.as_str()), (Some(3), "ran\n"));
    assert_eq!(by("state after a foreground run").code, Some(1), "a foreground run deletes its container");
    assert!(by("events --stats").stdout.contains("\"type\":\"stats\""), "{:?}", by("events --stats"));
    assert!(by("state paused").stdout.contains("\"paused\""));
    assert!(by("container output").stdout.contains("started"));
    assert_eq!(by("state of a missing container").code, Some(1));
    assert!(by("kill bad signal").log.iter().any(|l| l.starts_with("error:")), "{:?}", by("kill bad signal"));

    for (e, g) in expected.iter().zip(&got) {
        let plain_root = plain.join("root").display().to_string();
        let wrapped_root = wrapped.join("root").display().to_string();
        let g_stdout = g.stdout.replace(&wrapped_root, &plain_root);
        let g_stderr = g.stderr.replace(&wrapped_root, &plain_root);
        let g_log: Vec<String> = g.log.iter().map(|l| l.replace(&wrapped_root, &plain_root)).collect();
        let e_log: Vec<String> = e.log.iter().map(|l| l.replace(&plain.display().to_string(), "TMP")).collect();
        let g_log: Vec<String> = g_log.iter().map(|l| l.replace(&wrapped.display().to_string(), "TMP")).collect();
        if INTERCEPTED.contains(&e.step.as_str()) {
            // Handled by cedana-runc itself: runc's exit code, and runc's message within ours.
            assert_eq!((e.code, &e.stdout), (g.code, &g_stdout), "step {:?}", e.step);
            assert!(g_stderr.contains(&e.stderr), "step {:?}: {g_stderr:?} must contain runc's {:?}", e.step, e.stderr);
            let (Some(el), Some(gl)) = (e_log.last(), g_log.last()) else { panic!("step {:?}: no log line", e.step) };
            assert!(
                gl.starts_with("error: cedana-runc: ") && gl.contains(el.trim_start_matches("error: ")),
                "step {:?}: {gl:?} vs {el:?}",
                e.step
            );
        } else {
            assert_eq!((e.code, &e.stdout, &e.stderr), (g.code, &g_stdout, &g_stderr), "step {:?}", e.step);
            assert_eq!(e_log, g_log, "json log of step {:?}", e.step);
        }
    }
    assert_eq!(expected.len(), got.len());

    // spec writes the same config.json.
    for dir in [&plain, &wrapped] {
        std::fs::create_dir_all(dir.join("spec")).unwrap();
    }
    assert!(Command::new("runc").args(["spec", "--bundle"]).arg(plain.join("spec")).status().unwrap().success());
    assert!(Command::new(bin("cedana-runc")).args(["spec", "--bundle"]).arg(wrapped.join("spec")).status().unwrap().success());
    assert_eq!(std::fs::read(plain.join("spec/config.json")).unwrap(), std::fs::read(wrapped.join("spec/config.json")).unwrap());
}

/// Each step's name and exit code, and per restore the counter's first numbers relative to the last one
/// before the checkpoint.
type Cycles = (Vec<(String, Option<i32>)>, Vec<Vec<u64>>);

/// Checkpoint, restore, checkpoint again into the same image path, restore again, through `binary`.
fn checkpoint_cycles(binary: PathBuf, tmp: &Path, cid: &str) -> Cycles {
    use cedana_integration::engines::RuncRoot;
    use cedana_integration::lines::numbers;
    let t = Duration::from_secs(20);
    let runc = RuncRoot::new(tmp, binary);
    let (bundle, mut out) = runc.run_counter(tmp, cid, 3, t);
    let images = tmp.join("images");
    let mut steps = Vec::new();
    let mut continued = Vec::new();
    let mut current = cid.to_string();
    for round in 1..=2 {
        let status = runc.cmd(&["checkpoint", "--image-path", images.to_str().unwrap(), &current]).status().unwrap();
        steps.push((format!("checkpoint {round}"), status.code()));
        let last = *numbers(&out.wait_closed(t)).last().expect("output before the checkpoint");
        let restored = format!("{cid}-r{round}");
        runc.track(&restored);
        let mut cmd = runc.cmd(&[
            "restore",
            "-d",
            "--image-path",
            images.to_str().unwrap(),
            "--bundle",
            bundle.dir.to_str().unwrap(),
            &restored,
        ]);
        out = piped(&mut cmd);
        steps.push((format!("restore {round}"), cmd.status().unwrap().code()));
        let got = out.wait_numbers(3, t);
        assert_eq!(got[0], last + 1, "{}: round {round} must continue from {last}: {got:?}", runc.binary.display());
        continued.push(got[..3].iter().map(|n| n - last).collect());
        current = restored;
    }
    steps.push(("state after the cycles".into(), runc.run(&["state", &current]).status.code()));
    (steps, continued)
}

#[test]
fn a_second_checkpoint_into_the_same_image_path_replaces_the_first_as_with_runc() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let (plain, wrapped) = (tmp.path().join("plain"), tmp.path().join("wrapped"));
    std::fs::create_dir_all(&plain).unwrap();
    std::fs::create_dir_all(&wrapped).unwrap();
    let cid = format!("ced-recheckpoint-{}", std::process::id());
    let expected = checkpoint_cycles(PathBuf::from("runc"), &plain, &cid);
    let got = checkpoint_cycles(bin("cedana-runc"), &wrapped, &cid);
    assert!(expected.0.iter().all(|(_, code)| *code == Some(0)), "runc: {:?}", expected.0);
    assert_eq!(expected, got, "the same steps, exit codes and continuations");
    assert_eq!(expected.1, [[1, 2, 3], [1, 2, 3]]);
    let ours: Vec<String> = std::fs::read_dir(wrapped.join("images"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".log") && !n.starts_with("stats-"))
        .collect();
    assert_eq!(ours, ["cedana-checkpoint.tar.zst"], "one checkpoint, nothing left of the first");
}

/// What one binary did with the image paths of [`image_path_steps`]: per step its exit code, whether the
/// container was still running after it, and the error's key words (stderr lower-cased, digits masked).
type PathSteps = Vec<(String, Option<i32>, Option<String>, bool)>;

/// Checkpoints into an image path that is a file (refused, container running), into a relative path whose
/// parent does not exist yet (created, as runc's `mkdir -p`), with a relative work path; restores from the
/// relative path, which is relative to the bundle (the counter continues) and from a missing one (refused).
fn image_path_steps(binary: PathBuf, tmp: &Path, cid: &str) -> PathSteps {
    use cedana_integration::engines::RuncRoot;
    use cedana_integration::lines::numbers;
    let t = Duration::from_secs(20);
    let runc = RuncRoot::new(tmp, binary);
    let (bundle, mut out) = runc.run_counter(tmp, cid, 3, t);
    let file = tmp.join("a-file");
    std::fs::write(&file, "not a folder").unwrap();
    let mut steps = Vec::new();
    let record = |step: &str, cmd: &mut Command, id: &str| {
        let o = cmd.current_dir(tmp).stdin(std::process::Stdio::null()).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr).to_lowercase();
        let words = ["not a directory", "no such file"].into_iter().find(|w| err.contains(w)).map(str::to_string);
        let running = runc.status(id).as_deref() == Some("running");
        (step.to_string(), o.status.code(), words, running)
    };
    steps.push(record(
        "checkpoint into a file",
        &mut runc.cmd(&["checkpoint", "--image-path", file.to_str().unwrap(), cid]),
        cid,
    ));
    let relative = ["checkpoint", "--image-path", "new/images", "--work-path", "work", cid];
    steps.push(record("checkpoint into a new relative path", &mut runc.cmd(&relative), cid));
    let last = *numbers(&out.wait_closed(t)).last().expect("output before the checkpoint");
    assert!(tmp.join("new/images").is_dir() && tmp.join("work").is_dir(), "{}", runc.binary.display());
    let restored = format!("{cid}-r");
    runc.track(&restored);
    // Run from the bundle: runc resolves a relative image path partly from the working folder and partly
    // from the bundle, so a relative path works when the two are one.
    let mut cmd =
        runc.cmd(&["restore", "-d", "--image-path", "../new/images", "--bundle", bundle.dir.to_str().unwrap(), &restored]);
    out = piped(cmd.current_dir(&bundle.dir));
    let code = cmd.status().unwrap().code();
    let got = out.wait_numbers(2, t);
    assert_eq!(got[0], last + 1, "{}: the restore continues from {last}: {got:?}", runc.binary.display());
    steps.push(("restore from the relative path".into(), code, None, runc.status(&restored).as_deref() == Some("running")));
    let missing = format!("{cid}-m");
    runc.track(&missing);
    let args = ["restore", "-d", "--image-path", "missing", "--bundle", bundle.dir.to_str().unwrap(), &missing];
    steps.push(record("restore from a missing path", &mut runc.cmd(&args), &missing));
    steps
}

#[test]
fn image_and_work_paths_are_taken_as_runc_takes_them() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let (plain, wrapped) = (tmp.path().join("plain"), tmp.path().join("wrapped"));
    std::fs::create_dir_all(&plain).unwrap();
    std::fs::create_dir_all(&wrapped).unwrap();
    let cid = format!("ced-paths-{}", std::process::id());
    let expected = image_path_steps(PathBuf::from("runc"), &plain, &cid);
    let got = image_path_steps(bin("cedana-runc"), &wrapped, &cid);
    assert_eq!(expected[0], ("checkpoint into a file".into(), Some(1), Some("not a directory".into()), true));
    assert_eq!(expected[1].1, Some(0), "runc: {expected:?}");
    assert_eq!(expected, got, "the same exit codes, errors and container states");
}
