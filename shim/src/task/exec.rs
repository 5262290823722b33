//! Exec processes: additional processes in a task's container, as containerd's runc shim keeps them.
//!
//! Exec records the process (its OCI Process spec and stdio) and publishes TaskExecAdded; Start runs it through
//! the runtime (`exec --detach`) and publishes TaskExecStarted; its exit is reported by the reaper as a TaskExit
//! carrying the exec id; Delete (with the exec id) forgets a created or stopped exec (no TaskDelete event).
//! States: created --start--> running --exit--> stopped. Kill signals the exec's PID directly (not through the
//! runtime), as the runc shim does: a created exec is FailedPrecondition, a finished one NotFound.
//! Exec is refused in a paused or stopped task, and in a task whose restore is still pending, with the code the
//! runc shim answers (UNKNOWN); an unknown exec id is NotFound, a second exec of the same id AlreadyExists.
//! An exec with a terminal (the request's `terminal`, or its spec's) gets it over a console socket at Start;
//! ResizePty resizes it and CloseIO stops copying stdin to it; Delete waits briefly for its output.

use containerd_shim_protos::api::{
    CloseIORequest, DeleteRequest, DeleteResponse, ExecProcessRequest, KillRequest, ResizePtyRequest, StartRequest,
    StartResponse, StateRequest, StateResponse, Status, WaitRequest, WaitResponse,
};
use containerd_shim_protos::events::task::{TaskExecAdded, TaskExecStarted};
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::MessageField;
use tokio::sync::watch;

use super::{is_init, not_found, status_name, Exit, TaskEntry, TaskManager, CONSOLE_RECEIVE_WAIT, OUTPUT_WAIT};
use crate::console::{Console, ConsoleSocket};
use crate::error::{Error, Result};
use crate::events::Event;
use crate::runtime::{ExecOpts, Runtime};

/// The exit status reported for an exec whose start failed (its waiters must return).
pub const FAILED_START_STATUS: u32 = 255;

/// One exec process of a task.
pub(super) struct ExecEntry {
    /// 0 until started.
    pub(super) pid: i32,
    /// Created, running or stopped.
    pub(super) status: Status,
    /// The OCI Process, as JSON.
    spec: Vec<u8>,
    stdin: String,
    stdout: String,
    stderr: String,
    pub(super) exit: watch::Sender<Option<Exit>>,
    /// Whether it runs with a terminal.
    terminal: bool,
    /// Its terminal, once started.
    console: Option<Console>,
}

fn exec_not_found(id: &str, exec_id: &str) -> Error {
    Error::not_found(format!("process {exec_id} of task {id} does not exist"))
}

/// An exec id names files in the bundle: no separators, no dot names.
fn check_exec_id(exec_id: &str) -> Result<()> {
    if exec_id.is_empty() || exec_id == "." || exec_id == ".." || exec_id.contains('/') || exec_id.contains('\0') {
        return Err(Error::invalid(format!("invalid exec id {exec_id:?}")));
    }
    Ok(())
}

impl TaskEntry {
    fn exec_mut(&mut self, id: &str, exec_id: &str) -> Result<&mut ExecEntry> {
        self.execs.get_mut(exec_id).ok_or_else(|| exec_not_found(id, exec_id))
    }
}

impl<R: Runtime> TaskManager<R> {
    /// Record an exec process of a created or running task (it runs at Start).
    pub async fn exec(&self, req: ExecProcessRequest) -> Result<()> {
        check_exec_id(&req.exec_id)?;
        let mut tasks = self.tasks.lock().await;
        let task = tasks.get_mut(&req.id).ok_or_else(|| not_found(&req.id))?;
        if req.exec_id == req.id || task.execs.contains_key(&req.exec_id) {
            return Err(Error::exists(format!("id {}", req.exec_id)));
        }
        match task.status {
            Status::CREATED if task.restore.is_some() => return Err(Error::unknown("cannot exec in a created state")),
            Status::CREATED | Status::RUNNING => {}
            other => return Err(Error::unknown(format!("cannot exec in a {} state", status_name(other)))),
        }
        let spec = req.spec.as_ref().map(|a| a.value.clone()).unwrap_or_default();
        let process: serde_json::Value = serde_json::from_slice(&spec)
            .map_err(|e| Error::invalid(format!("exec {}: the process spec is not OCI Process JSON: {e}", req.exec_id)))?;
        if !process.is_object() {
            return Err(Error::invalid(format!("exec {}: the process spec is not a JSON object", req.exec_id)));
        }
        let terminal = req.terminal || process["terminal"] == serde_json::Value::Bool(true);
        let (exit, _) = watch::channel(None);
        task.execs.insert(
            req.exec_id.clone(),
            ExecEntry {
                pid: 0,
                status: Status::CREATED,
                spec,
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                exit,
                terminal,
                console: None,
            },
        );
        self.events.send(Event::ExecAdded(TaskExecAdded {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        }));
        Ok(())
    }

