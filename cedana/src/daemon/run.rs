//! Starting new jobs (`run`): a process spawned by the supervisor, a runc container, or a containerd
//! container created from an image.
//!
//! # runc containers as jobs
//! `run` creates and starts a container with `runc run --detach` (the container id is the job id unless
//! given), and its init process is the job's PID. The daemon is a child subreaper, so once the detached
//! runc exits the container's init is re-parented to the daemon: it is adopted as our child (reaped by
//! us, with its real exit status). A container adopted with `manage` (started by someone else) is
//! watched instead. Which one applies is decided by the init's parent, not assumed.
//!
//! A container's standard streams are `/dev/null` by default: CRIU can dump that (a host file as
//! stdout it cannot: "Can't lookup mount"), nothing in the container depends on the daemon, and the
//! container survives a daemon restart. With `--attachable` or a log file they are pipes instead, whose
//! far ends the supervisor holds (as for attachable process jobs): runc checkpoints pipes as external
//! and a restore gets new ones, so the log goes on and clients can attach; but such a container depends
//! on the daemon holding its pipes (a restarted daemon cannot give them back).
//!
//! # containerd containers as jobs
//! `run` creates the container from an image through containerd's API, as `ctr run --detach` does (see
//! [`crate::containerd::create`]), on our shim by default, and starts its task; the task's init is the job's
//! PID, watched as an adopted containerd job is. The task's stdout and stderr are the job's log file, which
//! the shim opens for it, so the output does not depend on the daemon.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use cedana::error::ErrorKind;
use cedana::jobs::fifos::ContainerFifos;
use cedana::jobs::model::{Job, JobKind, JobState};
use cedana::jobs::supervisor::{Credentials, Output, SpawnSpec};
use cedana::runc::{Runc, RuncError};
use cedana_protos::v1 as pb;
use std::os::unix::fs::OpenOptionsExt;
use tonic::Status;

use crate::containerd::{
    create as create_container, Client, NewContainer, Stdio as ContainerdStdio, CEDANA_RUNTIME, DEFAULT_SNAPSHOTTER,
};

use super::access::Caller;
use super::convert::status;
use super::service::{lib_err, runc_at, track, Service};

impl Service {
    pub(super) fn run(&self, caller: &Caller, req: pb::RunRequest) -> Result<pb::Job, Status> {
        match job_type(req.r#type)? {
            pb::JobType::Process | pb::JobType::Unspecified => self.run_process(caller, req),
            pb::JobType::Runc => caller.only_root("running a runc container").and_then(|_| self.run_runc(req)),
            pb::JobType::Containerd => caller.only_root("running a containerd container").and_then(|_| self.run_containerd(req)),
        }
    }

    fn default_log(&self, jid: &str, given: &str) -> PathBuf {
        if given.is_empty() {
            self.log_dir.join(format!("cedana-output-{jid}.log"))
        } else {
            PathBuf::from(given)
        }
    }

