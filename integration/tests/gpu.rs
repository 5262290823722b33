//! GPU-aware checkpoint/restore through the `cedana` CLI and the daemon, against the fakes of NVIDIA's stack
//! (integration/fake-gpu: a fake libcuda whose restore thread lives in the CUDA process, a fake
//! `cuda-checkpoint` with the real command line, a fake `nvidia-smi`) and real CRIU: the order of
//! operations (lock, checkpoint, CRIU; CRIU, restore, unlock), the rollbacks, the timeouts, the host check,
//! and both backends (the utility and the driver API loaded at run time).

use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

use cedana_integration::gpu::{
    app_lines, assert_container_counts_continue, cdi_bundle, cedana_env, cedana_gpu, container_lines, expected_sum,
    last_app_line, wait_container_counts, wait_count, FakeGpu,
};
use cedana_integration::{bin, require_root};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Device memory of each fake CUDA process, in MiB (the checksum is recomputed in the test).
const MIB: u32 = 4;

/// Which backend a test drives.
#[derive(Clone, Copy, Debug)]
enum Backend {
    Utility,
    Driver,
}

impl Backend {
    /// Its name in the configuration (`gpu.backend`).
    fn name(self) -> &'static str {
        match self {
            Backend::Utility => "cuda-checkpoint",
            Backend::Driver => "driver",
        }
    }
}

/// `cedana ARGS` with the GPU configuration pointing at the fakes.
fn cedana(gpu: &FakeGpu, backend: Backend, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    cedana_gpu(gpu, backend.name(), args, env)
}

fn gpu_env(gpu: &FakeGpu, backend: Backend, cmd: &mut Command) {
    cmd.envs(cedana_env(gpu, backend.name()));
}

fn ok(what: &str, out: &std::process::Output) -> String {
    cedana_integration::success_stdout(what, out)
}

