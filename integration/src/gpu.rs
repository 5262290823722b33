//! Fakes of NVIDIA's CUDA checkpoint stack (integration/fake-gpu: `libcuda.so.1`, `cuda-checkpoint`,
//! `gpu-app`, `nvidia-smi`), built with gcc once per build, and a fresh fake device for each test.
//!
//! A [`FakeGpu`] owns a temporary folder with the fake device node (`nvidia0`, a character device like
//! /dev/zero) and the control folder through which controllers talk to the CUDA processes' restore
//! threads (see integration/fake-gpu/README.md).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::sync::Mutex;
use std::time::Duration;

use crate::workload::session_command;

const SOURCES: [&str; 5] = ["libcuda.c", "cuda-checkpoint.c", "gpu-app.c", "nvidia-smi", "nvidia-hook.c"];
const CFLAGS: [&str; 6] = ["-O2", "-Wall", "-Wextra", "-Werror", "-pthread", "-g"];

/// A fake GPU for one test: the built fakes, a device node and a control folder in a temporary folder.
pub struct FakeGpu {
    _tmp: tempfile::TempDir,
    /// The temporary folder (removed when dropped).
    pub dir: PathBuf,
    /// Holds `libcuda.so.1` (and `libcuda.so`).
    pub lib_dir: PathBuf,
    /// Holds `cuda-checkpoint`, `nvidia-smi` and `gpu-app`: put it first on PATH to use the fake tools.
    pub bin_dir: PathBuf,
    pub cuda_checkpoint: PathBuf,
    pub app: PathBuf,
    pub nvidia_smi: PathBuf,
    /// The fake legacy `nvidia-container-runtime-hook` (an OCI prestart hook; see fake-gpu/README.md).
    pub hook: PathBuf,
    /// The fake device node `nvidia0` (character device 1:5).
    pub device: PathBuf,
    /// FAKE_CUDA_DIR: where CUDA processes keep their control files.
    pub control_dir: PathBuf,
}

impl FakeGpu {
    /// Build the fakes (once per build) and make a fresh device node and control folder.
    pub fn new() -> FakeGpu {
        let (lib_dir, bin_dir) = build();
        let tmp = tempfile::tempdir().expect("temporary folder");
        let dir = tmp.path().to_path_buf();
        let device = dir.join("nvidia0");
        let dev = nix::sys::stat::makedev(1, 5);
        nix::sys::stat::mknod(&device, nix::sys::stat::SFlag::S_IFCHR, nix::sys::stat::Mode::from_bits_truncate(0o666), dev)
            .expect("mknod the fake nvidia0 (needs root)");
        let control_dir = dir.join("fake-cuda");
        std::fs::create_dir(&control_dir).expect("control folder");
        FakeGpu {
            _tmp: tmp,
            dir,
            cuda_checkpoint: bin_dir.join("cuda-checkpoint"),
            app: bin_dir.join("gpu-app"),
            nvidia_smi: bin_dir.join("nvidia-smi"),
            hook: bin_dir.join("nvidia-hook"),
            lib_dir,
            bin_dir,
            device,
            control_dir,
        }
    }

