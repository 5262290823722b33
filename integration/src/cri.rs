//! Kubernetes' container runtime interface without a cluster: a private containerd with its CRI plugin on
//! (pods on the host network, so no CNI), our shim registered as the runtime handler `cedana`, a locally built
//! pause image as the sandbox image, and a small blocking CRI client ([`Cri`]) that drives it as the kubelet
//! would (`runtime.v1` over containerd's socket).
//!
//! The containerd is the system's (Debian bookworm's 1.6, configuration version 2) or, through
//! [`Containerd::v2`], the containerd 2.x and runc that scripts/setup.sh installs in a private prefix
//! (configuration version 3, see [`config_v3`]); that runc comes first on the PATH of containerd, and so of the
//! shims and cedana-runc under it.
//!
//! Everything lives under one folder: containerd's root, state, sockets, configuration and log, the CRI
//! plugin's empty CNI folders, the pods' log folders. Pods get a private cgroup parent. Dropping a
//! [`CriContainerd`] stops and removes its pods through the CRI, stops containerd (and any shim of it left)
//! by PID, unmounts what is left under its folder and removes its empty cgroups.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cedana_protos::cri::{v1, ImageServiceClient, RuntimeServiceClient};
use tonic::transport::Channel;

/// The containerd namespace of the CRI plugin (Kubernetes').
pub const NAMESPACE: &str = "k8s.io";
/// The runtime handler (a RuntimeClass's `handler`) of our shim.
pub const CEDANA_HANDLER: &str = "cedana";
/// The containerd runtime of that handler.
pub const CEDANA_RUNTIME: &str = "io.containerd.cedana.v2";
/// The shim binary containerd runs for [`CEDANA_RUNTIME`].
pub const CEDANA_SHIM: &str = "containerd-shim-cedana-v2";
/// The sandbox image: `/pause` (integration/workloads/pause.c, static) alone in its rootfs.
pub const PAUSE_IMAGE: &str = "docker.io/cedana-test/pause:1";
/// A busybox image (every applet under /bin) for the pods' containers.
pub const BUSYBOX_IMAGE: &str = "docker.io/cedana-test/busybox-cri:1";
/// How long a CRI call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long containerd may take to answer once started, and to exit once told to.
const DAEMON_TIMEOUT: Duration = Duration::from_secs(30);

/// The start of a containerd configuration of `version` with everything under `dir`: root, state, its gRPC and
/// ttrpc sockets, no debug socket, and the `opt` plugin's folder.
fn private_paths(dir: &Path, version: u32) -> String {
    let p = |name: &str| format!("{:?}", dir.join(name));
    format!(
        "version = {version}\nroot = {}\nstate = {}\n\n[grpc]\n  address = {}\n\n[ttrpc]\n  address = {}\n\n\
         [debug]\n  address = \"\"\n\n[plugins.\"io.containerd.internal.v1.opt\"]\n  path = {}\n",
        p("root"),
        p("state"),
        p("containerd.sock"),
        p("containerd.sock.ttrpc"),
        p("opt"),
    )
}

