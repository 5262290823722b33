//! The lifecycle through a stub runtime and a channel event sender.

use std::sync::Mutex as StdMutex;

use async_trait::async_trait;
use containerd_shim_protos::ttrpc::Code;
use tokio::sync::mpsc;

use super::*;
use crate::error::Kind;
use crate::runtime::{ExecOpts, RuntimeState};

/// A runtime that records calls; `kill` with SIGKILL/SIGTERM makes the init "exit" through the exit channel,
/// as the reaper would, and `signal` does the same for an exec's PID. Exec PIDs are [`EXEC_PID`] + n; an exec
/// whose id is `bad` fails as runc's would. Given a console socket, it sends the master end of a new
/// pseudo-terminal there, as runc does, and keeps the slave end in `slaves` (a container or exec named
/// `noconsole` connects and sends nothing). The restore of a container named `badrestore` fails as runc's would.
pub(crate) struct StubRuntime {
    pub(crate) calls: StdMutex<Vec<String>>,
    /// The slave ends of the terminals sent, in order.
    pub(crate) slaves: StdMutex<Vec<std::os::fd::OwnedFd>>,
    pub(crate) exits: mpsc::UnboundedSender<(i32, i32)>,
    fail_start: bool,
    /// PIDs of the execs started.
    exec_pids: StdMutex<Vec<i32>>,
}

pub(crate) const PID: i32 = 4242;
/// The first exec's PID.
pub(crate) const EXEC_PID: i32 = 7001;
/// The memory usage the stub's stats report.
pub(crate) const MEMORY_USAGE: u64 = 123_456;

#[async_trait]
impl Runtime for StubRuntime {
    async fn create(&self, opts: &CreateOpts) -> Result<i32> {
        let console = if opts.console_socket.is_some() { " console" } else { "" };
        self.calls.lock().unwrap().push(format!("create {} {}{console}", opts.id, opts.stdout));
        if let Some(socket) = &opts.console_socket {
            self.send_terminal(socket, &opts.id);
        }
        Ok(PID)
    }
    async fn start(&self, id: &str) -> Result<()> {
        self.calls.lock().unwrap().push(format!("start {id}"));
        if self.fail_start {
            return Err(Error::internal("start failed"));
        }
        Ok(())
    }
    async fn state(&self, _id: &str) -> Result<RuntimeState> {
        Ok(RuntimeState { status: "running".into(), pid: PID })
    }
    async fn kill(&self, id: &str, signal: u32, all: bool) -> Result<()> {
        self.calls.lock().unwrap().push(format!("kill {id} {signal}{}", if all { " all" } else { "" }));
        if signal == 9 || signal == 15 {
            let _ = self.exits.send((PID, 128 + signal as i32));
        }
        Ok(())
    }
    async fn delete(&self, id: &str, force: bool) -> Result<()> {
        self.calls.lock().unwrap().push(format!("delete {id} {force}"));
        Ok(())
    }
    async fn pids(&self, _id: &str) -> Result<Vec<i32>> {
        let mut pids = vec![PID, PID + 1];
        pids.extend(self.exec_pids.lock().unwrap().iter().copied());
        Ok(pids)
    }
    async fn exec(&self, id: &str, opts: &ExecOpts) -> Result<i32> {
        let console = if opts.console_socket.is_some() { " console" } else { "" };
        self.calls.lock().unwrap().push(format!("exec {id} {} {}{console}", opts.exec_id, opts.stdout));
        if opts.exec_id == "bad" {
            return Err(Error::unknown("OCI runtime exec failed: exec: \"nope\": not found"));
        }
        if let Some(socket) = &opts.console_socket {
            self.send_terminal(socket, &opts.exec_id);
        }
        let mut pids = self.exec_pids.lock().unwrap();
        let pid = EXEC_PID + pids.len() as i32;
        pids.push(pid);
        Ok(pid)
    }
    async fn signal(&self, pid: i32, signal: u32) -> Result<()> {
        self.calls.lock().unwrap().push(format!("signal {pid} {signal}"));
        if signal == 9 || signal == 15 {
            let _ = self.exits.send((pid, 128 + signal as i32));
        }
        Ok(())
    }
    async fn update(&self, id: &str, resources: &[u8]) -> Result<()> {
        self.calls.lock().unwrap().push(format!("update {id} {}", String::from_utf8_lossy(resources)));
        Ok(())
    }
    async fn stats(&self, id: &str) -> Result<containerd_shim_protos::cgroups::metrics::Metrics> {
        use containerd_shim_protos::cgroups::metrics::{MemoryEntry, MemoryStat, Metrics};
        self.calls.lock().unwrap().push(format!("stats {id}"));
        let usage = MemoryEntry { usage: MEMORY_USAGE, ..Default::default() };
        let memory = MemoryStat { usage: MessageField::some(usage), ..Default::default() };
        Ok(Metrics { memory: MessageField::some(memory), ..Default::default() })
    }
    async fn pause(&self, id: &str) -> Result<()> {
        self.calls.lock().unwrap().push(format!("pause {id}"));
        Ok(())
    }
    async fn resume(&self, id: &str) -> Result<()> {
        self.calls.lock().unwrap().push(format!("resume {id}"));
        Ok(())
    }
    async fn checkpoint(&self, id: &str, opts: &CheckpointOpts) -> Result<()> {
        let work = opts.work_path.as_ref().map(|w| w.display().to_string()).unwrap_or_default();
        self.calls.lock().unwrap().push(format!(
            "checkpoint {id} {} exit={} locks={} work={work}",
            opts.image_path.display(),
            opts.exit,
            opts.file_locks
        ));
        if opts.deadline.is_some() && opts.image_path.starts_with("/fail") {
            return Err(Error::new(Kind::DeadlineExceeded, "checkpoint did not finish within 10 ms: stopped"));
        }
        if opts.exit {
            // runc's checkpoint without --leave-running ends the container: its init exits.
            let _ = self.exits.send((PID, 137));
        }
        Ok(())
    }
    async fn restore(&self, opts: &CreateOpts, image_path: &Path) -> Result<i32> {
        let console = if opts.console_socket.is_some() { " console" } else { "" };
        self.calls.lock().unwrap().push(format!("restore {} {} {}{console}", opts.id, image_path.display(), opts.stdout));
        if opts.id == "badrestore" {
            return Err(Error::internal("cedana-runc restore failed: criu failed: type RESTORE errno 0"));
        }
        if let Some(socket) = &opts.console_socket {
            self.send_terminal(socket, &opts.id);
        }
        Ok(RESTORED_PID)
    }
}

