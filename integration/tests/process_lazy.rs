//! Lazy restores (`cedana restore process --lazy`): the program runs before its memory has arrived; our
//! lazy-pages handler fills it on demand and then in the background, reading the page images out of the
//! checkpoint (a folder, an uncompressed archive, or a compressed one by its 8 MiB units), and follows the
//! program's forks, mremaps and madvises meanwhile. The memory comes back whole, nothing of the restore is left running, a checkpoint compressed in
//! one stream (zlib as written before it had units) is refused before anything runs,
//! and a damaged page image ends the restored program. From an object store (moto, started on 127.0.0.1),
//! the pages are read by ranged reads as the program needs them; a store that dies half-way ends it. A lazy
//! restore records where the program touched its memory, and the next one brings those pages first.

use std::path::Path;
use std::time::Duration;

use cedana_integration::workload::Workload;
use cedana_integration::*;
use nix::sys::signal::Signal;

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out.lines().last().unwrap_or_default()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// Dump `w` into `dir` as `name`; the checkpoint's path.
fn dump(w: &Workload, dir: &Path, name: &str, compression: &str) -> String {
    let pid = w.pid.to_string();
    let args = ["dump", "process", &pid, "--dir", dir.to_str().unwrap(), "--name", name, "--compression", compression];
    let out = json(&cedana_ok(&[&args[..], &["--output", "json"]].concat()));
    out["path"].as_str().unwrap().to_string()
}

/// Wait until the dumped PID is free, and cut the log back to its line of dump time (CRIU checks the size
/// of open files).
fn prepare_restore(w: &Workload, sum: &str) {
    wait_for("the dumped PID to be free", Duration::from_secs(10), || (!alive(w.pid)).then_some(()));
    std::fs::OpenOptions::new().write(true).open(&w.log).unwrap().set_len(sum.len() as u64 + 1).unwrap();
}

/// Children of this process whose command is CRIU (left behind by a restore).
fn criu_children() -> Vec<i32> {
    let me = std::process::id().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let after = stat.rsplit_once(") ").map(|(_, r)| r.to_string()).unwrap_or_default();
            stat.contains("(criu)") && after.split_whitespace().nth(1) == Some(me.as_str())
        })
        .collect()
}

fn adopt_orphans() {
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes plain integers.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
}

fn end(w: &mut Workload) {
    w.signal(Signal::SIGKILL);
    w.reap();
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(w.pid), None);
}

#[test]
fn a_lazy_restore_brings_the_whole_memory_back_from_a_tar_a_folder_or_compressed_units() {
    require_root();
    adopt_orphans();
    let work = tempfile::tempdir().unwrap();
    for compression in ["tar", "none", "lz4", "gzip", "zlib", "zstd"] {
        let mut w = Workload::start(&workload_bin("memory"), &["64"], work.path());
        let sum = w.wait_lines(1)[0].clone();
        let path = dump(&w, work.path(), &format!("lazy-{compression}"), compression);
        w.reap();
        prepare_restore(&w, &sum);
        let out = json(&cedana_ok(&["restore", "process", "--path", &path, "--lazy", "--output", "json"]));
        assert_eq!(out["pid"], w.pid, "{out}");
        let timings = &out["timings_ms"];
        assert!(timings["lazy pages"].as_f64().is_some(), "the transfer is timed as its own phase: {out}");
        let lazy = &out["lazy"];
        let (running, local) = (lazy["running_after_ms"].as_f64().unwrap(), lazy["local_after_ms"].as_f64().unwrap());
        assert!(running > 0.0 && running < local, "running before wholly local: {out}");
        assert!(lazy["pages"].as_u64().unwrap() >= 64 * 256, "the 64 MiB came through the handler: {out}");
        assert!(alive(w.pid), "{compression}: restored");
        assert!(criu_children().is_empty(), "no CRIU left: {:?}", criu_children());
        w.signal(Signal::SIGUSR1);
        assert_eq!(w.wait_lines(2)[1], sum, "{compression}: every page came back");
        end(&mut w);
    }
}