/// The configuration (version 2, as containerd 1.6 and 1.7 read it) of a containerd with everything under
/// `dir`, the CRI plugin on with `sandbox_image`, the overlayfs snapshotter, the default runtime `runc`
/// (containerd's runc shim) and the handler `cedana` (our shim), which gets the pods' and containers'
/// `io.cedana.*` annotations in its OCI specs. The CNI folders are private and empty: pods must use the
/// node's network. `restrict_oom_score_adj` is on where this process cannot lower OOM scores
/// ([`can_lower_oom_score`]).
pub fn config(dir: &Path, sandbox_image: &str) -> String {
    let p = |name: &str| format!("{:?}", dir.join(name));
    let cri = "plugins.\"io.containerd.grpc.v1.cri\"";
    format!(
        r#"{head}
[{cri}]
  sandbox_image = "{sandbox_image}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  restrict_oom_score_adj = {restrict_oom}

[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

{runtimes}

[{cri}.cni]
  bin_dir = {cni_bin}
  conf_dir = {cni_conf}
"#,
        head = private_paths(dir, 2),
        runtimes = runtimes(&format!("{cri}.containerd")),
        cni_bin = p("cni/bin"),
        cni_conf = p("cni/conf"),
        restrict_oom = !can_lower_oom_score(),
    )
}

/// The runtime tables under `section` (the same in both configuration forms): runc, and the handler
/// `cedana` on our shim with the `io.cedana.*` annotations passed through.
fn runtimes(section: &str) -> String {
    format!(
        r#"[{section}.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[{section}.runtimes.{CEDANA_HANDLER}]
  runtime_type = "{CEDANA_RUNTIME}"
  pod_annotations = ["io.cedana.*"]
  container_annotations = ["io.cedana.*"]"#
    )
}

/// The configuration in containerd 2.x's own form (version 3) of what [`config`] gives 1.6: everything under
/// `dir`, the CRI plugin's image service (`io.containerd.cri.v1.images`: overlayfs, `sandbox_image` as the
/// pinned sandbox image) and runtime service (`io.containerd.cri.v1.runtime`: default runtime `runc`, the
/// handler `cedana` with the `io.cedana.*` annotations, the private empty CNI folders,
/// `restrict_oom_score_adj` where needed), the streaming server on 127.0.0.1 (`io.containerd.grpc.v1.cri`),
/// and NRI off (it would listen on the system-wide /var/run/nri/nri.sock).
pub fn config_v3(dir: &Path, sandbox_image: &str) -> String {
    let p = |name: &str| format!("{:?}", dir.join(name));
    let images = "plugins.\"io.containerd.cri.v1.images\"";
    let runtime = "plugins.\"io.containerd.cri.v1.runtime\"";
    format!(
        r#"{head}
[plugins."io.containerd.nri.v1.nri"]
  disable = true

[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

[{images}]
  snapshotter = "overlayfs"

[{images}.pinned_images]
  sandbox = "{sandbox_image}"

[{runtime}]
  restrict_oom_score_adj = {restrict_oom}

[{runtime}.containerd]
  default_runtime_name = "runc"

{runtimes}

[{runtime}.cni]
  bin_dirs = [{cni_bin}]
  conf_dir = {cni_conf}
"#,
        head = private_paths(dir, 3),
        runtimes = runtimes(&format!("{runtime}.containerd")),
        cni_bin = p("cni/bin"),
        cni_conf = p("cni/conf"),
        restrict_oom = !can_lower_oom_score(),
    )
}

/// The folder scripts/setup.sh installs containerd 2.x and its runc into (`bin/`): `$CEDANA_CONTAINERD2_PREFIX`,
/// else /opt/cedana/containerd2.
pub fn containerd2_prefix() -> PathBuf {
    std::env::var_os("CEDANA_CONTAINERD2_PREFIX")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/cedana/containerd2"))
}

/// Which containerd a [`CriContainerd`] runs: its `containerd` and `ctr`, the folder put first on its PATH
/// (where its shims and cedana-runc find the matching `containerd-shim-runc-v2` and `runc`), and its major
/// version, which picks the configuration's form ([`config`] for 1.x, [`config_v3`] for 2.x).
#[derive(Clone, Debug)]
pub struct Containerd {
    pub containerd: PathBuf,
    pub ctr: PathBuf,
    /// Put first on containerd's PATH; `None`: the PATH as it is.
    pub bin_dir: Option<PathBuf>,
    /// The major version `containerd --version` reports.
    pub major: u32,
}

impl Containerd {
    /// The system's containerd (`containerd` and `ctr` on PATH: Debian bookworm's 1.6) with the system's runc.
    pub fn system() -> Containerd {
        let containerd = PathBuf::from("containerd");
        let major = containerd_major(&containerd);
        Containerd { containerd, ctr: PathBuf::from("ctr"), bin_dir: None, major }
    }

    /// containerd 2.x and its runc from [`containerd2_prefix`]`/bin`, as scripts/setup.sh installs them. Panics
    /// (with the fix) when they are missing or not 2.x.
    pub fn v2() -> Containerd {
        let bin_dir = containerd2_prefix().join("bin");
        for name in ["containerd", "ctr", "containerd-shim-runc-v2", "runc"] {
            let p = bin_dir.join(name);
            assert!(p.is_file(), "{} is missing: run scripts/setup.sh (it installs containerd 2.x there)", p.display());
        }
        let containerd = bin_dir.join("containerd");
        let major = containerd_major(&containerd);
        assert_eq!(major, 2, "{} is not containerd 2.x: run scripts/setup.sh", containerd.display());
        Containerd { containerd, ctr: bin_dir.join("ctr"), bin_dir: Some(bin_dir), major }
    }

    /// The PATH containerd runs with: [`Containerd::bin_dir`] first, then this process's PATH.
    pub fn path(&self) -> std::ffi::OsString {
        let old = std::env::var_os("PATH").unwrap_or_default();
        let dirs = self.bin_dir.iter().cloned().chain(std::env::split_paths(&old));
        std::env::join_paths(dirs).expect("PATH")
    }

    /// Its configuration with everything under `dir`, in the form its major version reads.
    pub fn config(&self, dir: &Path, sandbox_image: &str) -> String {
        if self.major >= 2 {
            config_v3(dir, sandbox_image)
        } else {
            config(dir, sandbox_image)
        }
    }
}

/// The major version of `containerd --version` ("containerd github.com/containerd/containerd 1.6.20~ds1 ...",
/// "containerd github.com/containerd/containerd/v2 2.1.9+unknown").
fn containerd_major(containerd: &Path) -> u32 {
    let out = Command::new(containerd)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{} must be installed (scripts/setup.sh): {e}", containerd.display()));
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text.split_whitespace().nth(2).unwrap_or_default().trim_start_matches('v');
    let major: String = version.chars().take_while(char::is_ascii_digit).collect();
    major.parse().unwrap_or_else(|_| panic!("a version from `{} --version`: {text:?}", containerd.display()))
}

/// Whether this process may lower its OOM score adjustment (it needs CAP_SYS_RESOURCE, which some sandboxed
/// hosts withhold even from root). The CRI plugin gives sandboxes -998, which runc then fails to set; without
/// the capability the configuration asks for `restrict_oom_score_adj` (no score below containerd's own).
pub fn can_lower_oom_score() -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else { return false };
    let effective = status.lines().find_map(|l| l.strip_prefix("CapEff:")).map(str::trim);
    const CAP_SYS_RESOURCE: u32 = 24;
    effective.and_then(|hex| u64::from_str_radix(hex, 16).ok()).is_some_and(|caps| caps & (1 << CAP_SYS_RESOURCE) != 0)
}

/// A private containerd with the CRI plugin on (see [`config`]), the pause and busybox images imported into
/// [`NAMESPACE`], and a CRI client on its socket. Dropped: its pods are stopped and removed through the CRI,
/// then containerd and any shim of it left are stopped by PID, leftover mounts under `dir` are unmounted and
/// the pods' empty cgroups removed.
pub struct CriContainerd {
    pub dir: PathBuf,
    pub socket: PathBuf,
    /// The cgroup parent of the pods [`Cri::run_pod`] runs (cgroupfs syntax, `/cedana-cri-PID-N`).
    pub cgroup_parent: String,
    pub cri: Cri,
    /// The containerd it runs.
    pub containerd: Containerd,
    /// The PATH containerd runs with ([`Containerd::path`]); give it to tools that must find the same runc
    /// (e.g. `cedana dump containerd`, which runs runc on the shim's state).
    pub path: std::ffi::OsString,
    child: Child,
    /// Whether the shims' runc root of [`NAMESPACE`] (`/run/containerd/runc/k8s.io`) was made by us.
    made_runc_root: bool,
}

/// The runc root the runc shim and ours use for the containers of [`NAMESPACE`].
pub fn runc_root() -> PathBuf {
    Path::new("/run/containerd/runc").join(NAMESPACE)
}

impl CriContainerd {
    /// Start the system's containerd ([`Containerd::system`]) with everything under `dir`; see
    /// [`CriContainerd::start_with`].
    pub fn start(dir: &Path) -> CriContainerd {
        CriContainerd::start_with(dir, Containerd::system())
    }

    /// Start `containerd` with everything under `dir` (as root; our shim must be built): containerd finds our
    /// shim on its PATH, after the install's own folder. Waits until the CRI answers and both images are in the
    /// CRI plugin's image store.
    pub fn start_with(dir: &Path, containerd: Containerd) -> CriContainerd {
        crate::require_root();
        crate::bin(CEDANA_SHIM);
        crate::engines::put_shim_on_path();
        for d in ["cni/bin", "cni/conf", "pod-logs"] {
            std::fs::create_dir_all(dir.join(d)).expect("containerd folders");
        }
        static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let cgroup_parent = format!("/cedana-cri-{}-{n}", std::process::id());
        let made_runc_root = !runc_root().exists();

        let config_path = dir.join("config.toml");
        std::fs::write(&config_path, containerd.config(dir, PAUSE_IMAGE)).expect("containerd config");
        let log = std::fs::File::create(dir.join("containerd.log")).expect("containerd log");
        let path = containerd.path();
        let child = Command::new(&containerd.containerd)
            .env("PATH", &path)
            .arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("containerd must be installed (scripts/setup.sh)");
        let socket = dir.join("containerd.sock");
        let deadline = Instant::now() + DAEMON_TIMEOUT;
        let cri = loop {
            let attempt = Cri::connect(&socket, dir.join("pod-logs"), &cgroup_parent).and_then(|c| match c.version() {
                Ok(_) => Ok(c),
                Err(e) => Err(format!("Version: {e}")),
            });
            match attempt {
                Ok(c) => break c,
                Err(e) if Instant::now() > deadline => {
                    let log = std::fs::read_to_string(dir.join("containerd.log")).unwrap_or_default();
                    panic!("containerd's CRI did not answer within {DAEMON_TIMEOUT:?} ({e}); its log:\n{log}");
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        let c = CriContainerd { dir: dir.to_path_buf(), socket, cgroup_parent, cri, containerd, path, child, made_runc_root };
        c.import_pause_image();
        c.import(&crate::images::busybox_rootfs(&dir.join("busybox-rootfs")), BUSYBOX_IMAGE);
        c
    }

    /// `ctr -a SOCKET -n k8s.io ARGS`, run to completion.
    pub fn ctr(&self, args: &[&str]) -> Output {
        Command::new(&self.containerd.ctr)
            .env("PATH", &self.path)
            .arg("-a")
            .arg(&self.socket)
            .arg("-n")
            .arg(NAMESPACE)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run ctr")
    }

    /// `ctr ARGS` (namespace k8s.io), which must succeed; returns stdout.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let what = format!("ctr {args:?} (containerd log: {})", self.log_path().display());
        crate::success_stdout(&what, &self.ctr(args))
    }

    /// containerd's log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("containerd.log")
    }

    /// Import an OCI image-layout tarball of `rootfs` as image `name` (a full reference) into k8s.io, and
    /// wait until the CRI plugin lists it (it learns of images from containerd's events).
    pub fn import(&self, rootfs: &Path, name: &str) {
        let work = self.dir.join("image-build").join(name.replace(['/', ':'], "_"));
        std::fs::create_dir_all(&work).expect("image build folder");
        let config = serde_json::json!({ "Env": ["PATH=/bin"], "Cmd": ["/bin/sh"] });
        self.import_tar(&crate::images::oci_image_tar_with_config(rootfs, &work, name, config), name);
    }

    /// The pause image: `/pause`, compiled statically from `integration/workloads/pause.c`, as its entrypoint.
    fn import_pause_image(&self) {
        let rootfs = self.dir.join("pause-rootfs");
        std::fs::create_dir_all(rootfs.join("bin")).expect("pause rootfs");
        for d in ["proc", "sys", "dev", "etc"] {
            std::fs::create_dir_all(rootfs.join(d)).expect("pause rootfs");
        }
        let pause = crate::images::add_static_workload(&rootfs, "pause");
        std::fs::rename(&pause, rootfs.join("pause")).expect("install /pause");
        let work = self.dir.join("image-build").join("pause");
        std::fs::create_dir_all(&work).expect("image build folder");
        let config = serde_json::json!({ "Entrypoint": ["/pause"] });
        self.import_tar(&crate::images::oci_image_tar_with_config(&rootfs, &work, PAUSE_IMAGE, config), PAUSE_IMAGE);
    }

    fn import_tar(&self, tar: &Path, name: &str) {
        self.ctr_ok(&["image", "import", tar.to_str().expect("utf-8 path")]);
        // Also by digest (`REPO@sha256:...`), as an image pulled from a registry is: the CRI then reports it as
        // the container's image reference, which containerd 2.x's checkpoint archives record for the restore.
        let listed = self.ctr_ok(&["image", "ls"]);
        let digest = listed
            .lines()
            .find_map(|l| {
                let fields: Vec<&str> = l.split_whitespace().collect();
                (fields.first() == Some(&name)).then(|| fields.get(2).map(|d| d.to_string())).flatten()
            })
            .unwrap_or_else(|| panic!("ctr image ls lists {name} with its digest: {listed}"));
        let repo = name.rsplit_once(':').map(|(r, _)| r).unwrap_or(name);
        self.ctr_ok(&["image", "tag", name, &format!("{repo}@{digest}")]);
        crate::wait_for(&format!("the CRI to list image {name}"), DAEMON_TIMEOUT, || {
            let images = self.cri.list_images().ok()?;
            images.iter().any(|i| i.repo_tags.iter().any(|t| t == name)).then_some(())
        });
    }

    /// PIDs of the live shims of this containerd (their command line has `-address SOCKET`).
    pub fn shim_pids(&self) -> Vec<i32> {
        let socket = self.socket.to_string_lossy().into_owned();
        let mut pids = Vec::new();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
            let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else { continue };
            let args: Vec<String> = cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
            let is_shim = args.first().is_some_and(|a| a.contains("containerd-shim"));
            if is_shim && args.windows(2).any(|w| w[0] == "-address" && w[1] == socket) && crate::alive(pid) {
                pids.push(pid);
            }
        }
        pids
    }

    /// The mount points under this containerd's folder (from /proc/self/mountinfo), in mount order.
    pub fn mounts(&self) -> Vec<PathBuf> {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        info.lines()
            .filter_map(|l| l.split(' ').nth(4))
            .map(unescape_mountinfo)
            .map(PathBuf::from)
            .filter(|p| p.starts_with(&self.dir))
            .collect()
    }

    /// Stop and remove every pod (its containers with it) through the CRI; best effort.
    fn remove_pods(&self) {
        let Ok(pods) = self.cri.list_pods() else { return };
        for pod in pods {
            let _ = self.cri.stop_pod(&pod.id);
            let _ = self.cri.remove_pod(&pod.id);
        }
    }
}

impl Drop for CriContainerd {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.remove_pods();
        }
        // The shims exit once their containers are deleted; any left (a failed test) is stopped by PID.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.shim_pids().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        for pid in self.shim_pids() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
        stop(&mut self.child);
        for mount in self.mounts().iter().rev() {
            if let Ok(path) = std::ffi::CString::new(mount.as_os_str().as_encoded_bytes()) {
                // SAFETY: a valid NUL-terminated path; the call only reads it.
                unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
            }
        }
        remove_empty_cgroups(self.cgroup_parent.trim_start_matches('/'));
        if self.made_runc_root {
            let _ = std::fs::remove_dir(runc_root());
        }
    }
}