pub(crate) const RESTORED_PID: i32 = 5151;

impl StubRuntime {
    /// What runc does with `--console-socket`: a new pseudo-terminal, its master end sent with its name.
    fn send_terminal(&self, socket: &Path, id: &str) {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        use std::os::fd::AsRawFd;
        let stream = std::os::unix::net::UnixStream::connect(socket).expect("connect to the console socket");
        if id == "noconsole" {
            return;
        }
        let pty = nix::pty::openpty(None, None).expect("openpty");
        let name = b"/dev/pts/stub";
        let fds = [pty.master.as_raw_fd()];
        sendmsg::<()>(
            stream.as_raw_fd(),
            &[std::io::IoSlice::new(name)],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .expect("send the terminal");
        self.slaves.lock().unwrap().push(pty.slave);
    }
}

struct NoMounts;
impl RootfsMounter for NoMounts {
    fn mount(&self, _mounts: &[Mount], _target: &Path) -> Result<()> {
        Ok(())
    }
    fn unmount(&self, _target: &Path) -> Result<()> {
        Ok(())
    }
}

/// Records the tasks it is asked to watch for OOM kills.
#[derive(Default)]
pub(crate) struct StubOom {
    pub(crate) watched: StdMutex<Vec<(String, i32)>>,
}

impl crate::oom::OomWatcher for StubOom {
    fn watch(&self, id: &str, pid: i32) {
        self.watched.lock().unwrap().push((id.to_string(), pid));
    }
}

pub(crate) struct Fixture {
    pub(crate) m: Arc<TaskManager<StubRuntime>>,
    pub(crate) runtime: Arc<StubRuntime>,
    pub(crate) events: mpsc::UnboundedReceiver<Event>,
    exit_signal: Arc<ExitSignal>,
    pub(crate) oom: Arc<StubOom>,
}

pub(crate) fn fixture(fail_start: bool) -> Fixture {
    let (exits_tx, exits_rx) = mpsc::unbounded_channel();
    let runtime = Arc::new(StubRuntime {
        calls: Default::default(),
        exits: exits_tx,
        fail_start,
        exec_pids: Default::default(),
        slaves: Default::default(),
    });
    let (tx, events) = mpsc::unbounded_channel::<Event>();
    let exit_signal = Arc::new(ExitSignal::default());
    let oom = Arc::new(StubOom::default());
    let m = Arc::new(
        TaskManager::new(runtime.clone(), Arc::new(tx), Arc::new(NoMounts), exit_signal.clone()).with_oom_watcher(oom.clone()),
    );
    m.forward_exits(exits_rx);
    Fixture { m, runtime, events, exit_signal, oom }
}

pub(crate) fn create_req(id: &str) -> CreateTaskRequest {
    CreateTaskRequest { id: id.into(), bundle: format!("/bundles/{id}"), stdout: "/fifo/out".into(), ..Default::default() }
}

pub(crate) async fn next_event(events: &mut mpsc::UnboundedReceiver<Event>) -> Event {
    tokio::time::timeout(Duration::from_secs(5), events.recv()).await.expect("an event in time").expect("open channel")
}

pub(crate) fn kind<T: std::fmt::Debug>(r: Result<T>) -> Kind {
    r.expect_err("an error").kind
}

#[tokio::test]
async fn lifecycle_create_start_kill_wait_delete() {
    let mut f = fixture(false);
    let created = f.m.create(create_req("c1")).await.unwrap();
    assert_eq!(created.pid, PID as u32);
    match next_event(&mut f.events).await {
        Event::Create(e) => {
            assert_eq!((e.container_id.as_str(), e.pid, e.bundle.as_str()), ("c1", PID as u32, "/bundles/c1"));
            assert_eq!(e.io.stdout, "/fifo/out");
        }
        other => panic!("expected create, got {other:?}"),
    }
    let state = f.m.state(StateRequest { id: "c1".into(), ..Default::default() }).await.unwrap();
    assert_eq!(state.status.enum_value(), Ok(Status::CREATED));

    let started = f.m.start(StartRequest { id: "c1".into(), ..Default::default() }).await.unwrap();
    assert_eq!(started.pid, PID as u32);
    assert!(matches!(next_event(&mut f.events).await, Event::Start(e) if e.container_id == "c1" && e.pid == PID as u32));
    let state = f.m.state(StateRequest { id: "c1".into(), ..Default::default() }).await.unwrap();
    assert_eq!(state.status.enum_value(), Ok(Status::RUNNING));
    assert_eq!(state.pid, PID as u32);

    // Wait blocks until the exit, which the kill causes.
    let waiter = {
        let m = f.m.clone();
        tokio::spawn(async move { m.wait(WaitRequest { id: "c1".into(), ..Default::default() }).await })
    };
    let pids = f.m.pids(PidsRequest { id: "c1".into(), ..Default::default() }).await.unwrap();
    assert_eq!(pids.processes.iter().map(|p| p.pid).collect::<Vec<_>>(), vec![PID as u32, PID as u32 + 1]);
    let conn = f.m.connect(ConnectRequest { id: "c1".into(), ..Default::default() }).await.unwrap();
    assert_eq!((conn.shim_pid, conn.task_pid), (std::process::id(), PID as u32));

    f.m.kill(KillRequest { id: "c1".into(), signal: 9, ..Default::default() }).await.unwrap();
    match next_event(&mut f.events).await {
        Event::Exit(e) => assert_eq!((e.container_id.as_str(), e.pid, e.exit_status), ("c1", PID as u32, 137)),
        other => panic!("expected exit, got {other:?}"),
    }
    let waited = tokio::time::timeout(Duration::from_secs(5), waiter).await.unwrap().unwrap().unwrap();
    assert_eq!(waited.exit_status, 137);
    assert!(waited.exited_at.is_some());
    let state = f.m.state(StateRequest { id: "c1".into(), ..Default::default() }).await.unwrap();
    assert_eq!((state.status.enum_value(), state.exit_status), (Ok(Status::STOPPED), 137));
    // A second wait returns at once with the same status.
    let again = f.m.wait(WaitRequest { id: "c1".into(), ..Default::default() }).await.unwrap();
    assert_eq!(again.exit_status, 137);
    // Killing a finished process: NotFound, like the runc shim.
    assert_eq!(kind(f.m.kill(KillRequest { id: "c1".into(), signal: 9, ..Default::default() }).await), Kind::NotFound);

    // Shutdown with a task left does not stop the shim.
    f.m.shutdown(ShutdownRequest::default()).await.unwrap();
    assert!(tokio::time::timeout(Duration::from_millis(50), f.exit_signal.wait()).await.is_err());

    let deleted = f.m.delete(DeleteRequest { id: "c1".into(), ..Default::default() }).await.unwrap();
    assert_eq!((deleted.pid, deleted.exit_status), (PID as u32, 137));
    assert!(matches!(next_event(&mut f.events).await, Event::Delete(e) if e.container_id == "c1" && e.exit_status == 137));
    assert_eq!(kind(f.m.state(StateRequest { id: "c1".into(), ..Default::default() }).await), Kind::NotFound);

    f.m.shutdown(ShutdownRequest::default()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(1), f.exit_signal.wait()).await.expect("shutdown with no task exits");
    let calls = f.runtime.calls.lock().unwrap().clone();
    // The bundle has no spec, so the init's exit kills what is left of the container (the runc shim's rule).
    assert_eq!(calls, vec!["create c1 /fifo/out", "start c1", "kill c1 9", "kill c1 9 all", "delete c1 true"]);
    assert_eq!(*f.oom.watched.lock().unwrap(), vec![("c1".to_string(), PID)], "the started task is watched for OOM");
}

#[tokio::test]
async fn illegal_transitions_are_failed_precondition() {
    let mut f = fixture(false);
    f.m.create(create_req("c2")).await.unwrap();
    assert_eq!(kind(f.m.create(create_req("c2")).await), Kind::AlreadyExists);
    f.m.start(StartRequest { id: "c2".into(), ..Default::default() }).await.unwrap();
    // Start twice.
    assert_eq!(kind(f.m.start(StartRequest { id: "c2".into(), ..Default::default() }).await), Kind::FailedPrecondition);
    // Delete while running.
    assert_eq!(kind(f.m.delete(DeleteRequest { id: "c2".into(), ..Default::default() }).await), Kind::FailedPrecondition);
    f.m.kill(KillRequest { id: "c2".into(), signal: 15, ..Default::default() }).await.unwrap();
    f.m.wait(WaitRequest { id: "c2".into(), ..Default::default() }).await.unwrap();
    // Start after exit.
    assert_eq!(kind(f.m.start(StartRequest { id: "c2".into(), ..Default::default() }).await), Kind::FailedPrecondition);
    let events: Vec<&str> = std::iter::from_fn(|| f.events.try_recv().ok()).map(|e| e.topic()).collect();
    assert_eq!(events, vec!["/tasks/create", "/tasks/start", "/tasks/exit"]);
    // The error reaches containerd as FAILED_PRECONDITION.
    let e: containerd_shim_protos::ttrpc::Error =
        f.m.start(StartRequest { id: "c2".into(), ..Default::default() }).await.unwrap_err().into();
    assert!(matches!(e, containerd_shim_protos::ttrpc::Error::RpcStatus(s) if s.code() == Code::FAILED_PRECONDITION));
}

#[tokio::test]
async fn unknown_task_and_exec_are_not_found() {
    let f = fixture(false);
    assert_eq!(kind(f.m.state(StateRequest { id: "nope".into(), ..Default::default() }).await), Kind::NotFound);
    assert_eq!(kind(f.m.start(StartRequest { id: "nope".into(), ..Default::default() }).await), Kind::NotFound);
    assert_eq!(kind(f.m.kill(KillRequest { id: "nope".into(), signal: 9, ..Default::default() }).await), Kind::NotFound);
    assert_eq!(kind(f.m.wait(WaitRequest { id: "nope".into(), ..Default::default() }).await), Kind::NotFound);
    assert_eq!(kind(f.m.delete(DeleteRequest { id: "nope".into(), ..Default::default() }).await), Kind::NotFound);
    assert_eq!(kind(f.m.pids(PidsRequest { id: "nope".into(), ..Default::default() }).await), Kind::NotFound);
    f.m.create(create_req("c3")).await.unwrap();
    let exec = |id: &str| StateRequest { id: "c3".into(), exec_id: id.into(), ..Default::default() };
    assert_eq!(kind(f.m.state(exec("e1")).await), Kind::NotFound);
    assert_eq!(
        kind(f.m.kill(KillRequest { id: "c3".into(), exec_id: "e1".into(), signal: 9, ..Default::default() }).await),
        Kind::NotFound
    );
}

#[tokio::test]
async fn deleting_a_created_task_kills_it_and_reports_its_exit() {
    let mut f = fixture(false);
    f.m.create(create_req("c5")).await.unwrap();
    let _ = next_event(&mut f.events).await;
    // The stub's forced delete does not make an exit: the delete reports SIGKILL's status after its wait.
    let exits = f.runtime.exits.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let _ = exits.send((PID, 137));
    });
    let deleted = f.m.delete(DeleteRequest { id: "c5".into(), ..Default::default() }).await.unwrap();
    assert_eq!(deleted.exit_status, 137);
    assert!(matches!(next_event(&mut f.events).await, Event::Exit(_)));
    assert!(matches!(next_event(&mut f.events).await, Event::Delete(_)));
}