#[test]
fn a_program_that_forks_moves_and_drops_its_memory_while_it_arrives_keeps_every_page() {
    require_root();
    adopt_orphans();
    let work = tempfile::tempdir().unwrap();
    let mut w = Workload::start(&workload_bin("memory"), &["256"], work.path());
    let sum = w.wait_lines(1)[0].clone();
    let path = dump(&w, work.path(), "reshape", "zstd");
    w.reap();
    prepare_restore(&w, &sum);
    let restore = cedana_cmd(&["restore", "process", "--path", &path, "--lazy", "--output", "json"])
        .env("RUST_LOG", "info,cedana::criu::uffd=debug")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // As soon as it runs (its 256 MiB still arriving from the compressed units): fork, mremap, madvise.
    wait_for("the restored program to run", Duration::from_secs(30), || alive(w.pid).then_some(()));
    w.signal(Signal::SIGUSR2);
    let out = restore.wait_with_output().unwrap();
    // The restore's log (the handler's events at debug level), for a failure's message.
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    let out = json(&success_stdout("cedana restore process --lazy", &out));
    let lines = w.wait_lines(4);
    assert_eq!(lines[1], sum, "the child forked while pages were missing read them all: {lines:?}\n{log}");
    assert_eq!(lines[2], sum, "the moved memory kept its pages: {lines:?}\n{log}");
    assert_eq!(lines[3], "zeros ok", "memory dropped with madvise read as zeros: {lines:?}\n{log}");
    assert!(out["lazy"]["pages"].as_u64().unwrap() > 0, "{out}");
    w.signal(Signal::SIGUSR1);
    assert_eq!(w.wait_lines(5)[4], sum, "every page is in place once the transfer is over");
    end(&mut w);
}

#[test]
fn a_checkpoint_in_one_stream_is_refused_and_a_damaged_page_image_ends_the_program() {
    require_root();
    adopt_orphans();
    let work = tempfile::tempdir().unwrap();
    let mut w = Workload::start(&workload_bin("memory"), &["32"], work.path());
    let sum = w.wait_lines(1)[0].clone();
    let zlib = dump(&w, work.path(), "z", "zlib");
    zlib_in_one_stream(Path::new(&zlib));
    w.reap();
    prepare_restore(&w, &sum);
    let e = cedana_err(&["restore", "process", "--path", &zlib, "--lazy"]);
    assert!(e.contains("(zlib) in one piece") && e.contains("without --lazy"), "{e}");
    assert!(!alive(w.pid), "nothing was restored");

    // Asked to fall back, the same checkpoint is restored normally.
    let out = cedana_ok(&["restore", "process", "--path", &zlib, "--lazy-fallback"]);
    assert!(alive(w.pid) && !out.contains("Running after"), "restored, not lazily: {out}");

    // A folder checkpoint whose page image was damaged after the dump, in the lazily served part.
    let folder = dump(&w, work.path(), "f", "none");
    // The restored tree was our child (a subreaper's): reap it.
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(w.pid), None);
    prepare_restore(&w, &sum);
    let pages = std::fs::read_dir(&folder)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("pages-"));
    let pages = pages.expect("a page image");
    let mut bytes = std::fs::read(&pages).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0xff;
    std::fs::write(&pages, bytes).unwrap();
    let e = cedana_err(&["restore", "process", "--path", &folder, "--lazy"]);
    // Refused by the check of its 8 MiB chunk, before any page of it was served.
    assert!(e.contains("corrupt") && e.contains("checksum mismatch") && e.contains("(chunk "), "{e}");
    wait_for("the restored program to be ended", Duration::from_secs(10), || (!alive(w.pid)).then_some(()));
    assert!(criu_children().is_empty(), "no CRIU left: {:?}", criu_children());

    // An lz4 archive damaged in its page data: a unit that does not decode, or a chunk that does not match.
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(w.pid), None);
    prepare_restore(&w, &sum);
    cedana_ok(&["restore", "process", "--path", &zlib]);
    let lz4 = dump(&w, work.path(), "l", "lz4");
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(w.pid), None);
    prepare_restore(&w, &sum);
    let mut bytes = std::fs::read(&lz4).unwrap();
    let at = bytes.len() / 3;
    for b in &mut bytes[at..at + 64] {
        *b ^= 0x5a;
    }
    std::fs::write(&lz4, bytes).unwrap();
    let e = cedana_err(&["restore", "process", "--path", &lz4, "--lazy"]);
    assert!(e.contains("pages-") || e.contains("corrupt"), "the error names the damage: {e}");
    wait_for("the restored program to be ended", Duration::from_secs(10), || (!alive(w.pid)).then_some(()));
    assert!(criu_children().is_empty(), "no CRIU left: {:?}", criu_children());
    end(&mut w);
}

