//! Container engines started by the tests, each with private state under a temporary folder: a runc root,
//! and dockerd (with its own containerd). They stop only what they started, by PID or container id.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use crate::images::Bundle;
use crate::lines::Lines;

/// A pipe whose write end becomes a child's stdout and stderr (close-on-exec everywhere else).
pub fn output_pipe() -> (std::fs::File, OwnedFd) {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
    (std::fs::File::from(r), w)
}

/// Give `cmd` stdin from /dev/null and stdout+stderr into a new pipe; returns the pipe's lines.
pub fn piped(cmd: &mut Command) -> Lines {
    let (r, w) = output_pipe();
    let w2 = w.try_clone().expect("dup pipe");
    cmd.stdin(Stdio::null()).stdout(Stdio::from(w)).stderr(Stdio::from(w2));
    Lines::read(r)
}

/// A private runc state folder (`runc --root`). Containers created through it are force-deleted on drop.
pub struct RuncRoot {
    pub root: PathBuf,
    /// The runtime binary: `runc`, or cedana-runc.
    pub binary: PathBuf,
    ids: std::sync::Mutex<Vec<String>>,
}

impl RuncRoot {
    /// A root at `dir/runc-root` driven by `binary`.
    pub fn new(dir: &Path, binary: impl Into<PathBuf>) -> RuncRoot {
        RuncRoot { root: dir.join("runc-root"), binary: binary.into(), ids: Default::default() }
    }

    /// A command `BINARY --root ROOT ARGS`.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.binary);
        c.arg("--root").arg(&self.root).args(args);
        c
    }

    /// Run a command to completion.
    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).stdin(Stdio::null()).output().expect("run the runtime")
    }

    /// Run a command that must succeed; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        crate::success_stdout(&format!("{} {args:?}", self.binary.display()), &self.run(args))
    }

    /// Remember `id` for deletion on drop (for containers created by other commands, e.g. a restore).
    pub fn track(&self, id: &str) {
        self.ids.lock().unwrap_or_else(|e| e.into_inner()).push(id.to_string());
    }

    /// `cedana dump runc ID --root ROOT --dir DIR EXTRA`, not yet run.
    pub fn cedana_dump(&self, id: &str, dir: &Path, extra: &[&str]) -> Command {
        let mut c = crate::cedana_cmd(&["dump", "runc", id, "--root"]);
        c.arg(&self.root).arg("--dir").arg(dir).args(extra);
        c
    }

    /// [`RuncRoot::cedana_dump`], which must succeed; returns its stdout (the summary).
    pub fn cedana_dump_ok(&self, id: &str, dir: &Path, extra: &[&str]) -> String {
        let out = self.cedana_dump(id, dir, extra).output().expect("run cedana");
        crate::success_stdout(&format!("cedana dump runc {id} {extra:?}"), &out)
    }

    /// `run -d` container `id` from `bundle`, its stdout and stderr into a pipe whose lines are returned.
    pub fn run_detached(&self, bundle: &Path, id: &str) -> Lines {
        self.track(id);
        let mut cmd = self.cmd(&["run", "-d", "--bundle"]);
        cmd.arg(bundle).arg(id);
        let lines = piped(&mut cmd);
        let status = cmd.status().expect("runc run");
        assert!(status.success(), "run -d {id} failed: {:?}", lines.snapshot());
        lines
    }

    /// Run the busybox counter (bundle at `dir/bundle`) detached as `id`, and wait for its first `lines` lines.
    pub fn run_counter(&self, dir: &Path, id: &str, lines: usize, timeout: Duration) -> (Bundle, Lines) {
        let bundle = Bundle::counter(&dir.join("bundle"));
        let out = self.run_detached(&bundle.dir, id);
        out.wait_for(lines, timeout);
        (bundle, out)
    }

    /// `state ID` as JSON, or `None` when the container does not exist.
    pub fn state(&self, id: &str) -> Option<serde_json::Value> {
        let out = self.run(&["state", id]);
        out.status.success().then(|| serde_json::from_slice(&out.stdout).expect("state is JSON"))
    }

    /// The container's status (`running`, `paused`, ...), or `None` when it does not exist.
    pub fn status(&self, id: &str) -> Option<String> {
        self.state(id).map(|s| s["status"].as_str().unwrap_or_default().to_string())
    }
}

