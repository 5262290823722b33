//! Hostile clients on a real shim's ttrpc socket: our shim serves a running task under a private containerd,
//! and the test talks to the socket containerd was given (the bundle's `address` file) byte by byte, as a
//! broken or malicious local client could: frames announcing more than ttrpc's 4 MiB limit (with and without
//! the bytes), garbage, half a header, a request naming an unknown service and one carrying a payload that does
//! not decode, a hundred connections held open at once, clients that disconnect mid-request. After each, the
//! shim is the same process, the task still answers through containerd (`ctr task ls`, `ctr task ps`, a
//! checkpoint-free kill at the end), and the shim's descriptors settle back to where they were.
//! Build first, then run as root:
//! `cargo build -p containerd-shim-cedana-v2 -p cedana-runc && cargo test -p cedana-integration --test shim_socket_hostile`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use cedana_integration::engines::ShimHost;
use cedana_integration::wait_for;

const RUNTIME: &str = "io.containerd.cedana.v2";
const T: Duration = Duration::from_secs(30);
/// ttrpc's frame header: length (u32, big endian), stream id (u32), type (1 request, 2 response), flags.
const HEADER: usize = 10;

fn frame(length: u32, stream: u32, kind: u8) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER);
    h.extend_from_slice(&length.to_be_bytes());
    h.extend_from_slice(&stream.to_be_bytes());
    h.extend_from_slice(&[kind, 0]);
    h
}

/// A protobuf `ttrpc.Request { service, method, payload }`, encoded by hand (all three length-delimited).
fn request(service: &str, method: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for (tag, bytes) in [(0x0a, service.as_bytes()), (0x12, method.as_bytes()), (0x1a, payload)] {
        out.push(tag);
        let mut n = bytes.len();
        loop {
            let b = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(b);
                break;
            }
            out.push(b | 0x80);
        }
        out.extend_from_slice(bytes);
    }
    out
}

/// The PID of our shim serving task `id` (its command line has `-id ID`).
fn shim_pid(id: &str) -> i32 {
    let found = std::fs::read_dir("/proc").unwrap().flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_string_lossy().parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        let args: Vec<String> = cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        let ours = args.first().is_some_and(|a| a.ends_with("containerd-shim-cedana-v2"));
        (ours && args.windows(2).any(|w| w[0] == "-id" && w[1] == id)).then_some(pid)
    });
    found.unwrap_or_else(|| panic!("no shim serves task {id}"))
}

fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

struct Target {
    socket: PathBuf,
    shim: i32,
}

impl Target {
    fn connect(&self) -> UnixStream {
        let s = UnixStream::connect(&self.socket).expect("connect to the shim's socket");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    }

    /// Send `bytes`, then wait (up to 5 s) for the shim to answer or hang up; what it answered.
    fn send(&self, bytes: &[u8]) -> Vec<u8> {
        let mut s = self.connect();
        let _ = s.write_all(bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        answer
    }
}

#[test]
fn hostile_bytes_on_the_shim_socket_leave_the_shim_and_its_task_serving() {
    let s = ShimHost::start();
    let id = "hostile-socket";
    let mut cmd = s.d.ctr_cmd(&["run", "--runtime", RUNTIME, "--detach", "--rootfs"]);
    cmd.arg(&s.rootfs).args([id, "/bin/sh", "-c", "sleep 1000"]);
    let out = cmd.stdin(Stdio::null()).output().expect("ctr run");
    assert!(out.status.success(), "ctr run: {}", String::from_utf8_lossy(&out.stderr));
    wait_for("the task to run", T, || (s.d.task_status(id).as_deref() == Some("RUNNING")).then_some(()));
    let bundle = s.d.dir.join("state/io.containerd.runtime.v2.task").join(&s.d.namespace).join(id);
    let address = std::fs::read_to_string(bundle.join("address")).expect("the shim's address file");
    let socket = PathBuf::from(address.trim().trim_start_matches("unix://"));
    let shim = shim_pid(id);
    let t = Target { socket, shim };
    let baseline = fd_count(shim);
    let serving = |what: &str| {
        assert!(cedana_integration::alive(t.shim), "after {what}: the shim {} died", t.shim);
        assert_eq!(s.d.task_status(id).as_deref(), Some("RUNNING"), "after {what}: the task answers through containerd");
    };

    // Frames announcing more than ttrpc's limit: refused without reading (or holding) them.
    t.send(&frame(u32::MAX, 1, 1));
    serving("a frame announcing 4 GiB");
    let mut big = frame(5 << 20, 1, 1);
    big.extend(std::iter::repeat_n(0xAB, 5 << 20));
    t.send(&big);
    serving("a 5 MiB frame");
    // Garbage, half a header, nothing at all.
    let garbage: Vec<u8> = (0..65536u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    t.send(&garbage);
    serving("64 KiB of garbage");
    t.send(&[0, 0, 0]);
    serving("half a header");
    drop(t.connect());
    serving("a client that said nothing");
    // Requests that parse as frames but not as anything the shim serves.
    let unknown = request("containerd.task.v2.Nothing", "Explode", b"");
    let mut msg = frame(unknown.len() as u32, 1, 1);
    msg.extend_from_slice(&unknown);
    let answer = t.send(&msg);
    assert!(answer.len() > HEADER && answer[8] == 2, "an unknown service gets a response frame: {answer:?}");
    serving("an unknown service");
    let bad = request("containerd.task.v2.Task", "State", &[0xff; 64]);
    let mut msg = frame(bad.len() as u32, 3, 1);
    msg.extend_from_slice(&bad);
    let answer = t.send(&msg);
    assert!(answer.len() > HEADER && answer[8] == 2, "an undecodable payload gets a response frame: {answer:?}");
    serving("a payload that does not decode");
    // A request cut short: the client goes away mid-frame.
    let mut cut = frame(1000, 5, 1);
    cut.extend_from_slice(&[0x0a; 100]);
    t.send(&cut);
    serving("a request cut short");
    // A hundred connections held at once, then dropped.
    let held: Vec<UnixStream> = (0..100).map(|_| t.connect()).collect();
    serving("a hundred open connections");
    drop(held);

    // The shim lets go of all of it, and goes on serving the task: ps, then the kill that ends it.
    wait_for("the shim's descriptors to settle", T, || (fd_count(t.shim) <= baseline + 2).then_some(()));
    let ps = s.d.ok(&["task", "ps", id]);
    assert!(ps.lines().count() >= 2, "ctr task ps lists the init: {ps}");
    s.d.ok(&["task", "kill", "-s", "SIGKILL", id]);
    wait_for("the task to stop", T, || (s.d.task_status(id).as_deref() == Some("STOPPED")).then_some(()));
    s.d.ok(&["task", "delete", id]);
    s.d.ok(&["container", "rm", id]);
}