/// Stop a daemon we started: SIGTERM by its PID, then SIGKILL if it is still there after [`DAEMON_TIMEOUT`].
fn stop(child: &mut Child) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + DAEMON_TIMEOUT;
    while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if matches!(child.try_wait(), Ok(None)) {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A mountinfo path with its octal escapes (`\040` for a space, ...) decoded.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match (bytes[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Remove the empty cgroups under `relative` in every controller (cgroup v1) or the unified tree; best
/// effort (deepest first).
fn remove_empty_cgroups(relative: &str) {
    fn remove_tree(dir: &Path) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&e.path());
            }
        }
        let _ = std::fs::remove_dir(dir);
    }
    if relative.is_empty() {
        return;
    }
    let root = Path::new("/sys/fs/cgroup");
    remove_tree(&root.join(relative));
    for c in std::fs::read_dir(root).into_iter().flatten().flatten() {
        remove_tree(&c.path().join(relative));
    }
}

/// A blocking CRI client (the kubelet's side) on containerd's socket. Calls answer the CRI's
/// [`tonic::Status`] on failure; [`Cri::run_pod`] remembers each pod's configuration, which
/// [`Cri::create_container`] passes on as the kubelet does.
pub struct Cri {
    rt: tokio::runtime::Runtime,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
    log_root: PathBuf,
    cgroup_parent: String,
    pods: Mutex<HashMap<String, v1::PodSandboxConfig>>,
}

