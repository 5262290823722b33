//! Migration between two nodes on one machine (integration/src/nodes.rs): each node a network namespace with
//! its own address, its own cedana daemon and job store (and, for containers, its own containerd), sharing only
//! an S3-compatible server on the bridge between them. A plain process, a managed job, a container and a
//! program with an established TCP connection are checkpointed on node A into the object store and restored
//! on node B from it, and go on with their state; node A keeps no copy running.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use cedana_integration::daemon::Daemon;
use cedana_integration::engines::{put_shim_on_path, Containerd};
use cedana_integration::moto::MotoServer;
use cedana_integration::nodes::{Node, Nodes};
use cedana_integration::{wait_for, workload_bin};

const T: Duration = Duration::from_secs(30);

/// Two nodes, the object store between them, and a daemon on each; the processes a test started or
/// restored are killed (by PID) when it ends, passed or failed, before the nodes go.
struct Cluster {
    started: std::sync::Mutex<Vec<i32>>,
    a: Daemon,
    b: Daemon,
    moto: MotoServer,
    nodes: Nodes,
}

impl Cluster {
    /// Kill `pid` when the test ends.
    fn track(&self, pid: i32) -> i32 {
        self.started.lock().unwrap().push(pid);
        pid
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for pid in self.started.lock().unwrap().iter() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

fn cluster() -> Cluster {
    let nodes = Nodes::new();
    let moto = MotoServer::start_on(&nodes.gateway);
    let daemon = |node: &Node| {
        let mut env: Vec<(&str, String)> = moto.env();
        env.push(("CEDANA_NODE_NAME", node.name.clone()));
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        Daemon::start_in_netns(&node.netns, &env)
    };
    let (a, b) = (daemon(&nodes.a), daemon(&nodes.b));
    Cluster { started: Default::default(), a, b, moto, nodes }
}

fn alive(pid: i32) -> bool {
    cedana_integration::alive(pid)
}

/// The inode of the network namespace `pid` is in.
fn netns_of(pid: i32) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/{pid}/ns/net")).expect("the process's netns").ino()
}

fn numbers(log: &Path, skip_words: usize) -> Vec<u64> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(skip_words)?.parse().ok())
        .collect()
}

fn wait_numbers(log: &Path, skip_words: usize, n: usize) -> Vec<u64> {
    wait_for(&format!("{n} numbers in {}", log.display()), T, || {
        let v = numbers(log, skip_words);
        (v.len() >= n).then_some(v)
    })
}

fn consecutive(v: &[u64]) -> bool {
    v.windows(2).all(|w| w[1] == w[0] + 1)
}

/// `program ARGS` started on `node` in a session of its own, output to `log`; its PID.
fn start_on(node: &Node, program: &Path, args: &[&str], log: &Path) -> i32 {
    let file = std::fs::File::create(log).unwrap();
    let mut cmd = cedana_integration::workload::session_command(Path::new("nsenter"));
    cmd.arg(node.nsenter_arg()).arg("--").arg(program).args(args);
    cmd.stdout(file.try_clone().unwrap()).stderr(file);
    let child = cmd.spawn().expect("start the workload on the node");
    let pid = child.id() as i32;
    // Reaped by a thread, so that CRIU's kill leaves no zombie holding the PID.
    std::thread::spawn(move || {
        let mut child = child;
        let _ = child.wait();
    });
    pid
}

/// The PID in a restore's report (`Restored PID 123 (counter) from ...`).
fn restored_pid(out: &str) -> i32 {
    out.split("PID ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no PID in {out:?}"))
}

fn last_field(out: &str) -> String {
    out.lines().last().and_then(|l| l.split_whitespace().last()).unwrap_or_default().to_string()
}