#[tokio::test]
async fn failed_start_leaves_the_task_created() {
    let f = fixture(true);
    f.m.create(create_req("c6")).await.unwrap();
    assert_eq!(kind(f.m.start(StartRequest { id: "c6".into(), ..Default::default() }).await), Kind::Internal);
    let state = f.m.state(StateRequest { id: "c6".into(), ..Default::default() }).await.unwrap();
    assert_eq!(state.status.enum_value(), Ok(Status::CREATED));
}

fn checkpoint_req(id: &str, path: &str, options: Option<crate::options::CheckpointOptions>) -> CheckpointTaskRequest {
    use containerd_shim_protos::protobuf::well_known_types::any::Any;
    use containerd_shim_protos::protobuf::Message;
    let options = options.map(|o| {
        let v2 = containerd_shim_protos::shim::oci::CheckpointOptions {
            exit: o.exit,
            file_locks: o.file_locks,
            image_path: o.image_path.unwrap_or_default(),
            work_path: o.work_path.unwrap_or_default(),
            ..Default::default()
        };
        Any {
            type_url: "types.containerd.io/containerd.runc.v1.CheckpointOptions".into(),
            value: v2.write_to_bytes().unwrap(),
            ..Default::default()
        }
    });
    CheckpointTaskRequest { id: id.into(), path: path.into(), options: options.into(), ..Default::default() }
}

