//! GPU containers set up by the legacy `nvidia-container-runtime-hook` (Docker's `--gpus`, containerd with
//! NVIDIA's runtime hook): the hook bind-mounts the driver library, the tools and the device node into the
//! rootfs itself, so these mounts are not in the OCI spec. cedana-runc declares them external to CRIU at
//! checkpoint and maps them back to the host's files at restore. Against the fakes of NVIDIA's stack
//! (integration/fake-gpu, with `nvidia-hook` standing in for the legacy hook) and real runc and CRIU. Also:
//! a bind mount a container makes of its own files is not taken for a hook's.

use std::path::Path;
use std::process::Command;

use cedana_integration::engines::{piped, RuncRoot};
use cedana_integration::gpu::{assert_container_counts_continue, cedana_env, container_lines, wait_container_counts, FakeGpu};
use cedana_integration::images::{Bundle, RESTORE_ANNOTATION};
use cedana_integration::{bin, require_root};

/// Device memory of each fake CUDA process, in MiB.
const MIB: u32 = 4;

/// Where the fake hook mounts its files inside the container.
const HOOK_MOUNTS: [&str; 5] =
    ["/nvidia/lib/libcuda.so.1", "/opt/gpu/gpu-app", "/opt/gpu/cuda-checkpoint", "/opt/gpu/nvidia-smi", "/dev/nvidia0"];

/// A busybox bundle running gpu-app (with one CUDA child) whose GPU files come from the fake legacy hook, a
/// prestart hook: no driver file or device is in the spec's mounts or devices (only the host's /usr for
/// libc, and the fakes' control folder). The hook appends a line to `hook_log` at each run.
fn legacy_bundle(gpu: &FakeGpu, dir: &Path, hook_log: &Path) -> Bundle {
    let bundle = Bundle::busybox(dir, &["/opt/gpu/gpu-app", &MIB.to_string(), "1"]);
    let rootfs = bundle.rootfs();
    for d in ["usr", "run/fake-cuda"] {
        std::fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    std::os::unix::fs::symlink("usr/lib", rootfs.join("lib")).unwrap();
    std::os::unix::fs::symlink("usr/lib64", rootfs.join("lib64")).unwrap();
    let bind = |src: &Path, dst: &str, mode: &str| serde_json::json!({"destination": dst, "type": "bind", "source": src, "options": ["rbind", mode]});
    bundle.edit_config(|c| {
        c["mounts"].as_array_mut().unwrap().extend([bind(Path::new("/usr"), "/usr", "ro"), bind(&gpu.control_dir, "/run/fake-cuda", "rw")]);
        let env = c["process"]["env"].as_array_mut().unwrap();
        for e in ["LD_LIBRARY_PATH=/nvidia/lib", "FAKE_CUDA_DEVICE=/dev/nvidia0", "FAKE_CUDA_DIR=/run/fake-cuda", "NVIDIA_VISIBLE_DEVICES=0"] {
            env.push(e.into());
        }
        c["hooks"] = serde_json::json!({"prestart": [{
            "path": gpu.hook,
            "args": ["nvidia-container-runtime-hook", "prestart"],
            "env": [format!("FAKE_NVIDIA_DEVICE={}", gpu.device.display()), format!("FAKE_NVIDIA_HOOK_LOG={}", hook_log.display())],
        }]});
        // The real hook allows the device in the container's cgroup itself.
        c["linux"]["resources"]["devices"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"allow": true, "type": "c", "major": 1, "minor": 5, "access": "rwm"}));
    });
    bundle
}

/// How many mounts of the container whose init is `pid` are at `mountpoint`.
fn mounts_at(pid: i32, mountpoint: &str) -> usize {
    let info = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    info.lines().filter(|l| l.split(' ').nth(4) == Some(mountpoint)).count()
}

fn host_pid(runc: &RuncRoot, id: &str) -> i32 {
    runc.state(id).unwrap()["pid"].as_i64().unwrap() as i32
}

