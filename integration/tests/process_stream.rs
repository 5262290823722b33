//! Streamed checkpoints (`criu dump/restore --stream` through our own image streamer): the images go from
//! CRIU into the archive and back with no image file on disk, the result is the same checkpoint as a dump
//! through files, and a corrupt page image is refused before the restored tree runs.

use std::path::{Path, PathBuf};

use cedana_integration::workload::Workload;
use cedana_integration::*;
use nix::sys::signal::Signal;

/// A command's JSON output: one object (a report's last line, or the whole of `inspect --json`).
fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out)
        .or_else(|_| serde_json::from_str(out.lines().last().unwrap_or_default()))
        .unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// Dump `w` into `dir` as `name`; the report as JSON.
fn dump(w: &Workload, dir: &Path, name: &str, compression: &str, extra: &[&str]) -> serde_json::Value {
    let pid = w.pid.to_string();
    let args =
        [&["dump", "process", &pid, "--dir", dir.to_str().unwrap(), "--name", name, "--compression", compression][..], extra]
            .concat();
    json(&cedana_ok(&[&args[..], &["--output", "json"]].concat()))
}

fn manifest(path: &Path) -> serde_json::Value {
    json(&cedana_ok(&["checkpoint", "inspect", path.to_str().unwrap(), "--json"]))
}

fn image_names(m: &serde_json::Value) -> Vec<String> {
    let mut n: Vec<String> = m["files"].as_array().unwrap().iter().map(|f| f["name"].as_str().unwrap().to_string()).collect();
    n.sort();
    n
}

/// Restore the checkpoint at `path` (with `extra` flags), check the tree has all its memory, and end it.
/// The workload's log is cut back to its one line of dump time first (CRIU checks the size of open files).
fn restore_and_check(path: &Path, w: &mut Workload, sum: &str, extra: &[&str]) {
    wait_for("the dumped PID to be free", std::time::Duration::from_secs(10), || (!alive(w.pid)).then_some(()));
    let log = w.log.clone();
    std::fs::OpenOptions::new().write(true).open(&log).unwrap().set_len(sum.len() as u64 + 1).unwrap();
    let before = 1;
    cedana_ok(&[&["restore", "process", "--path", path.to_str().unwrap()][..], extra].concat());
    assert!(alive(w.pid), "{}: restored", path.display());
    w.signal(Signal::SIGUSR1);
    let lines = w.wait_lines(before + 1);
    assert_eq!(lines[before], sum, "{}: the restored process has its memory", path.display());
    w.signal(Signal::SIGKILL);
    w.reap();
    // The restored tree was left to us (a subreaper, see `adopt_orphans`): reap it at once.
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(w.pid), None);
}

/// Make this test process the subreaper of what it starts: restored trees (detached by CRIU) become its
/// children, reaped as soon as they are killed, instead of init's, which reaps in its own time.
fn adopt_orphans() {
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes plain integers.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
}