pub(crate) fn topics(events: &mut mpsc::UnboundedReceiver<Event>) -> Vec<&'static str> {
    std::iter::from_fn(|| events.try_recv().ok()).map(|e| e.topic()).collect()
}

#[tokio::test]
async fn checkpoint_needs_a_running_or_paused_task() {
    let mut f = fixture(false);
    f.m.create(create_req("k1")).await.unwrap();
    assert_eq!(kind(f.m.checkpoint(checkpoint_req("k1", "/tmp/ctd-x", None)).await), Kind::FailedPrecondition);
    assert_eq!(kind(f.m.checkpoint(checkpoint_req("nope", "/tmp/ctd-x", None)).await), Kind::NotFound);
    assert_eq!(kind(f.m.pause(PauseRequest { id: "k1".into(), ..Default::default() }).await), Kind::FailedPrecondition);
    f.m.start(StartRequest { id: "k1".into(), ..Default::default() }).await.unwrap();
    // No image path anywhere: invalid.
    assert_eq!(kind(f.m.checkpoint(checkpoint_req("k1", "", None)).await), Kind::InvalidArgument);

    // Running: the request's path (containerd's folder), left running.
    f.m.checkpoint(checkpoint_req("k1", "/tmp/ctd-x", None)).await.unwrap();
    // Paused, as containerd's client pauses before checkpointing: the options' image path wins.
    f.m.pause(PauseRequest { id: "k1".into(), ..Default::default() }).await.unwrap();
    let opts = crate::options::CheckpointOptions {
        image_path: Some("/img".into()),
        work_path: Some("/work".into()),
        file_locks: true,
        ..Default::default()
    };
    f.m.checkpoint(checkpoint_req("k1", "/tmp/ctd-y", Some(opts))).await.unwrap();
    let state = f.m.state(StateRequest { id: "k1".into(), ..Default::default() }).await.unwrap();
    assert_eq!(state.status.enum_value(), Ok(Status::PAUSED));
    f.m.resume(ResumeRequest { id: "k1".into(), ..Default::default() }).await.unwrap();
    assert_eq!(kind(f.m.resume(ResumeRequest { id: "k1".into(), ..Default::default() }).await), Kind::FailedPrecondition);
    let state = f.m.state(StateRequest { id: "k1".into(), ..Default::default() }).await.unwrap();
    assert_eq!(state.status.enum_value(), Ok(Status::RUNNING));
    assert_eq!(
        topics(&mut f.events),
        vec!["/tasks/create", "/tasks/start", "/tasks/checkpointed", "/tasks/paused", "/tasks/checkpointed", "/tasks/resumed"]
    );
    let calls = f.runtime.calls.lock().unwrap().clone();
    assert_eq!(
        calls[2..],
        [
            "checkpoint k1 /tmp/ctd-x exit=false locks=false work=",
            "pause k1",
            "checkpoint k1 /img exit=false locks=true work=/work",
            "resume k1"
        ]
    );
}