#[test]
fn a_container_set_up_by_the_legacy_nvidia_hook_is_checkpointed_and_restored_at_create() {
    require_root();
    let gpu = FakeGpu::new();
    let tmp = gpu.dir.clone();
    let runc = RuncRoot::new(&tmp, bin("cedana-runc"));
    let env = cedana_env(&gpu, "cuda-checkpoint");
    let wrapper = |args: &[&str]| {
        let mut cmd = runc.cmd(args);
        cmd.envs(env.iter().map(|(k, v)| (*k, v.as_str())));
        let lines = piped(&mut cmd);
        let status = cmd.status().expect("cedana-runc");
        assert!(status.success(), "cedana-runc {args:?}: {:?}", lines.snapshot());
        lines
    };
    let hook_log = tmp.join("hook.log");
    let hook_runs = || std::fs::read_to_string(&hook_log).unwrap_or_default().lines().count();
    let cid = format!("ced-legacy-{}", std::process::id());
    let bundle = legacy_bundle(&gpu, &tmp.join("bundle"), &hook_log);
    runc.track(&cid);
    let lines = wrapper(&["run", "-d", "--bundle", bundle.dir.to_str().unwrap(), &cid]);
    wait_container_counts(&lines, 2, 2);
    assert_eq!(hook_runs(), 1, "the hook ran at create");
    let pid = host_pid(&runc, &cid);
    for m in HOOK_MOUNTS {
        assert_eq!(mounts_at(pid, m), 1, "the hook mounted {m}");
    }

    // The checkpoint records the hook's mounts, each with its host file.
    let images = tmp.join("images");
    wrapper(&["checkpoint", "--image-path", images.to_str().unwrap(), &cid]);
    lines.wait_closed(std::time::Duration::from_secs(20));
    let last: Vec<_> = {
        let all = container_lines(&lines);
        let mut pids: Vec<i32> = all.iter().map(|l| l.pid).collect();
        pids.sort();
        pids.dedup();
        pids.iter().map(|p| all.iter().rfind(|l| l.pid == *p).unwrap().clone()).collect()
    };
    assert_eq!(last.len(), 2, "{last:?}");
    let manifest = cedana::checkpoint::read_manifest(&images.join("cedana-checkpoint.tar.zst"), false).unwrap();
    let recorded = &manifest.container.as_ref().unwrap().external_mounts;
    let mut points: Vec<&str> = recorded.iter().map(|m| m.mountpoint.as_str()).collect();
    points.sort();
    let mut expected = HOOK_MOUNTS.to_vec();
    expected.sort();
    assert_eq!(points, expected, "{recorded:?}");
    let device = recorded.iter().find(|m| m.mountpoint == "/dev/nvidia0").unwrap();
    assert_eq!(device.host_path, gpu.device, "{device:?}");
    assert_eq!(manifest.gpu.as_ref().map(|g| g.pids.len()), Some(2), "the GPU state is in the checkpoint");

    // A GPU restore that fails leaves no half-restored container running.
    let failed = tmp.join("failed");
    let broken = legacy_bundle(&gpu, &failed, &hook_log);
    broken.annotate(RESTORE_ANNOTATION, images.to_str().unwrap());
    let bad = format!("{cid}-bad");
    runc.track(&bad);
    let mut cmd = runc.cmd(&["run", "-d", "--bundle", failed.to_str().unwrap(), &bad]);
    cmd.envs(env.iter().map(|(k, v)| (*k, v.as_str())));
    let out = cmd.env("FAKE_CUDA_FAIL", "restore").stdin(std::process::Stdio::null()).output().unwrap();
    let e = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success() && e.contains("CUDA restore of process"), "{e}");
    assert!(runc.status(&bad).is_none_or(|s| s == "stopped"), "{:?}", runc.status(&bad));
    let runs_before = hook_runs();

    // Restore at create: runc runs the prestart hook again (at CRIU's setup-namespaces); each file is
    // mounted once, both processes count on from where they were, with their device memory.
    let again = tmp.join("again");
    let restored = legacy_bundle(&gpu, &again, &hook_log);
    restored.annotate(RESTORE_ANNOTATION, images.to_str().unwrap());
    let copy = format!("{cid}-restored");
    runc.track(&copy);
    let after = wrapper(&["run", "-d", "--bundle", again.to_str().unwrap(), &copy]);
    let pid = host_pid(&runc, &copy);
    assert_eq!(hook_runs(), runs_before + 1, "runc ran the prestart hook again at restore");
    // It ran in the namespace CRIU made for the container before CRIU rebuilt its mounts: nothing of it
    // shows on the host.
    let ours = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let rootfs = restored.rootfs().display().to_string();
    assert!(!ours.lines().any(|l| l.split(' ').nth(4).is_some_and(|p| p.starts_with(&rootfs))), "{ours}");
    assert_eq!(gpu.state(pid).as_deref(), Some("running"), "the GPU hook restored and unlocked the init");
    for m in HOOK_MOUNTS {
        assert_eq!(mounts_at(pid, m), 1, "{m} is mounted once in the restored container");
    }
    assert_container_counts_continue(&after, &last, 2, MIB);
    runc.ok(&["kill", &copy, "KILL"]);
}

