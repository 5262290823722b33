//! The task logic: containers' lifecycle and state machine over a [`Runtime`], events through an
//! [`EventSender`]. It takes no ttrpc context, so it is unit-tested with a stub runtime and a channel.
//!
//! States: created --start--> running --exit--> stopped --delete--> gone, and running <--pause/resume-->
//! paused. Start is allowed only when created; delete only when created (the init is killed) or stopped;
//! kill of a stopped task is NotFound ("process already finished"), as with containerd's runc shim.
//! Checkpoint is allowed when running or paused; with the `exit` option the task ends (its exit is reported
//! by the reaper like any other). A task created with a checkpoint is not created in the runtime: the
//! restore is recorded at Create and carried out at Start (as the runc shim does), and its PID is the
//! restored init's. Exec processes ([`exec`]): requests naming an exec id act on that exec. When the init
//! exits, every process left in the container is killed first unless the container has a PID namespace of its
//! own (the kernel kills them then), as the runc shim does. Update and Stats go through the runtime
//! ([`resources`]). A task (or exec) with a terminal gets it from the runtime over a console socket at Create
//! (or the exec's Start) and keeps its [`Console`] until Delete, which waits briefly for the terminal's output to
//! be copied ([`OUTPUT_WAIT`]). A task restored with a terminal gets its new terminal at Start, as containerd's
//! runc shim does it: the runtime's restore is given a console socket, and the restored process comes back on
//! the pseudo-terminal the runtime sends there (its stdio reconnected to the new slave end), which the shim then
//! copies to and from the task's FIFOs like a created task's. A failed terminal restore leaves the task created
//! with its restore still pending, as a failed restore without a terminal does, and nothing running: a restored
//! container whose terminal never came is deleted in the runtime.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use containerd_shim::asynchronous::ExitSignal;
use containerd_shim_protos::api::{
    CheckpointTaskRequest, ConnectRequest, ConnectResponse, CreateTaskRequest, CreateTaskResponse, DeleteRequest, DeleteResponse,
    KillRequest, Mount, PauseRequest, PidsRequest, PidsResponse, ProcessInfo, ResumeRequest, ShutdownRequest, StartRequest,
    StartResponse, StateRequest, StateResponse, Status, WaitRequest, WaitResponse,
};
use containerd_shim_protos::events::task::{
    TaskCheckpointed, TaskCreate, TaskDelete, TaskExit, TaskIO, TaskPaused, TaskResumed, TaskStart,
};
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::MessageField;
use tokio::sync::{watch, Mutex};

use crate::console::{Console, ConsoleSocket};
use crate::error::{Error, Result};
use crate::events::{Event, EventSender};
use crate::on_stop::OnStop;
use crate::oom::OomWatcher;
use crate::options::{CheckpointOptions, RuntimeOptions};
use crate::runtime::{CheckpointOpts, CreateOpts, Runtime};

/// How long deleting a created (never started) task waits for its killed init to be reaped.
const DELETE_CREATED_WAIT: Duration = Duration::from_secs(5);
/// How long the runtime may take to send a terminal once its command has finished.
const CONSOLE_RECEIVE_WAIT: Duration = Duration::from_secs(10);
/// How long Delete waits for a terminal's output to be copied to stdout (the runc shim waits as long).
pub const OUTPUT_WAIT: Duration = Duration::from_secs(2);

/// An exit: code and time.
#[derive(Debug, Clone, PartialEq)]
pub struct Exit {
    pub code: u32,
    pub at: Timestamp,
}

/// Mounts rootfs mounts into a bundle and removes them; a seam so the logic runs without privileges.
pub trait RootfsMounter: Send + Sync + 'static {
    fn mount(&self, mounts: &[Mount], target: &Path) -> Result<()>;
    fn unmount(&self, target: &Path) -> Result<()>;
}

