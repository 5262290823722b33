//! `containerd-shim-cedana-v2`'s exec processes, resource updates, metrics and OOM events under a private
//! containerd, through `ctr` as a user drives them, compared with the stock runc shim where both should agree.
//! Build first, then run as root: `cargo build --workspace && cargo test -p cedana-integration --test shim_exec`.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use cedana_integration::engines::{Containerd, ShimHost};
use cedana_integration::wait_for;

const RUNTIME: &str = "io.containerd.cedana.v2";
const RUNC_SHIM: &str = "io.containerd.runc.v2";
const T: Duration = Duration::from_secs(30);

/// The private containerd of [`ShimHost`], with this file's ctr helpers.
struct Setup(ShimHost);

impl std::ops::Deref for Setup {
    type Target = ShimHost;
    fn deref(&self) -> &ShimHost {
        &self.0
    }
}

fn setup() -> Setup {
    Setup(ShimHost::start())
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

impl Setup {
    /// `ctr run -d` of `args` on `runtime` (extra ctr flags before `--rootfs`), waiting until it runs or stopped.
    fn run_detached(&self, runtime: &str, id: &str, flags: &[&str], args: &[&str]) {
        let mut cmd = self.d.ctr_cmd(&["run", "--runtime", runtime, "--detach"]);
        cmd.args(flags).arg("--rootfs").arg(&self.rootfs).arg(id).args(args);
        let out = cmd.stdin(Stdio::null()).output().expect("ctr run");
        assert!(
            out.status.success(),
            "ctr run --detach {id} failed: {}{} (containerd log: {})",
            text(&out.stdout),
            text(&out.stderr),
            self.d.dir.join("containerd.log").display()
        );
        wait_for("the task to start", T, || self.d.task_status(id).filter(|s| s == "RUNNING" || s == "STOPPED"));
    }

    /// `ctr task exec ARGS` with its stdin closed.
    fn exec(&self, args: &[&str]) -> Output {
        let mut all = vec!["task", "exec"];
        all.extend_from_slice(args);
        self.d.ctr_cmd(&all).stdin(Stdio::null()).output().expect("ctr task exec")
    }
}

/// `ctr task ps ID` as (PID, INFO) rows.
fn ps(d: &Containerd, id: &str) -> Vec<(i32, String)> {
    d.ok(&["task", "ps", id])
        .lines()
        .skip(1)
        .filter_map(|l| {
            let (pid, info) = l.trim().split_once(char::is_whitespace)?;
            Some((pid.parse().ok()?, info.trim().to_string()))
        })
        .collect()
}

/// The exit code and the error class (the last `: ` field of ctr's error line, e.g. `unknown`) of a failed ctr.
fn error_class(out: &Output) -> (Option<i32>, String) {
    let stderr = text(&out.stderr);
    let class = stderr.trim().rsplit(": ").next().unwrap_or_default().to_string();
    (out.status.code(), class)
}

/// The folder of `pid`'s cgroup in the v1 memory hierarchy.
fn memory_cgroup(pid: i32) -> PathBuf {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("the task's cgroups");
    let rel = cgroups
        .lines()
        .find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
            controllers.split(',').any(|c| c == "memory").then(|| path.to_string())
        })
        .expect("a v1 memory cgroup (this machine is cgroup v1)");
    Path::new("/sys/fs/cgroup/memory").join(rel.trim_start_matches('/'))
}

#[test]
fn exec_gets_output_and_exit_code_and_a_detached_exec_can_be_killed() {
    let s = setup();
    let id = "exec-main";
    s.run_detached(RUNTIME, id, &[], &["/bin/sleep", "1000"]);

    // Attached: the output reaches ctr, and ctr exits with the exec's code.
    let out = s.exec(&["--exec-id", "e1", id, "/bin/sh", "-c", "echo hi; echo oops >&2; exit 3"]);
    assert_eq!(out.status.code(), Some(3), "exec exit code; stdout {:?} stderr {:?}", text(&out.stdout), text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "hi");
    assert!(text(&out.stderr).contains("oops"), "stderr reaches ctr: {:?}", text(&out.stderr));
    // ctr deleted it afterwards: the id can be used again.
    let again = s.exec(&["--exec-id", "e1", id, "/bin/sh", "-c", "exit 0"]);
    assert_eq!(again.status.code(), Some(0), "{}", text(&again.stderr));

    // Detached: it shows in ctr task ps with its exec id, and survives a duplicate.
    let out = s.exec(&["--detach", "--exec-id", "long", id, "/bin/sleep", "1000"]);
    assert!(out.status.success(), "ctr task exec --detach: {}", text(&out.stderr));
    let rows = ps(&s.d, id);
    let (pid, _) = rows.iter().find(|(_, info)| info.contains("ExecID:long")).cloned().unwrap_or_else(|| {
        panic!("the exec in ctr task ps: {rows:?}");
    });
    assert_eq!(rows.len(), 2, "the init and the exec: {rows:?}");
    let dup = s.exec(&["--detach", "--exec-id", "long", id, "/bin/sleep", "5"]);
    assert!(!dup.status.success());
    assert!(text(&dup.stderr).contains("already exists"), "duplicate exec id: {}", text(&dup.stderr));
    assert!(cedana_integration::alive(pid), "the first exec runs on");

    // Killed by its exec id: it is gone, the init runs on.
    s.d.ok(&["task", "kill", "--exec-id", "long", "-s", "SIGKILL", id]);
    wait_for("the exec to leave ctr task ps", T, || (ps(&s.d, id).len() == 1).then_some(()));
    wait_for("the exec's process to end", T, || (!cedana_integration::alive(pid)).then_some(()));
    assert_eq!(s.d.task_status(id).as_deref(), Some("RUNNING"));
}

