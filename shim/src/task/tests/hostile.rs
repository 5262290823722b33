//! Requests containerd would not send, or a hostile client of the shim's socket might: each is refused with
//! a clear kind before anything reaches the runtime, and the shim keeps serving.

use containerd_shim_protos::api::{CheckpointTaskRequest, ExecProcessRequest, ResizePtyRequest, UpdateTaskRequest};
use containerd_shim_protos::protobuf::well_known_types::any::Any;

use super::*;

fn garbage(type_url: &str) -> containerd_shim_protos::protobuf::MessageField<Any> {
    Some(Any { type_url: type_url.into(), value: vec![0xff; 7], ..Default::default() }).into()
}

#[tokio::test]
async fn malformed_creates_are_refused_before_the_runtime_sees_them() {
    let f = fixture(false);
    let long = "x".repeat(300);
    for id in ["", "../escape", "a/b", ".", "..", "with space", "nul\0byte", "-flag", long.as_str()] {
        let e = f.m.create(CreateTaskRequest { id: id.into(), ..create_req("ok") }).await.expect_err(id);
        assert_eq!(e.kind, Kind::InvalidArgument, "id {id:?}: {e}");
    }
    for bundle in ["", "relative/bundle", "/bundles/../../etc"] {
        let e = f.m.create(CreateTaskRequest { bundle: bundle.into(), ..create_req("b1") }).await.expect_err(bundle);
        assert_eq!(e.kind, Kind::InvalidArgument, "bundle {bundle:?}: {e}");
    }
    let e = f.m.create(CreateTaskRequest { options: garbage("containerd.runc.v1.Options"), ..create_req("o1") }).await;
    assert_eq!(kind(e), Kind::InvalidArgument);
    let e = f.m.create(CreateTaskRequest { options: garbage("example.com/Unknown"), ..create_req("o2") }).await;
    assert_eq!(kind(e), Kind::InvalidArgument);
    let e = f.m.create(CreateTaskRequest { checkpoint: "relative/ckpt".into(), ..create_req("k1") }).await;
    assert_eq!(kind(e), Kind::InvalidArgument);
    let e = f.m.create(CreateTaskRequest { checkpoint: "/nonexistent/ckpt".into(), ..create_req("k2") }).await;
    assert_eq!(kind(e), Kind::NotFound);
    assert!(f.runtime.calls.lock().unwrap().is_empty(), "nothing reached the runtime: {:?}", f.runtime.calls.lock().unwrap());
    // The shim goes on serving.
    f.m.create(create_req("fine")).await.unwrap();
}

#[tokio::test]
async fn absurd_calls_on_a_task_are_refused_and_leave_it_as_it_was() {
    let mut f = fixture(false);
    f.m.create(create_req("t1")).await.unwrap();
    f.m.start(StartRequest { id: "t1".into(), ..Default::default() }).await.unwrap();
    let before = f.runtime.calls.lock().unwrap().len();
    for signal in [65, 1000, u32::MAX] {
        let e = f.m.kill(KillRequest { id: "t1".into(), signal, ..Default::default() }).await;
        assert_eq!(kind(e), Kind::InvalidArgument, "signal {signal}");
    }
    let e = f.m.update(UpdateTaskRequest { id: "t1".into(), resources: garbage(""), ..Default::default() }).await;
    assert_eq!(kind(e), Kind::InvalidArgument);
    let e = f.m.checkpoint(CheckpointTaskRequest { id: "t1".into(), path: "relative".into(), ..Default::default() }).await;
    assert_eq!(kind(e), Kind::InvalidArgument);
    let e =
        f.m.checkpoint(CheckpointTaskRequest {
            id: "t1".into(),
            path: "/tmp/x".into(),
            options: garbage("containerd.runc.v1.CheckpointOptions"),
            ..Default::default()
        })
        .await;
    assert_eq!(kind(e), Kind::InvalidArgument);
    for exec_id in ["", "../x", "a/b"] {
        let e = f.m.exec(ExecProcessRequest { id: "t1".into(), exec_id: exec_id.into(), ..Default::default() }).await;
        assert_eq!(kind(e), Kind::InvalidArgument, "exec id {exec_id:?}");
    }
    let e =
        f.m.exec(ExecProcessRequest {
            id: "t1".into(),
            exec_id: "e1".into(),
            spec: Some(Any { value: b"not json".to_vec(), ..Default::default() }).into(),
            ..Default::default()
        })
        .await;
    assert_eq!(kind(e), Kind::InvalidArgument);
    let e = f.m.resize_pty(ResizePtyRequest { id: "t1".into(), width: 100_000, height: 1, ..Default::default() }).await;
    assert_eq!(kind(e), Kind::InvalidArgument);
    assert_eq!(f.runtime.calls.lock().unwrap().len(), before, "nothing reached the runtime");
    let state = f.m.state(StateRequest { id: "t1".into(), ..Default::default() }).await.unwrap();
    assert_eq!(state.status.enum_value(), Ok(Status::RUNNING));
    // The events were create and start only.
    assert_eq!(topics(&mut f.events), vec!["/tasks/create", "/tasks/start"]);
}
