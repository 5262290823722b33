//! `cedana dump process` / `restore process` against the real CRIU: each workload is dumped, killed by the
//! dump, restored, and must continue from where it was (its state, not just its liveness).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use cedana_integration::workload::{session_command, Workload};
use cedana_integration::*;
use nix::sys::signal::Signal;

const COMPRESSIONS: [(&str, &str); 6] =
    [("none", ""), ("tar", ".tar"), ("gzip", ".tar.gz"), ("lz4", ".tar.lz4"), ("zlib", ".tar.zlib"), ("zstd", ".tar.zst")];

fn numbers(lines: &[String], field: usize) -> Vec<i64> {
    lines.iter().map(|l| l.split_whitespace().nth(field).and_then(|v| v.parse().ok()).expect(l)).collect()
}

fn assert_consecutive(values: &[i64], what: &str) {
    for (i, w) in values.windows(2).enumerate() {
        assert_eq!(w[1], w[0] + 1, "{what}: value {} follows {} at line {} (restart or gap)", w[1], w[0], i + 2);
    }
    assert_eq!(values.first(), Some(&1), "{what} must start at 1");
}

/// Dump `w`, check it died, restore, and return the number of log lines at dump time.
fn dump_and_restore(w: &mut Workload, dir: &std::path::Path, name: &str, extra: &[&str]) -> usize {
    let pid = w.pid.to_string();
    let mut args = vec!["dump", "process", &pid, "--dir", dir.to_str().unwrap(), "--name", name];
    args.extend_from_slice(extra);
    let out = cedana_ok(&args);
    assert!(out.contains(&format!("Dumped PID {pid}")), "{out}");
    w.reap();
    assert!(!alive(w.pid), "the dump must stop the process");
    let at_dump = w.lines().len();
    let path = out.lines().next().and_then(|l| l.rsplit(" to ").next()).expect("checkpoint path").to_string();
    assert!(std::path::Path::new(&path).exists(), "{path}");
    let restored = cedana_ok(&["restore", "process", "--path", &path]);
    assert!(restored.contains(&format!("Restored PID {pid}")), "{restored}");
    at_dump
}

#[test]
fn counter_continues_after_restore_with_every_compression() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let mut w = Workload::start(&workload_bin("counter"), &[], dir.path());
    w.wait_lines(5);
    for (c, ext) in COMPRESSIONS {
        let name = format!("counter-{c}");
        let at_dump = dump_and_restore(&mut w, dir.path(), &name, &["--compression", c]);
        assert!(dir.path().join(format!("{name}{ext}")).exists(), "{c}: expected {name}{ext}");
        let lines = w.wait_lines(at_dump + 5);
        assert_consecutive(&numbers(&lines, 0), &format!("counter after a {c} restore"));
    }
    // No temporary files are left next to the checkpoints.
    let hidden: Vec<_> =
        std::fs::read_dir(dir.path()).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().starts_with('.')).collect();
    assert!(hidden.is_empty(), "left-over temporary files: {hidden:?}");
}

#[test]
fn multithreaded_program_keeps_its_threads_and_counters() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let mut w = Workload::start(&workload_bin("threads"), &[], dir.path());
    w.wait_lines(10);
    let at_dump = dump_and_restore(&mut w, dir.path(), "threads", &["--compression", "zstd"]);
    let lines = w.wait_lines(at_dump + 10);
    assert_consecutive(&numbers(&lines, 1), "ticks");
    for t in 0..4 {
        let c = numbers(&lines, 2 + t);
        assert!(c.windows(2).all(|w| w[1] >= w[0]), "thread {t}'s counter went backwards: {c:?}");
        assert!(c[lines.len() - 1] > c[at_dump - 1], "thread {t} did not run after the restore");
    }
    let threads = std::fs::read_dir(format!("/proc/{}/task", w.pid)).unwrap().count();
    assert_eq!(threads, 5, "main thread and four workers");
}

#[test]
fn parent_child_and_pipe_are_restored_together() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let mut w = Workload::start(&workload_bin("tree"), &[], dir.path());
    let first = w.wait_lines(5);
    let child: i32 = first[0].rsplit(' ').next().unwrap().parse().unwrap();
    let at_dump = dump_and_restore(&mut w, dir.path(), "tree", &["--compression", "lz4"]);
    let lines = w.wait_lines(at_dump + 10);
    assert_consecutive(&numbers(&lines, 1), "values sent through the pipe");
    assert!(lines.iter().all(|l| l.ends_with(&format!("from {child}"))), "the child keeps its PID");
    assert!(alive(child), "the child was restored");
    let out = cedana_ok(&["checkpoint", "inspect", dir.path().join("tree.tar.lz4").to_str().unwrap()]);
    assert!(out.contains("2 process(es)"), "{out}");
}

