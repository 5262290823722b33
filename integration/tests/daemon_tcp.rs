//! The daemon on TCP (`protocol = "tcp"`, 127.0.0.1 on a free port) with its bearer token: `ps`, and a job
//! run, dumped and restored, through the CLI, which reads the token file and sends the token; `dump process`
//! finding the daemon on TCP; calls without the token or with a wrong one refused (UNAUTHENTICATED, saying
//! where the token is configured) while the standard health check answers without one; and a daemon that
//! refuses to start on TCP with a token file others can read, or none. Calls without a token are made with a
//! small HTTP/2 client written here (the CLI always sends the token). Each test runs its own daemon on private
//! state, and stops it and its workloads by PID.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cedana_integration::daemon::{consecutive, free_port, numbers_in, printed_pid, Daemon};
use cedana_integration::workload::Workload;
use cedana_integration::{alive, bin, require_root, wait_for, workload_bin};

fn wait_for_count(log: &Path, n: usize) -> Vec<u64> {
    cedana_integration::daemon::wait_for_count(log, n, Duration::from_secs(20))
}

/// The error in a CLI's stderr: from "Error: " on (the lines before are logs).
fn error_text(stderr: &str) -> String {
    stderr.find("Error: ").map(|i| stderr[i..].to_string()).unwrap_or_else(|| stderr.to_string())
}