#[test]
fn a_restore_refuses_a_host_without_a_file_the_hook_had_mounted() {
    require_root();
    let gpu = FakeGpu::new();
    let tmp = gpu.dir.clone();
    let runc = RuncRoot::new(&tmp, bin("cedana-runc"));
    let env = cedana_env(&gpu, "cuda-checkpoint");
    let hook_log = tmp.join("hook.log");
    let cid = format!("ced-legacy-missing-{}", std::process::id());
    let bundle = legacy_bundle(&gpu, &tmp.join("bundle"), &hook_log);
    runc.track(&cid);
    let run = |args: &[&str]| {
        let mut cmd = runc.cmd(args);
        cmd.envs(env.iter().map(|(k, v)| (*k, v.as_str())));
        cmd
    };
    let mut cmd = run(&["run", "-d", "--bundle", bundle.dir.to_str().unwrap(), &cid]);
    let lines = piped(&mut cmd);
    assert!(cmd.status().unwrap().success(), "{:?}", lines.snapshot());
    wait_container_counts(&lines, 2, 2);
    let images = tmp.join("images");
    let out = run(&["checkpoint", "--image-path", images.to_str().unwrap(), &cid]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // The restoring host has no such device node: refused before anything runs, naming the mount and the file.
    let moved = tmp.join("nvidia0.moved");
    std::fs::rename(&gpu.device, &moved).unwrap();
    let again = tmp.join("again");
    let restored = legacy_bundle(&gpu, &again, &hook_log);
    restored.annotate(RESTORE_ANNOTATION, images.to_str().unwrap());
    let copy = format!("{cid}-restored");
    runc.track(&copy);
    let out =
        run(&["run", "-d", "--bundle", again.to_str().unwrap(), &copy]).stdin(std::process::Stdio::null()).output().unwrap();
    let e = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "the restore succeeded without the device node");
    assert!(e.contains("/dev/nvidia0") && e.contains(gpu.device.to_str().unwrap()), "{e}");
    assert!(runc.status(&copy).is_none_or(|s| s == "stopped"), "{:?}", runc.status(&copy));
    std::fs::rename(&moved, &gpu.device).unwrap();
}

/// The fake hook alone: run through plain runc, it mounts its files read-only into the container.
#[test]
fn the_fake_legacy_hook_mounts_the_driver_files_read_only() {
    require_root();
    let gpu = FakeGpu::new();
    let tmp = gpu.dir.clone();
    let runc = RuncRoot::new(&tmp, cedana::runc::locate().unwrap());
    let hook_log = tmp.join("hook.log");
    let bundle = legacy_bundle(&gpu, &tmp.join("bundle"), &hook_log);
    let cid = format!("ced-hook-{}", std::process::id());
    runc.track(&cid);
    let mut cmd: Command = runc.cmd(&["run", "-d", "--bundle", bundle.dir.to_str().unwrap(), &cid]);
    let lines = piped(&mut cmd);
    assert!(cmd.status().unwrap().success(), "{:?}", lines.snapshot());
    wait_container_counts(&lines, 2, 1);
    let pid = host_pid(&runc, &cid);
    let info = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    for m in HOOK_MOUNTS {
        let line = info.lines().find(|l| l.split(' ').nth(4) == Some(m)).unwrap_or_else(|| panic!("{m} in {info}"));
        let options = line.split(' ').nth(5).unwrap();
        assert!(options.split(',').any(|o| o == "ro") && options.contains("nosuid"), "{m}: {line}");
    }
    assert!(std::fs::read_to_string(&hook_log).unwrap().starts_with(&format!("pid {pid} mounts 5")));
    runc.ok(&["kill", &cid, "KILL"]);
}