#[test]
fn memory_of_256_mib_is_restored_bit_for_bit() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let mut w = Workload::start(&workload_bin("memory"), &["256"], dir.path());
    let before = w.wait_lines(1)[0].clone();
    assert!(before.starts_with("sum "), "{before}");
    // A folder (hashed while CRIU writes it) and a compressed file.
    for (round, c) in ["none", "zstd"].into_iter().enumerate() {
        dump_and_restore(&mut w, dir.path(), &format!("memory-{c}"), &["--compression", c]);
        w.signal(Signal::SIGUSR1);
        let lines = w.wait_lines(round + 2);
        assert_eq!(lines[round + 1], before, "{c}: the checksum of the restored memory differs");
    }
    cedana_ok(&["checkpoint", "inspect", "--verify", dir.path().join("memory-none").to_str().unwrap()]);
    let size = std::fs::metadata(dir.path().join("memory-zstd.tar.zst")).unwrap().len();
    assert!(size < 200 << 20, "half the memory is repetitive: zstd must shrink it ({size} bytes)");
}

#[test]
fn established_tcp_connection_needs_the_flag_and_then_survives() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let mut w = Workload::start(&workload_bin("tcp"), &[], dir.path());
    w.wait_lines(3);
    let pid = w.pid.to_string();
    let err = cedana_err(&["dump", "process", &pid, "--dir", dir.path().to_str().unwrap(), "--name", "no-flag"]);
    assert!(err.contains("--tcp-established"), "the error must name the flag: {err}");
    assert!(alive(w.pid), "a refused dump leaves the process running");
    let n = w.lines().len();
    w.wait_lines(n + 3);
    let at_dump = dump_and_restore(&mut w, dir.path(), "tcp", &["--tcp-established", "--compression", "zstd"]);
    let lines = w.wait_lines(at_dump + 10);
    assert_consecutive(&numbers(&lines, 1), "pongs over the restored connection");
    let inspect = cedana_ok(&["checkpoint", "inspect", dir.path().join("tcp.tar.zst").to_str().unwrap()]);
    assert!(inspect.contains("tcp-established"), "the restore option is recorded: {inspect}");
}

#[test]
fn shell_jobs_are_detected() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let mut w = Workload::start_as_shell_job(&workload_bin("counter"), &[], dir.path());
    w.wait_lines(3);
    let pid = w.pid.to_string();
    let out = cedana_ok(&["dump", "process", &pid, "--dir", dir.path().to_str().unwrap(), "--name", "job"]);
    assert!(out.contains("--shell-job"), "{out}");
    w.reap();
    let at_dump = w.lines().len();
    cedana_ok(&["restore", "process", "--path", dir.path().join("job.tar").to_str().unwrap()]);
    let lines = w.wait_lines(at_dump + 5);
    assert_consecutive(&numbers(&lines, 0), "shell job counter");
}

#[test]
fn leave_running_keeps_the_process_and_restore_refuses_its_pid() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    // The memory workload writes its log once, so the file CRIU recorded keeps its size after the dump.
    let mut w = Workload::start(&workload_bin("memory"), &["16"], dir.path());
    let before = w.wait_lines(1)[0].clone();
    let pid = w.pid.to_string();
    let d = dir.path().to_str().unwrap();
    cedana_ok(&["dump", "process", &pid, "--dir", d, "--name", "lr", "--leave-running", "--compression", "zstd"]);
    assert!(alive(w.pid), "--leave-running keeps the process");
    w.signal(Signal::SIGUSR1);
    assert_eq!(w.wait_lines(2)[1], before, "the process still works after the dump");
    let path = dir.path().join("lr.tar.zst");
    let err = cedana_err(&["restore", "process", "--path", path.to_str().unwrap()]);
    assert!(err.contains(&format!("PID {pid} is in use")), "{err}");
    w.signal(Signal::SIGKILL);
    w.reap();
    // The log grew by one line since the dump: CRIU refuses a changed file, and says so.
    let err = cedana_err(&["restore", "process", "--path", path.to_str().unwrap()]);
    assert!(err.contains("changed size since the dump"), "{err}");
    let log = std::fs::OpenOptions::new().write(true).open(&w.log).unwrap();
    log.set_len(before.len() as u64 + 1).unwrap();
    cedana_ok(&["restore", "process", "--path", path.to_str().unwrap()]);
    assert!(alive(w.pid));
    w.signal(Signal::SIGUSR1);
    let lines = w.wait_lines(2);
    assert_eq!(lines[1], before);
}