impl Cri {
    /// Connect to the CRI on `socket`; pods get their log folders under `log_root` and their cgroups under
    /// `cgroup_parent`.
    pub fn connect(socket: &Path, log_root: PathBuf, cgroup_parent: &str) -> Result<Cri, String> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
        let endpoint = cedana_protos::uds_endpoint().timeout(CALL_TIMEOUT).connect_timeout(Duration::from_secs(5));
        let channel = rt.block_on(cedana_protos::connect_uds_with(endpoint, socket)).map_err(|e| format!("{e:?}"))?;
        Ok(Cri {
            rt,
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
            log_root,
            cgroup_parent: cgroup_parent.to_string(),
            pods: Mutex::default(),
        })
    }

    fn call<T, F>(&self, f: impl FnOnce(RuntimeServiceClient<Channel>) -> F) -> Result<T, tonic::Status>
    where
        F: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.rt.block_on(f(self.runtime.clone())).map(tonic::Response::into_inner)
    }

    /// `Version`: the runtime's name and version, and its CRI API version.
    pub fn version(&self) -> Result<v1::VersionResponse, tonic::Status> {
        let req = v1::VersionRequest { version: cedana_protos::cri::API_VERSION.into() };
        self.call(|mut c| async move { c.version(req).await })
    }

    /// The log folder of the pod `name` (uid, namespace) that [`Cri::pod_config`] gives it.
    pub fn pod_log_dir(&self, name: &str, uid: &str, namespace: &str) -> PathBuf {
        self.log_root.join(format!("{namespace}_{name}_{uid}"))
    }

    /// The configuration of a pod on the node's network (own PID namespace per container, the pod's IPC
    /// namespace), with its log folder under the client's log root and its cgroups under its cgroup parent.
    pub fn pod_config(&self, name: &str, uid: &str, namespace: &str, annotations: &[(&str, &str)]) -> v1::PodSandboxConfig {
        let log_directory = self.pod_log_dir(name, uid, namespace);
        std::fs::create_dir_all(&log_directory).expect("pod log folder");
        v1::PodSandboxConfig {
            metadata: Some(v1::PodSandboxMetadata {
                name: name.into(),
                uid: uid.into(),
                namespace: namespace.into(),
                attempt: 0,
            }),
            hostname: String::new(),
            log_directory: log_directory.to_string_lossy().into_owned(),
            labels: HashMap::from([("io.kubernetes.pod.name".to_string(), name.to_string())]),
            annotations: annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            linux: Some(v1::LinuxPodSandboxConfig {
                cgroup_parent: self.cgroup_parent.clone(),
                security_context: Some(v1::LinuxSandboxSecurityContext {
                    namespace_options: Some(namespaces()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        }
    }

    /// `RunPodSandbox` of [`Cri::pod_config`] with runtime handler `handler`; the sandbox's id.
    pub fn run_pod(
        &self,
        name: &str,
        uid: &str,
        namespace: &str,
        annotations: &[(&str, &str)],
        handler: &str,
    ) -> Result<String, tonic::Status> {
        let config = self.pod_config(name, uid, namespace, annotations);
        let req = v1::RunPodSandboxRequest { config: Some(config.clone()), runtime_handler: handler.into() };
        let id = self.call(|mut c| async move { c.run_pod_sandbox(req).await })?.pod_sandbox_id;
        self.pods.lock().unwrap_or_else(|e| e.into_inner()).insert(id.clone(), config);
        Ok(id)
    }

    /// `PodSandboxStatus` (verbose: `info` holds containerd's JSON about the sandbox).
    pub fn pod_status(&self, id: &str) -> Result<v1::PodSandboxStatusResponse, tonic::Status> {
        let req = v1::PodSandboxStatusRequest { pod_sandbox_id: id.into(), verbose: true };
        self.call(|mut c| async move { c.pod_sandbox_status(req).await })
    }

    /// `StopPodSandbox`: its containers are killed.
    pub fn stop_pod(&self, id: &str) -> Result<(), tonic::Status> {
        let req = v1::StopPodSandboxRequest { pod_sandbox_id: id.into() };
        self.call(|mut c| async move { c.stop_pod_sandbox(req).await }).map(drop)
    }

    /// `RemovePodSandbox`: its containers are removed with it.
    pub fn remove_pod(&self, id: &str) -> Result<(), tonic::Status> {
        let req = v1::RemovePodSandboxRequest { pod_sandbox_id: id.into() };
        self.call(|mut c| async move { c.remove_pod_sandbox(req).await }).map(drop)?;
        self.pods.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
        Ok(())
    }

    /// `ListPodSandbox`: every pod.
    pub fn list_pods(&self) -> Result<Vec<v1::PodSandbox>, tonic::Status> {
        let req = v1::ListPodSandboxRequest { filter: None };
        self.call(|mut c| async move { c.list_pod_sandbox(req).await }).map(|r| r.items)
    }

    /// `CreateContainer` of `config` in pod `sandbox` (run by this client); the container's id.
    pub fn create_container(&self, sandbox: &str, config: v1::ContainerConfig) -> Result<String, tonic::Status> {
        let sandbox_config = self.pods.lock().unwrap_or_else(|e| e.into_inner()).get(sandbox).cloned();
        let req = v1::CreateContainerRequest { pod_sandbox_id: sandbox.into(), config: Some(config), sandbox_config };
        self.call(|mut c| async move { c.create_container(req).await }).map(|r| r.container_id)
    }

    /// `StartContainer`.
    pub fn start(&self, id: &str) -> Result<(), tonic::Status> {
        let req = v1::StartContainerRequest { container_id: id.into() };
        self.call(|mut c| async move { c.start_container(req).await }).map(drop)
    }

    /// `StopContainer`: SIGTERM, then SIGKILL after `timeout` seconds (0: at once).
    pub fn stop(&self, id: &str, timeout: i64) -> Result<(), tonic::Status> {
        let req = v1::StopContainerRequest { container_id: id.into(), timeout };
        self.call(|mut c| async move { c.stop_container(req).await }).map(drop)
    }

    /// `RemoveContainer`.
    pub fn remove(&self, id: &str) -> Result<(), tonic::Status> {
        let req = v1::RemoveContainerRequest { container_id: id.into() };
        self.call(|mut c| async move { c.remove_container(req).await }).map(drop)
    }

    /// `ContainerStatus` (verbose: `info` holds containerd's JSON about the container).
    pub fn status(&self, id: &str) -> Result<v1::ContainerStatusResponse, tonic::Status> {
        let req = v1::ContainerStatusRequest { container_id: id.into(), verbose: true };
        self.call(|mut c| async move { c.container_status(req).await })
    }

    /// The container's state (`CONTAINER_RUNNING`, ...).
    pub fn state(&self, id: &str) -> Result<v1::ContainerState, tonic::Status> {
        let status = self.status(id)?.status.unwrap_or_default();
        Ok(v1::ContainerState::try_from(status.state).unwrap_or(v1::ContainerState::ContainerUnknown))
    }

    /// `ListContainers`, of pod `sandbox` or of every pod.
    pub fn list_containers(&self, sandbox: Option<&str>) -> Result<Vec<v1::Container>, tonic::Status> {
        let filter = sandbox.map(|s| v1::ContainerFilter { pod_sandbox_id: s.into(), ..Default::default() });
        let req = v1::ListContainersRequest { filter };
        self.call(|mut c| async move { c.list_containers(req).await }).map(|r| r.containers)
    }

    /// `CheckpointContainer` of container `id` into the archive `location`.
    pub fn checkpoint(&self, id: &str, location: &Path, timeout: i64) -> Result<(), tonic::Status> {
        let req = v1::CheckpointContainerRequest {
            container_id: id.into(),
            location: location.to_string_lossy().into_owned(),
            timeout,
        };
        self.call(|mut c| async move { c.checkpoint_container(req).await }).map(drop)
    }

    /// `ListImages` of the image service.
    pub fn list_images(&self) -> Result<Vec<v1::Image>, tonic::Status> {
        let req = v1::ListImagesRequest { filter: None };
        self.rt.block_on(self.images.clone().list_images(req)).map(|r| r.into_inner().images)
    }
}

/// The namespaces of the test's pods and containers: the node's network (no CNI), a PID namespace per
/// container, the pod's IPC namespace.
fn namespaces() -> v1::NamespaceOption {
    v1::NamespaceOption {
        network: v1::NamespaceMode::Node.into(),
        pid: v1::NamespaceMode::Container.into(),
        ipc: v1::NamespaceMode::Pod.into(),
        target_id: String::new(),
    }
}

/// The configuration of a container named `name` running `command` (its entrypoint) from `image`, with the
/// host folders `mounts` (host path, container path) mounted read-write, in its own PID namespace, its output
/// logged to `NAME.log` in the pod's log folder.
pub fn container_config(name: &str, image: &str, command: &[&str], mounts: &[(&Path, &str)]) -> v1::ContainerConfig {
    v1::ContainerConfig {
        metadata: Some(v1::ContainerMetadata { name: name.into(), attempt: 0 }),
        image: Some(v1::ImageSpec { image: image.into(), annotations: HashMap::new() }),
        command: command.iter().map(|c| c.to_string()).collect(),
        mounts: mounts
            .iter()
            .map(|(host, container)| v1::Mount {
                container_path: container.to_string(),
                host_path: host.to_string_lossy().into_owned(),
                ..Default::default()
            })
            .collect(),
        log_path: format!("{name}.log"),
        linux: Some(v1::LinuxContainerConfig {
            security_context: Some(v1::LinuxContainerSecurityContext {
                namespace_options: Some(namespaces()),
                ..Default::default()
            }),
        }),
        ..Default::default()
    }
}

/// containerd's verbose `info` of a [`Cri::status`] or [`Cri::pod_status`] answer, as JSON (its `pid`, its
/// `runtimeType`, its OCI spec under `runtimeSpec`, ...); `Null` when there is none.
pub fn verbose_info(info: &HashMap<String, String>) -> serde_json::Value {
    info.get("info").and_then(|i| serde_json::from_str(i).ok()).unwrap_or(serde_json::Value::Null)
}

/// The parent PID of `pid` (from /proc), if it lives.
pub fn parent_pid(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
}

/// The executable name of `pid` (the file name of its command line's first word).
pub fn process_name(pid: i32) -> Option<String> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let first = cmdline.split(|b| *b == 0).next()?;
    Path::new(&*String::from_utf8_lossy(first)).file_name().map(|n| n.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_enables_the_cri_with_our_handler_and_private_folders() {
        let text = config(Path::new("/tmp/x y"), PAUSE_IMAGE);
        let parsed: toml::Value = toml::from_str(&text).expect("valid TOML");
        let cri = &parsed["plugins"]["io.containerd.grpc.v1.cri"];
        assert_eq!(cri["sandbox_image"].as_str(), Some(PAUSE_IMAGE));
        assert_eq!(cri["containerd"]["runtimes"]["cedana"]["runtime_type"].as_str(), Some(CEDANA_RUNTIME));
        assert_eq!(cri["cni"]["conf_dir"].as_str(), Some("/tmp/x y/cni/conf"));
        assert_eq!(parsed["grpc"]["address"].as_str(), Some("/tmp/x y/containerd.sock"));
        assert!(parsed.get("disabled_plugins").is_none());
    }

    #[test]
    fn the_v3_config_puts_the_cri_settings_in_containerd_2s_plugins() {
        let text = config_v3(Path::new("/tmp/x y"), PAUSE_IMAGE);
        let parsed: toml::Value = toml::from_str(&text).expect("valid TOML");
        assert_eq!(parsed["version"].as_integer(), Some(3));
        let plugins = &parsed["plugins"];
        assert_eq!(plugins["io.containerd.cri.v1.images"]["pinned_images"]["sandbox"].as_str(), Some(PAUSE_IMAGE));
        let runtime = &plugins["io.containerd.cri.v1.runtime"];
        let cedana = &runtime["containerd"]["runtimes"]["cedana"];
        assert_eq!(cedana["runtime_type"].as_str(), Some(CEDANA_RUNTIME));
        assert_eq!(cedana["pod_annotations"][0].as_str(), Some("io.cedana.*"));
        assert_eq!(runtime["restrict_oom_score_adj"].as_bool(), Some(!can_lower_oom_score()));
        assert_eq!(runtime["cni"]["conf_dir"].as_str(), Some("/tmp/x y/cni/conf"));
        assert_eq!(plugins["io.containerd.nri.v1.nri"]["disable"].as_bool(), Some(true));
        assert_eq!(parsed["grpc"]["address"].as_str(), Some("/tmp/x y/containerd.sock"));
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo(r"/tmp/a\040b\011c"), "/tmp/a b\tc");
        assert_eq!(unescape_mountinfo(r"/x\y"), r"/x\y");
    }
}