#[test]
fn a_process_and_a_managed_job_move_from_node_a_to_node_b_through_the_object_store() {
    let c = cluster();
    let counter = workload_bin("counter");

    // A plain process on node A, dumped by A's daemon into the object store, restored by B's.
    let log = c.a.dir().join("process.log");
    let pid = c.track(start_on(&c.nodes.a, &counter, &[], &log));
    wait_numbers(&log, 0, 3);
    assert_eq!(netns_of(pid), c.nodes.a.netns_inode(), "it runs on node A");
    let dumped = c.a.ok(&["dump", "process", &pid.to_string(), "--dir", &c.moto.url("moves"), "--compression", "zstd"]);
    let url = last_field(&dumped);
    assert!(url.starts_with("s3://"), "{dumped}");
    wait_for("node A's copy to be gone", T, || (!alive(pid)).then_some(()));
    let before = numbers(&log, 0).len();
    let restored = c.b.ok(&["restore", "process", "--path", &url]);
    let pid_b = c.track(restored_pid(&restored));
    assert_eq!(netns_of(pid_b), c.nodes.b.netns_inode(), "restored on node B");
    let after = wait_numbers(&log, 0, before + 5);
    assert!(consecutive(&after), "the count goes on where it was: {after:?}");

    // A managed job: run and dumped on A, restored on B as a job of B's, which knows where it came from.
    let log = c.a.dir().join("job.log");
    c.a.ok(&["run", "process", "--jid", "mover", "--out", log.to_str().unwrap(), "--", counter.to_str().unwrap()]);
    wait_numbers(&log, 0, 3);
    let job_pid: i32 = c.track(c.a.row("mover")[2].parse().unwrap());
    assert_eq!(netns_of(job_pid), c.nodes.a.netns_inode());
    let url = last_field(&c.a.ok(&["dump", "job", "mover", "--dir", &c.moto.url("jobs")]));
    let checkpoints = c.a.ok(&["job", "checkpoints", "mover"]);
    let checkpoint_id = checkpoints.lines().nth(1).and_then(|l| l.split_whitespace().next()).unwrap().to_string();
    assert!(checkpoints.contains(&url), "{checkpoints}");
    wait_for("node A's copy of the job to be gone", T, || (!alive(job_pid)).then_some(()));
    assert_eq!(c.a.row("mover")[3], "halted");
    let before = numbers(&log, 0).len();

    let out = c.b.ok(&["restore", "job", "--path", &url]);
    assert!(out.contains("mover"), "the job keeps its id: {out}");
    let row = c.b.row("mover");
    let pid_b: i32 = c.track(row[2].parse().unwrap());
    assert_eq!(netns_of(pid_b), c.nodes.b.netns_inode(), "the job runs on node B");
    let after = wait_numbers(&log, 0, before + 5);
    assert!(consecutive(&after), "{after:?}");
    let inspect = c.b.ok(&["job", "inspect", "mover"]);
    assert!(inspect.contains("origin_node: \"node-a\""), "{inspect}");
    assert!(inspect.contains("origin_job: \"mover\""), "{inspect}");
    assert!(inspect.contains(&format!("origin_checkpoint: \"{checkpoint_id}\"")), "{inspect}");
    assert!(inspect.contains(&format!("restored_from: \"{url}\"")), "{inspect}");
    // Node B refuses a second job of the same id; another id is fine to ask for.
    let err = c.b.err(&["restore", "job", "--path", &url]);
    assert!(err.contains("exists on this node"), "{err}");
    c.b.ok(&["job", "kill", "mover"]);
}

