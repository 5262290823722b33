//! The daemon's gRPC API against requests no CLI would send: missing or absurd fields, relative and odd paths,
//! a message over the size limit, clients that go away mid-stream. Each gets a clear status code (never
//! UNKNOWN or INTERNAL for a caller's mistake), the daemon does not panic, and nothing is leaked: its
//! threads and descriptors settle back to where they were, and it answers as before.

use std::path::Path;
use std::time::Duration;

use cedana_integration::daemon::Daemon;
use cedana_integration::wait_for;
use cedana_protos::v1 as pb;
use pb::daemon_client::DaemonClient;
use tonic::transport::Channel;
use tonic::Code;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

fn client(rt: &tokio::runtime::Runtime, socket: &Path) -> DaemonClient<Channel> {
    let channel = rt.block_on(cedana_protos::connect_uds(socket)).unwrap();
    // Our client may send more than the daemon accepts: the daemon's limit is what is tested.
    DaemonClient::new(channel).max_encoding_message_size(64 << 20)
}

/// The daemon's open descriptors and threads.
fn footprint(pid: i32) -> (usize, usize) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0);
    let threads = std::fs::read_dir(format!("/proc/{pid}/task")).map(|d| d.count()).unwrap_or(0);
    (fds, threads)
}

/// The code of a call that must fail, with its message; `Code::Ok` for one that succeeded.
fn code<T>(r: Result<tonic::Response<T>, tonic::Status>) -> (Code, String) {
    match r {
        Ok(_) => (Code::Ok, "it succeeded".into()),
        Err(s) => (s.code(), s.message().to_string()),
    }
}