    /// The environment a CUDA program needs: LD_LIBRARY_PATH, FAKE_CUDA_DEVICE and FAKE_CUDA_DIR.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("LD_LIBRARY_PATH".into(), self.lib_dir.display().to_string()),
            ("FAKE_CUDA_DEVICE".into(), self.device.display().to_string()),
            ("FAKE_CUDA_DIR".into(), self.control_dir.display().to_string()),
        ]
    }

    /// PATH with [`FakeGpu::bin_dir`] first, so that `cuda-checkpoint` and `nvidia-smi` are the fakes.
    pub fn path_env(&self) -> String {
        let rest =
            std::env::var("PATH").unwrap_or_else(|_| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
        format!("{}:{rest}", self.bin_dir.display())
    }

    /// The `gpu-app` command (MiB of device memory, child processes) in its own session with stdin from
    /// /dev/null and stdout and stderr to `log`, with [`FakeGpu::env`]; add more env before spawning.
    pub fn app_command(&self, mib: u32, children: u32, log: &Path) -> Command {
        let file = std::fs::File::create(log).expect("create the app's log");
        let mut cmd = session_command(&self.app);
        cmd.args([mib.to_string(), children.to_string()])
            .envs(self.env())
            .stdout(file.try_clone().expect("dup log"))
            .stderr(file)
            .current_dir(&self.dir);
        cmd
    }

    /// Start `gpu-app` (see [`FakeGpu::app_command`]). The caller kills it (by PID).
    pub fn spawn_app(&self, mib: u32, children: u32, log: &Path) -> Child {
        self.app_command(mib, children, log).spawn().expect("start gpu-app")
    }

    /// `cuda-checkpoint ARGS` with `env` added, run to completion.
    pub fn run_cuda_checkpoint(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = Command::new(&self.cuda_checkpoint);
        cmd.args(args).envs(env.iter().copied());
        cmd.output().expect("run the fake cuda-checkpoint")
    }

    /// `cuda-checkpoint --get-state --pid PID`: the state word, or None when the tool fails.
    pub fn state(&self, pid: i32) -> Option<String> {
        let out = self.run_cuda_checkpoint(&["--get-state", "--pid", &pid.to_string()], &[]);
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

impl Default for FakeGpu {
    fn default() -> Self {
        FakeGpu::new()
    }
}

/// One `count <n> sum <hex> pid <pid>` line of gpu-app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppLine {
    pub count: u64,
    pub sum: String,
    pub pid: i32,
}

impl AppLine {
    /// Parse a line of gpu-app's output; None for any other line.
    pub fn parse(line: &str) -> Option<AppLine> {
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.as_slice() {
            ["count", n, "sum", sum, "pid", pid] => {
                Some(AppLine { count: n.parse().ok()?, sum: sum.to_string(), pid: pid.parse().ok()? })
            }
            _ => None,
        }
    }
}

/// The complete `count` lines of gpu-app's log, of process `pid` only when given.
pub fn app_lines(log: &Path, pid: Option<i32>) -> Vec<AppLine> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let complete = text.rfind('\n').map(|i| &text[..=i]).unwrap_or("");
    complete.lines().filter_map(AppLine::parse).filter(|l| pid.is_none_or(|p| l.pid == p)).collect()
}

/// The last `count` line of gpu-app's log (of process `pid` when given).
pub fn last_app_line(log: &Path, pid: Option<i32>) -> Option<AppLine> {
    app_lines(log, pid).pop()
}

/// Wait (20 s at most) until process `pid` of the log reports a count of at least `count`.
pub fn wait_count(log: &Path, pid: i32, count: u64) -> AppLine {
    crate::wait_for(&format!("count {count} from gpu-app {pid} in {}", log.display()), Duration::from_secs(20), || {
        last_app_line(log, Some(pid)).filter(|l| l.count >= count)
    })
}