impl Drop for RuncRoot {
    fn drop(&mut self) {
        let ids = std::mem::take(&mut *self.ids.lock().unwrap_or_else(|e| e.into_inner()));
        for id in ids {
            let _ = Command::new("runc")
                .arg("--root")
                .arg(&self.root)
                .args(["delete", "--force", &id])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Wait for a child to exit, up to `timeout`; kill it (by PID) if it does not.
pub fn wait_child(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("PID {} did not exit within {timeout:?}", child.id());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The Docker client of Debian's docker.io (another `docker` may come first on PATH).
pub fn docker_client() -> PathBuf {
    let debian = PathBuf::from("/usr/bin/docker");
    if debian.is_file() {
        debian
    } else {
        PathBuf::from("docker")
    }
}

/// A private dockerd (experimental, no networking set-up, its own containerd), all state under one folder.
/// Dropping it removes its containers and stops it by PID.
pub struct Dockerd {
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub exec_root: PathBuf,
    pub data_root: PathBuf,
    cgroup_parent: String,
    child: Child,
}

impl Dockerd {
    /// Start dockerd with state under `dir` and the extra `runtimes` (name, binary); waits until it answers.
    pub fn start(dir: &Path, runtimes: &[(&str, &Path)]) -> Dockerd {
        std::fs::create_dir_all(dir).expect("dockerd folder");
        static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let cgroup_parent = format!("/cedana-test-docker-{}-{n}", std::process::id());
        let (socket, exec_root, data_root) = (dir.join("docker.sock"), dir.join("exec"), dir.join("data"));
        let log = std::fs::File::create(dir.join("dockerd.log")).expect("dockerd log");
        let mut cmd = Command::new("dockerd");
        cmd.arg("--data-root")
            .arg(&data_root)
            .arg("--exec-root")
            .arg(&exec_root)
            .arg("--pidfile")
            .arg(dir.join("docker.pid"))
            .arg("-H")
            .arg(format!("unix://{}", socket.display()))
            .args(["--experimental", "--bridge=none", "--iptables=false", "--ip6tables=false", "--ip-masq=false"])
            .arg(format!("--cgroup-parent={cgroup_parent}"))
            .args(["--storage-driver", "overlay2", "--shutdown-timeout", "2"]);
        for (name, path) in runtimes {
            cmd.arg("--add-runtime").arg(format!("{name}={}", path.display()));
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("dockerd must be installed (scripts/setup.sh)");
        let d = Dockerd { dir: dir.to_path_buf(), socket, exec_root, data_root, cgroup_parent, child };
        crate::wait_for("dockerd to answer", Duration::from_secs(60), || d.docker(&["version"]).status.success().then_some(()));
        d
    }

    /// `docker ARGS` against this daemon.
    pub fn docker(&self, args: &[&str]) -> Output {
        Command::new(docker_client())
            .arg("-H")
            .arg(format!("unix://{}", self.socket.display()))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run docker")
    }

    /// `docker ARGS`, which must succeed; returns stdout, trimmed.
    pub fn ok(&self, args: &[&str]) -> String {
        let what = format!("docker {args:?} (dockerd log: {})", self.dir.join("dockerd.log").display());
        crate::success_stdout(&what, &self.docker(args)).trim().to_string()
    }

    /// `ctr ARGS` against this daemon's own containerd, in Docker's namespace (`moby`).
    pub fn ctr(&self, args: &[&str]) -> Output {
        Command::new("ctr")
            .arg("-a")
            .arg(self.exec_root.join("containerd/containerd.sock"))
            .args(["-n", "moby"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("ctr must be installed (scripts/setup.sh)")
    }

    /// runc's state folder for this daemon's containers (every runtime of Docker 20.10 uses it).
    pub fn runc_root(&self) -> PathBuf {
        self.exec_root.join("runtime-runc").join("moby")
    }

    /// `docker import` a rootfs folder as image `tag`.
    pub fn import(&self, rootfs: &Path, tag: &str) {
        let tar = crate::images::rootfs_tar(rootfs, &self.dir.join("rootfs.tar"));
        self.ok(&["import", tar.to_str().expect("utf-8 path"), tag]);
    }

    /// The numbers of `docker logs NAME` (the counter's output).
    pub fn log_numbers(&self, name: &str) -> Vec<u64> {
        let out = self.docker(&["logs", name]);
        crate::lines::numbers(&String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect::<Vec<_>>())
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        let ids = self.docker(&["ps", "-aq"]);
        for id in String::from_utf8_lossy(&ids.stdout).split_whitespace() {
            let _ = self.docker(&["rm", "-f", id]);
        }
        stop_daemon(&mut self.child);
        // Empty cgroups left under our private parent (best effort: zombies may still hold some).
        remove_empty_cgroups(self.cgroup_parent.trim_start_matches('/'));
    }
}

fn remove_empty_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_empty_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// A private containerd (its own root, state, sockets and config; the CRI plugin off), with one namespace of
/// its own for the test's containers. Dropping it kills and deletes that namespace's tasks and containers,
/// stops containerd by PID, and removes the namespace's empty cgroups.
pub struct Containerd {
    pub dir: PathBuf,
    pub socket: PathBuf,
    /// The ctr namespace (`ctr -n`); containers get the cgroup `/NAMESPACE/ID`.
    pub namespace: String,
    child: Child,
}

impl Containerd {
    /// Start containerd with everything under `dir`; waits until it answers.
    pub fn start(dir: &Path) -> Containerd {
        Self::start_with_env(dir, &[])
    }

    /// [`Containerd::start`] with more environment variables (its shims and runtimes inherit them, as
    /// object-store credentials reach cedana-runc).
    pub fn start_with_env(dir: &Path, env: &[(&str, String)]) -> Containerd {
        Self::start_in(dir, env, None)
    }

    /// [`Containerd::start_with_env`] in the network namespace `netns` (a node of [`crate::nodes::Nodes`]):
    /// its shims, runtimes and host-network containers run there.
    pub fn start_in(dir: &Path, env: &[(&str, String)], netns: Option<&str>) -> Containerd {
        std::fs::create_dir_all(dir).expect("containerd folder");
        static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let namespace = format!("cedana-test-{}-{n}", std::process::id());
        let socket = dir.join("containerd.sock");
        let config = format!(
            "version = 2\nroot = {:?}\nstate = {:?}\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = {:?}\n[ttrpc]\n  address = {:?}\n[debug]\n  address = \"\"\n\
             [plugins.\"io.containerd.internal.v1.opt\"]\n  path = {:?}\n",
            dir.join("root"),
            dir.join("state"),
            socket,
            dir.join("containerd.sock.ttrpc"),
            dir.join("opt"),
        );
        let config_path = dir.join("config.toml");
        std::fs::write(&config_path, config).expect("containerd config");
        let log = std::fs::File::create(dir.join("containerd.log")).expect("containerd log");
        // nsenter execs containerd (the child's PID is containerd's), in the netns only.
        let mut cmd = match netns {
            None => Command::new("containerd"),
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}")).args(["--", "containerd"]);
                c
            }
        };
        let child = cmd
            .arg("--config")
            .arg(&config_path)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("containerd must be installed (scripts/setup.sh)");
        let c = Containerd { dir: dir.to_path_buf(), socket, namespace, child };
        crate::wait_for("containerd to answer", Duration::from_secs(60), || c.ctr(&["version"]).status.success().then_some(()));
        c
    }

    /// Stop containerd (SIGTERM by its PID; its shims and their tasks keep running) and start it again with
    /// the same configuration; waits until it answers.
    pub fn restart(&mut self) {
        stop_daemon(&mut self.child);
        let config_path = self.dir.join("config.toml");
        let log = std::fs::OpenOptions::new().append(true).open(self.dir.join("containerd.log")).expect("containerd log");
        self.child = Command::new("containerd")
            .arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("containerd must be installed (scripts/setup.sh)");
        crate::wait_for("containerd to answer again", Duration::from_secs(60), || {
            self.ctr(&["version"]).status.success().then_some(())
        });
    }

    /// `ctr -a SOCKET -n NAMESPACE ARGS`, not yet run.
    pub fn ctr_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ctr");
        c.arg("-a").arg(&self.socket).arg("-n").arg(&self.namespace).args(args);
        c
    }

    /// `ctr ARGS` against this daemon, run to completion.
    pub fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_cmd(args).stdin(Stdio::null()).output().expect("run ctr")
    }

    /// `ctr ARGS`, which must succeed; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let what = format!("ctr {args:?} (containerd log: {})", self.dir.join("containerd.log").display());
        crate::success_stdout(&what, &self.ctr(args))
    }

    /// The tasks of our namespace: (id, status) from `ctr task ls`.
    pub fn tasks(&self) -> Vec<(String, String)> {
        let out = self.ctr(&["task", "ls"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() >= 3).then(|| (f[0].to_string(), f[2].to_string()))
            })
            .collect()
    }

    /// The status of task `id` (`RUNNING`, `STOPPED`, `PAUSED`, ...), or `None` when there is none.
    pub fn task_status(&self, id: &str) -> Option<String> {
        self.tasks().into_iter().find(|(t, _)| t == id).map(|(_, s)| s)
    }

    /// The PID of task `id`'s init, from `ctr task ls`; panics when there is no such task.
    pub fn task_pid(&self, id: &str) -> i32 {
        let out = self.ok(&["task", "ls"]);
        out.lines()
            .skip(1)
            .find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.first() == Some(&id)).then(|| f[1].parse().ok()).flatten()
            })
            .unwrap_or_else(|| panic!("task {id} in ctr task ls: {out}"))
    }

    /// Kill (SIGKILL) and delete task `id` and delete its container (best effort: never panics).
    pub fn remove(&self, id: &str) {
        if let Some(status) = self.task_status(id) {
            if status == "PAUSED" {
                let _ = self.ctr(&["task", "resume", id]);
            }
            let _ = self.ctr(&["task", "kill", "-s", "SIGKILL", id]);
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while matches!(self.task_status(id).as_deref(), Some("RUNNING" | "PAUSED" | "PAUSING"))
                && std::time::Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.ctr(&["task", "rm", "-f", id]);
        }
        let _ = self.ctr(&["container", "rm", id]);
    }

    /// `ctr image import` an OCI image-layout tarball of `rootfs` as image `name` (a full reference).
    pub fn import(&self, rootfs: &Path, name: &str) {
        let tar = crate::images::oci_image_tar(rootfs, &self.dir.join("image-build"), name);
        self.ok(&["image", "import", tar.to_str().expect("utf-8 path")]);
    }
}