#[tokio::test]
async fn checkpoint_with_exit_ends_the_task() {
    let mut f = fixture(false);
    f.m.create(create_req("k2")).await.unwrap();
    f.m.start(StartRequest { id: "k2".into(), ..Default::default() }).await.unwrap();
    let opts = crate::options::CheckpointOptions { exit: true, ..Default::default() };
    f.m.checkpoint(checkpoint_req("k2", "/tmp/ctd-z", Some(opts))).await.unwrap();
    let waited = tokio::time::timeout(Duration::from_secs(5), f.m.wait(WaitRequest { id: "k2".into(), ..Default::default() }))
        .await
        .expect("the task ends")
        .unwrap();
    assert_eq!(waited.exit_status, 137);
    let state = f.m.state(StateRequest { id: "k2".into(), ..Default::default() }).await.unwrap();
    assert_eq!(state.status.enum_value(), Ok(Status::STOPPED));
    let mut got = topics(&mut f.events);
    got.sort();
    assert_eq!(got, vec!["/tasks/checkpointed", "/tasks/create", "/tasks/exit", "/tasks/start"]);
    // A stopped task cannot be checkpointed, and can be deleted.
    assert_eq!(kind(f.m.checkpoint(checkpoint_req("k2", "/tmp/ctd-z", None)).await), Kind::FailedPrecondition);
    f.m.delete(DeleteRequest { id: "k2".into(), ..Default::default() }).await.unwrap();
}

