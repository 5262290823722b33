//! A checkpoint's compression is read from its content, never from its name: a zstd checkpoint renamed to
//! `renamed.tar.jibberish`, or to a name without any extension, restores as it is (Cedana trusts the
//! extension; this is deliberate). Run as root: `cargo test -p cedana-integration --test process_detection`.

use std::path::Path;

use cedana_integration::workload::Workload;
use cedana_integration::*;

fn numbers(lines: &[String]) -> Vec<i64> {
    lines.iter().map(|l| l.trim().parse().expect(l)).collect()
}

/// Dump `w` as `dir/NAME.tar.zst`, move the checkpoint to `dir/renamed`, restore it from there, and return
/// the number of lines at dump time.
fn dump_rename_restore(w: &mut Workload, dir: &Path, name: &str, renamed: &str) -> usize {
    let pid = w.pid.to_string();
    let d = dir.to_str().unwrap();
    let out = cedana_ok(&["dump", "process", &pid, "--no-server", "--dir", d, "--name", name, "--compression", "zstd"]);
    assert!(out.contains(&format!("Dumped PID {pid}")), "{out}");
    w.reap();
    let at_dump = w.lines().len();
    let to = dir.join(renamed);
    std::fs::rename(dir.join(format!("{name}.tar.zst")), &to).unwrap();
    let restored = cedana_ok(&["restore", "process", "--path", to.to_str().unwrap(), "--no-server", "--detach"]);
    assert!(restored.contains(&format!("Restored PID {pid}")), "{restored}");
    let inspect = cedana_ok(&["checkpoint", "inspect", "--json", to.to_str().unwrap()]);
    let m: serde_json::Value = serde_json::from_str(&inspect).unwrap();
    assert_eq!(m["compression"], "zstd", "the manifest inside tells the truth too: {m}");
    at_dump
}

#[test]
fn a_zstd_checkpoint_restores_under_a_misleading_or_missing_extension() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let mut w = Workload::start(&workload_bin("counter"), &[], dir.path());
    w.wait_lines(5);
    for (i, renamed) in ["renamed.tar.jibberish", "renamed"].into_iter().enumerate() {
        let at_dump = dump_rename_restore(&mut w, dir.path(), &format!("cp{i}"), renamed);
        let lines = w.wait_lines(at_dump + 10);
        let values = numbers(&lines);
        assert_eq!(values.first(), Some(&1));
        assert!(values.windows(2).all(|p| p[1] == p[0] + 1), "{renamed}: the counter must go on, not restart: {values:?}");
    }
}

#[test]
fn a_file_that_is_no_checkpoint_is_refused_whatever_its_name() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("fake.tar.zst");
    std::fs::write(&fake, vec![b'x'; 4096]).unwrap();
    let err = cedana_err(&["restore", "process", "--path", fake.to_str().unwrap(), "--no-server", "--detach"]);
    assert!(err.contains(fake.to_str().unwrap()), "the error names the file: {err}");
}