/// The checksum gpu-app prints for `mib` MiB of device memory after `count` steps: FNV-1a over the
/// 64-bit words, word 0 = count, word i = (count << 32) ^ (i * 0x9E3779B97F4A7C15).
pub fn expected_sum(mib: u32, count: u64) -> String {
    let words = (mib as u64) << 17;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for i in 0..words {
        let w = if i == 0 { count } else { (count << 32) ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15) };
        h = (h ^ w).wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

static BUILD: Mutex<()> = Mutex::new(());

/// Compile the fakes into target/<profile>/fake-gpu/{lib,bin} unless they are newer than every source;
/// returns (lib dir, bin dir). Concurrent builds (threads or test processes) each build in a private folder
/// and rename the results into place.
fn build() -> (PathBuf, PathBuf) {
    let _guard = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("fake-gpu");
    let out = crate::target_dir().join("fake-gpu");
    let (lib, bin) = (out.join("lib"), out.join("bin"));
    let outputs = [
        lib.join("libcuda.so.1"),
        bin.join("cuda-checkpoint"),
        bin.join("gpu-app"),
        bin.join("nvidia-smi"),
        lib.join("libcuda.so"),
        bin.join("nvidia-hook"),
    ];
    let newest_source = SOURCES.iter().filter_map(|s| std::fs::metadata(src.join(s)).ok()?.modified().ok()).max();
    let fresh = outputs
        .iter()
        .all(|o| std::fs::symlink_metadata(o).ok().and_then(|m| m.modified().ok()).is_some_and(|t| Some(t) >= newest_source));
    if fresh {
        return (lib, bin);
    }
    let work = out.join(format!(".build-{}", std::process::id()));
    let (wlib, wbin) = (work.join("lib"), work.join("bin"));
    let _ = std::fs::remove_dir_all(&work);
    for d in [&wlib, &wbin, &lib, &bin] {
        std::fs::create_dir_all(d).expect("fake-gpu build folder");
    }
    gcc(&[
        "-fPIC",
        "-shared",
        "-fvisibility=hidden",
        "-Wl,-soname,libcuda.so.1",
        "-o",
        s(&wlib.join("libcuda.so.1")),
        s(&src.join("libcuda.c")),
    ]);
    for prog in ["cuda-checkpoint", "gpu-app"] {
        gcc(&[
            "-o",
            s(&wbin.join(prog)),
            s(&src.join(format!("{prog}.c"))),
            &format!("-L{}", wlib.display()),
            "-l:libcuda.so.1",
            "-Wl,-rpath,$ORIGIN/../lib",
        ]);
    }
    gcc(&["-o", s(&wbin.join("nvidia-hook")), s(&src.join("nvidia-hook.c"))]);
    std::fs::copy(src.join("nvidia-smi"), wbin.join("nvidia-smi")).expect("copy nvidia-smi");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(wbin.join("nvidia-smi"), std::fs::Permissions::from_mode(0o755)).expect("chmod nvidia-smi");
    }
    std::os::unix::fs::symlink("libcuda.so.1", wlib.join("libcuda.so")).expect("symlink libcuda.so");
    // The library first: a program is only installed next to the library it was linked with.
    for (from, to) in [
        (wlib.join("libcuda.so.1"), &outputs[0]),
        (wlib.join("libcuda.so"), &outputs[4]),
        (wbin.join("cuda-checkpoint"), &outputs[1]),
        (wbin.join("gpu-app"), &outputs[2]),
        (wbin.join("nvidia-smi"), &outputs[3]),
        (wbin.join("nvidia-hook"), &outputs[5]),
    ] {
        std::fs::rename(&from, to).unwrap_or_else(|e| panic!("install {}: {e}", to.display()));
    }
    let _ = std::fs::remove_dir_all(&work);
    (lib, bin)
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 build path")
}