    fn run_process(&self, caller: &Caller, req: pb::RunRequest) -> Result<pb::Job, Status> {
        if req.args.is_empty() {
            return Err(status(ErrorKind::InvalidArgument, "no program given: cedana run process -- PROGRAM ARGS..."));
        }
        if !caller.is_root() && !req.log.is_empty() {
            return Err(status(
                ErrorKind::PermissionDenied,
                format!(
                    "jobs of users other than root log to {}/cedana-output-JID.log (theirs to read): run without --log",
                    self.log_dir.display()
                ),
            ));
        }
        let jid = self.new_jid(&req.jid)?;
        if self.store.contains(&jid).map_err(lib_err!())? {
            return Err(status(ErrorKind::AlreadyExists, format!("job {jid} exists already")));
        }
        let log = self.default_log(&jid, &req.log);
        let output = if req.attachable { Output::Attachable { log: Some(log.clone()) } } else { Output::Log(log.clone()) };
        let cwd = (!req.cwd.is_empty()).then(|| PathBuf::from(&req.cwd));
        let env = req.env.iter().filter_map(|e| e.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let user = match caller.is_root() {
            true => None,
            false => Some(self.user_log(caller, &log)?),
        };
        let spec = SpawnSpec { args: req.args.clone(), cwd: cwd.clone(), env, clear_env: false, output, user };
        let registering = self.registering();
        let spawned = self.supervisor.spawn(&spec).map_err(lib_err!())?;
        track(&self.serials, spawned.pid, spawned.serial);
        let job = Job {
            jid,
            kind: JobKind::Process,
            pid: spawned.pid,
            state: JobState::Running,
            exit_code: None,
            args: req.args,
            cwd,
            log: Some(log),
            attachable: req.attachable,
            gpu: false,
            created_at: chrono::Utc::now().timestamp(),
            container_id: None,
            runtime_root: None,
            restored_from: None,
            namespace: None,
            origin: None,
            owner: caller.uid,
        };
        self.store.insert(&job).map_err(lib_err!())?;
        drop(registering);
        tracing::info!(jid = %job.jid, pid = job.pid, "job started");
        self.job_reply(&job)
    }

    /// For a job of a user other than root: its log, created in the daemon's log folder and given to the
    /// user, and the credentials it runs with.
    fn user_log(&self, caller: &Caller, log: &Path) -> Result<Credentials, Status> {
        let user = caller.credentials()?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o600)
            .open(log)
            .map_err(|e| status(ErrorKind::of_io(&e), format!("creating the job's log {}: {e}", log.display())))?;
        std::os::unix::fs::fchown(&file, Some(user.uid), Some(user.gid))
            .map_err(|e| status(ErrorKind::Internal, format!("giving the job's log {} to its user: {e}", log.display())))?;
        Ok(user)
    }

    /// `runc run --detach` a container as a new job (see the module documentation for its streams).
    fn run_runc(&self, req: pb::RunRequest) -> Result<pb::Job, Status> {
        if req.bundle.is_empty() {
            return Err(status(ErrorKind::InvalidArgument, "no bundle given: cedana run runc --bundle DIR"));
        }
        let bundle = PathBuf::from(&req.bundle);
        if !bundle.join("config.json").is_file() {
            return Err(status(
                ErrorKind::InvalidArgument,
                format!("bundle {} has no config.json (a bundle holds the container's config.json and rootfs)", bundle.display()),
            ));
        }
        if let Some(bad) = req.args.iter().find(|a| !RUNC_RUN_FLAGS.contains(&a.as_str())) {
            return Err(status(
                ErrorKind::InvalidArgument,
                format!("runc run flag {bad:?} is not supported for jobs (only {})", RUNC_RUN_FLAGS.join(", ")),
            ));
        }
        let jid = self.new_jid(&req.jid)?;
        if self.store.contains(&jid).map_err(lib_err!())? {
            return Err(status(ErrorKind::AlreadyExists, format!("job {jid} exists already")));
        }
        let id = if req.container_id.is_empty() { jid.clone() } else { req.container_id.clone() };
        check_container_id(&id)?;
        let runc = runc_at(&req.runtime_root)?;
        if runc.exists(&id).map_err(lib_err!())? {
            return Err(RuncError::Exists { id, root: runc.root().to_path_buf() }).map_err(lib_err!());
        }
        let piped = req.attachable || !req.log.is_empty();
        let log = piped.then(|| self.default_log(&jid, &req.log));
        let pipes = match piped {
            true => Some(self.supervisor.prepare_restore_pipes(log.as_deref()).map_err(lib_err!())?),
            false => None,
        };
        let (stdio, handle) = match pipes {
            Some(p) => (Some([p.stdin, p.stdout, p.stderr]), Some(p.handle)),
            None => (None, None),
        };
        // runc and the container's init are children of ours until the init is supervised.
        let scope = self.supervisor.fork_scope();
        run_container(&runc, &id, &bundle, &req.args, stdio).map_err(lib_err!())?;
        let state = match runc.state(&id) {
            Ok(s) if s.pid > 0 => s,
            other => {
                let _ = runc.delete(&id, true);
                let detail = match other {
                    Ok(s) => format!("it is {} without a process", s.status),
                    Err(e) => e.to_string(),
                };
                return Err(status(ErrorKind::Internal, format!("container {id} did not start: {detail}")));
            }
        };
        let job = Job {
            log,
            attachable: req.attachable,
            container_id: Some(id.clone()),
            runtime_root: Some(runc.root().to_path_buf()),
            ..Job::new(jid, JobKind::Runc, state.pid, cedana::procfs::describe(state.pid).map(|i| i.cmdline).unwrap_or_default())
        };
        if let Err(e) = self.store.insert(&job) {
            let _ = runc.delete(&id, true);
            return Err(status(e.kind(), &e));
        }
        // Recorded before it is supervised, so that its exit finds the job.
        let supervised = self.supervise(state.pid, handle);
        drop(scope);
        self.record_supervision(&job, supervised)?;
        tracing::info!(jid = %job.jid, pid = job.pid, container = %id, root = %runc.root().display(), "runc job started");
        self.job_reply(&job)
    }
}