#[test]
fn streamed_and_file_dumps_make_the_same_checkpoint_and_both_restore_either_way() {
    require_root();
    adopt_orphans();
    let dir = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    for c in ["zstd", "lz4", "gzip", "zlib", "tar"] {
        let mut w = Workload::start(&workload_bin("memory"), &["24"], work.path());
        let sum = w.wait_lines(1)[0].clone();
        let streamed = dump(&w, dir.path(), &format!("s-{c}"), c, &["--leave-running"]);
        let files = dump(&w, dir.path(), &format!("f-{c}"), c, &["--leave-running", "--no-stream"]);
        assert_eq!(streamed["streamed"], true, "{c}: streamed by default: {streamed}");
        assert_eq!(files["streamed"], false, "{c}: --no-stream writes files: {files}");
        let (sp, fp) = (PathBuf::from(streamed["path"].as_str().unwrap()), PathBuf::from(files["path"].as_str().unwrap()));
        let (sm, fm) = (manifest(&sp), manifest(&fp));
        assert_eq!(image_names(&sm), image_names(&fm), "{c}: the same images either way");
        assert!(!sm["placement"].as_array().unwrap().is_empty(), "{c}: page images are placed for streamed restores");
        // The dump's phases are in the manifest: `write` (CRIU's start until every image was handed to the
        // archive) at least.
        for m in [&sm, &fm] {
            let phases = m["phases"].as_array().unwrap_or_else(|| panic!("{c}: phases in the manifest: {m}"));
            let write = phases.iter().find(|p| p["phase"] == "write").and_then(|p| p["ms"].as_f64());
            assert!(write.is_some_and(|ms| ms > 0.0 && ms < 60_000.0), "{c}: the write phase: {phases:?}");
        }
        // Both are read back either way: streamed, and extracted.
        w.signal(Signal::SIGKILL);
        w.reap();
        restore_and_check(&sp, &mut w, &sum, &[]);
        restore_and_check(&fp, &mut w, &sum, &["--no-stream"]);
        restore_and_check(&sp, &mut w, &sum, &["--no-stream"]);
        restore_and_check(&fp, &mut w, &sum, &["--stream"]);
    }
    // Folders have no stream: the flag changes nothing, and says so in the manifest. A zlib archive in one
    // stream (as written before zlib had units) has no index: asked to stream, its restore extracts it.
    let mut w = Workload::start(&workload_bin("memory"), &["8"], work.path());
    let sum = w.wait_lines(1)[0].clone();
    let out = dump(&w, dir.path(), "x-none", "none", &["--leave-running", "--stream"]);
    assert_eq!(out["streamed"], false, "{out}");
    let out = dump(&w, dir.path(), "x-zlib", "zlib", &["--leave-running"]);
    assert_eq!(out["streamed"], true, "{out}");
    let one = dir.path().join("x-zlib.tar.zlib");
    zlib_in_one_stream(&one);
    w.signal(Signal::SIGKILL);
    w.reap();
    restore_and_check(&one, &mut w, &sum, &["--stream"]);
}

#[test]
fn a_corrupt_page_image_is_refused_while_streaming_and_nothing_runs() {
    require_root();
    adopt_orphans();
    let dir = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    for c in ["zstd", "tar"] {
        let mut w = Workload::start(&workload_bin("memory"), &["32"], work.path());
        let sum = w.wait_lines(1)[0].clone();
        let out = dump(&w, dir.path(), &format!("bad-{c}"), c, &[]);
        let path = PathBuf::from(out["path"].as_str().unwrap());
        w.reap();
        let m = manifest(&path);
        let placed = &m["placement"].as_array().unwrap()[0];
        let offset = placed["offset"].as_u64().unwrap() as usize;
        // A byte in the middle of the largest page image's data (past its header unit).
        let mut bytes = std::fs::read(&path).unwrap();
        let pristine = bytes.clone();
        let at = offset + 1024 + (bytes.len() - offset) / 4;
        bytes[at] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        wait_for("the dumped PID to be free", std::time::Duration::from_secs(10), || (!alive(w.pid)).then_some(()));
        let err = cedana_err(&["restore", "process", "--path", path.to_str().unwrap()]);
        assert!(err.contains("corrupt") && err.contains("pages-"), "{c}: {err}");
        // CRIU killed the tree it held before it ran; the kill may still be landing when the command returns.
        wait_for(&format!("{c}: nothing of the corrupt checkpoint to run"), std::time::Duration::from_secs(5), || {
            (!alive(w.pid)).then_some(())
        });
        // What CRIU killed is left to us (the subreaper): reap it, so the PID is free again.
        wait_for("the half-restored PID to be reaped", std::time::Duration::from_secs(10), || {
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(w.pid), Some(nix::sys::wait::WaitPidFlag::WNOHANG));
            (!std::path::Path::new(&format!("/proc/{}", w.pid)).exists()).then_some(())
        });
        // The checkpoint as it was restores.
        std::fs::write(&path, &pristine).unwrap();
        restore_and_check(&path, &mut w, &sum, &[]);
    }
}