#[test]
fn exec_in_a_stopped_task_fails_as_with_the_runc_shim() {
    let s = setup();
    let mut results = Vec::new();
    for (runtime, id) in [(RUNC_SHIM, "stopped-runc"), (RUNTIME, "stopped-cedana")] {
        s.run_detached(runtime, id, &[], &["/bin/sh", "-c", "exit 0"]);
        wait_for("the task to stop", T, || (s.d.task_status(id).as_deref() == Some("STOPPED")).then_some(()));
        let out = s.exec(&["--exec-id", "e1", id, "/bin/echo", "hi"]);
        assert!(!out.status.success(), "{runtime}: exec in a stopped task must fail");
        assert!(text(&out.stderr).contains("cannot exec in a stopped state"), "{runtime}: {}", text(&out.stderr));
        results.push(error_class(&out));
        // Both tasks stay deletable.
        s.d.ok(&["task", "delete", id]);
    }
    assert_eq!(results[0], results[1], "exit code and error class: runc shim vs ours");
    assert_eq!(results[1].1, "unknown");
}

/// A minimal ttrpc client for one unary call to a shim, as containerd makes it (ctr 1.6 has no `task update`,
/// so the test calls the shim's Task service the way containerd's Tasks.Update does). Protobuf by hand: only
/// length-delimited and varint fields are needed.
mod ttrpc_call {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::path::Path;

    fn varint(mut v: u64, out: &mut Vec<u8>) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    /// Field `field` of wire type 2 (string, bytes, message).
    pub fn bytes_field(field: u64, data: &[u8], out: &mut Vec<u8>) {
        varint(field << 3 | 2, out);
        varint(data.len() as u64, out);
        out.extend_from_slice(data);
    }

    fn read_varint(buf: &[u8], pos: &mut usize) -> u64 {
        let (mut v, mut shift) = (0u64, 0);
        while let Some(b) = buf.get(*pos) {
            *pos += 1;
            v |= u64::from(b & 0x7f) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                break;
            }
        }
        v
    }

    /// The (field, wire type, varint value or bytes) of a flat protobuf message.
    fn fields(buf: &[u8]) -> Vec<(u64, u64, u64, Vec<u8>)> {
        let (mut pos, mut out) = (0, Vec::new());
        while pos < buf.len() {
            let tag = read_varint(buf, &mut pos);
            match tag & 7 {
                0 => out.push((tag >> 3, 0, read_varint(buf, &mut pos), Vec::new())),
                2 => {
                    let len = read_varint(buf, &mut pos) as usize;
                    out.push((tag >> 3, 2, 0, buf[pos..pos + len].to_vec()));
                    pos += len;
                }
                other => panic!("unexpected wire type {other} in a ttrpc response"),
            }
        }
        out
    }

    /// Call `containerd.task.v2.Task/METHOD` on the shim whose bundle is `bundle`; the status (code, message).
    pub fn call(bundle: &Path, namespace: &str, method: &str, payload: &[u8]) -> (u64, String) {
        let address = std::fs::read_to_string(bundle.join("address")).expect("the shim's address file");
        let path = address.trim().trim_start_matches("unix://");
        let mut stream = UnixStream::connect(path).unwrap_or_else(|e| panic!("connecting to the shim at {path}: {e}"));
        let mut request = Vec::new();
        bytes_field(1, b"containerd.task.v2.Task", &mut request);
        bytes_field(2, method.as_bytes(), &mut request);
        bytes_field(3, payload, &mut request);
        let mut kv = Vec::new();
        bytes_field(1, b"containerd-namespace", &mut kv);
        bytes_field(2, namespace.as_bytes(), &mut kv);
        bytes_field(5, &kv, &mut request);
        // Header: length, stream id (odd: client), type 1 (request), flags.
        let mut frame = (request.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&1u32.to_be_bytes());
        frame.extend_from_slice(&[1, 0]);
        frame.extend_from_slice(&request);
        stream.write_all(&frame).expect("sending the request");
        let mut header = [0u8; 10];
        stream.read_exact(&mut header).expect("the response header");
        assert_eq!(header[8], 2, "a response frame");
        let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let mut body = vec![0u8; len];
        stream.read_exact(&mut body).expect("the response");
        let status = fields(&body).into_iter().find(|f| f.0 == 1).map(|f| f.3).unwrap_or_default();
        let status = fields(&status);
        let code = status.iter().find(|f| f.0 == 1).map(|f| f.2).unwrap_or(0);
        let message = status.iter().find(|f| f.0 == 2).map(|f| String::from_utf8_lossy(&f.3).into_owned()).unwrap_or_default();
        (code, message)
    }
}

