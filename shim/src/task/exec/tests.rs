//! Exec processes, CloseIO, ResizePty, Update and Stats through the stub runtime.

use containerd_shim_protos::api::{CreateTaskRequest, PauseRequest, PidsRequest, ResumeRequest, StatsRequest, UpdateTaskRequest};
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::Message;
use containerd_shim_protos::ttrpc::{self, Code};

use std::path::Path;
use std::time::Duration;

use super::*;
use crate::error::Kind;
use crate::task::should_kill_all_on_exit;
use crate::task::tests::{create_req, fixture, kind, next_event, topics, Fixture, EXEC_PID, MEMORY_USAGE, PID};

const SPEC: &str = r#"{"args":["/bin/sh","-c","echo hi; exit 3"],"cwd":"/","terminal":false}"#;

fn exec_req(id: &str, exec_id: &str) -> ExecProcessRequest {
    ExecProcessRequest {
        id: id.into(),
        exec_id: exec_id.into(),
        stdout: format!("/fifo/{exec_id}-out"),
        spec: MessageField::some(Any {
            type_url: "types.containerd.io/opencontainers/runtime-spec/1/Process".into(),
            value: SPEC.as_bytes().to_vec(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn start(id: &str, exec_id: &str) -> StartRequest {
    StartRequest { id: id.into(), exec_id: exec_id.into(), ..Default::default() }
}
fn state(id: &str, exec_id: &str) -> StateRequest {
    StateRequest { id: id.into(), exec_id: exec_id.into(), ..Default::default() }
}
fn wait(id: &str, exec_id: &str) -> WaitRequest {
    WaitRequest { id: id.into(), exec_id: exec_id.into(), ..Default::default() }
}
fn kill(id: &str, exec_id: &str, signal: u32) -> KillRequest {
    KillRequest { id: id.into(), exec_id: exec_id.into(), signal, ..Default::default() }
}
fn delete(id: &str, exec_id: &str) -> DeleteRequest {
    DeleteRequest { id: id.into(), exec_id: exec_id.into(), ..Default::default() }
}

/// A created and started task `id`, its two events consumed.
async fn running(f: &mut Fixture, id: &str) {
    f.m.create(create_req(id)).await.unwrap();
    f.m.start(start(id, "")).await.unwrap();
    assert_eq!(topics(&mut f.events), vec!["/tasks/create", "/tasks/start"]);
}

#[tokio::test]
async fn exec_lifecycle_add_start_exit_wait_delete() {
    let mut f = fixture(false);
    running(&mut f, "c1").await;
    f.m.exec(exec_req("c1", "e1")).await.unwrap();
    match next_event(&mut f.events).await {
        Event::ExecAdded(e) => assert_eq!((e.container_id.as_str(), e.exec_id.as_str()), ("c1", "e1")),
        other => panic!("expected exec-added, got {other:?}"),
    }
    let st = f.m.state(state("c1", "e1")).await.unwrap();
    assert_eq!((st.status.enum_value(), st.pid, st.id.as_str()), (Ok(Status::CREATED), 0, "e1"));
    assert_eq!((st.exec_id.as_str(), st.stdout.as_str(), st.bundle.as_str()), ("e1", "/fifo/e1-out", "/bundles/c1"));
    // Signalling an exec that does not run yet: FailedPrecondition, as the runc shim answers.
    assert_eq!(kind(f.m.kill(kill("c1", "e1", 9)).await), Kind::FailedPrecondition);
    // ctr waits before it starts.
    let waiter = {
        let m = f.m.clone();
        tokio::spawn(async move { m.wait(wait("c1", "e1")).await })
    };

    let started = f.m.start(start("c1", "e1")).await.unwrap();
    assert_eq!(started.pid, EXEC_PID as u32);
    match next_event(&mut f.events).await {
        Event::ExecStarted(e) => assert_eq!((e.container_id.as_str(), e.exec_id.as_str(), e.pid), ("c1", "e1", EXEC_PID as u32)),
        other => panic!("expected exec-started, got {other:?}"),
    }
    let st = f.m.state(state("c1", "e1")).await.unwrap();
    assert_eq!((st.status.enum_value(), st.pid), (Ok(Status::RUNNING), EXEC_PID as u32));
    assert_eq!(kind(f.m.start(start("c1", "e1")).await), Kind::FailedPrecondition, "started twice");
    assert_eq!(kind(f.m.delete(delete("c1", "e1")).await), Kind::FailedPrecondition, "deleted while it runs");
    // ctr task ps: the exec's PID carries its exec id.
    let pids = f.m.pids(PidsRequest { id: "c1".into(), ..Default::default() }).await.unwrap();
    let exec = pids.processes.iter().find(|p| p.pid == EXEC_PID as u32).expect("the exec among the PIDs");
    assert_eq!(exec.info.type_url, crate::task::PROCESS_DETAILS_TYPE_URL);
    let details = containerd_shim_protos::shim::oci::ProcessDetails::parse_from_bytes(&exec.info.value).unwrap();
    assert_eq!(details.exec_id, "e1");
    assert!(pids.processes.iter().find(|p| p.pid == PID as u32).is_some_and(|p| p.info.is_none()));

    // The exec exits with 3: a TaskExit carrying the exec id; the init runs on.
    f.runtime.exits.send((EXEC_PID, 3)).unwrap();
    match next_event(&mut f.events).await {
        Event::Exit(e) => {
            assert_eq!((e.container_id.as_str(), e.id.as_str(), e.pid, e.exit_status), ("c1", "e1", EXEC_PID as u32, 3))
        }
        other => panic!("expected exit, got {other:?}"),
    }
    let waited = tokio::time::timeout(Duration::from_secs(5), waiter).await.unwrap().unwrap().unwrap();
    assert_eq!(waited.exit_status, 3);
    let st = f.m.state(state("c1", "e1")).await.unwrap();
    assert_eq!((st.status.enum_value(), st.exit_status), (Ok(Status::STOPPED), 3));
    assert!(st.exited_at.is_some());
    let init = f.m.state(state("c1", "")).await.unwrap();
    assert_eq!(init.status.enum_value(), Ok(Status::RUNNING));
    assert_eq!(kind(f.m.kill(kill("c1", "e1", 9)).await), Kind::NotFound, "a finished exec");

    let deleted = f.m.delete(delete("c1", "e1")).await.unwrap();
    assert_eq!((deleted.pid, deleted.exit_status), (EXEC_PID as u32, 3));
    assert_eq!(kind(f.m.state(state("c1", "e1")).await), Kind::NotFound);
    assert!(topics(&mut f.events).is_empty(), "deleting an exec publishes no TaskDelete");
    // The id is free again.
    f.m.exec(exec_req("c1", "e1")).await.unwrap();
    let calls = f.runtime.calls.lock().unwrap().clone();
    assert_eq!(calls[2..], ["exec c1 e1 /fifo/e1-out"]);
}

#[tokio::test]
async fn kill_signals_the_exec_and_its_exit_is_reported() {
    let mut f = fixture(false);
    running(&mut f, "c2").await;
    f.m.exec(exec_req("c2", "long")).await.unwrap();
    f.m.start(start("c2", "long")).await.unwrap();
    f.m.kill(kill("c2", "long", 9)).await.unwrap();
    let waited = tokio::time::timeout(Duration::from_secs(5), f.m.wait(wait("c2", "long"))).await.unwrap().unwrap();
    assert_eq!(waited.exit_status, 137);
    assert!(f.runtime.calls.lock().unwrap().contains(&format!("signal {EXEC_PID} 9")), "the exec's PID is signalled");
    assert_eq!(topics(&mut f.events), vec!["/tasks/exec-added", "/tasks/exec-started", "/tasks/exit"]);
    // The init's exit afterwards is the task's, not the exec's.
    f.m.kill(kill("c2", "", 9)).await.unwrap();
    f.m.wait(wait("c2", "")).await.unwrap();
    let st = f.m.state(state("c2", "")).await.unwrap();
    assert_eq!((st.status.enum_value(), st.exit_status), (Ok(Status::STOPPED), 137));
}

#[tokio::test]
async fn exec_refusals_match_the_runc_shim() {
    let mut f = fixture(false);
    assert_eq!(kind(f.m.exec(exec_req("nope", "e1")).await), Kind::NotFound, "unknown task");
    running(&mut f, "c3").await;
    f.m.exec(exec_req("c3", "e1")).await.unwrap();
    assert_eq!(kind(f.m.exec(exec_req("c3", "e1")).await), Kind::AlreadyExists, "duplicate exec id");
    assert_eq!(kind(f.m.exec(exec_req("c3", "c3")).await), Kind::AlreadyExists, "the init's id");
    assert_eq!(kind(f.m.exec(exec_req("c3", "../x")).await), Kind::InvalidArgument);
    let not_json = ExecProcessRequest {
        spec: MessageField::some(Any { value: b"args".to_vec(), ..Default::default() }),
        ..exec_req("c3", "e2")
    };
    assert_eq!(kind(f.m.exec(not_json).await), Kind::InvalidArgument);
    // Every request naming an unknown exec: NotFound.
    assert_eq!(kind(f.m.start(start("c3", "zz")).await), Kind::NotFound);
    assert_eq!(kind(f.m.state(state("c3", "zz")).await), Kind::NotFound);
    assert_eq!(kind(f.m.wait(wait("c3", "zz")).await), Kind::NotFound);
    assert_eq!(kind(f.m.kill(kill("c3", "zz", 9)).await), Kind::NotFound);
    assert_eq!(kind(f.m.delete(delete("c3", "zz")).await), Kind::NotFound);

    // Paused: refused with UNKNOWN, as the runc shim's plain "cannot exec in a paused state".
    f.m.pause(PauseRequest { id: "c3".into(), ..Default::default() }).await.unwrap();
    assert_eq!(kind(f.m.exec(exec_req("c3", "p1")).await), Kind::Unknown);
    f.m.resume(ResumeRequest { id: "c3".into(), ..Default::default() }).await.unwrap();
    // Stopped: the same, and the code reaching containerd is UNKNOWN.
    f.m.kill(kill("c3", "", 9)).await.unwrap();
    f.m.wait(wait("c3", "")).await.unwrap();
    let e: ttrpc::Error = f.m.exec(exec_req("c3", "s1")).await.unwrap_err().into();
    match e {
        ttrpc::Error::RpcStatus(s) => {
            assert_eq!(s.code(), Code::UNKNOWN);
            assert!(s.message().contains("cannot exec in a stopped state"), "{}", s.message());
        }
        other => panic!("unexpected {other:?}"),
    }
    // The exec recorded before the init died cannot start any more.
    assert_eq!(kind(f.m.start(start("c3", "e1")).await), Kind::Unknown);

    // A task whose restore is pending has no container to exec in.
    let dir = tempfile::tempdir().unwrap();
    let restore = CreateTaskRequest { checkpoint: dir.path().display().to_string(), ..create_req("r1") };
    f.m.create(restore).await.unwrap();
    assert_eq!(kind(f.m.exec(exec_req("r1", "e1")).await), Kind::Unknown);
}

#[tokio::test]
async fn failed_exec_start_ends_the_exec() {
    let f = fixture(false);
    f.m.create(create_req("c4")).await.unwrap();
    f.m.start(start("c4", "")).await.unwrap();
    f.m.exec(exec_req("c4", "bad")).await.unwrap();
    assert_eq!(kind(f.m.start(start("c4", "bad")).await), Kind::Unknown);
    let waited = tokio::time::timeout(Duration::from_secs(5), f.m.wait(wait("c4", "bad"))).await.unwrap().unwrap();
    assert_eq!(waited.exit_status, FAILED_START_STATUS);
    let st = f.m.state(state("c4", "bad")).await.unwrap();
    assert_eq!(st.status.enum_value(), Ok(Status::STOPPED));
    f.m.delete(delete("c4", "bad")).await.unwrap();
}

#[tokio::test]
async fn paused_task_shows_its_execs_paused() {
    let f = fixture(false);
    f.m.create(create_req("c5")).await.unwrap();
    f.m.start(start("c5", "")).await.unwrap();
    f.m.exec(exec_req("c5", "e1")).await.unwrap();
    f.m.start(start("c5", "e1")).await.unwrap();
    f.m.pause(PauseRequest { id: "c5".into(), ..Default::default() }).await.unwrap();
    assert_eq!(f.m.state(state("c5", "e1")).await.unwrap().status.enum_value(), Ok(Status::PAUSED));
    f.m.resume(ResumeRequest { id: "c5".into(), ..Default::default() }).await.unwrap();
    assert_eq!(f.m.state(state("c5", "e1")).await.unwrap().status.enum_value(), Ok(Status::RUNNING));
}

#[tokio::test]
async fn close_io_and_resize_pty_need_the_process_only() {
    let f = fixture(false);
    let close = |exec_id: &str| CloseIORequest { id: "c6".into(), exec_id: exec_id.into(), stdin: true, ..Default::default() };
    let resize = |exec_id: &str| ResizePtyRequest {
        id: "c6".into(),
        exec_id: exec_id.into(),
        width: 80,
        height: 24,
        ..Default::default()
    };
    assert_eq!(kind(f.m.close_io(close("")).await), Kind::NotFound, "unknown task");
    assert_eq!(kind(f.m.resize_pty(resize("")).await), Kind::NotFound, "unknown task");
    f.m.create(create_req("c6")).await.unwrap();
    f.m.close_io(close("")).await.unwrap();
    f.m.resize_pty(resize("")).await.unwrap();
    assert_eq!(kind(f.m.close_io(close("e1")).await), Kind::NotFound, "unknown exec");
    assert_eq!(kind(f.m.resize_pty(resize("e1")).await), Kind::NotFound, "unknown exec");
    f.m.exec(exec_req("c6", "e1")).await.unwrap();
    f.m.close_io(close("e1")).await.unwrap();
    f.m.resize_pty(resize("e1")).await.unwrap();
}

fn update_req(id: &str, json: &str) -> UpdateTaskRequest {
    UpdateTaskRequest {
        id: id.into(),
        resources: MessageField::some(Any {
            type_url: "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources".into(),
            value: json.as_bytes().to_vec(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn update_and_stats_go_through_the_runtime() {
    let f = fixture(false);
    let limit = r#"{"memory":{"limit":67108864}}"#;
    assert_eq!(kind(f.m.update(update_req("c7", limit)).await), Kind::NotFound);
    assert_eq!(kind(f.m.stats(StatsRequest { id: "c7".into(), ..Default::default() }).await), Kind::NotFound);
    f.m.create(create_req("c7")).await.unwrap();
    f.m.start(start("c7", "")).await.unwrap();
    f.m.update(update_req("c7", limit)).await.unwrap();
    assert_eq!(kind(f.m.update(update_req("c7", "memory=1")).await), Kind::InvalidArgument);
    let stats = f.m.stats(StatsRequest { id: "c7".into(), ..Default::default() }).await.unwrap();
    assert_eq!(stats.stats.type_url, crate::stats::METRICS_V1_TYPE_URL);
    let metrics = containerd_shim_protos::cgroups::metrics::Metrics::parse_from_bytes(&stats.stats.value).unwrap();
    assert_eq!(metrics.memory.usage.usage, MEMORY_USAGE);
    let calls = f.runtime.calls.lock().unwrap().clone();
    assert_eq!(calls[2..], [format!("update c7 {limit}"), "stats c7".to_string()]);
    // A stopped task has nothing to update.
    f.m.kill(kill("c7", "", 9)).await.unwrap();
    f.m.wait(wait("c7", "")).await.unwrap();
    assert_eq!(kind(f.m.update(update_req("c7", limit)).await), Kind::FailedPrecondition);
}

#[tokio::test]
async fn init_exit_kills_the_rest_only_without_a_private_pid_namespace() {
    let dir = tempfile::tempdir().unwrap();
    let spec = r#"{"linux":{"namespaces":[{"type":"mount"},{"type":"pid"}]}}"#;
    std::fs::write(dir.path().join("config.json"), spec).unwrap();
    assert!(!should_kill_all_on_exit(dir.path()), "a PID namespace of its own: the kernel kills the rest");
    let shared = r#"{"linux":{"namespaces":[{"type":"pid","path":"/proc/1/ns/pid"}]}}"#;
    let other = tempfile::tempdir().unwrap();
    std::fs::write(other.path().join("config.json"), shared).unwrap();
    assert!(should_kill_all_on_exit(other.path()), "a shared PID namespace");
    assert!(should_kill_all_on_exit(Path::new("/no/such/bundle")), "no spec");

    let f = fixture(false);
    let req = CreateTaskRequest { bundle: dir.path().display().to_string(), ..create_req("c8") };
    f.m.create(req).await.unwrap();
    f.m.start(start("c8", "")).await.unwrap();
    f.m.kill(kill("c8", "", 9)).await.unwrap();
    f.m.wait(wait("c8", "")).await.unwrap();
    let calls = f.runtime.calls.lock().unwrap().clone();
    assert!(!calls.iter().any(|c| c.ends_with(" all")), "no kill --all: {calls:?}");
}