#[test]
fn a_lazy_restore_reads_its_pages_from_s3_and_a_store_that_dies_ends_the_program() {
    use cedana_integration::moto::MotoServer;
    require_root();
    adopt_orphans();
    let mut moto = MotoServer::start();
    let work = tempfile::tempdir().unwrap();
    let mut w = Workload::start(&workload_bin("memory"), &["256"], work.path());
    let sum = w.wait_lines(1)[0].clone();
    let pid = w.pid.to_string();
    let dump = cedana_cmd(&["dump", "process", &pid, "--dir", &moto.url("lazy"), "--name", "m", "--compression", "zstd"])
        .envs(moto.env())
        .output()
        .unwrap();
    success_stdout("cedana dump process --dir s3://", &dump);
    let url = moto.url("lazy/m.tar.zst");
    w.reap();
    prepare_restore(&w, &sum);
    let restore = |moto: &MotoServer| {
        cedana_cmd(&["restore", "process", "--path", &url, "--lazy", "--output", "json"])
            .envs(moto.env())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let out = restore(&moto).wait_with_output().unwrap();
    let out = json(&success_stdout("cedana restore process --path s3:// --lazy", &out));
    assert!(out["lazy"]["pages"].as_u64().unwrap() >= 256 * 256, "{out}");
    w.signal(Signal::SIGUSR1);
    assert_eq!(w.wait_lines(2)[1], sum, "every page came back from the store");
    w.signal(Signal::SIGKILL);
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(w.pid), None);

    // The store dies while the pages are still arriving: the restored program is ended, and nothing of the
    // restore is left.
    prepare_restore(&w, &sum);
    let child = restore(&moto);
    wait_for("the restored program to run", Duration::from_secs(30), || alive(w.pid).then_some(()));
    moto.kill();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the restore fails: {stderr}");
    assert!(stderr.contains("serving the lazy pages") && stderr.contains("unreachable"), "the error says why: {stderr}");
    wait_for("the restored program to be ended", Duration::from_secs(10), || (!alive(w.pid)).then_some(()));
    assert!(criu_children().is_empty(), "no CRIU left: {:?}", criu_children());
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(w.pid), None);
}

#[test]
fn the_daemon_restores_a_process_job_lazily_and_refuses_a_checkpoint_in_one_stream() {
    use cedana_integration::daemon::{consecutive, numbers_in, printed_pid, Daemon};
    require_root();
    let d = Daemon::start();
    let log = d.dir().join("counter.log");
    let counter = workload_bin("counter");
    let out = d.ok(&["run", "process", "--jid", "lz", "--out", log.to_str().unwrap(), "--", counter.to_str().unwrap()]);
    let pid = printed_pid(&out);
    let wait_count =
        |n: usize| wait_for("the counter to count", Duration::from_secs(20), || (numbers_in(&log).len() >= n).then_some(()));
    wait_count(3);
    let dumped = d.ok(&["dump", "job", "lz", "--compression", "zlib"]);
    // As zlib checkpoints were before they had units: one stream, not readable in pieces.
    zlib_in_one_stream(Path::new(dumped.trim().lines().last().unwrap().split_whitespace().last().unwrap()));
    wait_for("the dumped PID to be free", Duration::from_secs(10), || {
        (!std::path::Path::new(&format!("/proc/{pid}")).exists()).then_some(())
    });
    let e = d.cedana(&["restore", "job", "lz", "--lazy"]);
    let stderr = String::from_utf8_lossy(&e.stderr);
    assert!(!e.status.success() && stderr.contains("in one piece"), "{stderr}");

    let out = d.ok(&["restore", "job", "lz", "--lazy-fallback"]);
    assert!(!out.contains("Running after"), "restored normally: {out}");
    wait_count(numbers_in(&log).len() + 2);
    d.ok(&["dump", "job", "lz", "--compression", "zstd"]);
    wait_for("the dumped PID to be free", Duration::from_secs(10), || {
        (!std::path::Path::new(&format!("/proc/{pid}")).exists()).then_some(())
    });
    let before = numbers_in(&log).len();
    let out = json(&d.ok(&["restore", "job", "lz", "--lazy", "--output", "json"]));
    assert_eq!(out["pid"], pid, "{out}");
    assert!(out["lazy"]["pages"].as_u64().unwrap() > 0, "the daemon served the pages: {out}");
    let after = {
        wait_count(before + 3);
        numbers_in(&log)
    };
    assert!(consecutive(&after), "the counter goes on where it stopped: {after:?}");
    d.ok(&["job", "kill", "lz"]);
}