fn gcc(args: &[&str]) {
    let out = Command::new("gcc").args(CFLAGS).args(args).output().expect("gcc must be installed (scripts/setup.sh)");
    assert!(out.status.success(), "gcc {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
}

/// The environment that points cedana's GPU configuration at the fakes, with `backend` (`cuda-checkpoint` or
/// `driver`).
pub fn cedana_env(gpu: &FakeGpu, backend: &str) -> Vec<(&'static str, String)> {
    vec![
        ("CEDANA_GPU_BACKEND", backend.to_string()),
        ("CEDANA_GPU_CUDA_CHECKPOINT", gpu.cuda_checkpoint.display().to_string()),
        ("CEDANA_GPU_LIBCUDA", gpu.lib_dir.join("libcuda.so.1").display().to_string()),
        ("CEDANA_GPU_NVIDIA_SMI", gpu.nvidia_smi.display().to_string()),
    ]
}

/// `cedana ARGS` (log level info) with the fakes' GPU configuration for `backend` (see [`cedana_env`]) and
/// `env`, run to its end.
pub fn cedana_gpu(gpu: &FakeGpu, backend: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(crate::bin("cedana"));
    cmd.args(args).env("CEDANA_LOG_LEVEL", "info");
    cmd.envs(cedana_env(gpu, backend));
    cmd.envs(env.iter().copied());
    cmd.output().expect("run cedana")
}

/// gpu-app's lines in a container's output (PIDs in the container's namespace).
pub fn container_lines(out: &crate::lines::Lines) -> Vec<AppLine> {
    out.snapshot().iter().filter_map(|l| AppLine::parse(l)).collect()
}

/// Wait (20 s at most) until `processes` CUDA processes of a container printed a count of at least `count`;
/// the last line of each.
pub fn wait_container_counts(out: &crate::lines::Lines, processes: usize, count: u64) -> Vec<AppLine> {
    crate::wait_for("the CUDA processes of the container count", Duration::from_secs(20), || {
        let lines = container_lines(out);
        let mut pids: Vec<i32> = lines.iter().map(|l| l.pid).collect();
        pids.sort();
        pids.dedup();
        let last: Vec<_> = pids.iter().filter_map(|p| lines.iter().rev().find(|l| l.pid == *p).cloned()).collect();
        (last.len() == processes && last.iter().all(|l| l.count >= count)).then_some(last)
    })
}

/// Wait until the `processes` CUDA processes of a restored container (output `after`) count on, and check
/// that each went on from its last count before the checkpoint (`last`) with its device memory intact.
pub fn assert_container_counts_continue(after: &crate::lines::Lines, last: &[AppLine], processes: usize, mib: u32) {
    for l in &wait_container_counts(after, processes, 0) {
        let before = last.iter().find(|b| b.pid == l.pid).expect("the process counted before the checkpoint");
        let first = container_lines(after).into_iter().find(|x| x.pid == l.pid).expect("its first line");
        assert_eq!(first.count, before.count + 1, "process {} continues where it was", l.pid);
        assert_eq!(first.sum, expected_sum(mib, first.count), "device memory of {}", l.pid);
    }
}

/// A busybox bundle running gpu-app (with one CUDA child) the way the NVIDIA toolkit's CDI devices set a
/// container up: the device node in `linux.devices`, the driver library and tools bind-mounted read-only,
/// NVIDIA_VISIBLE_DEVICES=`visible` in the environment (and the host's /usr for the app's libc).
pub fn cdi_bundle(gpu: &FakeGpu, mib: u32, visible: &str, dir: &Path) -> crate::images::Bundle {
    let bundle = crate::images::Bundle::busybox(dir, &["/opt/gpu/gpu-app", &mib.to_string(), "1"]);
    let rootfs = bundle.rootfs();
    for d in ["usr", "opt/gpu", "nvidia/lib", "run/fake-cuda"] {
        std::fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    std::os::unix::fs::symlink("usr/lib", rootfs.join("lib")).unwrap();
    std::os::unix::fs::symlink("usr/lib64", rootfs.join("lib64")).unwrap();
    let bind = |src: &Path, dst: &str, mode: &str| serde_json::json!({"destination": dst, "type": "bind", "source": src, "options": ["rbind", mode]});
    let mounts = [
        bind(Path::new("/usr"), "/usr", "ro"),
        bind(&gpu.bin_dir, "/opt/gpu", "ro"),
        bind(&gpu.lib_dir, "/nvidia/lib", "ro"),
        bind(&gpu.control_dir, "/run/fake-cuda", "rw"),
    ];
    bundle.edit_config(|c| {
        c["mounts"].as_array_mut().unwrap().extend(mounts);
        let env = c["process"]["env"].as_array_mut().unwrap();
        for e in ["LD_LIBRARY_PATH=/nvidia/lib", "FAKE_CUDA_DEVICE=/dev/nvidia0", "FAKE_CUDA_DIR=/run/fake-cuda", format!("NVIDIA_VISIBLE_DEVICES={visible}").as_str()] {
            env.push(e.into());
        }
        c["linux"]["devices"] =
            serde_json::json!([{"path": "/dev/nvidia0", "type": "c", "major": 1, "minor": 5, "fileMode": 438, "uid": 0, "gid": 0}]);
        c["linux"]["resources"]["devices"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"allow": true, "type": "c", "major": 1, "minor": 5, "access": "rwm"}));
    });
    bundle
}