#[tokio::test]
async fn restore_is_recorded_at_create_and_done_at_start() {
    let mut f = fixture(false);
    let dir = tempfile::tempdir().unwrap();
    let cp = dir.path().display().to_string();
    let created = f.m.create(CreateTaskRequest { checkpoint: cp.clone(), ..create_req("r1") }).await.unwrap();
    assert_eq!(created.pid, 0, "nothing runs before Start");
    match next_event(&mut f.events).await {
        Event::Create(e) => assert_eq!(e.checkpoint, cp),
        other => panic!("expected create, got {other:?}"),
    }
    assert!(f.runtime.calls.lock().unwrap().is_empty(), "Create does not touch the runtime");
    let started = f.m.start(StartRequest { id: "r1".into(), ..Default::default() }).await.unwrap();
    assert_eq!(started.pid, RESTORED_PID as u32);
    assert!(matches!(next_event(&mut f.events).await, Event::Start(e) if e.pid == RESTORED_PID as u32));
    let state = f.m.state(StateRequest { id: "r1".into(), ..Default::default() }).await.unwrap();
    assert_eq!((state.status.enum_value(), state.pid), (Ok(Status::RUNNING), RESTORED_PID as u32));
    assert_eq!(*f.runtime.calls.lock().unwrap(), vec![format!("restore r1 {cp} /fifo/out")]);
    // The restored init's exit is the task's.
    f.runtime.exits.send((RESTORED_PID, 0)).unwrap();
    let waited = f.m.wait(WaitRequest { id: "r1".into(), ..Default::default() }).await.unwrap();
    assert_eq!(waited.exit_status, 0);

    // A missing checkpoint fails Create; a pending restore can be deleted without a runtime container.
    assert_eq!(
        kind(f.m.create(CreateTaskRequest { checkpoint: "/no/such/cp".into(), ..create_req("r2") }).await),
        Kind::NotFound
    );
    f.m.create(CreateTaskRequest { checkpoint: cp, ..create_req("r3") }).await.unwrap();
    f.m.delete(DeleteRequest { id: "r3".into(), ..Default::default() }).await.unwrap();
}