/// Not every mount outside the spec is a hook's: a bind mount the container made of its own files (a folder
/// of its rootfs) stays CRIU's, which binds it from the rootfs again, in the new container's rootfs.
#[test]
fn a_bind_mount_the_container_made_of_its_own_files_is_not_external() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let runc = RuncRoot::new(tmp.path(), bin("cedana-runc"));
    let cid = format!("ced-selfbind-{}", std::process::id());
    let (bundle, _lines) = runc.run_counter(tmp.path(), &cid, 2, std::time::Duration::from_secs(20));
    std::fs::create_dir_all(bundle.rootfs().join("mnt/bin")).unwrap();
    let pid = host_pid(&runc, &cid);
    let out = Command::new("nsenter")
        .args(["-t", &pid.to_string(), "-m", "--", "/bin/busybox", "mount", "--bind", "/bin", "/mnt/bin"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(mounts_at(pid, "/mnt/bin"), 1);
    let images = tmp.path().join("images");
    runc.ok(&["checkpoint", "--image-path", images.to_str().unwrap(), &cid]);
    let manifest = cedana::checkpoint::read_manifest(&images.join("cedana-checkpoint.tar.zst"), false).unwrap();
    assert!(manifest.container.as_ref().unwrap().external_mounts.is_empty(), "{:?}", manifest.container);

    let restored = Bundle::counter(&tmp.path().join("again"));
    std::fs::create_dir_all(restored.rootfs().join("mnt/bin")).unwrap();
    restored.annotate(RESTORE_ANNOTATION, images.to_str().unwrap());
    let copy = format!("{cid}-restored");
    runc.run_detached(&restored.dir, &copy);
    let pid = host_pid(&runc, &copy);
    assert_eq!(mounts_at(pid, "/mnt/bin"), 1, "CRIU bound it again");
    let info = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let line = info.lines().find(|l| l.split(' ').nth(4) == Some("/mnt/bin")).unwrap();
    let root = restored.rootfs().join("bin");
    assert!(line.split(' ').nth(3) == Some(root.to_str().unwrap()), "from the new rootfs: {line}");
    runc.ok(&["kill", &copy, "KILL"]);
}

/// A stand-in for `nvidia-container-runtime` in its legacy mode, as cedana-runc's real runc
/// (`CEDANA_RUNC_BINARY`): on `create` it adds the NVIDIA prestart hook (here the fake) to the bundle's spec,
/// then runs runc with the same arguments; every other command goes to runc untouched, as with the real one.
fn legacy_runtime(gpu: &FakeGpu, hook_log: &Path) -> std::path::PathBuf {
    let path = gpu.dir.join("nvidia-container-runtime");
    let hook = serde_json::json!({
        "path": gpu.hook,
        "args": ["nvidia-container-runtime-hook", "prestart"],
        "env": [format!("FAKE_NVIDIA_DEVICE={}", gpu.device.display()), format!("FAKE_NVIDIA_HOOK_LOG={}", hook_log.display())],
    });
    let script = format!(
        r#"#!/usr/bin/python3
import json, os, sys
args = sys.argv[1:]
if "create" in args:
    bundle = os.getcwd()
    for i, a in enumerate(args):
        if a in ("--bundle", "-b") and i + 1 < len(args):
            bundle = args[i + 1]
        elif a.startswith("--bundle="):
            bundle = a.split("=", 1)[1]
    config = os.path.join(bundle, "config.json")
    with open(config) as f:
        spec = json.load(f)
    spec.setdefault("hooks", {{}}).setdefault("prestart", []).append(json.loads({hook:?}))
    with open(config, "w") as f:
        json.dump(spec, f)
os.execvp("runc", ["runc"] + args)
"#,
        hook = hook.to_string()
    );
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    path
}

/// Through containerd and our shim, with the hook added by an NVIDIA-style runtime under cedana-runc (no
/// device or driver file in what `ctr run` asks for): `ctr container checkpoint --task --rw`, then
/// `ctr container restore --live`; the task's CUDA processes count on with their device memory.
#[test]
fn a_task_given_its_gpu_by_the_legacy_hook_is_checkpointed_and_restored_through_ctr_and_our_shim() {
    require_root();
    use cedana_integration::gpu_shim::{bind, round_trip, ShimGpuTask};
    let gpu = FakeGpu::new();
    let runtime = legacy_runtime(&gpu, &gpu.dir.join("hook.log"));
    let mut env = cedana_env(&gpu, "cuda-checkpoint");
    env.push(("CEDANA_RUNC_BINARY", runtime.display().to_string()));
    #[rustfmt::skip]
    let run_flags = vec![
        "--mount".into(), bind(Path::new("/usr"), "/usr", "ro"),
        "--mount".into(), bind(&gpu.control_dir, "/run/fake-cuda", "rw"),
        "--env".into(), "NVIDIA_VISIBLE_DEVICES=0".into(), "--env".into(), "LD_LIBRARY_PATH=/nvidia/lib".into(),
        "--env".into(), "FAKE_CUDA_DEVICE=/dev/nvidia0".into(), "--env".into(), "FAKE_CUDA_DIR=/run/fake-cuda".into(),
    ];
    let task = ShimGpuTask {
        env,
        rootfs_dirs: &["usr", "run/fake-cuda"],
        image: "docker.io/cedana/fake-gpu-legacy:latest",
        id: "gpu-legacy-task",
        run_flags,
        mib: MIB,
    };
    // The hook mounted each file in the task, and each once in the restored one (CRIU's mount).
    round_trip(&gpu, task, |pid| {
        for m in HOOK_MOUNTS {
            assert_eq!(mounts_at(pid, m), 1, "{m} is mounted once in the task of {pid}");
        }
    });
}