#[test]
fn ps_run_dump_and_restore_a_job_over_tcp_with_the_token() {
    let d = Daemon::start_tcp();
    let address = d.tcp_address().unwrap().to_string();
    let mode = std::fs::metadata(d.token_file()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "`cedana daemon token` writes a root-only file");
    assert!(!d.socket().exists(), "no Unix socket on tcp");
    assert!(d.log().contains(&address), "the daemon says where it listens: {}", d.log());
    assert!(d.ps().is_empty());

    let log = d.dir().join("counter.log");
    let counter = workload_bin("counter");
    let out = d.ok(&["run", "process", "--jid", "tcp1", "--out", log.to_str().unwrap(), "--", counter.to_str().unwrap()]);
    let pid = printed_pid(&out);
    wait_for_count(&log, 3);
    assert_eq!(&d.row("tcp1")[1..3], ["process", &pid.to_string()]);

    let dumped = d.ok(&["dump", "job", "tcp1"]);
    assert!(dumped.contains("dump-process-tcp1-"), "{dumped}");
    assert_eq!(d.row("tcp1")[3], "halted");
    wait_for("the dumped job to be gone", Duration::from_secs(10), || (!alive(pid)).then_some(()));
    wait_for(&format!("PID {pid} to be free"), Duration::from_secs(10), || {
        (!Path::new(&format!("/proc/{pid}")).exists()).then_some(())
    });
    let before = numbers_in(&log).len();
    let restored = d.ok(&["restore", "job", "tcp1"]);
    assert!(restored.contains(&format!("as PID {pid}")), "{restored}");
    let after = wait_for_count(&log, before + 3);
    assert!(consecutive(&after), "the output goes on where it stopped: {after:?}");

    d.ok(&["job", "kill", "tcp1"]);
    wait_for("the job's exit to be recorded", Duration::from_secs(10), || (d.row("tcp1")[3] == "exited").then_some(()));
    d.ok(&["job", "delete", "tcp1"]);
    assert!(d.ps().is_empty());

    // Attached over TCP: the output comes through, and the job's exit code becomes ours.
    let out = d.cedana(&["run", "process", "--attach", "--jid", "att", "--", "sh", "-c", "echo attached-over-tcp; exit 3"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("attached-over-tcp"), "{stdout} {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn dump_process_finds_the_daemon_on_tcp_and_works_alone_when_nothing_listens() {
    let d = Daemon::start_tcp();
    let counter = workload_bin("counter");
    let w = Workload::start(&counter, &[], d.dir());
    wait_for("the workload to count", Duration::from_secs(10), || (w.lines().len() >= 2).then_some(()));
    let pid = w.pid.to_string();
    let out = d.command(&["dump", "process", &pid, "--leave-running", "--name", "via-daemon"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}\ndaemon log:\n{}", d.log());
    assert!(stderr.contains("dumping through the daemon"), "the probe found the daemon on tcp: {stderr}");
    assert!(d.checkpoints().join("via-daemon.tar").exists());

    // Nothing on that port: the probe falls back at once and says nothing above debug level.
    let nobody = format!("127.0.0.1:{}", free_port());
    let t = Instant::now();
    let out = d
        .command(&["dump", "process", &pid, "--leave-running", "--name", "alone"])
        .env("CEDANA_ADDRESS", &nobody)
        .env("CEDANA_LOG_LEVEL", "warn")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.trim().is_empty(), "a silent fallback: {stderr}");
    assert!(d.checkpoints().join("alone.tar").exists());
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());

    // A daemon command names the TCP address it could not reach.
    let err = error_text(&String::from_utf8_lossy(&d.command(&["ps"]).env("CEDANA_ADDRESS", &nobody).output().unwrap().stderr));
    assert!(err.contains(&format!("not running at {nobody} (tcp)")) && err.contains("cedana daemon start"), "{err}");
}

#[test]
fn calls_without_the_token_or_with_a_wrong_one_are_unauthenticated_but_health_answers() {
    let d = Daemon::start_tcp();
    let address = d.tcp_address().unwrap().to_string();

    // The CLI with a wrong token (a file of its own, as a user could point CEDANA_DAEMON_TOKEN_FILE at).
    let wrong = d.dir().join("wrong-token");
    std::fs::write(&wrong, "f".repeat(64)).unwrap();
    std::fs::set_permissions(&wrong, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = d.command(&["ps"]).env("CEDANA_DAEMON_TOKEN_FILE", &wrong).output().unwrap();
    assert!(!out.status.success());
    let err = error_text(&String::from_utf8_lossy(&out.stderr));
    assert!(err.contains("wrong token") && err.contains("(unauthenticated)"), "{err}");
    assert!(err.contains(d.token_file().to_str().unwrap()) && err.contains("daemon.token_file"), "{err}");
    // Without a token file the CLI says how to make one before calling.
    let none = d.dir().join("no-such-token");
    let out = d.command(&["ps"]).env("CEDANA_DAEMON_TOKEN_FILE", &none).output().unwrap();
    let err = error_text(&String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success() && err.contains("cedana daemon token") && err.contains(none.to_str().unwrap()), "{err}");

    // Raw calls: without a token the daemon answers with a status alone (no message), and logs why.
    let list = "/cedana.daemon.v1.Daemon/List";
    let refused = raw_call(&address, list, None, &[]);
    assert!(refused.trailers_only, "refused without a token: {refused:?}");
    assert!(d.log().contains("refused an unauthenticated call") && d.log().contains("needs a token"), "{}", d.log());
    let token = std::fs::read_to_string(d.token_file()).unwrap();
    let refused = raw_call(&address, list, Some(&"0".repeat(64)), &[]);
    assert!(refused.trailers_only, "refused with a wrong token: {refused:?}");
    assert!(d.log().contains("wrong token"), "{}", d.log());
    let listed = raw_call(&address, list, Some(token.trim()), &[]);
    assert!(!listed.trailers_only && listed.data.len() >= 5, "answered with the token: {listed:?}");
    // Reflection is behind the token too.
    let reflection = raw_call(&address, "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", None, &[]);
    assert!(reflection.trailers_only, "{reflection:?}");

    // The standard health check answers without a token: the daemon's API is SERVING (status 1).
    let service = b"cedana.daemon.v1.Daemon";
    let mut request = vec![0x0a, service.len() as u8];
    request.extend_from_slice(service);
    let health = raw_call(&address, "/grpc.health.v1.Health/Check", None, &request);
    assert_eq!(health.data, [0, 0, 0, 0, 2, 0x08, 0x01], "{health:?}");
}

#[test]
fn daemon_start_on_tcp_refuses_a_token_file_others_can_read_or_none() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    let address = format!("127.0.0.1:{}", free_port());
    let start = |extra: &[(&str, &str)]| {
        let mut cmd = Command::new(bin("cedana"));
        cmd.args(["daemon", "start"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .env("CEDANA_PROTOCOL", "tcp")
            .env("CEDANA_ADDRESS", &address)
            .env("CEDANA_DAEMON_TOKEN_FILE", &token)
            .env("CEDANA_DB_PATH", dir.path().join("jobs.db"))
            .env("CEDANA_CHECKPOINT_DIR", dir.path().join("checkpoints"))
            .env("CEDANA_LOG_LEVEL", "info");
        cmd.envs(extra.iter().copied());
        exits_with_error(cmd.spawn().unwrap())
    };

    let err = start(&[]);
    assert!(err.contains(&format!("no token file at {}", token.display())) && err.contains("cedana daemon token"), "{err}");

    let out = Command::new(bin("cedana")).args(["daemon", "token", "--file"]).arg(&token).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = start(&[]);
    assert!(err.contains("can be read by group or others (mode 0644)"), "{err}");
    assert!(err.contains(&format!("chmod 600 {}", token.display())), "{err}");
    assert!(TcpStream::connect(&address).is_err(), "nothing listens");

    // A socket path is no TCP address.
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let err = start(&[("CEDANA_ADDRESS", "/run/cedana.sock")]);
    assert!(err.contains("is not HOST:PORT") && err.contains("127.0.0.1:8080"), "{err}");
    assert!(!dir.path().join("jobs.db").exists(), "refused before anything was opened");
}

/// Wait (up to 30 s) for a `daemon start` that must fail; its stderr. Killed by PID if it runs on.
fn exits_with_error(mut child: Child) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the daemon started although it should have refused");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert!(!status.success(), "{stderr}");
    error_text(&stderr)
}

/// What the server sent on the stream of a [`raw_call`].
#[derive(Debug)]
struct Answer {
    /// The DATA frames' bytes (gRPC length-prefixed messages).
    data: Vec<u8>,
    /// A HEADERS frame ended the stream before any DATA: a gRPC status alone (how refusals look).
    trailers_only: bool,
}

/// One unary gRPC call over cleartext HTTP/2, spoken by hand: `message` (an encoded protobuf) to `path`, with
/// `authorization: Bearer TOKEN` when given.
fn raw_call(address: &str, path: &str, token: Option<&str>, message: &[u8]) -> Answer {
    let mut s = TcpStream::connect(address).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    frame(&mut out, 4, 0, 0, &[]);
    // :method POST and :scheme http from HPACK's static table, the others literal, not indexed.
    let mut block = vec![0x83, 0x86];
    let bearer = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![(":path", path), (":authority", address), ("content-type", "application/grpc"), ("te", "trailers")];
    if let Some(b) = &bearer {
        headers.push(("authorization", b));
    }
    for (name, value) in headers {
        assert!(name.len() < 127 && value.len() < 127, "short header fields only");
        block.extend([0x00, name.len() as u8]);
        block.extend_from_slice(name.as_bytes());
        block.push(value.len() as u8);
        block.extend_from_slice(value.as_bytes());
    }
    frame(&mut out, 1, 0x4, 1, &block);
    let mut body = vec![0];
    body.extend((message.len() as u32).to_be_bytes());
    body.extend_from_slice(message);
    frame(&mut out, 0, 0x1, 1, &body);
    s.write_all(&out).unwrap();

    let mut answer = Answer { data: Vec::new(), trailers_only: false };
    let mut headers_seen = 0;
    loop {
        let mut head = [0u8; 9];
        s.read_exact(&mut head).expect("a frame from the daemon");
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let (kind, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0; len];
        s.read_exact(&mut payload).unwrap();
        match (kind, stream) {
            // SETTINGS and PING are acknowledged.
            (4, 0) if flags & 1 == 0 => {
                let mut ack = Vec::new();
                frame(&mut ack, 4, 1, 0, &[]);
                s.write_all(&ack).unwrap();
            }
            (6, 0) if flags & 1 == 0 => {
                let mut ack = Vec::new();
                frame(&mut ack, 6, 1, 0, &payload);
                s.write_all(&ack).unwrap();
            }
            (7, 0) => panic!("GOAWAY from the daemon: {payload:?}"),
            (3, 1) => panic!("the daemon reset the stream: {payload:?}"),
            (1, 1) => {
                headers_seen += 1;
                if flags & 1 != 0 {
                    answer.trailers_only = headers_seen == 1 && answer.data.is_empty();
                    return answer;
                }
            }
            (0, 1) => {
                answer.data.extend_from_slice(&payload);
                if flags & 1 != 0 {
                    return answer;
                }
            }
            _ => {}
        }
    }
}

/// Append an HTTP/2 frame.
fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    out.extend([kind, flags]);
    out.extend(stream.to_be_bytes());
    out.extend_from_slice(payload);
}
