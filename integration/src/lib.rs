//! Helpers for tests against the real stack: locating the built binaries, compiling the C workloads,
//! starting them the way CRIU needs (own session, only stdio open), and reading their output.

pub mod attach;
pub mod console;
pub mod cri;
pub mod daemon;
pub mod engines;
pub mod gcs;
pub mod gpu;
pub mod gpu_shim;
pub mod images;
pub mod invariants;
pub mod lines;
pub mod moto;
pub mod nodes;
pub mod registry;
pub mod s3s;
pub mod workload;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The workspace's target folder for this build profile (`target/debug`), found from the test binary.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/debug/deps/<test>-<hash>
    exe.parent().and_then(Path::parent).expect("test binary lives in target/<profile>/deps").to_path_buf()
}

/// A binary of the workspace; panics with the fix if it was not built.
pub fn bin(name: &str) -> PathBuf {
    let p = target_dir().join(name);
    assert!(p.is_file(), "{} is missing: run `cargo build --workspace` before the integration tests", p.display());
    p
}

/// Tests of the real stack need root (CI runs as root); fail loudly otherwise.
pub fn require_root() {
    assert!(nix::unistd::geteuid().is_root(), "integration tests drive CRIU and must run as root (sudo)");
}

static COMPILE: Mutex<()> = Mutex::new(());

/// Compile `integration/workloads/NAME.c` (once per build) and return the executable.
pub fn workload_bin(name: &str) -> PathBuf {
    let _guard = COMPILE.lock().unwrap_or_else(|e| e.into_inner());
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("workloads").join(format!("{name}.c"));
    let out_dir = target_dir().join("workloads");
    std::fs::create_dir_all(&out_dir).expect("workloads folder");
    let out = out_dir.join(name);
    let fresh = match (std::fs::metadata(&out), std::fs::metadata(&src)) {
        (Ok(o), Ok(s)) => o.modified().ok() >= s.modified().ok(),
        _ => false,
    };
    if !fresh {
        let tmp = out_dir.join(format!(".{name}.{}", std::process::id()));
        let status = Command::new("gcc")
            .args(["-O2", "-pthread", "-Wall", "-o"])
            .arg(&tmp)
            .arg(&src)
            .status()
            .expect("gcc must be installed (scripts/setup.sh)");
        assert!(status.success(), "compiling {}", src.display());
        std::fs::rename(&tmp, &out).expect("install workload");
    }
    out
}

/// A command `cedana ARGS` (info-level logs on stderr), not yet run.
pub fn cedana_cmd(args: &[&str]) -> Command {
    let mut c = Command::new(bin("cedana"));
    c.args(args).env("CEDANA_LOG_LEVEL", "info");
    c
}

/// Run `cedana ARGS` and capture its output.
pub fn cedana(args: &[&str]) -> Output {
    cedana_cmd(args).output().expect("run cedana")
}

/// Like [`cedana`], but the command must succeed; returns stdout.
pub fn cedana_ok(args: &[&str]) -> String {
    success_stdout(&format!("cedana {args:?}"), &cedana(args))
}

/// The stdout of a command that must have succeeded; otherwise panics with `what` and both outputs.
pub fn success_stdout(what: &str, out: &Output) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Like [`cedana`], but the command must fail; returns stderr.
pub fn cedana_err(args: &[&str]) -> String {
    let out = cedana(args);
    assert!(!out.status.success(), "cedana {args:?} should have failed:\nstdout: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Poll `f` every 20 ms until it returns `Some`, or panic after `timeout` naming `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether `pid` is a live (non-zombie) process.
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s.rsplit_once(')').map(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X'])).unwrap_or(false),
        Err(_) => false,
    }
}

/// The names in `dir`, sorted (none when it does not exist).
pub fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// Rewrite the zlib checkpoint at `path` as cedana wrote zlib checkpoints before they had units: one zlib
/// stream of a tar whose manifest places no page image, with no index at its end (an archive that can only
/// be read front to back).
pub fn zlib_in_one_stream(path: &Path) {
    use cedana::codec::{decoder, encoder, Compression};
    use std::io::Read;
    let packed = std::fs::read(path).unwrap();
    let mut archive = tar::Archive::new(decoder(Compression::Zlib, &packed[..]).unwrap());
    let mut out = tar::Builder::new(encoder(Compression::Zlib, Vec::new()).unwrap());
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let name = entry.path().unwrap().to_string_lossy().into_owned();
        let mut data = Vec::new();
        entry.read_to_end(&mut data).unwrap();
        if name == "manifest.json" {
            let mut manifest: serde_json::Value = serde_json::from_slice(&data).unwrap();
            manifest.as_object_mut().unwrap().remove("placement");
            data = serde_json::to_vec(&manifest).unwrap();
        }
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o600);
        header.set_cksum();
        out.append_data(&mut header, &name, &data[..]).unwrap();
    }
    std::fs::write(path, out.into_inner().unwrap().finish().unwrap()).unwrap();
}

/// Wait until a dump writes its checkpoint under the hidden temporary name in `dir` and it holds more than
/// `bytes` (the archive is being written, CRIU holding the workload frozen).
pub fn wait_for_partial_checkpoint(dir: &Path, bytes: u64) {
    wait_for("the archive to be written", Duration::from_secs(30), || {
        std::fs::read_dir(dir).ok()?.flatten().find(|e| {
            e.file_name().to_string_lossy().contains(".partial-") && e.metadata().map(|m| m.len() > bytes).unwrap_or(false)
        })
    });
}