#[test]
fn folders_deeper_than_a_socket_address_holds_still_stream_to_and_from_criu() {
    require_root();
    adopt_orphans();
    let dir = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    // CRIU's image-streamer socket lies in the restore's folder in the scratch folder: here its path is
    // longer than the 107 bytes a socket address holds.
    let scratch = dir.path().join("s".repeat(70)).join("t".repeat(10));
    let mut w = Workload::start(&workload_bin("memory"), &["8"], work.path());
    let sum = w.wait_lines(1)[0].clone();
    // The dump's images folder (in the destination folder) is as deep: CRIU's capture socket lies there.
    let deep_dest = dir.path().join("d".repeat(90));
    std::fs::create_dir_all(&deep_dest).unwrap();
    let out = dump(&w, &deep_dest, "deep", "zstd", &[]);
    assert_eq!(out["streamed"], true, "{out}");
    w.reap();
    let path = out["path"].as_str().unwrap().to_string();
    wait_for("the dumped PID to be free", std::time::Duration::from_secs(10), || (!alive(w.pid)).then_some(()));
    std::fs::OpenOptions::new().write(true).open(&w.log).unwrap().set_len(sum.len() as u64 + 1).unwrap();
    let restored = cedana_cmd(&["restore", "process", "--path", &path, "--stream"])
        .env("CEDANA_CHECKPOINT_SCRATCH_DIR", &scratch)
        .output()
        .unwrap();
    success_stdout("cedana restore process --stream with a deep scratch folder", &restored);
    assert!(alive(w.pid), "restored");
    w.signal(Signal::SIGUSR1);
    assert_eq!(w.wait_lines(2)[1], sum, "the restored process has its memory");
    w.signal(Signal::SIGKILL);
    w.reap();
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(w.pid), None);
}

/// With `checkpoint.direct_writes`, a streamed dump writes its archive past the page cache: the archive is
/// (almost) not cached after the dump, it is the same checkpoint, and it restores with all its memory.
#[test]
fn a_dump_written_past_the_page_cache_restores() {
    require_root();
    adopt_orphans();
    let dir = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    for c in ["zstd", "lz4"] {
        let mut w = Workload::start(&workload_bin("memory"), &["48"], work.path());
        let sum = w.wait_lines(1)[0].clone();
        let pid = w.pid.to_string();
        let args =
            ["dump", "process", &pid, "--dir", dir.path().to_str().unwrap(), "--name", c, "--compression", c, "--output", "json"];
        let out =
            success_stdout("direct dump", &cedana_cmd(&args).env("CEDANA_CHECKPOINT_DIRECT_WRITES", "true").output().unwrap());
        let report = json(&out);
        let path = PathBuf::from(report["path"].as_str().unwrap());
        w.reap();
        let (cached, pages) = page_cache_residency(&path);
        assert!(cached * 10 < pages, "{c}: {cached} of {pages} pages of the archive in the page cache");
        assert_eq!(manifest(&path)["compression"], c);
        restore_and_check(&path, &mut w, &sum, &[]);
    }
}

/// How many of the file's pages the page cache holds, of how many (`mincore` of a mapping never touched).
fn page_cache_residency(path: &Path) -> (usize, usize) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap();
    let len = f.metadata().unwrap().len() as usize;
    let mut vec = vec![0u8; len.div_ceil(4096)];
    // SAFETY: a read-only shared mapping of a file we opened, only asked about, unmapped before returning.
    unsafe {
        let map = libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, f.as_raw_fd(), 0);
        assert_ne!(map, libc::MAP_FAILED);
        assert_eq!(libc::mincore(map, len, vec.as_mut_ptr()), 0);
        libc::munmap(map, len);
    }
    (vec.iter().filter(|b| *b & 1 == 1).count(), vec.len())
}