/// A private containerd that finds our shim (`containerd-shim-cedana-v2`, which must be built) on its PATH, and
/// a busybox rootfs. Fields drop in order: containerd (which removes its containers) before the folder.
pub struct ShimHost {
    pub d: Containerd,
    pub rootfs: PathBuf,
    pub tmp: tempfile::TempDir,
}

impl ShimHost {
    /// Start it (as root) in a new temporary folder.
    pub fn start() -> ShimHost {
        Self::start_with_env(&[])
    }

    /// [`ShimHost::start`], containerd (and so its shims and runtimes) with more environment variables (an
    /// object store's credentials and endpoint, say).
    pub fn start_with_env(env: &[(&str, String)]) -> ShimHost {
        crate::require_root();
        crate::bin("containerd-shim-cedana-v2");
        // containerd (started below, inheriting our environment) looks the shim up on its PATH.
        put_shim_on_path();
        let tmp = tempfile::tempdir().expect("temporary folder");
        let d = Containerd::start_with_env(&tmp.path().join("containerd"), env);
        let rootfs = crate::images::busybox_rootfs(&tmp.path().join("rootfs"));
        ShimHost { d, rootfs, tmp }
    }
}

/// Put the build's target folder first on PATH (once per test process), so that a containerd started
/// afterwards finds our shim (`containerd-shim-cedana-v2`) there.
pub fn put_shim_on_path() {
    static PATH: std::sync::Once = std::sync::Once::new();
    PATH.call_once(|| {
        let old = std::env::var_os("PATH").unwrap_or_default();
        let mut dirs = vec![crate::target_dir()];
        dirs.extend(std::env::split_paths(&old));
        std::env::set_var("PATH", std::env::join_paths(dirs).expect("PATH"));
    });
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            for (id, _) in self.tasks() {
                self.remove(&id);
            }
            let containers = self.ctr(&["container", "ls", "-q"]);
            for id in String::from_utf8_lossy(&containers.stdout).split_whitespace() {
                let _ = self.ctr(&["container", "rm", id]);
            }
        }
        stop_daemon(&mut self.child);
        remove_empty_cgroups(&self.namespace);
        // The shims' runtime state folder of our namespace (the runc shim's default root), empty by now.
        let _ = std::fs::remove_dir(std::path::Path::new("/run/containerd/runc").join(&self.namespace));
    }
}

/// Stop a daemon we started: SIGTERM by its PID, up to 30 s to exit, then SIGKILL.
fn stop_daemon(child: &mut std::process::Child) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while matches!(child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if matches!(child.try_wait(), Ok(None)) {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Remove the empty cgroups under `relative` in every controller (cgroup v1), best effort.
fn remove_empty_cgroups(relative: &str) {
    if let Ok(controllers) = std::fs::read_dir("/sys/fs/cgroup") {
        for c in controllers.flatten() {
            remove_empty_tree(&c.path().join(relative));
        }
    }
}