    pub(super) async fn start_exec(&self, req: StartRequest) -> Result<StartResponse> {
        // The lock is held until the start event is queued, so the exec's exit is always published after it.
        let mut tasks = self.tasks.lock().await;
        let task = tasks.get_mut(&req.id).ok_or_else(|| not_found(&req.id))?;
        let (task_status, bundle) = (task.status, task.bundle.clone());
        let exec = task.exec_mut(&req.id, &req.exec_id)?;
        if exec.status != Status::CREATED {
            return Err(Error::precondition(format!("cannot start a {} process", status_name(exec.status))));
        }
        if task_status != Status::RUNNING && task_status != Status::CREATED {
            return Err(Error::unknown(format!("cannot start an exec in a {} task", status_name(task_status))));
        }
        let opts = ExecOpts {
            exec_id: req.exec_id.clone(),
            bundle: bundle.into(),
            spec: exec.spec.clone(),
            stdin: exec.stdin.clone(),
            stdout: exec.stdout.clone(),
            stderr: exec.stderr.clone(),
            console_socket: None,
        };
        let started = if exec.terminal {
            self.exec_with_terminal(&req.id, opts).await
        } else {
            self.runtime.exec(&req.id, &opts).await.map(|pid| (pid, None))
        };
        let pid = match started {
            Ok((pid, console)) => {
                exec.console = console;
                pid
            }
            Err(e) => {
                // It will never run: its waiters return, and it can be deleted.
                exec.status = Status::STOPPED;
                exec.exit.send_replace(Some(Exit { code: FAILED_START_STATUS, at: Timestamp::now() }));
                return Err(e);
            }
        };
        exec.pid = pid;
        exec.status = Status::RUNNING;
        self.events.send(Event::ExecStarted(TaskExecStarted {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            pid: pid as u32,
            ..Default::default()
        }));
        Ok(StartResponse { pid: pid as u32, ..Default::default() })
    }

    /// Run an exec with a terminal: through a console socket in the bundle, then copying between the terminal and
    /// the exec's FIFOs. An exec whose terminal cannot be had is killed.
    async fn exec_with_terminal(&self, id: &str, mut opts: ExecOpts) -> Result<(i32, Option<Console>)> {
        let socket = ConsoleSocket::bind(&opts.bundle)?;
        opts.console_socket = Some(socket.path().to_path_buf());
        let pid = self.runtime.exec(id, &opts).await?;
        match async { Console::start(socket.receive(CONSOLE_RECEIVE_WAIT).await?, &opts.stdin, &opts.stdout) }.await {
            Ok(console) => Ok((pid, Some(console))),
            Err(e) => {
                if let Err(k) = self.runtime.signal(pid, libc::SIGKILL as u32).await {
                    log::warn!("killing exec {} of {id} after its terminal failed: {k}", opts.exec_id);
                }
                Err(e)
            }
        }
    }