#[test]
fn a_runc_container_is_restored_lazily_and_counts_on() {
    use cedana_integration::engines::{piped, RuncRoot};
    use cedana_integration::lines::numbers;
    require_root();
    let t = Duration::from_secs(20);
    let tmp = tempfile::tempdir().unwrap();
    let runc = RuncRoot::new(tmp.path(), "runc");
    let cid = format!("ced-lazy-{}", std::process::id());
    let (bundle, mut out) = runc.run_counter(tmp.path(), &cid, 3, t);
    let dir = tmp.path().join("ckpt");
    runc.cedana_dump_ok(&cid, &dir, &["--name", "c", "--compression", "zstd"]);
    let last = *numbers(&out.wait_closed(t)).last().expect("output before the dump");
    let restored = format!("{cid}-r");
    runc.track(&restored);
    let checkpoint = dir.join("c.tar.zst");
    let mut cmd = std::process::Command::new(bin("cedana"));
    cmd.args(["restore", "runc", "--detach", "--lazy", "--output", "json", "--id", &restored, "--path"])
        .arg(&checkpoint)
        .arg("--root")
        .arg(&runc.root)
        .arg("--bundle")
        .arg(&bundle.dir);
    out = piped(&mut cmd);
    let status = cmd.status().unwrap();
    drop(cmd); // it holds the pipe's write end
    assert!(status.success(), "cedana restore runc --lazy: {:?}", out.snapshot());
    let got = out.wait_numbers(3, t);
    assert_eq!(got[0], last + 1, "continues from {last}: {got:?}");
    let report = out.snapshot().into_iter().find(|l| l.starts_with('{')).expect("the JSON report");
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert!(report["lazy"]["pages"].as_u64().unwrap() > 0, "pages were served lazily: {report}");
    assert!(criu_children().is_empty(), "no CRIU left: {:?}", criu_children());

    // Again, and cedana-runc restores it lazily at `run` from the annotations.
    runc.cedana_dump_ok(&restored, &dir, &["--name", "again", "--compression", "lz4"]);
    let last = *numbers(&out.wait_closed(t)).last().expect("output before the dump");
    let b = cedana_integration::images::Bundle::counter(&tmp.path().join("bundle-annotated"));
    b.annotate("io.cedana.restore", dir.join("again.tar.lz4").to_str().unwrap());
    b.annotate("io.cedana.restore.lazy", "true");
    let id = format!("{cid}-a");
    let wrapped = RuncRoot::new(&tmp.path().join("wrapped"), bin("cedana-runc"));
    wrapped.track(&id);
    let log = tmp.path().join("cedana-runc.log");
    let mut cmd = wrapped.cmd(&["--log", log.to_str().unwrap(), "run", "-d", "--bundle", b.dir.to_str().unwrap(), &id]);
    let lines = piped(&mut cmd);
    let status = cmd.status().unwrap();
    drop(cmd);
    assert!(status.success(), "cedana-runc run: {:?}", lines.snapshot());
    let got = lines.wait_numbers(3, t);
    assert_eq!(got[0], last + 1, "restored lazily at run: continues from {last}: {got:?}");
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("then its memory lazily"), "{logged}");
}

#[test]
fn the_configured_default_makes_restores_lazy_where_they_can_be_and_no_lazy_opts_out() {
    require_root();
    adopt_orphans();
    let work = tempfile::tempdir().unwrap();
    let restore = |path: &str, extra: &[&str]| {
        let mut cmd = cedana_cmd(&[&["restore", "process", "--path", path, "--output", "json"][..], extra].concat());
        cmd.env("CEDANA_RESTORE_LAZY", "true");
        json(&success_stdout("restore with restore.lazy = true", &cmd.output().unwrap()))
    };
    let cases = [
        ("zstd", &[][..], true),
        ("zlib", &[][..], true),
        ("zlib-one-stream", &[][..], false),
        ("zstd", &["--no-lazy"][..], false),
    ];
    for (compression, extra, lazy) in cases {
        let mut w = Workload::start(&workload_bin("memory"), &["16"], work.path());
        let sum = w.wait_lines(1)[0].clone();
        let name = format!("default-{compression}-{}", extra.len());
        let path = dump(&w, work.path(), &name, compression.trim_end_matches("-one-stream"));
        if compression == "zlib-one-stream" {
            zlib_in_one_stream(Path::new(&path));
        }
        w.reap();
        prepare_restore(&w, &sum);
        let out = restore(&path, extra);
        // One zlib stream cannot be restored lazily: the default falls back to a normal restore instead of
        // refusing it.
        assert_eq!(out["lazy"].is_object(), lazy, "{compression} {extra:?}: {out}");
        assert!(alive(w.pid), "{compression} {extra:?}: restored");
        end(&mut w);
    }
}