/// The Update request containerd sends for `ctr task update --memory-limit LIMIT` (ctr 1.7+, containerd's
/// Tasks.Update): the OCI LinuxResources as JSON in an Any.
fn update_request(id: &str, limit: u64) -> Vec<u8> {
    let mut any = Vec::new();
    ttrpc_call::bytes_field(1, b"types.containerd.io/opencontainers/runtime-spec/1/LinuxResources", &mut any);
    ttrpc_call::bytes_field(2, format!("{{\"memory\":{{\"limit\":{limit}}}}}").as_bytes(), &mut any);
    let mut req = Vec::new();
    ttrpc_call::bytes_field(1, id.as_bytes(), &mut req);
    ttrpc_call::bytes_field(2, &any, &mut req);
    req
}

#[test]
fn update_sets_the_memory_limit_and_metrics_report_usage() {
    let s = setup();
    let id = "update-metrics";
    s.run_detached(RUNTIME, id, &[], &["/bin/sleep", "1000"]);
    let limit_file = memory_cgroup(s.d.task_pid(id)).join("memory.limit_in_bytes");
    let before: u64 = std::fs::read_to_string(&limit_file).unwrap().trim().parse().unwrap();
    let limit: u64 = 64 << 20;
    assert_ne!(before, limit);
    let bundle = s.d.dir.join("state/io.containerd.runtime.v2.task").join(&s.d.namespace).join(id);
    let (code, message) = ttrpc_call::call(&bundle, &s.d.namespace, "Update", &update_request(id, limit));
    assert_eq!(code, 0, "Update answered {code}: {message}");
    let after: u64 = std::fs::read_to_string(&limit_file).unwrap().trim().parse().unwrap();
    assert_eq!(after, limit, "{} after the update", limit_file.display());
    // An unknown task: NOT_FOUND (5).
    let (code, _) = ttrpc_call::call(&bundle, &s.d.namespace, "Update", &update_request("nope", limit));
    assert_eq!(code, 5);

    let metrics = s.d.ok(&["task", "metrics", id]);
    let value = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.split_whitespace().next()?.parse().ok()))
            .unwrap_or_else(|| panic!("{name} in ctr task metrics: {metrics}"))
    };
    assert!(value("memory.usage_in_bytes") > 0, "{metrics}");
    assert_eq!(value("memory.limit_in_bytes"), limit, "{metrics}");
    assert!(value("cpuacct.usage") > 0, "{metrics}");
    assert!(value("pids.current") >= 1, "{metrics}");
}

#[test]
fn an_oom_kill_is_published() {
    let s = setup();
    // Every event of this containerd, as `ctr events` prints them (TIME NAMESPACE TOPIC EVENT).
    let log = s.tmp.path().join("events.log");
    let mut events =
        s.d.ctr_cmd(&["events"])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("ctr events");
    let id = "oom";
    // `tail /dev/zero` buffers an endless line: with 32 MiB the cgroup's OOM killer ends it.
    s.run_detached(RUNTIME, id, &["--memory-limit", "33554432"], &["/bin/sh", "-c", "sleep 1; tail /dev/zero"]);
    let seen = std::panic::catch_unwind(|| {
        wait_for("a /tasks/oom event for the task", T, || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            text.lines().any(|l| l.contains("/tasks/oom") && l.contains(id)).then_some(())
        })
    });
    let _ = events.kill();
    let _ = events.wait();
    if seen.is_err() {
        panic!("no OOM event; events seen: {}", std::fs::read_to_string(&log).unwrap_or_default());
    }
    wait_for("the task to stop", T, || (s.d.task_status(id).as_deref() == Some("STOPPED")).then_some(()));
}