#[test]
fn absurd_requests_get_clear_codes_and_leave_nothing_behind() {
    let d = Daemon::start();
    let rt = runtime();
    let mut c = client(&rt, &d.socket());
    // A first call warms up the daemon's pools before the footprint is taken.
    rt.block_on(c.list(pb::ListRequest {})).unwrap();
    let before = footprint(d.pid());

    let cases: Vec<(&str, Result<(), tonic::Status>, &[Code])> = vec![
        ("run without a program", rt.block_on(c.run(pb::RunRequest::default())).map(drop), &[Code::InvalidArgument]),
        (
            "run of a program that does not exist",
            rt.block_on(c.run(pb::RunRequest { args: vec!["/nonexistent/prog".into()], ..Default::default() })).map(drop),
            &[Code::NotFound, Code::FailedPrecondition],
        ),
        (
            "run with a job id holding a slash",
            rt.block_on(c.run(pb::RunRequest { jid: "../x".into(), args: vec!["true".into()], ..Default::default() })).map(drop),
            &[Code::InvalidArgument],
        ),
        (
            "run of a runc container without a bundle",
            rt.block_on(c.run(pb::RunRequest { r#type: pb::JobType::Runc as i32, ..Default::default() })).map(drop),
            &[Code::InvalidArgument],
        ),
        (
            "run with an unknown job type",
            rt.block_on(c.run(pb::RunRequest { r#type: 99, args: vec!["true".into()], ..Default::default() })).map(drop),
            &[Code::InvalidArgument],
        ),
        (
            "manage of PID -5",
            rt.block_on(c.manage(pb::ManageRequest { pid: -5, ..Default::default() })).map(drop),
            &[Code::InvalidArgument],
        ),
        (
            "manage of a PID nobody has",
            rt.block_on(c.manage(pb::ManageRequest { pid: i32::MAX, ..Default::default() })).map(drop),
            &[Code::NotFound],
        ),
        ("manage of nothing", rt.block_on(c.manage(pb::ManageRequest::default())).map(drop), &[Code::InvalidArgument]),
        ("inspect without an id", rt.block_on(c.inspect(pb::JobRef::default())).map(drop), &[Code::InvalidArgument]),
        (
            "inspect of a job that does not exist",
            rt.block_on(c.inspect(pb::JobRef { jid: "../../etc/passwd".into() })).map(drop),
            &[Code::NotFound],
        ),
        ("kill of nothing", rt.block_on(c.kill(pb::KillRequest::default())).map(drop), &[Code::InvalidArgument]),
        ("delete of nothing", rt.block_on(c.delete(pb::JobRef::default())).map(drop), &[Code::InvalidArgument]),
        ("dump of nothing", rt.block_on(c.dump(pb::DumpRequest::default())).map(drop), &[Code::InvalidArgument]),
        (
            "dump with an unknown compression",
            rt.block_on(c.dump(pb::DumpRequest {
                target: Some(pb::dump_request::Target::Pid(1)),
                compression: "rar".into(),
                ..Default::default()
            }))
            .map(drop),
            &[Code::InvalidArgument],
        ),
        (
            "dump of a PID nobody has",
            rt.block_on(c.dump(pb::DumpRequest {
                target: Some(pb::dump_request::Target::Pid(i32::MAX)),
                dir: d.dir().display().to_string(),
                ..Default::default()
            }))
            .map(drop),
            &[Code::NotFound],
        ),
        (
            "dump of a job that does not exist",
            rt.block_on(
                c.dump(pb::DumpRequest { target: Some(pb::dump_request::Target::Jid("nope".into())), ..Default::default() }),
            )
            .map(drop),
            &[Code::NotFound],
        ),
        ("restore of nothing", rt.block_on(c.restore(pb::RestoreRequest::default())).map(drop), &[Code::InvalidArgument]),
        (
            "restore of a path that does not exist",
            rt.block_on(c.restore(pb::RestoreRequest {
                source: Some(pb::restore_request::Source::Path("/nonexistent/ckpt.tar".into())),
                ..Default::default()
            }))
            .map(drop),
            &[Code::NotFound],
        ),
        (
            "restore of /etc/passwd",
            rt.block_on(c.restore(pb::RestoreRequest {
                source: Some(pb::restore_request::Source::Path("/etc/passwd".into())),
                ..Default::default()
            }))
            .map(drop),
            &[Code::FailedPrecondition, Code::InvalidArgument],
        ),
        (
            "restore of a folder that is no checkpoint",
            rt.block_on(c.restore(pb::RestoreRequest {
                source: Some(pb::restore_request::Source::Path("/etc".into())),
                ..Default::default()
            }))
            .map(drop),
            &[Code::FailedPrecondition, Code::InvalidArgument],
        ),
        (
            "a run request of 8 MiB",
            rt.block_on(c.run(pb::RunRequest { args: vec!["x".repeat(8 << 20)], ..Default::default() })).map(drop),
            &[Code::ResourceExhausted, Code::OutOfRange],
        ),
    ];
    let mut wrong = Vec::new();
    for (what, result, wanted) in cases {
        let (got, message) = code(result.map(tonic::Response::new));
        if !wanted.contains(&got) || message.is_empty() {
            wrong.push(format!("{what}: {got:?} {message:?} (wanted one of {wanted:?})"));
        }
    }
    assert!(wrong.is_empty(), "unclear answers:\n{}", wrong.join("\n"));

    // Attach streams that go away: before naming a job, right after, and one naming a job that is not there.
    for first in [None, Some("nope")] {
        let (tx, rx) = tokio::sync::mpsc::channel::<pb::AttachInput>(1);
        if let Some(jid) = first {
            tx.try_send(pb::AttachInput { jid: jid.into(), ..Default::default() }).unwrap();
        }
        drop(tx);
        let r = rt.block_on(c.attach(tokio_stream::wrappers::ReceiverStream::new(rx)));
        let (got, _) = code(r);
        assert!(matches!(got, Code::InvalidArgument | Code::NotFound), "{got:?}");
    }
    // A client that drops its connection in the middle of a call that waits (manage --upcoming).
    {
        let mut c2 = client(&rt, &d.socket());
        let wait = c2.manage(pb::ManageRequest { upcoming: true, name: "never-there".into(), ..Default::default() });
        let timed = rt.block_on(async { tokio::time::timeout(Duration::from_millis(300), wait).await });
        assert!(timed.is_err(), "the wait goes on until the client goes away");
    }

    // The daemon answers as before, and settles back to its footprint.
    rt.block_on(c.list(pb::ListRequest {})).unwrap();
    drop(c);
    let settled = wait_for("the daemon's descriptors and threads to settle", Duration::from_secs(20), || {
        let now = footprint(d.pid());
        (now.0 <= before.0 && now.1 <= before.1 + 2).then_some(now)
    });
    assert!(settled.0 <= before.0, "descriptors {before:?} -> {settled:?}");
    assert!(d.log().matches("panicked").count() == 0, "no panic in the daemon:\n{}", d.log());
}