    pub(super) async fn state_exec(&self, req: StateRequest) -> Result<StateResponse> {
        let mut tasks = self.tasks.lock().await;
        let task = tasks.get_mut(&req.id).ok_or_else(|| not_found(&req.id))?;
        let (task_status, bundle) = (task.status, task.bundle.clone());
        let exec = task.exec_mut(&req.id, &req.exec_id)?;
        // A paused container pauses its execs too.
        let status = if task_status == Status::PAUSED && exec.status == Status::RUNNING { task_status } else { exec.status };
        let exit = exec.exit.borrow().clone();
        Ok(StateResponse {
            id: req.exec_id.clone(),
            bundle,
            pid: exec.pid as u32,
            status: status.into(),
            stdin: exec.stdin.clone(),
            stdout: exec.stdout.clone(),
            stderr: exec.stderr.clone(),
            terminal: exec.terminal,
            exit_status: exit.as_ref().map(|e| e.code).unwrap_or_default(),
            exited_at: exit.map(|e| e.at).into(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }

    pub(super) async fn wait_exec(&self, req: WaitRequest) -> Result<WaitResponse> {
        let mut rx = {
            let mut tasks = self.tasks.lock().await;
            let task = tasks.get_mut(&req.id).ok_or_else(|| not_found(&req.id))?;
            task.exec_mut(&req.id, &req.exec_id)?.exit.subscribe()
        };
        let exit = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| Error::not_found(format!("process {} of task {} was deleted", req.exec_id, req.id)))?
            .clone()
            .ok_or_else(|| Error::internal("an exit was waited for but none is recorded"))?;
        Ok(WaitResponse { exit_status: exit.code, exited_at: MessageField::some(exit.at), ..Default::default() })
    }

    pub(super) async fn kill_exec(&self, req: KillRequest) -> Result<()> {
        let pid = {
            let mut tasks = self.tasks.lock().await;
            let task = tasks.get_mut(&req.id).ok_or_else(|| not_found(&req.id))?;
            let exec = task.exec_mut(&req.id, &req.exec_id)?;
            match exec.status {
                Status::CREATED => return Err(Error::precondition(format!("process {} not created", req.exec_id))),
                Status::STOPPED => return Err(Error::not_found(format!("process {} already finished", req.exec_id))),
                _ => exec.pid,
            }
        };
        self.runtime.signal(pid, req.signal).await
    }

    pub(super) async fn delete_exec(&self, req: DeleteRequest) -> Result<DeleteResponse> {
        let (pid, exit, console) = {
            let mut tasks = self.tasks.lock().await;
            let task = tasks.get_mut(&req.id).ok_or_else(|| not_found(&req.id))?;
            let exec = task.exec_mut(&req.id, &req.exec_id)?;
            if exec.status == Status::RUNNING {
                return Err(Error::precondition(format!("cannot delete a running process ({})", req.exec_id)));
            }
            let pid = exec.pid as u32;
            let exit = exec.exit.borrow().clone().unwrap_or_else(|| Exit { code: 0, at: Timestamp::now() });
            let console = task.execs.remove(&req.exec_id).and_then(|mut e| e.console.take());
            (pid, exit, console)
        };
        // Its output is copied before its FIFO is closed (the client waits for that close).
        if let Some(mut console) = console {
            if !console.wait_output(OUTPUT_WAIT).await {
                log::warn!(
                    "the terminal of exec {} of {} still had output after {OUTPUT_WAIT:?}; closing it",
                    req.exec_id,
                    req.id
                );
            }
        }
        Ok(DeleteResponse { pid, exit_status: exit.code, exited_at: MessageField::some(exit.at), ..Default::default() })
    }

    /// Close a process's stdin: the copying of its stdin FIFO to its terminal, or to the pipe that is its stdin,
    /// stops (once what was written is in) and the process reads the end of its input. Success for a process
    /// that exists.
    pub async fn close_io(&self, req: CloseIORequest) -> Result<()> {
        let mut tasks = self.tasks.lock().await;
        let stdin = {
            let task = tasks.get_mut(&req.id).ok_or_else(|| not_found(&req.id))?;
            match is_init(&req.id, &req.exec_id) {
                true => task.stdin.clone(),
                false => task.exec_mut(&req.id, &req.exec_id)?.stdin.clone(),
            }
        };
        if let Some(console) = console_of(&mut tasks, &req.id, &req.exec_id)? {
            if req.stdin {
                console.close_stdin();
            }
        } else if req.stdin && !stdin.is_empty() {
            crate::runtime::close_stdin(&stdin);
        }
        Ok(())
    }

    /// Resize a process's terminal (TIOCSWINSZ). Without a terminal there is nothing to resize: success for a
    /// process that exists, as the runc shim answers.
    pub async fn resize_pty(&self, req: ResizePtyRequest) -> Result<()> {
        if req.width > u32::from(u16::MAX) || req.height > u32::from(u16::MAX) {
            return Err(Error::invalid(format!("no terminal is {}x{}", req.width, req.height)));
        }
        let mut tasks = self.tasks.lock().await;
        match console_of(&mut tasks, &req.id, &req.exec_id)? {
            Some(console) => console.resize(req.width, req.height),
            None => Ok(()),
        }
    }
}

/// The terminal of the task `id`'s init or of its exec `exec_id`, if it has one; NotFound unless the task, and the
/// exec when one is named, exist.
fn console_of<'a>(
    tasks: &'a mut std::collections::HashMap<String, TaskEntry>,
    id: &str,
    exec_id: &str,
) -> Result<Option<&'a mut Console>> {
    let task = tasks.get_mut(id).ok_or_else(|| not_found(id))?;
    if is_init(id, exec_id) {
        return Ok(task.console.as_mut());
    }
    Ok(task.exec_mut(id, exec_id)?.console.as_mut())
}

#[cfg(test)]
mod tests;