struct TaskEntry {
    bundle: String,
    pid: i32,
    status: Status,
    stdin: String,
    stdout: String,
    stderr: String,
    /// The rootfs we mounted, to unmount at delete.
    mounted: Option<PathBuf>,
    exit: watch::Sender<Option<Exit>>,
    /// A restore recorded at Create and carried out at Start: the checkpoint and how to create the container.
    restore: Option<(PathBuf, CreateOpts)>,
    /// Exec processes, by exec id.
    execs: HashMap<String, exec::ExecEntry>,
    /// Whether the init has a terminal (for a pending restore, it gets its [`Console`] at Start).
    terminal: bool,
    /// The init's terminal, when it has one.
    console: Option<Console>,
    /// Checkpoint the container before its first stop (the `io.cedana.checkpoint-on-stop` annotation).
    on_stop: Option<OnStop>,
    /// Whether that checkpoint was tried (once per task).
    on_stop_tried: bool,
}

/// The tasks of one shim.
pub struct TaskManager<R: Runtime> {
    runtime: Arc<R>,
    events: Arc<dyn EventSender>,
    mounter: Arc<dyn RootfsMounter>,
    tasks: Mutex<HashMap<String, TaskEntry>>,
    exit_signal: Arc<ExitSignal>,
    /// Watches started tasks for OOM kills, when set.
    oom: Option<Arc<dyn OomWatcher>>,
}

fn not_found(id: &str) -> Error {
    Error::not_found(format!("task {id} not found"))
}

/// Whether a request's exec id names the task's init (no exec id, or the task's own id).
fn is_init(id: &str, exec_id: &str) -> bool {
    exec_id.is_empty() || exec_id == id
}

/// Whether the processes left in a container must be killed when its init exits: yes unless its spec gives it
/// a PID namespace of its own (then the kernel kills them), and yes when the spec cannot be read (the runc
/// shim's rule).
pub fn should_kill_all_on_exit(bundle: &Path) -> bool {
    let Ok(text) = std::fs::read(bundle.join("config.json")) else { return true };
    let Ok(spec) = serde_json::from_slice::<serde_json::Value>(&text) else { return true };
    let private_pid_ns = spec["linux"]["namespaces"].as_array().is_some_and(|namespaces| {
        namespaces.iter().any(|ns| ns["type"] == "pid" && ns["path"].as_str().unwrap_or_default().is_empty())
    });
    !private_pid_ns
}

fn status_name(s: Status) -> &'static str {
    match s {
        Status::CREATED => "created",
        Status::RUNNING => "running",
        Status::STOPPED => "stopped",
        Status::PAUSED => "paused",
        Status::PAUSING => "pausing",
        Status::UNKNOWN => "unknown",
    }
}

impl<R: Runtime> TaskManager<R> {
    pub fn new(
        runtime: Arc<R>,
        events: Arc<dyn EventSender>,
        mounter: Arc<dyn RootfsMounter>,
        exit_signal: Arc<ExitSignal>,
    ) -> TaskManager<R> {
        TaskManager { runtime, events, mounter, tasks: Mutex::new(HashMap::new()), exit_signal, oom: None }
    }

    /// Watch every task started from now on for OOM kills with `oom`.
    pub fn with_oom_watcher(mut self, oom: Arc<dyn OomWatcher>) -> TaskManager<R> {
        self.oom = Some(oom);
        self
    }