/// `cedana restore process --path PATH --lazy --output json` with its scratch folder at `scratch`; its report.
fn restore_lazily(path: &str, scratch: &Path, then: impl FnOnce()) -> serde_json::Value {
    let restore = cedana_cmd(&["restore", "process", "--path", path, "--lazy", "--output", "json"])
        .env("CEDANA_CHECKPOINT_SCRATCH_DIR", scratch)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    then();
    json(&success_stdout("cedana restore process --lazy", &restore.wait_with_output().unwrap()))
}

/// The page orders kept in `scratch`: each file's lines.
fn kept_orders(scratch: &Path) -> Vec<Vec<String>> {
    let Ok(dir) = std::fs::read_dir(scratch.join(".cedana-page-order")) else { return Vec::new() };
    dir.flatten().map(|e| std::fs::read_to_string(e.path()).unwrap().lines().map(str::to_string).collect()).collect()
}

#[test]
fn a_lazy_restore_records_where_the_program_touched_its_memory_and_the_next_brings_that_first() {
    require_root();
    adopt_orphans();
    let work = tempfile::tempdir().unwrap();
    let scratch = work.path().join("scratch");
    let mut w = Workload::start(&workload_bin("memory"), &["256"], work.path());
    let sum = w.wait_lines(1)[0].clone();
    let path = dump(&w, work.path(), "ordered", "zstd");
    w.reap();
    prepare_restore(&w, &sum);

    // First restore: the program reads all its memory (its checksum) while the memory still arrives; the
    // blocks it faulted on are kept, in order, for the next restores of this checkpoint.
    let first = restore_lazily(&path, &scratch, || {
        wait_for("the restored program to run", Duration::from_secs(30), || alive(w.pid).then_some(()));
        w.signal(Signal::SIGUSR1);
    });
    assert_eq!(first["lazy"]["ordered_pages"], 0, "no order was recorded yet: {first}");
    assert_eq!(w.wait_lines(2)[1], sum);
    let orders = kept_orders(&scratch);
    assert_eq!(orders.len(), 1, "one order kept: {orders:?}");
    let pid = w.pid.to_string();
    assert!(orders[0].len() > 1, "the blocks the checksum faulted on: {:?}", orders[0]);
    assert!(orders[0].iter().all(|l| l.split_once(' ').is_some_and(|(p, a)| p == pid && a.starts_with("0x"))), "{orders:?}");
    end(&mut w);
    prepare_restore(&w, &sum);

    // Second restore: the program sleeps; the background brings the recorded blocks first, and the order
    // kept stays the first one's.
    let second = restore_lazily(&path, &scratch, || ());
    let ordered = second["lazy"]["ordered_pages"].as_u64().unwrap();
    assert!(ordered > 0, "pages came in the recorded order: {second}");
    assert!(ordered <= second["lazy"]["pages"].as_u64().unwrap(), "{second}");
    assert_eq!(kept_orders(&scratch), orders, "the order is kept as recorded");
    w.signal(Signal::SIGUSR1);
    assert_eq!(w.wait_lines(2)[1], sum, "every page came back");
    end(&mut w);
    prepare_restore(&w, &sum);

    // A damaged order is only a hint: the restore goes on without it, and records a new one.
    let file = std::fs::read_dir(scratch.join(".cedana-page-order")).unwrap().flatten().next().unwrap().path();
    std::fs::write(&file, "not an order\n").unwrap();
    let third = restore_lazily(&path, &scratch, || {
        wait_for("the restored program to run", Duration::from_secs(30), || alive(w.pid).then_some(()));
        w.signal(Signal::SIGUSR1);
    });
    assert_eq!(third["lazy"]["ordered_pages"], 0, "{third}");
    assert_eq!(w.wait_lines(2)[1], sum);
    let again = kept_orders(&scratch);
    assert!(again.len() == 1 && again[0].iter().all(|l| l.starts_with(&pid)), "recorded anew: {again:?}");
    end(&mut w);
}