impl Service {
    /// Create a containerd container from an image and start it as a new job (see the module documentation).
    fn run_containerd(&self, req: pb::RunRequest) -> Result<pb::Job, Status> {
        if req.image.is_empty() {
            return Err(status(ErrorKind::InvalidArgument, "no image given: cedana run containerd IMAGE"));
        }
        let jid = self.new_jid(&req.jid)?;
        if self.store.contains(&jid).map_err(lib_err!())? {
            return Err(status(ErrorKind::AlreadyExists, format!("job {jid} exists already")));
        }
        let id = if req.container_id.is_empty() { jid.clone() } else { req.container_id.clone() };
        check_container_id(&id)?;
        let address = match req.runtime_root.as_str() {
            "" => PathBuf::from(cedana_protos::containerd::DEFAULT_ADDRESS),
            a => PathBuf::from(a),
        };
        let namespace = match req.namespace.as_str() {
            "" => cedana_protos::containerd::DEFAULT_NAMESPACE.to_string(),
            n => n.to_string(),
        };
        let runtime = if req.runtime.is_empty() { CEDANA_RUNTIME } else { req.runtime.as_str() };
        let client = Client::connect(&address, &namespace).map_err(lib_err!())?;
        let log = self.default_log(&jid, &req.log);
        let (stdio, fifos) = self.container_stdio(&jid, &log, req.attachable)?;
        let new = NewContainer {
            image: &req.image,
            id: &id,
            runtime,
            snapshotter: DEFAULT_SNAPSHOTTER,
            args: &req.args,
            env: &req.env,
            stdio,
        };
        let started = create_container(&client, new).map_err(lib_err!())?;
        let pid = started.pid as i32;
        let job = Job {
            container_id: Some(id.clone()),
            runtime_root: Some(address.clone()),
            namespace: Some(namespace.clone()),
            log: Some(log),
            attachable: req.attachable,
            ..Job::new(jid, JobKind::Containerd, pid, started.args)
        };
        self.store.insert(&job).map_err(lib_err!())?;
        let supervised = match fifos {
            // The task runs: its shim holds the far ends of the FIFOs.
            Some(fifos) => self.supervisor.attach_restored(fifos.opened(), pid, false),
            None => self.supervise(pid, None),
        };
        self.record_supervision(&job, supervised)?;
        tracing::info!(jid = %job.jid, pid, container = %id, image = %req.image, namespace = %namespace, address = %address.display(), "containerd job started");
        self.job_reply(&job)
    }
}

impl Service {
    /// Where the FIFOs of an attachable container job live: `io/JID/` next to the job store.
    pub(super) fn io_dir(&self, jid: &str) -> PathBuf {
        let db = self.engine.config().db_path();
        db.parent().unwrap_or(Path::new("/")).join("io").join(jid)
    }