fn err(what: &str, out: &std::process::Output) -> String {
    assert!(!out.status.success(), "{what} succeeded: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit(')').next().and_then(|r| r.split_whitespace().next()) != Some("Z"))
}

fn kill_all(pids: &[i32]) {
    for p in pids {
        let _ = kill(Pid::from_raw(*p), Signal::SIGKILL);
    }
}

/// A fake CUDA program with `children` CUDA children, running and counting; its PIDs, root first.
fn start_app(gpu: &FakeGpu, children: u32, log: &Path, env: &[(&str, &str)]) -> (Child, Vec<i32>) {
    let mut cmd = gpu.app_command(MIB, children, log);
    cmd.envs(env.iter().copied());
    let child = cmd.spawn().expect("start gpu-app");
    let root = child.id() as i32;
    wait_count(log, root, 2);
    let pids = cedana_integration::wait_for("every CUDA process of the tree counts", Duration::from_secs(20), || {
        let pids: std::collections::BTreeSet<i32> = app_lines(log, None).iter().map(|l| l.pid).collect();
        (pids.len() == 1 + children as usize).then_some(pids)
    });
    let mut pids: Vec<i32> = pids.into_iter().collect();
    pids.sort_by_key(|p| *p != root);
    (child, pids)
}

/// Every PID counts on past `count`, with the checksum of its device memory right for each count.
fn assert_counting_on(log: &Path, pids: &[i32], count: u64) {
    for pid in pids {
        let line = wait_count(log, *pid, count + 2);
        assert_eq!(line.sum, expected_sum(MIB, line.count), "device memory of {pid} at count {}", line.count);
        let counts: Vec<u64> = app_lines(log, Some(*pid)).iter().map(|l| l.count).collect();
        assert!(counts.windows(2).all(|w| w[1] == w[0] + 1), "{pid} counted without a gap or repeat: {counts:?}");
    }
}

#[test]
fn a_cuda_process_tree_is_dumped_and_restored_with_its_device_memory_by_either_backend() {
    require_root();
    for backend in [Backend::Utility, Backend::Driver] {
        let gpu = FakeGpu::new();
        let log = gpu.dir.join("app.log");
        let (mut child, pids) = start_app(&gpu, 2, &log, &[]);
        let root = pids[0].to_string();
        let dir = gpu.dir.to_str().unwrap();
        let out = cedana(&gpu, backend, &["dump", "process", &root, "--no-server", "--dir", dir, "--name", "cp"], &[]);
        let text = ok("dump of a CUDA tree", &out);
        assert!(text.contains("gpu       3 CUDA process(es)") && text.contains("NVIDIA A100"), "{backend:?}: {text}");
        let _ = child.wait();
        assert!(pids.iter().all(|p| !alive(*p)), "CRIU ended the tree");
        let before: Vec<u64> = pids.iter().map(|p| last_app_line(&log, Some(*p)).unwrap().count).collect();

        // The manifest records the CUDA processes, the GPU and the driver.
        let manifest = ok("inspect", &cedana(&gpu, backend, &["checkpoint", "inspect", &format!("{dir}/cp.tar"), "--json"], &[]));
        let m: serde_json::Value = serde_json::from_str(&manifest).unwrap();
        let mut recorded: Vec<i64> = m["gpu"]["pids"].as_array().unwrap().iter().map(|p| p.as_i64().unwrap()).collect();
        recorded.sort();
        let mut sorted: Vec<i64> = pids.iter().map(|p| *p as i64).collect();
        sorted.sort();
        assert_eq!(recorded, sorted, "{m}");
        assert_eq!(m["gpu"]["devices"][0]["memory_mib"], 40960, "{m}");
        assert_eq!(m["gpu"]["driver_version"], "570.86.10", "{m}");

        let out =
            cedana(&gpu, backend, &["restore", "process", "--path", &format!("{dir}/cp.tar"), "--no-server", "--detach"], &[]);
        ok("restore of a CUDA tree", &out);
        for (pid, count) in pids.iter().zip(&before) {
            assert_eq!(gpu.state(*pid).as_deref(), Some("running"), "{backend:?}: CUDA state of restored {pid}");
            assert_counting_on(&log, &[*pid], *count);
        }
        kill_all(&pids);
    }
}

#[test]
fn leave_running_gives_every_process_its_gpu_back() {
    require_root();
    let gpu = FakeGpu::new();
    let log = gpu.dir.join("app.log");
    let (mut child, pids) = start_app(&gpu, 1, &log, &[]);
    let dir = gpu.dir.to_str().unwrap();
    let out = cedana(
        &gpu,
        Backend::Utility,
        &["dump", "process", &pids[0].to_string(), "--no-server", "--dir", dir, "--leave-running", "--output", "json"],
        &[],
    );
    let v: serde_json::Value = serde_json::from_str(&ok("dump --leave-running", &out)).unwrap();
    assert!(v["timings_ms"]["gpu checkpoint"].is_number() && v["timings_ms"]["gpu resume"].is_number(), "{v}");
    for pid in &pids {
        assert_eq!(gpu.state(*pid).as_deref(), Some("running"));
        let now = last_app_line(&log, Some(*pid)).unwrap().count;
        assert_counting_on(&log, &[*pid], now);
    }
    kill_all(&pids);
    let _ = child.wait();
}

/// The processes under `pid` named `comm`.
fn descendants_named(pid: u32, comm: &str) -> Vec<i32> {
    let under = cedana::procfs::tree_pids(pid as i32).into_iter().skip(1);
    under.filter(|c| std::fs::read_to_string(format!("/proc/{c}/comm")).is_ok_and(|n| n.trim() == comm)).collect()
}

#[test]
fn the_gpu_step_runs_while_criu_starts_up() {
    require_root();
    let gpu = FakeGpu::new();
    let log = gpu.dir.join("app.log");
    let (mut child, pids) = start_app(&gpu, 0, &log, &[]);
    let dir = gpu.dir.to_str().unwrap();
    // Moving device memory out takes a second here: CRIU must be under way long before it ends.
    let mut cmd = Command::new(bin("cedana"));
    cmd.args(["dump", "process", &pids[0].to_string(), "--no-server", "--dir", dir, "--leave-running", "--output", "json"])
        .env("CEDANA_LOG_LEVEL", "info")
        .env("FAKE_CUDA_DELAY_MS", "checkpoint:1000")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    gpu_env(&gpu, Backend::Utility, &mut cmd);
    let mut dump = cmd.spawn().expect("start cedana dump");
    // Both at once: CRIU (started by the dump) while the GPU checkpoint (the utility's run) is under way.
    let mut overlapped = false;
    while dump.try_wait().expect("wait for cedana dump").is_none() {
        let (criu, utility) = (descendants_named(dump.id(), "criu"), descendants_named(dump.id(), "cuda-checkpoint"));
        overlapped |= !criu.is_empty() && !utility.is_empty();
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = dump.wait_with_output().expect("cedana dump");
    let v: serde_json::Value = serde_json::from_str(&ok("dump of a CUDA process", &out)).unwrap();
    let checkpoint_ms = v["timings_ms"]["gpu checkpoint"].as_f64().unwrap_or_else(|| panic!("{v}"));
    assert!(checkpoint_ms >= 1000.0, "the fake's delay is in the GPU step: {v}");
    assert!(overlapped, "CRIU ran while the {checkpoint_ms} ms GPU step did: {v}");
    assert_eq!(gpu.state(pids[0]).as_deref(), Some("running"), "left running on its GPU");
    let now = last_app_line(&log, Some(pids[0])).unwrap().count;
    assert_counting_on(&log, &pids, now);
    kill_all(&pids);
    let _ = child.wait();
}

#[test]
fn a_failed_lock_checkpoint_or_criu_dump_leaves_the_tree_running_on_its_gpu() {
    require_root();
    let gpu = FakeGpu::new();
    let log = gpu.dir.join("app.log");
    // Each unit of GPU work takes 1.5 s: a lock bounded by 200 ms times out.
    let (mut child, pids) = start_app(&gpu, 1, &log, &[("FAKE_CUDA_BUSY_MS", "1500")]);
    let dir = gpu.dir.to_str().unwrap();
    let root = pids[0].to_string();
    let dump = |env: &[(&str, &str)]| {
        cedana(&gpu, Backend::Utility, &["dump", "process", &root, "--no-server", "--dir", dir, "--name", "cp"], env)
    };
    // What fails, the environment that makes it fail, what the error says.
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case; 3] = [
        ("lock timeout", &[("CEDANA_GPU_LOCK_TIMEOUT_MS", "200")], "CUDA lock of process"),
        ("checkpoint failure", &[("FAKE_CUDA_FAIL", "checkpoint")], "CUDA checkpoint of process"),
        // CRIU kills itself early in the dump (its own fault injection), after the GPU state was moved.
        ("CRIU failure", &[("CRIU_FAULT", "1")], ""),
    ];
    for (what, env, says) in cases {
        let e = err(what, &dump(env));
        assert!(e.contains(says), "{what}: {e}");
        if !says.is_empty() {
            assert!(e.contains("left running on its GPU"), "{what}: {e}");
        }
        assert!(!gpu.dir.join("cp.tar").exists(), "{what}: no checkpoint");
        for pid in &pids {
            assert!(alive(*pid), "{what}: {pid} runs");
            assert_eq!(gpu.state(*pid).as_deref(), Some("running"), "{what}: CUDA state of {pid}");
        }
        let now = last_app_line(&log, Some(pids[1])).unwrap().count;
        wait_count(&log, pids[1], now + 1);
    }
    kill_all(&pids);
    let _ = child.wait();
}

#[test]
fn a_restore_refuses_a_host_whose_gpus_cannot_take_it_and_kills_a_tree_whose_gpu_restore_fails() {
    require_root();
    let gpu = FakeGpu::new();
    let log = gpu.dir.join("app.log");
    let (mut child, pids) = start_app(&gpu, 0, &log, &[]);
    let dir = gpu.dir.to_str().unwrap();
    ok(
        "dump",
        &cedana(
            &gpu,
            Backend::Utility,
            &["dump", "process", &pids[0].to_string(), "--no-server", "--dir", dir, "--name", "cp"],
            &[],
        ),
    );
    let _ = child.wait();
    let path = format!("{dir}/cp.tar");
    let restore = |extra: &[&str], env: &[(&str, &str)]| {
        let args = [&["restore", "process", "--path", &path, "--no-server", "--detach"][..], extra].concat();
        cedana(&gpu, Backend::Utility, &args, env)
    };

    // Smaller GPUs, fewer GPUs, an older driver: refused before anything is restored, with the override named.
    for (env, says) in [
        (("FAKE_GPU_MEMORY_MIB", "16384"), "only 16384 MiB"),
        (("FAKE_GPU_COUNT", "0"), "no NVIDIA GPU found on this host"),
        (("FAKE_GPU_DRIVER", "565.57.01"), "has the older 565.57.01"),
    ] {
        let e = err(says, &restore(&[], &[env]));
        assert!(e.contains(says) && e.contains("--skip-gpu-check"), "{e}");
        assert!(!alive(pids[0]), "nothing was restored: {e}");
    }

    // A GPU restore that fails: the restored tree is killed and the error says why.
    let e = err(
        "failing GPU restore",
        &restore(&["--skip-gpu-check"], &[("FAKE_GPU_MEMORY_MIB", "16384"), ("FAKE_CUDA_FAIL", "restore")]),
    );
    assert!(e.contains("CUDA restore of process") && e.contains("restored processes were killed"), "{e}");
    cedana_integration::wait_for("the half-restored tree is gone", Duration::from_secs(10), || (!alive(pids[0])).then_some(()));

    // Told to try anyway on the smaller GPU, the restore runs.
    ok("restore with --skip-gpu-check", &restore(&["--skip-gpu-check"], &[("FAKE_GPU_MEMORY_MIB", "16384")]));
    let before = app_lines(&log, Some(pids[0])).iter().map(|l| l.count).max().unwrap();
    assert_counting_on(&log, &pids, before);
    kill_all(&pids);
}

#[test]
fn a_process_without_a_gpu_pays_only_the_detection() {
    require_root();
    let gpu = FakeGpu::new();
    let w = cedana_integration::workload::Workload::start(&cedana_integration::workload_bin("counter"), &[], &gpu.dir);
    w.wait_lines(1);
    let dir = gpu.dir.to_str().unwrap();
    let out = cedana(
        &gpu,
        Backend::Utility,
        &["dump", "process", &w.pid.to_string(), "--no-server", "--dir", dir, "--leave-running", "--output", "json"],
        &[("FAKE_CUDA_FAIL", "lock")],
    );
    let v: serde_json::Value = serde_json::from_str(&ok("dump of a CPU process", &out)).unwrap();
    let detect = v["timings_ms"]["gpu detect"].as_f64().expect("a gpu detect phase");
    assert!(detect < 2.0, "detection took {detect} ms: {v}");
    assert!(v["gpu"].is_null() && v["timings_ms"]["gpu checkpoint"].is_null(), "{v}");
}

#[test]
fn a_gpu_container_is_checkpointed_by_cedana_runc_and_restored_at_create() {
    require_root();
    use cedana_integration::engines::{piped, RuncRoot};
    let gpu = FakeGpu::new();
    let tmp = gpu.dir.clone();
    let runc = RuncRoot::new(&tmp, bin("cedana-runc"));
    // The container's output (and the runtime's) goes into a pipe whose lines are returned.
    let wrapper = |args: &[&str], env: &[(&str, &str)]| {
        let mut cmd = runc.cmd(args);
        gpu_env(&gpu, Backend::Utility, &mut cmd);
        cmd.envs(env.iter().copied());
        let lines = piped(&mut cmd);
        let status = cmd.status().expect("cedana-runc");
        assert!(status.success(), "cedana-runc {args:?}: {:?}", lines.snapshot());
        lines
    };
    let cid = format!("ced-gpu-{}", std::process::id());
    let bundle = cdi_bundle(&gpu, MIB, "0", &tmp.join("bundle"));
    runc.track(&cid);
    let lines = wrapper(&["run", "-d", "--bundle", bundle.dir.to_str().unwrap(), &cid], &[]);
    wait_container_counts(&lines, 2, 2);
    let host_pid = runc.state(&cid).unwrap()["pid"].as_i64().unwrap() as i32;
    assert!(cedana::gpu::detect::is_gpu_process(host_pid), "the container's init is recognised as a CUDA process");

    // Checkpoint as containerd's shim asks runc to: the CUDA state of both processes goes into the checkpoint.
    let images = tmp.join("images");
    wrapper(&["checkpoint", "--image-path", images.to_str().unwrap(), &cid], &[]);
    let last = wait_container_counts(&lines, 2, 2);
    lines.wait_closed(Duration::from_secs(20));
    let last: Vec<_> = last.iter().map(|l| container_lines(&lines).into_iter().rfind(|x| x.pid == l.pid).unwrap()).collect();
    let manifest = cedana::checkpoint::read_manifest(&images.join("cedana-checkpoint.tar.zst"), false).unwrap();
    let record = manifest.gpu.expect("the manifest records the GPU state");
    assert_eq!((record.pids.len(), record.visible_devices.as_deref()), (2, Some("0")), "{record:?}");

    // A GPU restore that fails leaves no half-restored container running.
    let failed = tmp.join("failed");
    let restored = cdi_bundle(&gpu, MIB, "0", &failed);
    restored.annotate(cedana_integration::images::RESTORE_ANNOTATION, images.to_str().unwrap());
    let bad = format!("{cid}-bad");
    runc.track(&bad);
    let mut cmd = runc.cmd(&["run", "-d", "--bundle", failed.to_str().unwrap(), &bad]);
    gpu_env(&gpu, Backend::Utility, &mut cmd);
    let out = cmd.env("FAKE_CUDA_FAIL", "restore").stdin(std::process::Stdio::null()).output().unwrap();
    let e = err("restore with a failing GPU restore", &out);
    assert!(e.contains("CUDA restore of process"), "{e}");
    assert!(runc.status(&bad).is_none_or(|s| s == "stopped"), "{:?}", runc.status(&bad));

    // Restore at create from the annotation: both processes count on, with their device memory.
    let again = tmp.join("again");
    let restored = cdi_bundle(&gpu, MIB, "0", &again);
    restored.annotate(cedana_integration::images::RESTORE_ANNOTATION, images.to_str().unwrap());
    let copy = format!("{cid}-restored");
    runc.track(&copy);
    let after = wrapper(&["run", "-d", "--bundle", again.to_str().unwrap(), &copy], &[]);
    let host_pid = runc.state(&copy).unwrap()["pid"].as_i64().unwrap() as i32;
    assert_eq!(gpu.state(host_pid).as_deref(), Some("running"));
    assert_container_counts_continue(&after, &last, 2, MIB);
    runc.ok(&["kill", &copy, "KILL"]);
}

#[test]
fn a_managed_gpu_job_shows_in_ps_and_is_dumped_and_restored_by_the_daemon() {
    require_root();
    let gpu = FakeGpu::new();
    let smi = gpu.nvidia_smi.display().to_string();
    let tool = gpu.cuda_checkpoint.display().to_string();
    let d = cedana_integration::daemon::Daemon::start_with_env(&[
        ("CEDANA_GPU_BACKEND", "cuda-checkpoint"),
        ("CEDANA_GPU_CUDA_CHECKPOINT", &tool),
        ("CEDANA_GPU_NVIDIA_SMI", &smi),
    ]);
    let log = gpu.dir.join("job.log");
    // `env` sets the fake driver's environment and execs the app: the job's PID is the app's.
    let env: Vec<String> = gpu.env().iter().map(|(k, v)| format!("{k}={v}")).collect();
    let app = gpu.app.display().to_string();
    let mut args = vec!["run", "process", "--jid", "gpu1", "--out", log.to_str().unwrap(), "--", "/usr/bin/env"];
    args.extend(env.iter().map(String::as_str));
    args.extend([app.as_str(), "4", "1"]);
    let pid = cedana_integration::daemon::printed_pid(&d.ok(&args));
    wait_count(&log, pid, 2);
    let row = cedana_integration::wait_for("the GPU column", Duration::from_secs(10), || {
        let row = d.row("gpu1");
        (row[4] == "yes").then_some(row)
    });
    assert_eq!(row[1], "process", "{row:?}");

    let dumped = d.ok(&["dump", "job", "gpu1"]);
    assert!(dumped.contains("dump-process-gpu1-"), "{dumped}");
    cedana_integration::wait_for("the dumped job to be gone", Duration::from_secs(10), || (!alive(pid)).then_some(()));
    let row = d.row("gpu1");
    assert_eq!((row[3].as_str(), row[4].as_str()), ("halted", "yes"), "a halted GPU job is still one: {row:?}");
    let pids: std::collections::BTreeSet<i32> = app_lines(&log, None).iter().map(|l| l.pid).collect();
    let before: Vec<(i32, u64)> = pids.iter().map(|p| (*p, last_app_line(&log, Some(*p)).unwrap().count)).collect();

    d.ok(&["restore", "job", "gpu1"]);
    for (p, count) in &before {
        assert_eq!(gpu.state(*p).as_deref(), Some("running"), "CUDA state of restored {p}");
        assert_counting_on(&log, &[*p], *count);
    }
    d.ok(&["job", "kill", "gpu1"]);
    kill_all(&pids.into_iter().collect::<Vec<_>>());
}

#[test]
fn a_gpu_task_is_checkpointed_and_restored_through_ctr_and_our_shim() {
    require_root();
    use cedana_integration::gpu_shim::{bind, round_trip, ShimGpuTask};
    let gpu = FakeGpu::new();
    let env = vec![
        ("CEDANA_GPU_BACKEND", "cuda-checkpoint".to_string()),
        ("CEDANA_GPU_CUDA_CHECKPOINT", gpu.cuda_checkpoint.display().to_string()),
        ("CEDANA_GPU_NVIDIA_SMI", gpu.nvidia_smi.display().to_string()),
    ];
    #[rustfmt::skip]
    let run_flags = vec![
        "--mount".into(), bind(Path::new("/usr"), "/usr", "ro"),
        "--mount".into(), bind(&gpu.bin_dir, "/opt/gpu", "ro"),
        "--mount".into(), bind(&gpu.lib_dir, "/nvidia/lib", "ro"),
        "--mount".into(), bind(&gpu.control_dir, "/run/fake-cuda", "rw"),
        "--device".into(), gpu.device.display().to_string(),
        "--env".into(), "LD_LIBRARY_PATH=/nvidia/lib".into(),
        "--env".into(), format!("FAKE_CUDA_DEVICE={}", gpu.device.display()),
        "--env".into(), "FAKE_CUDA_DIR=/run/fake-cuda".into(),
    ];
    let task = ShimGpuTask {
        env,
        rootfs_dirs: &["usr", "opt/gpu", "nvidia/lib", "run/fake-cuda"],
        image: "docker.io/cedana/fake-gpu:latest",
        id: "gpu-task",
        run_flags,
        mib: MIB,
    };
    round_trip(&gpu, task, |pid| assert!(cedana::gpu::detect::is_gpu_process(pid), "{pid} uses the GPU"));
}