#[test]
fn an_established_tcp_connection_moves_with_its_address() {
    let c = cluster();
    // The peer, outside both nodes (on the bridge): answers N with N + 1 on every connection.
    let listener = std::net::TcpListener::bind((c.nodes.gateway.as_str(), 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut buf = [0u8; 8];
                while s.read_exact(&mut buf).is_ok() {
                    let v = i64::from_ne_bytes(buf) + 1;
                    if s.write_all(&v.to_ne_bytes()).is_err() {
                        break;
                    }
                }
            });
        }
    });
    // The service address moves with the program: on A now, on B after the move.
    let service = format!("{}.10", c.nodes.subnet);
    c.nodes.a.ip(&["addr", "add", &format!("{service}/24"), "dev", "eth0"]);
    let log = c.a.dir().join("tcp.log");
    let pid = c.track(start_on(&c.nodes.a, &workload_bin("tcp_client"), &[&c.nodes.gateway, &port.to_string(), &service], &log));
    wait_numbers(&log, 1, 5);

    let url = last_field(&c.a.ok(&["dump", "process", &pid.to_string(), "--tcp-established", "--dir", &c.moto.url("tcp")]));
    wait_for("node A's copy to be gone", T, || (!alive(pid)).then_some(()));
    c.nodes.a.ip(&["addr", "del", &format!("{service}/24"), "dev", "eth0"]);
    c.nodes.b.ip(&["addr", "add", &format!("{service}/24"), "dev", "eth0"]);
    c.nodes.forget_neighbour(&service);
    let before = numbers(&log, 1).len();
    let pid_b = c.track(restored_pid(&c.b.ok(&["restore", "process", "--path", &url])));
    assert_eq!(netns_of(pid_b), c.nodes.b.netns_inode());
    let after = wait_numbers(&log, 1, before + 10);
    assert!(consecutive(&after), "pongs over the same connection, from node B: {after:?}");
}

#[test]
fn a_container_moves_from_node_a_to_node_b_with_its_writable_layer() {
    let c = cluster();
    put_shim_on_path();
    let tmp = tempfile::tempdir().unwrap();
    let env = c.moto.env();
    let ctd_a = Containerd::start_in(&tmp.path().join("ctd-a"), &env, Some(&c.nodes.a.netns));
    let ctd_b = Containerd::start_in(&tmp.path().join("ctd-b"), &env, Some(&c.nodes.b.netns));
    let rootfs = cedana_integration::images::busybox_rootfs(&tmp.path().join("rootfs"));
    let image = "docker.io/cedana/mover:latest";
    ctd_a.import(&rootfs, image);
    ctd_b.import(&rootfs, image);
    let counter = "i=0; while true; do echo $i >> /count; i=$((i+1)); sleep 0.1; done";
    let run = ctd_a
        .ctr_cmd(&[
            "run",
            "--runtime",
            "io.containerd.cedana.v2",
            "--detach",
            "--null-io",
            image,
            "box",
            "/bin/sh",
            "-c",
            counter,
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let pid = ctd_a.task_pid("box");
    let counts = |pid: i32| numbers(Path::new(&format!("/proc/{pid}/root/count")), 0);
    wait_for("the container to count", T, || (counts(pid).len() >= 5).then_some(()));

    let cedana = |args: &[&str]| {
        let mut cmd = Command::new(cedana_integration::bin("cedana"));
        cmd.args(args).envs(env.iter().map(|(k, v)| (*k, v.as_str())));
        cedana_integration::success_stdout(&format!("cedana {args:?}"), &cmd.output().unwrap())
    };
    let url = last_field(&cedana(&[
        "dump",
        "containerd",
        "box",
        "--rootfs",
        "--address",
        ctd_a.socket.to_str().unwrap(),
        "--namespace",
        &ctd_a.namespace,
        "--dir",
        &c.moto.url("containers"),
        "--compression",
        "zstd",
    ]));
    wait_for("node A's container to stop", T, || (ctd_a.task_status("box").as_deref() == Some("STOPPED")).then_some(()));
    let at_dump = counts(pid).len().max(1);
    cedana(&[
        "restore",
        "containerd",
        "--path",
        &url,
        "--id",
        "box",
        "--address",
        ctd_b.socket.to_str().unwrap(),
        "--namespace",
        &ctd_b.namespace,
        "--detach",
    ]);
    let pid_b = ctd_b.task_pid("box");
    let after = wait_for("the moved container to count", T, || {
        let v = counts(pid_b);
        (v.len() > at_dump + 3).then_some(v)
    });
    assert_eq!(after[0], 0, "the writable layer came along with the file: {after:?}");
    assert!(consecutive(&after), "nothing lost or repeated: {after:?}");
    let _ = ctd_b.ctr(&["task", "kill", "-s", "SIGKILL", "box"]);
    ctd_a.remove("box");
}