    /// The stdio of a new container job's task: for an attachable job, FIFOs the daemon holds (with the log
    /// fed from them); otherwise the log itself, which the shim opens (read-write, without creating it: an
    /// empty file to begin with).
    pub(super) fn container_stdio(
        &self,
        jid: &str,
        log: &Path,
        attachable: bool,
    ) -> Result<(ContainerdStdio, Option<ContainerFifos>), Status> {
        if attachable {
            let fifos = self.supervisor.prepare_fifos(&self.io_dir(jid), Some(log)).map_err(lib_err!())?;
            let [stdin, stdout, stderr] = fifos.paths();
            return Ok((ContainerdStdio { stdin, stdout, stderr }, Some(fifos)));
        }
        std::fs::File::create(log)
            .map_err(|e| status(ErrorKind::of_io(&e), format!("creating the job's log {}: {e}", log.display())))?;
        let path = log.to_string_lossy().into_owned();
        Ok((ContainerdStdio { stdin: String::new(), stdout: path.clone(), stderr: path }, None))
    }
}

/// The `runc run` flags a job may pass.
const RUNC_RUN_FLAGS: [&str; 2] = ["--no-pivot", "--no-new-keyring"];

/// runc accepts ids of letters, digits and `_ + - .` (and so do we, for job-named containers).
/// The job type a request names; an unknown number is refused (prost would read it as unspecified).
pub(super) fn job_type(raw: i32) -> Result<pb::JobType, Status> {
    pb::JobType::try_from(raw)
        .map_err(|_| status(ErrorKind::InvalidArgument, format!("unknown job type {raw} (process, runc or containerd)")))
}

fn check_container_id(id: &str) -> Result<(), Status> {
    let ok = !id.is_empty() && id != "." && id != ".." && id.chars().all(|c| c.is_ascii_alphanumeric() || "_+-.".contains(c));
    if !ok {
        return Err(status(
            ErrorKind::InvalidArgument,
            format!("invalid container id {id:?}: letters, digits and _ + - . only (give another with --id)"),
        ));
    }
    Ok(())
}

/// Give `cmd` these standard streams (stdin, stdout, stderr), or /dev/null.
fn set_stdio(cmd: &mut std::process::Command, stdio: Option<[OwnedFd; 3]>) {
    match stdio {
        Some([i, o, e]) => cmd.stdin(Stdio::from(i)).stdout(Stdio::from(o)).stderr(Stdio::from(e)),
        None => cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()),
    };
}

/// `runc run --detach --bundle BUNDLE FLAGS... ID`, the container's streams on `stdio` (/dev/null when
/// `None`; runc passes its own to the container). runc's errors are read back from a log of its own.
fn run_container(runc: &Runc, id: &str, bundle: &Path, flags: &[String], stdio: Option<[OwnedFd; 3]>) -> Result<(), RuncError> {
    let spawn = |source| RuncError::Spawn { binary: runc.binary().to_path_buf(), source };
    let log = tempfile::NamedTempFile::new().map_err(spawn)?;
    let mut cmd = runc.command();
    cmd.arg("--log").arg(log.path()).args(["--log-format", "json"]);
    cmd.args(["run", "--detach", "--bundle"]).arg(bundle).args(flags).arg(id);
    set_stdio(&mut cmd, stdio);
    tracing::debug!(?cmd, "running runc");
    let st = cmd.status().map_err(spawn)?;
    if st.success() {
        return Ok(());
    }
    Err(RuncError::Failed {
        command: "run".into(),
        id: id.into(),
        status: cedana::binary::describe_status(st),
        message: logged_error(log.path(), None),
    })
}

/// The last error runc logged as JSON lines in `log`, with CRIU's first errors from `criu_log`.
fn logged_error(log: &Path, criu_log: Option<&Path>) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut message = text
        .lines()
        .rev()
        .find_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            (v.get("level")?.as_str()? == "error").then(|| v.get("msg")?.as_str().map(str::to_string))?
        })
        .unwrap_or_else(|| "runc gave no reason".to_string());
    if let Some(criu) = criu_log.and_then(|p| std::fs::read_to_string(p).ok()) {
        let causes: Vec<String> =
            cedana::criu::log::error_lines(&criu).into_iter().filter(|l| !l.contains("FAILED")).take(2).collect();
        if !causes.is_empty() {
            message.push_str(&format!("; CRIU: {}", causes.join(" / ")));
        }
    }
    message
}