/// A started task whose bundle asks for checkpoint-on-stop to `destination`.
async fn started_with_on_stop(f: &mut Fixture, id: &str, destination: &str) -> tempfile::TempDir {
    let bundle = tempfile::tempdir().unwrap();
    let spec = serde_json::json!({ "annotations": { crate::on_stop::ANNOTATION: destination } });
    std::fs::write(bundle.path().join("config.json"), spec.to_string()).unwrap();
    let req = CreateTaskRequest { bundle: bundle.path().display().to_string(), ..create_req(id) };
    f.m.create(req).await.unwrap();
    f.m.start(StartRequest { id: id.into(), ..Default::default() }).await.unwrap();
    let _ = (next_event(&mut f.events).await, next_event(&mut f.events).await);
    bundle
}

#[tokio::test]
async fn a_stopping_task_is_checkpointed_first_once_and_left_running_for_the_signal() {
    let mut f = fixture(false);
    let _bundle = started_with_on_stop(&mut f, "s1", "/stops").await;
    f.m.kill(KillRequest { id: "s1".into(), signal: 15, ..Default::default() }).await.unwrap();
    assert_eq!(
        f.runtime.calls.lock().unwrap()[2..],
        ["checkpoint s1 /stops/s1 exit=false locks=false work=".to_string(), "kill s1 15".into()],
        "the checkpoint leaves the container running and comes before the signal"
    );
    match next_event(&mut f.events).await {
        Event::Checkpointed(e) => assert_eq!((e.container_id.as_str(), e.checkpoint.as_str()), ("s1", "/stops/s1")),
        other => panic!("expected checkpointed, got {other:?}"),
    }
    assert!(matches!(next_event(&mut f.events).await, Event::Exit(_)));
    // Signals that do not stop, and later stops, do not checkpoint again.
    let calls = f.runtime.calls.lock().unwrap().len();
    let _ = f.m.kill(KillRequest { id: "s1".into(), signal: 9, all: true, ..Default::default() }).await;
    assert!(!f.runtime.calls.lock().unwrap()[calls..].iter().any(|c| c.starts_with("checkpoint")));
    let _bundle = started_with_on_stop(&mut f, "s2", "/stops").await;
    f.m.kill(KillRequest { id: "s2".into(), signal: libc::SIGUSR1 as u32, ..Default::default() }).await.unwrap();
    assert_eq!(f.runtime.calls.lock().unwrap().last().unwrap(), &format!("kill s2 {}", libc::SIGUSR1));
}

#[tokio::test]
async fn a_checkpoint_on_stop_that_fails_is_published_and_the_stop_goes_on() {
    let mut f = fixture(false);
    let _bundle = started_with_on_stop(&mut f, "s3", "/fail").await;
    f.m.kill(KillRequest { id: "s3".into(), signal: 15, ..Default::default() }).await.unwrap();
    match next_event(&mut f.events).await {
        Event::StopCheckpointFailed(e) => {
            let v: serde_json::Value = serde_json::from_str(&e.value).unwrap();
            assert_eq!((v["container_id"].as_str(), v["destination"].as_str()), (Some("s3"), Some("/fail/s3")));
            assert!(v["error"].as_str().unwrap().contains("did not finish within"), "{v}");
        }
        other => panic!("expected the failure event, got {other:?}"),
    }
    assert_eq!(f.runtime.calls.lock().unwrap().last().unwrap(), "kill s3 15");
    assert!(matches!(next_event(&mut f.events).await, Event::Exit(e) if e.exit_status == 143));
}

mod hostile;
mod terminal;