    pub async fn create(&self, req: CreateTaskRequest) -> Result<CreateTaskResponse> {
        check_task_id(&req.id)?;
        check_absolute("bundle", &req.bundle)?;
        if !req.checkpoint.is_empty() {
            check_absolute("checkpoint", &req.checkpoint)?;
        }
        let mut tasks = self.tasks.lock().await;
        if tasks.contains_key(&req.id) {
            return Err(Error::new(crate::error::Kind::AlreadyExists, format!("task {} already exists", req.id)));
        }
        let options = RuntimeOptions::decode(req.options.as_ref())?;
        let bundle = PathBuf::from(&req.bundle);
        let mounted = if req.rootfs.is_empty() {
            None
        } else {
            let target = bundle.join("rootfs");
            self.mounter.mount(&req.rootfs, &target)?;
            Some(target)
        };
        let opts = CreateOpts {
            id: req.id.clone(),
            bundle: bundle.clone(),
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            binary_name: options.binary_name.clone(),
            no_pivot_root: options.no_pivot_root,
            no_new_keyring: options.no_new_keyring,
            root: options.root.clone(),
            console_socket: None,
        };
        let restore = if req.checkpoint.is_empty() {
            None
        } else {
            let checkpoint = PathBuf::from(&req.checkpoint);
            if !checkpoint.exists() {
                if let Some(target) = &mounted {
                    let _ = self.mounter.unmount(target);
                }
                return Err(Error::not_found(format!("checkpoint {} not found", checkpoint.display())));
            }
            Some((checkpoint, opts.clone()))
        };
        // A restore creates nothing now: the container comes into being at Start.
        let (pid, console) = if restore.is_some() {
            (0, None)
        } else {
            match self.create_in_runtime(opts, req.terminal, None).await {
                Ok(created) => created,
                Err(e) => {
                    if let Some(target) = &mounted {
                        let _ = self.mounter.unmount(target);
                    }
                    return Err(e);
                }
            }
        };
        let (exit, _) = watch::channel(None);
        tasks.insert(
            req.id.clone(),
            TaskEntry {
                bundle: req.bundle.clone(),
                pid,
                status: Status::CREATED,
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                mounted,
                exit,
                restore,
                execs: HashMap::new(),
                terminal: req.terminal,
                console,
                on_stop: OnStop::from_bundle(&bundle, &req.id),
                on_stop_tried: false,
            },
        );
        self.events.send(Event::Create(TaskCreate {
            container_id: req.id.clone(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: MessageField::some(TaskIO {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
                ..Default::default()
            }),
            checkpoint: req.checkpoint.clone(),
            pid: pid as u32,
            ..Default::default()
        }));
        Ok(CreateTaskResponse { pid: pid as u32, ..Default::default() })
    }

    /// Create the container in the runtime, or restore it from `checkpoint` when one is given; with a terminal,
    /// through a console socket in the bundle (the runtime sends the new terminal's master end there; a restored
    /// process comes back on its slave end), and start copying between the terminal and the task's FIFOs. A
    /// container whose terminal cannot be had is deleted.
    async fn create_in_runtime(
        &self,
        mut opts: CreateOpts,
        terminal: bool,
        checkpoint: Option<&Path>,
    ) -> Result<(i32, Option<Console>)> {
        if !terminal {
            return Ok((self.create_or_restore(&opts, checkpoint).await?, None));
        }
        let socket = ConsoleSocket::bind(&opts.bundle)?;
        opts.console_socket = Some(socket.path().to_path_buf());
        let pid = self.create_or_restore(&opts, checkpoint).await?;
        let console = async { Console::start(socket.receive(CONSOLE_RECEIVE_WAIT).await?, &opts.stdin, &opts.stdout) }.await;
        match console {
            Ok(console) => Ok((pid, Some(console))),
            Err(e) => {
                let what = if checkpoint.is_some() { "restored" } else { "created" };
                log::warn!("the terminal of {} ({what}, PID {pid}) failed: {e}; deleting the container", opts.id);
                if let Err(d) = self.runtime.delete(&opts.id, true).await {
                    log::warn!("deleting {} after its terminal failed: {d}", opts.id);
                }
                Err(e)
            }
        }
    }

    /// The runtime's restore from `checkpoint` when one is given, else its create; the init's PID.
    async fn create_or_restore(&self, opts: &CreateOpts, checkpoint: Option<&Path>) -> Result<i32> {
        match checkpoint {
            Some(checkpoint) => self.runtime.restore(opts, checkpoint).await,
            None => self.runtime.create(opts).await,
        }
    }

    pub async fn start(&self, req: StartRequest) -> Result<StartResponse> {
        if !is_init(&req.id, &req.exec_id) {
            return self.start_exec(req).await;
        }
        // The lock is held until the start event is queued, so an exit is always published after it.
        let mut tasks = self.tasks.lock().await;
        let task = tasks.get_mut(&req.id).ok_or_else(|| not_found(&req.id))?;
        if task.status != Status::CREATED {
            return Err(Error::precondition(format!("task {} cannot be started: it is {}", req.id, status_name(task.status))));
        }
        if let Some((checkpoint, opts)) = &task.restore {
            // On failure the restore stays pending (the task created), and nothing of it is left running.
            let (pid, console) = self.create_in_runtime(opts.clone(), task.terminal, Some(checkpoint)).await?;
            log::info!("restored {} from {} (PID {pid}, terminal: {})", req.id, checkpoint.display(), console.is_some());
            task.pid = pid;
            task.console = console;
            task.restore = None;
        } else {
            self.runtime.start(&req.id).await?;
        }
        task.status = Status::RUNNING;
        if let Some(oom) = &self.oom {
            oom.watch(&req.id, task.pid);
        }
        self.events.send(Event::Start(TaskStart { container_id: req.id.clone(), pid: task.pid as u32, ..Default::default() }));
        Ok(StartResponse { pid: task.pid as u32, ..Default::default() })
    }

    pub async fn state(&self, req: StateRequest) -> Result<StateResponse> {
        if !is_init(&req.id, &req.exec_id) {
            return self.state_exec(req).await;
        }
        let tasks = self.tasks.lock().await;
        let task = tasks.get(&req.id).ok_or_else(|| not_found(&req.id))?;
        let exit = task.exit.borrow().clone();
        Ok(StateResponse {
            id: req.id.clone(),
            bundle: task.bundle.clone(),
            pid: task.pid as u32,
            status: task.status.into(),
            stdin: task.stdin.clone(),
            stdout: task.stdout.clone(),
            stderr: task.stderr.clone(),
            terminal: task.terminal,
            exit_status: exit.as_ref().map(|e| e.code).unwrap_or_default(),
            exited_at: exit.map(|e| e.at).into(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }

    pub async fn wait(&self, req: WaitRequest) -> Result<WaitResponse> {
        if !is_init(&req.id, &req.exec_id) {
            return self.wait_exec(req).await;
        }
        let mut rx = {
            let tasks = self.tasks.lock().await;
            tasks.get(&req.id).ok_or_else(|| not_found(&req.id))?.exit.subscribe()
        };
        let exit = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| Error::not_found(format!("task {} was deleted", req.id)))?
            .clone()
            .ok_or_else(|| Error::internal("an exit was waited for but none is recorded"))?;
        Ok(WaitResponse { exit_status: exit.code, exited_at: MessageField::some(exit.at), ..Default::default() })
    }

    pub async fn kill(&self, req: KillRequest) -> Result<()> {
        if req.signal > MAX_SIGNAL {
            return Err(Error::invalid(format!("kill of task {}: no signal {}", req.id, req.signal)));
        }
        if !is_init(&req.id, &req.exec_id) {
            return self.kill_exec(req).await;
        }
        let on_stop = {
            let mut tasks = self.tasks.lock().await;
            let task = tasks.get_mut(&req.id).ok_or_else(|| not_found(&req.id))?;
            if task.status == Status::STOPPED && !req.all {
                return Err(Error::not_found(format!("process of task {} already finished", req.id)));
            }
            let stopping = task.status == Status::RUNNING && crate::on_stop::is_stop_signal(req.signal);
            match (stopping && !task.on_stop_tried, &task.on_stop) {
                (true, Some(on_stop)) => {
                    task.on_stop_tried = true;
                    Some(on_stop.clone())
                }
                _ => None,
            }
        };
        if let Some(on_stop) = on_stop {
            self.checkpoint_on_stop(&req.id, &on_stop).await;
        }
        self.runtime.kill(&req.id, req.signal, req.all).await
    }

    /// Checkpoint a stopping task as its `io.cedana.checkpoint-on-stop` annotation asks, within its budget,
    /// leaving it running for the signal that follows; a failure is logged and published, never returned (the
    /// stop goes on).
    async fn checkpoint_on_stop(&self, id: &str, on_stop: &OnStop) {
        let image_path = on_stop.image_path();
        let opts = CheckpointOpts {
            image_path: image_path.clone(),
            work_path: None,
            exit: false,
            open_tcp: false,
            external_unix_sockets: false,
            terminal: false,
            file_locks: false,
            empty_namespaces: Vec::new(),
            deadline: Some(on_stop.budget),
        };
        let started = std::time::Instant::now();
        match self.runtime.checkpoint(id, &opts).await {
            Ok(()) => {
                log::info!("checkpointed {id} on stop to {} in {} ms", image_path.display(), started.elapsed().as_millis());
                self.events.send(Event::Checkpointed(TaskCheckpointed {
                    container_id: id.to_string(),
                    checkpoint: image_path.display().to_string(),
                    ..Default::default()
                }));
            }
            Err(e) => {
                log::error!("checkpoint-on-stop of {id} to {} failed, stopping it anyway: {e}", image_path.display());
                let detail = serde_json::json!({
                    "container_id": id,
                    "destination": image_path.display().to_string(),
                    "error": e.message,
                });
                let mut message = containerd_shim_protos::protobuf::well_known_types::wrappers::StringValue::new();
                message.value = detail.to_string();
                self.events.send(Event::StopCheckpointFailed(message));
            }
        }
    }

    pub async fn delete(&self, req: DeleteRequest) -> Result<DeleteResponse> {
        if !is_init(&req.id, &req.exec_id) {
            return self.delete_exec(req).await;
        }
        let mut rx = {
            let tasks = self.tasks.lock().await;
            let task = tasks.get(&req.id).ok_or_else(|| not_found(&req.id))?;
            match task.status {
                Status::STOPPED => None,
                // A pending restore: no container exists in the runtime; the forced delete finds nothing.
                Status::CREATED if task.restore.is_some() => None,
                Status::CREATED => Some(task.exit.subscribe()),
                other => {
                    return Err(Error::precondition(format!("task {} cannot be deleted: it is {}", req.id, status_name(other))))
                }
            }
        };
        match self.runtime.delete(&req.id, true).await {
            Err(e) if e.kind == crate::error::Kind::NotFound && rx.is_none() => {
                log::debug!("deleting {}: {e}", req.id)
            }
            r => r?,
        }
        if let Some(rx) = rx.as_mut() {
            // A created task's init was killed by the delete: give the reaper a moment to report it.
            let _ = tokio::time::timeout(DELETE_CREATED_WAIT, rx.wait_for(Option::is_some)).await;
        }
        let mut task = {
            let mut tasks = self.tasks.lock().await;
            tasks.remove(&req.id).ok_or_else(|| not_found(&req.id))?
        };
        if let Some(mut console) = task.console.take() {
            if !console.wait_output(OUTPUT_WAIT).await {
                log::warn!("the terminal of {} still had output after {OUTPUT_WAIT:?}; closing it", req.id);
            }
        }
        if let Some(target) = &task.mounted {
            if let Err(e) = self.mounter.unmount(target) {
                log::warn!("unmounting {}: {e}", target.display());
            }
        }
        let exit = task.exit.borrow().clone().unwrap_or_else(|| Exit { code: 128 + 9, at: Timestamp::now() });
        self.events.send(Event::Delete(TaskDelete {
            container_id: req.id.clone(),
            pid: task.pid as u32,
            exit_status: exit.code,
            exited_at: MessageField::some(exit.at.clone()),
            id: req.id.clone(),
            ..Default::default()
        }));
        Ok(DeleteResponse {
            pid: task.pid as u32,
            exit_status: exit.code,
            exited_at: MessageField::some(exit.at),
            ..Default::default()
        })
    }

    /// The container's processes; an exec's carries its exec id (`ProcessDetails`, as the runc shim's).
    pub async fn pids(&self, req: PidsRequest) -> Result<PidsResponse> {
        let execs: HashMap<u32, String> = {
            let tasks = self.tasks.lock().await;
            let task = tasks.get(&req.id).ok_or_else(|| not_found(&req.id))?;
            task.execs.iter().filter(|(_, e)| e.pid > 0).map(|(id, e)| (e.pid as u32, id.clone())).collect()
        };
        let pids = self.runtime.pids(&req.id).await?;
        let mut processes = Vec::with_capacity(pids.len());
        for pid in pids {
            let pid = pid as u32;
            let info = match execs.get(&pid) {
                Some(exec_id) => MessageField::some(process_details(exec_id)?),
                None => MessageField::none(),
            };
            processes.push(ProcessInfo { pid, info, ..Default::default() });
        }
        Ok(PidsResponse { processes, ..Default::default() })
    }

    pub async fn pause(&self, req: PauseRequest) -> Result<()> {
        let mut tasks = self.tasks.lock().await;
        let task = tasks.get_mut(&req.id).ok_or_else(|| not_found(&req.id))?;
        if task.status != Status::RUNNING {
            return Err(Error::precondition(format!("task {} cannot be paused: it is {}", req.id, status_name(task.status))));
        }
        self.runtime.pause(&req.id).await?;
        task.status = Status::PAUSED;
        self.events.send(Event::Paused(TaskPaused { container_id: req.id.clone(), ..Default::default() }));
        Ok(())
    }

    pub async fn resume(&self, req: ResumeRequest) -> Result<()> {
        let mut tasks = self.tasks.lock().await;
        let task = tasks.get_mut(&req.id).ok_or_else(|| not_found(&req.id))?;
        if task.status != Status::PAUSED {
            return Err(Error::precondition(format!("task {} cannot be resumed: it is {}", req.id, status_name(task.status))));
        }
        self.runtime.resume(&req.id).await?;
        task.status = Status::RUNNING;
        self.events.send(Event::Resumed(TaskResumed { container_id: req.id.clone(), ..Default::default() }));
        Ok(())
    }

    /// Checkpoint a running or paused task into the image path of its options, else the request's path
    /// (containerd's temporary folder, which it then stores as a checkpoint image).
    pub async fn checkpoint(&self, req: CheckpointTaskRequest) -> Result<()> {
        let options = CheckpointOptions::decode(req.options.as_ref())?;
        let image_path = options.image_path.clone().unwrap_or_else(|| req.path.clone());
        if image_path.is_empty() {
            return Err(Error::invalid(format!("checkpoint of task {}: no image path given", req.id)));
        }
        if !image_path.contains("://") {
            check_absolute("checkpoint image path", &image_path)?;
        }
        {
            let tasks = self.tasks.lock().await;
            let task = tasks.get(&req.id).ok_or_else(|| not_found(&req.id))?;
            if task.status != Status::RUNNING && task.status != Status::PAUSED {
                return Err(Error::precondition(format!(
                    "task {} cannot be checkpointed: it is {}",
                    req.id,
                    status_name(task.status)
                )));
            }
        }
        let opts = CheckpointOpts {
            image_path: PathBuf::from(&image_path),
            work_path: options.work_path.map(PathBuf::from),
            exit: options.exit,
            open_tcp: options.open_tcp,
            external_unix_sockets: options.external_unix_sockets,
            terminal: options.terminal,
            file_locks: options.file_locks,
            empty_namespaces: options.empty_namespaces,
            deadline: None,
        };
        // The lock is not held over the checkpoint: its exit (with `exit`) must reach the reaper's handler.
        self.runtime.checkpoint(&req.id, &opts).await?;
        self.events.send(Event::Checkpointed(TaskCheckpointed {
            container_id: req.id.clone(),
            checkpoint: image_path,
            ..Default::default()
        }));
        Ok(())
    }

    pub async fn connect(&self, req: ConnectRequest) -> Result<ConnectResponse> {
        let tasks = self.tasks.lock().await;
        let task = tasks.get(&req.id).ok_or_else(|| not_found(&req.id))?;
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: task.pid as u32,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    /// Shut the shim down once it holds no task (a request while tasks remain is ignored, as runc's shim does).
    pub async fn shutdown(&self, _req: ShutdownRequest) -> Result<()> {
        if self.tasks.lock().await.is_empty() {
            self.exit_signal.signal();
        }
        Ok(())
    }

    /// The process `pid` exited with `code`: mark its task (or exec) stopped and publish the exit (once).
    pub async fn process_exited(&self, pid: i32, code: i32) {
        let mut tasks = self.tasks.lock().await;
        let exit = Exit { code: code as u32, at: Timestamp::now() };
        if !tasks.values().any(|t| t.pid == pid && t.status != Status::STOPPED) {
            self.exec_exited(&mut tasks, pid, exit);
            return;
        }
        let Some((id, task)) = tasks.iter_mut().find(|(_, t)| t.pid == pid && t.status != Status::STOPPED) else {
            return;
        };
        // The runc shim kills what is left of the container before it reports the init's exit.
        if should_kill_all_on_exit(Path::new(&task.bundle)) {
            if let Err(e) = self.runtime.kill(id, libc::SIGKILL as u32, true).await {
                log::debug!("killing the processes left in {id}: {e}");
            }
        }
        task.status = Status::STOPPED;
        task.exit.send_replace(Some(exit.clone()));
        self.events.send(Event::Exit(TaskExit {
            container_id: id.clone(),
            id: id.clone(),
            pid: pid as u32,
            exit_status: exit.code,
            exited_at: MessageField::some(exit.at),
            ..Default::default()
        }));
    }

    /// An exec's exit: mark it stopped and publish a TaskExit carrying its exec id.
    fn exec_exited(&self, tasks: &mut HashMap<String, TaskEntry>, pid: i32, exit: Exit) {
        for (id, task) in tasks.iter_mut() {
            let Some((exec_id, exec)) = task.execs.iter_mut().find(|(_, e)| e.pid == pid && e.status == Status::RUNNING) else {
                continue;
            };
            exec.status = Status::STOPPED;
            exec.exit.send_replace(Some(exit.clone()));
            self.events.send(Event::Exit(TaskExit {
                container_id: id.clone(),
                id: exec_id.clone(),
                pid: pid as u32,
                exit_status: exit.code,
                exited_at: MessageField::some(exit.at),
                ..Default::default()
            }));
            return;
        }
        log::debug!("exit of PID {pid} ({}) belongs to no task", exit.code);
    }

    /// Feed exits from a channel (the reaper's, or a stub's) into [`TaskManager::process_exited`].
    pub fn forward_exits(self: &Arc<Self>, mut exits: tokio::sync::mpsc::UnboundedReceiver<(i32, i32)>) {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            while let Some((pid, code)) = exits.recv().await {
                me.process_exited(pid, code).await;
            }
        });
    }
}

/// The `ProcessDetails` Any that `ctr task ps` shows for an exec process.
fn process_details(exec_id: &str) -> Result<containerd_shim_protos::protobuf::well_known_types::any::Any> {
    use containerd_shim_protos::protobuf::Message;
    let details = containerd_shim_protos::shim::oci::ProcessDetails { exec_id: exec_id.to_string(), ..Default::default() };
    let value = details.write_to_bytes().map_err(|e| Error::internal(format!("encoding process details: {e}")))?;
    Ok(containerd_shim_protos::protobuf::well_known_types::any::Any {
        type_url: PROCESS_DETAILS_TYPE_URL.to_string(),
        value,
        ..Default::default()
    })
}

/// The type URL of `ProcessDetails`, as containerd's clients decode it.
pub const PROCESS_DETAILS_TYPE_URL: &str = "containerd.runc.v1.ProcessDetails";

pub mod exec;
pub mod resources;

#[cfg(test)]
mod tests;

/// The highest signal number (SIGRTMAX on Linux).
const MAX_SIGNAL: u32 = 64;

/// The longest task id containerd accepts.
const MAX_ID_LEN: usize = 76;

/// A task id as containerd's identifiers are: letters and digits, joined by single `.`, `_` or `-`, at most
/// [`MAX_ID_LEN`] long (it names folders and runc containers).
fn check_task_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id.split(['.', '_', '-']).all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_alphanumeric()));
    match ok {
        true => Ok(()),
        false => Err(Error::invalid(format!(
            "invalid task id {id:?}: letters and digits joined by '.', '_' or '-', at most {MAX_ID_LEN} long"
        ))),
    }
}

/// `path` (the `what` of a request) must be absolute and free of `..`.
fn check_absolute(what: &str, path: &str) -> Result<()> {
    let p = Path::new(path);
    if path.is_empty() || !p.is_absolute() || p.components().any(|c| c == std::path::Component::ParentDir) {
        return Err(Error::invalid(format!("the {what} {path:?} is not an absolute path without '..'")));
    }
    Ok(())
}