#[test]
fn no_server_restore_passes_stdio_through_and_returns_the_exit_code() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let mut child = session_command(&workload_bin("counter")).args(["100", "7"]).stdout(Stdio::piped()).spawn().unwrap();
    let pid = child.id().to_string();
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    let mut seen = Vec::new();
    for _ in 0..10 {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        seen.push(line.trim().parse::<i64>().unwrap());
    }
    let d = dir.path().to_str().unwrap();
    cedana_ok(&["dump", "process", &pid, "--dir", d, "--name", "ns", "--compression", "zstd"]);
    child.wait().unwrap();
    // Whatever the original wrote before the dump is still in our pipe.
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut reader, &mut rest).unwrap();
    seen.extend(rest.lines().map(|l| l.parse::<i64>().unwrap()));
    let out = Command::new(bin("cedana"))
        .args(["restore", "process", "--path", dir.path().join("ns.tar.zst").to_str().unwrap(), "--no-server"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(7), "exit code of the restored program; stderr: {}", String::from_utf8_lossy(&out.stderr));
    seen.extend(String::from_utf8_lossy(&out.stdout).lines().map(|l| l.parse::<i64>().unwrap()));
    assert_eq!(seen, (1..=100).collect::<Vec<_>>(), "the restored program's output arrives on our stdout");
}

#[test]
fn pid_file_and_log_of_a_detached_restore() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let mut child = session_command(&workload_bin("counter")).stdout(Stdio::piped()).spawn().unwrap();
    let pid = child.id() as i32;
    std::thread::sleep(Duration::from_millis(200));
    let d = dir.path().to_str().unwrap();
    cedana_ok(&["dump", "process", &pid.to_string(), "--dir", d, "--name", "pf", "--compression", "none"]);
    child.wait().unwrap();
    let pid_file = dir.path().join("restored.pid");
    let log = dir.path().join("restored.log");
    let ckpt = dir.path().join("pf");
    cedana_ok(&[
        "restore",
        "process",
        "--path",
        ckpt.to_str().unwrap(),
        "--pid-file",
        pid_file.to_str().unwrap(),
        "--log",
        log.to_str().unwrap(),
    ]);
    assert_eq!(std::fs::read_to_string(&pid_file).unwrap().trim(), pid.to_string());
    let lines = wait_for("output in the restore log", Duration::from_secs(10), || {
        let t = std::fs::read_to_string(&log).unwrap_or_default();
        (t.lines().count() >= 3).then_some(t)
    });
    let first: i64 = lines.lines().next().unwrap().parse().unwrap();
    assert!(first > 1, "the restored counter continues instead of restarting: {first}");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(-pid), Signal::SIGKILL).ok();
}

/// Archives are plain tar streams for the formats' own tools, page images first (packed while CRIU wrote
/// them, their headers filled in afterwards), and raw CRIU restores what the tools extract.
#[test]
fn archives_extract_with_standard_tools_and_restore_with_raw_criu() {
    require_root();
    let criu = ["/usr/local/sbin/criu", "/opt/cedana/criu/criu"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("CRIU (run scripts/setup.sh)");
    let dir = tempfile::tempdir().unwrap();
    let mut w = Workload::start(&workload_bin("memory"), &["64"], dir.path());
    let sum = w.wait_lines(1)[0].clone();
    let mut printed = 1;
    let sh = |script: String| {
        let out = Command::new("sh").arg("-c").arg(&script).output().unwrap();
        assert!(out.status.success(), "{script}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // There is no zlib command: Python's zlib module (the system's zlib, which checks the stream's adler32).
    let zlib = "python3 -c 'import sys, zlib; sys.stdout.buffer.write(zlib.decompress(sys.stdin.buffer.read()))'";
    for (c, tool) in [("zstd", "zstd -dc"), ("lz4", "lz4 -dc"), ("gzip", "gzip -dc"), ("zlib", zlib), ("tar", "cat")] {
        let pid = w.pid.to_string();
        let out = cedana_ok(&["dump", "process", &pid, "--dir", dir.path().to_str().unwrap(), "--name", c, "--compression", c]);
        let path = out.lines().next().and_then(|l| l.rsplit(" to ").next()).expect("checkpoint path").to_string();
        w.reap();
        wait_for("the dumped PID to be free", Duration::from_secs(20), || {
            (!std::path::Path::new(&format!("/proc/{pid}")).exists()).then_some(())
        });
        let listing = sh(format!("{tool} < '{path}' | tar -tf -"));
        let names: Vec<&str> = listing.lines().collect();
        assert!(names[0].starts_with("pages-") && names[0].ends_with(".img"), "{c}: {names:?}");
        assert_eq!(names.last(), Some(&"manifest.json"), "{c}");
        let x = dir.path().join(format!("extracted-{c}"));
        std::fs::create_dir(&x).unwrap();
        sh(format!("{tool} < '{path}' | tar -xf - -C '{}'", x.display()));
        let restored =
            Command::new(criu).arg("restore").arg("-d").arg("-D").arg(&x).args(["-o", "restore.log"]).status().unwrap();
        assert!(restored.success(), "{c}: raw criu restore failed, see {}", x.join("restore.log").display());
        w.signal(Signal::SIGUSR1);
        printed += 1;
        assert_eq!(w.wait_lines(printed)[printed - 1], sum, "{c}: memory after a raw CRIU restore");
    }
}
